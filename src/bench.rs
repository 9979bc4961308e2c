//! `flow-opd bench`: throughput figures of the transformer forward (inference) and of a
//! flow-matching training step, for a preset or config, on the chosen backend.

use std::time::Instant;

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::{BalancedCheckpointing, CheckpointStrategy, NoCheckpointing};
use burn::module::{AutodiffModule, Module};
use burn::optim::Optimizer;
use burn::tensor::Tensor;
use crate::{AutodiffBackend, Backend};

use crate::flow::{SeededNoise, TextConditioning};
use crate::train::rollout::sample_micro_batched;
use crate::model::MmditConfig;
use crate::model::lora::{ActiveAdapters, LoraAdapter};
use crate::model::mmdit::Mmdit;
use crate::train::Checkpointing;
use crate::train::adapter::{AdapterTraining, OptimConfig};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub model: MmditConfig,
    pub batch: usize,
    /// Latent side (pixels of the latent).
    pub latent: usize,
    /// Text tokens.
    pub tokens: usize,
    /// Timed iterations per figure (after one untimed warm-up); figures are medians.
    pub iterations: usize,
    /// LoRA rank and alpha of the LoRA train step (Flow-GRPO: 32 / 64).
    pub rank: usize,
    pub alpha: f64,
    /// Storage (and compute) precision of the transformer in the forward and under the LoRA
    /// (the full-weight train step stays f32: its weights are the optimizer's).
    pub weights: crate::pipeline::WeightPrecision,
    /// What the train steps' backward recomputes.
    pub checkpointing: Checkpointing,
    /// Skip the full-weight train step (an SD3.5-M's f32 weights, gradients and AdamW moments
    /// alone take 36 GB); its figure is then NaN (`null` in JSON).
    pub skip_train: bool,
}

/// Measured figures: samples per second of the median iteration, and every timed iteration's
/// seconds (`tools/bench_torch.py` reports the same fields for PyTorch + diffusers).
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    pub parameters: usize,
    pub forward_samples_per_s: f64,
    /// Forward, loss `mean((v - x)^2)`, backward and an AdamW step over every weight.
    pub train_samples_per_s: f64,
    /// The same with the base frozen and a LoRA on the attention projections Flow-GRPO adapts.
    pub lora_train_samples_per_s: f64,
    pub seconds: BenchSeconds,
    /// GPU backends: device memory reserved at the end of each figure's runs, the pools
    /// emptied before each (so each is that figure's high-water mark).
    pub memory: Option<BenchMemory>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchMemory {
    pub forward_reserved_bytes: u64,
    pub train_reserved_bytes: u64,
    pub lora_train_reserved_bytes: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchSeconds {
    pub forward: Vec<f64>,
    pub train: Vec<f64>,
    pub lora_train: Vec<f64>,
}

fn sync<B: Backend>(t: Tensor<B, 4>) {
    let _ = t.into_data();
}

/// Waits for the device's queued work (a timed step ends when its update has landed).
fn wait<B: Backend>(device: &B::Device) {
    B::sync(device).expect("device sync");
}

/// Seconds of each of `iterations` timed calls of `f`, after one untimed warm-up call.
fn timed(iterations: usize, mut f: impl FnMut()) -> Vec<f64> {
    f();
    (0..iterations)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect()
}

/// Samples per second of the median of `seconds`.
fn median_rate(batch: usize, seconds: &[f64]) -> f64 {
    if seconds.is_empty() {
        return f64::NAN;
    }
    let mut sorted = seconds.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 { sorted[n / 2] } else { 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]) };
    batch as f64 / median
}

/// AdamW of the side-by-side benchmark (lr 1e-4, betas 0.9 / 0.999, weight decay 1e-4, no
/// clipping), as `tools/bench_torch.py` steps PyTorch's.
fn bench_optim() -> OptimConfig {
    OptimConfig { lr: 1e-4, betas: (0.9, 0.999), weight_decay: 1e-4, grad_clip: 0.0 }
}

/// Device memory reserved after `f`, the pools emptied before it (`None` on the CPU).
fn reserved_by<B: Backend, T>(device: &B::Device, f: impl FnOnce() -> T) -> (T, Option<u64>) {
    B::memory_cleanup(device);
    let out = f();
    wait::<B>(device);
    (out, B::device_memory(device).map(|m| m.reserved))
}

/// Runs the forward, full-weight train-step and LoRA train-step benchmarks.
pub fn run_bench<B: Backend>(config: &BenchConfig, device: &B::Device) -> BenchReport {
    match config.checkpointing {
        Checkpointing::None => bench_on::<B, NoCheckpointing>(config, device),
        Checkpointing::Balanced | Checkpointing::Blocks => bench_on::<B, BalancedCheckpointing>(config, device),
    }
}

