//! The schedule and the SDE step against reference values made by `tools/make_flow_fixtures.py`
//! (issue 3, acceptance 1-2): diffusers' `FlowMatchEulerDiscreteScheduler` sigmas/timesteps,
//! and SDE / CPS means, samples and log-probs computed from the formulas in float64.

use crate::common;

use burn::backend::Flex;
use burn::tensor::{Tensor, TensorData};
use common::read_all;
use flow_opd::flow::{FlowSchedule, LogProbReduction, SdeKind, StepSigmas, kl_weight, log_prob, sde_step};
use flow_opd::flow::KlReduction;
use flow_opd::model::weights::NamedTensor;
use serde_json::Value;

type B = Flex;

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/flow").join(name)
}

fn json(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name)).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

#[test]
fn schedule_matches_diffusers() {
    let cases = json("schedule.json");
    let cases = cases["cases"].as_array().unwrap();
    let steps: Vec<u64> = cases.iter().map(|c| c["steps"].as_u64().unwrap()).collect();
    assert!(steps.contains(&10) && steps.contains(&40), "fixture lacks N = 10 / 40: {steps:?}");
    for case in cases {
        let schedule = FlowSchedule::new(case["shift"].as_f64().unwrap());
        let n = case["steps"].as_u64().unwrap() as usize;
        for (name, got, want) in [
            ("sigmas", schedule.sigmas(n), floats(&case["sigmas"])),
            ("timesteps", schedule.timesteps(n), floats(&case["timesteps"])),
        ] {
            assert_eq!(got.len(), want.len(), "shift {} N {n} {name}", schedule.shift);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let tol = 1e-6 * w.abs().max(1.0);
                assert!((*g as f64 - w).abs() <= tol, "shift {} N {n} {name}[{i}]: {g} vs {w}", schedule.shift);
            }
        }
    }
}

struct SdeCase {
    tensors: Vec<NamedTensor>,
    k: u64,
}

impl SdeCase {
    fn get(&self, key: &str) -> &NamedTensor {
        let name = format!("case{}.{key}", self.k);
        self.tensors.iter().find(|t| t.name == name).unwrap_or_else(|| panic!("fixture lacks {name}"))
    }
    fn tensor4(&self, key: &str) -> Tensor<B, 4> {
        let t = self.get(key);
        let shape: [usize; 4] = t.shape.clone().try_into().unwrap();
        Tensor::from_data(TensorData::new(t.values.clone(), shape), &Default::default())
    }
}

/// `|a - b| <= 1e-5 |b| + atol` elementwise; `atol` is 1e-5 of the tensor's largest value
/// (log-probs near 0 lose digits to cancellation in any f32 implementation).
fn assert_close(name: &str, got: Vec<f32>, want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{name}");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (*g as f64, *w as f64);
        assert!((g - w).abs() <= 1e-5 * w.abs() + 1e-5 * scale, "{name}[{i}]: {g} vs {w}");
    }
}

#[test]
fn sde_and_cps_steps_match_float64_formulas() {
    let meta = json("sde_step.json");
    let tensors = read_all(&fixture("sde_step.safetensors"));
    let sigmas = FlowSchedule::sd3().sigmas(10);
    let cases = meta["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let c = SdeCase { tensors: tensors.clone(), k: case["k"].as_u64().unwrap() };
        let kind = if case["type"] == "cps" { SdeKind::Cps } else { SdeKind::Sde };
        let a = case["a"].as_f64().unwrap();
        let step = StepSigmas::at(&sigmas, case["step_index"].as_u64().unwrap() as usize);
        let label = format!("case {} ({kind:?}, a {a}, step {})", c.k, case["step_index"]);
        let out = sde_step(c.tensor4("x"), c.tensor4("v"), step, a, kind, c.tensor4("eps"), LogProbReduction::Mean);
        let std_ref = c.get("std_dev_t_f64").values[0] as f64;
        assert!((out.std_dev_t - std_ref).abs() <= 1e-5 * std_ref, "{label} std_dev_t {} vs {std_ref}", out.std_dev_t);
        let vec = |t: Tensor<B, 4>| t.into_data().into_vec::<f32>().unwrap();
        assert_close(&format!("{label} mean"), vec(out.mean.clone()), &c.get("mean_f64").values);
        assert_close(&format!("{label} sample"), vec(out.sample), &c.get("sample_f64").values);
        let lp = out.log_prob.into_data().into_vec::<f32>().unwrap();
        assert_close(&format!("{label} log_prob"), lp, &c.get("log_prob_f64").values);
        // Re-scoring a stored sample under a mean (what GRPO does with old transitions).
        let given = log_prob(c.tensor4("x_next_given"), out.mean, out.std_dev_t, step, kind, LogProbReduction::Mean);
        assert_close(&format!("{label} log_prob_given"), given.into_data().into_vec::<f32>().unwrap(), &c.get("log_prob_given_f64").values);
        if kind == SdeKind::Sde {
            for (reduction, key) in [(KlReduction::Sum, "kl_weight_sum"), (KlReduction::Mean, "kl_weight_mean")] {
                let want = case[key].as_f64().unwrap();
                let got = kl_weight(step, out.std_dev_t, reduction);
                assert!((got - want).abs() <= 1e-5 * want, "{label} {key}: {got} vs {want}");
            }
        }
    }
}
