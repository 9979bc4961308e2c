//! Multi-node data parallelism through burn-collective's global level: every node runs the same
//! `flow-opd recipe R --nodes N --node-rank K --coordinator HOST:PORT --device ...`, node 0
//! starts burn-collective's global orchestrator (`flow-opd orchestrator`, a child process that
//! ends with it), and every node's devices join one data-parallel group: peer `i` of node `K`
//! is global peer `K * devices + i` of `N * devices` (every node names as many devices), so
//! [`super::parallel::Peer`]'s splits, gathers and gradient means span all nodes exactly as they
//! span one node's devices. Tensors travel node to node through burn-collective's data service
//! (one port per node) with the global all-reduce strategy chosen here; this module writes no
//! networking of its own beyond a TCP probe that names a node that stopped answering.
//!
//! The group forms once per process ([`join`]): registration, then a handshake that exchanges
//! every node's fingerprint (the resolved recipe, the crate version and the backend), device
//! count and data-service address, and refuses a group whose nodes differ. burn-collective has
//! no timeouts, so every collective call of a multi-node group runs under a [`Watch`]: a call
//! that waits longer than `--node-timeout` ends the process with an error that names the nodes
//! that no longer answer (the stage's last checkpoint stays as it was written).

use std::collections::BTreeMap;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::str::FromStr;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use burn::collective::AllReduceStrategy;
use sha2::{Digest, Sha256};

/// How a node joins a multi-node group, as the command line gives it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSettings {
    /// The number of nodes (`--nodes`).
    pub nodes: usize,
    /// This node's rank, `0..nodes` (`--node-rank`); node 0 starts the orchestrator and writes
    /// the run.
    pub rank: usize,
    /// Where node 0's orchestrator listens (`--coordinator HOST:PORT`).
    pub coordinator: (String, u16),
    /// The address other nodes reach this node's data service at (`--node-host`; by default
    /// the address of the interface that reaches the coordinator).
    pub host: IpAddr,
    /// This node's data-service port (`--node-port`; by default the coordinator's port + 1 +
    /// rank, so nodes sharing a machine do not collide).
    pub port: u16,
    /// How long a collective call may wait for the other nodes (`--node-timeout`).
    pub timeout: Duration,
    /// The global all-reduce strategy (`--global-strategy`).
    pub strategy: AllReduceStrategy,
}

/// The command line's multi-node flags before they are checked (each may come from its
/// `FLOW_OPD_*` variable).
#[derive(Debug, Clone, Default)]
pub struct NodeFlags {
    pub nodes: Option<usize>,
    pub rank: Option<usize>,
    pub coordinator: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub timeout_s: Option<f64>,
    pub strategy: Option<String>,
}

/// The default `--node-timeout`, in seconds.
pub const DEFAULT_TIMEOUT_S: f64 = 300.0;

/// `ring`, `tree`, `tree:N` or `centralized` (burn-collective's [`AllReduceStrategy`]).
pub fn parse_strategy(text: &str) -> Result<AllReduceStrategy, String> {
    let bad = || format!("--global-strategy `{text}`: expected ring, tree, tree:N (N >= 2) or centralized");
    match text.split_once(':') {
        None => match text {
            "ring" => Ok(AllReduceStrategy::Ring),
            "tree" => Ok(AllReduceStrategy::Tree(2)),
            "centralized" => Ok(AllReduceStrategy::Centralized),
            _ => Err(bad()),
        },
        Some(("tree", arity)) => match arity.parse::<u32>() {
            Ok(n) if n >= 2 => Ok(AllReduceStrategy::Tree(n)),
            _ => Err(bad()),
        },
        Some(_) => Err(bad()),
    }
}

