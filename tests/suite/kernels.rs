//! The fused kernels (`flow_opd::kernels`) against the same composites written with Burn tensor
//! ops: forward values, and every input's gradient under autodiff (the fused op's own backward
//! node against autodiff through the composed ops), on odd shapes (widths that are not a
//! multiple of the SIMD width, one-token and one-sample batches). Also the composed backward
//! formulas (the trait's defaults, which wgpu and cuda run) against autodiff of the composed
//! forward. On flex, and with `--features wgpu` also on wgpu.

use burn::backend::Autodiff;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Distribution, Tensor, TensorPrimitive};
use flow_opd::kernels::{self, composed};
use flow_opd::AutodiffBackend;

fn rel_l2<B: burn::tensor::backend::Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f64 {
    let a = a.into_data().convert::<f64>().into_vec::<f64>().unwrap();
    let b = b.into_data().convert::<f64>().into_vec::<f64>().unwrap();
    assert_eq!(a.len(), b.len());
    let diff: f64 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum();
    let norm: f64 = b.iter().map(|y| y * y).sum();
    (diff / norm.max(1e-30)).sqrt()
}

fn assert_close<B: burn::tensor::backend::Backend, const D: usize>(what: &str, got: Tensor<B, D>, want: Tensor<B, D>, tol: f64) {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes");
    let err = rel_l2(got, want);
    assert!(err <= tol, "{what}: relative L2 error {err:.3e} > {tol:.0e}");
}

fn random<B: burn::tensor::backend::Backend, const D: usize>(shape: [usize; D], device: &B::Device) -> Tensor<B, D> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
}

fn prim<B: burn::tensor::backend::Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

fn tensor<B: burn::tensor::backend::Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

const FORWARD_TOL: f64 = 1e-5;
const GRAD_TOL: f64 = 1e-4;

/// `sum(out * weights)`'s gradients of `inputs`, for the fused op and the composed one.
fn gradients<B: AutodiffBackend, const D: usize, const N: usize>(
    inputs: [Tensor<B::InnerBackend, D>; N],
    weights: Tensor<B::InnerBackend, D>,
    op: impl Fn([Tensor<B, D>; N]) -> Tensor<B, D>,
) -> [Tensor<B::InnerBackend, D>; N] {
    let tracked = inputs.map(|t| Tensor::<B, D>::from_inner(t).require_grad());
    let out = op(tracked.clone());
    let grads = (out * Tensor::from_inner(weights)).sum().backward();
    tracked.map(|t| t.grad(&grads).expect("tracked input has a gradient"))
}

fn layer_norm_modulate_case<B: AutodiffBackend>(batch: usize, tokens: usize, dim: usize, device: &<B as burn::tensor::backend::BackendTypes>::Device) {
    type Inner<B> = <B as burn::tensor::backend::AutodiffBackend>::InnerBackend;
    let x = random::<Inner<B>, 3>([batch, tokens, dim], device) * 3.0 + 0.5;
    let shift = random::<Inner<B>, 2>([batch, dim], device);
    let scale = random::<Inner<B>, 2>([batch, dim], device);
    let eps = 1e-6;
    let fused = kernels::layer_norm_modulate(x.clone(), shift.clone(), scale.clone(), eps);
    let reference = tensor(composed::layer_norm_modulate::<Inner<B>>(prim(x.clone()), prim(shift.clone()), prim(scale.clone()), eps));
    assert_close("layer_norm_modulate forward", fused, reference, FORWARD_TOL);

    // Gradients of x, shift and scale (shift/scale as [B, 1, D] views inside the op's closure).
    let weights = random::<Inner<B>, 3>([batch, tokens, dim], device);
    let xs = [x.clone(), shift.clone().unsqueeze_dim(1), scale.clone().unsqueeze_dim(1)];
    let squeeze = |t: Tensor<B, 3>| t.squeeze_dim::<2>(1);
    let fused = gradients::<B, 3, 3>(xs.clone(), weights.clone(), |[x, s, c]| kernels::layer_norm_modulate(x, squeeze(s), squeeze(c), eps));
    let reference = gradients::<B, 3, 3>(xs, weights.clone(), |[x, s, c]| {
        tensor(composed::layer_norm_modulate::<B>(prim(x), prim(squeeze(s)), prim(squeeze(c)), eps))
    });
    for (name, (f, r)) in ["dx", "dshift", "dscale"].iter().zip(fused.into_iter().zip(reference.clone())) {
        assert_close(&format!("layer_norm_modulate {name}"), f, r, GRAD_TOL);
    }
    // The composed backward formula (the trait default) against autodiff of the composed forward.
    let (dx, dshift, dscale) = composed::layer_norm_modulate_backward::<Inner<B>>(prim(x), prim(scale), prim(weights), eps);
    let [rx, rs, rc] = reference;
    assert_close("composed layer_norm_modulate_backward dx", tensor::<Inner<B>, 3>(dx), rx, GRAD_TOL);
    assert_close("composed layer_norm_modulate_backward dshift", tensor::<Inner<B>, 2>(dshift), rs.squeeze_dim(1), GRAD_TOL);
    assert_close("composed layer_norm_modulate_backward dscale", tensor::<Inner<B>, 2>(dscale), rc.squeeze_dim(1), GRAD_TOL);
}

