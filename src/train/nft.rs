//! DiffusionNFT training of one LoRA adapter (docs/diffusion_nft.md): rollouts of the old
//! policy with a deterministic solver (no log-probs), rewards and group-relative advantages as
//! in Flow-GRPO, then the forward-process objective of [`crate::flow::nft`] on each clean image
//! re-noised at `int(T * timestep_fraction)` of the sampler's noise levels (a fresh permutation
//! per sample), and after every iteration the old policy's soft update toward the policy.
//!
//! Data parallelism follows GRPO's: each peer rolls out its share of the prompts, the rewards
//! are gathered before the advantages, and the gradients averaged. Every sample's noise levels
//! and noise come from a stream numbered by its row in the whole batch, so peers train what one
//! device trains.

use std::collections::BTreeMap;
use std::ops::Range;

use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::{ElementConversion, Tensor};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::adapter::{AdapterState, AdapterTrainer, AdapterTraining, LoraSpec, adapter_state, lift_conditioning};
use super::fresh_leaves;
use super::ema::Ema;
use super::grpo::{Partition, PartitionData, batch_advantages, minibatch_rows, partition_data};
use super::grpo_math::{AdvantageStd, GroupBy, GroupSpread, group_spread};
use super::prompts::TaskPrompt;
use super::resume::{SavedState, TrainerState};
use super::rollout::{micro_batches, vector};
use super::scoring::{gather_scores, score};
use crate::AutodiffBackend;
use crate::flow::nft::{NftObjective, nft_loss, old_policy_decay};
use crate::flow::{FlowSchedule, GuidedModel, SeededNoise, Solver, TextConditioning, initial_noise, sample_deterministic};
use crate::model::lora::{ActiveAdapters, LoraAdapter};
use crate::pipeline::{AnyPipeline, TextToImage};
use crate::reward::{CompositionCredit, RemoteRewardConfig, RewardSet};
use crate::world::Task;

/// How DiffusionNFT samples its rollouts (upstream `config.sample`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NftRollout {
    /// Prompts per iteration.
    pub prompts: usize,
    /// Samples per prompt `G` (`num_image_per_prompt`, 24 upstream).
    pub group_size: usize,
    /// Solver steps T (10); the training noise levels are the solver's.
    #[serde(default = "ten")]
    pub steps: usize,
    /// CFG scale in sampling and training (1: the method is CFG-free).
    #[serde(default = "one_f64")]
    pub guidance: f64,
    /// The deterministic solver (`dpm2`, upstream's; or `euler`).
    #[serde(default)]
    pub solver: Solver,
    /// Samples per transformer pass (all at once if absent).
    #[serde(default)]
    pub micro_batch: Option<usize>,
    /// The `G` samples of a prompt start from the same initial noise. With a deterministic
    /// solver they are then the same image, so this is off by default.
    #[serde(default)]
    pub same_latent: bool,
}

/// DiffusionNFT settings (upstream `config/nft.py` names and defaults where they exist).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
// Unknown fields are refused by the recipe reader (flatten and `deny_unknown_fields` do not mix).
pub struct NftConfig {
    pub iterations: usize,
    pub rollout: NftRollout,
    /// Prompt partitions and their rewards, visited by `ratio` as in GRPO (a partition's own
    /// `beta` does not apply here).
    pub partitions: Vec<Partition>,
    pub lora: LoraSpec,
    /// The guidance strength between the policy and the old policy (`config.beta`: 1, the OCR
    /// setting 0.1).
    #[serde(default = "one_f64")]
    pub beta: f64,
    /// Weight of `mean ||v - v_ref||^2` toward the base (`config.train.beta`: 1e-4).
    #[serde(default = "default_kl_weight")]
    pub kl_weight: f64,
    /// Advantage clip, also the scale that maps advantages to `r` (5).
    #[serde(default = "default_adv_clip")]
    pub adv_clip_max: f64,
    /// Global std by default (`global_std = True`).
    #[serde(default)]
    pub advantage_std: AdvantageStd,
    /// Groups by prompt text by default (per-prompt stat tracking).
    #[serde(default = "by_prompt")]
    pub group_by: GroupBy,
    /// Noise levels trained per sample: `int(T * timestep_fraction)` of the T (0.99 -> 9).
    #[serde(default = "default_fraction")]
    pub timestep_fraction: f64,
    /// The old policy's soft-update schedule (0, 1 or 2; upstream's default 1, OCR 2).
    #[serde(default = "one_u8")]
    pub decay_type: u8,
    /// Optimizer steps per iteration, each on the next `1/minibatches` of the samples
    /// (upstream's `gradient_step_per_epoch`: 1, OCR 2).
    #[serde(default = "one_usize")]
    pub minibatches: usize,
    #[serde(default)]
    pub remote_rewards: BTreeMap<Task, RemoteRewardConfig>,
    #[serde(default)]
    pub composition_credit: CompositionCredit,
    #[serde(flatten)]
    pub training: AdapterTraining,
}

