//! The recipe file: a named list of stages whose outputs feed later stages by name, read with
//! errors that name the file, the stage and the field at fault, `$input` substitution from the
//! command line, and validation of every stage input before anything runs.
//!
//! The stage fields that several kinds repeat (`output`, `model`, `init`, `checkpoint_every`,
//! `export`, `max_seconds`) stay flat in each stage's table: serde's `flatten`, which would let
//! them live in one nested struct, turns off `deny_unknown_fields`, and a misspelt field must
//! stay an error. [`Stage::common`] gives the shared view the validation and the stage loop use.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::eval::EvalConfig;
use crate::model::lora::MergeMethod;
use crate::pipeline::Sd3Options;
use crate::pipeline::world::WorldModelConfig;
use crate::train::adapter::{AdapterTraining, LoraSpec};
use crate::train::grpo::GrpoConfig;
use crate::train::nft::NftConfig;
use crate::train::opd::OpdConfig;
use crate::train::pretrain::{CaptionSource, PretrainConfig};
use crate::train::rollout::RolloutConfig;
use crate::train::sft::SftConfig;
use crate::world::Task;
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
    /// Continue the run already in `<runs>/<name>/` (as `flow-opd recipe R --resume`): stages
    /// that finished are skipped once their outputs verify, and the first one that did not
    /// continues from its last checkpoint.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resume: bool,
}

/// One stage of a recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Stage {
    Pretrain(PretrainStage),
    Grpo(GrpoStage),
    Nft(NftStage),
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
    /// Save the EMA adapter every this many steps (and at the end); at the end only if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_every: Option<usize>,
    /// Wall-clock budget of the training loop in seconds (see [`RewardStage::max_seconds`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_seconds: Option<f64>,
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
    /// Wall-clock budget of the training loop in seconds (see [`RewardStage::max_seconds`]).
    #[serde(default)]
    pub max_seconds: Option<f64>,
    pub train: OpdConfig,
}

/// Reward training of one LoRA adapter on a pipeline: Flow-GRPO (`train`: [`GrpoConfig`]) or
/// DiffusionNFT ([`NftConfig`], docs/diffusion_nft.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardStage<T> {
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
    pub train: T,
}

/// A Flow-GRPO stage.
pub type GrpoStage = RewardStage<GrpoConfig>;
/// A DiffusionNFT stage.
pub type NftStage = RewardStage<NftConfig>;

impl<T> RewardStage<T> {
    fn common(&self) -> StageCommon<'_> {
        StageCommon {
            output: Some(&self.output),
            model: Some(&self.model),
            init: self.init.as_deref(),
            checkpoint_every: Some(self.checkpoint_every),
            export: self.export.as_deref(),
            max_seconds: self.max_seconds,
        }
    }
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
    /// How often each task's captions are drawn, relative to the others (`{ text = 3 }`: text
    /// three times as often as each other task; a task not named weighs 1, a weight of 0 leaves
    /// the task out). Tasks are uniform if absent.
    #[serde(default)]
    pub task_weights: Option<BTreeMap<Task, f32>>,
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

