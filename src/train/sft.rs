//! The SFT cold start (docs/reference.md section 4): each task teacher samples images for its own
//! partition's training prompts (routed like OPD), then the student adapter is fitted by flow
//! matching on them, `L = ||v_theta(x_s, s, c) - (eps - x0)||^2` with `x0` the teacher's latents.
//!
//! Only the conditional branch is fitted: every pair carries its prompt `c`, none the empty
//! prompt, so the unconditional velocity that CFG subtracts changes only through the weights the
//! two branches share (no prompt dropout; docs/fidelity.md).

use std::collections::BTreeMap;

use burn::optim::{GradientsParams, Optimizer};
use crate::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand::seq::IndexedRandom;
use serde::{Deserialize, Serialize};

use super::adapter::{AdapterState, AdapterTraining, LoraSpec, adapter_state, lift_conditioning};
use super::pretrain::{FlowMatchingPair, TimestepSampling};
use crate::flow::initial_noise;
use crate::pipeline::generate::GenerateConfig;
use crate::flow::{GuidedModel, SeededNoise, sample_ode};
use crate::model::lora::{ActiveAdapters, LoraAdapter};
use crate::pipeline::{AnyPipeline, TextToImage};
use crate::world::Task;
use super::prompts::{TaskPrompt, training_prompts};

/// SFT settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
// Unknown fields are refused by the recipe reader (flatten and `deny_unknown_fields` do not mix).
pub struct SftConfig {
    /// Teacher samples per task.
    pub samples_per_task: usize,
    /// How the teachers sample (ODE, CFG).
    #[serde(default)]
    pub sampling: GenerateConfig,
    pub steps: usize,
    pub batch_size: usize,
    pub lora: LoraSpec,
    #[serde(default)]
    pub timesteps: TimestepSampling,
    /// Optimiser, EMA, seed and prompt files (the fields every adapter trainer has, in the
    /// same table).
    #[serde(flatten)]
    pub training: AdapterTraining,
}


/// Teacher samples: prompts and their final latents `[N, C, h, w]`.
pub struct SftData<B: crate::Backend> {
    pub prompts: Vec<TaskPrompt>,
    pub latents: Tensor<B, 4>,
}

/// Samples `samples_per_task` training prompts of every routed task with its teacher.
pub fn teacher_samples<B: crate::Backend, P: TextToImage<B> + ?Sized>(
    pipeline: &P,
    teachers: &[LoraAdapter<B>],
    routing: &BTreeMap<Task, usize>,
    config: &SftConfig,
    device: &B::Device,
) -> Result<SftData<B>, String> {
    let mut rng = ChaCha8Rng::seed_from_u64(config.training.seed);
    let tasks: Vec<Task> = routing.keys().copied().collect();
    let train = training_prompts(&tasks, &config.training.prompt_files)?;
    let mut prompts = Vec::new();
    let mut latents = Vec::new();
    for (task, &teacher) in routing {
        let pool: Vec<&TaskPrompt> = train.iter().filter(|p| p.task == *task).collect();
        let chosen: Vec<TaskPrompt> = (0..config.samples_per_task).map(|_| (*pool.choose(&mut rng).expect("prompts")).clone()).collect();
        let adapters = ActiveAdapters::single(&teachers[teacher]);
        for chunk in chosen.chunks(config.sampling.batch.max(1)) {
            let texts: Vec<&str> = chunk.iter().map(|p| p.text.as_str()).collect();
            let cond = pipeline.encode_prompts(&texts, device)?;
            let negative = pipeline.encode_prompts(&vec![""; texts.len()], device)?;
            let g = config.sampling.guidance;
            let field = GuidedModel { model: pipeline.transformer(), adapters: &adapters, cond: &cond, guidance: negative.cfg(g) };
            let seeds: Vec<u64> = (0..texts.len()).map(|_| rng.random()).collect();
            let x0 = initial_noise::<B>(pipeline.latent_shape(), &seeds, device);
            let schedule = pipeline.schedule().unwrap_or(config.sampling.schedule);
            latents.push(sample_ode(&field, x0, config.sampling.steps, schedule));
        }
        prompts.extend(chosen);
    }
    Ok(SftData { prompts, latents: Tensor::cat(latents, 0) })
}

/// The SFT state: the shared adapter state ([`AdapterState`], whose adapter is the student)
/// and the flow-matching noise stream.
pub struct SftTrainer<B: AutodiffBackend, O: Optimizer<LoraAdapter<B>, B>> {
    pub state: AdapterState<B, O>,
    pub config: SftConfig,
    noise: SeededNoise,
}

/// Builds a trainer with a fresh student adapter of shape `config.lora`.
pub fn sft_trainer<B: AutodiffBackend>(
    pipeline: impl Into<AnyPipeline<B::InnerBackend>>,
    config: SftConfig,
    device: &B::Device,
) -> Result<SftTrainer<B, impl Optimizer<LoraAdapter<B>, B>>, String> {
    let setup = config.training.setup(Some(&config.lora), config.training.seed ^ 0x5f7);
    let state = adapter_state::<B>(pipeline, None, setup, device)?;
    Ok(SftTrainer { state, noise: SeededNoise::new(config.training.seed ^ 0x5f8), config })
}

impl<B: AutodiffBackend, O: Optimizer<LoraAdapter<B>, B>> SftTrainer<B, O> {
    /// The flow-matching noise stream (for resumable checkpoints).
    pub fn noise(&self) -> &SeededNoise {
        &self.noise
    }

    pub fn set_noise(&mut self, rng: rand_chacha::ChaCha8Rng) {
        self.noise = SeededNoise::from_rng(rng);
    }

    /// One flow-matching step of the student on a random batch of teacher samples.
    pub fn step(&mut self, data: &SftData<B::InnerBackend>, device: &B::Device) -> Result<f64, String> {
        let n = data.prompts.len();
        let b = self.config.batch_size.min(n);
        let rows: Vec<usize> = (0..b).map(|_| self.state.rng.random_range(0..n)).collect();
        let idx = Tensor::<B::InnerBackend, 1, burn::tensor::Int>::from_ints(
            rows.iter().map(|r| *r as i64).collect::<Vec<_>>().as_slice(),
            device,
        );
        let x0 = Tensor::<B, 4>::from_inner(data.latents.clone().select(0, idx));
        let texts: Vec<&str> = rows.iter().map(|r| data.prompts[*r].text.as_str()).collect();
        let cond = lift_conditioning::<B>(&self.state.pipeline.encode_prompts(&texts, device)?);
        let eps: Tensor<B, 4> = self.noise.sample(x0.dims(), device);
        let sigmas: Vec<f32> = (0..b).map(|_| self.config.timesteps.sample(&mut self.state.rng) as f32).collect();
        let FlowMatchingPair { x_s, s, target } = FlowMatchingPair::new(x0, eps, sigmas, device);
        let single = ActiveAdapters::single(&self.state.adapter);
        let v = self.config.training.checkpointing.scope(|| self.state.base.forward_adapted(x_s, cond.tokens, cond.pooled, s * 1000.0, &single));
        let loss = (v - target).powi_scalar(2).mean();
        let value = loss.clone().into_scalar().elem::<f64>();
        let grads = GradientsParams::from_grads(loss.backward(), &self.state.adapter);
        self.state.update(Some(grads));
        Ok(value)
    }
}
