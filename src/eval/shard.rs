//! Evaluation over several devices: each device samples a contiguous share of every task's
//! prompts with the seeds those prompts have in the whole list, so the images, and hence the
//! table, are the ones a single device makes.

use image::RgbImage;

use super::{EvalConfig, TaskResult, eval_seeds, evaluate, score_images};
use crate::Backend;
use crate::model::lora::{ActiveAdapters, LoraAdapter};
use crate::pipeline::generate::generate;
use crate::pipeline::AnyPipeline;
use crate::world::Task;

/// Samples and scores `prompts` with one loaded pipeline (and adapter) per device, `progress`
/// told how many images each batch made.
pub fn evaluate_on<B: Backend>(
    mut loaded: Vec<(AnyPipeline<B>, Option<LoraAdapter<B>>)>,
    devices: &[B::Device],
    config: &EvalConfig,
    prompts: Vec<(Task, Vec<String>)>,
    progress: impl Fn(usize) + Sync,
) -> Result<Vec<TaskResult>, String> {
    config.validate("eval.")?;
    if let ([device], [(pipeline, adapter)]) = (devices, loaded.as_slice()) {
        let adapters = adapter.as_ref().map_or_else(ActiveAdapters::none, ActiveAdapters::single);
        return evaluate(pipeline, &adapters, config, prompts, device, |_, n| progress(n)).map_err(|e| e.to_string());
    }
    let (count, prompts_ref, progress) = (devices.len(), &prompts, &progress);
    let share = |n: usize, d: usize| n * d / count..n * (d + 1) / count;
    let shares: Vec<Result<Vec<Vec<RgbImage>>, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = devices
            .iter()
            .zip(loaded.drain(..))
            .enumerate()
            .map(|(d, (device, (pipeline, adapter)))| {
                scope.spawn(move || {
                    let adapters = adapter.as_ref().map_or_else(ActiveAdapters::none, ActiveAdapters::single);
                    prompts_ref
                        .iter()
                        .map(|(_, texts)| {
                            let rows = share(texts.len(), d);
                            let refs: Vec<&str> = texts[rows.clone()].iter().map(String::as_str).collect();
                            let seeds = eval_seeds(config, rows);
                            generate(&pipeline, &adapters, &refs, &seeds, &config.sampling, device, |n| progress(n))
                        })
                        .collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("an evaluation thread panicked".into()))).collect()
    });
    let mut shares = shares.into_iter().collect::<Result<Vec<_>, _>>()?;
    let images = prompts
        .into_iter()
        .enumerate()
        .map(|(t, (task, texts))| (task, texts, shares.iter_mut().flat_map(|s| std::mem::take(&mut s[t])).collect()))
        .collect();
    score_images(config, images).map_err(|e| e.to_string())
}
