//! Data parallelism over several devices through burn-collective: each device runs one peer
//! thread with its own copy of the frozen model and the same adapter, optimiser and EMA; an
//! iteration's prompts are split evenly among the peers, each rolls out and trains on its
//! share, and the gradients are averaged with an all-reduce before every peer applies the
//! same update, so the adapters stay identical.
//!
//! The split is exact: a batch of `n` samples on `k` peers gives the update one device gives
//! with `micro_batch = n / k`, up to the order of floating-point sums (the rollouts draw the
//! same prompts, initial noise and SDE noise, see [`crate::train::rollout::rollout_shard`];
//! `tests/suite/parallel.rs` checks it for GRPO and OPD); the rewards are gathered before the
//! advantages are computed, as Flow-GRPO gathers them across processes, so group and global
//! standard deviations see the whole batch.
//!
//! Across nodes ([`super::distributed`]) the group is every node's devices, peer `i` of node `K`
//! being global peer `K * devices + i`: the same splits, gathers and means, one registration
//! per process, and every collective call under the node watchdog.
//!
//! Failures do not leave peers waiting: the exchange after the steps that can fail (rollouts,
//! rewards, routing) carries an "ok" flag from every peer, and a peer whose step failed still
//! takes part in it, so all peers stop together and the failing peer's message is the one
//! reported. A peer that panics (a bug) ends the process instead, since the others may be
//! waiting for it in an exchange.

use std::ops::Range;
use std::sync::Mutex;

use burn::collective::{CollectiveConfig, PeerId, ReduceOperation, all_reduce, finish_collective, register, reset_collective};
use super::distributed::{self, Member, NodeGroup, NodeSettings};
use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use crate::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData, TensorPrimitive};

/// One peer of a data-parallel group: its index, the group's size and its device (of the
/// inner, non-autodiff backend: collective operations run there). Across nodes the index and
/// size are global; `local` is the peer's place among this process's devices.
#[derive(Debug, Clone)]
pub struct Peer<B: Backend> {
    pub index: usize,
    pub count: usize,
    pub device: B::Device,
    pub local: usize,
    /// Nodes of the group (1 within one process).
    nodes: usize,
}