impl NodeFlags {
    /// The settings of a multi-node group, `None` for a single node (no multi-node flag given,
    /// or `--nodes 1`); errors name the flag and value at fault.
    pub fn settings(&self) -> Result<Option<NodeSettings>, String> {
        let nodes = match self.nodes {
            None | Some(1) => {
                let stray = [
                    ("--node-rank", self.rank.is_some_and(|r| r != 0)),
                    ("--coordinator", self.coordinator.is_some()),
                    ("--node-host", self.host.is_some()),
                    ("--node-port", self.port.is_some()),
                ];
                if let Some((flag, _)) = stray.iter().find(|(_, given)| *given) {
                    return Err(format!("{flag} is given without --nodes N (N >= 2): a single node needs no multi-node settings"));
                }
                return Ok(None);
            }
            Some(0) => return Err("--nodes 0: a group has at least one node".into()),
            Some(n) => n,
        };
        let rank = self.rank.ok_or_else(|| format!("--nodes {nodes} needs --node-rank K (0 to {}) on each node", nodes - 1))?;
        if rank >= nodes {
            return Err(format!("--node-rank {rank} with --nodes {nodes}: ranks run from 0 to {}", nodes - 1));
        }
        let coordinator = self.coordinator.as_deref().ok_or_else(|| format!("--nodes {nodes} needs --coordinator HOST:PORT (where node 0 listens)"))?;
        let (host, port) = coordinator
            .rsplit_once(':')
            .filter(|(h, _)| !h.is_empty())
            .ok_or_else(|| format!("--coordinator `{coordinator}`: expected HOST:PORT"))?;
        let port: u16 = port.parse().ok().filter(|p| *p > 0).ok_or_else(|| format!("--coordinator `{coordinator}`: `{port}` is not a port (1-65535)"))?;
        let coordinator_ip = resolve(host).map_err(|e| format!("--coordinator `{coordinator}`: {e}"))?;
        let host = match &self.host {
            Some(h) => resolve(h).map_err(|e| format!("--node-host `{h}`: {e}"))?,
            None => interface_towards(coordinator_ip, port)
                .map_err(|e| format!("--node-host: no address reaches the coordinator {coordinator} ({e}); give this node's address with --node-host"))?,
        };
        let data_port = match self.port {
            Some(0) => return Err("--node-port 0: give a port from 1 to 65535".into()),
            Some(p) => p,
            None => u16::try_from(port as usize + 1 + rank)
                .map_err(|_| format!("--node-port: the default (--coordinator's port {port} + 1 + rank {rank}) is past 65535; give one"))?,
        };
        if data_port == port && host == coordinator_ip {
            return Err(format!("--node-port {data_port}: the coordinator listens on that port of this address"));
        }
        let timeout_s = self.timeout_s.unwrap_or(DEFAULT_TIMEOUT_S);
        if !(timeout_s.is_finite() && timeout_s > 0.0) {
            return Err(format!("--node-timeout {timeout_s}: give a positive number of seconds"));
        }
        let strategy = parse_strategy(self.strategy.as_deref().unwrap_or("ring"))?;
        Ok(Some(NodeSettings {
            nodes,
            rank,
            coordinator: (host_text(coordinator_ip), port),
            host,
            port: data_port,
            timeout: Duration::from_secs_f64(timeout_s),
            strategy,
        }))
    }
}

