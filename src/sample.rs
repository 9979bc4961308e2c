//! `flow-opd sample`: text-to-image with a pipeline folder (optionally a LoRA adapter), 40-step
//! ODE with CFG by default (REFERENCE section 8), one PNG per prompt.
//!
//! Prompt `i` is seeded with `seed + i`, so an image depends only on its prompt, its seed and
//! the model, never on the batch it was drawn in.

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;

use crate::eval::generate::{GenerateConfig, generate};
use crate::model::lora::{ActiveAdapters, load_lora};
use crate::model::pipeline::Pipeline;

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

/// Reads prompts from a file, one per line (blank lines and lines starting with `#` skipped).
pub fn read_prompt_file(path: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let prompts: Vec<String> =
        text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from).collect();
    if prompts.is_empty() {
        return Err(format!("{}: no prompts (one per line)", path.display()));
    }
    Ok(prompts)
}

/// The files `request` writes, in prompt order.
pub fn output_paths(request: &SampleRequest) -> Vec<PathBuf> {
    match request.prompts.len() {
        1 => vec![request.out.clone()],
        n => (0..n).map(|i| request.out.join(format!("{i:04}.png"))).collect(),
    }
}

/// Samples every prompt and writes the PNGs (each through a temporary file); returns the paths.
pub fn run_sample<B: Backend>(request: &SampleRequest, device: &B::Device, progress: impl FnMut(usize)) -> Result<Vec<PathBuf>, String> {
    if request.prompts.is_empty() {
        return Err("no prompt given (--prompt TEXT or --prompts FILE)".into());
    }
    if request.scale == 0 {
        return Err("--scale must be at least 1".into());
    }
    let pipeline = Pipeline::<B>::load(&request.model, device).map_err(|e| e.to_string())?;
    let adapter = match &request.adapter {
        Some(path) => Some(load_lora(path, &pipeline.model.transformer, device).map_err(|e| e.to_string())?),
        None => None,
    };
    let adapters = adapter.as_ref().map_or_else(ActiveAdapters::none, ActiveAdapters::single);
    let prompts: Vec<&str> = request.prompts.iter().map(String::as_str).collect();
    let seeds: Vec<u64> = (0..prompts.len() as u64).map(|i| request.seed + i).collect();
    let images = generate(&pipeline, &adapters, &prompts, &seeds, &request.sampling, device, progress);
    let paths = output_paths(request);
    if prompts.len() > 1 {
        std::fs::create_dir_all(&request.out).map_err(|e| format!("{}: {e}", request.out.display()))?;
        let listing: String = request.prompts.iter().enumerate().map(|(i, p)| format!("{i:04}.png\t{}\t{p}\n", request.seed + i as u64)).collect();
        crate::model::weights::write_text_atomic(&request.out.join("prompts.txt"), &listing).map_err(|e| e.to_string())?;
    } else if let Some(parent) = request.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    for (image, path) in images.iter().zip(&paths) {
        let rgb = image.to_rgb_image();
        let rgb = if request.scale > 1 {
            image::imageops::resize(&rgb, rgb.width() * request.scale, rgb.height() * request.scale, image::imageops::FilterType::Nearest)
        } else {
            rgb
        };
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = path.with_file_name(format!(".{name}.tmp"));
        rgb.save_with_format(&tmp, image::ImageFormat::Png)
            .map_err(|e| e.to_string())
            .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| e.to_string()))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(paths)
}
