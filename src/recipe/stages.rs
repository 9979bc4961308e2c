//! One function per stage kind: each loads what its stage names, builds the trainer (or does
//! the work) and hands training to the shared loop ([`super::stage_loop`]).

use std::path::Path;
use std::time::Instant;

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::{BalancedCheckpointing, CheckpointStrategy, NoCheckpointing};
use burn::optim::Optimizer;

use super::RunContext;
use super::schema::{EvalStage, MergeStage, PretrainStage, RowsStage, Stage};
use super::stage_loop::{LoopSpec, LoopTrainer, StepReport, progress_bar, train_on};
use crate::Backend;
use crate::eval::grid::write_captioned_grids;
use crate::eval::{ResultsTable, row, write_grids};
use crate::model::lora::{LoraAdapter, combine, load_lora, save_adapter_atomic};
use crate::pipeline::TextToImage;
use crate::pipeline::world::{Pipeline, WorldModel, save_pipeline_atomic};
use crate::train::Checkpointing;
use crate::train::adapter::AdapterTrainer;
use crate::train::grpo::{GrpoTrainer, grpo_trainer};
use crate::train::nft::{NftTrainer, nft_trainer};
use crate::train::opd::{OpdTrainer, Teachers, opd_trainer};
use crate::train::pretrain::{Pretrainer, WorldPairs, pretrainer, to_autodiff};
use crate::train::resume::{RngState, SavedState, TrainerState};
use crate::train::sft::{SftData, SftTrainer, sft_trainer, teacher_samples};
use crate::world::Task;

/// The loop's view of a training stage from its shared fields.
fn loop_spec<'a>(stage: &'a Stage, ctx: &RunContext, label: String, bar_label: &'a str, total: usize) -> LoopSpec<'a> {
    let common = stage.common();
    let pretrain = matches!(stage, Stage::Pretrain(_));
    LoopSpec {
        label,
        bar_label,
        output: common.output.expect("training stages have an output"),
        unit: if pretrain || matches!(stage, Stage::Sft(_)) { "step" } else { "iteration" },
        what: if pretrain { "EMA checkpoint" } else { "EMA adapter" },
        total,
        checkpoint_every: common.checkpoint_every.unwrap_or(total),
        log_every: if pretrain { 10 } else { 1 },
        max_seconds: common.max_seconds,
        // Node 0 alone exports (another node of a multi-node group writes its scratch folder only).
        export: common.export.filter(|_| crate::train::distributed::is_first_node()),
        interrupter: ctx.interrupter.clone(),
        key: ctx.stage_key.clone(),
    }
}

/// Flow-matching pre-training of a world pipeline (data-parallel over several devices).
pub fn pretrain<B: Backend>(stage: &Stage, ctx: &mut RunContext, devices: &[B::Device]) -> Result<(), String> {
    let Stage::Pretrain(s) = stage else { unreachable!("a pretrain stage") };
    let first = &devices[0];
    let pipeline: Pipeline<B> = match &s.init {
        Some(init) => Pipeline::load(&ctx.resolve(init), first).map_err(|e| e.to_string())?,
        None => Pipeline::new_world(&s.model, first).map_err(|e| e.to_string())?,
    };
    let params = burn::module::Module::num_params(&pipeline.model);
    tracing::info!("pretrain `{}`: {params} parameters, {} steps of batch {}", s.output, s.train.steps, s.train.batch_size);
    let spec = loop_spec(stage, ctx, "pretrain".into(), "pretrain", s.train.steps);
    // Every peer starts from the same weights (a fresh model is drawn once, on the first device).
    train_on(&spec, ctx, devices, |_, device, peer| {
        let copy = Pipeline { model: burn::module::Module::to_device(pipeline.model.clone(), device), ..pipeline.clone() };
        let trainer = pretrainer::<Autodiff<B>>(to_autodiff::<Autodiff<B>>(copy), s.train.clone());
        let trainer = match peer {
            Some(peer) => trainer.with_peer(peer)?,
            None => trainer,
        };
        Ok(PretrainLoop { trainer, data: data(s), smoothed: None })
    })
}

