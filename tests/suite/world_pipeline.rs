//! The synthetic world end to end at toy size: a pre-training recipe writes a loadable
//! pipeline and logs metrics; an eval stage writes the results table, JSON and grids; a saved
//! pipeline reloads to the same function.

use std::path::Path;

use burn::backend::Flex;
use burn::tensor::Tensor;
use flow_opd::eval::ResultsTable;
use flow_opd::flow::SeededNoise;
use flow_opd::pipeline::world::Pipeline;
use flow_opd::recipe::{Recipe, run_recipe};
use flow_opd::io::metrics::read_metrics;

type B = Flex;

#[test]
fn pretrain_then_eval_recipe_writes_a_pipeline_metrics_and_results() {
    let runs = tempfile::tempdir().unwrap();
    let text = r#"
name = "smoke"

[[stage]]
kind = "pretrain"
output = "base"
checkpoint_every = 2
train = { steps = 3, batch_size = 4, seed = 1, optim = { lr = 1e-3 } }

[[stage]]
kind = "eval"
model = "base"
row = "Smoke"
eval = { prompts_per_task = 2, sampling = { steps = 2, guidance = 2.0, batch = 8 } }
"#;
    let recipe = Recipe::from_toml(Path::new("smoke.toml"), text).unwrap();
    let device = Default::default();
    let ctx = run_recipe::<B>(&recipe, runs.path(), &device).unwrap();
    let dir = runs.path().join("smoke");
    assert_eq!(ctx.dir, dir);

    let metrics = read_metrics(&dir.join("metrics.jsonl")).unwrap();
    let losses: Vec<f64> = metrics.iter().filter(|m| m["stage"] == "pretrain").map(|m| m["loss"].as_f64().unwrap()).collect();
    assert!(!losses.is_empty() && losses.iter().all(|l| l.is_finite() && *l > 0.0), "{losses:?}");

    let table = ResultsTable::read(&dir).unwrap();
    assert_eq!(table.rows.len(), 1);
    let row = &table.rows[0];
    assert_eq!(row.model, "Smoke");
    let (g, o, p, d) = (row.geneval.unwrap(), row.ocr.unwrap(), row.pickscore.unwrap(), row.deqa.unwrap());
    assert!((0.0..=1.0).contains(&g) && (0.0..=1.0).contains(&o), "{row:?}");
    assert!((1.0..=5.0).contains(&d) && p > 0.0, "{row:?}");
    assert!(std::fs::read_to_string(dir.join("results.md")).unwrap().contains("| Smoke |"));
    // per-image metrics (for paired comparisons) average to the row's metrics
    let per_image = row.per_image.as_ref().expect("per-image metrics");
    let mean = |task: &str| {
        let v = &per_image.metrics[task];
        assert_eq!(v.len(), 2, "{task}");
        v.iter().sum::<f64>() / 2.0
    };
    for (task, metric) in [("composition", g), ("text", o), ("preference", p), ("quality", d)] {
        assert!((mean(task) - metric).abs() < 1e-9, "{task}: {} vs {metric}", mean(task));
    }
    assert!(per_image.setup.contains("seed 0, 2 ODE steps, CFG 2"), "{}", per_image.setup);
    for task in ["composition", "text", "preference", "quality"] {
        let grid = dir.join("grids").join(format!("grid_Smoke_{task}.png"));
        assert!(image::open(&grid).is_ok(), "{}", grid.display());
    }

    // The saved pipeline reloads, and a save/load round trip keeps it the same function.
    let pipeline = Pipeline::<B>::load(&dir.join("base"), &device).unwrap();
    let copy = tempfile::tempdir().unwrap();
    pipeline.save(copy.path()).unwrap();
    let reloaded = Pipeline::<B>::load(copy.path(), &device).unwrap();
    assert_eq!(velocity(&pipeline), velocity(&reloaded));
}

/// The pipeline as a function: its velocities for two fixed prompts, noise and time.
fn velocity(p: &Pipeline<B>) -> Vec<f32> {
    let device = Default::default();
    let cond = p.encode_prompts(&["a photo of two red circles", "a sign that says \"AB7\""], &device);
    let x: Tensor<B, 4> = SeededNoise::new(3).sample([2, 12, 16, 16], &device);
    let t = Tensor::<B, 1>::full([2], 700.0, &device);
    p.model.transformer.forward(x, cond.tokens, cond.pooled, t).into_data().into_vec::<f32>().unwrap()
}

