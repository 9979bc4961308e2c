//! The SD3 VAE against diffusers' `AutoencoderKL` on the tiny random model of
//! `tools/make_sd3_vae_fixtures.py` (`tests/fixtures/sd3_tiny/vae/`, 3 levels 8/16/32, 2
//! resnets per level, 16 latent channels, 8 groups, f16 weights, SD3 scale and shift): the
//! encoder's mean and log-variance, the posterior sample, the scaled latents, the decoder on
//! given latents, each within 1e-4 relative L2 in f32; the real SD3 key set; and the errors of
//! a bad weight file.

use crate::common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::backend::Flex;
use burn::tensor::{Tensor, TensorData};
use common::{read_all, rel_l2};
use flow_opd::model::ModelError;
use flow_opd::pipeline::codec::LatentCodec;
use flow_opd::model::vae::weights::vae_manifest;
use flow_opd::model::vae::{AutoencoderKl, VaeConfig, VaeSource, load_vae};
use flow_opd::model::weights::{NamedTensor, SaveDtype, write_safetensors};

type B = Flex;

const TOLERANCE: f64 = 1e-4;

fn vae_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd3_tiny/vae")
}

fn reference() -> BTreeMap<String, NamedTensor> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd3_vae/reference.safetensors");
    read_all(&path).into_iter().map(|t| (t.name.clone(), t)).collect()
}

fn tensor(t: &NamedTensor) -> Tensor<B, 4> {
    let shape: [usize; 4] = t.shape.clone().try_into().expect("4-D reference tensor");
    Tensor::from_data(TensorData::new(t.values.clone(), shape), &Default::default())
}

fn values(t: Tensor<B, 4>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
}

fn load() -> AutoencoderKl<B> {
    let (config, vae) = load_vae::<B>(&vae_dir(), &Default::default()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.latent_channels, 16);
    assert_eq!((config.scaling_factor, config.shift_factor), (1.5305, Some(0.0609)));
    assert!(!config.use_quant_conv && !config.use_post_quant_conv);
    vae
}

fn check(what: &str, ours: Tensor<B, 4>, expected: &NamedTensor) -> f64 {
    assert_eq!(ours.dims().to_vec(), expected.shape, "{what}: shape");
    let err = rel_l2(&values(ours), &expected.values);
    println!("{what}: relative L2 error {err:.3e}");
    assert!(err < TOLERANCE, "{what}: relative L2 error {err:.3e} >= {TOLERANCE:e}");
    err
}

#[test]
fn encoder_matches_diffusers() {
    let vae = load();
    let r = reference();
    let images = tensor(&r["images"]);
    let posterior = vae.encode_posterior(images.clone() * 2.0 - 1.0);
    check("encoder mean", posterior.mean.clone(), &r["mean"]);
    check("encoder logvar", posterior.logvar.clone(), &r["logvar"]);
    check("posterior sample", posterior.sample_with(tensor(&r["noise"])), &r["sample"]);
    // The codec interface: [0, 1] images to scaled latents (mean - 0.0609) * 1.5305.
    assert_eq!(LatentCodec::<B>::latent_channels(&vae), 16);
    assert_eq!(LatentCodec::<B>::latent_size(&vae, 32, 32), [8, 8]);
    check("scaled latents", LatentCodec::encode(&vae, images), &r["scaled_latents"]);
}

#[test]
fn decoder_matches_diffusers() {
    let vae = load();
    let r = reference();
    let latents = tensor(&r["latents"]);
    // Raw decoder output on unscaled latents z / 1.5305 + 0.0609.
    check("decoded", vae.decode_unscaled(vae.unscale_latents(latents.clone())), &r["decoded"]);
    check("round trip (decoder on the encoder mean)", vae.decode_unscaled(tensor(&r["mean"])), &r["roundtrip"]);
    // The codec interface maps [-1, 1] to [0, 1] and clamps.
    let images = values(LatentCodec::decode(&vae, latents));
    let expected: Vec<f32> = r["decoded"].values.iter().map(|v| ((v + 1.0) * 0.5).clamp(0.0, 1.0)).collect();
    let clamped = expected.iter().filter(|v| **v == 0.0 || **v == 1.0).count();
    assert!(clamped > 0, "the fixture should exercise the clamp");
    let err = rel_l2(&images, &expected);
    assert!(err < TOLERANCE, "codec decode: relative L2 error {err:.3e}");
    // The scaling round-trips.
    let z = tensor(&r["mean"]);
    let back = values(vae.unscale_latents(vae.scale_latents(z.clone())));
    assert!(rel_l2(&back, &values(z)) < 1e-6);
}

fn parse_shape(text: &str) -> Vec<usize> {
    text.trim_matches(|c| c == '(' || c == ')')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|d| d.parse().unwrap())
        .collect()
}