fn data(s: &PretrainStage) -> WorldPairs {
    let weights = s.task_weights.as_ref().map(|w| Task::ALL.map(|t| w.get(&t).copied().unwrap_or(1.0)));
    WorldPairs::new(s.captions, s.layout, s.wrong_caption_fraction, s.train.seed).with_task_weights(weights)
}

struct PretrainLoop<T> {
    trainer: T,
    data: WorldPairs,
    smoothed: Option<f64>,
}

impl<B: Backend, O: Optimizer<WorldModel<Autodiff<B>>, Autodiff<B>>> LoopTrainer<B> for PretrainLoop<Pretrainer<Autodiff<B>, O>> {
    fn step(&mut self, device: &B::Device) -> Result<StepReport, String> {
        let loss = self.trainer.step(&mut self.data, device)?.loss;
        let guards = vec![("loss", loss), ("weights' sum of magnitudes", finite_figure(self.trainer.weights_finite()))];
        if !loss.is_finite() {
            return Ok(StepReport { message: String::new(), fields: Vec::new(), guards });
        }
        let s = self.smoothed.map_or(loss, |m| 0.98 * m + 0.02 * loss);
        self.smoothed = Some(s);
        Ok(StepReport { message: format!("loss {s:.4}"), fields: vec![("loss".into(), loss), ("loss_smoothed".into(), s)], guards })
    }

    fn save(&self, dir: &Path) -> Result<(), String> {
        save_pipeline_atomic(&self.trainer.ema_pipeline(), dir).map_err(|e| e.to_string())
    }

    fn save_state(&self) -> Result<TrainerState, String> {
        let mut state = self.trainer.save_state()?;
        state.set("data_rng", RngState::of(self.data.rng()));
        // As bits: JSON's decimal text does not bring every f64 back exactly.
        state.set("loss_smoothed", self.smoothed.map(f64::to_bits));
        Ok(state)
    }

    fn restore(&mut self, saved: &SavedState<'_>, device: &B::Device) -> Result<(), String> {
        self.trainer.restore(saved, device)?;
        self.data.set_rng(saved.get::<RngState>("data_rng")?.rng()?);
        self.smoothed = saved.get::<Option<u64>>("loss_smoothed")?.map(f64::from_bits);
        Ok(())
    }
}

/// A guard's figure for a yes/no check: 0 when it holds, NaN when not.
fn finite_figure(holds: bool) -> f64 {
    if holds { 0.0 } else { f64::NAN }
}


/// Loads adapter `name` (a stage output or a path) for `pipeline`'s transformer.
fn adapter<B: Backend>(ctx: &RunContext, name: &str, pipeline: &impl TextToImage<B>, device: &B::Device) -> Result<LoraAdapter<B>, String> {
    load_lora(&ctx.resolve(name), pipeline.transformer(), device).map_err(|e| format!("{name}: {e}"))
}

fn save_adapter(adapter: &LoraAdapter<impl Backend>, dir: &Path) -> Result<(), String> {
    save_adapter_atomic(adapter, dir).map_err(|e| e.to_string())
}

/// Flow-GRPO training of one adapter (data-parallel over several devices).
pub fn grpo<B: Backend>(stage: &Stage, ctx: &mut RunContext, devices: &[B::Device]) -> Result<(), String> {
    let Stage::Grpo(s) = stage else { unreachable!("a grpo stage") };
    match s.train.training.checkpointing {
        Checkpointing::None => grpo_as::<B, NoCheckpointing>(stage, ctx, devices),
        Checkpointing::Balanced | Checkpointing::Blocks => grpo_as::<B, BalancedCheckpointing>(stage, ctx, devices),
    }
}

/// [`grpo`] on `Autodiff<B, C>`.
fn grpo_as<B: Backend, C: CheckpointStrategy>(stage: &Stage, ctx: &mut RunContext, devices: &[B::Device]) -> Result<(), String> {
    let Stage::Grpo(s) = stage else { unreachable!("a grpo stage") };
    let spec = loop_spec(stage, ctx, format!("grpo:{}", s.output), &s.output, s.train.iterations);
    train_on(&spec, ctx, devices, |ctx, device, peer| {
        let pipeline = ctx.pipeline::<B>(&s.model, device)?;
        let init = s.init.as_deref().map(|a| adapter(ctx, a, &pipeline, device)).transpose()?;
        let trainer = grpo_trainer::<Autodiff<B, C>>(pipeline, init, s.train.clone(), device)?;
        match peer {
            Some(peer) => trainer.with_peer(peer),
            None => Ok(trainer),
        }
    })
}

