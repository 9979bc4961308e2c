//! The VAE encoder (diffusers `Encoder` with `DownEncoderBlock2D`s and `double_z=True`).

use burn::config::Config;
use burn::module::Module;
use burn::nn::GroupNorm;
use burn::nn::conv::Conv2d;
use burn::tensor::Tensor;
use burn::tensor::activation::silu;
use crate::Backend;

use super::blocks::{
    Downsample2d, Downsample2dConfig, MidBlock2d, MidBlock2dConfig, ResnetBlock2d, conv, group_norm, resnet_stack,
};

/// Configuration of a [`DownEncoderBlock2d`].
#[derive(Config, Debug)]
pub struct DownEncoderBlock2dConfig {
    /// Channels in (the previous level's).
    pub channels_in: usize,
    /// Channels of this level.
    pub channels_out: usize,
    /// Number of resnets.
    pub layers: usize,
    /// GroupNorm groups.
    pub groups: usize,
    /// Whether the block ends with a [`Downsample2d`] (every level but the last).
    pub downsample: bool,
}

impl DownEncoderBlock2dConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> DownEncoderBlock2d<B> {
        let resnets = resnet_stack(self.channels_in, self.channels_out, self.layers, self.groups, device);
        let downsamplers =
            if self.downsample { vec![Downsample2dConfig::new(self.channels_out).init(device)] } else { vec![] };
        DownEncoderBlock2d { resnets, downsamplers }
    }
}

/// One encoder level: resnets, then an optional halving of the resolution.
/// Shapes: `[B, C_in, H, W] -> [B, C_out, H', W']` with `H' = H / 2` when downsampling.
#[derive(Module, Debug)]
pub struct DownEncoderBlock2d<B: Backend> {
    /// `layers` resnets; the first maps `C_in -> C_out`.
    pub resnets: Vec<ResnetBlock2d<B>>,
    /// Zero or one downsampler.
    pub downsamplers: Vec<Downsample2d<B>>,
}

impl<B: Backend> DownEncoderBlock2d<B> {
    pub fn forward(&self, mut x: Tensor<B, 4>) -> Tensor<B, 4> {
        for resnet in &self.resnets {
            x = resnet.forward(x);
        }
        for down in &self.downsamplers {
            x = down.forward(x);
        }
        x
    }
}

/// Configuration of an [`Encoder`].
#[derive(Config, Debug)]
pub struct EncoderConfig {
    /// Image channels in.
    pub in_channels: usize,
    /// Channels out: `2 * latent_channels` (mean and log-variance).
    pub out_channels: usize,
    /// Channels per level, image side first.
    pub block_out_channels: Vec<usize>,
    /// Resnets per level.
    pub layers_per_block: usize,
    /// GroupNorm groups.
    pub groups: usize,
    /// Attention in the mid block.
    #[config(default = true)]
    pub mid_block_add_attention: bool,
}

impl EncoderConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> Encoder<B> {
        let channels = &self.block_out_channels;
        let levels = channels.len();
        let last = channels[levels - 1];
        let down_blocks = (0..levels)
            .map(|i| {
                let channels_in = if i == 0 { channels[0] } else { channels[i - 1] };
                DownEncoderBlock2dConfig::new(channels_in, channels[i], self.layers_per_block, self.groups, i + 1 < levels)
                    .init(device)
            })
            .collect();
        Encoder {
            conv_in: conv(self.in_channels, channels[0], 3, device),
            down_blocks,
            mid_block: MidBlock2dConfig::new(last, self.groups)
                .with_add_attention(self.mid_block_add_attention)
                .init(device),
            conv_norm_out: group_norm(self.groups, last, device),
            conv_out: conv(last, self.out_channels, 3, device),
        }
    }
}

/// Image to Gaussian moments:
///
/// `h = mid(down_L(... down_1(conv_in(x))))`, `y = conv_out(silu(norm(h)))`.
///
/// Shapes: `[B, 3, H, W]` in `[-1, 1]` -> `[B, 2 * latent_channels, H / f, W / f]` with
/// `f = 2^(levels - 1)`; channels `[0, latent)` are the mean, the rest the log-variance.
#[derive(Module, Debug)]
pub struct Encoder<B: Backend> {
    /// 3x3 conv `[C_0, 3, 3, 3]`.
    pub conv_in: Conv2d<B>,
    /// One block per level.
    pub down_blocks: Vec<DownEncoderBlock2d<B>>,
    /// Bottleneck at the deepest level.
    pub mid_block: MidBlock2d<B>,
    /// GroupNorm over the deepest level's channels.
    pub conv_norm_out: GroupNorm<B>,
    /// 3x3 conv `[2 * latent, C_last, 3, 3]`.
    pub conv_out: Conv2d<B>,
}

impl<B: Backend> Encoder<B> {
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut h = self.conv_in.forward(x);
        for block in &self.down_blocks {
            h = block.forward(h);
        }
        let h = self.mid_block.forward(h);
        self.conv_out.forward(silu(self.conv_norm_out.forward(h)))
    }
}
