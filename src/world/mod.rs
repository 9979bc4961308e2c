//! The synthetic world: a CPU-scale stand-in for the paper's four tasks.
//!
//! Prompts come from a small grammar ([`grammar`]) over shapes ([`shape`]), colours
//! ([`palette`]), counts, positions, short strings ([`font`]) and styles, and mean a
//! [`Spec`] ([`spec`]); [`prompts`] generates the shipped train and test sets; [`render`]
//! draws 32 x 32 ground-truth images ([`Image32`]); [`pairs`] makes (image, caption) training
//! pairs with a controlled fraction of wrong captions (using [`degrade`] for quality);
//! [`detect`] (objects) and [`read`] (text) are the detectors the rewards in
//! [`crate::reward`] are built on.
//!
//! Nothing here depends on Burn: images are plain `f32` buffers ([`Image32::to_chw`]) and all
//! randomness comes from a caller's [`rand::RngCore`] (ChaCha8 for the shipped sets).

pub mod degrade;
pub mod detect;
pub mod font;
pub mod grammar;
pub mod image;
pub mod pairs;
pub mod palette;
pub mod prompts;
pub mod read;
pub mod render;
pub mod shape;
pub mod spec;

pub(crate) mod random;

pub use grammar::parse;
pub use image::{IMAGE_SIZE, Image32};
pub use spec::{Family, Spec, Task};
