//! On-policy multi-teacher distillation (Flow-OPD, paper sections 5-6, docs/reference.md section 4):
//! the student samples SDE trajectories on a mixed batch of prompts; at every trained state
//! the task teacher `R(c)` of each sample (one batched forward over the shared base with
//! per-sample adapters) and the MAR anchor give velocities without gradient; the student
//! minimises `w(s) ||v - SG(v_teacher)||^2 + lambda w(s) ||v - SG(v_anchor)||^2`.

use std::collections::BTreeMap;
use std::ops::Range;

use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use crate::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor};
use serde::{Deserialize, Serialize};

use super::adapter::{AdapterState, AdapterTrainer, AdapterTraining, LoraSpec, adapter_state, lift_conditioning};
use super::fresh_leaves;
use super::scoring::{gather_scores, score};
use super::rollout::{RolloutConfig, Rollouts, trained_steps};
use crate::flow::{GuidedModel, KlReduction, TextConditioning, Trajectory, VelocityField, kl_weight, opd_loss};
use crate::model::lora::{ActiveAdapters, AdapterChoice, LoraAdapter};
use crate::model::mmdit::Mmdit;
use crate::pipeline::{AnyPipeline, TextToImage};
use crate::reward::{RemoteRewardConfig, RewardSet};
use crate::world::Task;
use super::prompts::{TaskPrompt, training_prompts};

/// Flow-OPD settings (paper defaults: T = 10, a = 0.7, lambda = 0.02).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
// Unknown fields are refused by the recipe reader (flatten and `deny_unknown_fields` do not mix).
pub struct OpdConfig {
    pub iterations: usize,
    pub rollout: RolloutConfig,
    /// Tasks whose training prompts form the mixed batches (every routed task by default).
    #[serde(default)]
    pub tasks: Option<Vec<Task>>,
    /// MAR weight lambda (0 disables MAR).
    #[serde(default = "default_lambda")]
    pub mar_lambda: f64,
    /// `sum` (paper, Eq. 15) or `mean` (public code).
    #[serde(default)]
    pub reduction: KlReduction,
    /// Trained steps: the first `int(T * timestep_fraction)`.
    #[serde(default = "default_fraction")]
    pub timestep_fraction: f64,
    /// Shape of a fresh student adapter (when no cold start is given).
    #[serde(default)]
    pub lora: Option<LoraSpec>,
    /// Whether the student's unconditional CFG half is trained too (`true`, default, as the
    /// public Flow-OPD code does: one doubled forward) or computed without gradient (`false`:
    /// a separate untracked forward, no activations stored for it and no backward).
    #[serde(default = "yes", skip_serializing_if = "is_yes")]
    pub train_uncond: bool,
    /// Score each iteration's rollouts with the task rewards (logged as `train_<task>`; the
    /// loss does not use them).
    #[serde(default = "yes")]
    pub train_metrics: bool,
    /// Tasks whose train metric comes from a remote server (docs/reward_protocol.md).
    #[serde(default)]
    pub remote_rewards: BTreeMap<Task, RemoteRewardConfig>,
    /// Optimiser, EMA, seed and prompt files (the fields every adapter trainer has, in the
    /// same table).
    #[serde(flatten)]
    pub training: AdapterTraining,
}

fn yes() -> bool {
    true
}
fn is_yes(b: &bool) -> bool {
    *b
}

fn default_lambda() -> f64 {
    0.02
}
fn default_fraction() -> f64 {
    0.99
}

/// The frozen teachers: adapters over the shared base, the routing table and the anchor.
pub struct Teachers<B: Backend> {
    pub adapters: Vec<LoraAdapter<B>>,
    /// Task -> index into `adapters`.
    pub routing: BTreeMap<Task, usize>,
    /// MAR anchor: `Some(i)` an adapter, `None` the base model itself.
    pub anchor: Option<usize>,
}

impl<B: Backend> Teachers<B> {
    /// `R(c)` for every sample: the teacher its prompt's task is routed to.
    pub fn route(&self, tasks: &[Task]) -> Result<Vec<Option<usize>>, String> {
        tasks
            .iter()
            .map(|t| self.routing.get(t).map(|i| Some(*i)).ok_or_else(|| format!("no teacher is routed for task `{}`", t.name())))
            .collect()
    }
}

/// One iteration's figures.
#[derive(Debug, Clone, Default)]
pub struct OpdStats {
    pub loss: f64,
    pub distill: f64,
    pub anchor: f64,
    pub task_metrics: BTreeMap<Task, f64>,
}

