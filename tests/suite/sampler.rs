//! Trajectory sampling on the tiny SD3.5 model: recorded transitions are consistent, seeded
//! noise reproduces a rollout, the SDE window limits the stochastic steps, the ODE sampler is
//! the zero-noise trajectory, and classifier-free guidance combines the two halves as
//! `v_u + g (v_c - v_u)` with per-sample adapters routed the same in both halves.

use crate::common;

use burn::backend::Flex;
use burn::tensor::Tensor;
use common::case;
use flow_opd::flow::{
    GuidedModel, LogProbReduction, SamplerConfig, SeededNoise, TextConditioning, VelocityField, log_prob, sample_ode,
    sample_trajectory,
};
use flow_opd::model::Mmdit;
use flow_opd::model::lora::{ActiveAdapters, AdapterChoice, load_lora};
use flow_opd::model::weights::ModelSource;

type B = Flex;

fn model() -> Mmdit<B> {
    ModelSource::open(&case("sd35_b2_nonsquare").model_dir(), None).unwrap().load::<B>(&Default::default()).unwrap()
}

fn conditioning(seed: u64, batch: usize) -> TextConditioning<B> {
    let mut noise = SeededNoise::new(seed);
    let device = Default::default();
    TextConditioning { tokens: noise.sample([batch, 5, 16], &device), pooled: noise.sample([batch, 12], &device) }
}

fn vec4(t: Tensor<B, 4>) -> Vec<f32> {
    t.into_data().into_vec::<f32>().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn trajectories_record_consistent_transitions_and_reproduce_from_a_seed() {
    let device = Default::default();
    let model = model();
    let cond = conditioning(1, 3);
    let adapters = ActiveAdapters::none();
    let field = GuidedModel { model: &model, adapters: &adapters, cond: &cond, guidance: None };
    let config = SamplerConfig::sde(6, 0.7);
    let rollout = |seed: u64| {
        let mut noise = SeededNoise::new(seed);
        let x0: Tensor<B, 4> = noise.sample([3, 4, 8, 8], &device);
        sample_trajectory(&field, x0, &config, &mut |_, shape| noise.sample(shape, &device))
    };
    let (t1, t2, t3) = (rollout(5), rollout(5), rollout(6));
    assert_eq!(t1.states.len(), 7);
    assert_eq!(vec4(t1.final_state()), vec4(t2.final_state()), "same seed, same rollout");
    assert!(max_diff(&vec4(t1.final_state()), &vec4(t3.final_state())) > 1e-2, "another seed differs");
    for (i, tr) in t1.transitions.iter().enumerate() {
        assert!(tr.stochastic);
        let recorded = tr.log_prob.clone().unwrap().into_data().into_vec::<f32>().unwrap();
        let recomputed = log_prob(t1.states[i + 1].clone(), tr.mean.clone(), tr.std_dev_t, tr.step, config.kind, LogProbReduction::Mean);
        assert!(max_diff(&recorded, &recomputed.into_data().into_vec::<f32>().unwrap()) < 1e-5);
        // The state really is a noisy draw around the mean.
        assert!(max_diff(&vec4(t1.states[i + 1].clone()), &vec4(tr.mean.clone())) > 1e-3);
    }
}

#[test]
fn sde_window_and_ode() {
    let device = Default::default();
    let model = model();
    let cond = conditioning(2, 2);
    let adapters = ActiveAdapters::none();
    let field = GuidedModel { model: &model, adapters: &adapters, cond: &cond, guidance: None };
    let x0: Tensor<B, 4> = SeededNoise::new(3).sample([2, 4, 8, 8], &device);
    let windowed = SamplerConfig { sde_window: Some(2..4), ..SamplerConfig::sde(6, 0.7) };
    let mut noise = SeededNoise::new(4);
    let t = sample_trajectory(&field, x0.clone(), &windowed, &mut |_, s| noise.sample(s, &device));
    let stochastic: Vec<bool> = t.transitions.iter().map(|tr| tr.stochastic).collect();
    assert_eq!(stochastic, [false, false, true, true, false, false]);
    assert!(t.transitions[1].log_prob.is_none() && t.transitions[2].log_prob.is_some());
    // The noise-free trajectory equals the plain ODE sampler.
    let mut unused = |_: usize, _: [usize; 4]| -> Tensor<B, 4> { panic!("the ODE draws no noise") };
    let ode = sample_trajectory(&field, x0.clone(), &SamplerConfig::ode(6), &mut unused);
    let direct = sample_ode(&field, x0, 6, windowed.schedule);
    assert!(max_diff(&vec4(ode.final_state()), &vec4(direct)) < 1e-6);
}

#[test]
fn classifier_free_guidance_combines_halves_with_routing() {
    let device = Default::default();
    let model = model();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/flow");
    let a = load_lora(&root.join("lora_a"), &model, &device).unwrap();
    let b = load_lora(&root.join("lora_b"), &model, &device).unwrap();
    let cond = conditioning(7, 2);
    let uncond = conditioning(8, 2);
    let x: Tensor<B, 4> = SeededNoise::new(9).sample([2, 4, 8, 8], &device);
    let choice = AdapterChoice::PerSample(vec![Some(1), Some(0)]);
    let routed = ActiveAdapters::new(vec![&a, &b], &choice, &device);
    let g = 4.5;
    let guided = GuidedModel { model: &model, adapters: &routed, cond: &cond, guidance: Some((&uncond, g)) };
    let got = vec4(guided.velocity(x.clone(), 0.7));
    // Reference: four separate single-adapter forwards.
    let mut want = Vec::new();
    for (row, adapter) in [(0usize, &b), (1, &a)] {
        let xr = x.clone().slice([row..row + 1]);
        let single = ActiveAdapters::single(adapter);
        let pick = |c: &TextConditioning<B>| TextConditioning {
            tokens: c.tokens.clone().slice([row..row + 1]),
            pooled: c.pooled.clone().slice([row..row + 1]),
        };
        let (c, u) = (pick(&cond), pick(&uncond));
        let v_c = vec4(GuidedModel { model: &model, adapters: &single, cond: &c, guidance: None }.velocity(xr.clone(), 0.7));
        let v_u = vec4(GuidedModel { model: &model, adapters: &single, cond: &u, guidance: None }.velocity(xr, 0.7));
        want.extend(v_u.iter().zip(&v_c).map(|(u, c)| u + g as f32 * (c - u)));
    }
    let err = common::rel_l2(&got, &want);
    assert!(err < 1e-5, "CFG with routing: {err}");
}
