// Diagnostic: how much of a reward's variance lies within a prompt's group (what GRPO's
// advantages can see) and how many groups score all alike, under several rollout settings of one
// base (README, Training results: what holds the teachers back).
//   cargo run --release --example group_outcomes -- BASE TASK PROMPTS G
use std::collections::BTreeMap;
use std::path::Path;

use burn::backend::Flex;
use flow_opd::pipeline::world::Pipeline;
use flow_opd::reward::RewardSet;
use flow_opd::train::scoring::score;
use flow_opd::train::grpo_math::group_spread;
use flow_opd::train::prompts::training_prompts;
use flow_opd::train::rollout::{RolloutConfig, rollout};
use flow_opd::world::Task;
use rand::SeedableRng;
use rand::seq::SliceRandom;

type B = Flex;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let base = Path::new(&a[1]);
    let task: Task = serde_json::from_value(serde_json::Value::String(a[2].clone())).unwrap();
    let (n, g): (usize, usize) = (a[3].parse().unwrap(), a[4].parse().unwrap());
    let device = Default::default();
    let pipeline = Pipeline::<B>::load(base, &device).unwrap();
    let mut all = training_prompts(&[task], &BTreeMap::new()).unwrap();
    all.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(7));
    let prompts = &all[..n];
    let rewards = RewardSet::new(&BTreeMap::new()).unwrap();
    let weights = BTreeMap::from([(task, 1.0)]);
    for (label, extra) in [
        ("cps a=0.7 same_latent", "kind = \"cps\"\nsame_latent = true"),
        ("sde a=0.7 same_latent", "same_latent = true"),
        ("cps a=0.7", "kind = \"cps\""),
        ("ode (a=0)", "noise_level = 0.0"),
    ] {
        let config: RolloutConfig = toml::from_str(&format!("prompts = {n}\ngroup_size = {g}\n{extra}")).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let t0 = std::time::Instant::now();
        let ro = rollout(&pipeline, None, prompts, &config, &mut rng, &device).unwrap();
        let (values, _) = score(&ro.prompts, &ro.images, &weights, &rewards).unwrap();
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        let spread = group_spread(&values, g);
        println!(
            "{label:24} mean {mean:.4}  within-group share of the variance {:.0}%  zero-variance groups {:.0} of {n}  ({:.0} s)",
            100.0 * spread.within_share,
            spread.zero_std_fraction * n as f64,
            t0.elapsed().as_secs_f64()
        );
    }
}
