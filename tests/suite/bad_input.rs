//! Bad inputs through the real `flow-opd` binary (docs/bad_input.md lists the same cases with
//! their messages): command-line flags, recipe fields, model and adapter folders, prompt files
//! and reward server replies. Every case must end with a non-zero exit code that is not a
//! panic's 101, no "panicked" on stderr, and a message naming the culprit: the flag or field and
//! the value refused (or the file at fault).
//!
//! Each case fails in validation or at its first load, so the whole table runs in seconds. In
//! the tables, `{tmp}` is a temporary folder holding the files [`setup`] makes and `{ocr_*}` the
//! address of a fake reward server giving that bad reply.

use crate::common;

use std::path::Path;
use std::process::Command;

use common::fake_server::{FakeServer, Reply};

/// `sample` of one prompt into `{tmp}`, before the extra flags of a case (each fails before
/// sampling, so the default 40 steps never run).
const SAMPLE: &str = "sample --model models/world_base --prompt x --out {tmp}/a.png";
/// `eval` into `{tmp}/eval`, before the extra flags of a case (each fails before sampling).
const EVAL: &str = "eval --model models/world_base --out {tmp}/eval";

/// Command-line cases: what the case tries, the arguments (split on spaces), and what stderr
/// must contain.
const CLI: &[(&str, &str, &[&str])] = &[
    ("sample --steps 0", "{SAMPLE} --steps 0", &["--steps", "got 0"]),
    ("sample --cfg nan", "{SAMPLE} --cfg nan", &["--cfg", "NaN"]),
    ("sample --cfg inf", "{SAMPLE} --cfg inf", &["--cfg", "inf"]),
    ("sample --cfg -1", "{SAMPLE} --cfg -1", &["--cfg", "got -1"]),
    ("sample --scale 0", "{SAMPLE} --scale 0", &["--scale", "got 0"]),
    ("sample --height 0", "{SAMPLE} --height 0", &["--height", "got 0"]),
    ("sample --prompt \"\"", "sample --model models/world_base --prompt= --steps 1 --out {tmp}/a.png", &["--prompt", "empty prompt"]),
    ("sample: no prompt", "sample --model models/world_base --steps 1 --out {tmp}/a.png", &["no prompt given", "--prompt"]),
    ("sample --prompts: empty file", "sample --model models/world_base --prompts {tmp}/empty.txt --steps 1 --out {tmp}/a.png", &["--prompts", "empty.txt", "no prompts"]),
    ("sample --prompts: missing file", "sample --model models/world_base --prompts {tmp}/none.txt --steps 1 --out {tmp}/a.png", &["--prompts", "none.txt", "No such file"]),
    ("sample --out below a file", "sample --model models/world_base --prompt x --steps 1 --out {tmp}/file/a.png", &["--out", "file/a.png", "not a folder"]),
    ("sample --out: a file for several prompts", "sample --model models/world_base --prompt x --prompt y --steps 1 --out {tmp}/file", &["--out", "{tmp}/file", "not a folder"]),
    ("sample --model: missing folder", "sample --model {tmp}/no_model --prompt x --steps 1 --out {tmp}/a.png", &["--model", "no_model"]),
    ("sample --model: no transformer config", "sample --model {tmp}/no_config --prompt x --steps 1 --out {tmp}/a.png", &["--model", "no_config/transformer/config.json"]),
    ("sample --model: truncated safetensors", "sample --model {tmp}/truncated --prompt x --steps 1 --out {tmp}/a.png", &["--model", "truncated/transformer/diffusion_pytorch_model.safetensors", "not a readable safetensors file"]),
    ("sample --adapter: missing folder", "{SAMPLE} --adapter {tmp}/no_adapter", &["--adapter", "no_adapter", "not a LoRA adapter"]),
    ("sample --adapter: truncated safetensors", "{SAMPLE} --adapter {tmp}/truncated_adapter", &["--adapter", "truncated_adapter/adapter_model.safetensors", "not a readable safetensors file"]),
    ("sample --adapter: integer tensors", "{SAMPLE} --adapter {tmp}/int_adapter", &["--adapter", "int_adapter/adapter_model.safetensors", "I32 is not floating point"]),
    ("model forward --adapter: shapes of another model", "model forward --model tests/fixtures/mmdit/sd3_tiny --inputs tests/fixtures/mmdit/cases/sd3_b2_square.inputs.safetensors --output {tmp}/o.safetensors --adapter models/teachers/ocr", &["--adapter", "models/teachers/ocr", "has shape [8, 64], expected [8, 16]"]),
    ("sample --device bogus", "{SAMPLE} --device bogus", &["--device", "bogus"]),
    ("sample --device cuda:0 (not built)", "{SAMPLE} --device cuda:0", &["cuda:0", "--features cuda"]),
    ("eval --steps 0", "{EVAL} --steps 0", &["--steps", "got 0"]),
    ("eval --cfg nan", "{EVAL} --cfg nan", &["--cfg", "NaN"]),
    ("eval --prompts 0", "{EVAL} --prompts 0", &["--prompts", "got 0"]),
    ("eval --tasks text,bogus", "{EVAL} --tasks text,bogus", &["--tasks", "bogus"]),
    ("eval --split dev", "{EVAL} --split dev", &["--split", "dev"]),
    ("eval --out below a file", "eval --model models/world_base --tasks text --prompts 1 --steps 1 --out {tmp}/file/eval", &["--out", "file/eval", "not a folder"]),
    ("eval --model: missing folder", "eval --model {tmp}/no_model --tasks text --prompts 1 --steps 1 --out {tmp}/eval", &["--model", "no_model"]),
    ("recipe: missing file", "recipe {tmp}/no_recipe.toml", &["no_recipe.toml", "no such file"]),
    ("recipe --runs below a file", "recipe {tmp}/eval_ok.toml --runs {tmp}/file/runs", &["--runs", "file/runs", "not a folder"]),
    ("bench --batch 0", "bench --batch 0", &["--batch", "got 0"]),
    ("bench --opd --steps 0", "bench --opd --steps 0", &["--steps", "got 0"]),
    ("bench --checkpointing sometimes", "bench --checkpointing sometimes", &["--checkpointing", "sometimes"]),
    ("bench --weights bf32", "bench --weights bf32", &["--weights", "bf32"]),
    ("gradient-snr --estimates 2", "gradient-snr {tmp}/grpo_ok.toml t --estimates 2", &["--estimates", "2 gradient estimates", "at least 4"]),
    ("compare: missing row", "compare models/results.json no_such_row base", &["no_such_row"]),
];

