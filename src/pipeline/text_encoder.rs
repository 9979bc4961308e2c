//! The synthetic world's text encoder: a word-level tokenizer (characters inside double quotes
//! become one token each, so any string can be spelled) and a small transformer that gives the
//! MMDiT its token sequence `[B, L, joint_dim]` and pooled vector `[B, pooled_dim]` — the roles
//! CLIP and T5 play for SD3. It is trained with the base model, then frozen.

use std::collections::HashMap;
use std::path::Path;

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::transformer::{TransformerEncoder, TransformerEncoderConfig, TransformerEncoderInput};
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use crate::Backend;
use burn::tensor::{Bool, Distribution, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::flow::TextConditioning;

/// Padding token id.
pub const PAD: usize = 0;
/// Unknown-word token id.
pub const UNK: usize = 1;
/// The double-quote token id (opens and closes a spelled string).
pub const QUOTE: usize = 2;
const SPECIALS: [&str; 3] = ["[pad]", "[unk]", "\""];
/// Prefix of character tokens inside quotes: `'a` is the character `a`.
const CHAR_PREFIX: char = '\'';

/// Word-level tokenizer over a fixed vocabulary. Text is lower-cased; outside quotes it splits
/// on whitespace and on `,` `.` `;` `:` `!` `?` (which are dropped); inside double quotes each
/// non-space character is the token `'c`. Sequences are padded or cut to `max_len`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WordTokenizer {
    /// Token strings; ids are positions. The first three are `[pad]`, `[unk]`, `"`.
    pub vocab: Vec<String>,
    pub max_len: usize,
    #[serde(skip)]
    index: HashMap<String, usize>,
}

impl WordTokenizer {
    /// Builds the vocabulary from `words` (outside quotes) and `chars` (spellable inside quotes).
    pub fn new<'a>(words: impl IntoIterator<Item = &'a str>, chars: impl IntoIterator<Item = char>, max_len: usize) -> Self {
        let mut vocab: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
        for w in words {
            let w = w.to_lowercase();
            if !vocab.contains(&w) {
                vocab.push(w);
            }
        }
        for c in chars {
            let t = format!("{CHAR_PREFIX}{}", c.to_lowercase());
            if !vocab.contains(&t) {
                vocab.push(t);
            }
        }
        Self::from_vocab(vocab, max_len)
    }

    pub fn from_vocab(vocab: Vec<String>, max_len: usize) -> Self {
        let index = vocab.iter().enumerate().map(|(i, w)| (w.clone(), i)).collect();
        Self { vocab, max_len, index }
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// Token ids of `text` (unpadded, at most `max_len`).
    pub fn encode(&self, text: &str) -> Vec<usize> {
        let mut ids = Vec::new();
        let mut quoted = false;
        let mut word = String::new();
        let flush = |word: &mut String, ids: &mut Vec<usize>| {
            if !word.is_empty() {
                ids.push(*self.index.get(word.as_str()).unwrap_or(&UNK));
                word.clear();
            }
        };
        for ch in text.to_lowercase().chars() {
            if ch == '"' {
                flush(&mut word, &mut ids);
                ids.push(QUOTE);
                quoted = !quoted;
            } else if quoted {
                if !ch.is_whitespace() {
                    ids.push(*self.index.get(&format!("{CHAR_PREFIX}{ch}")).unwrap_or(&UNK));
                }
            } else if ch.is_whitespace() || ",.;:!?".contains(ch) {
                flush(&mut word, &mut ids);
            } else {
                word.push(ch);
            }
        }
        flush(&mut word, &mut ids);
        ids.truncate(self.max_len);
        ids
    }

    /// Padded ids `[B, max_len]` and the padding mask (`true` at padding) for a batch.
    pub fn batch<B: Backend>(&self, texts: &[&str], device: &B::Device) -> (Tensor<B, 2, Int>, Tensor<B, 2, Bool>) {
        let (b, l) = (texts.len(), self.max_len);
        let mut ids = vec![PAD as i64; b * l];
        let mut pad = vec![true; b * l];
        for (row, text) in texts.iter().enumerate() {
            for (j, id) in self.encode(text).into_iter().enumerate() {
                ids[row * l + j] = id as i64;
                pad[row * l + j] = false;
            }
        }
        (
            Tensor::from_data(TensorData::new(ids, [b, l]), device),
            Tensor::from_data(TensorData::new(pad, [b, l]), device),
        )
    }
}

