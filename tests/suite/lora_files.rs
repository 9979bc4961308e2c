//! LoRA files as peft and diffusers read them: every adapter flow-opd saves holds both layouts
//! with only `LoraConfig` fields peft knows (the field list is the `adapter_config.json` peft
//! itself wrote for `tests/fixtures/flow/lora_a`), `lora convert` moves adapters between the
//! layouts without changing a bit and refuses keys it cannot place, a file that adapts nothing
//! is an error, and `model export --adapter` folds the adapter into the weights (its forward
//! equals peft's adapted forward, `tools/make_flow_fixtures.py`).

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::backend::Flex;
use common::{case, read_tensor, rel_l2};
use flow_opd::model::Mmdit;
use flow_opd::model::forward_io::ForwardInputs;
use flow_opd::model::lora::{ActiveAdapters, LoraFormat, convert_lora, load_lora, save_adapter_atomic};
use flow_opd::model::weights::{MappedFile, ModelSource, NamedTensor, SaveDtype, write_safetensors};

type B = Flex;

/// Relative L2 error allowed against peft (f32 on both sides).
const TOLERANCE: f64 = 1e-5;

fn flow(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/flow").join(name)
}

fn base(dir: &Path) -> Mmdit<B> {
    ModelSource::open(dir, None).unwrap().load::<B>(&Default::default()).unwrap()
}

fn run(model: &Mmdit<B>, adapters: &ActiveAdapters<'_, B>) -> Vec<f32> {
    let c = case("sd35_b2_nonsquare");
    let inputs = ForwardInputs::read(&c.inputs()).unwrap();
    inputs.run_adapted(model, adapters, &c.inputs(), &Default::default()).unwrap().into_data().into_vec::<f32>().unwrap()
}

/// peft's output for adapter `key` (`lora_expected.safetensors`).
fn expected(key: &str) -> Vec<f32> {
    read_tensor(&flow("lora_expected.safetensors"), key).values
}

fn applied_matches_peft(path: &Path, model: &Mmdit<B>, key: &str) {
    let adapter = load_lora(path, model, &Default::default()).unwrap_or_else(|e| panic!("{e}"));
    let err = rel_l2(&run(model, &ActiveAdapters::single(&adapter)), &expected(key));
    println!("{}: relative L2 error vs peft {err:.3e}", path.display());
    assert!(err < TOLERANCE, "{}: {err}", path.display());
}

/// `(name, dtype, raw bytes)` of every tensor, sorted by name.
fn raw(path: &Path) -> Vec<(String, String, Vec<u8>)> {
    let (_, tensors) = MappedFile::open(path).unwrap_or_else(|e| panic!("{e}"));
    tensors.iter().map(|t| (t.name.clone(), format!("{:?}", t.dtype), t.bytes().to_vec())).collect()
}

fn json(path: &Path) -> serde_json::Map<String, serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The `LoraConfig` fields peft 0.21.2 writes (`save_pretrained` of the fixture adapter).
fn peft_fields() -> Vec<String> {
    json(&flow("lora_a/adapter_config.json")).keys().cloned().collect()
}

fn metadata(path: &Path) -> std::collections::HashMap<String, String> {
    MappedFile::open(path).unwrap().0.metadata()
}