/// The Flow-OPD state: the shared adapter state ([`AdapterState`], whose adapter is the
/// student), the frozen teachers, the mixed prompt pool and the optional train-metric rewards.
pub struct OpdTrainer<B: AutodiffBackend, O: Optimizer<LoraAdapter<B>, B>> {
    pub state: AdapterState<B, O>,
    pub teachers: Teachers<B::InnerBackend>,
    pub config: OpdConfig,
    prompts: Vec<TaskPrompt>,
    rewards: Option<RewardSet>,
}

/// Builds a trainer; `init` is the cold-start student adapter (merge or SFT), else a fresh one.
pub fn opd_trainer<B: AutodiffBackend>(
    pipeline: impl Into<AnyPipeline<B::InnerBackend>>,
    init: Option<LoraAdapter<B::InnerBackend>>,
    teachers: Teachers<B::InnerBackend>,
    config: OpdConfig,
    device: &B::Device,
) -> Result<OpdTrainer<B, impl Optimizer<LoraAdapter<B>, B>>, String> {
    if config.rollout.kind != crate::flow::SdeKind::Sde {
        // w(s) (Eq. 15) is the KL of the SDE's transitions; CPS transitions have another one.
        return Err(format!(
            "`rollout.kind` = \"{}\": Flow-OPD's weight w(s) is the KL between SDE transitions (paper Eq. 15), not CPS ones; use `kind = \"sde\"`",
            serde_json::to_value(config.rollout.kind).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
        ));
    }
    let setup = config.training.setup(config.lora.as_ref(), config.training.seed);
    let state = adapter_state::<B>(pipeline, init, setup, device)?;
    let tasks: Vec<Task> = config.tasks.clone().unwrap_or_else(|| teachers.routing.keys().copied().collect());
    teachers.route(&tasks)?;
    let prompts = training_prompts(&tasks, &config.training.prompt_files).map_err(|e| format!("`tasks`: {e}"))?;
    let rewards = match config.train_metrics {
        true => Some(RewardSet::new(&config.remote_rewards).map_err(|e| format!("`remote_rewards`: {e}"))?),
        false => None,
    };
    Ok(OpdTrainer { state, teachers, config, prompts, rewards })
}

impl<B: AutodiffBackend, O: Optimizer<LoraAdapter<B>, B>> AdapterTrainer<B, O> for OpdTrainer<B, O> {
    fn state_mut(&mut self) -> &mut AdapterState<B, O> {
        &mut self.state
    }

    fn prompts_per_iteration(&self) -> usize {
        self.config.rollout.prompts
    }
}

impl<B: AutodiffBackend, O: Optimizer<LoraAdapter<B>, B>> OpdTrainer<B, O> {
    /// One iteration: on-policy rollouts of a mixed batch, then [`OpdTrainer::step_on`].
    pub fn iteration(&mut self, device: &B::Device) -> Result<OpdStats, String> {
        match self.sample(device) {
            Ok(ro) => self.step_on(&ro, device),
            Err(e) => match &self.state.peer {
                // A failed peer still takes part in the exchange (which then fails everywhere,
                // here with its own message), so the others do not wait for it.
                Some(peer) => peer.gather(Err(e), 2 * Task::ALL.len()).map(|_| unreachable!("a failed peer's exchange fails")),
                None => Err(e),
            },
        }
    }

    /// Samples a mixed batch of training prompts and the student's on-policy rollouts (of this
    /// peer's share of the prompts, with a data-parallel peer).
    pub fn sample(&mut self, device: &B::Device) -> Result<Rollouts<B::InnerBackend>, String> {
        let prompts = self.state.draw_prompts(&self.prompts, self.config.rollout.prompts);
        self.state.rollout(&prompts, &self.config.rollout, device)
    }