impl EvalStage {
    /// The row it writes: `row`, else the adapter's name, else the model's.
    pub fn row_name(&self) -> String {
        self.row.clone().unwrap_or_else(|| self.adapter.clone().unwrap_or_else(|| self.model.clone()))
    }
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
    /// The recipe as a run records it (`runs/<name>/recipe.toml`): every setting resolved,
    /// `resume` left out.
    pub fn resolved(&self) -> String {
        toml::to_string_pretty(&Recipe { resume: false, ..self.clone() }).expect("recipe serialises")
    }

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
            resume: bool,
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
            fn typed<T: serde::de::DeserializeOwned + Serialize>(
                i: usize,
                kind: &str,
                table: toml::Table,
            ) -> Result<T, String> {
                let input = toml::Value::Table(table);
                let typed: T = serde_path_to_error::deserialize(input.clone())
                    .map_err(|e| format!("stage {i} ({kind}): `{}`: {}", e.path(), e.inner()))?;
                // Flattened sections (the shared adapter-training fields) cannot deny unknown
                // fields through serde, so a key the typed stage does not write back is refused.
                let written = toml::Value::try_from(&typed)
                    .map_err(|e| format!("stage {i} ({kind}): cannot re-serialise: {e}"))?;
                if let Some(path) = unknown_key(&input, &written, String::new()) {
                    return Err(format!("stage {i} ({kind}): `{path}`: unknown field"));
                }
                Ok(typed)
            }
            let stage = match kind.as_str() {
                "pretrain" => Stage::Pretrain(typed(i, &kind, table).map_err(parse)?),
                "grpo" => Stage::Grpo(typed(i, &kind, table).map_err(parse)?),
                "nft" => Stage::Nft(typed(i, &kind, table).map_err(parse)?),
                "merge" => Stage::Merge(typed(i, &kind, table).map_err(parse)?),
                "sft" => Stage::Sft(typed(i, &kind, table).map_err(parse)?),
                "opd" => Stage::Opd(typed(i, &kind, table).map_err(parse)?),
                "eval" => Stage::Eval(typed(i, &kind, table).map_err(parse)?),
                "rows" => Stage::Rows(typed(i, &kind, table).map_err(parse)?),
                other => {
                    return Err(parse(format!(
                        "stage {i}: unknown `kind` = \"{other}\" (expected pretrain, grpo, nft, merge, sft, opd, eval or rows)"
                    )));
                }
            };
            stages.push(stage);
        }
        let recipe = Recipe { name: raw.name, sd3: raw.sd3, stages, resume: raw.resume };
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
            let common = stage.common();
            if let Some(m) = common.max_seconds.filter(|m| !(m.is_finite() && *m >= 0.0)) {
                return Err(format!("stage {i}: `max_seconds` = {m} must be a finite number of seconds >= 0"));
            }
            if let Some(model) = common.model {
                need(model, "model")?;
            }
            if let Some(init) = common.init {
                need(init, "init")?;
            }
            match stage {
                Stage::Merge(s) => s.adapters.keys().try_for_each(|a| need(a, "adapters"))?,
                Stage::Sft(s) => s.routing.values().try_for_each(|a| need(a, "routing"))?,
                Stage::Opd(s) => {
                    s.routing.values().try_for_each(|a| need(a, "routing"))?;
                    if let Some(a) = s.anchor.as_deref().filter(|a| *a != "base") {
                        need(a, "anchor")?;
                    }
                }
                Stage::Eval(s) => {
                    if let Some(a) = &s.adapter {
                        need(a, "adapter")?;
                    }
                }
                Stage::Rows(s) => {
                    if !s.from.exists() {
                        return Err(format!("stage {i}: `from` = \"{}\" does not exist", s.from.display()));
                    }
                }
                Stage::Pretrain(_) | Stage::Grpo(_) | Stage::Nft(_) => {}
            }
            if let Some(export) = common.export {
                // Training stages export a folder, evaluations add a row to a results.json.
                let folder = !matches!(stage, Stage::Eval(_));
                crate::pipeline::sample::check_output_location("`export`", export, folder).map_err(|e| format!("stage {i}: {e}"))?;
            }
            if common.checkpoint_every == Some(0) {
                return Err(format!("stage {i}: `checkpoint_every`: must be at least 1, got 0"));
            }
            check_settings(stage).map_err(|e| format!("stage {i}: {e}"))?;
            if let Some(output) = common.output {
                outputs.push(output);
            }
        }
        Ok(())
    }

    /// Checks that every data-parallel stage's batch splits evenly among `devices` devices
    /// (`--device cpu,cpu`), before the first stage runs rather than when that stage starts.
    pub fn check_devices(&self, devices: usize) -> Result<(), String> {
        if devices <= 1 {
            return Ok(());
        }
        for (i, stage) in self.stages.iter().enumerate() {
            let (field, n) = match stage {
                Stage::Pretrain(s) => ("train.batch_size", s.train.batch_size),
                Stage::Grpo(s) => ("train.rollout.prompts", s.train.rollout.prompts),
                Stage::Nft(s) => ("train.rollout.prompts", s.train.rollout.prompts),
                Stage::Opd(s) => ("train.rollout.prompts", s.train.rollout.prompts),
                _ => continue,
            };
            if !n.is_multiple_of(devices) {
                return Err(format!(
                    "--device: stage {i} ({}): `{field}` = {n} does not split evenly among {devices} data-parallel devices",
                    stage.kind()
                ));
            }
        }
        Ok(())
    }
}

