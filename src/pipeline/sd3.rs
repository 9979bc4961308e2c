//! A diffusers Stable Diffusion 3 pipeline folder, run end to end: text encoders, MMDiT, Euler
//! ODE sampler with classifier-free guidance, VAE decode and diffusers' image postprocessing.
//!
//! Reference: diffusers' `StableDiffusion3Pipeline.__call__` with `FlowMatchEulerDiscreteScheduler`
//! (no dynamic shifting):
//!
//! 1. `encode_prompt`: CLIP-L / CLIP-G penultimate states padded to T5's width, then T5; the
//!    negative prompt `""` encoded once per prompt ([`Sd3TextEncoders::encode_for_cfg`]);
//! 2. `set_timesteps(steps)`: the shifted sigmas of [`FlowSchedule::sigmas`] with the
//!    scheduler config's `shift`;
//! 3. per step, with guidance `g > 1`: the batch `[latents; latents]` against
//!    `[negative; positive]` embeddings at timestep `1000 sigma`, `v = v_u + g (v_c - v_u)`
//!    ([`GuidedModel`]), then `x <- x + (sigma_next - sigma) v` ([`sample_ode`]); with `g <= 1`
//!    the positive batch alone;
//! 4. `vae.decode(latents / scaling_factor + shift_factor)`, then `VaeImageProcessor.postprocess`:
//!    `(x / 2 + 0.5).clamp(0, 1)`, and for PIL images `numpy_to_pil`'s `(x * 255).round()` to u8
//!    (round half to even, as NumPy).

use std::path::{Path, PathBuf};

use burn::tensor::Tensor;
use crate::Backend;
use serde_json::Value;

use crate::flow::initial_noise;
use crate::flow::{FlowSchedule, GuidedModel, TextConditioning, sample_ode};
use crate::model::error::ModelError;
use crate::model::lora::ActiveAdapters;
use crate::model::mmdit::{Mmdit, MmditConfig};
use crate::model::text::{ClipTextModel, TextError};
use crate::model::text::sd3::Sd3TextEncoders;
use crate::model::vae::{AutoencoderKl, VaeConfig, VaeSource};
use crate::model::weights::ModelSource;

/// The pipeline class a loadable `model_index.json` names.
pub const SD3_PIPELINE_CLASS: &str = "StableDiffusion3Pipeline";

/// The components an SD3 folder must have (each a subfolder named like its `model_index.json`
/// key).
pub const SD3_COMPONENTS: [&str; 9] = [
    "transformer",
    "vae",
    "scheduler",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "tokenizer",
    "tokenizer_2",
    "tokenizer_3",
];