    fn objective(&self) -> OpdObjective<'_, B> {
        OpdObjective { base: &self.state.base, inner: self.state.pipeline.transformer(), teachers: &self.teachers, config: &self.config }
    }

    fn batch<'r>(&self, ro: &'r Rollouts<B::InnerBackend>) -> Result<OpdBatch<'r, B::InnerBackend>, String> {
        Ok(OpdBatch { trajectory: &ro.trajectory, cond: &ro.cond, negative: &ro.negative, route: self.teachers.route(&ro.tasks())? })
    }

    /// The batch loss `mean_b mean_j [L_OPD + lambda L_MAR]` of `ro` under the current student
    /// (no update).
    pub fn loss_on(&self, ro: &Rollouts<B::InnerBackend>, device: &B::Device) -> Result<f64, String> {
        Ok(self.objective().loss(&self.state.adapter.valid(), &self.batch(ro)?, device))
    }

    /// Routed teacher and anchor labels at every trained state of `ro`, the loss, and one
    /// accumulated AdamW update of the student (plus EMA).
    pub fn step_on(&mut self, ro: &Rollouts<B::InnerBackend>, device: &B::Device) -> Result<OpdStats, String> {
        let checked = self.batch(ro).and_then(|batch| {
            let metrics = match &self.rewards {
                Some(rewards) => score(&ro.prompts, &ro.images, &BTreeMap::new(), rewards)?.1,
                None => BTreeMap::new(),
            };
            Ok((batch, metrics))
        });
        let (batch, task_metrics) = match &self.state.peer {
            None => checked?,
            Some(peer) => {
                let local = checked.as_ref().map(|(_, m)| (&[][..], m, ro.tasks())).map_err(|e| e.clone());
                let metrics = gather_scores(peer, local, 0)?.1;
                (checked?.0, metrics)
            }
        };
        let (stats, grads) = self.objective().gradients(&self.state.adapter, &batch, device);
        let ([loss, distill, anchor], grads) = self.state.peer_means([stats.loss, stats.distill, stats.anchor], grads)?;
        self.state.update(grads);
        Ok(OpdStats { loss, distill, anchor, task_metrics })
    }
}

/// One batch of on-policy rollouts as the OPD objective sees it, whatever pipeline made it
/// (the tiny world, SD3.5, or the random-conditioning benchmark).
pub struct OpdBatch<'a, B: Backend> {
    pub trajectory: &'a Trajectory<B>,
    pub cond: &'a TextConditioning<B>,
    pub negative: &'a TextConditioning<B>,
    /// `R(c)` of every sample (index into the teachers' adapters; `None` = the base).
    pub route: Vec<Option<usize>>,
}

/// The OPD objective over a shared base: the student's guided velocity against the routed
/// teachers' and the anchor's (docs/reference.md section 4).
pub struct OpdObjective<'a, B: AutodiffBackend> {
    /// The base on the autodiff backend (no gradient; same tensors as `inner`).
    pub base: &'a Mmdit<B>,
    pub inner: &'a Mmdit<B::InnerBackend>,
    pub teachers: &'a Teachers<B::InnerBackend>,
    pub config: &'a OpdConfig,
}

