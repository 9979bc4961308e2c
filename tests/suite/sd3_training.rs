//! Training on a diffusers SD3 folder (the tiny random SD3.5-style pipeline of
//! `tools/make_sd3_pipeline_fixtures.py`) through the same recipe stages as the world:
//! Flow-GRPO with a remote reward (a fake server on loopback scoring the PNGs it receives),
//! the merge and SFT cold starts, and Flow-OPD with routing and MAR, with prompts from files
//! and the model and teachers given as recipe inputs (`--model`, `--teachers`), then the eval
//! stage on test prompts from a file with the remote reward.

use crate::common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::backend::Flex;
use burn::tensor::Tensor;
use common::fake_server::{FakeServer, Reply, mean_pixel_scores};
use flow_opd::flow::SeededNoise;
use flow_opd::model::lora::{LoraAdapter, LoraConfig, LoraFormat, LoraTarget, load_lora, save_lora};
use flow_opd::pipeline::sd3::Sd3Pipeline;
use flow_opd::model::weights::SaveDtype;
use flow_opd::recipe::{Recipe, run_recipe};
use flow_opd::io::metrics::read_metrics;

type B = Flex;

fn folder() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd3_tiny")
}

/// A rank-2 adapter with non-zero `B` (so teachers differ from the base and each other).
fn teacher(model: &flow_opd::model::Mmdit<B>, seed: u64) -> LoraAdapter<B> {
    let device = Default::default();
    let mut a = LoraConfig::new(2, 4.0, LoraTarget::FLOW_GRPO.to_vec()).init(model, seed, &device);
    let mut noise = SeededNoise::new(seed);
    for layer in a.blocks.iter_mut().flat_map(|b| b.layers.iter_mut().flatten()) {
        let up: Tensor<B, 2> = noise.sample(layer.up.dims(), &device);
        layer.up = burn::module::Param::from_tensor(up * 0.3);
    }
    a
}

fn max_up(adapter: &LoraAdapter<B>) -> f32 {
    adapter.layers().map(|(_, _, l)| l.up.val().abs().max().into_scalar()).fold(0.0, f32::max)
}

fn inputs(model: &Path, teachers: &Path) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("model".to_string(), model.display().to_string()),
        ("teachers".to_string(), teachers.display().to_string()),
    ])
}

