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
use rand::{Rng, RngExt};
use serde_json::{json, Value};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::control;
use crate::nbd::client::NbdClient;

mod scenario;
use scenario::scenario;

const VOLUME: &str = "demo";
/// Set to keep the temporary directory (configs, certificates, logs, volumes) after a success
/// too; it is always kept after a failure.
const KEEP_ENV: &str = "FERRY_DEMO_KEEP";
const VOLUME_BYTES: u64 = 64 << 20;
const JOURNAL_BYTES: u64 = 32 << 20;
const PEER_TIMEOUT: &str = "2s";
/// The regional peer's batch interval.
const REGIONAL_INTERVAL: &str = "1s";
/// Blocks at the end of the volume written one at a time with numbered stamps, so that the
/// regional copy read back says which prefix of them it holds.
const STAMP_BLOCKS: u64 = 1024;
/// The demo writes whole journal blocks.
use ferry_protocol::journal::BLOCK_BYTES;
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
    /// Writes the node's config: one volume replicated to each of `peers` (name, address,
    /// regional or metro).
    fn create(
        root: &Path,
        certs: &Path,
        (name, role): (&'static str, &str),
        listen: SocketAddr,
        metrics: SocketAddr,
        peers: &[(&str, SocketAddr, bool)],
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
        let mut text = format!(
            "[node]\nname = \"{name}\"\ndata_dir = \"{data}\"\ncontrol_socket = \"{control}\"\n\
             metrics_listen = \"{metrics}\"\nlisten = \"{listen}\"\n\n\
             [nbd]\nlisten = [\"unix:{nbd}\"]\n\n\
             [tls]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n",
            data = node.dir.display(),
            control = node.control.display(),
            nbd = node.nbd.display(),
            ca = certs.join("ca.pem").display(),
            cert = certs.join(format!("{name}.pem")).display(),
            key = certs.join(format!("{name}.key")).display(),
        );
        for (peer, address, _) in peers {
            text.push_str(&format!(
                "\n[[peers]]\nname = \"{peer}\"\naddress = \"{address}\"\n"
            ));
        }
        text.push_str(&format!(
            "\n[[volumes]]\nname = \"{VOLUME}\"\ndevice = \"{device}\"\nsize = \"{size}MiB\"\n\
             journal_size = \"{journal}MiB\"\ninitial_role = \"{role}\"\n",
            device = node.dir.join("volume.img").display(),
            size = VOLUME_BYTES >> 20,
            journal = JOURNAL_BYTES >> 20,
        ));
        for (peer, _, regional) in peers {
            text.push_str(&if *regional {
                format!(
                    "\n[[volumes.replicas]]\npeer = \"{peer}\"\nmode = \"regional\"\ninterval = \"{REGIONAL_INTERVAL}\"\n"
                )
            } else {
                format!(
                    "\n[[volumes.replicas]]\npeer = \"{peer}\"\nmode = \"metro\"\npeer_timeout = \"{PEER_TIMEOUT}\"\n"
                )
            });
        }
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
        unsafe { libc::kill(self.child.id().cast_signed(), libc::SIGTERM) };
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
/// The `/metrics` text of a node.
async fn fetch_metrics(address: SocketAddr) -> Result<String, String> {
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: ferry\r\nConnection: close\r\n\r\n")
            .await?;
        let mut body = String::new();
        stream.read_to_string(&mut body).await?;
        Ok::<String, std::io::Error>(body)
    };
    tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())
}

/// The value of the first sample of `prefix` whose labels contain `label`.
fn sample(text: &str, prefix: &str, label: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix) && l.contains(label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn scrape_means(address: SocketAddr) -> Result<Vec<(String, f64, u64)>, String> {
    let text = fetch_metrics(address).await?;
    let find = |prefix: &str, label: &str| sample(&text, prefix, label);
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
                out.push((what.to_string(), sum / count, whole_count(count)));
            }
            _ => return Err(format!("no samples of {name}{{{label}}}")),
        }
    }
    Ok(out)
}

/// A Prometheus histogram's sample count (a whole, non-negative number) as an integer.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // checked above
fn whole_count(count: f64) -> u64 {
    if count.is_finite() && count >= 0.0 {
        count.round() as u64
    } else {
        0
    }
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
        let len = u32::try_from(VOLUME_BYTES - offset)
            .map_or(READ_CHUNK_BYTES, |left| left.min(READ_CHUNK_BYTES));
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
            // q is in [0, 1], so the rank is a small non-negative count of samples.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let rank = (self.0.len() as f64 * q).ceil() as usize;
            let i = rank.clamp(1, self.0.len()) - 1;
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
            let block = rng.random_range(0..self.blocks);
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
    if rng.random_ratio(1, 40) {
        let cookie = na.send_flush().await.map_err(client("flush to a"))?;
        inflight.insert(cookie, InFlight::Flush { sent: t });
        return Ok(());
    }
    let (block, data) = model.next_write(rng);
    let fua = rng.random_ratio(1, 8);
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
