//! The VAE's building blocks (diffusers `ResnetBlock2D`, `Downsample2D`, `Upsample2D`, the
//! mid-block `Attention` and `UNetMidBlock2D`, as `AutoencoderKL` configures them: no time
//! embedding, GroupNorm eps 1e-6, SiLU, output scale 1).

use burn::config::Config;
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{GroupNorm, GroupNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::Tensor;
use burn::tensor::activation::silu;
use crate::Backend;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;

/// Epsilon of every GroupNorm in SD-family VAEs.
pub const VAE_NORM_EPS: f64 = 1e-6;

/// GroupNorm with the VAE's epsilon and learned affine parameters.
pub fn group_norm<B: Backend>(groups: usize, channels: usize, device: &B::Device) -> GroupNorm<B> {
    GroupNormConfig::new(groups, channels).with_epsilon(VAE_NORM_EPS).init(device)
}

/// A `k x k` convolution, stride 1, zero padding `k / 2` (shape-preserving for odd `k`).
pub fn conv<B: Backend>(channels_in: usize, channels_out: usize, kernel: usize, device: &B::Device) -> Conv2d<B> {
    let pad = kernel / 2;
    Conv2dConfig::new([channels_in, channels_out], [kernel, kernel])
        .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
        .init(device)
}

/// Configuration of a [`ResnetBlock2d`].
#[derive(Config, Debug)]
pub struct ResnetBlock2dConfig {
    /// Channels in.
    pub channels_in: usize,
    /// Channels out.
    pub channels_out: usize,
    /// Groups of both GroupNorms.
    pub groups: usize,
}

impl ResnetBlock2dConfig {
    /// Initialises a [`ResnetBlock2d`]; it has a 1x1 `conv_shortcut` iff the channels change.
    pub fn init<B: Backend>(&self, device: &B::Device) -> ResnetBlock2d<B> {
        let (i, o) = (self.channels_in, self.channels_out);
        ResnetBlock2d {
            norm1: group_norm(self.groups, i, device),
            conv1: conv(i, o, 3, device),
            norm2: group_norm(self.groups, o, device),
            conv2: conv(o, o, 3, device),
            conv_shortcut: (i != o).then(|| conv(i, o, 1, device)),
        }
    }
}

/// A level's `layers` resnets (diffusers `resnets` of a down or up block): the first maps
/// `channels_in -> channels_out`, the rest keep `channels_out`.
pub fn resnet_stack<B: Backend>(channels_in: usize, channels_out: usize, layers: usize, groups: usize, device: &B::Device) -> Vec<ResnetBlock2d<B>> {
    (0..layers)
        .map(|i| ResnetBlock2dConfig::new(if i == 0 { channels_in } else { channels_out }, channels_out, groups).init(device))
        .collect()
}

/// Residual block (diffusers `ResnetBlock2D` without time embedding):
///
/// `h = conv2(silu(norm2(conv1(silu(norm1(x))))))`, `y = shortcut(x) + h`
///
/// where `shortcut` is the identity or, when the channels change, a 1x1 conv.
/// Shapes: `[B, C_in, H, W] -> [B, C_out, H, W]`.
#[derive(Module, Debug)]
pub struct ResnetBlock2d<B: Backend> {
    /// GroupNorm over `C_in`.
    pub norm1: GroupNorm<B>,
    /// 3x3 conv, weight `[C_out, C_in, 3, 3]`.
    pub conv1: Conv2d<B>,
    /// GroupNorm over `C_out`.
    pub norm2: GroupNorm<B>,
    /// 3x3 conv, weight `[C_out, C_out, 3, 3]`.
    pub conv2: Conv2d<B>,
    /// 1x1 conv `[C_out, C_in, 1, 1]`, present iff `C_in != C_out`.
    pub conv_shortcut: Option<Conv2d<B>>,
}

impl<B: Backend> ResnetBlock2d<B> {
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let h = self.conv1.forward(silu(self.norm1.forward(x.clone())));
        let h = self.conv2.forward(silu(self.norm2.forward(h)));
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x),
            None => x,
        };
        shortcut + h
    }
}

/// Configuration of a [`Downsample2d`].
#[derive(Config, Debug)]
pub struct Downsample2dConfig {
    /// Channels in and out.
    pub channels: usize,
}

