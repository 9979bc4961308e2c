//! The evaluation harness shared by every stage (docs/reference.md section 6): test prompts per task,
//! 40-step ODE sampling with fixed seeds, the four metrics and the paper's Avg, a `results.md`
//! table with one row per evaluated model (rows are added to or replaced in an existing table),
//! `results.json`, and per-task PNG grids of samples.

pub mod curves;
pub mod grid;
pub mod paired_curves;
pub mod report;
pub mod shard;
pub mod table;

use std::path::Path;
use std::time::Instant;

use crate::Backend;
use serde::{Deserialize, Serialize};

use image::RgbImage;

use crate::model::lora::ActiveAdapters;
use crate::pipeline::generate::{GenerateConfig, generate};
use crate::pipeline::TextToImage;
use crate::reward::{RemoteRewardConfig, RewardInput, RewardSet};
use crate::world::Task;
use crate::world::image::rgb_grid;
use crate::world::prompts::{Prompt, Split, shipped_prompts};
use crate::world::spec::Family;
pub use table::{Difference, EvalRow, PerImage, ResultsTable, StdErrors, paired_difference};

/// What to evaluate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    #[serde(default)]
    pub sampling: GenerateConfig,
    /// Test prompts per task (all 640 if `None`).
    #[serde(default)]
    pub prompts_per_task: Option<usize>,
    /// Seed of the first prompt's noise; prompt `i` uses `seed + i`.
    #[serde(default)]
    pub seed: u64,
    /// Tasks to evaluate (all four by default).
    #[serde(default = "all_tasks")]
    pub tasks: Vec<Task>,
    /// Which of the world's shipped prompt sets the tasks without a prompt file draw from:
    /// `test` (the default; every table of the README) or `train` (the RL training prompts, to
    /// compare models without looking at the test prompts).
    #[serde(default)]
    pub split: Split,
    /// Test prompt file per task (one prompt per line); the world's shipped prompts (`split`)
    /// for tasks without one.
    #[serde(default)]
    pub prompt_files: std::collections::BTreeMap<Task, std::path::PathBuf>,
    /// Tasks scored by a remote server (docs/reward_protocol.md); the world's rewards otherwise.
    #[serde(default)]
    pub remote_rewards: std::collections::BTreeMap<Task, RemoteRewardConfig>,
}

impl EvalConfig {
    /// What decides the images apart from the model: the first seed, the sampler and where the
    /// prompts come from. Two evaluations with the same setup and prompt count drew the same
    /// prompts with the same noise, so their per-image metrics pair up
    /// ([`table::paired_difference`]).
    pub fn setup(&self) -> String {
        let prompts: Vec<String> = self
            .tasks
            .iter()
            .map(|t| match self.prompt_files.get(t) {
                Some(path) => format!("{}: {}", t.name(), path.display()),
                None => format!("{}: {} split", t.name(), self.split.name()),
            })
            .collect();
        let schedule = serde_json::to_string(&self.sampling.schedule).expect("json");
        format!(
            "seed {}, {} ODE steps, CFG {}, schedule {schedule}, prompts ({})",
            self.seed,
            self.sampling.steps,
            self.sampling.guidance,
            prompts.join(", ")
        )
    }
}

impl EvalConfig {
    /// Checks the settings before any model is loaded: the sampler, at least one prompt per
    /// task and one task, prompt files that hold prompts, remote reward settings. Errors name
    /// the field after `prefix` (e.g. `eval.`).
    pub fn validate(&self, prefix: &str) -> Result<(), String> {
        self.sampling.validate(&format!("{prefix}sampling."))?;
        if let Some(n) = self.prompts_per_task {
            crate::flow::checks::at_least_one(&format!("`{prefix}prompts_per_task`"), n)?;
        }
        if self.tasks.is_empty() {
            return Err(format!("`{prefix}tasks`: at least one task is needed"));
        }
        for (task, path) in &self.prompt_files {
            crate::io::prompts::read_prompt_file(path).map_err(|e| format!("`{prefix}prompt_files.{}`: {e}", task.name()))?;
        }
        for (task, remote) in &self.remote_rewards {
            remote.validate().map_err(|e| format!("`{prefix}remote_rewards.{}`: {e}", task.name()))?;
        }
        Ok(())
    }
}

pub fn all_tasks() -> Vec<Task> {
    vec![Task::Composition, Task::Text, Task::Preference, Task::Quality]
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            sampling: GenerateConfig::default(),
            prompts_per_task: None,
            seed: 0,
            tasks: all_tasks(),
            split: Split::Test,
            prompt_files: Default::default(),
            remote_rewards: Default::default(),
        }
    }
}

