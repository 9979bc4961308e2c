//! Stability AI's single-file SD3 layout (`model.diffusion_model.` prefix, the original MMDiT
//! names) mapped onto diffusers keys, and the config inferred from such a file.
//!
//! Differences from diffusers (docs/reference.md section 7): `attn.qkv` fuses q, k, v along dim 0;
//! `final_layer.adaLN_modulation.1` and the last block's `context_block.adaLN_modulation.1` store
//! `(shift, scale)` where diffusers stores `(scale, shift)`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use super::file::{StoredTensor, Transform, WeightSource};
use crate::model::error::ModelError;
use crate::model::mmdit::{MmditConfig, QkNorm};

/// The key prefix of Stability single files.
pub const PREFIX: &str = "model.diffusion_model.";

/// Whether the tensor names look like a Stability single file.
pub fn is_stability_layout(names: &[&str]) -> bool {
    names.iter().any(|n| n.starts_with(PREFIX) || n.starts_with("joint_blocks."))
}

/// Fixed (non-block) Stability names -> diffusers names.
const GLOBAL: &[(&str, &str)] = &[
    ("pos_embed", "pos_embed.pos_embed"),
    ("x_embedder.proj", "pos_embed.proj"),
    ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
    ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
    ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
    ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
    ("context_embedder", "context_embedder"),
    ("final_layer.linear", "proj_out"),
    ("final_layer.adaLN_modulation.1", "norm_out.linear"),
];

