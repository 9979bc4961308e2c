//! Samplers over the schedule: Euler ODE and Flow-GRPO SDE trajectories with per-step
//! log-probabilities, an optional SDE window, classifier-free guidance, and reproducible noise.

use std::ops::Range;

use crate::Backend;
use burn::tensor::{Tensor, TensorData};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use super::schedule::FlowSchedule;
use super::sde::{LogProbReduction, SdeKind, StepSigmas, euler_step, sde_step};
use crate::model::lora::ActiveAdapters;
use crate::model::mmdit::Mmdit;

/// Anything that predicts a velocity `v(x, s)` for a batch of latents at one sigma.
pub trait VelocityField<B: Backend> {
    /// `x [B, C, H, W]` at sigma `s` (every sample at the same `s`) -> `v [B, C, H, W]`.
    fn velocity(&self, x: Tensor<B, 4>, sigma: f64) -> Tensor<B, 4>;
}

impl<B: Backend, F: Fn(Tensor<B, 4>, f64) -> Tensor<B, 4>> VelocityField<B> for F {
    fn velocity(&self, x: Tensor<B, 4>, sigma: f64) -> Tensor<B, 4> {
        self(x, sigma)
    }
}

/// Text conditioning of a batch: token sequence `[B, L, D]` and pooled vector `[B, P]`.
#[derive(Debug, Clone)]
pub struct TextConditioning<B: Backend> {
    pub tokens: Tensor<B, 3>,
    pub pooled: Tensor<B, 2>,
}

impl<B: Backend> TextConditioning<B> {
    pub fn batch(&self) -> usize {
        self.tokens.dims()[0]
    }

    /// Concatenates along the batch.
    pub fn cat(parts: Vec<Self>) -> Self {
        let (tokens, pooled) = parts.into_iter().map(|p| (p.tokens, p.pooled)).unzip();
        Self { tokens: Tensor::cat(tokens, 0), pooled: Tensor::cat(pooled, 0) }
    }

    /// This conditioning as CFG's negative at `scale`, as [`GuidedModel::guidance`] takes it:
    /// `None` for `scale = 1` (the conditional model alone).
    pub fn cfg(&self, scale: f64) -> Option<(&Self, f64)> {
        (scale != 1.0).then_some((self, scale))
    }

    /// Samples `rows` (a range of the batch).
    pub fn rows(&self, rows: std::ops::Range<usize>) -> Self {
        Self { tokens: self.tokens.clone().slice([rows.clone()]), pooled: self.pooled.clone().slice([rows]) }
    }

    /// Sample `b` repeated `times` times, for every `b` in order (G samples per prompt).
    pub fn repeat_each(&self, times: usize) -> Self {
        let [b, l, d] = self.tokens.dims();
        let p = self.pooled.dims()[1];
        Self {
            tokens: self.tokens.clone().unsqueeze_dim::<4>(1).repeat_dim(1, times).reshape([b * times, l, d]),
            pooled: self.pooled.clone().unsqueeze_dim::<3>(1).repeat_dim(1, times).reshape([b * times, p]),
        }
    }
}

/// An MMDiT with its adapters and text conditioning, optionally with classifier-free guidance
/// `v = v_u + g (v_c - v_u)` (docs/reference.md section 8): the unconditional and conditional halves go
/// through one forward pass as the batch `[uncond, cond]`.
pub struct GuidedModel<'a, B: Backend> {
    pub model: &'a Mmdit<B>,
    pub adapters: &'a ActiveAdapters<'a, B>,
    pub cond: &'a TextConditioning<B>,
    /// The negative-prompt conditioning (same batch size) and the guidance scale `g`; `None`
    /// or `g = 1` runs the conditional model alone.
    pub guidance: Option<(&'a TextConditioning<B>, f64)>,
}

