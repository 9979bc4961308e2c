//! One denoising step `s -> s'` of the flow-matching sampler: the Euler ODE step and the
//! Flow-GRPO SDE steps with their Gaussian log-probabilities (docs/reference.md section 3).
//!
//! All step arithmetic takes the latents and velocities as given; call it with f32 tensors
//! (the MMDiT may run in half precision, its velocity is upcast before the step).

use burn::tensor::Tensor;
use crate::Backend;

/// Which stochastic step a sampler takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SdeKind {
    /// Flow-GRPO's `sde` step: the reverse SDE with the marginals of the ODE.
    #[default]
    Sde,
    /// The coefficient-preserving (`cps`) variant.
    Cps,
}

/// How the per-element Gaussian log-density of a transition is reduced over a sample's
/// latent elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogProbReduction {
    /// Mean over elements (Flow-GRPO's public code: keeps PPO ratios near 1).
    #[default]
    Mean,
    /// Sum over elements: the true log-density of the transition (paper Eq. 10-12).
    Sum,
}

/// Where a step sits on the schedule: `s = sigmas[i]`, `s' = sigmas[i+1]`, and `s~`, the
/// sigma used inside `sqrt(s / (1 - s~))` (`sigmas[1]` when `s == 1`, else `s`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepSigmas {
    pub sigma: f64,
    pub sigma_next: f64,
    pub sigma_tilde: f64,
}

impl StepSigmas {
    /// Step `index` of `sigmas` (as returned by [`crate::flow::FlowSchedule::sigmas`]).
    pub fn at(sigmas: &[f32], index: usize) -> Self {
        let sigma = sigmas[index] as f64;
        let sigma_tilde = if sigma == 1.0 { sigmas[1] as f64 } else { sigma };
        Self { sigma, sigma_next: sigmas[index + 1] as f64, sigma_tilde }
    }

    /// `d = s' - s` (negative).
    pub fn dt(&self) -> f64 {
        self.sigma_next - self.sigma
    }

    /// The SDE's diffusion level `sigma_t = a sqrt(s / (1 - s~))` for noise level `a`.
    pub fn sigma_t(&self, noise_level: f64) -> f64 {
        noise_level * (self.sigma / (1.0 - self.sigma_tilde)).sqrt()
    }
}

/// Result of one stochastic step: the next state, the noise-free mean, the transition's
/// standard deviation per element and the per-sample log-probability of the sample.
#[derive(Debug, Clone)]
pub struct SdeStep<B: Backend> {
    /// `x'` `[B, C, H, W]`.
    pub sample: Tensor<B, 4>,
    /// `mu` `[B, C, H, W]`.
    pub mean: Tensor<B, 4>,
    /// `sigma_t` of the `sde` step (the transition std is `sigma_t sqrt(-d)`), or `st` of `cps`.
    pub std_dev_t: f64,
    /// `log pi(x' | x)` per sample `[B]`, reduced as asked.
    pub log_prob: Tensor<B, 1>,
}

/// Euler ODE step `x' = x + d v`.
pub fn euler_step<B: Backend>(x: Tensor<B, 4>, v: Tensor<B, 4>, step: StepSigmas) -> Tensor<B, 4> {
    x + v * step.dt()
}

/// Mean of the next state given `x` and the velocity `v`:
/// - `sde`: `mu = x (1 + sigma_t^2 d / (2 s)) + v (1 + sigma_t^2 (1 - s) / (2 s)) d`;
/// - `cps`: `mu = (1 - s') (x - s v) + sqrt(s'^2 - st^2) (x + (1 - s) v)`, `st = s' sin(a pi / 2)`.
///
/// Returns the mean and `std_dev_t` (`sigma_t` resp. `st`). With `a = 0` both equal the
/// Euler step.
pub fn step_mean<B: Backend>(
    x: Tensor<B, 4>,
    v: Tensor<B, 4>,
    step: StepSigmas,
    noise_level: f64,
    kind: SdeKind,
) -> (Tensor<B, 4>, f64) {
    let (s, s_next, d) = (step.sigma, step.sigma_next, step.dt());
    match kind {
        SdeKind::Sde => {
            let sigma_t = step.sigma_t(noise_level);
            let x_coef = 1.0 + sigma_t * sigma_t * d / (2.0 * s);
            let v_coef = (1.0 + sigma_t * sigma_t * (1.0 - s) / (2.0 * s)) * d;
            (x * x_coef + v * v_coef, sigma_t)
        }
        SdeKind::Cps => {
            let st = s_next * (noise_level * std::f64::consts::FRAC_PI_2).sin();
            let x0 = x.clone() - v.clone() * s;
            let x1 = x + v * (1.0 - s);
            let keep = (s_next * s_next - st * st).max(0.0).sqrt();
            (x0 * (1.0 - s_next) + x1 * keep, st)
        }
    }
}

/// The per-element standard deviation of the transition: `sigma_t sqrt(-d)` (`sde`) or `st`
/// (`cps`).
pub fn transition_std(std_dev_t: f64, step: StepSigmas, kind: SdeKind) -> f64 {
    match kind {
        SdeKind::Sde => std_dev_t * (-step.dt()).sqrt(),
        SdeKind::Cps => std_dev_t,
    }
}

/// Log-probability of `sample` under the step's Gaussian `N(mean, std^2 I)`, per sample:
/// - `sde`: `-(x' - mu)^2 / (2 std^2) - log(std) - log(sqrt(2 pi))` per element;
/// - `cps`: `-(x' - mu)^2` per element (unnormalised, as Flow-GRPO's CPS);
///
/// reduced over `C, H, W` by `reduction`. Evaluating it on a stored sample with a new mean is
/// how GRPO re-scores old transitions under the current policy.
pub fn log_prob<B: Backend>(
    sample: Tensor<B, 4>,
    mean: Tensor<B, 4>,
    std_dev_t: f64,
    step: StepSigmas,
    kind: SdeKind,
    reduction: LogProbReduction,
) -> Tensor<B, 1> {
    let diff2 = (sample - mean).powi_scalar(2);
    let per_element = match kind {
        SdeKind::Sde => {
            let std = transition_std(std_dev_t, step, kind);
            let constant = -std.ln() - (2.0 * std::f64::consts::PI).sqrt().ln();
            diff2 * (-1.0 / (2.0 * std * std)) + constant
        }
        SdeKind::Cps => -diff2,
    };
    super::reduce_per_sample(per_element, reduction == LogProbReduction::Mean)
}

/// One stochastic step: `mu` from [`step_mean`], `x' = mu + std * eps` with the caller's
/// `noise` (`eps ~ N(0, I)`, same shape as `x`), and `log pi(x' | x)`.
pub fn sde_step<B: Backend>(
    x: Tensor<B, 4>,
    v: Tensor<B, 4>,
    step: StepSigmas,
    noise_level: f64,
    kind: SdeKind,
    noise: Tensor<B, 4>,
    reduction: LogProbReduction,
) -> SdeStep<B> {
    let (mean, std_dev_t) = step_mean(x, v, step, noise_level, kind);
    let std = transition_std(std_dev_t, step, kind);
    let sample = mean.clone() + noise * std;
    let log_prob = log_prob(sample.clone(), mean.clone(), std_dev_t, step, kind, reduction);
    SdeStep { sample, mean, std_dev_t, log_prob }
}
