//! The SD3 VAE (diffusers `AutoencoderKL`): images `[B, 3, H, W]` <-> 16-channel latents at
//! 1/8 resolution, loaded from a diffusers `vae/` folder.
//!
//! - [`encoder`]: `conv_in`, one `DownEncoderBlock2D` per level, mid block
//!   (resnet - attention - resnet), GroupNorm + SiLU + `conv_out` to `2 * latent` moments.
//! - [`decoder`]: `conv_in`, mid block, one `UpDecoderBlock2D` per level (nearest x2 + conv),
//!   GroupNorm + SiLU + `conv_out`.
//! - [`blocks`]: the resnet, down/upsampler, attention and mid block they share.
//! - [`weights`]: reading `diffusion_pytorch_model.safetensors` with diffusers key names.
//!
//! Latent scaling (docs/reference.md section 8): to-latent `(mean - shift) * scale`, from-latent
//! `z / scale + shift`; SD3: scale 1.5305, shift 0.0609. [`AutoencoderKl`] implements
//! [`LatentCodec`], so the pipeline takes it in place of the world's pixel-unshuffle codec.

pub mod blocks;
pub mod config;
pub mod decoder;
pub mod encoder;
pub mod weights;

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::tensor::Tensor;
use crate::Backend;

pub use config::VaeConfig;
pub use decoder::{Decoder, DecoderConfig};
pub use encoder::{Encoder, EncoderConfig};
pub use weights::{VaeSource, load_vae};

use crate::pipeline::codec::LatentCodec;

use blocks::conv;

impl VaeConfig {
    /// Builds the autoencoder with freshly initialised weights (lazily: nothing is allocated
    /// until a parameter is used or loaded). Call [`VaeConfig::validate`] first on untrusted
    /// configs; `init` panics on a config it rejects.
    pub fn init<B: Backend>(&self, device: &B::Device) -> AutoencoderKl<B> {
        if let Err(message) = self.validate() {
            panic!("invalid VAE config: {message}");
        }
        let moments = 2 * self.latent_channels;
        let groups = self.norm_num_groups;
        AutoencoderKl {
            encoder: EncoderConfig::new(
                self.in_channels,
                moments,
                self.block_out_channels.clone(),
                self.layers_per_block,
                groups,
            )
            .with_mid_block_add_attention(self.mid_block_add_attention)
            .init(device),
            decoder: DecoderConfig::new(
                self.latent_channels,
                self.out_channels,
                self.block_out_channels.clone(),
                self.layers_per_block,
                groups,
            )
            .with_mid_block_add_attention(self.mid_block_add_attention)
            .init(device),
            quant_conv: self.use_quant_conv.then(|| conv(moments, moments, 1, device)),
            post_quant_conv: self.use_post_quant_conv.then(|| conv(self.latent_channels, self.latent_channels, 1, device)),
            latent_channels: self.latent_channels,
            downsample_factor: self.downsample_factor(),
            scaling_factor: self.scaling_factor,
            shift_factor: self.shift(),
        }
    }
}

/// The diagonal Gaussian posterior `q(z | x) = N(mean, exp(logvar))` the encoder outputs
/// (diffusers `DiagonalGaussianDistribution`; `logvar` clamped to `[-30, 20]`).
#[derive(Debug, Clone)]
pub struct Posterior<B: Backend> {
    /// `[B, latent, h, w]`, unscaled.
    pub mean: Tensor<B, 4>,
    /// `[B, latent, h, w]`, clamped to `[-30, 20]`.
    pub logvar: Tensor<B, 4>,
}

impl<B: Backend> Posterior<B> {
    /// `exp(logvar / 2)`.
    pub fn std(&self) -> Tensor<B, 4> {
        (self.logvar.clone() * 0.5).exp()
    }

    /// The reparameterised sample `mean + std * noise` for standard-normal `noise` of the
    /// mean's shape (unscaled, like `latent_dist.sample()`).
    pub fn sample_with(&self, noise: Tensor<B, 4>) -> Tensor<B, 4> {
        assert_eq!(noise.dims(), self.mean.dims(), "posterior noise must have the latent shape");
        self.mean.clone() + self.std() * noise
    }
}