/// The numeric settings of one stage: step counts and batch sizes of at least 1, CFG scales,
/// noise levels, fractions and weights in range, prompt files that hold prompts, remote reward
/// settings. Errors name the field path inside the stage and the value.
fn check_settings(stage: &Stage) -> Result<(), String> {
    use crate::flow::checks::{at_least_one, fraction, guidance, noise_level, non_negative, positive, probability};
    fn rollout(r: &RolloutConfig, min_group: usize) -> Result<(), String> {
        at_least_one("`train.rollout.prompts`", r.prompts)?;
        if r.group_size < min_group {
            return Err(format!("`train.rollout.group_size`: must be at least {min_group}, got {}", r.group_size));
        }
        at_least_one("`train.rollout.steps`", r.steps)?;
        noise_level("`train.rollout.noise_level`", r.noise_level)?;
        guidance("`train.rollout.guidance`", r.guidance)?;
        if let Some(m) = r.micro_batch {
            at_least_one("`train.rollout.micro_batch`", m)?;
        }
        if let Some(w) = r.sde_window.as_ref().filter(|w| w.is_empty() || w.end > r.steps) {
            return Err(format!("`train.rollout.sde_window`: {w:?} must be a non-empty range of the {} steps", r.steps));
        }
        Ok(())
    }
    fn lora(l: &LoraSpec) -> Result<(), String> {
        at_least_one("`train.lora.rank`", l.rank)?;
        positive("`train.lora.alpha`", l.alpha)?;
        l.config().map(|_| ()).map_err(|e| format!("`train.lora.targets`: {e}"))
    }
    fn training(t: &AdapterTraining) -> Result<(), String> {
        non_negative("`train.optim.lr`", t.optim.lr)?;
        probability("`train.ema_max_decay`", t.ema_max_decay)?;
        prompt_files(&t.prompt_files, "train.prompt_files")
    }
    fn prompt_files(files: &BTreeMap<Task, PathBuf>, field: &str) -> Result<(), String> {
        for (task, path) in files {
            crate::io::prompts::read_prompt_file(path).map_err(|e| format!("`{field}.{}`: {e}", task.name()))?;
        }
        Ok(())
    }
    fn remote(rewards: &BTreeMap<Task, crate::reward::RemoteRewardConfig>) -> Result<(), String> {
        for (task, config) in rewards {
            config.validate().map_err(|e| format!("`train.remote_rewards.{}`: {e}", task.name()))?;
        }
        Ok(())
    }
    match stage {
        Stage::Pretrain(s) => {
            at_least_one("`train.steps`", s.train.steps)?;
            at_least_one("`train.batch_size`", s.train.batch_size)?;
            non_negative("`train.optim.lr`", s.train.optim.lr)?;
            probability("`train.caption_dropout`", s.train.caption_dropout)?;
            probability("`train.ema_max_decay`", s.train.ema_max_decay)?;
            probability("`wrong_caption_fraction`", s.wrong_caption_fraction as f64)?;
            if let Some(weights) = &s.task_weights {
                for (task, &w) in weights {
                    non_negative(&format!("`task_weights.{}`", task.name()), w as f64)?;
                }
                if Task::ALL.iter().all(|t| weights.get(t).is_some_and(|&w| w == 0.0)) {
                    return Err("`task_weights` leaves every task out: give at least one a positive weight".into());
                }
            }
        }
        Stage::Grpo(s) => {
            at_least_one("`train.iterations`", s.train.iterations)?;
            rollout(&s.train.rollout, 2)?;
            lora(&s.train.lora)?;
            training(&s.train.training)?;
            remote(&s.train.remote_rewards)?;
            fraction("`train.timestep_fraction`", s.train.timestep_fraction)?;
            non_negative("`train.beta`", s.train.beta)?;
            at_least_one("`train.inner_epochs`", s.train.inner_epochs)?;
            at_least_one("`train.minibatches`", s.train.minibatches)?;
            let samples = s.train.rollout.prompts * s.train.rollout.group_size;
            if s.train.minibatches > samples {
                return Err(format!(
                    "`train.minibatches` = {}: more optimizer steps than the iteration's {samples} samples",
                    s.train.minibatches
                ));
            }
            if s.train.partitions.is_empty() {
                return Err("`train.partitions`: at least one partition is needed".into());
            }
            for (n, p) in s.train.partitions.iter().enumerate() {
                if p.tasks.is_empty() {
                    return Err(format!("`train.partitions[{n}].tasks`: at least one task is needed"));
                }
                at_least_one(&format!("`train.partitions[{n}].ratio`"), p.ratio)?;
                for (task, w) in &p.rewards {
                    if !w.is_finite() {
                        return Err(format!("`train.partitions[{n}].rewards.{}`: the weight must be finite, got {w}", task.name()));
                    }
                }
                if let Some(beta) = p.beta {
                    non_negative(&format!("`train.partitions[{n}].beta`"), beta)?;
                }
            }
        }
        Stage::Nft(s) => {
            let r = &s.train.rollout;
            at_least_one("`train.iterations`", s.train.iterations)?;
            at_least_one("`train.rollout.prompts`", r.prompts)?;
            if r.group_size < 2 {
                return Err(format!("`train.rollout.group_size`: must be at least 2, got {}", r.group_size));
            }
            at_least_one("`train.rollout.steps`", r.steps)?;
            guidance("`train.rollout.guidance`", r.guidance)?;
            if let Some(m) = r.micro_batch {
                at_least_one("`train.rollout.micro_batch`", m)?;
            }
            lora(&s.train.lora)?;
            training(&s.train.training)?;
            remote(&s.train.remote_rewards)?;
            fraction("`train.timestep_fraction`", s.train.timestep_fraction)?;
            for (n, p) in s.train.partitions.iter().enumerate() {
                if p.tasks.is_empty() {
                    return Err(format!("`train.partitions[{n}].tasks`: at least one task is needed"));
                }
                at_least_one(&format!("`train.partitions[{n}].ratio`"), p.ratio)?;
            }
            s.train.check().map_err(|e| e.replacen('`', "`train.", 1))?;
        }
        Stage::Opd(s) => {
            at_least_one("`train.iterations`", s.train.iterations)?;
            rollout(&s.train.rollout, 1)?;
            if let Some(l) = &s.train.lora {
                lora(l)?;
            }
            training(&s.train.training)?;
            remote(&s.train.remote_rewards)?;
            fraction("`train.timestep_fraction`", s.train.timestep_fraction)?;
            non_negative("`train.mar_lambda`", s.train.mar_lambda)?;
            if s.train.tasks.as_ref().is_some_and(Vec::is_empty) {
                return Err("`train.tasks`: at least one task is needed".into());
            }
        }
        Stage::Sft(s) => {
            at_least_one("`train.samples_per_task`", s.train.samples_per_task)?;
            at_least_one("`train.steps`", s.train.steps)?;
            at_least_one("`train.batch_size`", s.train.batch_size)?;
            s.train.sampling.validate("train.sampling.")?;
            lora(&s.train.lora)?;
            training(&s.train.training)?;
        }
        Stage::Merge(s) => {
            if s.adapters.is_empty() {
                return Err("`adapters`: at least one adapter is needed".into());
            }
            for (name, w) in &s.adapters {
                if !w.is_finite() {
                    return Err(format!("`adapters.\"{name}\"`: the weight must be finite, got {w}"));
                }
            }
        }
        Stage::Eval(s) => s.eval.validate("eval.")?,
        Stage::Rows(_) => {}
    }
    Ok(())
}

