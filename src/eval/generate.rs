//! Image generation with a pipeline: per-prompt seeded noise, CFG, ODE or SDE sampling,
//! decoding to [`Image32`]s. Each image depends only on its prompt, its seed and the model, not
//! on how prompts are batched.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

use crate::flow::{FlowSchedule, GuidedModel, SeededNoise, TextConditioning, sample_ode};
use crate::model::lora::ActiveAdapters;
use crate::model::pipeline::Pipeline;
use crate::world::Image32;

/// How images are sampled for evaluation (REFERENCE: 40 ODE steps, CFG 4.5).
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

/// Initial noise `[B, C, h, w]` for `seeds` (one ChaCha stream per seed).
pub fn initial_noise<B: Backend>(shape: [usize; 3], seeds: &[u64], device: &B::Device) -> Tensor<B, 4> {
    let parts = seeds
        .iter()
        .map(|s| SeededNoise::new(*s).sample::<B, 4>([1, shape[0], shape[1], shape[2]], device))
        .collect();
    Tensor::cat(parts, 0)
}

/// The empty-prompt conditioning repeated `batch` times (the CFG negative).
pub fn negative_conditioning<B: Backend>(pipeline: &Pipeline<B>, batch: usize, device: &B::Device) -> TextConditioning<B> {
    pipeline.encode_prompts(&vec![""; batch], device)
}

/// Generates one image per prompt with ODE sampling; `seeds[i]` seeds prompt `i`'s noise.
pub fn generate<B: Backend>(
    pipeline: &Pipeline<B>,
    adapters: &ActiveAdapters<'_, B>,
    prompts: &[&str],
    seeds: &[u64],
    config: &GenerateConfig,
    device: &B::Device,
    mut progress: impl FnMut(usize),
) -> Vec<Image32> {
    assert_eq!(prompts.len(), seeds.len(), "one seed per prompt");
    let mut images = Vec::with_capacity(prompts.len());
    for (chunk, seeds) in prompts.chunks(config.batch.max(1)).zip(seeds.chunks(config.batch.max(1))) {
        let cond = pipeline.encode_prompts(chunk, device);
        let negative = negative_conditioning(pipeline, chunk.len(), device);
        let guidance = (config.guidance != 1.0).then_some((&negative, config.guidance));
        let field = GuidedModel { model: &pipeline.model.transformer, adapters, cond: &cond, guidance };
        let x0 = initial_noise::<B>(pipeline.latent_shape(), seeds, device);
        let latents = sample_ode(&field, x0, config.steps, config.schedule);
        images.extend(to_images(pipeline.decode(latents)));
        progress(chunk.len());
    }
    images
}

/// `[B, 3, 32, 32]` in `[0, 1]` to images.
pub fn to_images<B: Backend>(pixels: Tensor<B, 4>) -> Vec<Image32> {
    let [b, _, _, _] = pixels.dims();
    let values = pixels.into_data().convert::<f32>().into_vec::<f32>().expect("f32 pixels");
    let per = values.len() / b.max(1);
    values.chunks(per).map(|chw| Image32::from_chw(chw).expect("decoded 32 x 32 RGB")).collect()
}
