//! Prompt tokenisation for SD3's three text encoders with the `tokenizers` crate, reading the
//! same files transformers does from a pipeline's `tokenizer/`, `tokenizer_2/`, `tokenizer_3/`:
//! `tokenizer.json` (or, for CLIP, `vocab.json` + `merges.txt`, which is all SD3's own
//! `tokenizer/` and `tokenizer_2/` ship), `tokenizer_config.json` (pad token, `model_max_length`)
//! and `special_tokens_map.json` (special tokens the config leaves out).
//!
//! Every prompt becomes exactly `max_length` ids, as diffusers' `StableDiffusion3Pipeline` asks
//! transformers for them (`padding="max_length"`, `truncation=True`, special tokens added):
//! the text is cut so that, with its special tokens, it fills at most `max_length`, then padded
//! on the right with the tokenizer's pad token (SD3: `<|endoftext|>` for CLIP-L, `!` for
//! CLIP-G, `<pad>` for T5).

use std::path::{Path, PathBuf};

use crate::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use serde::Deserialize;
use tokenizers::{
    PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection, TruncationParams,
    TruncationStrategy,
};

use crate::model::text::TextError;

pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
pub const VOCAB_FILE: &str = "vocab.json";
pub const MERGES_FILE: &str = "merges.txt";
pub const SPECIAL_TOKENS_FILE: &str = "special_tokens_map.json";

/// A special token in `tokenizer_config.json`: a string or an `AddedToken` object.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TokenSpec {
    Plain(String),
    Added { content: String },
}

impl TokenSpec {
    fn content(&self) -> &str {
        match self {
            Self::Plain(s) => s,
            Self::Added { content } => content,
        }
    }
}

/// The fields of transformers' `tokenizer_config.json` that change the ids (unknown ignored).
#[derive(Debug, Default, Deserialize)]
struct TokenizerConfig {
    pad_token: Option<TokenSpec>,
    bos_token: Option<TokenSpec>,
    eos_token: Option<TokenSpec>,
    unk_token: Option<TokenSpec>,
    model_max_length: Option<f64>,
}

/// A tokenizer that turns prompts into fixed-length id rows.
#[derive(Debug, Clone)]
pub struct PromptTokenizer {
    tokenizer: Tokenizer,
    /// The folder it was read from (for error messages).
    pub dir: PathBuf,
    /// Length of every id row.
    pub max_length: usize,
    pub pad_token: String,
    pub pad_id: u32,
}

impl PromptTokenizer {
    /// Reads a transformers tokenizer folder. `max_length` defaults to the config's
    /// `model_max_length` (SD3 uses it for CLIP: 77); T5's length is the pipeline's
    /// `max_sequence_length` (256, or 128 as in Flow-GRPO) and is passed explicitly.
    pub fn from_folder(dir: &Path, max_length: Option<usize>) -> Result<Self, TextError> {
        let config_path = dir.join(TOKENIZER_CONFIG_FILE);
        let mut config: TokenizerConfig = if config_path.exists() {
            let text = std::fs::read_to_string(&config_path)
                .map_err(|e| TextError::Tokenizer { path: config_path.clone(), message: e.to_string() })?;
            serde_json::from_str(&text)
                .map_err(|e| TextError::Tokenizer { path: config_path.clone(), message: format!("invalid JSON: {e}") })?
        } else {
            TokenizerConfig::default()
        };
        // Older folders keep the special tokens in `special_tokens_map.json` only.
        let map_path = dir.join(SPECIAL_TOKENS_FILE);
        if map_path.exists() {
            let text = std::fs::read_to_string(&map_path)
                .map_err(|e| TextError::Tokenizer { path: map_path.clone(), message: e.to_string() })?;
            let map: TokenizerConfig = serde_json::from_str(&text)
                .map_err(|e| TextError::Tokenizer { path: map_path.clone(), message: format!("invalid JSON: {e}") })?;
            config.pad_token = config.pad_token.or(map.pad_token);
            config.bos_token = config.bos_token.or(map.bos_token);
            config.eos_token = config.eos_token.or(map.eos_token);
            config.unk_token = config.unk_token.or(map.unk_token);
        }
        let json_path = dir.join(TOKENIZER_FILE);
        let mut tokenizer = if json_path.exists() {
            Tokenizer::from_file(&json_path)
                .map_err(|e| TextError::Tokenizer { path: json_path.clone(), message: e.to_string() })?
        } else if dir.join(VOCAB_FILE).exists() && dir.join(MERGES_FILE).exists() {
            clip_bpe_from_vocab_merges(dir, &config)?
        } else {
            return Err(TextError::Tokenizer {
                path: dir.to_path_buf(),
                message: format!("no {TOKENIZER_FILE} (nor a CLIP {VOCAB_FILE} + {MERGES_FILE} pair) in this folder"),
            });
        };
        let max_length = match max_length.or_else(|| config.model_max_length.map(|m| m as usize)) {
            Some(m) if m > 0 && m < 1 << 20 => m,
            _ => {
                return Err(TextError::Tokenizer {
                    path: config_path,
                    message: "no usable `model_max_length`; pass the sequence length explicitly".into(),
                });
            }
        };
        let pad_token = match &config.pad_token {
            Some(spec) => spec.content().to_string(),
            None => {
                return Err(TextError::Tokenizer {
                    path: config_path,
                    message: "no `pad_token`: fixed-length prompts need one".into(),
                });
            }
        };
        let pad_id = tokenizer.token_to_id(&pad_token).ok_or_else(|| TextError::Tokenizer {
            path: dir.to_path_buf(),
            message: format!("the pad token `{pad_token}` is not in the vocabulary"),
        })?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| TextError::Tokenizer { path: dir.to_path_buf(), message: e.to_string() })?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token: pad_token.clone(),
        }));
        Ok(Self { tokenizer, dir: dir.to_path_buf(), max_length, pad_token, pad_id })
    }

    /// The id of `token`, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// Each prompt as exactly `max_length` ids (special tokens added, truncated, padded right).
    pub fn encode(&self, prompts: &[&str]) -> Result<Vec<Vec<u32>>, TextError> {
        prompts
            .iter()
            .map(|prompt| {
                let encoding = self.tokenizer.encode(*prompt, true).map_err(|e| TextError::Tokenizer {
                    path: self.dir.clone(),
                    message: format!("cannot tokenise {prompt:?}: {e}"),
                })?;
                let ids = encoding.get_ids().to_vec();
                debug_assert_eq!(ids.len(), self.max_length);
                Ok(ids)
            })
            .collect()
    }

    /// [`Self::encode`] as a `[B, max_length]` tensor.
    pub fn encode_tensor<B: Backend>(&self, prompts: &[&str], device: &B::Device) -> Result<Tensor<B, 2, Int>, TextError> {
        let rows = self.encode(prompts)?;
        let flat: Vec<i64> = rows.iter().flatten().map(|&id| id as i64).collect();
        Ok(Tensor::from_data(TensorData::new(flat, [rows.len(), self.max_length]), device))
    }
}

