//! The fused composites written with Burn tensor ops: the default bodies of
//! [`super::Backend`]'s methods (what `wgpu` and `cuda` run) and the reference the `flex`
//! kernels are tested against. Forwards are the ops the model used before the kernels; the
//! backwards are the closed-form gradients.

use burn::tensor::ops::FloatTensor;
use burn::tensor::ops::{AttentionModuleOptions, ModuleOps};
use burn::tensor::{DType, Shape, Tensor, TensorMetadata};

use super::{prim, tensor};

/// Burn's own `linear` op (`nn::Linear`'s forward).
pub fn linear<B: super::Backend>(x: FloatTensor<B>, weight: FloatTensor<B>, bias: Option<FloatTensor<B>>) -> FloatTensor<B> {
    <B as ModuleOps<B>>::linear(x, weight, bias)
}

/// Burn's own backward ops of `linear`.
pub fn linear_backward<B: super::Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    grad: FloatTensor<B>,
    [dx, dweight, dbias]: [bool; 3],
) -> [Option<FloatTensor<B>>; 3] {
    [
        dx.then(|| <B as ModuleOps<B>>::linear_x_backward(weight, grad.clone())),
        dweight.then(|| <B as ModuleOps<B>>::linear_weight_backward(x, grad.clone())),
        dbias.then(|| <B as ModuleOps<B>>::linear_bias_backward(grad)),
    ]
}

/// A per-sample `[B, D]` vector applied to every token of a `[B, tokens, D]` tensor: a
/// contiguous copy on backends that ask for one ([`super::Backend::contiguous_broadcast`]:
/// flex iterates strides element by element for a `[B, 1, D]` broadcast, and the copy is far
/// cheaper than that), a `[B, 1, D]` broadcast elsewhere (GPU backends fuse it and store no
/// `[B, tokens, D]` copy).
fn per_token<B: super::Backend>(v: Tensor<B, 2>, tokens: usize) -> Tensor<B, 3> {
    if B::contiguous_broadcast() {
        v.unsqueeze_dim::<3>(1).repeat_dim(1, tokens)
    } else {
        v.unsqueeze_dim::<3>(1)
    }
}

/// `(x - mean) / sqrt(var + eps)` over the last axis (biased variance). The statistics of a
/// bf16 / f16 `x` are taken in f32 (the precision policy, docs/gpu.md), the result is `x`'s dtype.
fn normalized<B: burn::tensor::backend::Backend>(x: Tensor<B, 3>, eps: f64) -> Tensor<B, 3> {
    let dtype = x.dtype();
    if dtype == DType::F32 {
        let (var, mean) = x.clone().var_mean_bias(2);
        return (x - mean) / (var + eps).sqrt();
    }
    let x = x.cast(DType::F32);
    let (var, mean) = x.clone().var_mean_bias(2);
    ((x - mean) / (var + eps).sqrt()).cast(dtype)
}

pub fn layer_norm_modulate<B: super::Backend>(x: FloatTensor<B>, shift: FloatTensor<B>, scale: FloatTensor<B>, eps: f64) -> FloatTensor<B> {
    let x: Tensor<B, 3> = tensor(x);
    let tokens = x.dims()[1];
    let (shift, scale): (Tensor<B, 2>, Tensor<B, 2>) = (tensor(shift), tensor(scale));
    prim(normalized(x, eps) * per_token(scale + 1.0, tokens) + per_token(shift, tokens))
}

pub fn layer_norm_modulate_backward<B: super::Backend>(
    x: FloatTensor<B>,
    scale: FloatTensor<B>,
    grad: FloatTensor<B>,
    eps: f64,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let (x, scale, grad): (Tensor<B, 3>, Tensor<B, 2>, Tensor<B, 3>) = (tensor(x), tensor(scale), tensor(grad));
    let dtype = x.dtype();
    if dtype != DType::F32 {
        // Half-precision activations: the backward in f32, as the forward's statistics.
        let f32 = |t: FloatTensor<B>| B::float_cast(t, burn::tensor::FloatDType::F32);
        let back = |t: FloatTensor<B>| B::float_cast(t, dtype.into());
        let (dx, dshift, dscale) = layer_norm_modulate_backward::<B>(f32(prim(x)), f32(prim(scale)), f32(prim(grad)), eps);
        return (back(dx), back(dshift), back(dscale));
    }
    let tokens = x.dims()[1];
    let (var, mean) = x.clone().var_mean_bias(2);
    let rstd = (var + eps).sqrt().recip();
    let xhat = (x - mean) * rstd.clone();
    let dscale = (grad.clone() * xhat.clone()).sum_dim(1).squeeze_dim::<2>(1);
    let dshift = grad.clone().sum_dim(1).squeeze_dim::<2>(1);
    let gh = grad * per_token(scale + 1.0, tokens);
    let dx = (gh.clone() - gh.clone().mean_dim(2) - xhat.clone() * (gh * xhat).mean_dim(2)) * rstd;
    (prim(dx), prim(dshift), prim(dscale))
}

