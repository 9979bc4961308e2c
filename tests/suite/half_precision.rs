//! The precision policy (docs/gpu.md, "Precision"): transformer weights in bf16 / f16
//! (`Mmdit::cast_weights`, the default on CUDA), while inputs and velocities stay f32 for the
//! samplers, LoRA adapters keep f32, and norm statistics are taken in f32. The results follow
//! the f32 model to the storage format's precision — forward, adapted forward, and the
//! adapter's gradients — on flex and on wgpu.

use crate::common;

use burn::backend::{Autodiff, Flex};
use burn::module::{AutodiffModule, Module};
use burn::tensor::backend::Backend as _;
use burn::tensor::{DType, FloatDType, Tensor};
use flow_opd::flow::SeededNoise;
use flow_opd::model::lora::{ActiveAdapters, LoraAdapter, LoraConfig, LoraTarget};
use flow_opd::model::{Mmdit, MmditConfig};

type B = Flex;
type AD = Autodiff<Flex>;

/// `||v - reference|| / ||reference||`.
fn rel_l2(reference: Tensor<B, 4>, v: Tensor<B, 4>) -> f64 {
    let values = |t: Tensor<B, 4>| t.into_data().convert::<f32>().into_vec::<f32>().unwrap();
    common::rel_l2(&values(v), &values(reference))
}

struct Inputs {
    x: Tensor<B, 4>,
    c: Tensor<B, 3>,
    y: Tensor<B, 2>,
    t: Tensor<B, 1>,
}

fn setup() -> (Mmdit<B>, LoraAdapter<B>, Inputs) {
    let device = Default::default();
    B::seed(&device, 11);
    let config = MmditConfig::tiny();
    // Parameters initialise lazily; materialise them so clones share the same values.
    let model = flow_opd::pipeline::world::materialize(config.init::<B>(&device));
    let mut adapter = LoraConfig::new(4, 8.0, LoraTarget::FLOW_GRPO.to_vec()).init(&model, 0, &device);
    let mut noise = SeededNoise::new(3);
    for layer in adapter.blocks.iter_mut().flat_map(|b| b.layers.iter_mut().flatten()) {
        let up: Tensor<B, 2> = noise.sample(layer.up.dims(), &device);
        layer.up = burn::module::Param::from_tensor(up * 0.2);
    }
    let inputs = Inputs {
        x: noise.sample([2, config.in_channels, 16, 16], &device),
        c: noise.sample([2, 7, config.joint_attention_dim], &device),
        y: noise.sample([2, config.pooled_projection_dim], &device),
        t: Tensor::from_floats([700.0, 250.0], &device),
    };
    (model, adapter, inputs)
}

#[test]
fn half_precision_weights_follow_the_f32_model() {
    let (model, adapter, i) = setup();
    let reference = model.forward(i.x.clone(), i.c.clone(), i.y.clone(), i.t.clone());
    let single = ActiveAdapters::single(&adapter);
    let adapted = model.forward_adapted(i.x.clone(), i.c.clone(), i.y.clone(), i.t.clone(), &single);
    for (dtype, tolerance) in [(FloatDType::BF16, 3e-2), (FloatDType::F16, 4e-3)] {
        let half = model.clone().cast_weights(dtype);
        assert_eq!(half.proj_out.weight.val().dtype(), DType::from(dtype));
        let v = half.forward(i.x.clone(), i.c.clone(), i.y.clone(), i.t.clone());
        assert_eq!(v.dtype(), DType::F32, "velocities come back in the caller's precision");
        let err = rel_l2(reference.clone(), v);
        assert!(err < tolerance && err > 0.0, "{dtype:?}: rel. L2 {err}");
        let v = half.forward_adapted(i.x.clone(), i.c.clone(), i.y.clone(), i.t.clone(), &single);
        let err = rel_l2(adapted.clone(), v);
        assert!(err < tolerance, "{dtype:?} + f32 adapter: rel. L2 {err}");
    }
    // The adapter really contributes (so the adapted comparison is not the plain one).
    assert!(rel_l2(reference, adapted) > 1e-2);
}

