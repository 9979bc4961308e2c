//! What the trainers need from a text-to-image pipeline, whichever it is: the synthetic
//! world's ([`Pipeline`]) or a diffusers SD3 / SD3.5 folder ([`Sd3Pipeline`] at a chosen image
//! size). Rollouts, Flow-GRPO, Flow-OPD and the SFT cold start are written against
//! [`TextToImage`]; recipes load either kind with [`AnyPipeline::load`].

use std::path::Path;

use burn::tensor::Tensor;
use crate::Backend;
use image::RgbImage;
use serde::{Deserialize, Serialize};

pub mod codec;
pub mod generate;
pub mod sample;
pub mod sd3;
pub mod text_encoder;
pub mod world;

use crate::model::mmdit::Mmdit;
use world::Pipeline;
use sd3::{Sd3Pipeline, is_sd3_pipeline, to_rgb_images};
use crate::pipeline::generate::to_images;
use crate::flow::{FlowSchedule, TextConditioning};

/// A text-to-image pipeline around an MMDiT, as the trainers see it.
pub trait TextToImage<B: Backend> {
    /// The (frozen) transformer adapters are trained on.
    fn transformer(&self) -> &Mmdit<B>;
    /// Prompt conditioning (the empty prompt gives CFG's negative).
    fn encode_prompts(&self, prompts: &[&str], device: &B::Device) -> Result<TextConditioning<B>, String>;
    /// `[C, h, w]` of one image's latents.
    fn latent_shape(&self) -> [usize; 3];
    /// Final latents to 8-bit RGB images (what rewards score).
    fn decode_rgb(&self, latents: Tensor<B, 4>) -> Vec<RgbImage>;
    /// The pipeline's own sampling schedule (an SD3 folder's `scheduler_config.json`), which
    /// then replaces the configured one; `None` for the world.
    fn schedule(&self) -> Option<FlowSchedule> {
        None
    }
}

impl<B: Backend> TextToImage<B> for Pipeline<B> {
    fn transformer(&self) -> &Mmdit<B> {
        &self.model.transformer
    }
    fn encode_prompts(&self, prompts: &[&str], device: &B::Device) -> Result<TextConditioning<B>, String> {
        Ok(Pipeline::encode_prompts(self, prompts, device))
    }
    fn latent_shape(&self) -> [usize; 3] {
        Pipeline::latent_shape(self)
    }
    fn decode_rgb(&self, latents: Tensor<B, 4>) -> Vec<RgbImage> {
        to_images(self.decode(latents)).iter().map(|i| i.to_rgb_image()).collect()
    }
}

/// Options for SD3 folders in training recipes (`[sd3]` of a recipe).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sd3Options {
    /// Image side in pixels (the paper trains at 512).
    #[serde(default = "default_resolution")]
    pub resolution: usize,
    /// T5 prompt length (diffusers' `max_sequence_length`, 256; Flow-GRPO uses 128).
    #[serde(default = "default_t5_length")]
    pub t5_length: usize,
    /// Storage and compute precision of the frozen transformer: `auto` (bf16 on CUDA, f32
    /// elsewhere), `f32`, `bf16` or `f16`. Inputs, velocities, sampler arithmetic, norm
    /// statistics, losses and adapters stay f32 (docs/gpu.md, "Precision").
    #[serde(default)]
    pub weights: WeightPrecision,
}

/// Storage precision of a frozen transformer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightPrecision {
    /// The backend's choice ([`crate::Backend::half_precision_transformer`]): bf16 on CUDA,
    /// f32 on the CPU and wgpu.
    #[default]
    Auto,
    F32,
    Bf16,
    F16,
}

impl WeightPrecision {
    /// The precision `auto` stands for on backend `B`; the others as they are.
    pub fn resolve<B: Backend>(self) -> Self {
        match self {
            Self::Auto if B::half_precision_transformer() => Self::Bf16,
            Self::Auto => Self::F32,
            other => other,
        }
    }