fn ten() -> usize {
    10
}
fn one_f64() -> f64 {
    1.0
}
fn one_u8() -> u8 {
    1
}
fn one_usize() -> usize {
    1
}
fn default_kl_weight() -> f64 {
    1e-4
}
fn default_adv_clip() -> f64 {
    5.0
}
fn default_fraction() -> f64 {
    0.99
}
fn by_prompt() -> GroupBy {
    GroupBy::Prompt
}

impl NftConfig {
    pub fn objective(&self) -> NftObjective {
        NftObjective { beta: self.beta, kl_weight: self.kl_weight, adv_clip_max: self.adv_clip_max }
    }

    /// Noise levels trained per sample.
    pub fn trained_levels(&self) -> usize {
        ((self.rollout.steps as f64 * self.timestep_fraction) as usize).min(self.rollout.steps)
    }

    /// Checks the settings the recipe reader cannot check by type; errors name the field.
    pub fn check(&self) -> Result<(), String> {
        let positive = |field: &str, x: f64| {
            if x.is_finite() && x > 0.0 { Ok(()) } else { Err(format!("`{field}` = {x}: must be a finite number > 0")) }
        };
        positive("beta", self.beta)?;
        positive("adv_clip_max", self.adv_clip_max)?;
        if !(self.kl_weight.is_finite() && self.kl_weight >= 0.0) {
            return Err(format!("`kl_weight` = {}: must be a finite number >= 0", self.kl_weight));
        }
        old_policy_decay(self.decay_type, 0)?;
        if self.partitions.is_empty() {
            return Err("`partitions`: at least one partition is needed".into());
        }
        if let Some(i) = self.partitions.iter().position(|p| p.beta.is_some()) {
            return Err(format!("`partitions[{i}].beta`: a GRPO KL weight; DiffusionNFT's is `kl_weight`"));
        }
        if self.trained_levels() == 0 {
            return Err(format!(
                "`timestep_fraction` = {}: trains no noise level of the {} steps",
                self.timestep_fraction, self.rollout.steps
            ));
        }
        let samples = self.rollout.prompts * self.rollout.group_size;
        if self.minibatches == 0 || self.minibatches > samples {
            return Err(format!("`minibatches` = {}: between 1 and the iteration's {samples} samples", self.minibatches));
        }
        Ok(())
    }
}

/// A DiffusionNFT trainer: the shared adapter state and the old policy.
pub struct NftTrainer<B: AutodiffBackend, O: Optimizer<LoraAdapter<B>, B>> {
    pub state: AdapterState<B, O>,
    /// The old policy (`average`): rolls out, and anchors the implicit positive and negative.
    pub old: Ema<B, LoraAdapter<B>>,
    pub config: NftConfig,
    /// Iterations done (each is `minibatches` updates).
    pub iterations_done: usize,
    schedule: Vec<usize>,
    prompts: Vec<Vec<TaskPrompt>>,
    rewards: RewardSet,
}

/// What one iteration reports.
#[derive(Debug, Clone, Default)]
pub struct NftStats {
    pub partition: usize,
    /// Mean training reward of the batch.
    pub reward: f64,
    pub task_metrics: BTreeMap<Task, f64>,
    /// The loss and its parts, means over the updates.
    pub loss: f64,
    pub positive: f64,
    pub negative: f64,
    /// `mean ||v - v_ref||^2` (0 without the KL term).
    pub kl: f64,
    /// The old policy's decay of this iteration's soft update.
    pub decay: f64,
    pub groups: GroupSpread,
}

