// Diagnostic beside `flow-opd gradient-snr`: the signal-to-noise ratio of the Flow-GRPO gradient
// at a base for one world task, or for `brightness` (mean pixel value on composition prompts,
// served on loopback: a reward GRPO is known to climb, the control), with the settings of the
// shipped GenEval teacher (CPS or the Flow-GRPO SDE, same_latent, LoRA r 8, lr 1e-3, beta 0.04).
// With ITERATIONS, then trains that many GRPO iterations (learning rate LR, KL weight BETA of the
// `reference_kl` form KL, `public` by default) and prints the reward by thirds.
//   cargo run --release --example gradient_snr -- BASE TASK PROMPTS G ESTIMATES [cps|sde] [ITERATIONS LR BETA [KL]]
#[path = "../tests/suite/common/fake_server.rs"]
mod fake_server;

use std::path::Path;

use burn::backend::{Autodiff, Flex};
use fake_server::{FakeServer, Reply, mean_pixel_scores};
use flow_opd::pipeline::world::Pipeline;
use flow_opd::train::grpo::{GrpoConfig, grpo_trainer};
use flow_opd::train::grpo_snr::measure;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let (base, task) = (Path::new(&a[1]), a[2].as_str());
    let (prompts, g, k): (usize, usize, usize) = (a[3].parse().unwrap(), a[4].parse().unwrap(), a[5].parse().unwrap());
    let kind = a.get(6).map_or("cps", String::as_str);
    let (lr, beta) = (a.get(8).map_or("1e-3", String::as_str), a.get(9).map_or("0.04", String::as_str));
    let kl = a.get(10).map_or("public", String::as_str);
    let server = FakeServer::start(|_, request| Reply::json(200, mean_pixel_scores(request)));
    let (rewarded, remote) = match task {
        "brightness" => ("composition", format!("remote_rewards = {{ composition = {{ url = \"{}\", name = \"brightness\" }} }}", server.url)),
        t => (t, String::new()),
    };
    let device = Default::default();
    let pipeline = Pipeline::<Flex>::load(base, &device).unwrap();
    let config: GrpoConfig = toml::from_str(&format!(
        "iterations = 1\nrollout = {{ prompts = {prompts}, group_size = {g}, kind = \"{kind}\", same_latent = true }}\n\
         lora = {{ rank = 8, alpha = 16.0 }}\noptim = {{ lr = {lr} }}\nbeta = {beta}\nreference_kl = \"{kl}\"\n\
         partitions = [{{ tasks = [\"{rewarded}\"], rewards = {{ {rewarded} = 1.0 }} }}]\n{remote}\n"
    ))
    .unwrap();
    let mut trainer = grpo_trainer::<Autodiff<Flex>>(pipeline, None, config, &device).unwrap();
    let snr = measure(&mut trainer, 0, k, &device, |k, s, norm| {
        eprintln!("estimate {k}: reward {:.4}, zero-std groups {:.2}, within-group share {:.2}, |g| {norm:.3e}", s.reward, s.groups.zero_std_fraction, s.groups.within_share)
    })
    .unwrap();
    print!("{task} ({kind}) at {}: {}", base.display(), snr.report(prompts * g));
    let iterations: usize = a.get(7).map_or(0, |n| n.parse().unwrap());
    let rewards: Vec<f64> = (0..iterations).map(|_| trainer.iteration(&device).unwrap().reward).collect();
    for (i, third) in rewards.chunks(iterations.div_ceil(3).max(1)).enumerate() {
        println!("training, third {}: reward {:.4}", i + 1, third.iter().sum::<f64>() / third.len() as f64);
    }
}
