//! What the adapter trainers share. Flow-GRPO ([`super::grpo`]), Flow-OPD ([`super::opd`]) and
//! the SFT cold start ([`super::sft`]) each train one LoRA adapter over a frozen pipeline; the
//! state they hold for it is one type, [`AdapterState`]: the pipeline, the base transformer on
//! the autodiff backend (no gradients), the trained adapter, its AdamW optimiser and EMA, the
//! trainer's random stream, the update count and, for data-parallel training, its peer.
//! The recipe fields that shape it ([`LoraSpec`], [`OptimConfig`]) live here too.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::PathBuf;

use burn::module::{AutodiffModule, Module};
use burn::optim::grad_clipping::GradientClippingConfig;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::Tensor;
use rand::SeedableRng;
use rand::seq::IndexedRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::ema::Ema;
use super::parallel::Peer;
use super::prompts::TaskPrompt;
use super::resume::{RngState, SavedState, TrainerState};
use super::rollout::{RolloutConfig, Rollouts, rollout_shard};
use crate::AutodiffBackend;
use crate::flow::TextConditioning;
use crate::model::lora::{LoraAdapter, LoraConfig, LoraTarget};
use crate::model::mmdit::Mmdit;
use crate::pipeline::{AnyPipeline, TextToImage};
use crate::world::Task;

/// A LoRA adapter's shape in a recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    /// diffusers layer names relative to a block; Flow-GRPO's list by default.
    #[serde(default = "flow_grpo_targets")]
    pub targets: Vec<String>,
}

fn flow_grpo_targets() -> Vec<String> {
    LoraTarget::FLOW_GRPO.iter().map(|t| t.key().to_string()).collect()
}

impl LoraSpec {
    pub fn config(&self) -> Result<LoraConfig, String> {
        let targets = self.targets.iter().map(|t| t.parse()).collect::<Result<Vec<LoraTarget>, String>>()?;
        Ok(LoraConfig::new(self.rank, self.alpha, targets))
    }
}

/// Optimiser settings shared by the trainers (docs/reference.md section 5 defaults for RL): AdamW, optional grad-norm clipping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    pub lr: f64,
    #[serde(default = "default_betas")]
    pub betas: (f32, f32),
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f32,
    /// Gradient-norm clip (1.0); 0 disables.
    #[serde(default = "default_grad_clip")]
    pub grad_clip: f32,
}

fn default_betas() -> (f32, f32) {
    (0.9, 0.999)
}
fn default_weight_decay() -> f32 {
    1e-4
}
fn default_grad_clip() -> f32 {
    1.0
}

impl OptimConfig {
    pub fn adamw(&self) -> AdamWConfig {
        let config = AdamWConfig::new()
            .with_beta_1(self.betas.0)
            .with_beta_2(self.betas.1)
            .with_weight_decay(self.weight_decay)
            .with_epsilon(1e-8);
        if self.grad_clip > 0.0 { config.with_grad_clipping(Some(GradientClippingConfig::Norm(self.grad_clip))) } else { config }
    }
}

/// The training fields every adapter trainer's config has, flattened into its `train` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterTraining {
    pub optim: OptimConfig,
    /// EMA decay cap (0.9).
    #[serde(default = "default_ema")]
    pub ema_max_decay: f64,
    /// Seeds a fresh adapter's weights and the trainer's random stream.
    #[serde(default)]
    pub seed: u64,
    /// Prompt file per task (one prompt per line); the world's shipped training prompts when
    /// empty.
    #[serde(default)]
    pub prompt_files: BTreeMap<Task, PathBuf>,
    /// What the backward recomputes instead of keeping: `none` (default), `balanced` (Burn's
    /// `BalancedCheckpointing`) or `blocks` (each transformer block keeps only its outputs).
    /// The gradients are the same; `blocks` trades a second forward for activation memory.
    #[serde(default)]
    pub checkpointing: super::Checkpointing,
}

fn default_ema() -> f64 {
    0.9
}

impl AdapterTraining {
    /// How a trainer with these settings starts: a fresh adapter of shape `lora` (when no
    /// `init` adapter is given), its random stream seeded with `rng_seed`.
    pub fn setup(&self, lora: Option<&LoraSpec>, rng_seed: u64) -> AdapterSetup {
        AdapterSetup { lora: lora.cloned(), training: self.clone(), rng_seed }
    }
}

