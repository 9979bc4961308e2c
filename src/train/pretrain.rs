//! Flow-matching pre-training of a world pipeline (transformer and text encoder together):
//! `x_s = (1 - s) x0 + s eps`, loss `||v_theta(x_s, s, c) - (eps - x0)||^2` averaged over
//! elements (docs/reference.md section 1), with logit-normal or uniform `s`, caption dropout for
//! classifier-free guidance, AdamW with grad-norm clipping, and an EMA of the weights.

use burn::module::AutodiffModule;
use burn::optim::{GradientsParams, Optimizer};
use crate::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use super::adapter::OptimConfig;
use crate::flow::SeededNoise;
use crate::pipeline::world::{Pipeline, WorldModel};
use crate::world::render::Layout;

/// How training sigmas are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum TimestepSampling {
    /// `s = sigmoid(m + std * n)`, `n ~ N(0, 1)` (SD3's choice; m 0, std 1).
    LogitNormal { mean: f64, std: f64 },
    /// `s ~ U(0, 1)`.
    Uniform,
}

impl Default for TimestepSampling {
    fn default() -> Self {
        Self::LogitNormal { mean: 0.0, std: 1.0 }
    }
}

impl TimestepSampling {
    pub fn sample(&self, rng: &mut impl Rng) -> f64 {
        match *self {
            Self::LogitNormal { mean, std } => {
                let n: f64 = StandardNormal.sample(rng);
                1.0 / (1.0 + (-(mean + std * n)).exp())
            }
            Self::Uniform => rng.random_range(0.0..1.0),
        }
    }
}

/// A source of captioned training images.
pub trait ImageCaptions {
    /// `count` images `[3, H, W]` (flattened CHW, values in `[0, 1]`) with their captions.
    fn batch(&mut self, count: usize) -> (Vec<f32>, Vec<String>);
}

/// Pre-training settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainConfig {
    pub steps: usize,
    pub batch_size: usize,
    pub optim: OptimConfig,
    #[serde(default)]
    pub timesteps: TimestepSampling,
    /// Probability of replacing a caption by `""` (unconditional training for CFG).
    #[serde(default = "default_caption_dropout")]
    pub caption_dropout: f64,
    /// Upper bound of the EMA decay.
    #[serde(default = "default_ema")]
    pub ema_max_decay: f64,
    #[serde(default)]
    pub seed: u64,
    /// Linear learning-rate warm-up: step `k` (from 1) uses `lr * min(1, k / warmup_steps)`.
    /// Continuing a trained model with a fresh AdamW needs it: Adam's first steps move every
    /// weight by about `lr`, whatever its gradient (one step at lr 1e-3 took the shipped base's
    /// DeQA from 2.9 to 1.2). 0 = none.
    #[serde(default)]
    pub warmup_steps: usize,
}

impl PretrainConfig {
    /// The learning rate of optimiser step `step` (counted from 1), warm-up included.
    pub fn lr_at(&self, step: usize) -> f64 {
        match self.warmup_steps {
            0 => self.optim.lr,
            w => self.optim.lr * (step as f64 / w as f64).min(1.0),
        }
    }
}

fn default_caption_dropout() -> f64 {
    0.1
}
fn default_ema() -> f64 {
    0.999
}

/// One pre-training step's figures.
#[derive(Debug, Clone, Copy)]
pub struct PretrainStats {
    pub loss: f64,
}

/// The pre-training state: model, optimiser, EMA and random streams.
pub struct Pretrainer<B: AutodiffBackend, O: Optimizer<WorldModel<B>, B>> {
    pub pipeline: Pipeline<B>,
    pub optimizer: O,
    pub ema: super::ema::Ema<B, WorldModel<B>>,
    pub config: PretrainConfig,
    pub step: usize,
    rng: ChaCha8Rng,
    noise: SeededNoise,
    peer: Option<super::parallel::Peer<B::InnerBackend>>,
}

/// Builds a pre-trainer for `pipeline`.
pub fn pretrainer<B: AutodiffBackend>(
    pipeline: Pipeline<B>,
    config: PretrainConfig,
) -> Pretrainer<B, impl Optimizer<WorldModel<B>, B>> {
    let optimizer = config.optim.adamw().init::<B, WorldModel<B>>();
    let ema = super::ema::Ema::new(&pipeline.model, config.ema_max_decay);
    Pretrainer {
        rng: ChaCha8Rng::seed_from_u64(config.seed),
        noise: SeededNoise::new(config.seed ^ 0x5eed),
        pipeline,
        optimizer,
        ema,
        config,
        step: 0,
        peer: None,
    }
}

