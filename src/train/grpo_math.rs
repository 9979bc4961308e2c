//! The Flow-GRPO objective's pieces (docs/reference.md section 5): group-relative advantages and the
//! clipped-ratio policy loss.

use burn::tensor::Tensor;
use crate::Backend;
use serde::{Deserialize, Serialize};

/// Which standard deviation normalises the advantages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdvantageStd {
    /// The prompt group's own std.
    Group,
    /// The std over every reward of the iteration (the public SD3 configs).
    #[default]
    Global,
}

/// `A_i = clip((R_i - mean_group(i)) / (std + 1e-4), -clip, clip)` for rewards laid out as
/// consecutive groups of `group_size` samples of the same prompt. A group whose rewards are all
/// equal gets zero advantages.
pub fn group_advantages(rewards: &[f64], group_size: usize, std: AdvantageStd, clip: f64) -> Vec<f64> {
    assert!(group_size > 0 && rewards.len() % group_size == 0, "rewards must come in whole groups of {group_size}");
    let global_std = population_std(rewards);
    rewards
        .chunks(group_size)
        .flat_map(|group| {
            let mean = group.iter().sum::<f64>() / group.len() as f64;
            let scale = match std {
                AdvantageStd::Group => population_std(group),
                AdvantageStd::Global => global_std,
            };
            group.iter().map(move |r| ((r - mean) / (scale + 1e-4)).clamp(-clip, clip)).collect::<Vec<_>>()
        })
        .collect()
}

/// [`group_advantages`] with groups made by key instead of position: the samples that share a
/// key (Flow-GRPO's per-prompt stat tracking keys them by prompt text, so a prompt drawn twice in
/// one batch forms one group of `2 G`) are normalised together.
pub fn keyed_advantages<K: Ord>(rewards: &[f64], keys: &[K], std: AdvantageStd, clip: f64) -> Vec<f64> {
    assert_eq!(rewards.len(), keys.len(), "one key per reward");
    let mut groups: std::collections::BTreeMap<&K, Vec<usize>> = std::collections::BTreeMap::new();
    for (i, key) in keys.iter().enumerate() {
        groups.entry(key).or_default().push(i);
    }
    let global_std = population_std(rewards);
    let mut advantages = vec![0.0; rewards.len()];
    for members in groups.values() {
        let group: Vec<f64> = members.iter().map(|&i| rewards[i]).collect();
        let mean = group.iter().sum::<f64>() / group.len() as f64;
        let scale = match std {
            AdvantageStd::Group => population_std(&group),
            AdvantageStd::Global => global_std,
        };
        for (&i, r) in members.iter().zip(&group) {
            advantages[i] = ((r - mean) / (scale + 1e-4)).clamp(-clip, clip);
        }
    }
    advantages
}

/// How samples form the groups of group-relative advantages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupBy {
    /// The `G` samples of each draw of a prompt (a prompt drawn twice makes two groups).
    #[default]
    Draw,
    /// Every sample of the same prompt text in the batch (Flow-GRPO's per-prompt stat tracking).
    Prompt,
}

/// How an iteration's rewards spread over its prompt groups: what group-relative advantages
/// can see. Rewards are laid out as in [`group_advantages`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GroupSpread {
    /// Groups whose rewards are all equal (zero advantages, no policy gradient; Flow-GRPO's
    /// `zero_std_ratio`).
    pub zero_std_fraction: f64,
    /// The part of `zero_std_fraction` whose common reward is below the iteration's mean: prompts
    /// the policy fails on every sample. Group-relative advantages give them no gradient, so only
    /// what is learnt on other prompts can lift them; when this share stays while the rest of
    /// the zero-std groups grow, training is sharpening what the policy already sometimes does.
    pub zero_std_low_fraction: f64,
    /// Mean within-group variance over the variance of all rewards: the share of the reward's
    /// spread that the policy gradient credits to the sampler's noise (the rest tells prompts
    /// apart). Zero when every reward is equal.
    pub within_share: f64,
}