/// Why an SD3 pipeline folder could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum Sd3PipelineError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    /// `model_index.json` is unreadable, not a `StableDiffusion3Pipeline` or lacks a component.
    #[error("{path}: {message}")]
    Index { path: PathBuf, message: String },

    /// A component `model_index.json` names has no folder.
    #[error("{path}: missing the `{component}` component folder of the SD3 pipeline")]
    MissingComponent { path: PathBuf, component: String },

    /// `scheduler/scheduler_config.json` asks for something this sampler does not do.
    #[error("{path}: `{key}`: {message}")]
    Scheduler { path: PathBuf, key: String, message: String },

    /// Components that do not fit together (channels, widths).
    #[error("{path}: {message}")]
    Mismatch { path: PathBuf, message: String },

    /// A requested image size or batch the model cannot produce.
    #[error("{0}")]
    Request(String),

    #[error(transparent)]
    Model(#[from] ModelError),

    #[error(transparent)]
    Text(#[from] TextError),
}

/// True when `dir/model_index.json` exists and names `StableDiffusion3Pipeline`.
pub fn is_sd3_pipeline(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("model_index.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<Value>(&text).ok())
        .is_some_and(|index| index.get("_class_name").and_then(Value::as_str) == Some(SD3_PIPELINE_CLASS))
}

/// Reads `model_index.json`: it must name [`SD3_PIPELINE_CLASS`] and every component of
/// [`SD3_COMPONENTS`] as a `[library, class]` pair, and each component folder must exist.
pub fn check_model_index(dir: &Path) -> Result<(), Sd3PipelineError> {
    let path = dir.join("model_index.json");
    let text = std::fs::read_to_string(&path).map_err(|source| Sd3PipelineError::Io { path: path.clone(), source })?;
    let index: Value = serde_json::from_str(&text)
        .map_err(|e| Sd3PipelineError::Index { path: path.clone(), message: format!("not valid JSON: {e}") })?;
    let class = index.get("_class_name").and_then(Value::as_str);
    if class != Some(SD3_PIPELINE_CLASS) {
        return Err(Sd3PipelineError::Index {
            path,
            message: format!("`_class_name` is {class:?}, expected \"{SD3_PIPELINE_CLASS}\""),
        });
    }
    for component in SD3_COMPONENTS {
        let named = index
            .get(component)
            .and_then(Value::as_array)
            .is_some_and(|pair| pair.len() == 2 && pair.iter().all(Value::is_string));
        if !named {
            return Err(Sd3PipelineError::Index {
                path: path.clone(),
                message: format!("`{component}` must be a [library, class] pair (the SD3 pipeline needs every component)"),
            });
        }
        let folder = dir.join(component);
        if !folder.is_dir() {
            return Err(Sd3PipelineError::MissingComponent { path: folder, component: component.into() });
        }
    }
    Ok(())
}

/// The shift of `scheduler/scheduler_config.json` (diffusers' `FlowMatchEulerDiscreteScheduler`;
/// `shift` defaults to 1.0 and `num_train_timesteps` to 1000 there). Options that change the
/// schedule beyond the static shift (dynamic shifting, terminal stretching, Karras /
/// exponential / beta sigmas, inverted sigmas) are refused by name.
pub fn read_scheduler(path: &Path) -> Result<FlowSchedule, Sd3PipelineError> {
    let text = std::fs::read_to_string(path).map_err(|source| Sd3PipelineError::Io { path: path.to_path_buf(), source })?;
    let config: Value = serde_json::from_str(&text).map_err(|e| Sd3PipelineError::Scheduler {
        path: path.to_path_buf(),
        key: "(file)".into(),
        message: format!("not valid JSON: {e}"),
    })?;
    let bad = |key: &str, message: String| Sd3PipelineError::Scheduler { path: path.to_path_buf(), key: key.into(), message };
    let class = config.get("_class_name").and_then(Value::as_str);
    if class != Some("FlowMatchEulerDiscreteScheduler") {
        return Err(bad("_class_name", format!("is {class:?}, expected \"FlowMatchEulerDiscreteScheduler\"")));
    }
    for key in ["use_dynamic_shifting", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas", "stochastic_sampling"] {
        if config.get(key).and_then(Value::as_bool) == Some(true) {
            return Err(bad(key, "is true; only the static shifted schedule is supported".into()));
        }
    }
    if config.get("shift_terminal").is_some_and(|v| !v.is_null()) {
        return Err(bad("shift_terminal", "is set; only the static shifted schedule is supported".into()));
    }
    let shift = match config.get("shift") {
        None | Some(Value::Null) => 1.0,
        Some(v) => v.as_f64().filter(|s| *s > 0.0).ok_or_else(|| bad("shift", format!("{v} is not a positive number")))?,
    };
    let train_timesteps = match config.get("num_train_timesteps") {
        None | Some(Value::Null) => 1000,
        Some(v) => v.as_u64().filter(|n| *n > 0).ok_or_else(|| bad("num_train_timesteps", format!("{v} is not a positive integer")))?
            as usize,
    };
    Ok(FlowSchedule { shift, train_timesteps })
}

/// Where a generation's initial latents come from.
#[derive(Debug, Clone)]
pub enum InitialLatents<'a, B: Backend> {
    /// One seed per prompt: [`initial_noise`] (a ChaCha8 stream per seed), so an image depends
    /// only on its prompt and seed, never on its batch.
    Seeds(&'a [u64]),
    /// Given latents `[B, C, h, w]` (diffusers' `latents=` argument), used as they are.
    Latents(Tensor<B, 4>),
}

/// Sampling settings of [`Sd3Pipeline::generate`].
#[derive(Debug, Clone, PartialEq)]
pub struct Sd3SampleConfig {
    /// Euler steps (diffusers' `num_inference_steps`).
    pub steps: usize,
    /// Classifier-free guidance scale; `<= 1` runs the conditional model alone, as diffusers.
    pub guidance: f64,
    /// Image height in pixels (a multiple of the VAE factor times the patch size).
    pub height: usize,
    /// Image width in pixels.
    pub width: usize,
    /// The CFG negative prompt (diffusers' default `""`).
    pub negative_prompt: String,
}

/// A loaded diffusers SD3 / SD3.5 pipeline folder.
#[derive(Debug)]
pub struct Sd3Pipeline<B: Backend> {
    /// The folder it was loaded from.
    pub dir: PathBuf,
    pub transformer_config: MmditConfig,
    pub transformer: Mmdit<B>,
    pub text: Sd3TextEncoders<B>,
    pub vae_config: VaeConfig,
    pub vae: AutoencoderKl<B>,
    /// From `scheduler/scheduler_config.json`.
    pub schedule: FlowSchedule,
}

impl<B: Backend> Sd3Pipeline<B> {
    /// Loads `dir` (diffusers layout: `model_index.json`, `transformer/`, `vae/`,
    /// `scheduler/scheduler_config.json`, `text_encoder{,_2,_3}/`, `tokenizer{,_2,_3}/`); T5
    /// prompts are padded / cut to `t5_max_length` tokens (diffusers' `max_sequence_length`).
    pub fn load(dir: &Path, t5_max_length: usize, device: &B::Device) -> Result<Self, Sd3PipelineError> {
        check_model_index(dir)?;
        let schedule = read_scheduler(&dir.join("scheduler").join("scheduler_config.json"))?;
        let source = ModelSource::open(&dir.join("transformer"), None)?;
        let transformer = source.load::<B>(device)?;
        let transformer_config = source.config.clone();
        let vae_source = VaeSource::open(&dir.join("vae"), None)?;
        let vae = vae_source.load::<B>(device)?;
        let vae_config = vae_source.config.clone();
        let text = Sd3TextEncoders::load(dir, t5_max_length, device)?;
        let pipeline = Self { dir: dir.to_path_buf(), transformer_config, transformer, text, vae_config, vae, schedule };
        pipeline.check_fit()?;
        Ok(pipeline)
    }

    /// The transformer must take the VAE's latents and the text encoders' widths.
    fn check_fit(&self) -> Result<(), Sd3PipelineError> {
        let config = &self.transformer_config;
        let transformer = self.dir.join("transformer");
        let mismatch = |message: String| Err(Sd3PipelineError::Mismatch { path: transformer.clone(), message });
        let latent = self.vae.latent_channels;
        if config.in_channels != latent || config.out_channels != latent {
            return mismatch(format!(
                "in/out_channels {}/{} differ from the VAE's latent_channels {latent}",
                config.in_channels, config.out_channels
            ));
        }
        let t5 = self.text.t5.d_model();
        if config.joint_attention_dim != t5 {
            return mismatch(format!("joint_attention_dim {} differs from text_encoder_3's d_model {t5}", config.joint_attention_dim));
        }
        let pooled = pooled_width(&self.text.clip_l) + pooled_width(&self.text.clip_g);
        if config.pooled_projection_dim != pooled {
            return mismatch(format!(
                "pooled_projection_dim {} differs from the two CLIPs' pooled widths ({pooled})",
                config.pooled_projection_dim
            ));
        }
        Ok(())
    }

    /// Image side / latent side (diffusers' `vae_scale_factor = 2^(levels - 1)`).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.downsample_factor
    }

    /// diffusers' default `(height, width)`: the transformer's `sample_size` times the VAE factor.
    pub fn default_size(&self) -> (usize, usize) {
        let side = self.transformer_config.sample_size * self.vae_scale_factor();
        (side, side)
    }

    /// `[C, h, w]` of the latents of a `height x width` image; the sides must be multiples of
    /// the VAE factor times the patch size (diffusers' `check_inputs`) and fit the position table.
    pub fn latent_shape(&self, height: usize, width: usize) -> Result<[usize; 3], Sd3PipelineError> {
        let f = self.vae_scale_factor();
        let p = self.transformer_config.patch_size;
        if height == 0 || width == 0 || height % (f * p) != 0 || width % (f * p) != 0 {
            return Err(Sd3PipelineError::Request(format!(
                "height and width must be positive multiples of {} (VAE factor {f} x patch size {p}), got {height} x {width}",
                f * p
            )));
        }
        if let Some(max) = self.transformer_config.pos_embed_max_size {
            let (h, w) = (height / f / p, width / f / p);
            if h > max || w > max {
                return Err(Sd3PipelineError::Request(format!(
                    "{height} x {width} is {h} x {w} patches, more than the transformer's position table ({max} x {max}, at most {} px a side)",
                    max * p * f
                )));
            }
        }
        Ok([self.vae.latent_channels, height / f, width / f])
    }

    /// Final latents (model space, diffusers' `output_type="latent"`) for `prompts`.
    pub fn generate(
        &self,
        prompts: &[&str],
        initial: InitialLatents<'_, B>,
        config: &Sd3SampleConfig,
        adapters: &ActiveAdapters<'_, B>,
    ) -> Result<Tensor<B, 4>, Sd3PipelineError> {
        let shape = self.latent_shape(config.height, config.width)?;
        let device = self.transformer.proj_out.weight.device();
        let x_init = match initial {
            InitialLatents::Seeds(seeds) => {
                if seeds.len() != prompts.len() {
                    return Err(Sd3PipelineError::Request(format!("{} seeds for {} prompts", seeds.len(), prompts.len())));
                }
                initial_noise::<B>(shape, seeds, &device)
            }
            InitialLatents::Latents(latents) => {
                let [b, c, h, w] = latents.dims();
                if b != prompts.len() || [c, h, w] != shape {
                    return Err(Sd3PipelineError::Request(format!(
                        "initial latents are {:?}, expected {:?} for {} prompts of {} x {}",
                        [b, c, h, w],
                        [prompts.len(), shape[0], shape[1], shape[2]],
                        prompts.len(),
                        config.height,
                        config.width
                    )));
                }
                latents
            }
        };
        let embeds = self.text.encode_for_cfg(prompts, &config.negative_prompt)?;
        let cond = TextConditioning { tokens: embeds.positive.prompt_embeds, pooled: embeds.positive.pooled };
        let negative = TextConditioning { tokens: embeds.negative.prompt_embeds, pooled: embeds.negative.pooled };
        // diffusers: `do_classifier_free_guidance = guidance_scale > 1`.
        let guidance = (config.guidance > 1.0).then_some((&negative, config.guidance));
        let field = GuidedModel { model: &self.transformer, adapters, cond: &cond, guidance };
        Ok(sample_ode(&field, x_init, config.steps, self.schedule))
    }

    /// Model-space latents to images `[B, 3, H, W]` in `[0, 1]`: diffusers'
    /// `vae.decode(z / scaling_factor + shift_factor)` then `postprocess`'s
    /// `(x / 2 + 0.5).clamp(0, 1)` (its `output_type="np"` values, channels first).
    pub fn decode(&self, latents: Tensor<B, 4>) -> Tensor<B, 4> {
        let images = self.vae.decode_unscaled(self.vae.unscale_latents(latents));
        (images / 2.0 + 0.5).clamp(0.0, 1.0)
    }
}

/// Width of a CLIP's pooled output: its projection's output width, else its hidden size.
fn pooled_width<B: Backend>(clip: &ClipTextModel<B>) -> usize {
    clip.text_projection.as_ref().map_or_else(|| clip.hidden_size(), |projection| projection.weight.dims()[1])
}

/// `[B, 3, H, W]` images in `[0, 1]` to 8-bit RGB images as diffusers' `numpy_to_pil`:
/// `(x * 255).round()` (NumPy rounds half to even) cast to u8.
pub fn to_rgb_images<B: Backend>(images: Tensor<B, 4>) -> Vec<image::RgbImage> {
    let [batch, channels, height, width] = images.dims();
    assert_eq!(channels, 3, "RGB images have 3 channels, got {channels}");
    let values = images.into_data().convert::<f32>().into_vec::<f32>().expect("f32 pixels");
    let plane = height * width;
    (0..batch)
        .map(|b| {
            let chw = &values[b * 3 * plane..(b + 1) * 3 * plane];
            image::RgbImage::from_fn(width as u32, height as u32, |x, y| {
                let i = y as usize * width + x as usize;
                image::Rgb([0, 1, 2].map(|c| to_u8(chw[c * plane + i])))
            })
        })
        .collect()
}

/// One `[0, 1]` value to u8 as `np.round(x * 255).astype(uint8)` (ties to even).
pub fn to_u8(value: f32) -> u8 {
    (value * 255.0).round_ties_even().clamp(0.0, 255.0) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn u8_conversion_rounds_half_to_even_like_numpy() {
        // np.round([0.5, 1.5, 2.5, 254.5]) == [0, 2, 2, 254]
        assert_eq!(to_u8(0.5 / 255.0), 0);
        assert_eq!(to_u8(1.5 / 255.0), 2);
        assert_eq!(to_u8(2.5 / 255.0), 2);
        assert_eq!(to_u8(1.0), 255);
        assert_eq!(to_u8(0.0), 0);
        assert_eq!(to_u8(0.2), 51);
    }

    #[test]
    fn scheduler_config_defaults_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scheduler_config.json");
        std::fs::write(&path, r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}"#).unwrap();
        assert_eq!(read_scheduler(&path).unwrap(), FlowSchedule { shift: 3.0, train_timesteps: 1000 });
        // diffusers' default shift is 1.0 (no shift).
        std::fs::write(&path, r#"{"_class_name": "FlowMatchEulerDiscreteScheduler"}"#).unwrap();
        assert_eq!(read_scheduler(&path).unwrap().shift, 1.0);
        std::fs::write(&path, r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": true}"#).unwrap();
        let err = read_scheduler(&path).unwrap_err().to_string();
        assert!(err.contains("use_dynamic_shifting") && err.contains("scheduler_config.json"), "{err}");
        std::fs::write(&path, r#"{"_class_name": "EulerDiscreteScheduler"}"#).unwrap();
        assert!(read_scheduler(&path).unwrap_err().to_string().contains("_class_name"));
    }

    #[test]
    fn model_index_must_name_sd3_and_every_component() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("model_index.json"), r#"{"_class_name": "StableDiffusionXLPipeline"}"#).unwrap();
        assert!(!is_sd3_pipeline(dir.path()));
        let err = check_model_index(dir.path()).unwrap_err().to_string();
        assert!(err.contains("model_index.json") && err.contains("StableDiffusionXLPipeline"), "{err}");
        std::fs::write(dir.path().join("model_index.json"), r#"{"_class_name": "StableDiffusion3Pipeline", "vae": ["diffusers", "AutoencoderKL"]}"#)
            .unwrap();
        assert!(is_sd3_pipeline(dir.path()));
        let err = check_model_index(dir.path()).unwrap_err().to_string();
        assert!(err.contains("`transformer`"), "{err}");
    }
}