#[test]
fn grpo_merge_sft_and_opd_recipes_train_on_an_sd3_folder() {
    let device = Default::default();
    let tmp = tempfile::tempdir().unwrap();
    let prompts = tmp.path().join("prompts");
    std::fs::create_dir_all(&prompts).unwrap();
    std::fs::write(prompts.join("geneval.txt"), "a photo of a red cube\na photo of two cats\n").unwrap();
    std::fs::write(prompts.join("ocr.txt"), "a sign that says \"open\"\n# comment\na label reading \"42\"\n").unwrap();
    let teachers = tmp.path().join("teachers");
    let base = Sd3Pipeline::<B>::load(&folder(), 32, &device).unwrap().transformer;
    for (name, seed) in [("geneval", 1), ("ocr", 2)] {
        save_lora(&teacher(&base, seed), &teachers.join(name), LoraFormat::Peft, SaveDtype::F32).unwrap();
    }
    let server = FakeServer::start(|_, request| match request.path.as_str() {
        "/score" => Reply::json(200, mean_pixel_scores(request)),
        _ => Reply::json(200, serde_json::json!({"status": "ok", "rewards": ["mean_pixel"]})),
    });
    let p = |name: &str| prompts.join(name).display().to_string();
    let text = format!(
        r#"
name = "sd3_smoke"
sd3 = {{ resolution = 64, t5_length = 32 }}

[[stage]]
kind = "grpo"
output = "grpo"
model = "$model"
[stage.train]
iterations = 2
rollout = {{ prompts = 2, group_size = 2, steps = 3, micro_batch = 3 }}
lora = {{ rank = 2, alpha = 4.0 }}
optim = {{ lr = 1e-2 }}
partitions = [{{ tasks = ["composition"], rewards = {{ composition = 1.0 }} }}]
prompt_files = {{ composition = "{geneval}" }}
remote_rewards = {{ composition = {{ url = "{url}", name = "mean_pixel" }} }}

[[stage]]
kind = "nft"
output = "nft"
model = "$model"
[stage.train]
iterations = 2
rollout = {{ prompts = 2, group_size = 2, steps = 3, micro_batch = 3 }}
lora = {{ rank = 2, alpha = 4.0 }}
optim = {{ lr = 1e-2 }}
partitions = [{{ tasks = ["composition"], rewards = {{ composition = 1.0 }} }}]
prompt_files = {{ composition = "{geneval}" }}
remote_rewards = {{ composition = {{ url = "{url}", name = "mean_pixel" }} }}

[[stage]]
kind = "merge"
output = "cold_start"
model = "$model"
adapters = {{ "$teachers/geneval" = 0.5, "$teachers/ocr" = 0.5 }}

[[stage]]
kind = "sft"
output = "sft"
model = "$model"
routing = {{ composition = "$teachers/geneval", text = "$teachers/ocr" }}
train = {{ samples_per_task = 2, sampling = {{ steps = 2, guidance = 2.0 }}, steps = 2, batch_size = 2, optim = {{ lr = 1e-2 }}, lora = {{ rank = 2, alpha = 4.0 }}, prompt_files = {{ composition = "{geneval}", text = "{ocr}" }} }}

[[stage]]
kind = "opd"
output = "student"
model = "$model"
init = "cold_start"
routing = {{ composition = "$teachers/geneval", text = "$teachers/ocr" }}
anchor = "$teachers/geneval"
[stage.train]
iterations = 2
rollout = {{ prompts = 2, group_size = 2, steps = 3 }}
optim = {{ lr = 1e-2 }}
prompt_files = {{ composition = "{geneval}", text = "{ocr}" }}
train_metrics = false

[[stage]]
kind = "eval"
model = "$model"
adapter = "student"
row = "Flow-OPD"
eval = {{ sampling = {{ steps = 2, guidance = 2.0, batch = 2 }}, prompts_per_task = 3, tasks = ["composition"], prompt_files = {{ composition = "{geneval}" }}, remote_rewards = {{ composition = {{ url = "{url}", name = "mean_pixel" }} }} }}
"#,
        geneval = p("geneval.txt"),
        ocr = p("ocr.txt"),
        url = server.url,
    );
    let runs = tmp.path().join("runs");
    let recipe = Recipe::from_toml_with(Path::new("sd3.toml"), &text, &inputs(&folder(), &teachers)).unwrap();
    run_recipe::<B>(&recipe, &runs, &device).unwrap();
    let dir = runs.join("sd3_smoke");
    let metrics = read_metrics(&dir.join("metrics.jsonl")).unwrap();

    // GRPO: the rewards came from the server, which scored 64 x 64 PNGs (metric = width).
    let grpo: Vec<_> = metrics.iter().filter(|m| m["stage"] == "grpo:grpo").collect();
    assert_eq!(grpo.len(), 2);
    assert!(grpo.iter().all(|m| m["train_composition"] == 64.0), "{grpo:?}");
    let scored: Vec<_> = server.seen().into_iter().filter(|s| s.path == "/score").collect();
    assert_eq!(scored.len(), 5, "one request per GRPO and per NFT iteration, then one for the eval");
    assert!(scored[..4].iter().all(|s| s.body["images"].as_array().unwrap().len() == 4 && s.body["prompts"][0].as_str().unwrap().starts_with("a photo of")));
    assert_eq!(scored[4].body["images"].as_array().unwrap().len(), 2, "the eval's two test prompts");
    let trained = load_lora(&dir.join("grpo"), &base, &device).unwrap();
    assert!(max_up(&trained) > 0.0, "the GRPO adapter moved from B = 0");

    // DiffusionNFT: rewards from the server on its deterministic rollouts, finite losses, a
    // moved adapter.
    let nft: Vec<_> = metrics.iter().filter(|m| m["stage"] == "nft:nft").collect();
    assert_eq!(nft.len(), 2);
    assert!(nft.iter().all(|m| m["train_composition"] == 64.0 && m["loss"].as_f64().unwrap().is_finite()), "{nft:?}");
    assert!(max_up(&load_lora(&dir.join("nft"), &base, &device).unwrap()) > 0.0, "the NFT adapter moved from B = 0");

    // SFT and OPD trained their students; OPD logged one row per iteration with finite losses.
    assert!(max_up(&load_lora(&dir.join("sft"), &base, &device).unwrap()) > 0.0);
    let opd: Vec<_> = metrics.iter().filter(|m| m["stage"] == "opd:student").collect();
    assert_eq!(opd.len(), 2);
    assert!(opd.iter().all(|m| m["loss"].as_f64().unwrap().is_finite() && m["loss_mar"].as_f64().unwrap() > 0.0));
    let cold = load_lora(&dir.join("cold_start"), &base, &device).unwrap();
    let student = load_lora(&dir.join("student"), &base, &device).unwrap();
    let moved = cold.layers().zip(student.layers()).any(|((_, _, a), (_, _, b))| {
        (a.up.val() - b.up.val()).abs().max().into_scalar() > 0.0
    });
    assert!(moved, "OPD updated the cold-start student");

    // Eval: the two test prompts of the file, scored by the server (metric = image width), a
    // table row and a grid of 64 x 64 samples enlarged 4x (two cells + separators).
    let results: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("results.json")).unwrap()).unwrap();
    assert_eq!(results["rows"][0]["model"], "Flow-OPD", "{results}");
    assert_eq!(results["rows"][0]["geneval"], 64.0, "{results}");
    let grid = image::open(dir.join("grids/grid_Flow-OPD_composition.png")).unwrap();
    assert_eq!((grid.width(), grid.height()), (8 * 257 + 1, 257 + 1));
    let listed = std::fs::read_to_string(dir.join("grids/grid_Flow-OPD_composition.txt")).unwrap();
    assert_eq!(listed, "a photo of a red cube\na photo of two cats\n");
}