/// The fields several stage kinds share, as one view (absent where a kind has no such field).
#[derive(Debug, Clone, Copy, Default)]
pub struct StageCommon<'a> {
    /// Name of the stage's output (`runs/<run>/<output>/`).
    pub output: Option<&'a str>,
    /// The pipeline the stage works on (stage output or folder).
    pub model: Option<&'a str>,
    /// The pipeline or adapter a trainer starts from.
    pub init: Option<&'a str>,
    /// Checkpoint period in steps or iterations.
    pub checkpoint_every: Option<usize>,
    /// Where the final output is also written.
    pub export: Option<&'a Path>,
    /// Wall-clock budget of the training loop in seconds.
    pub max_seconds: Option<f64>,
}

impl Stage {
    /// Whether the stage trains through the shared loop (pre-training, GRPO, SFT, OPD).
    pub fn trains(&self) -> bool {
        matches!(self, Stage::Pretrain(_) | Stage::Grpo(_) | Stage::Nft(_) | Stage::Sft(_) | Stage::Opd(_))
    }

    /// The stage kind as recipes spell it.
    pub fn kind(&self) -> &'static str {
        match self {
            Stage::Pretrain(_) => "pretrain",
            Stage::Grpo(_) => "grpo",
            Stage::Nft(_) => "nft",
            Stage::Merge(_) => "merge",
            Stage::Sft(_) => "sft",
            Stage::Opd(_) => "opd",
            Stage::Eval(_) => "eval",
            Stage::Rows(_) => "rows",
        }
    }

    /// The shared fields of this stage.
    pub fn common(&self) -> StageCommon<'_> {
        match self {
            Stage::Pretrain(s) => StageCommon {
                output: Some(&s.output),
                init: s.init.as_deref(),
                checkpoint_every: Some(s.checkpoint_every),
                export: s.export.as_deref(),
                max_seconds: s.max_seconds,
                ..Default::default()
            },
            Stage::Grpo(s) => s.common(),
            Stage::Nft(s) => s.common(),
            Stage::Opd(s) => StageCommon {
                output: Some(&s.output),
                model: Some(&s.model),
                init: s.init.as_deref(),
                checkpoint_every: Some(s.checkpoint_every),
                export: s.export.as_deref(),
                max_seconds: s.max_seconds,
            },
            Stage::Sft(s) => StageCommon {
                output: Some(&s.output),
                model: Some(&s.model),
                checkpoint_every: s.checkpoint_every,
                export: s.export.as_deref(),
                max_seconds: s.max_seconds,
                ..Default::default()
            },
            Stage::Merge(s) => StageCommon { output: Some(&s.output), model: Some(&s.model), ..Default::default() },
            Stage::Eval(s) => StageCommon { model: Some(&s.model), export: s.export.as_deref(), ..Default::default() },
            Stage::Rows(_) => StageCommon::default(),
        }
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

