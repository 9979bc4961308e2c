//! The VAE decoder (diffusers `Decoder` with `UpDecoderBlock2D`s).

use burn::config::Config;
use burn::module::Module;
use burn::nn::GroupNorm;
use burn::nn::conv::Conv2d;
use burn::tensor::Tensor;
use burn::tensor::activation::silu;
use crate::Backend;

use super::blocks::{
    MidBlock2d, MidBlock2dConfig, ResnetBlock2d, Upsample2d, Upsample2dConfig, conv, group_norm, resnet_stack,
};

/// Configuration of an [`UpDecoderBlock2d`].
#[derive(Config, Debug)]
pub struct UpDecoderBlock2dConfig {
    /// Channels in (the previous, deeper level's).
    pub channels_in: usize,
    /// Channels of this level.
    pub channels_out: usize,
    /// Number of resnets (`layers_per_block + 1`).
    pub layers: usize,
    /// GroupNorm groups.
    pub groups: usize,
    /// Whether the block ends with an [`Upsample2d`] (every level but the last).
    pub upsample: bool,
}

impl UpDecoderBlock2dConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> UpDecoderBlock2d<B> {
        let resnets = resnet_stack(self.channels_in, self.channels_out, self.layers, self.groups, device);
        let upsamplers = if self.upsample { vec![Upsample2dConfig::new(self.channels_out).init(device)] } else { vec![] };
        UpDecoderBlock2d { resnets, upsamplers }
    }
}

/// One decoder level: resnets, then an optional doubling of the resolution.
/// Shapes: `[B, C_in, H, W] -> [B, C_out, H', W']` with `H' = 2H` when upsampling.
#[derive(Module, Debug)]
pub struct UpDecoderBlock2d<B: Backend> {
    /// `layers` resnets; the first maps `C_in -> C_out`.
    pub resnets: Vec<ResnetBlock2d<B>>,
    /// Zero or one upsampler.
    pub upsamplers: Vec<Upsample2d<B>>,
}

impl<B: Backend> UpDecoderBlock2d<B> {
    pub fn forward(&self, mut x: Tensor<B, 4>) -> Tensor<B, 4> {
        for resnet in &self.resnets {
            x = resnet.forward(x);
        }
        for up in &self.upsamplers {
            x = up.forward(x);
        }
        x
    }
}

/// Configuration of a [`Decoder`].
#[derive(Config, Debug)]
pub struct DecoderConfig {
    /// Latent channels in.
    pub in_channels: usize,
    /// Image channels out.
    pub out_channels: usize,
    /// Channels per level, image side first (the decoder walks them in reverse).
    pub block_out_channels: Vec<usize>,
    /// Encoder resnets per level; the decoder has one more.
    pub layers_per_block: usize,
    /// GroupNorm groups.
    pub groups: usize,
    /// Attention in the mid block.
    #[config(default = true)]
    pub mid_block_add_attention: bool,
}

impl DecoderConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> Decoder<B> {
        let reversed: Vec<usize> = self.block_out_channels.iter().rev().copied().collect();
        let levels = reversed.len();
        let up_blocks = (0..levels)
            .map(|i| {
                let channels_in = if i == 0 { reversed[0] } else { reversed[i - 1] };
                UpDecoderBlock2dConfig::new(channels_in, reversed[i], self.layers_per_block + 1, self.groups, i + 1 < levels)
                    .init(device)
            })
            .collect();
        Decoder {
            conv_in: conv(self.in_channels, reversed[0], 3, device),
            mid_block: MidBlock2dConfig::new(reversed[0], self.groups)
                .with_add_attention(self.mid_block_add_attention)
                .init(device),
            up_blocks,
            conv_norm_out: group_norm(self.groups, reversed[levels - 1], device),
            conv_out: conv(reversed[levels - 1], self.out_channels, 3, device),
        }
    }
}

/// Latents to image:
///
/// `h = up_L(... up_1(mid(conv_in(z))))`, `y = conv_out(silu(norm(h)))`.
///
/// Shapes: `[B, latent, h, w]` (unscaled) -> `[B, 3, h * f, w * f]`, roughly in `[-1, 1]`.
#[derive(Module, Debug)]
pub struct Decoder<B: Backend> {
    /// 3x3 conv `[C_last, latent, 3, 3]`.
    pub conv_in: Conv2d<B>,
    /// Bottleneck at the deepest level.
    pub mid_block: MidBlock2d<B>,
    /// One block per level, deepest first.
    pub up_blocks: Vec<UpDecoderBlock2d<B>>,
    /// GroupNorm over the first level's channels.
    pub conv_norm_out: GroupNorm<B>,
    /// 3x3 conv `[3, C_0, 3, 3]`.
    pub conv_out: Conv2d<B>,
}

impl<B: Backend> Decoder<B> {
    pub fn forward(&self, z: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut h = self.mid_block.forward(self.conv_in.forward(z));
        for block in &self.up_blocks {
            h = block.forward(h);
        }
        self.conv_out.forward(silu(self.conv_norm_out.forward(h)))
    }
}
