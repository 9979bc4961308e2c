//! LoRA files: PEFT's `save_pretrained` layout (`adapter_model.safetensors` +
//! `adapter_config.json`, keys `base_model.model.transformer_blocks.{i}.attn.to_q.lora_A.weight`)
//! and diffusers' `save_lora_weights` layout (`pytorch_lora_weights.safetensors`, keys
//! `transformer.transformer_blocks.{i}.attn.to_q.lora_A.weight`, the PEFT config in the
//! safetensors metadata entry `lora_adapter_metadata` with keys `transformer.r`, ...). `lora_A`
//! is `[r, in]`, `lora_B` is `[out, r]` (docs/reference.md section 8).
//!
//! flow-opd writes every adapter in both layouts into one folder ([`save_adapter`]): peft's
//! `PeftModel.from_pretrained(model, dir)` reads the first pair, diffusers'
//! `pipe.load_lora_weights(dir)` picks `pytorch_lora_weights.safetensors` (docs/lora_files.md).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::Backend;
use burn::tensor::{Tensor, TensorData};
use safetensors::Dtype;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::adapter::{LoraAdapter, LoraBlock, LoraLayer};
use super::target::{LoraTarget, parse_module_path};
use crate::io::write_text_atomic;
use crate::model::ModelError;
use crate::model::mmdit::Mmdit;
use crate::model::weights::{MappedFile, NamedTensor, SaveDtype, StoredTensor, write_safetensors};

pub const PEFT_WEIGHTS: &str = "adapter_model.safetensors";
pub const PEFT_CONFIG: &str = "adapter_config.json";
pub const DIFFUSERS_WEIGHTS: &str = "pytorch_lora_weights.safetensors";
const PEFT_PREFIX: &str = "base_model.model.";
const DIFFUSERS_PREFIX: &str = "transformer.";
/// Safetensors metadata entry where diffusers keeps the LoRA config of a `transformer.` file
/// (diffusers' `LORA_ADAPTER_METADATA_KEY`).
const DIFFUSERS_METADATA: &str = "lora_adapter_metadata";
/// Safetensors metadata entry naming the program that wrote the file (provenance is kept here,
/// not in `adapter_config.json`, whose keys must all be `LoraConfig` fields).
const CREATED_BY: &str = "created_by";
/// Config keys that earlier flow-opd versions wrote and peft does not know; dropped on convert.
const NOT_PEFT_KEYS: [&str; 1] = ["library"];

/// On-disk layout of a LoRA adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraFormat {
    /// PEFT `save_pretrained`: a folder with `adapter_model.safetensors` + `adapter_config.json`.
    Peft,
    /// diffusers `save_lora_weights`: a folder with `pytorch_lora_weights.safetensors`.
    Diffusers,
}

/// Why a LoRA file could not be read or written. Each names the file and the key or field.
#[derive(Debug, thiserror::Error)]
pub enum LoraIoError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Write(#[from] crate::io::IoError),
    #[error("{path}: not a LoRA adapter: expected a folder with {PEFT_WEIGHTS} or {DIFFUSERS_WEIGHTS}, or a .safetensors file")]
    NotAnAdapter { path: PathBuf },
    #[error("{path}: invalid adapter config: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path}: `{key}`: {message}")]
    Key { path: PathBuf, key: String, message: String },
    #[error(
        "{path}: no key names a LoRA factor of an adaptable transformer layer (`{PEFT_PREFIX}` or `{DIFFUSERS_PREFIX}` + `transformer_blocks.{{i}}.<layer>.lora_A.weight` / `lora_B.weight`), e.g. `{example}`; nothing would be applied"
    )]
    NoTargets { path: PathBuf, example: String },
}

/// The fields of PEFT's `adapter_config.json` that decide the update's scale (the others are
/// kept as they are by [`convert_lora`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PeftConfig {
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    rank_pattern: BTreeMap<String, usize>,
    #[serde(default)]
    alpha_pattern: BTreeMap<String, f64>,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    target_modules: serde_json::Value,
    #[serde(flatten)]
    other: BTreeMap<String, serde_json::Value>,
}

