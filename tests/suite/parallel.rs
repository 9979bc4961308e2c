//! Data-parallel GRPO, DiffusionNFT and OPD through burn-collective, on two CPU peers: a batch split over two
//! peers trains exactly as one device does with micro-batches of half the batch (same prompts,
//! noise, rewards, advantages and update), the peers' adapters stay identical, the exchanges
//! carry values exactly and stop every peer when one fails, and a recipe run with two devices
//! logs and writes once.

use std::collections::BTreeMap;
use std::path::Path;

use crate::common;

use burn::backend::{Autodiff, Flex};
use flow_opd::model::lora::LoraAdapter;
use flow_opd::pipeline::world::Pipeline;
use flow_opd::pipeline::world::save_pipeline_atomic;
use flow_opd::recipe::{Recipe, run_recipe_on};
use flow_opd::train::adapter::AdapterTrainer;
use flow_opd::train::grpo::{GrpoConfig, grpo_trainer};
use flow_opd::train::opd::{OpdConfig, Teachers, opd_trainer};
use flow_opd::train::parallel::{ANOTHER_PEER_FAILED, Peer, first_error, run_peers};
use flow_opd::world::Task;

type B = Flex;
type AD = Autodiff<Flex>;

use common::TOY_GRPO as GRPO;

const OPD: &str = r#"
iterations = 2
mar_lambda = 0.5
seed = 5
rollout = { prompts = 4, group_size = 2, steps = 4, noise_level = 0.7, guidance = 2.0 }
lora = { rank = 2, alpha = 4.0 }
optim = { lr = 3e-3, weight_decay = 0.0 }
"#;

/// Every value of an adapter, layer by layer (`A` then `B`).
fn flat(adapter: &LoraAdapter<B>) -> Vec<f32> {
    adapter
        .layers()
        .flat_map(|(_, _, l)| {
            [l.down.val(), l.up.val()].into_iter().flat_map(|t| t.into_data().convert::<f32>().into_vec::<f32>().unwrap())
        })
        .collect()
}

fn assert_close(what: &str, a: &[f32], b: &[f32], tolerance: f32) {
    assert_eq!(a.len(), b.len(), "{what}: sizes");
    let scale = a.iter().map(|x| x.abs()).fold(0f32, f32::max);
    let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(diff <= tolerance * scale, "{what}: differ by {diff} (scale {scale})");
}

fn two_cpu_devices() -> Vec<<B as burn::tensor::backend::BackendTypes>::Device> {
    vec![Default::default(), Default::default()]
}

#[test]
fn two_grpo_peers_train_as_one_device_with_half_batch_micro_batches() {
    let device = Default::default();
    let pipeline = common::toy_world_pipeline(0);
    let config: GrpoConfig = toml::from_str(GRPO).unwrap();
    let start = flat(&grpo_trainer::<AD>(pipeline.clone(), None, config.clone(), &device).unwrap().state.ema.average);

    let mut halves = config.clone();
    halves.rollout.micro_batch = Some(3);
    let mut one = grpo_trainer::<AD>(pipeline.clone(), None, halves, &device).unwrap();
    let one_stats: Vec<_> = (0..2).map(|_| one.iteration(&device).unwrap()).collect();

    let results = run_peers::<B, _, _>(&two_cpu_devices(), |peer: Peer<B>| {
        let device = peer.device.clone();
        let mut trainer = grpo_trainer::<AD>(pipeline.clone(), None, config.clone(), &device)?.with_peer(peer)?;
        let stats: Vec<_> = (0..2).map(|_| trainer.iteration(&device)).collect::<Result<_, _>>()?;
        Ok((flat(&trainer.state.ema.average), stats))
    });
    let peers = first_error(results).unwrap();

    let single = flat(&one.state.ema.average);
    assert!(single.iter().zip(&start).any(|(a, b)| a != b), "the adapter did not move: the comparison would be empty");
    assert_eq!(peers[0].0, peers[1].0, "the peers' adapters differ");
    assert_close("two peers vs one device", &peers[0].0, &single, 1e-4);
    for it in 0..2 {
        let (one, p0, p1) = (&one_stats[it], &peers[0].1[it], &peers[1].1[it]);
        assert_eq!(one.reward, p0.reward, "iteration {it}: the batch reward (gathered)");
        assert_eq!(p0.reward, p1.reward);
        assert_eq!(one.groups.zero_std_fraction, p0.groups.zero_std_fraction);
        assert_eq!(one.task_metrics.keys().collect::<Vec<_>>(), p0.task_metrics.keys().collect::<Vec<_>>());
        for (task, m) in &one.task_metrics {
            assert!((m - p0.task_metrics[task]).abs() < 1e-12, "iteration {it}: train {task:?} {m} vs {}", p0.task_metrics[task]);
        }
        assert!((one.kl - p0.kl).abs() <= 1e-3 * one.kl.abs() + 1e-12, "iteration {it}: KL {} vs {}", one.kl, p0.kl);
        assert_eq!(p0.kl, p1.kl);
    }
}

