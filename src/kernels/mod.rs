//! Fused kernels for the transformer's hot composites, as a Burn backend extension.
//!
//! [`Backend`] extends Burn's backend trait with one forward and one backward method per
//! composite. Every method has a default body that composes Burn tensor ops (so `wgpu` and
//! `cuda` run exactly the ops the model ran before the kernels existed); the `flex` CPU backend
//! overrides them with hand-written, vectorised, multi-threaded kernels ([`flex`]). The autodiff
//! backend ([`autodiff`]) records each composite as one graph node whose backward calls the
//! inner backend's backward method, so a training step stores a composite's inputs instead of
//! every intermediate of the composed ops.
//!
//! The composites (shapes: `x [B, T, D]`, per-sample vectors `[B, D]`):
//! - [`layer_norm_modulate`]: `LayerNorm(x) * (1 + scale) + shift` (adaLN, eps 1e-6, no affine);
//! - [`gated_residual`]: `x + gate * y`;
//! - [`gelu_tanh`]: GELU with the tanh approximation;
//! - [`rms_norm`]: RMSNorm over the last axis with a learned scale (the per-head qk-norm);
//! - [`attention`]: multi-head `softmax(q k^T / sqrt(hd)) v` on token-major `[B, S, H * hd]`
//!   tensors (no head transposes; the probabilities are kept for the backward).
//!
//! The crate's code is generic over [`Backend`] and [`AutodiffBackend`] (re-exported at the
//! crate root) instead of Burn's traits of the same names.

pub mod autodiff;
pub mod composed;
#[cfg(feature = "flex")]
pub mod flex;
#[cfg(feature = "flex")]
mod flex_rows;

use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};

/// A Burn backend with flow-opd's fused kernels (see the module docs).
pub trait Backend: burn::tensor::backend::Backend {
    /// Whether the composed ops apply a per-sample `[B, D]` vector to `[B, T, D]` tokens as a
    /// contiguous copy (CPU backends iterate a broadcast's strides element by element) rather
    /// than a `[B, 1, D]` broadcast (GPU backends, which fuse it and store no copy).
    fn contiguous_broadcast() -> bool {
        false
    }

    /// Whether a frozen SD3 transformer runs in bf16 by default on this backend (`weights =
    /// "auto"`): CUDA, whose tensor cores run bf16 at many times the f32 rate. Not the CPU
    /// backends nor wgpu (no bf16 in WGSL).
    fn half_precision_transformer() -> bool {
        false
    }

    /// Device memory as the backend's allocator counts it (`None` on the CPU backends).
    fn device_memory(_device: &Self::Device) -> Option<DeviceMemory> {
        None
    }

    /// Whether attention under autodiff keeps its `[B, H, S, S]` probabilities for the backward
    /// (the CPU: cheap there, and recomputing costs a third more) or keeps `q, k, v` only and
    /// recomputes them per call in the backward (GPU backends: the forward is Burn's fused
    /// attention, and the probabilities were about half of a training step's memory).
    fn attention_keeps_probs() -> bool {
        false
    }

    /// `x @ weight [+ bias]` for `x [.., in]`, `weight [in, out]`, `bias [out]` (Burn's
    /// `linear`, which `nn::Linear` runs).
    fn fused_linear(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: Option<FloatTensor<Self>>) -> FloatTensor<Self> {
        composed::linear::<Self>(x, weight, bias)
    }

