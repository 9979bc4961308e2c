//! A GRPO stage whose reward server sends NaN, or stops, in the middle of a run ends with a
//! clear error naming the iteration and the server, keeps a usable checkpoint, and — once the
//! server is back — resumes and ends with the adapter of a run that never failed. A stage that
//! diverges stops before it writes a non-finite weight.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::common;

use burn::backend::Flex;
use common::fake_server::{FakeServer, Reply, Seen, mean_pixel_scores};
use flow_opd::io::checkpoint::Checkpoints;
use flow_opd::pipeline::world::save_pipeline_atomic;
use flow_opd::recipe::{Recipe, run_recipe_on};

type B = Flex;

fn recipe(name: &str, model: &Path, url: &str, lr: &str, resume: bool) -> Recipe {
    let text = format!(
        r#"name = "{name}"
resume = {resume}

[[stage]]
kind = "grpo"
output = "teacher"
model = "{model}"
checkpoint_every = 1
[stage.train]
iterations = 4
seed = 3
rollout = {{ prompts = 2, group_size = 2, steps = 3, noise_level = 0.7, guidance = 2.0 }}
lora = {{ rank = 2, alpha = 4.0 }}
optim = {{ lr = {lr} }}
partitions = [{{ tasks = ["composition"], rewards = {{ composition = 1.0 }} }}]
remote_rewards = {{ composition = {{ url = "{url}", name = "brightness", retries = 2, backoff_ms = 1, timeout_secs = 10 }} }}
"#,
        model = model.display()
    );
    Recipe::from_toml(Path::new("outage.toml"), &text).unwrap()
}

/// The brightness reward; while `broken` is set, the third request on (iteration 3 on) gets
/// `NaN` scores, as Python's `json.dumps(float("nan"))` writes them.
fn brightness(broken: Arc<AtomicBool>) -> impl Fn(usize, &Seen) -> Reply + Send + Sync + 'static {
    move |n, request| {
        if n >= 2 && broken.load(Ordering::SeqCst) {
            let count = request.body["images"].as_array().unwrap().len();
            let scores = vec![r#"{"value": NaN, "metric": NaN}"#; count].join(", ");
            return Reply { status: 200, headers: vec![], body: format!(r#"{{"scores": [{scores}]}}"#) };
        }
        Reply::json(200, mean_pixel_scores(request))
    }
}

fn adapter_bytes(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("adapter_model.safetensors")).unwrap()
}

struct Setup {
    _tmp: tempfile::TempDir,
    runs: PathBuf,
    model: PathBuf,
    /// The adapter of a run whose server never failed.
    reference: Vec<u8>,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let runs = tmp.path().join("runs");
    let model = tmp.path().join("toy");
    save_pipeline_atomic(&common::toy_world_pipeline(2), &model).unwrap();
    let good = FakeServer::start(brightness(Arc::new(AtomicBool::new(false))));
    let ctx = run_recipe_on::<B>(&recipe("reference", &model, &good.url, "1e-2", false), &runs, &[Default::default()]).unwrap();
    let reference = adapter_bytes(&ctx.dir.join("teacher"));
    Setup { _tmp: tmp, runs, model, reference }
}

/// After the failure: checkpoint 2 verifies and the stage output holds finite weights.
fn usable_checkpoint(run: &Path) {
    let checkpoint = Checkpoints::read(&run.join("checkpoints/teacher/00000002")).unwrap();
    assert_eq!(checkpoint.manifest.step, 2);
    assert!(Checkpoints::new(run.join("checkpoints/teacher")).list().iter().all(|(step, _)| *step <= 2), "nothing saved after the failure");
    let device = Default::default();
    let pipeline = flow_opd::pipeline::world::Pipeline::<B>::load(&run.parent().unwrap().parent().unwrap().join("toy"), &device).unwrap();
    let adapter = flow_opd::model::lora::load_lora(&run.join("teacher"), &pipeline.model.transformer, &device).unwrap();
    assert!(flow_opd::train::weights_finite::<B, _>(&adapter));
}

#[test]
fn nan_rewards_stop_the_stage_and_it_resumes_once_the_server_is_fixed() {
    let s = setup();
    let broken = Arc::new(AtomicBool::new(true));
    let server = FakeServer::start(brightness(broken.clone()));
    let Err(err) = run_recipe_on::<B>(&recipe("nan", &s.model, &server.url, "1e-2", false), &s.runs, &[Default::default()]) else {
        panic!("NaN rewards were accepted");
    };
    let err = err.to_string();
    eprintln!("{err}");
    for part in ["iteration 3", "brightness", "NaN", "last good checkpoint (iteration 2)", "--resume"] {
        assert!(err.contains(part), "`{part}` missing from: {err}");
    }
    usable_checkpoint(&s.runs.join("nan"));
    broken.store(false, Ordering::SeqCst);
    let ctx = run_recipe_on::<B>(&recipe("nan", &s.model, &server.url, "1e-2", true), &s.runs, &[Default::default()]).unwrap();
    assert_eq!(adapter_bytes(&ctx.dir.join("teacher")), s.reference, "the resumed run's adapter");
}

#[test]
fn a_reward_server_that_stops_ends_the_stage_after_its_retries_and_it_resumes_when_back() {
    let s = setup();
    // Stops once it has answered two requests: two iterations score, the third fails after
    // its 3 attempts.
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let inner = brightness(Arc::new(AtomicBool::new(false)));
    let counter = answered.clone();
    let server = Arc::new(FakeServer::start(move |n, r| {
        let reply = inner(n, r);
        counter.fetch_add(1, Ordering::SeqCst);
        reply
    }));
    let stopper = server.clone();
    std::thread::spawn(move || {
        while answered.load(Ordering::SeqCst) < 2 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        stopper.set_down(true);
    });
    let run = recipe("down", &s.model, &server.url, "1e-2", false);
    let Err(err) = run_recipe_on::<B>(&run, &s.runs, &[Default::default()]) else { panic!("the server stopped, yet the stage ended") };
    let err = err.to_string();
    for part in ["iteration 3", "brightness", &server.url, "not reachable after 3 attempt", "last good checkpoint (iteration 2)", "--resume"] {
        assert!(err.contains(part), "`{part}` missing from: {err}");
    }
    usable_checkpoint(&s.runs.join("down"));
    server.set_down(false);
    let ctx = run_recipe_on::<B>(&recipe("down", &s.model, &server.url, "1e-2", true), &s.runs, &[Default::default()]).unwrap();
    assert_eq!(adapter_bytes(&ctx.dir.join("teacher")), s.reference, "the resumed run's adapter");
}

#[test]
fn a_diverging_stage_stops_before_it_saves_a_non_finite_weight() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("toy");
    save_pipeline_atomic(&common::toy_world_pipeline(2), &model).unwrap();
    let server = FakeServer::start(brightness(Arc::new(AtomicBool::new(false))));
    let Err(err) = run_recipe_on::<B>(&recipe("diverge", &model, &server.url, "1e38", false), tmp.path(), &[Default::default()]) else {
        panic!("a learning rate of 1e38 trained without complaint");
    };
    let err = err.to_string();
    eprintln!("{err}");
    assert!(err.contains("iteration 1") && err.contains("(diverged)") && err.contains("no checkpoint was written before it"), "{err}");
    assert!(!tmp.path().join("diverge/teacher").exists(), "nothing was saved");
}