/// Recipe cases: what the case tries, the recipe's `[[stage]]` tables (after `name = "bad"`),
/// extra flags, and what stderr must contain. `{EVAL_STAGE}` opens an eval stage of
/// world_base's `[stage.eval]`, `{ONE_TEXT}` asks it for one text prompt and `{ONE_STEP}` for
/// one ODE step; `{GRPO}` opens a one-iteration GRPO stage's `[stage.train]`, which `{LORA}`,
/// `{OPTIM}`, `{PARTITIONS}` and `{ROLLOUT}` fill with valid settings.
const RECIPES: &[(&str, &str, &str, &[&str])] = &[
    ("eval.sampling.steps = 0", "{EVAL_STAGE}{ONE_TEXT}sampling = { steps = 0 }", "", &["`eval.sampling.steps`", "got 0"]),
    ("eval.sampling.guidance = nan", "{EVAL_STAGE}{ONE_TEXT}sampling = { steps = 1, guidance = nan }", "", &["`eval.sampling.guidance`", "NaN"]),
    ("eval.sampling.guidance = -2", "{EVAL_STAGE}{ONE_TEXT}sampling = { steps = 1, guidance = -2.0 }", "", &["`eval.sampling.guidance`", "got -2"]),
    ("eval.sampling.batch = 0", "{EVAL_STAGE}{ONE_TEXT}sampling = { steps = 1, batch = 0 }", "", &["`eval.sampling.batch`", "got 0"]),
    ("eval.sampling.schedule.shift = 0", "{EVAL_STAGE}{ONE_TEXT}sampling = { steps = 1, schedule = { shift = 0.0 } }", "", &["`eval.sampling.schedule.shift`", "got 0"]),
    ("eval.prompts_per_task = 0", "{EVAL_STAGE}prompts_per_task = 0\ntasks = [\"text\"]", "", &["`eval.prompts_per_task`", "got 0"]),
    ("eval.tasks = []", "{EVAL_STAGE}prompts_per_task = 1\ntasks = []", "", &["`eval.tasks`", "at least one task"]),
    ("eval.tasks = [\"bogus\"]", "{EVAL_STAGE}prompts_per_task = 1\ntasks = [\"bogus\"]", "", &["`eval.tasks[0]`", "bogus"]),
    ("eval.prompt_files: empty file", "{EVAL_STAGE}{ONE_TEXT}{ONE_STEP}prompt_files = { text = \"{tmp}/empty.txt\" }", "", &["`eval.prompt_files.text`", "empty.txt", "no prompts"]),
    ("eval.prompt_files: missing file", "{EVAL_STAGE}{ONE_TEXT}{ONE_STEP}prompt_files = { text = \"{tmp}/none.txt\" }", "", &["`eval.prompt_files.text`", "none.txt", "No such file"]),
    ("eval.remote_rewards: ftp url", "{EVAL_STAGE}{ONE_TEXT}{ONE_STEP}remote_rewards = { text = { url = \"ftp://x\", name = \"ocr\" } }", "", &["`eval.remote_rewards.text`", "ftp://x"]),
    ("eval model: no stage makes it", "[[stage]]\nkind = \"eval\"\nmodel = \"teacher\"", "", &["`model` = \"teacher\"", "neither an earlier stage's output"]),
    ("eval adapter: only a later stage makes it", "[[stage]]\nkind = \"eval\"\nmodel = \"models/world_base\"\nadapter = \"t\"\n{GRPO}{LORA}{OPTIM}{PARTITIONS}{ROLLOUT}", "", &["`adapter` = \"t\"", "neither an earlier stage's output"]),
    ("opd routing: no stage makes it", "[[stage]]\nkind = \"opd\"\noutput = \"s\"\nmodel = \"models/world_base\"\nrouting = { text = \"teacher_ocr\" }\n[stage.train]\niterations = 1\n{OPTIM}{ROLLOUT}", "", &["`routing` = \"teacher_ocr\"", "neither an earlier stage's output"]),
    ("\"$model\" without --model", "[[stage]]\nkind = \"eval\"\nmodel = \"$model\"", "", &["$model", "--model PATH"]),
    ("kind = \"evaluate\"", "[[stage]]\nkind = \"evaluate\"\nmodel = \"models/world_base\"", "", &["`kind` = \"evaluate\""]),
    ("misspelt field train.seeed", "{GRPO}{LORA}{OPTIM}{PARTITIONS}{ROLLOUT}seeed = 3", "", &["`train.seeed`", "unknown field"]),
    ("max_seconds = nan", "[[stage]]\nkind = \"grpo\"\noutput = \"t\"\nmodel = \"models/world_base\"\nmax_seconds = nan\n[stage.train]\niterations = 1\n{LORA}{OPTIM}{PARTITIONS}{ROLLOUT}", "", &["`max_seconds` = NaN"]),
    ("checkpoint_every = 0", "[[stage]]\nkind = \"grpo\"\noutput = \"t\"\nmodel = \"models/world_base\"\ncheckpoint_every = 0\n[stage.train]\niterations = 1\n{LORA}{OPTIM}{PARTITIONS}{ROLLOUT}", "", &["`checkpoint_every`", "got 0"]),
    ("export below a file", "[[stage]]\nkind = \"grpo\"\noutput = \"t\"\nmodel = \"models/world_base\"\nexport = \"{tmp}/file/t\"\n[stage.train]\niterations = 1\n{LORA}{OPTIM}{PARTITIONS}{ROLLOUT}", "", &["`export`", "{tmp}/file/t", "not a folder"]),
    ("train.iterations = 0", "[[stage]]\nkind = \"grpo\"\noutput = \"t\"\nmodel = \"models/world_base\"\n[stage.train]\niterations = 0\n{LORA}{OPTIM}{PARTITIONS}{ROLLOUT}", "", &["`train.iterations`", "got 0"]),
    ("train.minibatches = 0", "{GRPO}{LORA}{OPTIM}{PARTITIONS}{ROLLOUT}minibatches = 0", "", &["`train.minibatches`", "got 0"]),
    ("train.minibatches above the samples", "{GRPO}{LORA}{OPTIM}{PARTITIONS}rollout = { prompts = 1, group_size = 2, steps = 2 }\nminibatches = 3", "", &["`train.minibatches` = 3", "2 samples"]),
    ("train.inner_epochs = 0", "{GRPO}{LORA}{OPTIM}{PARTITIONS}{ROLLOUT}inner_epochs = 0", "", &["`train.inner_epochs`", "got 0"]),
    ("rollout.steps = 0", "{GRPO}{LORA}{OPTIM}{PARTITIONS}rollout = { prompts = 1, group_size = 2, steps = 0 }", "", &["`train.rollout.steps`", "got 0"]),
    ("rollout.noise_level = 0", "{GRPO}{LORA}{OPTIM}{PARTITIONS}rollout = { prompts = 1, group_size = 2, steps = 2, noise_level = 0.0 }", "", &["`train.rollout.noise_level`", "got 0"]),
    ("rollout.noise_level = 1.5", "{GRPO}{LORA}{OPTIM}{PARTITIONS}rollout = { prompts = 1, group_size = 2, steps = 2, noise_level = 1.5 }", "", &["`train.rollout.noise_level`", "got 1.5"]),
    ("rollout.guidance = inf", "{GRPO}{LORA}{OPTIM}{PARTITIONS}rollout = { prompts = 1, group_size = 2, steps = 2, guidance = inf }", "", &["`train.rollout.guidance`", "got inf"]),
    ("rollout.group_size = 1 (GRPO)", "{GRPO}{LORA}{OPTIM}{PARTITIONS}rollout = { prompts = 1, group_size = 1, steps = 2 }", "", &["`train.rollout.group_size`", "got 1"]),
    ("rollout.prompts = 0", "{GRPO}{LORA}{OPTIM}{PARTITIONS}rollout = { prompts = 0, group_size = 2, steps = 2 }", "", &["`train.rollout.prompts`", "got 0"]),
    ("rollout.micro_batch = 0", "{GRPO}{LORA}{OPTIM}{PARTITIONS}rollout = { prompts = 1, group_size = 2, steps = 2, micro_batch = 0 }", "", &["`train.rollout.micro_batch`", "got 0"]),
    ("rollout.sde_window past the steps", "{GRPO}{LORA}{OPTIM}{PARTITIONS}rollout = { prompts = 1, group_size = 2, steps = 2, sde_window = { start = 0, end = 5 } }", "", &["`train.rollout.sde_window`", "0..5"]),
    ("rollout.prompts = 3 on two devices", "{GRPO}{LORA}{OPTIM}{PARTITIONS}rollout = { prompts = 3, group_size = 2, steps = 2 }", "--device cpu,cpu", &["--device", "`train.rollout.prompts` = 3", "2 data-parallel devices"]),
    ("pretrain batch_size = 3 on two devices", "[[stage]]\nkind = \"pretrain\"\noutput = \"base\"\ntrain = { steps = 1, batch_size = 3, optim = { lr = 1e-3 } }", "--device cpu,cpu", &["--device", "`train.batch_size` = 3"]),
    ("pretrain task_weights.text = -1", "[[stage]]\nkind = \"pretrain\"\noutput = \"base\"\ntask_weights = { text = -1 }\ntrain = { steps = 1, batch_size = 2, optim = { lr = 1e-3 } }", "", &["`task_weights.text`", "-1"]),
    ("pretrain task_weights all 0", "[[stage]]\nkind = \"pretrain\"\noutput = \"base\"\ntask_weights = { composition = 0, text = 0, preference = 0, quality = 0 }\ntrain = { steps = 1, batch_size = 2, optim = { lr = 1e-3 } }", "", &["`task_weights`", "every task"]),
    ("pretrain task_weights.ocr (no such task)", "[[stage]]\nkind = \"pretrain\"\noutput = \"base\"\ntask_weights = { ocr = 2 }\ntrain = { steps = 1, batch_size = 2, optim = { lr = 1e-3 } }", "", &["task_weights", "ocr"]),
    ("pretrain train.batch_size = 0", "[[stage]]\nkind = \"pretrain\"\noutput = \"base\"\ntrain = { steps = 1, batch_size = 0, optim = { lr = 1e-3 } }", "", &["`train.batch_size`", "got 0"]),
    ("lora.rank = 0", "{GRPO}{OPTIM}{PARTITIONS}{ROLLOUT}lora = { rank = 0, alpha = 2.0 }", "", &["`train.lora.rank`", "got 0"]),
    ("lora.targets: unknown layer", "{GRPO}{OPTIM}{PARTITIONS}{ROLLOUT}lora = { rank = 2, alpha = 2.0, targets = [\"attn.to_x\"] }", "", &["`train.lora.targets`", "attn.to_x"]),
    ("optim.lr = nan", "{GRPO}{LORA}{PARTITIONS}{ROLLOUT}optim = { lr = nan }", "", &["`train.optim.lr`", "NaN"]),
    ("train.prompt_files: empty file", "{GRPO}{LORA}{OPTIM}{PARTITIONS}{ROLLOUT}prompt_files = { text = \"{tmp}/empty.txt\" }", "", &["`train.prompt_files.text`", "empty.txt", "no prompts"]),
    ("partitions[0].beta = -1", "{GRPO}{LORA}{OPTIM}{ROLLOUT}partitions = [{ tasks = [\"text\"], rewards = { text = 1.0 }, beta = -1.0 }]", "", &["`train.partitions[0].beta`", "got -1"]),
    ("opd mar_lambda = nan", "[[stage]]\nkind = \"opd\"\noutput = \"s\"\nmodel = \"models/world_base\"\nrouting = { text = \"models/teachers/ocr\" }\nanchor = \"base\"\n[stage.train]\niterations = 1\nmar_lambda = nan\n{OPTIM}{ROLLOUT}", "", &["`train.mar_lambda`", "NaN"]),
    ("eval model: no transformer config", "[[stage]]\nkind = \"eval\"\nmodel = \"{tmp}/no_config\"\n[stage.eval]\n{ONE_TEXT}sampling = { steps = 1 }", "", &["no_config/transformer/config.json"]),
    ("reward reply: HTTP 500", "{EVAL_STAGE}{ONE_TEXT}sampling = { steps = 1 }\nremote_rewards = { text = { url = \"{ocr_500}\", name = \"ocr\", retries = 0 } }", "", &["reward `ocr`", "HTTP 500", "model crashed"]),
    ("reward reply: not JSON", "{EVAL_STAGE}{ONE_TEXT}sampling = { steps = 1 }\nremote_rewards = { text = { url = \"{ocr_html}\", name = \"ocr\", retries = 0 } }", "", &["reward `ocr`", "malformed reply", "<html>"]),
    ("reward reply: NaN score", "{EVAL_STAGE}{ONE_TEXT}sampling = { steps = 1 }\nremote_rewards = { text = { url = \"{ocr_nan}\", name = \"ocr\", retries = 0 } }", "", &["reward `ocr`", "malformed reply", "NaN"]),
    ("reward reply: two scores for one image", "{EVAL_STAGE}{ONE_TEXT}sampling = { steps = 1 }\nremote_rewards = { text = { url = \"{ocr_count}\", name = \"ocr\", retries = 0 } }", "", &["reward `ocr`", "returned 2 scores for 1 images"]),
    ("reward server not running", "{EVAL_STAGE}{ONE_TEXT}sampling = { steps = 1 }\nremote_rewards = { text = { url = \"http://127.0.0.1:9\", name = \"ocr\", retries = 0 } }", "", &["reward `ocr`", "127.0.0.1:9"]),
    ("train.checkpointing = \"sometimes\"", "{GRPO}{LORA}{OPTIM}{PARTITIONS}{ROLLOUT}checkpointing = \"sometimes\"", "", &["checkpointing `sometimes`", "none, balanced or blocks"]),
];

