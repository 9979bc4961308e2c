//! flow-opd: post-training of flow-matching text-to-image models (SD3.5-Medium's MMDiT first)
//! with Flow-OPD, on Burn. See `README.md` for the map.

pub mod bench;
pub mod kernels;
pub mod device;
pub mod flow;
pub mod train;
pub mod eval;
pub mod model;
pub mod recipe;
pub mod pipeline;
pub mod io;
pub mod reward;
pub mod world;

/// The backends flow-opd runs on: Burn's, extended with the fused kernels ([`kernels`]).
pub use kernels::{AutodiffBackend, Backend};
