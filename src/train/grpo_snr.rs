//! How much signal a Flow-GRPO gradient carries: the signal-to-noise ratio of the policy
//! gradient, from independent gradient estimates of one policy.
//!
//! Each estimate `g_k` averages `n` samples (prompts x G) of a gradient with mean `mu` and
//! per-sample covariance `S`, so for `i != j`, `E <g_i, g_j> = |mu|^2`, and `E |g_k|^2 = |mu|^2 +
//! tr(S) / n`. The per-sample signal-to-noise ratio `rho = |mu|^2 / tr(S)` follows, and `1 / rho`
//! is the number of samples per update at which the gradient's expected signal equals its noise
//! (two such estimates then have a cosine of about 1/2). An update of far fewer samples is
//! mostly noise: with Adam it moves the policy a step of the learning rate's size in a nearly
//! random direction.

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::Tensor;
use crate::AutodiffBackend;

use super::grpo::{GrpoStats, GrpoTrainer};
use crate::model::lora::LoraAdapter;

/// Fewer estimates leave no two disjoint pairs for the signal's standard error.
pub const MIN_ESTIMATES: usize = 4;

/// Refuses an estimate count below [`MIN_ESTIMATES`] (callers check before costly set-up).
pub fn check_estimates(k: usize) -> Result<(), String> {
    if k < MIN_ESTIMATES {
        return Err(format!("{k} gradient estimates: at least {MIN_ESTIMATES} are needed (two disjoint pairs for the error)"));
    }
    Ok(())
}

/// The signal-to-noise figures of `K` gradient estimates of `n` samples each.
#[derive(Debug, Clone, PartialEq)]
pub struct GradientSnr {
    pub estimates: usize,
    pub samples_per_estimate: usize,
    /// `|mu|^2`: the mean of `<g_i, g_j>` over all pairs `i < j`.
    pub signal: f64,
    /// Standard error of `signal`, from the spread of the `K / 2` disjoint pairs' products
    /// (independent, so a conservative error for the all-pairs mean).
    pub signal_se: f64,
    /// `E |g|^2`: the mean squared norm of one estimate.
    pub mean_square: f64,
}

impl GradientSnr {
    /// The figures of `estimates` (flattened gradients, at least four, of equal length), each
    /// averaged over `samples_per_estimate` samples.
    pub fn from_estimates(estimates: &[Vec<f64>], samples_per_estimate: usize) -> Result<Self, String> {
        let k = estimates.len();
        check_estimates(k)?;
        if let Some(bad) = estimates.iter().position(|e| e.len() != estimates[0].len()) {
            return Err(format!("gradient estimate {bad} has {} values, estimate 0 has {}", estimates[bad].len(), estimates[0].len()));
        }
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        let mut cross = Vec::with_capacity(k * (k - 1) / 2);
        for i in 0..k {
            for j in i + 1..k {
                cross.push(dot(&estimates[i], &estimates[j]));
            }
        }
        let disjoint: Vec<f64> = (0..k / 2).map(|p| dot(&estimates[2 * p], &estimates[2 * p + 1])).collect();
        let m = disjoint.len() as f64;
        let disjoint_mean = disjoint.iter().sum::<f64>() / m;
        let variance = disjoint.iter().map(|d| (d - disjoint_mean).powi(2)).sum::<f64>() / (m - 1.0);
        let mean_square = estimates.iter().map(|e| dot(e, e)).sum::<f64>() / k as f64;
        if mean_square == 0.0 {
            return Err("every gradient estimate is zero: no prompt group's rewards differed (all advantages zero)".into());
        }
        Ok(GradientSnr {
            estimates: k,
            samples_per_estimate,
            signal: cross.iter().sum::<f64>() / cross.len() as f64,
            signal_se: (variance / m).sqrt(),
            mean_square,
        })
    }

    /// `tr(S)`: the noise of one sample's gradient.
    pub fn per_sample_noise(&self) -> f64 {
        (self.mean_square - self.signal) * self.samples_per_estimate as f64
    }

    /// The expected cosine between two independent estimates of `n` samples:
    /// `|mu|^2 / (|mu|^2 + tr(S) / n)`.
    pub fn cosine_at(&self, n: usize) -> f64 {
        cosine(self.signal.max(0.0), self.per_sample_noise(), n)
    }

    /// Samples per update at which the signal equals the noise, `tr(S) / |mu|^2`: a point value
    /// when the signal lies two standard errors above zero, else only a lower bound from
    /// `|mu|^2 < signal + 2 se` (`resolved` false).
    pub fn samples_for_unit_snr(&self) -> (f64, bool) {
        let (signal, resolved) = self.signal_or_bound();
        (self.per_sample_noise() / signal, resolved)
    }

    /// The signal when it lies two standard errors above zero, else its upper bound.
    fn signal_or_bound(&self) -> (f64, bool) {
        let resolved = self.signal > 2.0 * self.signal_se;
        (if resolved { self.signal } else { self.signal.max(0.0) + 2.0 * self.signal_se }, resolved)
    }

    /// A few lines for a person: the figures and what they mean for an update of `n` samples.
    pub fn report(&self, update_samples: usize) -> String {
        let (signal, resolved) = self.signal_or_bound();
        let needed = self.per_sample_noise() / signal;
        // The cosine of one estimate with the true gradient: |mu| / sqrt(|mu|^2 + tr(S) / n).
        let alignment = cosine(signal, self.per_sample_noise(), update_samples).sqrt();
        let verdict = if resolved {
            format!(
                "the gradient's signal equals its noise at {needed:.0} samples per update; an update of {update_samples} samples points {alignment:.3} (cosine) along the true gradient"
            )
        } else {
            format!(
                "the signal is not distinguishable from zero: signal and noise would be equal at no fewer than {needed:.0} samples per update, and an update of {update_samples} samples points at most {alignment:.3} (cosine) along the true gradient"
            )
        };
        format!(
            "{} estimates of {} samples: |E g|^2 = {:.3e} +- {:.3e}, E |g|^2 = {:.3e}, noise of one sample's gradient tr(S) = {:.3e}\n{verdict}\n",
            self.estimates,
            self.samples_per_estimate,
            self.signal,
            self.signal_se,
            self.mean_square,
            self.per_sample_noise(),
        )
    }
}

