//! The fused composites under Burn's autodiff: each is one graph node whose state is its
//! inputs and whose backward is the inner backend's backward method. The other methods (the
//! backward ones themselves) keep their composed defaults, which autodiff differentiates like
//! any tensor ops.
//!
//! Inputs are kept through Burn's checkpointer (`checkpoint` / `retrieve_node_output`), so under
//! `Autodiff<_, BalancedCheckpointing>` a composite can be *memory bound*: inside
//! [`super::recompute_scope`] (the recipe's `checkpointing = "blocks"`) a tracked composite
//! stores no output and registers a retro-forward instead, and Burn recomputes it from the
//! nearest stored ancestors when a backward needs it. [`super::checkpoint_boundary`] marks the
//! tensors that are stored (the blocks' outputs). Under the default `NoCheckpointing` strategy
//! every composite is compute bound, as before.
//!
//! Attention has two nodes: one that keeps the probabilities for its backward (the CPU's, where
//! they are cheap and recomputing costs), and one that keeps `q, k, v` only and recomputes the
//! probabilities per call in the backward (GPU backends: the forward runs Burn's fused
//! attention and no `[B, H, S, S]` tensor outlives the call).

use std::sync::Arc;

use burn::backend::Autodiff;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::retro_forward::RetroForward;
use burn::backend::autodiff::checkpoint::state::BackwardStates;
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

/// The backward state of a composite: the checkpointed inputs its backward reads (`None` for
/// those it does not).
type Kept<const N: usize> = [Option<NodeId>; N];

/// Reads the kept inputs back (stored, or recomputed by Burn's checkpointer).
fn retrieve<B: Backend, const N: usize>(kept: Kept<N>, checkpointer: &mut Checkpointer) -> [Option<FloatTensor<B>>; N] {
    kept.map(|id| id.map(|id| checkpointer.retrieve_node_output::<FloatTensor<B>>(id)))
}

/// An input of a retro-forward: a tracked parent (its output is read from Burn's backward
/// states) or an untracked tensor (a frozen weight, an input), kept as it is.
#[derive(Debug, Clone)]
enum RetroInput<B: Backend> {
    Node(NodeId),
    Value(FloatTensor<B>),
}

type Forward<B, const N: usize> = Arc<dyn Fn([FloatTensor<B>; N]) -> FloatTensor<B> + Send + Sync>;

/// Recomputes a memory-bound composite's output from its inputs.
struct Retro<B: Backend, const N: usize> {
    inputs: [RetroInput<B>; N],
    forward: Forward<B, N>,
}

impl<B: Backend, const N: usize> std::fmt::Debug for Retro<B, N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retro").field("inputs", &self.inputs).finish()
    }
}

impl<B: Backend, const N: usize> RetroForward for Retro<B, N> {
    fn forward(&self, states: &mut BackwardStates, out_node: NodeId) {
        let inputs = self.inputs.clone().map(|input| match input {
            RetroInput::Node(id) => states.get_state::<FloatTensor<B>>(&id),
            RetroInput::Value(t) => t,
        });
        states.save(out_node, (self.forward)(inputs))
    }
}

/// Runs a composite under autodiff: `forward` on the inner backend, one graph node whose
/// backward `op` reads the inputs marked in `keep`. Memory bound (recomputed in the backward)
/// inside [`super::recompute_scope`] when any input is tracked, compute bound otherwise.
fn composite<B, C, O, const N: usize>(
    op: O,
    inputs: [FloatTensor<Autodiff<B, C>>; N],
    keep: [bool; N],
    forward: impl Fn([FloatTensor<B>; N]) -> FloatTensor<B> + Clone + Send + Sync + 'static,
) -> FloatTensor<Autodiff<B, C>>
where
    B: Backend,
    C: CheckpointStrategy,
    O: Backward<B, N, State = Kept<N>>,
{
    let prep = op.prepare::<C>(inputs.each_ref().map(|t| t.node.clone()));
    let tracked = inputs.iter().any(|t| t.is_tracked());
    let prep = if tracked && super::recomputing() {
        // Only a memory-bound node keeps its forward (boxed for the retro-forward).
        let retro = Retro {
            inputs: inputs.each_ref().map(|t| if t.is_tracked() { RetroInput::<B>::Node(t.node.id) } else { RetroInput::<B>::Value(t.primitive.clone()) }),
            forward: Arc::new(forward.clone()),
        };
        prep.memory_bound().retro_forward(retro).parents(inputs.iter().filter(|t| t.is_tracked()))
    } else {
        prep.compute_bound()
    };
    match prep.stateful() {
        OpsKind::Tracked(mut prep) => {
            let mut kept = [None; N];
            for (slot, (input, keep)) in kept.iter_mut().zip(inputs.iter().zip(keep)) {
                if keep {
                    *slot = Some(prep.checkpoint(input));
                }
            }
            prep.finish(kept, forward(inputs.map(|t| t.primitive)))
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(inputs.map(|t| t.primitive))),
    }
}

