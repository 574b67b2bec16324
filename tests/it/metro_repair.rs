//! The operator's repair commands on two real `ferry run` processes (SPEC §3, §5, §6):
//!
//! - `ferry resolve VOLUME --discard-local`: after a split brain (link cut, writes on a,
//!   `promote --force` on b, writes on b, link restored), the loser b throws away its writes
//!   since the split and is resynced from a by the blocks either side changed (a delta); the
//!   refusals (no split brain, usage error) and running it again.
//! - `ferry verify VOLUME [--repair]`: no false difference after writes, WRITE_ZEROES and TRIM
//!   (also 512-byte aligned ones inside a 4 KiB block) nor under a light write load; blocks
//!   flipped in the secondary's backing file behind Ferry's back are reported exactly and
//!   repaired, with `ferry status --json` and `/metrics` showing the last verify; a verify
//!   under a light load must still compare the ranges the load never writes; a verify whose
//!   link is lost between its two passes is not a clean result; a difference is logged once
//!   and counted in `ferry_checksum_errors_total{where="verify"}`; a volume whose size is not
//!   a multiple of the 1 MiB first-pass block is compared to its last byte.
//!
//! Every test prints its seed (FERRY_SEED replays it): the blocks, the contents and the
//! operations are drawn from it. Data is checked against a byte model of what was written
//! (single connection, sequential operations, so the expected contents are exact).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, RngExt, SeedableRng};
use serde_json::{json, Value};

use crate::cluster::{
    self, format_states, Cluster, ClusterOptions, Node, NodeId,
    NodeId::{A, B},
    VOLUME,
};
use crate::harness::{self, Output};
use crate::metro::{
    block_contents, describe_block, first_difference, read_region, start_in_sync,
    wait_state_logged, DEGRADE_SLACK, MIB, RESYNC_TIMEOUT, ROLE_TIMEOUT,
};
use crate::model::BLOCK_BYTES;
use crate::nbd_wire::NbdConn;

const BLOCK: u64 = BLOCK_BYTES as u64;
/// NBD's minimum block size: the granularity of the sub-block operations.
const SECTOR: u64 = 512;
/// After the link is restored, how long both nodes may take to report `split-brain`.
const SPLIT_BRAIN_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a's replica may take to be in sync with no lag after a resync was started.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one `ferry verify` may take on the 64 MiB volume (it reads at 256 MiB/s by
/// default; the machine is small and shared).
const VERIFY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the writes of one phase may take in all.
const PHASE_TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// Operations and their byte model
// ---------------------------------------------------------------------------------------------

/// One client operation, sent on one NBD connection in order.
#[derive(Clone, Debug)]
enum IoOp {
    Write { offset: u64, data: Vec<u8> },
    Zeroes { offset: u64, len: u64 },
    Trim { offset: u64, len: u64 },
}

impl IoOp {
    fn range(&self) -> (u64, u64) {
        match self {
            IoOp::Write { offset, data } => (*offset, data.len() as u64),
            IoOp::Zeroes { offset, len } | IoOp::Trim { offset, len } => (*offset, *len),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            IoOp::Write { .. } => "WRITE",
            IoOp::Zeroes { .. } => "WRITE_ZEROES",
            IoOp::Trim { .. } => "TRIM",
        }
    }

    /// Sends it (FUA on writes when `fua`).
    fn send(&self, conn: &mut NbdConn, fua: bool) -> Result<(), String> {
        let (offset, len) = self.range();
        let result = match self {
            IoOp::Write { offset, data } => conn.write(*offset, data, fua),
            IoOp::Zeroes { offset, len } => conn.write_zeroes(*offset, u32_of(*len)),
            IoOp::Trim { offset, len } => conn.trim(*offset, u32_of(*len)),
        };
        result.map_err(|error| format!("{} {offset}+{len}: {error}", self.name()))
    }

    /// What it does to `image` (bytes [0, image.len()) of the volume). TRIM reads back as
    /// zeros (SPEC §2).
    fn apply(&self, image: &mut [u8]) {
        let (offset, len) = self.range();
        let range = usize_of(offset)..usize_of(offset + len);
        match self {
            IoOp::Write { data, .. } => image[range].copy_from_slice(data),
            IoOp::Zeroes { .. } | IoOp::Trim { .. } => image[range].fill(0),
        }
    }

    /// The 4 KiB blocks it touches.
    fn blocks(&self) -> std::ops::Range<u64> {
        let (offset, len) = self.range();
        offset / BLOCK..(offset + len).div_ceil(BLOCK)
    }
}

/// Sends `ops` in order on one connection to `socket` (every write with FUA), then a FLUSH;
/// all must complete within [`PHASE_TIMEOUT`].
fn send_ops(socket: &Path, ops: &[IoOp], what: &str) {
    let started = Instant::now();
    let mut conn = NbdConn::connect_unix(socket, VOLUME)
        .unwrap_or_else(|error| panic!("{what}: connect {}: {error}", socket.display()));
    for (i, op) in ops.iter().enumerate() {
        op.send(&mut conn, true).unwrap_or_else(|error| {
            panic!(
                "{what}: operation {i} failed after {:?}: {error}",
                started.elapsed()
            )
        });
    }
    conn.flush()
        .unwrap_or_else(|error| panic!("{what}: flush: {error}"));
    conn.disconnect();
    let took = started.elapsed();
    assert!(
        took < PHASE_TIMEOUT,
        "{what}: {} operations took {took:?}",
        ops.len()
    );
    let count = |name: &str| ops.iter().filter(|op| op.name() == name).count();
    eprintln!(
        "{what}: {} WRITE, {} WRITE_ZEROES, {} TRIM in {took:?}",
        count("WRITE"),
        count("WRITE_ZEROES"),
        count("TRIM")
    );
}

/// A length or offset inside the test's small volume, as an index into a buffer.
fn usize_of(bytes: u64) -> usize {
    usize::try_from(bytes).expect("a test volume's offsets fit in memory")
}

/// An NBD request length (at most a few hundred KiB here).
fn u32_of(bytes: u64) -> u32 {
    u32::try_from(bytes).expect("an NBD request length fits in 32 bits")
}

/// Seeded bytes (never all zeros, so they never look trimmed).
fn noise(rng: &mut StdRng, len: u64) -> Vec<u8> {
    let mut data = vec![0u8; usize_of(len)];
    rng.fill_bytes(&mut data);
    data[0] |= 1;
    data
}

/// The first 4 KiB blocks where `actual` (read from node `node`) differs from `expected`,
/// described (at most `max` lines), and how many blocks differ in all.
fn block_differences(
    node: &str,
    actual: &[u8],
    expected: &[u8],
    first_block: u64,
    max: usize,
) -> (usize, Vec<String>) {
    assert_eq!(actual.len(), expected.len(), "regions of different sizes");
    let mut count = 0;
    let mut lines = Vec::new();
    for (i, (a, e)) in actual
        .chunks(BLOCK_BYTES)
        .zip(expected.chunks(BLOCK_BYTES))
        .enumerate()
    {
        if a == e {
            continue;
        }
        count += 1;
        if lines.len() < max {
            let at = a.iter().zip(e).position(|(x, y)| x != y).unwrap_or(0);
            lines.push(format!(
                "node {node}: block {} (byte {}) differs from the model at byte {at} of the \
                 block: holds {} ({}), expected {} ({})",
                first_block + i as u64,
                (first_block + i as u64) * BLOCK,
                hex8(&a[at..]),
                zero_or_data(a),
                hex8(&e[at..]),
                zero_or_data(e),
            ));
        }
    }
    (count, lines)
}

fn hex8(bytes: &[u8]) -> String {
    format!("{:02x?}", &bytes[..bytes.len().min(8)])
}

fn zero_or_data(block: &[u8]) -> &'static str {
    if block.iter().all(|b| *b == 0) {
        "all zeros"
    } else {
        "data"
    }
}

