//! Reading and writing MMDiT weights: diffusers folders (single or sharded safetensors),
//! Stability single files, f32 / f16 / bf16 storage. Loading goes through burn-store's
//! `ModuleSnapshot::apply` with lazily converted tensors, after every key and shape has been
//! checked against the model, so a bad file gives one error naming the file, the key and
//! expected vs found, and the model is never half-loaded.

pub mod file;
pub mod names;
pub mod stability;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use burn::module::{Module, ParamId};
use crate::Backend;
use burn_store::{ModuleSnapshot, TensorSnapshot};
use safetensors::Dtype;

pub use file::{MappedFile, StoredTensor, Transform, WeightSource};
pub use names::{ParamSpec, burn_path_to_diffusers_key, manifest};

use crate::model::error::ModelError;
use crate::model::mmdit::{Mmdit, MmditConfig};

/// diffusers' file names inside a transformer folder.
pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "diffusion_pytorch_model.safetensors";
pub const INDEX_FILE: &str = "diffusion_pytorch_model.safetensors.index.json";

/// How the weights were laid out on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// diffusers `SD3Transformer2DModel.save_pretrained` (one file or shards + index).
    Diffusers,
    /// Stability single file (`model.diffusion_model.` prefix, fused qkv).
    Stability,
}

/// A model on disk, opened and mapped but not yet loaded: its config and every weight under
/// its diffusers key.
#[derive(Debug)]
pub struct ModelSource {
    /// The folder or file the user named.
    pub origin: PathBuf,
    pub layout: Layout,
    pub config: MmditConfig,
    pub files: Vec<Arc<MappedFile>>,
    pub weights: BTreeMap<String, WeightSource>,
}

impl ModelSource {
    /// Opens a model: a diffusers transformer folder (`config.json` + weights), a pipeline
    /// folder with a `transformer/` subfolder, or a single `.safetensors` file (Stability or
    /// diffusers keys). `config` overrides the folder's `config.json`; a Stability file without
    /// one gets a config inferred from its shapes.
    pub fn open(path: &Path, config: Option<MmditConfig>) -> Result<Self, ModelError> {
        if path.is_dir() {
            let dir = if !path.join(CONFIG_FILE).exists() && path.join("transformer").is_dir() {
                path.join("transformer")
            } else {
                path.to_path_buf()
            };
            let config = match config {
                Some(config) => config,
                None => MmditConfig::from_file(&dir.join(CONFIG_FILE))?,
            };
            let (files, weights) = read_diffusers_weights(&dir)?;
            Ok(Self { origin: dir, layout: Layout::Diffusers, config, files, weights })
        } else if path.is_file() {
            let (file, tensors) = MappedFile::open(path)?;
            let names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
            if stability::is_stability_layout(&names) {
                let config = match config {
                    Some(config) => config,
                    None => stability::infer_config(path, &tensors)?,
                };
                let last_block = config.num_layers.saturating_sub(1);
                let weights = stability::to_diffusers(path, tensors, last_block)?;
                Ok(Self { origin: path.to_path_buf(), layout: Layout::Stability, config, files: vec![file], weights })
            } else {
                let config = match config {
                    Some(config) => config,
                    None => {
                        let sibling = path.with_file_name(CONFIG_FILE);
                        if !sibling.exists() {
                            return Err(ModelError::Config {
                                path: sibling,
                                message: "a diffusers-layout weight file needs its config.json beside it or an explicit config".into(),
                            });
                        }
                        MmditConfig::from_file(&sibling)?
                    }
                };
                let weights = tensors.into_iter().map(|t| (t.name.clone(), WeightSource::identity(t))).collect();
                Ok(Self { origin: path.to_path_buf(), layout: Layout::Diffusers, config, files: vec![file], weights })
            }
        } else {
            Err(ModelError::NotAModel { path: path.to_path_buf() })
        }
    }

