// Diagnostic: which composition prompts a policy never, sometimes or always gets right, per
// GenEval category, with the rollouts of `recipes/experiments/calibration/geneval_grpo_big.toml`
// (CPS, steps 0-2 stochastic at noise 0.7, 10 steps, CFG 4.5, one initial noise per group).
// A group whose G samples all fail gives group-relative advantages nothing to lift
// (docs/experiments/world_calibration.md, "Flow-GRPO needs the paper's batch for GenEval").
//   cargo run --release --example stuck_prompts -- MODEL ADAPTER|- PROMPTS G
use std::collections::BTreeMap;
use std::path::Path;

use burn::backend::Flex;
use flow_opd::model::lora::load_lora;
use flow_opd::pipeline::world::Pipeline;
use flow_opd::reward::{RewardInput, RewardSet};
use flow_opd::train::prompts::training_prompts;
use flow_opd::train::rollout::{RolloutConfig, rollout};
use flow_opd::world::prompts::Prompt;
use flow_opd::world::{Family, Task};
use rand::SeedableRng;
use rand::seq::SliceRandom;

type B = Flex;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 5 {
        eprintln!("usage: stuck_prompts MODEL ADAPTER|- PROMPTS G");
        std::process::exit(2);
    }
    let (n, g): (usize, usize) = (a[3].parse().expect("PROMPTS: a number"), a[4].parse().expect("G: a number"));
    let device = Default::default();
    let pipeline = Pipeline::<B>::load(Path::new(&a[1]), &device).unwrap_or_else(|e| panic!("{}: {e}", a[1]));
    let adapter = (a[2] != "-").then(|| load_lora(Path::new(&a[2]), &pipeline.model.transformer, &device).unwrap_or_else(|e| panic!("{}: {e}", a[2])));
    let mut all = training_prompts(&[Task::Composition], &BTreeMap::new()).unwrap();
    all.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(7));
    let prompts = &all[..n.min(all.len())];
    let config: RolloutConfig = toml::from_str(&format!(
        "prompts = {n}\ngroup_size = {g}\nsteps = 10\nnoise_level = 0.7\nguidance = 4.5\nkind = \"cps\"\nsame_latent = true\nsde_window = {{ start = 0, end = 3 }}\nmicro_batch = 96"
    ))
    .unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let ro = rollout(&pipeline, adapter.as_ref(), prompts, &config, &mut rng, &device).unwrap();
    let inputs: Vec<RewardInput> =
        ro.prompts.iter().zip(&ro.images).map(|(p, i)| RewardInput::new(i.clone(), p.text.clone()).with_task(p.task)).collect();
    let scores = RewardSet::new(&BTreeMap::new()).unwrap().get(Task::Composition).score(&inputs).unwrap();
    // Per category: groups never / sometimes / always right, and the mean accuracy.
    let mut rows: BTreeMap<usize, (Family, [usize; 3], f64, usize)> = BTreeMap::new();
    for (group, chunk) in scores.chunks(g).enumerate() {
        let family = Prompt::parse(&ro.prompts[group * g].text).expect("a world prompt").family();
        let right = chunk.iter().filter(|s| s.metric >= 0.5).count();
        let k = Family::COMPOSITION.iter().position(|f| *f == family).expect("a composition category");
        let row = rows.entry(k).or_insert((family, [0; 3], 0.0, 0));
        row.1[if right == 0 { 0 } else if right == g { 2 } else { 1 }] += 1;
        row.2 += right as f64;
        row.3 += g;
    }
    println!("{:14} {:>6} {:>8} {:>6} {:>10} {:>6}", "category", "groups", "accuracy", "never", "sometimes", "always");
    let mut total = ([0usize; 3], 0.0, 0usize);
    for (family, counts, right, samples) in rows.values() {
        println!("{:14} {:>6} {:>8.3} {:>6} {:>10} {:>6}", family.name(), counts.iter().sum::<usize>(), right / *samples as f64, counts[0], counts[1], counts[2]);
        (0..3).for_each(|i| total.0[i] += counts[i]);
        total.1 += right;
        total.2 += samples;
    }
    let t = total.0;
    println!("{:14} {:>6} {:>8.3} {:>6} {:>10} {:>6}", "all", t.iter().sum::<usize>(), total.1 / total.2 as f64, t[0], t[1], t[2]);
}
