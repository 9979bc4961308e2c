//! LoRA adapters against peft / diffusers (fixtures from `tools/make_flow_fixtures.py` on the
//! tiny SD3.5 model): PEFT and diffusers file layouts, per-sample routing in one batch, exact
//! and factor-averaging merges, folding into the base, saving, and which weights get gradients.

use crate::common;

use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, Flex};
use burn::module::Module;
use burn::tensor::backend::Backend as _;
use flow_opd::Backend;
use common::{case, read_tensor, rel_l2};
use flow_opd::model::Mmdit;
use flow_opd::model::forward_io::ForwardInputs;
use flow_opd::model::lora::{
    ActiveAdapters, AdapterChoice, LoraAdapter, LoraConfig, LoraFormat, LoraTarget, MergeMethod, combine, fold_into,
    load_lora, save_lora,
};
use flow_opd::model::weights::{ModelSource, SaveDtype};

type B = Flex;

/// Relative L2 error allowed against peft (f32 on both sides).
const TOLERANCE: f64 = 1e-5;

fn flow(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/flow").join(name)
}

fn base<Bk: Backend>(device: &Bk::Device) -> Mmdit<Bk> {
    ModelSource::open(&case("sd35_b2_nonsquare").model_dir(), None).unwrap().load::<Bk>(device).unwrap()
}

