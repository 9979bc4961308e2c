// Diagnostic: can GRPO on this base climb a dense, smooth, prompt-conditional reward? The reward
// (served on loopback through the remote-reward protocol) compares each image with the canonical
// ground-truth render of its prompt: on the render's object pixels, 1 - mean |x - r| per channel;
// elsewhere, 1 - saturation (max - min channel) of the image; the two halves averaged. The metric
// is the composition reward's strict accuracy, so `train_composition` stays GenEval-like.
// Settings as the shipped GenEval teacher (CPS, same_latent, 4 x 8, lr 1e-3, beta 0.04 unless
// given).
//   cargo run --release --example oracle_grpo -- BASE ITERATIONS LR BETA [PROMPT_FILE]
#[path = "../tests/suite/common/fake_server.rs"]
mod fake_server;

use std::path::Path;

use base64::Engine as _;
use burn::backend::{Autodiff, Flex};
use fake_server::{FakeServer, Reply, Seen};
use flow_opd::pipeline::world::Pipeline;
use flow_opd::reward::{CompositionReward, Reward, RewardInput};
use flow_opd::train::grpo::{GrpoConfig, grpo_trainer};
use flow_opd::world::detect::colour_map;
use flow_opd::world::image::Image32;
use flow_opd::world::parse;
use flow_opd::world::render::{Layout, render_with};
use rand::SeedableRng;

type B = Flex;

fn oracle(image: &Image32, prompt: &str) -> f32 {
    let spec = parse(prompt).unwrap();
    let seed = prompt.bytes().fold(1469598103934665603u64, |h, b| (h ^ b as u64).wrapping_mul(1099511628211));
    let render = render_with(&spec, Layout::Canonical, &mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    let object = colour_map(&render);
    let (mut on, mut n_on, mut off, mut n_off) = (0.0, 0, 0.0, 0);
    for ((x, r), o) in image.pixels().iter().zip(render.pixels()).zip(&object) {
        if o.is_some() {
            on += 1.0 - (0..3).map(|c| (x[c] - r[c]).abs()).sum::<f32>() / 3.0;
            n_on += 1;
        } else {
            let (hi, lo) = (x[0].max(x[1]).max(x[2]), x[0].min(x[1]).min(x[2]));
            off += 1.0 - (hi - lo);
            n_off += 1;
        }
    }
    0.5 * on / n_on.max(1) as f32 + 0.5 * off / n_off.max(1) as f32
}

fn scores(request: &Seen) -> serde_json::Value {
    let images = request.body["images"].as_array().unwrap();
    let prompts = request.body["prompts"].as_array().unwrap();
    let scores: Vec<_> = images
        .iter()
        .zip(prompts)
        .map(|(b64, prompt)| {
            let png = base64::engine::general_purpose::STANDARD.decode(b64.as_str().unwrap()).unwrap();
            let rgb = image::load_from_memory_with_format(&png, image::ImageFormat::Png).unwrap().to_rgb8();
            let prompt = prompt.as_str().unwrap();
            let image = Image32::from_rgb_image(&rgb).unwrap();
            let strict = CompositionReward::default().score(&[RewardInput::from_image32(&image, prompt)]).unwrap()[0].metric;
            serde_json::json!({"value": oracle(&image, prompt), "metric": strict})
        })
        .collect();
    serde_json::json!({ "scores": scores })
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let base = Path::new(&a[1]);
    let (iterations, lr, beta): (usize, f64, f64) = (a[2].parse().unwrap(), a[3].parse().unwrap(), a[4].parse().unwrap());
    let prompt_files = match a.get(5) {
        Some(file) => format!("prompt_files = {{ composition = \"{file}\" }}"),
        None => String::new(),
    };
    let server = FakeServer::start(|_, request| Reply::json(200, scores(request)));
    let device = Default::default();
    let pipeline = Pipeline::<B>::load(base, &device).unwrap();
    let config: GrpoConfig = toml::from_str(&format!(
        r#"
iterations = {iterations}
beta = {beta}
rollout = {{ prompts = 4, group_size = 8, steps = 10, noise_level = 0.7, guidance = 4.5, kind = "cps", same_latent = true }}
lora = {{ rank = 8, alpha = 16.0 }}
optim = {{ lr = {lr} }}
partitions = [{{ tasks = ["composition"], rewards = {{ composition = 1.0 }} }}]
remote_rewards = {{ composition = {{ url = "{}", name = "oracle" }} }}
{prompt_files}
"#,
        server.url
    ))
    .unwrap();
    let mut trainer = grpo_trainer::<Autodiff<B>>(pipeline, None, config, &device).unwrap();
    let t0 = std::time::Instant::now();
    let mut log = Vec::new();
    for it in 1..=iterations {
        let s = trainer.iteration(&device).unwrap();
        let strict = s.task_metrics.values().next().copied().unwrap_or(f64::NAN);
        eprintln!("it {it:3} reward {:.4} strict {strict:.3} kl {:.4} ({:.0} s)", s.reward, s.kl, t0.elapsed().as_secs_f64());
        log.push((s.reward, strict, s.kl));
    }
    let third = iterations / 3;
    for (k, chunk) in log.chunks(third.max(1)).enumerate() {
        let n = chunk.len() as f64;
        let mean = |f: fn(&(f64, f64, f64)) -> f64| chunk.iter().map(f).sum::<f64>() / n;
        println!("part {k}: reward {:.4} strict {:.3} kl {:.4}", mean(|r| r.0), mean(|r| r.1), mean(|r| r.2));
    }
}