/// DiffusionNFT training of one adapter (data-parallel over several devices).
pub fn nft<B: Backend>(stage: &Stage, ctx: &mut RunContext, devices: &[B::Device]) -> Result<(), String> {
    let Stage::Nft(s) = stage else { unreachable!("a nft stage") };
    match s.train.training.checkpointing {
        Checkpointing::None => nft_as::<B, NoCheckpointing>(stage, ctx, devices),
        Checkpointing::Balanced | Checkpointing::Blocks => nft_as::<B, BalancedCheckpointing>(stage, ctx, devices),
    }
}

/// [`nft`] on `Autodiff<B, C>`.
fn nft_as<B: Backend, C: CheckpointStrategy>(stage: &Stage, ctx: &mut RunContext, devices: &[B::Device]) -> Result<(), String> {
    let Stage::Nft(s) = stage else { unreachable!("an nft stage") };
    let spec = loop_spec(stage, ctx, format!("nft:{}", s.output), &s.output, s.train.iterations);
    train_on(&spec, ctx, devices, |ctx, device, peer| {
        let pipeline = ctx.pipeline::<B>(&s.model, device)?;
        let init = s.init.as_deref().map(|a| adapter(ctx, a, &pipeline, device)).transpose()?;
        let trainer = nft_trainer::<Autodiff<B, C>>(pipeline, init, s.train.clone(), device)?;
        match peer {
            Some(peer) => trainer.with_peer(peer),
            None => Ok(trainer),
        }
    })
}

impl<B: Backend, C: CheckpointStrategy, O: Optimizer<LoraAdapter<Autodiff<B, C>>, Autodiff<B, C>>> LoopTrainer<B> for NftTrainer<Autodiff<B, C>, O> {
    fn step(&mut self, device: &B::Device) -> Result<StepReport, String> {
        let stats = self.iteration(device)?;
        let mut fields: Vec<(String, f64)> = vec![
            ("reward".into(), stats.reward),
            ("loss".into(), stats.loss),
            ("positive_loss".into(), stats.positive),
            ("negative_loss".into(), stats.negative),
            ("kl".into(), stats.kl),
            ("old_decay".into(), stats.decay),
            ("zero_std_fraction".into(), stats.groups.zero_std_fraction),
            ("zero_std_low_fraction".into(), stats.groups.zero_std_low_fraction),
            ("within_group_share".into(), stats.groups.within_share),
            ("partition".into(), stats.partition as f64),
        ];
        fields.extend(stats.task_metrics.iter().map(|(t, m)| (format!("train_{}", t.name()), *m)));
        let guards = vec![
            ("reward", stats.reward),
            ("loss", stats.loss),
            ("adapter weights' sum of magnitudes", finite_figure(self.state.weights_finite())),
        ];
        Ok(StepReport { message: format!("reward {:.3} loss {:.3e}", stats.reward, stats.loss), fields, guards })
    }

    fn save(&self, dir: &Path) -> Result<(), String> {
        save_adapter(&self.state.ema.average, dir)
    }

    fn save_state(&self) -> Result<TrainerState, String> {
        NftTrainer::save_state(self)
    }

    fn restore(&mut self, saved: &SavedState<'_>, device: &B::Device) -> Result<(), String> {
        NftTrainer::restore(self, saved, device)
    }
}