/// [`GroupSpread`] of rewards in consecutive groups of `group_size`.
pub fn group_spread(rewards: &[f64], group_size: usize) -> GroupSpread {
    assert!(group_size > 0 && rewards.len() % group_size == 0, "rewards must come in whole groups of {group_size}");
    let groups = (rewards.len() / group_size).max(1) as f64;
    let variances: Vec<f64> = rewards.chunks(group_size).map(|g| population_std(g).powi(2)).collect();
    let total = population_std(rewards).powi(2);
    let mean = rewards.iter().sum::<f64>() / rewards.len().max(1) as f64;
    let flat: Vec<f64> = rewards.chunks(group_size).zip(&variances).filter(|(_, v)| **v < 1e-12).map(|(g, _)| g[0]).collect();
    GroupSpread {
        zero_std_fraction: flat.len() as f64 / groups,
        zero_std_low_fraction: flat.iter().filter(|r| **r < mean - 1e-12).count() as f64 / groups,
        within_share: if total < 1e-12 { 0.0 } else { variances.iter().sum::<f64>() / groups / total },
    }
}

/// Population standard deviation (numpy's default, as the public code uses).
fn population_std(values: &[f64]) -> f64 {
    let n = values.len().max(1) as f64;
    let mean = values.iter().sum::<f64>() / n;
    (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt()
}

/// The per-sample clipped surrogate `max(-A r, -A clip(r, 1 - eps, 1 + eps))` with
/// `r = exp(logp - logp_old)`; the loss is its mean. `logp_old` and `advantages` carry no
/// gradient.
pub fn clipped_policy_loss<B: Backend>(
    log_prob: Tensor<B, 1>,
    log_prob_old: Tensor<B, 1>,
    advantages: Tensor<B, 1>,
    clip_range: f64,
) -> Tensor<B, 1> {
    let ratio = (log_prob - log_prob_old.detach()).exp();
    let advantages = advantages.detach();
    let unclipped = -advantages.clone() * ratio.clone();
    let clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range);
    unclipped.max_pair(clipped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::TensorData;

    #[test]
    fn advantages_group_and_global() {
        let rewards = [1.0, 3.0, 2.0, 2.0, 0.0, 4.0];
        // Group std: group 1 = [1, 3] (mean 2, std 1), group 2 = [2, 2] (zero variance),
        // group 3 = [0, 4] (mean 2, std 2).
        let a = group_advantages(&rewards, 2, AdvantageStd::Group, 5.0);
        let expect = [-1.0 / 1.0001, 1.0 / 1.0001, 0.0, 0.0, -2.0 / 2.0001, 2.0 / 2.0001];
        for (x, e) in a.iter().zip(expect) {
            assert!((x - e).abs() < 1e-12, "{a:?}");
        }
        // Global std of all six: mean 2, variance (1+1+0+0+4+4)/6 = 10/6.
        let s = (10.0f64 / 6.0).sqrt() + 1e-4;
        let g = group_advantages(&rewards, 2, AdvantageStd::Global, 5.0);
        assert!((g[0] + 1.0 / s).abs() < 1e-12 && (g[5] - 2.0 / s).abs() < 1e-12 && g[2] == 0.0);
        // Clipping.
        let c = group_advantages(&[0.0, 0.0, 0.0, 100.0], 4, AdvantageStd::Group, 1.5);
        assert_eq!(c[3], 1.5);
        assert!(c[0] < 0.0 && c[0] > -1.0);
    }

    #[test]
    fn group_spread_splits_variance_within_and_between_groups() {
        // Groups [1, 3], [2, 2], [0, 4]: every group mean is 2, so all spread is within groups.
        let s = group_spread(&[1.0, 3.0, 2.0, 2.0, 0.0, 4.0], 2);
        assert!((s.zero_std_fraction - 1.0 / 3.0).abs() < 1e-12);
        assert!((s.within_share - 1.0).abs() < 1e-12, "{s:?}");
        // [2, 2] sits at the mean 2, not below it.
        assert_eq!(s.zero_std_low_fraction, 0.0);
        // Groups [0, 0], [1, 1]: all spread is between prompts; [0, 0] is below the mean 1/2.
        assert_eq!(group_spread(&[0.0, 0.0, 1.0, 1.0], 2), GroupSpread { zero_std_fraction: 1.0, zero_std_low_fraction: 0.5, within_share: 0.0 });
        // Groups [0, 0], [0, 1], [1, 1], [1, 1] (mean 5/8): one of the three flat groups fails every sample.
        let s = group_spread(&[0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0], 2);
        assert!(s.zero_std_fraction == 0.75 && s.zero_std_low_fraction == 0.25, "{s:?}");
        // Groups [0, 1], [1, 1]: within variances 1/4 and 0 (mean 1/8); total: mean 3/4, variance 3/16.
        let s = group_spread(&[0.0, 1.0, 1.0, 1.0], 2);
        assert!((s.within_share - (1.0 / 8.0) / (3.0 / 16.0)).abs() < 1e-12 && s.zero_std_fraction == 0.5);
        assert_eq!(s.zero_std_low_fraction, 0.0);
        // No spread at all: the one group is at the mean, not below it.
        assert_eq!(group_spread(&[0.5; 4], 4), GroupSpread { zero_std_fraction: 1.0, zero_std_low_fraction: 0.0, within_share: 0.0 });
    }

    type AD = Autodiff<Flex>;

    fn t(v: &[f32]) -> Tensor<AD, 1> {
        Tensor::from_data(TensorData::new(v.to_vec(), [v.len()]), &Default::default())
    }

    #[test]
    fn clipped_loss_matches_hand_computed_values() {
        // eps = 0.2; ratios e^0.1 = 1.10517, e^-0.5 = 0.60653, e^0.5 = 1.64872, e^0 = 1.
        let logp = t(&[0.1, -0.5, 0.5, 0.0]);
        let old = t(&[0.0, 0.0, 0.0, 0.0]);
        let adv = t(&[1.0, 1.0, -2.0, 3.0]);
        let loss = clipped_policy_loss(logp, old, adv, 0.2).into_data().into_vec::<f32>().unwrap();
        // A>0, r=1.105 inside: -1.10517. A>0, r=0.6065 < 0.8: max(-0.6065, -0.8) = -0.6065.
        // A<0, r=1.6487 > 1.2: max(3.2974, 2.4) = 3.2974. r = 1: -3.
        let expect = [-1.105_171, -0.606_531, 3.297_443, -3.0];
        for (l, e) in loss.iter().zip(expect) {
            assert!((l - e).abs() < 1e-5, "{loss:?}");
        }
    }

    #[test]
    fn on_policy_ratio_is_one_and_gradient_is_minus_a_grad_logp() {
        // logp = theta * c: on-policy (logp_old = logp), d loss_i / d theta = -A_i c_i.
        let theta = Tensor::<AD, 1>::from_data(TensorData::new(vec![0.7f32], [1]), &Default::default()).require_grad();
        let c = t(&[1.0, -2.0, 0.5]);
        let logp = theta.clone().expand([3]) * c.clone();
        let old = logp.clone().detach();
        let adv = t(&[2.0, -1.0, 0.5]);
        let ratio = (logp.clone() - old.clone()).exp().into_data().into_vec::<f32>().unwrap();
        assert!(ratio.iter().all(|r| (*r - 1.0).abs() < 1e-7));
        let loss = clipped_policy_loss(logp, old, adv, 1e-4).sum();
        let grad = theta.grad(&loss.backward()).unwrap().into_data().into_vec::<f32>().unwrap()[0];
        // -sum_i A_i c_i = -(2 + 2 + 0.25) = -4.25
        assert!((grad + 4.25).abs() < 1e-5, "{grad}");
    }

    #[test]
    fn samples_of_one_prompt_text_form_one_group() {
        // Prompt "a" drawn twice (draws 0 and 2, G = 2), "b" once: by text, "a" is one group of 4.
        let rewards = [1.0, 3.0, 10.0, 20.0, 5.0, 7.0];
        let keys = ["a", "a", "b", "b", "a", "a"];
        let by_text = keyed_advantages(&rewards, &keys, AdvantageStd::Group, 5.0);
        // "a": mean 4, population std sqrt((9 + 1 + 1 + 9) / 4) = sqrt(5); "b": mean 15, std 5.
        let s5 = 5f64.sqrt() + 1e-4;
        let expect = [-3.0 / s5, -1.0 / s5, -5.0 / 5.0001, 5.0 / 5.0001, 1.0 / s5, 3.0 / s5];
        for (a, e) in by_text.iter().zip(expect) {
            assert!((a - e).abs() < 1e-12, "{by_text:?}");
        }
        // Keyed by draw, the positional groups of `group_advantages`.
        let draws = [0, 0, 1, 1, 2, 2];
        for std in [AdvantageStd::Group, AdvantageStd::Global] {
            assert_eq!(keyed_advantages(&rewards, &draws, std, 5.0), group_advantages(&rewards, 2, std, 5.0));
        }
    }
}
