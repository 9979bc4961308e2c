//! The SD3-family MMDiT (diffusers `SD3Transformer2DModel`), generic over the Burn backend.
//!
//! Split by concern: [`config`] (presets, `config.json`), [`embedding`] (patches, positions,
//! timestep and pooled-text embedders), [`attention`] (joint and dual attention), [`blocks`]
//! (the joint block and its modulations). Parameter names follow diffusers' keys; the few
//! that cannot (`to_out.0`, `ff.net.0.proj`, `ff.net.2`, RMSNorm `weight`) are translated by
//! [`crate::model::weights::burn_path_to_diffusers_key`].

pub mod attention;
pub mod blocks;
pub mod config;
pub mod embedding;

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{FloatDType, Tensor};
use crate::Backend;

pub use blocks::{AdaLnModulation, JointBlock};
pub use config::{MmditConfig, QkNorm};
pub use embedding::{PatchEmbed, TimeTextEmbed};

use crate::model::lora::{ActiveAdapters, BlockAdapters};

/// The SD3 / SD3.5 multimodal diffusion transformer.
///
/// `forward(x, c, y, t)` maps latents `x [B, C, H, W]`, text tokens `c [B, L, joint_dim]`,
/// pooled text `y [B, pooled_dim]` and timesteps `t [B]` (`1000 * sigma`) to the predicted
/// velocity `[B, C_out, H, W]` (docs/reference.md section 7).
#[derive(Module, Debug)]
pub struct Mmdit<B: Backend> {
    pub pos_embed: PatchEmbed<B>,
    pub time_text_embed: TimeTextEmbed<B>,
    pub context_embedder: Linear<B>,
    pub transformer_blocks: Vec<JointBlock<B>>,
    /// `AdaLayerNormContinuous` before the output projection, chunks `(scale, shift)`.
    pub norm_out: AdaLnModulation<B>,
    pub proj_out: Linear<B>,
    pub patch_size: usize,
    pub out_channels: usize,
}

impl MmditConfig {
    /// Builds the model with fresh weights (Burn's default initialisers; the position table
    /// gets diffusers' 2-D sin-cos initialisation). Parameters are materialised lazily, so
    /// building a large model just to load weights into it costs no extra memory.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Mmdit<B> {
        let dim = self.inner_dim();
        let qk_norm = self.qk_norm.is_some();
        let transformer_blocks = (0..self.num_layers)
            .map(|i| {
                JointBlock::new(
                    self.num_attention_heads,
                    self.attention_head_dim,
                    qk_norm,
                    self.is_dual_attention_layer(i),
                    i + 1 == self.num_layers,
                    device,
                )
            })
            .collect();
        Mmdit {
            pos_embed: PatchEmbed::new(
                self.in_channels,
                dim,
                self.patch_size,
                self.pos_table_side(),
                self.sample_size,
                device,
            ),
            time_text_embed: TimeTextEmbed::new(self.pooled_projection_dim, dim, device),
            context_embedder: LinearConfig::new(self.joint_attention_dim, dim).init(device),
            transformer_blocks,
            norm_out: AdaLnModulation::new(dim, 2, device),
            proj_out: LinearConfig::new(dim, self.patch_size * self.patch_size * self.out_channels)
                .init(device),
            patch_size: self.patch_size,
            out_channels: self.out_channels,
        }
    }
}

/// What a forward call needs to know about its inputs' shapes, for [`Mmdit::check_inputs`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputDims {
    pub latents: [usize; 4],
    pub text: [usize; 3],
    pub pooled: [usize; 2],
    pub timestep: [usize; 1],
}

impl<B: Backend> Mmdit<B> {
    /// Latent channels the model expects.
    pub fn in_channels(&self) -> usize {
        self.pos_embed.proj.weight.dims()[1]
    }

    /// Width of the text tokens the model expects.
    pub fn joint_attention_dim(&self) -> usize {
        self.context_embedder.weight.dims()[0]
    }

    /// Size of the pooled text vector the model expects.
    pub fn pooled_projection_dim(&self) -> usize {
        self.time_text_embed.text_embedder.linear_1.weight.dims()[0]
    }