/// Fills the placeholders of a case's text.
fn expand(text: &str, tmp: &Path, servers: &[(&str, String)]) -> String {
    let mut text = text
        .replace("{SAMPLE}", SAMPLE)
        .replace("{EVAL}", EVAL)
        .replace("{EVAL_STAGE}", "[[stage]]\nkind = \"eval\"\nmodel = \"models/world_base\"\n[stage.eval]\n")
        .replace("{ONE_TEXT}", "prompts_per_task = 1\ntasks = [\"text\"]\n")
        .replace("{ONE_STEP}", "sampling = { steps = 1 }\n")
        .replace("{GRPO}", "[[stage]]\nkind = \"grpo\"\noutput = \"t\"\nmodel = \"models/world_base\"\n[stage.train]\niterations = 1\n")
        .replace("{LORA}", "lora = { rank = 2, alpha = 2.0 }\n")
        .replace("{OPTIM}", "optim = { lr = 1e-3 }\n")
        .replace("{PARTITIONS}", "partitions = [{ tasks = [\"text\"], rewards = { text = 1.0 } }]\n")
        .replace("{ROLLOUT}", "rollout = { prompts = 1, group_size = 2, steps = 2 }\n")
        .replace("{tmp}", &tmp.display().to_string());
    for (name, url) in servers {
        text = text.replace(&format!("{{{name}}}"), url);
    }
    text
}