#[test]
fn sd3_preset_has_exactly_the_real_checkpoint_keys() {
    // tests/data/sd3_vae_keys.tsv: the stabilityai/stable-diffusion-3.5-medium vae's header.
    let reference: BTreeMap<String, Vec<usize>> = include_str!("../data/sd3_vae_keys.tsv")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (key, shape) = l.split_once('\t').unwrap();
            (key.to_string(), parse_shape(shape))
        })
        .collect();
    let model = VaeConfig::sd3().init::<B>(&Default::default());
    let ours: BTreeMap<String, Vec<usize>> =
        vae_manifest(&model).into_iter().map(|s| (s.key, s.torch_shape)).collect();
    let missing: Vec<_> = reference.keys().filter(|k| !ours.contains_key(*k)).collect();
    let extra: Vec<_> = ours.keys().filter(|k| !reference.contains_key(*k)).collect();
    assert!(missing.is_empty() && extra.is_empty(), "missing {missing:?}\nextra {extra:?}");
    assert_eq!(ours, reference);
    let decoder: usize = ours.iter().filter(|(k, _)| k.starts_with("decoder.")).map(|(_, s)| s.iter().product::<usize>()).sum();
    assert_eq!(decoder, 49_545_475, "docs/reference.md section 8: the decoder has 49.5M values");
}

/// Copies the fixture VAE into a temporary folder with `edit` applied to its tensors.
fn edited_copy(edit: impl FnOnce(&mut Vec<NamedTensor>)) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let vae = dir.path().join("vae");
    std::fs::create_dir(&vae).unwrap();
    std::fs::copy(vae_dir().join("config.json"), vae.join("config.json")).unwrap();
    let mut tensors = read_all(&vae_dir().join("diffusion_pytorch_model.safetensors"));
    edit(&mut tensors);
    write_safetensors(&vae.join("diffusion_pytorch_model.safetensors"), &tensors, SaveDtype::F32, None).unwrap();
    (dir, vae)
}

#[test]
fn bad_weight_files_name_the_file_and_key() {
    let key = "decoder.up_blocks.1.resnets.0.conv_shortcut.weight";
    let (_dir, vae) = edited_copy(|t| t.retain(|t| t.name != key));
    // Opening a pipeline folder finds its vae/ subfolder.
    let err = VaeSource::open(vae.parent().unwrap(), None).unwrap().load::<B>(&Default::default()).unwrap_err();
    assert!(matches!(err, ModelError::MissingKey { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains(key) && text.contains("diffusion_pytorch_model.safetensors") && text.contains("[16, 32, 1, 1]"), "{text}");

    let key = "encoder.mid_block.attentions.0.to_k.weight";
    let (_dir, vae) = edited_copy(|t| {
        let t = t.iter_mut().find(|t| t.name == key).unwrap();
        t.shape = vec![16, 64];
        t.values.truncate(16 * 64);
    });
    let err = load_vae::<B>(&vae, &Default::default()).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ModelError::ShapeMismatch { .. }), "{err:?}");
    assert!(text.contains(key) && text.contains(&vae.join("diffusion_pytorch_model.safetensors").display().to_string()), "{text}");
    assert!(text.contains("[16, 64]") && text.contains("[32, 32]"), "{text}");

    let (_dir, vae) = edited_copy(|t| {
        t.push(NamedTensor { name: "encoder.extra.weight".into(), shape: vec![2], values: vec![0.0; 2] })
    });
    let text = load_vae::<B>(&vae, &Default::default()).unwrap_err().to_string();
    assert!(text.contains("unexpected weight `encoder.extra.weight`"), "{text}");

    // A config that does not match the weights: named as the config's path.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), r#"{"act_fn": "gelu"}"#).unwrap();
    let text = load_vae::<B>(dir.path(), &Default::default()).unwrap_err().to_string();
    assert!(text.contains("config.json") && text.contains("act_fn"), "{text}");
}

#[test]
fn legacy_attention_names_load_to_the_same_model() {
    let (_dir, vae) = edited_copy(|tensors| {
        for t in tensors.iter_mut() {
            for (new, old) in [(".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."), (".to_out.0.", ".proj_attn.")] {
                if t.name.contains(".attentions.") && t.name.contains(new) {
                    t.name = t.name.replace(new, old);
                    // The oldest files store the projections as 1x1 convs.
                    if t.shape.len() == 2 && old == ".query." {
                        t.shape.extend([1, 1]);
                    }
                }
            }
        }
        assert!(tensors.iter().any(|t| t.name == "decoder.mid_block.attentions.0.proj_attn.weight"));
    });
    let (_, legacy) = load_vae::<B>(&vae, &Default::default()).unwrap();
    let r = reference();
    check("decoded (legacy names)", legacy.decode_unscaled(legacy.unscale_latents(tensor(&r["latents"]))), &r["decoded"]);
    check("encoder mean (legacy names)", legacy.encode_posterior(tensor(&r["images"]) * 2.0 - 1.0).mean, &r["mean"]);
}

#[test]
fn optional_quant_convs_match_diffusers() {
    // An SD1/SDXL-style config: quant_conv and post_quant_conv present, no shift factor.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd3_vae/quant_conv_vae");
    let (config, vae) = load_vae::<B>(&dir, &Default::default()).unwrap_or_else(|e| panic!("{e}"));
    assert!(config.use_quant_conv && config.use_post_quant_conv && config.shift_factor.is_none());
    assert!(vae.quant_conv.is_some() && vae.post_quant_conv.is_some());
    let r = reference();
    check("quant-conv encoder mean", vae.encode_posterior(tensor(&r["quant_images"]) * 2.0 - 1.0).mean, &r["quant_mean"]);
    check("quant-conv decoded", vae.decode_unscaled(tensor(&r["quant_latents"])), &r["quant_decoded"]);
}