#[derive(Debug)]
struct Linear;

impl<B: Backend> Backward<B, 2> for Linear {
    type State = Kept<2>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let [x_node, weight_node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let [x, weight] = retrieve::<B, 2>(ops.state, checkpointer);
        let [dx, dweight, _] = B::fused_linear_backward(x.unwrap(), weight.unwrap(), grad, [x_node.is_some(), weight_node.is_some(), false]);
        register!(grads, x_node, dx.expect("asked"));
        register!(grads, weight_node, dweight.expect("asked"));
    }
}

#[derive(Debug)]
struct LinearBias;

impl<B: Backend> Backward<B, 3> for LinearBias {
    type State = Kept<3>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let [x_node, weight_node, bias_node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let [x, weight, _] = retrieve::<B, 3>(ops.state, checkpointer);
        let wanted = [x_node.is_some(), weight_node.is_some(), bias_node.is_some()];
        let [dx, dweight, dbias] = B::fused_linear_backward(x.unwrap(), weight.unwrap(), grad, wanted);
        register!(grads, x_node, dx.expect("asked"));
        register!(grads, weight_node, dweight.expect("asked"));
        register!(grads, bias_node, dbias.expect("asked"));
    }
}

#[derive(Debug)]
struct LayerNormModulate(f64);

impl<B: Backend> Backward<B, 3> for LayerNormModulate {
    type State = Kept<3>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let [x_node, shift_node, scale_node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let [x, _, scale] = retrieve::<B, 3>(ops.state, checkpointer);
        let (dx, dshift, dscale) = B::layer_norm_modulate_backward(x.unwrap(), scale.unwrap(), grad, self.0);
        register!(grads, x_node, dx);
        register!(grads, shift_node, dshift);
        register!(grads, scale_node, dscale);
    }
}

#[derive(Debug)]
struct GatedResidual;

impl<B: Backend> Backward<B, 3> for GatedResidual {
    type State = Kept<3>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let [x_node, gate_node, y_node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        if gate_node.is_some() || y_node.is_some() {
            let [_, gate, y] = retrieve::<B, 3>(ops.state, checkpointer);
            let (dgate, dy) = B::gated_residual_backward(gate.unwrap(), y.unwrap(), grad.clone());
            register!(grads, gate_node, dgate);
            register!(grads, y_node, dy);
        }
        register!(grads, x_node, grad);
    }
}

#[derive(Debug)]
struct GeluTanh;

impl<B: Backend> Backward<B, 1> for GeluTanh {
    type State = Kept<1>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let [x_node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let [x] = retrieve::<B, 1>(ops.state, checkpointer);
        register!(grads, x_node, B::gelu_tanh_backward(x.unwrap(), grad));
    }
}

#[derive(Debug)]
struct RmsNorm(f64);

impl<B: Backend> Backward<B, 2> for RmsNorm {
    type State = Kept<2>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let [x_node, weight_node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let [x, weight] = retrieve::<B, 2>(ops.state, checkpointer);
        let (dx, dweight) = B::rms_norm_backward(x.unwrap(), weight.unwrap(), grad, self.0);
        register!(grads, x_node, dx);
        register!(grads, weight_node, dweight);
    }
}