/// One task's result: the mean metric, its standard error and the samples.
#[derive(Debug, Clone)]
pub struct TaskResult {
    pub task: Task,
    /// The metric of each prompt's image, in prompt order.
    pub metrics: Vec<f64>,
    pub images: Vec<RgbImage>,
    pub prompts: Vec<String>,
    /// GenEval-style accuracy per category (family) with its prompt count, in GenEval's order
    /// (see [`category_means`]); empty for other tasks.
    pub categories: Vec<(Family, f64, usize)>,
}

impl TaskResult {
    /// The task's metric: mean over its images and the standard error ([`mean_and_stderr`]).
    pub fn mean_and_stderr(&self) -> (f64, f64) {
        mean_and_stderr(&self.metrics)
    }
}

/// The mean metric of each composition category among `prompts` (GenEval reports its
/// accuracy per category: single object, two objects, counting, colours, position, colour
/// attribution), in [`Family::COMPOSITION`] order, with the number of prompts; categories
/// without prompts are left out. Empty when some prompt is not a composition prompt of the
/// world's grammar (e.g. free-text prompt files).
pub fn category_means(prompts: &[String], metrics: &[f64]) -> Vec<(Family, f64, usize)> {
    let families: Option<Vec<Family>> = prompts
        .iter()
        .map(|p| Prompt::parse(p).ok().map(|p| p.family()).filter(|f| f.task() == Task::Composition))
        .collect();
    let Some(families) = families else { return Vec::new() };
    Family::COMPOSITION
        .into_iter()
        .filter_map(|family| {
            let of: Vec<f64> = families.iter().zip(metrics).filter(|(f, _)| **f == family).map(|(_, &m)| m).collect();
            (!of.is_empty()).then(|| (family, of.iter().sum::<f64>() / of.len() as f64, of.len()))
        })
        .collect()
}

/// Why an evaluation failed.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("reward `{task}`: {message}")]
    Reward { task: String, message: String },
    #[error("{path}: {message}")]
    Output { path: std::path::PathBuf, message: String },
}

/// The prompts `config` evaluates, per task in order: its prompt file or the world's shipped
/// split (`config.split`, the test prompts by default), at most `prompts_per_task` of them.
pub fn eval_prompts(config: &EvalConfig) -> Result<Vec<(Task, Vec<String>)>, EvalError> {
    let shipped = shipped_prompts(config.split);
    config
        .tasks
        .iter()
        .map(|&task| {
            let all: Vec<String> = match config.prompt_files.get(&task) {
                Some(path) => crate::io::prompts::read_prompt_file(path).map_err(|e| EvalError::Output { path: path.clone(), message: e.to_string() })?,
                None => shipped.iter().filter(|p| p.task() == task).map(|p| p.text.clone()).collect(),
            };
            Ok((task, all.into_iter().take(config.prompts_per_task.unwrap_or(usize::MAX)).collect()))
        })
        .collect()
}

/// Samples and scores `prompts` (from [`eval_prompts`]) with the model and adapters, with
/// `config`'s sampling, seeds and rewards.
pub fn evaluate<B: Backend, P: TextToImage<B> + ?Sized>(
    pipeline: &P,
    adapters: &ActiveAdapters<'_, B>,
    config: &EvalConfig,
    prompts: Vec<(Task, Vec<String>)>,
    device: &B::Device,
    mut progress: impl FnMut(&str, usize),
) -> Result<Vec<TaskResult>, EvalError> {
    let rewards = RewardSet::new(&config.remote_rewards).map_err(|e| EvalError::Reward { task: "remote_rewards".into(), message: e.to_string() })?;
    let mut results = Vec::new();
    for (task, prompts) in prompts {
        let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let images = generate(pipeline, adapters, &refs, &eval_seeds(config, 0..prompts.len()), &config.sampling, device, |n| progress(task.name(), n))
            .map_err(|message| EvalError::Reward { task: task.name().to_string(), message })?;
        results.push(score_task(&rewards, task, prompts, images)?);
    }
    Ok(results)
}

/// The noise seeds of the evaluated prompts `indices` of a task (prompt `i`: `seed + i`).
pub fn eval_seeds(config: &EvalConfig, indices: std::ops::Range<usize>) -> Vec<u64> {
    indices.map(|i| config.seed + i as u64).collect()
}

