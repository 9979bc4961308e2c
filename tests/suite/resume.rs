//! Runs that survive: a recipe killed with SIGKILL in the middle of its pre-training, GRPO and
//! OPD stages and resumed with `--resume` each time ends with the very files and log of a run
//! that was never interrupted (on one CPU peer and on two); a corrupt newest checkpoint is
//! passed over for the previous one, with a message saying so.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common;

use flow_opd::pipeline::world::save_pipeline_atomic;

const BIN: &str = env!("CARGO_BIN_EXE_flow-opd");

/// Pre-training, a GRPO teacher and an OPD student of the toy world, checkpointed every 2 of
/// 6 steps.
fn chain_recipe(model: &Path) -> String {
    format!(
        r#"name = "chain"

[[stage]]
kind = "pretrain"
output = "base"
init = "{model}"
checkpoint_every = 2
train = {{ steps = 6, batch_size = 4, seed = 1, optim = {{ lr = 1e-3 }} }}

[[stage]]
kind = "grpo"
output = "teacher"
model = "base"
checkpoint_every = 2
[stage.train]
iterations = 6
seed = 3
rollout = {{ prompts = 2, group_size = 2, steps = 3, noise_level = 0.7, guidance = 2.0 }}
lora = {{ rank = 2, alpha = 4.0 }}
optim = {{ lr = 1e-2 }}
partitions = [{{ tasks = ["composition"], rewards = {{ composition = 1.0 }} }}]

[[stage]]
kind = "opd"
output = "student"
model = "base"
routing = {{ composition = "teacher" }}
checkpoint_every = 2
[stage.train]
iterations = 6
seed = 5
rollout = {{ prompts = 2, group_size = 2, steps = 3, noise_level = 0.7, guidance = 2.0 }}
lora = {{ rank = 2, alpha = 4.0 }}
optim = {{ lr = 3e-3 }}
"#,
        model = model.display()
    )
}

/// `flow-opd recipe` of `recipe` into `runs`, its output going to `log`.
fn start(recipe: &Path, runs: &Path, devices: &str, resume: bool, log: &Path) -> Child {
    let mut command = Command::new(BIN);
    command.args(["recipe"]).arg(recipe).arg("--runs").arg(runs).args(["--device", devices]);
    if resume {
        command.arg("--resume");
    }
    let out = std::fs::File::create(log).unwrap();
    command
        .env_remove("RUST_BACKTRACE")
        .env("RUST_LOG", "info")
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out))
        .spawn()
        .unwrap()
}

/// Waits for the run to end and returns its output; fails the test when it fails.
fn finish(mut child: Child, log: &Path) -> String {
    let status = child.wait().unwrap();
    let text = std::fs::read_to_string(log).unwrap();
    assert!(status.success(), "the run failed ({status}):\n{text}");
    text
}

/// Kills the run with SIGKILL as soon as checkpoint `dir` exists (written atomically, so
/// complete), and returns its output.
fn kill_after(mut child: Child, dir: &Path, log: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(600);
    while !dir.join("manifest.json").exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run ended ({status}) before {} was written:\n{}", dir.display(), std::fs::read_to_string(log).unwrap());
        }
        assert!(Instant::now() < deadline, "no checkpoint {} after 10 minutes", dir.display());
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    std::fs::read_to_string(log).unwrap()
}

/// The log without its wall-clock field.
fn metrics_without_seconds(run: &Path) -> Vec<serde_json::Map<String, serde_json::Value>> {
    let mut records = flow_opd::io::metrics::read_metrics(&run.join("metrics.jsonl")).unwrap();
    for r in &mut records {
        assert!(r.remove("seconds").is_some() || r["stage"].as_str().unwrap().starts_with("eval"));
    }
    records
}

fn ended_stages(run: &Path) -> usize {
    flow_opd::recipe::progress::Progress::read(run).unwrap().map_or(0, |p| p.stages.len())
}