/// Shape of a [`TextEncoder`].
#[derive(Config, Debug)]
pub struct TextEncoderConfig {
    /// Vocabulary size (the tokenizer's).
    pub vocab_size: usize,
    /// Sequence length (the tokenizer's `max_len`).
    pub max_len: usize,
    /// Width of the tokens; the MMDiT's `joint_attention_dim`.
    pub dim: usize,
    /// Width of the pooled vector; the MMDiT's `pooled_projection_dim`.
    pub pooled_dim: usize,
    #[config(default = 2)]
    pub layers: usize,
    #[config(default = 4)]
    pub heads: usize,
}

impl TextEncoderConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> TextEncoder<B> {
        TextEncoder {
            token_embedding: EmbeddingConfig::new(self.vocab_size, self.dim).init(device),
            position_embedding: Param::from_tensor(Tensor::random(
                [self.max_len, self.dim],
                Distribution::Normal(0.0, 0.02),
                device,
            )),
            encoder: TransformerEncoderConfig::new(self.dim, 4 * self.dim, self.heads, self.layers)
                .with_dropout(0.0)
                .with_norm_first(true)
                .init(device),
            pooled_proj: LinearConfig::new(self.dim, self.pooled_dim).init(device),
        }
    }
}

/// Token embeddings + learned positions -> pre-norm transformer encoder (padding masked).
/// Tokens: the encoder output at every position (padding included, as SD3 feeds padded T5
/// tokens); pooled: a linear map of the mean over non-padding positions.
#[derive(Module, Debug)]
pub struct TextEncoder<B: Backend> {
    pub token_embedding: Embedding<B>,
    /// `[max_len, dim]`.
    pub position_embedding: Param<Tensor<B, 2>>,
    pub encoder: TransformerEncoder<B>,
    pub pooled_proj: Linear<B>,
}

impl<B: Backend> TextEncoder<B> {
    /// `ids [B, L]`, `pad [B, L]` (true at padding) -> conditioning for the MMDiT.
    pub fn forward(&self, ids: Tensor<B, 2, Int>, pad: Tensor<B, 2, Bool>) -> TextConditioning<B> {
        let [_, l] = ids.dims();
        let x = self.token_embedding.forward(ids) + self.position_embedding.val().slice([0..l]).unsqueeze::<3>();
        let tokens = self.encoder.forward(TransformerEncoderInput::new(x).mask_pad(pad.clone()));
        let keep = pad.bool_not().float().unsqueeze_dim::<3>(2);
        let count = keep.clone().sum_dim(1).clamp_min(1.0);
        let mean = (tokens.clone() * keep).sum_dim(1) / count;
        let [b, _, d] = mean.dims();
        let pooled = self.pooled_proj.forward(mean.reshape([b, d]));
        TextConditioning { tokens, pooled }
    }

    /// Tokenizes and encodes a batch of prompts.
    pub fn encode(&self, tokenizer: &WordTokenizer, prompts: &[&str], device: &B::Device) -> TextConditioning<B> {
        let (ids, pad) = tokenizer.batch::<B>(prompts, device);
        self.forward(ids, pad)
    }
}

/// Reads a tokenizer from `vocab.json`.
pub fn read_tokenizer(path: &Path) -> Result<WordTokenizer, crate::model::ModelError> {
    let text = std::fs::read_to_string(path).map_err(|source| crate::model::ModelError::Io { path: path.to_path_buf(), source })?;
    let t: WordTokenizer = serde_json::from_str(&text)
        .map_err(|e| crate::model::ModelError::Config { path: path.to_path_buf(), message: e.to_string() })?;
    Ok(WordTokenizer::from_vocab(t.vocab, t.max_len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_strings_are_spelled_and_unknown_words_map_to_unk() {
        let t = WordTokenizer::new(["a", "sign", "that", "says", "red", "circle"], "ab7".chars(), 8);
        let ids = t.encode("A sign that says \"AB 7\", red zebra");
        let words: Vec<&str> = ids.iter().map(|i| t.vocab[*i].as_str()).collect();
        assert_eq!(words, ["a", "sign", "that", "says", "\"", "'a", "'b", "'7"]);
        assert_eq!(t.encode("red zebra circle"), vec![t.index["red"], UNK, t.index["circle"]]);
        let (ids, pad) = t.batch::<burn::backend::Flex>(&["red circle"], &Default::default());
        assert_eq!(ids.into_data().convert::<i64>().into_vec::<i64>().unwrap()[..3], [t.index["red"] as i64, t.index["circle"] as i64, 0]);
        assert_eq!(pad.into_data().into_vec::<bool>().unwrap()[..3], [false, false, true]);
    }
}