    /// Number of stored values per dtype, e.g. `{"F32": 2469663936}`.
    pub fn dtype_counts(&self) -> BTreeMap<String, usize> {
        let mut seen = std::collections::BTreeSet::new();
        let mut counts = BTreeMap::new();
        for source in self.weights.values() {
            let stored = &source.stored;
            if seen.insert((stored.file.path.clone(), stored.name.clone())) {
                *counts.entry(format!("{:?}", stored.dtype)).or_default() += stored.numel();
            }
        }
        counts
    }

    /// The file a key was read from (for error messages).
    fn file_of(&self, key: &str) -> PathBuf {
        self.weights.get(key).map(|w| w.stored.file.path.clone()).unwrap_or_else(|| self.origin.clone())
    }

    /// Checks that the weights are exactly the model's parameters with the right shapes and
    /// float dtypes. Reports the first problem: a missing key, then an unexpected key, then a
    /// shape or dtype mismatch.
    pub fn check_against(&self, specs: &[ParamSpec]) -> Result<(), ModelError> {
        let expected: HashMap<&str, &ParamSpec> = specs.iter().map(|s| (s.key.as_str(), s)).collect();
        if let Some(spec) = specs.iter().find(|s| !self.weights.contains_key(&s.key)) {
            return Err(ModelError::MissingKey {
                path: self.origin.clone(),
                key: spec.key.clone(),
                expected: spec.torch_shape.clone(),
            });
        }
        if let Some((key, source)) = self.weights.iter().find(|(k, _)| !expected.contains_key(k.as_str())) {
            return Err(ModelError::UnexpectedKey {
                path: source.stored.file.path.clone(),
                key: display_key(source, key),
                found: source.shape(),
            });
        }
        for spec in specs {
            let source = &self.weights[&spec.key];
            if source.shape() != spec.torch_shape {
                return Err(ModelError::ShapeMismatch {
                    path: self.file_of(&spec.key),
                    key: display_key(source, &spec.key),
                    expected: spec.torch_shape.clone(),
                    found: source.shape(),
                });
            }
            if !file::is_float_dtype(source.stored.dtype) {
                return Err(ModelError::UnsupportedDtype {
                    path: self.file_of(&spec.key),
                    key: display_key(source, &spec.key),
                    dtype: format!("{:?}", source.stored.dtype),
                });
            }
        }
        Ok(())
    }

    /// Builds the model from the config and loads these weights into it.
    pub fn load<B: Backend>(&self, device: &B::Device) -> Result<Mmdit<B>, ModelError> {
        let model = self.config.init::<B>(device);
        self.load_into(model)
    }

    /// Loads these weights into `model` (whose parameters must match them exactly).
    pub fn load_into<B: Backend>(&self, mut model: Mmdit<B>) -> Result<Mmdit<B>, ModelError> {
        let specs = manifest::<B, _>(&model);
        self.check_against(&specs)?;
        apply_weights(&mut model, &specs, &self.weights, &self.origin)?;
        Ok(model)
    }
}

/// Loads `weights` into `model` along `specs` (already checked against the file: every key
/// present with the right shape), converting to f32 lazily per tensor and transposing linear
/// weights. Anything burn-store still refuses is an error naming `origin` and the key.
pub(crate) fn apply_weights<B: Backend, M: ModuleSnapshot<B>>(
    model: &mut M,
    specs: &[ParamSpec],
    weights: &BTreeMap<String, WeightSource>,
    origin: &Path,
) -> Result<(), ModelError> {
    let snapshots = specs
        .iter()
        .map(|spec| {
            let source = weights[&spec.key].clone();
            let transpose = spec.linear_weight;
            let shape = burn::tensor::Shape::from(source.burn_shape(transpose));
            TensorSnapshot::from_closure(
                Rc::new(move || Ok(source.to_burn_data(transpose))),
                burn::tensor::DType::F32,
                shape,
                spec.burn_path.split('.').map(str::to_string).collect(),
                vec![],
                ParamId::new(),
            )
        })
        .collect();
    let result = model.apply(snapshots, None, None, false);
    match result
        .errors
        .first()
        .map(|e| e.to_string())
        .or_else(|| result.missing.first().map(|m| m.0.clone()))
        .or_else(|| result.unused.first().cloned())
    {
        Some(key) => Err(ModelError::BadTensor {
            path: origin.to_path_buf(),
            key,
            message: "burn-store could not apply this weight".into(),
        }),
        None => Ok(()),
    }
}

