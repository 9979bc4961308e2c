//! A flow-opd adapter folder in diffusers' SD3 pipeline (`tools/check_diffusers_lora.py`):
//! `StableDiffusion3Pipeline.from_pretrained(tests/fixtures/sd3_tiny)` +
//! `load_lora_weights(tests/fixtures/sd3_lora/adapter)` (a folder written by `flow-opd lora
//! convert --to both`) from the fixed initial latents of `tests/fixtures/sd3_pipeline`, 4 steps,
//! CFG 4.5; flow-opd's pipeline with the same adapter (either file of the folder) and latents
//! gives the same decoded images within 1e-4 relative L2.

use crate::common;

use std::path::{Path, PathBuf};

use burn::backend::Flex;
use burn::tensor::{Tensor, TensorData};
use common::{read_tensor, rel_l2};
use flow_opd::model::lora::{ActiveAdapters, load_lora};
use flow_opd::model::weights::NamedTensor;
use flow_opd::pipeline::sd3::{InitialLatents, Sd3Pipeline, Sd3SampleConfig};

type B = Flex;

const IMAGE_TOLERANCE: f64 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn tensor(t: &NamedTensor) -> Tensor<B, 4> {
    let shape: [usize; 4] = t.shape.clone().try_into().expect("4-D reference tensor");
    Tensor::from_data(TensorData::new(t.values.clone(), shape), &Default::default())
}

fn values(t: Tensor<B, 4>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
}

#[test]
fn adapter_folder_gives_diffusers_pipeline_images() {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("sd3_pipeline/reference.json")).unwrap()).unwrap();
    let prompts: Vec<String> = json["prompts"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()).collect();
    let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let config = Sd3SampleConfig {
        steps: json["num_inference_steps"].as_u64().unwrap() as usize,
        guidance: json["guidance_scale"].as_f64().unwrap(),
        height: json["height"].as_u64().unwrap() as usize,
        width: json["width"].as_u64().unwrap() as usize,
        negative_prompt: String::new(),
    };
    let t5_length = json["max_sequence_length"].as_u64().unwrap() as usize;
    let device = Default::default();
    let pipeline = Sd3Pipeline::<B>::load(&fixtures().join("sd3_tiny"), t5_length, &device).unwrap_or_else(|e| panic!("{e}"));
    let initial = tensor(&read_tensor(&fixtures().join("sd3_pipeline/reference.safetensors"), "initial_latents"));
    let reference = fixtures().join("sd3_lora/reference.safetensors");
    let images = read_tensor(&reference, "images");
    let expected = values(tensor(&images).permute([0, 3, 1, 2]));
    let folder = fixtures().join("sd3_lora/adapter");
    for path in [folder.clone(), folder.join("pytorch_lora_weights.safetensors")] {
        let adapter = load_lora(&path, &pipeline.transformer, &device).unwrap_or_else(|e| panic!("{e}"));
        let latents = pipeline
            .generate(&prompts, InitialLatents::Latents(initial.clone()), &config, &ActiveAdapters::single(&adapter))
            .unwrap_or_else(|e| panic!("{e}"));
        let err_latents = rel_l2(&values(latents.clone()), &read_tensor(&reference, "final_latents").values);
        let err = rel_l2(&values(pipeline.decode(latents)), &expected);
        println!("{}: final latents rel. L2 {err_latents:.3e}, images rel. L2 {err:.3e} vs diffusers + load_lora_weights", path.display());
        assert!(err <= IMAGE_TOLERANCE, "{}: images relative L2 {err:.3e}", path.display());
    }
}
