//! The SD3 shifted flow-matching schedule (diffusers `FlowMatchEulerDiscreteScheduler`,
//! docs/reference.md section 2).

/// diffusers' `FlowMatchEulerDiscreteScheduler` without dynamic shifting: `shift` and the
/// number of training timesteps (1000 for SD3).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowSchedule {
    /// The time shift (SD3 / SD3.5: 3.0).
    pub shift: f64,
    /// Training timesteps (1000).
    #[serde(default = "default_train_timesteps")]
    pub train_timesteps: usize,
}

fn default_train_timesteps() -> usize {
    1000
}

impl Default for FlowSchedule {
    fn default() -> Self {
        Self::sd3()
    }
}

impl FlowSchedule {
    /// SD3 / SD3.5: shift 3, 1000 training timesteps.
    pub fn sd3() -> Self {
        Self { shift: 3.0, train_timesteps: 1000 }
    }

    pub fn new(shift: f64) -> Self {
        Self { shift, train_timesteps: 1000 }
    }

    /// Checks a schedule read from a recipe: a finite shift > 0 and at least one training
    /// timestep; `prefix` is the field path before `shift` (e.g. `eval.sampling.schedule.`).
    pub fn validate(&self, prefix: &str) -> Result<(), String> {
        super::checks::positive(&format!("`{prefix}shift`"), self.shift)?;
        super::checks::at_least_one(&format!("`{prefix}train_timesteps`"), self.train_timesteps)
    }

    /// The shift map `f(s) = shift s / (1 + (shift - 1) s)`.
    pub fn shift_sigma(&self, s: f64) -> f64 {
        self.shift * s / (1.0 + (self.shift - 1.0) * s)
    }

    /// The smallest training sigma `f(1 / T_train)`, computed in f32 as diffusers does
    /// (0.0029940 for shift 3).
    fn sigma_min(&self) -> f64 {
        let s = 1.0f32 / self.train_timesteps as f32;
        let shift = self.shift as f32;
        (shift * s / (1.0 + (shift - 1.0) * s)) as f64
    }

    /// `set_timesteps(steps)`'s sigmas: `t = linspace(1000 s_max, 1000 s_min, steps)`,
    /// `s = f(t / 1000)` rounded to f32, then a final 0: `steps + 1` values from 1 down to 0.
    /// For shift 3 and 10 steps: `[1.0, .96013, .91335, .85769, .79037, .70728, .60215,
    /// .46488, .27805, .00893, 0]`.
    pub fn sigmas(&self, steps: usize) -> Vec<f32> {
        assert!(steps > 0, "a schedule needs at least one step");
        let n = self.train_timesteps as f64;
        let (t_max, t_min) = (n, self.sigma_min() * n);
        let mut sigmas: Vec<f32> = (0..steps)
            .map(|i| {
                let t = if steps == 1 { t_max } else { t_max + (t_min - t_max) * i as f64 / (steps - 1) as f64 };
                self.shift_sigma(t / n) as f32
            })
            .collect();
        sigmas.push(0.0);
        sigmas
    }

    /// `set_timesteps(steps)`'s timesteps: `1000 * sigma` for the first `steps` sigmas (what the
    /// transformer receives), in f32.
    pub fn timesteps(&self, steps: usize) -> Vec<f32> {
        let n = self.train_timesteps as f32;
        self.sigmas(steps)[..steps].iter().map(|s| s * n).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shift_three_ten_steps_matches_reference_values() {
        // docs/reference.md section 2 (five decimals, from diffusers).
        let expected = [1.0, 0.96013, 0.91335, 0.85769, 0.79037, 0.70728, 0.60215, 0.46488, 0.27805, 0.00893, 0.0];
        let sigmas = FlowSchedule::sd3().sigmas(10);
        for (s, e) in sigmas.iter().zip(expected) {
            assert!((*s as f64 - e).abs() < 6e-6, "{sigmas:?}");
        }
    }

    #[test]
    fn last_nonzero_sigma_is_the_same_for_every_step_count() {
        for n in [2, 10, 40, 100] {
            let s = FlowSchedule::sd3().sigmas(n);
            assert!((s[n - 1] - 0.0089286).abs() < 1e-6, "{n}: {}", s[n - 1]);
            assert!(s.windows(2).all(|w| w[0] > w[1]), "decreasing");
        }
    }
}
