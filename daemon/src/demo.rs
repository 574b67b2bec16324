//! `ferry demo`: Ferry's main job on an embedded default, on this machine, with nothing to
//! install. Two real `ferry run` processes, nodes `a` (primary) and `b` (secondary), replicate
//! one volume synchronously (metro) over QUIC with mutual TLS on loopback, with certificates
//! made by `ferry cert init`'s library function. Ferry's own NBD client writes to `a` (one at a
//! time, then pipelined); `a` is killed with SIGKILL while writes are in flight; `b` is promoted
//! with `--force` and every block of its copy is checked against a model of what the client saw
//! complete (SPEC §2, metro RPO 0); `b` takes writes alone; `a` restarts, learns `b`'s newer
//! generation, becomes its secondary and resyncs; both copies are then compared block for
//! block. The report shows latencies, the failover timeline, resync volume and what was checked.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::{json, Value};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::control;
use crate::nbd_client::NbdClient;

const VOLUME: &str = "demo";
/// Set to keep the temporary directory (configs, certificates, logs, volumes) after a success
/// too; it is always kept after a failure.
const KEEP_ENV: &str = "FERRY_DEMO_KEEP";
const VOLUME_BYTES: u64 = 64 << 20;
const JOURNAL_BYTES: u64 = 32 << 20;
const PEER_TIMEOUT: &str = "2s";
const BLOCK_BYTES: usize = 4096;
/// Writes one at a time on the metro pair (the latency measurement).
const QD1_WRITES: usize = 2000;
/// Requests the client keeps in flight in the pipelined phase.
const PIPELINE_DEPTH: usize = 16;
/// The pipelined phase sends between these many requests before `a` is killed.
const PIPELINED_MIN: usize = 1000;
const PIPELINED_MAX: usize = 2000;
/// Writes on `b` alone after the failover (what the resync must bring back to `a`).
const FAILOVER_WRITES: usize = 256;
/// Reads of the whole-volume checks.
const READ_CHUNK_BYTES: u32 = 1 << 20;
/// How long the demo retries a `promote --force` refused with `peer-is-primary`.
const PROMOTE_RETRY_LIMIT: Duration = Duration::from_secs(15);
/// Bound on every wait for a state (start, in-sync, rejoin).
const STATE_LIMIT: Duration = Duration::from_secs(30);

#[derive(Debug, Error)]
pub enum DemoError {
    #[error("demo setup failed: {0}")]
    Setup(String),
    #[error("the daemon misbehaved: {0}")]
    Daemon(String),
    #[error("NBD client error: {0}")]
    Client(String),
    #[error("VERIFICATION FAILED: {0}")]
    Verify(String),
}

fn setup<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> DemoError {
    move |e| DemoError::Setup(format!("{what}: {e}"))
}

fn client<E: std::fmt::Display>(what: &'static str) -> impl Fn(E) -> DemoError {
    move |e| DemoError::Client(format!("{what}: {e}"))
}

/// Runs the demo and prints its report.
pub fn run() -> Result<(), DemoError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(setup("runtime"))?;
    let dir = tempfile::Builder::new()
        .prefix("ferry-demo-")
        .tempdir_in(demo_parent())
        .map_err(setup("temporary directory"))?;
    let result = runtime.block_on(scenario(dir.path()));
    // Every child is killed by now (`Daemon` kills on drop, and the scenario owns them all).
    if result.is_err() {
        // Keep the evidence for whoever reads the error.
        let kept = dir.keep();
        print_log_tails(&kept);
        eprintln!("demo files kept in {}", kept.display());
    } else if std::env::var_os(KEEP_ENV).is_some() {
        println!(
            "demo files kept in {} ({KEEP_ENV} is set)",
            dir.keep().display()
        );
    }
    result
}

/// A directory on a real filesystem (O_DIRECT needs one; /dev/shm-backed /tmp would refuse it).
fn demo_parent() -> PathBuf {
    std::env::var_os("TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"))
}

