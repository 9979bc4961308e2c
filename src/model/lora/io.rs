//! LoRA files: PEFT's `save_pretrained` layout (`adapter_model.safetensors` +
//! `adapter_config.json`, keys `base_model.model.transformer_blocks.{i}.attn.to_q.lora_A.weight`)
//! and diffusers' `save_lora_weights` layout (`pytorch_lora_weights.safetensors`, keys
//! `transformer.transformer_blocks.{i}.attn.to_q.lora_A.weight`). `lora_A` is `[r, in]`,
//! `lora_B` is `[out, r]` (docs/reference.md section 8).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::Backend;
use burn::tensor::{Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::adapter::{LoraAdapter, LoraBlock, LoraLayer};
use super::target::{LoraTarget, parse_module_path};
use crate::model::ModelError;
use crate::model::mmdit::Mmdit;
use crate::io::write_text_atomic;
use crate::model::weights::{MappedFile, NamedTensor, SaveDtype, StoredTensor, write_safetensors};

pub const PEFT_WEIGHTS: &str = "adapter_model.safetensors";
pub const PEFT_CONFIG: &str = "adapter_config.json";
pub const DIFFUSERS_WEIGHTS: &str = "pytorch_lora_weights.safetensors";
const PEFT_PREFIX: &str = "base_model.model.";
const DIFFUSERS_PREFIX: &str = "transformer.";
/// Safetensors metadata entry where diffusers keeps the LoRA config of a `transformer.` file.
const DIFFUSERS_METADATA: &str = "lora_adapter_metadata";

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
}

/// The fields of PEFT's `adapter_config.json` that decide the update's scale (others are
/// kept when reading and written with PEFT's defaults).
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

/// Reads an adapter for `model` from a PEFT or diffusers folder, or a `.safetensors` file
/// (PEFT files take `adapter_config.json` from beside them). Every key must name an adaptable
/// layer of `model` with matching shapes.
pub fn load_lora<B: Backend>(
    path: &Path,
    model: &Mmdit<B>,
    device: &B::Device,
) -> Result<LoraAdapter<B>, LoraIoError> {
    let weights = if path.is_dir() {
        [PEFT_WEIGHTS, DIFFUSERS_WEIGHTS]
            .iter()
            .map(|f| path.join(f))
            .find(|p| p.is_file())
            .ok_or_else(|| LoraIoError::NotAnAdapter { path: path.to_path_buf() })?
    } else if path.extension().is_some_and(|e| e == "safetensors") {
        path.to_path_buf()
    } else {
        return Err(LoraIoError::NotAnAdapter { path: path.to_path_buf() });
    };
    let (file, tensors) = MappedFile::open(&weights)?;
    let peft = tensors.iter().any(|t| t.name.starts_with(PEFT_PREFIX));
    let (prefix, config) = if peft {
        let config_path = weights.with_file_name(PEFT_CONFIG);
        let text = std::fs::read_to_string(&config_path)
            .map_err(|source| ModelError::Io { path: config_path.clone(), source })?;
        (PEFT_PREFIX, Some(parse_config(&config_path, &text)?))
    } else {
        let config = match file.metadata().get(DIFFUSERS_METADATA) {
            Some(text) => Some(parse_config(&weights, &strip_metadata_prefix(&weights, text)?)?),
            None => None,
        };
        (DIFFUSERS_PREFIX, config)
    };

    let mut pairs: BTreeMap<(usize, LoraTarget), (Option<&StoredTensor>, Option<&StoredTensor>)> = BTreeMap::new();
    for tensor in &tensors {
        let key_error = |message: String| LoraIoError::Key { path: weights.clone(), key: tensor.name.clone(), message };
        let rest = tensor.name.strip_prefix(prefix).ok_or_else(|| {
            key_error(format!("expected every key to start with `{prefix}` (the file's layout)"))
        })?;
        let (module, factor) = rest
            .strip_suffix(".lora_A.weight")
            .map(|m| (m, 0))
            .or_else(|| rest.strip_suffix(".lora_B.weight").map(|m| (m, 1)))
            .ok_or_else(|| key_error("not a `lora_A.weight` / `lora_B.weight` tensor (DoRA, biases and kohya alphas are not supported)".into()))?;
        let (block, target) = parse_module_path(module)
            .ok_or_else(|| key_error(format!("`{module}` is not an adaptable layer `transformer_blocks.{{i}}.<target>`")))?;
        let entry = pairs.entry((block, target)).or_default();
        if factor == 0 { entry.0 = Some(tensor) } else { entry.1 = Some(tensor) }
    }

    let mut blocks: Vec<LoraBlock<B>> = (0..model.transformer_blocks.len())
        .map(|_| LoraBlock { layers: (0..LoraTarget::ALL.len()).map(|_| None).collect() })
        .collect();
    for ((block, target), (a, b)) in pairs {
        let module = format!("transformer_blocks.{block}.{target}");
        let key = |f: &str| format!("{prefix}{module}.{f}.weight");
        let missing = |f: &str| LoraIoError::Key { path: weights.clone(), key: key(f), message: "missing (its pair is present)".into() };
        let (a, b) = (a.ok_or_else(|| missing("lora_A"))?, b.ok_or_else(|| missing("lora_B"))?);
        let base = model
            .transformer_blocks
            .get(block)
            .and_then(|blk| blk.linear(target))
            .ok_or_else(|| LoraIoError::Key { path: weights.clone(), key: key("lora_A"), message: "the model has no such layer".into() })?;
        let [d_in, d_out] = base.weight.dims();
        let rank = a.shape.first().copied().unwrap_or(0);
        check_shape(&weights, &key("lora_A"), &a.shape, &[rank, d_in])?;
        check_shape(&weights, &key("lora_B"), &b.shape, &[d_out, rank])?;
        for (tensor, f) in [(a, "lora_A"), (b, "lora_B")] {
            if !crate::model::weights::file::is_float_dtype(tensor.dtype) {
                return Err(LoraIoError::Key { path: weights.clone(), key: key(f), message: format!("dtype {:?} is not floating point", tensor.dtype) });
            }
        }
        // Without a stored config diffusers uses alpha = r (scale 1).
        let scale = config.as_ref().map_or(1.0, |c| c.scale(&module, rank));
        let down = transposed::<B>(a, device);
        let up = transposed::<B>(b, device);
        blocks[block].layers[target.index()] = Some(LoraLayer::new(down, up, scale * rank as f64));
    }
    Ok(LoraAdapter { blocks })
}

