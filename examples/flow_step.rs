//! A schedule, one Flow-GRPO SDE step with its log-prob, and the Flow-OPD loss
//! (docs/reference.md sections 2-4; the README's first library snippet).
//!
//!     cargo run --release --example flow_step

use burn::backend::Flex;
use burn::tensor::Tensor;
use flow_opd::flow::{FlowSchedule, KlReduction, LogProbReduction, SdeKind, SeededNoise, StepSigmas, kl_weight, opd_loss, sde_step};

fn main() {
    let device = Default::default();
    let sigmas = FlowSchedule::sd3().sigmas(10); // diffusers' set_timesteps(10), shift 3
    let step = StepSigmas::at(&sigmas, 3); // s = sigmas[3] -> s' = sigmas[4]
    let mut noise = SeededNoise::new(0);
    let x: Tensor<Flex, 4> = noise.sample([2, 16, 64, 64], &device);
    let v_student: Tensor<Flex, 4> = noise.sample([2, 16, 64, 64], &device); // model outputs
    let v_teacher: Tensor<Flex, 4> = noise.sample([2, 16, 64, 64], &device);
    let eps = noise.sample([2, 16, 64, 64], &device);

    // Flow-GRPO SDE step (a = 0.7): next state, mean, sigma_t and per-sample log-prob.
    let out = sde_step(x, v_student.clone(), step, 0.7, SdeKind::Sde, eps, LogProbReduction::Mean);

    // Flow-OPD: w(s) ||v_student - SG(v_teacher)||^2 (+ lambda * MAR term toward an anchor).
    let w = kl_weight(step, out.std_dev_t, KlReduction::Sum);
    let loss = opd_loss(v_student, v_teacher, None, w, 0.02, KlReduction::Sum);
    let per_sample = loss.total; // [2]
    println!("sigma {} -> {}: log-prob per sample {}", step.sigma, step.sigma_next, out.log_prob);
    println!("Flow-OPD loss per sample: {per_sample}");
}