#[test]
fn adapter_gradients_over_a_bf16_base_follow_f32() {
    let (model, adapter, i) = setup();
    let grads_of = |base: Mmdit<B>| {
        let base = <Mmdit<AD> as AutodiffModule<AD>>::from_inner(base).no_grad();
        let student = flow_opd::train::trainable(<LoraAdapter<AD> as AutodiffModule<AD>>::from_inner(adapter.clone()));
        let single = ActiveAdapters::single(&student);
        let lift3 = |t: Tensor<B, 3>| Tensor::<AD, 3>::from_inner(t);
        let v = base.forward_adapted(
            Tensor::from_inner(i.x.clone()),
            lift3(i.c.clone()),
            Tensor::from_inner(i.y.clone()),
            Tensor::from_inner(i.t.clone()),
            &single,
        );
        let grads = v.powi_scalar(2).mean().backward();
        let flat: Vec<f32> = student
            .layers()
            .flat_map(|(_, _, l)| {
                let g = l.up.val().grad(&grads).expect("every adapted layer gets a gradient");
                assert_eq!(g.dtype(), DType::F32);
                g.into_data().convert::<f32>().into_vec::<f32>().unwrap()
            })
            .collect();
        flat
    };
    let full = grads_of(model.clone());
    let half = grads_of(model.cast_weights(FloatDType::BF16));
    let norm = full.iter().map(|g| g * g).sum::<f32>().sqrt();
    let diff = full.iter().zip(&half).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt();
    assert!(norm > 0.0 && diff / norm < 5e-2, "rel. L2 of the gradients {}", diff / norm);
}

/// LayerNorm statistics of half-precision activations are taken in f32: rows with a large
/// common offset (mean 300, std 1; bf16's spacing at 300 is 2, f16's 0.25) normalise to within
/// the format's rounding of the exact result. With the statistics in the half format the row
/// mean alone is off by a sizeable part of a standard deviation.
fn norm_statistics_in_f32<Bk: flow_opd::Backend>(half: FloatDType, device: &Bk::Device) {
    let mut noise = SeededNoise::new(17);
    let (batch, tokens, dim) = (2, 3, 64);
    let z: Tensor<Bk, 3> = noise.sample([batch, tokens, dim], device);
    let x = (z + 300.0).cast(half);
    let zeros = Tensor::<Bk, 2>::zeros([batch, dim], device);
    let y = flow_opd::kernels::layer_norm_modulate(x.clone(), zeros.clone().cast(half), zeros.cast(half), 1e-6);
    assert_eq!(y.dtype(), DType::from(half), "the output keeps the activations' precision");
    // The exact normalisation of the bf16 input, in f64.
    let xs = x.into_data().convert::<f32>().into_vec::<f32>().unwrap();
    let ys = y.into_data().convert::<f32>().into_vec::<f32>().unwrap();
    for (row, (x, y)) in xs.chunks(dim).zip(ys.chunks(dim)).enumerate() {
        let mean = x.iter().map(|v| *v as f64).sum::<f64>() / dim as f64;
        let var = x.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / dim as f64;
        for (x, y) in x.iter().zip(y) {
            let exact = (*x as f64 - mean) / (var + 1e-6).sqrt();
            // bf16 keeps 8 significant bits, f16 11: |error| <= 2^-8 |value| plus a little.
            assert!((*y as f64 - exact).abs() <= 1e-2 * exact.abs().max(1.0), "row {row}: {y} vs exact {exact}");
        }
    }
}

#[test]
fn norm_statistics_of_bf16_activations_are_f32_on_flex() {
    norm_statistics_in_f32::<B>(FloatDType::BF16, &Default::default());
    norm_statistics_in_f32::<B>(FloatDType::F16, &Default::default());
}

#[cfg(feature = "wgpu")]
#[test]
fn norm_statistics_of_half_activations_are_f32_on_wgpu() {
    // WGSL has f16 (where the adapter offers it, as lavapipe does) but no bf16.
    norm_statistics_in_f32::<burn::backend::Wgpu>(FloatDType::F16, &Default::default());
}

#[test]
fn auto_precision_is_bf16_only_where_the_backend_asks() {
    use flow_opd::pipeline::WeightPrecision;
    assert_eq!(WeightPrecision::Auto.resolve::<B>(), WeightPrecision::F32, "flex computes in f32");
    assert_eq!(WeightPrecision::Auto.resolve::<AD>(), WeightPrecision::F32);
    assert_eq!(WeightPrecision::Bf16.resolve::<B>(), WeightPrecision::Bf16, "an explicit choice stays");
    #[cfg(feature = "wgpu")]
    assert_eq!(WeightPrecision::Auto.resolve::<burn::backend::Wgpu>(), WeightPrecision::F32, "WGSL has no bf16");
    #[cfg(feature = "cuda")]
    assert_eq!(WeightPrecision::Auto.resolve::<burn::backend::Cuda>(), WeightPrecision::Bf16);
    // Sd3Options default to `auto`.
    assert_eq!(flow_opd::pipeline::Sd3Options::default().weights, WeightPrecision::Auto);
}
