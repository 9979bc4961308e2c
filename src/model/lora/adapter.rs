//! LoRA adapters over a frozen MMDiT: `W x + (alpha / r) B A x` on chosen linear layers, and the
//! routing that lets one forward pass use no adapter, one adapter, or a different adapter per
//! sample (Flow-OPD's teacher routing `R(c)`, paper section 5).

use burn::module::{Module, Param};
use burn::nn::Linear;
use crate::{Backend, kernels};
use burn::tensor::{Distribution, IndexingUpdateOp, Int, Tensor, TensorData};
use rand_burn::SeedableRng;
use rand_burn::rngs::StdRng;

use super::target::LoraTarget;
use crate::model::mmdit::{JointBlock, Mmdit};

/// Shape of a new adapter: rank `r`, `alpha` (the update is scaled by `alpha / r`) and the
/// layers it wraps in every block (layers a block lacks, such as `attn.to_add_out` of the
/// context-pre-only last block or `attn2` of single-attention blocks, are skipped).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    pub targets: Vec<LoraTarget>,
}

impl LoraConfig {
    /// The paper's adapters: r 32, alpha 64 on Flow-GRPO's target list.
    pub fn paper() -> Self {
        Self { rank: 32, alpha: 64.0, targets: LoraTarget::FLOW_GRPO.to_vec() }
    }

    pub fn new(rank: usize, alpha: f64, targets: Vec<LoraTarget>) -> Self {
        Self { rank, alpha, targets }
    }

    /// Fresh adapter for `model`: `A ~ N(0, 1/r^2)` (PEFT's `init_lora_weights="gaussian"`,
    /// what Flow-GRPO uses), `B = 0`, so the adapted model starts equal to the base.
    ///
    /// `A` is drawn from a generator of its own seeded with `seed` (rand's `StdRng`, the one
    /// Burn's CPU backend keeps for `Backend::seed`; on `Flex` the adapter equals the one
    /// `B::seed(seed)` followed by draws of `Tensor::random` gives), not from the backend's
    /// global generator: adapters built at the same time in one process cannot interleave
    /// their draws, and every backend starts from the same adapter.
    pub fn init<B: Backend>(&self, model: &Mmdit<B>, seed: u64, device: &B::Device) -> LoraAdapter<B> {
        let std = 1.0 / self.rank as f64;
        let mut rng = StdRng::seed_from_u64(seed);
        let blocks = model
            .transformer_blocks
            .iter()
            .map(|block| {
                let mut layers: Vec<Option<LoraLayer<B>>> = (0..LoraTarget::ALL.len()).map(|_| None).collect();
                for &target in &self.targets {
                    if let Some(base) = block.linear(target) {
                        let [d_in, d_out] = base.weight.dims();
                        let down = Tensor::from_data(TensorData::random::<f32, _, _>([d_in, self.rank], Distribution::Normal(0.0, std), &mut rng), device);
                        let up = Tensor::zeros([self.rank, d_out], device);
                        layers[target.index()] = Some(LoraLayer::new(down, up, self.alpha));
                    }
                }
                LoraBlock { layers }
            })
            .collect();
        LoraAdapter { blocks }
    }
}

/// One low-rank update `ΔW = (alpha / r) B A` of a linear layer.
#[derive(Module, Debug)]
pub struct LoraLayer<B: Backend> {
    /// `A`, in Burn's `[in, r]` orientation (PEFT's `lora_A.weight` is `[r, in]`).
    pub down: Param<Tensor<B, 2>>,
    /// `B`, `[r, out]` (PEFT's `lora_B.weight` is `[out, r]`).
    pub up: Param<Tensor<B, 2>>,
    /// `alpha`; the update is scaled by `alpha / r`.
    pub alpha: f64,
}

impl<B: Backend> LoraLayer<B> {
    pub fn new(down: Tensor<B, 2>, up: Tensor<B, 2>, alpha: f64) -> Self {
        Self { down: Param::from_tensor(down), up: Param::from_tensor(up), alpha }
    }

    pub fn rank(&self) -> usize {
        self.down.dims()[1]
    }

