//! The DiffusionNFT objective (Zheng et al., ICLR 2026; docs/diffusion_nft.md): negative-aware
//! fine-tuning on the forward process. A clean sample `x0` with reward-derived optimality
//! `r` in [0, 1] is re-noised to `x_t = (1 - t) x0 + t eps`; the policy's velocity `v` and the
//! old policy's `v_old` (no gradient) form the implicit positive policy
//! `v+ = beta v + (1 - beta) v_old` and the implicit negative `v- = (1 + beta) v_old - beta v`.
//! Each is turned into an `x0` prediction `x_t - t v±` and regressed onto `x0` with the adaptive
//! weight `w± = sg(mean |x0± - x0|)` (floored at 1e-5):
//!
//! `L± = mean((x0± - x0)^2) / w±`,
//! `loss = m mean_N(r L+ / beta + (1 - r) L- / beta) + kl_weight mean_N(mean((v - v_ref)^2))`,
//!
//! with `m = adv_clip_max` and `r = clamp(clip(A, -m, m) / m / 2 + 1/2, 0, 1)` from the
//! advantage `A`. Means over latent elements as upstream.

use burn::tensor::Tensor;

use crate::Backend;

/// The settings of the objective (upstream's names: `beta` is `config.beta`, `kl_weight` is
/// `config.train.beta`, `adv_clip_max` is `config.train.adv_clip_max`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NftObjective {
    pub beta: f64,
    pub kl_weight: f64,
    pub adv_clip_max: f64,
}

impl NftObjective {
    /// The optimality `r` in [0, 1] of each advantage.
    pub fn optimality(&self, advantages: &[f64]) -> Vec<f64> {
        let m = self.adv_clip_max;
        advantages.iter().map(|a| (a.clamp(-m, m) / m / 2.0 + 0.5).clamp(0.0, 1.0)).collect()
    }
}

/// The loss and its parts.
pub struct NftLoss<B: Backend> {
    /// The scalar to differentiate, `[1]`.
    pub loss: Tensor<B, 1>,
    /// `L+` and `L-` per sample, `[N]`.
    pub positive: Tensor<B, 1>,
    pub negative: Tensor<B, 1>,
    /// `mean((v - v_ref)^2)` per sample, `[N]` (`None` without a reference).
    pub kl: Option<Tensor<B, 1>>,
}

/// The DiffusionNFT loss for clean latents `x0`, noised latents `xt` at levels `t` (`[N]`), the
/// policy's velocity `v` (the one with gradient), the old policy's `v_old` and the base's
/// `v_ref` (both treated as constants), and the optimality `r` (`[N]`).
#[allow(clippy::too_many_arguments)]
pub fn nft_loss<B: Backend>(
    x0: Tensor<B, 4>,
    xt: Tensor<B, 4>,
    t: Tensor<B, 1>,
    v: Tensor<B, 4>,
    v_old: Tensor<B, 4>,
    v_ref: Option<Tensor<B, 4>>,
    r: Tensor<B, 1>,
    objective: NftObjective,
) -> NftLoss<B> {
    let [n, c, h, w] = x0.dims();
    let per_sample = |x: Tensor<B, 4>| x.reshape([n, c * h * w]).mean_dim(1).reshape([n]);
    let t4 = t.reshape([n, 1, 1, 1]);
    let beta = objective.beta;
    let v_old = v_old.detach();
    let positive_v = v.clone() * beta + v_old.clone() * (1.0 - beta);
    let negative_v = v_old * (1.0 + beta) - v.clone() * beta;
    let regress = |velocity: Tensor<B, 4>| {
        let error = xt.clone() - t4.clone() * velocity - x0.clone();
        let weight = per_sample(error.clone().abs()).detach().clamp_min(1e-5);
        per_sample(error.powi_scalar(2)) / weight
    };
    let positive = regress(positive_v);
    let negative = regress(negative_v);
    let policy = (r.clone() * positive.clone() + (r.neg() + 1.0) * negative.clone()).mean() * (objective.adv_clip_max / beta);
    let kl = v_ref.map(|v_ref| per_sample((v - v_ref.detach()).powi_scalar(2)));
    let loss = match &kl {
        Some(kl) if objective.kl_weight != 0.0 => policy + kl.clone().mean() * objective.kl_weight,
        _ => policy,
    };
    NftLoss { loss, positive, negative, kl }
}

/// The old policy's decay after `step` optimizer steps, for upstream's `decay_type` 0, 1 and 2:
/// `old <- decay old + (1 - decay) policy` after every iteration.
///
/// - 0: 0 (the old policy is the policy: the on-policy case);
/// - 1: `min(0.001 step, 0.5)`;
/// - 2: 0 for the first 75 steps, then `min(0.0075 (step - 75), 0.999)`.
pub fn old_policy_decay(decay_type: u8, step: usize) -> Result<f64, String> {
    let (flat, rate, hold) = match decay_type {
        0 => (0, 0.0, 0.0),
        1 => (0, 0.001, 0.5),
        2 => (75, 0.0075, 0.999),
        other => return Err(format!("`decay_type` = {other}: 0, 1 or 2")),
    };
    Ok(if step < flat { 0.0 } else { ((step - flat) as f64 * rate).min(hold) })
}
