//! Exponential moving average of trainable weights (docs/reference.md section 5): decay
//! `min((1 + n) / (10 + n), max_decay)` at update `n`, used for evaluation and checkpoints.

use std::collections::HashMap;

use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::Tensor;
use crate::{AutodiffBackend, Backend};

/// An EMA copy of a module, kept on the inner (non-autodiff) backend. Parameters are matched
/// by [`ParamId`], which `valid()` preserves; parameters that do not require gradients (a
/// frozen base) are copied, not averaged.
pub struct Ema<B: AutodiffBackend, M: AutodiffModule<B>> {
    pub average: M::InnerModule,
    pub updates: usize,
    pub max_decay: f64,
}

impl<B: AutodiffBackend, M: AutodiffModule<B>> Ema<B, M> {
    /// Starts the average at the module's current weights.
    pub fn new(module: &M, max_decay: f64) -> Self {
        Self { average: module.valid(), updates: 0, max_decay }
    }

    /// The decay of the next update: `min((1 + n) / (10 + n), max_decay)`.
    pub fn decay(&self) -> f64 {
        let n = self.updates as f64;
        ((1.0 + n) / (10.0 + n)).min(self.max_decay)
    }

    /// `average = d * average + (1 - d) * current` for every parameter.
    pub fn update(&mut self, module: &M) {
        let decay = self.decay();
        self.update_with(module, decay);
    }

    /// `average = decay * average + (1 - decay) * current` with a given decay (DiffusionNFT's
    /// old policy follows its own schedule), counted as an update.
    pub fn update_with(&mut self, module: &M, decay: f64) {
        let mut current = Collect::<B::InnerBackend> { tensors: HashMap::new() };
        module.valid().visit(&mut current);
        let average = std::mem::replace(&mut self.average, module.valid());
        self.average = average.map(&mut Blend { current: current.tensors, decay });
        self.updates += 1;
    }
}

struct Collect<B: Backend> {
    tensors: HashMap<ParamId, Tensor<B, 1>>,
}

impl<B: Backend> ModuleVisitor<B> for Collect<B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.tensors.insert(param.id, param.val().flatten(0, D - 1));
    }
}

struct Blend<B: Backend> {
    current: HashMap<ParamId, Tensor<B, 1>>,
    decay: f64,
}

impl<B: Backend> ModuleMapper<B> for Blend<B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let Some(current) = self.current.remove(&param.id) else { return param };
        let decay = self.decay;
        param.map(|avg| {
            let shape = avg.shape();
            avg * decay + current.reshape(shape) * (1.0 - decay)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::nn::{Linear, LinearConfig};

    #[test]
    fn ema_follows_the_decay_schedule() {
        type AD = Autodiff<Flex>;
        let device = Default::default();
        let mut model: Linear<AD> = LinearConfig::new(2, 3).init(&device);
        let start = model.weight.val().into_data().into_vec::<f32>().unwrap();
        let mut ema = Ema::<AD, Linear<AD>>::new(&model, 0.9);
        assert!((ema.decay() - 0.1).abs() < 1e-12, "n = 0: 1/10");
        model.weight = model.weight.clone().map(|w| w + 1.0);
        ema.update(&model);
        // avg = 0.1 * start + 0.9 * (start + 1) = start + 0.9
        let avg = ema.average.weight.val().into_data().into_vec::<f32>().unwrap();
        for (a, s) in avg.iter().zip(&start) {
            assert!((a - (s + 0.9)).abs() < 1e-6);
        }
        assert!((ema.decay() - 2.0 / 11.0).abs() < 1e-12);
        ema.updates = 1000;
        assert_eq!(ema.decay(), 0.9, "capped");
    }
}