fn bench_on<B: Backend, C: CheckpointStrategy>(config: &BenchConfig, device: &B::Device) -> BenchReport {
    type AD<B, C> = Autodiff<B, C>;
    let m = &config.model;
    let mut noise = SeededNoise::new(0);
    let (b, s) = (config.batch, config.latent);
    let x: Tensor<B, 4> = noise.sample([b, m.in_channels, s, s], device);
    let c: Tensor<B, 3> = noise.sample([b, config.tokens, m.joint_attention_dim], device);
    let y: Tensor<B, 2> = noise.sample([b, m.pooled_projection_dim], device);
    let t = Tensor::<B, 1>::full([b], 500.0, device);
    let model = config.weights.apply(m.init::<B>(device));
    let parameters = model.num_params();
    let (forward, forward_memory) =
        reserved_by::<B, _>(device, || timed(config.iterations, || sync(model.forward(x.clone(), c.clone(), y.clone(), t.clone()))));

    let (xa, ca, ya, ta) = (
        Tensor::<AD<B, C>, 4>::from_inner(x.clone()),
        Tensor::<AD<B, C>, 3>::from_inner(c.clone()),
        Tensor::<AD<B, C>, 2>::from_inner(y.clone()),
        Tensor::<AD<B, C>, 1>::from_inner(t.clone()),
    );
    let optim = bench_optim();
    let scope = config.checkpointing;
    let (train, train_memory) = reserved_by::<B, _>(device, || {
        if config.skip_train {
            return Vec::new();
        }
        let mut full = Some(m.init::<AD<B, C>>(device));
        let mut optimizer = optim.adamw().init::<AD<B, C>, Mmdit<AD<B, C>>>();
        timed(config.iterations, || {
            let model = full.take().expect("model");
            let loss = scope.scope(|| (model.forward(xa.clone(), ca.clone(), ya.clone(), ta.clone()) - xa.clone()).powi_scalar(2).mean());
            let grads = burn::optim::GradientsParams::from_grads(loss.backward(), &model);
            let model = optimizer.step(optim.lr, model, grads);
            wait::<B>(device);
            full = Some(model);
        })
    });

    let inner = model;
    let base = <Mmdit<AD<B, C>> as AutodiffModule<AD<B, C>>>::from_inner(inner.clone()).no_grad();
    let lora = crate::model::lora::LoraConfig::new(config.rank, config.alpha, crate::model::lora::LoraTarget::FLOW_GRPO.to_vec());
    let (lora_train, lora_memory) = reserved_by::<B, _>(device, || {
        let mut adapter =
            Some(crate::train::trainable(<LoraAdapter<AD<B, C>> as AutodiffModule<AD<B, C>>>::from_inner(lora.init(&inner, 0, device))));
        let mut optimizer = optim.adamw().init::<AD<B, C>, LoraAdapter<AD<B, C>>>();
        timed(config.iterations, || {
            let trained = adapter.take().expect("adapter");
            let single = ActiveAdapters::single(&trained);
            let loss = scope.scope(|| (base.forward_adapted(xa.clone(), ca.clone(), ya.clone(), ta.clone(), &single) - xa.clone()).powi_scalar(2).mean());
            let grads = burn::optim::GradientsParams::from_grads(loss.backward(), &trained);
            let trained = optimizer.step(optim.lr, trained, grads);
            wait::<B>(device);
            adapter = Some(trained);
        })
    });
    let memory = match (forward_memory, train_memory, lora_memory) {
        (Some(f), Some(t), Some(l)) => Some(BenchMemory { forward_reserved_bytes: f, train_reserved_bytes: t, lora_train_reserved_bytes: l }),
        _ => None,
    };
    BenchReport {
        parameters,
        forward_samples_per_s: median_rate(b, &forward),
        train_samples_per_s: median_rate(b, &train),
        lora_train_samples_per_s: median_rate(b, &lora_train),
        seconds: BenchSeconds { forward, train, lora_train },
        memory,
    }
}

/// What one Flow-OPD benchmark step runs: random conditioning of the real shapes (SD3.5 at
/// 512 px: latent 64, 77 + 256 text tokens), a student adapter and routed teachers.
#[derive(Debug, Clone)]
pub struct OpdBenchConfig {
    pub model: MmditConfig,
    /// Images per step (prompts x G).
    pub batch: usize,
    pub latent: usize,
    pub tokens: usize,
    /// LoRA rank and alpha of the student and teachers (paper: 32 / 64).
    pub rank: usize,
    pub alpha: f64,
    /// Task teachers the batch is routed over (one more adapter is the MAR anchor).
    pub teachers: usize,
    /// SDE steps T (10) and CFG scale (4.5).
    pub steps: usize,
    pub guidance: f64,
    /// Timed OPD iterations after one warm-up.
    pub iterations: usize,
    /// Samples per transformer pass (gradients accumulated); the whole batch if `None`.
    pub micro_batch: Option<usize>,
    /// Storage precision of the frozen base (the adapters stay f32).
    pub weights: crate::pipeline::WeightPrecision,
    /// What the student's backward recomputes.
    pub checkpointing: Checkpointing,
}