#[test]
fn saved_adapters_hold_both_layouts_with_peft_fields_only() {
    let model = base(&case("sd35_b2_nonsquare").model_dir());
    let a = load_lora(&flow("lora_a"), &model, &Default::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("teacher");
    save_adapter_atomic(&a, &out).unwrap();
    let fields = peft_fields();
    assert!(fields.len() > 30, "peft's field list: {fields:?}");
    for key in json(&out.join("adapter_config.json")).keys() {
        assert!(fields.contains(key), "adapter_config.json: `{key}` is not a peft LoraConfig field");
    }
    // diffusers' layout: `transformer.` keys, and the same config in lora_adapter_metadata with
    // `transformer.` keys, as diffusers' save_lora_weights writes it (the fixture file).
    let weights = out.join("pytorch_lora_weights.safetensors");
    let theirs = raw(&flow("lora_a_diffusers/pytorch_lora_weights.safetensors"));
    let ours = raw(&weights);
    assert_eq!(ours.iter().map(|t| &t.0).collect::<Vec<_>>(), theirs.iter().map(|t| &t.0).collect::<Vec<_>>());
    assert_eq!(ours, theirs, "the same tensors as diffusers' own file, bit for bit");
    let meta: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&metadata(&weights)["lora_adapter_metadata"]).unwrap();
    for key in meta.keys() {
        let field = key.strip_prefix("transformer.").unwrap_or_else(|| panic!("metadata key `{key}` without `transformer.`"));
        assert!(fields.contains(&field.to_string()), "lora_adapter_metadata: `{key}` is not a peft LoraConfig field");
    }
    assert_eq!((meta["transformer.r"].as_u64(), meta["transformer.lora_alpha"].as_f64()), (Some(4), Some(8.0)));
    assert!(metadata(&out.join("adapter_model.safetensors"))["created_by"].starts_with("flow-opd"), "provenance in the metadata");
    // Each file alone applies the adapter as peft does.
    applied_matches_peft(&out, &model, "lora_a");
    applied_matches_peft(&weights, &model, "lora_a");
    // Saving again gives the same bytes (sorted metadata).
    let again = dir.path().join("again");
    save_adapter_atomic(&a, &again).unwrap();
    for file in ["adapter_model.safetensors", "adapter_config.json", "pytorch_lora_weights.safetensors"] {
        assert_eq!(std::fs::read(out.join(file)).unwrap(), std::fs::read(again.join(file)).unwrap(), "{file}");
    }
}

#[test]
fn convert_round_trips_peft_diffusers_peft_bit_for_bit() {
    let model = base(&case("sd35_b2_nonsquare").model_dir());
    let dir = tempfile::tempdir().unwrap();
    for name in ["lora_a", "lora_ff"] {
        let (d, p) = (dir.path().join(format!("{name}-diffusers")), dir.path().join(format!("{name}-peft")));
        convert_lora(&flow(name), &d, &[LoraFormat::Diffusers]).unwrap();
        assert!(!d.join("adapter_model.safetensors").exists());
        applied_matches_peft(&d, &model, name);
        convert_lora(&d, &p, &[LoraFormat::Peft]).unwrap();
        let strip = |t: Vec<(String, String, Vec<u8>)>, prefix: &str| -> Vec<(String, String, Vec<u8>)> {
            t.into_iter().map(|(n, d, b)| (n.strip_prefix(prefix).unwrap().to_string(), d, b)).collect()
        };
        let original = raw(&flow(name).join("adapter_model.safetensors"));
        assert_eq!(raw(&p.join("adapter_model.safetensors")), original, "{name}: PEFT -> diffusers -> PEFT");
        assert_eq!(strip(raw(&d.join("pytorch_lora_weights.safetensors")), "transformer."), strip(original, "base_model.model."));
        // The config comes back as peft wrote it.
        assert_eq!(json(&p.join("adapter_config.json")), json(&flow(name).join("adapter_config.json")), "{name}: config");
        applied_matches_peft(&p, &model, name);
    }
    // A file diffusers wrote, and one without metadata (alpha = r, as diffusers assumes).
    let from_diffusers = dir.path().join("from-diffusers");
    convert_lora(&flow("lora_a_diffusers"), &from_diffusers, &[LoraFormat::Peft, LoraFormat::Diffusers]).unwrap();
    applied_matches_peft(&from_diffusers, &model, "lora_a");
    applied_matches_peft(&from_diffusers.join("pytorch_lora_weights.safetensors"), &model, "lora_a");
    let nometa = dir.path().join("nometa");
    convert_lora(&flow("lora_a_diffusers_nometa"), &nometa, &[LoraFormat::Peft]).unwrap();
    applied_matches_peft(&nometa, &model, "lora_a_nometa_diffusers");
    // The CLI, in place, drops a key peft does not know (earlier flow-opd wrote `library`).
    let legacy = dir.path().join("legacy");
    std::fs::create_dir(&legacy).unwrap();
    std::fs::copy(flow("lora_a/adapter_model.safetensors"), legacy.join("adapter_model.safetensors")).unwrap();
    let mut config = json(&flow("lora_a/adapter_config.json"));
    config.insert("library".into(), "flow-opd".into());
    std::fs::write(legacy.join("adapter_config.json"), serde_json::to_string(&config).unwrap()).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_flow-opd")).args(["lora", "convert"]).arg(&legacy).arg(&legacy).args(["--to", "both"]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(!json(&legacy.join("adapter_config.json")).contains_key("library"));
    assert_eq!(raw(&legacy.join("adapter_model.safetensors")), raw(&flow("lora_a/adapter_model.safetensors")));
    applied_matches_peft(&legacy.join("pytorch_lora_weights.safetensors"), &model, "lora_a");
}

