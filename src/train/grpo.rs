//! The Flow-GRPO trainer (docs/reference.md section 5), generic over the autodiff backend: per
//! iteration, `G` SDE trajectories per prompt from the current LoRA policy, rewards of the
//! final images, group-relative advantages, then the clipped-ratio loss plus `beta` times the
//! KL to the base (adapter off) on the first `int(T * timestep_fraction)` steps, accumulated
//! over those steps into one AdamW update of the adapter; EMA of the adapter weights.

use std::collections::BTreeMap;
use std::ops::Range;

use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use crate::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor};
use serde::{Deserialize, Serialize};

use super::adapter::{AdapterState, AdapterTrainer, AdapterTraining, LoraSpec, adapter_state, lift_conditioning};
use super::fresh_leaves;
use super::grpo_math::{AdvantageStd, GroupBy, GroupSpread, clipped_policy_loss, group_advantages, group_spread, keyed_advantages};
use super::rollout::{RolloutConfig, vector};
use super::scoring::{gather_scores, score};
use crate::flow::{GuidedModel, LogProbReduction, ReferenceKl, VelocityField, log_prob, reference_kl, step_mean};
use crate::model::lora::{ActiveAdapters, LoraAdapter};
use crate::pipeline::{AnyPipeline, TextToImage};
use crate::reward::{CompositionCredit, CompositionReward, RemoteRewardConfig, RewardSet};
use crate::world::Task;
use super::prompts::{TaskPrompt, training_prompts};

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

