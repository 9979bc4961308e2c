//! Networks, their weights and LoRA: the SD3-family MMDiT ([`mmdit`]), the SD3 VAE ([`vae`]),
//! the CLIP and T5 text encoders ([`text`]), weight files in diffusers, Stability and
//! safetensors layouts ([`weights`]), LoRA adapters with per-sample routing ([`lora`]), and the
//! single-forward tool of `flow-opd model forward` ([`forward_io`]). Pipelines that put these
//! together live in [`crate::pipeline`].

pub mod error;
pub mod forward_io;
pub mod lora;
pub mod mmdit;
pub mod text;
pub mod vae;
pub mod weights;

pub use error::ModelError;
pub use mmdit::{Mmdit, MmditConfig, QkNorm};