#[test]
fn a_recipe_input_not_given_names_its_flag() {
    let text = r#"
name = "x"
[[stage]]
kind = "merge"
output = "m"
model = "$model"
adapters = { "a" = 1.0 }
"#;
    let err = Recipe::from_toml_with(Path::new("x.toml"), text, &BTreeMap::new()).unwrap_err().to_string();
    assert!(err.contains("x.toml") && err.contains("--model"), "{err}");
}

/// Rollouts on an SD3 folder follow the folder's own scheduler (here a copy with shift 1.5).
#[test]
fn rollouts_use_the_folders_scheduler() {
    use flow_opd::flow::FlowSchedule;
    use flow_opd::pipeline::{AnyPipeline, Sd3Options, TextToImage};
    use flow_opd::train::prompts::TaskPrompt;
    use flow_opd::train::rollout::{RolloutConfig, rollout};
    use rand::SeedableRng;
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("sd3");
    std::fs::create_dir_all(copy.join("scheduler")).unwrap();
    common::link_folder_without(&folder(), &copy, "scheduler");
    let config = std::fs::read_to_string(folder().join("scheduler/scheduler_config.json")).unwrap();
    assert!(config.contains("\"shift\": 3.0"));
    std::fs::write(copy.join("scheduler/scheduler_config.json"), config.replace("\"shift\": 3.0", "\"shift\": 1.5")).unwrap();
    let device = Default::default();
    let options = Sd3Options { resolution: 64, t5_length: 32, ..Default::default() };
    let pipeline = AnyPipeline::<B>::load(&copy, &options, &device).unwrap();
    assert_eq!(pipeline.schedule(), Some(FlowSchedule::new(1.5)));
    let config: RolloutConfig = toml::from_str("prompts = 1\ngroup_size = 2\nsteps = 3\nguidance = 1.0").unwrap();
    let prompts = [TaskPrompt { text: "a red cube".into(), task: flow_opd::world::Task::Composition }];
    let ro = rollout(&pipeline, None, &prompts, &config, &mut rand_chacha::ChaCha8Rng::seed_from_u64(0), &device).unwrap();
    assert_eq!(ro.trajectory.sigmas, FlowSchedule::new(1.5).sigmas(3));
    assert_ne!(ro.trajectory.sigmas, FlowSchedule::sd3().sigmas(3));
    assert_eq!(ro.images.len(), 2);
    assert_eq!(ro.images[0].dimensions(), (64, 64));
}