impl PeftConfig {
    /// PEFT matches pattern keys against the end of the module path.
    fn pattern<'a, T>(patterns: &'a BTreeMap<String, T>, module: &str) -> Option<&'a T> {
        patterns.iter().find(|(k, _)| module == k.as_str() || module.ends_with(&format!(".{k}"))).map(|(_, v)| v)
    }

    /// `alpha / r` for the layer `module` whose stored rank is `rank`.
    fn scale(&self, module: &str, rank: usize) -> f64 {
        let alpha = *Self::pattern(&self.alpha_pattern, module).unwrap_or(&self.lora_alpha);
        if self.use_rslora { alpha / (rank as f64).sqrt() } else { alpha / rank as f64 }
    }
}

/// A LoRA file read without a model: its layout, its PEFT config (for a diffusers file: the
/// transformer's part of `lora_adapter_metadata`, or alpha = r when it has none, as diffusers
/// assumes) and the stored `(lora_A, lora_B)` of each adapted layer.
struct LoraFile {
    weights: PathBuf,
    format: LoraFormat,
    config: Map<String, Value>,
    scale: PeftConfig,
    layers: BTreeMap<(usize, LoraTarget), (StoredTensor, StoredTensor)>,
}

fn module_name(block: usize, target: LoraTarget) -> String {
    format!("transformer_blocks.{block}.{target}")
}

fn prefix(format: LoraFormat) -> &'static str {
    match format {
        LoraFormat::Peft => PEFT_PREFIX,
        LoraFormat::Diffusers => DIFFUSERS_PREFIX,
    }
}

/// The weights file of an adapter folder (PEFT's when both layouts are there) or file.
fn weights_path(path: &Path) -> Result<PathBuf, LoraIoError> {
    if path.is_dir() {
        [PEFT_WEIGHTS, DIFFUSERS_WEIGHTS]
            .iter()
            .map(|f| path.join(f))
            .find(|p| p.is_file())
            .ok_or_else(|| LoraIoError::NotAnAdapter { path: path.to_path_buf() })
    } else if path.extension().is_some_and(|e| e == "safetensors") {
        Ok(path.to_path_buf())
    } else {
        Err(LoraIoError::NotAnAdapter { path: path.to_path_buf() })
    }
}

/// Where a key points: `(block, target, 0 for lora_A / 1 for lora_B)`, or why it is refused.
fn classify(name: &str, prefix: &str) -> Result<(usize, LoraTarget, usize), String> {
    let rest = name
        .strip_prefix(prefix)
        .ok_or_else(|| format!("expected every key to start with `{prefix}` (the file's layout)"))?;
    let (module, factor) = rest
        .strip_suffix(".lora_A.weight")
        .map(|m| (m, 0))
        .or_else(|| rest.strip_suffix(".lora_B.weight").map(|m| (m, 1)))
        .ok_or("not a `lora_A.weight` / `lora_B.weight` tensor (DoRA, biases and kohya alphas are not supported)")?;
    let (block, target) = parse_module_path(module)
        .ok_or_else(|| format!("`{module}` is not an adaptable layer `transformer_blocks.{{i}}.<target>`"))?;
    Ok((block, target, factor))
}