    /// `alpha / r`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank() as f64
    }

    /// `(alpha / r) x A B` for `x [.., in]` (the adapter's contribution to the layer output).
    pub fn delta<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        // In the adapter's precision (f32 over a bf16 / f16 base), returned in the input's.
        let dtype = x.dtype();
        let x = x.cast(self.down.val().dtype());
        // The scale goes on `B` ([r, out]) rather than on the output: one pass over the
        // activations fewer, forward and backward.
        kernels::linear(kernels::linear(x, self.down.val(), None), self.up.val() * self.scale(), None).cast(dtype)
    }

    /// The dense update `ΔW = (alpha / r) A B`, `[in, out]` (Burn orientation).
    pub fn delta_weight(&self) -> Tensor<B, 2> {
        self.down.val().matmul(self.up.val()) * self.scale()
    }
}

/// The adapted layers of one block, indexed by [`LoraTarget::index`].
#[derive(Module, Debug)]
pub struct LoraBlock<B: Backend> {
    pub layers: Vec<Option<LoraLayer<B>>>,
}

impl<B: Backend> LoraBlock<B> {
    pub fn layer(&self, target: LoraTarget) -> Option<&LoraLayer<B>> {
        self.layers.get(target.index()).and_then(Option::as_ref)
    }
}

/// A LoRA adapter for a whole MMDiT: one optional [`LoraLayer`] per block and target. It holds
/// only the adapter weights; the base model is passed separately, so any number of adapters
/// share one frozen base in memory.
#[derive(Module, Debug)]
pub struct LoraAdapter<B: Backend> {
    pub blocks: Vec<LoraBlock<B>>,
}

impl<B: Backend> LoraAdapter<B> {
    /// `(block, target, layer)` for every adapted layer, in block then target order.
    pub fn layers(&self) -> impl Iterator<Item = (usize, LoraTarget, &LoraLayer<B>)> {
        self.blocks.iter().enumerate().flat_map(|(i, block)| {
            LoraTarget::ALL.into_iter().filter_map(move |t| block.layer(t).map(|layer| (i, t, layer)))
        })
    }

    pub fn num_layers(&self) -> usize {
        self.layers().count()
    }

    /// The targets adapted in at least one block.
    pub fn targets(&self) -> Vec<LoraTarget> {
        let mut targets: Vec<LoraTarget> = self.layers().map(|(_, t, _)| t).collect();
        targets.sort();
        targets.dedup();
        targets
    }

    /// Checks that every adapted layer exists in `model` with matching in/out sizes.
    pub fn check_fits(&self, model: &Mmdit<B>) -> Result<(), String> {
        if self.blocks.len() != model.transformer_blocks.len() {
            return Err(format!(
                "adapter has {} blocks, the model has {}",
                self.blocks.len(),
                model.transformer_blocks.len()
            ));
        }
        for (i, target, layer) in self.layers() {
            let key = format!("transformer_blocks.{i}.{target}");
            let base = model.transformer_blocks[i]
                .linear(target)
                .ok_or_else(|| format!("`{key}`: the model has no such layer"))?;
            let [d_in, d_out] = base.weight.dims();
            let (a_in, b_out) = (layer.down.dims()[0], layer.up.dims()[1]);
            if (a_in, b_out) != (d_in, d_out) {
                return Err(format!("`{key}`: adapter maps {a_in} -> {b_out}, the layer maps {d_in} -> {d_out}"));
            }
        }
        Ok(())
    }
}

/// Which adapter each sample of a batch uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdapterChoice {
    /// The base model (adapters off).
    Base,
    /// Adapter `k` for every sample.
    All(usize),
    /// Adapter `choice[b]` for sample `b` (`None`: the base) — per-sample teacher routing.
    PerSample(Vec<Option<usize>>),
}

/// The adapters a forward pass uses and how samples are routed to them. Built once per
/// forward; [`Mmdit::forward_adapted`] consults it at every adaptable linear layer.
pub struct ActiveAdapters<'a, B: Backend> {
    adapters: Vec<&'a LoraAdapter<B>>,
    /// `(adapter, sample indices)`; `None` indices: every sample.
    groups: Vec<(usize, Option<Tensor<B, 1, Int>>)>,
}