/// Builds a DiffusionNFT trainer on `pipeline` from `init` or a fresh adapter of `config.lora`;
/// the old policy starts at the adapter.
pub fn nft_trainer<B: AutodiffBackend>(
    pipeline: impl Into<AnyPipeline<B::InnerBackend>>,
    init: Option<LoraAdapter<B::InnerBackend>>,
    config: NftConfig,
    device: &B::Device,
) -> Result<NftTrainer<B, impl Optimizer<LoraAdapter<B>, B>>, String> {
    config.check()?;
    if config.rollout.solver == Solver::Dpm2 && config.rollout.guidance > 1.0 && config.rollout.steps < 20 {
        // Measured on the world's base: at CFG 4.5, 10 dpm2 steps score 0.38 composition
        // accuracy where 10 Euler steps (and 20 dpm2 steps) score 0.69 on the same prompts and
        // noise (docs/experiments/world_calibration.md, "The GenEval teacher and CFG").
        tracing::warn!(
            "`rollout.solver` = \"dpm2\" with `rollout.guidance` = {} and {} steps: the multistep solver can sample far from the \
             evaluation's ODE at strong guidance; `solver = \"euler\"` or 20+ steps keeps the rollouts like the evaluation's samples",
            config.rollout.guidance,
            config.rollout.steps
        );
    }
    let setup = config.training.setup(Some(&config.lora), config.training.seed);
    let state = adapter_state::<B>(pipeline, init, setup, device)?;
    let old = Ema::new(&state.adapter, 1.0);
    let PartitionData { schedule, prompts, rewards } =
        partition_data(&config.partitions, &config.training.prompt_files, &config.remote_rewards, config.composition_credit)?;
    Ok(NftTrainer { state, old, config, iterations_done: 0, schedule, prompts, rewards })
}

impl<B: AutodiffBackend, O: Optimizer<LoraAdapter<B>, B>> AdapterTrainer<B, O> for NftTrainer<B, O> {
    fn state_mut(&mut self) -> &mut AdapterState<B, O> {
        &mut self.state
    }

    fn prompts_per_iteration(&self) -> usize {
        self.config.rollout.prompts
    }
}

/// One iteration's clean samples of this peer, scored.
struct Batch<B: AutodiffBackend> {
    /// Clean latents, conditioning and the negative prompt's (CFG) of this peer's samples.
    x0: Tensor<B::InnerBackend, 4>,
    cond: TextConditioning<B::InnerBackend>,
    negative: TextConditioning<B::InnerBackend>,
    /// The whole batch's rewards and per-task metrics.
    rewards: Vec<f64>,
    task_metrics: BTreeMap<Task, f64>,
    /// This peer's optimality `r` per sample.
    r: Vec<f64>,
    /// This peer's first row in the whole batch, and the stream seed of the training noise.
    first_row: usize,
    train_seed: u64,
}

impl<B: AutodiffBackend, O: Optimizer<LoraAdapter<B>, B>> NftTrainer<B, O> {
    /// One iteration: rollouts of the old policy, rewards, advantages, `minibatches` updates,
    /// then the old policy's soft update.
    pub fn iteration(&mut self, device: &B::Device) -> Result<NftStats, String> {
        let part = self.schedule[self.iterations_done % self.schedule.len()];
        let batch = self.collect(part, device)?;
        let n = batch.r.len();
        let chunks = minibatch_rows(n, self.config.minibatches);
        if chunks.iter().any(|c| c.is_empty()) {
            return Err(format!("`minibatches` = {}: this peer holds only {n} samples of the iteration", self.config.minibatches));
        }
        let mut sums = [0.0; 4];
        for chunk in &chunks {
            let (grads, figures) = self.gradient(&batch, chunk.clone())?;
            self.state.update(grads);
            for (sum, value) in sums.iter_mut().zip(figures) {
                *sum += value / chunks.len() as f64;
            }
        }
        let decay = old_policy_decay(self.config.decay_type, self.state.iteration)?;
        self.old.update_with(&self.state.adapter, decay);
        self.iterations_done += 1;
        let [loss, positive, negative, kl] = sums;
        Ok(NftStats {
            partition: part,
            reward: batch.rewards.iter().sum::<f64>() / batch.rewards.len().max(1) as f64,
            task_metrics: batch.task_metrics,
            loss,
            positive,
            negative,
            kl,
            decay,
            groups: group_spread(&batch.rewards, self.config.rollout.group_size),
        })
    }

