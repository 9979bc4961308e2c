//! Configuration of the SD3 VAE, read from diffusers' `vae/config.json`.
//!
//! Field names and defaults are those of diffusers' `AutoencoderKL.__init__` (diffusers 0.42),
//! so the `vae/config.json` of SD3 / SD3.5 parses as is. Only the architecture SD3-family
//! checkpoints use is supported (`DownEncoderBlock2D` / `UpDecoderBlock2D`, SiLU, group norm);
//! anything else is a [`ModelError::Config`] naming the field.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::model::error::ModelError;

/// Hyper-parameters of an `AutoencoderKL` (diffusers field names).
///
/// Presets: [`VaeConfig::sd3`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VaeConfig {
    /// Image channels in (3).
    #[serde(default = "defaults::rgb")]
    pub in_channels: usize,
    /// Image channels out (3).
    #[serde(default = "defaults::rgb")]
    pub out_channels: usize,
    /// One `DownEncoderBlock2D` per resolution level.
    #[serde(default = "defaults::down_block_types")]
    pub down_block_types: Vec<String>,
    /// One `UpDecoderBlock2D` per resolution level.
    #[serde(default = "defaults::up_block_types")]
    pub up_block_types: Vec<String>,
    /// Channels of each resolution level, from the image side (SD3: 128, 256, 512, 512).
    #[serde(default = "defaults::block_out_channels")]
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder level (the decoder has one more per level).
    #[serde(default = "defaults::layers_per_block")]
    pub layers_per_block: usize,
    /// Activation; only `silu` exists in SD-family VAEs.
    #[serde(default = "defaults::act_fn")]
    pub act_fn: String,
    /// Latent channels (SD3: 16).
    #[serde(default = "defaults::latent_channels")]
    pub latent_channels: usize,
    /// Groups of every GroupNorm (SD3: 32).
    #[serde(default = "defaults::norm_num_groups")]
    pub norm_num_groups: usize,
    /// Nominal image size (unused by the computation).
    #[serde(default = "defaults::sample_size")]
    pub sample_size: usize,
    /// Latent scale: to-latent `(mean - shift) * scaling_factor` (SD3: 1.5305).
    #[serde(default = "defaults::scaling_factor")]
    pub scaling_factor: f64,
    /// Latent shift (SD3: 0.0609; SD1/SDXL have none).
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// Per-channel latent statistics some VAEs publish (not used by SD3's pipeline).
    #[serde(default)]
    pub latents_mean: Option<Vec<f64>>,
    /// See `latents_mean`.
    #[serde(default)]
    pub latents_std: Option<Vec<f64>>,
    /// diffusers runs the VAE in f32 when set (flow-opd always computes in the backend's float).
    #[serde(default = "defaults::yes")]
    pub force_upcast: bool,
    /// A 1x1 conv on the moments after the encoder (SD1/SDXL: true, SD3: false).
    #[serde(default = "defaults::yes")]
    pub use_quant_conv: bool,
    /// A 1x1 conv on the latents before the decoder (SD1/SDXL: true, SD3: false).
    #[serde(default = "defaults::yes")]
    pub use_post_quant_conv: bool,
    /// Self-attention in the encoder's and decoder's mid blocks (true for every SD VAE).
    #[serde(default = "defaults::yes")]
    pub mid_block_add_attention: bool,
}

mod defaults {
    pub fn rgb() -> usize {
        3
    }
    pub fn down_block_types() -> Vec<String> {
        vec!["DownEncoderBlock2D".into()]
    }
    pub fn up_block_types() -> Vec<String> {
        vec!["UpDecoderBlock2D".into()]
    }
    pub fn block_out_channels() -> Vec<usize> {
        vec![64]
    }
    pub fn layers_per_block() -> usize {
        1
    }
    pub fn act_fn() -> String {
        "silu".into()
    }
    pub fn latent_channels() -> usize {
        4
    }
    pub fn norm_num_groups() -> usize {
        32
    }
    pub fn sample_size() -> usize {
        32
    }
    pub fn scaling_factor() -> f64 {
        0.18215
    }
    pub fn yes() -> bool {
        true
    }
}