impl<B: Backend> GuidedModel<'_, B> {
    /// The guided velocity; with `fixed_uncond` the unconditional half is computed without
    /// gradient, so a gradient reaches the model only through the conditional half (the
    /// convention of trainers that run the unconditional prediction under `no_grad`): a
    /// separate forward through untracked copies of the adapters, which stores no activations
    /// and costs no backward.
    pub fn guided_velocity(&self, x: Tensor<B, 4>, sigma: f64, fixed_uncond: bool) -> Tensor<B, 4> {
        let batch = x.dims()[0];
        self.guided_velocity_at(x, &vec![sigma; batch], fixed_uncond)
    }

    /// [`Self::guided_velocity`] with each sample at its own noise level `sigmas[i]`.
    pub fn guided_velocity_at(&self, x: Tensor<B, 4>, sigmas: &[f64], fixed_uncond: bool) -> Tensor<B, 4> {
        let batch = x.dims()[0];
        assert_eq!(sigmas.len(), batch, "one noise level per sample");
        let device = x.device();
        let times = |copies: usize| {
            let t: Vec<f32> = (0..copies).flat_map(|_| sigmas.iter().map(|s| (s * 1000.0) as f32)).collect();
            Tensor::<B, 1>::from_data(burn::tensor::TensorData::new(t, [copies * batch]), &device)
        };
        match self.guidance {
            Some((uncond, scale)) if scale != 1.0 && fixed_uncond => {
                let t = times(1);
                let untracked = self.adapters.untracked_copies();
                let frozen = self.adapters.with_adapters(&untracked);
                let v_u = self.model.forward_adapted(x.clone(), uncond.tokens.clone(), uncond.pooled.clone(), t.clone(), &frozen).detach();
                let v_c = self.model.forward_adapted(x, self.cond.tokens.clone(), self.cond.pooled.clone(), t, self.adapters);
                v_u.clone() + (v_c - v_u) * scale
            }
            Some((uncond, scale)) if scale != 1.0 => {
                let both = TextConditioning::cat(vec![uncond.clone(), self.cond.clone()]);
                let t = times(2);
                let x2 = Tensor::cat(vec![x.clone(), x], 0);
                // Both halves route like the conditional batch.
                let v = self.model.forward_adapted(x2, both.tokens, both.pooled, t, &self.adapters.doubled(batch));
                let mut halves = v.chunk(2, 0).into_iter();
                let (v_u, v_c) = (halves.next().expect("2 halves"), halves.next().expect("2 halves"));
                v_u.clone() + (v_c - v_u) * scale
            }
            _ => {
                let t = times(1);
                self.model.forward_adapted(x, self.cond.tokens.clone(), self.cond.pooled.clone(), t, self.adapters)
            }
        }
    }
}

impl<B: Backend> VelocityField<B> for GuidedModel<'_, B> {
    fn velocity(&self, x: Tensor<B, 4>, sigma: f64) -> Tensor<B, 4> {
        self.guided_velocity(x, sigma, false)
    }
}

/// Standard-normal noise from a seeded ChaCha8 stream, generated on the host so a seed gives
/// the same numbers on every backend.
#[derive(Debug, Clone)]
pub struct SeededNoise {
    rng: ChaCha8Rng,
}

impl SeededNoise {
    pub fn new(seed: u64) -> Self {
        Self { rng: ChaCha8Rng::seed_from_u64(seed) }
    }

    /// Stream `stream` of `seed` (ChaCha's independent streams; stream 0 is [`Self::new`]).
    pub fn stream(seed: u64, stream: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        Self { rng }
    }

    /// The generator, at its position (for resumable checkpoints).
    pub fn rng(&self) -> &ChaCha8Rng {
        &self.rng
    }

    /// A stream that continues from `rng`'s position.
    pub fn from_rng(rng: ChaCha8Rng) -> Self {
        Self { rng }
    }

    /// `eps ~ N(0, I)` of `shape`.
    pub fn sample<B: Backend, const D: usize>(&mut self, shape: [usize; D], device: &B::Device) -> Tensor<B, D> {
        let n = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut self.rng)).collect();
        Tensor::from_data(TensorData::new(values, shape), device)
    }
}

/// Initial noise `[B, C, h, w]` for `seeds` (one ChaCha stream per seed).
pub fn initial_noise<B: Backend>(shape: [usize; 3], seeds: &[u64], device: &B::Device) -> Tensor<B, 4> {
    let parts = seeds
        .iter()
        .map(|s| SeededNoise::new(*s).sample::<B, 4>([1, shape[0], shape[1], shape[2]], device))
        .collect();
    Tensor::cat(parts, 0)
}

/// How a trajectory is sampled (docs/reference.md sections 2-3).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplerConfig {
    /// Number of steps T (10 for training, 40 for evaluation).
    pub steps: usize,
    /// The schedule (shift 3 for SD3).
    #[serde(default)]
    pub schedule: FlowSchedule,
    /// SDE noise level `a` (0.7 in the paper); 0 gives the ODE.
    #[serde(default)]
    pub noise_level: f64,
    #[serde(default)]
    pub kind: SdeKind,
    /// Only steps in this range are stochastic (Flow-GRPO-Fast's SDE window); all if `None`.
    #[serde(default)]
    pub sde_window: Option<Range<usize>>,
    #[serde(default)]
    pub log_prob: LogProbReduction,
}

impl SamplerConfig {
    /// Deterministic Euler ODE sampling with `steps` steps (evaluation: 40).
    pub fn ode(steps: usize) -> Self {
        Self {
            steps,
            schedule: FlowSchedule::sd3(),
            noise_level: 0.0,
            kind: SdeKind::Sde,
            sde_window: None,
            log_prob: LogProbReduction::Mean,
        }
    }

