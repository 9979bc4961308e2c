//! On-policy rollouts shared by Flow-GRPO and Flow-OPD: a batch of prompts, `G` SDE
//! trajectories per prompt from the current policy (base + adapter, CFG), the decoded images,
//! and everything the losses need at each recorded state.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use rand::Rng;
use serde::{Deserialize, Serialize};

use image::RgbImage;

use super::prompts::TaskPrompt;
use crate::eval::generate::initial_noise;
use crate::flow::{GuidedModel, SamplerConfig, SdeKind, SeededNoise, TextConditioning, Trajectory, sample_trajectory};
use crate::model::lora::{ActiveAdapters, LoraAdapter};
use crate::model::t2i::TextToImage;
use crate::world::Task;

/// How rollouts are sampled (REFERENCE sections 3-5: T = 10, a = 0.7, CFG 4.5).
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
    /// `int(T * timestep_fraction)` (Flow-GRPO's `timestep_fraction`; REFERENCE section 5).
    pub fn trained_steps(&self, steps: usize, timestep_fraction: f64) -> Vec<usize> {
        trained_steps(&self.trajectory, steps, timestep_fraction)
    }

    /// The CFG pair of a guided forward over these samples.
    pub fn guidance(&self, scale: f64) -> Option<(&TextConditioning<B>, f64)> {
        (scale != 1.0).then_some((&self.negative, scale))
    }
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
    let expanded: Vec<TaskPrompt> =
        prompts.iter().flat_map(|p| std::iter::repeat_n(p.clone(), config.group_size)).collect();
    let texts: Vec<&str> = expanded.iter().map(|p| p.text.as_str()).collect();
    let cond = pipeline.encode_prompts(&texts, device)?;
    let negative = pipeline.encode_prompts(&vec![""; texts.len()], device)?;
    let seeds: Vec<u64> = (0..texts.len()).map(|_| rng.random()).collect();
    let x0 = initial_noise::<B>(pipeline.latent_shape(), &seeds, device);
    let adapters = adapter.map_or_else(ActiveAdapters::none, ActiveAdapters::single);
    let guidance = (config.guidance != 1.0).then_some((&negative, config.guidance));
    let field = GuidedModel { model: pipeline.transformer(), adapters: &adapters, cond: &cond, guidance };
    let mut noise = SeededNoise::new(rng.random());
    let trajectory = sample_trajectory(&field, x0, &config.sampler(), &mut |_, shape| noise.sample(shape, device));
    let images = pipeline.decode_rgb(trajectory.final_state());
    Ok(Rollouts { prompts: expanded, cond, negative, trajectory, images })
}

/// A `[B]` tensor from host values.
pub fn vector<B: Backend>(values: &[f64], device: &B::Device) -> Tensor<B, 1> {
    let v: Vec<f32> = values.iter().map(|x| *x as f32).collect();
    Tensor::from_data(TensorData::new(v, [values.len()]), device)
}