impl<B: Backend, C: CheckpointStrategy, O: Optimizer<LoraAdapter<Autodiff<B, C>>, Autodiff<B, C>>> LoopTrainer<B> for GrpoTrainer<Autodiff<B, C>, O> {
    fn step(&mut self, device: &B::Device) -> Result<StepReport, String> {
        let stats = self.iteration(device)?;
        let mut fields: Vec<(String, f64)> = vec![
            ("reward".into(), stats.reward),
            ("kl".into(), stats.kl),
            ("policy_loss".into(), stats.policy_loss),
            ("clip_fraction".into(), stats.clip_fraction),
            ("zero_std_fraction".into(), stats.groups.zero_std_fraction),
            ("zero_std_low_fraction".into(), stats.groups.zero_std_low_fraction),
            ("within_group_share".into(), stats.groups.within_share),
            ("partition".into(), stats.partition as f64),
        ];
        fields.extend(stats.task_metrics.iter().map(|(t, m)| (format!("train_{}", t.name()), *m)));
        let guards = vec![
            ("reward", stats.reward),
            ("policy loss", stats.policy_loss),
            ("KL", stats.kl),
            ("adapter weights' sum of magnitudes", finite_figure(self.state.weights_finite())),
        ];
        Ok(StepReport { message: format!("reward {:.3} kl {:.2e}", stats.reward, stats.kl), fields, guards })
    }

    fn save(&self, dir: &Path) -> Result<(), String> {
        save_adapter(&self.state.ema.average, dir)
    }

    fn save_state(&self) -> Result<TrainerState, String> {
        self.state.save_state()
    }

    fn restore(&mut self, saved: &SavedState<'_>, device: &B::Device) -> Result<(), String> {
        self.state.restore(saved, device)
    }
}

/// Cold start by merging task adapters into one student adapter.
pub fn merge<B: Backend>(stage: &MergeStage, ctx: &mut RunContext, device: &B::Device) -> Result<(), String> {
    let pipeline = ctx.pipeline::<B>(&stage.model, device)?;
    let adapters = stage
        .adapters
        .iter()
        .map(|(name, weight)| Ok((adapter(ctx, name, &pipeline, device)?, *weight)))
        .collect::<Result<Vec<_>, String>>()?;
    let refs: Vec<_> = adapters.iter().map(|(a, w)| (a, *w)).collect();
    let merged = combine(&refs, stage.method).map_err(|e| e.to_string())?;
    let out = ctx.dir.join(&stage.output);
    save_adapter(&merged, &out)?;
    tracing::info!("merge `{}`: {} adapters ({:?})", stage.output, adapters.len(), stage.method);
    ctx.outputs.insert(stage.output.clone(), out);
    Ok(())
}

/// The distinct adapter names among `names`, sorted (one adapter is loaded per name).
fn distinct<'a>(names: impl Iterator<Item = &'a String>) -> Vec<String> {
    let mut names: Vec<String> = names.cloned().collect();
    names.sort();
    names.dedup();
    names
}

/// Cold start by SFT: the routed teachers sample, the student fits them (first device).
pub fn sft<B: Backend>(stage: &Stage, ctx: &mut RunContext, device: &B::Device) -> Result<(), String> {
    let Stage::Sft(s) = stage else { unreachable!("an sft stage") };
    match s.train.training.checkpointing {
        Checkpointing::None => sft_as::<B, NoCheckpointing>(stage, ctx, device),
        Checkpointing::Balanced | Checkpointing::Blocks => sft_as::<B, BalancedCheckpointing>(stage, ctx, device),
    }
}

/// [`sft`] on `Autodiff<B, C>`.
fn sft_as<B: Backend, C: CheckpointStrategy>(stage: &Stage, ctx: &mut RunContext, device: &B::Device) -> Result<(), String> {
    let Stage::Sft(s) = stage else { unreachable!("an sft stage") };
    let pipeline = ctx.pipeline::<B>(&s.model, device)?;
    let names = distinct(s.routing.values());
    let teachers = names.iter().map(|n| adapter(ctx, n, &pipeline, device)).collect::<Result<Vec<_>, _>>()?;
    let routing = s.routing.iter().map(|(t, n)| (*t, names.iter().position(|m| m == n).expect("listed"))).collect();
    let start = Instant::now();
    let data = teacher_samples(&pipeline, &teachers, &routing, &s.train, device)?;
    tracing::info!("sft `{}`: {} teacher samples in {:.0} s", s.output, data.prompts.len(), start.elapsed().as_secs_f64());
    let trainer = sft_trainer::<Autodiff<B, C>>(pipeline, s.train.clone(), device)?;
    let spec = loop_spec(stage, ctx, format!("sft:{}", s.output), &s.output, s.train.steps);
    // One device: the one trainer is handed to the loop.
    let once = std::sync::Mutex::new(Some(SftLoop { trainer, data }));
    train_on(&spec, ctx, std::slice::from_ref(device), |_, _, _| Ok(once.lock().expect("sft trainer").take().expect("built once")))
}

