//! `flow-opd gradient-snr`: the Flow-GRPO gradient's signal-to-noise ratio at a recipe GRPO
//! stage's starting policy ([`crate::train::grpo_snr`]), nothing trained or written.

use std::path::{Path, PathBuf};

use burn::backend::Autodiff;

use super::schema::{GrpoStage, Recipe, Stage};
use super::stage_loop::progress_bar;
use crate::Backend;
use crate::model::lora::load_lora;
use crate::pipeline::{AnyPipeline, TextToImage};
use crate::train::grpo::grpo_trainer;

/// The signal-to-noise ratio of the Flow-GRPO gradient of the recipe's GRPO stage `output`
/// ([`crate::train::grpo_snr`]): `estimates` independent gradients of the stage's starting
/// policy (its `model`, plus its `init` adapter if any) on its partition `partition`, with the
/// stage's rollout, rewards and loss, nothing trained or written. A `model` or `init` that names an earlier stage's output
/// is looked up in `runs_dir/<recipe name>/`.
pub fn grpo_gradient_snr<B: Backend>(
    recipe: &Recipe,
    runs_dir: &Path,
    output: &str,
    partition: usize,
    estimates: usize,
    device: &B::Device,
) -> Result<crate::train::grpo_snr::GradientSnr, String> {
    crate::train::grpo_snr::check_estimates(estimates)?;
    let stages: Vec<&GrpoStage> = recipe.stages.iter().filter_map(|s| if let Stage::Grpo(g) = s { Some(g) } else { None }).collect();
    let stage = stages.iter().find(|s| s.output == output).ok_or_else(|| {
        let names: Vec<&str> = stages.iter().map(|s| s.output.as_str()).collect();
        format!("recipe `{}` has no grpo stage with output `{output}` (its grpo stages: {})", recipe.name, names.join(", "))
    })?;
    if partition >= stage.train.partitions.len() {
        return Err(format!("stage `{output}`: partition {partition}, but it has {} (0-based)", stage.train.partitions.len()));
    }
    let run = runs_dir.join(&recipe.name);
    let locate = |name: &str, field: &str| -> Result<PathBuf, String> {
        let (own, earlier) = (PathBuf::from(name), run.join(name));
        if own.exists() {
            Ok(own)
        } else if earlier.exists() {
            Ok(earlier)
        } else {
            Err(format!("stage `{output}`: `{field}` = `{name}` is neither a folder nor an output in {}", run.display()))
        }
    };
    let model = locate(&stage.model, "model")?;
    let pipeline = AnyPipeline::<B>::load(&model, &recipe.sd3, device)?;
    let init = match &stage.init {
        Some(a) => Some(load_lora(&locate(a, "init")?, pipeline.transformer(), device).map_err(|e| format!("{a}: {e}"))?),
        None => None,
    };
    let mut trainer = grpo_trainer::<Autodiff<B>>(pipeline, init, stage.train.clone(), device)?;
    let bar = progress_bar(estimates as u64, "gradients");
    let snr = crate::train::grpo_snr::measure(&mut trainer, partition, estimates, device, |k, stats, norm| {
        bar.set_position(k as u64 + 1);
        bar.set_message(format!("reward {:.3}", stats.reward));
        tracing::info!(
            "estimate {}: reward {:.4}, zero-std groups {:.2}, within-group share {:.2}, |g| {norm:.3e}",
            k + 1,
            stats.reward,
            stats.groups.zero_std_fraction,
            stats.groups.within_share
        );
    });
    bar.finish_and_clear();
    snr
}
