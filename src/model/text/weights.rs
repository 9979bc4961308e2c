//! Reading a transformers model folder (`config.json` + `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`) into Burn parameters. Every tensor is looked up by its
//! transformers key and checked against the shape the config implies before it is converted,
//! so a wrong file gives an error naming the file, the key, and expected vs found.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::nn::{Embedding, LayerNorm, Linear};
use crate::Backend;
use burn::tensor::{Tensor, TensorData};
use serde::de::DeserializeOwned;

use crate::model::error::ModelError;
use crate::model::weights::file::{StoredTensor, WeightSource, is_float_dtype};
use crate::model::weights::read_weight_files;

/// transformers' file names inside a model folder.
pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Parses a transformers `config.json` (unknown fields ignored); errors name the file and field.
pub fn read_config<T: DeserializeOwned>(path: &Path) -> Result<T, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
    let de = &mut serde_json::Deserializer::from_str(&text);
    serde_path_to_error::deserialize(de).map_err(|e| ModelError::Config {
        path: path.to_path_buf(),
        message: format!("`{}`: {}", e.path(), e.inner()),
    })
}

/// The safetensors weights of one transformers model folder, memory-mapped, by key.
#[derive(Debug)]
pub struct WeightFolder {
    /// The single weight file, or the shard index: what error messages name.
    pub origin: PathBuf,
    tensors: BTreeMap<String, StoredTensor>,
}

impl WeightFolder {
    /// Opens `dir/model.safetensors`, or the shards `dir/model.safetensors.index.json` lists.
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        let files = read_weight_files(dir, WEIGHTS_FILE, INDEX_FILE)?;
        Ok(Self { origin: files.origin, tensors: files.tensors })
    }

    /// Whether the folder stores `key`.
    pub fn contains(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    /// The stored tensor `key`, checked to have `expected` shape (PyTorch layout) and a float dtype.
    fn checked(&self, key: &str, expected: &[usize]) -> Result<&StoredTensor, ModelError> {
        let stored = self.tensors.get(key).ok_or_else(|| ModelError::MissingKey {
            path: self.origin.clone(),
            key: key.to_string(),
            expected: expected.to_vec(),
        })?;
        if stored.shape != expected {
            return Err(ModelError::ShapeMismatch {
                path: stored.file.path.clone(),
                key: key.to_string(),
                expected: expected.to_vec(),
                found: stored.shape.clone(),
            });
        }
        if !is_float_dtype(stored.dtype) {
            return Err(ModelError::UnsupportedDtype {
                path: stored.file.path.clone(),
                key: key.to_string(),
                dtype: format!("{:?}", stored.dtype),
            });
        }
        Ok(stored)
    }

    /// The first of `keys` the folder stores (tied weights may be saved under either name).
    pub fn first_present<'a>(&self, keys: &[&'a str]) -> &'a str {
        keys.iter().copied().find(|k| self.contains(k)).unwrap_or(keys[0])
    }

    /// Tensor `key` of shape `expected` as f32 on `device`.
    pub fn tensor<B: Backend, const D: usize>(
        &self,
        key: &str,
        expected: [usize; D],
        device: &B::Device,
    ) -> Result<Tensor<B, D>, ModelError> {
        let stored = self.checked(key, &expected)?;
        Ok(Tensor::from_data(TensorData::new(stored.to_f32(), expected), device))
    }

    /// A torch `nn.Linear` stored as `{prefix}.weight` `[out, in]` (+ `{prefix}.bias` `[out]`)
    /// into `linear` (Burn keeps `[in, out]`); shapes come from `linear`'s own parameters.
    pub fn linear<B: Backend>(&self, prefix: &str, linear: Linear<B>) -> Result<Linear<B>, ModelError> {
        let device = linear.weight.lazy_device();
        let [d_in, d_out] = linear.weight.lazy_shape().dims();
        let key = format!("{prefix}.weight");
        let stored = self.checked(&key, &[d_out, d_in])?;
        let weight = Tensor::from_data(WeightSource::identity(stored.clone()).to_burn_data(true), &device);
        let bias = match linear.bias {
            Some(_) => Some(Param::from_tensor(self.tensor::<B, 1>(&format!("{prefix}.bias"), [d_out], &device)?)),
            None => None,
        };
        Ok(Linear { weight: Param::from_tensor(weight), bias })
    }

    /// A torch `nn.LayerNorm` (`{prefix}.weight`, `{prefix}.bias`, both `[d]`) into `norm`.
    pub fn layer_norm<B: Backend>(&self, prefix: &str, mut norm: LayerNorm<B>) -> Result<LayerNorm<B>, ModelError> {
        let device = norm.gamma.lazy_device();
        let [d] = norm.gamma.lazy_shape().dims();
        norm.gamma = Param::from_tensor(self.tensor(&format!("{prefix}.weight"), [d], &device)?);
        if norm.beta.is_some() {
            norm.beta = Some(Param::from_tensor(self.tensor(&format!("{prefix}.bias"), [d], &device)?));
        }
        Ok(norm)
    }

    /// A torch `nn.Embedding` (`key` `[n, d]`) into `embedding`.
    pub fn embedding<B: Backend>(&self, key: &str, mut embedding: Embedding<B>) -> Result<Embedding<B>, ModelError> {
        let device = embedding.weight.lazy_device();
        let shape: [usize; 2] = embedding.weight.lazy_shape().dims();
        embedding.weight = Param::from_tensor(self.tensor(key, shape, &device)?);
        Ok(embedding)
    }

    /// A 1-D parameter (`key` `[d]`) into `param`.
    pub fn vector<B: Backend>(&self, key: &str, param: Param<Tensor<B, 1>>) -> Result<Param<Tensor<B, 1>>, ModelError> {
        let device = param.lazy_device();
        let shape: [usize; 1] = param.lazy_shape().dims();
        Ok(Param::from_tensor(self.tensor(key, shape, &device)?))
    }
}