pub fn gated_residual<B: super::Backend>(x: FloatTensor<B>, gate: FloatTensor<B>, y: FloatTensor<B>) -> FloatTensor<B> {
    let (x, gate, y): (Tensor<B, 3>, Tensor<B, 2>, Tensor<B, 3>) = (tensor(x), tensor(gate), tensor(y));
    let tokens = x.dims()[1];
    prim(x + y * per_token(gate, tokens))
}

pub fn gated_residual_backward<B: super::Backend>(
    gate: FloatTensor<B>,
    y: FloatTensor<B>,
    grad: FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let (gate, y, grad): (Tensor<B, 2>, Tensor<B, 3>, Tensor<B, 3>) = (tensor(gate), tensor(y), tensor(grad));
    let tokens = y.dims()[1];
    let dgate = (grad.clone() * y).sum_dim(1).squeeze_dim::<2>(1);
    (prim(dgate), prim(grad * per_token(gate, tokens)))
}

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const GELU_CUBIC: f64 = 0.044715;

/// `tanh(sqrt(2/pi) (x + 0.044715 x^3))` as `1 - 2 / (exp(2u) + 1)` with `u` clamped to
/// +-15 (tanh = +-1 in f32 there; the clamp keeps `exp` finite, so no inf/inf in gradients).
fn gelu_inner_tanh<B: burn::tensor::backend::Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let inner = (x.clone() * (x.clone() * x * GELU_CUBIC + 1.0) * SQRT_2_OVER_PI).clamp(-15.0, 15.0);
    ((inner * 2.0).exp() + 1.0).recip() * -2.0 + 1.0
}

/// `x` as a rank-1 tensor, and its shape.
fn flat<B: super::Backend>(x: FloatTensor<B>) -> (Tensor<B, 1>, Shape) {
    let shape = x.shape();
    let n = shape.num_elements();
    (tensor(B::float_reshape(x, Shape::new([n]))), shape)
}

fn unflat<B: super::Backend>(x: Tensor<B, 1>, shape: Shape) -> FloatTensor<B> {
    B::float_reshape(prim(x), shape)
}

/// GELU-tanh written with the element-wise ops CPU backends run fastest (`powf` and `tanh` go
/// through scalar libm calls on some).
pub fn gelu_tanh<B: super::Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    let (x, shape) = flat::<B>(x);
    unflat(x.clone() * (gelu_inner_tanh(x) + 1.0) * 0.5, shape)
}

pub fn gelu_tanh_backward<B: super::Backend>(x: FloatTensor<B>, grad: FloatTensor<B>) -> FloatTensor<B> {
    let (x, shape) = flat::<B>(x);
    let (grad, _) = flat::<B>(grad);
    let t = gelu_inner_tanh(x.clone());
    let x2 = x.clone() * x.clone();
    let slope = (t.clone() + 1.0) * 0.5 + x * (t.clone() * t * -1.0 + 1.0) * (x2 * (3.0 * GELU_CUBIC) + 1.0) * (0.5 * SQRT_2_OVER_PI);
    unflat(grad * slope, shape)
}

/// `x` as `[rows, last]`, and its shape.
fn rows<B: super::Backend>(x: FloatTensor<B>) -> (Tensor<B, 2>, Shape) {
    let shape = x.shape();
    let last = shape[shape.num_dims() - 1];
    let n = shape.num_elements();
    (tensor(B::float_reshape(x, Shape::new([n / last, last]))), shape)
}

