//! `flow-opd sample`: text-to-image with a pipeline folder (optionally a LoRA adapter), 40-step
//! ODE with CFG by default (docs/reference.md section 8), one PNG per prompt. The folder is either the
//! synthetic world's pipeline or a diffusers SD3 / SD3.5 folder (`model_index.json` naming
//! `StableDiffusion3Pipeline`, run by [`Sd3Pipeline`]).
//!
//! Prompt `i` is seeded with `seed + i`, so an image depends only on its prompt, its seed and
//! the model, never on the batch it was drawn in.

use std::path::{Path, PathBuf};

use crate::Backend;

use crate::pipeline::generate::{GenerateConfig, generate};
use crate::model::lora::{ActiveAdapters, LoraIoError, load_lora};
use crate::pipeline::world::Pipeline;
use crate::pipeline::sd3::{InitialLatents, Sd3Pipeline, Sd3PipelineError, Sd3SampleConfig, is_sd3_pipeline, to_rgb_images};
use crate::model::text::DEFAULT_T5_MAX_LENGTH;

/// What to sample.
#[derive(Debug, Clone)]
pub struct SampleRequest {
    /// Pipeline folder.
    pub model: PathBuf,
    /// LoRA adapter (PEFT or diffusers layout).
    pub adapter: Option<PathBuf>,
    pub prompts: Vec<String>,
    pub sampling: GenerateConfig,
    /// Seed of the first prompt.
    pub seed: u64,
    /// With one prompt: the PNG file; with several: a folder for `0000.png`, ... and
    /// `prompts.txt`.
    pub out: PathBuf,
    /// Nearest-neighbour upscaling factor of the saved images (1 keeps the model's size).
    pub scale: u32,
}

/// The files `request` writes, in prompt order.
pub fn output_paths(request: &SampleRequest) -> Vec<PathBuf> {
    match request.prompts.len() {
        1 => vec![request.out.clone()],
        n => (0..n).map(|i| request.out.join(format!("{i:04}.png"))).collect(),
    }
}

/// Options only an SD3 pipeline folder (a `model_index.json` naming
/// `StableDiffusion3Pipeline`) uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sd3SampleOptions {
    /// Image height in pixels; `None`: the transformer's `sample_size` times the VAE factor
    /// (diffusers' default).
    pub height: Option<usize>,
    /// Image width in pixels; `None` as for the height.
    pub width: Option<usize>,
    /// T5 prompt length (diffusers' `max_sequence_length`, 256 by default).
    pub t5_length: usize,
}

impl Default for Sd3SampleOptions {
    fn default() -> Self {
        Self { height: None, width: None, t5_length: DEFAULT_T5_MAX_LENGTH }
    }
}

/// Samples every prompt and writes the PNGs (each through a temporary file); returns the paths.
/// SD3 folders get the default [`Sd3SampleOptions`].
pub fn run_sample<B: Backend>(request: &SampleRequest, device: &B::Device, progress: impl FnMut(usize)) -> Result<Vec<PathBuf>, String> {
    run_sample_with::<B>(request, &Sd3SampleOptions::default(), device, progress)
}

