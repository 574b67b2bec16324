//! The replication fixture: two or three `ferry run` processes, `a` (initially primary) and `b`
//! (and `c`), initially secondaries, sharing one metro-replicated volume, each in its own
//! directory under one temporary directory, with certificates made by the real `ferry cert
//! init`, and optionally one [`Relay`] per pair of nodes between their QUIC listeners so a test
//! can cut or impair one link (a–b) and keep another (a–c).
//!
//! Configs are symmetric (SPEC §4): every node lists every other node in `[[peers]]` and has
//! one metro `[[volumes.replicas]]` per other node, all with the same `on_disconnect` and
//! `peer_timeout`.
//!
//! A three-node test reads like this:
//!
//! ```text
//! let options = ClusterOptions { node_count: 3, relay: true, ..ClusterOptions::default() };
//! let mut cluster = Cluster::start(options);
//! cluster.wait_replica_state_to(A, C, "in-sync", timeout);  // a's replica towards c
//! cluster.link(A, C).cut();                                 // both directions of a–c only
//! cluster.kill9(C);  cluster.restart(C);                    // or stop (SIGTERM, exit 0)
//! cluster.metric(B, "ferry_resync_bytes_total", &["peer=\"c\""]);
//! ```
//!
//! The two-node helpers that name no peer (`replica`, `wait_replica_state`, `monitor`, `relay`)
//! mean "the other node" and refuse a three-node cluster, where that is ambiguous.
//!
//! Everything is bounded and cleaned up like [`crate::harness::Daemon`]: every wait has a
//! deadline; every daemon is killed and reaped on drop (also when the test panics) and is
//! spawned with `PR_SET_PDEATHSIG` so that it dies with the test process even if the test
//! process itself is killed; each daemon's stderr goes to a file in its directory, and on a
//! panic the temporary directory is named and each node's log is printed. `FERRY_KEEP=1` keeps
//! the directory, `FERRY_KEEP_ON_FAILURE=1` keeps it only when the test fails.
//!
//! Status and metrics are read directly from the control socket and the metrics endpoint in
//! polling loops (cheap); the client commands that the operator runs (`promote`, `demote`,
//! `status --json`) go through the real `ferry` CLI, so their exit codes are tested too.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{
    self, cmd, run, run_with_timeout, wait_child_with_timeout, Output, COMMAND_TIMEOUT, FERRY_BIN,
    READY_TIMEOUT, STOP_TIMEOUT,
};
use crate::relay::{Link, Relay};

/// The volume every cluster exports.
pub const VOLUME: &str = "vol";
/// How long one control-socket exchange may take in a polling loop.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);
/// Polling interval of the wait helpers.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How much of each node's log is printed when a test fails (the file keeps everything).
const LOG_TAIL_BYTES: u64 = 48 << 10;
/// How long `promote` is retried right after a `demote` of the peer, while the peer's role
/// change travels (see [`Cluster::switchover`]).
pub const SWITCHOVER_PROMOTE_RETRY: Duration = Duration::from_secs(10);

/// One node of a [`Cluster`]: `a` starts as primary, `b` and `c` as secondaries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NodeId {
    A,
    B,
    C,
}

impl NodeId {
    /// Every node a cluster can have, in the order they are created and started.
    pub const ALL: [NodeId; 3] = [NodeId::A, NodeId::B, NodeId::C];

    /// The other node of a two-node cluster. Node c exists only in three-node clusters, where
    /// "the other node" is ambiguous, so it has none.
    pub fn other(self) -> NodeId {
        match self {
            NodeId::A => NodeId::B,
            NodeId::B => NodeId::A,
            NodeId::C => panic!("node c has no single other node: name the peer"),
        }
    }

    /// The node's name in its config and certificate.
    pub fn name(self) -> &'static str {
        match self {
            NodeId::A => "a",
            NodeId::B => "b",
            NodeId::C => "c",
        }
    }

    fn index(self) -> usize {
        match self {
            NodeId::A => 0,
            NodeId::B => 1,
            NodeId::C => 2,
        }
    }
}

/// How a [`Cluster`] is set up.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// How many nodes: 2 (a, b) or 3 (a, b, c).
    pub node_count: usize,
    pub size: String,
    pub journal_size: String,
    /// Metro `peer_timeout`, as written in the config (`"2s"`).
    pub peer_timeout: String,
    /// Metro `on_disconnect`: `"degrade"` or `"suspend"`.
    pub on_disconnect: String,
    /// Put a [`Relay`] between the QUIC listeners of every pair of nodes.
    pub relay: bool,
    /// Seed of the relays' randomness (loss, jitter); the a–b relay uses it as is.
    pub seed: u64,
    /// Extra environment of node a's daemon, e.g. fault hooks.
    pub env_a: Vec<(String, String)>,
    /// Extra environment of node b's daemon.
    pub env_b: Vec<(String, String)>,
    /// Extra environment of node c's daemon (three-node clusters).
    pub env_c: Vec<(String, String)>,
    /// Every link to or from this node is a regional replica with this `interval`; the
    /// others stay metro.
    pub regional: Option<(NodeId, String)>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            node_count: 2,
            size: "64MiB".to_string(),
            journal_size: "32MiB".to_string(),
            peer_timeout: "2s".to_string(),
            on_disconnect: "degrade".to_string(),
            relay: false,
            seed: 0,
            env_a: Vec::new(),
            env_b: Vec::new(),
            env_c: Vec::new(),
            regional: None,
        }
    }
}

