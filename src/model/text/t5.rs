//! The T5 encoder (transformers `T5EncoderModel`): SD3's `text_encoder_3` (T5-XXL v1.1: d_model
//! 4096, 24 layers, 64 heads of 64, gated-GELU feed-forward of 10240).
//!
//! With token ids `t` of length `L` (no attention mask, as SD3's pipeline calls it):
//!
//! ```text
//! h_0 = E[t]
//! P[h, i, j] = R[bucket(j - i), h]                 (layer 0's table, shared by every layer)
//! h_i' = h_{i-1} + W_o · softmax(q k^T + P) v      with q, k, v from RMS(h_{i-1}); no 1/sqrt(d) scale
//! h_i  = h_i' + W_o_ff (act(W_i0 RMS(h_i')) ⊙ W_i1 RMS(h_i'))     (gated; act = gelu_new)
//! out = RMS_final(h_N)
//! ```
//!
//! `RMS(x) = w ⊙ x / sqrt(mean(x²) + eps)` (T5LayerNorm: no mean subtraction, no bias).

use std::path::Path;

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{Embedding, EmbeddingConfig, Initializer, Linear, LinearConfig};
use burn::tensor::activation::{gelu, gelu_approximate, relu, silu};
use crate::Backend;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::model::error::ModelError;
use crate::model::text::weights::{CONFIG_FILE, WeightFolder, read_config};

/// The feed-forward activation (transformers' `dense_act_fn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum T5Activation {
    Relu,
    /// `gelu_new`: the tanh approximation (what `feed_forward_proj = "gated-gelu"` selects).
    GeluTanh,
    /// Exact (erf) GELU.
    Gelu,
    Silu,
}

impl T5Activation {
    pub fn forward<B: Backend, const D: usize>(self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            Self::Relu => relu(x),
            Self::GeluTanh => gelu_approximate(x),
            Self::Gelu => gelu(x),
            Self::Silu => silu(x),
        }
    }
}

/// Configuration of a T5 encoder (the fields of transformers' `T5Config` the encoder uses).
#[derive(Config, Debug)]
pub struct T5EncoderConfig {
    /// Number of token embeddings (`shared`).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Width of each head.
    pub d_kv: usize,
    /// Feed-forward hidden width.
    pub d_ff: usize,
    /// Number of encoder blocks.
    pub num_layers: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Relative-position buckets (half for each direction).
    #[config(default = 32)]
    pub relative_attention_num_buckets: usize,
    /// Distances at or beyond this share the last bucket.
    #[config(default = 128)]
    pub relative_attention_max_distance: usize,
    /// RMSNorm epsilon.
    #[config(default = 1e-6)]
    pub layer_norm_epsilon: f64,
    /// Feed-forward activation.
    #[config(default = "T5Activation::GeluTanh")]
    pub activation: T5Activation,
    /// Gated feed-forward (`wi_0`, `wi_1`) rather than one `wi`.
    #[config(default = true)]
    pub gated: bool,
}

/// transformers' `config.json` of a T5 model (unknown fields ignored).
#[derive(Debug, Deserialize)]
struct TransformersT5Config {
    vocab_size: usize,
    d_model: usize,
    d_kv: usize,
    d_ff: usize,
    num_layers: usize,
    num_heads: usize,
    #[serde(default = "default_buckets")]
    relative_attention_num_buckets: usize,
    #[serde(default = "default_max_distance")]
    relative_attention_max_distance: usize,
    #[serde(default = "default_eps")]
    layer_norm_epsilon: f64,
    #[serde(default = "default_ff")]
    feed_forward_proj: String,
}

fn default_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_ff() -> String {
    "relu".into()
}

impl T5EncoderConfig {
    /// Reads transformers' `config.json`. `feed_forward_proj` is `[gated-]act`, and
    /// `gated-gelu` means `gelu_new`, as in transformers' `T5Config`.
    pub fn from_transformers_file(path: &Path) -> Result<Self, ModelError> {
        let raw: TransformersT5Config = read_config(path)?;
        let proj = raw.feed_forward_proj.as_str();
        let (gated, act) = match proj.strip_prefix("gated-") {
            Some(act) => (true, act),
            None => (false, proj),
        };
        let activation = match (proj, act) {
            ("gated-gelu", _) | (_, "gelu_new") | (_, "gelu_pytorch_tanh") => T5Activation::GeluTanh,
            (_, "relu") => T5Activation::Relu,
            (_, "gelu") => T5Activation::Gelu,
            (_, "silu") => T5Activation::Silu,
            _ => {
                return Err(ModelError::Config {
                    path: path.to_path_buf(),
                    message: format!("`feed_forward_proj`: unsupported `{proj}` (expected [gated-]relu|gelu|gelu_new|silu)"),
                });
            }
        };
        Ok(Self {
            vocab_size: raw.vocab_size,
            d_model: raw.d_model,
            d_kv: raw.d_kv,
            d_ff: raw.d_ff,
            num_layers: raw.num_layers,
            num_heads: raw.num_heads,
            relative_attention_num_buckets: raw.relative_attention_num_buckets,
            relative_attention_max_distance: raw.relative_attention_max_distance,
            layer_norm_epsilon: raw.layer_norm_epsilon,
            activation,
            gated,
        })
    }

