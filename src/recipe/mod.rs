//! TOML recipes: a named list of stages whose outputs feed later stages by name. Every run
//! writes `runs/<name>/`: the resolved recipe, `metrics.jsonl`, stage outputs (pipelines,
//! adapters), sample grids and `results.md`.
//!
//! ```toml
//! name = "pretrain"
//!
//! [[stage]]
//! kind = "pretrain"        # flow-matching pre-training of a world pipeline
//! output = "base"          # stage output name (runs/<name>/base/)
//! export = "models/world_base"
//! train = { steps = 4000, batch_size = 32, optim = { lr = 3e-4 } }
//!
//! [[stage]]
//! kind = "eval"
//! model = "base"           # a stage output or a path
//! row = "Base"
//! ```
//!
//! The file format and its checks are in [`schema`], one function per stage kind in
//! [`stages`], the training loop they share in [`stage_loop`], and the gradient diagnostic of
//! `flow-opd gradient-snr` in [`diagnostic`].

pub mod diagnostic;
pub mod progress;
pub mod schema;
pub mod stage_loop;
pub mod stages;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use diagnostic::grpo_gradient_snr;
pub use schema::{EvalStage, GrpoStage, MergeStage, NftStage, OpdStage, RewardStage, PretrainStage, Recipe, RecipeError, RowsStage, SftStage, Stage, StageCommon};
pub use stage_loop::{Interrupter, progress_bar};

use crate::Backend;
use crate::io::metrics::MetricsLog;
use progress::{Ended, Progress};
use crate::pipeline::{AnyPipeline, Sd3Options};

/// Where a run writes and what its stages produced.
pub struct RunContext {
    pub dir: PathBuf,
    pub outputs: BTreeMap<String, PathBuf>,
    pub metrics: MetricsLog,
    pub sd3: Sd3Options,
    /// Checked by the training loops after every step.
    pub interrupter: Interrupter,
    /// The running stage's key ([`progress::stage_key`]): its checkpoints carry it.
    pub stage_key: String,
    /// Whether the running stage is where a resumed run continues (from its last checkpoint).
    pub resuming: bool,
    /// Length of `metrics.jsonl` after the last stage a resumed run kept.
    pub metrics_floor: u64,
    /// Set by the training loop: whether the stage ran to its last step.
    pub complete: bool,
}

impl RunContext {
    /// The context of a run in `dir` that logs to `metrics`.
    pub fn new(dir: PathBuf, metrics: MetricsLog, sd3: Sd3Options, interrupter: Interrupter) -> Self {
        Self {
            dir,
            outputs: BTreeMap::new(),
            metrics,
            sd3,
            interrupter,
            stage_key: String::new(),
            resuming: false,
            metrics_floor: 0,
            complete: true,
        }
    }

    /// A stage output by name, or the path itself.
    pub fn resolve(&self, name: &str) -> PathBuf {
        self.outputs.get(name).cloned().unwrap_or_else(|| PathBuf::from(name))
    }

    /// A stage's `model`: a world pipeline or an SD3 folder (at the recipe's `[sd3]` size).
    pub fn pipeline<B: Backend>(&self, name: &str, device: &B::Device) -> Result<AnyPipeline<B>, String> {
        AnyPipeline::load(&self.resolve(name), &self.sd3, device)
    }
}

/// The recipe file `name` names: the path itself when it exists, else a file of that name
/// under `recipes_dir` (`recipes/NAME`, then `recipes/world/NAME`, then the one match in any
/// folder below), so `flow-opd recipe merge_opd.toml` and the older spelling
/// `recipes/merge_opd.toml` both find `recipes/world/merge_opd.toml`.
pub fn find_recipe(name: &Path, recipes_dir: &Path) -> Result<PathBuf, RecipeError> {
    if name.exists() {
        return Ok(name.to_path_buf());
    }
    let not_found = |message: String| RecipeError::Io { path: name.to_path_buf(), source: std::io::Error::new(std::io::ErrorKind::NotFound, message) };
    let Some(file) = name.file_name() else { return Err(not_found("no such file".into())) };
    for preferred in [recipes_dir.join(file), recipes_dir.join("world").join(file)] {
        if preferred.is_file() {
            return Ok(preferred);
        }
    }
    let mut found = Vec::new();
    let mut folders = vec![recipes_dir.to_path_buf()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                folders.push(path);
            } else if path.file_name() == Some(file) {
                found.push(path);
            }
        }
    }
    found.sort();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(not_found(format!("no such file, and no recipe of that name under {}", recipes_dir.display()))),
        several => Err(not_found(format!(
            "no such file, and several recipes of that name: {}",
            several.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        ))),
    }
}

