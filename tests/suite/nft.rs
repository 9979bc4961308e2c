//! DiffusionNFT: the objective and its gradient against a float64 torch reference written from
//! the paper's equations (tools/make_nft_fixtures.py), the deterministic solvers against the
//! same script, the old policy's decay schedules against their closed form, the direction of an
//! update for r = 1 and r = 0, the old policy's soft update in a trainer, and an interrupted
//! and resumed NFT stage equal to an uninterrupted one (the old policy is in the checkpoint).

use std::path::Path;

use crate::common;

use burn::backend::{Autodiff, Flex};
use burn::tensor::{Tensor, TensorData};
use flow_opd::flow::nft::{NftObjective, nft_loss, old_policy_decay};
use flow_opd::flow::{FlowSchedule, Solver, VelocityField, sample_deterministic};
use flow_opd::pipeline::world::save_pipeline_atomic;
use safetensors::SafeTensors;

type B = Flex;

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(common::fixtures().parent().unwrap().join("nft").join(name)).unwrap()
}

fn f64s(st: &SafeTensors, name: &str) -> (Vec<f64>, Vec<usize>) {
    let view = st.tensor(name).unwrap();
    let shape = view.shape().to_vec();
    let values = match view.dtype() {
        safetensors::Dtype::F32 => view.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64).collect(),
        safetensors::Dtype::F64 => view.data().chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap())).collect(),
        other => panic!("{name}: {other:?}"),
    };
    (values, shape)
}

fn tensor<Bk: burn::tensor::backend::Backend, const D: usize>(st: &SafeTensors, name: &str, device: &Bk::Device) -> Tensor<Bk, D> {
    let (values, shape) = f64s(st, name);
    let values: Vec<f32> = values.into_iter().map(|v| v as f32).collect();
    Tensor::from_data(TensorData::new(values, shape), device)
}

fn values<Bk: burn::tensor::backend::Backend, const D: usize>(t: Tensor<Bk, D>) -> Vec<f64> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap().into_iter().map(f64::from).collect()
}

fn max_rel(got: &[f64], want: &[f64]) -> f64 {
    let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-12);
    got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max) / scale
}

/// The loss, its per-sample parts and d loss / d v on backend `A`, against the fixture.
fn loss_matches_reference<A: flow_opd::AutodiffBackend>(device: &A::Device) {
    let bytes = fixture("loss.safetensors");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for k in 0..3 {
        let p = |n: &str| format!("case{k}.{n}");
        let (settings, _) = f64s(&st, &p("settings"));
        let objective = NftObjective { beta: settings[0], kl_weight: settings[1], adv_clip_max: settings[2] };
        let x0: Tensor<A, 4> = tensor(&st, &p("x0"), device);
        let noise: Tensor<A, 4> = tensor(&st, &p("noise"), device);
        let t: Tensor<A, 1> = tensor(&st, &p("t"), device);
        let n = t.dims()[0];
        let t4 = t.clone().reshape([n, 1, 1, 1]);
        let xt = x0.clone() * (t4.clone().neg() + 1.0) + noise * t4;
        let v: Tensor<A, 4> = tensor::<A, 4>(&st, &p("v"), device).require_grad();
        let v_old: Tensor<A, 4> = tensor(&st, &p("v_old"), device);
        let v_ref = (settings[3] > 0.5).then(|| tensor::<A, 4>(&st, &p("v_ref"), device));
        let (advantages, _) = f64s(&st, &p("advantage"));
        let r = objective.optimality(&advantages);
        let r = Tensor::<A, 1>::from_data(TensorData::new(r.iter().map(|x| *x as f32).collect::<Vec<_>>(), [n]), device);
        let out = nft_loss(x0, xt, t, v.clone(), v_old, v_ref, r, objective);
        let grads = out.loss.backward();
        let grad = values(v.grad(&grads).unwrap());
        for (name, got) in [("loss", values(out.loss.clone())), ("positive", values(out.positive)), ("negative", values(out.negative))] {
            let (want, _) = f64s(&st, &p(name));
            let err = max_rel(&got, &want);
            assert!(err < 1e-5, "case {k} {name}: {got:?} vs {want:?} (relative {err:.2e})");
        }
        let (want, _) = f64s(&st, &p("grad_v"));
        let err = max_rel(&grad, &want);
        assert!(err < 1e-4, "case {k} d loss / d v: relative {err:.2e}");
    }
}