    /// `model` stored at this precision.
    pub fn apply<B: Backend>(self, model: Mmdit<B>) -> Mmdit<B> {
        match self.resolve::<B>() {
            Self::Auto | Self::F32 => model,
            Self::Bf16 => model.cast_weights(burn::tensor::FloatDType::BF16),
            Self::F16 => model.cast_weights(burn::tensor::FloatDType::F16),
        }
    }
}

impl std::str::FromStr for WeightPrecision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "f16" => Ok(Self::F16),
            other => Err(format!("unknown weight precision `{other}` (expected auto, f32, bf16 or f16)")),
        }
    }
}

fn default_resolution() -> usize {
    512
}
fn default_t5_length() -> usize {
    256
}

impl Default for Sd3Options {
    fn default() -> Self {
        Self { resolution: default_resolution(), t5_length: default_t5_length(), weights: WeightPrecision::Auto }
    }
}

/// An SD3 pipeline at a fixed training resolution.
#[derive(Debug)]
pub struct Sd3AtSize<B: Backend> {
    pub pipeline: Sd3Pipeline<B>,
    latent: [usize; 3],
}

impl<B: Backend> TextToImage<B> for Sd3AtSize<B> {
    fn transformer(&self) -> &Mmdit<B> {
        &self.pipeline.transformer
    }
    fn encode_prompts(&self, prompts: &[&str], _device: &B::Device) -> Result<TextConditioning<B>, String> {
        let embeds = self.pipeline.text.encode(prompts).map_err(|e| e.to_string())?;
        Ok(TextConditioning { tokens: embeds.prompt_embeds, pooled: embeds.pooled })
    }
    fn latent_shape(&self) -> [usize; 3] {
        self.latent
    }
    fn decode_rgb(&self, latents: Tensor<B, 4>) -> Vec<RgbImage> {
        to_rgb_images(self.pipeline.decode(latents))
    }
    fn schedule(&self) -> Option<FlowSchedule> {
        Some(self.pipeline.schedule)
    }
}

/// The world's pipeline or an SD3 folder.
pub enum AnyPipeline<B: Backend> {
    World(Pipeline<B>),
    Sd3(Box<Sd3AtSize<B>>),
}

impl<B: Backend> AnyPipeline<B> {
    /// Loads a world pipeline folder, or a diffusers SD3 folder (recognised by its
    /// `model_index.json`) at `sd3`'s resolution.
    pub fn load(dir: &Path, sd3: &Sd3Options, device: &B::Device) -> Result<Self, String> {
        if is_sd3_pipeline(dir) {
            let mut pipeline = Sd3Pipeline::load(dir, sd3.t5_length, device).map_err(|e| e.to_string())?;
            pipeline.transformer = sd3.weights.apply(pipeline.transformer);
            let latent = pipeline
                .latent_shape(sd3.resolution, sd3.resolution)
                .map_err(|e| format!("{}: `sd3.resolution` = {}: {e}", dir.display(), sd3.resolution))?;
            Ok(Self::Sd3(Box::new(Sd3AtSize { pipeline, latent })))
        } else {
            Pipeline::load(dir, device).map(Self::World).map_err(|e| e.to_string())
        }
    }

    fn inner(&self) -> &dyn TextToImage<B> {
        match self {
            Self::World(p) => p,
            Self::Sd3(p) => p.as_ref(),
        }
    }
}

impl<B: Backend> From<Pipeline<B>> for AnyPipeline<B> {
    fn from(p: Pipeline<B>) -> Self {
        Self::World(p)
    }
}

impl<B: Backend> TextToImage<B> for AnyPipeline<B> {
    fn transformer(&self) -> &Mmdit<B> {
        self.inner().transformer()
    }
    fn encode_prompts(&self, prompts: &[&str], device: &B::Device) -> Result<TextConditioning<B>, String> {
        self.inner().encode_prompts(prompts, device)
    }
    fn latent_shape(&self) -> [usize; 3] {
        self.inner().latent_shape()
    }
    fn decode_rgb(&self, latents: Tensor<B, 4>) -> Vec<RgbImage> {
        self.inner().decode_rgb(latents)
    }
    fn schedule(&self) -> Option<FlowSchedule> {
        self.inner().schedule()
    }
}