fn read_lora_file(path: &Path) -> Result<LoraFile, LoraIoError> {
    let weights = weights_path(path)?;
    let (file, tensors) = MappedFile::open(&weights)?;
    let format = if tensors.iter().any(|t| t.name.starts_with(PEFT_PREFIX)) { LoraFormat::Peft } else { LoraFormat::Diffusers };
    let prefix = prefix(format);
    let classified: Vec<_> = tensors.iter().map(|t| (t, classify(&t.name, prefix))).collect();
    if !classified.iter().any(|(_, c)| c.is_ok()) {
        let example = tensors.first().map_or_else(|| "(the file holds no tensor)".to_string(), |t| t.name.clone());
        return Err(LoraIoError::NoTargets { path: weights, example });
    }
    let mut pairs: BTreeMap<(usize, LoraTarget), (Option<&StoredTensor>, Option<&StoredTensor>)> = BTreeMap::new();
    for (tensor, class) in &classified {
        let (block, target, factor) =
            class.clone().map_err(|message| LoraIoError::Key { path: weights.clone(), key: tensor.name.clone(), message })?;
        let entry = pairs.entry((block, target)).or_default();
        if factor == 0 { entry.0 = Some(tensor) } else { entry.1 = Some(tensor) }
    }
    let mut layers = BTreeMap::new();
    for ((block, target), (a, b)) in pairs {
        let key = |f: &str| format!("{prefix}{}.{f}.weight", module_name(block, target));
        let missing = |f: &str| LoraIoError::Key { path: weights.clone(), key: key(f), message: "missing (its pair is present)".into() };
        let (a, b) = (a.ok_or_else(|| missing("lora_A"))?, b.ok_or_else(|| missing("lora_B"))?);
        for (tensor, f) in [(a, "lora_A"), (b, "lora_B")] {
            if !crate::model::weights::file::is_float_dtype(tensor.dtype) {
                return Err(LoraIoError::Key { path: weights.clone(), key: key(f), message: format!("dtype {:?} is not floating point", tensor.dtype) });
            }
            if tensor.shape.len() != 2 {
                return Err(LoraIoError::Key { path: weights.clone(), key: key(f), message: format!("shape {:?} is not a matrix", tensor.shape) });
            }
        }
        if a.shape[0] != b.shape[1] {
            return Err(LoraIoError::Key {
                path: weights.clone(),
                key: key("lora_B"),
                message: format!("shape {:?} does not match lora_A's rank {} ({:?})", b.shape, a.shape[0], a.shape),
            });
        }
        layers.insert((block, target), (a.clone(), b.clone()));
    }

    let config = match format {
        LoraFormat::Peft => {
            let config_path = weights.with_file_name(PEFT_CONFIG);
            let text = std::fs::read_to_string(&config_path)
                .map_err(|source| ModelError::Io { path: config_path.clone(), source })?;
            json_object(&config_path, &text, "")?
        }
        LoraFormat::Diffusers => match file.metadata().get(DIFFUSERS_METADATA) {
            Some(text) => strip_metadata_prefix(&weights, text)?,
            None => alpha_equals_rank(&layers),
        },
    };
    let config_path = match format {
        LoraFormat::Peft => weights.with_file_name(PEFT_CONFIG),
        LoraFormat::Diffusers => weights.clone(),
    };
    let scale = parse_config(&config_path, &config)?;
    Ok(LoraFile { weights, format, config, scale, layers })
}

/// The config diffusers assumes for a file without metadata: alpha = r in every layer.
fn alpha_equals_rank(layers: &BTreeMap<(usize, LoraTarget), (StoredTensor, StoredTensor)>) -> Map<String, Value> {
    let r = layers.values().next().map_or(1, |(a, _)| a.shape[0]);
    let (mut ranks, mut alphas) = (BTreeMap::new(), BTreeMap::new());
    for ((block, target), (a, _)) in layers {
        if a.shape[0] != r {
            ranks.insert(module_name(*block, *target), a.shape[0]);
            alphas.insert(module_name(*block, *target), a.shape[0] as f64);
        }
    }
    let targets: std::collections::BTreeSet<&str> = layers.keys().map(|(_, t)| t.key()).collect();
    peft_config(r, r as f64, &ranks, &alphas, &targets.into_iter().collect::<Vec<_>>())
}

fn json_object(path: &Path, text: &str, what: &str) -> Result<Map<String, Value>, LoraIoError> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(LoraIoError::Config { path: path.to_path_buf(), message: format!("{what}not a JSON object") }),
        Err(e) => Err(LoraIoError::Config { path: path.to_path_buf(), message: format!("{what}not JSON: {e}") }),
    }
}

/// diffusers stores the PEFT config of each component in one JSON object with prefixed keys
/// (`"transformer.r"`, `"transformer.lora_alpha"`, ...); returns the transformer's part.
fn strip_metadata_prefix(path: &Path, text: &str) -> Result<Map<String, Value>, LoraIoError> {
    let map = json_object(path, text, &format!("metadata `{DIFFUSERS_METADATA}`: "))?;
    Ok(map.into_iter().filter_map(|(k, v)| k.strip_prefix(DIFFUSERS_PREFIX).map(|k| (k.to_string(), v))).collect())
}

