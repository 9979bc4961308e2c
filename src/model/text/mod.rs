//! The real SD3 text side: CLIP-L, CLIP-G and T5 encoders loaded from transformers weights,
//! their tokenizers, and the prompt embedding SD3's pipeline assembles from them.
//!
//! data flow: prompt -> [`tokenize`] (three id rows) -> [`clip`] x2 + [`t5`] -> [`sd3`]
//! (`prompt_embeds [B, 77 + T, D_T]`, `pooled [B, P_L + P_G]`) -> the MMDiT.

pub mod clip;
pub mod sd3;
pub mod t5;
pub mod tokenize;
pub mod weights;

use std::path::PathBuf;

pub use clip::{ClipActivation, ClipTextConfig, ClipTextModel, ClipTextOutput};
pub use sd3::{DEFAULT_T5_MAX_LENGTH, Sd3CfgEmbeds, Sd3PromptEmbeds, Sd3TextEncoders};
pub use t5::{T5Activation, T5Encoder, T5EncoderConfig};
pub use tokenize::PromptTokenizer;

use crate::model::error::ModelError;

/// Why the text encoders could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    /// A weight or config file problem (names the file and key).
    #[error(transparent)]
    Model(#[from] ModelError),

    /// A tokenizer file that is missing, unreadable or unusable.
    #[error("{path}: tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },

    /// Parts of a pipeline folder that do not fit together.
    #[error("{path}: {message}")]
    Mismatch { path: PathBuf, message: String },
}
