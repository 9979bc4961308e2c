//! Deterministic ODE solvers for rollouts that need no log-probabilities (DiffusionNFT samples
//! with them): Euler, and the second-order multistep DPM-Solver++ in data prediction (`dpm2`),
//! written for the flow-matching path `x_s = (1 - s) x0 + s eps`, whose `alpha_s = 1 - s` and
//! `sigma_s = s`.
//!
//! `dpm2` with the schedule's sigmas `s_0 > s_1 > .. > s_T = 0`:
//! - the data prediction of step `i` is `x0_i = x_i - s_i v_i`;
//! - the first step and the last (into `s_T = 0`) are DDIM steps without noise, which for this
//!   path equal the Euler step `x + (s' - s) v`;
//! - every other step is the two-step update with `lambda(s) = ln((1 - s) / s)`,
//!   `h = lambda(s_{i+1}) - lambda(s_i)`, `r = (lambda(s_i) - lambda(s_{i-1})) / h`,
//!   `D0 = x0_i`, `D1 = (x0_i - x0_{i-1}) / r` and
//!   `x_{i+1} = (s_{i+1} / s_i) x_i - (1 - s_{i+1}) (e^{-h} - 1) (D0 + D1 / 2)`.

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use super::sampler::VelocityField;
use super::schedule::FlowSchedule;
use crate::Backend;

/// Which deterministic solver samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Solver {
    /// First-order Euler steps (the evaluation's ODE sampler).
    Euler,
    /// Second-order multistep DPM-Solver++ (DiffusionNFT's `dpm2`).
    #[default]
    Dpm2,
}

/// Samples from `x_init` (noise at `s = 1`) to the final latents with `steps` steps of `solver`
/// on `schedule`'s sigmas.
pub fn sample_deterministic<B: Backend>(
    field: &impl VelocityField<B>,
    x_init: Tensor<B, 4>,
    steps: usize,
    schedule: FlowSchedule,
    solver: Solver,
) -> Tensor<B, 4> {
    let sigmas: Vec<f64> = schedule.sigmas(steps).into_iter().map(f64::from).collect();
    let mut x = x_init;
    let mut previous_x0: Option<Tensor<B, 4>> = None;
    for i in 0..steps {
        let (s, next) = (sigmas[i], sigmas[i + 1]);
        let v = field.velocity(x.clone(), s);
        let first_or_last = i == 0 || i + 1 == steps;
        match (solver, previous_x0.take()) {
            (Solver::Dpm2, Some(x0_prev)) if !first_or_last => {
                let x0 = x.clone() - v * s;
                // lambda(1) = -inf (alpha = 0): after the first step r is infinite and D1 = 0.
                let lambda = |s: f64| if s >= 1.0 { f64::NEG_INFINITY } else { ((1.0 - s) / s).ln() };
                let h = lambda(next) - lambda(s);
                let r = (lambda(s) - lambda(sigmas[i - 1])) / h;
                let c = (1.0 - next) * ((-h).exp() - 1.0);
                let half_d1 = if r.is_finite() { (x0.clone() - x0_prev) * (0.5 / r) } else { x0.zeros_like() };
                x = x * (next / s) - (x0.clone() + half_d1) * c;
                previous_x0 = Some(x0);
            }
            _ => {
                if solver == Solver::Dpm2 {
                    previous_x0 = Some(x.clone() - v.clone() * s);
                }
                x = x + v * (next - s);
            }
        }
    }
    x
}
