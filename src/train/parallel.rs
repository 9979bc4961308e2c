//! Data parallelism over several devices through burn-collective: each device runs one peer
//! thread with its own copy of the frozen model and the same adapter, optimiser and EMA; an
//! iteration's prompts are split evenly among the peers, each rolls out and trains on its
//! share, and the gradients are averaged with an all-reduce before every peer applies the
//! same update, so the adapters stay identical.
//!
//! The split is exact: a batch of `n` samples on `k` peers gives the update one device gives
//! with `micro_batch = n / k`, up to the order of floating-point sums (the rollouts draw the
//! same prompts, initial noise and SDE noise, see [`crate::train::rollout::rollout_shard`];
//! `tests/parallel.rs` checks it for GRPO and OPD); the rewards are gathered before the
//! advantages are computed, as Flow-GRPO gathers them across processes, so group and global
//! standard deviations see the whole batch.
//!
//! Failures do not leave peers waiting: the exchange after the steps that can fail (rollouts,
//! rewards, routing) carries an "ok" flag from every peer, and a peer whose step failed still
//! takes part in it, so all peers stop together and the failing peer's message is the one
//! reported. A peer that panics (a bug) ends the process instead, since the others may be
//! waiting for it in an exchange.

use std::ops::Range;
use std::sync::Mutex;

use burn::collective::{CollectiveConfig, PeerId, ReduceOperation, all_reduce, finish_collective, register, reset_collective};
use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use crate::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData, TensorPrimitive};

/// One peer of a data-parallel group: its index, the group's size and its device (of the
/// inner, non-autodiff backend: collective operations run there).
#[derive(Debug, Clone)]
pub struct Peer<B: Backend> {
    pub index: usize,
    pub count: usize,
    pub device: B::Device,
}

/// What a peer reports when another peer's step failed (its own message is the one to show).
pub const ANOTHER_PEER_FAILED: &str = "another data-parallel peer failed";

impl<B: Backend> Peer<B> {
    fn id(&self) -> PeerId {
        PeerId::from(self.index)
    }

    /// This peer's rows of `n` (split evenly; `n` must be a multiple of the peer count).
    pub fn rows(&self, n: usize) -> Range<usize> {
        let share = n / self.count;
        self.index * share..(self.index + 1) * share
    }

    /// Checks that `n` items of `field` split evenly among the peers.
    pub fn check_divides(&self, n: usize, field: &str) -> Result<(), String> {
        if n == 0 || !n.is_multiple_of(self.count) {
            return Err(format!("`{field}` = {n} does not split evenly among {} data-parallel devices", self.count));
        }
        Ok(())
    }

