//! Bad input gives one clear error naming the file, the key or field, and expected vs found;
//! never a panic.

use crate::common;

use std::path::{Path, PathBuf};

use common::{fixtures, read_all, write};
use flow_opd::model::forward_io::ForwardInputs;
use flow_opd::model::weights::{ModelSource, NamedTensor};

type Cpu = burn::backend::Flex;

/// A copy of the sd35_tiny folder whose weights are `edit`ed.
fn edited_model(edit: impl FnOnce(&mut Vec<NamedTensor>)) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("sd35_tiny");
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let mut tensors = read_all(&src.join("diffusion_pytorch_model.safetensors"));
    edit(&mut tensors);
    let weights = dir.path().join("diffusion_pytorch_model.safetensors");
    write(&weights, &tensors);
    (dir, weights)
}

fn load_error(path: &Path) -> String {
    match ModelSource::open(path, None).and_then(|s| s.load::<Cpu>(&Default::default())) {
        Ok(_) => panic!("{} loaded but should not have", path.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(message.contains(part), "error `{message}` does not mention `{part}`");
    }
}

#[test]
fn missing_key_is_named_with_its_expected_shape() {
    let (dir, weights) = edited_model(|t| t.retain(|t| t.name != "transformer_blocks.1.attn.to_k.weight"));
    let err = load_error(dir.path());
    assert_mentions(&err, &["transformer_blocks.1.attn.to_k.weight", "missing", "[16, 16]"]);
    assert_mentions(&err, &[dir.path().to_str().unwrap()]);
    drop(weights);
}

#[test]
fn unexpected_key_is_named_with_its_file() {
    let (dir, weights) = edited_model(|t| {
        t.push(NamedTensor { name: "transformer_blocks.0.attn.to_z.weight".into(), shape: vec![2], values: vec![0.0; 2] })
    });
    let err = load_error(dir.path());
    assert_mentions(&err, &["transformer_blocks.0.attn.to_z.weight", "unexpected", weights.to_str().unwrap()]);
}

#[test]
fn shape_mismatch_names_key_expected_and_found() {
    let (dir, weights) = edited_model(|t| {
        let w = t.iter_mut().find(|t| t.name == "context_embedder.weight").unwrap();
        w.shape = vec![16, 15];
        w.values.truncate(16 * 15);
    });
    let err = load_error(dir.path());
    assert_mentions(&err, &["context_embedder.weight", "[16, 16]", "[16, 15]", weights.to_str().unwrap()]);
}

#[test]
fn truncated_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("sd35_tiny");
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("diffusion_pytorch_model.safetensors")).unwrap();
    let weights = dir.path().join("diffusion_pytorch_model.safetensors");
    std::fs::write(&weights, &bytes[..bytes.len() - 1000]).unwrap();
    let err = load_error(dir.path());
    assert_mentions(&err, &[weights.to_str().unwrap(), "truncated"]);
    // A file cut inside its header too.
    std::fs::write(&weights, &bytes[..20]).unwrap();
    assert_mentions(&load_error(dir.path()), &[weights.to_str().unwrap()]);
}

#[test]
fn config_that_does_not_fit_the_weights_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("sd35_tiny");
    std::fs::copy(src.join("diffusion_pytorch_model.safetensors"), dir.path().join("diffusion_pytorch_model.safetensors")).unwrap();
    let config = std::fs::read_to_string(src.join("config.json")).unwrap();

    // One block fewer than the weights hold: block 2 keeps weights the last block lacks.
    std::fs::write(dir.path().join("config.json"), config.replace("\"num_layers\": 4", "\"num_layers\": 3")).unwrap();
    let err = load_error(dir.path());
    assert_mentions(&err, &["transformer_blocks.2.", "unexpected", "config"]);

    // Same width, other head split: the qk-norm scales no longer fit.
    let regrouped = config.replace("\"attention_head_dim\": 8", "\"attention_head_dim\": 4").replace("\"num_attention_heads\": 2", "\"num_attention_heads\": 4");
    std::fs::write(dir.path().join("config.json"), regrouped).unwrap();
    let err = load_error(dir.path());
    assert_mentions(&err, &["norm", "expected [4]", "[8]"]);

    // An unknown field in the config.
    std::fs::write(dir.path().join("config.json"), config.replace("\"num_layers\"", "\"num_blocks\"")).unwrap();
    let err = load_error(dir.path());
    assert_mentions(&err, &["num_blocks", "config.json"]);
}

