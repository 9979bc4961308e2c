//! SD3's prompt embedding from its three text encoders, as diffusers'
//! `StableDiffusion3Pipeline.encode_prompt` computes it (`clip_skip=None`, one image per prompt,
//! the same prompt for all three encoders):
//!
//! ```text
//! c_L, p_L = CLIP-L(tok_1(prompt)):  hidden_states[-2] [B, 77, D_L],  projected pooled [B, P_L]
//! c_G, p_G = CLIP-G(tok_2(prompt)):  hidden_states[-2] [B, 77, D_G],  projected pooled [B, P_G]
//! t        = T5(tok_3(prompt))       [B, T, D_T]     (T = max_sequence_length)
//! prompt_embeds = concat_seq(zero_pad_features(concat_features(c_L, c_G), D_T), t)  [B, 77 + T, D_T]
//! pooled        = concat_features(p_L, p_G)                                         [B, P_L + P_G]
//! ```
//!
//! For SD3.5 Medium: `[B, 77 + 256, 4096]` and `[B, 2048]`. Classifier-free guidance encodes
//! the negative prompt (`""` by default) the same way.

use std::path::Path;

use burn::module::Module;
use burn::tensor::Tensor;
use crate::Backend;

use crate::model::text::TextError;
use crate::model::text::clip::ClipTextModel;
use crate::model::text::t5::T5Encoder;
use crate::model::text::tokenize::PromptTokenizer;

/// diffusers' default `max_sequence_length` for SD3.
pub const DEFAULT_T5_MAX_LENGTH: usize = 256;

/// The conditioning an SD3 transformer takes for a batch of prompts.
#[derive(Debug, Clone)]
pub struct Sd3PromptEmbeds<B: Backend> {
    /// `encoder_hidden_states`: `[B, 77 + T, D_T]`.
    pub prompt_embeds: Tensor<B, 3>,
    /// `pooled_projections`: `[B, P_L + P_G]`.
    pub pooled: Tensor<B, 2>,
}

impl<B: Backend> Sd3PromptEmbeds<B> {
    /// Stacks `self` after `first` on the batch axis (the CFG batch `[negative, positive]`).
    pub fn after(self, first: Self) -> Self {
        Self {
            prompt_embeds: Tensor::cat(vec![first.prompt_embeds, self.prompt_embeds], 0),
            pooled: Tensor::cat(vec![first.pooled, self.pooled], 0),
        }
    }
}

/// The positive and negative conditionings for classifier-free guidance.
#[derive(Debug, Clone)]
pub struct Sd3CfgEmbeds<B: Backend> {
    pub positive: Sd3PromptEmbeds<B>,
    pub negative: Sd3PromptEmbeds<B>,
}

impl<B: Backend> Sd3CfgEmbeds<B> {
    /// The CFG batch `[negative; positive]` (`2B` rows).
    pub fn batched(self) -> Sd3PromptEmbeds<B> {
        self.positive.after(self.negative)
    }
}

/// SD3's text side: CLIP-L, CLIP-G, T5 and their tokenizers.
#[derive(Debug)]
pub struct Sd3TextEncoders<B: Backend> {
    /// `text_encoder` (CLIP-L with projection).
    pub clip_l: ClipTextModel<B>,
    /// `text_encoder_2` (CLIP-G with projection).
    pub clip_g: ClipTextModel<B>,
    /// `text_encoder_3` (T5 encoder).
    pub t5: T5Encoder<B>,
    pub tokenizer: PromptTokenizer,
    pub tokenizer_2: PromptTokenizer,
    /// Pads / cuts to the T5 sequence length `T`.
    pub tokenizer_3: PromptTokenizer,
}

impl<B: Backend> Sd3TextEncoders<B> {
    /// Loads from a diffusers SD3 pipeline folder (`text_encoder{,_2,_3}/`, `tokenizer{,_2,_3}/`),
    /// with every parameter frozen (`no_grad`).
    /// CLIP prompts have the first tokenizer's `model_max_length` ids (77), as in diffusers;
    /// T5 prompts have `t5_max_length` ids (diffusers' `max_sequence_length`).
    pub fn load(dir: &Path, t5_max_length: usize, device: &B::Device) -> Result<Self, TextError> {
        // Frozen: SD3 post-training never updates the text encoders.
        let clip_l = ClipTextModel::load(&dir.join("text_encoder"), device)?.1.no_grad();
        let clip_g = ClipTextModel::load(&dir.join("text_encoder_2"), device)?.1.no_grad();
        let t5 = T5Encoder::load(&dir.join("text_encoder_3"), device)?.1.no_grad();
        let tokenizer = PromptTokenizer::from_folder(&dir.join("tokenizer"), None)?;
        let tokenizer_2 = PromptTokenizer::from_folder(&dir.join("tokenizer_2"), Some(tokenizer.max_length))?;
        let tokenizer_3 = PromptTokenizer::from_folder(&dir.join("tokenizer_3"), Some(t5_max_length))?;
        let encoders = Self { clip_l, clip_g, t5, tokenizer, tokenizer_2, tokenizer_3 };
        encoders.check_widths(dir)?;
        Ok(encoders)
    }