impl Downsample2dConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> Downsample2d<B> {
        let c = self.channels;
        Downsample2d {
            // diffusers pads (left 0, right 1, top 0, bottom 1) then convolves with padding 0;
            // burn's explicit padding is (top, left, bottom, right).
            conv: Conv2dConfig::new([c, c], [3, 3])
                .with_stride([2, 2])
                .with_padding(PaddingConfig2d::Explicit(0, 0, 1, 1))
                .init(device),
        }
    }
}

/// Halves the resolution (diffusers `Downsample2D` with `use_conv=True, padding=0`): zero
/// padding of one row at the bottom and one column at the right, then a 3x3 conv of stride 2.
/// Shapes: `[B, C, H, W] -> [B, C, H / 2, W / 2]` for even `H, W`.
#[derive(Module, Debug)]
pub struct Downsample2d<B: Backend> {
    /// 3x3 stride-2 conv, weight `[C, C, 3, 3]`.
    pub conv: Conv2d<B>,
}

impl<B: Backend> Downsample2d<B> {
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        self.conv.forward(x)
    }
}

/// Configuration of an [`Upsample2d`].
#[derive(Config, Debug)]
pub struct Upsample2dConfig {
    /// Channels in and out.
    pub channels: usize,
}

impl Upsample2dConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> Upsample2d<B> {
        Upsample2d { conv: conv(self.channels, self.channels, 3, device) }
    }
}

/// Doubles the resolution (diffusers `Upsample2D` with `use_conv=True`): nearest-neighbour
/// upsampling by 2 (each pixel repeated into a 2x2 cell), then a 3x3 conv.
/// Shapes: `[B, C, H, W] -> [B, C, 2H, 2W]`.
#[derive(Module, Debug)]
pub struct Upsample2d<B: Backend> {
    /// 3x3 conv, weight `[C, C, 3, 3]`.
    pub conv: Conv2d<B>,
}

impl<B: Backend> Upsample2d<B> {
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        self.conv.forward(nearest_upsample_2x(x))
    }
}

/// Nearest-neighbour x2: `y[b, c, 2i + di, 2j + dj] = x[b, c, i, j]` (PyTorch's
/// `F.interpolate(scale_factor=2.0, mode="nearest")`), exact on every backend.
pub fn nearest_upsample_2x<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, c, h, w] = x.dims();
    x.reshape([b, c, h, 1, w, 1]).expand([b, c, h, 2, w, 2]).reshape([b, c, 2 * h, 2 * w])
}

/// Configuration of a [`VaeAttention`].
#[derive(Config, Debug)]
pub struct VaeAttentionConfig {
    /// Channels (the attention width; one head of this size, as in every SD VAE).
    pub channels: usize,
    /// Groups of the input GroupNorm.
    pub groups: usize,
}

impl VaeAttentionConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> VaeAttention<B> {
        let c = self.channels;
        let linear = || LinearConfig::new(c, c).init(device);
        VaeAttention {
            group_norm: group_norm(self.groups, c, device),
            to_q: linear(),
            to_k: linear(),
            to_v: linear(),
            to_out: linear(),
        }
    }
}

/// Single-head spatial self-attention of the mid blocks (diffusers `Attention` with
/// `heads = 1, dim_head = C, residual_connection=True`, `AttnProcessor2_0`):
///
/// `t = norm(x)` as `[B, HW, C]` tokens, `y = x + to_out(softmax(q k^T / sqrt(C)) v)` with
/// `q, k, v = to_q(t), to_k(t), to_v(t)`.
/// Shapes: `[B, C, H, W] -> [B, C, H, W]`.
#[derive(Module, Debug)]
pub struct VaeAttention<B: Backend> {
    /// GroupNorm over `C`.
    pub group_norm: GroupNorm<B>,
    /// Query projection `[C, C]` (stored `[out, in]` as `to_q.weight`).
    pub to_q: Linear<B>,
    /// Key projection.
    pub to_k: Linear<B>,
    /// Value projection.
    pub to_v: Linear<B>,
    /// Output projection (diffusers key `to_out.0`).
    pub to_out: Linear<B>,
}