    /// Gradients `(dx, dweight, dbias)` of [`Backend::fused_linear`], each computed only if
    /// asked for in `wanted` (same order).
    fn fused_linear_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        wanted: [bool; 3],
    ) -> [Option<FloatTensor<Self>>; 3] {
        composed::linear_backward::<Self>(x, weight, grad, wanted)
    }

    /// `LayerNorm(x) * (1 + scale) + shift` for `x [B, T, D]`, `shift, scale [B, D]`.
    fn layer_norm_modulate(x: FloatTensor<Self>, shift: FloatTensor<Self>, scale: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        composed::layer_norm_modulate::<Self>(x, shift, scale, eps)
    }

    /// Gradients `(dx, dshift, dscale)` of [`Backend::layer_norm_modulate`] for output gradient `grad`.
    fn layer_norm_modulate_backward(
        x: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        composed::layer_norm_modulate_backward::<Self>(x, scale, grad, eps)
    }

    /// `x + gate * y` for `x, y [B, T, D]`, `gate [B, D]`.
    fn gated_residual(x: FloatTensor<Self>, gate: FloatTensor<Self>, y: FloatTensor<Self>) -> FloatTensor<Self> {
        composed::gated_residual::<Self>(x, gate, y)
    }

    /// Gradients `(dgate, dy)` of [`Backend::gated_residual`] (`dx` is `grad` itself).
    fn gated_residual_backward(
        gate: FloatTensor<Self>,
        y: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        composed::gated_residual_backward::<Self>(gate, y, grad)
    }

    /// GELU, tanh approximation, element-wise.
    fn gelu_tanh(x: FloatTensor<Self>) -> FloatTensor<Self> {
        composed::gelu_tanh::<Self>(x)
    }

    /// `grad * gelu_tanh'(x)`.
    fn gelu_tanh_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        composed::gelu_tanh_backward::<Self>(x, grad)
    }

    /// `x / sqrt(mean(x^2) + eps) * weight` over the last axis; `weight [last]`.
    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        composed::rms_norm::<Self>(x, weight, eps)
    }

    /// Gradients `(dx, dweight)` of [`Backend::rms_norm`].
    fn rms_norm_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        composed::rms_norm_backward::<Self>(x, weight, grad, eps)
    }

    /// Multi-head attention `softmax(q k^T / sqrt(hd)) v` on token-major
    /// `q, k, v [B, S, H * hd]`; the output is `[B, S, H * hd]`.
    fn token_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, heads: usize) -> FloatTensor<Self> {
        composed::token_attention::<Self>(q, k, v, heads)
    }

    /// [`Backend::token_attention`] that also returns the attention probabilities `[B, H, S, S]`,
    /// which [`Backend::token_attention_backward`] takes.
    fn token_attention_with_probs(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        heads: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        composed::token_attention_with_probs::<Self>(q, k, v, heads)
    }

    /// [`Backend::token_attention`] whose autodiff node keeps `q, k, v` only and recomputes the
    /// probabilities in its backward, whatever [`Backend::attention_keeps_probs`] says (on a
    /// backend without autodiff, the forward itself).
    fn token_attention_recompute(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, heads: usize) -> FloatTensor<Self> {
        Self::token_attention(q, k, v, heads)
    }

    /// The identity; under autodiff with checkpointing, a node whose output is stored, so the
    /// recomputation of a checkpointed segment ([`recompute_scope`]) stops there.
    fn checkpoint_boundary(x: FloatTensor<Self>) -> FloatTensor<Self> {
        x
    }

    /// Gradients `(dq, dk, dv)` of [`Backend::token_attention`] from its probabilities.
    fn token_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        probs: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        heads: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        composed::token_attention_backward::<Self>(q, k, v, probs, grad, heads)
    }
}

/// An autodiff backend whose inner backend also has the fused kernels.
pub trait AutodiffBackend: burn::tensor::backend::AutodiffBackend<InnerBackend: Backend> + Backend {}

impl<B> AutodiffBackend for B where B: burn::tensor::backend::AutodiffBackend<InnerBackend: Backend> + Backend {}

/// Device memory of a GPU backend, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct DeviceMemory {
    /// Held by live tensors.
    pub in_use: u64,
    /// Reserved by the allocator's pools (what the device sees taken; after
    /// [`burn::tensor::backend::Backend::memory_cleanup`], the high-water mark of what ran since).
    pub reserved: u64,
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn cubecl_memory<R: burn::cubecl::Runtime>(device: &R::Device) -> Option<DeviceMemory> {
    let usage = R::client(device).memory_usage().ok()?;
    Some(DeviceMemory { in_use: usage.bytes_in_use, reserved: usage.bytes_reserved })
}

#[cfg(feature = "wgpu")]
impl Backend for burn::backend::Wgpu {
    fn device_memory(device: &Self::Device) -> Option<DeviceMemory> {
        cubecl_memory::<burn::backend::wgpu::WgpuRuntime>(device)
    }
}

#[cfg(feature = "cuda")]
impl Backend for burn::backend::Cuda {
    fn half_precision_transformer() -> bool {
        true
    }

    fn device_memory(device: &Self::Device) -> Option<DeviceMemory> {
        cubecl_memory::<burn::cubecl::cuda::CudaRuntime>(device)
    }
}

fn prim<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

