//! Parity of the MMDiT forward with diffusers' `SD3Transformer2DModel` on the fixtures made by
//! `tools/make_mmdit_fixtures.py` (random-weight SD3- and SD3.5-style models; non-square
//! latents, crop path, full table, batch > 1, non-integer timesteps, f16/bf16 storage).

use crate::common;

use std::path::Path;

use flow_opd::Backend;
use common::{Case, cases, case, read_all, read_tensor, rel_l2};
use flow_opd::model::forward_io::ForwardInputs;
use flow_opd::model::weights::{ModelSource, SaveDtype, save_diffusers};
use flow_opd::model::{Mmdit, MmditConfig};

/// Relative L2 error allowed against diffusers (acceptance: below 1e-4).
const TOLERANCE: f64 = 1e-4;

fn run<B: Backend>(model: &Mmdit<B>, case: &Case, device: &B::Device) -> Vec<f32> {
    let inputs = ForwardInputs::read(&case.inputs()).unwrap();
    let out = inputs.run(model, &case.inputs(), device).unwrap();
    assert_eq!(out.dims(), [case.batch, 4, case.height, case.width], "{}", case.case);
    out.into_data().convert::<f32>().into_vec::<f32>().unwrap()
}

fn load<B: Backend>(path: &Path, config: Option<MmditConfig>, device: &B::Device) -> Mmdit<B> {
    ModelSource::open(path, config).unwrap_or_else(|e| panic!("{e}")).load::<B>(device).unwrap_or_else(|e| panic!("{e}"))
}

fn expected(case: &Case) -> Vec<f32> {
    read_tensor(&case.expected(), "sample").values
}

/// Every fixture case on one backend, each within [`TOLERANCE`] of diffusers.
fn all_cases_match<B: Backend>(device: &B::Device) {
    let cases = cases();
    assert!(cases.len() >= 6, "fixture cases missing: {}", cases.len());
    for case in cases {
        let model = load::<B>(&case.model_dir(), None, device);
        let err = rel_l2(&run(&model, &case, device), &expected(&case));
        println!("{}: relative L2 error {err:.3e}", case.case);
        assert!(err < TOLERANCE, "{}: relative L2 error {err:e} vs diffusers", case.case);
    }
}

#[cfg(feature = "flex")]
type Cpu = burn::backend::Flex;

#[cfg(feature = "flex")]
#[test]
fn forward_matches_diffusers_on_flex() {
    all_cases_match::<Cpu>(&Default::default());
}

#[cfg(feature = "wgpu")]
#[test]
fn forward_matches_diffusers_on_wgpu() {
    all_cases_match::<burn::backend::Wgpu>(&burn::backend::wgpu::WgpuDevice::DefaultDevice);
}

/// The Stability single-file layout (fused qkv, swapped final modulations) gives the same
/// output as the diffusers folder holding the same weights.
#[cfg(feature = "flex")]
#[test]
fn stability_single_file_gives_identical_outputs() {
    let device = Default::default();
    for (model, case_name) in [("sd3_tiny", "sd3_b2_square"), ("sd35_tiny", "sd35_b2_nonsquare")] {
        let case = case(case_name);
        let folder = common::fixtures().join(model);
        let file = common::fixtures().join(format!("{model}_stability.safetensors"));
        let config = MmditConfig::from_file(&folder.join("config.json")).unwrap();
        let from_folder = run(&load::<Cpu>(&folder, None, &device), &case, &device);
        let from_file = run(&load::<Cpu>(&file, Some(config), &device), &case, &device);
        assert_eq!(from_folder, from_file, "{model}: Stability layout differs from diffusers layout");
    }
}

/// A Stability file of an SD3.5-style model carries enough to infer its config (head width from
/// the qk-norm scale, dual-attention blocks from `attn2`).
#[test]
fn stability_config_is_inferred_from_shapes() {
    let file = common::fixtures().join("sd35_tiny_stability.safetensors");
    let inferred = ModelSource::open(&file, None).unwrap().config;
    let folder = MmditConfig::from_file(&common::fixtures().join("sd35_tiny/config.json")).unwrap();
    assert_eq!(inferred, MmditConfig { sample_size: inferred.sample_size, ..folder });
}

/// Sharded files with an index load the same weights as one file.
#[cfg(feature = "flex")]
#[test]
fn sharded_folder_gives_identical_outputs() {
    let device = Default::default();
    let case = case("sd35_b2_nonsquare");
    let sharded = common::fixtures().join("sd35_tiny_sharded");
    assert!(ModelSource::open(&sharded, None).unwrap().files.len() >= 2);
    let a = run(&load::<Cpu>(&case.model_dir(), None, &device), &case, &device);
    let b = run(&load::<Cpu>(&sharded, None, &device), &case, &device);
    assert_eq!(a, b);
}

/// Saving in diffusers layout writes exactly diffusers' keys, shapes and values (so
/// `from_pretrained` loads it; `tools/check_export.py` runs that check with diffusers) and the
/// saved folder loads back to the same outputs. f16 storage rounds like torch's `.half()`.
#[cfg(feature = "flex")]
#[test]
fn export_round_trips_in_diffusers_layout() {
    let device = Default::default();
    let source_dir = common::fixtures().join("sd35_tiny");
    let source = ModelSource::open(&source_dir, None).unwrap();
    let model = source.load::<Cpu>(&device).unwrap();
    let out = tempfile::tempdir().unwrap();
    save_diffusers(&model, &source.config, out.path(), SaveDtype::F32).unwrap();

    let original = read_all(&source_dir.join("diffusion_pytorch_model.safetensors"));
    let saved = read_all(&out.path().join("diffusion_pytorch_model.safetensors"));
    assert_eq!(original.len(), saved.len());
    for (a, b) in original.iter().zip(&saved) {
        assert_eq!((&a.name, &a.shape), (&b.name, &b.shape));
        assert_eq!(a.values, b.values, "{}", a.name);
    }
    let reread = MmditConfig::from_file(&out.path().join("config.json")).unwrap();
    assert_eq!(reread, source.config);

    save_diffusers(&model, &source.config, out.path(), SaveDtype::F16).unwrap();
    let half = read_all(&out.path().join("diffusion_pytorch_model.safetensors"));
    let reference = read_all(&common::fixtures().join("sd35_tiny_f16/diffusion_pytorch_model.safetensors"));
    for (a, b) in half.iter().zip(&reference) {
        assert_eq!((&a.name, &a.values), (&b.name, &b.values), "f16 rounding of {}", a.name);
    }
}
