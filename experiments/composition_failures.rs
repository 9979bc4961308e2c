// Diagnostic: why a model's composition test images fail GenEval's checks. For the evaluation's
// first 160 composition test prompts (40-step ODE unless `--steps`, CFG 4.5, seed i for prompt i) it prints every
// image's checks and detected components (colour, shape, fit to each shape), then how often a
// shape the prompt asks for is detected at all (README, Training results).
//   cargo run --release --example composition_failures -- MODEL [ADAPTER] [--summary] [--steps=N]
use std::collections::BTreeMap;
use std::path::Path;

use burn::backend::Flex;
use flow_opd::eval::{EvalConfig, eval_prompts, evaluate};
use flow_opd::model::lora::{ActiveAdapters, load_lora};
use flow_opd::pipeline::world::Pipeline;
use flow_opd::pipeline::TextToImage;
use flow_opd::reward::composition::CompositionReward;
use flow_opd::world::{Task, parse};
use flow_opd::world::detect::detect_objects;
use flow_opd::world::image::Image32;
use flow_opd::world::shape::Shape;

type B = Flex;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let summary_only = args.iter().any(|a| a == "--summary");
    let steps: Option<usize> = args.iter().find_map(|a| a.strip_prefix("--steps=")).map(|s| s.parse().expect("--steps=N"));
    let paths: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    let Some(model) = paths.first() else {
        eprintln!("usage: composition_failures MODEL [ADAPTER] [--summary] [--steps=N]");
        std::process::exit(2);
    };
    let device = Default::default();
    let pipeline = Pipeline::<B>::load(Path::new(model), &device).unwrap_or_else(|e| panic!("{model}: {e}"));
    let adapter = paths.get(1).map(|p| load_lora(Path::new(p), pipeline.transformer(), &device).unwrap_or_else(|e| panic!("{p}: {e}")));
    let adapters = adapter.as_ref().map_or_else(ActiveAdapters::none, ActiveAdapters::single);
    let mut config: EvalConfig = toml::from_str("prompts_per_task = 160").expect("a valid eval config");
    config.tasks = vec![Task::Composition];
    if let Some(steps) = steps {
        config.sampling.steps = steps;
    }
    let prompts = eval_prompts(&config).expect("the shipped test prompts");
    let result = evaluate(&pipeline, &adapters, &config, prompts, &device, |_, _| {}).expect("sampling and scoring").remove(0);
    let reward = CompositionReward::default();
    let (mut asked, mut found, mut passed) = (BTreeMap::<Shape, usize>::new(), BTreeMap::<Shape, usize>::new(), 0);
    for (i, ((image, prompt), metric)) in result.images.iter().zip(&result.prompts).zip(&result.metrics).enumerate() {
        let image = Image32::from_rgb_image(image).expect("32 x 32 images");
        let checks = reward.checks(i, &image, prompt).expect("grammar prompts");
        let pass = *metric == 1.0;
        passed += pass as usize;
        let detected = detect_objects(&image);
        let mut shapes: Vec<Shape> = parse(prompt).expect("grammar prompts").objects().iter().map(|o| o.shape).collect();
        shapes.dedup();
        for shape in shapes {
            *asked.entry(shape).or_default() += 1;
            *found.entry(shape).or_default() += detected.iter().any(|d| d.shape == Some(shape)) as usize;
        }
        if !summary_only {
            println!("{i:3} {} {prompt}", if pass { "PASS" } else { "fail" });
            println!("     checks {:?}", checks.iter().map(|c| (format!("{:?}", c.kind), c.passed)).collect::<Vec<_>>());
            for d in &detected {
                println!(
                    "     {:?}/{:?} fit {:.2}, fits (circle, square, triangle, cross) {:?}, area {}, box {}x{}",
                    d.colour,
                    d.shape,
                    d.shape_fit,
                    d.fits.map(|f| (f * 100.0).round() / 100.0),
                    d.area,
                    d.bbox.width(),
                    d.bbox.height()
                );
            }
        }
    }
    println!("passed {passed} of {}", result.prompts.len());
    for (shape, n) in &asked {
        println!("{}: detected in {} of the {n} images whose prompt asks for it", format!("{shape:?}").to_lowercase(), found[shape]);
    }
}
