//! The one training loop behind every training stage (pre-training, Flow-GRPO, Flow-OPD, SFT):
//! progress bar, `metrics.jsonl`, EMA checkpoints, resumable checkpoints of the whole trainer
//! state (`runs/<run>/checkpoints/<output>/`, see [`crate::io::checkpoint`]) and resuming from
//! them, the wall-clock budget (`max_seconds`), non-finite guards, Ctrl-C through an
//! [`Interrupter`] passed in, and data-parallel peers that run the loop in step and agree after
//! every step on whether to stop.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use super::RunContext;
use crate::Backend;
use crate::io::checkpoint::{Checkpoint, Checkpoints, Manifest};
use crate::train::parallel::{Peer, first_error, local_peers, run_peers};
use crate::train::resume::{SavedState, TrainerState};

/// A stop request that training loops check after every step: they save a checkpoint and end
/// the run with an error saying where it is. Clones share one flag.
#[derive(Debug, Clone, Default)]
pub struct Interrupter(Arc<AtomicBool>);

impl Interrupter {
    /// A flag nothing sets until [`Interrupter::interrupt`] is called.
    pub fn new() -> Self {
        Self::default()
    }

    /// The process's Ctrl-C flag: the first Ctrl-C asks the loops to stop after the current
    /// step, a second one quits at once (exit code 130). Installs the handler once.
    pub fn ctrl_c() -> Self {
        static FLAG: std::sync::OnceLock<Interrupter> = std::sync::OnceLock::new();
        FLAG.get_or_init(|| {
            let flag = Interrupter::new();
            let handler = flag.clone();
            let _ = ctrlc::set_handler(move || {
                if handler.0.swap(true, Ordering::SeqCst) {
                    std::process::exit(130);
                }
                eprintln!("\ninterrupted: finishing the current step and saving a checkpoint (Ctrl-C again to quit at once)");
            });
            flag
        })
        .clone()
    }