impl<B: Backend> VaeAttention<B> {
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, c, h, w] = x.dims();
        let tokens = self.group_norm.forward(x.clone()).reshape([b, c, h * w]).swap_dims(1, 2);
        let heads = |t: Tensor<B, 3>| t.reshape([b, 1, h * w, c]);
        let q = heads(self.to_q.forward(tokens.clone()));
        let k = heads(self.to_k.forward(tokens.clone()));
        let v = heads(self.to_v.forward(tokens));
        let attended = attention(q, k, v, None, None, AttentionModuleOptions::default()).reshape([b, h * w, c]);
        let out = self.to_out.forward(attended).swap_dims(1, 2).reshape([b, c, h, w]);
        x + out
    }
}

/// Configuration of a [`MidBlock2d`].
#[derive(Config, Debug)]
pub struct MidBlock2dConfig {
    /// Channels (the deepest level's).
    pub channels: usize,
    /// Groups of every GroupNorm.
    pub groups: usize,
    /// Whether the attention sits between the two resnets (`mid_block_add_attention`).
    #[config(default = true)]
    pub add_attention: bool,
}

impl MidBlock2dConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> MidBlock2d<B> {
        let resnet = || ResnetBlock2dConfig::new(self.channels, self.channels, self.groups).init(device);
        MidBlock2d {
            resnets: vec![resnet(), resnet()],
            attentions: if self.add_attention {
                vec![VaeAttentionConfig::new(self.channels, self.groups).init(device)]
            } else {
                vec![]
            },
        }
    }
}

/// The bottleneck (diffusers `UNetMidBlock2D`): `resnet_1(attn(resnet_0(x)))`, the attention
/// left out when the config says so. Shapes: `[B, C, H, W] -> [B, C, H, W]`.
#[derive(Module, Debug)]
pub struct MidBlock2d<B: Backend> {
    /// The two resnets.
    pub resnets: Vec<ResnetBlock2d<B>>,
    /// Zero or one attention.
    pub attentions: Vec<VaeAttention<B>>,
}

impl<B: Backend> MidBlock2d<B> {
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut x = self.resnets[0].forward(x);
        for attention in &self.attentions {
            x = attention.forward(x);
        }
        self.resnets[1].forward(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::TensorData;

    #[test]
    fn nearest_upsample_repeats_each_pixel_into_a_2x2_cell() {
        let device = Default::default();
        let x = Tensor::<Flex, 4>::from_data(TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], [1, 1, 2, 3]), &device);
        let y = nearest_upsample_2x(x).into_data().into_vec::<f32>().unwrap();
        #[rustfmt::skip]
        let expected = [
            1.0, 1.0, 2.0, 2.0, 3.0, 3.0,
            1.0, 1.0, 2.0, 2.0, 3.0, 3.0,
            4.0, 4.0, 5.0, 5.0, 6.0, 6.0,
            4.0, 4.0, 5.0, 5.0, 6.0, 6.0,
        ];
        assert_eq!(y, expected);
    }

    #[test]
    fn downsample_pads_only_bottom_and_right() {
        // A conv whose kernel picks the top-left tap: output (i, j) = input (2i, 2j); one
        // picking the bottom-right tap reads (2i + 2, 2j + 2), which is padding on the last
        // row / column only if the padding is at the bottom / right.
        let device = Default::default();
        let mut down = Downsample2dConfig::new(1).init::<Flex>(&device);
        let mut kernel = vec![0f32; 9];
        kernel[8] = 1.0;
        down.conv.weight = burn::module::Param::from_tensor(Tensor::from_data(TensorData::new(kernel, [1, 1, 3, 3]), &device));
        down.conv.bias = None;
        let x = Tensor::<Flex, 4>::from_data(TensorData::new((1..=16).map(|v| v as f32).collect::<Vec<_>>(), [1, 1, 4, 4]), &device);
        let y = down.forward(x);
        assert_eq!(y.dims(), [1, 1, 2, 2]);
        // (0,0) -> x[2][2] = 11; (0,1) -> x[2][4] = pad; (1,0) -> x[4][2] = pad.
        assert_eq!(y.into_data().into_vec::<f32>().unwrap(), [11.0, 0.0, 0.0, 0.0]);
    }
}