impl<B: AutodiffBackend, O: Optimizer<WorldModel<B>, B>> Pretrainer<B, O> {
    /// Makes this pre-trainer one data-parallel peer of a group (see [`super::parallel`]):
    /// every peer draws the whole batch's images, captions, noise, times and caption dropout
    /// (from the same seeds), trains on its share of the rows, and the loss and gradients are
    /// averaged over the peers: the step one device takes on the whole batch.
    pub fn with_peer(mut self, peer: super::parallel::Peer<B::InnerBackend>) -> Result<Self, String> {
        peer.check_divides(self.config.batch_size, "train.batch_size")?;
        self.peer = Some(peer);
        Ok(self)
    }

    /// One optimiser step on a fresh batch from `data`.
    pub fn step(&mut self, data: &mut impl ImageCaptions, device: &B::Device) -> Result<PretrainStats, String> {
        let b = self.config.batch_size;
        let rows = self.peer.as_ref().map_or(0..b, |p| p.rows(b));
        let (pixels, captions) = data.batch(b);
        let side = self.pipeline.index.image_size;
        let per_image = 3 * side * side;
        let share = pixels[rows.start * per_image..rows.end * per_image].to_vec();
        let images = Tensor::<B, 4>::from_data(TensorData::new(share, [rows.len(), 3, side, side]), device);
        let x0 = self.pipeline.encode_images(images);
        let [_, c, h, w] = x0.dims();
        let eps: Tensor<B, 4> = self.noise.sample::<B, 4>([b, c, h, w], device).slice([rows.clone()]);
        let sigmas: Vec<f32> = (0..b).map(|_| self.config.timesteps.sample(&mut self.rng) as f32).collect();
        let FlowMatchingPair { x_s, s, target } = FlowMatchingPair::new(x0, eps, sigmas[rows.clone()].to_vec(), device);
        let prompts: Vec<&str> = captions
            .iter()
            .map(|c| if self.rng.random_bool(self.config.caption_dropout) { "" } else { c.as_str() })
            .collect();
        let model = &self.pipeline.model;
        let cond = model.text_encoder.encode(&self.pipeline.tokenizer, &prompts[rows], device);
        let v = model.transformer.forward(x_s, cond.tokens, cond.pooled, s * 1000.0);
        let loss = (v - target).powi_scalar(2).mean();
        let mut value = loss.clone().into_scalar().elem::<f64>();
        let mut grads = GradientsParams::from_grads(loss.backward(), model);
        if let Some(peer) = &self.peer {
            // Equal shares of the batch: its loss and gradient are the peers' means.
            value = peer.mean(&[value])?[0];
            grads = peer.mean_gradients(model, grads)?;
        }
        let model = self.pipeline.model.clone();
        self.step += 1;
        self.pipeline.model = self.optimizer.step(self.config.lr_at(self.step), model, grads);
        self.ema.update(&self.pipeline.model);
        Ok(PretrainStats { loss: value })
    }

    /// The resumable state: the live model, the EMA, AdamW's moments, the step (which also
    /// places the warm-up) and the random streams (times and caption dropout, noise).
    pub fn save_state(&self) -> Result<super::resume::TrainerState, String> {
        use super::resume::{RngState, TrainerState};
        let mut state = TrainerState::default();
        state.module::<B, _>("model.bin", &self.pipeline.model)?;
        state.module::<B::InnerBackend, _>("ema.bin", &self.ema.average)?;
        state.record::<B, _>("optimizer.bin", self.optimizer.to_record())?;
        state.set("step", self.step);
        state.set("ema_updates", self.ema.updates);
        state.set("rng", RngState::of(&self.rng));
        state.set("noise", RngState::of(self.noise.rng()));
        Ok(state)
    }

    /// Continues from a state [`Self::save_state`] wrote.
    pub fn restore(&mut self, saved: &super::resume::SavedState<'_>, device: &B::Device) -> Result<(), String> {
        use super::resume::RngState;
        self.pipeline.model = saved.module::<B, _>("model.bin", self.pipeline.model.clone(), device)?;
        self.ema.average = saved.module::<B::InnerBackend, _>("ema.bin", self.ema.average.clone(), device)?;
        self.optimizer = self.optimizer.clone().load_record(saved.record::<B, O::Record>("optimizer.bin", device)?);
        self.step = saved.get("step")?;
        self.ema.updates = saved.get("ema_updates")?;
        self.rng = saved.get::<RngState>("rng")?.rng()?;
        self.noise = SeededNoise::from_rng(saved.get::<RngState>("noise")?.rng()?);
        Ok(())
    }

