//! Power loss of a metro primary (feature `fault-injection`), then each way back, on two real
//! `ferry run` processes (SPEC §2; review finding F1).
//!
//! Node a (primary) runs with `FERRY_FAULT_POWER_LOSS=1`, so every file it opens through its
//! storage layer keeps an undo log. Concurrent writers on a first send a mix of plain, FUA and
//! FLUSHed writes, then only plain writes for a few hundred milliseconds, so that a's journal
//! holds a tail of completed writes that nothing has made durable yet (the applier syncs the
//! journal at most every 250 ms) while b, which syncs its journal every 20 ms, holds them.
//! a is killed with SIGKILL and every write it had not made durable is taken back
//! (`ferry::storage::power_loss::revert_dir`, seeded), in its node directory (the device
//! image) and its data directory (journal, metadata, dirty maps). Then:
//!
//! - **Failover** (`metro_power_loss_failover_then_rejoin`): `ferry promote vol --force` on
//!   b; every write a client saw complete is on b (Metro RPO 0); more writes on b; a restarts
//!   and must rejoin as b's secondary (never accepting a write), b must report it in-sync
//!   with no lag, `ferry verify vol` on b must exit 0 with no difference, and both exports
//!   must be byte-identical.
//! - **Restart without failover** (`metro_power_loss_restart_as_primary_gets_the_tail_back`):
//!   a restarts behind a cut link: it must hold writes and say so (`writes_held` naming
//!   `ferry promote`); on its own it holds every FUA or FLUSHed write (the power-loss rule).
//!   When the link heals it hears from b and is primary again; the records b holds and a lost
//!   must come back to a (every write a client saw complete is on a), a must report b
//!   in-sync, `ferry verify vol` on a must exit 0, and both exports must be byte-identical.
//!
//! - **Crash while degraded** (`metro_degraded_primary_{kill9,power_loss}_then_reconnect_*`):
//!   the link is cut first, a degrades and takes the workload alone (its writes complete on
//!   marks in memory; the journal keeps each record until the map is stored), then a is killed
//!   -9 or loses power. After the restart and the link's return, the delta resync must carry
//!   every write b lacks: b holds every completed write (kill -9), both copies are
//!   byte-identical and `ferry verify` finds no difference. The workload covers the whole
//!   volume so that the map stays sparse and the last writes before the crash are known only
//!   from the journal (recovery marking nothing fails both with hundreds of blocks missing).
//!
//! Each run prints what the fault took: the records a's recovery replayed and its head
//! against b's, the bytes the undo-log revert gave back per file, the completed writes that
//! were not durable at the kill, and the resync bytes. A seed whose power loss took nothing
//! from the journal says so. Seeded: FERRY_SEED replays a run (timing aside).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry::storage::power_loss::{self, RevertReport};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::Value;

use crate::cluster::{
    self, Cluster, ClusterOptions, NodeId,
    NodeId::{A, B},
    VOLUME,
};
use crate::harness;
use crate::metro::{
    self, block_contents, describe_block, first_difference, read_region, Workload, WorkloadSpec,
    RESYNC_TIMEOUT, ROLE_TIMEOUT, SYNC_TIMEOUT,
};
use crate::model::{self, FlushRecord, History, WriteRecord, WriteShape, BLOCK_BYTES};
use crate::nbd_wire::NbdConn;

const POWER_LOSS_ENV: (&str, &str) = ("FERRY_FAULT_POWER_LOSS", "1");
/// The workload writes blocks [0, REGION_BLOCKS): 8 MiB of the 64 MiB volume.
const REGION_BLOCKS: u64 = 2048;
const WRITERS: u64 = 4;
/// Writes of the plain phase carry writer ids from here on (ids stay unique in the round).
const PLAIN_WRITER_BASE: u64 = 8;
/// Writes are 4 KiB to 64 KiB, as in `metro.rs`.
const BLOCKS_PER_WRITE_MAX: u64 = 16;
/// A plain-phase writer stops after this many writes even if nobody stops it.
const PLAIN_WRITES_MAX: u64 = 1_000_000;
/// Every writer reaches the plain phase within this (its mixed writes are few).
const MIXED_PHASE_TIMEOUT: Duration = Duration::from_secs(60);
/// Writer threads finish within this after the kill or the stop.
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long b's journal head must stay still after a's death to count as settled.
const SETTLE_QUIET: Duration = Duration::from_millis(300);
/// At most this long is spent waiting for b's head to settle.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a write to a restarted, fenced a must stay held while the link is cut.
const FENCE_WINDOW: Duration = Duration::from_secs(3);
/// Socket timeout of the held write (it completes once a is primary again and in sync).
const HELD_WRITE_TIMEOUT: Duration = Duration::from_secs(120);
/// Log lines shown per node in a failure report.
const LOG_LINES_MAX: usize = 80;
/// The round stamped into writes made outside the workload (the held probe).
const EXTRA_ROUND: u64 = 0x70;

// ---------------------------------------------------------------------------------------------
// The workload: mixed writes, then plain writes only until the power loss
// ---------------------------------------------------------------------------------------------