    /// An encoder with lazily initialised random parameters (replaced by [`T5Encoder::load`]).
    pub fn init<B: Backend>(&self, device: &B::Device) -> T5Encoder<B> {
        let (d, inner) = (self.d_model, self.num_heads * self.d_kv);
        let linear = |i: usize, o: usize| LinearConfig::new(i, o).with_bias(false).init(device);
        let norm = || T5LayerNorm::new(d, self.layer_norm_epsilon, device);
        let blocks = (0..self.num_layers)
            .map(|_| T5Block {
                attention_norm: norm(),
                q: linear(d, inner),
                k: linear(d, inner),
                v: linear(d, inner),
                o: linear(inner, d),
                ff_norm: norm(),
                wi_0: linear(d, self.d_ff),
                wi_1: self.gated.then(|| linear(d, self.d_ff)),
                wo: linear(self.d_ff, d),
                heads: self.num_heads,
                activation: self.activation,
            })
            .collect();
        T5Encoder {
            shared: EmbeddingConfig::new(self.vocab_size, d).init(device),
            relative_attention_bias: EmbeddingConfig::new(self.relative_attention_num_buckets, self.num_heads).init(device),
            blocks,
            final_layer_norm: norm(),
            num_buckets: self.relative_attention_num_buckets,
            max_distance: self.relative_attention_max_distance,
        }
    }
}

/// T5LayerNorm: `w ⊙ x / sqrt(mean(x²) + eps)` over the last axis (no mean, no bias).
#[derive(Module, Debug)]
pub struct T5LayerNorm<B: Backend> {
    /// `[d_model]`.
    pub weight: Param<Tensor<B, 1>>,
    pub epsilon: f64,
}

impl<B: Backend> T5LayerNorm<B> {
    pub fn new(d_model: usize, epsilon: f64, device: &B::Device) -> Self {
        Self { weight: Initializer::Ones.init([d_model], device), epsilon }
    }

    /// `[B, L, d] -> [B, L, d]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let variance = x.clone().powi_scalar(2).mean_dim(2);
        x * (variance + self.epsilon).sqrt().recip() * self.weight.val().unsqueeze::<3>()
    }
}

/// One encoder block: self-attention sub-layer then feed-forward sub-layer, each pre-RMSNorm
/// with a residual (transformers `T5Block` of an encoder).
#[derive(Module, Debug)]
pub struct T5Block<B: Backend> {
    /// `layer.0.layer_norm`.
    pub attention_norm: T5LayerNorm<B>,
    /// `layer.0.SelfAttention.q`: `[d_model, H d_kv]`, no bias (likewise `k`, `v`).
    pub q: Linear<B>,
    pub k: Linear<B>,
    pub v: Linear<B>,
    /// `layer.0.SelfAttention.o`: `[H d_kv, d_model]`.
    pub o: Linear<B>,
    /// `layer.1.layer_norm`.
    pub ff_norm: T5LayerNorm<B>,
    /// `layer.1.DenseReluDense.wi_0` (or `wi` when not gated): `[d_model, d_ff]`.
    pub wi_0: Linear<B>,
    /// `layer.1.DenseReluDense.wi_1`: `[d_model, d_ff]`, gated models only.
    pub wi_1: Option<Linear<B>>,
    /// `layer.1.DenseReluDense.wo`: `[d_ff, d_model]`.
    pub wo: Linear<B>,
    pub heads: usize,
    #[module(skip)]
    pub activation: T5Activation,
}

