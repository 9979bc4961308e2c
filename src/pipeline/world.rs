//! A text-to-image pipeline folder: transformer + text encoder + tokenizer + latent codec,
//! the unit that sampling, training and evaluation load and save.
//!
//! Layout (the synthetic world's; SD3 pipelines use diffusers' own layout):
//!
//! ```text
//! model_index.json        {"kind": "world", "image_size": 32, "codec": {"factor": 2}}
//! transformer/            diffusers SD3Transformer2DModel folder (config.json + safetensors)
//! text_encoder/           config.json (TextEncoderConfig) + model.safetensors
//! tokenizer.json          WordTokenizer (vocabulary, max_len)
//! ```

use std::path::{Path, PathBuf};

use burn::config::Config;
use burn::module::Module;
use burn::tensor::Tensor;
use crate::Backend;
use burn_store::{ModuleSnapshot, SafetensorsStore};
use serde::{Deserialize, Serialize};

use super::codec::{LatentCodec, PixelUnshuffle};
use super::text_encoder::{TextEncoder, TextEncoderConfig, WordTokenizer, read_tokenizer};
use crate::io::write_text_atomic;
use crate::model::mmdit::{Mmdit, MmditConfig};
use crate::model::weights::{ModelSource, SaveDtype, save_diffusers};
use crate::model::ModelError;
use crate::flow::TextConditioning;

pub const INDEX_FILE: &str = "model_index.json";

/// `model_index.json` of a world pipeline.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PipelineIndex {
    /// `"world"`.
    pub kind: String,
    /// Image side in pixels.
    pub image_size: usize,
    pub codec: PixelUnshuffle,
}

/// Transformer, text encoder, tokenizer and codec of a world pipeline.
#[derive(Module, Debug)]
pub struct WorldModel<B: Backend> {
    pub transformer: Mmdit<B>,
    pub text_encoder: TextEncoder<B>,
}

/// A loaded pipeline: the trainable modules plus the plain parts.
#[derive(Debug, Clone)]
pub struct Pipeline<B: Backend> {
    pub model: WorldModel<B>,
    pub transformer_config: MmditConfig,
    pub text_config: TextEncoderConfig,
    pub tokenizer: WordTokenizer,
    pub index: PipelineIndex,
}

impl<B: Backend> Pipeline<B> {
    /// Loads `dir` (see the module docs for the layout).
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self, ModelError> {
        let index_path = dir.join(INDEX_FILE);
        let text = std::fs::read_to_string(&index_path).map_err(|source| ModelError::Io { path: index_path.clone(), source })?;
        let index: PipelineIndex = serde_json::from_str(&text)
            .map_err(|e| ModelError::Config { path: index_path.clone(), message: e.to_string() })?;
        let source = ModelSource::open(&dir.join("transformer"), None)?;
        let transformer = source.load::<B>(device)?;
        let text_dir = dir.join("text_encoder");
        let text_config_path = text_dir.join("config.json");
        let text_config = TextEncoderConfig::load(&text_config_path)
            .map_err(|e| ModelError::Config { path: text_config_path.clone(), message: e.to_string() })?;
        let weights = text_dir.join("model.safetensors");
        let mut text_encoder = text_config.init::<B>(device);
        let mut store = SafetensorsStore::from_file(&weights);
        let result = text_encoder
            .load_from(&mut store)
            .map_err(|e| ModelError::Safetensors { path: weights.clone(), message: e.to_string() })?;
        if !result.missing.is_empty() || !result.errors.is_empty() {
            return Err(ModelError::Safetensors {
                path: weights,
                message: format!("missing {:?}, errors {:?}", result.missing, result.errors),
            });
        }
        let tokenizer = read_tokenizer(&dir.join("tokenizer.json"))?;
        if tokenizer.vocab_size() != text_config.vocab_size || tokenizer.max_len != text_config.max_len {
            return Err(ModelError::Config {
                path: dir.join("tokenizer.json"),
                message: format!(
                    "tokenizer has {} tokens, max_len {}; the text encoder expects {} and {}",
                    tokenizer.vocab_size(),
                    tokenizer.max_len,
                    text_config.vocab_size,
                    text_config.max_len
                ),
            });
        }
        Ok(Self {
            model: WorldModel { transformer, text_encoder },
            transformer_config: source.config,
            text_config,
            tokenizer,
            index,
        })
    }

    /// Writes the pipeline to `dir` (every file through a temporary file and a rename).
    pub fn save(&self, dir: &Path) -> Result<(), ModelError> {
        save_world_model(&self.model, &self.transformer_config, &self.text_config, &self.tokenizer, &self.index, dir)
    }

    /// Encodes prompts with the text encoder.
    pub fn encode_prompts(&self, prompts: &[&str], device: &B::Device) -> TextConditioning<B> {
        self.model.text_encoder.encode(&self.tokenizer, prompts, device)
    }

    /// Latent shape `[C, h, w]` of one image.
    pub fn latent_shape(&self) -> [usize; 3] {
        let codec = self.index.codec;
        let [h, w] = LatentCodec::<B>::latent_size(&codec, self.index.image_size, self.index.image_size);
        [LatentCodec::<B>::latent_channels(&codec), h, w]
    }

    /// Latents to images `[B, 3, H, W]` in `[0, 1]`.
    pub fn decode(&self, latents: Tensor<B, 4>) -> Tensor<B, 4> {
        LatentCodec::<B>::decode(&self.index.codec, latents)
    }