fn gated_residual_case<B: AutodiffBackend>(batch: usize, tokens: usize, dim: usize, device: &<B as burn::tensor::backend::BackendTypes>::Device) {
    type Inner<B> = <B as burn::tensor::backend::AutodiffBackend>::InnerBackend;
    let x = random::<Inner<B>, 3>([batch, tokens, dim], device);
    let gate = random::<Inner<B>, 2>([batch, dim], device);
    let y = random::<Inner<B>, 3>([batch, tokens, dim], device);
    let fused = kernels::gated_residual(x.clone(), gate.clone(), y.clone());
    let reference = tensor(composed::gated_residual::<Inner<B>>(prim(x.clone()), prim(gate.clone()), prim(y.clone())));
    assert_close("gated_residual forward", fused, reference, FORWARD_TOL);

    let weights = random::<Inner<B>, 3>([batch, tokens, dim], device);
    let xs = [x, gate.clone().unsqueeze_dim(1), y.clone()];
    let fused = gradients::<B, 3, 3>(xs.clone(), weights.clone(), |[x, g, y]| kernels::gated_residual(x, g.squeeze_dim(1), y));
    let reference = gradients::<B, 3, 3>(xs, weights.clone(), |[x, g, y]| tensor(composed::gated_residual::<B>(prim(x), prim(g.squeeze_dim::<2>(1)), prim(y))));
    for (name, (f, r)) in ["dx", "dgate", "dy"].iter().zip(fused.into_iter().zip(reference.clone())) {
        assert_close(&format!("gated_residual {name}"), f, r, GRAD_TOL);
    }
    let (dgate, dy) = composed::gated_residual_backward::<Inner<B>>(prim(gate), prim(y), prim(weights));
    let [_, rg, ry] = reference;
    assert_close("composed gated_residual_backward dgate", tensor::<Inner<B>, 2>(dgate), rg.squeeze_dim(1), GRAD_TOL);
    assert_close("composed gated_residual_backward dy", tensor::<Inner<B>, 3>(dy), ry, GRAD_TOL);
}

fn gelu_case<B: AutodiffBackend>(shape: [usize; 3], device: &<B as burn::tensor::backend::BackendTypes>::Device) {
    type Inner<B> = <B as burn::tensor::backend::AutodiffBackend>::InnerBackend;
    // Wide enough to reach both saturated tails and the clamp at |u| = 15.
    let x = random::<Inner<B>, 3>(shape, device) * 6.0;
    let fused = kernels::gelu_tanh(x.clone());
    let reference = tensor(composed::gelu_tanh::<Inner<B>>(prim(x.clone())));
    assert_close("gelu_tanh forward", fused, reference, FORWARD_TOL);

    let weights = random::<Inner<B>, 3>(shape, device);
    let [fused] = gradients::<B, 3, 1>([x.clone()], weights.clone(), |[x]| kernels::gelu_tanh(x));
    let [reference] = gradients::<B, 3, 1>([x.clone()], weights.clone(), |[x]| tensor(composed::gelu_tanh::<B>(prim(x))));
    assert_close("gelu_tanh dx", fused, reference.clone(), GRAD_TOL);
    let composed_dx = tensor::<Inner<B>, 3>(composed::gelu_tanh_backward::<Inner<B>>(prim(x), prim(weights)));
    assert_close("composed gelu_tanh_backward", composed_dx, reference, GRAD_TOL);
}

