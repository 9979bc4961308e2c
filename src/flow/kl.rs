//! The Flow-OPD objective (paper Eq. 10-16, docs/reference.md section 4): the closed-form KL between
//! the student's and a teacher's SDE transitions, its dense weight `w(s)`, and the
//! distillation loss with Manifold Anchor Regularization (MAR).

use burn::tensor::Tensor;
use crate::Backend;

use super::sde::StepSigmas;

/// How the squared velocity difference is reduced over a sample's latent elements, with the
/// matching weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlReduction {
    /// The paper's exact KL: sum over elements, `w(s) = (-d)/2 (sigma_t (1-s)/(2s) + 1/sigma_t)^2`
    /// (Eq. 15).
    #[default]
    Sum,
    /// The public Flow-OPD / Flow-GRPO convention: mean over elements, weight
    /// `d^2/2 (sigma_t (1-s)/(2s) + 1/sigma_t)^2` (their KL divides by `2 sigma_t^2` only).
    Mean,
}

/// The dense KL weight `w(s)` of paper Eq. 12/15 at a step with diffusion level `sigma_t`
/// (`sigma_t = a sqrt(s / (1 - s~))`), for `reduction`:
///
/// `KL(N(mu_student, sigma_t^2 (-d) I) || N(mu_target, same)) = w(s) ||v_student - v_target||^2`.
pub fn kl_weight(step: StepSigmas, sigma_t: f64, reduction: KlReduction) -> f64 {
    let s = step.sigma;
    let d = step.dt();
    let factor = sigma_t * (1.0 - s) / (2.0 * s) + 1.0 / sigma_t;
    match reduction {
        KlReduction::Sum => -d / 2.0 * factor * factor,
        KlReduction::Mean => d * d / 2.0 * factor * factor,
    }
}

/// `||a - b||^2` per sample, summed or averaged over the `C, H, W` elements.
pub fn squared_distance<B: Backend>(a: Tensor<B, 4>, b: Tensor<B, 4>, reduction: KlReduction) -> Tensor<B, 1> {
    super::reduce_per_sample((a - b).powi_scalar(2), reduction == KlReduction::Mean)
}

/// The Gaussian KL between two transitions with the same isotropic covariance, computed from
/// their means: `||mu_student - mu_target||^2 / (2 std^2)` per sample, `std = sigma_t sqrt(-d)`
/// for [`KlReduction::Sum`]; Flow-GRPO's `mean(..) / (2 sigma_t^2)` for [`KlReduction::Mean`].
/// (Used to check [`kl_weight`] and by GRPO's KL-to-reference term.)
pub fn gaussian_kl<B: Backend>(
    mean_student: Tensor<B, 4>,
    mean_target: Tensor<B, 4>,
    step: StepSigmas,
    sigma_t: f64,
    reduction: KlReduction,
) -> Tensor<B, 1> {
    let variance = match reduction {
        KlReduction::Sum => sigma_t * sigma_t * (-step.dt()),
        KlReduction::Mean => sigma_t * sigma_t,
    };
    squared_distance(mean_student, mean_target, reduction) / (2.0 * variance)
}

/// Which KL to the reference policy Flow-GRPO penalises, per sample (mean over elements).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReferenceKl {
    /// Flow-GRPO's public code for both step kinds: `mean ||mu - mu_ref||^2 / (2 std_dev_t^2)`
    /// ([`gaussian_kl`] with [`KlReduction::Mean`]; `std_dev_t` is the SDE's `sigma_t`, without
    /// `sqrt(-d)`, or the CPS `st`). With CPS its policy gradient comes from the unnormalised
    /// log-prob `-(x' - mu)^2`, whose gradient is `2 st^2` times a Gaussian score, while this
    /// KL keeps the `1 / (2 st^2)`: against the policy gradient the penalty is `1 / (2 st^2)`
    /// times what the same `beta` gives with the Gaussian log-prob (with shift 3, T = 10,
    /// a = 0.7: 0.68, 0.75, 0.86, 1.0, 1.26, 1.74, 2.9, 8.1 over the first eight steps, and
    /// about 7,900 at the ninth, s' = 0.00893, where it swamps every other term).
    #[default]
    Public,
    /// The KL between the two transition densities that [`super::log_prob`] defines, so `beta`
    /// weighs it in the policy gradient's own units: `E_{x' ~ pi}[log_prob(x'; mu) -
    /// log_prob(x'; mu_ref)]`, i.e. `mean ||mu - mu_ref||^2 / (2 sigma_t^2 (-d))` for `sde` and
    /// `mean ||mu - mu_ref||^2` for `cps` (`-(x' - mu)^2` is a Gaussian of variance 1/2, up to
    /// its constant).
    LogProb,
}

