//! The one training loop behind every training stage (pre-training, Flow-GRPO, Flow-OPD, SFT):
//! progress bar, `metrics.jsonl`, EMA checkpoints, the wall-clock budget (`max_seconds`), a
//! non-finite guard, Ctrl-C through an [`Interrupter`] passed in, and data-parallel peers that
//! run the loop in step and agree after every step on whether to stop.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use super::RunContext;
use crate::Backend;
use crate::train::parallel::{Peer, first_error, run_peers};

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
    /// A figure that must stay finite (`name`, value), else the stage stops with the last good
    /// checkpoint kept.
    pub guard: Option<(&'static str, f64)>,
}

/// A trainer as the stage loop drives it.
pub trait LoopTrainer<B: Backend> {
    /// One step (or iteration).
    fn step(&mut self, device: &B::Device) -> Result<StepReport, String>;
    /// Writes the checkpoint (the EMA weights) into `dir`, atomically.
    fn save(&self, dir: &Path) -> Result<(), String>;
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
    if let [device] = devices {
        let trainer = build(ctx, device, None)?;
        return run_loop(spec, trainer, Some(ctx), device, None);
    }
    let count = devices.len();
    let trainers = devices
        .iter()
        .enumerate()
        .map(|(index, device)| build(ctx, device, Some(Peer { index, count, device: device.clone() })).map(|t| Mutex::new(Some(t))))
        .collect::<Result<Vec<_>, _>>()?;
    tracing::info!("{}: data-parallel over {count} devices", spec.label);
    let lead = Mutex::new(Some(&mut *ctx));
    let results = run_peers::<B, _, _>(devices, |peer| {
        let trainer = trainers[peer.index].lock().expect("trainer").take().expect("one trainer per peer");
        let ctx = if peer.index == 0 { lead.lock().expect("context").take() } else { None };
        run_loop(spec, trainer, ctx, &peer.device, Some(&peer))
    });
    first_error(results).map(|_| ())
}

/// The loop of one peer (or the only trainer): steps until `spec.total`, the budget, Ctrl-C or
/// an error; the peer holding the run's context (`lead`) shows progress, logs, checkpoints and
/// exports, and records the output.
pub fn run_loop<B: Backend>(
    spec: &LoopSpec<'_>,
    mut trainer: impl LoopTrainer<B>,
    mut lead: Option<&mut RunContext>,
    device: &B::Device,
    peer: Option<&Peer<B>>,
) -> Result<(), String> {
    let out = lead.as_ref().map(|ctx| ctx.dir.join(spec.output));
    let bar = lead.as_ref().map(|_| progress_bar(spec.total as u64, spec.bar_label));
    let clock = StageClock::start(spec.max_seconds);
    let interrupted = || spec.interrupter.is_interrupted();
    let mut done = 0;
    for step in 1..=spec.total {
        let report = trainer.step(device)?;
        done = step;
        if let Some((name, value)) = report.guard.filter(|(_, v)| !v.is_finite()) {
            // The guarded figure is the same on every peer: they all stop here.
            let at = out.as_ref().map_or_else(|| format!("the run's `{}` folder", spec.output), |p| p.display().to_string());
            return Err(format!(
                "{} {step}: the {name} is {value} (diverged); the last good {} is in {at} (saved every {} {}s)",
                spec.unit, spec.what, spec.checkpoint_every, spec.unit
            ));
        }
        let (seconds, out_of_time) = clock.read();
        let (mut written, mut saved) = (Ok(()), false);
        if let (Some(ctx), Some(out), Some(bar)) = (lead.as_deref_mut(), &out, &bar) {
            bar.set_message(report.message);
            bar.inc(1);
            if step % spec.log_every.max(1) == 0 || step == spec.total || out_of_time {
                let mut fields = report.fields;
                fields.push(("seconds".into(), seconds));
                let refs: Vec<(&str, f64)> = fields.iter().map(|(k, v)| (k.as_str(), *v)).collect();
                written = ctx.metrics.log(&spec.label, step, &refs).map_err(|e| e.to_string());
            }
            if written.is_ok() && (step % spec.checkpoint_every.max(1) == 0 || step == spec.total || out_of_time || interrupted()) {
                written = trainer.save(out);
                saved = true;
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
            if let Some(out) = &out {
                if !saved {
                    trainer.save(out)?;
                }
                if interrupted() {
                    return Err(format!("interrupted at {} {step}; the {} is in {}", spec.unit, spec.what, out.display()));
                }
                if out_of_time {
                    tracing::info!(
                        "{}: time budget of {:.0} s spent after {} {step} of {} ({seconds:.0} s)",
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
    tracing::info!("{}: {done} {}s in {:.0} s", spec.label, spec.unit, clock.read().0);
    ctx.outputs.insert(spec.output.to_string(), out);
    Ok(())
}
