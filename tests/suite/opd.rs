//! Flow-OPD on the toy world (issue 6, acceptance 1): per-sample routing labels a mixed batch
//! exactly as labelling each sample alone; with student = teacher the loss and its gradient are
//! zero; the MAR term vanishes with lambda = 0; one OPD step lowers the loss on its batch; an
//! OPD recipe (merge cold start + OPD + eval) runs end to end.

use std::collections::BTreeMap;
use std::path::Path;

use crate::common;

use burn::backend::{Autodiff, Flex};
use burn::module::{AutodiffModule, Module};
use burn::tensor::Tensor;
use flow_opd::Backend;
use flow_opd::flow::{GuidedModel, KlReduction, SeededNoise, VelocityField, opd_loss};
use flow_opd::model::lora::{ActiveAdapters, AdapterChoice, LoraAdapter, save_lora, LoraFormat};
use flow_opd::pipeline::world::Pipeline;
use flow_opd::model::weights::SaveDtype;
use flow_opd::pipeline::world::save_pipeline_atomic;
use flow_opd::recipe::{Recipe, run_recipe};
use flow_opd::train::opd::{OpdBatch, OpdConfig, OpdObjective, Teachers, opd_trainer};
use flow_opd::world::Task;

type B = Flex;
type AD = Autodiff<Flex>;

fn pipeline() -> Pipeline<B> {
    common::toy_world_pipeline(11)
}

use common::toy_teacher as teacher;

fn values<Bk: Backend>(t: Tensor<Bk, 4>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
}

#[test]
fn routed_labels_of_a_mixed_batch_equal_labelling_each_sample_alone() {
    let device = Default::default();
    let p = pipeline();
    let (t0, t1) = (teacher(&p.model.transformer, 1, &device), teacher(&p.model.transformer, 2, &device));
    let teachers = Teachers { adapters: vec![t0, t1], routing: BTreeMap::from([(Task::Composition, 0), (Task::Text, 1)]), anchor: None };
    let tasks = [Task::Composition, Task::Text, Task::Composition, Task::Text];
    let prompts = ["a photo of a red circle", "a sign that says \"AB\"", "a photo of two squares", "a sign that says \"7\""];
    let route = teachers.route(&tasks).unwrap();
    assert_eq!(route, [Some(0), Some(1), Some(0), Some(1)]);
    let cond = p.encode_prompts(&prompts, &device);
    let neg = p.encode_prompts(&[""; 4], &device);
    let x: Tensor<B, 4> = SeededNoise::new(5).sample([4, 12, 16, 16], &device);
    let refs: Vec<&LoraAdapter<B>> = teachers.adapters.iter().collect();
    let routed = ActiveAdapters::new(refs.clone(), &AdapterChoice::PerSample(route.clone()), &device);
    let batch = values(GuidedModel { model: &p.model.transformer, adapters: &routed, cond: &cond, guidance: Some((&neg, 4.5)) }.velocity(x.clone(), 0.8));
    let per = batch.len() / 4;
    for (i, r) in route.iter().enumerate() {
        let single = ActiveAdapters::single(refs[r.unwrap()]);
        let c1 = p.encode_prompts(&[prompts[i]], &device);
        let n1 = p.encode_prompts(&[""], &device);
        let xi = x.clone().slice([i..i + 1]);
        let alone = values(GuidedModel { model: &p.model.transformer, adapters: &single, cond: &c1, guidance: Some((&n1, 4.5)) }.velocity(xi, 0.8));
        let diff = alone.iter().zip(&batch[i * per..(i + 1) * per]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-5, "sample {i}: {diff}");
    }
    // And the two teachers really differ (so routing matters).
    let other = ActiveAdapters::single(refs[1]);
    let wrong = values(GuidedModel { model: &p.model.transformer, adapters: &other, cond: &cond, guidance: Some((&neg, 4.5)) }.velocity(x, 0.8));
    assert!(wrong[..per].iter().zip(&batch[..per]).any(|(a, b)| (a - b).abs() > 1e-3));
}

