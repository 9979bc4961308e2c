//! LoRA adapters for the MMDiT: several named adapters over one frozen base, per-sample
//! routing in one batched forward, merging, and PEFT / diffusers file layouts.
//!
//! - [`target`]: which linear layers can be adapted ([`LoraTarget`], diffusers names).
//! - [`adapter`]: [`LoraConfig`], [`LoraAdapter`], and [`ActiveAdapters`] (no adapter, one,
//!   or one per sample) consumed by [`crate::model::Mmdit::forward_adapted`].
//! - [`merge`]: fold into the base; combine adapters exactly or by averaging factors.
//! - [`io`]: save and load PEFT (`adapter_model.safetensors` + `adapter_config.json`) and
//!   diffusers (`pytorch_lora_weights.safetensors`, `transformer.` prefix) layouts; flow-opd
//!   writes both into one folder; convert between them without a model.

pub mod adapter;
pub mod io;
pub mod merge;
pub mod target;

pub use adapter::{ActiveAdapters, AdapterChoice, BlockAdapters, LoraAdapter, LoraBlock, LoraConfig, LoraLayer};
pub use io::{LoraFormat, LoraIoError, convert_lora, load_lora, save_adapter, save_adapter_atomic, save_lora};
pub use merge::{MergeError, MergeMethod, combine, fold_into};
pub use target::LoraTarget;