/// Concurrent writers on a, each on its own NBD connection: `mixed_writes` writes with FUA (one
/// in 8) and FLUSH (after one in 16), then plain writes only until they are stopped or the
/// daemon dies. All writes are recorded on one clock in one [`History`].
struct PowerLoad {
    spec: WorkloadSpec,
    history: Arc<History>,
    /// Writers that finished their mixed writes and now send plain writes only.
    plain_writers: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

/// What the writers did.
struct LoadOutcome {
    records: HashMap<u64, WriteRecord>,
    flushes: Vec<FlushRecord>,
    errors: Vec<(Instant, String)>,
}

impl PowerLoad {
    fn start(socket: &Path, spec: WorkloadSpec, mixed_writes: u64) -> PowerLoad {
        let history = Arc::new(History::default());
        let plain_writers = Arc::new(AtomicU64::new(0));
        let threads = (0..spec.writers)
            .map(|writer| {
                let history = Arc::clone(&history);
                let plain_writers = Arc::clone(&plain_writers);
                let socket = socket.to_path_buf();
                std::thread::spawn(move || {
                    power_writer(
                        &socket,
                        writer,
                        spec,
                        mixed_writes,
                        &history,
                        &plain_writers,
                    )
                })
            })
            .collect();
        PowerLoad {
            spec,
            history,
            plain_writers,
            threads,
        }
    }

