//! Image generation with a pipeline: per-prompt seeded noise, CFG, ODE or SDE sampling,
//! decoding to 8-bit RGB images. Each image depends only on its prompt, its seed and the model, not
//! on how prompts are batched.

use burn::tensor::Tensor;
use crate::Backend;

use image::RgbImage;

use crate::flow::{FlowSchedule, GuidedModel, initial_noise, sample_ode};
use crate::model::lora::ActiveAdapters;
use crate::pipeline::TextToImage;
use crate::world::Image32;

/// How images are sampled for evaluation (docs/reference.md section 6: 40 ODE steps, CFG 4.5).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateConfig {
    #[serde(default = "default_steps")]
    pub steps: usize,
    /// Classifier-free guidance scale (1 disables it).
    #[serde(default = "default_guidance")]
    pub guidance: f64,
    #[serde(default)]
    pub schedule: FlowSchedule,
    /// Prompts per forward batch.
    #[serde(default = "default_batch")]
    pub batch: usize,
}

fn default_steps() -> usize {
    40
}
fn default_guidance() -> f64 {
    4.5
}
fn default_batch() -> usize {
    64
}

impl Default for GenerateConfig {
    fn default() -> Self {
        Self { steps: 40, guidance: 4.5, schedule: FlowSchedule::sd3(), batch: 64 }
    }
}

impl GenerateConfig {
    /// Checks the settings before anything is sampled: at least one step and one prompt per
    /// batch, a finite CFG scale >= 0, a valid schedule. `prefix` is the field path errors name
    /// before `steps` (e.g. `eval.sampling.`).
    pub fn validate(&self, prefix: &str) -> Result<(), String> {
        use crate::flow::checks;
        checks::at_least_one(&format!("`{prefix}steps`"), self.steps)?;
        checks::guidance(&format!("`{prefix}guidance`"), self.guidance)?;
        checks::at_least_one(&format!("`{prefix}batch`"), self.batch)?;
        self.schedule.validate(&format!("{prefix}schedule."))
    }
}

/// Generates one image per prompt with ODE sampling; `seeds[i]` seeds prompt `i`'s noise.
/// Works with any [`TextToImage`] pipeline (the world's 32 x 32 images or SD3 folders).
pub fn generate<B: Backend, P: TextToImage<B> + ?Sized>(
    pipeline: &P,
    adapters: &ActiveAdapters<'_, B>,
    prompts: &[&str],
    seeds: &[u64],
    config: &GenerateConfig,
    device: &B::Device,
    mut progress: impl FnMut(usize),
) -> Result<Vec<RgbImage>, String> {
    assert_eq!(prompts.len(), seeds.len(), "one seed per prompt");
    config.validate("")?;
    let mut images = Vec::with_capacity(prompts.len());
    for (chunk, seeds) in prompts.chunks(config.batch.max(1)).zip(seeds.chunks(config.batch.max(1))) {
        let cond = pipeline.encode_prompts(chunk, device)?;
        let negative = pipeline.encode_prompts(&vec![""; chunk.len()], device)?;
        let field = GuidedModel { model: pipeline.transformer(), adapters, cond: &cond, guidance: negative.cfg(config.guidance) };
        let x0 = initial_noise::<B>(pipeline.latent_shape(), seeds, device);
        let latents = sample_ode(&field, x0, config.steps, pipeline.schedule().unwrap_or(config.schedule));
        images.extend(pipeline.decode_rgb(latents));
        progress(chunk.len());
    }
    Ok(images)
}

/// `[B, 3, 32, 32]` in `[0, 1]` to images.
pub fn to_images<B: Backend>(pixels: Tensor<B, 4>) -> Vec<Image32> {
    let [b, _, _, _] = pixels.dims();
    let values = pixels.into_data().convert::<f32>().into_vec::<f32>().expect("f32 pixels");
    let per = values.len() / b.max(1);
    values.chunks(per).map(|chw| Image32::from_chw(chw).expect("decoded 32 x 32 RGB")).collect()
}