fn host_text(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// The first IPv4 address of `host` (a name or an address).
fn resolve(host: &str) -> Result<IpAddr, String> {
    if let Ok(ip) = IpAddr::from_str(host.trim_matches(|c| c == '[' || c == ']')) {
        return Ok(ip);
    }
    let found: Vec<SocketAddr> = (host, 0).to_socket_addrs().map_err(|e| format!("cannot resolve `{host}`: {e}"))?.collect();
    found
        .iter()
        .find(|a| a.is_ipv4())
        .or(found.first())
        .map(|a| a.ip())
        .ok_or_else(|| format!("`{host}` resolves to no address"))
}

/// The local address of the interface that routes to `target` (no packet is sent).
fn interface_towards(target: IpAddr, port: u16) -> std::io::Result<IpAddr> {
    let any: IpAddr = if target.is_ipv4() { Ipv4Addr::UNSPECIFIED.into() } else { std::net::Ipv6Addr::UNSPECIFIED.into() };
    let socket = UdpSocket::bind((any, 0))?;
    socket.connect((target, port))?;
    Ok(socket.local_addr()?.ip())
}

impl NodeSettings {
    /// burn-collective's address of the orchestrator.
    pub fn coordinator_url(&self) -> String {
        format!("ws://{}:{}", self.coordinator.0, self.coordinator.1)
    }

    /// burn-collective's address of this node's data service.
    pub fn node_url(&self) -> String {
        format!("ws://{}:{}", host_text(self.host), self.port)
    }
}

/// One node of a formed group, as the handshake told it.
#[derive(Debug, Clone)]
pub struct Member {
    pub rank: usize,
    /// Its data service (`None` for an IPv6 host: the probe then cannot name it).
    pub address: Option<SocketAddr>,
}

/// A formed multi-node group: this node's settings, its devices, and every node.
#[derive(Debug)]
pub struct NodeGroup {
    pub settings: NodeSettings,
    /// Devices per node (the same on every node).
    pub devices: usize,
    pub members: Vec<Member>,
}

impl NodeGroup {
    /// Peers in the whole group.
    pub fn world(&self) -> usize {
        self.settings.nodes * self.devices
    }

    /// The global index of this node's device `local`.
    pub fn global_index(&self, local: usize) -> usize {
        self.settings.rank * self.devices + local
    }
}

static GROUP: OnceLock<NodeGroup> = OnceLock::new();
/// The settings while the group forms (for the watchdog's messages), then [`GROUP`].
static JOINING: OnceLock<NodeSettings> = OnceLock::new();

/// The multi-node group this process belongs to, if any.
pub fn group() -> Option<&'static NodeGroup> {
    GROUP.get()
}

/// Whether this process writes what a run shares with the world (exports): no multi-node
/// group, or node 0 of one.
pub fn is_first_node() -> bool {
    group().is_none_or(|g| g.settings.rank == 0)
}

/// Records the formed group (once per process: burn-collective registers a process once).
pub(crate) fn set_group(group: NodeGroup) -> Result<&'static NodeGroup, String> {
    GROUP.set(group).map_err(|_| "this process already belongs to a multi-node group".to_string())?;
    Ok(GROUP.get().expect("just set"))
}

/// Records the settings of the group being formed, for the watchdog.
pub(crate) fn set_joining(settings: &NodeSettings) {
    let _ = JOINING.set(settings.clone());
}

/// The fingerprint nodes compare before they train: the resolved recipe, this crate's version
/// and the backend. Nodes whose fingerprints differ would train different things.
pub fn fingerprint(resolved_recipe: &str, backend: &str) -> u64 {
    hash64(&[resolved_recipe, env!("CARGO_PKG_VERSION"), backend])
}

/// The first 8 bytes of the SHA-256 of `parts` (each preceded by its length).
pub fn hash64(parts: &[&str]) -> u64 {
    let mut hash = Sha256::new();
    for part in parts {
        hash.update((part.len() as u64).to_le_bytes());
        hash.update(part.as_bytes());
    }
    u64::from_le_bytes(hash.finalize()[..8].try_into().expect("8 bytes"))
}

/// `value` as four 16-bit numbers, each exact in an f32 (low first).
pub fn u64_to_parts(value: u64) -> [f32; 4] {
    std::array::from_fn(|i| ((value >> (16 * i)) & 0xffff) as f32)
}

/// The inverse of [`u64_to_parts`].
pub(crate) fn parts_to_u64(parts: &[f32]) -> u64 {
    parts.iter().take(4).enumerate().fold(0, |acc, (i, &p)| acc | ((p as u64) << (16 * i)))
}

/// Checks that this node can listen on `port` (0.0.0.0, as burn-collective's servers do).
pub(crate) fn check_port_free(port: u16, flag: &str) -> Result<(), String> {
    TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).map(drop).map_err(|e| format!("{flag}: port {port} is not free on this node: {e}"))
}