    /// Waits until every writer sends plain writes only; false after `timeout` or if a
    /// writer stopped on an error.
    fn wait_plain_phase(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.plain_writers.load(Ordering::SeqCst) == self.spec.writers {
                return true;
            }
            if !self.history.errors().is_empty() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    /// Tells the writers to stop and joins them (bounded).
    fn finish(self) -> LoadOutcome {
        self.history.stop();
        let deadline = Instant::now() + JOIN_TIMEOUT;
        for thread in self.threads {
            while !thread.is_finished() {
                assert!(
                    Instant::now() < deadline,
                    "writers did not stop within {JOIN_TIMEOUT:?}"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            if let Err(panic) = thread.join() {
                std::panic::resume_unwind(panic);
            }
        }
        LoadOutcome {
            records: self.history.records(),
            flushes: self.history.flushes(),
            errors: self.history.errors(),
        }
    }
}

fn power_writer(
    socket: &Path,
    writer: u64,
    spec: WorkloadSpec,
    mixed_writes: u64,
    history: &History,
    plain_writers: &AtomicU64,
) {
    let mut conn = match NbdConn::connect_unix(socket, VOLUME) {
        Ok(conn) => conn,
        Err(error) => {
            history.error(format!("writer {writer}: connect: {error}"));
            return;
        }
    };
    let mut rng = StdRng::seed_from_u64(
        spec.seed ^ (spec.round << 32) ^ writer.wrapping_mul(0x9e37_79b9) ^ 0x706f_7765,
    );
    let mixed = WriteShape {
        region_blocks: spec.region_blocks,
        max_blocks_per_write: BLOCKS_PER_WRITE_MAX,
        writes_max: mixed_writes,
        fua_one_in: 8,
        flush_one_in: 16,
    };
    if !model::run_writer(&mut conn, writer, &mut rng, mixed, &spec, history) {
        return;
    }
    plain_writers.fetch_add(1, Ordering::SeqCst);
    let plain = WriteShape {
        writes_max: PLAIN_WRITES_MAX,
        fua_one_in: 0,
        flush_one_in: 0,
        ..mixed
    };
    let plain_writer = PLAIN_WRITER_BASE + writer;
    if model::run_writer(&mut conn, plain_writer, &mut rng, plain, &spec, history) {
        conn.disconnect();
    }
}

impl LoadOutcome {
    fn fua_completed(&self) -> usize {
        self.records
            .values()
            .filter(|record| record.fua && record.completed_at.is_some())
            .count()
    }

    fn flushes_completed(&self) -> usize {
        self.flushes
            .iter()
            .filter(|flush| flush.completed_at.is_some())
            .count()
    }

    /// Completed writes nothing made durable: neither FUA nor followed by a completed FLUSH
    /// issued after they completed. A power loss may take exactly these.
    fn not_durable(&self) -> usize {
        let last_flush = self
            .flushes
            .iter()
            .filter(|flush| flush.completed_at.is_some())
            .map(|flush| flush.issued_at)
            .max();
        self.records
            .values()
            .filter(|record| {
                record.completed_at.is_some_and(|completed_at| {
                    !record.fua && last_flush.is_none_or(|issued_at| issued_at < completed_at)
                })
            })
            .count()
    }

    fn errors_before(&self, instant: Instant) -> Vec<String> {
        self.errors
            .iter()
            .filter(|(at, _)| *at < instant)
            .map(|(_, text)| text.clone())
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// The power loss
// ---------------------------------------------------------------------------------------------

/// What the power loss of a did, for the checks and the report.
struct PowerLoss {
    load: LoadOutcome,
    /// How long the writers sent plain writes only before the kill.
    plain_for: Duration,
    /// Writes completed when the kill came.
    completed_at_kill: u64,
    /// a's journal head shortly before the kill, and b's once it settled after the kill.
    a_head_before_kill: Option<u64>,
    b_head_after_kill: u64,
    /// Every file of a with an undo log, and what the revert did to it.
    reverted: Vec<(PathBuf, RevertReport)>,
}

impl PowerLoss {
    fn bytes_reverted(&self, file_name: &str) -> u64 {
        self.reverted
            .iter()
            .filter(|(path, _)| path.file_name().is_some_and(|name| name == file_name))
            .map(|(_, report)| report.sectors_reverted * 512)
            .sum()
    }

    fn journal_bytes_reverted(&self) -> u64 {
        self.bytes_reverted(&format!("{VOLUME}.journal"))
    }

    fn print(&self, what: &str) {
        eprintln!(
            "{what}: a killed after {:?} of plain writes; {} writes issued, {} completed before \
             the kill ({} FUA, {} FLUSHes completed), {} completed writes not durable at the \
             kill; a's head before the kill ~{:?}, b's head after it {}",
            self.plain_for,
            self.load.records.len(),
            self.completed_at_kill,
            self.load.fua_completed(),
            self.load.flushes_completed(),
            self.load.not_durable(),
            self.a_head_before_kill,
            self.b_head_after_kill,
        );
        for (path, report) in &self.reverted {
            eprintln!(
                "{what}: undo-log revert of {}: {} bytes taken back ({report:?})",
                path.display(),
                report.sectors_reverted * 512
            );
        }
        if self.journal_bytes_reverted() == 0 {
            eprintln!(
                "{what}: this seed's power loss took NOTHING back from a's journal: no tail was \
                 removed"
            );
        }
    }
}

/// Plays a power loss on every file of node `id` that has an undo log, in its node directory
/// (the device image) and its data directory; the device image and the journal must have had
/// one, and no undo log may be left.
fn revert_node(cluster: &Cluster, id: NodeId, seed: u64) -> Vec<(PathBuf, RevertReport)> {
    let dir = cluster.node(id).spec.dir.clone();
    let mut reverted = Vec::new();
    for (index, dir) in [dir.clone(), dir.join("data")].iter().enumerate() {
        let reports = power_loss::revert_dir(dir, seed ^ ((index as u64) << 56))
            .unwrap_or_else(|error| panic!("revert the undo logs in {}: {error}", dir.display()));
        reverted.extend(reports);
    }
    let spec = &cluster.node(id).spec;
    for file in [
        spec.device_path(),
        dir.join("data").join(format!("{VOLUME}.journal")),
    ] {
        assert!(
            reverted.iter().any(|(path, _)| *path == file),
            "node {}: no undo log for {} (is FERRY_FAULT_POWER_LOSS=1 working?): {reverted:?}",
            id.name(),
            file.display()
        );
    }
    for dir in [dir.clone(), dir.join("data")] {
        let left: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|error| panic!("list {}: {error}", dir.display()))
            .map(|entry| entry.expect("directory entry").path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "undo"))
            .collect();
        assert!(left.is_empty(), "undo logs left after the revert: {left:?}");
    }
    reverted
}

fn head_lsn(volume: &Value) -> Option<u64> {
    volume["journal"]["head_lsn"].as_u64()
}

/// Polls node `id`'s journal head until it has not moved for SETTLE_QUIET (records a shipped
/// before it died may still be on their way into b's journal); gives up moving on after
/// SETTLE_TIMEOUT and returns the last head seen.
fn settled_head(cluster: &Cluster, id: NodeId) -> u64 {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let mut last = head_lsn(&cluster.volume_status(id)).expect("head_lsn");
    let mut still_since = Instant::now();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        let head = head_lsn(&cluster.volume_status(id)).expect("head_lsn");
        if head != last {
            last = head;
            still_since = Instant::now();
        } else if still_since.elapsed() >= SETTLE_QUIET {
            break;
        }
    }
    last
}

/// With a and b in sync: the workload on a (mixed, then plain for a seeded few hundred ms),
/// SIGKILL of a, then the loss of everything a had not made durable.
fn load_then_power_loss(cluster: &mut Cluster, spec: WorkloadSpec, rng: &mut StdRng) -> PowerLoss {
    cluster.wait_replica_state(A, "in-sync", RESYNC_TIMEOUT);
    let mixed_writes = rng.random_range(60..200);
    let plain_for = Duration::from_millis(rng.random_range(250..700));
    let revert_seed = rng.random::<u64>();
    let load = PowerLoad::start(&cluster.nbd_socket(A), spec, mixed_writes);
    if !load.wait_plain_phase(MIXED_PHASE_TIMEOUT) {
        let errors = load.history.errors();
        panic!(
            "the writers did not all reach the plain phase within {MIXED_PHASE_TIMEOUT:?} \
             (seed {}): errors {errors:?}; a: {}",
            spec.seed,
            cluster.volume_status(A)
        );
    }
    std::thread::sleep(plain_for);
    let a_head_before_kill = cluster
        .node(A)
        .try_volume_status()
        .ok()
        .and_then(|v| head_lsn(&v));
    let killed_at = Instant::now();
    let completed_at_kill = load.history.completed();
    cluster.kill9(A);
    let load = load.finish();
    let early = load.errors_before(killed_at);
    assert!(
        early.is_empty(),
        "writes failed before the kill (seed {}): {early:?}",
        spec.seed
    );
    assert!(completed_at_kill > 0, "no write completed before the kill");
    let b_head_after_kill = settled_head(cluster, B);
    let reverted = revert_node(cluster, A, revert_seed);
    PowerLoss {
        load,
        plain_for,
        completed_at_kill,
        a_head_before_kill,
        b_head_after_kill,
        reverted,
    }
}

// ---------------------------------------------------------------------------------------------
// Checks and reports
// ---------------------------------------------------------------------------------------------

/// a with the power-loss switch; a relay between a and b, so that a test can cut the link
/// while a restarts (the failover test leaves it alone).
fn cluster_options(seed: u64) -> ClusterOptions {
    ClusterOptions {
        relay: true,
        seed,
        env_a: vec![(POWER_LOSS_ENV.0.to_string(), POWER_LOSS_ENV.1.to_string())],
        ..ClusterOptions::default()
    }
}

/// Starts a and b and waits for the initial sync; returns the region before any write.
fn start_in_sync(seed: u64) -> (Cluster, Vec<u8>) {
    let cluster = Cluster::start(cluster_options(seed));
    cluster.wait_replica_state(A, "in-sync", SYNC_TIMEOUT);
    let baseline = read_region(&cluster.nbd_socket(A), REGION_BLOCKS);
    (cluster, baseline)
}

/// The model's violations (first few) as one failure text, or None.
fn violations_text(violations: &[String], what: &str) -> Option<String> {
    if violations.is_empty() {
        return None;
    }
    Some(format!(
        "{what}: {} blocks violate the model; the first ones:\n    {}",
        violations.len(),
        violations
            .iter()
            .take(12)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n    ")
    ))
}

/// Compares the whole volume on both nodes; None if identical, else how many blocks differ
/// and what each node holds in the first of them.
fn compare_nodes(cluster: &Cluster) -> Option<String> {
    let blocks = cluster.volume_size_bytes() / BLOCK_BYTES as u64;
    let a = read_region(&cluster.nbd_socket(A), blocks);
    let b = read_region(&cluster.nbd_socket(B), blocks);
    first_difference(&a, &b).map(|at| {
        let block = at / BLOCK_BYTES;
        let range = block * BLOCK_BYTES..(block + 1) * BLOCK_BYTES;
        let differing: Vec<usize> = (0..blocks as usize)
            .filter(|block| {
                let range = block * BLOCK_BYTES..(block + 1) * BLOCK_BYTES;
                a[range.clone()] != b[range]
            })
            .collect();
        format!(
            "a and b differ in {} blocks ({:?}{}); the first is block {block}: a holds [{}], b \
             holds [{}]",
            differing.len(),
            &differing[..differing.len().min(16)],
            if differing.len() > 16 { ", ..." } else { "" },
            describe_block(&a[range.clone()], &b[range.clone()]),
            describe_block(&b[range.clone()], &a[range]),
        )
    })
}

/// `ferry verify vol` on node `id` through the CLI: must exit 0 and report no difference.
fn verify_cli(cluster: &Cluster, id: NodeId, failures: &mut Vec<String>) {
    let started = Instant::now();
    let output = cluster.node(id).ctl(&["verify", VOLUME]);
    eprintln!(
        "ferry verify {VOLUME} on {} took {:?}: exit {:?}: {}{}",
        id.name(),
        started.elapsed(),
        output.status.code(),
        output.stdout.trim(),
        output.stderr.trim()
    );
    if output.status.code() != Some(0) || !output.stdout.contains("no difference") {
        failures.push(format!(
            "`ferry verify {VOLUME}` on {} must exit 0 and report no difference: {output}",
            id.name()
        ));
    }
}

/// Waits until node `id` reports its peer in-sync with no lag; returns that replica, or the
/// failure text.
fn wait_peer_in_sync(cluster: &Cluster, id: NodeId, what: &str) -> Result<Value, String> {
    let peer = id.other().name();
    cluster
        .poll_volume(id, RESYNC_TIMEOUT, |volume| {
            cluster::replica_of(volume, peer)
                .map(|replica| replica["state"] == "in-sync" && replica["lag_bytes"] == 0)
                .unwrap_or(false)
        })
        .map(|volume| cluster::replica_of(&volume, peer).expect("replica"))
        .map_err(|last| {
            format!(
                "{} does not report {peer} in-sync with lag 0 within {RESYNC_TIMEOUT:?} {what}: \
                 {last}",
                id.name()
            )
        })
}

/// Fails the test with `failures` (if any), after printing both nodes' status and their
/// replication log lines; stops both nodes first (they must exit 0).
fn report(cluster: &mut Cluster, failures: &[String], seed: u64) {
    let status = |id: NodeId| {
        cluster
            .node(id)
            .try_volume_status()
            .unwrap_or_else(|error| error.into())
    };
    let text = format!(
        "--- final status a: {}\n--- final status b: {}\n--- replication log lines of a:\n{}\n\
         --- replication log lines of b:\n{}",
        status(A),
        status(B),
        cluster.replication_log(A, LOG_LINES_MAX),
        cluster.replication_log(B, LOG_LINES_MAX),
    );
    if !failures.is_empty() {
        eprintln!("{text}");
    }
    cluster.stop(A);
    cluster.stop(B);
    assert!(
        failures.is_empty(),
        "{} failed checks (replay with FERRY_SEED={seed}):\n- {}",
        failures.len(),
        failures.join("\n- ")
    );
}

/// How long after it was sent the server answered a write, and how; None while it is held.
type Answer = Option<(Duration, Result<(), String>)>;

/// One FUA write on its own connection and thread, to see whether and when a fenced node
/// completes it. The thread ends by itself within HELD_WRITE_TIMEOUT.
struct HeldWrite {
    answer: Arc<Mutex<Answer>>,
}

impl HeldWrite {
    fn start(socket: &Path, offset: u64, data: Vec<u8>) -> HeldWrite {
        let answer = Arc::new(Mutex::new(None));
        let slot = Arc::clone(&answer);
        let socket = socket.to_path_buf();
        let started_at = Instant::now();
        std::thread::spawn(move || {
            let result = (|| {
                let stream = std::os::unix::net::UnixStream::connect(&socket)
                    .map_err(|error| format!("connect: {error}"))?;
                stream
                    .set_read_timeout(Some(HELD_WRITE_TIMEOUT))
                    .and_then(|()| stream.set_write_timeout(Some(HELD_WRITE_TIMEOUT)))
                    .map_err(|error| error.to_string())?;
                let mut conn = NbdConn::handshake(Box::new(stream), VOLUME)
                    .map_err(|error| format!("handshake: {error}"))?;
                conn.write(offset, &data, true)
                    .map_err(|error| format!("write: {error}"))?;
                conn.disconnect();
                Ok(())
            })();
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some((started_at.elapsed(), result));
        });
        HeldWrite { answer }
    }

    fn answer(&self) -> Answer {
        self.answer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn wait(&self, timeout: Duration) -> Answer {
        let deadline = Instant::now() + timeout;
        loop {
            let answer = self.answer();
            if answer.is_some() || Instant::now() >= deadline {
                return answer;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn recovery_text(volume: &Value) -> String {
    let recovery = &volume["recovery"];
    format!(
        "recovery replayed {} records ({} bytes), torn tail {} bytes, stopped: {}",
        recovery["records_replayed"],
        recovery["bytes_replayed"],
        recovery["torn_tail_bytes"],
        recovery["stopped_reason"]
    )
}

// ---------------------------------------------------------------------------------------------
// Way 1: failover to b, then a rejoins
// ---------------------------------------------------------------------------------------------

/// Power loss of the primary a mid-workload, `promote --force` on b: every write a client saw
/// complete is on b (SPEC §2, Metro RPO 0); b writes more; a restarts and must rejoin as b's
/// secondary, reporting the ranges it had that b may not have, which b resyncs; b reports a
/// in-sync with lag 0, `ferry verify` on b finds no difference and the copies are identical
/// (review F1a: a's device must get back the blocks of the tail it lost).
#[test]
fn metro_power_loss_failover_then_rejoin() {
    let seed = harness::test_seed("metro_power_loss_failover_then_rejoin");
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed ^ 0x6661_696c);
    let spec = WorkloadSpec::once(seed, WRITERS, REGION_BLOCKS);
    let (mut cluster, baseline) = start_in_sync(seed);
    let mut failures = Vec::new();

    // 1. The power loss of a.
    let generation_before = cluster.generation(B);
    let loss = load_then_power_loss(&mut cluster, spec, &mut rng);
    loss.print("failover");

    // 2. promote --force on b: every completed write is there.
    if let Err(reason) = cluster.promote(B, true) {
        panic!(
            "promote --force on b refused after the power loss of a: {reason}\nstatus: {}",
            cluster.volume_status(B)
        );
    }
    let promoted = cluster.volume_status(B);
    assert_eq!(promoted["role"], "primary", "b after promote: {promoted}");
    assert_ne!(
        promoted["generation"], generation_before,
        "promote --force started no generation: {promoted}"
    );
    let region_promoted = read_region(&cluster.nbd_socket(B), REGION_BLOCKS);
    let violations = model::verify_region(&region_promoted, &baseline, &loss.load.records, &spec);
    if let Some(text) = violations_text(
        &violations,
        "b, promoted after the power loss of a (Metro RPO 0: every completed write)",
    ) {
        failures.push(text);
    }

    // 3. More writes on b (round 1 of the same region, so they land among the blocks of the
    // tail a lost and leave most of them alone), checked.
    let more = WorkloadSpec {
        round: 1,
        ..WorkloadSpec::once(seed, WRITERS, REGION_BLOCKS)
    };
    let more_writes = rng.random_range(100..400);
    let load_b = Workload::start(&cluster.nbd_socket(B), more);
    let progressed = load_b.wait_progress(more_writes, Duration::from_secs(30));
    let outcome_b = load_b.finish();
    outcome_b.assert_no_errors();
    assert!(
        progressed,
        "b, promoted, did not complete {more_writes} writes within 30 s: {}",
        cluster.volume_status(B)
    );
    let region_b = read_region(&cluster.nbd_socket(B), REGION_BLOCKS);
    let violations = model::verify_region(&region_b, &region_promoted, &outcome_b.records, &more);
    if let Some(text) = violations_text(&violations, "b's own writes as primary") {
        failures.push(text);
    }
    let resync_metric_before = cluster.metric(B, "ferry_resync_bytes_total", &["peer=\"a\""]);
    eprintln!(
        "failover: b completed {} more writes as primary; b's replica of a: {}",
        outcome_b.completed(),
        cluster.replica(B)
    );

    // 4. a restarts: it must rejoin as b's secondary and never accept a write.
    cluster.restart(A);
    let first = cluster.volume_status(A);
    // a's head is the one recovery left until a resync into it ends (a fenced primary writes
    // nothing); the end of that resync puts it at b's head, which b's writes moved beyond
    // the head it had at the kill.
    let lost_records = match head_lsn(&first) {
        Some(head) if head < loss.b_head_after_kill || first["role"] == "primary" => format!(
            "{} records the power loss took from a's journal that b holds",
            loss.b_head_after_kill.saturating_sub(head)
        ),
        _ => "a was already resynced: the head recovery left was not seen".to_string(),
    };
    eprintln!(
        "failover: a restarted: role {}, head {:?} (b's head at the kill {}: {lost_records}), \
         writes_held {}; {}",
        first["role"],
        head_lsn(&first),
        loss.b_head_after_kill,
        first["writes_held"],
        recovery_text(&first)
    );
    let probe_offset = cluster.volume_size_bytes() - BLOCK_BYTES as u64;
    if let Ok(()) = metro::probe_write(&cluster.nbd_socket(A), probe_offset) {
        failures.push(format!(
            "a, restarted after its power loss while b is primary, completed a client write: \
             a second primary; status {}",
            cluster.volume_status(A)
        ));
    }
    if let Err(last) = cluster.poll_volume(A, ROLE_TIMEOUT, |volume| volume["role"] == "secondary")
    {
        failures.push(format!(
            "a is not b's secondary within {ROLE_TIMEOUT:?} of its restart: {last}"
        ));
    }
    match wait_peer_in_sync(&cluster, B, "after a rejoined") {
        Ok(replica) => {
            let resync_metric = cluster.metric(B, "ferry_resync_bytes_total", &["peer=\"a\""])
                - resync_metric_before;
            eprintln!(
                "failover: a rejoined; b resynced {} bytes to a (ferry_resync_bytes_total +{}); \
                 b's replica: {replica}",
                replica["resynced_bytes"], resync_metric
            );
            // 5. verify, and the copies byte for byte.
            verify_cli(&cluster, B, &mut failures);
            if let Some(difference) = compare_nodes(&cluster) {
                failures.push(format!("after a rejoined as b's secondary: {difference}"));
            }
            let region_now = read_region(&cluster.nbd_socket(B), REGION_BLOCKS);
            if let Some(at) = first_difference(&region_now, &region_b) {
                failures.push(format!(
                    "b's region changed when a rejoined (first at byte {at}): a's data went \
                     over the primary's"
                ));
            }
        }
        Err(text) => failures.push(text),
    }
    let a_now = cluster.volume_status(A);
    eprintln!(
        "failover: a after the rejoin: role {}, {}; a's replica of b: {}",
        a_now["role"],
        recovery_text(&a_now),
        cluster::replica_of(&a_now, B.name()).unwrap_or_else(Value::String),
    );
    report(&mut cluster, &failures, seed);
    eprintln!(
        "metro_power_loss_failover_then_rejoin took {:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// Way 2: a restarts as primary, without failover
// ---------------------------------------------------------------------------------------------

/// Power loss of the primary a mid-workload, b is not promoted; a restarts while the link is
/// cut: it must hold writes and say so with the command (SPEC §2, Fencing), and on its own it
/// must hold every FUA or FLUSHed write (SPEC §2, Crash recovery). The link heals: a hears from
/// b and is primary again. a stays the copy of record: records b holds that a's journal lost
/// (never flushed, so never promised across a power loss: the export is a disk with a volatile
/// cache) are given up, and a says so in its log; every FUA or FLUSHed write is on a, a reports
/// b in-sync with lag 0, `ferry verify` on a finds no difference and the copies are identical
/// (review F1b: before, both reported in-sync while they differed). A failover to b instead
/// keeps those writes (the test above).
#[test]
fn metro_power_loss_restart_as_primary_keeps_what_was_flushed_and_ends_identical() {
    let seed = harness::test_seed(
        "metro_power_loss_restart_as_primary_keeps_what_was_flushed_and_ends_identical",
    );
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed ^ 0x7265_7374);
    let spec = WorkloadSpec::once(seed, WRITERS, REGION_BLOCKS);
    let (mut cluster, baseline) = start_in_sync(seed);
    let mut failures = Vec::new();

    // 1. The power loss of a; b stays secondary.
    let loss = load_then_power_loss(&mut cluster, spec, &mut rng);
    loss.print("restart");

    // 2. a restarts behind a cut link: fenced.
    cluster.relay().both().cut();
    cluster.restart(A);
    let probe_block = REGION_BLOCKS + 1;
    let probe_data = block_contents(seed, EXTRA_ROUND, probe_block, probe_block);
    let probe = HeldWrite::start(
        &cluster.nbd_socket(A),
        probe_block * BLOCK_BYTES as u64,
        probe_data.clone(),
    );
    let answer = probe.wait(FENCE_WINDOW);
    let fenced = cluster.volume_status(A);
    let a_head = head_lsn(&fenced);
    eprintln!(
        "restart: a restarted behind the cut: role {}, head {a_head:?} (b's head {}: {} records \
         the power loss took from a's journal that b holds), writes_held {}; {}; the write sent \
         to a: {answer:?}",
        fenced["role"],
        loss.b_head_after_kill,
        a_head.map_or(0, |head| loss.b_head_after_kill.saturating_sub(head)),
        fenced["writes_held"],
        recovery_text(&fenced),
    );
    if fenced["role"] != "primary" {
        failures.push(format!(
            "a restarted as {} (stored role primary): {fenced}",
            fenced["role"]
        ));
    }
    if !fenced["writes_held"]
        .as_str()
        .is_some_and(|held| held.contains("ferry promote"))
    {
        failures.push(format!(
            "a, restarted while its peer is unreachable, does not say that it holds writes \
             with the command that overrides it (writes_held naming `ferry promote`): {fenced}"
        ));
    }
    if let Some((after, result)) = &answer {
        failures.push(format!(
            "a, fenced behind the cut, answered a client write {after:?} after it was sent: \
             {result:?}"
        ));
    }
    // What a holds on its own: every FUA or FLUSHed write (the power-loss rule), and how many
    // blocks lost a completed write.
    // Reads are served while writes are held.
    let region = read_region(&cluster.nbd_socket(A), REGION_BLOCKS);
    let durable = model::verify_region_after_power_loss(
        &region,
        &baseline,
        &loss.load.records,
        &loss.load.flushes,
        &spec,
    );
    if let Some(text) = violations_text(
        &durable,
        "a after its power loss, before it hears from b (every FUA or FLUSHed write)",
    ) {
        failures.push(text);
    }
    let lost = model::verify_region(&region, &baseline, &loss.load.records, &spec);
    eprintln!(
        "restart: a after the power loss, on its own: {} blocks lost a completed write{}",
        lost.len(),
        if lost.is_empty() {
            " (this seed removed no completed write from a)"
        } else {
            ""
        }
    );

    // b, still secondary and reachable (read-only export), holds every completed write: the
    // tail a lost is there.
    let region_b = read_region(&cluster.nbd_socket(B), REGION_BLOCKS);
    let on_b = model::verify_region(&region_b, &baseline, &loss.load.records, &spec);
    eprintln!(
        "restart: b before the link heals: {} blocks violate the model (every completed write \
         is there unless this is above 0)",
        on_b.len()
    );
    if let Some(text) = violations_text(
        &on_b,
        "b, secondary, after the power loss of a (Metro: every completed write is in b's journal)",
    ) {
        failures.push(text);
    }

    // 3. The link heals: a hears from b and is primary again, and b is resynced.
    cluster.relay().both().restore();
    if let Err(last) = cluster.poll_volume(A, ROLE_TIMEOUT, |volume| {
        volume["role"] == "primary" && volume["writes_held"].is_null()
    }) {
        failures.push(format!(
            "a is not an unfenced primary within {ROLE_TIMEOUT:?} after the link healed: {last}"
        ));
    }
    let synced = wait_peer_in_sync(&cluster, A, "after the link healed");
    match probe.wait(RESYNC_TIMEOUT) {
        Some((_, Ok(()))) => {}
        other => failures.push(format!(
            "the write held by the fenced a did not complete after the link healed: {other:?}"
        )),
    }
    match synced {
        Ok(replica) => {
            eprintln!(
                "restart: a resynced {} bytes to b (ferry_resync_bytes_total {}); a's replica: \
                 {replica}",
                replica["resynced_bytes"],
                cluster.metric(A, "ferry_resync_bytes_total", &["peer=\"b\""]),
            );
            // 4. a is the copy of record: every FUA or FLUSHed write is there; completed writes
            // that were never flushed may be gone if a's journal lost them, and then a says so.
            let region = read_region(&cluster.nbd_socket(A), REGION_BLOCKS);
            let given_up = model::verify_region(&region, &baseline, &loss.load.records, &spec);
            eprintln!(
                "restart: a, primary again: {} blocks hold an older write than the last \
                 completed one ({} completed writes were not durable at the kill; b held them)",
                given_up.len(),
                loss.load.not_durable(),
            );
            let log = cluster.node(A).log_tail();
            if a_head.is_some_and(|head| head < loss.b_head_after_kill)
                && !log.contains("that its journal lost")
            {
                failures.push(format!(
                    "a gave up records {}..={} that b held without saying so in its log",
                    a_head.unwrap_or(0) + 1,
                    loss.b_head_after_kill
                ));
            }
            let durable = model::verify_region_after_power_loss(
                &region,
                &baseline,
                &loss.load.records,
                &loss.load.flushes,
                &spec,
            );
            if let Some(text) =
                violations_text(&durable, "a, primary again (every FUA or FLUSHed write)")
            {
                failures.push(text);
            }
            // 5. verify, and the copies byte for byte.
            verify_cli(&cluster, A, &mut failures);
            if let Some(difference) = compare_nodes(&cluster) {
                failures.push(format!(
                    "after a is primary again with b in sync: {difference}"
                ));
            }
        }
        Err(text) => failures.push(text),
    }
    eprintln!(
        "restart: b at the end: {}",
        cluster
            .node(B)
            .try_volume_status()
            .and_then(|volume| cluster::replica_of(&volume, A.name()))
            .unwrap_or_else(Value::String),
    );
    report(&mut cluster, &failures, seed);
    eprintln!(
        "metro_power_loss_restart_as_primary_keeps_what_was_flushed_and_ends_identical took {:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// Way 3: the primary crashes while degraded, then the peer comes back
// ---------------------------------------------------------------------------------------------

/// The primary a loses its peer (the link is cut; `on_disconnect = "degrade"`), takes the
/// workload alone (its writes complete on marks that are in memory, the journal holding each
/// record until the map is stored), and is killed -9 (`power` false) or loses power in the
/// middle of it. It restarts, the link heals, and the delta resync must carry to b every write
/// b lacks: b ends holding exactly what a holds, a holds every completed write (kill -9) or
/// every FUA or FLUSHed one (power loss), and `ferry verify` finds no difference.
fn degraded_primary_crash_then_reconnect(name: &str, power: bool) {
    let seed = harness::test_seed(name);
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed ^ 0x6465_6772);
    let mut options = cluster_options(seed);
    if !power {
        options.env_a.clear();
    }
    let mut cluster = Cluster::start(options);
    // The whole volume, so that the map stays sparse: the writes of the last moments before
    // the crash mostly land on blocks nothing marked before, and only their records (replayed
    // and marked at recovery) tell the resync about them.
    let region_blocks = cluster.volume_size_bytes() / BLOCK_BYTES as u64;
    let spec = WorkloadSpec::once(seed, WRITERS, region_blocks);
    cluster.wait_replica_state(A, "in-sync", SYNC_TIMEOUT);
    let baseline = read_region(&cluster.nbd_socket(A), region_blocks);
    let mut failures = Vec::new();

    // 1. The link goes; a degrades.
    cluster.relay().both().cut();
    cluster.wait_replica_state(
        A,
        "degraded",
        cluster.peer_timeout() + Duration::from_secs(10),
    );

    // 2. The workload on a alone, then the crash in its plain phase.
    let mixed_writes = rng.random_range(60..200);
    let plain_for = Duration::from_millis(rng.random_range(100..600));
    let revert_seed = rng.random::<u64>();
    let load = PowerLoad::start(&cluster.nbd_socket(A), spec, mixed_writes);
    if !load.wait_plain_phase(MIXED_PHASE_TIMEOUT) {
        panic!(
            "the writers did not all reach the plain phase within {MIXED_PHASE_TIMEOUT:?} while \
             a was degraded (seed {seed}): errors {:?}; a: {}",
            load.history.errors(),
            cluster.volume_status(A)
        );
    }
    std::thread::sleep(plain_for);
    let before_kill = cluster.volume_status(A);
    let killed_at = Instant::now();
    let completed_at_kill = load.history.completed();
    cluster.kill9(A);
    let load = load.finish();
    let early = load.errors_before(killed_at);
    assert!(
        early.is_empty(),
        "writes failed before the kill (seed {seed}): {early:?}"
    );
    let what = if power { "power loss" } else { "kill -9" };
    eprintln!(
        "{what} of a while degraded after {plain_for:?} of plain writes: {completed_at_kill} \
         writes completed ({} FUA, {} FLUSHes, {} not durable); a before the kill: replica {}, \
         head {:?}",
        load.fua_completed(),
        load.flushes_completed(),
        load.not_durable(),
        cluster::replica_of(&before_kill, B.name()).unwrap_or_else(Value::String),
        head_lsn(&before_kill),
    );
    if power {
        for (path, report) in revert_node(&cluster, A, revert_seed) {
            eprintln!(
                "power loss: undo-log revert of {}: {} bytes taken back",
                path.display(),
                report.sectors_reverted * 512
            );
        }
    }

    // 3. a restarts, still alone: it holds what the crash kind promises.
    cluster.restart(A);
    let restarted = cluster.volume_status(A);
    eprintln!("a restarted: {}", recovery_text(&restarted));
    let region = read_region(&cluster.nbd_socket(A), region_blocks);
    let violations = if power {
        model::verify_region_after_power_loss(
            &region,
            &baseline,
            &load.records,
            &load.flushes,
            &spec,
        )
    } else {
        model::verify_region(&region, &baseline, &load.records, &spec)
    };
    if let Some(text) = violations_text(&violations, &format!("a after the {what}, alone")) {
        failures.push(text);
    }

    // 4. The link heals: a resyncs b, and b ends with what a holds.
    cluster.relay().both().restore();
    match wait_peer_in_sync(&cluster, A, "after the link healed") {
        Ok(replica) => {
            eprintln!(
                "a resynced {} bytes to b; a's replica: {replica}",
                replica["resynced_bytes"]
            );
            if replica["resynced_bytes"].as_u64().unwrap_or(0) == 0 && completed_at_kill > 0 {
                failures.push(format!(
                    "b missed {completed_at_kill} writes, but the resync sent nothing: {replica}"
                ));
            }
            let region_b = read_region(&cluster.nbd_socket(B), region_blocks);
            if !power {
                // Every completed write is on b now.
                let on_b = model::verify_region(&region_b, &baseline, &load.records, &spec);
                if let Some(text) = violations_text(&on_b, "b after the resync") {
                    failures.push(text);
                }
            }
            verify_cli(&cluster, A, &mut failures);
            if let Some(difference) = compare_nodes(&cluster) {
                failures.push(format!(
                    "after the resync that followed the {what}: {difference}"
                ));
            }
        }
        Err(text) => failures.push(text),
    }
    report(&mut cluster, &failures, seed);
    eprintln!("{name} took {:?}", started.elapsed());
}

#[test]
fn metro_degraded_primary_kill9_then_reconnect_resyncs_every_write() {
    degraded_primary_crash_then_reconnect(
        "metro_degraded_primary_kill9_then_reconnect_resyncs_every_write",
        false,
    );
}

#[test]
fn metro_degraded_primary_power_loss_then_reconnect_resyncs_every_write() {
    degraded_primary_crash_then_reconnect(
        "metro_degraded_primary_power_loss_then_reconnect_resyncs_every_write",
        true,
    );
}