/// One `[[peers]]` entry of a node's config; the node also has a metro replica on it.
#[derive(Clone, Debug)]
pub struct PeerSpec {
    pub name: String,
    /// Where this node dials the peer: its listener, or the relay in front of it.
    pub address: SocketAddr,
    /// `Some(interval)`: the replica on this peer is regional.
    pub regional_interval: Option<String>,
}

/// Everything one node's config says, and where its files live. Public so that a test can
/// derive another node from it (a rogue node with a foreign certificate, say).
#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub name: String,
    pub dir: PathBuf,
    pub listen: SocketAddr,
    pub metrics_port: u16,
    /// Every other node, each also a metro replica of the volume.
    pub peers: Vec<PeerSpec>,
    pub tls_ca: PathBuf,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub volume: String,
    pub size: String,
    pub journal_size: String,
    pub initial_role: String,
    pub on_disconnect: String,
    pub peer_timeout: String,
    pub env: Vec<(String, String)>,
}

impl NodeSpec {
    pub fn control_socket(&self) -> PathBuf {
        self.dir.join("ctl.sock")
    }

    pub fn nbd_socket(&self) -> PathBuf {
        self.dir.join("nbd.sock")
    }

    pub fn device_path(&self) -> PathBuf {
        self.dir.join(format!("{}.img", self.volume))
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("ferry.toml")
    }

    pub fn stderr_path(&self) -> PathBuf {
        self.dir.join("ferry.stderr.log")
    }

    /// One request on the control socket (SPEC §5): the `result` on `ok`, else the error
    /// object or the transport failure as text. Never panics, so polling loops can use it
    /// while the daemon starts or dies.
    pub fn request(&self, request: &Value) -> Result<Value, String> {
        let path = self.control_socket();
        let mut stream =
            UnixStream::connect(&path).map_err(|error| format!("connect {path:?}: {error}"))?;
        stream
            .set_read_timeout(Some(CONTROL_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(CONTROL_TIMEOUT)))
            .map_err(|error| format!("socket timeouts: {error}"))?;
        let mut line = request.to_string();
        line.push('\n');
        stream
            .write_all(line.as_bytes())
            .map_err(|error| format!("send {request}: {error}"))?;
        let mut reply = String::new();
        BufReader::new(stream.take(64 << 20))
            .read_line(&mut reply)
            .map_err(|error| format!("read reply to {request}: {error}"))?;
        let reply: Value = serde_json::from_str(&reply)
            .map_err(|error| format!("reply to {request} is not JSON ({error}): {reply:?}"))?;
        match reply["ok"].as_bool() {
            Some(true) => Ok(reply["result"].clone()),
            _ => Err(format!("{request} refused: {}", reply["error"])),
        }
    }

    /// The status object of this node's volume, if the node answers.
    pub fn try_volume_status(&self) -> Result<Value, String> {
        let status = self.request(&serde_json::json!({"op": "status"}))?;
        volume_of(&status, &self.volume)
    }

    /// The config of SPEC §4 for this node: one volume, and per peer a `[[peers]]` entry and a
    /// metro replica.
    pub fn config_text(&self) -> String {
        let dir = self.dir.display();
        let mut text = format!(
            r#"[node]
name = "{name}"
data_dir = "{dir}/data"
control_socket = "{control_socket}"
metrics_listen = "127.0.0.1:{metrics_port}"
listen = "{listen}"

[nbd]
listen = ["unix:{nbd_socket}"]

[tls]
ca = "{ca}"
cert = "{cert}"
key = "{key}"
"#,
            name = self.name,
            control_socket = self.control_socket().display(),
            metrics_port = self.metrics_port,
            listen = self.listen,
            nbd_socket = self.nbd_socket().display(),
            ca = self.tls_ca.display(),
            cert = self.tls_cert.display(),
            key = self.tls_key.display(),
        );
        for peer in &self.peers {
            text.push_str(&format!(
                "\n[[peers]]\nname = \"{}\"\naddress = \"{}\"\n",
                peer.name, peer.address
            ));
        }
        text.push_str(&format!(
            r#"
[[volumes]]
name = "{volume}"
device = "{device}"
size = "{size}"
journal_size = "{journal_size}"
initial_role = "{initial_role}"
"#,
            volume = self.volume,
            device = self.device_path().display(),
            size = self.size,
            journal_size = self.journal_size,
            initial_role = self.initial_role,
        ));
        for peer in &self.peers {
            if let Some(interval) = &peer.regional_interval {
                text.push_str(&format!(
                    "\n[[volumes.replicas]]\npeer = \"{}\"\nmode = \"regional\"\ninterval = \"{interval}\"\n",
                    peer.name
                ));
                continue;
            }
            text.push_str(&format!(
                r#"
[[volumes.replicas]]
peer = "{peer}"
mode = "metro"
on_disconnect = "{on_disconnect}"
peer_timeout = "{peer_timeout}"
"#,
                peer = peer.name,
                on_disconnect = self.on_disconnect,
                peer_timeout = self.peer_timeout,
            ));
        }
        text
    }
}