/// The autoencoder (diffusers `AutoencoderKL`).
///
/// `encode`: `x -> quant_conv(encoder(x))` split into mean and log-variance;
/// `decode`: `z -> decoder(post_quant_conv(z))`. Images are in `[-1, 1]` here; the
/// [`LatentCodec`] methods take `[0, 1]` images and scaled latents.
#[derive(Module, Debug)]
pub struct AutoencoderKl<B: Backend> {
    pub encoder: Encoder<B>,
    pub decoder: Decoder<B>,
    /// 1x1 conv `[2 * latent, 2 * latent, 1, 1]` after the encoder (absent in SD3).
    pub quant_conv: Option<Conv2d<B>>,
    /// 1x1 conv `[latent, latent, 1, 1]` before the decoder (absent in SD3).
    pub post_quant_conv: Option<Conv2d<B>>,
    /// Latent channels (16 for SD3).
    pub latent_channels: usize,
    /// Image side / latent side (8 for SD3).
    pub downsample_factor: usize,
    /// Latent scale (1.5305 for SD3).
    pub scaling_factor: f64,
    /// Latent shift (0.0609 for SD3; 0 when the config has none).
    pub shift_factor: f64,
}

impl<B: Backend> AutoencoderKl<B> {
    /// Images `[B, 3, H, W]` in `[-1, 1]` (H, W multiples of the downsample factor) to the
    /// posterior over unscaled latents `[B, latent, H / f, W / f]`.
    pub fn encode_posterior(&self, images: Tensor<B, 4>) -> Posterior<B> {
        let [_, _, h, w] = images.dims();
        let f = self.downsample_factor;
        assert!(h % f == 0 && w % f == 0, "image {h} x {w} is not divisible by the VAE's downsample factor {f}");
        let mut moments = self.encoder.forward(images);
        if let Some(conv) = &self.quant_conv {
            moments = conv.forward(moments);
        }
        let mut halves = moments.chunk(2, 1);
        let logvar = halves.pop().expect("two halves").clamp(-30.0, 20.0);
        let mean = halves.pop().expect("two halves");
        Posterior { mean, logvar }
    }

    /// Unscaled latents `[B, latent, h, w]` to images `[B, 3, h f, w f]`, roughly in `[-1, 1]`
    /// (not clamped; diffusers' `decode(z).sample`).
    pub fn decode_unscaled(&self, latents: Tensor<B, 4>) -> Tensor<B, 4> {
        let latents = match &self.post_quant_conv {
            Some(conv) => conv.forward(latents),
            None => latents,
        };
        self.decoder.forward(latents)
    }

    /// Unscaled to model-space latents: `(z - shift) * scale`.
    pub fn scale_latents(&self, latents: Tensor<B, 4>) -> Tensor<B, 4> {
        (latents - self.shift_factor) * self.scaling_factor
    }

    /// Model-space to unscaled latents: `z / scale + shift`.
    pub fn unscale_latents(&self, latents: Tensor<B, 4>) -> Tensor<B, 4> {
        latents / self.scaling_factor + self.shift_factor
    }
}

impl<B: Backend> LatentCodec<B> for AutoencoderKl<B> {
    fn latent_channels(&self) -> usize {
        self.latent_channels
    }

    fn latent_size(&self, height: usize, width: usize) -> [usize; 2] {
        [height / self.downsample_factor, width / self.downsample_factor]
    }

    /// `[0, 1]` images -> scaled posterior mean `(mean(2x - 1) - shift) * scale` (the
    /// deterministic encoding; sample with [`AutoencoderKl::encode_posterior`] and
    /// [`Posterior::sample_with`] for a stochastic one).
    fn encode(&self, images: Tensor<B, 4>) -> Tensor<B, 4> {
        let posterior = self.encode_posterior(images * 2.0 - 1.0);
        self.scale_latents(posterior.mean)
    }

    /// Scaled latents -> `[0, 1]` images: `clamp((decode(z / scale + shift) + 1) / 2, 0, 1)`.
    fn decode(&self, latents: Tensor<B, 4>) -> Tensor<B, 4> {
        let images = self.decode_unscaled(self.unscale_latents(latents));
        ((images + 1.0) * 0.5).clamp(0.0, 1.0)
    }
}
