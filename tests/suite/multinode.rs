//! Multi-node data parallelism through burn-collective's global orchestrator, on loopback: two
//! `flow-opd` processes as two nodes of one CPU device each train as one process with two CPU
//! peers; a node that dies ends the other with an error naming it, leaving a checkpoint that
//! resumes; nodes with different recipes are refused; bad flags are named.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common;

use flow_opd::pipeline::world::save_pipeline_atomic;

const BIN: &str = env!("CARGO_BIN_EXE_flow-opd");

/// A Flow-GRPO stage over two partitions (composition, text), then a Flow-OPD student of two
/// fixed toy teachers with a MAR anchor, both on the toy world.
fn recipe(name: &str, toy: &Toy, iterations: usize, checkpoint_every: usize) -> String {
    format!(
        r#"name = "{name}"

[[stage]]
kind = "grpo"
output = "teacher"
model = "{model}"
checkpoint_every = {checkpoint_every}
[stage.train]
iterations = {iterations}
beta = 0.04
seed = 3
rollout = {{ prompts = 2, group_size = 3, steps = 4, noise_level = 0.7, guidance = 2.0 }}
lora = {{ rank = 2, alpha = 4.0 }}
optim = {{ lr = 1e-2 }}
partitions = [
  {{ tasks = ["composition"], rewards = {{ composition = 1.0 }}, ratio = 1 }},
  {{ tasks = ["text"], rewards = {{ text = 1.0 }}, ratio = 1 }},
]

[[stage]]
kind = "opd"
output = "student"
model = "{model}"
routing = {{ composition = "{t0}", text = "{t1}", preference = "{t0}", quality = "{t1}" }}
anchor = "{t1}"
checkpoint_every = {checkpoint_every}
[stage.train]
iterations = {iterations}
mar_lambda = 0.5
seed = 5
rollout = {{ prompts = 4, group_size = 2, steps = 4, noise_level = 0.7, guidance = 2.0 }}
lora = {{ rank = 2, alpha = 4.0 }}
optim = {{ lr = 3e-3, weight_decay = 0.0 }}
"#,
        model = toy.model.display(),
        t0 = toy.teachers[0].display(),
        t1 = toy.teachers[1].display(),
    )
}

/// Ports nothing listens on (each held until all are chosen, so they differ).
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    held.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

/// `flow-opd recipe` with `args`, its output going to `log`.
fn start(recipe: &Path, runs: &Path, args: &[String], log: &Path) -> Child {
    let out = std::fs::File::create(log).unwrap();
    Command::new(BIN)
        .args(["recipe"])
        .arg(recipe)
        .arg("--runs")
        .arg(runs)
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out))
        .spawn()
        .unwrap()
}

