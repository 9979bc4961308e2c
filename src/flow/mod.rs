//! Flow matching on top of the MMDiT: the shifted schedule ([`schedule`]), ODE and SDE steps
//! with log-probabilities ([`sde`]), trajectory sampling with CFG ([`sampler`]) and the
//! Flow-OPD objective ([`kl`]).
//!
//! Conventions (docs/reference.md section 1): `x_s = (1 - s) x0 + s eps`, velocity `v = eps - x0`,
//! sampling walks `s` from 1 to 0, a step has `d = s' - s < 0`, the transformer gets `1000 s`.

pub mod checks;
pub mod kl;
pub mod nft;
pub mod sampler;
pub mod schedule;
pub mod sde;
pub mod solver;

pub use kl::{KlReduction, OpdLoss, ReferenceKl, distillation_loss, gaussian_kl, kl_weight, opd_loss, reference_kl, squared_distance};
pub use sampler::{
    GuidedModel, SamplerConfig, SeededNoise, TextConditioning, Trajectory, Transition, VelocityField, initial_noise, sample_ode,
    sample_trajectory,
};
pub use schedule::FlowSchedule;
pub use solver::{Solver, sample_deterministic};

use burn::tensor::Tensor;
use crate::Backend;

/// Reduces `[B, C, H, W]` per sample to `[B]`: the sum (`mean = false`) or the mean over
/// the `C H W` latent elements (Flow-GRPO's log-prob and KL reduce by the mean).
pub(crate) fn reduce_per_sample<B: Backend>(x: Tensor<B, 4>, mean: bool) -> Tensor<B, 1> {
    let [batch, c, h, w] = x.dims();
    let flat = x.reshape([batch, c * h * w]);
    if mean { flat.mean_dim(1).reshape([batch]) } else { flat.sum_dim(1).reshape([batch]) }
}
pub use sde::{LogProbReduction, SdeKind, SdeStep, StepSigmas, euler_step, log_prob, sde_step, step_mean, transition_std};
