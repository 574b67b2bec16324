//! The replication fixture: two `ferry run` processes, `a` (initially primary) and `b`
//! (initially secondary), sharing one metro-replicated volume, each in its own directory under
//! one temporary directory, with certificates made by the real `ferry cert init`, and
//! optionally a [`Relay`] between their QUIC listeners so a test can cut or impair the link.
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
use crate::relay::Relay;

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

/// One of the two nodes of a [`Cluster`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeId {
    A,
    B,
}

impl NodeId {
    pub fn other(self) -> NodeId {
        match self {
            NodeId::A => NodeId::B,
            NodeId::B => NodeId::A,
        }
    }

    /// The node's name in its config and certificate.
    pub fn name(self) -> &'static str {
        match self {
            NodeId::A => "a",
            NodeId::B => "b",
        }
    }

    fn index(self) -> usize {
        match self {
            NodeId::A => 0,
            NodeId::B => 1,
        }
    }
}

/// How a [`Cluster`] is set up.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub size: String,
    pub journal_size: String,
    /// Metro `peer_timeout`, as written in the config (`"2s"`).
    pub peer_timeout: String,
    /// Metro `on_disconnect`: `"degrade"` or `"suspend"`.
    pub on_disconnect: String,
    /// Put a [`Relay`] between the two nodes' QUIC listeners.
    pub relay: bool,
    /// Seed of the relay's randomness (loss, jitter).
    pub seed: u64,
    /// Extra environment of node a's daemon, e.g. fault hooks.
    pub env_a: Vec<(String, String)>,
    /// Extra environment of node b's daemon.
    pub env_b: Vec<(String, String)>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            size: "64MiB".to_string(),
            journal_size: "32MiB".to_string(),
            peer_timeout: "2s".to_string(),
            on_disconnect: "degrade".to_string(),
            relay: false,
            seed: 0,
            env_a: Vec::new(),
            env_b: Vec::new(),
        }
    }
}

/// Everything one node's config says, and where its files live. Public so that a test can
/// derive another node from it (a rogue node with a foreign certificate, say).
#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub name: String,
    pub dir: PathBuf,
    pub listen: SocketAddr,
    pub metrics_port: u16,
    pub peer_name: String,
    pub peer_address: SocketAddr,
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

    /// The config of SPEC §4 for this node: one peer, one volume, one metro replica.
    pub fn config_text(&self) -> String {
        let dir = self.dir.display();
        format!(
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

[[peers]]
name = "{peer}"
address = "{peer_address}"

[[volumes]]
name = "{volume}"
device = "{device}"
size = "{size}"
journal_size = "{journal_size}"
initial_role = "{initial_role}"

[[volumes.replicas]]
peer = "{peer}"
mode = "metro"
on_disconnect = "{on_disconnect}"
peer_timeout = "{peer_timeout}"
"#,
            name = self.name,
            control_socket = self.control_socket().display(),
            metrics_port = self.metrics_port,
            listen = self.listen,
            nbd_socket = self.nbd_socket().display(),
            ca = self.tls_ca.display(),
            cert = self.tls_cert.display(),
            key = self.tls_key.display(),
            peer = self.peer_name,
            peer_address = self.peer_address,
            volume = self.volume,
            device = self.device_path().display(),
            size = self.size,
            journal_size = self.journal_size,
            initial_role = self.initial_role,
            on_disconnect = self.on_disconnect,
            peer_timeout = self.peer_timeout,
        )
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

/// Two nodes replicating one volume in metro mode. See the module documentation.
pub struct Cluster {
    // Field order is drop order: nodes (killed, logs printed), then the relay, then the
    // directory, so that the logs still exist when they are printed.
    nodes: [Node; 2],
    relay: Option<Relay>,
    pub dir: PathBuf,
    /// `ferry cert init` output: ca.pem, a.pem, a.key, b.pem, b.key.
    pub certs: PathBuf,
    pub options: ClusterOptions,
    tempdir: Option<tempfile::TempDir>,
}

impl Cluster {
    /// Configures both nodes (certificates, configs, relay) and starts them: a, then b.
    pub fn start(options: ClusterOptions) -> Cluster {
        let mut cluster = Cluster::configure(options);
        cluster.start_node(NodeId::A);
        cluster.start_node(NodeId::B);
        cluster
    }

    /// Certificates, configs and the relay (if asked for); no daemon is started.
    pub fn configure(options: ClusterOptions) -> Cluster {
        let tempdir = harness::test_tempdir("ferry-metro-");
        let dir = tempdir.path().to_path_buf();
        eprintln!("cluster directory: {}", dir.display());
        let certs = dir.join("certs");
        cert_init(&certs, &["a", "b"]);
        let listen = [free_udp_addr(), free_udp_addr()];
        let relay = options
            .relay
            .then(|| Relay::start(listen[0], listen[1], options.seed));
        let peer_address = match &relay {
            // A reaches B through addr_for_a; B reaches A through addr_for_b.
            Some(relay) => [relay.addr_for_a(), relay.addr_for_b()],
            None => [listen[1], listen[0]],
        };
        let mut metrics_ports = [harness::free_port(), harness::free_port()];
        while metrics_ports[1] == metrics_ports[0] {
            metrics_ports[1] = harness::free_port();
        }
        let nodes = [NodeId::A, NodeId::B].map(|id| {
            let i = id.index();
            Node::new(NodeSpec {
                name: id.name().to_string(),
                dir: dir.join(id.name()),
                listen: listen[i],
                metrics_port: metrics_ports[i],
                peer_name: id.other().name().to_string(),
                peer_address: peer_address[i],
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
                env: if id == NodeId::A {
                    options.env_a.clone()
                } else {
                    options.env_b.clone()
                },
            })
        });
        Cluster {
            nodes,
            relay,
            dir,
            certs,
            options,
            tempdir: Some(tempdir),
        }
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id.index()]
    }

    pub fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.nodes[id.index()]
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

    /// The relay between the nodes; panics if the cluster was configured without one.
    pub fn relay(&self) -> &Relay {
        self.relay.as_ref().expect("cluster configured with relay")
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
            output.status.success(),
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

    /// The replica object on node `id` for the other node.
    pub fn replica(&self, id: NodeId) -> Value {
        let volume = self.volume_status(id);
        replica_of(&volume, id.other().name())
            .unwrap_or_else(|error| panic!("node {}: {error}", id.name()))
    }

    pub fn replica_state(&self, id: NodeId) -> String {
        let replica = self.replica(id);
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
        let started = Instant::now();
        let deadline = started + timeout;
        let mut last;
        loop {
            match self.node(id).try_volume_status() {
                Ok(volume) => {
                    if predicate(&volume) {
                        return volume;
                    }
                    last = volume.to_string();
                }
                Err(error) => last = error,
            }
            if Instant::now() >= deadline {
                panic!(
                    "node {}: not {what} after {timeout:?}; last volume status: {last}",
                    id.name()
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Waits until node `id`'s replica (towards the other node) is in `state`; returns the
    /// replica object.
    pub fn wait_replica_state(&self, id: NodeId, state: &str, timeout: Duration) -> Value {
        let peer = id.other().name();
        let volume = self.wait_volume(id, &format!("replica state {state}"), timeout, |volume| {
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

    /// Records node `id`'s replica state every few tens of milliseconds until stopped.
    pub fn monitor(&self, id: NodeId) -> StateMonitor {
        StateMonitor::start(self.node(id), id.other().name())
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
        spec.peer_address = self.listen_addr(NodeId::B);
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