/// Scores a task's images (one per prompt, in order) with `config`'s rewards: the same result
/// [`evaluate`] gives when it made those images (several devices can make them, each a share
/// of the prompts with the seeds of [`eval_seeds`]).
pub fn score_images(config: &EvalConfig, images: Vec<(Task, Vec<String>, Vec<RgbImage>)>) -> Result<Vec<TaskResult>, EvalError> {
    let rewards = RewardSet::new(&config.remote_rewards).map_err(|e| EvalError::Reward { task: "remote_rewards".into(), message: e.to_string() })?;
    images.into_iter().map(|(task, prompts, images)| score_task(&rewards, task, prompts, images)).collect()
}

fn score_task(rewards: &RewardSet, task: Task, prompts: Vec<String>, images: Vec<RgbImage>) -> Result<TaskResult, EvalError> {
    let inputs: Vec<RewardInput> =
        images.iter().zip(&prompts).map(|(img, p)| RewardInput::new(img.clone(), p.clone()).with_task(task)).collect();
    let scores = rewards.get(task).score(&inputs).map_err(|e| EvalError::Reward { task: task.name().to_string(), message: e.to_string() })?;
    let metrics: Vec<f64> = scores.iter().map(|s| s.metric as f64).collect();
    let categories = if task == Task::Composition { category_means(&prompts, &metrics) } else { Vec::new() };
    Ok(TaskResult { task, metrics, images, prompts, categories })
}