impl VaeConfig {
    /// The Stable Diffusion 3 / 3.5 VAE: 16 latent channels, levels 128/256/512/512, two resnets
    /// per level, 32 groups, no quant convs, scale 1.5305, shift 0.0609.
    pub fn sd3() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into(); 4],
            up_block_types: vec!["UpDecoderBlock2D".into(); 4],
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            act_fn: "silu".into(),
            latent_channels: 16,
            norm_num_groups: 32,
            sample_size: 1024,
            scaling_factor: 1.5305,
            shift_factor: Some(0.0609),
            latents_mean: None,
            latents_std: None,
            force_upcast: true,
            use_quant_conv: false,
            use_post_quant_conv: false,
            mid_block_add_attention: true,
        }
    }

    /// Reads and validates a diffusers `config.json` (keys starting with `_` and unknown keys
    /// are ignored, as diffusers does).
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
        let de = &mut serde_json::Deserializer::from_str(&text);
        let config: Self = serde_path_to_error::deserialize(de)
            .map_err(|e| ModelError::Config { path: path.to_path_buf(), message: e.to_string() })?;
        config.validate().map_err(|message| ModelError::Config { path: path.to_path_buf(), message })?;
        Ok(config)
    }

    /// Checks the fields describe an architecture this crate builds.
    pub fn validate(&self) -> Result<(), String> {
        let levels = self.block_out_channels.len();
        if levels == 0 {
            return Err("`block_out_channels` is empty".into());
        }
        if self.down_block_types.len() != levels || self.up_block_types.len() != levels {
            return Err(format!(
                "`down_block_types` ({}) and `up_block_types` ({}) must have one entry per `block_out_channels` ({levels})",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        if let Some(other) = self.down_block_types.iter().find(|t| *t != "DownEncoderBlock2D") {
            return Err(format!("`down_block_types`: unsupported block `{other}` (only DownEncoderBlock2D)"));
        }
        if let Some(other) = self.up_block_types.iter().find(|t| *t != "UpDecoderBlock2D") {
            return Err(format!("`up_block_types`: unsupported block `{other}` (only UpDecoderBlock2D)"));
        }
        if self.act_fn != "silu" {
            return Err(format!("`act_fn`: unsupported activation `{}` (only silu)", self.act_fn));
        }
        if self.norm_num_groups == 0 {
            return Err("`norm_num_groups` is 0".into());
        }
        if let Some(c) = self.block_out_channels.iter().find(|c| **c == 0 || **c % self.norm_num_groups != 0) {
            return Err(format!(
                "`block_out_channels`: {c} channels cannot be split into `norm_num_groups` = {} groups",
                self.norm_num_groups
            ));
        }
        if self.in_channels == 0 || self.out_channels == 0 || self.latent_channels == 0 || self.layers_per_block == 0 {
            return Err("`in_channels`, `out_channels`, `latent_channels` and `layers_per_block` must be positive".into());
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor != 0.0) {
            return Err(format!("`scaling_factor` must be finite and non-zero, got {}", self.scaling_factor));
        }
        Ok(())
    }

    /// Image side / latent side: `2^(levels - 1)` (8 for SD3).
    pub fn downsample_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    /// The latent shift (0 when the config has none).
    pub fn shift(&self) -> f64 {
        self.shift_factor.unwrap_or(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd3_config_json_parses_to_the_preset() {
        // The published stabilityai/stable-diffusion-3.5-medium vae/config.json.
        let json = r#"{
          "_class_name": "AutoencoderKL", "_diffusers_version": "0.31.0.dev0",
          "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
          "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
          "force_upcast": true, "in_channels": 3, "latent_channels": 16, "latents_mean": null,
          "latents_std": null, "layers_per_block": 2, "mid_block_add_attention": true,
          "norm_num_groups": 32, "out_channels": 3, "sample_size": 1024, "scaling_factor": 1.5305,
          "shift_factor": 0.0609,
          "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
          "use_post_quant_conv": false, "use_quant_conv": false
        }"#;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, json).unwrap();
        let config = VaeConfig::from_file(&path).unwrap();
        assert_eq!(config, VaeConfig::sd3());
        assert_eq!(config.downsample_factor(), 8);
    }

    #[test]
    fn bad_fields_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, r#"{"block_out_channels": [64, 100], "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"], "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"]}"#).unwrap();
        let err = VaeConfig::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("config.json") && err.contains("`block_out_channels`: 100"), "{err}");
        std::fs::write(&path, r#"{"layers_per_block": "two"}"#).unwrap();
        let err = VaeConfig::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("layers_per_block"), "{err}");
    }
}