/// A run starts a fresh `metrics.jsonl` (so its curves show this run only): an earlier run's
/// log is renamed to the first free `metrics.previous-N.jsonl`, not lost.
fn keep_previous_metrics(path: &Path) -> std::io::Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let kept = (1..).map(|n| path.with_file_name(format!("metrics.previous-{n}.jsonl"))).find(|p| !p.exists()).expect("a free name");
    std::fs::rename(path, &kept)?;
    tracing::info!("the previous run's metrics were moved to {}", kept.display());
    Ok(())
}

/// Runs every stage of `recipe` on backend `B`, writing into `runs_dir/<name>/`.
pub fn run_recipe<B: Backend>(recipe: &Recipe, runs_dir: &Path, device: &B::Device) -> Result<RunContext, RecipeError> {
    run_recipe_on::<B>(recipe, runs_dir, std::slice::from_ref(device))
}

/// [`run_recipe`] over several devices of backend `B`: the pre-training, GRPO and OPD stages
/// train data-parallel, one peer per device ([`crate::train::parallel`]; a device may be named
/// more than once, e.g. two peers on one CPU or GPU), evaluations split their prompts among the
/// devices (the same images as on one), the merge and SFT stages run on the first device.
pub fn run_recipe_on<B: Backend>(recipe: &Recipe, runs_dir: &Path, devices: &[B::Device]) -> Result<RunContext, RecipeError> {
    run_recipe_with::<B>(recipe, runs_dir, devices, Interrupter::new())
}

