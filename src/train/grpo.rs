//! The Flow-GRPO trainer (REFERENCE section 5), generic over the autodiff backend: per
//! iteration, `G` SDE trajectories per prompt from the current LoRA policy, rewards of the
//! final images, group-relative advantages, then the clipped-ratio loss plus `beta` times the
//! KL to the base (adapter off) on the first `int(T * timestep_fraction)` steps, accumulated
//! over those steps into one AdamW update of the adapter; EMA of the adapter weights.

use std::collections::BTreeMap;

use burn::module::{AutodiffModule, Module};
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use crate::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor};
use rand::SeedableRng;
use rand::seq::IndexedRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::ema::Ema;
use super::grpo_math::{AdvantageStd, GroupSpread, clipped_policy_loss, group_advantages, group_spread};
use super::pretrain::OptimConfig;
use super::parallel::Peer;
use super::rollout::{RolloutConfig, rollout_shard, vector};
use crate::flow::{GuidedModel, LogProbReduction, ReferenceKl, TextConditioning, VelocityField, log_prob, reference_kl, step_mean};
use crate::model::lora::{ActiveAdapters, LoraAdapter, LoraConfig, LoraTarget};
use crate::model::mmdit::Mmdit;
use crate::model::t2i::{AnyPipeline, TextToImage};
use crate::reward::{CompositionCredit, CompositionReward, RemoteRewardConfig, RewardInput, RewardSet};
use crate::world::Task;
use super::prompts::{TaskPrompt, training_prompts};
use image::RgbImage;
use std::path::PathBuf;

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

/// A prompt partition: prompts of `tasks`, rewarded by the weighted sum of `rewards` (reward
/// name -> weight), visited `ratio` times per cycle of the mix schedule, with the stage's KL
/// weight or its own `beta`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Partition {
    pub tasks: Vec<Task>,
    pub rewards: BTreeMap<Task, f64>,
    #[serde(default = "one")]
    pub ratio: usize,
    /// KL weight of this partition's iterations in place of the stage's `beta` (a mix that
    /// keeps each task's own weight: GenEval and OCR 0.04, PickScore 0.01).
    #[serde(default)]
    pub beta: Option<f64>,
}

fn one() -> usize {
    1
}

/// Flow-GRPO settings (defaults: REFERENCE section 5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpoConfig {
    pub iterations: usize,
    pub rollout: RolloutConfig,
    pub partitions: Vec<Partition>,
    pub lora: LoraSpec,
    pub optim: OptimConfig,
    /// KL-to-base weight (GenEval/OCR 0.04, PickScore 0.01).
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// Which KL `beta` weighs: Flow-GRPO's public form (default) or the KL of the log-prob's
    /// own transition densities (`log_prob`; see [`ReferenceKl`]: with CPS rollouts the public
    /// form is far stronger against the policy gradient than with the SDE).
    #[serde(default)]
    pub reference_kl: ReferenceKl,
    /// PPO clip range (1e-4).
    #[serde(default = "default_clip")]
    pub clip_range: f64,
    /// Advantage clip (5).
    #[serde(default = "default_adv_clip")]
    pub advantage_clip: f64,
    #[serde(default)]
    pub advantage_std: AdvantageStd,
    /// Trained steps: the first `int(T * timestep_fraction)` (0.99 -> 9 of 10).
    #[serde(default = "default_fraction")]
    pub timestep_fraction: f64,
    /// EMA decay cap (0.9).
    #[serde(default = "default_ema")]
    pub ema_max_decay: f64,
    #[serde(default)]
    pub seed: u64,
    /// Prompt file per task (one prompt per line); the world's shipped training prompts when
    /// empty.
    #[serde(default)]
    pub prompt_files: BTreeMap<Task, PathBuf>,
    /// Tasks rewarded by a remote server (docs/reward_protocol.md); the world's built-in
    /// rewards otherwise.
    #[serde(default)]
    pub remote_rewards: BTreeMap<Task, RemoteRewardConfig>,
    /// How the built-in composition reward credits failed checks in training (`checks`: the
    /// fraction passed; `graded`: near misses earn part of a check).
    #[serde(default)]
    pub composition_credit: CompositionCredit,
}

