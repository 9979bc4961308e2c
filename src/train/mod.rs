//! Trainers and their shared parts: flow-matching pre-training of a world pipeline
//! ([`pretrain`]); the adapter trainers Flow-GRPO ([`grpo`]), Flow-OPD ([`opd`]) and the SFT cold
//! start ([`sft`]), which keep only their objective and share their state ([`adapter`]); SDE
//! rollouts ([`rollout`]), rewards to training values ([`scoring`]), training prompts
//! ([`prompts`]), the EMA of weights ([`ema`]), data-parallel peers ([`parallel`]), the GRPO
//! group statistics ([`grpo_math`]) and the gradient signal-to-noise diagnostic ([`grpo_snr`]).

pub mod adapter;
pub mod ema;
pub mod grpo;
pub mod grpo_math;
pub mod grpo_snr;
pub mod nft;
pub mod opd;
pub mod distributed;
pub mod parallel;
pub mod pretrain;
pub mod prompts;
pub mod resume;
pub mod rollout;
pub mod scoring;
pub mod sft;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};
use crate::AutodiffBackend;

/// What a training step's backward recomputes instead of keeping from the forward (a trainer's
/// `checkpointing` field; docs/gpu.md has the measurements).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum Checkpointing {
    /// Nothing: every op keeps what its backward needs (Burn's `NoCheckpointing`).
    #[default]
    None,
    /// Burn's `BalancedCheckpointing`: its memory-bound ops (element-wise, reshapes) are
    /// recomputed in the backward; the fused composites and linear layers keep their inputs.
    Balanced,
    /// `Balanced`, and each transformer block of the trained forward keeps only its outputs:
    /// the backward recomputes one block at a time (`kernels::with_block_checkpointing`).
    Blocks,
}

impl Checkpointing {
    /// Whether transformer blocks are checkpointed.
    pub fn blocks(self) -> bool {
        self == Self::Blocks
    }

    /// Runs `f` with this setting's block checkpointing on the current thread.
    pub fn scope<T>(self, f: impl FnOnce() -> T) -> T {
        crate::kernels::with_block_checkpointing(self.blocks(), f)
    }
}

impl std::str::FromStr for Checkpointing {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "balanced" => Ok(Self::Balanced),
            "blocks" => Ok(Self::Blocks),
            other => Err(format!("unknown checkpointing `{other}` (expected none, balanced or blocks)")),
        }
    }
}

impl TryFrom<String> for Checkpointing {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl std::fmt::Display for Checkpointing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Balanced => "balanced",
            Self::Blocks => "blocks",
        })
    }
}

/// Marks every float parameter of `module` as trainable (requiring gradients). Modules moved
/// onto the autodiff backend with `from_inner` keep the flag they had on the inner backend,
/// where it is always off — so an adapter loaded from a file must pass through this before
/// it is trained.
pub fn trainable<B: AutodiffBackend, M: Module<B>>(module: M) -> M {
    struct Mark;
    impl<B: AutodiffBackend> ModuleMapper<B> for Mark {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            param.map(|t| t.set_require_grad(true))
        }
    }
    module.map(&mut Mark)
}

/// `module` with every trainable parameter made a new autodiff leaf (same ids and values).
/// A trainer that accumulates several backward passes on one adapter takes fresh leaves for
/// each: in Burn 0.21 a leaf that went through a `backward()` starts a one-node graph at its
/// next op, which a concurrent `backward()` on another thread (a data-parallel peer) can free
/// before that op is recorded, silently dropping its gradient (tracel-ai/burn#5573). A new
/// leaf's graph holds it, so it is never freed while in use.
pub fn fresh_leaves<B: AutodiffBackend, M: Module<B>>(module: &M) -> M {
    struct Fresh;
    impl<B: AutodiffBackend> ModuleMapper<B> for Fresh {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            param.map(|t| if t.is_require_grad() { Tensor::from_inner(t.inner()).require_grad() } else { t })
        }
    }
    module.clone().map(&mut Fresh)
}

/// Whether every float parameter of `module` is finite: the sum of magnitudes of each is (an
/// inf or NaN anywhere makes it non-finite). Checked after updates, so that no non-finite
/// weight is ever saved.
pub fn weights_finite<B: crate::Backend, M: Module<B>>(module: &M) -> bool {
    struct Finite(bool);
    impl<B: crate::Backend> ModuleVisitor<B> for Finite {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if self.0 {
                let sum: f64 = burn::tensor::ElementConversion::elem(param.val().abs().sum().into_scalar());
                self.0 = sum.is_finite();
            }
        }
    }
    let mut finite = Finite(true);
    module.visit(&mut finite);
    finite.0
}