#[test]
fn two_opd_peers_train_as_one_device_with_half_batch_micro_batches() {
    let device = Default::default();
    let pipeline = common::toy_world_pipeline(11);
    let teachers = || Teachers {
        adapters: vec![common::toy_teacher(&pipeline.model.transformer, 7, &device), common::toy_teacher(&pipeline.model.transformer, 8, &device)],
        routing: BTreeMap::from([(Task::Composition, 0), (Task::Text, 1), (Task::Preference, 0), (Task::Quality, 1)]),
        anchor: Some(1),
    };
    let config: OpdConfig = toml::from_str(OPD).unwrap();
    let mut halves = config.clone();
    halves.rollout.micro_batch = Some(4);
    let mut one = opd_trainer::<AD>(pipeline.clone(), None, teachers(), halves, &device).unwrap();
    let one_stats: Vec<_> = (0..2).map(|_| one.iteration(&device).unwrap()).collect();

    let results = run_peers::<B, _, _>(&two_cpu_devices(), |peer: Peer<B>| {
        let device = peer.device.clone();
        let mut trainer = opd_trainer::<AD>(pipeline.clone(), None, teachers(), config.clone(), &device)?.with_peer(peer)?;
        let stats: Vec<_> = (0..2).map(|_| trainer.iteration(&device)).collect::<Result<_, _>>()?;
        Ok((flat(&trainer.state.ema.average), stats))
    });
    let peers = first_error(results).unwrap();
    let single = flat(&one.state.ema.average);
    assert!(single.iter().any(|x| *x != 0.0));
    assert_eq!(peers[0].0, peers[1].0, "the peers' adapters differ");
    assert_close("two peers vs one device", &peers[0].0, &single, 1e-4);
    for it in 0..2 {
        let (one, p0) = (&one_stats[it], &peers[0].1[it]);
        assert!(one.loss > 0.0);
        assert!((one.loss - p0.loss).abs() <= 1e-5 * one.loss, "iteration {it}: loss {} vs {}", one.loss, p0.loss);
        assert!((one.anchor - p0.anchor).abs() <= 1e-5 * one.anchor, "iteration {it}: MAR {} vs {}", one.anchor, p0.anchor);
        assert_eq!(one.task_metrics.len(), p0.task_metrics.len());
        for (task, m) in &one.task_metrics {
            assert!((m - p0.task_metrics[task]).abs() < 1e-12, "iteration {it}: train {task:?}");
        }
    }
}

#[test]
fn exchanges_are_exact_and_a_failing_peer_stops_every_peer_with_its_own_error() {
    let values = [0.1, 1.0 / 3.0, -2.5e-7, 12345.678901234, std::f64::consts::PI * 1e-20, 0.0];
    let results = run_peers::<B, _, _>(&two_cpu_devices(), |peer: Peer<B>| {
        let mine: Vec<f64> = values.iter().map(|v| v * (peer.index + 1) as f64).collect();
        let all = peer.gather(Ok(mine.clone()), values.len())?;
        let mean = peer.mean(&mine)?;
        let any = (peer.any(peer.index == 1)?, peer.any(false)?);
        // Then peer 1 fails before an exchange; peer 0 must not wait for it.
        let failed = peer.gather(if peer.index == 1 { Err("peer 1's reward server is down".into()) } else { Ok(vec![1.0]) }, 1);
        Ok((all, mean, any, failed))
    });
    let peers = first_error(results).unwrap();
    for (all, mean, any, failed) in &peers {
        let expected: Vec<f64> = values.iter().copied().chain(values.iter().map(|v| 2.0 * v)).collect();
        assert_eq!(*all, expected, "f64 values travel exactly");
        for (m, v) in mean.iter().zip(values) {
            assert!((m - 1.5 * v).abs() <= 1e-15 * v.abs(), "mean {m} for {}", 1.5 * v);
        }
        assert_eq!(*any, (true, false));
        assert!(failed.is_err());
    }
    assert_eq!(peers[0].3.as_ref().unwrap_err(), ANOTHER_PEER_FAILED);
    assert_eq!(peers[1].3.as_ref().unwrap_err(), "peer 1's reward server is down");
    let reported = first_error(vec![Err(ANOTHER_PEER_FAILED.to_string()), Err::<(), _>("the real cause".to_string())]).unwrap_err();
    assert_eq!(reported, "the real cause");
}