/// The key as the user's file spells it (Stability names for Stability files).
fn display_key(source: &WeightSource, key: &str) -> String {
    if source.stored.name == key { key.to_string() } else { format!("{} (diffusers `{key}`)", source.stored.name) }
}

/// Reads a diffusers transformer folder's weights: the single file, or the shards its index
/// names.
fn read_diffusers_weights(
    dir: &Path,
) -> Result<(Vec<Arc<MappedFile>>, BTreeMap<String, WeightSource>), ModelError> {
    let folder = read_weight_files(dir, WEIGHTS_FILE, INDEX_FILE)?;
    let weights = folder.tensors.into_iter().map(|(key, t)| (key, WeightSource::identity(t))).collect();
    Ok((folder.files, weights))
}

/// The memory-mapped tensors of a model folder, by key.
pub struct WeightFiles {
    /// The single weight file, or the shard index: what error messages name.
    pub origin: PathBuf,
    pub files: Vec<Arc<MappedFile>>,
    pub tensors: BTreeMap<String, StoredTensor>,
}

/// Reads `dir/single` (one safetensors file), or else the shards `dir/index` (a
/// `*.safetensors.index.json` with a `weight_map`) lists: every listed key must be in its
/// shard, and no key may be in two shards. Used for diffusers and transformers folders alike.
pub fn read_weight_files(dir: &Path, single: &str, index: &str) -> Result<WeightFiles, ModelError> {
    let (single_path, index_path) = (dir.join(single), dir.join(index));
    if single_path.exists() {
        let (file, tensors) = MappedFile::open(&single_path)?;
        let tensors = tensors.into_iter().map(|t| (t.name.clone(), t)).collect();
        return Ok(WeightFiles { origin: single_path, files: vec![file], tensors });
    }
    if !index_path.exists() {
        return Err(ModelError::Io {
            path: single_path,
            source: std::io::Error::new(std::io::ErrorKind::NotFound, format!("no weights: neither this file nor {index} exists")),
        });
    }
    let bad = |message: String| ModelError::ShardIndex { path: index_path.clone(), message };
    let text = std::fs::read_to_string(&index_path).map_err(|source| ModelError::Io { path: index_path.clone(), source })?;
    let parsed: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let weight_map = parsed
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    let mut shard_keys: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (key, shard) in weight_map {
        let shard = shard.as_str().ok_or_else(|| bad(format!("`weight_map.{key}` is not a file name")))?;
        shard_keys.entry(shard.to_string()).or_default().push(key.clone());
    }
    let (mut files, mut weights) = (Vec::new(), BTreeMap::new());
    for (shard, keys) in shard_keys {
        let shard_path = dir.join(&shard);
        let (file, tensors) = MappedFile::open(&shard_path)?;
        let mut by_name: BTreeMap<String, StoredTensor> = tensors.into_iter().map(|t| (t.name.clone(), t)).collect();
        for key in keys {
            let stored = by_name.remove(&key).ok_or_else(|| ModelError::MissingKey {
                path: shard_path.clone(),
                key: key.clone(),
                expected: vec![],
            })?;
            weights.insert(key, stored);
        }
        // Tensors the index does not list are still part of the checkpoint (diffusers loads them).
        for (key, stored) in by_name {
            if weights.insert(key.clone(), stored).is_some() {
                return Err(bad(format!("`{key}` appears in more than one shard")));
            }
        }
        files.push(file);
    }
    Ok(WeightFiles { origin: index_path, files, tensors: weights })
}

/// Storage dtype for saved weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SaveDtype {
    #[default]
    F32,
    F16,
    BF16,
}

impl std::str::FromStr for SaveDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "float16" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::BF16),
            other => Err(format!("unknown dtype `{other}` (expected f32, f16 or bf16)")),
        }
    }
}