impl<'a, B: Backend> ActiveAdapters<'a, B> {
    /// No adapter: the base model.
    pub fn none() -> Self {
        Self { adapters: Vec::new(), groups: Vec::new() }
    }

    /// One adapter for the whole batch.
    pub fn single(adapter: &'a LoraAdapter<B>) -> Self {
        Self { adapters: vec![adapter], groups: vec![(0, None)] }
    }

    /// `adapters` routed by `choice`. Panics if `choice` names an adapter that is not in
    /// `adapters` (a programming error: routing tables are validated when recipes load).
    pub fn new(adapters: Vec<&'a LoraAdapter<B>>, choice: &AdapterChoice, device: &B::Device) -> Self {
        let groups = match choice {
            AdapterChoice::Base => Vec::new(),
            AdapterChoice::All(k) => {
                assert!(*k < adapters.len(), "adapter {k} of {}", adapters.len());
                vec![(*k, None)]
            }
            AdapterChoice::PerSample(choice) => {
                let mut groups = Vec::new();
                for k in 0..adapters.len() {
                    let rows: Vec<i64> =
                        choice.iter().enumerate().filter(|(_, c)| **c == Some(k)).map(|(b, _)| b as i64).collect();
                    if rows.len() == choice.len() {
                        groups.push((k, None));
                    } else if !rows.is_empty() {
                        groups.push((k, Some(Tensor::from_ints(rows.as_slice(), device))));
                    }
                }
                for c in choice.iter().flatten() {
                    assert!(*c < adapters.len(), "adapter {c} of {}", adapters.len());
                }
                groups
            }
        };
        Self { adapters, groups }
    }

    /// The same routing for a batch of `2 * batch` made of two copies of the batch (the
    /// `[uncond, cond]` batch of classifier-free guidance).
    /// Copies of this pass's adapters that track no gradient (a forward through them records
    /// no autodiff graph); [`ActiveAdapters::with_adapters`] routes over them as this pass does.
    pub fn untracked_copies(&self) -> Vec<LoraAdapter<B>> {
        self.adapters.iter().map(|a| (*a).clone().no_grad()).collect()
    }

    /// This pass's routing over `adapters`, which stand for its own adapters one for one
    /// (e.g. [`ActiveAdapters::untracked_copies`]).
    pub fn with_adapters<'b>(&self, adapters: &'b [LoraAdapter<B>]) -> ActiveAdapters<'b, B> {
        assert_eq!(adapters.len(), self.adapters.len(), "one adapter for each of the pass's");
        ActiveAdapters { adapters: adapters.iter().collect(), groups: self.groups.clone() }
    }

    pub fn doubled(&self, batch: usize) -> ActiveAdapters<'a, B> {
        let groups = self
            .groups
            .iter()
            .map(|(k, rows)| {
                let rows = rows.as_ref().map(|r| Tensor::cat(vec![r.clone(), r.clone() + batch as i64], 0));
                (*k, rows)
            })
            .collect();
        ActiveAdapters { adapters: self.adapters.clone(), groups }
    }

    /// Whether this pass uses no adapter at all.
    pub fn is_base(&self) -> bool {
        self.groups.is_empty()
    }

    /// `base(x)` plus the routed adapters' updates of layer `target` of block `block`:
    /// rows routed to adapter `k` get `(alpha_k / r_k) x A_k B_k` added.
    pub fn linear<const D: usize>(
        &self,
        block: usize,
        target: LoraTarget,
        base: &Linear<B>,
        x: Tensor<B, D>,
    ) -> Tensor<B, D> {
        let mut out = kernels::linear_layer(base, x.clone());
        for (k, rows) in &self.groups {
            let Some(layer) = self.adapters[*k].blocks.get(block).and_then(|b| b.layer(target)) else {
                continue;
            };
            out = match rows {
                None => out + layer.delta(x.clone()),
                Some(rows) => {
                    let delta = layer.delta(x.clone().select(0, rows.clone()));
                    out.select_assign(0, rows.clone(), delta, IndexingUpdateOp::Add)
                }
            };
        }
        out
    }
}