/// Per-block Stability module -> diffusers module, for `joint_blocks.{i}.<stream>.<module>`.
/// `qkv` entries are fused and split in three.
const BLOCK: &[(&str, &[&str])] = &[
    ("x_block.adaLN_modulation.1", &["norm1.linear"]),
    ("context_block.adaLN_modulation.1", &["norm1_context.linear"]),
    ("x_block.attn.qkv", &["attn.to_q", "attn.to_k", "attn.to_v"]),
    ("context_block.attn.qkv", &["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]),
    ("x_block.attn.proj", &["attn.to_out.0"]),
    ("context_block.attn.proj", &["attn.to_add_out"]),
    ("x_block.attn.ln_q", &["attn.norm_q"]),
    ("x_block.attn.ln_k", &["attn.norm_k"]),
    ("context_block.attn.ln_q", &["attn.norm_added_q"]),
    ("context_block.attn.ln_k", &["attn.norm_added_k"]),
    ("x_block.attn2.qkv", &["attn2.to_q", "attn2.to_k", "attn2.to_v"]),
    ("x_block.attn2.proj", &["attn2.to_out.0"]),
    ("x_block.attn2.ln_q", &["attn2.norm_q"]),
    ("x_block.attn2.ln_k", &["attn2.norm_k"]),
    ("x_block.mlp.fc1", &["ff.net.0.proj"]),
    ("x_block.mlp.fc2", &["ff.net.2"]),
    ("context_block.mlp.fc1", &["ff_context.net.0.proj"]),
    ("context_block.mlp.fc2", &["ff_context.net.2"]),
];

fn strip(name: &str) -> &str {
    name.strip_prefix(PREFIX).unwrap_or(name)
}

/// Splits `module.param` into (`module`, `param`) at the last dot.
fn split_param(name: &str) -> (&str, &str) {
    name.rsplit_once('.').unwrap_or((name, ""))
}

fn join(module: &str, param: &str) -> String {
    if param.is_empty() { module.to_string() } else { format!("{module}.{param}") }
}

/// Maps every tensor of a Stability file to its diffusers key(s). `last_block` is the index of
/// the context-pre-only block. A name with no diffusers counterpart is an `UnexpectedKey`.
pub fn to_diffusers(
    path: &Path,
    tensors: Vec<StoredTensor>,
    last_block: usize,
) -> Result<BTreeMap<String, WeightSource>, ModelError> {
    let mut out = BTreeMap::new();
    for stored in tensors {
        let name = strip(&stored.name).to_string();
        let unexpected = || ModelError::UnexpectedKey {
            path: path.to_path_buf(),
            key: stored.name.clone(),
            found: stored.shape.clone(),
        };
        let (module, param) = split_param(&name);
        if let Some((_, target)) = GLOBAL.iter().find(|(s, _)| *s == name || *s == module) {
            let (key, transform) = if *target == "pos_embed.pos_embed" && name == "pos_embed" {
                (target.to_string(), Transform::Identity)
            } else if name == "pos_embed" {
                return Err(unexpected());
            } else {
                let swap = module == "final_layer.adaLN_modulation.1";
                (join(target, param), if swap { Transform::SwapHalves } else { Transform::Identity })
            };
            out.insert(key, WeightSource { stored, transform });
            continue;
        }
        let Some(rest) = name.strip_prefix("joint_blocks.") else { return Err(unexpected()) };
        let Some((index, block_name)) = rest.split_once('.') else { return Err(unexpected()) };
        let Ok(index) = index.parse::<usize>() else { return Err(unexpected()) };
        let (block_module, param) = split_param(block_name);
        let Some((_, targets)) = BLOCK.iter().find(|(s, _)| *s == block_module) else {
            return Err(unexpected());
        };
        if targets.len() == 3 && stored.shape.first().is_none_or(|rows| rows % 3 != 0) {
            return Err(ModelError::BadTensor {
                path: path.to_path_buf(),
                key: stored.name.clone(),
                message: format!(
                    "fused q, k, v with shape {:?}: the first axis must be a multiple of 3",
                    stored.shape
                ),
            });
        }
        let swap = block_module == "context_block.adaLN_modulation.1" && index == last_block;
        for (i, target) in targets.iter().enumerate() {
            let transform = match (targets.len(), swap) {
                (3, _) => Transform::Rows { index: i, count: 3 },
                (_, true) => Transform::SwapHalves,
                _ => Transform::Identity,
            };
            let key = format!("transformer_blocks.{index}.{}", join(target, param));
            out.insert(key, WeightSource { stored: stored.clone(), transform });
        }
    }
    Ok(out)
}

/// Infers the diffusers config of a Stability file from its tensor shapes. The head width is
/// read from the qk-norm scale when the model has one; otherwise the SD3 convention of 64 is
/// used (pass a config explicitly for other widths).
pub fn infer_config(path: &Path, tensors: &[StoredTensor]) -> Result<MmditConfig, ModelError> {
    let by_name: BTreeMap<&str, &StoredTensor> = tensors.iter().map(|t| (strip(&t.name), t)).collect();
    let shape = |name: &str| -> Result<&[usize], ModelError> {
        by_name.get(name).map(|t| t.shape.as_slice()).ok_or_else(|| ModelError::MissingKey {
            path: path.to_path_buf(),
            key: format!("{PREFIX}{name}"),
            expected: vec![],
        })
    };
    let patch_weight = shape("x_embedder.proj.weight")?;
    let (dim, in_channels, patch) = (patch_weight[0], patch_weight[1], patch_weight[2]);
    let blocks: BTreeSet<usize> = by_name
        .keys()
        .filter_map(|n| n.strip_prefix("joint_blocks.")?.split('.').next()?.parse().ok())
        .collect();
    let has = |index: usize, module: &str| by_name.contains_key(format!("joint_blocks.{index}.{module}").as_str());
    let head_dim = match by_name.get("joint_blocks.0.x_block.attn.ln_q.weight") {
        Some(t) => t.shape[0],
        None => 64,
    };
    let table = shape("pos_embed")?;
    let side = (table[1] as f64).sqrt().round() as usize;
    let out_rows = shape("final_layer.linear.weight")?[0];
    let config = MmditConfig {
        sample_size: 128,
        patch_size: patch,
        in_channels,
        num_layers: blocks.len(),
        attention_head_dim: head_dim,
        num_attention_heads: dim / head_dim.max(1),
        joint_attention_dim: shape("context_embedder.weight")?[1],
        caption_projection_dim: dim,
        pooled_projection_dim: shape("y_embedder.mlp.0.weight")?[1],
        out_channels: out_rows / (patch * patch).max(1),
        pos_embed_max_size: Some(side),
        dual_attention_layers: blocks.iter().copied().filter(|&i| has(i, "x_block.attn2.qkv.weight")).collect(),
        qk_norm: has(0, "x_block.attn.ln_q.weight").then_some(QkNorm::RmsNorm),
    };
    config
        .validate()
        .map_err(|message| ModelError::Config { path: path.to_path_buf(), message: format!("inferred from the weights: {message}") })?;
    Ok(config)
}
