//! The CLIP text transformer (transformers `CLIPTextModel` / `CLIPTextModelWithProjection`):
//! SD3's `text_encoder` (CLIP-L, 768 wide, 12 layers, quick-GELU) and `text_encoder_2`
//! (OpenCLIP bigG, 1280 wide, 32 layers, GELU), both with a bias-free `text_projection`.
//!
//! With token ids `t` of length `L`:
//!
//! ```text
//! h_0 = E_tok[t] + E_pos[0..L]
//! h_i = h_{i-1}' + MLP(LN_2(h_{i-1}'))   with   h_{i-1}' = h_{i-1} + CausalAttn(LN_1(h_{i-1}))
//! last = LN_final(h_N)
//! pooled = last[eos], projected: pooled W_proj^T (when the model has `text_projection`)
//! ```
//!
//! `hidden_states` = `[h_0, ..., h_N]` as transformers returns them with
//! `output_hidden_states=True`; SD3 uses `h_{N-1}` (`hidden_states[-2]`, no final LayerNorm).

use std::path::Path;

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::{gelu, gelu_approximate, sigmoid};
use crate::Backend;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Int, Tensor};
use serde::{Deserialize, Serialize};

use crate::model::error::ModelError;
use crate::model::text::weights::{CONFIG_FILE, WeightFolder, read_config};

/// The MLP activation (`hidden_act` in transformers' config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClipActivation {
    /// `x * sigmoid(1.702 x)` (OpenAI CLIP-L).
    QuickGelu,
    /// `x Φ(x)`, exact (erf) GELU (OpenCLIP bigG).
    Gelu,
    /// `0.5 x (1 + tanh(sqrt(2/π)(x + 0.044715 x³)))` (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
}

impl ClipActivation {
    /// The activation transformers' `ACT2FN[name]` gives.
    pub fn from_transformers_name(name: &str) -> Option<Self> {
        match name {
            "quick_gelu" => Some(Self::QuickGelu),
            "gelu" => Some(Self::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" => Some(Self::GeluTanh),
            _ => None,
        }
    }

    pub fn forward<B: Backend, const D: usize>(self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            Self::QuickGelu => x.clone() * sigmoid(x * 1.702),
            Self::Gelu => gelu(x),
            Self::GeluTanh => gelu_approximate(x),
        }
    }
}

/// Configuration of a CLIP text transformer (the fields of transformers' `CLIPTextConfig` that
/// change the computation).
#[derive(Config, Debug)]
pub struct ClipTextConfig {
    /// Number of token embeddings.
    pub vocab_size: usize,
    /// Width `D` of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: usize,
    /// Number of encoder layers `N`.
    pub num_hidden_layers: usize,
    /// Attention heads (`D` must divide evenly).
    pub num_attention_heads: usize,
    /// Longest sequence (77 for every SD3 CLIP).
    #[config(default = 77)]
    pub max_position_embeddings: usize,
    /// MLP activation.
    #[config(default = "ClipActivation::QuickGelu")]
    pub hidden_act: ClipActivation,
    /// LayerNorm epsilon.
    #[config(default = 1e-5)]
    pub layer_norm_eps: f64,
    /// The EOS token id whose first position gives the pooled output; the legacy value 2 means
    /// "the position of the largest id" (transformers keeps that behaviour for old configs).
    #[config(default = 2)]
    pub eos_token_id: u32,
    /// Output width of `text_projection` (`[projection_dim, D]`, no bias) if the model has one.
    pub projection_dim: Option<usize>,
}

/// transformers' `config.json` of a CLIP text model (unknown fields ignored). A full
/// `CLIPConfig` keeps the text fields under `text_config`.
#[derive(Debug, Deserialize)]
struct TransformersClipConfig {
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    max_position_embeddings: Option<usize>,
    hidden_act: Option<String>,
    layer_norm_eps: Option<f64>,
    eos_token_id: Option<u32>,
    projection_dim: Option<usize>,
    text_config: Option<Box<TransformersClipConfig>>,
}

