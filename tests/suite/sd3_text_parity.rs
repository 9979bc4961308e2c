//! Parity of SD3's text side (tokenizers, CLIP-L, CLIP-G, T5 encoder, the assembled prompt
//! embedding) with transformers / diffusers on the tiny random-weight pipeline folder made by
//! `tools/make_sd3_text_fixtures.py` (`tests/fixtures/sd3_tiny/`, references in
//! `tests/fixtures/sd3_text/`).

use crate::common;

use std::path::{Path, PathBuf};

use burn::tensor::Tensor;
use flow_opd::Backend;
use common::{read_all, rel_l2, write};
use flow_opd::model::ModelError;
use flow_opd::model::text::{ClipTextModel, PromptTokenizer, Sd3TextEncoders, T5Encoder, TextError};
use flow_opd::model::weights::{MappedFile, NamedTensor};
use safetensors::Dtype;

type Cpu = burn::backend::Flex;

/// Relative L2 error allowed against transformers / diffusers (f32).
const TOLERANCE: f64 = 1e-4;

fn pipeline_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd3_tiny")
}

fn reference_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd3_text/reference.safetensors")
}

#[derive(serde::Deserialize)]
struct ReferenceInfo {
    prompts: Vec<String>,
    t5_max_sequence_length: usize,
    negative_prompt: String,
}

fn info() -> ReferenceInfo {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd3_text/reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A float reference tensor: (shape, values).
fn reference(name: &str) -> (Vec<usize>, Vec<f32>) {
    let (_, tensors) = MappedFile::open(&reference_path()).unwrap();
    let t = tensors.iter().find(|t| t.name == name).unwrap_or_else(|| panic!("no reference {name}"));
    assert_eq!(t.dtype, Dtype::F32);
    (t.shape.clone(), t.to_f32())
}

/// An int64 reference tensor as rows of ids.
fn reference_ids(name: &str) -> Vec<Vec<u32>> {
    let (_, tensors) = MappedFile::open(&reference_path()).unwrap();
    let t = tensors.iter().find(|t| t.name == name).unwrap_or_else(|| panic!("no reference {name}"));
    assert_eq!(t.dtype, Dtype::I64);
    let values: Vec<u32> = t.bytes().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32).collect();
    values.chunks(t.shape[1]).map(<[u32]>::to_vec).collect()
}

fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> (Vec<usize>, Vec<f32>) {
    let dims = t.dims().to_vec();
    (dims, t.into_data().convert::<f32>().into_vec::<f32>().unwrap())
}

/// Asserts shape equality and relative L2 error below [`TOLERANCE`]; returns the error.
fn assert_close<B: Backend, const D: usize>(what: &str, got: Tensor<B, D>, reference_name: &str) -> f64 {
    let (shape, got) = values(got);
    let (ref_shape, expected) = reference(reference_name);
    assert_eq!(shape, ref_shape, "{what}: shape");
    let err = rel_l2(&got, &expected);
    println!("{what}: relative L2 error {err:.3e}");
    assert!(err < TOLERANCE, "{what}: relative L2 error {err:.3e} >= {TOLERANCE:e}");
    err
}

fn prompts(info: &ReferenceInfo) -> Vec<&str> {
    info.prompts.iter().map(String::as_str).collect()
}