/// Builds the tokenizer transformers' `CLIPTokenizer` builds from `vocab.json` + `merges.txt`:
/// byte-level BPE with the `</w>` end-of-word suffix, NFC + whitespace squeeze + lower-case, the
/// CLIP word-splitting regex, and `<|startoftext|> ... <|endoftext|>` around the text.
fn clip_bpe_from_vocab_merges(dir: &Path, config: &TokenizerConfig) -> Result<Tokenizer, TextError> {
    let vocab_path = dir.join(VOCAB_FILE);
    let merges_path = dir.join(MERGES_FILE);
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| TextError::Tokenizer { path: p.to_path_buf(), message: e.to_string() });
    let vocab: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&read(&vocab_path)?)
        .map_err(|e| TextError::Tokenizer { path: vocab_path.clone(), message: format!("invalid JSON: {e}") })?;
    let merges: Vec<String> = read(&merges_path)?
        .lines()
        .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    let name = |spec: &Option<TokenSpec>, default: &str| spec.as_ref().map(|s| s.content().to_string()).unwrap_or_else(|| default.to_string());
    let bos = name(&config.bos_token, "<|startoftext|>");
    let eos = name(&config.eos_token, "<|endoftext|>");
    let unk = name(&config.unk_token, "<|endoftext|>");
    let id_of = |token: &str| {
        vocab.get(token).and_then(|v| v.as_u64()).ok_or_else(|| TextError::Tokenizer {
            path: vocab_path.clone(),
            message: format!("special token `{token}` is not in the vocabulary"),
        })
    };
    let (bos_id, eos_id) = (id_of(&bos)?, id_of(&eos)?);
    let mut specials = vec![(bos_id, bos.clone()), (eos_id, eos.clone())];
    if let Some(pad) = &config.pad_token {
        let pad = pad.content().to_string();
        if pad != bos && pad != eos {
            specials.push((id_of(&pad)?, pad));
        }
    }
    let added: Vec<serde_json::Value> = specials
        .iter()
        .map(|(id, content)| {
            serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let split = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": r"\s+"}, "content": " "},
            {"type": "Lowercase"}]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": split}, "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
        "post_processor": {"type": "RobertaProcessing", "sep": [eos, eos_id], "cls": [bos, bos_id],
            "trim_offsets": false, "add_prefix_space": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": "",
            "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges}
    });
    json.to_string()
        .parse::<Tokenizer>()
        .map_err(|e| TextError::Tokenizer { path: dir.to_path_buf(), message: format!("cannot build a CLIP BPE from {VOCAB_FILE} + {MERGES_FILE}: {e}") })
}