/// `text_projection.weight`: present in `CLIPTextModelWithProjection` files.
pub const PROJECTION_KEY: &str = "text_projection.weight";

impl ClipTextConfig {
    /// Reads transformers' `config.json`; `with_projection` says whether the weights have a
    /// `text_projection` (its width is the config's `projection_dim`, 512 if absent, as in
    /// transformers).
    pub fn from_transformers_file(path: &Path, with_projection: bool) -> Result<Self, ModelError> {
        let raw: TransformersClipConfig = read_config(path)?;
        let outer_projection = raw.projection_dim;
        let text = match raw.text_config {
            Some(inner) => *inner,
            None => raw,
        };
        let missing = |field: &str| ModelError::Config { path: path.to_path_buf(), message: format!("`{field}` is missing") };
        let hidden_act = match text.hidden_act.as_deref() {
            None => ClipActivation::QuickGelu,
            Some(name) => ClipActivation::from_transformers_name(name).ok_or_else(|| ModelError::Config {
                path: path.to_path_buf(),
                message: format!("`hidden_act`: unsupported activation `{name}` (expected quick_gelu, gelu, gelu_new)"),
            })?,
        };
        let config = Self {
            vocab_size: text.vocab_size.ok_or_else(|| missing("vocab_size"))?,
            hidden_size: text.hidden_size.ok_or_else(|| missing("hidden_size"))?,
            intermediate_size: text.intermediate_size.ok_or_else(|| missing("intermediate_size"))?,
            num_hidden_layers: text.num_hidden_layers.ok_or_else(|| missing("num_hidden_layers"))?,
            num_attention_heads: text.num_attention_heads.ok_or_else(|| missing("num_attention_heads"))?,
            max_position_embeddings: text.max_position_embeddings.unwrap_or(77),
            hidden_act,
            layer_norm_eps: text.layer_norm_eps.unwrap_or(1e-5),
            eos_token_id: text.eos_token_id.unwrap_or(2),
            projection_dim: with_projection.then(|| text.projection_dim.or(outer_projection).unwrap_or(512)),
        };
        if config.num_attention_heads == 0 || config.hidden_size % config.num_attention_heads != 0 {
            return Err(ModelError::Config {
                path: path.to_path_buf(),
                message: format!(
                    "`num_attention_heads` ({}) must divide `hidden_size` ({})",
                    config.num_attention_heads, config.hidden_size
                ),
            });
        }
        Ok(config)
    }

    /// A model with lazily initialised random parameters (replaced by [`ClipTextModel::load`]).
    pub fn init<B: Backend>(&self, device: &B::Device) -> ClipTextModel<B> {
        let d = self.hidden_size;
        let layers = (0..self.num_hidden_layers)
            .map(|_| ClipEncoderLayer {
                layer_norm1: LayerNormConfig::new(d).with_epsilon(self.layer_norm_eps).init(device),
                self_attn: ClipAttention {
                    q_proj: LinearConfig::new(d, d).init(device),
                    k_proj: LinearConfig::new(d, d).init(device),
                    v_proj: LinearConfig::new(d, d).init(device),
                    out_proj: LinearConfig::new(d, d).init(device),
                    heads: self.num_attention_heads,
                },
                layer_norm2: LayerNormConfig::new(d).with_epsilon(self.layer_norm_eps).init(device),
                fc1: LinearConfig::new(d, self.intermediate_size).init(device),
                fc2: LinearConfig::new(self.intermediate_size, d).init(device),
                activation: self.hidden_act,
            })
            .collect();
        ClipTextModel {
            token_embedding: EmbeddingConfig::new(self.vocab_size, d).init(device),
            position_embedding: EmbeddingConfig::new(self.max_position_embeddings, d).init(device),
            layers,
            final_layer_norm: LayerNormConfig::new(d).with_epsilon(self.layer_norm_eps).init(device),
            text_projection: self.projection_dim.map(|p| LinearConfig::new(d, p).with_bias(false).init(device)),
            eos_token_id: self.eos_token_id,
        }
    }
}