/// The orchestrator node 0 starts: `flow-opd orchestrator --port P --exit-with-stdin`, a child
/// process that ends when this one does (its standard input closes).
pub(crate) fn start_orchestrator(port: u16) -> Result<(), String> {
    static CHILD: Mutex<Option<std::process::Child>> = Mutex::new(None);
    check_port_free(port, "--coordinator")?;
    let exe = std::env::current_exe().map_err(|e| format!("starting the orchestrator: this program's path: {e}"))?;
    let child = std::process::Command::new(&exe)
        .args(["orchestrator", "--port", &port.to_string(), "--exit-with-stdin"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("starting the orchestrator ({} orchestrator): {e}", exe.display()))?;
    *CHILD.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);
    Ok(())
}

/// `flow-opd orchestrator`: burn-collective's global orchestrator on `port` until SIGINT or
/// SIGTERM (or, with `exit_with_stdin`, until standard input closes: its parent ended).
pub fn run_orchestrator(port: u16, exit_with_stdin: bool) -> Result<(), String> {
    if exit_with_stdin {
        std::thread::spawn(|| {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
            std::process::exit(0);
        });
    }
    check_port_free(port, "--port")?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| format!("orchestrator runtime: {e}"))?;
    runtime.block_on(burn_collective::start_global_orchestrator(port));
    Ok(())
}

/// How many more times (0.5 s apart) [`diagnosis`] looks for a lost node when none is found.
const DIAGNOSIS_RECHECKS: usize = 6;

/// Whether something listens at `address` (a TCP connect within 2 s).
fn answers(address: SocketAddr) -> bool {
    TcpStream::connect_timeout(&address, Duration::from_secs(2)).is_ok()
}

/// What is known of the other nodes when a collective call fails or waits too long: the nodes
/// whose data service no longer answers, or that none is known to be lost.
pub fn diagnosis() -> String {
    if let Some(group) = group() {
        let me = group.settings.rank;
        let lost_now = || -> Vec<String> {
            group
                .members
                .iter()
                .filter(|m| m.rank != me)
                .filter_map(|m| m.address.filter(|a| !answers(*a)).map(|a| format!("node {} ({a})", m.rank)))
                .collect()
        };
        // A node killed a moment ago may still be closing its sockets: its connections can
        // close (failing our collective call) before its listening socket does, which then still
        // accepts. Look again for a few seconds before calling every node alive.
        let mut lost = lost_now();
        for _ in 0..DIAGNOSIS_RECHECKS {
            if !lost.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
            lost = lost_now();
        }
        return match lost.as_slice() {
            [] => "every other node's data service still answers: a node is stuck, or slower than --node-timeout allows".into(),
            [one] => format!("lost {one}: it no longer answers (it ended or lost its network)"),
            several => format!("lost {}: they no longer answer (they ended or lost their network)", several.join(", ")),
        };
    }
    let Some(settings) = JOINING.get() else { return String::new() };
    let (host, port) = &settings.coordinator;
    let reachable = resolve(host).map(|ip| answers(SocketAddr::new(ip, *port))).unwrap_or(false);
    if reachable {
        format!(
            "the coordinator {host}:{port} answers, but not every one of the {} nodes joined (a node never started, or was given another --nodes or --coordinator)",
            settings.nodes
        )
    } else {
        format!("the coordinator {host}:{port} does not answer: node 0 did not start it, or it ended")
    }
}

/// A collective call under watch: dropped when the call returns; one that waits past
/// `--node-timeout` ends the process.
pub struct Watch(Option<u64>);

struct Watched {
    deadline: Instant,
    what: String,
}

static WATCHED: Mutex<BTreeMap<u64, Watched>> = Mutex::new(BTreeMap::new());

