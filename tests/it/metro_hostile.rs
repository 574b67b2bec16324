//! A hostile but authenticated metro peer, and a slow secondary device during a resync, against
//! real `ferry run` processes.
//!
//! - `metro_hostile_secondary_cannot_harm_the_primary`: node a runs as primary and node b is
//!   not started; the test plays b itself ([`FakePeer`]): a QUIC endpoint with b's real
//!   certificate (made by `ferry cert init`), the volume stream of `transport.rs`, a valid
//!   handshake, then, one scenario per connection, frames with valid CRCs and hostile contents.
//!   After each, a must be alive, must have closed that stream with a `last_error` saying what
//!   was wrong, must keep completing client writes, and its memory must stay bounded. At the end
//!   the real b starts, is fully synced and must hold exactly what a holds.
//! - `metro_hostile_primary_cannot_harm_the_secondary`: the mirror image. A primary can only be
//!   sent acknowledgements, dirty ranges and verify replies; every check of the records, resync
//!   data, flushes and verify requests a peer sends is made by the *receiving* side, so this
//!   test lets the real a sync the real b, stops a, and plays a (the stream opener, since "a"
//!   sorts first) against the real secondary b. Besides malformed records, floods and LSNs out
//!   of range, it asks for verify digests too large or too many, sends a record before the
//!   resync it owes, and reconnects at once after a flood of records, while b's journal is
//!   still writing them (each of the last two once panicked b under its replication lock,
//!   which took its NBD export down). At the end the real a comes back and must resync what
//!   the impostor wrote into b.
//! - `metro_slow_secondary_device_resync_stays_bounded` (feature `fault-injection`): a and b
//!   in sync, b stops, a takes a delta of 48 MiB of distinct 4 KiB blocks, b restarts with
//!   `FERRY_FAULT_DEVICE_WRITE_DELAY_US=2000` (every write to its backing device waits 2 ms):
//!   the resync must finish in a time computed from the delay, without a stream timing out,
//!   with both daemons' memory sampled every 100 ms and bounded, while client writes on a keep
//!   completing; a and b end identical.
//!
//! Failures found along the way are collected and reported together at the end of a test, so
//! that every scenario runs and the final data checks still say whether the copies converged.
//! Everything is seeded (`FERRY_SEED`), bounded and cleaned up: the daemons belong to
//! [`Cluster`], the fake peer's endpoint and runtime are dropped with the test.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use ferry::replication::tls::{self, TlsIdentity};
use ferry::replication::transport;
use ferry_protocol::generation::{decide, GenerationInfo, Role};
use ferry_protocol::journal::{RecordKind, RECORD_BYTES_MAX};
use ferry_protocol::repl::{
    self, DirtyRange, Hello, Message, ResyncKind, WriteRecord, DIRTY_RANGES_PER_FRAME_MAX,
    HEADER_BYTES, MAGIC, VERSION,
};
use ferry_protocol::replication::session::PROTOCOL_VERSION;
use rand::rngs::StdRng;
use rand::{Rng, RngExt, SeedableRng};

use crate::cluster::{self, Cluster, ClusterOptions, Node, NodeId, NodeSpec, VOLUME};
use crate::harness;
#[cfg(feature = "fault-injection")]
use crate::metro::first_difference;
use crate::metro::{compare_volume, MIB, RESYNC_TIMEOUT, SYNC_TIMEOUT};
use crate::model::BLOCK_BYTES;
use crate::nbd_wire::{self, NbdConn};

/// How long the fake peer waits for a QUIC handshake, the welcome byte or the volume stream.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the fake peer waits for the real node's hello and welcome.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one stream write of the fake peer may block.
const SEND_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the real node may take to close the stream after a hostile frame.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the replica's `last_error` may take to say why, once the stream closed.
const LAST_ERROR_TIMEOUT: Duration = Duration::from_secs(10);
/// The fake peer's receive windows: small, so that a peer that stops reading stops the real
/// node's stream writer soon (the real node's own windows are in `transport.rs`).
const FAKE_STREAM_WINDOW_BYTES: u32 = 1 << 20;
const FAKE_CONNECTION_WINDOW_BYTES: u32 = 4 << 20;
/// Tiny frames of a flood (tens of thousands, as a misbehaving peer would send).
const FLOOD_FRAMES: u64 = 50_000;
/// Heartbeats sent to a real node by a peer that never reads its answers. The node's queue
/// for the stream's writer counts every answer without payload as 1 KiB against its bound
/// (`stream.rs`, `QUEUED_BYTES_MAX` = 192 MiB: some 196 000 answers) and closes the stream
/// once it is full; if it queued without a bound, its memory would grow by this many messages.
const NOT_READING_FLOOD_FRAMES: u64 = 1_000_000;
/// Memory a real node may gain during one hostile scenario, in MiB. What a peer can make a node
/// hold is bounded by design: the QUIC stream receive window (16 MiB, `transport.rs`), the
/// reader's 1 MiB buffer and one batch of 256 decoded messages (`stream.rs`), the writer's
/// queue of at most some 196 000 small answers for a peer that does not read (a few tens of
/// MiB), and at most 16 verify requests served at once, each read 1 MiB at a time. 64 MiB is
/// that with room for the allocator; the scenarios that may legitimately hold more (records
/// inside the window) say so in [`AtSecondary::memory_bound_mib`].
const SCENARIO_MEMORY_BOUND_MIB: u64 = 64;

// ---------------------------------------------------------------------------------------------
// Processes and memory
// ---------------------------------------------------------------------------------------------

/// The pid of the `ferry run` of `spec`, found in /proc by its config path (the cluster
/// fixture owns the child; this only looks). None when it is not running.
fn daemon_pid(spec: &NodeSpec) -> Option<u32> {
    let config = spec.config_path();
    let config = config.to_str()?.as_bytes().to_vec();
    let entries = fs::read_dir("/proc").ok()?;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|byte| *byte == 0).collect();
        if args.contains(&b"run".as_slice()) && args.contains(&config.as_slice()) && alive(pid) {
            return Some(pid);
        }
    }
    None
}

/// The process exists and is not a zombie.
fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // The state follows the parenthesised command name.
            let after = stat.rsplit_once(')')?.1;
            after.split_whitespace().next().map(|state| state != "Z")
        })
        .unwrap_or(false)
}

/// Resident memory of a process: now and its peak since it started, in KiB.
#[derive(Clone, Copy, Debug, Default)]
struct Memory {
    rss_kib: u64,
    hwm_kib: u64,
}