fn parse_config(path: &Path, config: &Map<String, Value>) -> Result<PeftConfig, LoraIoError> {
    let config: PeftConfig = serde_path_to_error::deserialize(Value::Object(config.clone()))
        .map_err(|e| LoraIoError::Config { path: path.to_path_buf(), message: e.to_string() })?;
    if config.use_dora {
        return Err(LoraIoError::Config { path: path.to_path_buf(), message: "`use_dora`: DoRA adapters are not supported".into() });
    }
    if config.r == 0 {
        return Err(LoraIoError::Config { path: path.to_path_buf(), message: "`r` must be positive".into() });
    }
    Ok(config)
}

/// Reads an adapter for `model` from a PEFT or diffusers folder, or a `.safetensors` file
/// (PEFT files take `adapter_config.json` from beside them). Every key must name an adaptable
/// layer of `model` with matching shapes; a file none of whose keys does is an error.
pub fn load_lora<B: Backend>(
    path: &Path,
    model: &Mmdit<B>,
    device: &B::Device,
) -> Result<LoraAdapter<B>, LoraIoError> {
    let file = read_lora_file(path)?;
    let weights = &file.weights;
    let prefix = prefix(file.format);
    let mut blocks: Vec<LoraBlock<B>> = (0..model.transformer_blocks.len())
        .map(|_| LoraBlock { layers: (0..LoraTarget::ALL.len()).map(|_| None).collect() })
        .collect();
    for ((block, target), (a, b)) in &file.layers {
        let module = module_name(*block, *target);
        let key = |f: &str| format!("{prefix}{module}.{f}.weight");
        let base = model
            .transformer_blocks
            .get(*block)
            .and_then(|blk| blk.linear(*target))
            .ok_or_else(|| LoraIoError::Key { path: weights.clone(), key: key("lora_A"), message: "the model has no such layer".into() })?;
        let [d_in, d_out] = base.weight.dims();
        let rank = a.shape[0];
        check_shape(weights, &key("lora_A"), &a.shape, &[rank, d_in])?;
        check_shape(weights, &key("lora_B"), &b.shape, &[d_out, rank])?;
        let scale = file.scale.scale(&module, rank);
        let down = transposed::<B>(a, device);
        let up = transposed::<B>(b, device);
        blocks[*block].layers[target.index()] = Some(LoraLayer::new(down, up, scale * rank as f64));
    }
    Ok(LoraAdapter { blocks })
}

/// Rewrites the adapter at `input` (a PEFT or diffusers folder or file, made by flow-opd or
/// elsewhere) into the folder `output` in each of `formats`, without a model: the tensors are
/// copied unchanged (same values, same dtype), the config moves between `adapter_config.json`
/// and diffusers' `lora_adapter_metadata`. A key that is not a LoRA factor of a transformer
/// block's layer is refused with its name. `output` may be the input's folder.
pub fn convert_lora(input: &Path, output: &Path, formats: &[LoraFormat]) -> Result<(), LoraIoError> {
    let file = read_lora_file(input)?;
    let dtypes: std::collections::BTreeSet<String> =
        file.layers.values().flat_map(|(a, b)| [format!("{:?}", a.dtype), format!("{:?}", b.dtype)]).collect();
    let dtype = match file.layers.values().next().map(|(a, _)| a.dtype) {
        Some(Dtype::F16) if dtypes.len() == 1 => SaveDtype::F16,
        Some(Dtype::BF16) if dtypes.len() == 1 => SaveDtype::BF16,
        _ => SaveDtype::F32,
    };
    let layers: Vec<(String, NamedTensor, NamedTensor)> = file
        .layers
        .iter()
        .map(|((block, target), (a, b))| {
            let stored = |t: &StoredTensor| NamedTensor { name: String::new(), shape: t.shape.clone(), values: t.to_f32() };
            (module_name(*block, *target), stored(a), stored(b))
        })
        .collect();
    let mut config = file.config.clone();
    for key in NOT_PEFT_KEYS {
        config.remove(key);
    }
    std::fs::create_dir_all(output).map_err(|source| ModelError::Io { path: output.to_path_buf(), source })?;
    write_layouts(output, formats, &layers, &config, dtype)
}