fn rms_norm_case<B: AutodiffBackend>(shape: [usize; 4], device: &<B as burn::tensor::backend::BackendTypes>::Device) {
    type Inner<B> = <B as burn::tensor::backend::AutodiffBackend>::InnerBackend;
    let x = random::<Inner<B>, 4>(shape, device) * 2.0;
    let weight = random::<Inner<B>, 1>([shape[3]], device);
    let eps = 1e-6;
    let fused = kernels::rms_norm(x.clone(), weight.clone(), eps);
    let reference = tensor(composed::rms_norm::<Inner<B>>(prim(x.clone()), prim(weight.clone()), eps));
    assert_close("rms_norm forward", fused, reference, FORWARD_TOL);

    let weights = random::<Inner<B>, 4>(shape, device);
    let w4 = weight.clone().reshape([1, 1, 1, shape[3]]);
    let flat = |w: Tensor<B, 4>| w.reshape([shape[3]]);
    let fused = gradients::<B, 4, 2>([x.clone(), w4.clone()], weights.clone(), |[x, w]| kernels::rms_norm(x, flat(w), eps));
    let reference = gradients::<B, 4, 2>([x.clone(), w4], weights.clone(), |[x, w]| tensor(composed::rms_norm::<B>(prim(x), prim(flat(w)), eps)));
    for (name, (f, r)) in ["dx", "dweight"].iter().zip(fused.into_iter().zip(reference.clone())) {
        assert_close(&format!("rms_norm {name}"), f, r, GRAD_TOL);
    }
    let (dx, dw) = composed::rms_norm_backward::<Inner<B>>(prim(x), prim(weight), prim(weights), eps);
    let [rx, rw] = reference;
    assert_close("composed rms_norm_backward dx", tensor::<Inner<B>, 4>(dx), rx, GRAD_TOL);
    assert_close("composed rms_norm_backward dweight", tensor::<Inner<B>, 1>(dw), rw.reshape([shape[3]]), GRAD_TOL);
}

fn attention_case<B: AutodiffBackend>(batch: usize, tokens: usize, heads: usize, head_dim: usize, device: &<B as burn::tensor::backend::BackendTypes>::Device) {
    type Inner<B> = <B as burn::tensor::backend::AutodiffBackend>::InnerBackend;
    let shape = [batch, tokens, heads * head_dim];
    let (q, k, v) = (random::<Inner<B>, 3>(shape, device) * 2.0, random::<Inner<B>, 3>(shape, device) * 2.0, random::<Inner<B>, 3>(shape, device));
    let fused = kernels::attention(q.clone(), k.clone(), v.clone(), heads);
    let reference = tensor(composed::token_attention::<Inner<B>>(prim(q.clone()), prim(k.clone()), prim(v.clone()), heads));
    assert_close("attention forward", fused.clone(), reference.clone(), FORWARD_TOL);
    let (with_probs, probs) = composed::token_attention_with_probs::<Inner<B>>(prim(q.clone()), prim(k.clone()), prim(v.clone()), heads);
    assert_close("composed attention_with_probs forward", tensor::<Inner<B>, 3>(with_probs), reference, FORWARD_TOL);
    // Each probability row sums to one.
    let rows: Tensor<Inner<B>, 4> = tensor::<Inner<B>, 4>(probs.clone()).sum_dim(3);
    assert_close("attention probabilities sum to 1", rows.clone(), rows.ones_like(), 1e-6);

    let weights = random::<Inner<B>, 3>(shape, device);
    let xs = [q.clone(), k.clone(), v.clone()];
    let fused = gradients::<B, 3, 3>(xs.clone(), weights.clone(), |[q, k, v]| kernels::attention(q, k, v, heads));
    // The memory-light node: Burn's attention forward, probabilities recomputed in the backward.
    let light = gradients::<B, 3, 3>(xs.clone(), weights.clone(), |[q, k, v]| kernels::attention_recompute(q, k, v, heads));
    let reference = gradients::<B, 3, 3>(xs, weights.clone(), |[q, k, v]| tensor(composed::token_attention_with_probs::<B>(prim(q), prim(k), prim(v), heads).0));
    for (name, (f, r)) in ["dq", "dk", "dv"].iter().zip(fused.into_iter().zip(reference.clone())) {
        assert_close(&format!("attention {name}"), f, r, GRAD_TOL);
    }
    for (name, (f, r)) in ["dq", "dk", "dv"].iter().zip(light.into_iter().zip(reference.clone())) {
        assert_close(&format!("attention (recomputing backward) {name}"), f, r, GRAD_TOL);
    }
    let (dq, dk, dv) = composed::token_attention_backward::<Inner<B>>(prim(q), prim(k), prim(v), probs, prim(weights), heads);
    for (name, (g, r)) in ["dq", "dk", "dv"].iter().zip([dq, dk, dv].into_iter().zip(reference)) {
        assert_close(&format!("composed attention_backward {name}"), tensor::<Inner<B>, 3>(g), r, GRAD_TOL);
    }
}