/// The peers of this process's `devices`: global peers of the multi-node group when this
/// process belongs to one, else peers `0..devices.len()`.
pub fn local_peers<B: Backend>(devices: &[B::Device]) -> Vec<Peer<B>> {
    let group = distributed::group();
    devices
        .iter()
        .enumerate()
        .map(|(local, device)| match group {
            Some(g) => Peer { index: g.global_index(local), count: g.world(), device: device.clone(), local, nodes: g.settings.nodes },
            None => Peer { index: local, count: devices.len(), device: device.clone(), local, nodes: 1 },
        })
        .collect()
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

    /// The sum over peers of `values` (the same length on every peer).
    pub(crate) fn reduce_sum(&self, mut values: Vec<f32>) -> Result<Vec<f32>, String> {
        let n = values.len();
        // A global ring all-reduce slices a tensor in one part per node: at least that many.
        values.resize(n.max(self.nodes), 0.0);
        let len = values.len();
        let tensor = Tensor::<B, 1>::from_data(TensorData::new(values, [len]), &self.device);
        let summed = collective("all-reduce", || all_reduce::<B>(self.id(), tensor.into_primitive().tensor(), ReduceOperation::Sum))?;
        let mut summed = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(summed))
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| format!("all-reduce result: {e:?}"))?;
        summed.truncate(n);
        Ok(summed)
    }

    /// Whether every peer holds the same `values` (`what` names them in the error, which gives
    /// the first peer that differs from peer 0 and both values).
    pub fn agree(&self, what: &str, values: &[f64]) -> Result<(), String> {
        let all = self.gather(Ok(values.to_vec()), values.len())?;
        let n = values.len();
        let first = &all[..n];
        match (1..self.count).find(|p| &all[p * n..(p + 1) * n] != first) {
            None => Ok(()),
            Some(p) => Err(format!("{what}: data-parallel peer {p} has {:?} where peer 0 has {first:?}", &all[p * n..(p + 1) * n])),
        }
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
                let (shape, dims) = (grad.shape(), grad.dims());
                let n = shape.num_elements();
                // A global ring all-reduce slices a tensor's longest side in one part per node:
                // a smaller tensor travels flat, padded with zeros.
                let small = self.peer.nodes > 1 && dims.iter().all(|&d| d < self.peer.nodes);
                let grad = if small {
                    let flat = grad.reshape([n]);
                    let flat = match self.peer.nodes.saturating_sub(n) {
                        0 => flat,
                        pad => Tensor::cat(vec![flat.clone(), Tensor::zeros([pad], &flat.device())], 0),
                    };
                    flat.into_primitive().tensor()
                } else {
                    grad.into_primitive().tensor()
                };
                let mean = collective("gradient all-reduce", || all_reduce::<A::InnerBackend>(self.peer.id(), grad, ReduceOperation::Mean));
                match mean {
                    Ok(mean) if small => {
                        let flat = Tensor::<A::InnerBackend, 1>::from_primitive(TensorPrimitive::Float(mean));
                        self.grads.register::<A::InnerBackend, D>(param.id, flat.slice([0..n]).reshape(shape));
                    }
                    Ok(mean) => self.grads.register::<A::InnerBackend, D>(param.id, Tensor::from_primitive(TensorPrimitive::Float(mean))),
                    Err(e) => self.error = Some(e),
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

/// Runs one burn-collective call among the data-parallel peers, under the node watchdog when
/// the group spans nodes; its error names `what` (and, across nodes, which nodes are lost).
fn collective<T>(what: &str, call: impl FnOnce() -> Result<T, burn::collective::CollectiveError>) -> Result<T, String> {
    let watch = distributed::watch(what);
    let result = call();
    drop(watch);
    result.map_err(|e| match distributed::group() {
        Some(_) => format!("{what} among data-parallel peers across nodes failed ({e:?}): {}", distributed::diagnosis()),
        None => format!("{what} among data-parallel peers: {e:?}"),
    })
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
    let nodes = distributed::group();
    if let Some(group) = nodes
        && group.devices != devices.len()
    {
        return vec![Err(format!("this node joined its group with {} devices, not {}", group.devices, devices.len()))];
    }
    // A multi-node group registered once, when it formed ([`join_nodes`]): its peers stay
    // registered from stage to stage (the orchestrator cannot register a node twice).
    if nodes.is_none() {
        reset_collective::<B>();
    }
    let config = CollectiveConfig::default().with_num_devices(devices.len());
    let results = std::thread::scope(|scope| {
        let handles: Vec<_> = local_peers::<B>(devices)
            .into_iter()
            .map(|peer| {
                let (config, work) = (config.clone(), &work);
                scope.spawn(move || -> Result<T, String> {
                    let (index, id) = (peer.index, peer.id());
                    if nodes.is_none() {
                        register::<B>(id, peer.device.clone(), config)
                            .map_err(|e| format!("data-parallel peer {index}: registering with burn-collective: {e:?}"))?;
                    }
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(peer)));
                    let Ok(result) = result else {
                        // The other peers may be waiting in an exchange this one will never
                        // join: end the process rather than hang (the panic is printed above;
                        // the last checkpoint stays on disk).
                        eprintln!("data-parallel peer {index} panicked; the other peers cannot finish their exchange: exiting");
                        std::process::exit(101);
                    };
                    if nodes.is_none() {
                        let _ = finish_collective::<B>(id);
                    }
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
    if nodes.is_none() {
        reset_collective::<B>();
    }
    results
}

/// Numbers each node puts in its slot of the handshake: present, devices, fingerprint (4),
/// IPv4 (flag + 4 octets), data-service port.
const HANDSHAKE: usize = 12;

/// Forms the multi-node group of `settings` with this node's `devices`: node 0 starts the
/// orchestrator, every device registers with burn-collective's global level, and the nodes
/// exchange their fingerprints (see [`distributed::fingerprint`]), device counts and
/// data-service addresses. A node whose fingerprint or device count differs is refused, on
/// every node, with a message naming it; a node that never joins ends the group after
/// `--node-timeout`.
pub fn join_nodes<B: Backend>(settings: NodeSettings, devices: &[B::Device], fingerprint: u64) -> Result<&'static NodeGroup, String> {
    let _group = GROUP.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if settings.rank == 0 {
        distributed::start_orchestrator(settings.coordinator.1)?;
    }
    distributed::check_port_free(settings.port, "--node-port")?;
    distributed::set_joining(&settings);
    let (nodes, rank, local) = (settings.nodes, settings.rank, devices.len());
    let coordinator_url = settings.coordinator_url().parse().expect("an address");
    let node_url = settings.node_url().parse().expect("an address");
    let config = CollectiveConfig::default()
        .with_num_devices(local)
        .with_num_nodes(nodes as u32)
        .with_global_address(coordinator_url)
        .with_node_address(node_url)
        .with_data_service_port(settings.port)
        .with_global_all_reduce_strategy(settings.strategy);
    let mut slot = vec![0f32; HANDSHAKE];
    slot[0] = 1.0;
    slot[1] = local as f32;
    slot[2..6].copy_from_slice(&distributed::u64_to_parts(fingerprint));
    if let std::net::IpAddr::V4(v4) = settings.host {
        slot[6] = 1.0;
        for (to, octet) in slot[7..11].iter_mut().zip(v4.octets()) {
            *to = octet as f32;
        }
    }
    slot[11] = settings.port as f32;
    reset_collective::<B>();
    let summed = std::thread::scope(|scope| {
        let handles: Vec<_> = devices
            .iter()
            .enumerate()
            .map(|(index, device)| {
                let (config, slot) = (config.clone(), &slot);
                let peer = Peer::<B> { index: rank * local + index, count: nodes * local, device: device.clone(), local: index, nodes };
                scope.spawn(move || -> Result<Vec<f32>, String> {
                    let watch = distributed::watch("joining the group");
                    register::<B>(peer.id(), peer.device.clone(), config).map_err(|e| {
                        format!("node {rank}: joining the group of {nodes} nodes at {}: {e:?}", distributed::diagnosis())
                    })?;
                    drop(watch);
                    let mut all = vec![0f32; nodes * HANDSHAKE];
                    if index == 0 {
                        all[rank * HANDSHAKE..(rank + 1) * HANDSHAKE].copy_from_slice(slot);
                    }
                    peer.reduce_sum(all)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("a peer panicked while the group formed".into()))).collect::<Vec<_>>()
    });
    let summed = summed.into_iter().next().expect("at least one device")?;
    let mut members = Vec::new();
    for (node, slot) in summed.chunks(HANDSHAKE).enumerate() {
        match slot[0] {
            1.0 => {}
            0.0 => return Err(format!("node {node} is missing from the group: no node joined with --node-rank {node}")),
            n => return Err(format!("{n} nodes joined with --node-rank {node}: give each node its own rank")),
        }
        if distributed::parts_to_u64(&slot[2..6]) != fingerprint {
            return Err(format!(
                "node {node} runs another recipe or another flow-opd than node {rank} (their fingerprints of the resolved recipe, \
                 flow-opd {} and the backend differ): every node must run the same command with the same recipe and binary",
                env!("CARGO_PKG_VERSION")
            ));
        }
        if slot[1] as usize != local {
            return Err(format!(
                "node {node} has {} devices where node {rank} has {local}: every node must name as many devices in --device",
                slot[1]
            ));
        }
        let address = (slot[6] == 1.0).then(|| {
            let ip = std::net::Ipv4Addr::new(slot[7] as u8, slot[8] as u8, slot[9] as u8, slot[10] as u8);
            std::net::SocketAddr::new(ip.into(), slot[11] as u16)
        });
        members.push(Member { rank: node, address });
    }
    distributed::set_group(NodeGroup { settings, devices: local, members })
}

/// The first real error of a group's results (a peer's own message before
/// [`ANOTHER_PEER_FAILED`]), or every peer's value.
pub fn first_error<T>(results: Vec<Result<T, String>>) -> Result<Vec<T>, String> {
    if let Some(e) = results.iter().filter_map(|r| r.as_ref().err()).find(|e| e.as_str() != ANOTHER_PEER_FAILED) {
        return Err(e.clone());
    }
    results.into_iter().collect()
}
