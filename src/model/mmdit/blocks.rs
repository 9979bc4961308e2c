//! The joint transformer block (with SD3.5's dual-attention variant and the context-pre-only
//! last block), its adaptive LayerNorm modulations and the feed-forward.

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::Tensor;
use burn::tensor::activation::silu;
use crate::Backend;

use super::attention::{JointAttention, NORM_EPS, SelfAttention};
use crate::kernels;
use crate::model::lora::{BlockAdapters, LoraTarget};

/// `LayerNorm(x) * (1 + scale) + shift` (LayerNorm without affine, biased variance, as
/// PyTorch's `LayerNorm(elementwise_affine=False)`), with `[B, D]` modulation applied to every
/// token: one fused kernel ([`kernels::layer_norm_modulate`]).
pub fn norm_modulate<B: Backend>(x: Tensor<B, 3>, shift: Tensor<B, 2>, scale: Tensor<B, 2>) -> Tensor<B, 3> {
    kernels::layer_norm_modulate(x, shift, scale, NORM_EPS)
}

/// Adaptive modulation `Linear(SiLU(temb))` split into `chunks` vectors of width `D`.
/// Chunk orders: AdaLN-Zero (6) `shift, scale, gate` for msa then mlp; SD3.5's
/// `SD35AdaLayerNormZeroX` (9) adds `shift, scale, gate` for msa2; `AdaLayerNormContinuous`
/// (2) is `scale, shift`.
#[derive(Module, Debug)]
pub struct AdaLnModulation<B: Backend> {
    pub linear: Linear<B>,
    pub chunks: usize,
}

impl<B: Backend> AdaLnModulation<B> {
    pub fn new(dim: usize, chunks: usize, device: &B::Device) -> Self {
        Self { linear: LinearConfig::new(dim, chunks * dim).init(device), chunks }
    }

    pub fn forward(&self, temb: Tensor<B, 2>) -> Vec<Tensor<B, 2>> {
        kernels::linear_layer(&self.linear, silu(temb)).chunk(self.chunks, 1)
    }

    /// `AdaLayerNormContinuous`: `LayerNorm(x) * (1 + scale) + shift`, chunks `(scale, shift)`.
    pub fn continuous(&self, x: Tensor<B, 3>, temb: Tensor<B, 2>) -> Tensor<B, 3> {
        let mut chunks = self.forward(temb).into_iter();
        let (scale, shift) = (chunks.next().unwrap(), chunks.next().unwrap());
        norm_modulate(x, shift, scale)
    }
}

/// `net.2(GELU_tanh(net.0.proj(x)))`, hidden width `4 D` (diffusers `FeedForward` with
/// `gelu-approximate`).
#[derive(Module, Debug)]
pub struct FeedForward<B: Backend> {
    /// diffusers `net.0.proj`.
    pub linear_in: Linear<B>,
    /// diffusers `net.2`.
    pub linear_out: Linear<B>,
}

impl<B: Backend> FeedForward<B> {
    pub fn new(dim: usize, device: &B::Device) -> Self {
        Self {
            linear_in: LinearConfig::new(dim, 4 * dim).init(device),
            linear_out: LinearConfig::new(4 * dim, dim).init(device),
        }
    }

    /// `targets`: the LoRA targets of (`net.0.proj`, `net.2`) of this feed-forward.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        lora: &BlockAdapters<'_, '_, B>,
        targets: (LoraTarget, LoraTarget),
    ) -> Tensor<B, 3> {
        let hidden = kernels::gelu_tanh(lora.linear(targets.0, &self.linear_in, x));
        lora.linear(targets.1, &self.linear_out, hidden)
    }
}

/// One MMDiT block (diffusers `JointTransformerBlock`).
///
/// Image stream: `x += g_msa * Attn(mod(LN(x)))`, for dual blocks also
/// `x += g_msa2 * Attn2(mod2(LN(x_in)))`, then `x += g_mlp * FF(mod(LN(x)))`. The text stream
/// does the same with its own modulation and feed-forward, except in the last block
/// (`context_pre_only`), which only contributes keys and values and returns no text.
#[derive(Module, Debug)]
pub struct JointBlock<B: Backend> {
    /// Image-stream modulation: 6 chunks, or 9 for dual-attention blocks.
    pub norm1: AdaLnModulation<B>,
    /// Text-stream modulation: 6 chunks, or 2 (`AdaLayerNormContinuous`) if context-pre-only.
    pub norm1_context: AdaLnModulation<B>,
    pub attn: JointAttention<B>,
    pub attn2: Option<SelfAttention<B>>,
    pub ff: FeedForward<B>,
    pub ff_context: Option<FeedForward<B>>,
}