fn default_beta() -> f64 {
    0.04
}
fn default_clip() -> f64 {
    1e-4
}
fn default_adv_clip() -> f64 {
    5.0
}
fn default_fraction() -> f64 {
    0.99
}
fn default_ema() -> f64 {
    0.9
}

/// One iteration's figures.
#[derive(Debug, Clone, Default)]
pub struct GrpoStats {
    pub partition: usize,
    pub reward: f64,
    /// Mean eval metric per task of this iteration's samples.
    pub task_metrics: BTreeMap<Task, f64>,
    pub policy_loss: f64,
    pub kl: f64,
    pub clip_fraction: f64,
    /// How the rewards spread over the prompt groups.
    pub groups: GroupSpread,
}

/// Scores `images` with the partition's weighted rewards; returns training values and, per
/// task of the prompts, the mean eval metric of that task's own reward. Each reward is asked
/// once per batch (a remote reward is one request).
pub fn score(
    prompts: &[TaskPrompt],
    images: &[RgbImage],
    weights: &BTreeMap<Task, f64>,
    rewards: &RewardSet,
) -> Result<(Vec<f64>, BTreeMap<Task, f64>), String> {
    let run = |task: Task, rows: &[usize]| -> Result<Vec<crate::reward::RewardScore>, String> {
        let inputs: Vec<RewardInput> =
            rows.iter().map(|&i| RewardInput::new(images[i].clone(), prompts[i].text.clone()).with_task(prompts[i].task)).collect();
        rewards.get(task).score(&inputs).map_err(|e| e.to_string())
    };
    let mean_metric = |scores: &[(usize, crate::reward::RewardScore)], task: Task| {
        let own: Vec<f64> = scores.iter().filter(|(i, _)| prompts[*i].task == task).map(|(_, s)| s.metric as f64).collect();
        own.iter().sum::<f64>() / own.len().max(1) as f64
    };
    let present: std::collections::BTreeSet<Task> = prompts.iter().map(|p| p.task).collect();
    let all: Vec<usize> = (0..images.len()).collect();
    let mut total = vec![0.0; images.len()];
    let mut metrics = BTreeMap::new();
    for (&task, &weight) in weights {
        let scores: Vec<(usize, _)> = all.iter().copied().zip(run(task, &all)?).collect();
        for (i, s) in &scores {
            total[*i] += weight * s.value as f64;
        }
        if present.contains(&task) {
            metrics.insert(task, mean_metric(&scores, task));
        }
    }
    for &task in present.iter().filter(|t| !weights.contains_key(t)) {
        let rows: Vec<usize> = all.iter().copied().filter(|&i| prompts[i].task == task).collect();
        let scores: Vec<(usize, _)> = rows.iter().copied().zip(run(task, &rows)?).collect();
        metrics.insert(task, mean_metric(&scores, task));
    }
    Ok((total, metrics))
}

/// The Flow-GRPO state: frozen pipeline (inner backend) and base (autodiff, no gradients),
/// the trained adapter, its optimiser and EMA.
pub struct GrpoTrainer<B: AutodiffBackend, O: Optimizer<LoraAdapter<B>, B>> {
    pub pipeline: AnyPipeline<B::InnerBackend>,
    pub base: Mmdit<B>,
    pub adapter: LoraAdapter<B>,
    pub optimizer: O,
    pub ema: Ema<B, LoraAdapter<B>>,
    pub config: GrpoConfig,
    pub iteration: usize,
    schedule: Vec<usize>,
    prompts: Vec<Vec<TaskPrompt>>,
    rewards: RewardSet,
    rng: ChaCha8Rng,
    peer: Option<Peer<B::InnerBackend>>,
}