    /// Whether every weight of the live model is finite.
    pub fn weights_finite(&self) -> bool {
        super::weights_finite::<B::InnerBackend, _>(&self.pipeline.model.valid())
    }

    /// The EMA weights as an inference pipeline.
    pub fn ema_pipeline(&self) -> Pipeline<B::InnerBackend> {
        Pipeline {
            model: self.ema.average.clone(),
            transformer_config: self.pipeline.transformer_config.clone(),
            text_config: self.pipeline.text_config.clone(),
            tokenizer: self.pipeline.tokenizer.clone(),
            index: self.pipeline.index.clone(),
        }
    }
}

/// Moves a pipeline onto the autodiff backend for training.
pub fn to_autodiff<B: AutodiffBackend>(pipeline: Pipeline<B::InnerBackend>) -> Pipeline<B> {
    Pipeline {
        model: super::trainable(<WorldModel<B> as AutodiffModule<B>>::from_inner(pipeline.model)),
        transformer_config: pipeline.transformer_config,
        text_config: pipeline.text_config,
        tokenizer: pipeline.tokenizer,
        index: pipeline.index,
    }
}

/// Where pre-training captions come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CaptionSource {
    /// The shipped training prompts (`assets/world/prompts_train.jsonl`, 2,000 per task), the
    /// RL stages' own prompts: a small model memorises them.
    #[default]
    TrainSplit,
    /// Fresh prompts drawn from the grammar at every pair (tasks uniform), redrawn in their
    /// family while they are test prompts (up to 100 times: the small families, such as
    /// `a photo of a circle` or the colours, are all in the test set and cannot avoid it), so
    /// the base meets the test prompts' two-object combinations first at evaluation.
    Grammar,
}

/// Captioned renders for pre-training: each pair draws a prompt from its [`CaptionSource`] and
/// renders it in a [`Layout`]; with probability `wrong_fraction` the image departs from its
/// caption (wrong colour, count, character, style, ...), so the pre-trained model follows
/// prompts only partly.
pub struct WorldPairs {
    captions: Captions,
    wrong_fraction: f32,
    layout: Layout,
    task_weights: Option<[f32; 4]>,
    rng: ChaCha8Rng,
}

/// What a [`CaptionSource`] draws from.
enum Captions {
    /// The shipped training prompts, and their indices by task (in [`Task::ALL`] order) for
    /// weighted draws.
    ///
    /// [`Task::ALL`]: crate::world::Task::ALL
    TrainSplit(Vec<crate::world::prompts::Prompt>, [Vec<usize>; 4]),
    /// The grammar, avoiding these test prompt texts.
    Grammar(std::collections::HashSet<String>),
}

impl WorldPairs {
    pub fn new(source: CaptionSource, layout: Layout, wrong_fraction: f32, seed: u64) -> Self {
        use crate::world::prompts::{Split, shipped_prompts};
        let captions = match source {
            CaptionSource::TrainSplit => {
                let prompts = shipped_prompts(Split::Train);
                let by_task = crate::world::Task::ALL.map(|task| (0..prompts.len()).filter(|&i| prompts[i].task() == task).collect());
                Captions::TrainSplit(prompts, by_task)
            }
            CaptionSource::Grammar => Captions::Grammar(shipped_prompts(Split::Test).into_iter().map(|p| p.text).collect()),
        };
        Self { captions, wrong_fraction, layout, task_weights: None, rng: ChaCha8Rng::seed_from_u64(seed) }
    }

    /// Draws each caption's task with these weights (in [`Task::ALL`](crate::world::Task::ALL)
    /// order, at least one positive) instead of uniformly; `None` keeps the uniform draw (and
    /// its random stream).
    pub fn with_task_weights(mut self, weights: Option<[f32; 4]>) -> Self {
        if let Some(w) = weights {
            assert!(w.iter().all(|&x| x >= 0.0 && x.is_finite()) && w.iter().any(|&x| x > 0.0), "task weights {w:?}");
        }
        self.task_weights = weights;
        self
    }

    fn weighted_task(&mut self, weights: [f32; 4]) -> crate::world::Task {
        use crate::world::Task;
        let total: f32 = weights.iter().sum();
        let mut u = self.rng.random::<f32>() * total;
        for (task, w) in Task::ALL.into_iter().zip(weights) {
            if u < w {
                return task;
            }
            u -= w;
        }
        // rounding at the top end: the last task with a positive weight
        Task::ALL.into_iter().zip(weights).filter(|(_, w)| *w > 0.0).last().map(|(t, _)| t).unwrap_or(Task::Text)
    }

    /// The stream that draws captions, layouts and wrong captions (for resumable checkpoints).
    pub fn rng(&self) -> &ChaCha8Rng {
        &self.rng
    }