    /// Asks the loops to stop.
    pub fn interrupt(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_interrupted(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
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

/// What one step of a trainer reports to the loop.
pub struct StepReport {
    /// Shown beside the progress bar.
    pub message: String,
    /// Logged to `metrics.jsonl` (the loop adds `seconds`).
    pub fields: Vec<(String, f64)>,
    /// Figures that must stay finite (`name`, value), else the stage stops with the last good
    /// checkpoint kept and nothing written after it.
    pub guards: Vec<(&'static str, f64)>,
}

/// A trainer as the stage loop drives it.
pub trait LoopTrainer<B: Backend> {
    /// One step (or iteration).
    fn step(&mut self, device: &B::Device) -> Result<StepReport, String>;
    /// Writes the stage output (the EMA weights) into `dir`, atomically.
    fn save(&self, dir: &Path) -> Result<(), String>;
    /// Everything the next step depends on: weights, EMA, optimiser state, counters and the
    /// positions of every random stream.
    fn save_state(&self) -> Result<TrainerState, String>;
    /// Continues from a state [`LoopTrainer::save_state`] wrote.
    fn restore(&mut self, saved: &SavedState<'_>, device: &B::Device) -> Result<(), String>;
}

/// A training stage as the loop sees it.
pub struct LoopSpec<'a> {
    /// The stage's name in `metrics.jsonl` and in messages (e.g. `grpo:geneval`).
    pub label: String,
    /// Beside the progress bar.
    pub bar_label: &'a str,
    /// The stage output (`runs/<run>/<output>/`).
    pub output: &'a str,
    /// `step` or `iteration`.
    pub unit: &'static str,
    /// What the checkpoint holds, for messages.
    pub what: &'static str,
    pub total: usize,
    pub checkpoint_every: usize,
    /// Log every this many steps (and at the last and at a stop).
    pub log_every: usize,
    pub max_seconds: Option<f64>,
    pub export: Option<&'a Path>,
    pub interrupter: Interrupter,
    /// The stage's key (its settings' hash): checkpoints of other settings are not resumed.
    pub key: String,
}

impl LoopSpec<'_> {
    /// Where the stage's resumable checkpoints go.
    fn checkpoints(&self, ctx: &RunContext) -> Checkpoints {
        Checkpoints::new(ctx.dir.join("checkpoints").join(self.output))
    }
}

/// Where a loop starts: after `step` steps and `seconds` of training (0 for a fresh stage).
#[derive(Debug, Clone, Copy, Default)]
pub struct Start {
    pub step: usize,
    pub seconds: f64,
}

/// The checkpoint a stage continues from: the newest that verifies when the run resumes at
/// this stage (the log is cut back to where it was written), none otherwise (the stage's old
/// checkpoints are removed: they belong to another run of it).
fn resume_point(spec: &LoopSpec<'_>, ctx: &mut RunContext) -> Result<Option<Checkpoint>, String> {
    let checkpoints = spec.checkpoints(ctx);
    if !ctx.resuming {
        checkpoints.clear().map_err(|e| e.to_string())?;
        return Ok(None);
    }
    let saved = checkpoints.latest(&spec.key, |w| tracing::warn!("{}: {w}", spec.label));
    let keep = match &saved {
        Some(c) => {
            tracing::info!("{}: resuming after {} {} from {}", spec.label, spec.unit, c.manifest.step, c.path.display());
            c.manifest.metrics_bytes
        }
        None => {
            tracing::info!("{}: no checkpoint to resume from in {}; starting the stage from the beginning", spec.label, checkpoints.root.display());
            ctx.metrics_floor
        }
    };
    ctx.metrics.truncate(keep).map_err(|e| format!("resuming: {e}"))?;
    Ok(saved)
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
}

/// A training stage on one device, or data-parallel on several: `build` makes the trainer of
/// each device (with its [`Peer`] when there are several; every peer is built before any runs,
/// so a bad stage fails before a peer waits), then [`run_loop`] runs on each, the first device's
/// peer holding the run's context (logging, checkpoints, export); the first real error of any
/// peer is the stage's.
pub fn train_on<'d, B: Backend, T: LoopTrainer<B> + Send>(
    spec: &LoopSpec<'_>,
    ctx: &mut RunContext,
    devices: &'d [B::Device],
    build: impl Fn(&RunContext, &'d B::Device, Option<Peer<B>>) -> Result<T, String>,
) -> Result<(), String> {
    let saved = resume_point(spec, ctx)?;
    let start = saved.as_ref().map_or_else(Start::default, |c| Start { step: c.manifest.step, seconds: c.manifest.seconds });
    // Every peer continues from the same state: peers hold equal states by construction (the
    // same seeds, the same averaged gradients), so a checkpoint holds one.
    let restored = |mut trainer: T, device: &B::Device| -> Result<T, String> {
        if let Some(checkpoint) = &saved {
            trainer.restore(&SavedState { checkpoint }, device)?;
        }
        Ok(trainer)
    };
    let nodes = crate::train::distributed::group();
    if let ([device], None) = (devices, nodes) {
        let trainer = restored(build(ctx, device, None)?, device)?;
        return run_loop(spec, trainer, Some(ctx), device, None, start);
    }
    let peers = local_peers::<B>(devices);
    let count = peers[0].count;
    let trainers = peers
        .into_iter()
        .map(|peer| {
            let device = &devices[peer.local];
            let trainer = build(ctx, device, Some(peer))?;
            restored(trainer, device).map(|t| Mutex::new(Some(t)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    match nodes {
        Some(group) => tracing::info!("{}: data-parallel over {count} devices on {} nodes", spec.label, group.settings.nodes),
        None => tracing::info!("{}: data-parallel over {count} devices", spec.label),
    }
    // Each node's first peer holds its node's context (node 0's is the run's; another node's
    // writes into its own scratch folder).
    let lead = Mutex::new(Some(&mut *ctx));
    let results = run_peers::<B, _, _>(devices, |peer| {
        let trainer = trainers[peer.local].lock().expect("trainer").take().expect("one trainer per peer");
        let ctx = if peer.local == 0 { lead.lock().expect("context").take() } else { None };
        if nodes.is_some() {
            // Nodes resumed from other checkpoints (or one not at all) would train apart.
            let key = crate::train::distributed::hash64(&[&spec.key]);
            let mut point = vec![start.step as f64];
            point.extend(crate::train::distributed::u64_to_parts(key).map(f64::from));
            peer.agree(&format!("{}: the nodes start the stage from different points ([{} reached, settings hash]); start every node from the same run folder", spec.label, spec.unit), &point)?;
        }
        run_loop(spec, trainer, ctx, &peer.device, Some(&peer), start)
    });
    first_error(results).map(|_| ())
}

/// The loop of one peer (or the only trainer): steps from `start` until `spec.total`, the
/// budget, Ctrl-C or an error; the peer holding the run's context (`lead`) shows progress, logs,
/// writes the stage output and the resumable checkpoints, exports, and records the output.
pub fn run_loop<B: Backend, T: LoopTrainer<B>>(
    spec: &LoopSpec<'_>,
    mut trainer: T,
    mut lead: Option<&mut RunContext>,
    device: &B::Device,
    peer: Option<&Peer<B>>,
    start: Start,
) -> Result<(), String> {
    let out = lead.as_ref().map(|ctx| ctx.dir.join(spec.output));
    let checkpoints = lead.as_ref().map(|ctx| spec.checkpoints(ctx));
    let bar = lead.as_ref().map(|_| progress_bar(spec.total as u64, spec.bar_label));
    if let Some(bar) = &bar {
        bar.set_position(start.step.min(spec.total) as u64);
    }
    let clock = StageClock::start(spec.max_seconds);
    let interrupted = || spec.interrupter.is_interrupted();
    // Where the last good state is, for messages.
    let mut last_saved = (start.step > 0).then_some(start.step);
    let kept = |last: Option<usize>| match (last, &checkpoints) {
        (Some(step), Some(c)) => format!("the last good checkpoint ({} {step}) is in {}", spec.unit, c.root.display()),
        (Some(step), None) => format!("the last good checkpoint is that of {} {step}", spec.unit),
        (None, _) => "no checkpoint was written before it".to_string(),
    };
    let mut done = start.step;
    for step in start.step + 1..=spec.total {
        let report = trainer.step(device).map_err(|e| {
            format!("{} {step}: {e}; {}; rerun with `--resume` to continue from it", spec.unit, kept(last_saved))
        })?;
        done = step;
        if let Some((name, value)) = report.guards.iter().find(|(_, v)| !v.is_finite()) {
            // The guarded figures are the same on every peer: they all stop here, and nothing
            // is written after the last good checkpoint.
            return Err(format!("{} {step}: the {name} is {value} (diverged); {}", spec.unit, kept(last_saved)));
        }
        let (elapsed, out_of_time) = clock.read();
        let seconds = start.seconds + elapsed;
        let (mut written, mut saved) = (Ok(()), false);
        if let (Some(ctx), Some(out), Some(bar), Some(checkpoints)) = (lead.as_deref_mut(), &out, &bar, &checkpoints) {
            bar.set_message(report.message);
            bar.inc(1);
            if step % spec.log_every.max(1) == 0 || step == spec.total || out_of_time {
                let mut fields = report.fields;
                fields.push(("seconds".into(), seconds));
                let refs: Vec<(&str, f64)> = fields.iter().map(|(k, v)| (k.as_str(), *v)).collect();
                written = ctx.metrics.log(&spec.label, step, &refs).map_err(|e| e.to_string());
            }
            if written.is_ok() && (step % spec.checkpoint_every.max(1) == 0 || step == spec.total || out_of_time || interrupted()) {
                written = save_all(spec, ctx, checkpoints, &trainer, out, step, seconds);
                saved = true;
                last_saved = Some(step);
            }
        }
        // Whether to stop after this step, the same answer on every peer: when the lead runs
        // out of time or fails to write (whose error is then returned), or any peer is
        // interrupted (Ctrl-C reaches every peer of the process, not necessarily in one step).
        let stop_here = (lead.is_some() && out_of_time) || interrupted() || written.is_err();
        let stop = match peer {
            Some(peer) => peer.any(stop_here)?,
            None => stop_here,
        };
        written?;
        if stop {
            if let (Some(ctx), Some(out), Some(checkpoints)) = (lead.as_deref_mut(), &out, &checkpoints) {
                if !saved {
                    save_all(spec, ctx, checkpoints, &trainer, out, step, seconds)?;
                }
                if interrupted() {
                    return Err(format!(
                        "interrupted at {} {step}; the {} is in {}, and the run continues from there with `--resume`",
                        spec.unit,
                        spec.what,
                        out.display()
                    ));
                }
                if out_of_time {
                    tracing::info!(
                        "{}: time budget of {:.0} s spent after {} {step} of {} ({elapsed:.0} s); `--resume` continues the stage",
                        spec.label,
                        spec.max_seconds.unwrap_or_default(),
                        spec.unit,
                        spec.total
                    );
                }
            }
            break;
        }
    }
    let (Some(ctx), Some(out), Some(bar)) = (lead, out, bar) else {
        return Ok(());
    };
    bar.finish();
    if let Some(export) = spec.export {
        trainer.save(export)?;
    }
    tracing::info!("{}: {done} {}s, {:.0} s in this process", spec.label, spec.unit, clock.read().0);
    ctx.complete = done == spec.total;
    ctx.outputs.insert(spec.output.to_string(), out);
    Ok(())
}

/// Writes the stage output (the EMA weights) and a resumable checkpoint after `step`.
fn save_all<B: Backend>(
    spec: &LoopSpec<'_>,
    ctx: &RunContext,
    checkpoints: &Checkpoints,
    trainer: &impl LoopTrainer<B>,
    out: &Path,
    step: usize,
    seconds: f64,
) -> Result<(), String> {
    trainer.save(out)?;
    let TrainerState { files, state } = trainer.save_state()?;
    let metrics_bytes = ctx.metrics.len().map_err(|e| format!("{}: {e}", ctx.metrics.path().display()))?;
    let manifest = Manifest { step, key: spec.key.clone(), metrics_bytes, seconds, state: state.into(), files: Default::default() };
    checkpoints.write(manifest, &files).map_err(|e| e.to_string())?;
    Ok(())
}