    /// Rollouts of the old policy for this peer's share of a fresh draw of partition `part`'s
    /// prompts, their rewards over all peers, and this peer's optimality.
    fn collect(&mut self, part: usize, device: &B::Device) -> Result<Batch<B>, String> {
        let config = &self.config.rollout;
        let g = config.group_size;
        let prompts = self.state.draw_prompts(&self.prompts[part], config.prompts);
        let rng = &mut self.state.rng;
        let seeds: Vec<u64> = if config.same_latent {
            prompts.iter().map(|_| rng.random::<u64>()).flat_map(|s| std::iter::repeat_n(s, g)).collect()
        } else {
            (0..prompts.len() * g).map(|_| rng.random()).collect()
        };
        let train_seed: u64 = rng.random();
        let shard = self.state.shard(prompts.len());
        let rows = shard.start * g..shard.end * g;
        let expanded: Vec<TaskPrompt> = prompts[shard].iter().flat_map(|p| std::iter::repeat_n(p.clone(), g)).collect();
        let pipeline = &self.state.pipeline;
        let rolled = (|| -> Result<_, String> {
            let texts: Vec<&str> = expanded.iter().map(|p| p.text.as_str()).collect();
            let cond = pipeline.encode_prompts(&texts, device)?;
            let negative = pipeline.encode_prompts(&vec![""; texts.len()], device)?;
            let noise = initial_noise::<B::InnerBackend>(pipeline.latent_shape(), &seeds[rows.clone()], device);
            let schedule = pipeline.schedule().unwrap_or_else(FlowSchedule::sd3);
            let adapters = ActiveAdapters::single(&self.old.average);
            let mut parts = Vec::new();
            let mut images = Vec::with_capacity(texts.len());
            for mb in micro_batches(texts.len(), config.micro_batch) {
                let (c, neg) = (cond.rows(mb.clone()), negative.rows(mb.clone()));
                let field = GuidedModel { model: pipeline.transformer(), adapters: &adapters, cond: &c, guidance: neg.cfg(config.guidance) };
                let x0 = sample_deterministic(&field, noise.clone().slice([mb]), config.steps, schedule, config.solver);
                images.extend(pipeline.decode_rgb(x0.clone()));
                parts.push(x0);
            }
            let weights = &self.config.partitions[part].rewards;
            let scored = score(&expanded, &images, weights, &self.rewards)?;
            Ok((scored, Tensor::cat(parts, 0), cond, negative))
        })();
        let ((rewards, task_metrics), x0, cond, negative, own) = match &self.state.peer {
            None => {
                let (scored, x0, cond, negative) = rolled?;
                (scored, x0, cond, negative, 0..expanded.len())
            }
            Some(peer) => {
                let own = peer.rows(config.prompts * g);
                let tasks: Vec<Task> = expanded.iter().map(|p| p.task).collect();
                let local = rolled.as_ref().map(|((r, m), ..)| (r.as_slice(), m, tasks)).map_err(|e| e.clone());
                let gathered = gather_scores(peer, local, own.len())?;
                let (_, x0, cond, negative) = rolled?;
                (gathered, x0, cond, negative, own)
            }
        };
        let advantages = batch_advantages(&rewards, &prompts, g, self.config.group_by, self.config.advantage_std, self.config.adv_clip_max);
        let r = self.config.objective().optimality(&advantages[own.clone()]);
        Ok(Batch { x0, cond, negative, rewards, task_metrics, r, first_row: own.start, train_seed })
    }

    /// The noise levels (indices into the sampler's sigmas) and noise of the sample at `row`
    /// of the whole batch: a fresh permutation of the T levels, of which the first
    /// `trained_levels` are trained, and one standard-normal draw per trained level.
    fn sample_noise(&self, batch: &Batch<B>, row: usize, shape: [usize; 4], device: &B::Device) -> (Vec<usize>, Vec<Tensor<B::InnerBackend, 4>>) {
        let mut levels = ChaCha8Rng::seed_from_u64(batch.train_seed);
        levels.set_stream(2 * row as u64);
        let mut noise = SeededNoise::stream(batch.train_seed, 2 * row as u64 + 1);
        let mut order: Vec<usize> = (0..self.config.rollout.steps).collect();
        order.shuffle(&mut levels);
        order.truncate(self.config.trained_levels());
        let eps = order.iter().map(|_| noise.sample(shape, device)).collect();
        (order, eps)
    }

