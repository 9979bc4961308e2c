//! Trainers and their shared parts: flow-matching pre-training ([`pretrain`]), the EMA of
//! weights ([`ema`]) and run logging ([`metrics`]).

pub mod ema;
pub mod grpo;
pub mod grpo_math;
pub mod metrics;
pub mod pretrain;
pub mod rollout;
