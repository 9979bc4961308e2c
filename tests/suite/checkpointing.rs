//! Per-block activation checkpointing (`checkpointing = "blocks"`): under
//! `Autodiff<_, BalancedCheckpointing>` each transformer block stores only its outputs and is
//! recomputed in the backward. The gradients must be the ones of the plain graph (LoRA training
//! over a frozen base, and full-weight training), and the graph must hold less memory between
//! the forward and the backward.

use crate::common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::{BalancedCheckpointing, CheckpointStrategy};
use burn::module::{AutodiffModule, Module};
use burn::tensor::Tensor;
use flow_opd::flow::SeededNoise;
use flow_opd::kernels;
use flow_opd::model::lora::{ActiveAdapters, LoraAdapter, LoraConfig, LoraTarget};
use flow_opd::model::{Mmdit, MmditConfig};

/// Bytes the process holds on the heap (this test binary's allocator counts them).
static LIVE: AtomicIsize = AtomicIsize::new(0);

struct Counting;

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The tests of this binary run one at a time, so that the heap count sees one graph.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct Setup<B: flow_opd::Backend> {
    model: Mmdit<B>,
    adapter: LoraAdapter<B>,
    x: Tensor<B, 4>,
    c: Tensor<B, 3>,
    y: Tensor<B, 2>,
    t: Tensor<B, 1>,
    /// Weights of the loss `sum(v * w)`.
    w: Tensor<B, 4>,
}

fn setup<B: flow_opd::Backend>(batch: usize, side: usize, device: &B::Device) -> Setup<B> {
    B::seed(device, 5);
    let config = MmditConfig { sample_size: side, pos_embed_max_size: Some(side), ..MmditConfig::tiny() };
    let model = flow_opd::pipeline::world::materialize(config.init::<B>(device));
    let mut adapter = LoraConfig::new(4, 8.0, LoraTarget::FLOW_GRPO.to_vec()).init(&model, 0, device);
    let mut noise = SeededNoise::new(9);
    for layer in adapter.blocks.iter_mut().flat_map(|b| b.layers.iter_mut().flatten()) {
        let up: Tensor<B, 2> = noise.sample(layer.up.dims(), device);
        layer.up = burn::module::Param::from_tensor(up * 0.2);
    }
    Setup {
        x: noise.sample([batch, config.in_channels, side, side], device),
        c: noise.sample([batch, 7, config.joint_attention_dim], device),
        y: noise.sample([batch, config.pooled_projection_dim], device),
        t: Tensor::from_floats(vec![600.0f32; batch].as_slice(), device),
        w: noise.sample([batch, config.out_channels, side, side], device),
        model,
        adapter,
    }
}

/// What is trained: a LoRA over the frozen base (GRPO / OPD / NFT), or every weight (pre-training).
#[derive(Clone, Copy, Debug)]
enum Trained {
    Lora,
    Full,
}

fn values<B: burn::tensor::backend::Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
}

/// The trained parameters' gradients of `sum(v * w)`, and the heap bytes the graph holds
/// between the forward and the backward, on autodiff strategy `C` with blocks checkpointed or not.
fn gradients<B: flow_opd::Backend, C: CheckpointStrategy>(s: &Setup<B>, trained: Trained, blocks: bool) -> (Vec<f32>, isize)
where
    Autodiff<B, C>: flow_opd::Backend,
{
    type AD<B, C> = Autodiff<B, C>;
    let lift = <Mmdit<AD<B, C>> as AutodiffModule<AD<B, C>>>::from_inner;
    let model = match trained {
        Trained::Lora => lift(s.model.clone()).no_grad(),
        Trained::Full => flow_opd::train::trainable(lift(s.model.clone())),
    };
    let adapter = <LoraAdapter<AD<B, C>> as AutodiffModule<AD<B, C>>>::from_inner(s.adapter.clone());
    let adapter = match trained {
        Trained::Lora => flow_opd::train::trainable(adapter),
        Trained::Full => adapter.no_grad(),
    };
    let single = ActiveAdapters::single(&adapter);
    let device = s.x.device();
    let before = live_bytes::<B>(&device);
    let loss = kernels::with_block_checkpointing(blocks, || {
        let v = model.forward_adapted(
            Tensor::from_inner(s.x.clone()),
            Tensor::from_inner(s.c.clone()),
            Tensor::from_inner(s.y.clone()),
            Tensor::from_inner(s.t.clone()),
            &single,
        );
        (v * Tensor::from_inner(s.w.clone())).sum()
    });
    let held = live_bytes::<B>(&device) - before;
    let grads = loss.backward();
    let mut flat = Vec::new();
    match trained {
        Trained::Lora => {
            for (_, _, layer) in adapter.layers() {
                flat.extend(values(layer.up.val().grad(&grads).expect("every adapted layer gets a gradient")));
                flat.extend(values(layer.down.val().grad(&grads).expect("every adapted layer gets a gradient")));
            }
        }
        Trained::Full => {
            struct Collect<'a, B: burn::tensor::backend::AutodiffBackend>(&'a B::Gradients, Vec<f32>);
            impl<B: burn::tensor::backend::AutodiffBackend> burn::module::ModuleVisitor<B> for Collect<'_, B> {
                fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<B, D>>) {
                    if let Some(g) = param.val().grad(self.0) {
                        self.1.extend(values(g));
                    }
                }
            }
            let mut collect = Collect::<AD<B, C>>(&grads, Vec::new());
            model.visit(&mut collect);
            assert!(!collect.1.is_empty());
            flat = collect.1;
        }
    }
    (flat, held)
}