    /// The gradient of the DiffusionNFT loss on this peer's samples `chunk` of `batch`,
    /// accumulated over the trained levels and micro-batches, and the figures `[loss,
    /// positive, negative, kl]` (means over the peers).
    fn gradient(&self, batch: &Batch<B>, chunk: Range<usize>) -> Result<(Option<GradientsParams>, [f64; 4]), String> {
        let [_, c, h, w] = batch.x0.dims();
        let device = batch.x0.device();
        let schedule = self.state.pipeline.schedule().unwrap_or_else(FlowSchedule::sd3);
        let sigmas: Vec<f64> = schedule.sigmas(self.config.rollout.steps).into_iter().map(f64::from).collect();
        let levels = self.config.trained_levels();
        let objective = self.config.objective();
        let g = self.config.rollout.guidance;
        let per_sample: Vec<(Vec<usize>, Vec<Tensor<B::InnerBackend, 4>>)> =
            chunk.clone().map(|i| self.sample_noise(batch, batch.first_row + i, [1, c, h, w], &device)).collect();
        let none = ActiveAdapters::none();
        let old = ActiveAdapters::single(&self.old.average);
        let mut accumulator = GradientsAccumulator::<LoraAdapter<B>>::new();
        let n = chunk.len();
        let mut sums = [0.0; 4];
        for local in micro_batches(n, self.config.rollout.micro_batch) {
            let rows = chunk.start + local.start..chunk.start + local.end;
            let share = rows.len() as f64 / n as f64;
            let (c_in, n_in) = (batch.cond.rows(rows.clone()), batch.negative.rows(rows.clone()));
            let (c_ad, n_ad) = (lift_conditioning::<B>(&c_in), lift_conditioning::<B>(&n_in));
            let x0 = batch.x0.clone().slice([rows.clone()]);
            let r = vector::<B>(&batch.r[rows.clone()], &device);
            for k in 0..levels {
                let t: Vec<f64> = local.clone().map(|i| sigmas[per_sample[i].0[k]]).collect();
                let eps = Tensor::cat(local.clone().map(|i| per_sample[i].1[k].clone()).collect(), 0);
                let t_inner = vector::<B::InnerBackend>(&t, &device);
                let t4 = t_inner.clone().reshape([t.len(), 1, 1, 1]);
                let xt = x0.clone() * (t4.clone().neg() + 1.0) + eps * t4;
                let old_field = GuidedModel { model: self.state.pipeline.transformer(), adapters: &old, cond: &c_in, guidance: n_in.cfg(g) };
                let v_old = old_field.guided_velocity_at(xt.clone(), &t, false);
                let v_ref = (objective.kl_weight > 0.0).then(|| {
                    GuidedModel { model: self.state.pipeline.transformer(), adapters: &none, cond: &c_in, guidance: n_in.cfg(g) }.guided_velocity_at(xt.clone(), &t, false)
                });
                let leaves = fresh_leaves(&self.state.adapter);
                let policy = ActiveAdapters::single(&leaves);
                let policy_field = GuidedModel { model: &self.state.base, adapters: &policy, cond: &c_ad, guidance: n_ad.cfg(g) };
                let xt_ad = Tensor::<B, 4>::from_inner(xt);
                let v = self.config.training.checkpointing.scope(|| policy_field.guided_velocity_at(xt_ad.clone(), &t, false));
                let parts = nft_loss(
                    Tensor::from_inner(x0.clone()),
                    xt_ad,
                    Tensor::from_inner(t_inner),
                    v,
                    Tensor::from_inner(v_old),
                    v_ref.map(Tensor::from_inner),
                    r.clone(),
                    objective,
                );
                let scalar = |x: Tensor<B, 1>| x.mean().into_scalar().elem::<f64>();
                let figures = [
                    scalar(parts.loss.clone()),
                    scalar(parts.positive.clone()),
                    scalar(parts.negative.clone()),
                    parts.kl.clone().map_or(0.0, scalar),
                ];
                for (sum, value) in sums.iter_mut().zip(figures) {
                    *sum += share * value / levels as f64;
                }
                let loss = parts.loss * (share / levels as f64);
                let grads = GradientsParams::from_grads(loss.backward(), &leaves);
                accumulator.accumulate(&leaves, grads);
            }
        }
        let (figures, grads) = self.state.peer_means(sums, Some(accumulator.grads()))?;
        Ok((grads, figures))
    }

    /// The resumable state: the adapter state plus the old policy and the iteration count.
    pub fn save_state(&self) -> Result<TrainerState, String> {
        let mut state = self.state.save_state()?;
        state.module::<B::InnerBackend, _>("old.bin", &self.old.average)?;
        state.set("old_updates", self.old.updates);
        state.set("iterations_done", self.iterations_done);
        Ok(state)
    }

    /// Continues from a state [`Self::save_state`] wrote.
    pub fn restore(&mut self, saved: &SavedState<'_>, device: &B::Device) -> Result<(), String> {
        self.state.restore(saved, device)?;
        self.old.average = saved.module::<B::InnerBackend, _>("old.bin", self.old.average.clone(), device)?;
        self.old.updates = saved.get("old_updates")?;
        self.iterations_done = saved.get("iterations_done")?;
        Ok(())
    }
}