    pub fn set_rng(&mut self, rng: ChaCha8Rng) {
        self.rng = rng;
    }

    /// The next caption's prompt.
    pub fn next_prompt(&mut self) -> crate::world::prompts::Prompt {
        use crate::world::prompts::{sample_any_family, sample_family, sample_prompt_avoiding};
        let task = self.task_weights.map(|w| self.weighted_task(w));
        match (&self.captions, task) {
            (Captions::TrainSplit(prompts, _), None) => prompts[self.rng.random_range(0..prompts.len())].clone(),
            (Captions::TrainSplit(prompts, by_task), Some(task)) => {
                let of_task = &by_task[crate::world::Task::ALL.iter().position(|&t| t == task).expect("a task of Task::ALL")];
                prompts[of_task[self.rng.random_range(0..of_task.len())]].clone()
            }
            (Captions::Grammar(test_prompts), task) => {
                let family = match task {
                    Some(task) => sample_family(task, &mut self.rng),
                    None => sample_any_family(&mut self.rng),
                };
                sample_prompt_avoiding(family, test_prompts, &mut self.rng)
            }
        }
    }
}

impl ImageCaptions for WorldPairs {
    fn batch(&mut self, count: usize) -> (Vec<f32>, Vec<String>) {
        let mut pixels = Vec::with_capacity(count * 3 * 32 * 32);
        let mut captions = Vec::with_capacity(count);
        for _ in 0..count {
            let prompt = self.next_prompt();
            let pair = crate::world::pairs::training_pair(&prompt, self.wrong_fraction, self.layout, &mut self.rng);
            pixels.extend(pair.image.to_chw());
            captions.push(pair.caption);
        }
        (pixels, captions)
    }
}

/// One flow-matching regression batch (docs/reference.md section 1): the noised latents
/// `x_s = (1 - s) x0 + s eps`, the times `s` (`[B]`, the transformer takes `1000 s`) and the
/// velocity target `eps - x0`.
pub struct FlowMatchingPair<B: Backend> {
    pub x_s: Tensor<B, 4>,
    pub s: Tensor<B, 1>,
    pub target: Tensor<B, 4>,
}

