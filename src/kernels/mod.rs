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

#[cfg(feature = "wgpu")]
impl Backend for burn::backend::Wgpu {}

#[cfg(feature = "cuda")]
impl Backend for burn::backend::Cuda {}

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
