//! The fused composites under Burn's autodiff: each is one graph node whose state is its
//! inputs (and, for attention, the probabilities) and whose backward is the inner backend's
//! backward method. The other methods (the backward ones themselves) keep their composed
//! defaults, which autodiff differentiates like any tensor ops.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::ops::FloatTensor;

use super::Backend;

/// Registers `grad` for `node` if that parent is tracked.
macro_rules! register {
    ($grads:expr, $node:expr, $grad:expr) => {
        if let Some(node) = $node {
            $grads.register::<B>(node.id, $grad);
        }
    };
}

#[derive(Debug)]
struct Linear;

/// `(x, weight)` of a linear node.
type LinearState<B> = (FloatTensor<B>, FloatTensor<B>);

impl<B: Backend> Backward<B, 2> for Linear {
    type State = LinearState<B>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [x_node, weight_node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x, weight) = ops.state;
        let [dx, dweight, _] = B::fused_linear_backward(x, weight, grad, [x_node.is_some(), weight_node.is_some(), false]);
        register!(grads, x_node, dx.expect("asked"));
        register!(grads, weight_node, dweight.expect("asked"));
    }
}

#[derive(Debug)]
struct LinearBias;

impl<B: Backend> Backward<B, 3> for LinearBias {
    type State = LinearState<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [x_node, weight_node, bias_node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x, weight) = ops.state;
        let wanted = [x_node.is_some(), weight_node.is_some(), bias_node.is_some()];
        let [dx, dweight, dbias] = B::fused_linear_backward(x, weight, grad, wanted);
        register!(grads, x_node, dx.expect("asked"));
        register!(grads, weight_node, dweight.expect("asked"));
        register!(grads, bias_node, dbias.expect("asked"));
    }
}

#[derive(Debug)]
struct LayerNormModulate;

impl<B: Backend> Backward<B, 3> for LayerNormModulate {
    type State = (FloatTensor<B>, FloatTensor<B>, f64);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [x_node, shift_node, scale_node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x, scale, eps) = ops.state;
        let (dx, dshift, dscale) = B::layer_norm_modulate_backward(x, scale, grad, eps);
        register!(grads, x_node, dx);
        register!(grads, shift_node, dshift);
        register!(grads, scale_node, dscale);
    }
}

#[derive(Debug)]
struct GatedResidual;

impl<B: Backend> Backward<B, 3> for GatedResidual {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [x_node, gate_node, y_node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (gate, y) = ops.state;
        if gate_node.is_some() || y_node.is_some() {
            let (dgate, dy) = B::gated_residual_backward(gate, y, grad.clone());
            register!(grads, gate_node, dgate);
            register!(grads, y_node, dy);
        }
        register!(grads, x_node, grad);
    }
}

#[derive(Debug)]
struct GeluTanh;

impl<B: Backend> Backward<B, 1> for GeluTanh {
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [x_node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        register!(grads, x_node, B::gelu_tanh_backward(ops.state, grad));
    }
}

#[derive(Debug)]
struct RmsNorm;

impl<B: Backend> Backward<B, 2> for RmsNorm {
    type State = (FloatTensor<B>, FloatTensor<B>, f64);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [x_node, weight_node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x, weight, eps) = ops.state;
        let (dx, dweight) = B::rms_norm_backward(x, weight, grad, eps);
        register!(grads, x_node, dx);
        register!(grads, weight_node, dweight);
    }
}

#[derive(Debug)]
struct Attention;

impl<B: Backend> Backward<B, 3> for Attention {
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, usize);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [q_node, k_node, v_node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (q, k, v, probs, heads) = ops.state;
        let (dq, dk, dv) = B::token_attention_backward(q, k, v, probs, grad, heads);
        register!(grads, q_node, dq);
        register!(grads, k_node, dk);
        register!(grads, v_node, dv);
    }
}

impl<B: Backend, C: CheckpointStrategy> Backend for Autodiff<B, C> {
    fn fused_linear(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: Option<FloatTensor<Self>>) -> FloatTensor<Self> {
        match bias {
            None => match Linear.prepare::<C>([x.node.clone(), weight.node.clone()]).compute_bound().stateful() {
                OpsKind::Tracked(prep) => {
                    let out = B::fused_linear(x.primitive.clone(), weight.primitive.clone(), None);
                    prep.finish((x.primitive, weight.primitive), out)
                }
                OpsKind::UnTracked(prep) => prep.finish(B::fused_linear(x.primitive, weight.primitive, None)),
            },
            Some(bias) => match LinearBias.prepare::<C>([x.node.clone(), weight.node.clone(), bias.node.clone()]).compute_bound().stateful() {
                OpsKind::Tracked(prep) => {
                    let out = B::fused_linear(x.primitive.clone(), weight.primitive.clone(), Some(bias.primitive));
                    prep.finish((x.primitive, weight.primitive), out)
                }
                OpsKind::UnTracked(prep) => prep.finish(B::fused_linear(x.primitive, weight.primitive, Some(bias.primitive))),
            },
        }
    }

    fn layer_norm_modulate(x: FloatTensor<Self>, shift: FloatTensor<Self>, scale: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        match LayerNormModulate.prepare::<C>([x.node.clone(), shift.node.clone(), scale.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = B::layer_norm_modulate(x.primitive.clone(), shift.primitive, scale.primitive.clone(), eps);
                prep.finish((x.primitive, scale.primitive, eps), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::layer_norm_modulate(x.primitive, shift.primitive, scale.primitive, eps)),
        }
    }

    fn gated_residual(x: FloatTensor<Self>, gate: FloatTensor<Self>, y: FloatTensor<Self>) -> FloatTensor<Self> {
        match GatedResidual.prepare::<C>([x.node.clone(), gate.node.clone(), y.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = B::gated_residual(x.primitive, gate.primitive.clone(), y.primitive.clone());
                prep.finish((gate.primitive, y.primitive), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::gated_residual(x.primitive, gate.primitive, y.primitive)),
        }
    }

    fn gelu_tanh(x: FloatTensor<Self>) -> FloatTensor<Self> {
        match GeluTanh.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = B::gelu_tanh(x.primitive.clone());
                prep.finish(x.primitive, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::gelu_tanh(x.primitive)),
        }
    }

    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        match RmsNorm.prepare::<C>([x.node.clone(), weight.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = B::rms_norm(x.primitive.clone(), weight.primitive.clone(), eps);
                prep.finish((x.primitive, weight.primitive, eps), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::rms_norm(x.primitive, weight.primitive, eps)),
        }
    }

    fn token_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, heads: usize) -> FloatTensor<Self> {
        match Attention.prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (out, probs) = B::token_attention_with_probs(q.primitive.clone(), k.primitive.clone(), v.primitive.clone(), heads);
                prep.finish((q.primitive, k.primitive, v.primitive, probs, heads), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::token_attention(q.primitive, k.primitive, v.primitive, heads)),
        }
    }
}