/// Picks a free UDP port on loopback (bind port 0, read it, close). Like
/// [`harness::free_port`], another process may take it before the daemon binds; that shows as
/// a clear bind error in the daemon's log.
pub fn free_udp_addr() -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind UDP 127.0.0.1:0");
    socket.local_addr().expect("local addr")
}

/// One `ferry run` process of a cluster (or a rogue node a test adds).
pub struct Node {
    pub spec: NodeSpec,
    child: Option<Child>,
    /// How many times `ferry run` was spawned; marked in the log to tell runs apart.
    spawn_count: u32,
}

impl Node {
    /// Creates the node's directories and writes its config; starts nothing.
    pub fn new(spec: NodeSpec) -> Node {
        fs::create_dir_all(spec.dir.join("data")).expect("create node data dir");
        fs::write(spec.config_path(), spec.config_text()).expect("write node config");
        Node {
            spec,
            child: None,
            spawn_count: 0,
        }
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Spawns `ferry run` and waits until its control socket answers `status`.
    pub fn start(&mut self) {
        self.spawn();
        self.wait_ready();
    }

    /// Spawns `ferry run` without waiting for it.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "node {} already running", self.name());
        self.spawn_count += 1;
        let mut log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.spec.stderr_path())
            .expect("open node stderr log");
        writeln!(
            log,
            "===== ferry run #{} of node {} =====",
            self.spawn_count,
            self.name()
        )
        .expect("write log marker");
        let mut command = Command::new(FERRY_BIN);
        command
            .arg("run")
            .arg("--config")
            .arg(self.spec.config_path())
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log fd"))
            .stderr(log);
        harness::set_daemon_log_filter(&mut command);
        for (key, value) in &self.spec.env {
            command.env(key, value);
        }
        // SAFETY: the closure runs in the child between fork and exec and only calls prctl(2),
        // which is async-signal-safe; it touches no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                // The daemon dies with the test process even if that is killed (a CI timeout),
                // so no daemon outlives its test. Drop kills it in every other case.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .unwrap_or_else(|error| panic!("spawn {FERRY_BIN} run: {error}"));
        self.child = Some(child);
    }

    /// Polls `status` on the control socket until it answers, the process exits, or
    /// READY_TIMEOUT.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last_error = String::new();
        while Instant::now() < deadline {
            let exited = self
                .child
                .as_mut()
                .expect("node spawned")
                .try_wait()
                .expect("try_wait");
            if let Some(status) = exited {
                self.child = None;
                panic!(
                    "ferry run of node {} exited during startup with {status}\n--- log ---\n{}",
                    self.name(),
                    self.log_tail()
                );
            }
            match self.request(&serde_json::json!({"op": "status"})) {
                Ok(_) => return,
                Err(error) => last_error = error,
            }
            std::thread::sleep(POLL_INTERVAL);
        }
        panic!(
            "node {} not ready after {READY_TIMEOUT:?}; last status attempt: {last_error}\n--- log ---\n{}",
            self.name(),
            self.log_tail()
        );
    }

    /// kill -9: the process dies at once; the operating system (page cache) survives.
    pub fn kill9(&mut self) {
        let mut child = self
            .child
            .take()
            .unwrap_or_else(|| panic!("node {} is not running", self.spec.name));
        let _ = child.kill();
        let _ = child.wait();
    }

    /// SIGTERM, then wait; a clean shutdown must exit 0 (SPEC §3).
    pub fn stop(&mut self) {
        let mut child = self
            .child
            .take()
            .unwrap_or_else(|| panic!("node {} is not running", self.spec.name));
        let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) on a child we spawned and have not reaped, so the pid is still ours.
        let result = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(result, 0, "kill(SIGTERM) failed");
        match wait_child_with_timeout(&mut child, STOP_TIMEOUT) {
            Some(status) => assert!(
                status.code() == Some(0),
                "node {}: ferry run exited with {status} on SIGTERM, expected 0\n--- log ---\n{}",
                self.spec.name,
                self.log_tail()
            ),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "node {}: ferry run did not exit within {STOP_TIMEOUT:?} of SIGTERM\n--- log ---\n{}",
                    self.spec.name,
                    self.log_tail()
                );
            }
        }
    }

    /// `ferry --socket S ARGS...` through the real CLI, with a timeout.
    pub fn ctl(&self, args: &[&str]) -> Output {
        run_with_timeout(
            Command::new(FERRY_BIN)
                .arg("--socket")
                .arg(self.spec.control_socket())
                .args(args),
            COMMAND_TIMEOUT,
        )
    }

    /// One request on the control socket; see [`NodeSpec::request`].
    pub fn request(&self, request: &Value) -> Result<Value, String> {
        self.spec.request(request)
    }

    /// The status object of this node's volume, if the node answers.
    pub fn try_volume_status(&self) -> Result<Value, String> {
        self.spec.try_volume_status()
    }

    /// The status object of this node's volume.
    pub fn volume_status(&self) -> Value {
        self.try_volume_status()
            .unwrap_or_else(|error| panic!("node {}: {error}", self.name()))
    }

    /// The body of `GET /metrics`.
    pub fn metrics_text(&self) -> String {
        harness::http_get(&format!("127.0.0.1:{}", self.spec.metrics_port), "/metrics")
    }

    /// Everything the daemon printed, over all its runs, up to the last LOG_TAIL_BYTES.
    pub fn log_tail(&self) -> String {
        let path = self.spec.stderr_path();
        let Ok(mut file) = fs::File::open(&path) else {
            return format!("(no log at {})", path.display());
        };
        let length = file.metadata().map(|meta| meta.len()).unwrap_or(0);
        let start = length.saturating_sub(LOG_TAIL_BYTES);
        let _ = file.seek(SeekFrom::Start(start));
        let mut bytes = Vec::new();
        let _ = file.read_to_end(&mut bytes);
        let prefix = if start > 0 {
            format!("(… first {start} bytes of {} cut …)\n", path.display())
        } else {
            String::new()
        };
        prefix + &String::from_utf8_lossy(&bytes)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- node {} log ({}) ---\n{}",
                self.spec.name,
                self.spec.stderr_path().display(),
                self.log_tail()
            );
        }
    }
}

