//! Configuration of the SD3-family MMDiT, read from and written to diffusers' `config.json`.
//!
//! Field names and defaults are those of diffusers' `SD3Transformer2DModel.__init__`
//! (diffusers 0.42), so a `transformer/config.json` from any SD3 / SD3.5 checkpoint parses as is.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::model::error::ModelError;

/// Normalisation applied per head to the attention queries and keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QkNorm {
    /// RMSNorm with a learned `[head_dim]` scale, eps 1e-6 (SD3.5).
    RmsNorm,
}

/// Hyper-parameters of an SD3-family MMDiT (diffusers `SD3Transformer2DModel`).
///
/// Presets: [`MmditConfig::sd3_medium`], [`MmditConfig::sd35_medium`], [`MmditConfig::tiny`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmditConfig {
    /// Nominal latent size (used only for the position-table initialisation).
    #[serde(default = "defaults::sample_size")]
    pub sample_size: usize,
    /// Side of the square patches (2 for every SD3 model).
    #[serde(default = "defaults::patch_size")]
    pub patch_size: usize,
    /// Latent channels in.
    #[serde(default = "defaults::channels")]
    pub in_channels: usize,
    /// Number of joint transformer blocks.
    #[serde(default = "defaults::num_layers")]
    pub num_layers: usize,
    /// Width of one attention head.
    #[serde(default = "defaults::attention_head_dim")]
    pub attention_head_dim: usize,
    /// Number of attention heads; `heads * head_dim` is the model width.
    #[serde(default = "defaults::num_attention_heads")]
    pub num_attention_heads: usize,
    /// Feature size of the text-encoder token sequence.
    #[serde(default = "defaults::joint_attention_dim")]
    pub joint_attention_dim: usize,
    /// Width the text tokens are projected to; must equal the model width.
    #[serde(default = "defaults::caption_projection_dim")]
    pub caption_projection_dim: usize,
    /// Size of the pooled text vector.
    #[serde(default = "defaults::pooled_projection_dim")]
    pub pooled_projection_dim: usize,
    /// Latent channels out.
    #[serde(default = "defaults::channels")]
    pub out_channels: usize,
    /// Side (in patches) of the stored position table, cropped at the centre for smaller latents.
    #[serde(default = "defaults::pos_embed_max_size")]
    pub pos_embed_max_size: Option<usize>,
    /// Blocks that add the image-only self-attention `attn2` (SD3.5: 0..=12).
    #[serde(default)]
    pub dual_attention_layers: Vec<usize>,
    /// Per-head normalisation of queries and keys (SD3.5: `rms_norm`).
    #[serde(default)]
    pub qk_norm: Option<QkNorm>,
}

mod defaults {
    pub fn sample_size() -> usize {
        128
    }
    pub fn patch_size() -> usize {
        2
    }
    pub fn channels() -> usize {
        16
    }
    pub fn num_layers() -> usize {
        18
    }
    pub fn attention_head_dim() -> usize {
        64
    }
    pub fn num_attention_heads() -> usize {
        18
    }
    pub fn joint_attention_dim() -> usize {
        4096
    }
    pub fn caption_projection_dim() -> usize {
        1152
    }
    pub fn pooled_projection_dim() -> usize {
        2048
    }
    pub fn pos_embed_max_size() -> Option<usize> {
        Some(96)
    }
}

impl MmditConfig {
    /// Stable Diffusion 3 Medium (2B): no qk-norm, no dual attention, 192 x 192 position table.
    pub fn sd3_medium() -> Self {
        Self {
            sample_size: 128,
            patch_size: 2,
            in_channels: 16,
            num_layers: 24,
            attention_head_dim: 64,
            num_attention_heads: 24,
            joint_attention_dim: 4096,
            caption_projection_dim: 1536,
            pooled_projection_dim: 2048,
            out_channels: 16,
            pos_embed_max_size: Some(192),
            dual_attention_layers: vec![],
            qk_norm: None,
        }
    }

    /// Stable Diffusion 3.5 Medium: qk RMSNorm, dual attention in blocks 0-12, 384 x 384 table.
    pub fn sd35_medium() -> Self {
        Self {
            pos_embed_max_size: Some(384),
            dual_attention_layers: (0..=12).collect(),
            qk_norm: Some(QkNorm::RmsNorm),
            ..Self::sd3_medium()
        }
    }

    /// A small SD3.5-style model (dual attention, qk-norm, context-pre-only last block) for
    /// tests and the synthetic world: 12 latent channels, width 64, 4 blocks.
    pub fn tiny() -> Self {
        Self {
            sample_size: 16,
            patch_size: 2,
            in_channels: 12,
            num_layers: 4,
            attention_head_dim: 16,
            num_attention_heads: 4,
            joint_attention_dim: 64,
            caption_projection_dim: 64,
            pooled_projection_dim: 64,
            out_channels: 12,
            pos_embed_max_size: Some(16),
            dual_attention_layers: vec![0, 1],
            qk_norm: Some(QkNorm::RmsNorm),
        }
    }