/// The arguments of node `rank` of `nodes` with coordinator port `ports[0]` and data port
/// `ports[1 + rank]`.
fn node_args(nodes: usize, rank: usize, ports: &[u16], extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--device".into(),
        "cpu".into(),
        "--nodes".into(),
        nodes.to_string(),
        "--node-rank".into(),
        rank.to_string(),
        "--coordinator".into(),
        format!("127.0.0.1:{}", ports[0]),
        "--node-port".into(),
        ports[1 + rank].to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Waits for `child` (at most 10 minutes: a hang guard, not a timing) and returns whether it
/// succeeded and its output.
fn wait(mut child: Child, log: &Path) -> (bool, String) {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status.success(), std::fs::read_to_string(log).unwrap());
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("still running after 10 minutes:\n{}", std::fs::read_to_string(log).unwrap());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn succeeded(child: Child, log: &Path) -> String {
    let (ok, text) = wait(child, log);
    assert!(ok, "the run failed:\n{text}");
    text
}

/// The toy world model and two teacher adapters of it, in a temporary folder.
struct Toy {
    tmp: tempfile::TempDir,
    model: PathBuf,
    teachers: [PathBuf; 2],
}

fn toy() -> Toy {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("toy");
    let pipeline = common::toy_world_pipeline(0);
    save_pipeline_atomic(&pipeline, &model).unwrap();
    let teachers = [7, 8].map(|seed| {
        let path = tmp.path().join(format!("teacher{seed}"));
        let adapter = common::toy_teacher(&pipeline.model.transformer, seed, &Default::default());
        flow_opd::model::lora::save_adapter_atomic(&adapter, &path).unwrap();
        path
    });
    Toy { tmp, model, teachers }
}

impl Toy {
    fn write(&self, file: &str, text: &str) -> PathBuf {
        let path = self.tmp.path().join(file);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }
}

fn assert_close(what: &str, a: &[f32], b: &[f32], tolerance: f32) {
    assert_eq!(a.len(), b.len(), "{what}: sizes");
    let scale = a.iter().map(|x| x.abs()).fold(0f32, f32::max);
    assert!(scale > 0.0, "{what}: all zero");
    let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(diff <= tolerance * scale, "{what}: differ by {diff} (scale {scale})");
}

fn metrics(run: &Path) -> Vec<serde_json::Map<String, serde_json::Value>> {
    flow_opd::io::metrics::read_metrics(&run.join("metrics.jsonl")).unwrap()
}

/// The named figure of every record of `stage`.
fn figure(records: &[serde_json::Map<String, serde_json::Value>], stage: &str, key: &str) -> Vec<f64> {
    let found: Vec<f64> = records.iter().filter(|r| r["stage"].as_str().unwrap().starts_with(stage)).map(|r| r[key].as_f64().unwrap()).collect();
    assert!(!found.is_empty(), "no `{key}` logged by {stage}");
    found
}

fn assert_figures_close(what: &str, a: &[f64], b: &[f64], tolerance: f64) {
    assert_eq!(a.len(), b.len(), "{what}: counts");
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= tolerance * x.abs().max(1e-12), "{what}: {x} vs {y}");
    }
}

#[test]
fn two_nodes_train_as_one_process_with_two_peers() {
    let toy = toy();
    let file = toy.write("dp.toml", &recipe("dp", &toy, 3, 3));
    let (single, multi) = (toy.path("single"), toy.path("multi"));
    succeeded(start(&file, &single, &["--device".into(), "cpu,cpu".into()], &toy.path("single.log")), &toy.path("single.log"));

    let ports = free_ports(3);
    let logs = [toy.path("node0.log"), toy.path("node1.log")];
    let nodes: Vec<Child> = (0..2).map(|rank| start(&file, &multi, &node_args(2, rank, &ports, &["--node-timeout", "120"]), &logs[rank])).collect();
    let texts: Vec<String> = nodes.into_iter().zip(&logs).map(|(child, log)| succeeded(child, log)).collect();
    assert!(texts[0].contains("data-parallel over 2 devices on 2 nodes"), "{}", texts[0]);

    let (a, b) = (metrics(&single.join("dp")), metrics(&multi.join("dp")));
    assert_eq!(b.len(), 6, "node 0 alone logs one line per iteration of each stage");
    assert!(figure(&b, "grpo", "reward").iter().any(|r| *r > 0.0) && figure(&b, "grpo", "kl").iter().any(|k| *k > 0.0), "GRPO learned nothing");
    assert_eq!(figure(&a, "grpo", "reward"), figure(&b, "grpo", "reward"), "the GRPO batch rewards");
    assert_figures_close("GRPO KL", &figure(&a, "grpo", "kl"), &figure(&b, "grpo", "kl"), 1e-4);
    assert_figures_close("OPD loss", &figure(&a, "opd", "loss"), &figure(&b, "opd", "loss"), 1e-5);
    assert_figures_close("OPD MAR", &figure(&a, "opd", "loss_mar"), &figure(&b, "opd", "loss_mar"), 1e-5);
    for output in ["teacher", "student"] {
        let (one, node0) = (common::folder_values(&single.join("dp").join(output)), common::folder_values(&multi.join("dp").join(output)));
        assert_close(&format!("{output}: two nodes vs one process"), &one, &node0, 1e-4);
        // Node 1 wrote its copy into its own folder: the same adapter, bit for bit.
        assert_eq!(common::folder_values(&multi.join("node-1/dp").join(output)), node0, "{output}: the nodes' adapters differ");
    }
}

