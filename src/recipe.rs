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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::backend::Autodiff;
use crate::Backend;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::eval::{EvalConfig, ResultsTable, evaluate, row, write_grids};
use crate::model::lora::{ActiveAdapters, load_lora};
use crate::model::pipeline::{Pipeline, WorldModelConfig};
use crate::train::metrics::MetricsLog;
use crate::model::lora::{MergeMethod, combine};
use crate::train::grpo::{GrpoConfig, grpo_trainer};
use crate::train::parallel::{Peer, first_error, run_peers};
use std::sync::Mutex;
use crate::train::opd::{OpdConfig, Teachers, opd_trainer};
use crate::train::sft::{SftConfig, sft_trainer, teacher_samples};
use crate::model::t2i::{AnyPipeline, Sd3Options, TextToImage};
use crate::world::Task;
use crate::train::pretrain::{CaptionSource, PretrainConfig, WorldPairs, pretrainer, to_autodiff};
use crate::world::render::Layout;

/// A recipe file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Run name: outputs go to `<runs>/<name>/`.
    pub name: String,
    /// How SD3 / SD3.5 folders are run (image size, T5 length); unused by world pipelines.
    #[serde(default)]
    pub sd3: Sd3Options,
    #[serde(rename = "stage")]
    pub stages: Vec<Stage>,
}

/// One stage of a recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Stage {
    Pretrain(PretrainStage),
    Grpo(GrpoStage),
    Merge(MergeStage),
    Sft(SftStage),
    Opd(OpdStage),
    Eval(EvalStage),
    Rows(RowsStage),
}

/// Rows imported into this run's table from a table evaluated elsewhere (same prompts, seeds
/// and sampler), so a recipe compares against shipped models without re-evaluating them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RowsStage {
    /// A `results.json` file or a run folder holding one.
    pub from: PathBuf,
    /// The rows to import, by model name, in this order (all if absent).
    #[serde(default)]
    pub rows: Option<Vec<String>>,
}

/// Cold start by merging task adapters into one student adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergeStage {
    pub output: String,
    /// The pipeline the adapters belong to.
    pub model: String,
    /// Adapters (stage outputs or paths) with their weights.
    pub adapters: BTreeMap<String, f64>,
    /// `exact` (weighted average of the updates, default) or `average_factors`.
    #[serde(default)]
    pub method: MergeMethod,
}

/// Cold start by SFT: task teachers sample their partitions, the student fits them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftStage {
    pub output: String,
    pub model: String,
    /// Task -> teacher adapter (stage output or path).
    pub routing: BTreeMap<Task, String>,
    #[serde(default)]
    pub export: Option<PathBuf>,
    pub train: SftConfig,
}

/// On-policy distillation of routed task teachers (+ MAR anchor) into a student adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpdStage {
    pub output: String,
    pub model: String,
    /// Cold-start student adapter (a merge or SFT output); fresh if absent.
    #[serde(default)]
    pub init: Option<String>,
    /// Routing table: task -> teacher adapter (stage output or path).
    pub routing: BTreeMap<Task, String>,
    /// MAR anchor: a teacher adapter, `"base"` for the base model; none with `mar_lambda = 0`.
    #[serde(default)]
    pub anchor: Option<String>,
    #[serde(default = "default_checkpoint_grpo")]
    pub checkpoint_every: usize,
    #[serde(default)]
    pub export: Option<PathBuf>,
    /// Wall-clock budget of the training loop in seconds: it ends after the first iteration
    /// that finishes past it (before `iterations`), saves and exports the adapter, and the
    /// recipe goes on. No budget if absent.
    #[serde(default)]
    pub max_seconds: Option<f64>,
    pub train: OpdConfig,
}

/// Flow-GRPO training of one LoRA adapter on a pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpoStage {
    /// Name of the resulting adapter (PEFT layout in `runs/<run>/<output>/`).
    pub output: String,
    /// The frozen pipeline (stage output or folder).
    pub model: String,
    /// Start from this adapter instead of a fresh one.
    #[serde(default)]
    pub init: Option<String>,
    /// Save the EMA adapter every this many iterations (and at the end).
    #[serde(default = "default_checkpoint_grpo")]
    pub checkpoint_every: usize,
    /// Also write the final adapter here (e.g. `models/teachers/ocr`).
    #[serde(default)]
    pub export: Option<PathBuf>,
    /// Wall-clock budget of the training loop in seconds: it ends after the first iteration
    /// that finishes past it (before `iterations`), saves and exports the adapter, and the
    /// recipe goes on. No budget if absent.
    #[serde(default)]
    pub max_seconds: Option<f64>,
    pub train: GrpoConfig,
}

fn default_checkpoint_grpo() -> usize {
    10
}

/// Flow-matching pre-training of a world pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainStage {
    /// Name of the resulting pipeline (saved as `runs/<run>/<output>/`).
    pub output: String,
    /// Start from this pipeline folder instead of fresh weights.
    #[serde(default)]
    pub init: Option<String>,
    #[serde(default)]
    pub model: WorldModelConfig,
    /// Fraction of training pairs whose image departs from the caption.
    #[serde(default = "default_wrong")]
    pub wrong_caption_fraction: f32,
    /// Where captions come from: `train_split` (the RL training prompts) or `grammar` (fresh
    /// draws that avoid the test prompts where the family allows).
    #[serde(default)]
    pub captions: CaptionSource,
    /// How training images are laid out: `scattered` (as anywhere in the world) or
    /// `canonical` (fixed slots and default colours a tiny model can learn to draw).
    #[serde(default)]
    pub layout: Layout,
    /// Save the EMA pipeline every this many steps (and at the end).
    #[serde(default = "default_checkpoint")]
    pub checkpoint_every: usize,
    /// Also write the final pipeline here (e.g. `models/world_base`).
    #[serde(default)]
    pub export: Option<PathBuf>,
    /// Wall-clock budget of the training loop in seconds: it ends after the first step that
    /// finishes past it (before `train.steps`), saves and exports the pipeline, and the recipe
    /// goes on (for a GPU lent for a fixed time). No budget if absent.
    #[serde(default)]
    pub max_seconds: Option<f64>,
    /// Steps, batch, optimiser, timestep sampling, EMA, seed.
    pub train: PretrainConfig,
}