/// Watches `what` (a collective call) for as long as the returned guard lives, when this
/// process belongs to (or is joining) a multi-node group; does nothing otherwise.
pub fn watch(what: &str) -> Watch {
    let Some(timeout) = group().map(|g| g.settings.timeout).or_else(|| JOINING.get().map(|s| s.timeout)) else {
        return Watch(None);
    };
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    static THREAD: OnceLock<()> = OnceLock::new();
    THREAD.get_or_init(|| {
        std::thread::Builder::new().name("node-watchdog".into()).spawn(watchdog).expect("the watchdog thread starts");
    });
    let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let watched = Watched { deadline: Instant::now() + timeout, what: what.to_string() };
    WATCHED.lock().unwrap_or_else(|p| p.into_inner()).insert(id, watched);
    Watch(Some(id))
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(id) = self.0 {
            WATCHED.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        }
    }
}

/// Ends the process when a watched call passes its deadline: burn-collective's calls cannot be
/// cancelled, and the peers waiting in them would wait forever.
fn watchdog() {
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let late = {
            let watched = WATCHED.lock().unwrap_or_else(|p| p.into_inner());
            watched.values().find(|w| Instant::now() >= w.deadline).map(|w| w.what.clone())
        };
        let Some(what) = late else { continue };
        let settings = group().map(|g| &g.settings).or(JOINING.get());
        let (rank, timeout) = settings.map_or((0, 0.0), |s| (s.rank, s.timeout.as_secs_f64()));
        eprintln!(
            "Error: node {rank}: {what} waited {timeout:.0} s (--node-timeout) for the other nodes; {}. Ending this node; \
             the last checkpoint written stays usable: start every node again with `--resume`",
            diagnosis()
        );
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(nodes: usize, rank: usize) -> NodeFlags {
        NodeFlags { nodes: Some(nodes), rank: Some(rank), coordinator: Some("127.0.0.1:29500".into()), ..Default::default() }
    }

    #[test]
    fn settings_are_checked_and_name_the_flag() {
        let s = flags(2, 1).settings().unwrap().unwrap();
        assert_eq!((s.nodes, s.rank, s.port), (2, 1, 29502));
        assert_eq!(s.host, IpAddr::from(Ipv4Addr::LOCALHOST), "the interface that reaches a loopback coordinator");
        assert_eq!(s.strategy, AllReduceStrategy::Ring);
        assert_eq!(s.node_url(), "ws://127.0.0.1:29502");
        assert!(NodeFlags::default().settings().unwrap().is_none());
        assert!(NodeFlags { nodes: Some(1), ..Default::default() }.settings().unwrap().is_none());
        let err = |f: NodeFlags| f.settings().unwrap_err();
        assert!(err(flags(2, 2)).contains("--node-rank 2 with --nodes 2"), "{}", err(flags(2, 2)));
        assert!(err(NodeFlags { coordinator: None, ..flags(2, 0) }).contains("--coordinator"));
        assert!(err(NodeFlags { coordinator: Some("nohost".into()), ..flags(2, 0) }).contains("`nohost`"));
        assert!(err(NodeFlags { coordinator: Some("h:99999".into()), ..flags(2, 0) }).contains("99999"));
        assert!(err(NodeFlags { rank: None, ..flags(2, 0) }).contains("--node-rank"));
        assert!(err(NodeFlags { timeout_s: Some(0.0), ..flags(2, 0) }).contains("--node-timeout 0"));
        assert!(err(NodeFlags { strategy: Some("tree:1".into()), ..flags(2, 0) }).contains("tree:1"));
        assert!(err(NodeFlags { nodes: Some(0), ..flags(2, 0) }).contains("--nodes 0"));
        assert!(err(NodeFlags { nodes: None, ..flags(2, 1) }).contains("--node-rank"));
        assert_eq!(parse_strategy("tree:4").unwrap(), AllReduceStrategy::Tree(4));
        assert_eq!(parse_strategy("centralized").unwrap(), AllReduceStrategy::Centralized);
    }

    #[test]
    fn fingerprints_differ_with_the_recipe() {
        assert_eq!(fingerprint("a", "flex"), fingerprint("a", "flex"));
        assert_ne!(fingerprint("a", "flex"), fingerprint("b", "flex"));
        assert_ne!(fingerprint("a", "flex"), fingerprint("a", "cuda"));
    }
}