impl<B: Backend> T5Block<B> {
    /// `[B, L, d]` with the position bias `[B, H, L, L]` -> `[B, L, d]`.
    pub fn forward(&self, x: Tensor<B, 3>, position_bias: Tensor<B, 4>) -> Tensor<B, 3> {
        let [batch, len, _] = x.dims();
        let h = self.attention_norm.forward(x.clone());
        let inner = self.q.weight.dims()[1];
        let split = |t: Tensor<B, 3>| t.reshape([batch, len, self.heads, inner / self.heads]).swap_dims(1, 2);
        let q = split(self.q.forward(h.clone()));
        let k = split(self.k.forward(h.clone()));
        let v = split(self.v.forward(h));
        let options = AttentionModuleOptions { scale: Some(1.0), ..Default::default() };
        let attended = attention(q, k, v, None, Some(position_bias), options);
        let x = x + self.o.forward(attended.swap_dims(1, 2).reshape([batch, len, inner]));
        let h = self.ff_norm.forward(x.clone());
        let gate = self.activation.forward(self.wi_0.forward(h.clone()));
        let hidden = match &self.wi_1 {
            Some(wi_1) => gate * wi_1.forward(h),
            None => gate,
        };
        x + self.wo.forward(hidden)
    }
}

/// T5 encoder: `shared` embedding, blocks, final RMSNorm; transformers keys `shared.weight`
/// (or `encoder.embed_tokens.weight`) and `encoder.*`.
#[derive(Module, Debug)]
pub struct T5Encoder<B: Backend> {
    /// `[vocab, d_model]`.
    pub shared: Embedding<B>,
    /// `encoder.block.0.layer.0.SelfAttention.relative_attention_bias`: `[num_buckets, H]`.
    pub relative_attention_bias: Embedding<B>,
    pub blocks: Vec<T5Block<B>>,
    /// `encoder.final_layer_norm`.
    pub final_layer_norm: T5LayerNorm<B>,
    pub num_buckets: usize,
    pub max_distance: usize,
}

/// T5's bidirectional relative-position bucket of `relative = key - query`: half the buckets
/// per sign; distances below `num_buckets / 4` get their own bucket, larger ones share
/// logarithmically spaced buckets up to `max_distance`, beyond which all fall in the last.
/// Computed in f32 like transformers' `_relative_position_bucket`.
pub fn relative_position_bucket(relative: i64, num_buckets: usize, max_distance: usize) -> usize {
    let half = (num_buckets / 2) as i64;
    let mut bucket = if relative > 0 { half } else { 0 };
    let n = relative.abs();
    let max_exact = half / 2;
    if n < max_exact {
        bucket += n;
    } else {
        let ratio = ((n as f32) / (max_exact as f32)).ln() / ((max_distance as f64 / max_exact as f64).ln() as f32);
        let large = max_exact + (ratio * (half - max_exact) as f32) as i64;
        bucket += large.min(half - 1);
    }
    bucket as usize
}

impl<B: Backend> T5Encoder<B> {
    /// Loads a transformers T5 encoder folder (`config.json` + `model.safetensors` or shards).
    pub fn load(dir: &Path, device: &B::Device) -> Result<(T5EncoderConfig, Self), ModelError> {
        let config = T5EncoderConfig::from_transformers_file(&dir.join(CONFIG_FILE))?;
        let weights = WeightFolder::open(dir)?;
        let model = config.init::<B>(device).load_weights(&weights)?;
        Ok((config, model))
    }

