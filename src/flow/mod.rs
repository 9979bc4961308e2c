//! Flow matching on top of the MMDiT: the shifted schedule ([`schedule`]), ODE and SDE steps
//! with log-probabilities ([`sde`]), trajectory sampling with CFG ([`sampler`]) and the
//! Flow-OPD objective ([`kl`]).
//!
//! Conventions (REFERENCE section 1): `x_s = (1 - s) x0 + s eps`, velocity `v = eps - x0`,
//! sampling walks `s` from 1 to 0, a step has `d = s' - s < 0`, the transformer gets `1000 s`.

pub mod kl;
pub mod sampler;
pub mod schedule;
pub mod sde;

pub use kl::{KlReduction, OpdLoss, distillation_loss, gaussian_kl, kl_weight, opd_loss, squared_distance};
pub use sampler::{
    GuidedModel, SamplerConfig, SeededNoise, TextConditioning, Trajectory, Transition, VelocityField, sample_ode,
    sample_trajectory,
};
pub use schedule::FlowSchedule;
pub use sde::{LogProbReduction, SdeKind, SdeStep, StepSigmas, euler_step, log_prob, sde_step, step_mean, transition_std};