struct SftLoop<T, D> {
    trainer: T,
    data: D,
}

impl<B: Backend, C: CheckpointStrategy, O: Optimizer<LoraAdapter<Autodiff<B, C>>, Autodiff<B, C>>> LoopTrainer<B> for SftLoop<SftTrainer<Autodiff<B, C>, O>, SftData<B>> {
    fn step(&mut self, device: &B::Device) -> Result<StepReport, String> {
        let loss = self.trainer.step(&self.data, device)?;
        let guards = vec![("loss", loss), ("adapter weights' sum of magnitudes", finite_figure(self.trainer.state.weights_finite()))];
        Ok(StepReport { message: format!("loss {loss:.4}"), fields: vec![("loss".into(), loss)], guards })
    }

    fn save(&self, dir: &Path) -> Result<(), String> {
        save_adapter(&self.trainer.state.ema.average, dir)
    }

    fn save_state(&self) -> Result<TrainerState, String> {
        let mut state = self.trainer.state.save_state()?;
        state.set("noise", RngState::of(self.trainer.noise().rng()));
        Ok(state)
    }

    fn restore(&mut self, saved: &SavedState<'_>, device: &B::Device) -> Result<(), String> {
        self.trainer.state.restore(saved, device)?;
        self.trainer.set_noise(saved.get::<RngState>("noise")?.rng()?);
        Ok(())
    }
}

/// On-policy distillation of the routed teachers (+ MAR anchor) into the student adapter
/// (data-parallel over several devices).
pub fn opd<B: Backend>(stage: &Stage, ctx: &mut RunContext, devices: &[B::Device]) -> Result<(), String> {
    let Stage::Opd(s) = stage else { unreachable!("a opd stage") };
    match s.train.training.checkpointing {
        Checkpointing::None => opd_as::<B, NoCheckpointing>(stage, ctx, devices),
        Checkpointing::Balanced | Checkpointing::Blocks => opd_as::<B, BalancedCheckpointing>(stage, ctx, devices),
    }
}

/// [`opd`] on `Autodiff<B, C>`.
fn opd_as<B: Backend, C: CheckpointStrategy>(stage: &Stage, ctx: &mut RunContext, devices: &[B::Device]) -> Result<(), String> {
    let Stage::Opd(s) = stage else { unreachable!("an opd stage") };
    let spec = loop_spec(stage, ctx, format!("opd:{}", s.output), &s.output, s.train.iterations);
    train_on(&spec, ctx, devices, |ctx, device, peer| {
        let pipeline = ctx.pipeline::<B>(&s.model, device)?;
        // One adapter per distinct teacher name; the routing table points into them.
        let anchor_name = s.anchor.as_ref().filter(|a| *a != "base");
        let names = distinct(s.routing.values().chain(anchor_name));
        let adapters = names.iter().map(|n| adapter(ctx, n, &pipeline, device)).collect::<Result<Vec<_>, _>>()?;
        let index = |name: &str| names.iter().position(|n| n == name).expect("listed");
        let routing = s.routing.iter().map(|(t, n)| (*t, index(n))).collect();
        let anchor = anchor_name.map(|a| index(a));
        let init = s.init.as_deref().map(|a| adapter(ctx, a, &pipeline, device)).transpose()?;
        let teachers = Teachers { adapters, routing, anchor };
        let trainer = opd_trainer::<Autodiff<B, C>>(pipeline, init, teachers, s.train.clone(), device)?;
        match peer {
            Some(peer) => trainer.with_peer(peer),
            None => Ok(trainer),
        }
    })
}