/// Multi-head self-attention with a causal mask: `softmax(q k^T / sqrt(hd) + M) v`, `M_ij = -inf`
/// for `j > i`, all four projections with bias.
#[derive(Module, Debug)]
pub struct ClipAttention<B: Backend> {
    /// `[D, D]`.
    pub q_proj: Linear<B>,
    /// `[D, D]`.
    pub k_proj: Linear<B>,
    /// `[D, D]`.
    pub v_proj: Linear<B>,
    /// `[D, D]`.
    pub out_proj: Linear<B>,
    pub heads: usize,
}

impl<B: Backend> ClipAttention<B> {
    /// `[B, L, D] -> [B, L, D]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [batch, len, dim] = x.dims();
        let split = |t: Tensor<B, 3>| t.reshape([batch, len, self.heads, dim / self.heads]).swap_dims(1, 2);
        let q = split(self.q_proj.forward(x.clone()));
        let k = split(self.k_proj.forward(x.clone()));
        let v = split(self.v_proj.forward(x));
        let options = AttentionModuleOptions { is_causal: true, ..Default::default() };
        let out = attention(q, k, v, None, None, options);
        self.out_proj.forward(out.swap_dims(1, 2).reshape([batch, len, dim]))
    }
}

/// One pre-LayerNorm encoder layer: `h' = h + Attn(LN_1 h)`, `out = h' + fc2(act(fc1(LN_2 h')))`.
#[derive(Module, Debug)]
pub struct ClipEncoderLayer<B: Backend> {
    pub layer_norm1: LayerNorm<B>,
    pub self_attn: ClipAttention<B>,
    pub layer_norm2: LayerNorm<B>,
    /// `mlp.fc1`: `[D, intermediate]`.
    pub fc1: Linear<B>,
    /// `mlp.fc2`: `[intermediate, D]`.
    pub fc2: Linear<B>,
    #[module(skip)]
    pub activation: ClipActivation,
}

impl<B: Backend> ClipEncoderLayer<B> {
    /// `[B, L, D] -> [B, L, D]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let x = x.clone() + self.self_attn.forward(self.layer_norm1.forward(x));
        let h = self.activation.forward(self.fc1.forward(self.layer_norm2.forward(x.clone())));
        x + self.fc2.forward(h)
    }
}

/// What a CLIP text model returns for `[B, L]` token ids.
#[derive(Debug, Clone)]
pub struct ClipTextOutput<B: Backend> {
    /// `LN_final(h_N)`: `[B, L, D]`.
    pub last_hidden_state: Tensor<B, 3>,
    /// `[h_0 (embeddings), h_1, ..., h_N]`, each `[B, L, D]`, without the final LayerNorm.
    pub hidden_states: Vec<Tensor<B, 3>>,
    /// `last_hidden_state` at each row's EOS position, through `text_projection` if the model
    /// has one: `[B, projection_dim]` or `[B, D]`.
    pub pooled: Tensor<B, 2>,
}

impl<B: Backend> ClipTextOutput<B> {
    /// `hidden_states[-2]`: the output of the next-to-last layer, SD3's token embedding.
    pub fn penultimate(&self) -> Tensor<B, 3> {
        self.hidden_states[self.hidden_states.len() - 2].clone()
    }
}

/// CLIP text transformer, transformers key prefix `text_model.` (+ `text_projection`).
#[derive(Module, Debug)]
pub struct ClipTextModel<B: Backend> {
    /// `[vocab, D]`.
    pub token_embedding: Embedding<B>,
    /// `[max_positions, D]`.
    pub position_embedding: Embedding<B>,
    pub layers: Vec<ClipEncoderLayer<B>>,
    pub final_layer_norm: LayerNorm<B>,
    /// `[D, projection_dim]` in Burn's layout, no bias.
    pub text_projection: Option<Linear<B>>,
    pub eos_token_id: u32,
}