#[test]
fn shard_index_naming_an_absent_tensor_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("sd35_tiny_sharded");
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let index = dir.path().join("diffusion_pytorch_model.safetensors.index.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
    let map = json["weight_map"].as_object_mut().unwrap();
    let shard = map["proj_out.weight"].clone();
    map.insert("proj_out.extra".into(), shard.clone());
    std::fs::write(&index, json.to_string()).unwrap();
    let err = load_error(dir.path());
    assert_mentions(&err, &["proj_out.extra", shard.as_str().unwrap()]);
}

/// Inputs with one tensor replaced.
fn edited_inputs(edit: impl FnOnce(&mut Vec<NamedTensor>)) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = read_all(&common::case("sd35_b2_nonsquare").inputs());
    edit(&mut tensors);
    let path = dir.path().join("inputs.safetensors");
    write(&path, &tensors);
    (dir, path)
}

fn forward_error(inputs: &Path) -> String {
    let device = Default::default();
    let model = ModelSource::open(&fixtures().join("sd35_tiny"), None).unwrap().load::<Cpu>(&device).unwrap();
    match ForwardInputs::read(inputs).and_then(|i| i.run(&model, inputs, &device)) {
        Ok(_) => panic!("forward accepted bad inputs"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn latent_larger_than_the_position_table_is_rejected() {
    // The table is 8 x 8 patches of 2: at most 16 x 16 latent pixels.
    let (_dir, path) = edited_inputs(|t| {
        let x = t.iter_mut().find(|t| t.name == "hidden_states").unwrap();
        x.shape = vec![2, 4, 18, 6];
        x.values = vec![0.1; 2 * 4 * 18 * 6];
    });
    let err = forward_error(&path);
    assert_mentions(&err, &["hidden_states", "18 x 6", "8 x 8 position table", path.to_str().unwrap()]);
}

#[test]
fn bad_forward_inputs_name_the_tensor() {
    let (_dir, path) = edited_inputs(|t| t.retain(|t| t.name != "pooled_projections"));
    assert_mentions(&forward_error(&path), &["pooled_projections", "missing", path.to_str().unwrap()]);

    let (_dir, path) = edited_inputs(|t| {
        let x = t.iter_mut().find(|t| t.name == "hidden_states").unwrap();
        x.shape = vec![2, 3, 6, 16];
    });
    assert_mentions(&forward_error(&path), &["hidden_states", "3 channels", "expects 4"]);

    let (_dir, path) = edited_inputs(|t| {
        let x = t.iter_mut().find(|t| t.name == "timestep").unwrap();
        x.shape = vec![1];
        x.values.truncate(1);
    });
    assert_mentions(&forward_error(&path), &["timestep", "batch 1", "batch 2"]);

    let (_dir, path) = edited_inputs(|t| {
        let x = t.iter_mut().find(|t| t.name == "encoder_hidden_states").unwrap();
        x.shape = vec![2, 7 * 16];
    });
    assert_mentions(&forward_error(&path), &["encoder_hidden_states", "rank 3"]);
}

/// The binary turns these errors into a message and a non-zero exit, not a panic.
#[test]
fn cli_reports_errors_without_panicking() {
    let (_dir, path) = edited_inputs(|t| t.retain(|t| t.name != "timestep"));
    let out_dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_flow-opd"))
        .args(["model", "forward", "--model"])
        .arg(fixtures().join("sd35_tiny"))
        .arg("--inputs")
        .arg(&path)
        .arg("--output")
        .arg(out_dir.path().join("out.safetensors"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert_mentions(&stderr, &["timestep", "missing"]);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!out_dir.path().join("out.safetensors").exists(), "no output on failure");
}