/// Measured figures of the OPD benchmark (wall-clock, synchronised at each phase's end).
#[derive(Debug, Clone, serde::Serialize)]
pub struct OpdBenchReport {
    pub parameters: usize,
    pub adapter_parameters: usize,
    /// Seconds per rollout of `batch` images (T SDE steps with CFG, latents only).
    pub rollout_s: f64,
    /// Seconds per OPD update: routed teacher + anchor labels, student forward/backward at
    /// every trained step, AdamW.
    pub update_s: f64,
    pub loss: f64,
    /// GPU backends: device memory reserved over the warm-up and timed iterations (the pools
    /// emptied before them): the iteration's high-water mark.
    pub reserved_bytes: Option<u64>,
}

impl OpdBenchReport {
    /// Images per second of a whole iteration (rollout + update).
    pub fn images_per_s(&self, batch: usize) -> f64 {
        batch as f64 / (self.rollout_s + self.update_s)
    }
}

/// One Flow-OPD iteration at full size, as the trainer runs it: the student's SDE rollout,
/// then [`OpdObjective::gradients`] and an AdamW step.
pub fn run_opd_bench<B: AutodiffBackend>(config: &OpdBenchConfig, device: &B::Device) -> Result<OpdBenchReport, String> {
    use crate::train::opd::{OpdBatch, OpdConfig, OpdObjective, Teachers};
    use crate::train::rollout::RolloutConfig;
    let m = &config.model;
    let b = config.batch;
    let targets = crate::model::lora::LoraTarget::FLOW_GRPO.to_vec();
    let lora = crate::model::lora::LoraConfig::new(config.rank, config.alpha, targets);
    let inner: Mmdit<B::InnerBackend> = config.weights.apply(m.init(device));
    let parameters = inner.num_params();
    let base = <Mmdit<B> as AutodiffModule<B>>::from_inner(inner.clone()).no_grad();
    let teachers = Teachers {
        adapters: (0..=config.teachers as u64).map(|k| lora.init(&inner, 1 + k, device)).collect(),
        routing: Default::default(),
        anchor: Some(config.teachers),
    };
    let mut student = crate::train::trainable(<LoraAdapter<B> as AutodiffModule<B>>::from_inner(lora.init(&inner, 0, device)));
    let adapter_parameters = student.num_params();
    let opd = OpdConfig {
        iterations: config.iterations,
        rollout: RolloutConfig {
            prompts: b,
            group_size: 1,
            steps: config.steps,
            noise_level: 0.7,
            kind: Default::default(),
            sde_window: None,
            guidance: config.guidance,
            micro_batch: config.micro_batch,
            same_latent: false,
        },
        tasks: None,
        mar_lambda: 0.02,
        reduction: Default::default(),
        timestep_fraction: 0.99,
        lora: None,
        training: AdapterTraining {
            optim: OptimConfig { lr: 1e-4, betas: (0.9, 0.999), weight_decay: 1e-4, grad_clip: 1.0 },
            ema_max_decay: 0.9,
            seed: 0,
            prompt_files: Default::default(),
            checkpointing: config.checkpointing,
        },
        train_uncond: true,
        train_metrics: false,
        remote_rewards: Default::default(),
    };
    let mut optimizer = opd.training.optim.adamw().init::<B, LoraAdapter<B>>();
    let mut noise = SeededNoise::new(0);
    let conditioning = |noise: &mut SeededNoise| TextConditioning {
        tokens: noise.sample([b, config.tokens, m.joint_attention_dim], device),
        pooled: noise.sample([b, m.pooled_projection_dim], device),
    };
    let (cond, negative) = (conditioning(&mut noise), conditioning(&mut noise));
    let route: Vec<Option<usize>> = (0..b).map(|i| Some(i % config.teachers)).collect();
    let objective = OpdObjective { base: &base, inner: &inner, teachers: &teachers, config: &opd };
    let (mut rollout_s, mut update_s, mut loss) = (0.0, 0.0, 0.0);
    B::memory_cleanup(device);
    for iteration in 0..=config.iterations {
        let start = Instant::now();
        let policy = student.valid();
        let adapters = ActiveAdapters::single(&policy);
        let x0 = noise.sample([b, m.in_channels, config.latent, config.latent], device);
        let trajectory = sample_micro_batched(&inner, &adapters, &cond, &negative, x0, &opd.rollout, None, iteration as u64, 0, device, |_| ());
        sync(trajectory.final_state());
        let rolled = start.elapsed().as_secs_f64();
        let start = Instant::now();
        let batch = OpdBatch { trajectory: &trajectory, cond: &cond, negative: &negative, route: route.clone() };
        let (stats, grads) = objective.gradients(&student, &batch, device);
        let grads = grads.ok_or("no trained step: the rollout has no stochastic transition")?;
        student = optimizer.step(opd.training.optim.lr, student, grads);
        B::sync(device).map_err(|e| format!("device sync: {e:?}"))?;
        let updated = start.elapsed().as_secs_f64();
        if iteration > 0 {
            rollout_s += rolled / config.iterations as f64;
            update_s += updated / config.iterations as f64;
            loss = stats.loss;
        }
    }
    let reserved_bytes = B::device_memory(device).map(|m| m.reserved);
    Ok(OpdBenchReport { parameters, adapter_parameters, rollout_s, update_s, loss, reserved_bytes })
}
