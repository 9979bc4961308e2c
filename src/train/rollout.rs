//! On-policy rollouts shared by Flow-GRPO and Flow-OPD: a batch of prompts, `G` SDE
//! trajectories per prompt from the current policy (base + adapter, CFG), the decoded images,
//! and everything the losses need at each recorded state.

use crate::Backend;
use burn::tensor::{Tensor, TensorData};
use rand::Rng;
use serde::{Deserialize, Serialize};

use image::RgbImage;

use super::prompts::TaskPrompt;
use crate::flow::initial_noise;
use crate::flow::{GuidedModel, SamplerConfig, SdeKind, SeededNoise, TextConditioning, Trajectory, sample_trajectory};
use crate::model::lora::{ActiveAdapters, LoraAdapter};
use crate::model::mmdit::Mmdit;
use crate::pipeline::TextToImage;
use crate::world::Task;

/// How rollouts are sampled (docs/reference.md sections 3-5: T = 10, a = 0.7, CFG 4.5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutConfig {
    /// Prompts per iteration.
    pub prompts: usize,
    /// Samples per prompt `G`.
    pub group_size: usize,
    #[serde(default = "default_steps")]
    pub steps: usize,
    #[serde(default = "default_noise_level")]
    pub noise_level: f64,
    #[serde(default)]
    pub kind: SdeKind,
    /// Only these steps are stochastic (and trained); all if absent.
    #[serde(default)]
    pub sde_window: Option<std::ops::Range<usize>>,
    /// CFG scale in sampling and training (1 disables it).
    #[serde(default = "default_guidance")]
    pub guidance: f64,
    /// Samples per transformer pass in sampling and training (gradients are accumulated over
    /// the passes, so the update is the same); all at once if absent. Bounds GPU memory.
    #[serde(default)]
    pub micro_batch: Option<usize>,
    /// The `G` samples of a prompt start from the same initial noise (Flow-GRPO's
    /// `same_latent`): a group's rewards then differ only through the SDE's noise, which is
    /// what the policy gradient credits. Off by default (one initial noise per sample).
    #[serde(default)]
    pub same_latent: bool,
}

fn default_steps() -> usize {
    10
}
fn default_noise_level() -> f64 {
    0.7
}
fn default_guidance() -> f64 {
    4.5
}

impl RolloutConfig {
    /// The micro-batches of a batch of `n` samples, in order.
    pub fn micro_batches(&self, n: usize) -> Vec<std::ops::Range<usize>> {
        micro_batches(n, self.micro_batch)
    }

    pub fn sampler(&self) -> SamplerConfig {
        SamplerConfig { sde_window: self.sde_window.clone(), kind: self.kind, ..SamplerConfig::sde(self.steps, self.noise_level) }
    }
}

/// One iteration's rollouts.
pub struct Rollouts<B: Backend> {
    /// The prompt of every sample (each prompt repeated `G` times, consecutively).
    pub prompts: Vec<TaskPrompt>,
    pub cond: TextConditioning<B>,
    pub negative: TextConditioning<B>,
    pub trajectory: Trajectory<B>,
    pub images: Vec<RgbImage>,
}

impl<B: Backend> Rollouts<B> {
    pub fn tasks(&self) -> Vec<Task> {
        self.prompts.iter().map(|p| p.task).collect()
    }

    /// The transitions a trainer learns from: the stochastic ones among the first
    /// `int(T * timestep_fraction)` (Flow-GRPO's `timestep_fraction`; docs/reference.md section 5).
    pub fn trained_steps(&self, steps: usize, timestep_fraction: f64) -> Vec<usize> {
        trained_steps(&self.trajectory, steps, timestep_fraction)
    }
}

/// `0..n` in consecutive ranges of at most `size` (one range if `None`).
pub fn micro_batches(n: usize, size: Option<usize>) -> Vec<std::ops::Range<usize>> {
    let size = size.unwrap_or(n).max(1);
    (0..n).step_by(size).map(|start| start..(start + size).min(n)).collect()
}

/// The stochastic transitions among the first `int(steps * timestep_fraction)` of a trajectory.
pub fn trained_steps<B: Backend>(trajectory: &Trajectory<B>, steps: usize, timestep_fraction: f64) -> Vec<usize> {
    let n = (steps as f64 * timestep_fraction) as usize;
    let transitions = &trajectory.transitions;
    (0..n.min(transitions.len())).filter(|&j| transitions[j].stochastic).collect()
}

/// Samples `G` trajectories for each of `prompts` with the policy `base + adapter` (no
/// gradient; run on the inner backend).
pub fn rollout<B: Backend, P: TextToImage<B> + ?Sized>(
    pipeline: &P,
    adapter: Option<&LoraAdapter<B>>,
    prompts: &[TaskPrompt],
    config: &RolloutConfig,
    rng: &mut impl Rng,
    device: &B::Device,
) -> Result<Rollouts<B>, String> {
    rollout_shard(pipeline, adapter, prompts, 0..prompts.len(), config, rng, device)
}