#[test]
fn the_loss_and_its_gradient_match_the_reference() {
    loss_matches_reference::<Autodiff<B>>(&Default::default());
}

#[cfg(feature = "wgpu")]
#[test]
fn the_loss_and_its_gradient_match_the_reference_on_wgpu() {
    loss_matches_reference::<Autodiff<burn::backend::Wgpu>>(&Default::default());
}

/// The fixture script's field: each channel `k` scaled by `cos(1.3 s + 0.4 k) - 0.5` and
/// shifted by `0.3 sin(2 s + k)`.
struct LinearField;

impl VelocityField<B> for LinearField {
    fn velocity(&self, x: Tensor<B, 4>, sigma: f64) -> Tensor<B, 4> {
        let [n, c, h, w] = x.dims();
        let device = x.device();
        let per_channel = |f: &dyn Fn(f64) -> f64| {
            let v: Vec<f32> = (0..c).map(|k| f(k as f64) as f32).collect();
            Tensor::<B, 1>::from_data(TensorData::new(v, [c]), &device).reshape([1, c, 1, 1]).expand([n, c, h, w])
        };
        x * per_channel(&|k| (1.3 * sigma + 0.4 * k).cos() - 0.5) + per_channel(&|k| 0.3 * (2.0 * sigma + k).sin())
    }
}

#[test]
fn the_solvers_match_the_reference() {
    let bytes = fixture("solver.safetensors");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let device = Default::default();
    let x: Tensor<B, 4> = tensor(&st, "x_init", &device);
    let (euler_want, _) = f64s(&st, "euler");
    let (dpm2_want, _) = f64s(&st, "dpm2");
    let euler = values(sample_deterministic(&LinearField, x.clone(), 10, FlowSchedule::sd3(), Solver::Euler));
    let dpm2 = values(sample_deterministic(&LinearField, x, 10, FlowSchedule::sd3(), Solver::Dpm2));
    assert!(max_rel(&euler, &euler_want) < 1e-5, "euler {:.2e}", max_rel(&euler, &euler_want));
    assert!(max_rel(&dpm2, &dpm2_want) < 1e-5, "dpm2 {:.2e}", max_rel(&dpm2, &dpm2_want));
    // The two solvers differ on this field, by more than the tolerance.
    assert!(max_rel(&euler, &dpm2_want) > 1e-3);
}

#[test]
fn the_old_policy_decays_follow_their_closed_form() {
    let d = |kind, step| old_policy_decay(kind, step).unwrap();
    for step in [0, 1, 50, 10_000] {
        assert_eq!(d(0, step), 0.0, "type 0 keeps the old policy at the policy");
    }
    // Type 1: 0.001 per step up to 0.5.
    assert!((d(1, 1) - 0.001).abs() < 1e-15 && (d(1, 250) - 0.25).abs() < 1e-12);
    assert_eq!(d(1, 500), 0.5);
    assert_eq!(d(1, 4_000), 0.5);
    // Type 2: 0 for 75 steps, then 0.0075 per step up to 0.999.
    assert_eq!(d(2, 0), 0.0);
    assert_eq!(d(2, 75), 0.0);
    assert!((d(2, 76) - 0.0075).abs() < 1e-15 && (d(2, 175) - 0.75).abs() < 1e-12);
    assert_eq!(d(2, 300), 0.999);
    assert!(old_policy_decay(3, 0).unwrap_err().contains("`decay_type` = 3"));
}