impl<B: Backend> ClipTextModel<B> {
    /// Loads a transformers CLIP text model folder (`config.json` + `model.safetensors`);
    /// a `text_projection.weight` in the file makes it a `CLIPTextModelWithProjection`.
    pub fn load(dir: &Path, device: &B::Device) -> Result<(ClipTextConfig, Self), ModelError> {
        let weights = WeightFolder::open(dir)?;
        let config = ClipTextConfig::from_transformers_file(&dir.join(CONFIG_FILE), weights.contains(PROJECTION_KEY))?;
        let model = config.init::<B>(device).load_weights(&weights)?;
        Ok((config, model))
    }

    /// Replaces every parameter with the folder's, checking each key and shape.
    pub fn load_weights(self, w: &WeightFolder) -> Result<Self, ModelError> {
        let p = "text_model";
        let layers = self
            .layers
            .into_iter()
            .enumerate()
            .map(|(i, layer)| {
                let l = format!("{p}.encoder.layers.{i}");
                let attn = layer.self_attn;
                Ok(ClipEncoderLayer {
                    layer_norm1: w.layer_norm(&format!("{l}.layer_norm1"), layer.layer_norm1)?,
                    self_attn: ClipAttention {
                        q_proj: w.linear(&format!("{l}.self_attn.q_proj"), attn.q_proj)?,
                        k_proj: w.linear(&format!("{l}.self_attn.k_proj"), attn.k_proj)?,
                        v_proj: w.linear(&format!("{l}.self_attn.v_proj"), attn.v_proj)?,
                        out_proj: w.linear(&format!("{l}.self_attn.out_proj"), attn.out_proj)?,
                        heads: attn.heads,
                    },
                    layer_norm2: w.layer_norm(&format!("{l}.layer_norm2"), layer.layer_norm2)?,
                    fc1: w.linear(&format!("{l}.mlp.fc1"), layer.fc1)?,
                    fc2: w.linear(&format!("{l}.mlp.fc2"), layer.fc2)?,
                    activation: layer.activation,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        Ok(Self {
            token_embedding: w.embedding(&format!("{p}.embeddings.token_embedding.weight"), self.token_embedding)?,
            position_embedding: w.embedding(&format!("{p}.embeddings.position_embedding.weight"), self.position_embedding)?,
            layers,
            final_layer_norm: w.layer_norm(&format!("{p}.final_layer_norm"), self.final_layer_norm)?,
            text_projection: match self.text_projection {
                Some(proj) => Some(w.linear("text_projection", proj)?),
                None => None,
            },
            eos_token_id: self.eos_token_id,
        })
    }

    /// Width `D`.
    pub fn hidden_size(&self) -> usize {
        self.token_embedding.weight.dims()[1]
    }

    /// Longest sequence the position table covers.
    pub fn max_positions(&self) -> usize {
        self.position_embedding.weight.dims()[0]
    }

    /// Runs the model on `[B, L]` token ids, `L <= max_positions` (panics otherwise).
    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> ClipTextOutput<B> {
        let [batch, len] = ids.dims();
        assert!(len <= self.max_positions(), "CLIP input of {len} tokens exceeds the {} positions", self.max_positions());
        let eos = self.eos_positions(&ids);
        let device = ids.device();
        let positions = Tensor::<B, 1, Int>::arange(0..len as i64, &device).unsqueeze::<2>();
        let mut h = self.token_embedding.forward(ids) + self.position_embedding.forward(positions);
        let mut hidden_states = vec![h.clone()];
        for layer in &self.layers {
            h = layer.forward(h);
            hidden_states.push(h.clone());
        }
        let last_hidden_state = self.final_layer_norm.forward(h);
        let dim = last_hidden_state.dims()[2];
        let rows: Vec<Tensor<B, 2>> = eos
            .iter()
            .enumerate()
            .map(|(b, &pos)| last_hidden_state.clone().slice([b..b + 1, pos..pos + 1, 0..dim]).reshape([1, dim]))
            .collect();
        let pooled = Tensor::cat(rows, 0);
        debug_assert_eq!(pooled.dims()[0], batch);
        let pooled = match &self.text_projection {
            Some(proj) => proj.forward(pooled),
            None => pooled,
        };
        ClipTextOutput { last_hidden_state, hidden_states, pooled }
    }

    /// The pooling position of each row, as transformers picks it: the first position of the
    /// largest id when `eos_token_id == 2` (legacy configs), else the first `eos_token_id`
    /// (position 0 if the row has none).
    pub fn eos_positions(&self, ids: &Tensor<B, 2, Int>) -> Vec<usize> {
        let [batch, len] = ids.dims();
        let values: Vec<i64> = ids.to_data().convert::<i64>().into_vec().expect("int ids convert to i64");
        (0..batch)
            .map(|b| {
                let row = &values[b * len..(b + 1) * len];
                if self.eos_token_id == 2 {
                    let max = row.iter().copied().max().unwrap_or(0);
                    row.iter().position(|&t| t == max).unwrap_or(0)
                } else {
                    row.iter().position(|&t| t == self.eos_token_id as i64).unwrap_or(0)
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    type B = burn::backend::Flex;

    /// transformers `ACT2FN[name](x)` at these points (torch 2.15, f32).
    #[test]
    fn activations_match_transformers() {
        let x = [-3.0f32, -2.3, -1.0, 0.5, 1.5, 3.0];
        let cases = [
            ("quick_gelu", [-0.0180713, -0.0449842, -0.1542042, 0.3503884, 1.3916622, 2.9819288]),
            ("gelu", [-0.0040499, -0.0246654, -0.1586553, 0.3457312, 1.3997891, 2.9959502]),
            ("gelu_new", [-0.0036374, -0.0243270, -0.1588080, 0.3457140, 1.3995715, 2.9963627]),
        ];
        for (name, expected) in cases {
            let act = ClipActivation::from_transformers_name(name).unwrap();
            let input = Tensor::<B, 1>::from_data(TensorData::new(x.to_vec(), [x.len()]), &Default::default());
            let got: Vec<f32> = act.forward(input).into_data().into_vec().unwrap();
            for (g, e) in got.iter().zip(expected) {
                assert!((g - e).abs() < 2e-6, "{name}: {got:?} vs {expected:?}");
            }
        }
        assert!(ClipActivation::from_transformers_name("relu").is_none());
    }

    fn model(eos_token_id: u32) -> ClipTextModel<B> {
        ClipTextConfig::new(100, 8, 16, 1, 2).with_eos_token_id(eos_token_id).init::<B>(&Default::default())
    }

    fn ids(rows: &[[i64; 6]]) -> Tensor<B, 2, Int> {
        let flat: Vec<i64> = rows.iter().flatten().copied().collect();
        Tensor::from_data(TensorData::new(flat, [rows.len(), 6]), &Default::default())
    }

    /// transformers pools at the first `eos_token_id` (argmax of a boolean row) ...
    #[test]
    fn pools_at_the_first_eos() {
        let m = model(49);
        assert_eq!(m.eos_positions(&ids(&[[48, 5, 49, 7, 49, 49], [48, 60, 61, 49, 0, 0], [48, 1, 2, 3, 4, 5]])), vec![2, 3, 0]);
    }

    /// ... or, for legacy configs with `eos_token_id == 2`, at the first largest id.
    #[test]
    fn legacy_configs_pool_at_the_largest_id() {
        let m = model(2);
        assert_eq!(m.eos_positions(&ids(&[[48, 5, 49, 7, 49, 49], [48, 60, 61, 49, 2, 2]])), vec![2, 2]);
    }
}
