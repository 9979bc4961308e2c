//! Reading the VAE from a diffusers folder: `vae/config.json` + `vae/diffusion_pytorch_model.safetensors`
//! (f32, f16 or bf16), with diffusers' key names.
//!
//! Burn paths map to diffusers keys segment by segment: GroupNorm `gamma` / `beta` ->
//! `weight` / `bias`, `to_out` -> `to_out.0`; everything else is spelled the same
//! (`encoder.down_blocks.0.resnets.1.conv2.weight`, ...). Older diffusers files name the
//! mid-block attention `query` / `key` / `value` / `proj_attn` (sometimes as 1x1 conv weights
//! `[C, C, 1, 1]`); those are accepted and read as `to_q` / `to_k` / `to_v` / `to_out.0`.
//!
//! Every key, shape and dtype is checked against the model before anything is loaded, so a
//! bad file is one [`ModelError`] naming the file and the key, and the model is never
//! half-loaded.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::Backend;

use crate::model::error::ModelError;
use crate::model::weights::file::is_float_dtype;
use crate::model::weights::{CONFIG_FILE, MappedFile, ParamSpec, WEIGHTS_FILE, WeightSource, apply_weights, manifest};

use super::{AutoencoderKl, VaeConfig};

/// The diffusers key of a VAE parameter's Burn path.
pub fn vae_key(burn_path: &str) -> String {
    burn_path
        .split('.')
        .map(|segment| match segment {
            "gamma" => "weight",
            "beta" => "bias",
            "to_out" => "to_out.0",
            other => other,
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// Every parameter of the VAE with its diffusers key and PyTorch shape.
pub fn vae_manifest<B: Backend>(model: &AutoencoderKl<B>) -> Vec<ParamSpec> {
    manifest::<B, _>(model)
        .into_iter()
        .map(|spec| ParamSpec { key: vae_key(&spec.burn_path), ..spec })
        .collect()
}

/// The current diffusers name of a legacy attention key (`...attentions.0.query.weight` ->
/// `...attentions.0.to_q.weight`), or `None` if the key is not a legacy one.
fn modern_attention_key(key: &str) -> Option<String> {
    const RENAMES: [(&str, &str); 4] =
        [(".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."), (".proj_attn.", ".to_out.0.")];
    if !key.contains(".attentions.") {
        return None;
    }
    RENAMES.iter().find(|(old, _)| key.contains(old)).map(|(old, new)| key.replacen(old, new, 1))
}

/// A VAE on disk, opened and mapped but not yet loaded.
#[derive(Debug)]
pub struct VaeSource {
    /// The weights file.
    pub weights_path: PathBuf,
    pub config: VaeConfig,
    /// Every weight under its (modern) diffusers key.
    pub weights: BTreeMap<String, WeightSource>,
}

impl VaeSource {
    /// Opens a VAE: a diffusers `vae/` folder (`config.json` + weights), a pipeline folder
    /// with a `vae/` subfolder, or a `.safetensors` file with its `config.json` beside it.
    /// `config` overrides the folder's `config.json`.
    pub fn open(path: &Path, config: Option<VaeConfig>) -> Result<Self, ModelError> {
        let (dir, weights_path) = if path.is_dir() {
            let dir = if !path.join(CONFIG_FILE).exists() && path.join("vae").is_dir() {
                path.join("vae")
            } else {
                path.to_path_buf()
            };
            let weights_path = dir.join(WEIGHTS_FILE);
            (dir, weights_path)
        } else if path.is_file() {
            (path.parent().map(Path::to_path_buf).unwrap_or_default(), path.to_path_buf())
        } else {
            return Err(ModelError::NotAModel { path: path.to_path_buf() });
        };
        let config = match config {
            Some(config) => {
                config.validate().map_err(|message| ModelError::Config { path: dir.join(CONFIG_FILE), message })?;
                config
            }
            None => VaeConfig::from_file(&dir.join(CONFIG_FILE))?,
        };
        let (_, tensors) = MappedFile::open(&weights_path)?;
        let mut weights = BTreeMap::new();
        for mut stored in tensors {
            let key = modern_attention_key(&stored.name).unwrap_or_else(|| stored.name.clone());
            // Legacy attention projections stored as 1x1 convs: the same bytes as `[C, C]`.
            if key != stored.name && stored.shape.len() == 4 && stored.shape[2..] == [1, 1] {
                stored.shape.truncate(2);
            }
            if let Some(previous) = weights.insert(key.clone(), WeightSource::identity(stored)) {
                return Err(ModelError::BadTensor {
                    path: weights_path.clone(),
                    key: previous.stored.name,
                    message: format!("the file holds `{key}` twice (under its current and its legacy name)"),
                });
            }
        }
        Ok(Self { weights_path, config, weights })
    }

    /// The key as the file spells it, with the modern key when it differs.
    fn display_key(&self, key: &str) -> String {
        match self.weights.get(key) {
            Some(source) if source.stored.name != key => format!("{} (diffusers `{key}`)", source.stored.name),
            _ => key.to_string(),
        }
    }

    /// Checks that the file holds exactly the model's parameters with the right shapes and
    /// float dtypes; reports the first missing key, then unexpected key, then shape or dtype
    /// mismatch.
    pub fn check_against(&self, specs: &[ParamSpec]) -> Result<(), ModelError> {
        let path = || self.weights_path.clone();
        if let Some(spec) = specs.iter().find(|s| !self.weights.contains_key(&s.key)) {
            return Err(ModelError::MissingKey { path: path(), key: spec.key.clone(), expected: spec.torch_shape.clone() });
        }
        let expected: HashMap<&str, &ParamSpec> = specs.iter().map(|s| (s.key.as_str(), s)).collect();
        if let Some((key, source)) = self.weights.iter().find(|(k, _)| !expected.contains_key(k.as_str())) {
            return Err(ModelError::UnexpectedKey { path: path(), key: self.display_key(key), found: source.shape() });
        }
        for spec in specs {
            let source = &self.weights[&spec.key];
            if source.shape() != spec.torch_shape {
                return Err(ModelError::ShapeMismatch {
                    path: path(),
                    key: self.display_key(&spec.key),
                    expected: spec.torch_shape.clone(),
                    found: source.shape(),
                });
            }
            if !is_float_dtype(source.stored.dtype) {
                return Err(ModelError::UnsupportedDtype {
                    path: path(),
                    key: self.display_key(&spec.key),
                    dtype: format!("{:?}", source.stored.dtype),
                });
            }
        }
        Ok(())
    }

    /// Builds the model from the config and loads the weights (converted to f32 on the way).
    pub fn load<B: Backend>(&self, device: &B::Device) -> Result<AutoencoderKl<B>, ModelError> {
        let mut model = self.config.init::<B>(device);
        let specs = vae_manifest(&model);
        self.check_against(&specs)?;
        apply_weights(&mut model, &specs, &self.weights, &self.weights_path)?;
        Ok(model)
    }
}

/// Opens and loads a VAE in one call (see [`VaeSource::open`]).
pub fn load_vae<B: Backend>(path: &Path, device: &B::Device) -> Result<(VaeConfig, AutoencoderKl<B>), ModelError> {
    let source = VaeSource::open(path, None)?;
    let model = source.load::<B>(device)?;
    Ok((source.config, model))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_diffusers() {
        assert_eq!(vae_key("encoder.mid_block.attentions.0.group_norm.beta"), "encoder.mid_block.attentions.0.group_norm.bias");
        assert_eq!(vae_key("decoder.mid_block.attentions.0.to_out.weight"), "decoder.mid_block.attentions.0.to_out.0.weight");
        assert_eq!(vae_key("decoder.up_blocks.2.resnets.0.norm1.gamma"), "decoder.up_blocks.2.resnets.0.norm1.weight");
        assert_eq!(
            modern_attention_key("encoder.mid_block.attentions.0.proj_attn.bias").as_deref(),
            Some("encoder.mid_block.attentions.0.to_out.0.bias")
        );
        assert_eq!(modern_attention_key("encoder.mid_block.resnets.0.conv1.weight"), None);
    }
}