/// The first key of `input` (dotted path) that `written` (the parsed value serialised back)
/// lacks: a field no struct along the way accepted.
fn unknown_key(input: &toml::Value, written: &toml::Value, path: String) -> Option<String> {
    let join = |key: &str| if path.is_empty() { key.to_string() } else { format!("{path}.{key}") };
    match (input, written) {
        (toml::Value::Table(input), toml::Value::Table(written)) => input.iter().find_map(|(key, value)| {
            match written.get(key) {
                None => Some(join(key)),
                Some(back) => unknown_key(value, back, join(key)),
            }
        }),
        (toml::Value::Array(input), toml::Value::Array(written)) if input.len() == written.len() => input
            .iter()
            .zip(written)
            .enumerate()
            .find_map(|(n, (value, back))| unknown_key(value, back, format!("{path}[{n}]"))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Recipe, String> {
        Recipe::from_toml(Path::new("test.toml"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn shipped_recipes_parse() {
        // Every recipe but recipes/sd35m/ (which needs its command-line inputs, tested below).
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes");
        let mut folders = vec![root.join("world"), root.join("experiments")];
        let mut parsed = 0;
        while let Some(folder) = folders.pop() {
          for entry in std::fs::read_dir(folder).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                folders.push(path);
            } else if path.extension().is_some_and(|e| e == "toml") {
                parsed += 1;
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
        assert!(parsed >= 25, "{parsed} recipes found");
    }

    /// recipes/sd35m/* take the model, teachers and prompts from the command line; with them
    /// every stage must parse and validate.
    #[test]
    fn sd35m_recipes_parse_with_their_inputs() {
        let tmp = tempfile::tempdir().unwrap();
        for dir in ["model", "prompts", "teachers/teacher_geneval", "teachers/teacher_ocr", "teachers/teacher_pickscore", "teachers/teacher_quality"] {
            std::fs::create_dir_all(tmp.path().join(dir)).unwrap();
        }
        // The prompt files the recipes name (validation reads them: each must hold a prompt).
        for file in ["geneval", "ocr", "pickscore", "geneval_test", "ocr_test", "pickscore_test", "quality_test"] {
            std::fs::write(tmp.path().join("prompts").join(format!("{file}.txt")), "a photo of a cat\n").unwrap();
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
        assert_eq!(parsed, 5);
    }

    #[test]
    fn a_rows_stage_needs_an_existing_table() {
        let text = "name = \"x\"\n[[stage]]\nkind = \"rows\"\nfrom = \"/nonexistent/results.json\"\n";
        let err = parse(text).unwrap_err();
        assert!(err.contains("`from` = \"/nonexistent/results.json\" does not exist"), "{err}");
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

    /// The adapter trainers' shared fields are flattened into each `train` table, where serde
    /// cannot deny unknown keys: a misspelt key must still be refused, with its path.
    #[test]
    fn misspelt_keys_inside_flattened_train_tables_are_named() {
        let grpo = "name = \"r\"\n[[stage]]\nkind = \"grpo\"\noutput = \"t\"\nmodel = \"models/world_base\"\n\
                    [stage.train]\niterations = 1\nlora = { rank = 2, alpha = 2.0 }\noptim = { lr = 1e-3 }\n\
                    rollout = { prompts = 1, group_size = 2, steps = 2 }\n\
                    partitions = [{ tasks = [\"text\"], rewards = { text = 1.0 } }]\n";
        parse(grpo).unwrap_or_else(|e| panic!("{e}"));
        for (typo, path) in [
            ("seeed = 3\n", "train.seeed"),
            ("ema_max_decai = 0.9\n", "train.ema_max_decai"),
        ] {
            let err = parse(&format!("{grpo}{typo}")).unwrap_err();
            assert!(err.contains(&format!("`{path}`: unknown field")), "{err}");
        }
        let err = parse(&grpo.replace("lr = 1e-3", "lr = 1e-3, warmup = 5")).unwrap_err();
        assert!(err.contains("warmup"), "{err}");
    }
}