impl<B: Backend> FlowMatchingPair<B> {
    /// The pair for clean latents `x0`, noise `eps` (same shape) and one `s` per sample.
    pub fn new(x0: Tensor<B, 4>, eps: Tensor<B, 4>, sigmas: Vec<f32>, device: &B::Device) -> Self {
        let b = sigmas.len();
        let s = Tensor::<B, 1>::from_data(TensorData::new(sigmas, [b]), device);
        let s4 = s.clone().reshape([b, 1, 1, 1]);
        let x_s = x0.clone() * (s4.clone().neg() + 1.0) + eps.clone() * s4;
        Self { x_s, s, target: eps - x0 }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use burn::backend::{Autodiff, Flex};
    use burn::module::{Module, ModuleVisitor, Param};

    use super::*;
    use crate::world::prompts::{Prompt, Split, shipped_prompts};
    use crate::world::spec::Family;

    #[test]
    fn grammar_captions_avoid_test_prompts_where_the_family_allows() {
        let test: HashSet<String> = shipped_prompts(Split::Test).into_iter().map(|p| p.text).collect();
        let train: HashSet<String> = shipped_prompts(Split::Train).into_iter().map(|p| p.text).collect();
        let mut pairs = WorldPairs::new(CaptionSource::Grammar, Layout::Canonical, 0.3, 5);
        let (pixels, captions) = pairs.batch(3_000);
        assert_eq!(pixels.len(), 3_000 * 3 * 32 * 32);
        let mut families = HashSet::new();
        let mut outside_train = 0;
        for caption in &captions {
            let family = Prompt::parse(caption).unwrap().family();
            families.insert(family);
            if matches!(family, Family::ColorAttr | Family::Position | Family::Text | Family::Preference) {
                assert!(!test.contains(caption), "{family} caption {caption:?} is a test prompt");
            }
            outside_train += usize::from(!train.contains(caption));
        }
        // every family is drawn, the small ones (all of whose prompts are test prompts) included
        assert_eq!(families.len(), 9, "{families:?}");
        // (about a sixth: the small families, many quality prompts and, with one or two
        // characters, most text prompts are in the train split too)
        assert!(outside_train > 400, "only {outside_train} captions are new");
        // the train split source draws only training prompts
        let (_, captions) = WorldPairs::new(CaptionSource::TrainSplit, Layout::Scattered, 0.3, 5).batch(200);
        assert!(captions.iter().all(|c| train.contains(c)));
    }

    /// Task weights set each task's share of the captions: a task of weight 0 never appears,
    /// and the shares of the others match their weights within binomial error; without weights
    /// the stream is the uniform draw's, caption for caption.
    #[test]
    fn task_weights_set_each_tasks_share_of_the_captions() {
        use crate::world::Task;
        use crate::world::prompts::Prompt;
        use std::collections::HashMap;
        let n = 4000;
        for source in [CaptionSource::Grammar, CaptionSource::TrainSplit] {
            let mut pairs = WorldPairs::new(source, Layout::Canonical, 0.3, 9).with_task_weights(Some([1.0, 3.0, 0.0, 0.0]));
            let mut counts: HashMap<Task, usize> = HashMap::new();
            for _ in 0..n {
                *counts.entry(pairs.next_prompt().task()).or_default() += 1;
            }
            assert_eq!(counts.get(&Task::Preference), None, "{source:?}");
            assert_eq!(counts.get(&Task::Quality), None, "{source:?}");
            let text = counts[&Task::Text] as f64 / n as f64;
            // expected 0.75, binomial standard error sqrt(0.75 * 0.25 / 4000) = 0.0068: 5 se
            assert!((text - 0.75).abs() < 0.035, "{source:?}: text share {text}");
        }
        let draw = |weights: Option<[f32; 4]>| -> Vec<Prompt> {
            let mut pairs = WorldPairs::new(CaptionSource::Grammar, Layout::Canonical, 0.3, 9).with_task_weights(weights);
            (0..50).map(|_| pairs.next_prompt()).collect()
        };
        let plain: Vec<Prompt> = {
            let mut pairs = WorldPairs::new(CaptionSource::Grammar, Layout::Canonical, 0.3, 9);
            (0..50).map(|_| pairs.next_prompt()).collect()
        };
        assert_eq!(draw(None), plain);
        // uniform weights draw every task about equally often
        let uniform = draw(Some([1.0; 4]));
        assert!(Task::ALL.iter().all(|t| uniform.iter().any(|p| p.task() == *t)));
    }

    /// Every float weight of a module, flattened in visiting order.
    fn weights<B: Backend, M: Module<B>>(module: &M) -> Vec<f32> {
        struct Collect(Vec<f32>);
        impl<B: Backend> ModuleVisitor<B> for Collect {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
                self.0.extend(param.val().into_data().convert::<f32>().into_vec::<f32>().unwrap());
            }
        }
        let mut c = Collect(Vec::new());
        module.visit(&mut c);
        c.0
    }

    /// AdamW's first step moves each weight by `lr * (g / (|g| + eps) + weight_decay * w)`,
    /// linear in the learning rate: with a warm-up of 4 steps the first step moves every weight
    /// by a quarter of what it moves without one (same model, batch, noise and seed); the schedule
    /// reaches the full rate at step 4 and stays there.
    #[test]
    fn warmup_scales_the_first_steps_linearly() {
        type AD = Autodiff<Flex>;
        let device = Default::default();
        let config = |warmup_steps| PretrainConfig {
            steps: 1,
            batch_size: 2,
            optim: OptimConfig { lr: 1e-3, betas: (0.9, 0.999), weight_decay: 1e-4, grad_clip: 0.0 },
            timesteps: TimestepSampling::default(),
            caption_dropout: 0.0,
            ema_max_decay: 0.999,
            seed: 3,
            warmup_steps,
        };
        let lrs: Vec<f64> = (1..=6).map(|k| config(4).lr_at(k)).collect();
        assert_eq!(lrs, [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3]);
        assert_eq!(config(0).lr_at(1), 1e-3);

        let base = Pipeline::<Flex>::new_world(&crate::pipeline::world::WorldModelConfig::default(), &device).unwrap();
        let before = weights(&base.model);
        let moved = |warmup| {
            let mut trainer = pretrainer::<AD>(to_autodiff::<AD>(base.clone()), config(warmup));
            let mut data = WorldPairs::new(CaptionSource::Grammar, Layout::Canonical, 0.3, 5);
            trainer.step(&mut data, &device).unwrap();
            let after = weights(&trainer.pipeline.model.valid());
            after.iter().zip(&before).map(|(a, b)| (a - b) as f64).collect::<Vec<f64>>()
        };
        let (full, warm) = (moved(0), moved(4));
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!(norm(&full) > 0.0);
        let residual: Vec<f64> = full.iter().zip(&warm).map(|(f, w)| w - f / 4.0).collect();
        assert!(norm(&residual) < 1e-3 * norm(&full), "{} vs {}", norm(&residual), norm(&full));
    }
}