/// Bytes held: the device's tensors on a GPU backend, the heap on the CPU.
fn live_bytes<B: flow_opd::Backend>(device: &B::Device) -> isize {
    B::sync(device).expect("sync");
    match B::device_memory(device) {
        Some(memory) => memory.in_use as isize,
        None => LIVE.load(Ordering::Relaxed),
    }
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    common::rel_l2(a, b)
}

fn same_gradients<B: flow_opd::Backend>(device: &B::Device, tolerance: f64) {
    let _serial = serial();
    let s = setup::<B>(2, 8, device);
    for trained in [Trained::Lora, Trained::Full] {
        let (plain, _) = gradients::<B, burn::backend::autodiff::checkpoint::strategy::NoCheckpointing>(&s, trained, false);
        let (balanced, _) = gradients::<B, BalancedCheckpointing>(&s, trained, false);
        let (blocks, _) = gradients::<B, BalancedCheckpointing>(&s, trained, true);
        assert!(plain.iter().any(|g| *g != 0.0), "{trained:?}: gradients are not all zero");
        let e = rel_l2(&balanced, &plain);
        assert!(e <= tolerance, "{trained:?}: Burn's balanced checkpointing changes the gradients by {e}");
        let e = rel_l2(&blocks, &plain);
        assert!(e <= tolerance, "{trained:?}: block checkpointing changes the gradients by {e}");
    }
}

#[test]
fn block_checkpointing_gives_the_plain_gradients_on_flex() {
    same_gradients::<burn::backend::Flex>(&Default::default(), 1e-6);
}

#[cfg(feature = "wgpu")]
#[test]
fn block_checkpointing_gives_the_plain_gradients_on_wgpu() {
    same_gradients::<burn::backend::Wgpu>(&Default::default(), 1e-5);
}

fn less_memory<B: flow_opd::Backend>(batch: usize, side: usize, device: &B::Device) {
    let _serial = serial();
    let s = setup::<B>(batch, side, device);
    for trained in [Trained::Lora, Trained::Full] {
        let (_, plain) = gradients::<B, BalancedCheckpointing>(&s, trained, false);
        let (_, blocks) = gradients::<B, BalancedCheckpointing>(&s, trained, true);
        eprintln!("{trained:?}: graph holds {plain} bytes plain, {blocks} with blocks checkpointed");
        assert!(plain > 0 && blocks > 0);
        assert!((blocks as f64) < 0.5 * plain as f64, "{trained:?}: {blocks} bytes with checkpointing vs {plain} without");
    }
}

#[test]
fn block_checkpointing_holds_less_memory_between_forward_and_backward_on_flex() {
    // Enough tokens that activations, not weights, dominate: 8 x 8 patches + 7 text tokens, batch 8.
    less_memory::<burn::backend::Flex>(8, 16, &Default::default());
}

#[cfg(feature = "wgpu")]
#[test]
fn block_checkpointing_holds_less_memory_between_forward_and_backward_on_wgpu() {
    // The gradient test's shapes (lavapipe compiles every new shape's kernels, slowly).
    less_memory::<burn::backend::Wgpu>(2, 8, &Default::default());
}