#[test]
fn student_equal_to_teacher_has_zero_loss_and_gradient_and_lambda_zero_drops_mar() {
    let device = Default::default();
    let p = pipeline();
    let base_ad = <flow_opd::model::Mmdit<AD> as AutodiffModule<AD>>::from_inner(p.model.transformer.clone()).no_grad();
    let t = teacher(&p.model.transformer, 3, &device);
    let anchor = teacher(&p.model.transformer, 4, &device);
    let student = flow_opd::train::trainable(<LoraAdapter<AD> as AutodiffModule<AD>>::from_inner(t.clone()));
    let cond = p.encode_prompts(&["a photo of a red circle", "a warm centred photo of a blue square"], &device);
    let x: Tensor<B, 4> = SeededNoise::new(6).sample([2, 12, 16, 16], &device);
    let v_teacher = GuidedModel { model: &p.model.transformer, adapters: &ActiveAdapters::single(&t), cond: &cond, guidance: None }.velocity(x.clone(), 0.6);
    let v_anchor = GuidedModel { model: &p.model.transformer, adapters: &ActiveAdapters::single(&anchor), cond: &cond, guidance: None }.velocity(x.clone(), 0.6);
    let cond_ad = flow_opd::train::adapter::lift_conditioning::<AD>(&cond);
    let single = ActiveAdapters::single(&student);
    let student_v = || GuidedModel { model: &base_ad, adapters: &single, cond: &cond_ad, guidance: None }.velocity(Tensor::from_inner(x.clone()), 0.6);
    let v = student_v();
    // Scale of a non-zero loss and gradient: the same student against another teacher.
    let grad_norm = |total: Tensor<AD, 1>| {
        let grads = total.backward();
        student.layers().filter_map(|(_, _, l)| l.up.val().grad(&grads)).map(|g| g.powi_scalar(2).sum().into_scalar()).sum::<f32>().sqrt()
    };
    let other = opd_loss(student_v(), Tensor::from_inner(v_anchor.clone()), None, 0.37, 0.0, KlReduction::Sum).total.sum();
    let (other_loss, other_grad) = (other.clone().into_scalar(), grad_norm(other));
    let same = opd_loss(student_v(), Tensor::from_inner(v_teacher.clone()), None, 0.37, 0.0, KlReduction::Sum).total.sum();
    let (same_loss, same_grad) = (same.clone().into_scalar(), grad_norm(same));
    assert!(other_loss > 1.0 && other_grad > 1e-3, "{other_loss} {other_grad}");
    // Zero up to f32 rounding (the two forwards run on different backends' kernels).
    assert!(same_loss <= 1e-9 * other_loss, "loss {same_loss} vs {other_loss}");
    assert!(same_grad <= 1e-5 * other_grad, "gradient {same_grad} vs {other_grad}");
    // lambda = 0: the MAR term is absent even with an anchor; lambda > 0 adds lambda * w ||v - v_anchor||^2.
    let no_mar = opd_loss(v.clone(), Tensor::from_inner(v_teacher.clone()), Some(Tensor::from_inner(v_anchor.clone())), 0.37, 0.0, KlReduction::Sum);
    assert_eq!(no_mar.anchor.clone().sum().into_scalar(), 0.0);
    let with_mar = opd_loss(v.clone(), Tensor::from_inner(v_teacher), Some(Tensor::from_inner(v_anchor.clone())), 0.37, 0.02, KlReduction::Sum);
    let direct: f32 = (v.inner() - v_anchor).powi_scalar(2).sum().into_scalar() * 0.37;
    let anchor_term: f32 = with_mar.anchor.sum().into_scalar();
    assert!((anchor_term - direct).abs() <= 1e-4 * direct, "{anchor_term} vs {direct}");
    assert!((with_mar.total.sum().into_scalar() - 0.02 * anchor_term).abs() <= 1e-4 * anchor_term);
}

/// Two toy teachers routed over three tasks, the second also the MAR anchor.
fn two_teachers(p: &Pipeline<B>, device: &<B as burn::tensor::backend::BackendTypes>::Device) -> Teachers<B> {
    Teachers {
        adapters: vec![teacher(&p.model.transformer, 7, device), teacher(&p.model.transformer, 8, device)],
        routing: BTreeMap::from([(Task::Composition, 0), (Task::Text, 1), (Task::Preference, 0)]),
        anchor: Some(1),
    }
}

const OPD: &str = r#"
iterations = 2
mar_lambda = 0.02
seed = 5
rollout = { prompts = 2, group_size = 2, steps = 4, noise_level = 0.7, guidance = 2.0 }
lora = { rank = 2, alpha = 4.0 }
optim = { lr = 3e-3, weight_decay = 0.0 }
"#;

#[test]
fn one_opd_step_lowers_the_loss_on_its_batch() {
    let device = Default::default();
    let p = pipeline();
    let teachers = two_teachers(&p, &device);
    let config: OpdConfig = toml::from_str(OPD).unwrap();
    let mut trainer = opd_trainer::<AD>(p, None, teachers, config, &device).unwrap();
    let batch = trainer.sample(&device).unwrap();
    let before = trainer.loss_on(&batch, &device).unwrap();
    let stats = trainer.step_on(&batch, &device).unwrap();
    let after = trainer.loss_on(&batch, &device).unwrap();
    assert!((stats.loss - before).abs() <= 1e-4 * before, "the step's own loss {} is the batch loss {before}", stats.loss);
    assert!(after < before, "loss {before} -> {after}");
}

