//! Merging LoRA adapters: folding one into the base weights, and combining several task
//! adapters into one (Flow-OPD's "merge" cold start, docs/reference.md section 4).

use burn::tensor::Tensor;
use crate::Backend;

use super::adapter::{LoraAdapter, LoraBlock, LoraLayer};
use super::target::LoraTarget;
use crate::model::mmdit::Mmdit;

/// How [`combine`] merges adapters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MergeMethod {
    /// Exact weighted average of the updates, `ΔW = Σ_k w_k (alpha_k / r_k) B_k A_k`. The result
    /// is itself a LoRA adapter: the factors are stacked along the rank (rank `Σ r_k`,
    /// scale 1), so no information is lost.
    #[default]
    Exact,
    /// Average `A` and `B` separately, `A = Σ w_k A_k`, `B = Σ w_k B_k`, scale `alpha / r`
    /// (what the public Flow-OPD merge script does; not the average of the updates). Needs
    /// equal ranks and alphas.
    AverageFactors,
}

/// Why adapters could not be combined.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("nothing to merge: no adapters given")]
    Empty,
    #[error("adapter {index} has {found} blocks, adapter 0 has {expected}")]
    BlockCount { index: usize, expected: usize, found: usize },
    #[error(
        "`transformer_blocks.{block}.{target}`: averaging A and B needs every adapter to adapt the layer with the same rank and alpha ({message}); use the exact merge"
    )]
    Incompatible { block: usize, target: LoraTarget, message: String },
}

/// Combines `adapters` with weights `w_k` (use `1/K` each for the plain average) into one
/// adapter by `method`. Layers adapted by only some adapters get only their updates.
pub fn combine<B: Backend>(
    adapters: &[(&LoraAdapter<B>, f64)],
    method: MergeMethod,
) -> Result<LoraAdapter<B>, MergeError> {
    let Some((first, _)) = adapters.first() else { return Err(MergeError::Empty) };
    let blocks = first.blocks.len();
    for (index, (adapter, _)) in adapters.iter().enumerate() {
        if adapter.blocks.len() != blocks {
            return Err(MergeError::BlockCount { index, expected: blocks, found: adapter.blocks.len() });
        }
    }
    let mut merged = Vec::with_capacity(blocks);
    for block in 0..blocks {
        let mut layers = Vec::with_capacity(LoraTarget::ALL.len());
        for target in LoraTarget::ALL {
            let present: Vec<(&LoraLayer<B>, f64)> =
                adapters.iter().filter_map(|(a, w)| a.blocks[block].layer(target).map(|l| (l, *w))).collect();
            layers.push(match (present.is_empty(), method) {
                (true, _) => None,
                (false, MergeMethod::Exact) => Some(stack_exact(&present)),
                (false, MergeMethod::AverageFactors) => {
                    if present.len() != adapters.len() {
                        return Err(MergeError::Incompatible {
                            block,
                            target,
                            message: format!("only {} of {} adapters adapt it", present.len(), adapters.len()),
                        });
                    }
                    Some(average_factors(&present).map_err(|message| MergeError::Incompatible {
                        block,
                        target,
                        message,
                    })?)
                }
            });
        }
        merged.push(LoraBlock { layers });
    }
    Ok(LoraAdapter { blocks: merged })
}

/// `[A_1 .. A_K]` along the rank and `[w_1 s_1 B_1; ..; w_K s_K B_K]`, scale 1: exactly
/// `Σ w_k s_k A_k B_k`.
fn stack_exact<B: Backend>(layers: &[(&LoraLayer<B>, f64)]) -> LoraLayer<B> {
    let downs = layers.iter().map(|(l, _)| l.down.val()).collect();
    let ups = layers.iter().map(|(l, w)| l.up.val() * (w * l.scale())).collect();
    let down = Tensor::cat(downs, 1);
    let up = Tensor::cat(ups, 0);
    let rank = down.dims()[1];
    LoraLayer::new(down, up, rank as f64)
}

fn average_factors<B: Backend>(layers: &[(&LoraLayer<B>, f64)]) -> Result<LoraLayer<B>, String> {
    let (first, _) = layers[0];
    for (layer, _) in layers {
        if layer.rank() != first.rank() || layer.alpha != first.alpha {
            return Err(format!(
                "rank {} alpha {} vs rank {} alpha {}",
                layer.rank(),
                layer.alpha,
                first.rank(),
                first.alpha
            ));
        }
    }
    let down = layers.iter().map(|(l, w)| l.down.val() * *w).reduce(|a, b| a + b).expect("non-empty");
    let up = layers.iter().map(|(l, w)| l.up.val() * *w).reduce(|a, b| a + b).expect("non-empty");
    Ok(LoraLayer::new(down, up, first.alpha))
}

/// Folds `weight * ΔW` of `adapter` into the base weights: the returned model without adapters
/// computes what `model` computes with `adapter` (scaled by `weight`).
pub fn fold_into<B: Backend>(mut model: Mmdit<B>, adapter: &LoraAdapter<B>, weight: f64) -> Mmdit<B> {
    for (block, target, layer) in adapter.layers() {
        let delta = layer.delta_weight() * weight;
        let linear = model.transformer_blocks[block]
            .linear_mut(target)
            .unwrap_or_else(|| panic!("transformer_blocks.{block}.{target}: the model has no such layer; check with LoraAdapter::check_fits"));
        linear.weight = linear.weight.clone().map(|w| w + delta);
    }
    model
}