    /// Images `[B, 3, H, W]` in `[0, 1]` to latents.
    pub fn encode_images(&self, images: Tensor<B, 4>) -> Tensor<B, 4> {
        LatentCodec::<B>::encode(&self.index.codec, images)
    }
}

/// Saves a pipeline to `dir` atomically: written into a temporary sibling folder, then swapped
/// in ([`crate::io::replace_dir_atomic`]).
pub fn save_pipeline_atomic<B: Backend>(pipeline: &Pipeline<B>, dir: &Path) -> Result<(), ModelError> {
    crate::io::replace_dir_atomic(dir, |tmp| pipeline.save(tmp))
}

/// Saves the parts of a world pipeline to `dir`.
pub fn save_world_model<B: Backend>(
    model: &WorldModel<B>,
    transformer_config: &MmditConfig,
    text_config: &TextEncoderConfig,
    tokenizer: &WordTokenizer,
    index: &PipelineIndex,
    dir: &Path,
) -> Result<(), ModelError> {
    let io = |path: &Path| {
        let path: PathBuf = path.to_path_buf();
        move |source| ModelError::Io { path, source }
    };
    let text_dir = dir.join("text_encoder");
    std::fs::create_dir_all(&text_dir).map_err(io(&text_dir))?;
    save_diffusers(&model.transformer, transformer_config, &dir.join("transformer"), SaveDtype::F32)?;
    let weights = text_dir.join("model.safetensors");
    let tmp = text_dir.join(".model.safetensors.tmp");
    // One metadata key (burn's default three come out of a hash map in any order): the same
    // weights always make the same bytes.
    let mut store = SafetensorsStore::from_file(&tmp).clear_metadata().metadata("format", "pt");
    model
        .text_encoder
        .save_into(&mut store)
        .map_err(|e| ModelError::Safetensors { path: tmp.clone(), message: e.to_string() })?;
    std::fs::rename(&tmp, &weights).map_err(io(&weights))?;
    write_text_atomic(&text_dir.join("config.json"), &serde_json::to_string_pretty(text_config).expect("json"))?;
    write_text_atomic(&dir.join("tokenizer.json"), &serde_json::to_string(tokenizer).expect("json"))?;
    write_text_atomic(&dir.join(INDEX_FILE), &serde_json::to_string_pretty(index).expect("json")).map_err(ModelError::from)
}

/// Shape of a fresh world pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorldModelConfig {
    /// Transformer preset name or `config.json` path (`tiny`: SD3.5-style, width 64, 4 blocks).
    #[serde(default = "default_transformer")]
    pub transformer: String,
    /// Text-encoder transformer layers.
    #[serde(default = "default_text_layers")]
    pub text_layers: usize,
    /// Token sequence length.
    #[serde(default = "default_max_len")]
    pub max_len: usize,
}

fn default_transformer() -> String {
    "tiny".into()
}
fn default_text_layers() -> usize {
    2
}
fn default_max_len() -> usize {
    24
}

impl Default for WorldModelConfig {
    fn default() -> Self {
        Self { transformer: default_transformer(), text_layers: default_text_layers(), max_len: default_max_len() }
    }
}

/// The world's tokenizer: the grammar's words plus the font's spellable characters.
pub fn world_tokenizer(max_len: usize) -> WordTokenizer {
    WordTokenizer::new(crate::world::grammar::vocabulary(), crate::world::font::ALPHABET.chars(), max_len)
}

impl<B: Backend> Pipeline<B> {
    /// A freshly initialised world pipeline (32 x 32 images, pixel-unshuffle codec).
    pub fn new_world(config: &WorldModelConfig, device: &B::Device) -> Result<Self, ModelError> {
        let path = Path::new(&config.transformer);
        let transformer_config =
            if path.exists() { MmditConfig::from_file(path)? } else { MmditConfig::preset(&config.transformer)? };
        let tokenizer = world_tokenizer(config.max_len);
        let text_config = TextEncoderConfig::new(
            tokenizer.vocab_size(),
            config.max_len,
            transformer_config.joint_attention_dim,
            transformer_config.pooled_projection_dim,
        )
        .with_layers(config.text_layers);
        let codec = PixelUnshuffle::default();
        if LatentCodec::<B>::latent_channels(&codec) != transformer_config.in_channels {
            return Err(ModelError::Config {
                path: path.to_path_buf(),
                message: format!(
                    "`in_channels` is {}, the world's codec gives {} latent channels",
                    transformer_config.in_channels,
                    LatentCodec::<B>::latent_channels(&codec)
                ),
            });
        }
        let model = WorldModel { transformer: transformer_config.init(device), text_encoder: text_config.init(device) };
        Ok(Self {
            model: materialize(model),
            transformer_config,
            text_config,
            tokenizer,
            index: PipelineIndex { kind: "world".into(), image_size: crate::world::IMAGE_SIZE, codec },
        })
    }
}

/// Forces every lazily initialised parameter of `module` to take its value now, so that clones
/// of the module (e.g. an autodiff copy and an inference copy) share the same weights instead
/// of each drawing its own random initialisation later.
pub fn materialize<B: Backend, M: Module<B>>(module: M) -> M {
    struct Touch;
    impl<B: Backend> burn::module::ModuleVisitor<B> for Touch {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
            let _ = param.val();
        }
    }
    module.visit(&mut Touch);
    module
}