    /// Flow-GRPO / Flow-OPD training rollouts: `steps` SDE steps with noise level `a`.
    pub fn sde(steps: usize, noise_level: f64) -> Self {
        Self { noise_level, ..Self::ode(steps) }
    }

    /// Whether step `i` is stochastic.
    pub fn is_stochastic(&self, step: usize) -> bool {
        self.noise_level > 0.0 && self.sde_window.as_ref().is_none_or(|w| w.contains(&step))
    }
}

/// One recorded transition `x_i -> x_{i+1}`.
#[derive(Debug, Clone)]
pub struct Transition<B: Backend> {
    pub step: StepSigmas,
    /// Whether the step was stochastic (an SDE step with a log-prob) or an ODE step.
    pub stochastic: bool,
    /// The noise-free mean of `x_{i+1}` (the Euler result for ODE steps).
    pub mean: Tensor<B, 4>,
    /// `sigma_t` (`sde`) or `st` (`cps`); 0 for ODE steps.
    pub std_dev_t: f64,
    /// `log pi(x_{i+1} | x_i)` per sample; `None` for ODE steps.
    pub log_prob: Option<Tensor<B, 1>>,
}

/// A sampled trajectory: `states[0]` is the initial noise, `states[T]` the final latents;
/// `transitions[i]` goes from `states[i]` to `states[i + 1]`.
#[derive(Debug, Clone)]
pub struct Trajectory<B: Backend> {
    pub sigmas: Vec<f32>,
    pub states: Vec<Tensor<B, 4>>,
    pub transitions: Vec<Transition<B>>,
}

impl<B: Backend> Trajectory<B> {
    /// The final latents.
    pub fn final_state(&self) -> Tensor<B, 4> {
        self.states.last().expect("a trajectory has its initial state").clone()
    }

    /// Trajectories of the same schedule over consecutive parts of a batch, as one.
    pub fn cat(parts: Vec<Self>) -> Self {
        let first = parts.first().expect("at least one part");
        let (sigmas, steps) = (first.sigmas.clone(), first.states.len());
        let states = (0..steps).map(|i| Tensor::cat(parts.iter().map(|p| p.states[i].clone()).collect(), 0)).collect();
        let transitions = (0..first.transitions.len())
            .map(|i| {
                let t = &first.transitions[i];
                Transition {
                    step: t.step,
                    stochastic: t.stochastic,
                    mean: Tensor::cat(parts.iter().map(|p| p.transitions[i].mean.clone()).collect(), 0),
                    std_dev_t: t.std_dev_t,
                    log_prob: t.log_prob.as_ref().map(|_| {
                        Tensor::cat(parts.iter().map(|p| p.transitions[i].log_prob.clone().expect("same schedule")).collect(), 0)
                    }),
                }
            })
            .collect();
        Self { sigmas, states, transitions }
    }
}

/// Samples a trajectory from `x_init` (pure noise at `s = 1`) with `field`, recording every
/// state, mean, sigma and log-prob. `noise(i, shape)` supplies `eps` for stochastic step `i`
/// (use [`SeededNoise`] for reproducible rollouts).
pub fn sample_trajectory<B: Backend>(
    field: &impl VelocityField<B>,
    x_init: Tensor<B, 4>,
    config: &SamplerConfig,
    noise: &mut impl FnMut(usize, [usize; 4]) -> Tensor<B, 4>,
) -> Trajectory<B> {
    let sigmas = config.schedule.sigmas(config.steps);
    let mut states = vec![x_init];
    let mut transitions = Vec::with_capacity(config.steps);
    for i in 0..config.steps {
        let step = StepSigmas::at(&sigmas, i);
        let x = states.last().expect("non-empty").clone();
        let v = field.velocity(x.clone(), step.sigma);
        let transition = if config.is_stochastic(i) {
            let eps = noise(i, x.dims());
            let out = sde_step(x, v, step, config.noise_level, config.kind, eps, config.log_prob);
            states.push(out.sample);
            Transition { step, stochastic: true, mean: out.mean, std_dev_t: out.std_dev_t, log_prob: Some(out.log_prob) }
        } else {
            let next = euler_step(x, v, step);
            states.push(next.clone());
            Transition { step, stochastic: false, mean: next, std_dev_t: 0.0, log_prob: None }
        };
        transitions.push(transition);
    }
    Trajectory { sigmas, states, transitions }
}

/// Deterministic Euler ODE sampling: the final latents only.
pub fn sample_ode<B: Backend>(field: &impl VelocityField<B>, x_init: Tensor<B, 4>, steps: usize, schedule: FlowSchedule) -> Tensor<B, 4> {
    let sigmas = schedule.sigmas(steps);
    let mut x = x_init;
    for i in 0..steps {
        let step = StepSigmas::at(&sigmas, i);
        let v = field.velocity(x.clone(), step.sigma);
        x = euler_step(x, v, step);
    }
    x
}