/// Micro-batches change memory, not the update: the loss and the accumulated gradients of a
/// batch are the same whole or one sample at a time.
#[test]
fn micro_batches_give_the_whole_batch_loss_and_gradients() {
    let (loss_whole, step_whole, grads_whole, loss_micro, step_micro, grads_micro) = whole_and_micro_batches(&pipeline(), 9);
    assert!(loss_whole > 0.0 && grads_whole.iter().any(|g| *g != 0.0));
    assert!((loss_micro - loss_whole).abs() <= 1e-5 * loss_whole, "{loss_micro} vs {loss_whole}");
    assert!((step_micro - step_whole).abs() <= 1e-5 * step_whole && (step_whole - loss_whole).abs() <= 1e-4 * loss_whole);
    let (diff, scale) = max_difference(&grads_whole, &grads_micro);
    assert!(diff <= 1e-4 * scale, "gradient difference {diff} (scale {scale})");
}

/// Data-parallel peers train in threads of one process, each accumulating gradients over
/// several backward passes on the same adapter. Burn 0.21's autodiff can let one thread's
/// `backward()` free the graph of another thread's op on a leaf that already went through a
/// backward, silently dropping that op's gradient (tracel-ai/burn#5573); the trainers give each
/// backward fresh leaves. Threads racing through micro-batched accumulations still equal the
/// whole batch.
#[test]
fn accumulated_gradients_survive_concurrent_backward_passes() {
    let p = pipeline();
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..4u64)
            .map(|t| {
                let p = p.clone();
                scope.spawn(move || {
                    for round in 0..3 {
                        let (_, _, whole, _, _, micro) = whole_and_micro_batches(&p, 20 + t);
                        let (diff, scale) = max_difference(&whole, &micro);
                        assert!(diff <= 1e-4 * scale, "thread {t} round {round}: gradient difference {diff} (scale {scale})");
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
    });
}

fn max_difference(a: &[f32], b: &[f32]) -> (f32, f32) {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().map(|g| g.abs()).fold(0f32, f32::max);
    (a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max), scale)
}

/// A sampled OPD batch's student loss (by `loss`), step loss and flattened `up` gradients,
/// first whole and then in micro-batches of one sample, for a student seeded `student_seed`.
#[allow(clippy::type_complexity)]
fn whole_and_micro_batches(p: &Pipeline<B>, student_seed: u64) -> (f64, f64, Vec<f32>, f64, f64, Vec<f32>) {
    let device = Default::default();
    let base_ad = <flow_opd::model::Mmdit<AD> as AutodiffModule<AD>>::from_inner(p.model.transformer.clone()).no_grad();
    let teachers = two_teachers(p, &device);
    let whole: OpdConfig = toml::from_str(OPD).unwrap();
    let mut trainer = opd_trainer::<AD>(p.clone(), None, two_teachers(p, &device), whole.clone(), &device).unwrap();
    let ro = trainer.sample(&device).unwrap();
    let student = flow_opd::train::trainable(<LoraAdapter<AD> as AutodiffModule<AD>>::from_inner(teacher(&p.model.transformer, student_seed, &device)));
    let batch = OpdBatch { trajectory: &ro.trajectory, cond: &ro.cond, negative: &ro.negative, route: teachers.route(&ro.tasks()).unwrap() };
    let run = |micro_batch: Option<usize>| {
        let mut config = whole.clone();
        config.rollout.micro_batch = micro_batch;
        let objective = OpdObjective { base: &base_ad, inner: &p.model.transformer, teachers: &teachers, config: &config };
        let loss = objective.loss(&student.valid(), &batch, &device);
        let (stats, grads) = objective.gradients(&student, &batch, &device);
        let grads = grads.unwrap();
        let flat: Vec<f32> = student
            .layers()
            .flat_map(|(_, _, l)| grads.get::<B, 2>(l.up.id).map(|g| g.into_data().convert::<f32>().into_vec::<f32>().unwrap()).unwrap_or_default())
            .collect();
        (loss, stats.loss, flat)
    };
    let (loss_whole, step_whole, grads_whole) = run(None);
    let (loss_micro, step_micro, grads_micro) = run(Some(1));
    (loss_whole, step_whole, grads_whole, loss_micro, step_micro, grads_micro)
}

/// The student's loss and gradients of `config` on `batch`, on autodiff backend `A`.
fn opd_gradients<A: flow_opd::AutodiffBackend<InnerBackend = B>>(
    p: &Pipeline<B>,
    teachers: &Teachers<B>,
    batch: &OpdBatch<'_, B>,
    student: &LoraAdapter<B>,
    config: &OpdConfig,
) -> (f64, Vec<f32>) {
    let device = Default::default();
    let base = <flow_opd::model::Mmdit<A> as AutodiffModule<A>>::from_inner(p.model.transformer.clone()).no_grad();
    let student = flow_opd::train::trainable(<LoraAdapter<A> as AutodiffModule<A>>::from_inner(student.clone()));
    let objective = OpdObjective { base: &base, inner: &p.model.transformer, teachers, config };
    let (stats, grads) = objective.gradients(&student, batch, &device);
    let grads = grads.unwrap();
    let flat = student
        .layers()
        .flat_map(|(_, _, l)| {
            [l.up.id, l.down.id].into_iter().flat_map(|id| grads.get::<B, 2>(id).map(|g| g.into_data().convert::<f32>().into_vec::<f32>().unwrap()).unwrap_or_default())
        })
        .collect();
    (stats.loss, flat)
}

/// `checkpointing = "balanced"` and `"blocks"` (Burn's BalancedCheckpointing; blocks recomputed
/// in the backward) give the OPD student the gradients of the plain graph.
#[test]
fn checkpointed_opd_gradients_equal_the_plain_ones() {
    use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
    use flow_opd::train::Checkpointing;
    let device = Default::default();
    let p = pipeline();
    let teachers = two_teachers(&p, &device);
    let config: OpdConfig = toml::from_str(OPD).unwrap();
    let mut trainer = opd_trainer::<AD>(p.clone(), None, two_teachers(&p, &device), config.clone(), &device).unwrap();
    let ro = trainer.sample(&device).unwrap();
    let batch = OpdBatch { trajectory: &ro.trajectory, cond: &ro.cond, negative: &ro.negative, route: teachers.route(&ro.tasks()).unwrap() };
    let student = teacher(&p.model.transformer, 9, &device);
    let (loss, plain) = opd_gradients::<AD>(&p, &teachers, &batch, &student, &config);
    assert!(loss > 0.0 && plain.iter().any(|g| *g != 0.0));
    for mode in [Checkpointing::Balanced, Checkpointing::Blocks] {
        let mut checkpointed = config.clone();
        checkpointed.training.checkpointing = mode;
        let (l, g) = opd_gradients::<Autodiff<Flex, BalancedCheckpointing>>(&p, &teachers, &batch, &student, &checkpointed);
        assert!((l - loss).abs() <= 1e-6 * loss, "{mode}: loss {l} vs {loss}");
        assert_eq!(g.len(), plain.len());
        let err = common::rel_l2(&g, &plain);
        assert!(err <= 1e-6, "{mode}: gradients differ by relative L2 {err}");
    }
    assert_eq!(toml::from_str::<OpdConfig>(&format!("{OPD}checkpointing = \"blocks\"")).unwrap().training.checkpointing, Checkpointing::Blocks);
}

#[test]
fn merge_then_opd_recipe_runs_end_to_end() {
    let runs = tempfile::tempdir().unwrap();
    let device = Default::default();
    let p = pipeline();
    let model = runs.path().join("toy");
    save_pipeline_atomic(&p, &model).unwrap();
    for (name, seed) in [("t_comp", 1), ("t_text", 2), ("t_quality", 3)] {
        save_lora(&teacher(&p.model.transformer, seed, &device), &runs.path().join(name), LoraFormat::Peft, SaveDtype::F32).unwrap();
    }
    let r = |n: &str| runs.path().join(n).display().to_string();
    let text = format!(
        r#"
name = "opd_smoke"
[[stage]]
kind = "merge"
output = "cold"
model = "{model}"
adapters = {{ "{c}" = 0.5, "{t}" = 0.5 }}

[[stage]]
kind = "opd"
output = "student"
model = "{model}"
init = "cold"
anchor = "{q}"
routing = {{ composition = "{c}", text = "{t}" }}
[stage.train]
{OPD}

[[stage]]
kind = "eval"
model = "{model}"
adapter = "student"
row = "Flow-OPD"
eval = {{ prompts_per_task = 1, sampling = {{ steps = 2, guidance = 2.0 }} }}
"#,
        model = r("toy"),
        c = r("t_comp"),
        t = r("t_text"),
        q = r("t_quality"),
    );
    let recipe = Recipe::from_toml(Path::new("opd.toml"), &text).unwrap();
    run_recipe::<B>(&recipe, runs.path(), &device).unwrap();
    let dir = runs.path().join("opd_smoke");
    let metrics = flow_opd::io::metrics::read_metrics(&dir.join("metrics.jsonl")).unwrap();
    let opd: Vec<_> = metrics.iter().filter(|m| m["stage"] == "opd:student").collect();
    assert_eq!(opd.len(), 2);
    assert!(opd.iter().all(|m| m["loss_opd"].as_f64().unwrap() > 0.0 && m["loss_mar"].as_f64().unwrap() > 0.0));
    // The merged cold start has rank 2 + 2 (exact merge stacks the factors).
    let cold = flow_opd::model::lora::load_lora(&dir.join("cold"), &p.model.transformer, &device).unwrap();
    assert!(cold.layers().all(|(_, _, l)| l.rank() == 4));
    // The student started from the loaded cold start and was trained away from it.
    let student = flow_opd::model::lora::load_lora(&dir.join("student"), &p.model.transformer, &device).unwrap();
    let moved: f32 = student
        .layers()
        .zip(cold.layers())
        .map(|((_, _, s), (_, _, c))| (s.up.val() - c.up.val()).abs().max().into_scalar())
        .fold(0.0, f32::max);
    assert!(moved > 1e-6, "student == cold start: the loaded adapter was not trained");
    let table = flow_opd::eval::ResultsTable::read(&dir).unwrap();
    assert_eq!(table.rows[0].model, "Flow-OPD");
}

#[test]
fn sft_cold_start_recipe_fits_teacher_samples() {
    let runs = tempfile::tempdir().unwrap();
    let device = Default::default();
    let p = pipeline();
    let model = runs.path().join("toy");
    save_pipeline_atomic(&p, &model).unwrap();
    for (name, seed) in [("t_comp", 1), ("t_text", 2)] {
        save_lora(&teacher(&p.model.transformer, seed, &device), &runs.path().join(name), LoraFormat::Peft, SaveDtype::F32).unwrap();
    }
    let r = |n: &str| runs.path().join(n).display().to_string();
    let text = format!(
        r#"
name = "sft_smoke"
[[stage]]
kind = "sft"
output = "cold"
model = "{model}"
routing = {{ composition = "{c}", text = "{t}" }}
train = {{ samples_per_task = 3, sampling = {{ steps = 2, guidance = 2.0 }}, steps = 3, batch_size = 4, optim = {{ lr = 1e-2 }}, lora = {{ rank = 2, alpha = 4.0 }} }}
"#,
        model = r("toy"),
        c = r("t_comp"),
        t = r("t_text"),
    );
    let recipe = Recipe::from_toml(Path::new("sft.toml"), &text).unwrap();
    run_recipe::<B>(&recipe, runs.path(), &device).unwrap();
    let dir = runs.path().join("sft_smoke");
    let metrics = flow_opd::io::metrics::read_metrics(&dir.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.iter().filter(|m| m["stage"] == "sft:cold").count(), 3);
    let cold = flow_opd::model::lora::load_lora(&dir.join("cold"), &p.model.transformer, &device).unwrap();
    let b_norm: f32 = cold.layers().map(|(_, _, l)| l.up.val().abs().max().into_scalar()).fold(0.0, f32::max);
    assert!(b_norm > 0.0, "the student adapter was trained");
}

/// `flow-opd bench --opd` runs the trainer's objective end to end on a config (here the tiny
/// world transformer at the world's shapes; on a GPU, SD3.5-M at 512 px).
#[test]
fn opd_bench_times_a_full_iteration() {
    let config = flow_opd::bench::OpdBenchConfig {
        model: flow_opd::model::MmditConfig::tiny(),
        batch: 2,
        latent: 16,
        tokens: 8,
        rank: 4,
        alpha: 8.0,
        teachers: 2,
        steps: 3,
        guidance: 4.5,
        iterations: 1,
        micro_batch: Some(1),
        weights: flow_opd::pipeline::WeightPrecision::Bf16,
        checkpointing: flow_opd::train::Checkpointing::None,
    };
    let report = flow_opd::bench::run_opd_bench::<AD>(&config, &Default::default()).unwrap();
    assert!(report.rollout_s > 0.0 && report.update_s > 0.0);
    assert!(report.loss.is_finite());
    assert!(report.adapter_parameters > 0 && report.adapter_parameters < report.parameters);
}