fn tensor(name: &str, shape: [usize; 2]) -> NamedTensor {
    NamedTensor { name: name.into(), shape: shape.to_vec(), values: vec![0.5; shape[0] * shape[1]] }
}

#[test]
fn foreign_keys_are_refused_by_name() {
    let model = base(&case("sd35_b2_nonsquare").model_dir());
    let dir = tempfile::tempdir().unwrap();
    // kohya's SD3 names: nothing in the file names a transformer layer.
    let kohya = dir.path().join("kohya.safetensors");
    let key = "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight";
    write_safetensors(&kohya, &[tensor(key, [4, 64]), tensor("lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight", [192, 4])], SaveDtype::F32, None).unwrap();
    for err in [
        convert_lora(&kohya, &dir.path().join("out"), &[LoraFormat::Peft]).unwrap_err().to_string(),
        load_lora(&kohya, &model, &Default::default()).unwrap_err().to_string(),
    ] {
        assert!(err.contains("kohya.safetensors") && err.contains(key) && err.contains("nothing would be applied"), "{err}");
    }
    assert!(!dir.path().join("out").exists(), "nothing written");
    // A diffusers file that also adapts a text encoder: the text-encoder key is named.
    let mixed = dir.path().join("mixed.safetensors");
    let te = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight";
    write_safetensors(
        &mixed,
        &[
            tensor("transformer.transformer_blocks.0.attn.to_q.lora_A.weight", [2, 64]),
            tensor("transformer.transformer_blocks.0.attn.to_q.lora_B.weight", [64, 2]),
            tensor(te, [2, 32]),
        ],
        SaveDtype::F32,
        None,
    )
    .unwrap();
    let err = convert_lora(&mixed, &dir.path().join("out2"), &[LoraFormat::Peft]).unwrap_err().to_string();
    assert!(err.contains("mixed.safetensors") && err.contains(te), "{err}");
    // An empty file adapts nothing.
    let empty = dir.path().join("empty.safetensors");
    write_safetensors(&empty, &[], SaveDtype::F32, None).unwrap();
    let err = load_lora(&empty, &model, &Default::default()).unwrap_err().to_string();
    assert!(err.contains("empty.safetensors") && err.contains("no tensor"), "{err}");
    // The CLI prints the message and fails.
    let output = Command::new(env!("CARGO_BIN_EXE_flow-opd")).args(["lora", "convert"]).arg(&kohya).arg(dir.path().join("cli")).args(["--to", "peft"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains(key) && !stderr.contains("panicked"), "{stderr}");
}

/// `model export --adapter`: the folder's plain forward is the base's forward with the adapter
/// active, as peft computes it.
#[test]
fn export_folds_the_adapter_into_the_weights() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("exported");
    let output = Command::new(env!("CARGO_BIN_EXE_flow-opd"))
        .args(["model", "export", "--model"])
        .arg(case("sd35_b2_nonsquare").model_dir())
        .arg("--adapter")
        .arg(flow("lora_a"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let exported = base(&out);
    let folded = run(&exported, &ActiveAdapters::none());
    let err = rel_l2(&folded, &expected("lora_a"));
    println!("exported folder vs peft's adapted forward: relative L2 error {err:.3e}");
    assert!(err < TOLERANCE, "{err}");
    let model = base(&case("sd35_b2_nonsquare").model_dir());
    let adapter = load_lora(&flow("lora_a"), &model, &Default::default()).unwrap();
    let err = rel_l2(&folded, &run(&model, &ActiveAdapters::single(&adapter)));
    println!("exported folder vs base + adapter: relative L2 error {err:.3e}");
    assert!(err < TOLERANCE, "{err}");
    assert!(rel_l2(&expected("base"), &expected("lora_a")) > 100.0 * TOLERANCE, "the adapter changes the output");
}