/// The mean of per-image metrics and its standard error (sample standard deviation, `n - 1`
/// in the denominator, over `sqrt(n)`; 0 for fewer than two values).
pub fn mean_and_stderr(metrics: &[f64]) -> (f64, f64) {
    let n = metrics.len().max(1) as f64;
    let mean = metrics.iter().sum::<f64>() / n;
    if metrics.len() < 2 {
        return (mean, 0.0);
    }
    let var = metrics.iter().map(|m| (m - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, (var / n).sqrt())
}

/// The table row of a finished evaluation (metrics of tasks not evaluated are `None`), with
/// the per-image metrics under `setup` ([`EvalConfig::setup`]).
pub fn row(name: &str, results: &[TaskResult], setup: &str, seconds: f64) -> EvalRow {
    let task = |t: Task| results.iter().find(|r| r.task == t);
    let [c, t, p, q] = [Task::Composition, Task::Text, Task::Preference, Task::Quality].map(|t| task(t).map(TaskResult::mean_and_stderr));
    let (get, se) = (|x: Option<(f64, f64)>| x.map(|m| m.0), |x: Option<(f64, f64)>| x.map(|m| m.1));
    let row = EvalRow::new(name, get(c), get(t), get(p), get(q), seconds);
    let categories = results.iter().filter(|r| r.task == Task::Composition).flat_map(|r| &r.categories);
    EvalRow {
        geneval_categories: categories.map(|&(f, mean, _)| (f.name().to_string(), mean)).collect(),
        stderr: Some(StdErrors::new(se(c), se(t), se(p), se(q))),
        per_image: Some(PerImage {
            setup: setup.to_string(),
            metrics: results.iter().map(|r| (r.task.name().to_string(), r.metrics.clone())).collect(),
        }),
        ..row
    }
}

/// Writes `grid_<model>_<task>.png` (the first 32 samples, 8 per row; world images enlarged
/// 4x, large ones shown at 256 px) and the matching prompt list `grid_<model>_<task>.txt`.
pub fn write_grids(dir: &Path, model: &str, results: &[TaskResult]) -> Result<(), EvalError> {
    std::fs::create_dir_all(dir).map_err(|e| EvalError::Output { path: dir.to_path_buf(), message: e.to_string() })?;
    for r in results {
        let n = r.images.len().min(grid::GRID_TILES);
        let side = r.images.first().map_or(32, |i| i.width().max(i.height()));
        let grid = rgb_grid(&r.images[..n], grid::GRID_COLUMNS, grid::grid_cell(side));
        let stem = format!("grid_{}_{}", sanitize(model), r.task.name());
        let png = dir.join(format!("{stem}.png"));
        crate::io::write_png_atomic(&png, &grid)
            .map_err(|e| EvalError::Output { path: png.clone(), message: e.to_string() })?;
        let txt = dir.join(format!("{stem}.txt"));
        crate::io::write_text_atomic(&txt, &(r.prompts[..n].join("\n") + "\n"))
            .map_err(|e| EvalError::Output { path: txt.clone(), message: e.to_string() })?;
    }
    Ok(())
}

/// File-name-safe version of a model name.
pub fn sanitize(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}

/// Times a closure.
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let start = Instant::now();
    let out = f();
    (out, start.elapsed().as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setups_differ_exactly_when_the_images_would() {
        let base = EvalConfig::default();
        // the batch size does not change the images (prompt i's noise is seeded with seed + i)
        let batched = EvalConfig { sampling: GenerateConfig { batch: 3, ..GenerateConfig::default() }, ..EvalConfig::default() };
        assert_eq!(base.setup(), batched.setup());
        let others = [
            EvalConfig { seed: 1, ..EvalConfig::default() },
            EvalConfig { sampling: GenerateConfig { steps: 20, ..GenerateConfig::default() }, ..EvalConfig::default() },
            EvalConfig { sampling: GenerateConfig { guidance: 3.0, ..GenerateConfig::default() }, ..EvalConfig::default() },
            EvalConfig { prompt_files: [(Task::Text, "ocr.txt".into())].into(), ..EvalConfig::default() },
            EvalConfig { split: Split::Train, ..EvalConfig::default() },
        ];
        for other in others {
            assert_ne!(base.setup(), other.setup(), "{other:?}");
        }
    }

    /// `split = "train"` evaluates the world's training prompts (none of them a test prompt of
    /// the same task's list), in the shipped file's order; a prompt file still wins for its task.
    #[test]
    fn the_train_split_draws_the_shipped_training_prompts() {
        let config: EvalConfig = toml::from_str("prompts_per_task = 5\nsplit = \"train\"").unwrap();
        assert_eq!(config.split, Split::Train);
        for split in Split::ALL {
            // the name the setup and the CLI use is the recipe's spelling
            let parsed: EvalConfig = toml::from_str(&format!("split = \"{}\"", split.name())).unwrap();
            assert_eq!(parsed.split, split);
        }
        let train = shipped_prompts(Split::Train);
        let test = eval_prompts(&EvalConfig { prompts_per_task: Some(5), ..EvalConfig::default() }).unwrap();
        for ((task, prompts), (_, test)) in eval_prompts(&config).unwrap().into_iter().zip(test) {
            let expected: Vec<String> = train.iter().filter(|p| p.task() == task).take(5).map(|p| p.text.clone()).collect();
            assert_eq!(prompts, expected, "{task:?}");
            assert_ne!(prompts, test, "{task:?}");
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ocr.txt");
        std::fs::write(&file, "a sign that says \"AB\"\n").unwrap();
        let with_file = EvalConfig { prompt_files: [(Task::Text, file)].into(), tasks: vec![Task::Text], ..config };
        assert_eq!(eval_prompts(&with_file).unwrap()[0].1, ["a sign that says \"AB\""]);
        assert!(with_file.setup().contains("text: ") && !with_file.setup().contains("train split"));
    }

    #[test]
    fn standard_error_is_the_sample_std_over_sqrt_n() {
        // [1, 0, 1, 0]: mean 0.5, sample variance 4 * 0.25 / 3 = 1/3, se = sqrt(1/3 / 4)
        let (mean, se) = mean_and_stderr(&[1.0, 0.0, 1.0, 0.0]);
        assert_eq!(mean, 0.5);
        assert!((se - (1.0f64 / 12.0).sqrt()).abs() < 1e-12);
        assert_eq!(mean_and_stderr(&[0.7]), (0.7, 0.0));
        assert_eq!(mean_and_stderr(&[2.0, 2.0, 2.0]).1, 0.0);
    }

    #[test]
    fn category_means_group_composition_prompts_in_genevals_order() {
        let prompts: Vec<String> = [
            "a photo of a red circle left of a square",
            "a photo of two circles",
            "a photo of a red circle",
            "a photo of four squares",
            "a photo of a blue cross",
        ]
        .map(String::from)
        .to_vec();
        let metrics = [1.0, 0.0, 1.0, 1.0, 0.0];
        let means = category_means(&prompts, &metrics);
        assert_eq!(means, vec![(Family::Counting, 0.5, 2), (Family::Colors, 0.5, 2), (Family::Position, 1.0, 1)]);
        // free text (an SD3 prompt file) or another task's prompt: no categories
        assert!(category_means(&["a cat on a mat".to_string()], &[1.0]).is_empty());
        assert!(category_means(&["a sign that says \"A\"".to_string()], &[1.0]).is_empty());
    }
}