/// How a trainer's adapter state starts.
pub struct AdapterSetup {
    /// The shape of a fresh adapter (used when no `init` adapter is given).
    pub lora: Option<LoraSpec>,
    pub training: AdapterTraining,
    /// Seeds the trainer's random stream (prompt draws, rollout noise seeds, timesteps).
    pub rng_seed: u64,
}

/// The state every adapter trainer holds (see the module docs).
pub struct AdapterState<B: AutodiffBackend, O: Optimizer<LoraAdapter<B>, B>> {
    /// The frozen pipeline on the inner backend (rollouts, teachers, references).
    pub pipeline: AnyPipeline<B::InnerBackend>,
    /// The pipeline's transformer on the autodiff backend, without gradients.
    pub base: Mmdit<B>,
    /// The trained adapter.
    pub adapter: LoraAdapter<B>,
    pub optimizer: O,
    /// The EMA of the adapter that checkpoints and exports save.
    pub ema: Ema<B, LoraAdapter<B>>,
    pub lr: f64,
    /// Updates done.
    pub iteration: usize,
    pub rng: ChaCha8Rng,
    pub peer: Option<Peer<B::InnerBackend>>,
}

/// Builds the state: the base from `pipeline`'s transformer, the adapter from `init` (trainable)
/// or fresh from `setup.lora` (its `B` zero), AdamW and the EMA at the adapter's weights.
pub fn adapter_state<B: AutodiffBackend>(
    pipeline: impl Into<AnyPipeline<B::InnerBackend>>,
    init: Option<LoraAdapter<B::InnerBackend>>,
    setup: AdapterSetup,
    device: &B::Device,
) -> Result<AdapterState<B, impl Optimizer<LoraAdapter<B>, B>>, String> {
    let pipeline = pipeline.into();
    let base = <Mmdit<B> as AutodiffModule<B>>::from_inner(pipeline.transformer().clone()).no_grad();
    let adapter = match (init, &setup.lora) {
        (Some(a), _) => super::trainable(<LoraAdapter<B> as AutodiffModule<B>>::from_inner(a)),
        (None, Some(spec)) => spec.config()?.init(&base, setup.training.seed, device),
        (None, None) => return Err("`lora`: without a cold-start adapter the student needs a `lora` shape".into()),
    };
    let optimizer = setup.training.optim.adamw().init::<B, LoraAdapter<B>>();
    let ema = Ema::new(&adapter, setup.training.ema_max_decay);
    Ok(AdapterState {
        pipeline,
        base,
        adapter,
        optimizer,
        ema,
        lr: setup.training.optim.lr,
        iteration: 0,
        rng: ChaCha8Rng::seed_from_u64(setup.rng_seed),
        peer: None,
    })
}

impl<B: AutodiffBackend, O: Optimizer<LoraAdapter<B>, B>> AdapterState<B, O> {
    /// Makes the trainer one data-parallel peer of a group (see [`super::parallel`]); each
    /// iteration's `prompts` are split evenly among the peers.
    pub fn join(&mut self, peer: Peer<B::InnerBackend>, prompts: usize) -> Result<(), String> {
        peer.check_divides(prompts, "rollout.prompts")?;
        self.peer = Some(peer);
        Ok(())
    }

    /// This peer's rows of a batch of `n` (all of them without a peer).
    pub fn shard(&self, n: usize) -> Range<usize> {
        self.peer.as_ref().map_or(0..n, |p| p.rows(n))
    }

    /// `count` prompts drawn from `pool` with the trainer's stream.
    pub fn draw_prompts(&mut self, pool: &[TaskPrompt], count: usize) -> Vec<TaskPrompt> {
        (0..count).map(|_| pool.choose(&mut self.rng).expect("non-empty").clone()).collect()
    }

    /// On-policy rollouts of the current adapter for this peer's share of `prompts`.
    pub fn rollout(&mut self, prompts: &[TaskPrompt], config: &RolloutConfig, device: &B::Device) -> Result<Rollouts<B::InnerBackend>, String> {
        let policy = self.adapter.valid();
        let shard = self.shard(prompts.len());
        rollout_shard(&self.pipeline, Some(&policy), prompts, shard, config, &mut self.rng, device)
    }