/// The files the cases name under `tmp`: an empty prompt file, a regular file to put paths
/// below, world_base copies without the transformer config or with its weights cut short, an
/// adapter cut short and one of integer tensors, and valid recipes for the cases that fail on a
/// flag.
fn setup(tmp: &Path) {
    let write = |path: &str, text: &[u8]| {
        let path = tmp.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    write("empty.txt", b"# only a comment\n\n");
    write("file", b"a regular file\n");
    let base = Path::new("models/world_base");
    for (name, skip) in [("no_config", "transformer/config.json"), ("truncated", "")] {
        for file in ["model_index.json", "tokenizer.json", "text_encoder/config.json", "text_encoder/model.safetensors", "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors"] {
            if file != skip {
                write(&format!("{name}/{file}"), &std::fs::read(base.join(file)).unwrap());
            }
        }
    }
    let weights = std::fs::read(base.join("transformer/diffusion_pytorch_model.safetensors")).unwrap();
    write("truncated/transformer/diffusion_pytorch_model.safetensors", &weights[..weights.len() / 2]);
    let adapter = Path::new("models/teachers/ocr");
    write("truncated_adapter/adapter_config.json", &std::fs::read(adapter.join("adapter_config.json")).unwrap());
    let tensors = std::fs::read(adapter.join("adapter_model.safetensors")).unwrap();
    write("truncated_adapter/adapter_model.safetensors", &tensors[..tensors.len() / 2]);
    // The same adapter with its tensors relabelled as 32-bit integers.
    let stored = safetensors::SafeTensors::deserialize(&tensors).unwrap();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = stored
        .tensors()
        .into_iter()
        .map(|(name, t)| (name, safetensors::tensor::TensorView::new(safetensors::Dtype::I32, t.shape().to_vec(), t.data()).unwrap()))
        .collect();
    write("int_adapter/adapter_config.json", &std::fs::read(adapter.join("adapter_config.json")).unwrap());
    write("int_adapter/adapter_model.safetensors", &safetensors::serialize(views, None).unwrap());
    write("eval_ok.toml", expand("name = \"ok\"\n{EVAL_STAGE}{ONE_TEXT}{ONE_STEP}", tmp, &[]).as_bytes());
    write("grpo_ok.toml", expand("name = \"ok\"\n{GRPO}{LORA}{OPTIM}{PARTITIONS}{ROLLOUT}", tmp, &[]).as_bytes());
}

/// Fake reward servers, one per bad reply, by placeholder name.
fn servers() -> Vec<(FakeServer, &'static str)> {
    let raw = |status: u16, body: &str| Reply { status, headers: vec![], body: body.to_string() };
    vec![
        (FakeServer::start(move |_, _| raw(500, r#"{"error": "model crashed"}"#)), "ocr_500"),
        (FakeServer::start(move |_, _| raw(200, "<html>maintenance</html>")), "ocr_html"),
        (FakeServer::start(move |_, _| raw(200, r#"{"scores": [{"value": NaN}]}"#)), "ocr_nan"),
        (FakeServer::start(move |_, _| raw(200, r#"{"scores": [{"value": 0.5}, {"value": 0.5}]}"#)), "ocr_count"),
    ]
}

/// Runs `flow-opd args` from the crate root without a backtrace setting: (exit code, stderr).
fn run(args: &[String]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_flow-opd"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .env("RUST_LOG", "error")
        .output()
        .expect("flow-opd runs");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn every_bad_input_is_refused_with_a_message_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    setup(tmp.path());
    let servers = servers();
    let urls: Vec<(&str, String)> = servers.iter().map(|(s, name)| (*name, s.url.clone())).collect();
    let mut cases: Vec<(String, Vec<String>, Vec<String>)> = Vec::new();
    for (what, args, expect) in CLI {
        let args = expand(args, tmp.path(), &urls).split(' ').map(String::from).collect();
        cases.push((what.to_string(), args, expect.iter().map(|e| expand(e, tmp.path(), &urls)).collect()));
    }
    for (n, (what, stages, flags, expect)) in RECIPES.iter().enumerate() {
        let path = tmp.path().join(format!("recipe_{n}.toml"));
        std::fs::write(&path, expand(&format!("name = \"bad\"\n{stages}\n"), tmp.path(), &urls)).unwrap();
        let mut args = vec!["recipe".to_string(), path.display().to_string(), "--runs".into(), tmp.path().join("runs").display().to_string()];
        args.extend(flags.split(' ').filter(|f| !f.is_empty()).map(String::from));
        cases.push((format!("recipe: {what}"), args, expect.iter().map(|e| expand(e, tmp.path(), &urls)).collect()));
    }
    assert!(cases.len() >= 25);
    let mut failures = Vec::new();
    for (what, args, expect) in &cases {
        let (code, stderr) = run(args);
        // The messages docs/bad_input.md quotes (`cargo test --test suite bad_input:: -- --nocapture`).
        println!("{what}\t{code:?}\t{}", stderr.trim().replace('\n', " / "));
        let missing: Vec<&String> = expect.iter().filter(|e| !stderr.contains(e.as_str())).collect();
        if code == Some(0) || code == Some(101) || code.is_none() || stderr.contains("panicked") || !missing.is_empty() {
            failures.push(format!("{what}: exit {code:?}, missing {missing:?} in:\n{stderr}"));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n\n{}", failures.len(), cases.len(), failures.join("\n\n"));
}