    /// Checks input shapes against the model; `Err` names the offending input and says what
    /// was expected. [`Mmdit::forward`] assumes this passed.
    pub fn check_inputs(&self, dims: InputDims) -> Result<(), (&'static str, String)> {
        let [b, c, h, w] = dims.latents;
        let p = self.patch_size;
        let m = self.pos_embed.max_size;
        if c != self.in_channels() {
            return Err(("hidden_states", format!("has {c} channels, the model expects {}", self.in_channels())));
        }
        if h % p != 0 || w % p != 0 {
            return Err(("hidden_states", format!("latent {h} x {w} is not divisible by the patch size {p}")));
        }
        if h / p > m || w / p > m {
            return Err((
                "hidden_states",
                format!(
                    "latent {h} x {w} is {} x {} patches, larger than the {m} x {m} position table (at most {} x {} latent pixels)",
                    h / p,
                    w / p,
                    m * p,
                    m * p
                ),
            ));
        }
        let [tb, _, td] = dims.text;
        if td != self.joint_attention_dim() {
            return Err(("encoder_hidden_states", format!("has {td} features, the model expects {}", self.joint_attention_dim())));
        }
        let [pb, pd] = dims.pooled;
        if pd != self.pooled_projection_dim() {
            return Err(("pooled_projections", format!("has {pd} features, the model expects {}", self.pooled_projection_dim())));
        }
        let [sb] = dims.timestep;
        for (name, batch) in [("encoder_hidden_states", tb), ("pooled_projections", pb), ("timestep", sb)] {
            if batch != b {
                return Err((name, format!("has batch {batch}, hidden_states has batch {b}")));
            }
        }
        Ok(())
    }

    /// Predicted velocity for latents `x [B, C, H, W]` at timesteps `t [B]` (= 1000 sigma),
    /// conditioned on text tokens `c [B, L, D_joint]` and the pooled vector `y [B, D_pooled]`.
    pub fn forward(
        &self,
        x: Tensor<B, 4>,
        c: Tensor<B, 3>,
        y: Tensor<B, 2>,
        t: Tensor<B, 1>,
    ) -> Tensor<B, 4> {
        self.forward_adapted(x, c, y, t, &ActiveAdapters::none())
    }

    /// [`Mmdit::forward`] with LoRA adapters: every adapted linear layer adds the update of
    /// the adapter each sample is routed to (see [`ActiveAdapters`]).
    pub fn forward_adapted(
        &self,
        x: Tensor<B, 4>,
        c: Tensor<B, 3>,
        y: Tensor<B, 2>,
        t: Tensor<B, 1>,
        adapters: &ActiveAdapters<'_, B>,
    ) -> Tensor<B, 4> {
        let [batch, _, height, width] = x.dims();
        let p = self.patch_size;
        let (h, w) = (height / p, width / p);
        // Weights may be stored in bf16 / f16 (`cast_weights`): the inputs are cast to their
        // precision and the velocity back to the caller's, so samplers stay in f32.
        let (io, compute) = (x.dtype(), self.proj_out.weight.val().dtype());
        let (x, c, y) = (x.cast(compute), c.cast(compute), y.cast(compute));

        let mut image = self.pos_embed.forward(x);
        let temb = self.time_text_embed.forward(t, y);
        let mut context = Some(crate::kernels::linear_layer(&self.context_embedder, c));
        // Per-block activation checkpointing (`kernels::with_block_checkpointing`): each block
        // records its ops memory bound and stores only its outputs.
        let checkpoint = crate::kernels::block_checkpointing();
        for (index, block) in self.transformer_blocks.iter().enumerate() {
            let text = context.take().expect("only the last block is context-pre-only");
            let lora = BlockAdapters::new(adapters, index);
            let (next_image, next_context) =
                crate::kernels::recompute_scope(checkpoint, || block.forward(image, text, temb.clone(), &lora));
            image = if checkpoint { crate::kernels::checkpoint_boundary(next_image) } else { next_image };
            context = if checkpoint { next_context.map(crate::kernels::checkpoint_boundary) } else { next_context };
        }
        let image = self.norm_out.continuous(image, temb);
        let patches = crate::kernels::linear_layer(&self.proj_out, image);
        unpatchify(patches, batch, h, w, p, self.out_channels).cast(io)
    }

    /// The same model with every weight stored as `dtype` (bf16 / f16 halve the memory of a
    /// frozen base; adapters keep their own precision).
    pub fn cast_weights(self, dtype: FloatDType) -> Self {
        struct CastWeights(FloatDType);
        impl<B: Backend> burn::module::ModuleMapper<B> for CastWeights {
            fn map_float<const D: usize>(&mut self, param: burn::module::Param<Tensor<B, D>>) -> burn::module::Param<Tensor<B, D>> {
                let dtype = self.0;
                param.map(|t| t.cast(dtype))
            }
        }
        self.map(&mut CastWeights(dtype))
    }
}

/// `[B, h*w, p*p*C]` with features ordered `(p, q, c)` -> `[B, C, h*p, w*p]`.
pub fn unpatchify<B: Backend>(
    patches: Tensor<B, 3>,
    batch: usize,
    h: usize,
    w: usize,
    p: usize,
    channels: usize,
) -> Tensor<B, 4> {
    patches
        .reshape([batch, h, w, p, p, channels])
        .permute([0, 5, 1, 3, 2, 4])
        .reshape([batch, channels, h * p, w * p])
}