fn check_shape(path: &Path, key: &str, found: &[usize], expected: &[usize]) -> Result<(), LoraIoError> {
    if found != expected {
        return Err(LoraIoError::Model(ModelError::ShapeMismatch {
            path: path.to_path_buf(),
            key: key.to_string(),
            expected: expected.to_vec(),
            found: found.to_vec(),
        }));
    }
    Ok(())
}

/// A stored `[rows, cols]` PyTorch matrix as a Burn `[cols, rows]` tensor.
fn transposed<B: Backend>(tensor: &StoredTensor, device: &B::Device) -> Tensor<B, 2> {
    let [rows, cols] = [tensor.shape[0], tensor.shape[1]];
    Tensor::<B, 2>::from_data(TensorData::new(tensor.to_f32(), [rows, cols]), device).transpose()
}

/// Saves an adapter (both layouts, f32) to `dir` atomically: written into a temporary sibling
/// folder, then swapped in ([`crate::io::replace_dir_atomic`]). Every adapter flow-opd's
/// stages write goes through here.
pub fn save_adapter_atomic<B: Backend>(adapter: &LoraAdapter<B>, dir: &Path) -> Result<(), LoraIoError> {
    crate::io::replace_dir_atomic(dir, |tmp| save_adapter(adapter, tmp, SaveDtype::F32))
}

/// Writes `adapter` to the folder `dir` in both layouts: `adapter_model.safetensors` +
/// `adapter_config.json` for peft, `pytorch_lora_weights.safetensors` for diffusers' pipelines.
pub fn save_adapter<B: Backend>(adapter: &LoraAdapter<B>, dir: &Path, dtype: SaveDtype) -> Result<(), LoraIoError> {
    save_layouts(adapter, dir, &[LoraFormat::Peft, LoraFormat::Diffusers], dtype)
}

/// Writes `adapter` to the folder `dir` in `format` (created if needed; files are written
/// through temporary files and renamed). Both layouts store the same tensors and the same
/// config: `r` / `lora_alpha`, with `rank_pattern` / `alpha_pattern` for layers that differ
/// (PEFT in `adapter_config.json`, diffusers in `lora_adapter_metadata`).
pub fn save_lora<B: Backend>(
    adapter: &LoraAdapter<B>,
    dir: &Path,
    format: LoraFormat,
    dtype: SaveDtype,
) -> Result<(), LoraIoError> {
    save_layouts(adapter, dir, &[format], dtype)
}

fn save_layouts<B: Backend>(adapter: &LoraAdapter<B>, dir: &Path, formats: &[LoraFormat], dtype: SaveDtype) -> Result<(), LoraIoError> {
    std::fs::create_dir_all(dir).map_err(|source| ModelError::Io { path: dir.to_path_buf(), source })?;
    let all: Vec<_> = adapter.layers().collect();
    let Some((_, _, first)) = all.first() else {
        return Err(LoraIoError::Config { path: dir.to_path_buf(), message: "the adapter adapts no layer".into() });
    };
    let (r, alpha) = (first.rank(), first.alpha);
    let mut rank_pattern = BTreeMap::new();
    let mut alpha_pattern = BTreeMap::new();
    let mut layers = Vec::with_capacity(all.len());
    for (block, target, layer) in &all {
        let module = module_name(*block, *target);
        if layer.rank() != r {
            rank_pattern.insert(module.clone(), layer.rank());
        }
        if layer.alpha != alpha {
            alpha_pattern.insert(module.clone(), layer.alpha);
        }
        layers.push((module, torch_matrix(layer.down.val()), torch_matrix(layer.up.val())));
    }
    let targets: Vec<&str> = adapter.targets().iter().map(|t| t.key()).collect();
    let config = peft_config(r, alpha, &rank_pattern, &alpha_pattern, &targets);
    write_layouts(dir, formats, &layers, &config, dtype)
}

/// An `adapter_config.json` with only `LoraConfig` fields peft 0.21 knows (checked against the
/// one peft writes, `tests/fixtures/flow/lora_a/adapter_config.json`).
fn peft_config(
    r: usize,
    alpha: f64,
    rank_pattern: &BTreeMap<String, usize>,
    alpha_pattern: &BTreeMap<String, f64>,
    targets: &[&str],
) -> Map<String, Value> {
    let config = serde_json::json!({
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": targets,
        "init_lora_weights": "gaussian",
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": false,
        "use_dora": false,
        "modules_to_save": null,
        "task_type": null,
        "inference_mode": true,
        "base_model_name_or_path": null,
    });
    let Value::Object(map) = config else { unreachable!("a JSON object literal") };
    map
}

