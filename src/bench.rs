//! `flow-opd bench`: throughput figures of the transformer forward (inference) and of a
//! flow-matching training step, for a preset or config, on the chosen backend.

use std::time::Instant;

use burn::backend::Autodiff;
use burn::module::Module;
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::flow::SeededNoise;
use crate::model::MmditConfig;

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub model: MmditConfig,
    pub batch: usize,
    /// Latent side (pixels of the latent).
    pub latent: usize,
    /// Text tokens.
    pub tokens: usize,
    pub iterations: usize,
}

/// Measured figures.
#[derive(Debug, Clone)]
pub struct BenchReport {
    pub parameters: usize,
    pub forward_samples_per_s: f64,
    pub train_samples_per_s: f64,
}

fn sync<B: Backend>(t: Tensor<B, 4>) {
    let _ = t.into_data();
}

/// Runs the forward and training-step benchmarks (one warm-up iteration each).
pub fn run_bench<B: Backend>(config: &BenchConfig, device: &B::Device) -> BenchReport {
    let m = &config.model;
    let mut noise = SeededNoise::new(0);
    let (b, s) = (config.batch, config.latent);
    let x: Tensor<B, 4> = noise.sample([b, m.in_channels, s, s], device);
    let c: Tensor<B, 3> = noise.sample([b, config.tokens, m.joint_attention_dim], device);
    let y: Tensor<B, 2> = noise.sample([b, m.pooled_projection_dim], device);
    let t = Tensor::<B, 1>::full([b], 500.0, device);
    let model = m.init::<B>(device);
    let parameters = model.num_params();
    sync(model.forward(x.clone(), c.clone(), y.clone(), t.clone()));
    let start = Instant::now();
    for _ in 0..config.iterations {
        sync(model.forward(x.clone(), c.clone(), y.clone(), t.clone()));
    }
    let forward = (b * config.iterations) as f64 / start.elapsed().as_secs_f64();

    let model = m.init::<Autodiff<B>>(device);
    let to_ad = |t: Tensor<B, 4>| Tensor::<Autodiff<B>, 4>::from_inner(t);
    let (xa, ca, ya, ta) = (
        to_ad(x.clone()),
        Tensor::<Autodiff<B>, 3>::from_inner(c.clone()),
        Tensor::<Autodiff<B>, 2>::from_inner(y.clone()),
        Tensor::<Autodiff<B>, 1>::from_inner(t.clone()),
    );
    let step = || {
        let v = model.forward(xa.clone(), ca.clone(), ya.clone(), ta.clone());
        let grads = (v - xa.clone()).powi_scalar(2).mean().backward();
        drop(grads);
    };
    step();
    let start = Instant::now();
    for _ in 0..config.iterations {
        step();
    }
    let train = (b * config.iterations) as f64 / start.elapsed().as_secs_f64();
    BenchReport { parameters, forward_samples_per_s: forward, train_samples_per_s: train }
}
