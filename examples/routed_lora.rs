//! LoRA adapters over one frozen base: the shipped world teachers loaded, each sample of a
//! batch routed to its own teacher in one batched forward, and the exact merge of two
//! adapters (the README's second library snippet).
//!
//!     cargo run --release --example routed_lora

use std::path::Path;

use burn::backend::Flex;
use burn::tensor::Tensor;
use flow_opd::flow::SeededNoise;
use flow_opd::model::lora::{ActiveAdapters, AdapterChoice, MergeMethod, combine, load_lora};
use flow_opd::pipeline::TextToImage;
use flow_opd::pipeline::world::Pipeline;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = Default::default();
    let pipeline = Pipeline::<Flex>::load(Path::new("models/world_base"), &device)?;
    let model = pipeline.transformer();
    let ocr = load_lora(Path::new("models/teachers/ocr"), model, &device)?; // PEFT or diffusers layout
    let geneval = load_lora(Path::new("models/teachers/geneval"), model, &device)?;

    let prompts = ["a sign that says \"OK\"", "two red circles"];
    let cond = pipeline.encode_prompts(&prompts, &device);
    let [c, h, w] = pipeline.latent_shape();
    let x: Tensor<Flex, 4> = SeededNoise::new(0).sample([2, c, h, w], &device);
    let timesteps = Tensor::<Flex, 1>::from_floats([500.0, 500.0], &device); // 1000 * sigma

    // Sample 0 goes to the OCR teacher, sample 1 to the GenEval teacher: one batched pass.
    let routed = ActiveAdapters::new(vec![&ocr, &geneval], &AdapterChoice::PerSample(vec![Some(0), Some(1)]), &device);
    let v = model.forward_adapted(x.clone(), cond.tokens.clone(), cond.pooled.clone(), timesteps.clone(), &routed);
    let base = model.forward_adapted(x, cond.tokens, cond.pooled, timesteps, &ActiveAdapters::none());
    let moved = (v - base).abs().mean().into_scalar();
    println!("mean |v_routed - v_base| = {moved:.5}");

    let merged = combine(&[(&ocr, 0.5), (&geneval, 0.5)], MergeMethod::Exact)?; // exact ΔW average
    println!("merged adapter: {} layers", merged.layers().count());
    Ok(())
}