/// One gradient step on `v` (the policy's velocity as a free tensor) for all-`r` samples: the
/// loss parts before and after.
fn step_parts(r: f32) -> ([f64; 2], [f64; 2]) {
    type A = Autodiff<B>;
    let device = Default::default();
    let mut noise = flow_opd::flow::SeededNoise::new(3);
    let shape = [4, 2, 4, 4];
    let x0: Tensor<A, 4> = noise.sample(shape, &device);
    let eps: Tensor<A, 4> = noise.sample(shape, &device);
    let v_old: Tensor<A, 4> = eps.clone() - x0.clone() + noise.sample::<A, 4>(shape, &device) * 0.3;
    let t = Tensor::<A, 1>::from_data(TensorData::new(vec![0.8f32, 0.6, 0.4, 0.2], [4]), &device);
    let t4 = t.clone().reshape([4, 1, 1, 1]);
    let xt = x0.clone() * (t4.clone().neg() + 1.0) + eps * t4;
    let objective = NftObjective { beta: 1.0, kl_weight: 0.0, adv_clip_max: 5.0 };
    let r = Tensor::<A, 1>::full([4], r, &device);
    let parts = |v: Tensor<A, 4>| {
        let out = nft_loss(x0.clone(), xt.clone(), t.clone(), v, v_old.clone(), None, r.clone(), objective);
        (out.loss, [values(out.positive).iter().sum::<f64>() / 4.0, values(out.negative).iter().sum::<f64>() / 4.0])
    };
    let v = v_old.clone().require_grad();
    let (loss, before) = parts(v.clone());
    let grad = v.grad(&loss.backward()).unwrap();
    let stepped = Tensor::<A, 4>::from_inner(v.inner() - grad * 0.01);
    let (_, after) = parts(stepped);
    (before, after)
}

#[test]
fn an_update_with_r_one_lowers_the_positive_loss_and_with_r_zero_moves_away_from_the_sample() {
    let ([pos_before, _], [pos_after, _]) = step_parts(1.0);
    assert!(pos_after < pos_before, "r = 1: positive loss {pos_before} -> {pos_after}");
    let ([pos_before, neg_before], [pos_after, neg_after]) = step_parts(0.0);
    // r = 0 trains the implicit negative toward the sample, which moves the policy's own
    // prediction (the positive) away from it.
    assert!(neg_after < neg_before, "r = 0: negative loss {neg_before} -> {neg_after}");
    assert!(pos_after > pos_before, "r = 0: the policy's distance to the sample {pos_before} -> {pos_after}");
}

const NFT: &str = "iterations = 2\nrollout = { prompts = 2, group_size = 2, steps = 3 }\nlora = { rank = 2, alpha = 4.0 }\n\
                   optim = { lr = 1e-2 }\nseed = 5\n";

fn brightness_config(url: &str) -> String {
    format!(
        "{NFT}partitions = [{{ tasks = [\"composition\"], rewards = {{ composition = 1.0 }} }}]\n\
         remote_rewards = {{ composition = {{ url = \"{url}\", name = \"brightness\" }} }}\n"
    )
}

fn adapter_values(a: &flow_opd::model::lora::LoraAdapter<B>) -> Vec<f32> {
    use burn::module::{Module, ModuleVisitor, Param};
    struct All(Vec<f32>);
    impl ModuleVisitor<B> for All {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0.extend(param.val().into_data().into_vec::<f32>().unwrap());
        }
    }
    let mut all = All(Vec::new());
    a.visit(&mut all);
    all.0
}

#[test]
fn the_old_policy_follows_the_policy_by_its_decay() {
    use burn::module::AutodiffModule;
    use common::fake_server::{FakeServer, Reply, mean_pixel_scores};
    use flow_opd::train::nft::{NftConfig, nft_trainer};
    let server = FakeServer::start(|_, request| Reply::json(200, mean_pixel_scores(request)));
    let device = Default::default();
    let pipeline = common::toy_world_pipeline(0);
    for decay_type in [0u8, 1] {
        let mut config: NftConfig = toml::from_str(&brightness_config(&server.url)).unwrap();
        config.decay_type = decay_type;
        let mut trainer = nft_trainer::<Autodiff<B>>(pipeline.clone(), None, config, &device).unwrap();
        let old_before = adapter_values(&trainer.old.average);
        let stats = trainer.iteration(&device).unwrap();
        assert!(stats.loss.is_finite() && stats.reward.is_finite(), "{stats:?}");
        let policy = adapter_values(&trainer.state.adapter.valid());
        let old = adapter_values(&trainer.old.average);
        assert_ne!(policy, old_before, "the update moved the policy");
        let decay = old_policy_decay(decay_type, 1).unwrap();
        assert_eq!(stats.decay, decay);
        let err = old
            .iter()
            .zip(old_before.iter().zip(&policy))
            .map(|(o, (b, p))| (o - (decay as f32 * b + (1.0 - decay as f32) * p)).abs())
            .fold(0.0f32, f32::max);
        assert!(err < 1e-6, "decay type {decay_type}: old = d old + (1 - d) policy, off by {err}");
    }
}

