// Diagnostic (not shipped): rejection-sampling fine-tuning. Samples G images per composition
// training prompt from the base (40-step ODE, CFG 4.5), keeps the strict successes, fits a LoRA
// on them by flow matching (the SFT trainer), saves it. Does fitting the base's own successes
// raise the success rate on the test prompts? If yes, the adapter can make success more likely.
//   cargo run --release --example raft -- BASE OUT PROMPTS G STEPS LR
use std::collections::BTreeMap;
use std::path::Path;

use burn::backend::{Autodiff, Flex};
use burn::tensor::{Tensor, TensorData};
use flow_opd::pipeline::generate::{GenerateConfig, generate};
use flow_opd::model::lora::{ActiveAdapters, LoraFormat, save_lora};
use flow_opd::pipeline::world::Pipeline;
use flow_opd::reward::{RewardInput, RewardSet};
use flow_opd::train::prompts::{TaskPrompt, training_prompts};
use flow_opd::train::sft::{SftConfig, SftData, sft_trainer};
use flow_opd::world::Task;
use flow_opd::world::image::Image32;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};

type B = Flex;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let (base, out) = (Path::new(&a[1]), Path::new(&a[2]));
    let (n_prompts, g, steps, lr): (usize, usize, usize, f64) = (a[3].parse().unwrap(), a[4].parse().unwrap(), a[5].parse().unwrap(), a[6].parse().unwrap());
    let device = Default::default();
    let pipeline = Pipeline::<B>::load(base, &device).unwrap();
    let pool = training_prompts(&[Task::Composition], &BTreeMap::new()).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let chosen: Vec<TaskPrompt> = (0..n_prompts).map(|_| pool.choose(&mut rng).unwrap().clone()).collect();
    let expanded: Vec<TaskPrompt> = chosen.iter().flat_map(|p| std::iter::repeat_n(p.clone(), g)).collect();
    let texts: Vec<&str> = expanded.iter().map(|p| p.text.as_str()).collect();
    let seeds: Vec<u64> = (0..texts.len()).map(|_| rng.random()).collect();
    let t0 = std::time::Instant::now();
    let mut done = 0;
    let images = generate(&pipeline, &ActiveAdapters::none(), &texts, &seeds, &GenerateConfig::default(), &device, |n| {
        done += n;
        if done % 256 < n {
            eprintln!("sampled {done} in {:.0} s", t0.elapsed().as_secs_f64());
        }
    })
    .unwrap();
    let rewards = RewardSet::new(&BTreeMap::new()).unwrap();
    let inputs: Vec<RewardInput> = images.iter().zip(&texts).map(|(im, t)| RewardInput::new(im.clone(), t.to_string())).collect();
    let scores = rewards.get(Task::Composition).score(&inputs).unwrap();
    let ok: Vec<usize> = (0..scores.len()).filter(|&i| scores[i].metric >= 1.0).collect();
    let mixed = (0..n_prompts).filter(|&p| {
        let s: usize = (0..g).filter(|&k| scores[p * g + k].metric >= 1.0).count();
        s > 0 && s < g
    });
    eprintln!(
        "successes {} of {} ({:.3}); prompts with mixed outcomes {} of {n_prompts}",
        ok.len(),
        scores.len(),
        ok.len() as f64 / scores.len() as f64,
        mixed.count()
    );
    let chw: Vec<f32> = ok.iter().flat_map(|&i| Image32::from_rgb_image(&images[i]).unwrap().to_chw()).collect();
    let pixels = Tensor::<B, 4>::from_data(TensorData::new(chw, [ok.len(), 3, 32, 32]), &device);
    let data = SftData { prompts: ok.iter().map(|&i| expanded[i].clone()).collect(), latents: pipeline.encode_images(pixels) };
    let config: SftConfig = toml::from_str(&format!(
        "samples_per_task = 0\nsteps = {steps}\nbatch_size = 32\nseed = 5\noptim = {{ lr = {lr} }}\nlora = {{ rank = 8, alpha = 16.0 }}"
    ))
    .unwrap();
    let mut trainer = sft_trainer::<Autodiff<B>>(pipeline, config, &device).unwrap();
    for step in 1..=steps {
        let loss = trainer.step(&data, &device).unwrap();
        if step % 50 == 0 {
            eprintln!("sft step {step}: loss {loss:.4}");
        }
    }
    save_lora(&trainer.state.ema.average, out, LoraFormat::Peft, flow_opd::model::weights::SaveDtype::F32).unwrap();
    eprintln!("saved {} ({:.0} s)", out.display(), t0.elapsed().as_secs_f64());
}
