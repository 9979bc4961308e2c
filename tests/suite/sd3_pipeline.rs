//! The whole SD3 pipeline against diffusers' `StableDiffusion3Pipeline` on the tiny random
//! SD3.5-style folder of `tools/make_sd3_pipeline_fixtures.py` (`tests/fixtures/sd3_tiny/`):
//! from the same initial latents, two prompts (one non-ASCII), 4 Euler steps, CFG 4.5 and
//! T5 length 32, the final latents agree within 1e-3 relative L2 and the decoded images within
//! 1e-3 (and one 8-bit level); `flow-opd sample` writes PNGs of the requested size from the
//! folder; a folder missing a component is refused with its path.

use crate::common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::backend::Flex;
use burn::tensor::{Tensor, TensorData};
use common::{read_all, rel_l2};
use flow_opd::pipeline::generate::GenerateConfig;
use flow_opd::model::lora::ActiveAdapters;
use flow_opd::pipeline::sd3::{InitialLatents, Sd3Pipeline, Sd3SampleConfig, to_rgb_images};
use flow_opd::model::weights::NamedTensor;
use flow_opd::pipeline::sample::{SampleRequest, Sd3SampleOptions, run_sample_with};

type B = Flex;

const LATENT_TOLERANCE: f64 = 1e-3;
const IMAGE_TOLERANCE: f64 = 1e-3;

fn folder() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd3_tiny")
}

fn reference() -> BTreeMap<String, NamedTensor> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd3_pipeline/reference.safetensors");
    read_all(&path).into_iter().map(|t| (t.name.clone(), t)).collect()
}

/// The settings the fixture was made with (`reference.json`).
struct Settings {
    prompts: Vec<String>,
    steps: usize,
    guidance: f64,
    height: usize,
    width: usize,
    t5_length: usize,
}

fn settings() -> Settings {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd3_pipeline/reference.json");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    Settings {
        prompts: json["prompts"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()).collect(),
        steps: json["num_inference_steps"].as_u64().unwrap() as usize,
        guidance: json["guidance_scale"].as_f64().unwrap(),
        height: json["height"].as_u64().unwrap() as usize,
        width: json["width"].as_u64().unwrap() as usize,
        t5_length: json["max_sequence_length"].as_u64().unwrap() as usize,
    }
}

fn tensor(t: &NamedTensor) -> Tensor<B, 4> {
    let shape: [usize; 4] = t.shape.clone().try_into().expect("4-D reference tensor");
    Tensor::from_data(TensorData::new(t.values.clone(), shape), &Default::default())
}

fn values(t: Tensor<B, 4>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
}