impl Memory {
    fn of(pid: u32) -> Option<Memory> {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| -> Option<u64> {
            let line = status.lines().find(|line| line.starts_with(name))?;
            line[name.len()..]
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()
        };
        Some(Memory {
            rss_kib: field("VmRSS:")?,
            hwm_kib: field("VmHWM:")?,
        })
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// One sample of a [`MemorySampler`].
#[derive(Clone, Debug)]
struct Sample {
    at: Duration,
    node: &'static str,
    pid: u32,
    memory: Memory,
}

/// Samples VmRSS and VmHWM of some nodes' daemons every `interval` on a thread (a node that
/// restarts is found again by its config path).
struct MemorySampler {
    started: Instant,
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    thread: Option<JoinHandle<()>>,
}

impl MemorySampler {
    fn start(nodes: Vec<(&'static str, NodeSpec)>, interval: Duration) -> MemorySampler {
        let started = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let stop = Arc::clone(&stop);
            let samples = Arc::clone(&samples);
            std::thread::spawn(move || {
                let mut pids: Vec<Option<u32>> = vec![None; nodes.len()];
                while !stop.load(Ordering::SeqCst) {
                    for (index, (name, spec)) in nodes.iter().enumerate() {
                        let memory = pids[index].and_then(|pid| Some((pid, Memory::of(pid)?)));
                        let memory = match memory {
                            Some(found) if alive(found.0) => Some(found),
                            _ => {
                                pids[index] = daemon_pid(spec);
                                pids[index].and_then(|pid| Some((pid, Memory::of(pid)?)))
                            }
                        };
                        if let Some((pid, memory)) = memory {
                            samples
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push(Sample {
                                    at: started.elapsed(),
                                    node: name,
                                    pid,
                                    memory,
                                });
                        }
                    }
                    std::thread::sleep(interval);
                }
            })
        };
        MemorySampler {
            started,
            stop,
            samples,
            thread: Some(thread),
        }
    }

    fn samples(&self) -> Vec<Sample> {
        self.samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The largest VmRSS of `node` sampled in [from, to] (instants), in KiB.
    fn max_rss_between(&self, node: &str, from: Instant, to: Instant) -> u64 {
        let from = from.saturating_duration_since(self.started);
        let to = to.saturating_duration_since(self.started);
        self.samples()
            .iter()
            .filter(|s| s.node == node && s.at >= from && s.at <= to)
            .map(|s| s.memory.rss_kib)
            .max()
            .unwrap_or(0)
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for MemorySampler {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Lines of a node's log that say it panicked.
fn panic_lines(node: &Node) -> Vec<String> {
    let log = fs::read_to_string(node.spec.stderr_path()).unwrap_or_default();
    log.lines()
        .filter(|line| line.contains("panicked") || line.contains("RUST_BACKTRACE"))
        .map(str::to_string)
        .collect()
}

/// Reports the panics node `id` logged since the last call (`reported` counts the lines
/// already reported); true if there were new ones.
fn new_panics(
    cluster: &Cluster,
    id: NodeId,
    what: &str,
    reported: &mut usize,
    failures: &mut Vec<String>,
) -> bool {
    let lines = panic_lines(cluster.node(id));
    if lines.len() <= *reported {
        return false;
    }
    let first: Vec<&String> = lines[*reported..].iter().take(4).collect();
    failures.push(format!(
        "{what}: node {} panicked ({} new panic lines in its log; first: {first:?})",
        id.name(),
        lines.len() - *reported
    ));
    *reported = lines.len();
    true
}

/// The lines of a node's log from byte `from` on that contain one of `words`.
fn log_lines_since(node: &Node, from: u64, words: &[&str]) -> Vec<String> {
    let mut bytes = Vec::new();
    if let Ok(mut file) = fs::File::open(node.spec.stderr_path()) {
        let _ = file.read_to_end(&mut bytes);
    }
    let from = (from as usize).min(bytes.len());
    String::from_utf8_lossy(&bytes[from..])
        .lines()
        .filter(|line| words.iter().any(|word| line.contains(word)))
        .map(str::to_string)
        .collect()
}

fn log_len(node: &Node) -> u64 {
    fs::metadata(node.spec.stderr_path())
        .map(|meta| meta.len())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// NBD clients
// ---------------------------------------------------------------------------------------------

/// One client write of a whole block (FUA) on a fresh connection; how long it took.
fn client_write(socket: &Path, offset: u64, data: &[u8]) -> Result<Duration, String> {
    let started = Instant::now();
    let mut conn = NbdConn::connect_unix(socket, VOLUME).map_err(|error| format!("{error}"))?;
    conn.write(offset, data, true)
        .map_err(|error| format!("write at {offset}: {error}"))?;
    conn.disconnect();
    Ok(started.elapsed())
}

/// One client read on a fresh connection.
fn client_read(socket: &Path, offset: u64, len: u32) -> Result<Vec<u8>, String> {
    let mut conn = NbdConn::connect_unix(socket, VOLUME).map_err(|error| format!("{error}"))?;
    let data = conn
        .read(offset, len)
        .map_err(|error| format!("read at {offset}: {error}"))?;
    conn.disconnect();
    Ok(data)
}

/// Writes every `(offset, data)` on one connection with up to `depth` requests in flight,
/// then flushes.
fn pipelined_writes(socket: &Path, writes: &[(u64, Vec<u8>)], depth: usize) -> Result<(), String> {
    let mut conn = NbdConn::connect_unix(socket, VOLUME).map_err(|error| format!("{error}"))?;
    for (batch_index, batch) in writes.chunks(depth).enumerate() {
        let stream = conn.stream();
        for (index, (offset, data)) in batch.iter().enumerate() {
            let handle = (batch_index * depth + index) as u64 + 1;
            let header =
                nbd_wire::request_bytes(0, nbd_wire::CMD_WRITE, handle, *offset, data.len() as u32);
            stream
                .write_all(&header)
                .and_then(|()| stream.write_all(data))
                .map_err(|error| format!("send write at {offset}: {error}"))?;
        }
        for _ in batch {
            let reply = nbd_wire::read_simple_reply(stream, 0)
                .map_err(|error| format!("write reply: {error}"))?;
            if reply.error != 0 {
                return Err(format!(
                    "write {} failed with errno {}",
                    reply.handle, reply.error
                ));
            }
        }
    }
    conn.flush().map_err(|error| format!("flush: {error}"))?;
    conn.disconnect();
    Ok(())
}

/// `count` distinct blocks in [first, end), seeded (concurrent writes to one block could land
/// in any order, so the expected image needs distinct ones).
fn distinct_blocks(rng: &mut StdRng, first: u64, end: u64, count: usize) -> Vec<u64> {
    let mut chosen = std::collections::BTreeSet::new();
    let mut blocks = Vec::with_capacity(count);
    while blocks.len() < count {
        let block = rng.random_range(first..end);
        if chosen.insert(block) {
            blocks.push(block);
        }
    }
    blocks
}

/// Seeded contents of one block.
fn block_data(seed: u64, tag: u64, block: u64) -> Vec<u8> {
    let mut data = vec![0u8; BLOCK_BYTES];
    let mut rng = StdRng::seed_from_u64(seed ^ tag.rotate_left(17) ^ block.wrapping_mul(0x9e37));
    rng.fill_bytes(&mut data);
    data
}

// ---------------------------------------------------------------------------------------------
// The fake peer
// ---------------------------------------------------------------------------------------------

/// One end of a volume stream, with a frame decoder.
struct Wire {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    buf: BytesMut,
}

/// What reading the stream gave.
enum Event {
    Message(Message),
    /// The real node finished its side of the stream (FIN), reset it, or the connection went.
    Ended(String),
    /// The real node sent bytes that are not a valid frame.
    Garbage(String),
    Timeout,
}

impl Event {
    fn describe(&self) -> String {
        match self {
            Event::Message(message) => format!("a {} message", message.name()),
            Event::Ended(how) => format!("the end of the stream ({how})"),
            Event::Garbage(what) => format!("a bad frame ({what})"),
            Event::Timeout => "nothing".to_string(),
        }
    }
}

impl Wire {
    async fn next(&mut self, deadline: Instant) -> Event {
        loop {
            match repl::decode(&mut self.buf) {
                Ok(Some(message)) => return Event::Message(message),
                Ok(None) => {}
                Err(error) => return Event::Garbage(error.to_string()),
            }
            let read =
                tokio::time::timeout_at(deadline.into(), self.recv.read_chunk(1 << 20, true)).await;
            match read {
                Err(_) => return Event::Timeout,
                Ok(Ok(Some(chunk))) => self.buf.extend_from_slice(&chunk.bytes),
                Ok(Ok(None)) => return Event::Ended("finished".to_string()),
                Ok(Err(error)) => return Event::Ended(error.to_string()),
            }
        }
    }

    async fn send(&mut self, messages: &[Message]) -> Result<(), String> {
        let mut out = BytesMut::new();
        for message in messages {
            repl::encode(message, &mut out)
                .map_err(|error| format!("encode {}: {error}", message.name()))?;
        }
        self.send_raw(out.freeze()).await
    }

    async fn send_raw(&mut self, bytes: Bytes) -> Result<(), String> {
        match tokio::time::timeout(SEND_TIMEOUT, self.send.write_chunk(bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(format!("stream write failed: {error}")),
            Err(_) => Err(format!("stream write blocked for {SEND_TIMEOUT:?}")),
        }
    }
}

/// A frame with a valid header and CRC around any payload (for payloads `repl::encode` would
/// refuse to produce).
fn raw_frame(type_byte: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(HEADER_BYTES + payload.len());
    out.put_u16_le(MAGIC);
    out.put_u8(VERSION);
    out.put_u8(type_byte);
    out.put_u16_le(0);
    out.put_u16_le(0);
    out.put_u32_le(payload.len() as u32);
    out.put_u32_le(0);
    out.put_slice(payload);
    let crc = crc32fast::hash(&out);
    out[12..16].copy_from_slice(&crc.to_le_bytes());
    out.freeze()
}

/// The type byte of `DirtyRanges` frames (`repl.rs`; the constants are private).
const TYPE_DIRTY_RANGES: u8 = 14;

/// Answers the real node like a healthy peer would.
#[derive(Default)]
struct Responder {
    /// Answer as a secondary (acknowledge records and resync data); else as a primary.
    secondary: bool,
    /// Highest record LSN received (as a secondary).
    lsn: u64,
    /// Resync data bytes received since the resync began (as a secondary).
    resync_bytes: u64,
    /// Highest journal LSN the real node acknowledged (as a primary).
    acked: u64,
    /// Heartbeat replies received.
    heartbeat_replies: u64,
    /// Messages received, by name.
    seen: BTreeMap<&'static str, u64>,
}

impl Responder {
    fn secondary() -> Responder {
        Responder {
            secondary: true,
            ..Responder::default()
        }
    }

    fn primary() -> Responder {
        Responder::default()
    }

    fn answer(&mut self, message: &Message) -> Vec<Message> {
        *self.seen.entry(message.name()).or_insert(0) += 1;
        let ack = |lsn: u64| Message::Ack {
            journal_lsn: lsn,
            durable_lsn: lsn,
        };
        match message {
            Message::Heartbeat { sent_at_us, seq } => vec![Message::HeartbeatReply {
                sent_at_us: *sent_at_us,
                seq: *seq,
            }],
            Message::HeartbeatReply { .. } => {
                self.heartbeat_replies += 1;
                Vec::new()
            }
            Message::Write(record) if self.secondary => {
                self.lsn = record.lsn;
                vec![ack(self.lsn)]
            }
            Message::Flush { .. } if self.secondary => vec![ack(self.lsn)],
            Message::ResyncBegin { .. } if self.secondary => {
                self.resync_bytes = 0;
                Vec::new()
            }
            Message::ResyncData { data, .. } if self.secondary => {
                self.resync_bytes += data.len() as u64;
                vec![Message::ResyncAck {
                    written_bytes: self.resync_bytes,
                }]
            }
            Message::ResyncEnd { lsn, .. } if self.secondary => {
                self.lsn = *lsn;
                vec![ack(*lsn)]
            }
            Message::Ack { journal_lsn, .. } => {
                self.acked = self.acked.max(*journal_lsn);
                Vec::new()
            }
            _ => Vec::new(),
        }
    }
}

/// Reads and answers like a healthy peer until `deadline`, or until `stop` accepts a message
/// (returned). Err when the stream ends or carries a bad frame.
async fn serve(
    wire: &mut Wire,
    responder: &mut Responder,
    deadline: Instant,
    mut stop: impl FnMut(&Message, &Responder) -> bool,
) -> Result<Option<Message>, String> {
    loop {
        match wire.next(deadline).await {
            Event::Message(message) => {
                let answers = responder.answer(&message);
                if !answers.is_empty() {
                    wire.send(&answers).await?;
                }
                if stop(&message, responder) {
                    return Ok(Some(message));
                }
            }
            Event::Timeout => return Ok(None),
            other => return Err(format!("the real node sent {}", other.describe())),
        }
    }
}

/// Serves like [`serve`] while `thread` (a client of the real node) runs; returns its result.
async fn serve_while<T>(
    wire: &mut Wire,
    responder: &mut Responder,
    thread: JoinHandle<T>,
    timeout: Duration,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    while !thread.is_finished() {
        if Instant::now() >= deadline {
            return Err(format!("the client did not finish within {timeout:?}"));
        }
        serve(
            wire,
            responder,
            Instant::now() + Duration::from_millis(20),
            |_, _| false,
        )
        .await?;
    }
    thread
        .join()
        .map_err(|_| "the client thread panicked".to_string())
}

/// After the hostile frames: reads what the real node still sends until its side of the stream
/// ends (returned; None after `timeout`), noting the refusals and goodbyes it sent.
async fn wait_end(wire: &mut Wire, timeout: Duration, notes: &mut Vec<String>) -> Option<String> {
    let deadline = Instant::now() + timeout;
    loop {
        match wire.next(deadline).await {
            Event::Message(Message::Refuse { code, reason }) => {
                notes.push(format!("refused: {} {reason}", code.as_str()))
            }
            Event::Message(Message::Goodbye { reason }) => notes.push(format!("goodbye: {reason}")),
            Event::Message(_) => {}
            Event::Ended(how) => return Some(how),
            Event::Garbage(what) => return Some(format!("bad frame: {what}")),
            Event::Timeout => return None,
        }
    }
}

/// What the fake peer claims in its hello.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HelloKind {
    /// Exactly what the real node holds (its lineage and head): in sync at once.
    Mirror,
    /// The real node's lineage, but an inconsistent copy: the primary waits for its ranges.
    Inconsistent,
    /// A copy never synced: the primary starts a full sync (after the copy's ranges).
    Empty,
    /// Another volume size.
    OtherSize,
    /// Another node's name than the certificate's (b's certificate saying "c").
    OtherNode,
    /// A head LSN just below u64::MAX.
    HeadNearMax,
    /// The real node's lineage, five records ahead: the real node (a secondary) is resynced.
    Ahead,
}

impl HelloKind {
    /// Whether the real node refuses this hello (no welcome follows).
    fn refused(self) -> bool {
        matches!(
            self,
            HelloKind::OtherSize | HelloKind::OtherNode | HelloKind::HeadNearMax
        )
    }

    /// Our hello, made from the real node's.
    fn hello(self, theirs: &Hello, me: &str, role: Role) -> Hello {
        let mut hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            node: me.to_string(),
            volume: theirs.volume.clone(),
            size_bytes: theirs.size_bytes,
            role,
            generation: theirs.generation.clone(),
            durable_lsn: theirs.generation.head_lsn,
            consistent: true,
            discarding_local: false,
        };
        match self {
            HelloKind::Mirror => {}
            HelloKind::Inconsistent => hello.consistent = false,
            HelloKind::Empty => {
                hello.generation = GenerationInfo::empty();
                hello.durable_lsn = 0;
            }
            HelloKind::OtherSize => hello.size_bytes += 4096,
            HelloKind::OtherNode => hello.node = "c".to_string(),
            HelloKind::HeadNearMax => {
                hello.generation.head_lsn = u64::MAX - 1;
                hello.durable_lsn = u64::MAX - 1;
            }
            HelloKind::Ahead => {
                hello.generation.head_lsn += 5;
                hello.durable_lsn += 5;
            }
        }
        hello
    }
}

/// The test itself as one node of the cluster, with that node's real certificate. It dials
/// the real node (whose own dials to the fake's configured address go nowhere), and opens or
/// accepts the volume stream as `transport.rs` says: the node whose name sorts first opens.
struct FakePeer {
    runtime: tokio::runtime::Runtime,
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    me: &'static str,
    target_name: &'static str,
    target: SocketAddr,
    /// The last scenario's connection, kept open until its checks are done: closing it at
    /// once would end a stream the real node may have opened again meanwhile (it reopens
    /// 200 ms after a close), and that stream's end would replace the `last_error` checked.
    kept: Mutex<Option<quinn::Connection>>,
}

impl FakePeer {
    fn new(certs: &Path, me: NodeId, target: NodeId, target_addr: SocketAddr) -> FakePeer {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime for the fake peer");
        let identity = TlsIdentity::load_files(
            &certs.join("ca.pem"),
            &certs.join(format!("{}.pem", me.name())),
            &certs.join(format!("{}.key", me.name())),
            me.name(),
        )
        .expect("load the fake peer's identity (made by ferry cert init)");
        let mut client =
            tls::client_config(&identity, target.name()).expect("client TLS config of the fake");
        let mut transport_config = quinn::TransportConfig::default();
        transport_config.keep_alive_interval(Some(Duration::from_millis(300)));
        transport_config.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(Duration::from_secs(30)).expect("idle timeout"),
        ));
        transport_config.stream_receive_window(quinn::VarInt::from_u32(FAKE_STREAM_WINDOW_BYTES));
        transport_config.receive_window(quinn::VarInt::from_u32(FAKE_CONNECTION_WINDOW_BYTES));
        transport_config.send_window(64 << 20);
        client.transport_config(Arc::new(transport_config));
        let endpoint = {
            let _guard = runtime.enter();
            quinn::Endpoint::client("127.0.0.1:0".parse().expect("address"))
                .expect("the fake peer's QUIC endpoint")
        };
        FakePeer {
            runtime,
            endpoint,
            client,
            me: me.name(),
            target_name: target.name(),
            target: target_addr,
            kept: Mutex::new(None),
        }
    }

    /// Keeps `connection` open until [`FakePeer::close_kept`].
    fn keep(&self, connection: quinn::Connection) {
        let previous = self
            .kept
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(connection);
        if let Some(previous) = previous {
            previous.close(0u32.into(), b"fake peer: scenario over");
        }
    }

    /// Closes the connection [`FakePeer::keep`] kept.
    fn close_kept(&self) {
        if let Some(connection) = self.kept.lock().unwrap_or_else(|p| p.into_inner()).take() {
            connection.close(0u32.into(), b"fake peer: scenario over");
        }
    }

    /// The fake opens the volume stream when its name sorts first (`transport.rs`).
    fn opener(&self) -> bool {
        self.me < self.target_name
    }

    /// A new connection to the real node and the volume stream on it.
    async fn open(&self) -> Result<(quinn::Connection, Wire), String> {
        let connecting = self
            .endpoint
            .connect_with(self.client.clone(), self.target, self.target_name)
            .map_err(|error| format!("connect: {error}"))?;
        let connection = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| "QUIC handshake timed out".to_string())?
            .map_err(|error| format!("QUIC handshake: {error}"))?;
        // The acceptor's welcome byte: it checked our certificate and kept the connection.
        let welcome = async {
            let mut uni = connection
                .accept_uni()
                .await
                .map_err(|error| error.to_string())?;
            let mut byte = [0u8; 1];
            uni.read_exact(&mut byte)
                .await
                .map_err(|error| error.to_string())?;
            Ok::<u8, String>(byte[0])
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, welcome).await {
            Ok(Ok(1)) => {}
            Ok(Ok(other)) => return Err(format!("welcome byte {other}")),
            Ok(Err(error)) => return Err(format!("no welcome: {error}")),
            Err(_) => return Err("no welcome in time".to_string()),
        }
        let (send, recv) = if self.opener() {
            transport::open_volume_stream(&connection, VOLUME)
                .await
                .map_err(|error| format!("open the volume stream: {error}"))?
        } else {
            let (name, send, recv) = tokio::time::timeout(
                CONNECT_TIMEOUT,
                transport::accept_volume_stream(&connection),
            )
            .await
            .map_err(|_| "the real node opened no volume stream".to_string())?
            .map_err(|error| format!("accept the volume stream: {error}"))?;
            if name != VOLUME {
                return Err(format!("a stream for volume {name}"));
            }
            (send, recv)
        };
        Ok((
            connection,
            Wire {
                send,
                recv,
                buf: BytesMut::new(),
            },
        ))
    }

    /// Reads the real node's hello and answers with ours (`kind`) and our decision; for a hello
    /// the node accepts, also waits for its welcome and checks it mirrors ours.
    async fn handshake(
        &self,
        wire: &mut Wire,
        responder: &mut Responder,
        kind: HelloKind,
        role: Role,
    ) -> Result<Hello, String> {
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        let theirs = loop {
            match wire.next(deadline).await {
                Event::Message(Message::Hello(hello)) => break hello,
                Event::Message(message) => {
                    let answers = responder.answer(&message);
                    wire.send(&answers).await?;
                }
                other => {
                    return Err(format!(
                        "waiting for the real node's hello: {}",
                        other.describe()
                    ))
                }
            }
        };
        let ours = kind.hello(&theirs, self.me, role);
        let decision = decide(&ours.generation, ours.role, &theirs.generation, theirs.role);
        wire.send(&[Message::Hello(ours), Message::Welcome { decision }])
            .await?;
        if kind.refused() {
            return Ok(theirs);
        }
        let welcome = serve(
            wire,
            responder,
            Instant::now() + HANDSHAKE_TIMEOUT,
            |m, _| matches!(m, Message::Welcome { .. }),
        )
        .await?;
        match welcome {
            Some(Message::Welcome { decision: theirs_d }) if theirs_d.mirror() == decision => {
                Ok(theirs)
            }
            Some(Message::Welcome { decision: theirs_d }) => Err(format!(
                "the real node decided {}, we decided {}",
                theirs_d.as_str(),
                decision.as_str()
            )),
            _ => Err("no welcome from the real node".to_string()),
        }
    }
}

/// What one scenario saw, for the report.
#[derive(Default)]
struct Seen {
    /// How the real node's side of the stream ended (None: it did not within the timeout).
    end: Option<String>,
    notes: Vec<String>,
}

/// One scenario's checks on the real node, after its stream closed: alive, answering, the
/// replica's `last_error` naming the fault, memory bounded, client I/O served.
struct Checked {
    last_error: String,
    rss_before_kib: u64,
    rss_peak_kib: u64,
    io: String,
}

// ---------------------------------------------------------------------------------------------
// 1. A hostile secondary against the real primary
// ---------------------------------------------------------------------------------------------

/// What the fake secondary b does to the real primary a, one per connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AtPrimary {
    HelloOtherSize,
    HelloOtherNode,
    HelloHeadNearMax,
    WriteTooLong,
    WriteMisaligned,
    AckLsnNearMax,
    AckFloodNeverSent,
    AckBeyondSent,
    DurableBeyondJournal,
    HeartbeatFlood,
    DirtyRangesPastEnd,
    DirtyRangesAbsurdlyMany,
    ResyncDataWithoutBegin,
    ResyncAckBeyondSent,
    FlushBeyondReceived,
    VerifyRequestHuge,
    HeartbeatFloodNotReading,
}

impl AtPrimary {
    const ALL: [AtPrimary; 17] = [
        AtPrimary::HelloOtherSize,
        AtPrimary::HelloOtherNode,
        AtPrimary::HelloHeadNearMax,
        AtPrimary::WriteTooLong,
        AtPrimary::WriteMisaligned,
        AtPrimary::AckLsnNearMax,
        AtPrimary::AckFloodNeverSent,
        AtPrimary::AckBeyondSent,
        AtPrimary::DurableBeyondJournal,
        AtPrimary::HeartbeatFlood,
        AtPrimary::DirtyRangesPastEnd,
        AtPrimary::DirtyRangesAbsurdlyMany,
        AtPrimary::ResyncDataWithoutBegin,
        AtPrimary::ResyncAckBeyondSent,
        AtPrimary::FlushBeyondReceived,
        AtPrimary::VerifyRequestHuge,
        // Last: if the daemon does not bound it, the memory it takes stays with the process.
        AtPrimary::HeartbeatFloodNotReading,
    ];

    fn hello(self) -> HelloKind {
        match self {
            AtPrimary::HelloOtherSize => HelloKind::OtherSize,
            AtPrimary::HelloOtherNode => HelloKind::OtherNode,
            AtPrimary::HelloHeadNearMax => HelloKind::HeadNearMax,
            AtPrimary::DirtyRangesPastEnd | AtPrimary::DirtyRangesAbsurdlyMany => {
                HelloKind::Inconsistent
            }
            AtPrimary::ResyncAckBeyondSent => HelloKind::Empty,
            _ => HelloKind::Mirror,
        }
    }

    /// What the primary's replica must say (one of these, in `last_error`). A primary takes
    /// only acks, resync acks, dirty ranges and verify replies from its secondary: anything
    /// else is "unexpected ... while shipping".
    fn expect(self) -> &'static [&'static str] {
        match self {
            AtPrimary::HelloOtherSize => &["size-mismatch"],
            AtPrimary::HelloOtherNode => &["wrong-node"],
            AtPrimary::HelloHeadNearMax => &["bad-generation"],
            AtPrimary::WriteTooLong | AtPrimary::WriteMisaligned => {
                &["unexpected write while shipping"]
            }
            AtPrimary::AckLsnNearMax | AtPrimary::AckFloodNeverSent | AtPrimary::AckBeyondSent => {
                &["ack of LSN"]
            }
            AtPrimary::DurableBeyondJournal => &["beyond journal LSN"],
            AtPrimary::HeartbeatFlood => &["unexpected heartbeat-reply while shipping"],
            AtPrimary::DirtyRangesPastEnd => &["outside the"],
            AtPrimary::DirtyRangesAbsurdlyMany => &["entries exceeds"],
            AtPrimary::ResyncDataWithoutBegin => &["unexpected resync-data while shipping"],
            AtPrimary::ResyncAckBeyondSent => &["ack of resync bytes"],
            AtPrimary::FlushBeyondReceived => &["unexpected flush while shipping"],
            AtPrimary::VerifyRequestHuge => &["unexpected verify-request while shipping"],
            // stream.rs / replication: a peer that does not read what it is sent is closed as
            // such once the writer's queue is full, rather than queued without a bound.
            AtPrimary::HeartbeatFloodNotReading => &["does not read what this node sends"],
        }
    }
}

/// Runs one scenario against the real primary on a fresh connection; `a_socket` is a's NBD
/// socket (for the writes some scenarios make while connected). Returns what the fake saw and
/// the client writes it made (offset, data).
async fn attack_primary(
    fake: &FakePeer,
    scenario: AtPrimary,
    a_socket: &Path,
    seed: u64,
) -> Result<(Seen, Vec<(u64, Vec<u8>)>), String> {
    let (connection, mut wire) = fake.open().await?;
    let mut seen = Seen::default();
    let mut writes = Vec::new();
    let result = async {
        let mut responder = Responder::secondary();
        let theirs = fake
            .handshake(&mut wire, &mut responder, scenario.hello(), Role::Secondary)
            .await?;
        let head = theirs.generation.head_lsn;
        let size = theirs.size_bytes;
        responder.lsn = head;
        match scenario {
            AtPrimary::HelloOtherSize | AtPrimary::HelloOtherNode | AtPrimary::HelloHeadNearMax => {
            }
            AtPrimary::WriteTooLong => {
                let len = 2 * RECORD_BYTES_MAX;
                wire.send(&[Message::Write(WriteRecord {
                    lsn: head + 1,
                    kind: RecordKind::Write,
                    fua: false,
                    offset_bytes: 0,
                    len_bytes: len as u32,
                    data: Bytes::from(vec![0xa5u8; len]),
                })])
                .await?;
            }
            AtPrimary::WriteMisaligned => {
                wire.send(&[Message::Write(WriteRecord {
                    lsn: head + 1,
                    kind: RecordKind::Write,
                    fua: false,
                    offset_bytes: 4096 + 100,
                    len_bytes: 1000,
                    data: Bytes::from(vec![0x5au8; 1000]),
                })])
                .await?;
            }
            AtPrimary::AckLsnNearMax => {
                wire.send(&[Message::Ack {
                    journal_lsn: u64::MAX - 1,
                    durable_lsn: u64::MAX - 1,
                }])
                .await?;
            }
            AtPrimary::AckFloodNeverSent => {
                let acks: Vec<Message> = (0..FLOOD_FRAMES)
                    .map(|i| Message::Ack {
                        journal_lsn: head + 1 + i,
                        durable_lsn: head + 1 + i,
                    })
                    .collect();
                wire.send(&acks).await?;
                seen.notes
                    .push(format!("{FLOOD_FRAMES} acks of LSNs never sent"));
            }
            AtPrimary::AckBeyondSent => {
                // Some real records first, acknowledged as a healthy secondary would.
                let socket = a_socket.to_path_buf();
                let blocks: Vec<(u64, Vec<u8>)> = (0..8u64)
                    .map(|i| {
                        let block = 2048 + (seed.wrapping_add(i) % 512);
                        (block * BLOCK_BYTES as u64, block_data(seed, 0xac, block))
                    })
                    .collect();
                let to_write = blocks.clone();
                let thread = std::thread::spawn(move || pipelined_writes(&socket, &to_write, 4));
                serve_while(&mut wire, &mut responder, thread, Duration::from_secs(30))
                    .await?
                    .map_err(|error| format!("client writes while in sync: {error}"))?;
                writes.extend(blocks);
                let sent = responder.lsn;
                seen.notes
                    .push(format!("{} records received and acked", sent - head));
                wire.send(&[Message::Ack {
                    journal_lsn: sent + 3,
                    durable_lsn: sent,
                }])
                .await?;
            }
            AtPrimary::DurableBeyondJournal => {
                wire.send(&[Message::Ack {
                    journal_lsn: head,
                    durable_lsn: head + 1,
                }])
                .await?;
            }
            AtPrimary::HeartbeatFlood => {
                let beats: Vec<Message> = (1..=FLOOD_FRAMES)
                    .map(|seq| Message::Heartbeat {
                        sent_at_us: seq,
                        seq,
                    })
                    .collect();
                wire.send(&beats).await?;
                // Every one is answered; the node's own heartbeats come too.
                let before = responder.heartbeat_replies;
                let answered = serve(
                    &mut wire,
                    &mut responder,
                    Instant::now() + Duration::from_secs(30),
                    |_, r| r.heartbeat_replies >= before + FLOOD_FRAMES,
                )
                .await?;
                seen.notes.push(format!(
                    "{} of {FLOOD_FRAMES} heartbeats answered",
                    responder.heartbeat_replies - before
                ));
                if answered.is_none() {
                    return Err("the heartbeat flood was not answered within 30 s".to_string());
                }
                // Then a reply to a heartbeat never sent.
                wire.send(&[Message::HeartbeatReply {
                    sent_at_us: 0,
                    seq: 1 << 40,
                }])
                .await?;
            }
            AtPrimary::DirtyRangesPastEnd => {
                wire.send(&[Message::DirtyRanges {
                    ranges: vec![DirtyRange {
                        offset_bytes: size - 4096,
                        len_bytes: 8192,
                    }],
                    last: true,
                }])
                .await?;
            }
            AtPrimary::DirtyRangesAbsurdlyMany => {
                // 24 full frames (1.5 million ranges, every other one the whole volume), none
                // the last, then a frame that claims a million ranges.
                let mut rng = StdRng::seed_from_u64(seed ^ 0xd1e7);
                let blocks = size / BLOCK_BYTES as u64;
                for _ in 0..24 {
                    let ranges: Vec<DirtyRange> = (0..DIRTY_RANGES_PER_FRAME_MAX)
                        .map(|i| {
                            if i % 2 == 0 {
                                DirtyRange {
                                    offset_bytes: 0,
                                    len_bytes: size,
                                }
                            } else {
                                DirtyRange {
                                    offset_bytes: rng.random_range(0..blocks) * BLOCK_BYTES as u64,
                                    len_bytes: BLOCK_BYTES as u64,
                                }
                            }
                        })
                        .collect();
                    wire.send(&[Message::DirtyRanges {
                        ranges,
                        last: false,
                    }])
                    .await?;
                }
                let mut payload = BytesMut::new();
                payload.put_u8(0);
                payload.put_u32_le(1_000_000);
                payload.put_u64_le(0);
                payload.put_u64_le(4096);
                wire.send_raw(raw_frame(TYPE_DIRTY_RANGES, &payload))
                    .await?;
                seen.notes.push(format!(
                    "{} ranges in 24 frames, then a frame claiming 1000000",
                    24 * DIRTY_RANGES_PER_FRAME_MAX
                ));
            }
            AtPrimary::ResyncDataWithoutBegin => {
                wire.send(&[Message::ResyncData {
                    offset_bytes: 0,
                    data: Bytes::from(vec![0x11u8; 4096]),
                }])
                .await?;
            }
            AtPrimary::ResyncAckBeyondSent => {
                // A never-synced copy: the primary waits for its (empty) map, then begins a
                // full sync.
                wire.send(&[Message::DirtyRanges {
                    ranges: Vec::new(),
                    last: true,
                }])
                .await?;
                let begun = serve(
                    &mut wire,
                    &mut responder,
                    Instant::now() + Duration::from_secs(10),
                    |m, _| matches!(m, Message::ResyncBegin { .. }),
                )
                .await?;
                if begun.is_none() {
                    return Err("the primary began no full sync".to_string());
                }
                wire.send(&[Message::ResyncAck {
                    written_bytes: u64::MAX / 4,
                }])
                .await?;
            }
            AtPrimary::FlushBeyondReceived => {
                wire.send(&[Message::Flush {
                    upto_lsn: head + 1000,
                }])
                .await?;
            }
            AtPrimary::VerifyRequestHuge => {
                wire.send(&[Message::VerifyRequest {
                    id: 1,
                    offset_bytes: 0,
                    len_bytes: u64::MAX - 4095,
                    block_bytes: 4096,
                    at_lsn: u64::MAX - 1,
                }])
                .await?;
            }
            AtPrimary::HeartbeatFloodNotReading => {
                // Never read again: the primary's answers pile up on its side.
                let batch = 65_536u64;
                let mut sent = 0u64;
                while sent < NOT_READING_FLOOD_FRAMES {
                    let beats: Vec<Message> = (sent + 1..=sent + batch)
                        .map(|seq| Message::Heartbeat {
                            sent_at_us: seq,
                            seq,
                        })
                        .collect();
                    if let Err(error) = wire.send(&beats).await {
                        seen.notes.push(format!(
                            "the primary stopped the flood after {sent} heartbeats: {error}"
                        ));
                        break;
                    }
                    sent += batch;
                }
                seen.notes.push(format!(
                    "{sent} heartbeats sent without reading a single answer"
                ));
                // Keep not reading for a moment, so what is queued is measured.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        Ok::<(), String>(())
    }
    .await;
    if let Err(error) = result {
        connection.close(0u32.into(), b"fake peer: scenario failed");
        return Err(error);
    }
    seen.end = wait_end(&mut wire, CLOSE_TIMEOUT, &mut seen.notes).await;
    fake.keep(connection);
    Ok((seen, writes))
}

/// Waits until node `id`'s replica towards `peer` is out of sync with a `last_error`
/// containing one of `expect`; returns the last `last_error` seen and whether it matched.
fn wait_last_error(cluster: &Cluster, id: NodeId, peer: NodeId, expect: &[&str]) -> (String, bool) {
    let deadline = Instant::now() + LAST_ERROR_TIMEOUT;
    let mut last = String::new();
    loop {
        match cluster.node(id).try_volume_status() {
            Ok(volume) => {
                if let Ok(replica) = cluster::replica_of(&volume, peer.name()) {
                    last = format!(
                        "state {}, last_error {}",
                        replica["state"], replica["last_error"]
                    );
                    let error = replica["last_error"].as_str().unwrap_or("");
                    if replica["state"] != "in-sync"
                        && expect.iter().any(|expected| error.contains(expected))
                    {
                        return (last, true);
                    }
                }
            }
            Err(error) => last = format!("status failed: {error}"),
        }
        if Instant::now() >= deadline {
            return (last, false);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The checks every scenario ends with on the real node `id`: the process runs and answers,
/// its replica towards `peer` says why the stream closed, its memory stayed within
/// `bound_mib` of `rss_before_kib` while the scenario ran (sampled), and client I/O works
/// (`io` does it). Failures go to `failures`.
#[allow(clippy::too_many_arguments)]
fn check_after(
    cluster: &Cluster,
    id: NodeId,
    peer: NodeId,
    what: &str,
    expect: &[&str],
    sampler: &MemorySampler,
    window: (Instant, u64),
    bound_mib: u64,
    io: impl FnOnce() -> Result<String, String>,
    failures: &mut Vec<String>,
) -> Checked {
    let node = cluster.node(id);
    let name = id.name();
    if daemon_pid(&node.spec).is_none() {
        failures.push(format!("{what}: node {name}'s daemon is gone"));
    }
    let (last_error, matched) = wait_last_error(cluster, id, peer, expect);
    if !matched {
        failures.push(format!(
            "{what}: node {name}'s replica of {} does not say why the stream closed (expected \
             one of {expect:?}): {last_error}",
            peer.name()
        ));
    }
    let (started, rss_before_kib) = window;
    let rss_peak_kib = sampler.max_rss_between(name, started, Instant::now()).max(
        daemon_pid(&node.spec)
            .and_then(Memory::of)
            .map_or(0, |m| m.rss_kib),
    );
    let grown_kib = rss_peak_kib.saturating_sub(rss_before_kib);
    if grown_kib > bound_mib * 1024 {
        failures.push(format!(
            "{what}: node {name}'s VmRSS grew by {:.1} MiB ({:.1} -> {:.1} MiB peak), more than \
             the {bound_mib} MiB a peer can make it hold",
            mib(grown_kib),
            mib(rss_before_kib),
            mib(rss_peak_kib)
        ));
    }
    let io = match io() {
        Ok(text) => text,
        Err(error) => {
            failures.push(format!("{what}: client I/O on node {name} failed: {error}"));
            format!("failed: {error}")
        }
    };
    Checked {
        last_error,
        rss_before_kib,
        rss_peak_kib,
        io,
    }
}

fn current_rss_kib(node: &Node) -> u64 {
    daemon_pid(&node.spec)
        .and_then(Memory::of)
        .map_or(0, |memory| memory.rss_kib)
}

/// Prints one scenario's row.
fn report_row(what: &str, took: Duration, seen: &Seen, checked: &Checked) {
    eprintln!(
        "  {what:<28} {:>6.2}s  rss {:>6.1} -> peak {:>6.1} MiB  end: {}  io: {}\n      {}{}",
        took.as_secs_f64(),
        mib(checked.rss_before_kib),
        mib(checked.rss_peak_kib),
        seen.end.as_deref().unwrap_or("(still open)"),
        checked.io,
        checked.last_error,
        if seen.notes.is_empty() {
            String::new()
        } else {
            format!("\n      {}", seen.notes.join("; "))
        }
    );
}

/// Node a (primary) against a fake b. See the module doc.
#[test]
fn metro_hostile_secondary_cannot_harm_the_primary() {
    let seed = harness::test_seed("metro_hostile_secondary_cannot_harm_the_primary");
    let mut rng = StdRng::seed_from_u64(seed ^ 0x686f_7374);
    let mut cluster = Cluster::configure(ClusterOptions::default());
    let size = cluster.volume_size_bytes();
    let blocks = size / BLOCK_BYTES as u64;
    let mut image = vec![0u8; size as usize];
    cluster.start_node(NodeId::A);
    let a_socket = cluster.nbd_socket(NodeId::A);

    // Some data before the fake peer appears.
    let writes: Vec<(u64, Vec<u8>)> = distinct_blocks(&mut rng, 0, blocks, 256)
        .into_iter()
        .map(|block| (block * BLOCK_BYTES as u64, block_data(seed, 1, block)))
        .collect();
    pipelined_writes(&a_socket, &writes, 16).expect("initial writes on a");
    for (offset, data) in &writes {
        image[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
    }

    let fake = FakePeer::new(
        &cluster.certs,
        NodeId::B,
        NodeId::A,
        cluster.listen_addr(NodeId::A),
    );
    assert!(!fake.opener(), "a sorts first and opens the stream");
    let mut sampler = MemorySampler::start(
        vec![("a", cluster.node(NodeId::A).spec.clone())],
        Duration::from_millis(50),
    );
    let mut failures = Vec::new();
    let mut panics_reported = 0;
    let rss_start_kib = current_rss_kib(cluster.node(NodeId::A));
    eprintln!(
        "a's VmRSS before the fake peer: {:.1} MiB",
        mib(rss_start_kib)
    );
    for (index, scenario) in AtPrimary::ALL.iter().enumerate() {
        let what = format!("{scenario:?}");
        let started = Instant::now();
        let rss_before = current_rss_kib(cluster.node(NodeId::A));
        let outcome = fake
            .runtime
            .block_on(attack_primary(&fake, *scenario, &a_socket, seed));
        let (seen, made) = match outcome {
            Ok(outcome) => outcome,
            Err(error) => {
                failures.push(format!("{what}: the fake peer could not play it: {error}"));
                (Seen::default(), Vec::new())
            }
        };
        for (offset, data) in made {
            image[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        }
        if seen.end.is_none() {
            failures.push(format!(
                "{what}: a did not close the stream within {CLOSE_TIMEOUT:?}"
            ));
        }
        // A client write after each scenario, recorded in the image.
        let block = rng.random_range(0..blocks);
        let data = block_data(seed, 0x1000 + index as u64, block);
        let offset = block * BLOCK_BYTES as u64;
        let checked = check_after(
            &cluster,
            NodeId::A,
            NodeId::B,
            &what,
            scenario.expect(),
            &sampler,
            (started, rss_before),
            SCENARIO_MEMORY_BOUND_MIB,
            || {
                client_write(&a_socket, offset, &data)
                    .map(|took| format!("write {:.0} ms", took.as_secs_f64() * 1000.0))
            },
            &mut failures,
        );
        if !checked.io.starts_with("failed") {
            image[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        }
        fake.close_kept();
        report_row(&what, started.elapsed(), &seen, &checked);
        new_panics(
            &cluster,
            NodeId::A,
            &what,
            &mut panics_reported,
            &mut failures,
        );
        if cluster.node(NodeId::A).try_volume_status().is_err() {
            failures.push(format!(
                "{what}: a no longer answers status; the remaining scenarios are skipped"
            ));
            break;
        }
    }
    sampler.halt();
    let a_pid = daemon_pid(&cluster.node(NodeId::A).spec).expect("a runs");
    let memory = Memory::of(a_pid).unwrap_or_default();
    eprintln!(
        "a after every scenario: VmRSS {:.1} MiB, VmHWM {:.1} MiB (started at {:.1} MiB)",
        mib(memory.rss_kib),
        mib(memory.hwm_kib),
        mib(rss_start_kib)
    );
    drop(fake);

    // The real b: a full sync, then both hold exactly what a's clients wrote.
    cluster.start_node(NodeId::B);
    let replica = cluster.wait_volume(
        NodeId::A,
        "in-sync with b with no lag",
        SYNC_TIMEOUT,
        |volume| {
            cluster::replica_of(volume, "b")
                .map(|r| r["state"] == "in-sync" && r["lag_bytes"] == 0)
                .unwrap_or(false)
        },
    );
    eprintln!("the real b is in sync: {}", replica["replicas"]);
    if let Some(difference) = compare_volume(&cluster.nbd_socket(NodeId::A), &image) {
        failures.push(format!(
            "a does not hold what its clients wrote: {difference}"
        ));
    }
    if let Some(difference) = compare_volume(&cluster.nbd_socket(NodeId::B), &image) {
        failures.push(format!(
            "b does not hold what a's clients wrote: {difference}"
        ));
    }
    new_panics(
        &cluster,
        NodeId::A,
        "at the end",
        &mut panics_reported,
        &mut failures,
    );
    cluster.stop(NodeId::A);
    cluster.stop(NodeId::B);
    assert!(
        failures.is_empty(),
        "{} failures (seed {seed}):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// 1b. A hostile primary against the real secondary
// ---------------------------------------------------------------------------------------------

/// What the fake primary a does to the real secondary b, one per connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AtSecondary {
    RecordTooLong,
    RecordMisaligned,
    RecordPastEnd,
    RecordLsnNearMax,
    RecordLsnGap,
    FlushBeyondReceived,
    ResyncDataWithoutBegin,
    ResyncBeginLsnNearMax,
    ProgressLsnNearMax,
    AckFromPrimary,
    VerifyRequestOutsideVolume,
    /// Requests for one digest over the whole volume (a 64 MiB block): each would make the
    /// secondary read and hold the volume at once.
    VerifyRequestsHugeBlocks,
    /// 64 valid verify requests at once (1 MiB blocks), more than a verifier keeps in flight.
    VerifyRequestFlood,
    /// A resync the primary owes (it claims five records more than the secondary holds), a
    /// record before it, then a resync of nothing that ends at that record's LSN: the record
    /// could never be journaled after the end (this once panicked the secondary).
    RecordBeforeResyncEnd,
    HeartbeatFlood,
    WindowFlood,
    /// Right after `WindowFlood`: the secondary's journal is likely still behind what it
    /// received (records handed to the journal, waiting for room), while its hello names the
    /// head its journal holds; the impostor mirrors it and sends the next record. The secondary
    /// must close the link as "still being journaled" (this once panicked it: the record's LSN
    /// did not follow the records in flight) or, if its journal had caught up, take it.
    ReconnectWhileJournalBehind,
    /// Then new links until one is taken (the journal caught up): a valid record is
    /// journaled and acknowledged durably, then a closing ack.
    ResumeOnceJournaled,
}

/// Where the fake primary's records land on the secondary (blocks the real a never writes in
/// this test): 40 MiB to 64 MiB.
const SCRATCH_START: u64 = 40 * MIB;

impl AtSecondary {
    const ALL: [AtSecondary; 18] = [
        AtSecondary::RecordTooLong,
        AtSecondary::RecordMisaligned,
        AtSecondary::RecordPastEnd,
        AtSecondary::RecordLsnNearMax,
        AtSecondary::RecordLsnGap,
        AtSecondary::FlushBeyondReceived,
        AtSecondary::ResyncDataWithoutBegin,
        AtSecondary::ResyncBeginLsnNearMax,
        AtSecondary::ProgressLsnNearMax,
        AtSecondary::AckFromPrimary,
        AtSecondary::VerifyRequestOutsideVolume,
        AtSecondary::HeartbeatFlood,
        AtSecondary::VerifyRequestsHugeBlocks,
        AtSecondary::VerifyRequestFlood,
        AtSecondary::RecordBeforeResyncEnd,
        // These three last and in this order (see ReconnectWhileJournalBehind).
        AtSecondary::WindowFlood,
        AtSecondary::ReconnectWhileJournalBehind,
        AtSecondary::ResumeOnceJournaled,
    ];

    /// What the impostor claims in its hello.
    fn hello(self) -> HelloKind {
        match self {
            AtSecondary::RecordBeforeResyncEnd => HelloKind::Ahead,
            _ => HelloKind::Mirror,
        }
    }

    fn expect(self) -> &'static [&'static str] {
        match self {
            AtSecondary::RecordTooLong => &["exceeds 1048576"],
            AtSecondary::RecordMisaligned => &["512-byte aligned"],
            AtSecondary::RecordPastEnd | AtSecondary::VerifyRequestOutsideVolume => {
                &["outside the"]
            }
            AtSecondary::RecordLsnNearMax
            | AtSecondary::ResyncBeginLsnNearMax
            | AtSecondary::ProgressLsnNearMax => &["is out of range"],
            AtSecondary::RecordLsnGap => &["received LSN"],
            AtSecondary::FlushBeyondReceived => &["flush up to"],
            AtSecondary::ResyncDataWithoutBegin => &["unexpected resync-data while receiving"],
            AtSecondary::AckFromPrimary | AtSecondary::ResumeOnceJournaled => {
                &["unexpected ack while receiving"]
            }
            AtSecondary::VerifyRequestsHugeBlocks => &["block larger than 1 MiB"],
            AtSecondary::VerifyRequestFlood => &["too many verify requests in flight"],
            AtSecondary::RecordBeforeResyncEnd => &["before the resync's end"],
            AtSecondary::ReconnectWhileJournalBehind => {
                &["still being journaled", "unexpected ack while receiving"]
            }
            AtSecondary::HeartbeatFlood => &["unexpected heartbeat-reply while receiving"],
            // Either the secondary's window check closes the flood, or (if its journal kept
            // up with every record) the closing ack does.
            AtSecondary::WindowFlood => &["exceeded the window", "unexpected ack while receiving"],
        }
    }

    /// How much the secondary may gain while the scenario runs, in MiB. Records inside the
    /// window are legitimate: the secondary may hold 2 × 64 MiB of them unacknowledged (the
    /// session's limit: twice the window), each also copied once into an aligned journal
    /// buffer while it waits for the journal (whose unapplied payloads are capped at 64 MiB),
    /// plus the 16 MiB stream window.
    fn memory_bound_mib(self) -> u64 {
        match self {
            AtSecondary::WindowFlood => 128 + 64 + 16 + SCENARIO_MEMORY_BOUND_MIB,
            _ => SCENARIO_MEMORY_BOUND_MIB,
        }
    }
}

/// Sends one valid record (4 KiB in the scratch area, FUA) after `*lsn` and waits for the
/// secondary's durable ack.
async fn valid_record(
    wire: &mut Wire,
    responder: &mut Responder,
    lsn: &mut u64,
    seed: u64,
) -> Result<(), String> {
    *lsn += 1;
    let block = SCRATCH_START / BLOCK_BYTES as u64 + (*lsn % 1024);
    wire.send(&[Message::Write(WriteRecord {
        lsn: *lsn,
        kind: RecordKind::Write,
        fua: true,
        offset_bytes: block * BLOCK_BYTES as u64,
        len_bytes: BLOCK_BYTES as u32,
        data: Bytes::from(block_data(seed, 0xfa4e, block)),
    })])
    .await?;
    let want = *lsn;
    let acked = serve(
        wire,
        responder,
        Instant::now() + Duration::from_secs(10),
        |m, _| matches!(m, Message::Ack { durable_lsn, .. } if *durable_lsn >= want),
    )
    .await?;
    if acked.is_none() {
        return Err(format!("record {want} was not acknowledged durably"));
    }
    Ok(())
}

/// Runs one scenario against the real secondary; `ResumeOnceJournaled` on new links until
/// the secondary takes one (30 s at most).
async fn attack_secondary(
    fake: &FakePeer,
    scenario: AtSecondary,
    seed: u64,
) -> Result<Seen, String> {
    if scenario != AtSecondary::ResumeOnceJournaled {
        return attack_secondary_once(fake, scenario, seed).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut refused = Vec::new();
    loop {
        match attack_secondary_once(fake, scenario, seed).await {
            Ok(mut seen) => {
                seen.notes.push(format!(
                    "{} links closed before one was taken{}",
                    refused.len(),
                    refused
                        .last()
                        .map(|last| format!(" (the last: {last})"))
                        .unwrap_or_default()
                ));
                return Ok(seen);
            }
            Err(error) if Instant::now() < deadline => {
                refused.push(error);
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(error) => {
                return Err(format!(
                    "no link was taken within 30 s ({} tries): {error}",
                    refused.len() + 1
                ))
            }
        }
    }
}

async fn attack_secondary_once(
    fake: &FakePeer,
    scenario: AtSecondary,
    seed: u64,
) -> Result<Seen, String> {
    let (connection, mut wire) = fake.open().await?;
    let mut seen = Seen::default();
    let result = async {
        let mut responder = Responder::primary();
        let theirs = fake
            .handshake(&mut wire, &mut responder, scenario.hello(), Role::Primary)
            .await?;
        let mut lsn = theirs.generation.head_lsn;
        let size = theirs.size_bytes;
        match scenario {
            AtSecondary::ReconnectWhileJournalBehind => {
                // The next record after the head b's hello names: b takes it (its journal
                // holds everything it received) or closes the link (records of the flood are
                // still being journaled).
                seen.notes.push(format!(
                    "b's hello names head LSN {lsn}: the impostor sends record {}",
                    lsn + 1
                ));
                match valid_record(&mut wire, &mut responder, &mut lsn, seed).await {
                    Ok(()) => seen.notes.push("b's journal had caught up: record acked".into()),
                    Err(error) => {
                        seen.notes.push(format!("b did not take it: {error}"));
                        return Ok(());
                    }
                }
            }
            AtSecondary::RecordBeforeResyncEnd => {
                // b reports its dirty ranges first, then waits for the resync.
                let reported = serve(
                    &mut wire,
                    &mut responder,
                    Instant::now() + Duration::from_secs(10),
                    |m, _| matches!(m, Message::DirtyRanges { last: true, .. }),
                )
                .await?;
                if reported.is_none() {
                    return Err("b reported no dirty ranges for the resync".into());
                }
            }
            // One valid record first: the secondary takes records from this primary.
            _ => valid_record(&mut wire, &mut responder, &mut lsn, seed).await?,
        }
        let record = |lsn: u64, offset_bytes: u64, len: usize| {
            Message::Write(WriteRecord {
                lsn,
                kind: RecordKind::Write,
                fua: false,
                offset_bytes,
                len_bytes: len as u32,
                data: Bytes::from(vec![0xe7u8; len]),
            })
        };
        match scenario {
            AtSecondary::RecordTooLong => {
                wire.send(&[record(lsn + 1, SCRATCH_START, 2 * RECORD_BYTES_MAX)])
                    .await?
            }
            AtSecondary::RecordMisaligned => {
                wire.send(&[record(lsn + 1, SCRATCH_START + 100, 1000)])
                    .await?
            }
            AtSecondary::RecordPastEnd => {
                wire.send(&[record(lsn + 1, size - 4096, 8192)]).await?
            }
            AtSecondary::RecordLsnNearMax => {
                wire.send(&[record(u64::MAX - 1, SCRATCH_START, 4096)])
                    .await?
            }
            AtSecondary::RecordLsnGap => {
                wire.send(&[record(lsn + 1000, SCRATCH_START, 4096)])
                    .await?
            }
            AtSecondary::FlushBeyondReceived => {
                wire.send(&[Message::Flush {
                    upto_lsn: lsn + 1000,
                }])
                .await?
            }
            AtSecondary::ResyncDataWithoutBegin => {
                wire.send(&[Message::ResyncData {
                    offset_bytes: SCRATCH_START,
                    data: Bytes::from(vec![0x22u8; 4096]),
                }])
                .await?
            }
            AtSecondary::ResyncBeginLsnNearMax => {
                wire.send(&[Message::ResyncBegin {
                    kind: ResyncKind::Delta,
                    total_bytes: u64::MAX - 1,
                    target_lsn: u64::MAX - 1,
                }])
                .await?
            }
            AtSecondary::ProgressLsnNearMax => {
                wire.send(&[Message::Progress {
                    durable_lsn: u64::MAX - 1,
                    peers: Vec::new(),
                }])
                .await?
            }
            AtSecondary::AckFromPrimary => {
                wire.send(&[Message::Ack {
                    journal_lsn: lsn,
                    durable_lsn: lsn,
                }])
                .await?
            }
            AtSecondary::VerifyRequestOutsideVolume => {
                wire.send(&[Message::VerifyRequest {
                    id: 7,
                    offset_bytes: 0,
                    len_bytes: !4095u64,
                    block_bytes: 1 << 30,
                    at_lsn: lsn,
                }])
                .await?
            }
            AtSecondary::VerifyRequestsHugeBlocks => {
                // Each inside the volume, one digest over the whole volume: 8 of them, 56
                // bytes each, would make the secondary read the whole volume 8 times at once.
                let requests: Vec<Message> = (1..=8u64)
                    .map(|id| Message::VerifyRequest {
                        id,
                        offset_bytes: 0,
                        len_bytes: size,
                        block_bytes: size,
                        at_lsn: lsn,
                    })
                    .collect();
                wire.send(&requests).await?
            }
            AtSecondary::VerifyRequestFlood => {
                let requests: Vec<Message> = (1..=64u64)
                    .map(|id| Message::VerifyRequest {
                        id,
                        offset_bytes: 0,
                        len_bytes: size,
                        block_bytes: MIB,
                        at_lsn: lsn,
                    })
                    .collect();
                wire.send(&requests).await?
            }
            AtSecondary::RecordBeforeResyncEnd => {
                let mut lineage = theirs.generation.clone();
                lineage.head_lsn = lsn + 1;
                wire.send(&[
                    record(lsn + 1, SCRATCH_START, 4096),
                    Message::ResyncBegin {
                        kind: ResyncKind::Delta,
                        total_bytes: 0,
                        target_lsn: lsn + 1,
                    },
                    Message::ResyncEnd {
                        lsn: lsn + 1,
                        lineage,
                    },
                ])
                .await?
            }
            AtSecondary::ReconnectWhileJournalBehind | AtSecondary::ResumeOnceJournaled => {
                wire.send(&[Message::Ack {
                    journal_lsn: lsn,
                    durable_lsn: lsn,
                }])
                .await?
            }
            AtSecondary::HeartbeatFlood => {
                let beats: Vec<Message> = (1..=FLOOD_FRAMES)
                    .map(|seq| Message::Heartbeat {
                        sent_at_us: seq,
                        seq,
                    })
                    .collect();
                wire.send(&beats).await?;
                let before = responder.heartbeat_replies;
                let answered = serve(
                    &mut wire,
                    &mut responder,
                    Instant::now() + Duration::from_secs(30),
                    |_, r| r.heartbeat_replies >= before + FLOOD_FRAMES,
                )
                .await?;
                seen.notes.push(format!(
                    "{} of {FLOOD_FRAMES} heartbeats answered",
                    responder.heartbeat_replies - before
                ));
                if answered.is_none() {
                    return Err("the heartbeat flood was not answered within 30 s".to_string());
                }
                wire.send(&[Message::HeartbeatReply {
                    sent_at_us: 0,
                    seq: 1 << 40,
                }])
                .await?
            }
            AtSecondary::WindowFlood => {
                // 256 records of 1 MiB, consecutive and valid, without waiting for acks:
                // four times the window.
                let count = 256u64;
                let mut sent = 0u64;
                for i in 0..count {
                    let offset = SCRATCH_START + (i % 16) * MIB;
                    if let Err(error) = wire
                        .send(&[record(lsn + 1 + i, offset, RECORD_BYTES_MAX)])
                        .await
                    {
                        seen.notes
                            .push(format!("the secondary stopped the flood after {sent}: {error}"));
                        break;
                    }
                    sent += 1;
                }
                seen.notes.push(format!(
                    "{sent} records of 1 MiB (LSN {} to {}) sent unacknowledged",
                    lsn + 1,
                    lsn + sent
                ));
                if sent == count {
                    // The secondary kept up: wait for its acks, then close with a hostile
                    // frame. If it closed on its own meanwhile, `serve` says so.
                    let last = lsn + count;
                    match serve(
                        &mut wire,
                        &mut responder,
                        Instant::now() + Duration::from_secs(30),
                        |m, _| matches!(m, Message::Ack { journal_lsn, .. } if *journal_lsn >= last),
                    )
                    .await
                    {
                        Ok(_) => {
                            wire.send(&[Message::Ack {
                                journal_lsn: last,
                                durable_lsn: last,
                            }])
                            .await?
                        }
                        Err(error) => seen.notes.push(error),
                    }
                }
            }
        }
        Ok::<(), String>(())
    }
    .await;
    if let Err(error) = result {
        connection.close(0u32.into(), b"fake peer: scenario failed");
        return Err(error);
    }
    seen.end = wait_end(&mut wire, CLOSE_TIMEOUT, &mut seen.notes).await;
    fake.keep(connection);
    Ok(seen)
}

/// Node b (secondary, synced by the real a) against a fake a. See the module doc.
#[test]
fn metro_hostile_primary_cannot_harm_the_secondary() {
    let seed = harness::test_seed("metro_hostile_primary_cannot_harm_the_secondary");
    let mut rng = StdRng::seed_from_u64(seed ^ 0x7365_636f);
    let mut cluster = Cluster::start(ClusterOptions::default());
    cluster.wait_replica_state(NodeId::A, "in-sync", SYNC_TIMEOUT);
    let size = cluster.volume_size_bytes();
    let mut image = vec![0u8; size as usize];
    let a_socket = cluster.nbd_socket(NodeId::A);
    let b_socket = cluster.nbd_socket(NodeId::B);
    // Data below the scratch area only: the impostor writes there.
    let writes: Vec<(u64, Vec<u8>)> =
        distinct_blocks(&mut rng, 0, SCRATCH_START / BLOCK_BYTES as u64, 256)
            .into_iter()
            .map(|block| (block * BLOCK_BYTES as u64, block_data(seed, 1, block)))
            .collect();
    pipelined_writes(&a_socket, &writes, 16).expect("writes on a");
    for (offset, data) in &writes {
        image[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
    }
    cluster.wait_volume(NodeId::A, "in-sync with no lag", RESYNC_TIMEOUT, |volume| {
        cluster::replica_of(volume, "b")
            .map(|r| r["state"] == "in-sync" && r["lag_bytes"] == 0)
            .unwrap_or(false)
    });
    cluster.stop(NodeId::A);
    cluster.wait_replica_state(NodeId::B, "connecting", Duration::from_secs(10));

    let fake = FakePeer::new(
        &cluster.certs,
        NodeId::A,
        NodeId::B,
        cluster.listen_addr(NodeId::B),
    );
    assert!(fake.opener(), "a sorts first and opens the stream");
    let mut sampler = MemorySampler::start(
        vec![("b", cluster.node(NodeId::B).spec.clone())],
        Duration::from_millis(50),
    );
    let mut failures = Vec::new();
    let mut panics_reported = 0;
    let mut broken = false;
    let rss_start_kib = current_rss_kib(cluster.node(NodeId::B));
    eprintln!(
        "b's VmRSS before the fake primary: {:.1} MiB",
        mib(rss_start_kib)
    );
    let probe_block = writes[0].0;
    for scenario in AtSecondary::ALL {
        let what = format!("{scenario:?}");
        let started = Instant::now();
        let rss_before = current_rss_kib(cluster.node(NodeId::B));
        let seen = match fake
            .runtime
            .block_on(attack_secondary(&fake, scenario, seed))
        {
            Ok(seen) => seen,
            Err(error) => {
                failures.push(format!("{what}: the fake peer could not play it: {error}"));
                Seen::default()
            }
        };
        if seen.end.is_none() {
            failures.push(format!(
                "{what}: b did not close the stream within {CLOSE_TIMEOUT:?}"
            ));
        }
        let expected = image[probe_block as usize..probe_block as usize + BLOCK_BYTES].to_vec();
        let checked = check_after(
            &cluster,
            NodeId::B,
            NodeId::A,
            &what,
            scenario.expect(),
            &sampler,
            (started, rss_before),
            scenario.memory_bound_mib(),
            || {
                let data = client_read(&b_socket, probe_block, BLOCK_BYTES as u32)?;
                if data != expected {
                    return Err("a read on b returned other data than a wrote".to_string());
                }
                Ok("read ok".to_string())
            },
            &mut failures,
        );
        fake.close_kept();
        report_row(&what, started.elapsed(), &seen, &checked);
        let panicked = new_panics(
            &cluster,
            NodeId::B,
            &what,
            &mut panics_reported,
            &mut failures,
        );
        if panicked || cluster.node(NodeId::B).try_volume_status().is_err() {
            broken = true;
            failures.push(format!(
                "{what}: b is broken (panicked or no status); the remaining scenarios are \
                 skipped, b is killed and restarted to check that the copies still converge"
            ));
            break;
        }
    }
    sampler.halt();
    let b_pid = daemon_pid(&cluster.node(NodeId::B).spec).expect("b runs");
    let memory = Memory::of(b_pid).unwrap_or_default();
    eprintln!(
        "b after every scenario: VmRSS {:.1} MiB, VmHWM {:.1} MiB (started at {:.1} MiB)",
        mib(memory.rss_kib),
        mib(memory.hwm_kib),
        mib(rss_start_kib)
    );
    drop(fake);
    if broken {
        cluster.kill9(NodeId::B);
        cluster.restart(NodeId::B);
    }
    if cluster.role(NodeId::B) != "secondary" {
        failures.push(format!(
            "the impostor changed b's role: {}",
            cluster.volume_status(NodeId::B)
        ));
    }

    // The real a returns: b must give back what the impostor wrote (a delta resync from a).
    cluster.restart(NodeId::A);
    let replica = cluster.wait_volume(
        NodeId::A,
        "in-sync with b with no lag",
        RESYNC_TIMEOUT,
        |v| {
            cluster::replica_of(v, "b")
                .map(|r| r["state"] == "in-sync" && r["lag_bytes"] == 0)
                .unwrap_or(false)
        },
    );
    eprintln!("the real a is back and in sync: {}", replica["replicas"]);
    if let Some(difference) = compare_volume(&a_socket, &image) {
        failures.push(format!(
            "a does not hold what its clients wrote: {difference}"
        ));
    }
    // b's export is read-only but readable: read as is.
    if let Some(difference) = compare_volume(&b_socket, &image) {
        failures.push(format!(
            "b does not hold what a's clients wrote after the real a came back: {difference}"
        ));
    }
    if !broken {
        new_panics(
            &cluster,
            NodeId::B,
            "at the end",
            &mut panics_reported,
            &mut failures,
        );
    }
    cluster.stop(NodeId::A);
    cluster.stop(NodeId::B);
    assert!(
        failures.is_empty(),
        "{} failures (seed {seed}):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// 2. A slow secondary device during a resync
// ---------------------------------------------------------------------------------------------

/// The delay of every write to b's backing device while it is resynced.
#[cfg(feature = "fault-injection")]
const DEVICE_WRITE_DELAY: Duration = Duration::from_micros(2000);

/// The resync's chunks: maximal runs of consecutive blocks, cut at 1 MiB (the sender's chunk,
/// `RESYNC_CHUNK_BYTES`).
#[cfg(feature = "fault-injection")]
fn resync_chunks(blocks: &[u64]) -> u64 {
    let per_chunk = (MIB / BLOCK_BYTES as u64) as usize;
    let mut sorted = blocks.to_vec();
    sorted.sort_unstable();
    let mut chunks = 0u64;
    let mut run = 0usize;
    for (index, block) in sorted.iter().enumerate() {
        if index > 0 && sorted[index - 1] + 1 == *block && run < per_chunk {
            run += 1;
        } else {
            chunks += 1;
            run = 1;
        }
    }
    chunks
}

/// Reads both nodes' volumes side by side, 4 MiB at a time, from block `first` on: each
/// block must be the same on both and equal `expected(block)`. Returns the first problem.
#[cfg(feature = "fault-injection")]
fn compare_streaming(
    a: &Path,
    b: &Path,
    first: u64,
    blocks: u64,
    expected: impl Fn(u64) -> Vec<u8>,
) -> Option<String> {
    const STEP_BLOCKS: u64 = 1024;
    let connect = |socket: &Path| NbdConn::connect_unix(socket, VOLUME);
    let (mut conn_a, mut conn_b) = match (connect(a), connect(b)) {
        (Ok(conn_a), Ok(conn_b)) => (conn_a, conn_b),
        (Err(error), _) | (_, Err(error)) => return Some(format!("connect to read back: {error}")),
    };
    let mut block = first;
    while block < blocks {
        let count = STEP_BLOCKS.min(blocks - block);
        let offset = block * BLOCK_BYTES as u64;
        let len = (count as usize * BLOCK_BYTES) as u32;
        let (data_a, data_b) = match (conn_a.read(offset, len), conn_b.read(offset, len)) {
            (Ok(data_a), Ok(data_b)) => (data_a, data_b),
            (Err(error), _) | (_, Err(error)) => return Some(format!("read at {offset}: {error}")),
        };
        for index in 0..count {
            let range = index as usize * BLOCK_BYTES..(index as usize + 1) * BLOCK_BYTES;
            let want = expected(block + index);
            if data_a[range.clone()] != want[..] {
                return Some(format!(
                    "a's block {} is not what a's client wrote",
                    block + index
                ));
            }
            if data_b[range.clone()] != data_a[range] {
                return Some(format!("block {} differs between a and b", block + index));
            }
        }
        block += count;
    }
    conn_a.disconnect();
    conn_b.disconnect();
    None
}

#[cfg(feature = "fault-injection")]
#[test]
fn metro_slow_secondary_device_resync_stays_bounded() {
    use crate::metro::{Workload, WorkloadSpec};

    let seed = harness::test_seed("metro_slow_secondary_device_resync_stays_bounded");
    let mut rng = StdRng::seed_from_u64(seed ^ 0x736c_6f77);
    // The delta: 48 MiB of distinct 4 KiB blocks. That is less than the windows below, so
    // FERRY_LONG=1 also runs 320 MiB, more than twice them, where the bound is well under the
    // delta.
    let long = harness::long_mode();
    let (delta_mib, volume_mib) = if long { (320u64, 768u64) } else { (48, 128) };
    let options = ClusterOptions {
        size: format!("{volume_mib}MiB"),
        journal_size: "32MiB".to_string(),
        ..ClusterOptions::default()
    };
    let mut cluster = Cluster::start(options);
    cluster.wait_replica_state(NodeId::A, "in-sync", SYNC_TIMEOUT);
    let volume_blocks = cluster.volume_size_bytes() / BLOCK_BYTES as u64;
    let a_socket = cluster.nbd_socket(NodeId::A);
    let b_socket = cluster.nbd_socket(NodeId::B);
    // The client workload during the resync writes blocks [0, WORKLOAD_BLOCKS) (checked
    // against its model); the delta goes elsewhere.
    const WORKLOAD_BLOCKS: u64 = 1024;
    let delta_blocks = (delta_mib * MIB / BLOCK_BYTES as u64) as usize;

    let base_b_kib = current_rss_kib(cluster.node(NodeId::B));
    let kill = rng.random_bool(0.5);
    if kill {
        cluster.kill9(NodeId::B);
    } else {
        cluster.stop(NodeId::B);
    }
    cluster.wait_replica_state(
        NodeId::A,
        "degraded",
        cluster.peer_timeout() + Duration::from_secs(10),
    );

    // Distinct blocks, seeded, written in seeded order by four pipelined clients.
    let mut candidates: Vec<u64> = (WORKLOAD_BLOCKS..volume_blocks).collect();
    for index in 0..delta_blocks {
        let other = rng.random_range(index..candidates.len());
        candidates.swap(index, other);
    }
    let delta: Vec<u64> = candidates[..delta_blocks].to_vec();
    let in_delta: std::collections::HashSet<u64> = delta.iter().copied().collect();
    let written = Instant::now();
    let threads: Vec<_> = delta
        .chunks(delta.len().div_ceil(4))
        .map(|part| {
            let part = part.to_vec();
            let socket = a_socket.clone();
            std::thread::spawn(move || {
                for blocks in part.chunks(4096) {
                    let writes: Vec<(u64, Vec<u8>)> = blocks
                        .iter()
                        .map(|block| {
                            (
                                block * BLOCK_BYTES as u64,
                                block_data(seed, 0xde17a, *block),
                            )
                        })
                        .collect();
                    pipelined_writes(&socket, &writes, 16)?;
                }
                Ok::<(), String>(())
            })
        })
        .collect();
    for thread in threads {
        thread
            .join()
            .expect("writer thread")
            .expect("delta writes on a");
    }
    let chunks = resync_chunks(&delta);
    eprintln!(
        "b {}; delta of {} blocks ({delta_mib} MiB) written on a in {:?}: {chunks} resync chunks",
        if kill { "killed -9" } else { "stopped" },
        delta.len(),
        written.elapsed()
    );
    // If b's device took the writes one at a time, the resync would take chunks × delay; it
    // takes them side by side, so that is an upper bound. Plus 30 s for everything else on a
    // loaded two-core machine (reads on a, the handshake, the hand-over, the journal).
    let resync_bound = DEVICE_WRITE_DELAY * chunks as u32 + Duration::from_secs(30);

    let base_a_kib = current_rss_kib(cluster.node(NodeId::A));
    let a_log_from = log_len(cluster.node(NodeId::A));
    let b_log_from = log_len(cluster.node(NodeId::B));
    let mut sampler = MemorySampler::start(
        vec![
            ("a", cluster.node(NodeId::A).spec.clone()),
            ("b", cluster.node(NodeId::B).spec.clone()),
        ],
        Duration::from_millis(100),
    );
    let monitor_a = cluster.monitor(NodeId::A);
    let baseline = crate::metro::read_region(&a_socket, WORKLOAD_BLOCKS);
    let spec = WorkloadSpec::once(seed, 2, WORKLOAD_BLOCKS);
    let load = Workload::start(&a_socket, spec);
    cluster.node_mut(NodeId::B).spec.env = vec![(
        "FERRY_FAULT_DEVICE_WRITE_DELAY_US".to_string(),
        DEVICE_WRITE_DELAY.as_micros().to_string(),
    )];
    let restarted = Instant::now();
    cluster.restart(NodeId::B);
    let monitor_b = cluster.monitor(NodeId::B);
    // The premise: the restarted b runs with the delay (the switch itself is tested in
    // `power_loss`).
    let want = format!(
        "FERRY_FAULT_DEVICE_WRITE_DELAY_US={}",
        DEVICE_WRITE_DELAY.as_micros()
    );
    let b_env = daemon_pid(&cluster.node(NodeId::B).spec)
        .and_then(|pid| fs::read(format!("/proc/{pid}/environ")).ok())
        .unwrap_or_default();
    assert!(
        b_env
            .split(|byte| *byte == 0)
            .any(|var| var == want.as_bytes()),
        "the restarted b does not run with {want}"
    );

    // Until a reports b in sync (the resync's end), client writes must keep completing.
    let mut failures = Vec::new();
    let mut stalls = 0;
    let resynced_after = loop {
        let status = cluster.node(NodeId::A).try_volume_status();
        if let Ok(volume) = &status {
            if cluster::replica_of(volume, "b")
                .map(|r| r["state"] == "in-sync")
                .unwrap_or(false)
            {
                break Some(restarted.elapsed());
            }
        }
        if restarted.elapsed() > resync_bound {
            failures.push(format!(
                "b not in sync within {resync_bound:?} ({chunks} chunks × \
                 {DEVICE_WRITE_DELAY:?} + 30 s): {}",
                status
                    .map(|v| v["replicas"].to_string())
                    .unwrap_or_else(|e| e)
            ));
            break None;
        }
        if !load.wait_progress(1, Duration::from_secs(10)) {
            stalls += 1;
            if stalls == 1 {
                failures.push(format!(
                    "client writes on a stalled during the resync (10 s without a completion, \
                     {:?} after b restarted); errors {:?}",
                    restarted.elapsed(),
                    load.errors()
                ));
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let completed_during = load.completed();
    // A little more load in sync, then nothing left to send.
    load.wait_progress(20, Duration::from_secs(10));
    let outcome = load.finish();
    if !outcome.errors.is_empty() {
        failures.push(format!("client write errors: {:?}", outcome.errors));
    }
    let settled = cluster.poll_volume(NodeId::A, RESYNC_TIMEOUT, |volume| {
        cluster::replica_of(volume, "b")
            .map(|r| r["state"] == "in-sync" && r["lag_bytes"] == 0)
            .unwrap_or(false)
    });
    let lag_zero_after = restarted.elapsed();
    if let Err(last) = settled {
        failures.push(format!(
            "b not in sync with lag 0 after the client writes stopped: {last}"
        ));
    }
    let states_a = monitor_a.stop();
    let states_b = monitor_b.stop();
    sampler.halt();

    // Memory. b's bound: the sender has at most its window of resync data sent and not
    // acknowledged (64 MiB), and b acknowledges bytes only once they are on its device, so all
    // resync data b holds (in QUIC's receive buffer, the reader's buffer, the backlog, device
    // writes in flight) is inside that window, and inside the delta (nothing else is sent).
    // b issues device writes for at most 64 MiB at once (DEVICE_BYTES_IN_FLIGHT_MAX), each with
    // one aligned copy of its data while it is in flight. So: min(delta, 64 MiB) of frames plus
    // as much again of copies, plus 32 MiB for the rest (the blocking pool's threads that sleep
    // the delay, up to 512 with a stack each; the journal's buffers for the client writes that
    // follow the resync; the allocator). With the 48 MiB delta that is not below the delta
    // itself (the windows allow the whole delta in flight); with FERRY_LONG=1 (320 MiB) it is
    // half of it.
    let delta_in_flight_mib = delta_mib.min(64);
    let b_bound_mib = 2 * delta_in_flight_mib + 32;
    // a's bound: the same window of resync data held by QUIC until b acknowledges it, at most
    // 8 resync reads of 1 MiB in flight (RESYNC_READS_MAX), and 32 MiB for the rest.
    let a_bound_mib = 64 + 8 + 32;
    let samples = sampler.samples();
    let peak = |node: &str| {
        samples
            .iter()
            .filter(|s| s.node == node)
            .map(|s| s.memory.rss_kib)
            .max()
            .unwrap_or(0)
    };
    let hwm = |node: &str| {
        samples
            .iter()
            .filter(|s| s.node == node)
            .map(|s| s.memory.hwm_kib)
            .max()
            .unwrap_or(0)
    };
    let b_pids: std::collections::BTreeSet<u32> = samples
        .iter()
        .filter(|s| s.node == "b")
        .map(|s| s.pid)
        .collect();
    eprintln!(
        "memory: a base {:.1} MiB, peak VmRSS {:.1} MiB, VmHWM {:.1} MiB (bound base + \
         {a_bound_mib} MiB); b base (in sync, before the stop) {:.1} MiB, peak VmRSS {:.1} MiB, \
         VmHWM {:.1} MiB (bound base + {b_bound_mib} MiB); {} samples every 100 ms, b pids \
         {b_pids:?}",
        mib(base_a_kib),
        mib(peak("a")),
        mib(hwm("a")),
        mib(base_b_kib),
        mib(peak("b")),
        mib(hwm("b")),
        samples.len()
    );
    if peak("a").saturating_sub(base_a_kib) > a_bound_mib * 1024 {
        failures.push(format!(
            "a's VmRSS grew by {:.1} MiB during the resync (bound {a_bound_mib} MiB)",
            mib(peak("a") - base_a_kib)
        ));
    }
    // VmHWM of the restarted b: its peak over its whole run, sampled or not.
    if hwm("b").saturating_sub(base_b_kib) > b_bound_mib * 1024 {
        failures.push(format!(
            "b's VmHWM is {:.1} MiB over its in-sync base during the resync (bound \
             {b_bound_mib} MiB)",
            mib(hwm("b") - base_b_kib)
        ));
    }

    // No stream reset by a timeout: a's replica goes from degraded through resyncing to
    // in-sync and never back; neither log says a peer or the connection timed out.
    eprintln!(
        "resync: in sync {resynced_after:?} after b restarted (bound {resync_bound:?}), lag 0 \
         after {lag_zero_after:?}; {completed_during} client writes completed meanwhile; a's \
         replica: {}; b's replica: {}",
        cluster::format_states(&states_a),
        cluster::format_states(&states_b)
    );
    let after_resync_began: Vec<&str> = states_a
        .iter()
        .map(|(_, state)| state.as_str())
        .skip_while(|state| *state != "resyncing")
        .collect();
    if after_resync_began.is_empty() {
        // Too fast to be sampled is fine; never leaving degraded is not.
        if states_a.last().map(|(_, s)| s.as_str()) != Some("in-sync") {
            failures.push(format!(
                "a's replica never resynced: {}",
                cluster::format_states(&states_a)
            ));
        }
    } else if after_resync_began
        .iter()
        .any(|state| *state != "resyncing" && *state != "in-sync")
    {
        failures.push(format!(
            "a's replica left the resync for another state: {}",
            cluster::format_states(&states_a)
        ));
    }
    let words = ["timed out", "peer timeout", "panicked"];
    for (id, from) in [(NodeId::A, a_log_from), (NodeId::B, b_log_from)] {
        let lines = log_lines_since(cluster.node(id), from, &words);
        if !lines.is_empty() {
            failures.push(format!(
                "node {}'s log during the resync: {}",
                id.name(),
                lines.join("\n")
            ));
        }
    }

    // Data: the workload's region on a against its model; then every other block on a is what
    // its client wrote (the delta, zeros elsewhere) and b holds exactly the same, everywhere.
    let region_a = crate::metro::check_node(
        &cluster,
        NodeId::A,
        &baseline,
        &outcome,
        "a after the slow resync",
        &cluster::format_states(&states_a),
    );
    let region_b = crate::metro::read_region(&b_socket, WORKLOAD_BLOCKS);
    if let Some(at) = first_difference(&region_a, &region_b) {
        failures.push(format!(
            "a and b differ in the workload's region after the resync, first at byte {at}"
        ));
    }
    let zeros = vec![0u8; BLOCK_BYTES];
    if let Some(problem) = compare_streaming(
        &a_socket,
        &b_socket,
        WORKLOAD_BLOCKS,
        volume_blocks,
        |block| {
            if in_delta.contains(&block) {
                block_data(seed, 0xde17a, block)
            } else {
                zeros.clone()
            }
        },
    ) {
        failures.push(format!("after the slow resync: {problem}"));
    }
    cluster.stop(NodeId::A);
    cluster.stop(NodeId::B);
    assert!(
        failures.is_empty(),
        "{} failures (seed {seed}):\n{}",
        failures.len(),
        failures.join("\n")
    );
}