fn killed_and_resumed_runs_equal_an_uninterrupted_one(devices: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("toy");
    save_pipeline_atomic(&common::toy_world_pipeline(2), &model).unwrap();
    let recipe = tmp.path().join("chain.toml");
    std::fs::write(&recipe, chain_recipe(&model)).unwrap();
    let log = tmp.path().join("log.txt");

    let (whole, killed) = (tmp.path().join("whole"), tmp.path().join("killed"));
    finish(start(&recipe, &whole, devices, false, &log), &log);

    let run = killed.join("chain");
    let checkpoint = |output: &str| run.join("checkpoints").join(output).join("00000002");
    // Killed after the second step of each training stage, each time in its middle.
    let mut killed_in: Option<&str> = None;
    for (ended_before, output, unit) in [(0, "base", "step"), (1, "teacher", "iteration"), (2, "student", "iteration")] {
        let text = kill_after(start(&recipe, &killed, devices, killed_in.is_some(), &log), &checkpoint(output), &log);
        if let Some(unit) = killed_in {
            assert!(text.contains(&format!("resuming after {unit} 2")), "the resumed run did not continue from its checkpoint:\n{text}");
        }
        assert_eq!(ended_stages(&run), ended_before, "killed while `{output}` trained:\n{text}");
        killed_in = Some(unit);
    }
    let text = finish(start(&recipe, &killed, devices, true, &log), &log);
    assert!(text.contains("resuming after iteration 2"), "{text}");
    assert!(text.contains("ended in an earlier run, outputs verified: kept"), "{text}");

    for output in ["base", "teacher", "student"] {
        let (a, b) = (common::files(&whole.join("chain").join(output)), common::files(&run.join(output)));
        assert!(!a.is_empty());
        assert_eq!(a.iter().map(|(p, _)| p).collect::<Vec<_>>(), b.iter().map(|(p, _)| p).collect::<Vec<_>>(), "{output}: file lists");
        for ((path, x), (_, y)) in a.iter().zip(&b) {
            assert!(x == y, "{output}/{}: the resumed run's file differs from the uninterrupted run's", path.display());
        }
    }
    let (a, b) = (metrics_without_seconds(&whole.join("chain")), metrics_without_seconds(&run));
    assert_eq!(a.len(), 1 + 6 + 6, "pre-training logs every 10 steps and at its last; the others every iteration");
    assert_eq!(a, b, "metrics.jsonl of the resumed run");
}

#[test]
fn pretraining_grpo_and_opd_killed_and_resumed_equal_an_uninterrupted_run() {
    killed_and_resumed_runs_equal_an_uninterrupted_one("cpu");
}

#[test]
fn two_peers_killed_and_resumed_equal_an_uninterrupted_run() {
    killed_and_resumed_runs_equal_an_uninterrupted_one("cpu,cpu");
}