fn print_log_tails(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut logs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    logs.sort();
    for log in logs {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        eprintln!(
            "--- last lines of {} ({} lines) ---",
            log.display(),
            lines.len()
        );
        for line in &lines[lines.len().saturating_sub(25)..] {
            eprintln!("{line}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Nodes and daemon processes.

/// One node's files and addresses.
struct Node {
    name: &'static str,
    dir: PathBuf,
    config: PathBuf,
    control: PathBuf,
    nbd: PathBuf,
    metrics: SocketAddr,
}

impl Node {
    /// Writes the node's config: one metro volume replicated to `peer`.
    #[allow(clippy::too_many_arguments)]
    fn create(
        root: &Path,
        certs: &Path,
        name: &'static str,
        role: &str,
        listen: SocketAddr,
        metrics: SocketAddr,
        peer: &str,
        peer_address: SocketAddr,
    ) -> Result<Node, DemoError> {
        let dir = root.join(name);
        std::fs::create_dir(&dir).map_err(setup("node directory"))?;
        let node = Node {
            name,
            config: root.join(format!("{name}.toml")),
            control: dir.join("ctl.sock"),
            nbd: dir.join("nbd.sock"),
            metrics,
            dir,
        };
        let text = format!(
            "[node]\nname = \"{name}\"\ndata_dir = \"{data}\"\ncontrol_socket = \"{control}\"\n\
             metrics_listen = \"{metrics}\"\nlisten = \"{listen}\"\n\n\
             [nbd]\nlisten = [\"unix:{nbd}\"]\n\n\
             [tls]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\n\
             [[peers]]\nname = \"{peer}\"\naddress = \"{peer_address}\"\n\n\
             [[volumes]]\nname = \"{VOLUME}\"\ndevice = \"{device}\"\nsize = \"{size}MiB\"\n\
             journal_size = \"{journal}MiB\"\ninitial_role = \"{role}\"\n\n\
             [[volumes.replicas]]\npeer = \"{peer}\"\nmode = \"metro\"\npeer_timeout = \"{PEER_TIMEOUT}\"\n",
            data = node.dir.display(),
            control = node.control.display(),
            nbd = node.nbd.display(),
            ca = certs.join("ca.pem").display(),
            cert = certs.join(format!("{name}.pem")).display(),
            key = certs.join(format!("{name}.key")).display(),
            device = node.dir.join("volume.img").display(),
            size = VOLUME_BYTES >> 20,
            journal = JOURNAL_BYTES >> 20,
        );
        std::fs::write(&node.config, text).map_err(setup("config"))?;
        Ok(node)
    }
}

/// A `ferry run` child; killed (SIGKILL) on drop if still running.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(node: &Node, log_name: &str) -> Result<Daemon, DemoError> {
        use std::os::unix::process::CommandExt;
        // This very binary, even if a rebuild replaced its file since the demo started.
        let exe = match Path::new("/proc/self/exe") {
            path if path.exists() => path.to_path_buf(),
            _ => std::env::current_exe().map_err(setup("locating the ferry binary"))?,
        };
        let log = node.dir.parent().unwrap_or(&node.dir).join(log_name);
        let stderr = std::fs::File::create(&log).map_err(setup("daemon log"))?;
        let mut command = Command::new(exe);
        command
            .args(["run", "--config"])
            .arg(&node.config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        // SAFETY: prctl(2) is async-signal-safe; the closure touches nothing else. If the demo
        // itself dies (even by SIGKILL), the kernel kills its daemons too.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command.spawn().map_err(setup("starting ferry run"))?;
        Ok(Daemon { child, log })
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Fails if the process has exited.
    fn check_alive(&mut self, name: &str) -> Result<(), DemoError> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(DemoError::Daemon(format!(
                "`ferry run` of node {name} exited with {status}; see {}",
                self.log.display()
            ))),
            Err(e) => Err(DemoError::Setup(format!("waiting for node {name}: {e}"))),
        }
    }

    fn terminate(&mut self, name: &str) -> Result<Duration, DemoError> {
        let started = Instant::now();
        // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped).
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = started + STATE_LIMIT;
        loop {
            if let Some(status) = self
                .child
                .try_wait()
                .map_err(setup("waiting for the daemon"))?
            {
                return if status.success() {
                    Ok(started.elapsed())
                } else {
                    Err(DemoError::Daemon(format!(
                        "node {name}: clean shutdown exited with {status}; log: {}",
                        self.log.display()
                    )))
                };
            }
            if Instant::now() > deadline {
                self.kill9();
                return Err(DemoError::Daemon(format!(
                    "node {name} did not stop within {STATE_LIMIT:?} of SIGTERM; log: {}",
                    self.log.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill9();
        }
    }
}

fn free_udp() -> Result<std::net::UdpSocket, DemoError> {
    std::net::UdpSocket::bind("127.0.0.1:0").map_err(setup("picking a free UDP port"))
}

fn free_tcp() -> Result<std::net::TcpListener, DemoError> {
    std::net::TcpListener::bind("127.0.0.1:0").map_err(setup("picking a free TCP port"))
}

// ---------------------------------------------------------------------------------------------
// Control socket and metrics.

async fn status(node: &Node) -> Result<Value, DemoError> {
    control::request_with_timeout(
        &node.control,
        json!({"op": "status"}),
        Duration::from_secs(10),
    )
    .await
    .map_err(|e| DemoError::Daemon(format!("status of node {}: {e}", node.name)))
}

fn volume(status: &Value) -> &Value {
    &status["volumes"][0]
}

fn replica(status: &Value) -> &Value {
    &status["volumes"][0]["replicas"][0]
}

fn role(status: &Value) -> &str {
    volume(status)["role"].as_str().unwrap_or("?")
}

fn state(status: &Value) -> &str {
    replica(status)["state"].as_str().unwrap_or("?")
}

fn generation(status: &Value) -> u64 {
    volume(status)["generation"].as_u64().unwrap_or(0)
}

/// Polls both nodes' status until `done` holds (bounded by [`STATE_LIMIT`]); returns the time
/// it took and the last statuses. The daemons must stay alive meanwhile.
async fn wait_until(
    what: &str,
    nodes: [(&Node, &mut Daemon); 2],
    done: impl Fn(&Value, &Value) -> bool,
) -> Result<(Duration, Value, Value), DemoError> {
    let started = Instant::now();
    let [(a, da), (b, db)] = nodes;
    let mut last = String::new();
    loop {
        da.check_alive(a.name)?;
        db.check_alive(b.name)?;
        let request = json!({"op": "status"});
        let short = Duration::from_secs(5);
        let sa = control::request_with_timeout(&a.control, request.clone(), short).await;
        let sb = control::request_with_timeout(&b.control, request, short).await;
        match (sa, sb) {
            (Ok(sa), Ok(sb)) => {
                if done(&sa, &sb) {
                    return Ok((started.elapsed(), sa, sb));
                }
                last = format!("node {}: {sa}\n  node {}: {sb}", a.name, b.name);
            }
            (sa, sb) => {
                for (node, s) in [(a, sa), (b, sb)] {
                    if let Err(e) = s {
                        last = format!("node {}: {e}", node.name);
                    }
                }
            }
        }
        if started.elapsed() > STATE_LIMIT {
            return Err(DemoError::Daemon(format!(
                "{what}: not reached within {STATE_LIMIT:?}; last status:\n  {last}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Mean of `ferry_write_latency_seconds` by stage and of `ferry_replica_rtt_seconds`, from one
/// node's /metrics (a plain HTTP GET).
async fn scrape_means(address: SocketAddr) -> Result<Vec<(String, f64, u64)>, String> {
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: ferry\r\nConnection: close\r\n\r\n")
            .await?;
        let mut body = String::new();
        stream.read_to_string(&mut body).await?;
        Ok::<String, std::io::Error>(body)
    };
    let text = tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let find = |prefix: &str, label: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(prefix) && l.contains(label))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    };
    let mut out = Vec::new();
    for (what, name, label) in [
        (
            "write, total",
            "ferry_write_latency_seconds",
            "stage=\"total\"",
        ),
        (
            "write, local journal",
            "ferry_write_latency_seconds",
            "stage=\"journal\"",
        ),
        (
            "write, wait for b",
            "ferry_write_latency_seconds",
            "stage=\"replica\"",
        ),
        ("replication round trip", "ferry_replica_rtt_seconds", ""),
    ] {
        let sum = find(&format!("{name}_sum"), label);
        let count = find(&format!("{name}_count"), label);
        match (sum, count) {
            (Some(sum), Some(count)) if count > 0.0 => {
                out.push((what.to_string(), sum / count, count as u64))
            }
            _ => return Err(format!("no samples of {name}{{{label}}}")),
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// NBD.

async fn connect(node: &Node, daemon: &mut Daemon) -> Result<NbdClient, DemoError> {
    let deadline = Instant::now() + STATE_LIMIT;
    loop {
        match NbdClient::connect_unix(&node.nbd, VOLUME).await {
            Ok(c) if c.size_bytes() == VOLUME_BYTES => return Ok(c),
            Ok(c) => {
                return Err(DemoError::Verify(format!(
                    "node {}: export size {} != {VOLUME_BYTES}",
                    node.name,
                    c.size_bytes()
                )))
            }
            Err(e) => {
                daemon.check_alive(node.name)?;
                if Instant::now() > deadline {
                    return Err(DemoError::Daemon(format!(
                        "node {}: NBD export not reachable within {STATE_LIMIT:?}: {e}",
                        node.name
                    )));
                }
                tokio::time::sleep(Duration::from_millis(10)).await
            }
        }
    }
}

fn read_only(nbd: &NbdClient) -> bool {
    nbd.transmission_flags() & ferry_protocol::nbd::FLAG_READ_ONLY != 0
}

/// Reads the whole volume in chunks and hands each 4 KiB block to `check`.
async fn read_all(nbd: &mut NbdClient, mut check: impl FnMut(u64, &[u8])) -> Result<(), DemoError> {
    let mut offset = 0u64;
    while offset < VOLUME_BYTES {
        let len = READ_CHUNK_BYTES.min((VOLUME_BYTES - offset) as u32);
        let data = nbd.read(offset, len).await.map_err(client("read"))?;
        for (i, block) in data.chunks(BLOCK_BYTES).enumerate() {
            check(offset / BLOCK_BYTES as u64 + i as u64, block);
        }
        offset += len as u64;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The model of what the client saw.

#[derive(Default)]
struct Latencies(Vec<Duration>);

impl Latencies {
    fn add(&mut self, since: Instant) {
        self.0.push(since.elapsed());
    }

    fn line(&mut self, what: &str) -> String {
        self.0.sort();
        let pick = |q: f64| {
            if self.0.is_empty() {
                return "-".to_string();
            }
            let i = ((self.0.len() as f64 * q).ceil() as usize).clamp(1, self.0.len()) - 1;
            format!("{:.0}", self.0[i].as_secs_f64() * 1e6)
        };
        format!(
            "  {what:<36} {:>6} {:>8} {:>8} {:>8}",
            self.0.len(),
            pick(0.5),
            pick(0.99),
            pick(0.999)
        )
    }
}

/// What every block must hold. Two writes to one block are never in flight together, so a
/// block's contents are its last completed write, or the write in flight to it when the
/// primary died.
struct Model {
    blocks: u64,
    /// Last completed write per block.
    completed: HashMap<u64, Vec<u8>>,
    /// CRC-32 of every completed write per block, oldest first (to name what a bad block holds).
    history: HashMap<u64, Vec<u32>>,
    /// Blocks with a write in flight.
    busy: HashSet<u64>,
    completed_writes: usize,
}

impl Model {
    fn new(blocks: u64) -> Model {
        Model {
            blocks,
            completed: HashMap::new(),
            history: HashMap::new(),
            busy: HashSet::new(),
            completed_writes: 0,
        }
    }

    /// A random block with no write in flight, and fresh random contents for it.
    fn next_write(&mut self, rng: &mut StdRng) -> (u64, Vec<u8>) {
        let block = loop {
            let block = rng.gen_range(0..self.blocks);
            if !self.busy.contains(&block) {
                break block;
            }
        };
        let mut data = vec![0u8; BLOCK_BYTES];
        rng.fill_bytes(&mut data);
        (block, data)
    }

    fn complete(&mut self, block: u64, data: Vec<u8>) {
        self.busy.remove(&block);
        self.history
            .entry(block)
            .or_default()
            .push(crc32fast::hash(&data));
        self.completed.insert(block, data);
        self.completed_writes += 1;
    }
}

enum InFlight {
    Write {
        block: u64,
        data: Vec<u8>,
        fua: bool,
        sent: Instant,
    },
    Flush {
        sent: Instant,
    },
}

#[derive(Default)]
struct FailoverCheck {
    completed_ok: usize,
    inflight_new: usize,
    inflight_old: usize,
    never_written_zero: usize,
    bad: Vec<String>,
    bad_count: usize,
}

fn describe_bad(model: &Model, block: u64, got: &[u8], inflight: Option<&Vec<u8>>) -> String {
    let crc = crc32fast::hash(got);
    let what = if got.iter().all(|b| *b == 0) {
        "zeros".to_string()
    } else if let Some(i) = model
        .history
        .get(&block)
        .and_then(|h| h.iter().rposition(|c| *c == crc))
    {
        format!(
            "completed write #{} of {} to it (an older one)",
            i + 1,
            model.history[&block].len()
        )
    } else {
        "data this run never wrote there".to_string()
    };
    format!(
        "block {block} (offset {}): expected {}{}, found {what}",
        block * BLOCK_BYTES as u64,
        if model.completed.contains_key(&block) {
            "its last completed write"
        } else {
            "zeros (never written)"
        },
        if inflight.is_some() {
            " or the write in flight to it"
        } else {
            ""
        }
    )
}

/// Sends one request of the pipelined phase: mostly writes (1 in 8 FUA), 1 in 40 a FLUSH.
async fn send_one(
    na: &mut NbdClient,
    model: &mut Model,
    rng: &mut StdRng,
    inflight: &mut HashMap<u64, InFlight>,
) -> Result<(), DemoError> {
    let t = Instant::now();
    if rng.gen_ratio(1, 40) {
        let cookie = na.send_flush().await.map_err(client("flush to a"))?;
        inflight.insert(cookie, InFlight::Flush { sent: t });
        return Ok(());
    }
    let (block, data) = model.next_write(rng);
    let fua = rng.gen_ratio(1, 8);
    model.busy.insert(block);
    let cookie = na
        .send_write(block * BLOCK_BYTES as u64, &data, fua)
        .await
        .map_err(client("write to a"))?;
    inflight.insert(
        cookie,
        InFlight::Write {
            block,
            data,
            fua,
            sent: t,
        },
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Printing.

fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms < 10.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

fn bytes(n: u64) -> String {
    if n >= 1 << 20 {
        format!("{:.1} MiB ({n} bytes)", n as f64 / (1u64 << 20) as f64)
    } else if n >= 1 << 10 {
        format!("{:.0} KiB ({n} bytes)", n as f64 / 1024.0)
    } else {
        format!("{n} bytes")
    }
}

struct Clock(Instant);

impl Clock {
    fn step(&self, text: impl AsRef<str>) {
        let t = self.0.elapsed().as_secs_f64();
        let mut lines = text.as_ref().lines();
        println!(
            "  {:>7} {}",
            format!("+{t:.2}s"),
            lines.next().unwrap_or("")
        );
        for line in lines {
            println!("           {line}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The scenario.

async fn scenario(dir: &Path) -> Result<(), DemoError> {
    let seed: u64 = std::env::var("FERRY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let mut rng = StdRng::seed_from_u64(seed);
    println!("ferry demo: metro (synchronous) replication between two nodes on this machine; the primary is");
    println!("killed with SIGKILL mid-write, the secondary is promoted and verified, the old primary rejoins");
    println!(
        "  directory {}   seed {seed} (FERRY_SEED={seed} replays the workload)",
        dir.display()
    );

    // Certificates, ports, configs.
    let certs = dir.join("certs");
    std::fs::create_dir(&certs).map_err(setup("certificate directory"))?;
    crate::replication::tls::cert_init(&certs, &["a".to_string(), "b".to_string()])
        .map_err(setup("making certificates"))?;
    let (udp_a, udp_b, tcp_a, tcp_b) = (free_udp()?, free_udp()?, free_tcp()?, free_tcp()?);
    let addr = |r: std::io::Result<SocketAddr>| r.map_err(setup("local address"));
    let (listen_a, listen_b) = (addr(udp_a.local_addr())?, addr(udp_b.local_addr())?);
    let (metrics_a, metrics_b) = (addr(tcp_a.local_addr())?, addr(tcp_b.local_addr())?);
    let a = Node::create(
        dir, &certs, "a", "primary", listen_a, metrics_a, "b", listen_b,
    )?;
    let b = Node::create(
        dir,
        &certs,
        "b",
        "secondary",
        listen_b,
        metrics_b,
        "a",
        listen_a,
    )?;
    drop((udp_a, udp_b, tcp_a, tcp_b));
    println!(
        "  setup   CA + certificates for a and b (mutual TLS); QUIC {listen_a} <-> {listen_b};"
    );
    println!(
        "          volume `{VOLUME}` {} MiB, journal {} MiB per node; a primary, b secondary, metro, peer_timeout {PEER_TIMEOUT}",
        VOLUME_BYTES >> 20,
        JOURNAL_BYTES >> 20
    );
    println!();

    // 1-2. Start both nodes; the initial full sync.
    let clock = Clock(Instant::now());
    let mut da = Daemon::start(&a, "a.log")?;
    let mut db = Daemon::start(&b, "b.log")?;
    let (initial_sync, sa, _) = wait_until(
        "initial sync (a's and b's replicas in-sync)",
        [(&a, &mut da), (&b, &mut db)],
        |sa, sb| {
            role(sa) == "primary"
                && role(sb) == "secondary"
                && state(sa) == "in-sync"
                && state(sb) == "in-sync"
        },
    )
    .await?;
    clock.step(format!(
        "started a and b; initial sync done: in-sync {} after start ({} sent a -> b)",
        ms(initial_sync),
        bytes(replica(&sa)["resynced_bytes"].as_u64().unwrap_or(0))
    ));

    // 3a. Writes one at a time on the metro pair: the latency numbers.
    let mut na = connect(&a, &mut da).await?;
    if read_only(&na) {
        return Err(DemoError::Verify(
            "a's export is read-only although a is primary".into(),
        ));
    }
    let mut model = Model::new(VOLUME_BYTES / BLOCK_BYTES as u64);
    let (mut write_lat, mut fua_lat, mut flush_lat) = (
        Latencies::default(),
        Latencies::default(),
        Latencies::default(),
    );
    let (mut fuas, mut flushes) = (0, 0);
    let started = Instant::now();
    for _ in 0..QD1_WRITES {
        let (block, data) = model.next_write(&mut rng);
        let fua = rng.gen_ratio(1, 8);
        let t = Instant::now();
        na.write(block * BLOCK_BYTES as u64, &data, fua)
            .await
            .map_err(client("write to a"))?;
        if fua {
            fuas += 1;
            fua_lat.add(t);
        } else {
            write_lat.add(t);
        }
        model.complete(block, data);
        if rng.gen_ratio(1, 20) {
            let t = Instant::now();
            na.flush().await.map_err(client("flush on a"))?;
            flushes += 1;
            flush_lat.add(t);
        }
    }
    let qd1_seconds = started.elapsed().as_secs_f64();
    let server_means = scrape_means(a.metrics).await;
    clock.step(format!(
        "{QD1_WRITES} writes at QD1 on a ({fuas} FUA, {flushes} followed by FLUSH) in {qd1_seconds:.2} s"
    ));

    // 3b. Pipelined writes, then kill -9 a with requests in flight.
    let (mut pipe_lat, mut pipe_fua_lat, mut pipe_flush_lat) = (
        Latencies::default(),
        Latencies::default(),
        Latencies::default(),
    );
    let mut inflight: HashMap<u64, InFlight> = HashMap::new();
    let kill_after = rng.gen_range(PIPELINED_MIN..PIPELINED_MAX);
    let mut sent = 0usize;
    let started = Instant::now();
    let mut pipelined_completed = 0usize;
    loop {
        while inflight.len() < PIPELINE_DEPTH && sent < kill_after {
            send_one(&mut na, &mut model, &mut rng, &mut inflight).await?;
            sent += 1;
        }
        if sent >= kill_after {
            break;
        }
        let (cookie, result) = na.recv_reply().await.map_err(client("reply from a"))?;
        result.map_err(client("request to a"))?;
        match inflight.remove(&cookie) {
            Some(InFlight::Write {
                block,
                data,
                fua,
                sent,
            }) => {
                if fua {
                    pipe_fua_lat.add(sent)
                } else {
                    pipe_lat.add(sent)
                }
                model.complete(block, data);
                pipelined_completed += 1;
            }
            Some(InFlight::Flush { sent }) => pipe_flush_lat.add(sent),
            None => {
                return Err(DemoError::Client(format!(
                    "reply for unknown cookie {cookie}"
                )))
            }
        }
    }
    let pipelined_seconds = started.elapsed().as_secs_f64();
    // While the pipeline is full: what a says about b, then refill it and kill a at once.
    let before_kill = status(&a).await?;
    for _ in 0..PIPELINE_DEPTH {
        send_one(&mut na, &mut model, &mut rng, &mut inflight).await?;
    }
    let at_kill = inflight.len();
    let killed = Instant::now();
    da.kill9();
    clock.step(format!(
        "pipelined writes at QD{PIPELINE_DEPTH} on a: {pipelined_completed} completed in {pipelined_seconds:.2} s ({:.0} writes/s); a's replica of b: {}, lag {} bytes",
        pipelined_completed as f64 / pipelined_seconds,
        state(&before_kill),
        replica(&before_kill)["lag_bytes"]
    ));
    // Replies a sent before it died are completions the client sees now: they count as such.
    let mut answered_after_kill = 0;
    let mut errors_after_kill = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), na.recv_reply()).await {
            Ok(Ok((cookie, Ok(_)))) => {
                answered_after_kill += 1;
                if let Some(InFlight::Write { block, data, .. }) = inflight.remove(&cookie) {
                    model.complete(block, data);
                }
            }
            Ok(Ok((cookie, Err(e)))) => errors_after_kill.push(format!("cookie {cookie}: {e}")),
            Ok(Err(_)) | Err(_) => break,
        }
    }
    drop(na);
    let uncertain_fua = inflight
        .values()
        .filter(|op| matches!(op, InFlight::Write { fua: true, .. }))
        .count();
    let uncertain_flushes = inflight
        .values()
        .filter(|op| matches!(op, InFlight::Flush { .. }))
        .count();
    let uncertain: HashMap<u64, Vec<u8>> = inflight
        .drain()
        .filter_map(|(_, op)| match op {
            InFlight::Write { block, data, .. } => Some((block, data)),
            InFlight::Flush { .. } => None,
        })
        .collect();
    clock.step(format!(
        "kill -9 a with {at_kill} requests in flight: {answered_after_kill} replies already on their way (counted as completed), {} unanswered ({} writes, {uncertain_fua} of them FUA, may be old or new; {uncertain_flushes} FLUSH){}",
        at_kill - answered_after_kill,
        uncertain.len(),
        if errors_after_kill.is_empty() {
            String::new()
        } else {
            format!("; error replies: {}", errors_after_kill.join(", "))
        }
    ));

    // 4. promote --force on b; verify every block of b against the model. SPEC §3: --force
    // overrides an unreachable peer at once. A refusal is reported as a deviation, and the
    // demo retries (bounded) so the data can still be checked.
    let mut deviations: Vec<String> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    let t = Instant::now();
    let mut refusals = 0usize;
    let mut first_refusal = String::new();
    let promoted = loop {
        let request = json!({"op": "promote", "volume": VOLUME, "force": true});
        match control::request(&b.control, request).await {
            Ok(result) => break result,
            Err(e) if e.code() == control::PEER_IS_PRIMARY && t.elapsed() < PROMOTE_RETRY_LIMIT => {
                if refusals == 0 {
                    first_refusal =
                        format!("{} after the kill: {}: {e}", ms(killed.elapsed()), e.code());
                }
                refusals += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => {
                return Err(DemoError::Daemon(format!(
                    "`promote --force` on b was refused ({}) {} after the kill{}: {e}",
                    e.code(),
                    ms(killed.elapsed()),
                    if refusals > 0 {
                        format!(" (and {refusals} times before, first {first_refusal})")
                    } else {
                        String::new()
                    }
                )))
            }
        }
    };
    if refusals > 0 {
        let deviation = format!(
            "`promote --force` on b was refused {refusals} times although a was dead (first at {first_refusal});\n\
             it was accepted only {} after the kill, once b itself noticed a was gone (peer_timeout {PEER_TIMEOUT}).\n\
             SPEC §3: --force overrides an unreachable peer at once, without waiting for peer_timeout.",
            ms(killed.elapsed())
        );
        clock.step(format!(
            "DEVIATION: promote --force on b refused {refusals} times (peer-is-primary) until b noticed a was gone; see the end"
        ));
        deviations.push(deviation);
    }
    let promote_time = t.elapsed();
    let sb = status(&b).await?;
    if role(&sb) != "primary" {
        return Err(DemoError::Daemon(format!(
            "b answered promote with {promoted} but its status says role {}",
            role(&sb)
        )));
    }
    let mut nb = connect(&b, &mut db).await?;
    let writable_after_kill = killed.elapsed();
    if read_only(&nb) {
        return Err(DemoError::Verify(
            "b's export is still read-only after promote".into(),
        ));
    }
    let lag_after_promote = replica(&sb)["lag_bytes"].as_u64().unwrap_or(0);
    clock.step(format!(
        "promote --force on b: {} (generation {:#x}) in {}; kill -> b writable over NBD: {}\n\
         b's replica of a: {}, lag_bytes {} before any write on b",
        role(&sb),
        generation(&sb),
        ms(promote_time),
        ms(writable_after_kill),
        state(&sb),
        bytes(lag_after_promote)
    ));
    let t = Instant::now();
    let zero_crc = crc32fast::hash(&[0u8; BLOCK_BYTES]);
    let mut expected_crc = vec![zero_crc; model.blocks as usize];
    let mut check = FailoverCheck::default();
    read_all(&mut nb, |block, got| {
        expected_crc[block as usize] = crc32fast::hash(got);
        let in_flight = uncertain.get(&block);
        let old_ok = match model.completed.get(&block) {
            Some(data) => data == got,
            None => got.iter().all(|b| *b == 0),
        };
        if in_flight.is_some_and(|d| d == got) {
            check.inflight_new += 1;
        } else if old_ok && in_flight.is_some() {
            check.inflight_old += 1;
        } else if old_ok && model.completed.contains_key(&block) {
            check.completed_ok += 1;
        } else if old_ok {
            check.never_written_zero += 1;
        } else {
            check.bad_count += 1;
            if check.bad.len() < 10 {
                check.bad.push(describe_bad(&model, block, got, in_flight));
            }
        }
    })
    .await?;
    if check.bad_count > 0 {
        return Err(DemoError::Verify(format!(
            "{} of {} blocks on the promoted copy (b) are wrong ({} completed writes, {} in flight at the kill; a's replica of b was {} just before the kill):\n  {}",
            check.bad_count,
            model.blocks,
            model.completed_writes,
            uncertain.len(),
            state(&before_kill),
            check.bad.join("\n  ")
        )));
    }
    clock.step(format!(
        "verified b (all {} blocks read back in {}): {} blocks hold their last completed write; in-flight writes: {} new, {} old; {} never-written blocks read as zeros",
        model.blocks,
        ms(t.elapsed()),
        check.completed_ok,
        check.inflight_new,
        check.inflight_old,
        check.never_written_zero
    ));

    // b alone takes writes (a is down): the resync has to bring them to a.
    let mut failover_blocks = HashSet::new();
    let (mut alone_lat, mut alone_fua_lat, mut alone_flush_lat) = (
        Latencies::default(),
        Latencies::default(),
        Latencies::default(),
    );
    for _ in 0..FAILOVER_WRITES {
        let (block, data) = model.next_write(&mut rng);
        let fua = rng.gen_ratio(1, 8);
        let t = Instant::now();
        nb.write(block * BLOCK_BYTES as u64, &data, fua)
            .await
            .map_err(client("write to b"))?;
        if fua {
            alone_fua_lat.add(t);
        } else {
            alone_lat.add(t);
        }
        expected_crc[block as usize] = crc32fast::hash(&data);
        failover_blocks.insert(block);
        if rng.gen_ratio(1, 20) {
            let t = Instant::now();
            nb.flush().await.map_err(client("flush on b"))?;
            alone_flush_lat.add(t);
        }
    }
    nb.flush().await.map_err(client("flush on b"))?;
    let sb = status(&b).await?;
    clock.step(format!(
        "{FAILOVER_WRITES} writes on b alone; b's replica of a: {}, lag_bytes {}{}",
        state(&sb),
        bytes(replica(&sb)["lag_bytes"].as_u64().unwrap_or(0)),
        replica(&sb)["last_error"]
            .as_str()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default()
    ));

    // 5. Restart a: it must learn b's newer generation and become its secondary.
    let generation_b = generation(&sb);
    let mut da = Daemon::start(&a, "a-restart.log")?;
    let (rejoin, sa, sb) = wait_until(
        "rejoin (a secondary of b's generation, both replicas in-sync)",
        [(&a, &mut da), (&b, &mut db)],
        |sa, sb| {
            role(sa) == "secondary"
                && role(sb) == "primary"
                && state(sa) == "in-sync"
                && state(sb) == "in-sync"
                && generation(sa) == generation(sb)
        },
    )
    .await?;
    let resynced = replica(&sb)["resynced_bytes"].as_u64().unwrap_or(0);
    // What actually differed: blocks written on b alone, and blocks a may have journaled
    // beyond b (its writes in flight at the kill).
    let differed = (failover_blocks.len() + uncertain.len()) as u64 * BLOCK_BYTES as u64;
    let recovery = &volume(&sa)["recovery"];
    clock.step(format!(
        "restarted a: journal replay {} records; it became b's secondary (generation {:#x}{}) and b's replica of a is in-sync {} after the restart\n\
         resync b -> a sent {}; at most {} differed ({} blocks written on b alone, {} in flight on a at the kill)",
        recovery["records_replayed"],
        generation(&sa),
        if generation(&sb) == generation_b {
            ""
        } else {
            ", b moved to a new one meanwhile"
        },
        ms(rejoin),
        bytes(resynced),
        bytes(differed),
        failover_blocks.len(),
        uncertain.len()
    ));
    if resynced > 4 * differed {
        let note = format!(
            "the delta resync after the failover sent {} although at most {} differed between the copies;\n\
             b's replica of a already reported lag_bytes {} right after promote, before any write on b\n\
             (the blocks b received as secondary appear to stay in its dirty map for a).",
            bytes(resynced),
            bytes(differed),
            bytes(lag_after_promote)
        );
        clock.step(format!(
            "NOTE: resync sent {:.0}x what differed; see the end",
            resynced as f64 / differed.max(1) as f64
        ));
        notes.push(note);
    }

    // 6. Both copies, block for block.
    let t = Instant::now();
    let mut na = connect(&a, &mut da).await?;
    let a_read_only = read_only(&na);
    let mut a_blocks = Vec::with_capacity(model.blocks as usize);
    read_all(&mut na, |_, got| a_blocks.push(crc32fast::hash(got))).await?;
    let mut b_blocks = Vec::with_capacity(model.blocks as usize);
    read_all(&mut nb, |_, got| b_blocks.push(crc32fast::hash(got))).await?;
    let mut differ = Vec::new();
    let mut wrong = Vec::new();
    for block in 0..model.blocks as usize {
        if a_blocks[block] != b_blocks[block] {
            differ.push(block);
        }
        if b_blocks[block] != expected_crc[block] {
            wrong.push(block);
        }
    }
    if !differ.is_empty() || !wrong.is_empty() {
        return Err(DemoError::Verify(format!(
            "after the resync: {} blocks differ between a and b (first: {:?}); {} blocks of b differ from what it held after failover plus its own writes (first: {:?})",
            differ.len(),
            &differ[..differ.len().min(10)],
            wrong.len(),
            &wrong[..wrong.len().min(10)]
        )));
    }
    if !a_read_only {
        return Err(DemoError::Verify(
            "a's export accepts writes although a is now secondary".into(),
        ));
    }
    clock.step(format!(
        "compared a and b, all {} blocks (CRC-32 of each) in {}: identical, and equal to the model",
        model.blocks,
        ms(t.elapsed())
    ));
    drop(na);
    nb.disconnect().await.map_err(client("disconnect from b"))?;
    let stop_a = da.terminate("a")?;
    let stop_b = db.terminate("b")?;
    clock.step(format!(
        "SIGTERM: a stopped cleanly in {}, b in {} (exit 0)",
        ms(stop_a),
        ms(stop_b)
    ));

    println!();
    println!("  latency (µs, 4 KiB, client side)        count      p50      p99    p99.9");
    println!("{}", write_lat.line("metro write, QD1"));
    println!("{}", fua_lat.line("metro write FUA, QD1"));
    println!("{}", flush_lat.line("metro flush"));
    println!(
        "{}",
        pipe_lat.line(&format!("metro write, QD{PIPELINE_DEPTH} pipelined"))
    );
    println!(
        "{}",
        pipe_fua_lat.line(&format!("metro write FUA, QD{PIPELINE_DEPTH} pipelined"))
    );
    println!(
        "{}",
        pipe_flush_lat.line(&format!("metro flush, QD{PIPELINE_DEPTH} pipelined"))
    );
    println!("{}", alone_lat.line("b alone (a down), write, QD1"));
    println!("{}", alone_fua_lat.line("b alone (a down), write FUA, QD1"));
    println!("{}", alone_flush_lat.line("b alone (a down), flush"));
    match server_means {
        Ok(means) => {
            let parts: Vec<String> = means
                .iter()
                .map(|(what, mean, _)| format!("{what} {:.0}", mean * 1e6))
                .collect();
            println!(
                "  a's /metrics after the QD1 phase, means (µs): {}",
                parts.join("; ")
            );
        }
        Err(e) => println!("  a's /metrics could not be read: {e}"),
    }
    println!();
    println!("  failover: kill -9 a -> promote --force b returned in {} -> b writable over NBD {} after the kill;", ms(promote_time), ms(writable_after_kill));
    println!(
        "            a restarted -> back in sync as b's secondary in {}, resync sent {}",
        ms(rejoin),
        bytes(resynced)
    );
    println!(
        "  checked:  all {} blocks of the promoted copy b: {} completed writes to {} blocks, each block holding its",
        model.blocks,
        model.completed_writes,
        model.completed.len()
    );
    println!(
        "            last completed write, or for the {} blocks with a write in flight at the kill that write ({} new) or",
        uncertain.len(),
        check.inflight_new
    );
    println!(
        "            the contents before it ({} old); never-written blocks read as zeros;",
        check.inflight_old
    );
    println!("            the old primary rejoins as secondary of the newer generation, and both copies end identical");
    println!("  not shown: regional (asynchronous) replication is not built yet, so this demo has no regional peer (SPEC §8 names one)");
    println!();
    for note in &notes {
        for (i, line) in note.lines().enumerate() {
            println!("  {} {line}", if i == 0 { "note:" } else { "     " });
        }
    }
    if !notes.is_empty() {
        println!();
    }
    if deviations.is_empty() {
        println!("PASS");
    } else {
        println!(
            "PASS (data verified), with {} deviation(s) from the SPEC:",
            deviations.len()
        );
        for deviation in &deviations {
            for (i, line) in deviation.lines().enumerate() {
                println!("  {} {line}", if i == 0 { "-" } else { " " });
            }
        }
    }
    Ok(())
}
