//! How much a world model uses the characters of a text prompt: the flow-matching loss of
//! ground-truth renders of text test prompts under their own caption, under the same caption
//! with other characters (same length), and under the empty caption, at several noise levels.
//! A model that has not learned which glyph each character is scores the same loss under the
//! right and the wrong characters; the gap between them grows as it learns. The loss is a
//! finer measure of that progress than OCR, which counts only glyphs drawn well enough to read.
//!
//!     cargo run --release --example caption_sensitivity -- [MODEL_DIR] [PROMPTS]
//!
//! MODEL_DIR defaults to models/world_base, PROMPTS (the first text test prompts) to 128.

use std::path::PathBuf;

use burn::backend::Flex;
use burn::tensor::{Tensor, TensorData};
use flow_opd::flow::SeededNoise;
use flow_opd::pipeline::TextToImage;
use flow_opd::pipeline::world::Pipeline;
use flow_opd::world::Spec;
use flow_opd::world::font::ALPHABET;
use flow_opd::world::prompts::{Split, shipped_prompts};
use flow_opd::world::render::{Layout, render_with};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = PathBuf::from(args.first().map_or("models/world_base", String::as_str));
    let count: usize = match args.get(1) {
        Some(n) => n.parse().map_err(|e| format!("PROMPTS `{n}`: {e}"))?,
        None => 128,
    };
    let device = Default::default();
    let pipeline = Pipeline::<Flex>::load(&dir, &device).map_err(|e| format!("{}: {e}", dir.display()))?;

    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let alphabet: Vec<char> = ALPHABET.chars().collect();
    let (mut pixels, mut right, mut wrong) = (Vec::new(), Vec::new(), Vec::new());
    for prompt in shipped_prompts(Split::Test).into_iter().filter(|p| matches!(p.spec, Spec::Text(_))).take(count) {
        let Spec::Text(t) = &prompt.spec else { unreachable!("filtered to text prompts") };
        pixels.extend(render_with(&prompt.spec, Layout::Canonical, &mut rng).to_chw());
        // every character replaced by another one
        let other: String = t
            .text
            .chars()
            .map(|c| loop {
                let d = alphabet[rng.random_range(0..alphabet.len())];
                if d != c {
                    break d;
                }
            })
            .collect();
        wrong.push(prompt.text.replace(&format!("\"{}\"", t.text), &format!("\"{other}\"")));
        right.push(prompt.text);
    }
    let n = right.len();
    let images = Tensor::<Flex, 4>::from_data(TensorData::new(pixels, [n, 3, 32, 32]), &device);
    let x0 = pipeline.encode_images(images);
    let eps: Tensor<Flex, 4> = SeededNoise::new(1).sample(x0.dims(), &device);
    let empty = vec![String::new(); n];
    let captions = [("right characters", &right), ("other characters", &wrong), ("empty caption", &empty)];
    let conds: Vec<_> = captions
        .iter()
        .map(|(_, c)| pipeline.encode_prompts(&c.iter().map(String::as_str).collect::<Vec<_>>(), &device))
        .collect();

    println!("{}: flow-matching loss of {n} ground-truth text renders (mean squared velocity error)\n", dir.display());
    println!("| sigma | right characters | other characters | empty caption | other - right | (other - right) / (empty - right) |");
    println!("|---|---|---|---|---|---|");
    for sigma in [0.2f32, 0.4, 0.6, 0.8, 0.95] {
        let x_s = x0.clone() * (1.0 - sigma) + eps.clone() * sigma;
        let target = eps.clone() - x0.clone();
        let t = Tensor::<Flex, 1>::from_floats(vec![1000.0 * sigma; n].as_slice(), &device);
        let losses: Vec<f64> = conds
            .iter()
            .map(|c| {
                let v = pipeline.transformer().forward(x_s.clone(), c.tokens.clone(), c.pooled.clone(), t.clone());
                (v - target.clone()).powi_scalar(2).mean().into_scalar() as f64
            })
            .collect();
        let gap = losses[1] - losses[0];
        println!("| {sigma} | {:.5} | {:.5} | {:.5} | {gap:+.5} | {:.3} |", losses[0], losses[1], losses[2], gap / (losses[2] - losses[0]));
    }
    Ok(())
}