impl<B: Backend> JointBlock<B> {
    pub fn new(
        heads: usize,
        head_dim: usize,
        qk_norm: bool,
        dual_attention: bool,
        context_pre_only: bool,
        device: &B::Device,
    ) -> Self {
        let dim = heads * head_dim;
        Self {
            norm1: AdaLnModulation::new(dim, if dual_attention { 9 } else { 6 }, device),
            norm1_context: AdaLnModulation::new(dim, if context_pre_only { 2 } else { 6 }, device),
            attn: JointAttention::new(heads, head_dim, qk_norm, context_pre_only, device),
            attn2: dual_attention.then(|| SelfAttention::new(heads, head_dim, qk_norm, device)),
            ff: FeedForward::new(dim, device),
            ff_context: (!context_pre_only).then(|| FeedForward::new(dim, device)),
        }
    }

    /// Whether this block drops the text stream after attention.
    pub fn context_pre_only(&self) -> bool {
        self.ff_context.is_none()
    }

    /// `x`: image tokens `[B, N, D]`, `c`: text tokens `[B, L, D]`, `temb`: `[B, D]`.
    /// Returns the new image tokens and, unless context-pre-only, the new text tokens.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        c: Tensor<B, 3>,
        temb: Tensor<B, 2>,
        lora: &BlockAdapters<'_, '_, B>,
    ) -> (Tensor<B, 3>, Option<Tensor<B, 3>>) {
        let m = self.norm1.forward(temb.clone());
        let attn_in = norm_modulate(x.clone(), m[0].clone(), m[1].clone());

        let (c_attn_in, c_mod) = if self.context_pre_only() {
            (self.norm1_context.continuous(c.clone(), temb), None)
        } else {
            let cm = self.norm1_context.forward(temb);
            let c_in = norm_modulate(c.clone(), cm[0].clone(), cm[1].clone());
            (c_in, Some(cm))
        };

        let (attn_out, c_attn_out) = self.attn.forward(attn_in, c_attn_in, lora);
        let x_in = x.clone();
        let mut x = kernels::gated_residual(x, m[2].clone(), attn_out);
        if let Some(attn2) = &self.attn2 {
            // attn2 normalises the block's input, not the stream after attn.
            let attn2_in = norm_modulate(x_in, m[6].clone(), m[7].clone());
            x = kernels::gated_residual(x, m[8].clone(), attn2.forward(attn2_in, lora));
        }
        let ff_in = norm_modulate(x.clone(), m[3].clone(), m[4].clone());
        let x = kernels::gated_residual(x, m[5].clone(), self.ff.forward(ff_in, lora, (LoraTarget::FfIn, LoraTarget::FfOut)));

        let c = match (c_mod, c_attn_out, &self.ff_context) {
            (Some(cm), Some(c_attn_out), Some(ff_context)) => {
                let c = kernels::gated_residual(c, cm[2].clone(), c_attn_out);
                let ff_in = norm_modulate(c.clone(), cm[3].clone(), cm[4].clone());
                let ff_out = ff_context.forward(ff_in, lora, (LoraTarget::FfContextIn, LoraTarget::FfContextOut));
                Some(kernels::gated_residual(c, cm[5].clone(), ff_out))
            }
            _ => None,
        };
        (x, c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::TensorData;

    #[test]
    fn gelu_tanh_matches_the_formula_and_has_finite_gradients_everywhere() {
        type AD = Autodiff<Flex>;
        let xs = [-1000.0f32, -30.0, -3.0, -0.5, 0.0, 0.7, 2.5, 30.0, 1000.0];
        let x = Tensor::<AD, 1>::from_data(TensorData::new(xs.to_vec(), [xs.len()]), &Default::default()).require_grad();
        let y = kernels::gelu_tanh(x.clone());
        let values = y.clone().into_data().into_vec::<f32>().unwrap();
        for (v, x) in values.iter().zip(xs) {
            let x = x as f64;
            let reference = 0.5 * x * (1.0 + (0.797_884_560_802_865_4 * (x + 0.044715 * x * x * x)).tanh());
            assert!((*v as f64 - reference).abs() <= 1e-6 * reference.abs().max(1.0), "gelu({x}) = {v}, expected {reference}");
        }
        let grads = y.sum().backward();
        let g = x.grad(&grads).unwrap().into_data().into_vec::<f32>().unwrap();
        assert!(g.iter().all(|g| g.is_finite()), "{g:?}");
        assert!((g[0]).abs() < 1e-6 && (g[8] - 1.0).abs() < 1e-6, "saturated slopes 0 and 1: {g:?}");
    }
}