/// The rollouts of `prompts[shard]` out of a batch of `prompts`: what [`rollout`] of the whole
/// batch gives those prompts' samples when their first sample starts a micro-batch. `rng`
/// advances as for the whole batch (every sample's initial-noise seed and the SDE noise seed
/// are drawn), and each micro-batch takes its SDE noise from its own stream of that seed,
/// numbered by its first sample's row in the whole batch. So data-parallel peers that each
/// roll out their shard of one batch sample what one device samples with `micro_batch` = a
/// shard's samples.
pub fn rollout_shard<B: Backend, P: TextToImage<B> + ?Sized>(
    pipeline: &P,
    adapter: Option<&LoraAdapter<B>>,
    prompts: &[TaskPrompt],
    shard: std::ops::Range<usize>,
    config: &RolloutConfig,
    rng: &mut impl Rng,
    device: &B::Device,
) -> Result<Rollouts<B>, String> {
    let g = config.group_size;
    let seeds: Vec<u64> = if config.same_latent {
        let per_prompt: Vec<u64> = prompts.iter().map(|_| rng.random()).collect();
        per_prompt.iter().flat_map(|&s| std::iter::repeat_n(s, g)).collect()
    } else {
        (0..prompts.len() * g).map(|_| rng.random()).collect()
    };
    let noise_seed: u64 = rng.random();
    let rows = shard.start * g..shard.end * g;
    let expanded: Vec<TaskPrompt> =
        prompts[shard].iter().flat_map(|p| std::iter::repeat_n(p.clone(), g)).collect();
    let texts: Vec<&str> = expanded.iter().map(|p| p.text.as_str()).collect();
    let cond = pipeline.encode_prompts(&texts, device)?;
    let negative = pipeline.encode_prompts(&vec![""; texts.len()], device)?;
    let x0 = initial_noise::<B>(pipeline.latent_shape(), &seeds[rows.clone()], device);
    let adapters = adapter.map_or_else(ActiveAdapters::none, ActiveAdapters::single);
    let mut images = Vec::with_capacity(texts.len());
    let (model, schedule) = (pipeline.transformer(), pipeline.schedule());
    let trajectory = sample_micro_batched(model, &adapters, &cond, &negative, x0, config, schedule, noise_seed, rows.start, device, |part| {
        images.extend(pipeline.decode_rgb(part.final_state()))
    });
    Ok(Rollouts { prompts: expanded, cond, negative, trajectory, images })
}

/// SDE trajectories from `x0` with the policy `model + adapters` (CFG per `config`; `schedule`
/// replaces the configured one when given), one micro-batch at a time (`each` sees every part
/// as it is done), joined into one. The micro-batch whose first row is `r` of `x0` draws its SDE
/// noise from stream `first_row + r` of `noise_seed` ([`SeededNoise::stream`]).
#[allow(clippy::too_many_arguments)]
pub fn sample_micro_batched<B: Backend>(
    model: &Mmdit<B>,
    adapters: &ActiveAdapters<'_, B>,
    cond: &TextConditioning<B>,
    negative: &TextConditioning<B>,
    x0: Tensor<B, 4>,
    config: &RolloutConfig,
    schedule: Option<crate::flow::FlowSchedule>,
    noise_seed: u64,
    first_row: usize,
    device: &B::Device,
    mut each: impl FnMut(&Trajectory<B>),
) -> Trajectory<B> {
    let mut sampler = config.sampler();
    if let Some(schedule) = schedule {
        sampler.schedule = schedule;
    }
    let mut parts = Vec::new();
    for rows in config.micro_batches(x0.dims()[0]) {
        let mut noise = SeededNoise::stream(noise_seed, (first_row + rows.start) as u64);
        let (c, n) = (cond.rows(rows.clone()), negative.rows(rows.clone()));
        let field = GuidedModel { model, adapters, cond: &c, guidance: n.cfg(config.guidance) };
        let part = sample_trajectory(&field, x0.clone().slice([rows]), &sampler, &mut |_, shape| noise.sample(shape, device));
        each(&part);
        parts.push(part);
    }
    Trajectory::cat(parts)
}

/// A `[B]` tensor from host values.
pub fn vector<B: Backend>(values: &[f64], device: &B::Device) -> Tensor<B, 1> {
    let v: Vec<f32> = values.iter().map(|x| *x as f32).collect();
    Tensor::from_data(TensorData::new(v, [values.len()]), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micro_batches_cover_the_batch_in_order() {
        assert_eq!(micro_batches(5, Some(2)), [0..2, 2..4, 4..5]);
        assert_eq!(micro_batches(4, None), [0..4]);
        assert_eq!(micro_batches(3, Some(8)), [0..3]);
    }
}