/// [`run_recipe_on`] with a stop flag the training loops check after every step (the CLI passes
/// [`Interrupter::ctrl_c`]).
pub fn run_recipe_with<B: Backend>(
    recipe: &Recipe,
    runs_dir: &Path,
    devices: &[B::Device],
    interrupter: Interrupter,
) -> Result<RunContext, RecipeError> {
    let Some(device) = devices.first() else {
        return Err(RecipeError::Stage { index: 0, kind: "recipe", message: "no device given".into() });
    };
    let dir = runs_dir.join(&recipe.name);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |e: String| RecipeError::Io { path, source: std::io::Error::other(e) }
    };
    std::fs::create_dir_all(&dir).map_err(|source| RecipeError::Io { path: dir.clone(), source })?;
    let previous = if recipe.resume { Progress::read(&dir).map_err(io(&dir.join(progress::FILE)))? } else { None };
    if recipe.resume && previous.is_none() {
        tracing::info!("nothing to resume in {}: starting the run", dir.display());
    }
    let resolved = recipe.resolved();
    crate::io::write_text_atomic(&dir.join("recipe.toml"), &resolved).map_err(|e| io(&dir.join("recipe.toml"))(e.to_string()))?;
    let metrics_path = dir.join("metrics.jsonl");
    if previous.is_none() {
        keep_previous_metrics(&metrics_path).map_err(|source| RecipeError::Io { path: metrics_path.clone(), source })?;
    }
    let metrics = MetricsLog::open(&metrics_path).map_err(|source| RecipeError::Io { path: metrics_path, source })?;
    let mut ctx = RunContext::new(dir, metrics, recipe.sd3.clone(), interrupter);
    let mut progress = Progress::default();
    progress.write(&ctx.dir).map_err(io(&ctx.dir.join(progress::FILE)))?;
    // A resumed run keeps the stages that ended, up to the first that did not (or whose
    // outputs changed); that one continues from its checkpoint, the later ones run afresh.
    let mut keeping = previous.is_some();
    for (index, stage) in recipe.stages.iter().enumerate() {
        let key = progress::stage_key(stage, &recipe.sd3);
        let what = format!("stage {index} ({}{})", stage.kind(), stage.common().output.map(|o| format!(" `{o}`")).unwrap_or_default());
        if keeping {
            let ended = previous.as_ref().and_then(|p| p.ended(index));
            let kept = match ended {
                Some(e) if e.key != key => Err("its settings changed since it ran".to_string()),
                Some(e) if !e.complete => Err("it stopped before its last step".to_string()),
                Some(e) => progress::verify(e, &ctx.dir).map(|()| e),
                None => Err("it had not ended".to_string()),
            };
            match kept {
                Ok(ended) => {
                    tracing::info!("{what}: ended in an earlier run, outputs verified: kept");
                    if let Some(output) = stage.common().output {
                        ctx.outputs.insert(output.to_string(), ctx.dir.join(output));
                    }
                    ctx.metrics_floor = ended.metrics_bytes;
                    progress.stages.push(ended.clone());
                    progress.write(&ctx.dir).map_err(io(&ctx.dir.join(progress::FILE)))?;
                    continue;
                }
                Err(why) => {
                    tracing::info!("{what}: {why}; the run continues here");
                    keeping = false;
                    ctx.resuming = true;
                    if !stage.trains() {
                        let floor = ctx.metrics_floor;
                        ctx.metrics.truncate(floor).map_err(|source| RecipeError::Io { path: ctx.metrics.path().to_path_buf(), source })?;
                    }
                }
            }
        }
        ctx.stage_key = key.clone();
        ctx.complete = true;
        let before = progress::snapshot(&ctx.dir);
        let done = match stage {
            Stage::Pretrain(_) => stages::pretrain::<B>(stage, &mut ctx, devices),
            Stage::Grpo(_) => stages::grpo::<B>(stage, &mut ctx, devices),
            Stage::Nft(_) => stages::nft::<B>(stage, &mut ctx, devices),
            Stage::Merge(s) => stages::merge::<B>(s, &mut ctx, device),
            Stage::Sft(_) => stages::sft::<B>(stage, &mut ctx, device),
            Stage::Opd(_) => stages::opd::<B>(stage, &mut ctx, devices),
            Stage::Eval(s) => stages::eval::<B>(s, &mut ctx, devices),
            Stage::Rows(s) => stages::rows(s, &ctx),
        };
        ctx.resuming = false;
        done.map_err(|message| RecipeError::Stage { index, kind: stage.kind(), message })?;
        let ended = Ended {
            index,
            kind: stage.kind().to_string(),
            key,
            complete: ctx.complete,
            metrics_bytes: ctx.metrics.len().map_err(|source| RecipeError::Io { path: ctx.metrics.path().to_path_buf(), source })?,
            files: progress::written_since(&ctx.dir, &before).map_err(io(&ctx.dir))?,
            rows: match stage {
                Stage::Eval(s) => vec![s.row_name()],
                _ => Vec::new(),
            },
        };
        progress.stages.push(ended);
        progress.write(&ctx.dir).map_err(io(&ctx.dir.join(progress::FILE)))?;
        if stage.trains() {
            match crate::eval::curves::write_curves(&ctx.dir) {
                Ok(path) => tracing::info!("curves: {}", path.display()),
                Err(e) => tracing::warn!("no curves drawn: {e}"),
            }
        }
        if matches!(stage, Stage::Eval(_) | Stage::Rows(_)) || index + 1 == recipe.stages.len() {
            match crate::eval::report::write_report(&ctx.dir) {
                Ok(path) => tracing::info!("report: {}", path.display()),
                Err(e) => tracing::warn!("no report written: {e}"),
            }
        }
    }
    if keeping && !recipe.stages.is_empty() {
        tracing::info!("every stage had ended in an earlier run: nothing to do");
    }
    Ok(ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipes_are_found_by_name() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes");
        let main = root.join("world/merge_opd.toml");
        assert_eq!(find_recipe(Path::new("merge_opd.toml"), &root).unwrap(), main);
        assert_eq!(find_recipe(Path::new("recipes/merge_opd.toml"), &root).unwrap(), main);
        assert_eq!(find_recipe(&main, &root).unwrap(), main);
        assert_eq!(find_recipe(Path::new("opd_ablations.toml"), &root).unwrap(), root.join("experiments/opd_ablations.toml"));
        let err = find_recipe(Path::new("no_such_recipe.toml"), &root).unwrap_err().to_string();
        assert!(err.contains("no_such_recipe.toml") && err.contains("no recipe of that name"), "{err}");
        assert_eq!(find_recipe(Path::new("grpo_mix.toml"), &root).unwrap(), root.join("world/grpo_mix.toml"));
        // Several matches outside recipes/ and recipes/world/: an error naming them, none chosen.
        let tmp = tempfile::tempdir().unwrap();
        for dir in ["a", "b"] {
            std::fs::create_dir_all(tmp.path().join(dir)).unwrap();
            std::fs::write(tmp.path().join(dir).join("x.toml"), "").unwrap();
        }
        let err = find_recipe(Path::new("x.toml"), tmp.path()).unwrap_err().to_string();
        assert!(err.contains("several") && err.contains("a/x.toml") && err.contains("b/x.toml"), "{err}");
    }
}