    fn reduce_sum(&self, values: Vec<f32>) -> Result<Vec<f32>, String> {
        let n = values.len();
        let tensor = Tensor::<B, 1>::from_data(TensorData::new(values, [n]), &self.device);
        let summed = all_reduce::<B>(self.id(), tensor.into_primitive().tensor(), ReduceOperation::Sum)
            .map_err(|e| format!("all-reduce among data-parallel peers: {e:?}"))?;
        Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(summed))
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| format!("all-reduce result: {e:?}"))
    }

    /// Every peer's `len` values, in peer order (peer 0's first), exactly (each f64 travels as
    /// three f32: its rounding and the rounding of each remainder, 72 bits for f64's 53; exact
    /// for zero and magnitudes from about 1e-23 to f32's largest, 3e38). `local`
    /// is this peer's values, or the error that kept it from having them: then every peer
    /// returns an error, this one its own message and the others [`ANOTHER_PEER_FAILED`].
    pub fn gather(&self, local: Result<Vec<f64>, String>, len: usize) -> Result<Vec<f64>, String> {
        const PARTS: usize = 3;
        let width = 1 + PARTS * len;
        let mut slots = vec![0f32; width * self.count];
        let own = &mut slots[self.index * width..(self.index + 1) * width];
        if let Ok(values) = &local {
            if values.len() != len {
                return Err(format!("data-parallel gather: {} values where every peer sends {len}", values.len()));
            }
            own[0] = 1.0;
            for (i, &x) in values.iter().enumerate() {
                let mut rest = x;
                for part in &mut own[1 + PARTS * i..1 + PARTS * (i + 1)] {
                    *part = rest as f32;
                    rest -= *part as f64;
                }
            }
        }
        let summed = self.reduce_sum(slots)?;
        local?;
        if !(0..self.count).all(|p| summed[p * width] == 1.0) {
            return Err(ANOTHER_PEER_FAILED.into());
        }
        Ok((0..self.count)
            .flat_map(|p| (0..len).map(move |i| p * width + 1 + PARTS * i))
            .map(|at| summed[at..at + PARTS].iter().map(|&v| v as f64).sum())
            .collect())
    }

    /// The mean over peers of each of `values` (the same length on every peer).
    pub fn mean(&self, values: &[f64]) -> Result<Vec<f64>, String> {
        let all = self.gather(Ok(values.to_vec()), values.len())?;
        Ok((0..values.len()).map(|i| (0..self.count).map(|p| all[p * values.len() + i]).sum::<f64>() / self.count as f64).collect())
    }

    /// Whether any peer says `flag` (every peer learns the same answer).
    pub fn any(&self, flag: bool) -> Result<bool, String> {
        Ok(self.reduce_sum(vec![flag as u8 as f32])?[0] > 0.0)
    }

    /// The mean of every peer's gradients of `module`'s parameters (equal shares of one batch:
    /// the batch's gradient). The parameters are reduced in the module's own order, which every
    /// peer shares (their parameter ids differ: each peer built its own module).
    pub fn mean_gradients<A, M>(&self, module: &M, grads: GradientsParams) -> Result<GradientsParams, String>
    where
        A: AutodiffBackend<InnerBackend = B>,
        M: AutodiffModule<A>,
    {
        struct Reduce<'a, B: Backend> {
            peer: &'a Peer<B>,
            grads: GradientsParams,
            error: Option<String>,
        }
        impl<A: AutodiffBackend> ModuleVisitor<A> for Reduce<'_, A::InnerBackend> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<A, D>>) {
                if self.error.is_some() {
                    return;
                }
                let Some(grad) = self.grads.remove::<A::InnerBackend, D>(param.id) else { return };
                match all_reduce::<A::InnerBackend>(self.peer.id(), grad.into_primitive().tensor(), ReduceOperation::Mean) {
                    Ok(mean) => self.grads.register::<A::InnerBackend, D>(param.id, Tensor::from_primitive(TensorPrimitive::Float(mean))),
                    Err(e) => self.error = Some(format!("gradient all-reduce among data-parallel peers: {e:?}")),
                }
            }
        }
        let mut visitor = Reduce { peer: self, grads, error: None };
        module.visit(&mut visitor);
        match visitor.error {
            Some(e) => Err(e),
            None => Ok(visitor.grads),
        }
    }
}

/// burn-collective keeps one registry per backend and process: one group at a time.
static GROUP: Mutex<()> = Mutex::new(());

/// Runs `work` on one thread per device, each as a registered peer of one burn-collective
/// group, and returns their results in device order. `work` gets its [`Peer`]; peer 0 is the
/// one that should log and write. For two or more devices: a single device needs no group
/// (the trainers then run without a [`Peer`]).
pub fn run_peers<B, T, F>(devices: &[B::Device], work: F) -> Vec<Result<T, String>>
where
    B: Backend,
    T: Send,
    F: Fn(Peer<B>) -> Result<T, String> + Sync,
{
    let _group = GROUP.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    reset_collective::<B>();
    let count = devices.len();
    let config = CollectiveConfig::default().with_num_devices(count);
    let results = std::thread::scope(|scope| {
        let handles: Vec<_> = devices
            .iter()
            .enumerate()
            .map(|(index, device)| {
                let (config, work) = (config.clone(), &work);
                let peer = Peer::<B> { index, count, device: device.clone() };
                scope.spawn(move || -> Result<T, String> {
                    register::<B>(peer.id(), peer.device.clone(), config)
                        .map_err(|e| format!("data-parallel peer {index}: registering with burn-collective: {e:?}"))?;
                    let id = peer.id();
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(peer)));
                    let Ok(result) = result else {
                        // The other peers may be waiting in an exchange this one will never
                        // join: end the process rather than hang (the panic is printed above;
                        // the last checkpoint stays on disk).
                        eprintln!("data-parallel peer {index} panicked; the other peers cannot finish their exchange: exiting");
                        std::process::exit(101);
                    };
                    let _ = finish_collective::<B>(id);
                    result
                })
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(index, h)| h.join().unwrap_or_else(|_| Err(format!("data-parallel peer {index} panicked"))))
            .collect()
    });
    reset_collective::<B>();
    results
}

/// The first real error of a group's results (a peer's own message before
/// [`ANOTHER_PEER_FAILED`]), or every peer's value.
pub fn first_error<T>(results: Vec<Result<T, String>>) -> Result<Vec<T>, String> {
    if let Some(e) = results.iter().filter_map(|r| r.as_ref().err()).find(|e| e.as_str() != ANOTHER_PEER_FAILED) {
        return Err(e.clone());
    }
    results.into_iter().collect()
}
