//! Joint (image + text) attention and the image-only self-attention of dual-attention blocks,
//! both through Burn's fused `attention` op.

use burn::module::Module;
use burn::nn::{Linear, LinearConfig, RmsNorm, RmsNormConfig};
use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;

use crate::model::lora::{BlockAdapters, LoraTarget};

/// Epsilon of every LayerNorm and RMSNorm in the SD3 family.
pub const NORM_EPS: f64 = 1e-6;

/// `[B, N, H * hd] -> [B, N, H, hd]` (a contiguous view; heads are moved to axis 1 only after
/// the per-head norms and the concatenation, so those run on contiguous memory).
fn split_heads<B: Backend>(x: Tensor<B, 3>, heads: usize) -> Tensor<B, 4> {
    let [batch, tokens, dim] = x.dims();
    x.reshape([batch, tokens, heads, dim / heads])
}

/// `[B, N, H, hd] -> [B, H, N, hd]`.
fn heads_first<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    x.swap_dims(1, 2)
}

/// `[B, H, N, hd] -> [B, N, H * hd]`.
fn merge_heads<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 3> {
    let [batch, heads, tokens, head_dim] = x.dims();
    x.swap_dims(1, 2).reshape([batch, tokens, heads * head_dim])
}

/// `softmax(q k^T / sqrt(hd)) v` with no mask.
fn scaled_dot_product<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Tensor<B, 4> {
    attention(q, k, v, None, None, AttentionModuleOptions::default())
}

/// Per-head RMSNorm (eps 1e-6, learned `[head_dim]` scale) if the model has qk-norm.
fn maybe_norm<B: Backend>(norm: &Option<RmsNorm<B>>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    match norm {
        Some(norm) => norm.forward(x),
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
        let h = self.heads;
        let q = maybe_norm(&self.norm_q, split_heads(lora.linear(LoraTarget::ToQ, &self.to_q, x.clone()), h));
        let k = maybe_norm(&self.norm_k, split_heads(lora.linear(LoraTarget::ToK, &self.to_k, x.clone()), h));
        let v = split_heads(lora.linear(LoraTarget::ToV, &self.to_v, x), h);
        let cq = maybe_norm(
            &self.norm_added_q,
            split_heads(lora.linear(LoraTarget::AddQProj, &self.add_q_proj, c.clone()), h),
        );
        let ck = maybe_norm(
            &self.norm_added_k,
            split_heads(lora.linear(LoraTarget::AddKProj, &self.add_k_proj, c.clone()), h),
        );
        let cv = split_heads(lora.linear(LoraTarget::AddVProj, &self.add_v_proj, c), h);

        let out = scaled_dot_product(
            heads_first(Tensor::cat(vec![q, cq], 1)),
            heads_first(Tensor::cat(vec![k, ck], 1)),
            heads_first(Tensor::cat(vec![v, cv], 1)),
        );
        let out = merge_heads(out);
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
        let h = self.heads;
        let q = maybe_norm(&self.norm_q, split_heads(lora.linear(LoraTarget::Attn2ToQ, &self.to_q, x.clone()), h));
        let k = maybe_norm(&self.norm_k, split_heads(lora.linear(LoraTarget::Attn2ToK, &self.to_k, x.clone()), h));
        let v = split_heads(lora.linear(LoraTarget::Attn2ToV, &self.to_v, x), h);
        let out = scaled_dot_product(heads_first(q), heads_first(k), heads_first(v));
        lora.linear(LoraTarget::Attn2ToOut, &self.to_out, merge_heads(out))
    }
}