/// Burn's `RmsNorm::forward`, on `[rows, last]`.
pub fn rms_norm<B: super::Backend>(x: FloatTensor<B>, weight: FloatTensor<B>, eps: f64) -> FloatTensor<B> {
    let (x, shape) = rows::<B>(x);
    let weight: Tensor<B, 1> = tensor(weight);
    let dtype = x.dtype();
    let rms = (x.clone().cast(DType::F32).square().mean_dim(1) + eps).sqrt();
    B::float_reshape(prim((x / rms.cast(dtype)) * weight.unsqueeze()), shape)
}

pub fn rms_norm_backward<B: super::Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    grad: FloatTensor<B>,
    eps: f64,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let dtype = x.dtype();
    if dtype != DType::F32 {
        let f32 = |t: FloatTensor<B>| B::float_cast(t, burn::tensor::FloatDType::F32);
        let back = |t: FloatTensor<B>| B::float_cast(t, dtype.into());
        let (dx, dweight) = rms_norm_backward::<B>(f32(x), f32(weight), f32(grad), eps);
        return (back(dx), back(dweight));
    }
    let (x, shape) = rows::<B>(x);
    let (grad, _) = rows::<B>(grad);
    let weight: Tensor<B, 2> = tensor::<B, 1>(weight).unsqueeze();
    let r = (x.clone().square().mean_dim(1) + eps).sqrt().recip();
    let xhat = x * r.clone();
    let dweight = (grad.clone() * xhat.clone()).sum_dim(0).squeeze_dim::<1>(0);
    let gw = grad * weight;
    let dx = (gw.clone() - xhat.clone() * (gw * xhat).mean_dim(1)) * r;
    (B::float_reshape(prim(dx), shape), prim(dweight))
}

/// `[B, S, H * hd] -> [B, H, S, hd]`.
fn heads_first<B: super::Backend>(x: FloatTensor<B>, heads: usize) -> Tensor<B, 4> {
    let x: Tensor<B, 3> = tensor(x);
    let [batch, tokens, dim] = x.dims();
    x.reshape([batch, tokens, heads, dim / heads]).swap_dims(1, 2)
}

/// `[B, H, S, hd] -> [B, S, H * hd]`.
fn tokens_first<B: super::Backend>(x: Tensor<B, 4>) -> FloatTensor<B> {
    let [batch, heads, tokens, head_dim] = x.dims();
    prim(x.swap_dims(1, 2).reshape([batch, tokens, heads * head_dim]))
}

/// Through Burn's `attention` op (the backend's own fused kernel where it has one).
pub fn token_attention<B: super::Backend>(q: FloatTensor<B>, k: FloatTensor<B>, v: FloatTensor<B>, heads: usize) -> FloatTensor<B> {
    let out = burn::tensor::module::attention(
        heads_first::<B>(q, heads),
        heads_first::<B>(k, heads),
        heads_first::<B>(v, heads),
        None,
        None,
        AttentionModuleOptions::default(),
    );
    tokens_first(out)
}

pub fn token_attention_with_probs<B: super::Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    heads: usize,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let (q, k, v) = (heads_first::<B>(q, heads), heads_first::<B>(k, heads), heads_first::<B>(v, heads));
    let scale = (q.dims()[3] as f64).powf(-0.5);
    let probs = burn::tensor::activation::softmax(q.matmul(k.transpose()) * scale, 3);
    (tokens_first(probs.clone().matmul(v)), prim(probs))
}

pub fn token_attention_backward<B: super::Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    probs: FloatTensor<B>,
    grad: FloatTensor<B>,
    heads: usize,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let (q, k, v, grad) = (heads_first::<B>(q, heads), heads_first::<B>(k, heads), heads_first::<B>(v, heads), heads_first::<B>(grad, heads));
    let probs: Tensor<B, 4> = tensor(probs);
    let scale = (q.dims()[3] as f64).powf(-0.5);
    let dv = probs.clone().transpose().matmul(grad.clone());
    let dp = grad.matmul(v.transpose());
    let ds = (dp.clone() - (dp * probs.clone()).sum_dim(3)) * probs * scale;
    let dq = ds.clone().matmul(k);
    let dk = ds.transpose().matmul(q);
    (tokens_first(dq), tokens_first(dk), tokens_first(dv))
}