impl<B: Backend, C: CheckpointStrategy, O: Optimizer<LoraAdapter<Autodiff<B, C>>, Autodiff<B, C>>> LoopTrainer<B> for OpdTrainer<Autodiff<B, C>, O> {
    fn step(&mut self, device: &B::Device) -> Result<StepReport, String> {
        let stats = self.iteration(device)?;
        let mut fields: Vec<(String, f64)> =
            vec![("loss".into(), stats.loss), ("loss_opd".into(), stats.distill), ("loss_mar".into(), stats.anchor)];
        fields.extend(stats.task_metrics.iter().map(|(t, m)| (format!("train_{}", t.name()), *m)));
        let guards = vec![
            ("loss", stats.loss),
            ("OPD loss", stats.distill),
            ("MAR loss", stats.anchor),
            ("adapter weights' sum of magnitudes", finite_figure(self.state.weights_finite())),
        ];
        Ok(StepReport { message: format!("loss {:.4}", stats.loss), fields, guards })
    }

    fn save(&self, dir: &Path) -> Result<(), String> {
        save_adapter(&self.state.ema.average, dir)
    }

    fn save_state(&self) -> Result<TrainerState, String> {
        self.state.save_state()
    }

    fn restore(&mut self, saved: &SavedState<'_>, device: &B::Device) -> Result<(), String> {
        self.state.restore(saved, device)
    }
}

/// Evaluation of a pipeline (and adapter) on the test prompts: a row of the run's table, the
/// metrics log, sample grids (prompts split among several devices: the same images).
pub fn eval<B: Backend>(stage: &EvalStage, ctx: &mut RunContext, devices: &[B::Device]) -> Result<(), String> {
    let load = |device: &B::Device| -> Result<_, String> {
        let pipeline = ctx.pipeline::<B>(&stage.model, device)?;
        let adapter = stage.adapter.as_deref().map(|a| adapter(ctx, a, &pipeline, device)).transpose()?;
        Ok((pipeline, adapter))
    };
    // Loaded before the clock starts: the row's seconds are the evaluation's.
    let loaded = devices.iter().map(load).collect::<Result<Vec<_>, _>>()?;
    let name = stage.row_name();
    let prompts = crate::eval::eval_prompts(&stage.eval).map_err(|e| e.to_string())?;
    let bar = progress_bar(prompts.iter().map(|(_, p)| p.len() as u64).sum(), "eval");
    bar.set_message(name.clone());
    let (results, seconds) =
        crate::eval::timed(|| crate::eval::shard::evaluate_on(loaded, devices, &stage.eval, prompts, |n| bar.inc(n as u64)));
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
    if let Some(export) = stage.export.as_ref().filter(|_| crate::train::distributed::is_first_node()) {
        ResultsTable::upsert_file(export, row.clone())?;
    }
    let table = ResultsTable::upsert_dir(&ctx.dir, [row])?;
    write_grids(&ctx.dir.join("grids"), &name, &results).map_err(|e| e.to_string())?;
    write_captioned_grids(&ctx.dir.join("grids"), &name, &results).map_err(|e| e.to_string())?;
    println!("{}", table.markdown());
    Ok(())
}

/// Copies rows of another table into this run's table, marked with their source.
pub fn rows(stage: &RowsStage, ctx: &RunContext) -> Result<(), String> {
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
    use crate::io::metrics::MetricsLog;

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
        let metrics = MetricsLog::open(&run.join("metrics.jsonl")).unwrap();
        let ctx = RunContext::new(run.clone(), metrics, Default::default(), Default::default());
        let stage = RowsStage { from: shipped.clone(), rows: Some(vec!["Teacher".into(), "Base".into()]) };
        rows(&stage, &ctx).unwrap();
        let table = ResultsTable::read(&run).unwrap();
        let names: Vec<&str> = table.rows.iter().map(|r| r.model.as_str()).collect();
        assert_eq!(names, ["Teacher", "Base"]);
        assert!(table.rows.iter().all(|r| r.source.as_deref() == Some(shipped.to_str().unwrap())));
        assert_eq!(table.rows[0].geneval, Some(0.4));
        let missing = RowsStage { from: shipped, rows: Some(vec!["GRPO-Mix".into()]) };
        let err = rows(&missing, &ctx).unwrap_err();
        assert!(err.contains("no row `GRPO-Mix`") && err.contains("Base, Teacher"), "{err}");
    }
}