/// The status object of `volume` in a `status` result.
pub fn volume_of(status: &Value, volume: &str) -> Result<Value, String> {
    status["volumes"]
        .as_array()
        .ok_or_else(|| format!("no volumes array in status: {status}"))?
        .iter()
        .find(|entry| entry["name"] == volume)
        .cloned()
        .ok_or_else(|| format!("volume {volume} not in status: {status}"))
}

/// The replica object for `peer` in a volume's status.
pub fn replica_of(volume_status: &Value, peer: &str) -> Result<Value, String> {
    volume_status["replicas"]
        .as_array()
        .ok_or_else(|| format!("no replicas array in volume status: {volume_status}"))?
        .iter()
        .find(|replica| replica["peer"] == peer)
        .cloned()
        .ok_or_else(|| format!("no replica for peer {peer} in volume status: {volume_status}"))
}

/// The sum of every sample of `name` whose label set contains all of `labels` (each written
/// like `peer="a"`), or None if there is none.
pub fn metric_sum(metrics: &str, name: &str, labels: &[&str]) -> Option<f64> {
    metrics
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| line.starts_with(name) && line[name.len()..].starts_with(['{', ' ']))
        .filter(|line| labels.iter().all(|label| line.contains(label)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(|a, b| a + b)
}

/// Two or three nodes replicating one volume in metro mode. See the module documentation.
pub struct Cluster {
    // Field order is drop order: nodes (killed, logs printed), then the relays, then the
    // directory, so that the logs still exist when they are printed.
    nodes: Vec<Node>,
    /// One relay per pair of nodes when the options ask for relays, keyed by the pair in id
    /// order; the smaller id is the relay's side "a".
    relays: BTreeMap<(NodeId, NodeId), Relay>,
    pub dir: PathBuf,
    /// `ferry cert init` output: ca.pem, ca.key, and NAME.pem, NAME.key per node.
    pub certs: PathBuf,
    pub options: ClusterOptions,
    tempdir: Option<tempfile::TempDir>,
}

impl Cluster {
    /// Configures every node (certificates, configs, relays) and starts them in order: a, b,
    /// then c.
    pub fn start(options: ClusterOptions) -> Cluster {
        let mut cluster = Cluster::configure(options);
        for id in cluster.ids() {
            cluster.start_node(id);
        }
        cluster
    }

    /// Certificates, configs and the relays (if asked for); no daemon is started.
    pub fn configure(options: ClusterOptions) -> Cluster {
        let count = options.node_count;
        assert!(
            (2..=NodeId::ALL.len()).contains(&count),
            "a cluster has 2 or 3 nodes, not {count}"
        );
        let ids = &NodeId::ALL[..count];
        let tempdir = harness::test_tempdir("ferry-metro-");
        let dir = tempdir.path().to_path_buf();
        eprintln!("cluster directory: {}", dir.display());
        let certs = dir.join("certs");
        let names: Vec<&str> = ids.iter().map(|id| id.name()).collect();
        cert_init(&certs, &names);
        let listen = distinct(count, free_udp_addr);
        let metrics_ports = distinct(count, harness::free_port);
        let mut relays = BTreeMap::new();
        if options.relay {
            for (i, &low) in ids.iter().enumerate() {
                for &high in &ids[i + 1..] {
                    // The a–b relay keeps the options' seed as is, as it did when clusters had
                    // only that one link; the other pairs get seeds of their own.
                    let seed = if (low, high) == (NodeId::A, NodeId::B) {
                        options.seed
                    } else {
                        options.seed ^ (((low.index() as u64) << 8) | high.index() as u64)
                    };
                    let relay = Relay::start(listen[low.index()], listen[high.index()], seed);
                    relays.insert((low, high), relay);
                }
            }
        }
        // Where node `from` dials node `to`: the relay's side facing `from`, or `to` itself.
        let address = |from: NodeId, to: NodeId| -> SocketAddr {
            let pair = (from.min(to), from.max(to));
            match relays.get(&pair) {
                Some(relay) if from < to => relay.addr_for_a(),
                Some(relay) => relay.addr_for_b(),
                None => listen[to.index()],
            }
        };
        let nodes = ids
            .iter()
            .map(|&id| {
                let i = id.index();
                let peers = ids
                    .iter()
                    .filter(|&&peer| peer != id)
                    .map(|&peer| PeerSpec {
                        name: peer.name().to_string(),
                        address: address(id, peer),
                        regional_interval: options
                            .regional
                            .as_ref()
                            .filter(|(node, _)| *node == id || *node == peer)
                            .map(|(_, interval)| interval.clone()),
                    })
                    .collect();
                Node::new(NodeSpec {
                    name: id.name().to_string(),
                    dir: dir.join(id.name()),
                    listen: listen[i],
                    metrics_port: metrics_ports[i],
                    peers,
                    tls_ca: certs.join("ca.pem"),
                    tls_cert: certs.join(format!("{}.pem", id.name())),
                    tls_key: certs.join(format!("{}.key", id.name())),
                    volume: VOLUME.to_string(),
                    size: options.size.clone(),
                    journal_size: options.journal_size.clone(),
                    initial_role: if id == NodeId::A {
                        "primary"
                    } else {
                        "secondary"
                    }
                    .to_string(),
                    on_disconnect: options.on_disconnect.clone(),
                    peer_timeout: options.peer_timeout.clone(),
                    env: match id {
                        NodeId::A => options.env_a.clone(),
                        NodeId::B => options.env_b.clone(),
                        NodeId::C => options.env_c.clone(),
                    },
                })
            })
            .collect();
        Cluster {
            nodes,
            relays,
            dir,
            certs,
            options,
            tempdir: Some(tempdir),
        }
    }

    /// The nodes of this cluster, in start order.
    pub fn ids(&self) -> Vec<NodeId> {
        NodeId::ALL[..self.nodes.len()].to_vec()
    }

    /// Every node of this cluster but `id`.
    pub fn peers_of(&self, id: NodeId) -> Vec<NodeId> {
        self.ids().into_iter().filter(|&peer| peer != id).collect()
    }

    /// The other node of a two-node cluster; panics in a larger one, where a test must name
    /// the peer it means.
    pub fn only_peer(&self, id: NodeId) -> NodeId {
        assert_eq!(
            self.nodes.len(),
            2,
            "node {}: \"the other node\" is ambiguous in a {}-node cluster; name the peer",
            id.name(),
            self.nodes.len()
        );
        id.other()
    }

    pub fn node(&self, id: NodeId) -> &Node {
        self.nodes
            .get(id.index())
            .unwrap_or_else(|| panic!("node {} is not in this cluster", id.name()))
    }

    pub fn node_mut(&mut self, id: NodeId) -> &mut Node {
        let count = self.nodes.len();
        self.nodes
            .get_mut(id.index())
            .unwrap_or_else(|| panic!("node {} is not in this {count}-node cluster", id.name()))
    }

    pub fn volume_size_bytes(&self) -> u64 {
        harness::parse_size_bytes(&self.options.size)
    }

    /// The peer timeout as a duration (the config's `"2s"`/`"500ms"`).
    pub fn peer_timeout(&self) -> Duration {
        let text = self.options.peer_timeout.trim();
        if let Some(ms) = text.strip_suffix("ms") {
            Duration::from_millis(ms.parse().expect("peer_timeout ms"))
        } else if let Some(s) = text.strip_suffix('s') {
            Duration::from_secs(s.parse().expect("peer_timeout s"))
        } else {
            panic!("peer_timeout {text} not in ms or s")
        }
    }

    /// The relay between the two nodes of a two-node cluster; panics if the cluster was
    /// configured without relays or has three nodes (use [`Cluster::pair_relay`] there).
    pub fn relay(&self) -> &Relay {
        self.pair_relay(NodeId::A, self.only_peer(NodeId::A))
    }

    /// The relay between nodes `x` and `y` (in either order). Its side "a" is the node that
    /// comes first in id order, so prefer [`Cluster::link`] and [`Cluster::link_from`], which
    /// need no such care.
    pub fn pair_relay(&self, x: NodeId, y: NodeId) -> &Relay {
        assert_ne!(x, y, "a relay joins two different nodes");
        self.relays.get(&(x.min(y), x.max(y))).unwrap_or_else(|| {
            panic!(
                "no relay between {} and {}: configure the cluster with relay = true",
                x.name(),
                y.name()
            )
        })
    }

    /// Both directions of the link between `x` and `y`: `cluster.link(A, C).cut()` partitions
    /// a from c and leaves every other link alone.
    pub fn link(&self, x: NodeId, y: NodeId) -> Link {
        self.pair_relay(x, y).both()
    }

    /// One direction of the link between two nodes: datagrams from `from` to `to`.
    pub fn link_from(&self, from: NodeId, to: NodeId) -> Link {
        let relay = self.pair_relay(from, to);
        if from < to {
            relay.a_to_b()
        } else {
            relay.b_to_a()
        }
    }

    /// A node's own QUIC listen address (not the relay's).
    pub fn listen_addr(&self, id: NodeId) -> SocketAddr {
        self.node(id).spec.listen
    }

    pub fn start_node(&mut self, id: NodeId) {
        self.node_mut(id).start();
    }

    /// SIGTERM; the daemon must exit 0.
    pub fn stop(&mut self, id: NodeId) {
        self.node_mut(id).stop();
    }

    pub fn kill9(&mut self, id: NodeId) {
        self.node_mut(id).kill9();
    }

    /// Starts a node again on the same directory and config, after stop or kill9.
    pub fn restart(&mut self, id: NodeId) {
        self.node_mut(id).start();
    }

    /// `ferry status --json` through the real CLI: the `result` object of SPEC §5.
    pub fn status_cli(&self, id: NodeId) -> Value {
        let output = self.node(id).ctl(&["status", "--json"]);
        assert!(
            harness::status_answered(&output),
            "node {}: ferry status --json failed: {output}",
            id.name()
        );
        serde_json::from_str(&output.stdout).unwrap_or_else(|error| {
            panic!(
                "node {}: ferry status --json is not JSON ({error}): {}",
                id.name(),
                output.stdout
            )
        })
    }

    /// The status object of the volume on node `id` (control socket).
    pub fn volume_status(&self, id: NodeId) -> Value {
        self.node(id).volume_status()
    }

    /// The replica object on node `id` for the other node of a two-node cluster.
    pub fn replica(&self, id: NodeId) -> Value {
        self.replica_to(id, self.only_peer(id))
    }

    /// The replica object on node `id` for node `peer`.
    pub fn replica_to(&self, id: NodeId, peer: NodeId) -> Value {
        let volume = self.volume_status(id);
        replica_of(&volume, peer.name())
            .unwrap_or_else(|error| panic!("node {}: {error}", id.name()))
    }

    /// The state of node `id`'s replica for the other node of a two-node cluster.
    pub fn replica_state(&self, id: NodeId) -> String {
        self.replica_state_to(id, self.only_peer(id))
    }

    /// The state of node `id`'s replica for node `peer`.
    pub fn replica_state_to(&self, id: NodeId, peer: NodeId) -> String {
        let replica = self.replica_to(id, peer);
        replica["state"]
            .as_str()
            .unwrap_or_else(|| panic!("node {}: replica without a state: {replica}", id.name()))
            .to_string()
    }

    pub fn role(&self, id: NodeId) -> String {
        let volume = self.volume_status(id);
        volume["role"]
            .as_str()
            .unwrap_or_else(|| panic!("node {}: volume without a role: {volume}", id.name()))
            .to_string()
    }

    pub fn generation(&self, id: NodeId) -> Value {
        self.volume_status(id)["generation"].clone()
    }

    /// Polls node `id`'s volume status until `predicate` holds; returns that status. Panics
    /// after `timeout` with `what`, the last status and both nodes' logs.
    pub fn wait_volume(
        &self,
        id: NodeId,
        what: &str,
        timeout: Duration,
        predicate: impl Fn(&Value) -> bool,
    ) -> Value {
        self.poll_volume(id, timeout, predicate)
            .unwrap_or_else(|last| {
                panic!(
                    "node {}: not {what} after {timeout:?}; last volume status: {last}",
                    id.name()
                )
            })
    }

    /// Like [`Cluster::wait_volume`], but returns the last status seen (or why none was) as
    /// the error instead of panicking, for checks a test reports at its end.
    pub fn poll_volume(
        &self,
        id: NodeId,
        timeout: Duration,
        predicate: impl Fn(&Value) -> bool,
    ) -> Result<Value, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.node(id).try_volume_status() {
                Ok(volume) if predicate(&volume) => return Ok(volume),
                Ok(volume) => volume.to_string(),
                Err(error) => error,
            };
            if Instant::now() >= deadline {
                return Err(last);
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Waits until node `id`'s replica towards the other node of a two-node cluster is in
    /// `state`; returns the replica object.
    pub fn wait_replica_state(&self, id: NodeId, state: &str, timeout: Duration) -> Value {
        self.wait_replica_state_to(id, self.only_peer(id), state, timeout)
    }

    /// Waits until node `id`'s replica towards node `peer` is in `state`; returns the replica
    /// object.
    pub fn wait_replica_state_to(
        &self,
        id: NodeId,
        peer: NodeId,
        state: &str,
        timeout: Duration,
    ) -> Value {
        let peer = peer.name();
        let what = format!("replica state {state} towards {peer}");
        let volume = self.wait_volume(id, &what, timeout, |volume| {
            replica_of(volume, peer)
                .map(|replica| replica["state"] == state)
                .unwrap_or(false)
        });
        replica_of(&volume, peer).expect("replica present")
    }

    /// Waits until node `id` reports `role`.
    pub fn wait_role(&self, id: NodeId, role: &str, timeout: Duration) -> Value {
        self.wait_volume(id, &format!("role {role}"), timeout, |volume| {
            volume["role"] == role
        })
    }

    /// `ferry promote VOL [--force]` through the CLI: Ok on exit 0, Err(reason) on exit 1;
    /// any other exit (usage error, crash, timeout) fails the test.
    pub fn promote(&self, id: NodeId, force: bool) -> Result<(), String> {
        let mut args = vec!["promote", VOLUME];
        if force {
            args.push("--force");
        }
        let output = self.node(id).ctl(&args);
        match output.status.code() {
            Some(0) => Ok(()),
            Some(1) => Err(format!("{}{}", output.stderr, output.stdout)),
            _ => panic!("node {}: promote: {output}", id.name()),
        }
    }

    /// `ferry demote VOL` through the CLI; must succeed.
    pub fn demote(&self, id: NodeId) {
        let output = self.node(id).ctl(&["demote", VOLUME]);
        assert!(
            output.status.success(),
            "node {}: demote failed: {output}",
            id.name()
        );
    }

    /// A planned switchover: demote `from`, then promote `to` (without force). The promote is
    /// retried for at most SWITCHOVER_PROMOTE_RETRY while `to` has not yet heard of the
    /// demotion; each refusal is printed. Returns how many refusals there were.
    pub fn switchover(&self, from: NodeId, to: NodeId) -> u32 {
        self.demote(from);
        let deadline = Instant::now() + SWITCHOVER_PROMOTE_RETRY;
        let mut refusals = 0;
        loop {
            match self.promote(to, false) {
                Ok(()) => break,
                Err(reason) => {
                    refusals += 1;
                    eprintln!(
                        "switchover {}→{}: promote refused right after demote (retrying): {reason}",
                        from.name(),
                        to.name()
                    );
                    assert!(
                        Instant::now() < deadline,
                        "promote of node {} still refused {SWITCHOVER_PROMOTE_RETRY:?} after \
                         demote of node {}: {reason}\nstatus {}: {}\nstatus {}: {}",
                        to.name(),
                        from.name(),
                        to.name(),
                        self.volume_status(to),
                        from.name(),
                        self.volume_status(from),
                    );
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        assert_eq!(self.role(to), "primary", "node {} after promote", to.name());
        refusals
    }

    pub fn nbd_socket(&self, id: NodeId) -> PathBuf {
        self.node(id).spec.nbd_socket()
    }

    /// The libnbd URI of node `id`'s export, for third-party clients.
    pub fn nbd_uri(&self, id: NodeId) -> String {
        format!(
            "nbd+unix:///{VOLUME}?socket={}",
            self.nbd_socket(id).display()
        )
    }

    pub fn metrics(&self, id: NodeId) -> String {
        self.node(id).metrics_text()
    }

    /// A metric summed over the samples matching `labels`; 0 when absent (a counter that was
    /// never incremented may not be exported yet).
    pub fn metric(&self, id: NodeId, name: &str, labels: &[&str]) -> f64 {
        metric_sum(&self.metrics(id), name, labels).unwrap_or(0.0)
    }

    /// Records node `id`'s replica state (towards the other node of a two-node cluster) every
    /// few tens of milliseconds until stopped.
    pub fn monitor(&self, id: NodeId) -> StateMonitor {
        self.monitor_to(id, self.only_peer(id))
    }

    /// Records the state of node `id`'s replica towards node `peer` every few tens of
    /// milliseconds until stopped.
    pub fn monitor_to(&self, id: NodeId, peer: NodeId) -> StateMonitor {
        StateMonitor::start(self.node(id), peer.name())
    }

    /// The lines of node `id`'s log (all its runs) about roles, generations, handshakes,
    /// resyncs and held writes, at most the last `lines_max`; a line repeated with only its
    /// timestamp changed is shown once with a count. For failure reports.
    pub fn replication_log(&self, id: NodeId, lines_max: usize) -> String {
        const WORDS: [&str; 14] = [
            "resync",
            "generation",
            "handshake",
            "promot",
            "demot",
            "split",
            "rollback",
            "cannot replicate",
            "peer_timeout",
            "peer lost",
            "replica state",
            "holds",
            "error",
            "=====",
        ];
        let mut lines: Vec<(String, usize)> = Vec::new();
        for line in self.node(id).log_tail().lines() {
            let lower = line.to_lowercase();
            if !WORDS.iter().any(|word| lower.contains(word)) {
                continue;
            }
            // The first word is the timestamp; repeats are compared without it.
            let text = line.split_once(' ').map_or(line, |(_, rest)| rest).trim();
            match lines.last_mut() {
                Some((last, count))
                    if last.split_once(' ').map(|(_, rest)| rest.trim()) == Some(text) =>
                {
                    *count += 1
                }
                _ => lines.push((line.to_string(), 1)),
            }
        }
        let skip = lines.len().saturating_sub(lines_max);
        lines[skip..]
            .iter()
            .map(|(line, count)| match count {
                1 => line.clone(),
                _ => format!("{line}   (×{count})"),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// A node spec like node a's (same volume, peer b) but in `self.dir/subdir`, listening on
    /// `listen`, with the certificate and key `cert_dir/a.pem`, `cert_dir/a.key`, trusting
    /// `ca`, and dialing b directly (not through the relay). For impostor tests.
    pub fn impostor_spec(
        &self,
        subdir: &str,
        cert_dir: &Path,
        ca: &Path,
        listen: SocketAddr,
    ) -> NodeSpec {
        let mut spec = self.node(NodeId::A).spec.clone();
        spec.dir = self.dir.join(subdir);
        spec.listen = listen;
        spec.metrics_port = harness::free_port();
        spec.peers = vec![PeerSpec {
            name: NodeId::B.name().to_string(),
            address: self.listen_addr(NodeId::B),
            regional_interval: None,
        }];
        spec.tls_ca = ca.to_path_buf();
        spec.tls_cert = cert_dir.join("a.pem");
        spec.tls_key = cert_dir.join("a.key");
        spec.env = Vec::new();
        spec
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        if panicking {
            eprintln!(
                "cluster test failed; directory {} (node logs follow)",
                self.dir.display()
            );
        }
        let keep = std::env::var("FERRY_KEEP").as_deref() == Ok("1")
            || panicking && std::env::var("FERRY_KEEP_ON_FAILURE").as_deref() == Ok("1");
        if keep {
            if let Some(tempdir) = self.tempdir.take() {
                let path = tempdir.keep();
                eprintln!("kept cluster directory {}", path.display());
            }
        }
        // The nodes are killed and their logs printed when the fields drop, right after this.
    }
}

/// `count` distinct values of `pick` (free ports are picked one at a time, and the kernel may
/// hand out the same one twice once the probe socket is closed). Bounded: gives up after a
/// hundred tries per value.
fn distinct<T: PartialEq>(count: usize, pick: impl Fn() -> T) -> Vec<T> {
    let mut values: Vec<T> = Vec::with_capacity(count);
    for _ in 0..count * 100 {
        if values.len() == count {
            break;
        }
        let value = pick();
        if !values.contains(&value) {
            values.push(value);
        }
    }
    assert_eq!(
        values.len(),
        count,
        "could not pick {count} distinct free ports"
    );
    values
}

/// `ferry cert init --dir DIR --node N...` (the real command).
pub fn cert_init(dir: &Path, nodes: &[&str]) {
    let mut args = vec![
        "cert".to_string(),
        "init".to_string(),
        "--dir".to_string(),
        dir.display().to_string(),
    ];
    for node in nodes {
        args.push("--node".to_string());
        args.push(node.to_string());
    }
    run(cmd(FERRY_BIN, &args));
    for node in nodes {
        for ext in ["pem", "key"] {
            let path = dir.join(format!("{node}.{ext}"));
            assert!(path.is_file(), "ferry cert init did not write {path:?}");
        }
    }
}

/// A thread polling one node's replica state; keeps the sequence of distinct states seen.
pub struct StateMonitor {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<(Duration, String)>>>,
    thread: Option<JoinHandle<()>>,
}

impl StateMonitor {
    fn start(node: &Node, peer: &str) -> StateMonitor {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let probe = node.spec.clone();
        let peer = peer.to_string();
        let thread = {
            let stop = Arc::clone(&stop);
            let seen = Arc::clone(&seen);
            std::thread::spawn(move || {
                let started = Instant::now();
                let mut last = String::new();
                while !stop.load(Ordering::SeqCst) {
                    let state = match probe.try_volume_status() {
                        Ok(volume) => match replica_of(&volume, &peer) {
                            Ok(replica) => replica["state"]
                                .as_str()
                                .unwrap_or("(no state)")
                                .to_string(),
                            Err(_) => "(no replica)".to_string(),
                        },
                        Err(_) => "(unreachable)".to_string(),
                    };
                    if state != last {
                        seen.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((started.elapsed(), state.clone()));
                        last = state;
                    }
                    std::thread::sleep(Duration::from_millis(25));
                }
            })
        };
        StateMonitor {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    /// The states seen so far, in order, with the time since the monitor started.
    pub fn seen(&self) -> Vec<(Duration, String)> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn saw(&self, state: &str) -> bool {
        self.seen().iter().any(|(_, seen)| seen == state)
    }

    /// Stops polling; returns the states seen.
    pub fn stop(mut self) -> Vec<(Duration, String)> {
        self.halt();
        self.seen()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            // Bounded: each poll takes at most CONTROL_TIMEOUT.
            let _ = thread.join();
        }
    }
}

impl Drop for StateMonitor {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Formats a monitor's sequence like `0.00s in-sync → 2.31s degraded → …`.
pub fn format_states(seen: &[(Duration, String)]) -> String {
    seen.iter()
        .map(|(at, state)| format!("{:.2}s {state}", at.as_secs_f64()))
        .collect::<Vec<_>>()
        .join(" → ")
}