/// diffusers stores the PEFT config of each component in one JSON object with prefixed keys
/// (`"transformer.r"`, `"transformer.lora_alpha"`, ...); returns the transformer's part.
fn strip_metadata_prefix(path: &Path, text: &str) -> Result<String, LoraIoError> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| LoraIoError::Config {
        path: path.to_path_buf(),
        message: format!("metadata `{DIFFUSERS_METADATA}` is not JSON: {e}"),
    })?;
    let serde_json::Value::Object(map) = value else {
        return Err(LoraIoError::Config { path: path.to_path_buf(), message: format!("metadata `{DIFFUSERS_METADATA}` is not a JSON object") });
    };
    let stripped: serde_json::Map<String, serde_json::Value> = map
        .into_iter()
        .filter_map(|(k, v)| k.strip_prefix(DIFFUSERS_PREFIX).map(|k| (k.to_string(), v)))
        .collect();
    Ok(serde_json::Value::Object(stripped).to_string())
}

fn parse_config(path: &Path, text: &str) -> Result<PeftConfig, LoraIoError> {
    let mut de = serde_json::Deserializer::from_str(text);
    let config: PeftConfig = serde_path_to_error::deserialize(&mut de)
        .map_err(|e| LoraIoError::Config { path: path.to_path_buf(), message: e.to_string() })?;
    if config.use_dora {
        return Err(LoraIoError::Config { path: path.to_path_buf(), message: "`use_dora`: DoRA adapters are not supported".into() });
    }
    if config.r == 0 {
        return Err(LoraIoError::Config { path: path.to_path_buf(), message: "`r` must be positive".into() });
    }
    Ok(config)
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

/// Writes `adapter` to the folder `dir` in `format` (created if needed; files are written
/// through temporary files and renamed). PEFT folders record `r` / `lora_alpha` (with
/// `rank_pattern` / `alpha_pattern` for layers that differ); the diffusers file has the scale
/// folded into `lora_B` (alpha = r), so any loader reproduces the same update.
/// Saves an adapter (PEFT layout, f32) to `dir` atomically: written into a temporary sibling
/// folder, then swapped in ([`crate::io::replace_dir_atomic`]).
pub fn save_adapter_atomic<B: Backend>(adapter: &LoraAdapter<B>, dir: &Path) -> Result<(), LoraIoError> {
    crate::io::replace_dir_atomic(dir, |tmp| save_lora(adapter, tmp, LoraFormat::Peft, SaveDtype::F32))
}

pub fn save_lora<B: Backend>(
    adapter: &LoraAdapter<B>,
    dir: &Path,
    format: LoraFormat,
    dtype: SaveDtype,
) -> Result<(), LoraIoError> {
    std::fs::create_dir_all(dir).map_err(|source| ModelError::Io { path: dir.to_path_buf(), source })?;
    let layers: Vec<_> = adapter.layers().collect();
    let Some((_, _, first)) = layers.first() else {
        return Err(LoraIoError::Config { path: dir.to_path_buf(), message: "the adapter adapts no layer".into() });
    };
    let (r, alpha) = (first.rank(), first.alpha);
    let mut tensors = Vec::with_capacity(2 * layers.len());
    let mut rank_pattern = BTreeMap::new();
    let mut alpha_pattern = BTreeMap::new();
    for (block, target, layer) in &layers {
        let module = format!("transformer_blocks.{block}.{target}");
        let (prefix, up_scale) = match format {
            LoraFormat::Peft => (PEFT_PREFIX, 1.0),
            LoraFormat::Diffusers => (DIFFUSERS_PREFIX, layer.scale()),
        };
        if layer.rank() != r {
            rank_pattern.insert(module.clone(), layer.rank());
        }
        if layer.alpha != alpha {
            alpha_pattern.insert(module.clone(), layer.alpha);
        }
        tensors.push(torch_matrix(format!("{prefix}{module}.lora_A.weight"), layer.down.val()));
        tensors.push(torch_matrix(format!("{prefix}{module}.lora_B.weight"), layer.up.val() * up_scale));
    }
    let targets: Vec<&str> = adapter.targets().iter().map(|t| t.key()).collect();
    match format {
        LoraFormat::Peft => {
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
                "library": "flow-opd",
            });
            let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
            write_safetensors(&dir.join(PEFT_WEIGHTS), &tensors, dtype, Some(metadata))?;
            write_text_atomic(&dir.join(PEFT_CONFIG), &serde_json::to_string_pretty(&config).expect("json"))?;
        }
        LoraFormat::Diffusers => {
            let ranks: BTreeMap<String, usize> = layers
                .iter()
                .filter(|(_, _, l)| l.rank() != r)
                .map(|(b, t, l)| (format!("transformer_blocks.{b}.{t}"), l.rank()))
                .collect();
            let alphas: BTreeMap<String, f64> = layers
                .iter()
                .filter(|(_, _, l)| l.rank() != r)
                .map(|(b, t, l)| (format!("transformer_blocks.{b}.{t}"), l.rank() as f64))
                .collect();
            // The scale is folded into lora_B, so alpha = r everywhere.
            let config = serde_json::json!({
                "transformer.peft_type": "LORA",
                "transformer.r": r,
                "transformer.lora_alpha": r,
                "transformer.rank_pattern": ranks,
                "transformer.alpha_pattern": alphas,
                "transformer.target_modules": targets,
                "transformer.init_lora_weights": "gaussian",
                "transformer.lora_dropout": 0.0,
                "transformer.bias": "none",
                "transformer.use_dora": false,
                "transformer.use_rslora": false,
            });
            let metadata = HashMap::from([
                ("format".to_string(), "pt".to_string()),
                (DIFFUSERS_METADATA.to_string(), config.to_string()),
            ]);
            write_safetensors(&dir.join(DIFFUSERS_WEIGHTS), &tensors, dtype, Some(metadata))?;
        }
    }
    Ok(())
}

/// A Burn `[in, out]`-style matrix written in PyTorch `[out, in]` order (transposed).
fn torch_matrix<B: Backend>(name: String, burn: Tensor<B, 2>) -> NamedTensor {
    let torch = burn.transpose();
    let shape = torch.dims().to_vec();
    let values = torch.into_data().convert::<f32>().into_vec::<f32>().expect("f32 data");
    NamedTensor { name, shape, values }
}