/// [`run_sample`] with the SD3 options: a folder whose `model_index.json` names
/// `StableDiffusion3Pipeline` runs [`Sd3Pipeline`] (its own scheduler's shift, images of
/// `sd3.height x sd3.width`), any other folder the world pipeline.
pub fn run_sample_with<B: Backend>(
    request: &SampleRequest,
    sd3: &Sd3SampleOptions,
    device: &B::Device,
    progress: impl FnMut(usize),
) -> Result<Vec<PathBuf>, String> {
    if request.prompts.is_empty() {
        return Err("no prompt given (--prompt TEXT or --prompts FILE)".into());
    }
    if request.scale == 0 {
        return Err("--scale must be at least 1".into());
    }
    request.sampling.validate("sampling.")?;
    check_output_location("--out", &request.out, request.prompts.len() > 1)?;
    let prompts: Vec<&str> = request.prompts.iter().map(String::as_str).collect();
    let seeds: Vec<u64> = (0..prompts.len() as u64).map(|i| request.seed + i).collect();
    let images = if is_sd3_pipeline(&request.model) {
        sample_sd3::<B>(request, sd3, &prompts, &seeds, device, progress).map_err(|e| e.to_string())?
    } else {
        sample_world::<B>(request, &prompts, &seeds, device, progress)?
    };
    let paths = output_paths(request);
    if prompts.len() > 1 {
        std::fs::create_dir_all(&request.out).map_err(|e| format!("{}: {e}", request.out.display()))?;
        let listing: String = request.prompts.iter().enumerate().map(|(i, p)| format!("{i:04}.png\t{}\t{p}\n", request.seed + i as u64)).collect();
        crate::io::write_text_atomic(&request.out.join("prompts.txt"), &listing).map_err(|e| e.to_string())?;
    } else if let Some(parent) = request.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    for (rgb, path) in images.into_iter().zip(&paths) {
        let rgb = if request.scale > 1 {
            image::imageops::resize(&rgb, rgb.width() * request.scale, rgb.height() * request.scale, image::imageops::FilterType::Nearest)
        } else {
            rgb
        };
        crate::io::write_png_atomic(path, &rgb).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(paths)
}

/// Checks before any work that `path` (a folder if `folder`, else a file) can be made: an
/// existing path is of that kind, and the nearest existing folder above it is a folder (a path
/// below a regular file can never be created) that is not read-only. `flag` names the option
/// in the error.
pub fn check_output_location(flag: &str, path: &Path, folder: bool) -> Result<(), String> {
    let refuse = |why: String| Err(format!("{flag} {}: {why}", path.display()));
    if path.exists() {
        match (folder, path.is_dir()) {
            (true, false) => return refuse("exists and is not a folder".into()),
            (false, true) => return refuse("is a folder; name a .png file".into()),
            _ => {}
        }
    }
    let start = if folder { path } else { path.parent().unwrap_or(Path::new("")) };
    let mut ancestors = start.ancestors().map(|a| if a.as_os_str().is_empty() { Path::new(".") } else { a });
    let Some(existing) = ancestors.find(|a| a.exists()) else { return Ok(()) };
    if !existing.is_dir() {
        return refuse(format!("cannot be created: {} is not a folder", existing.display()));
    }
    if std::fs::metadata(existing).map(|m| m.permissions().readonly()).unwrap_or(false) {
        return refuse(format!("cannot be written: {} is read-only", existing.display()));
    }
    Ok(())
}

/// The synthetic world's pipeline: 32 x 32 images.
fn sample_world<B: Backend>(
    request: &SampleRequest,
    prompts: &[&str],
    seeds: &[u64],
    device: &B::Device,
    progress: impl FnMut(usize),
) -> Result<Vec<image::RgbImage>, String> {
    let pipeline = Pipeline::<B>::load(&request.model, device).map_err(|e| format!("--model: {e}"))?;
    let adapter = match &request.adapter {
        Some(path) => Some(load_lora(path, &pipeline.model.transformer, device).map_err(|e| format!("--adapter: {e}"))?),
        None => None,
    };
    let adapters = adapter.as_ref().map_or_else(ActiveAdapters::none, ActiveAdapters::single);
    generate(&pipeline, &adapters, prompts, seeds, &request.sampling, device, progress)
}

/// A diffusers SD3 folder: [`Sd3Pipeline::generate`] on chunks of `sampling.batch` prompts, each
/// prompt's noise from its own seed, decoded and rounded as diffusers' PIL output.
fn sample_sd3<B: Backend>(
    request: &SampleRequest,
    options: &Sd3SampleOptions,
    prompts: &[&str],
    seeds: &[u64],
    device: &B::Device,
    mut progress: impl FnMut(usize),
) -> Result<Vec<image::RgbImage>, Sd3SampleError> {
    let pipeline = Sd3Pipeline::<B>::load(&request.model, options.t5_length, device)?;
    let adapter = match &request.adapter {
        Some(path) => Some(load_lora(path, &pipeline.transformer, device)?),
        None => None,
    };
    let adapters = adapter.as_ref().map_or_else(ActiveAdapters::none, ActiveAdapters::single);
    let (default_height, default_width) = pipeline.default_size();
    let config = Sd3SampleConfig {
        steps: request.sampling.steps,
        guidance: request.sampling.guidance,
        height: options.height.unwrap_or(default_height),
        width: options.width.unwrap_or(default_width),
        negative_prompt: String::new(),
    };
    let batch = request.sampling.batch.max(1);
    let mut images = Vec::with_capacity(prompts.len());
    for (chunk, chunk_seeds) in prompts.chunks(batch).zip(seeds.chunks(batch)) {
        let latents = pipeline.generate(chunk, InitialLatents::Seeds(chunk_seeds), &config, &adapters)?;
        images.extend(to_rgb_images(pipeline.decode(latents)));
        progress(chunk.len());
    }
    Ok(images)
}

/// Why SD3 sampling failed: the pipeline or the adapter.
#[derive(Debug, thiserror::Error)]
enum Sd3SampleError {
    #[error(transparent)]
    Pipeline(#[from] Sd3PipelineError),
    #[error(transparent)]
    Adapter(#[from] LoraIoError),
}