impl<B: Backend> JointBlock<B> {
    /// The linear layer `target` of this block, if the block has it.
    pub fn linear(&self, target: LoraTarget) -> Option<&Linear<B>> {
        let attn2 = self.attn2.as_ref();
        let ff_context = self.ff_context.as_ref();
        match target {
            LoraTarget::ToQ => Some(&self.attn.to_q),
            LoraTarget::ToK => Some(&self.attn.to_k),
            LoraTarget::ToV => Some(&self.attn.to_v),
            LoraTarget::ToOut => Some(&self.attn.to_out),
            LoraTarget::AddQProj => Some(&self.attn.add_q_proj),
            LoraTarget::AddKProj => Some(&self.attn.add_k_proj),
            LoraTarget::AddVProj => Some(&self.attn.add_v_proj),
            LoraTarget::ToAddOut => self.attn.to_add_out.as_ref(),
            LoraTarget::Attn2ToQ => attn2.map(|a| &a.to_q),
            LoraTarget::Attn2ToK => attn2.map(|a| &a.to_k),
            LoraTarget::Attn2ToV => attn2.map(|a| &a.to_v),
            LoraTarget::Attn2ToOut => attn2.map(|a| &a.to_out),
            LoraTarget::FfIn => Some(&self.ff.linear_in),
            LoraTarget::FfOut => Some(&self.ff.linear_out),
            LoraTarget::FfContextIn => ff_context.map(|f| &f.linear_in),
            LoraTarget::FfContextOut => ff_context.map(|f| &f.linear_out),
        }
    }

    /// Mutable access to the linear layer `target` (for folding adapters into the base).
    pub fn linear_mut(&mut self, target: LoraTarget) -> Option<&mut Linear<B>> {
        let attn2 = self.attn2.as_mut();
        let ff_context = self.ff_context.as_mut();
        match target {
            LoraTarget::ToQ => Some(&mut self.attn.to_q),
            LoraTarget::ToK => Some(&mut self.attn.to_k),
            LoraTarget::ToV => Some(&mut self.attn.to_v),
            LoraTarget::ToOut => Some(&mut self.attn.to_out),
            LoraTarget::AddQProj => Some(&mut self.attn.add_q_proj),
            LoraTarget::AddKProj => Some(&mut self.attn.add_k_proj),
            LoraTarget::AddVProj => Some(&mut self.attn.add_v_proj),
            LoraTarget::ToAddOut => self.attn.to_add_out.as_mut(),
            LoraTarget::Attn2ToQ => attn2.map(|a| &mut a.to_q),
            LoraTarget::Attn2ToK => attn2.map(|a| &mut a.to_k),
            LoraTarget::Attn2ToV => attn2.map(|a| &mut a.to_v),
            LoraTarget::Attn2ToOut => attn2.map(|a| &mut a.to_out),
            LoraTarget::FfIn => Some(&mut self.ff.linear_in),
            LoraTarget::FfOut => Some(&mut self.ff.linear_out),
            LoraTarget::FfContextIn => ff_context.map(|f| &mut f.linear_in),
            LoraTarget::FfContextOut => ff_context.map(|f| &mut f.linear_out),
        }
    }
}

/// [`ActiveAdapters`] seen from inside block `block`: what the block's layers call.
pub struct BlockAdapters<'s, 'a, B: Backend> {
    active: &'s ActiveAdapters<'a, B>,
    block: usize,
}

impl<'s, 'a, B: Backend> BlockAdapters<'s, 'a, B> {
    pub fn new(active: &'s ActiveAdapters<'a, B>, block: usize) -> Self {
        Self { active, block }
    }

    /// `base(x)` plus the routed adapters' updates (see [`ActiveAdapters::linear`]).
    pub fn linear<const D: usize>(&self, target: LoraTarget, base: &Linear<B>, x: Tensor<B, D>) -> Tensor<B, D> {
        if self.active.is_base() {
            return kernels::linear_layer(base, x);
        }
        self.active.linear(self.block, target, base, x)
    }
}