fn default_wrong() -> f32 {
    0.3
}
fn default_checkpoint() -> usize {
    1000
}

/// Evaluation of a pipeline (optionally with an adapter) on the test prompts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalStage {
    /// A stage output name or a pipeline folder.
    pub model: String,
    /// A LoRA adapter (stage output name or path).
    #[serde(default)]
    pub adapter: Option<String>,
    /// Row label in `results.md` (defaults to the model name).
    #[serde(default)]
    pub row: Option<String>,
    /// Sampling, prompts per task, seed, tasks.
    #[serde(default)]
    pub eval: EvalConfig,
    /// Also add the row to this `results.json` (e.g. `models/results.json`, the table the
    /// shipped models were evaluated into).
    #[serde(default)]
    pub export: Option<PathBuf>,
}

/// Why a recipe could not run.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("stage {index} ({kind}): {message}")]
    Stage { index: usize, kind: &'static str, message: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

impl Recipe {
    /// Reads and validates a recipe; errors name the file and the field at fault.
    pub fn from_file(path: &Path) -> Result<Self, RecipeError> {
        Self::from_file_with(path, &BTreeMap::new())
    }

    /// As [`Recipe::from_file`], with named inputs: a stage value `"$name"` or `"$name/rest"`
    /// (e.g. `model = "$model"`) is replaced by `inputs[name]` (e.g. `recipe --model PATH`).
    pub fn from_file_with(path: &Path, inputs: &BTreeMap<String, String>) -> Result<Self, RecipeError> {
        let text = std::fs::read_to_string(path).map_err(|source| RecipeError::Io { path: path.to_path_buf(), source })?;
        Self::from_toml_with(path, &text, inputs)
    }

    pub fn from_toml(path: &Path, text: &str) -> Result<Self, RecipeError> {
        Self::from_toml_with(path, text, &BTreeMap::new())
    }

    pub fn from_toml_with(path: &Path, text: &str, inputs: &BTreeMap<String, String>) -> Result<Self, RecipeError> {
        let parse = |message: String| RecipeError::Parse { path: path.to_path_buf(), message };
        // Stages are read one by one with their own type so errors carry the field path
        // (an internally tagged enum would hide it).
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Raw {
            name: String,
            #[serde(default)]
            sd3: Sd3Options,
            #[serde(default)]
            stage: Vec<toml::Table>,
        }
        let raw: Raw = toml::from_str(text).map_err(|e| parse(e.to_string()))?;
        let mut stages = Vec::with_capacity(raw.stage.len());
        for (i, mut table) in raw.stage.into_iter().enumerate() {
            substitute_inputs(&mut table, inputs).map_err(|e| parse(format!("stage {i}: {e}")))?;
            let kind = match table.remove("kind") {
                Some(toml::Value::String(kind)) => kind,
                Some(other) => return Err(parse(format!("stage {i}: `kind` must be a string, found {other}"))),
                None => return Err(parse(format!("stage {i}: missing `kind` (pretrain or eval)"))),
            };
            fn typed<T: serde::de::DeserializeOwned>(i: usize, kind: &str, table: toml::Table) -> Result<T, String> {
                serde_path_to_error::deserialize(toml::Value::Table(table))
                    .map_err(|e| format!("stage {i} ({kind}): `{}`: {}", e.path(), e.inner()))
            }
            let stage = match kind.as_str() {
                "pretrain" => Stage::Pretrain(typed(i, &kind, table).map_err(parse)?),
                "grpo" => Stage::Grpo(typed(i, &kind, table).map_err(parse)?),
                "merge" => Stage::Merge(typed(i, &kind, table).map_err(parse)?),
                "sft" => Stage::Sft(typed(i, &kind, table).map_err(parse)?),
                "opd" => Stage::Opd(typed(i, &kind, table).map_err(parse)?),
                "eval" => Stage::Eval(typed(i, &kind, table).map_err(parse)?),
                "rows" => Stage::Rows(typed(i, &kind, table).map_err(parse)?),
                other => {
                    return Err(parse(format!(
                        "stage {i}: unknown `kind` = \"{other}\" (expected pretrain, grpo, merge, sft, opd, eval or rows)"
                    )));
                }
            };
            stages.push(stage);
        }
        let recipe = Recipe { name: raw.name, sd3: raw.sd3, stages };
        recipe.validate().map_err(parse)?;
        Ok(recipe)
    }

    /// Checks that every stage input names an earlier output or an existing path.
    fn validate(&self) -> Result<(), String> {
        let mut outputs: Vec<&str> = Vec::new();
        for (i, stage) in self.stages.iter().enumerate() {
            let need = |name: &str, field: &str| {
                if outputs.contains(&name) || Path::new(name).exists() {
                    Ok(())
                } else {
                    Err(format!("stage {i}: `{field}` = \"{name}\" is neither an earlier stage's output nor an existing path"))
                }
            };
            let budget = |max_seconds: Option<f64>| match max_seconds {
                Some(m) if !(m.is_finite() && m >= 0.0) => {
                    Err(format!("stage {i}: `max_seconds` = {m} must be a finite number of seconds >= 0"))
                }
                _ => Ok(()),
            };
            match stage {
                Stage::Pretrain(s) => {
                    budget(s.max_seconds)?;
                    if let Some(init) = &s.init {
                        need(init, "init")?;
                    }
                    outputs.push(&s.output);
                }
                Stage::Grpo(s) => {
                    budget(s.max_seconds)?;
                    need(&s.model, "model")?;
                    if let Some(init) = &s.init {
                        need(init, "init")?;
                    }
                    outputs.push(&s.output);
                }
                Stage::Merge(s) => {
                    need(&s.model, "model")?;
                    for a in s.adapters.keys() {
                        need(a, "adapters")?;
                    }
                    outputs.push(&s.output);
                }
                Stage::Sft(s) => {
                    need(&s.model, "model")?;
                    for a in s.routing.values() {
                        need(a, "routing")?;
                    }
                    outputs.push(&s.output);
                }
                Stage::Opd(s) => {
                    budget(s.max_seconds)?;
                    need(&s.model, "model")?;
                    if let Some(init) = &s.init {
                        need(init, "init")?;
                    }
                    for a in s.routing.values() {
                        need(a, "routing")?;
                    }
                    if let Some(a) = s.anchor.as_deref().filter(|a| *a != "base") {
                        need(a, "anchor")?;
                    }
                    outputs.push(&s.output);
                }
                Stage::Eval(s) => {
                    need(&s.model, "model")?;
                    if let Some(a) = &s.adapter {
                        need(a, "adapter")?;
                    }
                }
                Stage::Rows(s) => {
                    if !s.from.exists() {
                        return Err(format!("stage {i}: `from` = \"{}\" does not exist", s.from.display()));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Replaces every string `"$name"` or `"$name/rest"` in `table` (values and keys, nested
/// tables and arrays included) by `inputs[name]` (joined with `rest`); an input the command
/// line did not give is an error naming its flag.
fn substitute_inputs(table: &mut toml::Table, inputs: &BTreeMap<String, String>) -> Result<(), String> {
    fn text(s: &str, inputs: &BTreeMap<String, String>) -> Result<Option<String>, String> {
        let Some(reference) = s.strip_prefix('$') else { return Ok(None) };
        let (name, rest) = reference.split_once('/').map_or((reference, None), |(n, r)| (n, Some(r)));
        let given = inputs.get(name).ok_or_else(|| format!("`\"{s}\"` needs `--{name} PATH` on the command line"))?;
        Ok(Some(match rest {
            Some(rest) => Path::new(given).join(rest).to_string_lossy().into_owned(),
            None => given.clone(),
        }))
    }
    fn walk(value: &mut toml::Value, inputs: &BTreeMap<String, String>) -> Result<(), String> {
        match value {
            toml::Value::String(s) => {
                if let Some(new) = text(s, inputs)? {
                    *s = new;
                }
            }
            toml::Value::Array(items) => items.iter_mut().try_for_each(|v| walk(v, inputs))?,
            toml::Value::Table(t) => substitute_inputs(t, inputs)?,
            _ => {}
        }
        Ok(())
    }
    // Keys too: `adapters = { "$teachers/geneval" = 0.5 }`.
    let mut out = toml::Table::new();
    for (key, mut value) in std::mem::take(table) {
        walk(&mut value, inputs)?;
        out.insert(text(&key, inputs)?.unwrap_or(key), value);
    }
    *table = out;
    Ok(())
}

/// Where a run writes and what its stages produced.
pub struct RunContext {
    pub dir: PathBuf,
    pub outputs: BTreeMap<String, PathBuf>,
    pub metrics: MetricsLog,
    pub sd3: Sd3Options,
}

impl RunContext {
    /// A stage output by name, or the path itself.
    pub fn resolve(&self, name: &str) -> PathBuf {
        self.outputs.get(name).cloned().unwrap_or_else(|| PathBuf::from(name))
    }

    /// A stage's `model`: a world pipeline or an SD3 folder (at the recipe's `[sd3]` size).
    pub fn pipeline<B: Backend>(&self, name: &str, device: &B::Device) -> Result<AnyPipeline<B>, String> {
        AnyPipeline::load(&self.resolve(name), &self.sd3, device)
    }
}

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Installs a Ctrl-C handler (once): training loops then stop after the current step, save
/// their checkpoint and end the run with an error saying where it is.
pub fn install_interrupt_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = ctrlc::set_handler(|| {
            if INTERRUPTED.swap(true, std::sync::atomic::Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!("\ninterrupted: finishing the current step and saving a checkpoint (Ctrl-C again to quit at once)");
        });
    });
}

fn interrupted() -> bool {
    INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst)
}

/// A progress bar with rate and ETA.
pub fn progress_bar(len: u64, label: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>12} [{elapsed_precise}] {bar:30} {pos}/{len} {per_sec} ETA {eta} {msg}")
            .expect("valid template"),
    );
    bar.set_prefix(label.to_string());
    bar
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
    let Some(device) = devices.first() else {
        return Err(RecipeError::Stage { index: 0, kind: "recipe", message: "no device given".into() });
    };
    install_interrupt_handler();
    let dir = runs_dir.join(&recipe.name);
    std::fs::create_dir_all(&dir).map_err(|source| RecipeError::Io { path: dir.clone(), source })?;
    let resolved = toml::to_string_pretty(recipe).expect("recipe serialises");
    crate::model::weights::write_text_atomic(&dir.join("recipe.toml"), &resolved)
        .map_err(|e| RecipeError::Io { path: dir.join("recipe.toml"), source: std::io::Error::other(e.to_string()) })?;
    let metrics_path = dir.join("metrics.jsonl");
    keep_previous_metrics(&metrics_path).map_err(|source| RecipeError::Io { path: metrics_path.clone(), source })?;
    let metrics = MetricsLog::open(&metrics_path).map_err(|source| RecipeError::Io { path: metrics_path, source })?;
    let mut ctx = RunContext { dir, outputs: BTreeMap::new(), metrics, sd3: recipe.sd3.clone() };
    for (index, stage) in recipe.stages.iter().enumerate() {
        match stage {
            Stage::Pretrain(s) => run_pretrain::<B>(s, &mut ctx, devices)
                .map_err(|message| RecipeError::Stage { index, kind: "pretrain", message })?,
            Stage::Grpo(s) => run_grpo::<B>(s, &mut ctx, devices)
                .map_err(|message| RecipeError::Stage { index, kind: "grpo", message })?,
            Stage::Merge(s) => run_merge::<B>(s, &mut ctx, device)
                .map_err(|message| RecipeError::Stage { index, kind: "merge", message })?,
            Stage::Sft(s) => run_sft::<B>(s, &mut ctx, device)
                .map_err(|message| RecipeError::Stage { index, kind: "sft", message })?,
            Stage::Opd(s) => run_opd::<B>(s, &mut ctx, devices)
                .map_err(|message| RecipeError::Stage { index, kind: "opd", message })?,
            Stage::Eval(s) => run_eval::<B>(s, &mut ctx, devices)
                .map_err(|message| RecipeError::Stage { index, kind: "eval", message })?,
            Stage::Rows(s) => import_rows(s, &ctx).map_err(|message| RecipeError::Stage { index, kind: "rows", message })?,
        }
        if matches!(stage, Stage::Pretrain(_) | Stage::Grpo(_) | Stage::Sft(_) | Stage::Opd(_)) {
            match crate::eval::curves::write_curves(&ctx.dir) {
                Ok(path) => tracing::info!("curves: {}", path.display()),
                Err(e) => tracing::warn!("no curves drawn: {e}"),
            }
        }
    }
    Ok(ctx)
}

/// Writes a folder with `write` into a temporary sibling, then swaps it in for `dir`, so `dir`
/// is never half-written.
pub fn replace_dir_atomic(dir: &Path, write: impl FnOnce(&Path) -> Result<(), String>) -> Result<(), String> {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    let tmp = dir.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    write(&tmp)?;
    let old = dir.with_file_name(format!(".{name}.old-{}", std::process::id()));
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// Saves a pipeline to `dir` atomically (see [`replace_dir_atomic`]).
pub fn save_pipeline_atomic<B: Backend>(pipeline: &Pipeline<B>, dir: &Path) -> Result<(), String> {
    replace_dir_atomic(dir, |tmp| pipeline.save(tmp).map_err(|e| e.to_string()))
}

/// A training loop's wall clock against its stage's `max_seconds` budget (none: never out).
struct StageClock {
    start: Instant,
    budget: Option<f64>,
}

impl StageClock {
    fn start(budget: Option<f64>) -> Self {
        Self { start: Instant::now(), budget }
    }

    /// Seconds since the start, and whether they reach the budget.
    fn read(&self) -> (f64, bool) {
        let seconds = self.start.elapsed().as_secs_f64();
        (seconds, self.budget.is_some_and(|b| seconds >= b))
    }

    fn log_spent(&self, label: &str, unit: &str, done: usize, of: usize) {
        let (seconds, _) = self.read();
        tracing::info!("{label}: time budget of {:.0} s spent after {unit} {done} of {of} ({seconds:.0} s)", self.budget.unwrap_or_default());
    }
}

fn run_pretrain<B: Backend>(stage: &PretrainStage, ctx: &mut RunContext, devices: &[B::Device]) -> Result<(), String> {
    type AD<B> = Autodiff<B>;
    let first = &devices[0];
    let pipeline: Pipeline<B> = match &stage.init {
        Some(init) => Pipeline::load(&ctx.resolve(init), first).map_err(|e| e.to_string())?,
        None => Pipeline::new_world(&stage.model, first).map_err(|e| e.to_string())?,
    };
    let params = burn::module::Module::num_params(&pipeline.model);
    tracing::info!("pretrain `{}`: {params} parameters, {} steps of batch {}", stage.output, stage.train.steps, stage.train.batch_size);
    let data = || WorldPairs::new(stage.captions, stage.layout, stage.wrong_caption_fraction, stage.train.seed);
    if let [device] = devices {
        let trainer = pretrainer::<AD<B>>(to_autodiff::<AD<B>>(pipeline), stage.train.clone());
        return pretrain_loop(stage, trainer, data(), Some(ctx), device, None);
    }
    // Every peer starts from the same weights (a fresh model is drawn once, on the first device).
    let build = |_: &RunContext, device: &B::Device, peer: Peer<B>| {
        let copy = Pipeline { model: burn::module::Module::to_device(pipeline.model.clone(), device), ..pipeline.clone() };
        pretrainer::<AD<B>>(to_autodiff::<AD<B>>(copy), stage.train.clone()).with_peer(peer)
    };
    let label = format!("pretrain `{}`", stage.output);
    run_group(ctx, devices, &label, build, |trainer, ctx, peer| pretrain_loop(stage, trainer, data(), ctx, &peer.device, Some(peer)))
}

/// A training stage on two or more devices: builds every peer's trainer first (so a bad stage
/// fails before any peer waits), then runs `run` on each as a peer of one burn-collective group
/// ([`run_peers`]), the first device's peer holding the run's context; the first real error of
/// any peer is the stage's.
fn run_group<'d, B: Backend, T: Send>(
    ctx: &mut RunContext,
    devices: &'d [B::Device],
    label: &str,
    build: impl Fn(&RunContext, &'d B::Device, Peer<B>) -> Result<T, String>,
    run: impl Fn(T, Option<&mut RunContext>, &Peer<B>) -> Result<(), String> + Sync,
) -> Result<(), String> {
    let count = devices.len();
    let trainers = devices
        .iter()
        .enumerate()
        .map(|(index, device)| build(ctx, device, Peer { index, count, device: device.clone() }).map(|t| Mutex::new(Some(t))))
        .collect::<Result<Vec<_>, _>>()?;
    tracing::info!("{label}: data-parallel over {count} devices");
    let lead = Mutex::new(Some(&mut *ctx));
    let results = run_peers::<B, _, _>(devices, |peer| {
        let trainer = trainers[peer.index].lock().expect("trainer").take().expect("one trainer per peer");
        let ctx = if peer.index == 0 { lead.lock().expect("context").take() } else { None };
        run(trainer, ctx, &peer)
    });
    first_error(results).map(|_| ())
}

/// The pre-training loop: progress bar, `metrics.jsonl` every 10 steps, EMA checkpoints and
/// export by the peer that holds the run's context (`lead`); the peers of a data-parallel group
/// run it in step and agree after each step on whether to stop (see [`train_adapter`]).
fn pretrain_loop<B: Backend, O: burn::optim::Optimizer<crate::model::pipeline::WorldModel<Autodiff<B>>, Autodiff<B>>>(
    stage: &PretrainStage,
    mut trainer: crate::train::pretrain::Pretrainer<Autodiff<B>, O>,
    mut data: WorldPairs,
    mut lead: Option<&mut RunContext>,
    device: &B::Device,
    peer: Option<&Peer<B>>,
) -> Result<(), String> {
    let out = lead.as_ref().map(|ctx| ctx.dir.join(&stage.output));
    let bar = lead.as_ref().map(|_| progress_bar(stage.train.steps as u64, "pretrain"));
    let clock = StageClock::start(stage.max_seconds);
    let mut smoothed = None;
    for step in 1..=stage.train.steps {
        let stats = trainer.step(&mut data, device)?;
        if !stats.loss.is_finite() {
            // The averaged loss is the same on every peer: they all stop here.
            return Err(format!(
                "step {step}: the loss is {} (diverged); the last good EMA checkpoint is in {} (saved every {} steps)",
                stats.loss,
                ctx_dir_output(&out, stage),
                stage.checkpoint_every
            ));
        }
        let s = smoothed.map_or(stats.loss, |m: f64| 0.98 * m + 0.02 * stats.loss);
        smoothed = Some(s);
        let (seconds, out_of_time) = clock.read();
        let (mut written, mut saved) = (Ok(()), false);
        if let (Some(ctx), Some(out), Some(bar)) = (lead.as_deref_mut(), &out, &bar) {
            bar.set_message(format!("loss {s:.4}"));
            bar.inc(1);
            if step % 10 == 0 || step == stage.train.steps || out_of_time {
                written = ctx.metrics.log("pretrain", step, &[("loss", stats.loss), ("loss_smoothed", s), ("seconds", seconds)]).map_err(|e| e.to_string());
            }
            if written.is_ok() && (step % stage.checkpoint_every == 0 || step == stage.train.steps || out_of_time || interrupted()) {
                written = save_pipeline_atomic(&trainer.ema_pipeline(), out);
                saved = true;
            }
        }
        if agree_to_stop(peer, lead.is_some(), out_of_time, written)? {
            if let Some(out) = &out {
                let label = format!("pretrain `{}`", stage.output);
                let end = LoopEnd { out, saved, out_of_time, label: &label, unit: "step", done: step, of: stage.train.steps, what: "EMA checkpoint" };
                end.finish(&clock, || save_pipeline_atomic(&trainer.ema_pipeline(), out))?;
            }
            break;
        }
    }
    let (Some(ctx), Some(out), Some(bar)) = (lead, out, bar) else {
        return Ok(());
    };
    bar.finish();
    if let Some(export) = &stage.export {
        save_pipeline_atomic(&trainer.ema_pipeline(), export)?;
    }
    tracing::info!("pretrain `{}` done in {:.0} s", stage.output, clock.read().0);
    ctx.outputs.insert(stage.output.clone(), out);
    Ok(())
}

/// Whether a training loop stops after this step, the same answer on every peer: when the lead
/// runs out of time or fails to write (`written`, whose error is then returned), or any peer is
/// interrupted (Ctrl-C reaches every peer of the process, not necessarily in the same step).
fn agree_to_stop<B: Backend>(peer: Option<&Peer<B>>, lead: bool, out_of_time: bool, written: Result<(), String>) -> Result<bool, String> {
    let stop_here = (lead && out_of_time) || interrupted() || written.is_err();
    let stop = match peer {
        Some(peer) => peer.any(stop_here)?,
        None => stop_here,
    };
    written?;
    Ok(stop)
}

/// A training loop that stops before its last step, as the lead sees it.
struct LoopEnd<'a> {
    out: &'a Path,
    /// Whether this step already saved a checkpoint.
    saved: bool,
    out_of_time: bool,
    label: &'a str,
    unit: &'a str,
    done: usize,
    of: usize,
    /// What the checkpoint holds, for the interrupt message.
    what: &'a str,
}

impl LoopEnd<'_> {
    /// Saves a checkpoint unless this step did, then ends the run on Ctrl-C (saying where the
    /// checkpoint is) or logs the spent time budget.
    fn finish(&self, clock: &StageClock, save: impl FnOnce() -> Result<(), String>) -> Result<(), String> {
        if !self.saved {
            save()?;
        }
        if interrupted() {
            return Err(format!("interrupted at {} {}; the {} is in {}", self.unit, self.done, self.what, self.out.display()));
        }
        if self.out_of_time {
            clock.log_spent(self.label, self.unit, self.done, self.of);
        }
        Ok(())
    }
}

/// Where a stage's checkpoint is, for messages (the lead peer knows the run folder).
fn ctx_dir_output(out: &Option<PathBuf>, stage: &PretrainStage) -> String {
    out.as_ref().map_or_else(|| format!("the run's `{}` folder", stage.output), |p| p.display().to_string())
}

fn run_grpo<B: Backend>(stage: &GrpoStage, ctx: &mut RunContext, devices: &[B::Device]) -> Result<(), String> {
    let common = AdapterStage { kind: "grpo", output: &stage.output, iterations: stage.train.iterations, checkpoint_every: stage.checkpoint_every, max_seconds: stage.max_seconds, export: stage.export.as_deref() };
    train_adapter_on(common, ctx, devices, |ctx, device, peer| {
        let pipeline = ctx.pipeline::<B>(&stage.model, device)?;
        let init = match &stage.init {
            Some(a) => Some(load_lora(&ctx.resolve(a), pipeline.transformer(), device).map_err(|e| format!("{a}: {e}"))?),
            None => None,
        };
        let trainer = grpo_trainer::<Autodiff<B>>(pipeline, init, stage.train.clone(), device)?;
        Ok(GrpoLoop(match peer {
            Some(peer) => trainer.with_peer(peer)?,
            None => trainer,
        }))
    })
}

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

/// What the GRPO and OPD stages share: name, length, checkpoints, export.
struct AdapterStage<'a> {
    kind: &'static str,
    output: &'a str,
    iterations: usize,
    checkpoint_every: usize,
    max_seconds: Option<f64>,
    export: Option<&'a Path>,
}

/// An adapter trainer as the stage loop sees it.
trait AdapterLoop<B: crate::AutodiffBackend> {
    /// One iteration: a progress message and the metrics to log.
    fn iterate(&mut self, device: &B::Device) -> Result<(String, Vec<(String, f64)>), String>;
    /// The EMA adapter that checkpoints and exports save.
    fn ema(&self) -> &crate::model::lora::LoraAdapter<B::InnerBackend>;
}

struct GrpoLoop<T>(T);

impl<B, O> AdapterLoop<B> for GrpoLoop<crate::train::grpo::GrpoTrainer<B, O>>
where
    B: crate::AutodiffBackend,
    O: burn::optim::Optimizer<crate::model::lora::LoraAdapter<B>, B>,
{
    fn iterate(&mut self, device: &B::Device) -> Result<(String, Vec<(String, f64)>), String> {
        let stats = self.0.iteration(device)?;
        let mut fields: Vec<(String, f64)> = vec![
            ("reward".into(), stats.reward),
            ("kl".into(), stats.kl),
            ("policy_loss".into(), stats.policy_loss),
            ("clip_fraction".into(), stats.clip_fraction),
            ("zero_std_fraction".into(), stats.groups.zero_std_fraction),
            ("within_group_share".into(), stats.groups.within_share),
            ("partition".into(), stats.partition as f64),
        ];
        fields.extend(stats.task_metrics.iter().map(|(t, m)| (format!("train_{}", t.name()), *m)));
        Ok((format!("reward {:.3} kl {:.2e}", stats.reward, stats.kl), fields))
    }
    fn ema(&self) -> &crate::model::lora::LoraAdapter<B::InnerBackend> {
        &self.0.ema.average
    }
}

struct OpdLoop<T>(T);

impl<B, O> AdapterLoop<B> for OpdLoop<crate::train::opd::OpdTrainer<B, O>>
where
    B: crate::AutodiffBackend,
    O: burn::optim::Optimizer<crate::model::lora::LoraAdapter<B>, B>,
{
    fn iterate(&mut self, device: &B::Device) -> Result<(String, Vec<(String, f64)>), String> {
        let stats = self.0.iteration(device)?;
        let mut fields: Vec<(String, f64)> =
            vec![("loss".into(), stats.loss), ("loss_opd".into(), stats.distill), ("loss_mar".into(), stats.anchor)];
        fields.extend(stats.task_metrics.iter().map(|(t, m)| (format!("train_{}", t.name()), *m)));
        Ok((format!("loss {:.4}", stats.loss), fields))
    }
    fn ema(&self) -> &crate::model::lora::LoraAdapter<B::InnerBackend> {
        &self.0.ema.average
    }
}

/// An adapter stage on one device, or data-parallel on several ([`run_group`]): `build` makes
/// the trainer of each device (with its [`Peer`] when there are several), then
/// [`train_adapter`] runs on each, the first device's peer logging, checkpointing and exporting.
fn train_adapter_on<'d, B: Backend, L: AdapterLoop<Autodiff<B>> + Send>(
    stage: AdapterStage<'_>,
    ctx: &mut RunContext,
    devices: &'d [B::Device],
    build: impl Fn(&RunContext, &'d B::Device, Option<Peer<B>>) -> Result<L, String>,
) -> Result<(), String> {
    if let [device] = devices {
        let trainer = build(ctx, device, None)?;
        return train_adapter(&stage, trainer, Some(ctx), device, None);
    }
    let label = format!("{}:{}", stage.kind, stage.output);
    let build_peer = |ctx: &RunContext, device: &'d B::Device, peer: Peer<B>| build(ctx, device, Some(peer));
    run_group(ctx, devices, &label, build_peer, |trainer, ctx, peer| train_adapter(&stage, trainer, ctx, &peer.device, Some(peer)))
}

/// The stage loop of adapter trainers: progress bar, `metrics.jsonl`, EMA checkpoints, export,
/// done by the peer that holds the run's context (`lead`; every peer of a data-parallel group
/// runs this loop in step, and they agree after each iteration on whether to stop).
fn train_adapter<B: Backend>(
    stage: &AdapterStage<'_>,
    mut trainer: impl AdapterLoop<Autodiff<B>>,
    mut lead: Option<&mut RunContext>,
    device: &B::Device,
    peer: Option<&Peer<B>>,
) -> Result<(), String> {
    let out = lead.as_ref().map(|ctx| ctx.dir.join(stage.output));
    let label = format!("{}:{}", stage.kind, stage.output);
    let bar = lead.as_ref().map(|_| progress_bar(stage.iterations as u64, stage.output));
    let clock = StageClock::start(stage.max_seconds);
    let mut done = 0;
    for it in 1..=stage.iterations {
        let (message, mut fields) = trainer.iterate(device)?;
        done = it;
        let (seconds, out_of_time) = clock.read();
        let (mut written, mut saved) = (Ok(()), false);
        if let (Some(ctx), Some(out), Some(bar)) = (lead.as_deref_mut(), &out, &bar) {
            bar.set_message(message);
            bar.inc(1);
            fields.push(("seconds".into(), seconds));
            let refs: Vec<(&str, f64)> = fields.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            written = ctx.metrics.log(&label, it, &refs).map_err(|e| e.to_string());
            if written.is_ok() && (it % stage.checkpoint_every.max(1) == 0 || it == stage.iterations || out_of_time || interrupted()) {
                written = save_adapter_atomic(trainer.ema(), out);
                saved = true;
            }
        }
        if agree_to_stop(peer, lead.is_some(), out_of_time, written)? {
            if let Some(out) = &out {
                let end = LoopEnd { out, saved, out_of_time, label: &label, unit: "iteration", done: it, of: stage.iterations, what: "EMA adapter" };
                end.finish(&clock, || save_adapter_atomic(trainer.ema(), out))?;
            }
            break;
        }
    }
    let (Some(ctx), Some(out), Some(bar)) = (lead, out, bar) else {
        return Ok(());
    };
    bar.finish();
    if let Some(export) = stage.export {
        save_adapter_atomic(trainer.ema(), export)?;
    }
    tracing::info!("{label}: {done} iterations in {:.0} s", clock.read().0);
    ctx.outputs.insert(stage.output.to_string(), out);
    Ok(())
}

/// Saves an adapter (PEFT layout) to `dir` atomically (see [`replace_dir_atomic`]).
pub fn save_adapter_atomic<B: Backend>(adapter: &crate::model::lora::LoraAdapter<B>, dir: &Path) -> Result<(), String> {
    use crate::model::lora::{LoraFormat, save_lora};
    replace_dir_atomic(dir, |tmp| {
        save_lora(adapter, tmp, LoraFormat::Peft, crate::model::weights::SaveDtype::F32).map_err(|e| e.to_string())
    })
}

fn run_merge<B: Backend>(stage: &MergeStage, ctx: &mut RunContext, device: &B::Device) -> Result<(), String> {
    let pipeline = ctx.pipeline::<B>(&stage.model, device)?;
    let mut adapters = Vec::new();
    for (name, weight) in &stage.adapters {
        let a = load_lora(&ctx.resolve(name), pipeline.transformer(), device).map_err(|e| format!("{name}: {e}"))?;
        adapters.push((a, *weight));
    }
    let refs: Vec<_> = adapters.iter().map(|(a, w)| (a, *w)).collect();
    let merged = combine(&refs, stage.method).map_err(|e| e.to_string())?;
    let out = ctx.dir.join(&stage.output);
    save_adapter_atomic(&merged, &out)?;
    tracing::info!("merge `{}`: {} adapters ({:?})", stage.output, adapters.len(), stage.method);
    ctx.outputs.insert(stage.output.clone(), out);
    Ok(())
}

fn run_sft<B: Backend>(stage: &SftStage, ctx: &mut RunContext, device: &B::Device) -> Result<(), String> {
    let pipeline = ctx.pipeline::<B>(&stage.model, device)?;
    let mut names: Vec<String> = stage.routing.values().cloned().collect();
    names.sort();
    names.dedup();
    let teachers = names
        .iter()
        .map(|n| load_lora(&ctx.resolve(n), pipeline.transformer(), device).map_err(|e| format!("{n}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let routing = stage.routing.iter().map(|(t, n)| (*t, names.iter().position(|m| m == n).expect("listed"))).collect();
    let start = Instant::now();
    let data = teacher_samples(&pipeline, &teachers, &routing, &stage.train, device)?;
    tracing::info!("sft `{}`: {} teacher samples in {:.0} s", stage.output, data.prompts.len(), start.elapsed().as_secs_f64());
    let mut trainer = sft_trainer::<Autodiff<B>>(pipeline, stage.train.clone(), device)?;
    let out = ctx.dir.join(&stage.output);
    let label = format!("sft:{}", stage.output);
    let bar = progress_bar(stage.train.steps as u64, &stage.output);
    for step in 1..=stage.train.steps {
        let loss = trainer.step(&data, device)?;
        bar.set_message(format!("loss {loss:.4}"));
        bar.inc(1);
        ctx.metrics.log(&label, step, &[("loss", loss), ("seconds", start.elapsed().as_secs_f64())]).map_err(|e| e.to_string())?;
        if step == stage.train.steps || interrupted() {
            save_adapter_atomic(&trainer.ema.average, &out)?;
        }
        if interrupted() {
            return Err(format!("interrupted at step {step}; the EMA adapter is in {}", out.display()));
        }
    }
    bar.finish();
    if let Some(export) = &stage.export {
        save_adapter_atomic(&trainer.ema.average, export)?;
    }
    ctx.outputs.insert(stage.output.clone(), out);
    Ok(())
}

fn run_opd<B: Backend>(stage: &OpdStage, ctx: &mut RunContext, devices: &[B::Device]) -> Result<(), String> {
    let common = AdapterStage { kind: "opd", output: &stage.output, iterations: stage.train.iterations, checkpoint_every: stage.checkpoint_every, max_seconds: stage.max_seconds, export: stage.export.as_deref() };
    train_adapter_on(common, ctx, devices, |ctx, device, peer| {
        let pipeline = ctx.pipeline::<B>(&stage.model, device)?;
        let load = |name: &str| {
            load_lora(&ctx.resolve(name), pipeline.transformer(), device).map_err(|e| format!("{name}: {e}"))
        };
        // One adapter per distinct teacher name; the routing table points into them.
        let mut names: Vec<String> = stage.routing.values().cloned().collect();
        if let Some(anchor) = stage.anchor.as_ref().filter(|a| *a != "base") {
            names.push(anchor.clone());
        }
        names.sort();
        names.dedup();
        let adapters = names.iter().map(|n| load(n)).collect::<Result<Vec<_>, _>>()?;
        let index = |name: &str| names.iter().position(|n| n == name).expect("listed");
        let routing = stage.routing.iter().map(|(t, n)| (*t, index(n))).collect();
        let anchor = stage.anchor.as_deref().filter(|a| *a != "base").map(index);
        let init = match &stage.init {
            Some(a) => Some(load(a)?),
            None => None,
        };
        let teachers = Teachers { adapters, routing, anchor };
        let trainer = opd_trainer::<Autodiff<B>>(pipeline, init, teachers, stage.train.clone(), device)?;
        Ok(OpdLoop(match peer {
            Some(peer) => trainer.with_peer(peer)?,
            None => trainer,
        }))
    })
}

fn run_eval<B: Backend>(stage: &EvalStage, ctx: &mut RunContext, devices: &[B::Device]) -> Result<(), String> {
    let load = |device: &B::Device| -> Result<_, String> {
        let pipeline = ctx.pipeline::<B>(&stage.model, device)?;
        let adapter = match &stage.adapter {
            Some(a) => Some(load_lora(&ctx.resolve(a), pipeline.transformer(), device).map_err(|e| format!("{a}: {e}"))?),
            None => None,
        };
        Ok((pipeline, adapter))
    };
    // Loaded before the clock starts: the row's seconds are the evaluation's.
    let mut loaded = devices.iter().map(load).collect::<Result<Vec<_>, _>>()?;
    let name = stage.row.clone().unwrap_or_else(|| stage.adapter.clone().unwrap_or_else(|| stage.model.clone()));
    let prompts = crate::eval::eval_prompts(&stage.eval).map_err(|e| e.to_string())?;
    let bar = progress_bar(prompts.iter().map(|(_, p)| p.len() as u64).sum(), "eval");
    bar.set_message(name.clone());
    let (results, seconds) = crate::eval::timed(|| -> Result<_, String> {
        if let ([device], [(pipeline, adapter)]) = (devices, loaded.as_slice()) {
            let adapters = adapter.as_ref().map_or_else(ActiveAdapters::none, ActiveAdapters::single);
            return evaluate(pipeline, &adapters, &stage.eval, prompts, device, |_, n| bar.inc(n as u64)).map_err(|e| e.to_string());
        }
        // Several devices: each samples a contiguous share of every task's prompts, with the
        // seeds those prompts have in the whole list, so the images are the one device's.
        let (count, prompts_ref, bar) = (devices.len(), &prompts, &bar);
        let share = |n: usize, d: usize| n * d / count..n * (d + 1) / count;
        let shares: Vec<Result<Vec<Vec<image::RgbImage>>, String>> = std::thread::scope(|scope| {
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
                                let seeds = crate::eval::eval_seeds(&stage.eval, rows);
                                crate::eval::generate(&pipeline, &adapters, &refs, &seeds, &stage.eval.sampling, device, |n| bar.inc(n as u64))
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
        crate::eval::score_images(&stage.eval, images).map_err(|e| e.to_string())
    });
    bar.finish();
    let results = results?;
    let row = row(&name, &results, &stage.eval.setup(), seconds);
    for r in &results {
        let (mean, stderr) = r.mean_and_stderr();
        tracing::info!("{name}: {} = {mean:.4} ± {stderr:.4} ({} prompts)", r.task.name(), r.metrics.len());
    }
    let fields: Vec<(&str, f64)> = [("geneval", row.geneval), ("ocr", row.ocr), ("pickscore", row.pickscore), ("deqa", row.deqa), ("avg", row.avg)]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect();
    ctx.metrics.log(&format!("eval:{name}"), 0, &fields).map_err(|e| e.to_string())?;
    if let Some(export) = &stage.export {
        ResultsTable::upsert_file(export, row.clone())?;
    }
    let table = ResultsTable::upsert_dir(&ctx.dir, [row])?;
    write_grids(&ctx.dir.join("grids"), &name, &results).map_err(|e| e.to_string())?;
    println!("{}", table.markdown());
    Ok(())
}

/// Copies rows of another table into this run's table, marked with their source.
fn import_rows(stage: &RowsStage, ctx: &RunContext) -> Result<(), String> {
    let from = ResultsTable::read_file(&stage.from)?;
    let names: Vec<String> = match &stage.rows {
        Some(names) => names.clone(),
        None => from.rows.iter().map(|r| r.model.clone()).collect(),
    };
    let rows = names
        .iter()
        .map(|name| {
            let row = from.row(name, &stage.from)?;
            let source = row.source.clone().unwrap_or_else(|| stage.from.display().to_string());
            Ok(crate::eval::EvalRow { source: Some(source), ..row.clone() })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let table = ResultsTable::upsert_dir(&ctx.dir, rows)?;
    println!("{}", table.markdown());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Recipe, String> {
        Recipe::from_toml(Path::new("test.toml"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn rows_stage_imports_named_rows_with_their_source() {
        use crate::eval::EvalRow;
        let dir = tempfile::tempdir().unwrap();
        let shipped = dir.path().join("results.json");
        let mut from = ResultsTable::default();
        from.upsert(EvalRow::new("Base", Some(0.1), Some(0.0), Some(21.0), Some(2.8), 5.0));
        from.upsert(EvalRow::new("Teacher", Some(0.4), Some(0.0), Some(21.0), Some(2.8), 5.0));
        from.write_json(&shipped).unwrap();
        let run = dir.path().join("run");
        let ctx = RunContext { dir: run.clone(), outputs: BTreeMap::new(), metrics: MetricsLog::open(&run.join("metrics.jsonl")).unwrap(), sd3: Default::default() };
        let stage = RowsStage { from: shipped.clone(), rows: Some(vec!["Teacher".into(), "Base".into()]) };
        import_rows(&stage, &ctx).unwrap();
        let table = ResultsTable::read(&run).unwrap();
        let names: Vec<&str> = table.rows.iter().map(|r| r.model.as_str()).collect();
        assert_eq!(names, ["Teacher", "Base"]);
        assert!(table.rows.iter().all(|r| r.source.as_deref() == Some(shipped.to_str().unwrap())));
        assert_eq!(table.rows[0].geneval, Some(0.4));
        let missing = RowsStage { from: shipped, rows: Some(vec!["GRPO-Mix".into()]) };
        let err = import_rows(&missing, &ctx).unwrap_err();
        assert!(err.contains("no row `GRPO-Mix`") && err.contains("Base, Teacher"), "{err}");
        let text = "name = \"x\"\n[[stage]]\nkind = \"rows\"\nfrom = \"/nonexistent/results.json\"\n";
        let err = parse(text).unwrap_err();
        assert!(err.contains("`from` = \"/nonexistent/results.json\" does not exist"), "{err}");
    }

    #[test]
    fn shipped_recipes_parse() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes");
        let entries = [root.clone(), root.join("gpu"), root.join("gpu_base")].into_iter().flat_map(|dir| std::fs::read_dir(dir).unwrap());
        for entry in entries {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let text = std::fs::read_to_string(&path).unwrap();
                match Recipe::from_toml(&path, &text) {
                    Ok(_) => {}
                    // Inputs produced by earlier runs (stage outputs, run folders such as
                    // runs/merge_opd) may be absent here; everything else must parse.
                    Err(e) if e.to_string().contains("neither an earlier stage") || e.to_string().contains("does not exist") => {}
                    Err(e) => panic!("{e}"),
                }
            }
        }
    }

    /// recipes/sd35m/* take the model, teachers and prompts from the command line; with them
    /// every stage must parse and validate.
    #[test]
    fn sd35m_recipes_parse_with_their_inputs() {
        let tmp = tempfile::tempdir().unwrap();
        for dir in ["model", "prompts", "teachers/teacher_geneval", "teachers/teacher_ocr", "teachers/teacher_pickscore", "teachers/teacher_quality"] {
            std::fs::create_dir_all(tmp.path().join(dir)).unwrap();
        }
        let inputs: BTreeMap<String, String> =
            ["model", "teachers", "prompts"].iter().map(|k| (k.to_string(), tmp.path().join(k).display().to_string())).collect();
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/sd35m");
        let mut parsed = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let recipe = Recipe::from_file_with(&path, &inputs).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(recipe.sd3.resolution, 512, "{}", path.display());
            let text = toml::to_string(&recipe).unwrap();
            assert!(!text.contains('$'), "{}: every input was substituted", path.display());
            parsed += 1;
        }
        assert_eq!(parsed, 4);
    }

    #[test]
    fn unknown_fields_and_dangling_inputs_are_named() {
        let base = "name = \"r\"\n[[stage]]\nkind = \"pretrain\"\noutput = \"base\"\ntrain = { steps = 1, batch_size = 2, optim = { lr = 1e-3 } }\n";
        assert!(parse(base).is_ok());
        let err = parse(&format!("{base}stepz = 3\n")).unwrap_err();
        assert!(err.contains("stepz"), "{err}");
        let err = parse(&base.replace("lr = 1e-3", "lr = 1e-3, betas = 0.9")).unwrap_err();
        assert!(err.contains("betas"), "{err}");
        let err = parse(&format!("{base}[[stage]]\nkind = \"eval\"\nmodel = \"nowhere\"\n")).unwrap_err();
        assert!(err.contains("nowhere") && err.contains("stage 1"), "{err}");
        let err = parse(&format!("{base}[[stage]]\nkind = \"evaluate\"\nmodel = \"base\"\n")).unwrap_err();
        assert!(err.contains("evaluate"), "{err}");
    }
}