fn adapter<Bk: Backend>(name: &str, model: &Mmdit<Bk>, device: &Bk::Device) -> LoraAdapter<Bk> {
    load_lora(&flow(name), model, device).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn run(model: &Mmdit<B>, adapters: &ActiveAdapters<'_, B>) -> Vec<f32> {
    let c = case("sd35_b2_nonsquare");
    let inputs = ForwardInputs::read(&c.inputs()).unwrap();
    let out = inputs.run_adapted(model, adapters, &c.inputs(), &Default::default()).unwrap();
    out.into_data().into_vec::<f32>().unwrap()
}

fn expected(name: &str) -> Vec<f32> {
    read_tensor(&flow("lora_expected.safetensors"), name).values
}

fn check(name: &str, got: &[f32], expected_key: &str) {
    let err = rel_l2(got, &expected(expected_key));
    println!("{name}: relative L2 error vs peft/diffusers {err:.3e}");
    assert!(err < TOLERANCE, "{name}: {err}");
}

#[test]
fn peft_and_diffusers_adapters_match_peft() {
    let device = Default::default();
    let model = base::<B>(&device);
    check("base", &run(&model, &ActiveAdapters::none()), "base");
    for name in ["lora_a", "lora_b", "lora_ff"] {
        let a = adapter(name, &model, &device);
        check(name, &run(&model, &ActiveAdapters::single(&a)), name);
    }
    let a = adapter("lora_a", &model, &device);
    assert_eq!(a.num_layers(), 31, "Flow-GRPO targets on 4 blocks, no to_add_out in the last");
    let mut flow_grpo = LoraTarget::FLOW_GRPO.to_vec();
    flow_grpo.sort();
    assert_eq!(a.targets(), flow_grpo);
    let ff = adapter("lora_ff", &model, &device);
    assert_eq!(ff.num_layers(), 45);
    // diffusers layout with alpha in the header metadata, and without (alpha = r, scale 1).
    let d = adapter("lora_a_diffusers", &model, &device);
    check("lora_a (diffusers layout)", &run(&model, &ActiveAdapters::single(&d)), "lora_a");
    let n = adapter("lora_a_diffusers_nometa", &model, &device);
    check("diffusers layout, no metadata", &run(&model, &ActiveAdapters::single(&n)), "lora_a_nometa_diffusers");
}

#[test]
fn per_sample_routing_mixes_adapters_in_one_batch() {
    let device = Default::default();
    let model = base::<B>(&device);
    let (a, b) = (adapter("lora_a", &model, &device), adapter("lora_b", &model, &device));
    let routed = ActiveAdapters::new(vec![&a, &b], &AdapterChoice::PerSample(vec![Some(0), Some(1)]), &device);
    check("mixed [a, b]", &run(&model, &routed), "mixed");
    // A base row and an adapted row: each equals its own unmixed output.
    let half = ActiveAdapters::new(vec![&a, &b], &AdapterChoice::PerSample(vec![None, Some(1)]), &device);
    let got = run(&model, &half);
    let n = got.len() / 2;
    let (base, lora_b) = (expected("base"), expected("lora_b"));
    assert!(rel_l2(&got[..n], &base[..n]) < TOLERANCE);
    assert!(rel_l2(&got[n..], &lora_b[n..]) < TOLERANCE);
    // AdapterChoice::All is the single-adapter pass.
    let all = ActiveAdapters::new(vec![&a, &b], &AdapterChoice::All(1), &device);
    check("All(1)", &run(&model, &all), "lora_b");
}

#[test]
fn merges_match_reference() {
    let device = Default::default();
    let model = base::<B>(&device);
    let (a, b) = (adapter("lora_a", &model, &device), adapter("lora_b", &model, &device));
    for (name, weights, method, key) in [
        ("exact average", (0.5, 0.5), MergeMethod::Exact, "merged_exact"),
        ("exact weighted", (0.25, 0.75), MergeMethod::Exact, "merged_weighted"),
        ("A/B averaging", (0.5, 0.5), MergeMethod::AverageFactors, "merged_ab_avg"),
    ] {
        let merged = combine(&[(&a, weights.0), (&b, weights.1)], method).unwrap();
        check(&format!("{name} (adapter)"), &run(&model, &ActiveAdapters::single(&merged)), key);
        let folded = fold_into(base::<B>(&device), &merged, 1.0);
        check(&format!("{name} (folded)"), &run(&folded, &ActiveAdapters::none()), key);
    }
    // Merging identical adapters gives that adapter.
    let same = combine(&[(&a, 0.5), (&a, 0.5)], MergeMethod::Exact).unwrap();
    check("merge(a, a)", &run(&model, &ActiveAdapters::single(&same)), "lora_a");
    // Averaging factors needs matching ranks: a rank-2 adapter with a rank-4 one is refused.
    let ff = adapter("lora_ff", &model, &device);
    let err = combine(&[(&a, 0.5), (&ff, 0.5)], MergeMethod::AverageFactors).unwrap_err().to_string();
    assert!(err.contains("transformer_blocks.0."), "{err}");
}

#[test]
fn save_and_reload_both_layouts() {
    let device = Default::default();
    let model = base::<B>(&device);
    let (a, b) = (adapter("lora_a", &model, &device), adapter("lora_b", &model, &device));
    // The exact merge has rank 8 and scale 1: the saved files must carry that.
    let merged = combine(&[(&a, 0.25), (&b, 0.75)], MergeMethod::Exact).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (adapter, key) in [(&a, "lora_a"), (&merged, "merged_weighted")] {
        for format in [LoraFormat::Peft, LoraFormat::Diffusers] {
            let out = dir.path().join(format!("{key}-{format:?}"));
            save_lora(adapter, &out, format, SaveDtype::F32).unwrap();
            let reloaded = load_lora(&out, &model, &device).unwrap();
            check(&format!("{key} saved as {format:?}"), &run(&model, &ActiveAdapters::single(&reloaded)), key);
        }
    }
    // PEFT keys and config are what peft writes.
    let out = dir.path().join("peft");
    save_lora(&a, &out, LoraFormat::Peft, SaveDtype::F32).unwrap();
    let names: Vec<String> = common::read_all(&out.join("adapter_model.safetensors")).into_iter().map(|t| t.name).collect();
    let reference: Vec<String> = common::read_all(&flow("lora_a/adapter_model.safetensors")).into_iter().map(|t| t.name).collect();
    assert_eq!(names, reference);
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!((config["r"].as_u64(), config["lora_alpha"].as_f64()), (Some(4), Some(8.0)));
}

#[test]
fn bad_adapter_files_are_clear_errors() {
    let device = Default::default();
    let model = base::<B>(&device);
    let dir = tempfile::tempdir().unwrap();
    // An adapter for another model: a shape mismatch naming the key.
    let other = flow_opd::model::MmditConfig::preset("tiny").unwrap().init::<B>(&device);
    let err = load_lora(&flow("lora_a"), &other, &device).unwrap_err().to_string();
    assert!(err.contains("lora_A.weight") && err.contains("adapter_model.safetensors"), "{err}");
    // A folder without an adapter.
    let err = load_lora(dir.path(), &model, &device).unwrap_err().to_string();
    assert!(err.contains("not a LoRA adapter"), "{err}");
    // A PEFT file without its config.
    let lone = dir.path().join("lone.safetensors");
    std::fs::copy(flow("lora_a/adapter_model.safetensors"), &lone).unwrap();
    let err = load_lora(&lone, &model, &device).unwrap_err().to_string();
    assert!(err.contains("adapter_config.json"), "{err}");
    // A config that is not PEFT's.
    let bad = dir.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    std::fs::copy(flow("lora_a/adapter_model.safetensors"), bad.join("adapter_model.safetensors")).unwrap();
    std::fs::write(bad.join("adapter_config.json"), r#"{"r": "four", "lora_alpha": 8}"#).unwrap();
    let err = load_lora(&bad, &model, &device).unwrap_err().to_string();
    assert!(err.contains("adapter_config.json") && err.contains('r'), "{err}");
}

#[test]
fn fresh_adapter_is_the_base_and_only_it_gets_gradients() {
    type AD = Autodiff<Flex>;
    let device = Default::default();
    let model = base::<AD>(&device).no_grad();
    let config = LoraConfig::new(4, 8.0, LoraTarget::FLOW_GRPO.to_vec());
    let lora = config.init(&model, 0, &device);
    assert_eq!(lora.num_layers(), 31);
    let c = case("sd35_b2_nonsquare");
    let inputs = ForwardInputs::read(&c.inputs()).unwrap();
    let with = inputs.run_adapted(&model, &ActiveAdapters::single(&lora), &c.inputs(), &device).unwrap();
    let without = inputs.run(&model, &c.inputs(), &device).unwrap();
    let (w, wo) = (with.clone().into_data().into_vec::<f32>().unwrap(), without.into_data().into_vec::<f32>().unwrap());
    assert_eq!(w, wo, "B = 0: a fresh adapter leaves the model unchanged");
    let grads = with.powi_scalar(2).sum().backward();
    let mut adapter_grads = 0;
    for (_, _, layer) in lora.layers() {
        // B gets a gradient (A's is zero since B = 0, but it is tracked).
        assert!(layer.up.val().grad(&grads).is_some());
        adapter_grads += 1;
    }
    assert_eq!(adapter_grads, 31);
    let block = &model.transformer_blocks[0];
    assert!(block.attn.to_q.weight.val().grad(&grads).is_none(), "the frozen base gets no gradient");
}

/// The init's `A` comes from a generator of its own: on `Flex` it is what `B::seed(seed)`
/// followed by `Tensor::random` draws in the same order gave (the shipped adapters were trained
/// from those), draws from the backend's global generator in between change nothing, and
/// another seed gives another adapter.
#[test]
fn init_draws_from_its_own_seeded_generator() {
    use burn::tensor::{Distribution, Tensor};
    let device = Default::default();
    let model = base::<B>(&device);
    let config = LoraConfig::new(4, 8.0, LoraTarget::FLOW_GRPO.to_vec());
    let downs = |a: &LoraAdapter<B>| -> Vec<Vec<f32>> {
        a.blocks
            .iter()
            .flat_map(|block| config.targets.iter().filter_map(|t| block.layers[t.index()].as_ref()))
            .map(|layer| layer.down.val().into_data().into_vec::<f32>().unwrap())
            .collect()
    };
    // the backend's seeded stream, drawn layer by layer in the init's order
    B::seed(&device, 7);
    let stream: Vec<Vec<f32>> = downs(&config.init(&model, 7, &device))
        .iter()
        .map(|d| Tensor::<B, 2>::random([d.len() / 4, 4], Distribution::Normal(0.0, 0.25), &device).into_data().into_vec::<f32>().unwrap())
        .collect();
    let own = downs(&config.init(&model, 7, &device));
    assert_eq!(own.len(), 31);
    assert_eq!(own, stream, "the init equals the backend's stream seeded alike");
    // the global generator disturbed between two inits of the same seed
    B::seed(&device, 99);
    let _ = Tensor::<B, 2>::random([5, 5], Distribution::Default, &device);
    assert_eq!(downs(&config.init(&model, 7, &device)), own);
    let other = downs(&config.init(&model, 8, &device));
    assert!(other.iter().zip(&own).all(|(a, b)| a != b), "seed 8 differs from seed 7 in every layer");
    let all: Vec<f32> = own.concat();
    let std = (all.iter().map(|x| x * x).sum::<f32>() / all.len() as f32).sqrt();
    assert!((std - 0.25).abs() < 0.01, "A ~ N(0, 1/r^2) with r = 4: std {std}");
}