fn load(t5_length: usize) -> Sd3Pipeline<B> {
    Sd3Pipeline::<B>::load(&folder(), t5_length, &Default::default()).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn four_steps_and_decode_match_diffusers() {
    let s = settings();
    let reference = reference();
    let pipeline = load(s.t5_length);
    assert_eq!(pipeline.schedule.shift, 3.0, "scheduler_config.json's shift");
    assert_eq!(pipeline.default_size(), (s.height, s.width), "sample_size x VAE factor, as diffusers' default");

    // The schedule diffusers ran.
    let sigmas = pipeline.schedule.sigmas(s.steps);
    let expected_sigmas = &reference["sigmas"].values;
    assert_eq!(sigmas.len(), expected_sigmas.len());
    for (ours, theirs) in sigmas.iter().zip(expected_sigmas) {
        assert!((ours - theirs).abs() < 1e-6, "sigmas {sigmas:?} vs diffusers {expected_sigmas:?}");
    }

    let prompts: Vec<&str> = s.prompts.iter().map(String::as_str).collect();
    assert!(prompts.iter().any(|p| !p.is_ascii()), "one prompt exercises non-ASCII text");
    let config = Sd3SampleConfig {
        steps: s.steps,
        guidance: s.guidance,
        height: s.height,
        width: s.width,
        negative_prompt: String::new(),
    };
    let initial = tensor(&reference["initial_latents"]);
    let latents = pipeline
        .generate(&prompts, InitialLatents::Latents(initial.clone()), &config, &ActiveAdapters::none())
        .unwrap_or_else(|e| panic!("{e}"));
    let expected = &reference["final_latents"];
    assert_eq!(latents.dims().to_vec(), expected.shape);
    let err = rel_l2(&values(latents.clone()), &expected.values);
    println!("final latents after {} steps: relative L2 error {err:.3e}", s.steps);
    assert!(err < LATENT_TOLERANCE, "final latents: relative L2 error {err:.3e} >= {LATENT_TOLERANCE:e}");
    // The run is far from its start, so agreeing is not agreeing on the noise.
    let moved = rel_l2(&values(initial), &expected.values);
    assert!(moved > 0.1, "the 4 steps move the latents (relative change {moved:.3})");

    // diffusers' images are NHWC in [0, 1]; ours NCHW.
    let images = &reference["images"];
    let [n, h, w, c]: [usize; 4] = images.shape.clone().try_into().unwrap();
    assert_eq!((h, w, c), (s.height, s.width, 3));
    let nchw: Tensor<B, 4> = tensor(images).permute([0, 3, 1, 2]);
    let expected_pixels = values(nchw.clone());

    // The decoder alone, on diffusers' own final latents.
    let decoded_theirs = pipeline.decode(tensor(expected));
    let err_decode = rel_l2(&values(decoded_theirs), &expected_pixels);
    println!("decode of diffusers' latents: relative L2 error {err_decode:.3e}");
    assert!(err_decode < IMAGE_TOLERANCE, "decode: relative L2 error {err_decode:.3e}");

    // End to end: our latents decoded.
    let decoded = pipeline.decode(latents);
    let err_images = rel_l2(&values(decoded.clone()), &expected_pixels);
    println!("images end to end: relative L2 error {err_images:.3e}");
    assert!(err_images < IMAGE_TOLERANCE, "images: relative L2 error {err_images:.3e}");

    // 8-bit images: numpy_to_pil's round(x * 255) of diffusers' floats, within one level.
    let ours = to_rgb_images(decoded);
    assert_eq!(ours.len(), n);
    let theirs = to_rgb_images(nchw);
    let mut max_diff = 0;
    for (a, b) in ours.iter().zip(&theirs) {
        assert_eq!(a.dimensions(), (s.width as u32, s.height as u32));
        for (pa, pb) in a.pixels().zip(b.pixels()) {
            for k in 0..3 {
                max_diff = max_diff.max((pa[k] as i32 - pb[k] as i32).abs());
            }
        }
    }
    println!("8-bit images: max difference {max_diff}");
    assert!(max_diff <= 1, "8-bit images differ by up to {max_diff} levels");
    let first = theirs[0].get_pixel(0, 0);
    let expected_first = [0, 1, 2].map(|k| (images.values[k] * 255.0).round_ties_even() as u8);
    assert_eq!(first.0, expected_first, "channel order and rounding of the u8 conversion");
}

#[test]
fn sample_writes_pngs_of_the_requested_size() {
    let dir = tempfile::tempdir().unwrap();
    let sampling = GenerateConfig { steps: 2, guidance: 4.5, ..Default::default() };
    let batch = SampleRequest {
        model: folder(),
        adapter: None,
        prompts: vec!["a photo of a cat".into(), "café au lait".into()],
        sampling,
        seed: 3,
        out: dir.path().join("batch"),
        scale: 1,
    };
    let options = Sd3SampleOptions { height: Some(32), width: Some(48), t5_length: 16 };
    let mut done = 0;
    let paths = run_sample_with::<B>(&batch, &options, &Default::default(), |n| done += n).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(done, 2);
    assert_eq!(paths, vec![dir.path().join("batch/0000.png"), dir.path().join("batch/0001.png")]);
    let listing = std::fs::read_to_string(dir.path().join("batch/prompts.txt")).unwrap();
    assert_eq!(listing, "0000.png\t3\ta photo of a cat\n0001.png\t4\tcafé au lait\n");
    let a = image::open(&paths[1]).unwrap().to_rgb8();
    assert_eq!(a.dimensions(), (48, 32), "width 48, height 32");
    let first = image::open(&paths[0]).unwrap().to_rgb8();
    assert!(first != a, "different prompts and seeds give different images");

    // Prompt 1 alone with its seed (4) gives the same picture as in the batch.
    let alone = SampleRequest { prompts: vec!["café au lait".into()], seed: 4, out: dir.path().join("alone.png"), ..batch };
    run_sample_with::<B>(&alone, &options, &Default::default(), |_| {}).unwrap_or_else(|e| panic!("{e}"));
    let b = image::open(dir.path().join("alone.png")).unwrap().to_rgb8();
    let max_diff = a.pixels().zip(b.pixels()).flat_map(|(p, q)| (0..3).map(move |k| (p[k] as i32 - q[k] as i32).abs())).max().unwrap();
    assert!(max_diff <= 1, "same prompt and seed, alone or in a batch: up to {max_diff} levels apart");

    // Default size: the transformer's sample_size (16) x the VAE factor (4).
    let default = SampleRequest { out: dir.path().join("default.png"), scale: 2, ..alone };
    let options = Sd3SampleOptions { t5_length: 16, ..Default::default() };
    run_sample_with::<B>(&default, &options, &Default::default(), |_| {}).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(image::open(dir.path().join("default.png")).unwrap().to_rgb8().dimensions(), (128, 128), "64 px x scale 2");
    assert!(!dir.path().join(".default.png.tmp").exists(), "the temporary file is renamed");

    // A size the patch grid cannot take is refused before sampling.
    let odd = Sd3SampleOptions { height: Some(36), width: Some(48), t5_length: 16 };
    let err = run_sample_with::<B>(&default, &odd, &Default::default(), |_| {}).unwrap_err();
    assert!(err.contains("multiples of 8") && err.contains("36"), "{err}");
}

#[test]
fn a_missing_component_or_bad_index_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("no_vae");
    std::fs::create_dir(&model).unwrap();
    common::link_folder_without(&folder(), &model, "vae");
    let err = Sd3Pipeline::<B>::load(&model, 16, &Default::default()).unwrap_err().to_string();
    let vae = model.join("vae");
    assert!(err.contains(&vae.display().to_string()) && err.contains("`vae`"), "{err}");

    // Through `flow-opd sample` too: the folder is recognised as SD3 by its model_index.json.
    let request = SampleRequest {
        model: model.clone(),
        adapter: None,
        prompts: vec!["a cat".into()],
        sampling: GenerateConfig { steps: 1, ..Default::default() },
        seed: 0,
        out: dir.path().join("out.png"),
        scale: 1,
    };
    let err = run_sample_with::<B>(&request, &Sd3SampleOptions::default(), &Default::default(), |_| {}).unwrap_err();
    assert!(err.contains(&vae.display().to_string()), "{err}");
    assert!(!dir.path().join("out.png").exists());

    // A model_index.json without a component entry.
    let bad = dir.path().join("bad_index");
    std::fs::create_dir(&bad).unwrap();
    common::link_folder_without(&folder(), &bad, "model_index.json");
    std::fs::write(bad.join("model_index.json"), r#"{"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]}"#)
        .unwrap();
    let err = Sd3Pipeline::<B>::load(&bad, 16, &Default::default()).unwrap_err().to_string();
    assert!(err.contains(&bad.join("model_index.json").display().to_string()) && err.contains("`vae`"), "{err}");
}
