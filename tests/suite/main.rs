//! The integration tests, one module per area, built as one test binary: the generic model
//! and trainer code is compiled once instead of once per file (`cargo test --release --test
//! suite opd::` runs one area, `--test suite opd::micro` one test).

mod common;

mod bad_input;
mod checkpointing;
mod flow_fixtures;
mod flow_objective;
mod grpo;
mod half_precision;
mod kernels;
mod lora;
mod lora_files;
mod mmdit_parity;
mod model_errors;
mod multinode;
mod nft;
mod opd;
mod outage;
mod parallel;
mod real_ocr;
mod remote_reward;
mod report;
mod resume;
mod sample;
mod sampler;
mod sd35_medium_keys;
mod sd3_lora;
mod sd3_pipeline;
mod sd3_text_parity;
mod sd3_training;
mod sd3_vae_parity;
mod world_pipeline;