impl<B: AutodiffBackend> OpdObjective<'_, B> {
    fn trained_steps(&self, batch: &OpdBatch<'_, B::InnerBackend>) -> Vec<usize> {
        trained_steps(batch.trajectory, self.config.rollout.steps, self.config.timestep_fraction)
    }

    /// What every trained step of micro-batch `rows` shares: its conditioning and the routed
    /// teacher and anchor adapters (built once, used at each step).
    fn micro_batch<'s>(&'s self, batch: &OpdBatch<'_, B::InnerBackend>, rows: Range<usize>, device: &B::Device) -> MicroBatch<'s, B::InnerBackend> {
        let teacher_refs: Vec<&LoraAdapter<B::InnerBackend>> = self.teachers.adapters.iter().collect();
        let route = batch.route[rows.clone()].to_vec();
        let routed = ActiveAdapters::new(teacher_refs.clone(), &AdapterChoice::PerSample(route), device);
        let anchor = match self.teachers.anchor {
            Some(i) => ActiveAdapters::new(teacher_refs, &AdapterChoice::All(i), device),
            None => ActiveAdapters::none(),
        };
        MicroBatch { cond: batch.cond.rows(rows.clone()), negative: batch.negative.rows(rows.clone()), rows, routed, anchor }
    }

    /// Teacher (routed) and anchor velocities of micro-batch `mb` at trained step `j` (no
    /// gradient), and the micro-batch's state there.
    fn labels(
        &self,
        batch: &OpdBatch<'_, B::InnerBackend>,
        mb: &MicroBatch<'_, B::InnerBackend>,
        j: usize,
    ) -> (Tensor<B::InnerBackend, 4>, Tensor<B::InnerBackend, 4>, Option<Tensor<B::InnerBackend, 4>>) {
        let sigma = batch.trajectory.transitions[j].step.sigma;
        let state = batch.trajectory.states[j].clone().slice([mb.rows.clone()]);
        let guidance = mb.negative.cfg(self.config.rollout.guidance);
        let teacher = GuidedModel { model: self.inner, adapters: &mb.routed, cond: &mb.cond, guidance }.velocity(state.clone(), sigma);
        let anchor = (self.config.mar_lambda != 0.0)
            .then(|| GuidedModel { model: self.inner, adapters: &mb.anchor, cond: &mb.cond, guidance }.velocity(state.clone(), sigma));
        (state, teacher, anchor)
    }

    fn weight(&self, batch: &OpdBatch<'_, B::InnerBackend>, j: usize) -> f64 {
        let step = batch.trajectory.transitions[j].step;
        kl_weight(step, step.sigma_t(self.config.rollout.noise_level), self.config.reduction)
    }

    /// `mean_b mean_j [L_OPD + lambda L_MAR]` under `student` (no gradient).
    pub fn loss(&self, student: &LoraAdapter<B::InnerBackend>, batch: &OpdBatch<'_, B::InnerBackend>, device: &B::Device) -> f64 {
        let steps = self.trained_steps(batch);
        let single = ActiveAdapters::single(student);
        let n = batch.route.len();
        let g = self.config.rollout.guidance;
        let mut total = 0.0;
        for rows in self.config.rollout.micro_batches(n) {
            let mb = self.micro_batch(batch, rows, device);
            let field = GuidedModel { model: self.inner, adapters: &single, cond: &mb.cond, guidance: mb.negative.cfg(g) };
            for &j in &steps {
                let (state, teacher, anchor) = self.labels(batch, &mb, j);
                let v = field.velocity(state, batch.trajectory.transitions[j].step.sigma);
                let loss = opd_loss(v, teacher, anchor, self.weight(batch, j), self.config.mar_lambda, self.config.reduction);
                total += loss.total.sum().into_scalar().elem::<f64>() / (n * steps.len()) as f64;
            }
        }
        total
    }

    /// The loss figures and the student's gradients, accumulated over the trained steps and
    /// micro-batches (`None` when no step is trained).
    pub fn gradients(&self, student: &LoraAdapter<B>, batch: &OpdBatch<'_, B::InnerBackend>, device: &B::Device) -> (OpdStats, Option<GradientsParams>) {
        let steps = self.trained_steps(batch);
        let n = batch.route.len();
        let g = self.config.rollout.guidance;
        let mut accumulator = GradientsAccumulator::<LoraAdapter<B>>::new();
        let mut stats = OpdStats::default();
        let scale = 1.0 / (n * steps.len()).max(1) as f64;
        for rows in self.config.rollout.micro_batches(n) {
            let mb = self.micro_batch(batch, rows, device);
            let (cond, negative) = (lift_conditioning::<B>(&mb.cond), lift_conditioning::<B>(&mb.negative));
            for &j in &steps {
                let leaves = fresh_leaves(student);
                let single = ActiveAdapters::single(&leaves);
                let student_field = GuidedModel { model: self.base, adapters: &single, cond: &cond, guidance: negative.cfg(g) };
                let (state, teacher, anchor) = self.labels(batch, &mb, j);
                let v_teacher = Tensor::<B, 4>::from_inner(teacher);
                let v_anchor = anchor.map(Tensor::<B, 4>::from_inner);
                let sigma = batch.trajectory.transitions[j].step.sigma;
                let fixed_uncond = !self.config.train_uncond;
                let v = self.config.training.checkpointing.scope(|| student_field.guided_velocity(Tensor::from_inner(state), sigma, fixed_uncond));
                let loss = opd_loss(v, v_teacher, v_anchor, self.weight(batch, j), self.config.mar_lambda, self.config.reduction);
                // Sums over the micro-batch, scaled to the batch mean over samples and steps.
                stats.distill += loss.distill.sum().into_scalar().elem::<f64>() * scale;
                stats.anchor += loss.anchor.sum().into_scalar().elem::<f64>() * scale;
                let total = loss.total.sum() * scale;
                stats.loss += total.clone().into_scalar().elem::<f64>();
                let grads = GradientsParams::from_grads(total.backward(), &leaves);
                accumulator.accumulate(&leaves, grads);
            }
        }
        (stats, (!steps.is_empty()).then(|| accumulator.grads()))
    }
}

/// One micro-batch of an [`OpdBatch`]: its rows, conditioning and routed adapters.
struct MicroBatch<'a, B: Backend> {
    rows: Range<usize>,
    cond: TextConditioning<B>,
    negative: TextConditioning<B>,
    routed: ActiveAdapters<'a, B>,
    anchor: ActiveAdapters<'a, B>,
}