fn metrics_without_seconds(run: &Path) -> Vec<serde_json::Map<String, serde_json::Value>> {
    let mut records = flow_opd::io::metrics::read_metrics(&run.join("metrics.jsonl")).unwrap();
    for r in &mut records {
        r.remove("seconds");
    }
    records
}

/// An NFT stage stopped after its first iteration and resumed ends with the adapter and the
/// log of an uninterrupted run; its checkpoint holds the old policy.
#[test]
fn an_interrupted_and_resumed_nft_stage_equals_an_uninterrupted_one() {
    use common::fake_server::{FakeServer, Reply, mean_pixel_scores};
    use flow_opd::recipe::{Interrupter, Recipe, run_recipe_with};
    let server = FakeServer::start(|_, request| Reply::json(200, mean_pixel_scores(request)));
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("toy");
    save_pipeline_atomic(&common::toy_world_pipeline(0), &model).unwrap();
    let recipe = |name: &str, resume: bool| {
        let text = format!(
            "name = \"{name}\"\nresume = {resume}\n[[stage]]\nkind = \"nft\"\noutput = \"nft\"\nmodel = \"{}\"\ncheckpoint_every = 1\n[stage.train]\n{}",
            model.display(),
            brightness_config(&server.url)
        );
        Recipe::from_toml(Path::new("nft.toml"), &text).unwrap()
    };
    let devices = [Default::default()];
    let runs = tmp.path().join("runs");
    run_recipe_with::<B>(&recipe("whole", false), &runs, &devices, Interrupter::new()).unwrap();
    let stop = Interrupter::new();
    stop.interrupt();
    let Err(err) = run_recipe_with::<B>(&recipe("stopped", false), &runs, &devices, stop) else { panic!("the interrupted run ended") };
    assert!(err.to_string().contains("--resume"), "{err}");
    let checkpoint = common::files(&runs.join("stopped/checkpoints/nft"));
    assert!(checkpoint.iter().any(|(p, _)| p.ends_with("old.bin")), "the checkpoint holds the old policy: {:?}", checkpoint.iter().map(|f| &f.0).collect::<Vec<_>>());
    run_recipe_with::<B>(&recipe("stopped", true), &runs, &devices, Interrupter::new()).unwrap();
    assert_eq!(common::files(&runs.join("whole/nft")), common::files(&runs.join("stopped/nft")), "the resumed adapter");
    assert_eq!(metrics_without_seconds(&runs.join("whole")), metrics_without_seconds(&runs.join("stopped")));
}

#[test]
fn bad_settings_are_named() {
    let bad = |extra: &str, want: &str| {
        let text = format!(
            "name = \"bad\"\n[[stage]]\nkind = \"nft\"\noutput = \"o\"\nmodel = \"models/world_base\"\n[stage.train]\n{NFT}\
             partitions = [{{ tasks = [\"text\"], rewards = {{ text = 1.0 }} }}]\n{extra}"
        );
        let err = flow_opd::recipe::Recipe::from_toml(Path::new("bad.toml"), &text).unwrap_err().to_string();
        assert!(err.contains(want), "{extra}: {err}");
    };
    bad("beta = 0.0", "`train.beta` = 0");
    bad("kl_weight = -1.0", "`train.kl_weight` = -1");
    bad("adv_clip_max = nan", "`train.adv_clip_max` = NaN");
    bad("timestep_fraction = 0.2", "`train.timestep_fraction` = 0.2");
    bad("minibatches = 9", "`train.minibatches` = 9");
    bad("decay_type = 3", "`train.decay_type` = 3");
}