/// A named tensor to write: PyTorch-layout shape and f32 values.
#[derive(Debug, Clone)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

struct EncodedTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl safetensors::View for &EncodedTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn encode(tensor: &NamedTensor, dtype: SaveDtype) -> EncodedTensor {
    let (dtype, bytes) = match dtype {
        SaveDtype::F32 => (Dtype::F32, tensor.values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        SaveDtype::F16 => (Dtype::F16, tensor.values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect()),
        SaveDtype::BF16 => (Dtype::BF16, tensor.values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect()),
    };
    EncodedTensor { dtype, shape: tensor.shape.clone(), bytes }
}

/// Writes `tensors` to `path` as safetensors: to a temporary file beside it, then renamed, so
/// an existing file is never left half-written.
pub fn write_safetensors(
    path: &Path,
    tensors: &[NamedTensor],
    dtype: SaveDtype,
    metadata: Option<HashMap<String, String>>,
) -> Result<(), ModelError> {
    let encoded: Vec<(String, EncodedTensor)> = tensors.iter().map(|t| (t.name.clone(), encode(t, dtype))).collect();
    let tmp = crate::io::temporary_path(path);
    safetensors::tensor::serialize_to_file(encoded.iter().map(|(n, t)| (n.as_str(), t)), metadata, &tmp)
        .map_err(|e| ModelError::Safetensors { path: tmp.clone(), message: e.to_string() })?;
    std::fs::rename(&tmp, path).map_err(|source| ModelError::Io { path: path.to_path_buf(), source })
}

/// Every parameter of `module` under its diffusers key, in PyTorch layout, as f32.
pub fn module_tensors<B: Backend, M: Module<B> + ModuleSnapshot<B>>(module: &M) -> Vec<NamedTensor> {
    let specs: HashMap<String, ParamSpec> = manifest::<B, _>(module).into_iter().map(|s| (s.burn_path.clone(), s)).collect();
    module
        .collect(None, None, false)
        .into_iter()
        .map(|snapshot| {
            let burn_path = snapshot.full_path();
            let spec = &specs[&burn_path];
            let data = snapshot.to_data().expect("in-memory parameters always materialise");
            let values = data.convert::<f32>().into_vec::<f32>().expect("converted to f32");
            let values = if spec.linear_weight {
                let (out, inp) = (spec.torch_shape[0], spec.torch_shape[1]);
                let mut t = vec![0f32; values.len()];
                for i in 0..inp {
                    for o in 0..out {
                        t[o * inp + i] = values[i * out + o];
                    }
                }
                t
            } else {
                values
            };
            NamedTensor { name: spec.key.clone(), shape: spec.torch_shape.clone(), values }
        })
        .collect()
}

/// Saves the model as a diffusers transformer folder (`config.json` +
/// `diffusion_pytorch_model.safetensors`) that `SD3Transformer2DModel.from_pretrained` loads.
pub fn save_diffusers<B: Backend>(
    model: &Mmdit<B>,
    config: &MmditConfig,
    dir: &Path,
    dtype: SaveDtype,
) -> Result<(), ModelError> {
    std::fs::create_dir_all(dir).map_err(|source| ModelError::Io { path: dir.to_path_buf(), source })?;
    let tensors = module_tensors::<B, _>(model);
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(&dir.join(WEIGHTS_FILE), &tensors, dtype, Some(metadata))?;
    let json = serde_json::to_string_pretty(&config.to_diffusers_json()).expect("config serialises");
    crate::io::write_text_atomic(&dir.join(CONFIG_FILE), &json).map_err(ModelError::from)
}

/// Opens and loads a model in one call (see [`ModelSource::open`]).
pub fn load_mmdit<B: Backend>(
    path: &Path,
    config: Option<MmditConfig>,
    device: &B::Device,
) -> Result<(MmditConfig, Mmdit<B>), ModelError> {
    let source = ModelSource::open(path, config)?;
    let model = source.load::<B>(device)?;
    Ok((source.config, model))
}
