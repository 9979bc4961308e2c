//! Rewards to training values: the weighted rewards of a prompt partition for each sample
//! ([`score`]), and the exchange that gives every data-parallel peer the whole batch's rewards
//! and per-task metrics ([`gather_scores`]).

use std::collections::{BTreeMap, BTreeSet};

use image::RgbImage;

use super::parallel::Peer;
use super::prompts::TaskPrompt;
use crate::Backend;
use crate::reward::{RewardInput, RewardScore, RewardSet};
use crate::world::Task;

/// Scores `images` with the partition's weighted rewards; returns training values and, per
/// task of the prompts, the mean eval metric of that task's own reward. Each reward is asked
/// once per batch (a remote reward is one request).
pub fn score(
    prompts: &[TaskPrompt],
    images: &[RgbImage],
    weights: &BTreeMap<Task, f64>,
    rewards: &RewardSet,
) -> Result<(Vec<f64>, BTreeMap<Task, f64>), String> {
    let run = |task: Task, rows: &[usize]| -> Result<Vec<RewardScore>, String> {
        let inputs: Vec<RewardInput> =
            rows.iter().map(|&i| RewardInput::new(images[i].clone(), prompts[i].text.clone()).with_task(prompts[i].task)).collect();
        rewards.get(task).score(&inputs).map_err(|e| e.to_string())
    };
    let mean_metric = |scores: &[(usize, RewardScore)], task: Task| {
        let own: Vec<f64> = scores.iter().filter(|(i, _)| prompts[*i].task == task).map(|(_, s)| s.metric as f64).collect();
        own.iter().sum::<f64>() / own.len().max(1) as f64
    };
    let present: BTreeSet<Task> = prompts.iter().map(|p| p.task).collect();
    let all: Vec<usize> = (0..images.len()).collect();
    let mut total = vec![0.0; images.len()];
    let mut metrics = BTreeMap::new();
    for (&task, &weight) in weights {
        let scores: Vec<(usize, _)> = all.iter().copied().zip(run(task, &all)?).collect();
        for (i, s) in &scores {
            total[*i] += weight * s.value as f64;
        }
        if present.contains(&task) {
            metrics.insert(task, mean_metric(&scores, task));
        }
    }
    for &task in present.iter().filter(|t| !weights.contains_key(t)) {
        let rows: Vec<usize> = all.iter().copied().filter(|&i| prompts[i].task == task).collect();
        let scores: Vec<(usize, _)> = rows.iter().copied().zip(run(task, &rows)?).collect();
        metrics.insert(task, mean_metric(&scores, task));
    }
    Ok((total, metrics))
}

/// A peer's scores for [`Peer::gather`]: its samples' rewards, then per task (in
/// [`Task::ALL`] order) the sum of its samples' metric and their count (0 for a task without a
/// metric in `metrics`).
pub fn encode_scores(rewards: &[f64], metrics: &BTreeMap<Task, f64>, tasks: &[Task]) -> Vec<f64> {
    let mut out = rewards.to_vec();
    for task in Task::ALL {
        let count = tasks.iter().filter(|t| **t == task).count() as f64;
        out.extend(metrics.get(&task).map_or([0.0, 0.0], |m| [m * count, count]));
    }
    out
}

/// The whole batch's rewards (peer order) and per-task mean metrics from every peer's
/// [`encode_scores`] of `samples` samples each.
pub fn decode_scores(all: &[f64], samples: usize) -> (Vec<f64>, BTreeMap<Task, f64>) {
    let width = samples + 2 * Task::ALL.len();
    let peers: Vec<&[f64]> = all.chunks(width).collect();
    let rewards = peers.iter().flat_map(|p| p[..samples].iter().copied()).collect();
    let metrics = Task::ALL
        .iter()
        .enumerate()
        .filter_map(|(k, &task)| {
            let (sum, count) = peers.iter().fold((0.0, 0.0), |(s, c), p| (s + p[samples + 2 * k], c + p[samples + 2 * k + 1]));
            (count > 0.0).then(|| (task, sum / count))
        })
        .collect();
    (rewards, metrics)
}

/// Every peer's `(rewards, metrics)` of its samples (`samples` rewards each; none for
/// metrics-only exchanges) gathered into the whole batch's rewards in peer order and the batch's
/// per-task mean metrics. A peer that failed sends its error, which then fails everywhere.
pub fn gather_scores<B: Backend>(
    peer: &Peer<B>,
    local: Result<(&[f64], &BTreeMap<Task, f64>, Vec<Task>), String>,
    samples: usize,
) -> Result<(Vec<f64>, BTreeMap<Task, f64>), String> {
    let local = local.map(|(rewards, metrics, tasks)| encode_scores(rewards, metrics, &tasks));
    let all = peer.gather(local, samples + 2 * Task::ALL.len())?;
    Ok(decode_scores(&all, samples))
}
