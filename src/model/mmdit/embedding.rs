//! Input embedders of the MMDiT: patches with the cropped position table, the timestep
//! sinusoid, and the two-layer MLPs for the timestep and the pooled text vector.

use burn::module::{Module, Param, ParamId};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::silu;
use crate::Backend;
use burn::tensor::{Tensor, TensorData};

/// Patch embedding `Conv2d(C -> D, k = p, s = p)` flattened row-major to `h * w` tokens, plus the
/// centre crop of the stored `[1, M*M, D]` position table (diffusers `PatchEmbed` with
/// `pos_embed_max_size = M`).
#[derive(Module, Debug)]
pub struct PatchEmbed<B: Backend> {
    /// Patchifying convolution, weight `[D, C, p, p]`.
    pub proj: Conv2d<B>,
    /// Position table `[1, M * M, D]`, row-major over an `M x M` grid of patches.
    pub pos_embed: Param<Tensor<B, 3>>,
    /// Side `M` of the position grid.
    pub max_size: usize,
}

impl<B: Backend> PatchEmbed<B> {
    /// `sample_size` is the nominal latent side; it sets the frequency scale of the initial
    /// sin-cos table exactly as diffusers does (`base_size = sample_size / patch`).
    pub fn new(
        in_channels: usize,
        dim: usize,
        patch: usize,
        max_size: usize,
        sample_size: usize,
        device: &B::Device,
    ) -> Self {
        let proj = Conv2dConfig::new([in_channels, dim], [patch, patch])
            .with_stride([patch, patch])
            .init(device);
        let base_size = (sample_size / patch).max(1);
        let shape = [1, max_size * max_size, dim];
        // Lazy like every other parameter: a table of 384 x 384 x 1536 values is only computed
        // if no checkpoint replaces it.
        let pos_embed = Param::uninitialized(
            ParamId::new(),
            move |device, require_grad| {
                let table = sincos_2d_table(dim, max_size, base_size);
                let tensor = Tensor::from_data(TensorData::new(table, shape), device);
                if require_grad { tensor.require_grad() } else { tensor }
            },
            device.clone(),
            true,
            shape.into(),
        );
        Self { proj, pos_embed, max_size }
    }

    /// `[B, C, H, W] -> [B, (H/p) * (W/p), D]`. The caller checks that `H/p` and `W/p` fit in
    /// the table.
    pub fn forward(&self, latents: Tensor<B, 4>) -> Tensor<B, 3> {
        let patches = self.proj.forward(latents);
        let [batch, dim, h, w] = patches.dims();
        let tokens = patches.reshape([batch, dim, h * w]).swap_dims(1, 2);
        tokens + self.cropped_positions(h, w)
    }

    /// The `h x w` centre crop of the table: rows from `(M - h) / 2`, columns from `(M - w) / 2`.
    pub fn cropped_positions(&self, h: usize, w: usize) -> Tensor<B, 3> {
        let m = self.max_size;
        let top = (m - h) / 2;
        let left = (m - w) / 2;
        let dim = self.pos_embed.dims()[2];
        self.pos_embed
            .val()
            .reshape([m, m, dim])
            .slice([top..top + h, left..left + w, 0..dim])
            .reshape([1, h * w, dim])
    }
}

/// The 2-D sin-cos position table diffusers initialises `PatchEmbed` with
/// (`get_2d_sincos_pos_embed(dim, M, base_size)`): for the patch in row `i`, column `j`, the first
/// half of the features encodes `j * base / M`, the second half `i * base / M`, each half as
/// `[sin(pos * omega), cos(pos * omega)]` with `omega_k = 10000^(-k / (dim/4))`.
pub fn sincos_2d_table(dim: usize, grid: usize, base_size: usize) -> Vec<f32> {
    let quarter = dim / 4;
    let omega: Vec<f64> = (0..quarter)
        .map(|k| 1.0 / 10000f64.powf(k as f64 / quarter as f64))
        .collect();
    let scale = base_size as f64 / grid as f64;
    let mut table = vec![0f32; grid * grid * dim];
    for i in 0..grid {
        for j in 0..grid {
            let row = &mut table[(i * grid + j) * dim..(i * grid + j + 1) * dim];
            for (half, pos) in [(0, j as f64 * scale), (1, i as f64 * scale)] {
                let out = &mut row[half * dim / 2..(half + 1) * dim / 2];
                for (k, w) in omega.iter().enumerate() {
                    out[k] = (pos * w).sin() as f32;
                    out[quarter + k] = (pos * w).cos() as f32;
                }
            }
        }
    }
    table
}

/// Sinusoidal timestep features of diffusers' `Timesteps(dim, flip_sin_to_cos=True, shift=0)`:
/// `[cos(t f_k), sin(t f_k)]` with `f_k = exp(-ln(10000) k / (dim/2))`, in f32.
/// `timestep` is `1000 * sigma` (a float), shape `[B]`; the result is `[B, dim]`.
pub fn timestep_sinusoid<B: Backend>(timestep: Tensor<B, 1>, dim: usize) -> Tensor<B, 2> {
    let half = dim / 2;
    let device = timestep.device();
    let freqs: Vec<f32> = (0..half)
        .map(|k| (-(10000f32.ln()) * k as f32 / half as f32).exp())
        .collect();
    let freqs = Tensor::<B, 1>::from_data(TensorData::new(freqs, [half]), &device);
    let args = timestep.unsqueeze_dim::<2>(1) * freqs.unsqueeze_dim::<2>(0);
    Tensor::cat(vec![args.clone().cos(), args.sin()], 1)
}

/// `linear_2(SiLU(linear_1(x)))`: diffusers' `TimestepEmbedding` and
/// `PixArtAlphaTextProjection(act_fn="silu")`, which share this shape.
#[derive(Module, Debug)]
pub struct MlpEmbedder<B: Backend> {
    pub linear_1: Linear<B>,
    pub linear_2: Linear<B>,
}

impl<B: Backend> MlpEmbedder<B> {
    pub fn new(input: usize, dim: usize, device: &B::Device) -> Self {
        Self {
            linear_1: LinearConfig::new(input, dim).init(device),
            linear_2: LinearConfig::new(dim, dim).init(device),
        }
    }

    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.linear_2.forward(silu(self.linear_1.forward(x)))
    }
}

/// Width of the timestep sinusoid fed to the timestep MLP.
pub const TIMESTEP_FEATURES: usize = 256;

/// The conditioning vector `temb = MLP_t(sinusoid(t)) + MLP_y(pooled)` (diffusers
/// `CombinedTimestepTextProjEmbeddings`; no activation on the sum).
#[derive(Module, Debug)]
pub struct TimeTextEmbed<B: Backend> {
    pub timestep_embedder: MlpEmbedder<B>,
    pub text_embedder: MlpEmbedder<B>,
}

impl<B: Backend> TimeTextEmbed<B> {
    pub fn new(pooled_dim: usize, dim: usize, device: &B::Device) -> Self {
        Self {
            timestep_embedder: MlpEmbedder::new(TIMESTEP_FEATURES, dim, device),
            text_embedder: MlpEmbedder::new(pooled_dim, dim, device),
        }
    }

    pub fn forward(&self, timestep: Tensor<B, 1>, pooled: Tensor<B, 2>) -> Tensor<B, 2> {
        // The sinusoid in f32, then the weights' precision (as diffusers).
        let dtype = self.timestep_embedder.linear_1.weight.val().dtype();
        let t = self
            .timestep_embedder
            .forward(timestep_sinusoid(timestep, TIMESTEP_FEATURES).cast(dtype));
        t + self.text_embedder.forward(pooled)
    }
}