#[test]
fn tokenizer_ids_equal_transformers() {
    let info = info();
    let prompts = prompts(&info);
    let dir = pipeline_dir();
    let cases = [
        ("tokenizer", None, "clip_l.input_ids", "<|endoftext|>"),
        ("tokenizer_2", None, "clip_g.input_ids", "!"),
        ("tokenizer_3", Some(info.t5_max_sequence_length), "t5.input_ids", "<pad>"),
    ];
    for (folder, max_length, reference_name, pad) in cases {
        let tokenizer = PromptTokenizer::from_folder(&dir.join(folder), max_length).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(tokenizer.pad_token, pad, "{folder}: pad token read from tokenizer_config.json");
        let expected = reference_ids(reference_name);
        assert_eq!(tokenizer.max_length, expected[0].len(), "{folder}");
        let got = tokenizer.encode(&prompts).unwrap();
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            assert_eq!(g, e, "{folder}: ids of prompt {i} {:?}", prompts[i]);
        }
        // The long prompt fills every position (truncated), the empty one is mostly padding.
        let len = got[4].len();
        assert!(!got[4][..len - 1].contains(&tokenizer.pad_id), "{folder}: the long prompt should be truncated, not padded");
        assert!(got[3].iter().filter(|&&id| id == tokenizer.pad_id).count() >= got[3].len() - 2, "{folder}");
    }
}

/// A CLIP folder with only `vocab.json` + `merges.txt` (older repositories) tokenises like the
/// `tokenizer.json` transformers writes.
#[test]
fn clip_vocab_and_merges_give_the_same_ids() {
    let info = info();
    let prompts = prompts(&info);
    for (folder, reference_name) in [("tokenizer", "clip_l.input_ids"), ("tokenizer_2", "clip_g.input_ids")] {
        let src = pipeline_dir().join(folder);
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer.json")).unwrap()).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("vocab.json"), json["model"]["vocab"].to_string()).unwrap();
        let merges: Vec<String> = json["model"]["merges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| match m {
                serde_json::Value::String(s) => s.clone(),
                pair => format!("{} {}", pair[0].as_str().unwrap(), pair[1].as_str().unwrap()),
            })
            .collect();
        std::fs::write(tmp.path().join("merges.txt"), format!("#version: 0.2\n{}\n", merges.join("\n"))).unwrap();
        // As in SD3's own folders: the pad token (an AddedToken object) in special_tokens_map.json.
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer_config.json")).unwrap()).unwrap();
        let pad = config.as_object_mut().unwrap().remove("pad_token").unwrap();
        std::fs::write(tmp.path().join("tokenizer_config.json"), config.to_string()).unwrap();
        let map = serde_json::json!({"pad_token": {"content": pad, "lstrip": false, "normalized": true, "rstrip": false, "single_word": false}});
        std::fs::write(tmp.path().join("special_tokens_map.json"), map.to_string()).unwrap();
        let tokenizer = PromptTokenizer::from_folder(tmp.path(), None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(tokenizer.pad_token, pad.as_str().unwrap());
        assert_eq!(tokenizer.encode(&prompts).unwrap(), reference_ids(reference_name), "{folder} from vocab + merges");
    }
}

#[test]
fn clip_encoders_match_transformers() {
    let device = Default::default();
    let dir = pipeline_dir();
    for (folder, name, hidden, pooled) in [("text_encoder", "clip_l", 32, 32), ("text_encoder_2", "clip_g", 48, 40)] {
        let (config, model) = ClipTextModel::<Cpu>::load(&dir.join(folder), &device).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((config.hidden_size, config.projection_dim), (hidden, Some(pooled)), "{folder}");
        let ids = reference_ids(&format!("{name}.input_ids"));
        let flat: Vec<i64> = ids.iter().flatten().map(|&i| i as i64).collect();
        let ids = Tensor::<Cpu, 2, burn::tensor::Int>::from_data(burn::tensor::TensorData::new(flat, [ids.len(), ids[0].len()]), &device);
        let out = model.forward(ids);
        assert_eq!(out.hidden_states.len(), config.num_hidden_layers + 1);
        assert_close(&format!("{name} hidden_states[-2]"), out.penultimate(), &format!("{name}.penultimate"));
        assert_close(&format!("{name} projected pooled"), out.pooled, &format!("{name}.pooled"));
    }
}