    /// Replaces every parameter with the folder's, checking each key and shape.
    pub fn load_weights(self, w: &WeightFolder) -> Result<Self, ModelError> {
        let norm = |key: String, n: T5LayerNorm<B>| -> Result<T5LayerNorm<B>, ModelError> {
            Ok(T5LayerNorm { weight: w.vector(&key, n.weight)?, epsilon: n.epsilon })
        };
        let blocks = self
            .blocks
            .into_iter()
            .enumerate()
            .map(|(i, b)| {
                let a = format!("encoder.block.{i}.layer.0");
                let f = format!("encoder.block.{i}.layer.1");
                let wi_0 = if b.wi_1.is_some() { "wi_0" } else { "wi" };
                Ok(T5Block {
                    attention_norm: norm(format!("{a}.layer_norm.weight"), b.attention_norm)?,
                    q: w.linear(&format!("{a}.SelfAttention.q"), b.q)?,
                    k: w.linear(&format!("{a}.SelfAttention.k"), b.k)?,
                    v: w.linear(&format!("{a}.SelfAttention.v"), b.v)?,
                    o: w.linear(&format!("{a}.SelfAttention.o"), b.o)?,
                    ff_norm: norm(format!("{f}.layer_norm.weight"), b.ff_norm)?,
                    wi_0: w.linear(&format!("{f}.DenseReluDense.{wi_0}"), b.wi_0)?,
                    wi_1: match b.wi_1 {
                        Some(wi_1) => Some(w.linear(&format!("{f}.DenseReluDense.wi_1"), wi_1)?),
                        None => None,
                    },
                    wo: w.linear(&format!("{f}.DenseReluDense.wo"), b.wo)?,
                    heads: b.heads,
                    activation: b.activation,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        let shared_key = w.first_present(&["shared.weight", "encoder.embed_tokens.weight"]);
        Ok(Self {
            shared: w.embedding(shared_key, self.shared)?,
            relative_attention_bias: w.embedding(
                "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                self.relative_attention_bias,
            )?,
            blocks,
            final_layer_norm: norm("encoder.final_layer_norm.weight".into(), self.final_layer_norm)?,
            num_buckets: self.num_buckets,
            max_distance: self.max_distance,
        })
    }

    /// Width `d_model`.
    pub fn d_model(&self) -> usize {
        self.shared.weight.dims()[1]
    }

    /// The additive attention bias `[1, H, L, L]`: `P[h, i, j] = R[bucket(j - i), h]`.
    pub fn position_bias(&self, len: usize, device: &B::Device) -> Tensor<B, 4> {
        let buckets: Vec<i64> = (0..len as i64)
            .flat_map(|i| {
                (0..len as i64).map(move |j| relative_position_bucket(j - i, self.num_buckets, self.max_distance) as i64)
            })
            .collect();
        let buckets = Tensor::<B, 2, Int>::from_data(TensorData::new(buckets, [len, len]), device);
        // [L, L, H] -> [H, L, L] -> [1, H, L, L]
        self.relative_attention_bias.forward(buckets).permute([2, 0, 1]).unsqueeze::<4>()
    }

    /// `[B, L]` token ids -> `[B, L, d_model]` (the encoder's last hidden state, after the final
    /// RMSNorm). Every position attends to every other (SD3 passes no attention mask).
    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [batch, len] = ids.dims();
        let device = ids.device();
        let heads = self.relative_attention_bias.weight.dims()[1];
        let bias = self.position_bias(len, &device).expand([batch, heads, len, len]);
        let mut h = self.shared.forward(ids);
        for block in &self.blocks {
            h = block.forward(h, bias.clone());
        }
        self.final_layer_norm.forward(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// transformers `ACT2FN["gelu_new"]` (what `gated-gelu` selects) and `ACT2FN["gelu"]`.
    #[test]
    fn gated_gelu_is_the_tanh_approximation() {
        type B = burn::backend::Flex;
        let x = [-3.0f32, -2.3, -1.0, 0.5, 1.5, 3.0];
        let gelu_new = [-0.0036374f32, -0.0243270, -0.1588080, 0.3457140, 1.3995715, 2.9963627];
        let gelu = [-0.0040499f32, -0.0246654, -0.1586553, 0.3457312, 1.3997891, 2.9959502];
        for (act, expected) in [(T5Activation::GeluTanh, gelu_new), (T5Activation::Gelu, gelu)] {
            let input = Tensor::<B, 1>::from_data(TensorData::new(x.to_vec(), [x.len()]), &Default::default());
            let got: Vec<f32> = act.forward(input).into_data().into_vec().unwrap();
            for (g, e) in got.iter().zip(expected) {
                assert!((g - e).abs() < 2e-6, "{act:?}: {got:?} vs {expected:?}");
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let base = r#""vocab_size": 10, "d_model": 8, "d_kv": 2, "d_ff": 16, "num_layers": 1, "num_heads": 4"#;
        for (proj, gated, act) in [
            ("gated-gelu", true, T5Activation::GeluTanh),
            ("relu", false, T5Activation::Relu),
            ("gated-silu", true, T5Activation::Silu),
            ("gelu", false, T5Activation::Gelu),
        ] {
            std::fs::write(&path, format!(r#"{{{base}, "feed_forward_proj": "{proj}", "unknown_field": 1}}"#)).unwrap();
            let config = T5EncoderConfig::from_transformers_file(&path).unwrap();
            assert_eq!((config.gated, config.activation), (gated, act), "{proj}");
        }
        std::fs::write(&path, format!(r#"{{{base}, "feed_forward_proj": "gated-swish"}}"#)).unwrap();
        let err = T5EncoderConfig::from_transformers_file(&path).unwrap_err().to_string();
        assert!(err.contains("feed_forward_proj") && err.contains("config.json"), "{err}");
    }

    /// Values of transformers' `T5Attention._relative_position_bucket(bidirectional=True,
    /// num_buckets=32, max_distance=128)` for these distances.
    #[test]
    fn buckets_match_transformers() {
        let cases = [
            (0, 0),
            (1, 17),
            (-1, 1),
            (7, 23),
            (-7, 7),
            (8, 24),
            (-8, 8),
            (12, 25),
            (-20, 10),
            (64, 30),
            (-127, 15),
            (128, 31),
            (-1000, 15),
        ];
        for (relative, expected) in cases {
            assert_eq!(relative_position_bucket(relative, 32, 128), expected, "relative {relative}");
        }
    }
}