/// GRPO's per-sample KL between the policy's transition (mean `mean`) and the reference's
/// (`mean_ref`) at `step`, as `form` defines it (`std_dev_t` as [`super::step_mean`] returns it).
pub fn reference_kl<B: Backend>(
    mean: Tensor<B, 4>,
    mean_ref: Tensor<B, 4>,
    step: StepSigmas,
    std_dev_t: f64,
    kind: super::SdeKind,
    form: ReferenceKl,
) -> Tensor<B, 1> {
    match (form, kind) {
        (ReferenceKl::Public, _) => gaussian_kl(mean, mean_ref, step, std_dev_t, KlReduction::Mean),
        (ReferenceKl::LogProb, super::SdeKind::Sde) => {
            let std = super::transition_std(std_dev_t, step, super::SdeKind::Sde);
            squared_distance(mean, mean_ref, KlReduction::Mean) / (2.0 * std * std)
        }
        (ReferenceKl::LogProb, super::SdeKind::Cps) => squared_distance(mean, mean_ref, KlReduction::Mean),
    }
}

/// Per-sample distillation loss `w(s) ||v_student - SG(v_target)||^2` (paper Eq. 16): the
/// target is detached, so gradients reach only the student.
pub fn distillation_loss<B: Backend>(
    v_student: Tensor<B, 4>,
    v_target: Tensor<B, 4>,
    weight: f64,
    reduction: KlReduction,
) -> Tensor<B, 1> {
    squared_distance(v_student, v_target.detach(), reduction) * weight
}

/// The per-sample Flow-OPD loss and its two parts.
#[derive(Debug, Clone)]
pub struct OpdLoss<B: Backend> {
    /// `L_OPD + lambda L_MAR`, `[B]`.
    pub total: Tensor<B, 1>,
    /// `w(s) ||v_student - SG(v_teacher R(c))||^2`, `[B]`.
    pub distill: Tensor<B, 1>,
    /// `w(s) ||v_student - SG(v_anchor)||^2`, `[B]` (zeros without an anchor).
    pub anchor: Tensor<B, 1>,
}

/// `L_total = w(s) ||v_s - SG(v_teacher)||^2 + lambda w(s) ||v_s - SG(v_anchor)||^2` per sample
/// (paper Eq. 16 with MAR, docs/reference.md section 4). `v_teacher` holds, for each sample, the
/// velocity of the teacher its prompt is routed to; `v_anchor` the task-agnostic quality
/// teacher's. With `lambda = 0` or no anchor the MAR term is absent.
pub fn opd_loss<B: Backend>(
    v_student: Tensor<B, 4>,
    v_teacher: Tensor<B, 4>,
    v_anchor: Option<Tensor<B, 4>>,
    weight: f64,
    mar_lambda: f64,
    reduction: KlReduction,
) -> OpdLoss<B> {
    let distill = distillation_loss(v_student.clone(), v_teacher, weight, reduction);
    let anchor = match v_anchor {
        Some(v_anchor) if mar_lambda != 0.0 => distillation_loss(v_student, v_anchor, weight, reduction),
        _ => distill.zeros_like(),
    };
    let total = distill.clone() + anchor.clone() * mar_lambda;
    OpdLoss { total, distill, anchor }
}