/// Attention that keeps its probabilities for the backward.
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

/// Attention that keeps `q, k, v` and recomputes the probabilities in its backward.
#[derive(Debug)]
struct AttentionRecompute(usize);

impl<B: Backend> Backward<B, 3> for AttentionRecompute {
    type State = Kept<3>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let [q_node, k_node, v_node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let [q, k, v] = retrieve::<B, 3>(ops.state, checkpointer).map(Option::unwrap);
        let heads = self.0;
        let (_, probs) = B::token_attention_with_probs(q.clone(), k.clone(), v.clone(), heads);
        let (dq, dk, dv) = B::token_attention_backward(q, k, v, probs, grad, heads);
        register!(grads, q_node, dq);
        register!(grads, k_node, dk);
        register!(grads, v_node, dv);
    }
}

/// The identity, stored under checkpointing: the boundary of a recomputed segment.
#[derive(Debug)]
struct Boundary;

impl<B: Backend> Backward<B, 1> for Boundary {
    type State = ();

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [x_node] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        register!(grads, x_node, grad);
    }
}

impl<B: Backend, C: CheckpointStrategy> Backend for Autodiff<B, C> {
    fn contiguous_broadcast() -> bool {
        B::contiguous_broadcast()
    }

    fn half_precision_transformer() -> bool {
        B::half_precision_transformer()
    }

    fn device_memory(device: &Self::Device) -> Option<super::DeviceMemory> {
        B::device_memory(device)
    }

    fn attention_keeps_probs() -> bool {
        B::attention_keeps_probs()
    }

    fn fused_linear(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: Option<FloatTensor<Self>>) -> FloatTensor<Self> {
        match bias {
            None => composite::<B, C, _, _>(Linear, [x, weight], [true, true], |[x, w]| B::fused_linear(x, w, None)),
            Some(bias) => composite::<B, C, _, _>(LinearBias, [x, weight, bias], [true, true, false], |[x, w, b]| B::fused_linear(x, w, Some(b))),
        }
    }

    fn layer_norm_modulate(x: FloatTensor<Self>, shift: FloatTensor<Self>, scale: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        composite::<B, C, _, _>(LayerNormModulate(eps), [x, shift, scale], [true, false, true], move |[x, shift, scale]| B::layer_norm_modulate(x, shift, scale, eps))
    }

    fn gated_residual(x: FloatTensor<Self>, gate: FloatTensor<Self>, y: FloatTensor<Self>) -> FloatTensor<Self> {
        composite::<B, C, _, _>(GatedResidual, [x, gate, y], [false, true, true], |[x, gate, y]| B::gated_residual(x, gate, y))
    }

    fn gelu_tanh(x: FloatTensor<Self>) -> FloatTensor<Self> {
        composite::<B, C, _, _>(GeluTanh, [x], [true], |[x]| B::gelu_tanh(x))
    }

    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        composite::<B, C, _, _>(RmsNorm(eps), [x, weight], [true, true], move |[x, w]| B::rms_norm(x, w, eps))
    }

    fn token_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, heads: usize) -> FloatTensor<Self> {
        if !B::attention_keeps_probs() || super::recomputing() {
            return Self::token_attention_recompute(q, k, v, heads);
        }
        match Attention.prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (out, probs) = B::token_attention_with_probs(q.primitive.clone(), k.primitive.clone(), v.primitive.clone(), heads);
                prep.finish((q.primitive, k.primitive, v.primitive, probs, heads), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::token_attention(q.primitive, k.primitive, v.primitive, heads)),
        }
    }

    fn token_attention_recompute(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, heads: usize) -> FloatTensor<Self> {
        composite::<B, C, _, _>(AttentionRecompute(heads), [q, k, v], [true, true, true], move |[q, k, v]| B::token_attention(q, k, v, heads))
    }

    fn checkpoint_boundary(x: FloatTensor<Self>) -> FloatTensor<Self> {
        match Boundary.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((), x.primitive),
            OpsKind::UnTracked(prep) => prep.finish(x.primitive),
        }
    }
}