#[test]
fn a_corrupt_newest_checkpoint_is_passed_over_for_the_previous_one() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("toy");
    save_pipeline_atomic(&common::toy_world_pipeline(2), &model).unwrap();
    let text = chain_recipe(&model);
    // The GRPO stage alone, on the toy model, checkpointed every iteration.
    let grpo = &text[text.find("[[stage]]\nkind = \"grpo\"").unwrap()..text.find("[[stage]]\nkind = \"opd\"").unwrap()];
    let grpo = grpo.replace("model = \"base\"", &format!("model = \"{}\"", model.display())).replace("checkpoint_every = 2", "checkpoint_every = 1");
    let recipe = tmp.path().join("grpo.toml");
    std::fs::write(&recipe, format!("name = \"grpo\"\n\n{grpo}")).unwrap();
    let log = tmp.path().join("log.txt");
    let (whole, killed) = (tmp.path().join("whole"), tmp.path().join("killed"));
    finish(start(&recipe, &whole, "cpu", false, &log), &log);

    let checkpoints = killed.join("grpo/checkpoints/teacher");
    kill_after(start(&recipe, &killed, "cpu", false, &log), &checkpoints.join("00000003"), &log);
    let mut kept: Vec<String> = std::fs::read_dir(&checkpoints)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    kept.sort();
    // Two are kept (three for a moment: the kill may fall between a write and the removal of
    // the oldest).
    assert!(kept.len() >= 2, "{kept:?}");
    let (previous, newest) = (kept[kept.len() - 2].clone(), kept[kept.len() - 1].clone());
    // One flipped byte in the newest checkpoint's optimiser state.
    let corrupt = checkpoints.join(&newest);
    let newest = corrupt.join("optimizer.bin");
    let mut bytes = std::fs::read(&newest).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    std::fs::write(&newest, bytes).unwrap();

    let text = finish(start(&recipe, &killed, "cpu", true, &log), &log);
    let previous: usize = previous.parse().unwrap();
    assert!(text.contains(&format!("checkpoint {} is torn or corrupt", corrupt.display())), "{text}");
    assert!(text.contains("checksum does not match"), "{text}");
    assert!(text.contains(&format!("resuming after iteration {previous} from")), "{text}");
    assert_eq!(common::files(&whole.join("grpo/teacher")), common::files(&killed.join("grpo/teacher")), "the adapter of the resumed run");
    assert_eq!(std::fs::read_dir(&checkpoints).unwrap().count(), 2, "the two newest checkpoints are kept");
    assert_eq!(metrics_without_seconds(&whole.join("grpo")), metrics_without_seconds(&killed.join("grpo")));
}

/// SFT through the same loop: stopped by Ctrl-C (an [`Interrupter`] set before the run) after
/// its first step, then resumed, it ends with the adapter of an uninterrupted run.
#[test]
fn sft_interrupted_and_resumed_equals_an_uninterrupted_run() {
    use flow_opd::recipe::{Interrupter, Recipe, run_recipe_with};
    type B = burn::backend::Flex;
    let tmp = tempfile::tempdir().unwrap();
    let pipeline = common::toy_world_pipeline(2);
    let (model, teacher) = (tmp.path().join("toy"), tmp.path().join("teacher"));
    save_pipeline_atomic(&pipeline, &model).unwrap();
    let device = Default::default();
    flow_opd::model::lora::save_adapter_atomic(&common::toy_teacher(&pipeline.model.transformer, 7, &device), &teacher).unwrap();
    let recipe = |name: &str, resume: bool| {
        let text = format!(
            "name = \"{name}\"\nresume = {resume}\n[[stage]]\nkind = \"sft\"\noutput = \"sft\"\nmodel = \"{}\"\nrouting = {{ composition = \"{}\" }}\n\
             train = {{ samples_per_task = 4, sampling = {{ steps = 3, guidance = 2.0 }}, steps = 4, batch_size = 2, seed = 9, \
             optim = {{ lr = 1e-2 }}, lora = {{ rank = 2, alpha = 4.0 }} }}\n",
            model.display(),
            teacher.display()
        );
        Recipe::from_toml(Path::new("sft.toml"), &text).unwrap()
    };
    let devices = [Default::default()];
    let runs = tmp.path().join("runs");
    run_recipe_with::<B>(&recipe("whole", false), &runs, &devices, Interrupter::new()).unwrap();
    let stop = Interrupter::new();
    stop.interrupt();
    let Err(err) = run_recipe_with::<B>(&recipe("stopped", false), &runs, &devices, stop) else { panic!("the interrupted run ended") };
    assert!(err.to_string().contains("interrupted at step 1") && err.to_string().contains("--resume"), "{err}");
    run_recipe_with::<B>(&recipe("stopped", true), &runs, &devices, Interrupter::new()).unwrap();
    assert_eq!(common::files(&runs.join("whole/sft")), common::files(&runs.join("stopped/sft")), "the resumed SFT adapter");
    assert_eq!(metrics_without_seconds(&runs.join("whole")), metrics_without_seconds(&runs.join("stopped")));
}