#[test]
fn a_recipe_on_two_devices_logs_and_saves_once_and_refuses_uneven_splits() {
    let runs = tempfile::tempdir().unwrap();
    let model = runs.path().join("toy");
    save_pipeline_atomic(&common::toy_world_pipeline(0), &model).unwrap();
    let recipe = |name: &str, prompts: usize| {
        let stage = GRPO.replace("prompts = 2", &format!("prompts = {prompts}"));
        let text = format!("name = \"{name}\"\n[[stage]]\nkind = \"grpo\"\noutput = \"teacher\"\nmodel = \"{}\"\n[stage.train]\n{stage}", model.display());
        Recipe::from_toml(Path::new("dp.toml"), &text).unwrap()
    };
    let ctx = run_recipe_on::<B>(&recipe("dp", 2), runs.path(), &two_cpu_devices()).unwrap();
    let metrics = flow_opd::io::metrics::read_metrics(&ctx.dir.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = metrics.iter().map(|m| m["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [1, 2], "one line per iteration, from the lead peer only");
    let saved = flow_opd::model::lora::load_lora(&ctx.dir.join("teacher"), &Pipeline::<B>::load(&model, &Default::default()).unwrap().model.transformer, &Default::default()).unwrap();
    assert!(flat(&saved).iter().any(|x| *x != 0.0));

    let Err(err) = run_recipe_on::<B>(&recipe("dp_odd", 3), runs.path(), &two_cpu_devices()) else { panic!("3 prompts split over 2 peers") };
    let err = err.to_string();
    assert!(err.contains("rollout.prompts") && err.contains('3') && err.contains("2 data-parallel devices"), "{err}");
}

#[test]
fn an_evaluation_on_two_devices_draws_the_one_device_images() {
    let runs = tempfile::tempdir().unwrap();
    let model = runs.path().join("toy");
    save_pipeline_atomic(&common::toy_world_pipeline(0), &model).unwrap();
    // 5 prompts per task: shares of 2 and 3, each with the seeds of its place in the list.
    let recipe = |name: &str| {
        let text = format!(
            "name = \"{name}\"\n[[stage]]\nkind = \"eval\"\nmodel = \"{}\"\nrow = \"toy\"\neval = {{ prompts_per_task = 5, sampling = {{ steps = 3, guidance = 2.0 }} }}\n",
            model.display()
        );
        Recipe::from_toml(Path::new("eval.toml"), &text).unwrap()
    };
    let one = run_recipe_on::<B>(&recipe("one"), runs.path(), &[Default::default()]).unwrap();
    let two = run_recipe_on::<B>(&recipe("two"), runs.path(), &two_cpu_devices()).unwrap();
    let per_image = |dir: &Path| flow_opd::eval::ResultsTable::read(dir).unwrap().rows[0].per_image.clone().unwrap().metrics;
    let (a, b) = (per_image(&one.dir), per_image(&two.dir));
    assert_eq!(a.len(), 4, "every task evaluated");
    assert!(a.values().all(|m| m.len() == 5));
    assert_eq!(a, b, "per-image metrics differ between one and two devices");
    for task in ["composition", "text", "preference", "quality"] {
        let grid = |dir: &Path| std::fs::read(dir.join("grids").join(format!("grid_toy_{task}.png"))).unwrap();
        assert!(grid(&one.dir) == grid(&two.dir), "{task}: the sample grids differ");
    }
}

#[test]
fn two_pretraining_peers_take_the_one_device_steps() {
    let runs = tempfile::tempdir().unwrap();
    let model = runs.path().join("toy");
    save_pipeline_atomic(&common::toy_world_pipeline(2), &model).unwrap();
    let recipe = |name: &str| {
        let text = format!(
            "name = \"{name}\"\n[[stage]]\nkind = \"pretrain\"\noutput = \"base\"\ninit = \"{}\"\ncheckpoint_every = 3\n\
             train = {{ steps = 3, batch_size = 4, seed = 1, optim = {{ lr = 1e-3 }} }}\n",
            model.display()
        );
        Recipe::from_toml(Path::new("pretrain.toml"), &text).unwrap()
    };
    let one = run_recipe_on::<B>(&recipe("one"), runs.path(), &[Default::default()]).unwrap();
    let two = run_recipe_on::<B>(&recipe("two"), runs.path(), &two_cpu_devices()).unwrap();
    let (start, a, b) = (common::folder_values(&model), common::folder_values(&one.dir.join("base")), common::folder_values(&two.dir.join("base")));
    assert!(a.iter().zip(&start).any(|(x, y)| x != y), "pre-training did not move the model");
    assert_close("two peers vs one device (full batch)", &b, &a, 1e-5);
    let loss = |dir: &Path| {
        let m = flow_opd::io::metrics::read_metrics(&dir.join("metrics.jsonl")).unwrap();
        m.iter().filter(|m| m["stage"] == "pretrain").map(|m| m["loss"].as_f64().unwrap()).collect::<Vec<_>>()
    };
    let (la, lb) = (loss(&one.dir), loss(&two.dir));
    assert_eq!(la.len(), 1, "the last step is logged once");
    assert!((la[0] - lb[0]).abs() <= 1e-5 * la[0], "loss {} vs {}", la[0], lb[0]);
    let Err(err) = run_recipe_on::<B>(&recipe("odd").clone(), runs.path(), &[Default::default(), Default::default(), Default::default()]) else {
        panic!("a batch of 4 on 3 devices");
    };
    assert!(err.to_string().contains("train.batch_size"), "{err}");
}

#[test]
fn two_nft_peers_train_as_one_device() {
    use flow_opd::train::nft::{NftConfig, nft_trainer};
    let device = Default::default();
    let pipeline = common::toy_world_pipeline(0);
    let config: NftConfig = toml::from_str(
        "iterations = 2\nseed = 3\nrollout = { prompts = 2, group_size = 3, steps = 4 }\nlora = { rank = 2, alpha = 4.0 }\n\
         optim = { lr = 3e-3 }\npartitions = [{ tasks = [\"composition\"], rewards = { composition = 1.0 } }]\n",
    )
    .unwrap();
    let mut one = nft_trainer::<AD>(pipeline.clone(), None, config.clone(), &device).unwrap();
    let start = flat(&one.state.ema.average);
    let one_stats: Vec<_> = (0..2).map(|_| one.iteration(&device).unwrap()).collect();
    let results = run_peers::<B, _, _>(&two_cpu_devices(), |peer: Peer<B>| {
        let device = peer.device.clone();
        let mut trainer = nft_trainer::<AD>(pipeline.clone(), None, config.clone(), &device)?.with_peer(peer)?;
        let stats: Vec<_> = (0..2).map(|_| trainer.iteration(&device)).collect::<Result<_, _>>()?;
        Ok((flat(&trainer.state.ema.average), flat(&trainer.old.average), stats))
    });
    let peers = first_error(results).unwrap();
    let single = flat(&one.state.ema.average);
    assert!(single.iter().zip(&start).any(|(a, b)| a != b), "the adapter did not move: the comparison would be empty");
    assert_eq!(peers[0].0, peers[1].0, "the peers' adapters differ");
    assert_eq!(peers[0].1, peers[1].1, "the peers' old policies differ");
    assert_close("two peers vs one device", &peers[0].0, &single, 1e-4);
    assert_close("old policy: two peers vs one device", &peers[0].1, &flat(&one.old.average), 1e-4);
    for it in 0..2 {
        let (one, p0) = (&one_stats[it], &peers[0].2[it]);
        assert_eq!(one.reward, p0.reward, "iteration {it}: the batch reward (gathered)");
        assert!((one.loss - p0.loss).abs() <= 1e-5 * one.loss.abs(), "iteration {it}: loss {} vs {}", one.loss, p0.loss);
    }
}