#[test]
fn t5_encoder_matches_transformers() {
    let device = Default::default();
    let (config, model) = T5Encoder::<Cpu>::load(&pipeline_dir().join("text_encoder_3"), &device).unwrap_or_else(|e| panic!("{e}"));
    assert!(config.gated && config.relative_attention_max_distance == 20);
    assert_eq!(config.activation, flow_opd::model::text::T5Activation::GeluTanh, "gated-gelu is gelu_new");
    let ids = reference_ids("t5.input_ids");
    let flat: Vec<i64> = ids.iter().flatten().map(|&i| i as i64).collect();
    let ids = Tensor::<Cpu, 2, burn::tensor::Int>::from_data(burn::tensor::TensorData::new(flat, [ids.len(), ids[0].len()]), &device);
    assert_close("t5 last_hidden_state", model.forward(ids), "t5.last_hidden_state");
}

/// Real T5-XXL folders are sharded (`model.safetensors.index.json`) and some files store the
/// embedding as `encoder.embed_tokens.weight` only: both load to the same encoder.
#[test]
fn t5_loads_from_shards_and_from_embed_tokens() {
    let device = Default::default();
    let ids = reference_ids("t5.input_ids");
    let flat: Vec<i64> = ids.iter().flatten().map(|&i| i as i64).collect();
    let ids = Tensor::<Cpu, 2, burn::tensor::Int>::from_data(burn::tensor::TensorData::new(flat, [ids.len(), ids[0].len()]), &device);

    let src = pipeline_dir().join("text_encoder_3");
    let tensors = read_all(&src.join("model.safetensors"));
    let sharded = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), sharded.path().join("config.json")).unwrap();
    let (first, second) = tensors.split_at(tensors.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (name, part) in [("model-00001-of-00002.safetensors", first), ("model-00002-of-00002.safetensors", second)] {
        write(&sharded.path().join(name), part);
        for t in part {
            weight_map.insert(t.name.clone(), name.into());
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(sharded.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    let (_, model) = T5Encoder::<Cpu>::load(sharded.path(), &device).unwrap_or_else(|e| panic!("{e}"));
    assert_close("t5 from 2 shards", model.forward(ids.clone()), "t5.last_hidden_state");

    let renamed = edited_copy("text_encoder_3", |tensors| {
        tensors.iter_mut().find(|t| t.name == "shared.weight").unwrap().name = "encoder.embed_tokens.weight".into();
    });
    let (_, model) = T5Encoder::<Cpu>::load(renamed.path(), &device).unwrap_or_else(|e| panic!("{e}"));
    assert_close("t5 from encoder.embed_tokens", model.forward(ids), "t5.last_hidden_state");
}

#[test]
fn sd3_prompt_embeds_match_diffusers_encode_prompt() {
    let info = info();
    let prompts = prompts(&info);
    let device = Default::default();
    let encoders = Sd3TextEncoders::<Cpu>::load(&pipeline_dir(), info.t5_max_sequence_length, &device).unwrap_or_else(|e| panic!("{e}"));
    let cfg = encoders.encode_for_cfg(&prompts, &info.negative_prompt).unwrap();
    assert_close("sd3 prompt_embeds", cfg.positive.prompt_embeds.clone(), "sd3.prompt_embeds");
    assert_close("sd3 pooled_prompt_embeds", cfg.positive.pooled.clone(), "sd3.pooled_prompt_embeds");
    // diffusers gives one negative row per prompt, all equal; the fixture keeps one.
    let negative = cfg.negative.clone();
    assert_eq!(negative.prompt_embeds.dims()[0], prompts.len());
    assert_close("sd3 negative_prompt_embeds", negative.prompt_embeds.slice([0..1]), "sd3.negative_prompt_embeds");
    assert_close("sd3 negative_pooled", negative.pooled.slice([0..1]), "sd3.negative_pooled_prompt_embeds");
    let (_, neg_rows) = values(cfg.negative.prompt_embeds.clone());
    let row = neg_rows.len() / prompts.len();
    for b in 1..prompts.len() {
        assert!(rel_l2(&neg_rows[b * row..(b + 1) * row], &neg_rows[..row]) < 1e-6);
    }
    // The CFG batch is [negative; positive].
    let batched = cfg.batched();
    assert_eq!(batched.prompt_embeds.dims(), [2 * prompts.len(), 77 + info.t5_max_sequence_length, 88]);
    assert_eq!(batched.pooled.dims(), [2 * prompts.len(), 72]);
    let (_, all) = values(batched.pooled);
    let (_, expected_positive) = reference("sd3.pooled_prompt_embeds");
    assert!(rel_l2(&all[prompts.len() * 72..], &expected_positive) < TOLERANCE);
}

/// Copies a model folder, lets `edit` change its tensors, and returns the temporary copy.
fn edited_copy(folder: &str, edit: impl FnOnce(&mut Vec<NamedTensor>)) -> tempfile::TempDir {
    let src = pipeline_dir().join(folder);
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), tmp.path().join("config.json")).unwrap();
    let mut tensors = read_all(&src.join("model.safetensors"));
    edit(&mut tensors);
    write(&tmp.path().join("model.safetensors"), &tensors);
    tmp
}

fn model_error(result: Result<impl std::fmt::Debug, ModelError>) -> ModelError {
    result.expect_err("loading should fail")
}

#[test]
fn missing_or_misshaped_weights_name_the_key_and_file() {
    let device: burn::tensor::Device<Cpu> = Default::default();

    let key = "text_model.encoder.layers.1.mlp.fc2.weight";
    let tmp = edited_copy("text_encoder", |t| t.retain(|t| t.name != key));
    let err = model_error(ClipTextModel::<Cpu>::load(tmp.path(), &device));
    let message = err.to_string();
    assert!(matches!(err, ModelError::MissingKey { .. }), "{message}");
    assert!(message.contains(key) && message.contains("model.safetensors"), "{message}");
    assert!(message.contains(&tmp.path().display().to_string()), "{message}");

    let key = "encoder.block.1.layer.1.DenseReluDense.wi_1.weight";
    let tmp = edited_copy("text_encoder_3", |tensors| {
        let t = tensors.iter_mut().find(|t| t.name == key).unwrap();
        t.shape[0] -= 1;
        t.values.truncate(t.shape.iter().product());
    });
    let err = model_error(T5Encoder::<Cpu>::load(tmp.path(), &device));
    let message = err.to_string();
    assert!(matches!(err, ModelError::ShapeMismatch { .. }), "{message}");
    assert!(message.contains(key) && message.contains("[64, 88]") && message.contains("[63, 88]"), "{message}");
    assert!(message.contains(&tmp.path().join("model.safetensors").display().to_string()), "{message}");

    // A CLIP-G whose projection is the wrong width is caught on `text_projection.weight`.
    let tmp = edited_copy("text_encoder_2", |tensors| {
        let t = tensors.iter_mut().find(|t| t.name == "text_projection.weight").unwrap();
        t.shape = vec![48, 40];
    });
    let message = model_error(ClipTextModel::<Cpu>::load(tmp.path(), &device)).to_string();
    assert!(message.contains("text_projection.weight") && message.contains("[40, 48]"), "{message}");

    // Through the SD3 loader the error still names the file and key.
    let pipeline = tempfile::tempdir().unwrap();
    for sub in ["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "tokenizer_3"] {
        copy_dir(&pipeline_dir().join(sub), &pipeline.path().join(sub));
    }
    let broken = edited_copy("text_encoder_3", |t| t.retain(|t| t.name != "shared.weight"));
    copy_dir(broken.path(), &pipeline.path().join("text_encoder_3"));
    let err = Sd3TextEncoders::<Cpu>::load(pipeline.path(), 32, &device).expect_err("no T5 embedding");
    assert!(matches!(err, TextError::Model(ModelError::MissingKey { .. })), "{err}");
    assert!(err.to_string().contains("shared.weight") && err.to_string().contains("text_encoder_3"), "{err}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}
