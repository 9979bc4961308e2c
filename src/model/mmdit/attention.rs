//! Joint (image + text) attention and the image-only self-attention of dual-attention blocks,
//! both through the fused token-major attention kernel ([`crate::kernels::attention`]).

use burn::module::Module;
use burn::nn::{Linear, LinearConfig, RmsNorm, RmsNormConfig};
use burn::tensor::Tensor;
use crate::Backend;

use crate::kernels;
use crate::model::lora::{BlockAdapters, LoraTarget};

/// Epsilon of every LayerNorm and RMSNorm in the SD3 family.
pub const NORM_EPS: f64 = 1e-6;

/// Per-head RMSNorm (eps 1e-6, learned `[head_dim]` scale) of token-major `[B, N, H * hd]`
/// if the model has qk-norm: one fused kernel over the `hd`-wide rows.
fn maybe_norm<B: Backend>(norm: &Option<RmsNorm<B>>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    match norm {
        Some(norm) => {
            let [batch, tokens, dim] = x.dims();
            let head_dim = norm.gamma.dims()[0];
            let rows = x.reshape([batch, tokens, dim / head_dim, head_dim]);
            kernels::rms_norm(rows, norm.gamma.val(), norm.epsilon).reshape([batch, tokens, dim])
        }
        None => x,
    }
}

fn qk_norm<B: Backend>(enabled: bool, head_dim: usize, device: &B::Device) -> Option<RmsNorm<B>> {
    enabled.then(|| RmsNormConfig::new(head_dim).with_epsilon(NORM_EPS).init(device))
}

fn linear<B: Backend>(dim: usize, device: &B::Device) -> Linear<B> {
    LinearConfig::new(dim, dim).init(device)
}

/// Joint attention of an MMDiT block (diffusers `Attention` with `JointAttnProcessor2_0`):
/// image queries/keys/values `to_q/k/v`, text ones `add_q/k/v_proj`, optional per-head
/// RMSNorm on each q and k, one attention over the concatenated sequences, then the image part
/// through `to_out.0` and the text part through `to_add_out` (absent in the last,
/// context-pre-only block, whose text output is discarded).
#[derive(Module, Debug)]
pub struct JointAttention<B: Backend> {
    pub to_q: Linear<B>,
    pub to_k: Linear<B>,
    pub to_v: Linear<B>,
    pub add_q_proj: Linear<B>,
    pub add_k_proj: Linear<B>,
    pub add_v_proj: Linear<B>,
    /// diffusers `to_out.0`.
    pub to_out: Linear<B>,
    pub to_add_out: Option<Linear<B>>,
    pub norm_q: Option<RmsNorm<B>>,
    pub norm_k: Option<RmsNorm<B>>,
    pub norm_added_q: Option<RmsNorm<B>>,
    pub norm_added_k: Option<RmsNorm<B>>,
    pub heads: usize,
}

impl<B: Backend> JointAttention<B> {
    pub fn new(
        heads: usize,
        head_dim: usize,
        qk_norm_enabled: bool,
        context_pre_only: bool,
        device: &B::Device,
    ) -> Self {
        let dim = heads * head_dim;
        Self {
            to_q: linear(dim, device),
            to_k: linear(dim, device),
            to_v: linear(dim, device),
            add_q_proj: linear(dim, device),
            add_k_proj: linear(dim, device),
            add_v_proj: linear(dim, device),
            to_out: linear(dim, device),
            to_add_out: (!context_pre_only).then(|| linear(dim, device)),
            norm_q: qk_norm(qk_norm_enabled, head_dim, device),
            norm_k: qk_norm(qk_norm_enabled, head_dim, device),
            norm_added_q: qk_norm(qk_norm_enabled, head_dim, device),
            norm_added_k: qk_norm(qk_norm_enabled, head_dim, device),
            heads,
        }
    }

    /// `x`: image tokens `[B, N, D]`, `c`: text tokens `[B, L, D]`. Returns the image output
    /// and, unless the block is context-pre-only, the text output.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        c: Tensor<B, 3>,
        lora: &BlockAdapters<'_, '_, B>,
    ) -> (Tensor<B, 3>, Option<Tensor<B, 3>>) {
        let image_tokens = x.dims()[1];
        let q = maybe_norm(&self.norm_q, lora.linear(LoraTarget::ToQ, &self.to_q, x.clone()));
        let k = maybe_norm(&self.norm_k, lora.linear(LoraTarget::ToK, &self.to_k, x.clone()));
        let v = lora.linear(LoraTarget::ToV, &self.to_v, x);
        let cq = maybe_norm(&self.norm_added_q, lora.linear(LoraTarget::AddQProj, &self.add_q_proj, c.clone()));
        let ck = maybe_norm(&self.norm_added_k, lora.linear(LoraTarget::AddKProj, &self.add_k_proj, c.clone()));
        let cv = lora.linear(LoraTarget::AddVProj, &self.add_v_proj, c);

        // One attention over the image then text tokens, token-major `[B, N + L, H * hd]`.
        let out = kernels::attention(
            Tensor::cat(vec![q, cq], 1),
            Tensor::cat(vec![k, ck], 1),
            Tensor::cat(vec![v, cv], 1),
            self.heads,
        );
        let [batch, total, dim] = out.dims();
        let image = out.clone().slice([0..batch, 0..image_tokens, 0..dim]);
        let image = lora.linear(LoraTarget::ToOut, &self.to_out, image);
        let context = self.to_add_out.as_ref().map(|to_add_out| {
            lora.linear(LoraTarget::ToAddOut, to_add_out, out.slice([0..batch, image_tokens..total, 0..dim]))
        });
        (image, context)
    }
}

/// Image-only self-attention `attn2` of SD3.5's dual-attention blocks (same projections and
/// qk-norm as the image half of [`JointAttention`], no text stream).
#[derive(Module, Debug)]
pub struct SelfAttention<B: Backend> {
    pub to_q: Linear<B>,
    pub to_k: Linear<B>,
    pub to_v: Linear<B>,
    /// diffusers `to_out.0`.
    pub to_out: Linear<B>,
    pub norm_q: Option<RmsNorm<B>>,
    pub norm_k: Option<RmsNorm<B>>,
    pub heads: usize,
}

impl<B: Backend> SelfAttention<B> {
    pub fn new(heads: usize, head_dim: usize, qk_norm_enabled: bool, device: &B::Device) -> Self {
        let dim = heads * head_dim;
        Self {
            to_q: linear(dim, device),
            to_k: linear(dim, device),
            to_v: linear(dim, device),
            to_out: linear(dim, device),
            norm_q: qk_norm(qk_norm_enabled, head_dim, device),
            norm_k: qk_norm(qk_norm_enabled, head_dim, device),
            heads,
        }
    }

    pub fn forward(&self, x: Tensor<B, 3>, lora: &BlockAdapters<'_, '_, B>) -> Tensor<B, 3> {
        let q = maybe_norm(&self.norm_q, lora.linear(LoraTarget::Attn2ToQ, &self.to_q, x.clone()));
        let k = maybe_norm(&self.norm_k, lora.linear(LoraTarget::Attn2ToK, &self.to_k, x.clone()));
        let v = lora.linear(LoraTarget::Attn2ToV, &self.to_v, x);
        let out = kernels::attention(q, k, v, self.heads);
        lora.linear(LoraTarget::Attn2ToOut, &self.to_out, out)
    }
}