#[test]
fn every_shipped_prompt_fits_the_tokenizer() {
    let tokenizer = flow_opd::pipeline::world::world_tokenizer(24);
    for split in [flow_opd::world::prompts::Split::Train, flow_opd::world::prompts::Split::Test] {
        for prompt in flow_opd::world::prompts::shipped_prompts(split) {
            let ids = tokenizer.encode(&prompt.text);
            assert!(ids.len() < 24, "`{}` needs {} tokens", prompt.text, ids.len());
            assert!(!ids.contains(&flow_opd::pipeline::text_encoder::UNK), "`{}` has unknown words", prompt.text);
        }
    }
}

#[test]
fn shipped_base_loads_and_gives_finite_velocities() {
    let device = Default::default();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/world_base");
    let p = Pipeline::<B>::load(&dir, &device).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.latent_shape(), [12, 16, 16]);
    let cond = p.encode_prompts(&["a photo of a red circle left of a blue square"], &device);
    let x: Tensor<B, 4> = SeededNoise::new(1).sample([1, 12, 16, 16], &device);
    let v = p.model.transformer.forward(x, cond.tokens, cond.pooled, Tensor::full([1], 500.0, &device));
    assert!(v.into_data().into_vec::<f32>().unwrap().iter().all(|x| x.is_finite()));
}

/// `flow-opd compare` prints the paired differences of two rows and refuses unknown rows by
/// name, without panicking.
#[test]
fn compare_cli_prints_paired_differences_and_names_unknown_rows() {
    use flow_opd::eval::{EvalRow, PerImage};
    let row = |name: &str, composition: [f64; 4]| {
        let mean = composition.iter().sum::<f64>() / 4.0;
        let metrics = [("composition".to_string(), composition.to_vec())].into();
        EvalRow { per_image: Some(PerImage { setup: "seed 0".into(), metrics }), ..EvalRow::new(name, Some(mean), None, None, None, 1.0) }
    };
    let table = ResultsTable { rows: vec![row("student", [1.0, 1.0, 1.0, 0.0]), row("baseline", [1.0, 0.0, 1.0, 0.0])] };
    let dir = tempfile::tempdir().unwrap();
    table.write(dir.path()).unwrap();
    let run = |a: &str, b: &str| std::process::Command::new(env!("CARGO_BIN_EXE_flow-opd")).arg("compare").arg(dir.path()).args([a, b]).output().unwrap();
    let out = run("student", "baseline");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // differences [0, 1, 0, 0]: mean 0.25, sample sd 0.5, se 0.25
    assert!(stdout.contains("| geneval | 0.7500 | 0.5000 | +0.2500 | 0.2500 | +1.0 | 4 |"), "{stdout}");
    let out = run("student", "teacher");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("no row `teacher`") && stderr.contains("student, baseline"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// A pre-training stage with a wall-clock budget ends after the step that spends it, saves and
/// exports the pipeline, and the recipe goes on to the next stage; a negative budget is refused
/// by name.
#[test]
fn a_pretrain_time_budget_ends_the_stage_and_the_recipe_goes_on() {
    let runs = tempfile::tempdir().unwrap();
    let export = runs.path().join("exported");
    let text = |budget: &str| {
        format!(
            "name = \"budget\"\n[[stage]]\nkind = \"pretrain\"\noutput = \"base\"\nexport = \"{}\"\nmax_seconds = {budget}\n\
             train = {{ steps = 500, batch_size = 2, seed = 1, optim = {{ lr = 1e-3 }} }}\n\
             [[stage]]\nkind = \"eval\"\nmodel = \"base\"\nrow = \"After budget\"\n\
             eval = {{ prompts_per_task = 1, tasks = [\"quality\"], sampling = {{ steps = 2, guidance = 1.0 }} }}\n",
            export.display()
        )
    };
    let bad = Recipe::from_toml(Path::new("budget.toml"), &text("-1.0")).unwrap_err().to_string();
    assert!(bad.contains("max_seconds") && bad.contains("-1"), "{bad}");

    let recipe = Recipe::from_toml(Path::new("budget.toml"), &text("0.0")).unwrap();
    let device = Default::default();
    run_recipe::<B>(&recipe, runs.path(), &device).unwrap();
    let dir = runs.path().join("budget");
    let metrics = read_metrics(&dir.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = metrics.iter().filter(|m| m["stage"] == "pretrain").map(|m| m["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [1], "a zero budget is spent by the first of 500 steps");
    // the export is the saved pipeline: the same function of prompt and noise
    let saved = Pipeline::<B>::load(&dir.join("base"), &device).unwrap();
    let exported = Pipeline::<B>::load(&export, &device).unwrap();
    assert_eq!(velocity(&saved), velocity(&exported));
    let table = ResultsTable::read(&dir).unwrap();
    assert_eq!(table.rows.iter().map(|r| r.model.as_str()).collect::<Vec<_>>(), ["After budget"]);
}