/// Writes the `(module, lora_A [r, in], lora_B [out, r])` factors (PyTorch layout) and their
/// PEFT `config` to `dir` in each of `formats`.
fn write_layouts(
    dir: &Path,
    formats: &[LoraFormat],
    layers: &[(String, NamedTensor, NamedTensor)],
    config: &Map<String, Value>,
    dtype: SaveDtype,
) -> Result<(), LoraIoError> {
    let sorted: BTreeMap<&String, &Value> = config.iter().collect();
    for &format in formats {
        let prefix = prefix(format);
        let mut tensors = Vec::with_capacity(2 * layers.len());
        for (module, a, b) in layers {
            tensors.push(NamedTensor { name: format!("{prefix}{module}.lora_A.weight"), ..a.clone() });
            tensors.push(NamedTensor { name: format!("{prefix}{module}.lora_B.weight"), ..b.clone() });
        }
        let mut metadata = HashMap::from([
            ("format".to_string(), "pt".to_string()),
            (CREATED_BY.to_string(), format!("flow-opd {}", env!("CARGO_PKG_VERSION"))),
        ]);
        let path = match format {
            LoraFormat::Peft => {
                let text = serde_json::to_string_pretty(&sorted).expect("json");
                write_text_atomic(&dir.join(PEFT_CONFIG), &text)?;
                dir.join(PEFT_WEIGHTS)
            }
            LoraFormat::Diffusers => {
                // What diffusers' `_save_lora_weights` writes: the config with `transformer.`
                // keys, `json.dumps(..., indent=2, sort_keys=True)`.
                let prefixed: BTreeMap<String, &Value> = sorted.iter().map(|(k, v)| (format!("{DIFFUSERS_PREFIX}{k}"), *v)).collect();
                metadata.insert(DIFFUSERS_METADATA.to_string(), serde_json::to_string_pretty(&prefixed).expect("json"));
                dir.join(DIFFUSERS_WEIGHTS)
            }
        };
        write_safetensors(&path, &tensors, dtype, Some(metadata))?;
        sort_metadata(&path)?;
    }
    Ok(())
}

/// Rewrites a safetensors header with its `__metadata__` entries sorted: the writer emits them
/// in hash-map order, so the same adapter would otherwise give different bytes from run to run.
fn sort_metadata(path: &Path) -> Result<(), LoraIoError> {
    let io = |source| ModelError::Io { path: path.to_path_buf(), source };
    let bytes = std::fs::read(path).map_err(io)?;
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n])
        .map_err(|e| ModelError::Safetensors { path: path.to_path_buf(), message: e.to_string() })?;
    let mut sorted = Map::new();
    if let Some(Value::Object(metadata)) = header.get("__metadata__") {
        let entries: BTreeMap<&String, &Value> = metadata.iter().collect();
        sorted.insert("__metadata__".into(), Value::Object(entries.into_iter().map(|(k, v)| (k.clone(), v.clone())).collect()));
    }
    for (k, v) in header.iter().filter(|(k, _)| k.as_str() != "__metadata__") {
        sorted.insert(k.clone(), v.clone());
    }
    let mut text = serde_json::to_string(&Value::Object(sorted)).expect("json").into_bytes();
    text.resize(text.len().div_ceil(8) * 8, b' ');
    let mut out = Vec::with_capacity(8 + text.len() + bytes.len() - 8 - n);
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + n..]);
    let tmp = crate::io::temporary_path(path);
    std::fs::write(&tmp, out).map_err(|source| ModelError::Io { path: tmp.clone(), source })?;
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(())
}

/// A Burn `[in, out]`-style matrix in PyTorch `[out, in]` order (transposed); named later.
fn torch_matrix<B: Backend>(burn: Tensor<B, 2>) -> NamedTensor {
    let torch = burn.transpose();
    let shape = torch.dims().to_vec();
    let values = torch.into_data().convert::<f32>().into_vec::<f32>().expect("f32 data");
    NamedTensor { name: String::new(), shape, values }
}