fn linear_case<B: AutodiffBackend>(rows: [usize; 2], inputs: usize, outputs: usize, bias: bool, device: &<B as burn::tensor::backend::BackendTypes>::Device) {
    type Inner<B> = <B as burn::tensor::backend::AutodiffBackend>::InnerBackend;
    let x = random::<Inner<B>, 3>([rows[0], rows[1], inputs], device);
    let weight = random::<Inner<B>, 2>([inputs, outputs], device);
    let b = random::<Inner<B>, 1>([outputs], device);
    let bias_of = |b: Tensor<Inner<B>, 1>| bias.then_some(b);
    let fused = kernels::linear(x.clone(), weight.clone(), bias_of(b.clone()));
    let reference = burn::tensor::module::linear(x.clone(), weight.clone(), bias_of(b.clone()));
    assert_close("linear forward", fused, reference, FORWARD_TOL);

    // Gradients of x, weight and bias, all lifted to rank 3 for one helper.
    let weights = random::<Inner<B>, 3>([rows[0], rows[1], outputs], device);
    let (w3, b3) = (weight.unsqueeze_dim::<3>(0), b.reshape([1, 1, outputs]));
    let names = ["dx", "dweight", "dbias"];
    if bias {
        let run = |fused: bool| {
            gradients::<B, 3, 3>([x.clone(), w3.clone(), b3.clone()], weights.clone(), move |[x, w, b]| {
                let (w, b) = (w.squeeze_dim::<2>(0), Some(b.reshape([outputs])));
                if fused { kernels::linear(x, w, b) } else { burn::tensor::module::linear(x, w, b) }
            })
        };
        for (name, (f, r)) in names.iter().zip(run(true).into_iter().zip(run(false))) {
            assert_close(&format!("linear {name}"), f, r, GRAD_TOL);
        }
    } else {
        let run = |fused: bool| {
            gradients::<B, 3, 2>([x.clone(), w3.clone()], weights.clone(), move |[x, w]| {
                let w = w.squeeze_dim::<2>(0);
                if fused { kernels::linear(x, w, None) } else { burn::tensor::module::linear(x, w, None) }
            })
        };
        for (name, (f, r)) in names.iter().zip(run(true).into_iter().zip(run(false))) {
            assert_close(&format!("linear {name}"), f, r, GRAD_TOL);
        }
    }
}

/// Every kernel on backend `B`, on shapes chosen to hit remainders and edge cases.
fn all_kernels<B: AutodiffBackend>(device: &<B as burn::tensor::backend::BackendTypes>::Device) {
    // (batch, tokens, width): SIMD-width multiples, odd widths, one token, one sample.
    for (b, t, d) in [(2, 5, 64), (3, 7, 37), (1, 1, 5), (4, 3, 130)] {
        layer_norm_modulate_case::<B>(b, t, d, device);
        gated_residual_case::<B>(b, t, d, device);
        gelu_case::<B>([b, t, d], device);
    }
    for shape in [[2, 5, 4, 16], [3, 7, 3, 7], [1, 1, 1, 5], [2, 3, 2, 64]] {
        rms_norm_case::<B>(shape, device);
    }
    // (batch, tokens, heads, head_dim)
    for (b, t, h, hd) in [(2, 80, 4, 16), (3, 7, 3, 5), (1, 1, 1, 8), (2, 33, 2, 64)] {
        attention_case::<B>(b, t, h, hd, device);
    }
    for (rows, i, o, bias) in [([2, 5], 16, 24, true), ([3, 7], 37, 13, false), ([1, 1], 5, 3, true), ([4, 70], 64, 64, true)] {
        linear_case::<B>(rows, i, o, bias, device);
    }
}

#[test]
fn fused_kernels_match_the_composed_ops_on_flex() {
    type B = Autodiff<burn::backend::Flex>;
    <B as burn::tensor::backend::Backend>::seed(&Default::default(), 7);
    all_kernels::<B>(&Default::default());
}

#[cfg(feature = "wgpu")]
#[test]
fn fused_kernels_match_the_composed_ops_on_wgpu() {
    type B = Autodiff<burn::backend::Wgpu>;
    let device = Default::default();
    <B as burn::tensor::backend::Backend>::seed(&device, 7);
    all_kernels::<B>(&device);
}