/// Flow-GRPO settings (defaults: docs/reference.md section 5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
// Unknown fields are refused by the recipe reader (flatten and `deny_unknown_fields` do not mix).
pub struct GrpoConfig {
    pub iterations: usize,
    pub rollout: RolloutConfig,
    pub partitions: Vec<Partition>,
    pub lora: LoraSpec,
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
    /// How samples form advantage groups: by draw (`draw`, default: the `G` samples of each
    /// drawn prompt) or by prompt text (`prompt`, Flow-GRPO's per-prompt stat tracking).
    #[serde(default, skip_serializing_if = "is_default")]
    pub group_by: GroupBy,
    /// Updates per iteration on the same rollouts (Flow-GRPO's `num_inner_epochs` passes): the
    /// first is on-policy (ratio 1); from the second on the ratio moves and the clip acts.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub inner_epochs: usize,
    /// Optimizer steps per pass over an iteration's samples, each on the next `1/minibatches`
    /// of them (Flow-GRPO's SD3 configs: 2, `gradient_accumulation_steps` = half the sampled
    /// batches). From the second on, the ratio is off-policy and the clip acts.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub minibatches: usize,
    /// Whether the unconditional half of CFG is trained too (`true`, default) or detached, as
    /// Flow-GRPO's training forward does (`false`).
    #[serde(default = "yes", skip_serializing_if = "is_yes")]
    pub train_uncond: bool,
    /// Tasks rewarded by a remote server (docs/reward_protocol.md); the world's built-in
    /// rewards otherwise.
    #[serde(default)]
    pub remote_rewards: BTreeMap<Task, RemoteRewardConfig>,
    /// How the built-in composition reward credits failed checks in training (`checks`: the
    /// fraction passed; `graded`: near misses earn part of a check).
    #[serde(default)]
    pub composition_credit: CompositionCredit,
    /// Optimiser, EMA, seed and prompt files (the fields every adapter trainer has, in the
    /// same table).
    #[serde(flatten)]
    pub training: AdapterTraining,
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}
fn is_one(n: &usize) -> bool {
    *n == 1
}
fn yes() -> bool {
    true
}
fn is_yes(b: &bool) -> bool {
    *b
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

impl GrpoConfig {
    /// Refuses the one combination whose KL is undefined: CPS rollouts, Flow-GRPO's public KL
    /// (which divides by the CPS `st^2`) with a KL weight, and `timestep_fraction` 1 (which
    /// trains the last step, where `st = s' sin(a pi / 2) = 0`).
    pub fn check_kl(&self) -> Result<(), String> {
        let weighted = self.beta > 0.0 || self.partitions.iter().any(|p| p.beta.is_some_and(|b| b > 0.0));
        let trains_last = (self.rollout.steps as f64 * self.timestep_fraction).floor() as usize >= self.rollout.steps;
        if self.rollout.kind == crate::flow::SdeKind::Cps && self.reference_kl == ReferenceKl::Public && weighted && trains_last {
            return Err(format!(
                "`rollout.kind` = \"cps\" with `reference_kl` = \"public\", a KL weight (`beta` {}) and `timestep_fraction` = {} trains the last \
                 step, whose CPS std is 0: the public KL divides by it. Use `timestep_fraction` < 1 (0.99 trains 9 of 10 steps), \
                 `reference_kl = \"log_prob\"`, or the SDE",
                self.beta, self.timestep_fraction
            ));
        }
        Ok(())
    }
}

/// What a reward-trained stage draws from its partitions: the mix schedule (partition indices,
/// each `ratio` times per cycle), each partition's training prompts, and the rewards (remote
/// servers where named, the built-in composition reward with `credit`).
pub(crate) struct PartitionData {
    pub schedule: Vec<usize>,
    pub prompts: Vec<Vec<TaskPrompt>>,
    pub rewards: RewardSet,
}

pub(crate) fn partition_data(
    partitions: &[Partition],
    prompt_files: &BTreeMap<Task, std::path::PathBuf>,
    remote_rewards: &BTreeMap<Task, RemoteRewardConfig>,
    credit: CompositionCredit,
) -> Result<PartitionData, String> {
    let prompts = partitions
        .iter()
        .enumerate()
        .map(|(i, p)| training_prompts(&p.tasks, prompt_files).map_err(|e| format!("`partitions[{i}]`: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let mut rewards = RewardSet::new(remote_rewards).map_err(|e| format!("`remote_rewards`: {e}"))?;
    if credit != CompositionCredit::default() {
        if remote_rewards.contains_key(&Task::Composition) {
            return Err("`composition_credit` applies to the built-in composition reward, but `remote_rewards` names a server for `composition`".into());
        }
        rewards.set(Task::Composition, Box::new(CompositionReward { credit }));
    }
    let schedule = partitions.iter().enumerate().flat_map(|(i, p)| std::iter::repeat_n(i, p.ratio.max(1))).collect();
    Ok(PartitionData { schedule, prompts, rewards })
}

/// Group-relative advantages of a batch of `G` samples per prompt of `prompts` (every peer's
/// prompts), grouped by draw or by prompt text.
pub(crate) fn batch_advantages(rewards: &[f64], prompts: &[TaskPrompt], g: usize, by: GroupBy, std: AdvantageStd, clip: f64) -> Vec<f64> {
    match by {
        GroupBy::Draw => group_advantages(rewards, g, std, clip),
        GroupBy::Prompt => {
            let texts: Vec<&str> = prompts.iter().flat_map(|p| std::iter::repeat_n(p.text.as_str(), g)).collect();
            keyed_advantages(rewards, &texts, std, clip)
        }
    }
}

/// Sample rows `0..n` in `parts` consecutive chunks of near-equal size.
pub(crate) fn minibatch_rows(n: usize, parts: usize) -> Vec<Range<usize>> {
    let parts = parts.max(1);
    (0..parts).map(|i| i * n / parts..(i + 1) * n / parts).collect()
}

/// The rollouts of one iteration, scored: what its `inner_epochs` updates learn from.
struct Scored<B: AutodiffBackend> {
    part: usize,
    ro: super::rollout::Rollouts<B::InnerBackend>,
    /// Every sample's reward (gathered over the peers).
    rewards: Vec<f64>,
    task_metrics: BTreeMap<Task, f64>,
    /// This peer's advantages.
    advantages: Tensor<B, 1>,
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

/// The Flow-GRPO state: the shared adapter state ([`AdapterState`]), the partitions' prompts,
/// their mix schedule and the rewards.
pub struct GrpoTrainer<B: AutodiffBackend, O: Optimizer<LoraAdapter<B>, B>> {
    pub state: AdapterState<B, O>,
    pub config: GrpoConfig,
    schedule: Vec<usize>,
    prompts: Vec<Vec<TaskPrompt>>,
    rewards: RewardSet,
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
    config.check_kl()?;
    if config.inner_epochs == 0 {
        return Err("`inner_epochs`: at least 1 update per iteration, not 0".into());
    }
    let samples = config.rollout.prompts * config.rollout.group_size;
    if config.minibatches == 0 || config.minibatches > samples {
        return Err(format!(
            "`minibatches` = {}: between 1 and the iteration's {samples} samples (`rollout.prompts` x `rollout.group_size`)",
            config.minibatches
        ));
    }
    let setup = config.training.setup(Some(&config.lora), config.training.seed);
    let state = adapter_state::<B>(pipeline, init, setup, device)?;
    let PartitionData { schedule, prompts, rewards } =
        partition_data(&config.partitions, &config.training.prompt_files, &config.remote_rewards, config.composition_credit)?;
    Ok(GrpoTrainer { state, config, schedule, prompts, rewards })
}

impl<B: AutodiffBackend, O: Optimizer<LoraAdapter<B>, B>> AdapterTrainer<B, O> for GrpoTrainer<B, O> {
    fn state_mut(&mut self) -> &mut AdapterState<B, O> {
        &mut self.state
    }

    fn prompts_per_iteration(&self) -> usize {
        self.config.rollout.prompts
    }
}

impl<B: AutodiffBackend, O: Optimizer<LoraAdapter<B>, B>> GrpoTrainer<B, O> {
    /// One iteration: rollouts, rewards, advantages, then `inner_epochs` passes over them, each
    /// of `minibatches` updates (the figures are their means).
    pub fn iteration(&mut self, device: &B::Device) -> Result<GrpoStats, String> {
        let scored = self.score_on(self.scheduled_partition(), device)?;
        let chunks = minibatch_rows(scored.ro.prompts.len(), self.config.minibatches);
        if chunks.iter().any(|rows| rows.is_empty()) {
            return Err(format!(
                "`minibatches` = {}: this peer holds only {} samples of the iteration",
                self.config.minibatches,
                scored.ro.prompts.len()
            ));
        }
        let updates = (self.config.inner_epochs.max(1) * chunks.len()) as f64;
        let mut sums = [0.0; 3];
        let mut stats = GrpoStats::default();
        for _ in 0..self.config.inner_epochs.max(1) {
            for rows in &chunks {
                let (grads, epoch) = self.gradient_of(&scored, rows.clone())?;
                self.state.update(grads);
                for (sum, value) in sums.iter_mut().zip([epoch.policy_loss, epoch.kl, epoch.clip_fraction]) {
                    *sum += value / updates;
                }
                stats = epoch;
            }
        }
        [stats.policy_loss, stats.kl, stats.clip_fraction] = sums;
        Ok(stats)
    }

    /// An iteration without its update: rollouts of the current policy, rewards, advantages,
    /// and the gradient of the Flow-GRPO loss accumulated over the trained steps (`None` if no
    /// step is stochastic). Each call draws new prompts and noise.
    pub fn gradient(&mut self, device: &B::Device) -> Result<(Option<GradientsParams>, GrpoStats), String> {
        self.gradient_on(self.scheduled_partition(), device)
    }

    /// The mix schedule's partition for the next iteration (its `inner_epochs` x `minibatches`
    /// updates count as one).
    fn scheduled_partition(&self) -> usize {
        let updates = self.config.inner_epochs.max(1) * self.config.minibatches.max(1);
        self.schedule[(self.state.iteration / updates) % self.schedule.len()]
    }

    /// [`Self::gradient`] on partition `part` (an index into `config.partitions`) instead of the
    /// mix schedule's.
    pub fn gradient_on(&mut self, part: usize, device: &B::Device) -> Result<(Option<GradientsParams>, GrpoStats), String> {
        let scored = self.score_on(part, device)?;
        let all = 0..scored.ro.prompts.len();
        self.gradient_of(&scored, all)
    }

    /// Rollouts of partition `part`'s prompts under the current policy, their rewards (gathered
    /// over the peers) and this peer's advantages.
    fn score_on(&mut self, part: usize, device: &B::Device) -> Result<Scored<B>, String> {
        if part >= self.config.partitions.len() {
            return Err(format!("partition {part}: the stage has {} partitions (0-based)", self.config.partitions.len()));
        }
        let prompts = self.state.draw_prompts(&self.prompts[part], self.config.rollout.prompts);
        let rolled = self
            .state
            .rollout(&prompts, &self.config.rollout, device)
            .and_then(|ro| Ok((score(&ro.prompts, &ro.images, &self.config.partitions[part].rewards, &self.rewards)?, ro)));
        let ((rewards, task_metrics), ro, own) = match &self.state.peer {
            None => {
                let (scored, ro) = rolled?;
                let own = 0..ro.prompts.len();
                (scored, ro, own)
            }
            Some(peer) => {
                let own = peer.rows(self.config.rollout.prompts * self.config.rollout.group_size);
                let local = rolled.as_ref().map(|((r, m), ro)| (r.as_slice(), m, ro.tasks())).map_err(|e| e.clone());
                (gather_scores(peer, local, own.len())?, rolled?.1, own)
            }
        };
        let (g, std, clip) = (self.config.rollout.group_size, self.config.advantage_std, self.config.advantage_clip);
        // Every peer drew the whole batch's prompts.
        let advantages = batch_advantages(&rewards, &prompts, g, self.config.group_by, std, clip);
        let advantages = vector::<B>(&advantages[own], device);
        Ok(Scored { part, ro, rewards, task_metrics, advantages })
    }

    /// The gradient of the Flow-GRPO loss on the samples `chunk` of `scored` under the current
    /// policy, accumulated over the trained steps and micro-batches.
    fn gradient_of(&self, scored: &Scored<B>, chunk: Range<usize>) -> Result<(Option<GradientsParams>, GrpoStats), String> {
        let Scored { part, ro, rewards, task_metrics, advantages } = scored;
        let (part, task_metrics) = (*part, task_metrics.clone());
        let beta = self.config.partitions[part].beta.unwrap_or(self.config.beta);
        let steps = ro.trained_steps(self.config.rollout.steps, self.config.timestep_fraction);
        let g = self.config.rollout.guidance;
        let (a, kind) = (self.config.rollout.noise_level, self.config.rollout.kind);
        let none_inner = ActiveAdapters::none();
        let mut accumulator = GradientsAccumulator::<LoraAdapter<B>>::new();
        let (mut pg_sum, mut kl_sum, mut clipped) = (0.0, 0.0, 0.0);
        let n = chunk.len();
        for rows in self.config.rollout.micro_batches(n) {
            let rows = chunk.start + rows.start..chunk.start + rows.end;
            // Each micro-batch adds its share (rows / n) of the batch means.
            let share = rows.len() as f64 / n as f64;
            let (c_ref, n_ref) = (ro.cond.rows(rows.clone()), ro.negative.rows(rows.clone()));
            let (c, neg) = (lift_conditioning::<B>(&c_ref), lift_conditioning::<B>(&n_ref));
            let reference = GuidedModel { model: self.state.pipeline.transformer(), adapters: &none_inner, cond: &c_ref, guidance: n_ref.cfg(g) };
            let advantages = advantages.clone().slice([rows.clone()]);
            for &j in &steps {
                let leaves = fresh_leaves(&self.state.adapter);
                let single = ActiveAdapters::single(&leaves);
                let policy_field = GuidedModel { model: &self.state.base, adapters: &single, cond: &c, guidance: neg.cfg(g) };
                let tr = &ro.trajectory.transitions[j];
                let state = ro.trajectory.states[j].clone().slice([rows.clone()]);
                let x = Tensor::<B, 4>::from_inner(state.clone());
                let x_next = Tensor::<B, 4>::from_inner(ro.trajectory.states[j + 1].clone().slice([rows.clone()]));
                let v = self.config.training.checkpointing.scope(|| policy_field.guided_velocity(x.clone(), tr.step.sigma, !self.config.train_uncond));
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
                let grads = GradientsParams::from_grads(loss.backward(), &leaves);
                accumulator.accumulate(&leaves, grads);
            }
        }
        let n = steps.len().max(1) as f64;
        let grads = (!steps.is_empty()).then(|| accumulator.grads());
        let ([pg, kl, clipped], grads) = self.state.peer_means([pg_sum / n, kl_sum / n, clipped / n], grads)?;
        let stats = GrpoStats {
            partition: part,
            reward: rewards.iter().sum::<f64>() / rewards.len().max(1) as f64,
            task_metrics,
            policy_loss: pg,
            kl,
            clip_fraction: clipped,
            groups: group_spread(rewards, self.config.rollout.group_size),
        };
        Ok((grads, stats))
    }
}