    fn check_widths(&self, dir: &Path) -> Result<(), TextError> {
        let clip = self.clip_l.hidden_size() + self.clip_g.hidden_size();
        if clip > self.t5.d_model() {
            return Err(TextError::Mismatch {
                path: dir.to_path_buf(),
                message: format!(
                    "the CLIP features ({} + {} = {clip}) are wider than T5's d_model ({}), so they cannot be zero-padded to it",
                    self.clip_l.hidden_size(),
                    self.clip_g.hidden_size(),
                    self.t5.d_model()
                ),
            });
        }
        for (name, tok, clip) in [("tokenizer", &self.tokenizer, &self.clip_l), ("tokenizer_2", &self.tokenizer_2, &self.clip_g)] {
            if tok.max_length > clip.max_positions() {
                return Err(TextError::Mismatch {
                    path: tok.dir.clone(),
                    message: format!("{name} gives {} ids but its CLIP has {} positions", tok.max_length, clip.max_positions()),
                });
            }
        }
        Ok(())
    }

    /// One CLIP's contribution: `(hidden_states[-2] [B, 77, D], projected pooled [B, P])`.
    /// `which` is 0 for CLIP-L, 1 for CLIP-G.
    pub fn encode_clip(&self, which: usize, prompts: &[&str]) -> Result<(Tensor<B, 3>, Tensor<B, 2>), TextError> {
        let (model, tokenizer) = match which {
            0 => (&self.clip_l, &self.tokenizer),
            _ => (&self.clip_g, &self.tokenizer_2),
        };
        let device = model.token_embedding.weight.device();
        let ids = tokenizer.encode_tensor::<B>(prompts, &device)?;
        let out = model.forward(ids);
        Ok((out.penultimate(), out.pooled))
    }

    /// T5's last hidden state `[B, T, D_T]`.
    pub fn encode_t5(&self, prompts: &[&str]) -> Result<Tensor<B, 3>, TextError> {
        let device = self.t5.shared.weight.device();
        let ids = self.tokenizer_3.encode_tensor::<B>(prompts, &device)?;
        Ok(self.t5.forward(ids))
    }

    /// `encode_prompt`'s `(prompt_embeds, pooled_prompt_embeds)` for `prompts`.
    pub fn encode(&self, prompts: &[&str]) -> Result<Sd3PromptEmbeds<B>, TextError> {
        let (clip_l, pooled_l) = self.encode_clip(0, prompts)?;
        let (clip_g, pooled_g) = self.encode_clip(1, prompts)?;
        let t5 = self.encode_t5(prompts)?;
        let clip = Tensor::cat(vec![clip_l, clip_g], 2);
        let [batch, clip_len, clip_width] = clip.dims();
        let width = t5.dims()[2];
        let clip = if clip_width < width {
            let zeros = Tensor::zeros([batch, clip_len, width - clip_width], &clip.device());
            Tensor::cat(vec![clip, zeros], 2)
        } else {
            clip
        };
        Ok(Sd3PromptEmbeds { prompt_embeds: Tensor::cat(vec![clip, t5], 1), pooled: Tensor::cat(vec![pooled_l, pooled_g], 1) })
    }

    /// Positive and negative conditionings for classifier-free guidance; diffusers encodes the
    /// negative prompt (`""` when none is given) once per prompt.
    pub fn encode_for_cfg(&self, prompts: &[&str], negative_prompt: &str) -> Result<Sd3CfgEmbeds<B>, TextError> {
        let positive = self.encode(prompts)?;
        let negatives = vec![negative_prompt; prompts.len()];
        let negative = self.encode(&negatives)?;
        Ok(Sd3CfgEmbeds { positive, negative })
    }
}