fn tensor<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// `x @ weight [+ bias]`: what `nn::Linear::forward` computes, as one fused kernel.
pub fn linear<B: Backend, const D: usize>(x: Tensor<B, D>, weight: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Tensor<B, D> {
    tensor(B::fused_linear(prim(x), prim(weight), bias.map(prim)))
}

/// A Burn `nn::Linear` layer applied through [`linear`].
pub fn linear_layer<B: Backend, const D: usize>(layer: &burn::nn::Linear<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    linear(x, layer.weight.val(), layer.bias.as_ref().map(|b| b.val()))
}

/// `LayerNorm(x) * (1 + scale) + shift` (LayerNorm without affine, biased variance), with
/// `[B, D]` modulation applied to every token of `x [B, T, D]`.
pub fn layer_norm_modulate<B: Backend>(x: Tensor<B, 3>, shift: Tensor<B, 2>, scale: Tensor<B, 2>, eps: f64) -> Tensor<B, 3> {
    tensor(B::layer_norm_modulate(prim(x), prim(shift), prim(scale), eps))
}

/// `x + gate * y` with a `[B, D]` gate applied to every token.
pub fn gated_residual<B: Backend>(x: Tensor<B, 3>, gate: Tensor<B, 2>, y: Tensor<B, 3>) -> Tensor<B, 3> {
    tensor(B::gated_residual(prim(x), prim(gate), prim(y)))
}

/// GELU with the tanh approximation, `x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
pub fn gelu_tanh<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    tensor(B::gelu_tanh(prim(x)))
}

/// RMSNorm over the last axis with a learned `[last]` scale (PyTorch / Burn `RmsNorm`).
pub fn rms_norm<B: Backend, const D: usize>(x: Tensor<B, D>, weight: Tensor<B, 1>, eps: f64) -> Tensor<B, D> {
    tensor(B::rms_norm(prim(x), prim(weight), eps))
}

/// Multi-head `softmax(q k^T / sqrt(hd)) v` on token-major `[B, S, heads * hd]` tensors.
pub fn attention<B: Backend>(q: Tensor<B, 3>, k: Tensor<B, 3>, v: Tensor<B, 3>, heads: usize) -> Tensor<B, 3> {
    tensor(B::token_attention(prim(q), prim(k), prim(v), heads))
}

/// [`attention`] through the node that recomputes its probabilities in the backward
/// ([`Backend::token_attention_recompute`]).
pub fn attention_recompute<B: Backend>(q: Tensor<B, 3>, k: Tensor<B, 3>, v: Tensor<B, 3>, heads: usize) -> Tensor<B, 3> {
    tensor(B::token_attention_recompute(prim(q), prim(k), prim(v), heads))
}

/// The identity; the stored end of a recomputed segment ([`Backend::checkpoint_boundary`]).
pub fn checkpoint_boundary<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    tensor(B::checkpoint_boundary(prim(x)))
}

thread_local! {
    static RECOMPUTING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static CHECKPOINT_BLOCKS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with the fused composites it records *memory bound* when `on`: under
/// `Autodiff<_, BalancedCheckpointing>` they store no output and are recomputed in the backward
/// from the nearest stored tensors ([`checkpoint_boundary`], compute-bound ops, untracked
/// inputs). Without checkpointing, or with `on = false`, nothing changes.
pub fn recompute_scope<T>(on: bool, f: impl FnOnce() -> T) -> T {
    let _restore = Restore::set(&RECOMPUTING, on || recomputing());
    f()
}

/// Sets a thread-local flag and puts the previous value back when dropped (also on unwind).
struct Restore {
    flag: &'static std::thread::LocalKey<std::cell::Cell<bool>>,
    before: bool,
}

impl Restore {
    fn set(flag: &'static std::thread::LocalKey<std::cell::Cell<bool>>, value: bool) -> Self {
        Self { flag, before: flag.with(|f| f.replace(value)) }
    }
}

impl Drop for Restore {
    fn drop(&mut self) {
        self.flag.with(|f| f.set(self.before));
    }
}

/// Whether the current thread is inside a [`recompute_scope`] that is on.
pub fn recomputing() -> bool {
    RECOMPUTING.with(|r| r.get())
}

/// Runs `f` with per-block activation checkpointing on (the recipe's `checkpointing =
/// "blocks"`) or off: each transformer block of a tracked forward records its ops memory bound
/// and stores only its output, so the backward recomputes one block at a time.
pub fn with_block_checkpointing<T>(on: bool, f: impl FnOnce() -> T) -> T {
    let _restore = Restore::set(&CHECKPOINT_BLOCKS, on);
    f()
}

/// Whether the current thread checkpoints transformer blocks ([`with_block_checkpointing`]).
pub fn block_checkpointing() -> bool {
    CHECKPOINT_BLOCKS.with(|c| c.get())
}
