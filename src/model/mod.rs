//! Models: the SD3-family MMDiT and its weight files.

pub mod codec;
pub mod error;
pub mod forward_io;
pub mod lora;
pub mod mmdit;
pub mod pipeline;
pub mod sd3_pipeline;
pub mod t2i;
pub mod text;
pub mod text_encoder;
pub mod vae;
pub mod weights;

pub use error::ModelError;
pub use mmdit::{Mmdit, MmditConfig, QkNorm};
