//! The SFT cold start (REFERENCE section 4): each task teacher samples images for its own
//! partition's training prompts (routed like OPD), then the student adapter is fitted by flow
//! matching on them, `L = ||v_theta(x_s, s, c) - (eps - x0)||^2` with `x0` the teacher's latents.

use std::collections::BTreeMap;

use burn::module::{AutodiffModule, Module};
use burn::optim::{GradientsParams, Optimizer};
use crate::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor};
use rand::{Rng, SeedableRng};
use rand::seq::IndexedRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::ema::Ema;
use super::grpo::{LoraSpec, lift_conditioning};
use super::pretrain::{FlowMatchingPair, OptimConfig, TimestepSampling};
use crate::eval::generate::{GenerateConfig, initial_noise};
use crate::flow::{GuidedModel, SeededNoise, sample_ode};
use crate::model::lora::{ActiveAdapters, LoraAdapter};
use crate::model::mmdit::Mmdit;
use crate::model::t2i::{AnyPipeline, TextToImage};
use crate::world::Task;
use super::prompts::{TaskPrompt, training_prompts};
use std::path::PathBuf;

/// SFT settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftConfig {
    /// Teacher samples per task.
    pub samples_per_task: usize,
    /// How the teachers sample (ODE, CFG).
    #[serde(default)]
    pub sampling: GenerateConfig,
    pub steps: usize,
    pub batch_size: usize,
    pub optim: OptimConfig,
    pub lora: LoraSpec,
    #[serde(default)]
    pub timesteps: TimestepSampling,
    #[serde(default = "default_ema")]
    pub ema_max_decay: f64,
    #[serde(default)]
    pub seed: u64,
    /// Prompt file per task (one prompt per line); the world's shipped training prompts when
    /// empty.
    #[serde(default)]
    pub prompt_files: BTreeMap<Task, PathBuf>,
}

fn default_ema() -> f64 {
    0.9
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
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let tasks: Vec<Task> = routing.keys().copied().collect();
    let train = training_prompts(&tasks, &config.prompt_files)?;
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

pub struct SftTrainer<B: AutodiffBackend, O: Optimizer<LoraAdapter<B>, B>> {
    pub pipeline: AnyPipeline<B::InnerBackend>,
    pub base: Mmdit<B>,
    pub student: LoraAdapter<B>,
    pub optimizer: O,
    pub ema: Ema<B, LoraAdapter<B>>,
    pub config: SftConfig,
    rng: ChaCha8Rng,
    noise: SeededNoise,
}

pub fn sft_trainer<B: AutodiffBackend>(
    pipeline: impl Into<AnyPipeline<B::InnerBackend>>,
    config: SftConfig,
    device: &B::Device,
) -> Result<SftTrainer<B, impl Optimizer<LoraAdapter<B>, B>>, String> {
    let pipeline = pipeline.into();
    let base = <Mmdit<B> as AutodiffModule<B>>::from_inner(pipeline.transformer().clone()).no_grad();
    let student = config.lora.config()?.init(&base, config.seed, device);
    let optimizer = config.optim.adamw().init::<B, LoraAdapter<B>>();
    let ema = Ema::new(&student, config.ema_max_decay);
    Ok(SftTrainer {
        rng: ChaCha8Rng::seed_from_u64(config.seed ^ 0x5f7),
        noise: SeededNoise::new(config.seed ^ 0x5f8),
        pipeline,
        base,
        student,
        optimizer,
        ema,
        config,
    })
}

impl<B: AutodiffBackend, O: Optimizer<LoraAdapter<B>, B>> SftTrainer<B, O> {
    /// One flow-matching step of the student on a random batch of teacher samples.
    pub fn step(&mut self, data: &SftData<B::InnerBackend>, device: &B::Device) -> Result<f64, String> {
        let n = data.prompts.len();
        let b = self.config.batch_size.min(n);
        let rows: Vec<usize> = (0..b).map(|_| self.rng.random_range(0..n)).collect();
        let idx = Tensor::<B::InnerBackend, 1, burn::tensor::Int>::from_ints(
            rows.iter().map(|r| *r as i64).collect::<Vec<_>>().as_slice(),
            device,
        );
        let x0 = Tensor::<B, 4>::from_inner(data.latents.clone().select(0, idx));
        let texts: Vec<&str> = rows.iter().map(|r| data.prompts[*r].text.as_str()).collect();
        let cond = lift_conditioning::<B>(&self.pipeline.encode_prompts(&texts, device)?);
        let eps: Tensor<B, 4> = self.noise.sample(x0.dims(), device);
        let sigmas: Vec<f32> = (0..b).map(|_| self.config.timesteps.sample(&mut self.rng) as f32).collect();
        let FlowMatchingPair { x_s, s, target } = FlowMatchingPair::new(x0, eps, sigmas, device);
        let single = ActiveAdapters::single(&self.student);
        let v = self.base.forward_adapted(x_s, cond.tokens, cond.pooled, s * 1000.0, &single);
        let loss = (v - target).powi_scalar(2).mean();
        let value = loss.clone().into_scalar().elem::<f64>();
        let grads = GradientsParams::from_grads(loss.backward(), &self.student);
        let student = self.student.clone();
        self.student = self.optimizer.step(self.config.optim.lr, student, grads);
        self.ema.update(&self.student);
        Ok(value)
    }
}