/// `s / (s + noise / n)`.
fn cosine(signal: f64, noise: f64, n: usize) -> f64 {
    if signal <= 0.0 { 0.0 } else { signal / (signal + noise / n as f64) }
}

/// Every float parameter's gradient in `grads`, in `module`'s visiting order, flattened (zeros
/// for parameters without one).
pub fn flatten_gradient<B: AutodiffBackend, M: AutodiffModule<B>>(module: &M, grads: &GradientsParams) -> Vec<f64> {
    struct Flatten<'a> {
        grads: &'a GradientsParams,
        out: Vec<f64>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Flatten<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            match self.grads.get::<B::InnerBackend, D>(param.id) {
                Some(g) => self.out.extend(g.into_data().convert::<f32>().into_vec::<f32>().expect("f32").into_iter().map(f64::from)),
                None => self.out.extend(std::iter::repeat_n(0.0, param.val().shape().num_elements())),
            }
        }
    }
    let mut visitor = Flatten { grads, out: Vec::new() };
    module.visit(&mut visitor);
    visitor.out
}

/// `estimates` independent Flow-GRPO gradients of `trainer`'s current policy on partition
/// `partition` (each with fresh prompts and noise; the adapter does not move) and their figures;
/// `each` sees every estimate's stats and gradient norm.
pub fn measure<B: AutodiffBackend, O: Optimizer<LoraAdapter<B>, B>>(
    trainer: &mut GrpoTrainer<B, O>,
    partition: usize,
    estimates: usize,
    device: &B::Device,
    mut each: impl FnMut(usize, &GrpoStats, f64),
) -> Result<GradientSnr, String> {
    let samples = trainer.config.rollout.prompts * trainer.config.rollout.group_size;
    let mut flat = Vec::with_capacity(estimates);
    let mut spread = false;
    for k in 0..estimates {
        let (grads, stats) = trainer.gradient_on(partition, device)?;
        spread |= stats.groups.zero_std_fraction < 1.0;
        let grads = grads.ok_or("no stochastic step is trained (`rollout.sde_window` / `timestep_fraction`): there is no gradient")?;
        let g = flatten_gradient(&trainer.state.adapter, &grads);
        each(k, &stats, g.iter().map(|v| v * v).sum::<f64>().sqrt());
        flat.push(g);
    }
    if !spread {
        // Only the KL term (and float noise) is left: no policy gradient to measure.
        return Err(format!("in {estimates} estimates no prompt group's rewards differed (all advantages zero): no policy gradient"));
    }
    GradientSnr::from_estimates(&flat, samples)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_distr::{Distribution, Normal};

    /// `K` estimates, each the mean of `n` samples `mu + N(0, sigma^2 I)`.
    fn estimates(mu: &[f64], sigma: f64, n: usize, k: usize, seed: u64) -> Vec<Vec<f64>> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let normal = Normal::new(0.0, sigma / (n as f64).sqrt()).unwrap();
        (0..k).map(|_| mu.iter().map(|m| m + normal.sample(&mut rng)).collect()).collect()
    }

    #[test]
    fn recovers_signal_and_noise_of_known_gradients() {
        // |mu|^2 = 1 (one unit coordinate of 50), tr(S) = 50 sigma^2 = 50: rho = 1/50, so signal
        // equals noise at 50 samples per update.
        let mut mu = vec![0.0; 50];
        mu[0] = 1.0;
        let snr = GradientSnr::from_estimates(&estimates(&mu, 1.0, 10, 400, 1), 10).unwrap();
        assert!((snr.signal - 1.0).abs() < 3.0 * snr.signal_se && snr.signal_se < 0.1, "{snr:?}");
        assert!((snr.mean_square - (1.0 + 50.0 / 10.0)).abs() < 0.2, "{snr:?}");
        let (needed, resolved) = snr.samples_for_unit_snr();
        assert!(resolved && (needed - 50.0).abs() < 8.0, "{needed}");
        // At 50 samples the two halves are equal: cosine 1/2.
        assert!((snr.cosine_at(50) - 0.5).abs() < 0.05);
    }

    #[test]
    fn pure_noise_gives_only_a_lower_bound() {
        let snr = GradientSnr::from_estimates(&estimates(&[0.0; 50], 1.0, 10, 40, 2), 10).unwrap();
        assert!(snr.signal.abs() < 3.0 * snr.signal_se, "{snr:?}");
        let (bound, resolved) = snr.samples_for_unit_snr();
        assert!(!resolved && bound.is_finite() && bound > 0.0);
        assert!(snr.report(32).contains("not distinguishable from zero"));
    }

    #[test]
    fn too_few_or_ragged_estimates_are_refused() {
        assert!(GradientSnr::from_estimates(&vec![vec![1.0]; 3], 8).unwrap_err().contains("at least 4"));
        let ragged = vec![vec![1.0, 2.0], vec![1.0, 2.0], vec![1.0], vec![1.0, 2.0]];
        assert!(GradientSnr::from_estimates(&ragged, 8).unwrap_err().contains("estimate 2 has 1 values"));
        assert!(GradientSnr::from_estimates(&vec![vec![0.0; 3]; 4], 8).unwrap_err().contains("all advantages zero"));
    }
}