    /// With a peer, the means over the peers of `figures` and of the gradients (equal shares of
    /// the batch: the batch's figures and gradient); alone, both unchanged.
    pub fn peer_means<const N: usize>(
        &self,
        figures: [f64; N],
        grads: Option<GradientsParams>,
    ) -> Result<([f64; N], Option<GradientsParams>), String> {
        let Some(peer) = &self.peer else { return Ok((figures, grads)) };
        let figures = peer.mean(&figures)?.try_into().expect("as many figures as given");
        let grads = grads.map(|g| peer.mean_gradients(&self.adapter, g)).transpose()?;
        Ok((figures, grads))
    }

    /// The resumable state: the live adapter, the EMA, AdamW's moments, the update count and
    /// the random stream (the peer needs nothing of its own: every peer holds the same).
    pub fn save_state(&self) -> Result<TrainerState, String> {
        let mut state = TrainerState::default();
        state.module::<B, _>("adapter.bin", &self.adapter)?;
        state.module::<B::InnerBackend, _>("ema.bin", &self.ema.average)?;
        state.record::<B, _>("optimizer.bin", self.optimizer.to_record())?;
        state.set("iteration", self.iteration);
        state.set("ema_updates", self.ema.updates);
        state.set("rng", RngState::of(&self.rng));
        Ok(state)
    }

    /// Continues from a state [`Self::save_state`] wrote.
    pub fn restore(&mut self, saved: &SavedState<'_>, device: &B::Device) -> Result<(), String> {
        self.adapter = saved.module::<B, _>("adapter.bin", self.adapter.clone(), device)?;
        self.ema.average = saved.module::<B::InnerBackend, _>("ema.bin", self.ema.average.clone(), device)?;
        self.optimizer = self.optimizer.clone().load_record(saved.record::<B, O::Record>("optimizer.bin", device)?);
        self.iteration = saved.get("iteration")?;
        self.ema.updates = saved.get("ema_updates")?;
        self.rng = saved.get::<RngState>("rng")?.rng()?;
        Ok(())
    }

    /// Whether every weight of the live adapter is finite (a non-finite gradient shows here).
    pub fn weights_finite(&self) -> bool {
        super::weights_finite::<B::InnerBackend, _>(&self.adapter.valid())
    }

    /// One AdamW step of the adapter with `grads` and an EMA update (nothing without a
    /// gradient), then counts the iteration.
    pub fn update(&mut self, grads: Option<GradientsParams>) {
        if let Some(grads) = grads {
            let adapter = self.adapter.clone();
            self.adapter = self.optimizer.step(self.lr, adapter, grads);
            self.ema.update(&self.adapter);
        }
        self.iteration += 1;
    }
}

/// An on-policy adapter trainer (Flow-GRPO, Flow-OPD) as data-parallel training sees it.
pub trait AdapterTrainer<B: AutodiffBackend, O: Optimizer<LoraAdapter<B>, B>>: Sized {
    fn state_mut(&mut self) -> &mut AdapterState<B, O>;

    /// Prompts one iteration draws (`rollout.prompts`).
    fn prompts_per_iteration(&self) -> usize;

    /// Makes this trainer one data-parallel peer of a group (see [`super::parallel`]): it rolls
    /// out and trains on its share of each iteration's prompts; rewards and metrics are
    /// gathered over the peers, the figures and gradients averaged. Every peer must be built
    /// with the same config (hence the same adapter, optimiser, prompts and teachers).
    fn with_peer(mut self, peer: Peer<B::InnerBackend>) -> Result<Self, String> {
        let prompts = self.prompts_per_iteration();
        self.state_mut().join(peer, prompts)?;
        Ok(self)
    }
}

/// Lifts inner-backend conditioning onto the autodiff backend (as constants).
pub fn lift_conditioning<B: AutodiffBackend>(c: &TextConditioning<B::InnerBackend>) -> TextConditioning<B> {
    TextConditioning { tokens: Tensor::from_inner(c.tokens.clone()), pooled: Tensor::from_inner(c.pooled.clone()) }
}