/// Builds a trainer; `init` starts from an existing adapter (else a fresh one, B = 0).
pub fn grpo_trainer<B: AutodiffBackend>(
    pipeline: impl Into<AnyPipeline<B::InnerBackend>>,
    init: Option<LoraAdapter<B::InnerBackend>>,
    config: GrpoConfig,
    device: &B::Device,
) -> Result<GrpoTrainer<B, impl Optimizer<LoraAdapter<B>, B>>, String> {
    if config.partitions.is_empty() {
        return Err("`partitions`: at least one partition is needed".into());
    }
    let partition_betas = config.partitions.iter().enumerate().filter_map(|(i, p)| p.beta.map(|b| (format!("partitions[{i}].beta"), b)));
    for (field, beta) in std::iter::once(("beta".to_string(), config.beta)).chain(partition_betas) {
        if !(beta.is_finite() && beta >= 0.0) {
            return Err(format!("`{field}`: the KL weight must be a finite number >= 0, not {beta}"));
        }
    }
    let pipeline = pipeline.into();
    let base = <Mmdit<B> as AutodiffModule<B>>::from_inner(pipeline.transformer().clone()).no_grad();
    let adapter = match init {
        Some(a) => super::trainable(<LoraAdapter<B> as AutodiffModule<B>>::from_inner(a)),
        None => {
            config.lora.config()?.init(&base, config.seed, device)
        }
    };
    let prompts = config
        .partitions
        .iter()
        .enumerate()
        .map(|(i, p)| training_prompts(&p.tasks, &config.prompt_files).map_err(|e| format!("`partitions[{i}]`: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let mut rewards = RewardSet::new(&config.remote_rewards).map_err(|e| format!("`remote_rewards`: {e}"))?;
    if config.composition_credit != CompositionCredit::default() {
        if config.remote_rewards.contains_key(&Task::Composition) {
            return Err("`composition_credit` applies to the built-in composition reward, but `remote_rewards` names a server for `composition`".into());
        }
        rewards.set(Task::Composition, Box::new(CompositionReward { credit: config.composition_credit }));
    }
    let schedule = config.partitions.iter().enumerate().flat_map(|(i, p)| std::iter::repeat_n(i, p.ratio.max(1))).collect();
    let optimizer = config.optim.adamw().init::<B, LoraAdapter<B>>();
    let ema = Ema::new(&adapter, config.ema_max_decay);
    Ok(GrpoTrainer {
        rng: ChaCha8Rng::seed_from_u64(config.seed),
        pipeline,
        base,
        adapter,
        optimizer,
        ema,
        config,
        iteration: 0,
        schedule,
        prompts,
        rewards,
        peer: None,
    })
}

/// Lifts inner-backend conditioning onto the autodiff backend (as constants).
pub fn lift_conditioning<B: AutodiffBackend>(c: &TextConditioning<B::InnerBackend>) -> TextConditioning<B> {
    TextConditioning { tokens: Tensor::from_inner(c.tokens.clone()), pooled: Tensor::from_inner(c.pooled.clone()) }
}

impl<B: AutodiffBackend, O: Optimizer<LoraAdapter<B>, B>> GrpoTrainer<B, O> {
    /// Makes this trainer one data-parallel peer of a group (see [`super::parallel`]): it
    /// rolls out and trains on its share of each iteration's prompts, the rewards are gathered
    /// before the advantages, the figures and gradients averaged over the peers. Every peer
    /// must be built with the same config (hence the same adapter, optimiser and prompts).
    pub fn with_peer(mut self, peer: Peer<B::InnerBackend>) -> Result<Self, String> {
        peer.check_divides(self.config.rollout.prompts, "rollout.prompts")?;
        self.peer = Some(peer);
        Ok(self)
    }

    /// One iteration: rollouts, rewards, advantages, one accumulated update.
    pub fn iteration(&mut self, device: &B::Device) -> Result<GrpoStats, String> {
        let (grads, stats) = self.gradient(device)?;
        if let Some(grads) = grads {
            let adapter = self.adapter.clone();
            self.adapter = self.optimizer.step(self.config.optim.lr, adapter, grads);
            self.ema.update(&self.adapter);
        }
        self.iteration += 1;
        Ok(stats)
    }

    /// An iteration without its update: rollouts of the current policy, rewards, advantages,
    /// and the gradient of the Flow-GRPO loss accumulated over the trained steps (`None` if no
    /// step is stochastic). Each call draws new prompts and noise.
    pub fn gradient(&mut self, device: &B::Device) -> Result<(Option<GradientsParams>, GrpoStats), String> {
        self.gradient_on(self.schedule[self.iteration % self.schedule.len()], device)
    }

    /// [`Self::gradient`] on partition `part` (an index into `config.partitions`) instead of the
    /// mix schedule's.
    pub fn gradient_on(&mut self, part: usize, device: &B::Device) -> Result<(Option<GradientsParams>, GrpoStats), String> {
        if part >= self.config.partitions.len() {
            return Err(format!("partition {part}: the stage has {} partitions (0-based)", self.config.partitions.len()));
        }
        let beta = self.config.partitions[part].beta.unwrap_or(self.config.beta);
        let prompts: Vec<TaskPrompt> =
            (0..self.config.rollout.prompts).map(|_| self.prompts[part].choose(&mut self.rng).expect("non-empty").clone()).collect();
        let policy = self.adapter.valid();
        let shard = self.peer.as_ref().map_or(0..prompts.len(), |p| p.rows(prompts.len()));
        let rolled = rollout_shard(&self.pipeline, Some(&policy), &prompts, shard, &self.config.rollout, &mut self.rng, device)
            .and_then(|ro| Ok((score(&ro.prompts, &ro.images, &self.config.partitions[part].rewards, &self.rewards)?, ro)));
        let ((rewards, task_metrics), ro, own) = match &self.peer {
            None => {
                let (scored, ro) = rolled?;
                let own = 0..ro.prompts.len();
                (scored, ro, own)
            }
            Some(peer) => {
                let n = self.config.rollout.prompts * self.config.rollout.group_size;
                let own = peer.rows(n);
                let local = rolled.as_ref().map(|((r, m), ro)| encode_scores(r, m, &ro.tasks())).map_err(|e| e.clone());
                let all = peer.gather(local, own.len() + 2 * Task::ALL.len())?;
                (decode_scores(&all, own.len()), rolled?.1, own)
            }
        };
        let advantages = group_advantages(&rewards, self.config.rollout.group_size, self.config.advantage_std, self.config.advantage_clip);
        let advantages = vector::<B>(&advantages[own], device);

        let steps = ro.trained_steps(self.config.rollout.steps, self.config.timestep_fraction);
        let g = self.config.rollout.guidance;
        let (a, kind) = (self.config.rollout.noise_level, self.config.rollout.kind);
        let none_inner = ActiveAdapters::none();
        let mut accumulator = GradientsAccumulator::<LoraAdapter<B>>::new();
        let (mut pg_sum, mut kl_sum, mut clipped) = (0.0, 0.0, 0.0);
        let n = ro.prompts.len();
        for rows in self.config.rollout.micro_batches(n) {
            // Each micro-batch adds its share (rows / n) of the batch means.
            let share = rows.len() as f64 / n as f64;
            let (c_ref, n_ref) = (ro.cond.rows(rows.clone()), ro.negative.rows(rows.clone()));
            let (c, neg) = (lift_conditioning::<B>(&c_ref), lift_conditioning::<B>(&n_ref));
            let single = ActiveAdapters::single(&self.adapter);
            let policy_field = GuidedModel { model: &self.base, adapters: &single, cond: &c, guidance: neg.cfg(g) };
            let reference = GuidedModel { model: self.pipeline.transformer(), adapters: &none_inner, cond: &c_ref, guidance: n_ref.cfg(g) };
            let advantages = advantages.clone().slice([rows.clone()]);
            for &j in &steps {
                let tr = &ro.trajectory.transitions[j];
                let state = ro.trajectory.states[j].clone().slice([rows.clone()]);
                let x = Tensor::<B, 4>::from_inner(state.clone());
                let x_next = Tensor::<B, 4>::from_inner(ro.trajectory.states[j + 1].clone().slice([rows.clone()]));
                let v = policy_field.velocity(x.clone(), tr.step.sigma);
                let (mean, std_dev_t) = step_mean(x, v, tr.step, a, kind);
                let logp = log_prob(x_next, mean.clone(), std_dev_t, tr.step, kind, LogProbReduction::Mean);
                let old = Tensor::<B, 1>::from_inner(tr.log_prob.clone().expect("stochastic step").slice([rows.clone()]));
                let ratio: Vec<f32> = (logp.clone().inner() - old.clone().inner()).exp().into_data().convert::<f32>().into_vec().expect("f32");
                clipped += ratio.iter().filter(|r| (**r as f64 - 1.0).abs() > self.config.clip_range).count() as f64 / n as f64;
                let pg = clipped_policy_loss(logp, old, advantages.clone(), self.config.clip_range).mean();
                let v_ref = reference.velocity(state.clone(), tr.step.sigma);
                let (mean_ref, _) = step_mean(state, v_ref, tr.step, a, kind);
                let kl = reference_kl(mean, Tensor::from_inner(mean_ref), tr.step, std_dev_t, kind, self.config.reference_kl).mean();
                pg_sum += share * pg.clone().into_scalar().elem::<f64>();
                kl_sum += share * kl.clone().into_scalar().elem::<f64>();
                let loss = (pg + kl * beta) * (share / steps.len() as f64);
                let grads = GradientsParams::from_grads(loss.backward(), &self.adapter);
                accumulator.accumulate(&self.adapter, grads);
            }
        }
        let mut grads = (!steps.is_empty()).then(|| accumulator.grads());
        let n = steps.len().max(1) as f64;
        let (mut pg, mut kl, mut clipped) = (pg_sum / n, kl_sum / n, clipped / n);
        if let Some(peer) = &self.peer {
            // Equal shares of the batch: the batch's figures and gradient are the peers' means.
            [pg, kl, clipped] = peer.mean(&[pg, kl, clipped])?.try_into().expect("three figures");
            grads = grads.map(|g| peer.mean_gradients(&self.adapter, g)).transpose()?;
        }
        let stats = GrpoStats {
            partition: part,
            reward: rewards.iter().sum::<f64>() / rewards.len().max(1) as f64,
            task_metrics,
            policy_loss: pg,
            kl,
            clip_fraction: clipped,
            groups: group_spread(&rewards, self.config.rollout.group_size),
        };
        Ok((grads, stats))
    }
}

/// A peer's scores for [`Peer::gather`]: its samples' rewards, then per task (in
/// [`Task::ALL`] order) the sum of its samples' metric and their count (0 for a task without a
/// metric in `metrics`).
pub(crate) fn encode_scores(rewards: &[f64], metrics: &BTreeMap<Task, f64>, tasks: &[Task]) -> Vec<f64> {
    let mut out = rewards.to_vec();
    for task in Task::ALL {
        let count = tasks.iter().filter(|t| **t == task).count() as f64;
        out.extend(metrics.get(&task).map_or([0.0, 0.0], |m| [m * count, count]));
    }
    out
}

/// The whole batch's rewards (peer order) and per-task mean metrics from every peer's
/// [`encode_scores`] of `samples` samples each.
pub(crate) fn decode_scores(all: &[f64], samples: usize) -> (Vec<f64>, BTreeMap<Task, f64>) {
    let width = samples + 2 * Task::ALL.len();
    let peers: Vec<&[f64]> = all.chunks(width).collect();
    let rewards = peers.iter().flat_map(|p| p[..samples].iter().copied()).collect();
    let metrics = Task::ALL
        .iter()
        .enumerate()
        .filter_map(|(k, &task)| {
            let (sum, count) = peers.iter().fold((0.0, 0.0), |(s, c), p| (s + p[samples + 2 * k], c + p[samples + 2 * k + 1]));
            (count > 0.0).then(|| (task, sum / count))
        })
        .collect();
    (rewards, metrics)
}