/// Asserts `actual` equals `expected` (bytes from block `first_block` on), naming the blocks
/// that differ.
fn assert_region(node: &str, actual: &[u8], expected: &[u8], first_block: u64, what: &str) {
    let (count, lines) = block_differences(node, actual, expected, first_block, 12);
    assert!(
        count == 0,
        "{what}: {count} blocks of node {node} differ from what was written:\n{}",
        lines.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Control socket and CLI helpers
// ---------------------------------------------------------------------------------------------

/// One control-socket exchange; returns the whole reply (`{"ok":..,"result"|"error":..}`).
/// Verify can take a while: the read timeout is [`VERIFY_TIMEOUT`].
fn control_reply(node: &Node, request: &Value) -> Value {
    let path = node.spec.control_socket();
    let mut stream = UnixStream::connect(&path)
        .unwrap_or_else(|error| panic!("node {}: connect {path:?}: {error}", node.name()));
    stream
        .set_read_timeout(Some(VERIFY_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(Duration::from_secs(10))))
        .expect("socket timeouts");
    let mut line = request.to_string();
    line.push('\n');
    stream.write_all(line.as_bytes()).expect("send request");
    let mut reply = String::new();
    BufReader::new(stream.take(16 << 20))
        .read_line(&mut reply)
        .unwrap_or_else(|error| panic!("node {}: reply to {request}: {error}", node.name()));
    serde_json::from_str(&reply).unwrap_or_else(|error| {
        panic!(
            "node {}: reply to {request} is not JSON ({error}): {reply:?}",
            node.name()
        )
    })
}

/// The error code of a refused request, or None if it succeeded.
fn error_code(reply: &Value) -> Option<String> {
    match reply["ok"].as_bool() {
        Some(true) => None,
        _ => Some(
            reply["error"]["code"]
                .as_str()
                .unwrap_or("(none)")
                .to_string(),
        ),
    }
}

/// `ferry --socket S ARGS` on node `id`; asserts the exit code.
fn ctl_expect(cluster: &Cluster, id: NodeId, args: &[&str], code: i32, what: &str) -> Output {
    let output = cluster.node(id).ctl(args);
    assert_eq!(
        output.status.code(),
        Some(code),
        "node {}: {what}: expected exit {code}: {output}",
        id.name()
    );
    output
}

/// Waits until a's replica of b is in sync with nothing left to send; returns the replica.
fn wait_in_sync_settled(cluster: &Cluster, timeout: Duration, what: &str) -> Value {
    let since = Instant::now();
    let volume = cluster.wait_volume(
        A,
        &format!("in-sync with no lag ({what})"),
        timeout,
        |volume| {
            cluster::replica_of(volume, "b")
                .map(|r| r["state"] == "in-sync" && r["lag_bytes"] == 0)
                .unwrap_or(false)
        },
    );
    let replica = cluster::replica_of(&volume, "b").expect("replica b");
    eprintln!("{what}: in sync, no lag, after {:?}", since.elapsed());
    replica
}

/// Reads `blocks` blocks from block `first` of node `id`'s export (a secondary's export is
/// read-only, but it reads).
fn read_blocks(cluster: &Cluster, id: NodeId, first: u64, blocks: u64) -> Vec<u8> {
    let socket = cluster.nbd_socket(id);
    let mut conn = NbdConn::connect_unix(&socket, VOLUME)
        .unwrap_or_else(|error| panic!("node {}: connect to read: {error}", id.name()));
    let mut out = Vec::with_capacity(usize_of(blocks * BLOCK));
    let mut at = first;
    while at < first + blocks {
        let count = (first + blocks - at).min(256);
        let data = conn
            .read(at * BLOCK, u32_of(count * BLOCK))
            .unwrap_or_else(|error| {
                panic!("node {}: read blocks {at}+{count}: {error}", id.name())
            });
        out.extend_from_slice(&data);
        at += count;
    }
    conn.disconnect();
    out
}

/// Asserts the whole volume reads the same on a and b (through their exports).
fn assert_copies_identical(cluster: &Cluster, what: &str) {
    let blocks = cluster.volume_size_bytes() / BLOCK;
    let a = read_blocks(cluster, A, 0, blocks);
    let b = read_blocks(cluster, B, 0, blocks);
    if let Some(at) = first_difference(&a, &b) {
        let (count, lines) = block_differences("b", &b, &a, 0, 12);
        panic!(
            "{what}: b differs from a at byte {at}; {count} blocks differ:\n{}",
            lines.join("\n")
        );
    }
}

/// The `verify` object of a's replica of b in `ferry status --json` (the real CLI).
fn status_verify(cluster: &Cluster) -> Value {
    let status = cluster.status_cli(A);
    let volume = cluster::volume_of(&status, VOLUME).expect("volume in status");
    let replica = cluster::replica_of(&volume, "b").expect("replica b in status");
    replica["verify"].clone()
}

/// `ferry_verify_differing_bytes{peer="b",volume="vol"}` on a, if exported.
fn verify_metric(cluster: &Cluster) -> Option<f64> {
    let volume_label = format!("volume=\"{VOLUME}\"");
    cluster::metric_sum(
        &cluster.metrics(A),
        "ferry_verify_differing_bytes",
        &["peer=\"b\"", volume_label.as_str()],
    )
}

/// Waits until `ferry_verify_differing_bytes{peer="b"}` on a is `expected` (the gauges are
/// refreshed by the daemon's periodic report, a fraction of a second after the verify
/// returns); panics after 5 s with the last value.
fn assert_verify_metric(cluster: &Cluster, expected: u64, what: &str) {
    let since = Instant::now();
    let deadline = since + Duration::from_secs(5);
    loop {
        let value = verify_metric(cluster);
        if value == Some(expected as f64) {
            eprintln!(
                "ferry_verify_differing_bytes = {expected} {what} ({:?} after the check began)",
                since.elapsed()
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "ferry_verify_differing_bytes{{peer=\"b\"}} on a is {value:?} {what}, expected \
             {expected}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `[[offset, len], ...]` of a verify report as pairs.
fn report_ranges(report: &Value) -> Vec<(u64, u64)> {
    report["differing_ranges"]
        .as_array()
        .unwrap_or_else(|| panic!("no differing_ranges array in {report}"))
        .iter()
        .map(|pair| {
            (
                pair[0]
                    .as_u64()
                    .unwrap_or_else(|| panic!("bad range {pair}")),
                pair[1]
                    .as_u64()
                    .unwrap_or_else(|| panic!("bad range {pair}")),
            )
        })
        .collect()
}

fn report_u64(report: &Value, field: &str) -> u64 {
    report[field]
        .as_u64()
        .unwrap_or_else(|| panic!("verify report without {field}: {report}"))
}

/// Merges sorted 4 KiB block offsets into `(offset, len)` ranges.
fn merged_ranges(offsets: &BTreeSet<u64>) -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for &offset in offsets {
        match ranges.last_mut() {
            Some((start, len)) if *start + *len == offset => *len += BLOCK,
            _ => ranges.push((offset, BLOCK)),
        }
    }
    ranges
}

/// Runs `ferry verify vol [ARGS]` on a with a bounded wait; returns the output and how long
/// it took.
fn cli_verify(cluster: &Cluster, extra: &[&str]) -> (Output, Duration) {
    let mut args = vec!["verify", VOLUME];
    args.extend_from_slice(extra);
    let started = Instant::now();
    let output = harness::run_with_timeout(
        std::process::Command::new(harness::FERRY_BIN)
            .arg("--socket")
            .arg(cluster.node(A).spec.control_socket())
            .args(&args),
        VERIFY_TIMEOUT,
    );
    let took = started.elapsed();
    eprintln!(
        "ferry verify {} on a: exit {:?} after {took:?}: {}{}",
        extra.join(" "),
        output.status.code(),
        output.stdout.trim(),
        output.stderr.trim()
    );
    (output, took)
}

// ---------------------------------------------------------------------------------------------
// A light background load of writes, zeroes and trims, with its exact model
// ---------------------------------------------------------------------------------------------

/// One connection sending seeded writes, zeroes and trims into bytes [0, region) of the
/// volume, one every `pause`, until stopped. Sequential, so the operations it completed, in
/// order, give the exact contents.
struct LightLoad {
    stop: Arc<AtomicBool>,
    done: Arc<Mutex<Vec<IoOp>>>,
    error: Arc<Mutex<Option<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl LightLoad {
    fn start(socket: &Path, seed: u64, region: u64, pause: Duration) -> LightLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(Mutex::new(Vec::new()));
        let error = Arc::new(Mutex::new(None));
        let socket = socket.to_path_buf();
        let thread = {
            let (stop, done, error) = (stop.clone(), done.clone(), error.clone());
            std::thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(seed);
                let mut conn = match NbdConn::connect_unix(&socket, VOLUME) {
                    Ok(conn) => conn,
                    Err(e) => {
                        *error.lock().unwrap() = Some(format!("connect: {e}"));
                        return;
                    }
                };
                // Bounded: at most this many operations even if nobody stops it.
                for _ in 0..100_000 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let op = random_op(&mut rng, region, 16 * BLOCK);
                    let fua = rng.random_ratio(1, 4);
                    if let Err(e) = op.send(&mut conn, fua) {
                        *error.lock().unwrap() = Some(e);
                        return;
                    }
                    done.lock().unwrap().push(op);
                    std::thread::sleep(pause);
                }
                if let Err(e) = conn.flush() {
                    *error.lock().unwrap() = Some(format!("flush: {e}"));
                    return;
                }
                conn.disconnect();
            })
        };
        LightLoad {
            stop,
            done,
            error,
            thread: Some(thread),
        }
    }

    fn count(&self) -> usize {
        self.done.lock().unwrap().len()
    }

    /// Stops it and returns the operations it completed, in order.
    fn finish(mut self) -> Vec<IoOp> {
        self.halt();
        if let Some(error) = self.error.lock().unwrap().clone() {
            panic!("the light load failed: {error}");
        }
        self.done.lock().unwrap().clone()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            // Bounded: each NBD request has the client's I/O timeout.
            let _ = thread.join();
        }
    }
}

impl Drop for LightLoad {
    fn drop(&mut self) {
        self.halt();
    }
}

/// A seeded operation inside bytes [0, region): 60 % writes, 20 % zeroes, 20 % trims, of
/// 512 bytes to `max_len`, 512-byte aligned (so some start or end inside a 4 KiB block).
fn random_op(rng: &mut StdRng, region: u64, max_len: u64) -> IoOp {
    let sub_block = rng.random_ratio(1, 3);
    let (offset, len) = if sub_block {
        let len = rng.random_range(1..=(max_len / SECTOR)) * SECTOR;
        let offset = rng.random_range(0..=(region - len) / SECTOR) * SECTOR;
        (offset, len)
    } else {
        let len = rng.random_range(1..=(max_len / BLOCK)) * BLOCK;
        let offset = rng.random_range(0..=(region - len) / BLOCK) * BLOCK;
        (offset, len)
    };
    match rng.random_range(0..10) {
        0..=5 => IoOp::Write {
            offset,
            data: noise(rng, len),
        },
        6 | 7 => IoOp::Zeroes { offset, len },
        _ => IoOp::Trim { offset, len },
    }
}

// ---------------------------------------------------------------------------------------------
// resolve --discard-local
// ---------------------------------------------------------------------------------------------

/// Blocks [0, RESOLVE_REGION_BLOCKS) hold every phase's writes (1 MiB).
const RESOLVE_REGION_BLOCKS: u64 = 256;

/// The operations of one split-brain phase: seeded 4 KiB writes of the given blocks, then
/// single-block WRITE_ZEROES and TRIM of the given blocks.
fn phase_ops(seed: u64, phase: u64, writes: &[u64], zeroes: &[u64], trims: &[u64]) -> Vec<IoOp> {
    let mut ops: Vec<IoOp> = writes
        .iter()
        .map(|&block| IoOp::Write {
            offset: block * BLOCK,
            data: block_contents(seed, phase, phase, block),
        })
        .collect();
    ops.extend(zeroes.iter().map(|&block| IoOp::Zeroes {
        offset: block * BLOCK,
        len: BLOCK,
    }));
    ops.extend(trims.iter().map(|&block| IoOp::Trim {
        offset: block * BLOCK,
        len: BLOCK,
    }));
    ops
}

/// Picks `count` distinct blocks of `pool` (seeded), sorted.
fn pick(rng: &mut StdRng, pool: &[u64], count: usize) -> Vec<u64> {
    let mut blocks: Vec<u64> = pool.sample(rng, count).copied().collect();
    blocks.sort_unstable();
    blocks
}

/// Waits until both nodes report `split-brain` for each other; panics after
/// [`SPLIT_BRAIN_TIMEOUT`] with both statuses.
fn wait_both_split_brain(cluster: &Cluster) {
    let started = Instant::now();
    let deadline = started + SPLIT_BRAIN_TIMEOUT;
    loop {
        let state = |id: NodeId| -> (bool, String) {
            match cluster.node(id).try_volume_status() {
                Ok(volume) => (
                    cluster::replica_of(&volume, id.other().name())
                        .map(|r| r["state"] == "split-brain")
                        .unwrap_or(false),
                    volume.to_string(),
                ),
                Err(error) => (false, error),
            }
        };
        let (split_a, status_a) = state(A);
        let (split_b, status_b) = state(B);
        if split_a && split_b {
            eprintln!(
                "both report split-brain {:?} after the restore",
                started.elapsed()
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not both split-brain {SPLIT_BRAIN_TIMEOUT:?} after the restore\n  a: {status_a}\n  \
             b: {status_b}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `ferry resolve vol --discard-local` on b once more, after a first one succeeded: exit 0
/// while b still resolves (its status names the peer it resolves with), or exit 1 with code
/// `no-split-brain` once the resync is done; anything else fails the test.
fn resolve_again(cluster: &Cluster, extra: &[&str], what: &str) {
    let before = cluster.volume_status(B);
    let mut args = vec!["resolve", VOLUME, "--discard-local"];
    args.extend_from_slice(extra);
    let output = cluster.node(B).ctl(&args);
    let after = cluster.volume_status(B);
    eprintln!(
        "resolve {what}: exit {:?} ({}{}); b resolving_with {} -> {}, replica {} -> {}",
        output.status.code(),
        output.stdout.trim(),
        output.stderr.trim(),
        before["resolving_with"],
        after["resolving_with"],
        before["replicas"][0]["state"],
        after["replicas"][0]["state"],
    );
    match output.status.code() {
        Some(0) => {}
        Some(1) => {
            assert!(
                after["resolving_with"].is_null(),
                "resolve {what} refused while b still resolves: {output}\nstatus b: {after}"
            );
            let reply = control_reply(
                cluster.node(B),
                &json!({"op": "resolve", "volume": VOLUME, "discard_local": true}),
            );
            assert_eq!(
                error_code(&reply).as_deref(),
                Some("no-split-brain"),
                "resolve {what}, after the resync: {reply}"
            );
        }
        _ => panic!("resolve {what}: {output}"),
    }
    assert_eq!(
        cluster.role(A),
        "primary",
        "a after resolve {what} on b: {}",
        cluster.volume_status(A)
    );
}

/// Split brain (a degraded and written, b force-promoted and written, link restored), then
/// `ferry resolve vol --discard-local` on b: b becomes a's secondary, is resynced by a delta
/// (the blocks either side changed), holds exactly a's copy, and b's writes since the split
/// are gone; a keeps every write it completed. Also the refusals: resolve where there is no
/// split brain (exit 1, `no-split-brain`), without `--discard-local` (exit 2), naming an
/// unknown peer, and resolve run again while the resync runs and after it is done.
#[test]
fn metro_repair_resolve_discard_local_resyncs_the_loser_by_delta() {
    let seed = harness::test_seed("metro_repair_resolve_discard_local_resyncs_the_loser_by_delta");
    let mut sb = SplitBrain::start(seed);

    // Refusal: no split brain, on either node (exit 1, code no-split-brain), and nothing
    // changes.
    for id in [A, B] {
        let output = ctl_expect(
            &sb.cluster,
            id,
            &["resolve", VOLUME, "--discard-local"],
            1,
            "resolve --discard-local without a split brain",
        );
        assert!(
            output.stderr.contains("split brain"),
            "node {}: the refusal does not say there is no split brain: {output}",
            id.name()
        );
        eprintln!(
            "resolve on {} without a split brain: {}",
            id.name(),
            output.stderr.trim()
        );
        let reply = control_reply(
            sb.cluster.node(id),
            &json!({"op": "resolve", "volume": VOLUME, "discard_local": true}),
        );
        assert_eq!(
            error_code(&reply).as_deref(),
            Some("no-split-brain"),
            "node {}: resolve without a split brain over the control socket: {reply}",
            id.name()
        );
    }
    assert_eq!(sb.cluster.role(A), "primary");
    assert_eq!(sb.cluster.role(B), "secondary");
    wait_in_sync_settled(&sb.cluster, SETTLE_TIMEOUT, "after the refused resolves");

    sb.diverge();
    sb.cluster.relay().both().restore();
    wait_both_split_brain(&sb.cluster);
    let cluster = &sb.cluster;

    // Usage error: resolve without --discard-local (exit 2); over the control socket,
    // discard_local false is a bad request. An unknown peer is refused. Nothing changes.
    let output = ctl_expect(
        cluster,
        B,
        &["resolve", VOLUME],
        2,
        "resolve without --discard-local",
    );
    assert!(
        output.stderr.contains("--discard-local"),
        "the usage error does not name --discard-local: {output}"
    );
    let reply = control_reply(
        cluster.node(B),
        &json!({"op": "resolve", "volume": VOLUME, "discard_local": false}),
    );
    assert_eq!(
        error_code(&reply).as_deref(),
        Some("bad-request"),
        "resolve with discard_local false over the control socket: {reply}"
    );
    let output = ctl_expect(
        cluster,
        B,
        &["resolve", VOLUME, "--discard-local", "--peer", "nosuch"],
        1,
        "resolve --discard-local --peer nosuch",
    );
    assert!(
        output.stderr.contains("nosuch"),
        "the refusal does not name the unknown peer: {output}"
    );
    let reply = control_reply(
        cluster.node(B),
        &json!({"op": "resolve", "volume": VOLUME, "discard_local": true, "peer": "nosuch"}),
    );
    assert_eq!(
        error_code(&reply).as_deref(),
        Some("unknown-peer"),
        "resolve naming an unknown peer: {reply}"
    );
    assert_eq!(cluster.replica_state(B), "split-brain");
    assert_eq!(cluster.replica_state(A), "split-brain");
    assert_eq!(cluster.role(B), "primary");

    // Resolve on the loser b.
    let resync_metric_before = cluster.metric(A, "ferry_resync_bytes_total", &["peer=\"b\""]);
    let monitor = cluster.monitor(A);
    let resolve_started = Instant::now();
    let output = ctl_expect(
        cluster,
        B,
        &["resolve", VOLUME, "--discard-local"],
        0,
        "resolve --discard-local on the loser",
    );
    eprintln!(
        "[{:?}] resolve on b took {:?}: {}",
        sb.started.elapsed(),
        resolve_started.elapsed(),
        output.stdout.trim()
    );
    assert!(
        output.stdout.contains("secondary"),
        "resolve's line does not say the new role: {output}"
    );
    // Again, at once (twice, the second naming the peer): the resync most likely still
    // runs. It must not break anything: exit 0 (still resolving), or, once the resync is
    // done, a refusal saying there is no split brain left.
    resolve_again(cluster, &[], "again right after");
    resolve_again(cluster, &["--peer", "a"], "a third time, with --peer a");

    let replica = sb.check_resolved("after the resolve");
    let states = format_states(&monitor.stop());
    eprintln!("a's replica of b after the resolve: {states}");
    let resync_metric =
        cluster.metric(A, "ferry_resync_bytes_total", &["peer=\"b\""]) - resync_metric_before;
    let resynced = replica["resynced_bytes"].as_u64().unwrap_or(0);
    assert!(
        resync_metric > 0.0 && resync_metric <= resynced as f64,
        "ferry_resync_bytes_total grew by {resync_metric} for a resync of {resynced} bytes"
    );

    // Resolve once more, now that it is done: nothing to resolve (exit 1), nothing changes.
    let output = ctl_expect(
        cluster,
        B,
        &["resolve", VOLUME, "--discard-local"],
        1,
        "resolve --discard-local after the resolve completed",
    );
    eprintln!("resolve after it completed: {}", output.stderr.trim());
    assert!(
        output.stderr.contains("split brain"),
        "the refusal after the resolve does not say there is no split brain: {output}"
    );
    let reply = control_reply(
        cluster.node(B),
        &json!({"op": "resolve", "volume": VOLUME, "discard_local": true}),
    );
    assert_eq!(
        error_code(&reply).as_deref(),
        Some("no-split-brain"),
        "resolve after it completed: {reply}"
    );
    wait_in_sync_settled(cluster, SETTLE_TIMEOUT, "after the late resolve");
    assert_eq!(cluster.role(B), "secondary");
    assert_copies_identical(cluster, "after the late resolve");

    sb.cluster.stop(A);
    sb.cluster.stop(B);
    eprintln!("[{:?}] done", sb.started.elapsed());
}

/// The resolve is durable: b resolves while the link is still cut (a unreachable), is
/// killed with -9 before any resync, and restarts: it is still a secondary that discards its
/// writes (status `resolving_with`, a read-only export), and when the link comes back it is
/// resynced from a by a delta, exactly as if it had not restarted.
#[test]
fn metro_repair_resolve_survives_a_restart_of_the_loser() {
    let seed = harness::test_seed("metro_repair_resolve_survives_a_restart_of_the_loser");
    let mut sb = SplitBrain::start(sb_seed(seed));
    sb.diverge();
    // Both saw the split brain once: restore, wait for it, cut again.
    sb.cluster.relay().both().restore();
    wait_both_split_brain(&sb.cluster);
    sb.cluster.relay().both().cut();

    let output = ctl_expect(
        &sb.cluster,
        B,
        &["resolve", VOLUME, "--discard-local"],
        0,
        "resolve --discard-local with the winner unreachable",
    );
    eprintln!("resolve on b, link cut: {}", output.stdout.trim());
    let status = sb.cluster.volume_status(B);
    assert_eq!(status["role"], "secondary", "{status}");
    assert_eq!(status["resolving_with"], "a", "{status}");

    sb.cluster.kill9(B);
    sb.cluster.restart(B);
    let status = sb.cluster.volume_status(B);
    eprintln!("b after kill -9 and restart: {status}");
    assert_eq!(
        status["role"], "secondary",
        "b restarted after resolving: {status}"
    );
    assert_eq!(
        status["resolving_with"], "a",
        "b forgot the resolve across a restart: {status}"
    );
    let probe = crate::metro::probe_write(&sb.cluster.nbd_socket(B), 250 * BLOCK);
    assert!(
        probe.is_err(),
        "b (resolving, secondary) accepted a client write after its restart"
    );
    let region_b = read_region(&sb.cluster.nbd_socket(B), RESOLVE_REGION_BLOCKS);
    assert_region(
        "b",
        &region_b,
        &sb.b_image,
        0,
        "b's own writes before the resync (restarted, link cut)",
    );

    sb.cluster.relay().both().restore();
    sb.check_resolved("after the restore (b restarted while resolving)");
    sb.cluster.stop(A);
    sb.cluster.stop(B);
    eprintln!("[{:?}] done", sb.started.elapsed());
}

/// The seed of the split brain of the restart test (another plan than the first test's for
/// the same FERRY_SEED).
fn sb_seed(seed: u64) -> u64 {
    seed ^ 0x7265_7374_6172_7400
}

/// A two-node cluster with a relay, taken through a split brain with a seeded plan of
/// writes, zeroes and trims (see [`SplitBrain::start`] and [`SplitBrain::diverge`]), and
/// what each copy must hold.
struct SplitBrain {
    cluster: Cluster,
    seed: u64,
    started: Instant,
    baseline: Vec<u8>,
    /// Blocks [0, RESOLVE_REGION_BLOCKS) as a must hold: common, then a-only operations.
    expected_a: Vec<u8>,
    /// The same blocks as b holds after its own operations: common, then b-only.
    b_image: Vec<u8>,
    a_only: Vec<IoOp>,
    b_only: Vec<IoOp>,
    /// The 4 KiB blocks either side changed after the split.
    changed_after_split: BTreeSet<u64>,
    /// a's generation once the split brain happened.
    generation_a: Option<Value>,
    /// How many blocks the common phase wrote (before the split).
    common_blocks: u64,
}

impl SplitBrain {
    /// Starts the pair, waits for the initial sync and writes the common blocks on a (in
    /// sync, they reach b).
    fn start(seed: u64) -> SplitBrain {
        let started = Instant::now();
        let options = ClusterOptions {
            relay: true,
            seed,
            ..ClusterOptions::default()
        };
        let (cluster, baseline) = start_in_sync(options, RESOLVE_REGION_BLOCKS);
        eprintln!("[{:?}] in sync", started.elapsed());

        // The seeded plan: which blocks each phase writes, zeroes and trims.
        let mut rng = StdRng::seed_from_u64(seed ^ 0x7265_736f_6c76);
        let all: Vec<u64> = (0..RESOLVE_REGION_BLOCKS).collect();
        let common_writes = pick(&mut rng, &all, 48);
        let a_writes = pick(&mut rng, &all, 40);
        // a zeroes and trims common blocks it does not rewrite; b does the same with common
        // blocks a leaves alone (after the resolve they must read as a's common data again).
        let common_untouched: Vec<u64> = common_writes
            .iter()
            .copied()
            .filter(|b| !a_writes.contains(b))
            .collect();
        let a_zero_trim = pick(&mut rng, &common_untouched, 4);
        let a_touched: BTreeSet<u64> = a_writes.iter().chain(&a_zero_trim).copied().collect();
        // b rewrites some of a's blocks, and blocks nobody wrote.
        let b_overlap = pick(&mut rng, &a_writes, 16);
        let elsewhere: Vec<u64> = all
            .iter()
            .copied()
            .filter(|b| !a_touched.contains(b) && !common_writes.contains(b))
            .collect();
        let b_fresh = pick(&mut rng, &elsewhere, 24);
        let mut b_writes: Vec<u64> = b_overlap.iter().chain(&b_fresh).copied().collect();
        b_writes.sort_unstable();
        let common_left: Vec<u64> = common_untouched
            .iter()
            .copied()
            .filter(|b| !a_zero_trim.contains(b))
            .collect();
        let b_zero_trim = pick(&mut rng, &common_left, 4);

        let common = phase_ops(seed, 11, &common_writes, &[], &[]);
        let a_only = phase_ops(seed, 12, &a_writes, &a_zero_trim[..2], &a_zero_trim[2..]);
        let b_only = phase_ops(seed, 13, &b_writes, &b_zero_trim[..2], &b_zero_trim[2..]);
        let mut expected_a = baseline.clone();
        for op in common.iter().chain(&a_only) {
            op.apply(&mut expected_a);
        }
        let mut b_image = baseline.clone();
        for op in common.iter().chain(&b_only) {
            op.apply(&mut b_image);
        }
        let changed_after_split = a_only
            .iter()
            .chain(&b_only)
            .flat_map(IoOp::blocks)
            .collect();

        send_ops(
            &cluster.nbd_socket(A),
            &common,
            "common writes on a (in sync)",
        );
        wait_in_sync_settled(&cluster, SETTLE_TIMEOUT, "after the common writes");
        SplitBrain {
            cluster,
            seed,
            started,
            baseline,
            expected_a,
            b_image,
            a_only,
            b_only,
            changed_after_split,
            generation_a: None,
            common_blocks: common_writes.len() as u64,
        }
    }

    /// Cuts the link; a degrades and runs its a-only operations; b is force-promoted and
    /// runs its b-only operations. The link stays cut.
    fn diverge(&mut self) {
        let cluster = &self.cluster;
        cluster.relay().both().cut();
        wait_state_logged(
            cluster,
            "degraded",
            cluster.peer_timeout() + DEGRADE_SLACK,
            &format!("[{:?}] link cut", self.started.elapsed()),
        );
        send_ops(
            &cluster.nbd_socket(A),
            &self.a_only,
            "a-only operations on a (degraded)",
        );
        if let Err(reason) = cluster.promote(B, true) {
            panic!(
                "promote --force on b refused while the link is cut: {reason}\nstatus b: {}",
                cluster.volume_status(B)
            );
        }
        send_ops(
            &cluster.nbd_socket(B),
            &self.b_only,
            "b-only operations on b (force-promoted)",
        );
        let region_b = read_region(&cluster.nbd_socket(B), RESOLVE_REGION_BLOCKS);
        assert_region("b", &region_b, &self.b_image, 0, "b before the restore");
        let region_a = read_region(&cluster.nbd_socket(A), RESOLVE_REGION_BLOCKS);
        assert_region("a", &region_a, &self.expected_a, 0, "a before the restore");
        self.generation_a = Some(cluster.generation(A));
    }

    /// After a resolve on b: b is a's secondary, a's replica is in sync with no lag after a
    /// delta resync of at least the blocks changed after the split, a holds exactly common +
    /// a-only, b is byte-identical to a and none of b's own writes survived; replication and
    /// verify work. Returns a's replica of b.
    fn check_resolved(&self, what: &str) -> Value {
        let cluster = &self.cluster;
        let size = cluster.volume_size_bytes();
        cluster.wait_role(B, "secondary", ROLE_TIMEOUT);
        let replica = wait_in_sync_settled(cluster, RESYNC_TIMEOUT, what);
        eprintln!(
            "[{:?}] a's replica of b {what}: {replica}",
            self.started.elapsed()
        );
        let b_volume = cluster.wait_volume(B, "following a, resolved", ROLE_TIMEOUT, |v| {
            v["following"] == "a" && v["resolving_with"].is_null()
        });
        assert_eq!(b_volume["role"], "secondary", "{what}: {b_volume}");
        assert_eq!(b_volume["consistent"], true, "{what}: {b_volume}");
        assert_eq!(
            cluster.role(A),
            "primary",
            "{what}: a: {}",
            cluster.volume_status(A)
        );
        if let Some(generation_a) = &self.generation_a {
            assert_eq!(
                &cluster.generation(A),
                generation_a,
                "{what}: a's generation changed when b resolved"
            );
        }
        assert_eq!(
            cluster.generation(B),
            cluster.generation(A),
            "{what}: b's generation after the resync: {b_volume}"
        );
        let b_replica = cluster::replica_of(&b_volume, "a").expect("b's replica of a");
        assert!(
            b_replica["last_error"].is_null() && b_replica["state"] != "split-brain",
            "{what}: b's replica of a: {b_replica}"
        );

        // A delta: at least the distinct blocks either side changed after the split, far
        // less than the volume.
        let distinct = self.changed_after_split.len() as u64 * BLOCK;
        let resynced = replica["resynced_bytes"]
            .as_u64()
            .unwrap_or_else(|| panic!("no resynced_bytes: {replica}"));
        eprintln!(
            "{what}: resynced_bytes {resynced}; distinct bytes changed after the split \
             {distinct} ({} blocks); volume {size}",
            self.changed_after_split.len()
        );
        assert!(
            resynced >= distinct,
            "{what}: the resync sent {resynced} bytes, less than the {distinct} bytes of \
             distinct blocks either side changed after the split: {replica}"
        );
        // More only where a copy's journal replay marked blocks written before the split
        // (the restart test): at most the common blocks, far less than the written region.
        let most = distinct + self.common_blocks * BLOCK;
        assert!(
            resynced <= most,
            "{what}: the resync sent {resynced} bytes of a {size}-byte volume although only \
             {distinct} bytes changed after the split (at most {most} with the common blocks \
             a replay may mark): not a delta"
        );

        // The data: a holds common + a-only exactly; none of b's writes since the split
        // survived; b is byte-identical to a.
        let region_a = read_region(&cluster.nbd_socket(A), RESOLVE_REGION_BLOCKS);
        assert_region("a", &region_a, &self.expected_a, 0, what);
        let region_b = read_region(&cluster.nbd_socket(B), RESOLVE_REGION_BLOCKS);
        let mut kept = Vec::new();
        for op in &self.b_only {
            for block in op.blocks() {
                let range = usize_of(block * BLOCK)..usize_of((block + 1) * BLOCK);
                if region_b[range.clone()] == self.b_image[range.clone()]
                    && self.b_image[range.clone()] != self.expected_a[range.clone()]
                {
                    kept.push(format!(
                        "block {block}: b still holds its own {} (sectors {})",
                        op.name(),
                        describe_block(&region_b[range.clone()], &self.baseline[range])
                    ));
                }
            }
        }
        assert!(
            kept.is_empty(),
            "{what}: b's writes since the split survived the resolve:\n{}",
            kept.join("\n")
        );
        assert_region("b", &region_b, &self.expected_a, 0, what);
        assert_copies_identical(cluster, what);

        // Replication goes on: a write on a reaches b; verify finds the copies equal.
        let block = RESOLVE_REGION_BLOCKS - 1;
        let data = block_contents(self.seed, 14, 14, block);
        let after = vec![IoOp::Write {
            offset: block * BLOCK,
            data: data.clone(),
        }];
        send_ops(
            &cluster.nbd_socket(A),
            &after,
            "a write on a after the resolve",
        );
        wait_in_sync_settled(
            cluster,
            SETTLE_TIMEOUT,
            "after a write following the resolve",
        );
        assert_eq!(
            read_blocks(cluster, B, block, 1),
            data,
            "{what}: a write on a after the resolve did not reach b"
        );
        let (verify, _) = cli_verify(cluster, &[]);
        assert_eq!(verify.status.code(), Some(0), "{what}: verify: {verify}");
        replica
    }
}

// ---------------------------------------------------------------------------------------------
// verify: no false difference
// ---------------------------------------------------------------------------------------------

/// Bytes [0, VERIFY_LOAD_REGION) take the workloads of the verify tests.
const VERIFY_LOAD_REGION: u64 = 8 * MIB;

/// Checks a finished verify report of copies that must be equal: no difference, everything
/// compared or busy. Returns the problems found.
fn equal_report_problems(report: &Value, size: u64, what: &str) -> Vec<String> {
    let mut problems = Vec::new();
    if report_u64(report, "total_bytes") != size {
        problems.push(format!(
            "{what}: total_bytes is not the volume size {size}: {report}"
        ));
    }
    if report_u64(report, "differing_bytes") != 0 || !report_ranges(report).is_empty() {
        problems.push(format!(
            "{what}: a FALSE DIFFERENCE between copies that are equal: {report}"
        ));
    }
    let covered = report_u64(report, "checked_bytes") + report_u64(report, "busy_bytes");
    if covered < size {
        problems.push(format!(
            "{what}: compared {covered} of {size} bytes: {report}"
        ));
    }
    if report["running"] != false || report["repaired"] != false {
        problems.push(format!("{what}: running/repaired: {report}"));
    }
    problems
}

/// A freshly synced pair after seeded writes, WRITE_ZEROES and TRIMs (whole 4 KiB blocks
/// and 512-byte aligned pieces of blocks): zeroes and trims read as zeros on both copies,
/// and `ferry verify` exits 0 with no difference, also while a light load of writes, zeroes
/// and trims runs; `ferry status --json` and `/metrics` show the last verify. The verify
/// refusals: on the secondary, and against an unknown peer.
#[test]
fn metro_repair_verify_no_false_difference_with_zeroes_trims_and_load() {
    let seed =
        harness::test_seed("metro_repair_verify_no_false_difference_with_zeroes_trims_and_load");
    let test_started = Instant::now();
    let region_blocks = VERIFY_LOAD_REGION / BLOCK;
    let (mut cluster, baseline) = start_in_sync(
        ClusterOptions {
            seed,
            ..ClusterOptions::default()
        },
        region_blocks,
    );
    let size = cluster.volume_size_bytes();
    eprintln!("[{:?}] in sync", test_started.elapsed());

    // 1. Seeded operations: first fill the region's first half with data so that zeroes and
    // trims have something to clear, then a mix.
    let mut rng = StdRng::seed_from_u64(seed ^ 0x7665_7269_6679);
    let mut ops: Vec<IoOp> = (0..VERIFY_LOAD_REGION / 2 / (64 * 1024))
        .map(|i| IoOp::Write {
            offset: i * 64 * 1024,
            data: noise(&mut rng, 64 * 1024),
        })
        .collect();
    ops.extend((0..400).map(|_| random_op(&mut rng, VERIFY_LOAD_REGION, 32 * BLOCK)));
    let mut expected = baseline.clone();
    for op in &ops {
        op.apply(&mut expected);
    }
    send_ops(
        &cluster.nbd_socket(A),
        &ops,
        "writes, zeroes and trims on a",
    );
    wait_in_sync_settled(&cluster, SETTLE_TIMEOUT, "after the operations");
    let region_a = read_region(&cluster.nbd_socket(A), region_blocks);
    assert_region(
        "a",
        &region_a,
        &expected,
        0,
        "a after writes, zeroes and trims",
    );
    let region_b = read_region(&cluster.nbd_socket(B), region_blocks);
    assert_region(
        "b",
        &region_b,
        &expected,
        0,
        "b after writes, zeroes and trims",
    );
    let zeroed: u64 = ops
        .iter()
        .filter(|op| !matches!(op, IoOp::Write { .. }))
        .map(|op| op.range().1)
        .sum();
    eprintln!(
        "zeroes and trims covered {zeroed} bytes (with overlaps); both copies read them as zeros"
    );

    // Refusals: verify on the secondary; against a peer that does not exist.
    let output = ctl_expect(
        &cluster,
        B,
        &["verify", VOLUME],
        1,
        "verify on the secondary",
    );
    eprintln!("verify on b (secondary): {}", output.stderr.trim());
    assert!(
        output.stderr.contains("secondary") && output.stderr.contains("primary"),
        "the refusal on the secondary does not say to run verify on the primary: {output}"
    );
    let reply = control_reply(
        cluster.node(B),
        &json!({"op": "verify", "volume": VOLUME, "repair": false}),
    );
    assert_eq!(
        error_code(&reply).as_deref(),
        Some("cannot-verify"),
        "verify on the secondary: {reply}"
    );
    ctl_expect(
        &cluster,
        A,
        &["verify", VOLUME, "--peer", "nosuch"],
        1,
        "verify against an unknown peer",
    );
    let reply = control_reply(
        cluster.node(A),
        &json!({"op": "verify", "volume": VOLUME, "peer": "nosuch"}),
    );
    assert_eq!(
        error_code(&reply).as_deref(),
        Some("unknown-peer"),
        "verify against an unknown peer: {reply}"
    );

    // 2. Quiet: verify exits 0, no difference; status and metrics show it.
    let (output, took) = cli_verify(&cluster, &[]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "verify of equal copies: {output}"
    );
    assert!(
        output.stdout.contains("no difference"),
        "verify's line does not say no difference: {output}"
    );
    let report = status_verify(&cluster);
    eprintln!("status verify after {took:?}: {report}");
    let problems = equal_report_problems(&report, size, "quiet verify (status)");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert_eq!(
        report_u64(&report, "busy_bytes"),
        0,
        "nothing was written during the quiet verify, yet bytes are busy: {report}"
    );
    assert_eq!(report["peer"], "b", "{report}");
    assert_eq!(report["volume"], VOLUME, "{report}");
    assert_verify_metric(&cluster, 0, "after a clean verify");

    // The control op returns the same report.
    let reply = control_reply(
        cluster.node(A),
        &json!({"op": "verify", "volume": VOLUME, "peer": "b", "repair": false}),
    );
    assert_eq!(reply["ok"], true, "verify over the control socket: {reply}");
    let problems = equal_report_problems(&reply["result"], size, "quiet verify (control op)");
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // --repair on equal copies, naming the peer: nothing to repair, exit 0, no resync.
    let resynced_before = cluster.replica(A)["resynced_bytes"].clone();
    let (output, _) = cli_verify(&cluster, &["--peer", "b", "--repair"]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "verify --repair of equal copies: {output}"
    );
    let report = status_verify(&cluster);
    let problems = equal_report_problems(&report, size, "verify --repair of equal copies");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert_eq!(report["repair"], true, "{report}");
    let replica = wait_in_sync_settled(&cluster, SETTLE_TIMEOUT, "after verify --repair");
    assert_eq!(
        replica["resynced_bytes"], resynced_before,
        "verify --repair of equal copies ran a resync: {replica}"
    );

    // 3. Under a light load of writes, zeroes and trims (one every 20 ms in the first 8 MiB):
    // never a false difference.
    let load = LightLoad::start(
        &cluster.nbd_socket(A),
        seed ^ 0x6c6f_6164,
        VERIFY_LOAD_REGION,
        Duration::from_millis(20),
    );
    std::thread::sleep(Duration::from_millis(300));
    let mut busy_seen = Vec::new();
    for round in 0..3 {
        let (output, took) = cli_verify(&cluster, &[]);
        let report = status_verify(&cluster);
        eprintln!(
            "verify {round} under load ({} ops so far), {took:?}: {report}",
            load.count()
        );
        assert!(
            output.status.code() == Some(0) || output.status.code() == Some(1),
            "verify under load: {output}"
        );
        let problems = equal_report_problems(&report, size, &format!("verify {round} under load"));
        assert!(
            problems.is_empty(),
            "{}\nverify output: {output}",
            problems.join("\n")
        );
        assert_eq!(
            output.status.code(),
            Some(0),
            "verify under load found no difference but did not exit 0: {output}"
        );
        // Busy (not compared) can only be where the load writes.
        let busy = report_u64(&report, "busy_bytes");
        assert!(
            busy <= VERIFY_LOAD_REGION,
            "verify {round} under load: {busy} bytes busy (not compared) although the load \
             writes only the first {VERIFY_LOAD_REGION} bytes: {report}"
        );
        busy_seen.push(busy);
    }
    let done_ops = load.finish();
    eprintln!(
        "light load: {} operations; busy bytes per verify {busy_seen:?}",
        done_ops.len()
    );
    assert!(!done_ops.is_empty(), "the light load completed nothing");
    for op in &done_ops {
        op.apply(&mut expected);
    }
    wait_in_sync_settled(&cluster, SETTLE_TIMEOUT, "after the light load");
    let region_a = read_region(&cluster.nbd_socket(A), region_blocks);
    assert_region("a", &region_a, &expected, 0, "a after the light load");
    let region_b = read_region(&cluster.nbd_socket(B), region_blocks);
    assert_region("b", &region_b, &expected, 0, "b after the light load");
    assert_copies_identical(&cluster, "after the light load");
    let (output, _) = cli_verify(&cluster, &[]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "verify after the load: {output}"
    );
    let report = status_verify(&cluster);
    let problems = equal_report_problems(&report, size, "verify after the load");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert_eq!(report_u64(&report, "busy_bytes"), 0, "{report}");
    assert_verify_metric(&cluster, 0, "after the verify following the load");

    cluster.stop(A);
    cluster.stop(B);
    eprintln!("[{:?}] done", test_started.elapsed());
}

// ---------------------------------------------------------------------------------------------
// verify: flipped blocks behind Ferry's back
// ---------------------------------------------------------------------------------------------

/// The blocks flipped in b's backing file: 40 MiB, 40 MiB + 12 KiB, the last block, and one
/// seeded block between 9 MiB and 39 MiB (all outside the workload's first 8 MiB).
fn flip_offsets(seed: u64, size: u64) -> BTreeSet<u64> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x666c_6970);
    let seeded = rng.random_range((9 * MIB / BLOCK)..(39 * MIB / BLOCK)) * BLOCK;
    [40 * MIB, 40 * MIB + 12 * 1024, size - BLOCK, seeded]
        .into_iter()
        .collect()
}

/// Flips a few seeded bytes of each block at `offsets` in the file `path` (pread, XOR,
/// pwrite, fdatasync), behind the daemon's back. Returns the blocks as they were.
fn flip_blocks(path: &Path, offsets: &BTreeSet<u64>, seed: u64) -> BTreeMap<u64, Vec<u8>> {
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|error| panic!("open {}: {error}", path.display()));
    let mut rng = StdRng::seed_from_u64(seed ^ 0x6269_7473);
    let mut before = BTreeMap::new();
    for &offset in offsets {
        let mut block = vec![0u8; BLOCK_BYTES];
        file.read_exact_at(&mut block, offset)
            .unwrap_or_else(|error| panic!("pread {offset}: {error}"));
        before.insert(offset, block.clone());
        for _ in 0..rng.random_range(1..=8) {
            let at = rng.random_range(0..BLOCK_BYTES);
            block[at] ^= rng.random_range(1..=255u8);
        }
        file.write_all_at(&block, offset)
            .unwrap_or_else(|error| panic!("pwrite {offset}: {error}"));
    }
    file.sync_data().expect("fdatasync of the flipped image");
    before
}

/// Reads the 4 KiB block at `offset` of the file `path`.
fn file_block(path: &Path, offset: u64) -> Vec<u8> {
    let file = fs::File::open(path).unwrap_or_else(|error| panic!("open {path:?}: {error}"));
    let mut block = vec![0u8; BLOCK_BYTES];
    file.read_exact_at(&mut block, offset)
        .unwrap_or_else(|error| panic!("pread {path:?} at {offset}: {error}"));
    block
}

/// Waits until node `id`'s journal is applied to its device (applied_lsn = head_lsn, no
/// unapplied bytes).
fn wait_journal_applied(cluster: &Cluster, id: NodeId) {
    let since = Instant::now();
    let volume = cluster.wait_volume(id, "journal applied", SETTLE_TIMEOUT, |v| {
        v["journal"]["applied_lsn"] == v["journal"]["head_lsn"]
            && v["journal"]["unapplied_bytes"] == 0
    });
    eprintln!(
        "node {}: journal applied after {:?}: {}",
        id.name(),
        since.elapsed(),
        volume["journal"]
    );
}

/// Checks a finished verify report against the flipped blocks; returns the problems.
fn flipped_report_problems(
    report: &Value,
    expected: &[(u64, u64)],
    bytes: u64,
    repaired: bool,
    what: &str,
) -> Vec<String> {
    let mut problems = Vec::new();
    if report_u64(report, "differing_bytes") != bytes {
        problems.push(format!(
            "{what}: differing_bytes {} instead of {bytes} (the flipped blocks): {report}",
            report["differing_bytes"]
        ));
    }
    if report_ranges(report) != expected {
        problems.push(format!(
            "{what}: differing_ranges {:?} instead of the flipped blocks {expected:?}",
            report_ranges(report)
        ));
    }
    if report["repaired"] != repaired || report["running"] != false {
        problems.push(format!(
            "{what}: repaired should be {repaired}, running false: {report}"
        ));
    }
    problems
}

/// Blocks flipped in b's backing file while b runs: `ferry verify vol` on a exits 1 and
/// reports exactly those blocks (status, metrics); `--repair` repairs them (exit 0, repaired)
/// by resyncing just them; a second verify finds nothing; b's blocks read a's contents,
/// through b's export and from the image files after a clean stop.
#[test]
fn metro_repair_verify_finds_and_repairs_flipped_blocks() {
    let seed = harness::test_seed("metro_repair_verify_finds_and_repairs_flipped_blocks");
    let test_started = Instant::now();
    let region_blocks = VERIFY_LOAD_REGION / BLOCK;
    let (mut cluster, baseline) = start_in_sync(
        ClusterOptions {
            seed,
            ..ClusterOptions::default()
        },
        region_blocks,
    );
    let size = cluster.volume_size_bytes();
    let mut rng = StdRng::seed_from_u64(seed ^ 0x7265_7061_6972);
    let ops: Vec<IoOp> = (0..300)
        .map(|_| random_op(&mut rng, VERIFY_LOAD_REGION, 16 * BLOCK))
        .collect();
    let mut expected = baseline.clone();
    for op in &ops {
        op.apply(&mut expected);
    }
    send_ops(&cluster.nbd_socket(A), &ops, "workload on a");
    wait_in_sync_settled(&cluster, SETTLE_TIMEOUT, "after the workload");
    let (output, _) = cli_verify(&cluster, &[]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "verify before the flips: {output}"
    );

    // 1. Flip bytes of a few blocks in b's backing file, behind b's back. Two of them hold
    // data on a (written now), the others zeros (never written): the repair sends both kinds.
    let offsets = flip_offsets(seed, size);
    let data_blocks: Vec<IoOp> = [40 * MIB, size - BLOCK]
        .into_iter()
        .map(|offset| IoOp::Write {
            offset,
            data: noise(&mut rng, BLOCK),
        })
        .collect();
    send_ops(
        &cluster.nbd_socket(A),
        &data_blocks,
        "data at two of the blocks to flip",
    );
    wait_in_sync_settled(&cluster, SETTLE_TIMEOUT, "after the data blocks");
    // The data must be on b's device (applied from its journal), or the flip would be
    // overwritten by the journal later, or hidden behind it.
    wait_journal_applied(&cluster, B);
    let ranges = merged_ranges(&offsets);
    let flipped_bytes = offsets.len() as u64 * BLOCK;
    let a_blocks: BTreeMap<u64, Vec<u8>> = offsets
        .iter()
        .map(|&offset| (offset, read_blocks(&cluster, A, offset / BLOCK, 1)))
        .collect();
    let b_image = cluster.node(B).spec.device_path();
    let before = flip_blocks(&b_image, &offsets, seed);
    for (offset, block) in &before {
        assert_eq!(
            Some(block),
            a_blocks.get(offset),
            "b's image at {offset} differed from a's copy before the flip"
        );
    }
    eprintln!(
        "[{:?}] flipped blocks at {offsets:?} in {}",
        test_started.elapsed(),
        b_image.display()
    );
    for &offset in &offsets {
        let through_b = read_blocks(&cluster, B, offset / BLOCK, 1);
        assert_ne!(
            Some(&through_b),
            a_blocks.get(&offset),
            "b's export does not show the flip at {offset} (does b cache reads?)"
        );
    }

    // 2. verify: exit 1, exactly the flipped blocks.
    let resync_before = cluster.metric(A, "ferry_resync_bytes_total", &["peer=\"b\""]);
    let (output, _) = cli_verify(&cluster, &[]);
    let report = status_verify(&cluster);
    eprintln!("status verify: {report}");
    assert_eq!(
        output.status.code(),
        Some(1),
        "verify of copies that differ must exit 1: {output}\nreport {report}"
    );
    assert!(
        output.stdout.contains("DIFFER"),
        "verify's line does not say the copies differ: {output}"
    );
    let problems = flipped_report_problems(&report, &ranges, flipped_bytes, false, "verify");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert_eq!(report_u64(&report, "checked_bytes"), size, "{report}");
    assert_eq!(report_u64(&report, "busy_bytes"), 0, "{report}");
    assert_verify_metric(
        &cluster,
        flipped_bytes,
        "after the verify of the flipped blocks",
    );
    assert_eq!(
        cluster.replica_state(A),
        "in-sync",
        "a verify without --repair changed the replica"
    );
    // Without --repair nothing was repaired.
    for &offset in &offsets {
        let through_b = read_blocks(&cluster, B, offset / BLOCK, 1);
        assert_ne!(
            Some(&through_b),
            a_blocks.get(&offset),
            "a verify without --repair changed b's block at {offset}"
        );
    }

    // 3. verify --repair: exit 0, repaired, just those blocks resynced.
    let (output, _) = cli_verify(&cluster, &["--repair"]);
    let report = status_verify(&cluster);
    eprintln!("status verify after --repair: {report}");
    assert_eq!(output.status.code(), Some(0), "verify --repair: {output}");
    assert!(
        output.stdout.contains("repaired"),
        "verify --repair's line does not say repaired: {output}"
    );
    let problems =
        flipped_report_problems(&report, &ranges, flipped_bytes, true, "verify --repair");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert_eq!(report["repair"], true, "{report}");
    let replica = wait_in_sync_settled(&cluster, SETTLE_TIMEOUT, "after the repair");
    let resynced = replica["resynced_bytes"].as_u64().unwrap_or(0);
    let resync_metric =
        cluster.metric(A, "ferry_resync_bytes_total", &["peer=\"b\""]) - resync_before;
    eprintln!("repair: resynced_bytes {resynced}, ferry_resync_bytes_total +{resync_metric}");
    // SPEC §6: the counter counts the bytes sent by a verify repair; at least the data
    // blocks travel as data (zero blocks may travel as zero ranges).
    let data_bytes = data_blocks.len() as u64 * BLOCK;
    assert!(
        resync_metric >= data_bytes as f64,
        "ferry_resync_bytes_total grew by {resync_metric} for a repair that sent \
         {data_bytes} bytes of data blocks"
    );
    assert!(
        resynced >= flipped_bytes && resynced <= 16 * flipped_bytes,
        "the repair resynced {resynced} bytes for {flipped_bytes} bytes of flipped blocks: \
         {replica}"
    );

    // b's blocks now hold a's contents.
    for &offset in &offsets {
        let through_b = read_blocks(&cluster, B, offset / BLOCK, 1);
        assert_eq!(
            Some(&through_b),
            a_blocks.get(&offset),
            "b's block at {offset} was not repaired (read through b's export)"
        );
    }

    // 4. A second verify: exit 0, no difference; status and metrics follow.
    let (output, _) = cli_verify(&cluster, &[]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "verify after the repair: {output}"
    );
    let report = status_verify(&cluster);
    let problems = equal_report_problems(&report, size, "verify after the repair");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert_verify_metric(&cluster, 0, "after the verify following the repair");
    let region_b = read_region(&cluster.nbd_socket(B), region_blocks);
    assert_region(
        "b",
        &region_b,
        &expected,
        0,
        "b's workload region after the repair",
    );
    assert_copies_identical(&cluster, "after the repair");

    // 5. After a clean stop of both, the image files agree at the flipped blocks.
    cluster.stop(A);
    cluster.stop(B);
    let a_image = cluster.node(A).spec.device_path();
    for &offset in &offsets {
        let on_a = file_block(&a_image, offset);
        let on_b = file_block(&b_image, offset);
        assert_eq!(
            on_b,
            on_a,
            "after a clean stop, b's image differs from a's at {offset} ({} vs {})",
            hex8(&on_b),
            hex8(&on_a)
        );
        assert_eq!(Some(&on_a), a_blocks.get(&offset), "a's image at {offset}");
    }
    eprintln!("[{:?}] done", test_started.elapsed());
}

/// A verify while a light load writes the first 8 MiB must still find a block flipped in
/// b's backing file far from the load (at 40 MiB): a busy range is one the load wrote, never
/// the whole volume, and a verify that compared nothing must not exit 0 as if the copies
/// were equal.
#[test]
fn metro_repair_verify_under_light_load_still_finds_a_flipped_block() {
    let seed =
        harness::test_seed("metro_repair_verify_under_light_load_still_finds_a_flipped_block");
    let test_started = Instant::now();
    let (mut cluster, _) = start_in_sync(
        ClusterOptions {
            seed,
            ..ClusterOptions::default()
        },
        1,
    );
    let size = cluster.volume_size_bytes();
    let offsets: BTreeSet<u64> = [40 * MIB].into_iter().collect();
    let b_image = cluster.node(B).spec.device_path();
    flip_blocks(&b_image, &offsets, seed);

    let load = LightLoad::start(
        &cluster.nbd_socket(A),
        seed ^ 0x6c6f_6164,
        VERIFY_LOAD_REGION,
        Duration::from_millis(20),
    );
    std::thread::sleep(Duration::from_millis(300));
    let (output, took) = cli_verify(&cluster, &[]);
    let report = status_verify(&cluster);
    let ops = load.count();
    let done = load.finish();
    eprintln!(
        "[{:?}] verify under load ({ops} operations during it, {} in all) took {took:?}: {report}",
        test_started.elapsed(),
        done.len()
    );
    let mut problems = Vec::new();
    if report_u64(&report, "busy_bytes") > VERIFY_LOAD_REGION {
        problems.push(format!(
            "{} of {size} bytes reported busy (not compared) although the load wrote only the \
             first {VERIFY_LOAD_REGION} bytes",
            report["busy_bytes"]
        ));
    }
    if report_ranges(&report) != vec![(40 * MIB, BLOCK)] {
        problems.push(format!(
            "the block flipped at {} was not reported: differing_ranges {:?}",
            40 * MIB,
            report_ranges(&report)
        ));
    }
    if output.status.code() != Some(1) {
        problems.push(format!(
            "ferry verify exited {:?} (expected 1: the copies differ): {}",
            output.status.code(),
            output.stdout.trim()
        ));
    }
    // Quiet again: the same verify finds it (the test's own sanity check).
    wait_in_sync_settled(&cluster, SETTLE_TIMEOUT, "after the load");
    let (quiet, _) = cli_verify(&cluster, &[]);
    let quiet_report = status_verify(&cluster);
    assert_eq!(
        report_ranges(&quiet_report),
        vec![(40 * MIB, BLOCK)],
        "a quiet verify does not find the flipped block either: {quiet}"
    );
    cluster.stop(A);
    cluster.stop(B);
    assert!(
        problems.is_empty(),
        "VERIFY UNDER A LIGHT LOAD (seed {seed}): one operation every 20 ms in the first \
         {VERIFY_LOAD_REGION} bytes, a block flipped in b's image at {}:\n- {}\nreport: \
         {report}",
        40 * MIB,
        problems.join("\n- ")
    );
}

/// A verify whose link is lost after its first pass (by 1 MiB blocks) and before its second
/// (by 4 KiB blocks, for the 1 MiB blocks that differ) has not compared everything: it must
/// not end as "no difference" with exit 0 while a block differs. The link gets a 150 ms
/// one-way delay so that the window between the passes is wide, and is cut once a's status
/// shows the first pass compared: every byte but the differing 1 MiB block has a verdict
/// (checked_bytes = total - 1 MiB) and nothing is found different yet. The status must then
/// show a verify that stopped early (checked + busy < total), and `ferry verify` exit 1.
#[test]
fn metro_repair_verify_cut_between_passes_is_not_a_clean_result() {
    let seed = harness::test_seed("metro_repair_verify_cut_between_passes_is_not_a_clean_result");
    let test_started = Instant::now();
    let (mut cluster, _) = start_in_sync(
        ClusterOptions {
            relay: true,
            seed,
            ..ClusterOptions::default()
        },
        1,
    );
    let size = cluster.volume_size_bytes();
    let mut rng = StdRng::seed_from_u64(seed ^ 0x0063_7574);
    let flipped = rng.random_range((16 * MIB / BLOCK)..(size / BLOCK)) * BLOCK;
    let offsets: BTreeSet<u64> = [flipped].into_iter().collect();
    flip_blocks(&cluster.node(B).spec.device_path(), &offsets, seed);
    cluster.relay().both().set_delay(Duration::from_millis(150));
    std::thread::sleep(Duration::from_millis(500));

    let socket = cluster.node(A).spec.control_socket();
    let verify = std::thread::spawn(move || {
        harness::run_with_timeout(
            std::process::Command::new(harness::FERRY_BIN)
                .arg("--socket")
                .arg(socket)
                .args(["verify", VOLUME]),
            VERIFY_TIMEOUT,
        )
    });
    // Wait for the first pass to be compared, then cut at once.
    let deadline = Instant::now() + VERIFY_TIMEOUT;
    let cut_at = loop {
        let volume = cluster.node(A).try_volume_status().unwrap_or_default();
        let report = cluster::replica_of(&volume, "b")
            .map(|r| r["verify"].clone())
            .unwrap_or(Value::Null);
        if report["running"] == true
            && report["checked_bytes"] == size - MIB
            && report["differing_bytes"] == 0
        {
            cluster.relay().both().cut();
            eprintln!(
                "[{:?}] first pass compared, link cut: {report}",
                test_started.elapsed()
            );
            break report;
        }
        if report["running"] == false && !report.is_null() {
            panic!("the verify ended before the first pass was seen compared: {report}");
        }
        assert!(
            Instant::now() < deadline,
            "the verify never finished its first pass"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let output = verify.join().expect("verify thread");
    let report = status_verify(&cluster);
    eprintln!(
        "[{:?}] verify after the cut: exit {:?}: {}{}; report {report}",
        test_started.elapsed(),
        output.status.code(),
        output.stdout.trim(),
        output.stderr.trim()
    );
    let mut problems = Vec::new();
    if cut_at["differing_bytes"] != 0 {
        problems.push(format!(
            "(the cut came too late to test the window: {cut_at})"
        ));
    }
    if output.status.code() == Some(0) {
        problems.push(format!(
            "ferry verify exited 0 although the link was lost before the 4 KiB pass and the \
             block at {flipped} differs: {}",
            output.stdout.trim()
        ));
    }
    if report["differing_bytes"] == 0 && output.stdout.contains("no difference") {
        problems.push(format!(
            "the verify says \"no difference\" although a 1 MiB block differed and its 4 KiB \
             pass never ran: {}",
            output.stdout.trim()
        ));
    }
    if report["running"] != false
        || report_u64(&report, "checked_bytes") + report_u64(&report, "busy_bytes") >= size
    {
        problems.push(format!(
            "the status does not show a verify that stopped before comparing everything \
             (checked_bytes + busy_bytes < total_bytes): {report}"
        ));
    }
    if output.status.code() == Some(1) && !output.stderr.contains("run it again") {
        problems.push(format!(
            "ferry verify exited 1 without saying to run it again: {}",
            output.stderr.trim()
        ));
    }

    // The link back: a quiet verify finds the block (the test's own sanity check).
    cluster.relay().both().clear();
    wait_in_sync_settled(&cluster, RESYNC_TIMEOUT, "after the link came back");
    let (quiet, _) = cli_verify(&cluster, &[]);
    assert_eq!(
        report_ranges(&status_verify(&cluster)),
        vec![(flipped, BLOCK)],
        "a verify with the link back does not find the flipped block: {quiet}"
    );
    cluster.stop(A);
    cluster.stop(B);
    assert!(
        problems.is_empty(),
        "VERIFY INTERRUPTED BETWEEN ITS PASSES (seed {seed}):\n- {}",
        problems.join("\n- ")
    );
}

/// A difference found by verify is detected corruption: SPEC §2 "Never silent" wants it
/// logged once with its cause, besides status and metrics. The primary's log names the
/// verify's finding once (the differing range), and `ferry_checksum_errors_total
/// {where="verify"}` counts it.
#[test]
fn metro_repair_verify_difference_is_logged() {
    let seed = harness::test_seed("metro_repair_verify_difference_is_logged");
    let (mut cluster, _) = start_in_sync(
        ClusterOptions {
            seed,
            ..ClusterOptions::default()
        },
        1,
    );
    let offsets: BTreeSet<u64> = [40 * MIB].into_iter().collect();
    flip_blocks(&cluster.node(B).spec.device_path(), &offsets, seed);
    let (output, _) = cli_verify(&cluster, &[]);
    assert_eq!(output.status.code(), Some(1), "verify: {output}");
    assert_verify_metric(&cluster, BLOCK, "after the verify");
    let counted = |cluster: &Cluster| {
        cluster.metric(
            A,
            "ferry_checksum_errors_total",
            &["where=\"verify\"", &format!("volume=\"{VOLUME}\"")],
        )
    };
    assert_eq!(
        counted(&cluster),
        1.0,
        "ferry_checksum_errors_total{{where=\"verify\"}} after one verify that found a difference"
    );
    // The log is written as the verify ends; give it a moment.
    std::thread::sleep(Duration::from_millis(500));
    let log = cluster.node(A).log_tail();
    let range = format!("{}+{BLOCK}", 40 * MIB);
    let finding: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("verify") && line.contains(&range))
        .collect();
    eprintln!("a's log lines naming the verify's finding: {finding:?}");
    // A clean verify after a repair adds no such line, and nothing to the counter.
    let (repair, _) = cli_verify(&cluster, &["--repair"]);
    assert_eq!(repair.status.code(), Some(0), "verify --repair: {repair}");
    let (clean, _) = cli_verify(&cluster, &[]);
    assert_eq!(
        clean.status.code(),
        Some(0),
        "verify after the repair: {clean}"
    );
    let after_repair = counted(&cluster);
    std::thread::sleep(Duration::from_millis(300));
    let log = cluster.node(A).log_tail();
    let lines_after = log
        .lines()
        .filter(|line| line.contains("verify") && line.contains(&range))
        .count();
    cluster.stop(A);
    cluster.stop(B);
    assert_eq!(
        finding.len(),
        1,
        "verify found {BLOCK} bytes differing at {} (a block flipped in b's image); a's log must \
         name it once (SPEC §2: a detected corruption is logged once with its cause): {finding:?}",
        40 * MIB
    );
    // The repair's verify found the same block again (logged once more), the clean one
    // nothing.
    assert_eq!(
        lines_after, 2,
        "log lines naming {range} after repair and clean verify"
    );
    assert_eq!(
        after_repair, 2.0,
        "ferry_checksum_errors_total{{where=\"verify\"}} after the repair and a clean verify"
    );
}

/// A volume whose size is not a multiple of the verify's 1 MiB first-pass block (64 MiB +
/// 12 KiB): the short last block is compared like the others. A block flipped in it (the
/// volume's last 4 KiB) and one just before it are found exactly, repaired, and a second
/// verify is clean; the link stays up throughout.
#[test]
fn metro_repair_verify_a_volume_with_a_short_last_block() {
    let seed = harness::test_seed("metro_repair_verify_a_volume_with_a_short_last_block");
    let size = 64 * MIB + 12 * 1024;
    let (mut cluster, _) = start_in_sync(
        ClusterOptions {
            seed,
            size: size.to_string(),
            ..ClusterOptions::default()
        },
        1,
    );
    assert_eq!(cluster.volume_size_bytes(), size);
    let offsets: BTreeSet<u64> = [64 * MIB - BLOCK, size - BLOCK].into_iter().collect();
    flip_blocks(&cluster.node(B).spec.device_path(), &offsets, seed);
    let monitor = cluster.monitor(A);
    let (output, _) = cli_verify(&cluster, &[]);
    let report = status_verify(&cluster);
    let problems = flipped_report_problems(
        &report,
        &merged_ranges(&offsets),
        2 * BLOCK,
        false,
        "verify of a volume with a short last block",
    );
    assert!(problems.is_empty(), "{}\n{output}", problems.join("\n"));
    assert_eq!(output.status.code(), Some(1), "verify: {output}");
    assert_eq!(report_u64(&report, "checked_bytes"), size, "{report}");
    let (output, _) = cli_verify(&cluster, &["--repair"]);
    assert_eq!(output.status.code(), Some(0), "verify --repair: {output}");
    wait_in_sync_settled(&cluster, SETTLE_TIMEOUT, "after the repair");
    let (output, _) = cli_verify(&cluster, &[]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "verify after the repair: {output}"
    );
    let problems = equal_report_problems(&status_verify(&cluster), size, "after the repair");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let states = monitor.stop();
    let formatted = format_states(&states);
    eprintln!("a's replica of b during the verifies: {formatted}");
    assert!(
        states
            .iter()
            .all(|(_, state)| state != "connecting" && state != "degraded"),
        "the link to b was lost during the verifies: {formatted}"
    );
    assert_copies_identical(&cluster, "after the repair");
    cluster.stop(A);
    cluster.stop(B);
}