#[test]
fn a_node_that_dies_ends_the_other_with_its_name_and_the_last_checkpoint_resumes() {
    let toy = toy();
    let file = toy.write("long.toml", &recipe("long", &toy, 30, 1));
    let runs = toy.path("runs");
    let ports = free_ports(3);
    let logs = [toy.path("node0.log"), toy.path("node1.log")];
    let args = |rank| node_args(2, rank, &ports, &["--node-timeout", "10"]);
    let node0 = start(&file, &runs, &args(0), &logs[0]);
    let mut node1 = start(&file, &runs, &args(1), &logs[1]);
    // Node 1 dies (SIGKILL) once node 0 has checkpointed the teacher's second iteration.
    let checkpoint = runs.join("long/checkpoints/teacher/00000002/manifest.json");
    let deadline = Instant::now() + Duration::from_secs(600);
    while !checkpoint.exists() {
        assert!(Instant::now() < deadline, "no checkpoint after 10 minutes:\n{}", std::fs::read_to_string(&logs[0]).unwrap());
        assert!(node1.try_wait().unwrap().is_none(), "node 1 ended early:\n{}", std::fs::read_to_string(&logs[1]).unwrap());
        std::thread::sleep(Duration::from_millis(5));
    }
    node1.kill().unwrap();
    node1.wait().unwrap();
    let (ok, text) = wait(node0, &logs[0]);
    assert!(!ok, "node 0 went on without node 1:\n{text}");
    let error = text.lines().find(|l| l.starts_with("Error")).unwrap_or_else(|| panic!("no error line:\n{text}"));
    assert!(error.contains("node 1 (127.0.0.1:"), "the error does not name the lost node: {error}");
    assert_eq!(metrics(&runs.join("long")).iter().filter(|r| r["stage"] == "grpo:teacher").count() >= 2, true);

    // Node 0's run folder resumes in one process with two peers, from its last checkpoint.
    let log = toy.path("resume.log");
    let text = succeeded(start(&file, &runs, &["--device".into(), "cpu,cpu".into(), "--resume".into()], &log), &log);
    assert!(text.contains("grpo:teacher: resuming after iteration"), "{text}");
    let steps: Vec<u64> = metrics(&runs.join("long")).iter().filter(|r| r["stage"] == "grpo:teacher").map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=30).collect::<Vec<_>>(), "one line per iteration, none lost or repeated");
}

#[test]
fn nodes_with_different_recipes_are_refused_and_bad_flags_are_named() {
    let toy = toy();
    let a = toy.write("a.toml", &recipe("same", &toy, 2, 2));
    let b = toy.write("b.toml", &recipe("same", &toy, 2, 2).replace("lr = 1e-2", "lr = 2e-2"));
    let runs = toy.path("runs");
    let ports = free_ports(4);
    let logs = [toy.path("node0.log"), toy.path("node1.log")];
    let node0 = start(&a, &runs, &node_args(2, 0, &ports, &["--node-timeout", "60"]), &logs[0]);
    let node1 = start(&b, &runs, &node_args(2, 1, &ports, &["--node-timeout", "60"]), &logs[1]);
    for (node, log) in [node0, node1].into_iter().zip(&logs) {
        let (ok, text) = wait(node, log);
        assert!(!ok, "a node trained with another recipe than its peer:\n{text}");
        assert!(text.contains("runs another recipe or another flow-opd"), "{text}");
    }
    assert!(!runs.join("same/metrics.jsonl").exists() || metrics(&runs.join("same")).is_empty(), "a refused group trained");

    for (args, expected) in [
        (node_args(2, 2, &ports, &[]), "--node-rank 2 with --nodes 2"),
        (vec!["--nodes".into(), "2".into(), "--node-rank".into(), "0".into()], "--coordinator"),
        (node_args(2, 0, &ports, &["--node-timeout", "0"]), "--node-timeout 0"),
        (node_args(2, 0, &ports, &["--global-strategy", "star"]), "--global-strategy `star`"),
        (vec!["--coordinator".into(), "127.0.0.1:1".into()], "--coordinator is given without --nodes"),
    ] {
        let log = toy.path("bad.log");
        let (ok, text) = wait(start(&a, &runs, &args, &log), &log);
        assert!(!ok && text.contains(expected), "{args:?}: {text}");
        assert!(!text.contains("panicked"), "{args:?}: {text}");
    }
}