    /// A preset by name: `sd3_medium`, `sd35_medium` or `tiny`.
    pub fn preset(name: &str) -> Result<Self, ModelError> {
        match name {
            "sd3_medium" => Ok(Self::sd3_medium()),
            "sd35_medium" => Ok(Self::sd35_medium()),
            "tiny" => Ok(Self::tiny()),
            other => Err(ModelError::UnknownPreset(other.to_string())),
        }
    }

    /// Model width `heads * head_dim`.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Side of the position table in patches.
    pub fn pos_table_side(&self) -> usize {
        self.pos_embed_max_size.unwrap_or(0)
    }

    /// Whether block `index` carries the dual (image-only) attention.
    pub fn is_dual_attention_layer(&self, index: usize) -> bool {
        self.dual_attention_layers.contains(&index)
    }

    /// Parses a diffusers `config.json`. Keys starting with `_` (`_class_name`,
    /// `_diffusers_version`, ...) are metadata and ignored; any other unknown key is an error
    /// that names it.
    pub fn from_json_str(text: &str, origin: &Path) -> Result<Self, ModelError> {
        let err = |message: String| ModelError::Config { path: origin.to_path_buf(), message };
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| err(format!("not valid JSON: {e}")))?;
        let serde_json::Value::Object(mut map) = value else {
            return Err(err("expected a JSON object at the top level".into()));
        };
        map.retain(|key, _| !key.starts_with('_'));
        let config: Self = serde_path_to_error::deserialize(serde_json::Value::Object(map))
            .map_err(|e| {
                let path = e.path().to_string();
                if path == "." {
                    err(e.inner().to_string())
                } else {
                    err(format!("field `{path}`: {}", e.inner()))
                }
            })?;
        config.validate().map_err(err)?;
        Ok(config)
    }

    /// Reads and validates a diffusers `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
        Self::from_json_str(&text, path)
    }

    /// The `config.json` diffusers writes for this model.
    pub fn to_diffusers_json(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).expect("config serialises");
        let map = value.as_object_mut().expect("config is an object");
        map.insert("_class_name".into(), "SD3Transformer2DModel".into());
        map.insert("_diffusers_version".into(), "0.42.0".into());
        value
    }

    /// Checks the relations diffusers assumes between fields; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("patch_size", self.patch_size),
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("num_layers", self.num_layers),
            ("attention_head_dim", self.attention_head_dim),
            ("num_attention_heads", self.num_attention_heads),
            ("joint_attention_dim", self.joint_attention_dim),
            ("pooled_projection_dim", self.pooled_projection_dim),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("field `{name}` must be positive, found 0"));
        }
        if self.caption_projection_dim != self.inner_dim() {
            return Err(format!(
                "field `caption_projection_dim` is {} but num_attention_heads * attention_head_dim = {} * {} = {}; SD3 blocks need them equal",
                self.caption_projection_dim,
                self.num_attention_heads,
                self.attention_head_dim,
                self.inner_dim()
            ));
        }
        match self.pos_embed_max_size {
            None => {
                return Err("field `pos_embed_max_size` is null; SD3-family checkpoints store a position table and flow-opd needs its size".into());
            }
            Some(0) => return Err("field `pos_embed_max_size` must be positive, found 0".into()),
            Some(_) => {}
        }
        if let Some(&bad) = self.dual_attention_layers.iter().find(|&&i| i >= self.num_layers) {
            return Err(format!(
                "field `dual_attention_layers` names block {bad} but num_layers is {}",
                self.num_layers
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid() {
        for name in ["sd3_medium", "sd35_medium", "tiny"] {
            MmditConfig::preset(name).unwrap().validate().unwrap();
        }
    }

    #[test]
    fn unknown_field_is_named() {
        let err = MmditConfig::from_json_str(r#"{"num_layers": 2, "num_layerz": 3}"#, Path::new("c.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("num_layerz"), "{err}");
        assert!(err.contains("c.json"), "{err}");
    }

    #[test]
    fn bad_value_names_its_field() {
        let err = MmditConfig::from_json_str(r#"{"qk_norm": "layer_norm"}"#, Path::new("c.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("qk_norm") && err.contains("layer_norm"), "{err}");
        let err = MmditConfig::from_json_str(r#"{"num_layers": "three"}"#, Path::new("c.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("num_layers"), "{err}");
    }

    #[test]
    fn inconsistent_widths_are_rejected() {
        let err = MmditConfig::from_json_str(
            r#"{"caption_projection_dim": 100, "num_attention_heads": 2, "attention_head_dim": 8}"#,
            Path::new("c.json"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("caption_projection_dim"), "{err}");
        let err = MmditConfig::from_json_str(
            r#"{"num_layers": 2, "dual_attention_layers": [0, 5]}"#,
            Path::new("c.json"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("dual_attention_layers") && err.contains('5'), "{err}");
    }

    #[test]
    fn json_round_trip_keeps_every_field() {
        let config = MmditConfig::sd35_medium();
        let json = config.to_diffusers_json().to_string();
        assert_eq!(MmditConfig::from_json_str(&json, Path::new("x")).unwrap(), config);
    }
}
