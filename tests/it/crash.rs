//! kill -9 at a random moment under concurrent writes (SPEC §2, crash recovery): after a
//! restart, every write whose completion a client saw reads back exactly (unless a write that
//! started after it completed overwrote it), in-flight writes may be old or new, and nothing
//! else may appear. Seeded: FERRY_SEED replays a run, FERRY_LONG=1 runs 50 rounds.
//!
//! The model: a logical clock ticks at every issue and every completion. A block may hold the
//! contents of write W unless some write W' to the same block was issued after W completed and
//! W' completed too (then W is definitely overwritten). A block may hold its pre-round
//! contents unless some write to it completed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, RngCore, SeedableRng};

use crate::harness::{self, Daemon, VolumeOptions};
use crate::nbd_wire::NbdConn;

const BLOCK_BYTES: usize = 4096;
/// Writes land in the first 16 MiB so that blocks are overwritten often.
const REGION_BLOCKS: u64 = 4096;
const WRITERS: u64 = 4;
const MAX_BLOCKS_PER_WRITE: u64 = 4;
/// Each writer stops after this many writes even if the kill comes late (bounded loop).
const WRITES_PER_WRITER_MAX: u64 = 200_000;
const HEADER_MAGIC: &[u8; 8] = b"FERRYCRT";

#[derive(Clone, Debug)]
struct WriteRecord {
    first_block: u64,
    block_count: u64,
    issued_at: u64,
    /// None while in flight or when the outcome was never seen.
    completed_at: Option<u64>,
    fua: bool,
}

/// A write's id: writer in the top bits, sequence below; unique within a round.
fn write_id(writer: u64, sequence: u64) -> u64 {
    (writer << 48) | sequence
}

/// The exact bytes of one block of one write: a header naming the write, then seeded noise.
fn block_contents(seed: u64, round: u64, id: u64, block: u64) -> Vec<u8> {
    let mut bytes = vec![0u8; BLOCK_BYTES];
    bytes[0..8].copy_from_slice(HEADER_MAGIC);
    bytes[8..16].copy_from_slice(&round.to_le_bytes());
    bytes[16..24].copy_from_slice(&id.to_le_bytes());
    bytes[24..32].copy_from_slice(&block.to_le_bytes());
    let mut rng =
        rand::rngs::StdRng::seed_from_u64(seed ^ round.rotate_left(40) ^ id.rotate_left(8) ^ block);
    rng.fill_bytes(&mut bytes[32..]);
    bytes
}

struct Shared {
    clock: AtomicU64,
    stop: AtomicBool,
    records: Mutex<HashMap<u64, WriteRecord>>,
    completed_count: AtomicU64,
}

fn writer_loop(
    daemon_socket: std::path::PathBuf,
    tcp_addr: String,
    writer: u64,
    seed: u64,
    round: u64,
    shared: Arc<Shared>,
) {
    let connection = if writer.is_multiple_of(2) {
        NbdConn::connect_unix(&daemon_socket, "vol0")
    } else {
        NbdConn::connect_tcp(&tcp_addr, "vol0")
    };
    let mut conn = match connection {
        Ok(conn) => conn,
        Err(error) => panic!("writer {writer}: connect: {error}"),
    };
    let mut rng =
        rand::rngs::StdRng::seed_from_u64(seed ^ (round << 32) ^ writer.wrapping_mul(0x9e37_79b9));
    for sequence in 0..WRITES_PER_WRITER_MAX {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let block_count = rng.gen_range(1..=MAX_BLOCKS_PER_WRITE);
        let first_block = rng.gen_range(0..REGION_BLOCKS - block_count + 1);
        let fua = rng.gen_ratio(1, 8);
        let flush_after = rng.gen_ratio(1, 16);
        let id = write_id(writer, sequence);
        let mut payload = Vec::with_capacity(block_count as usize * BLOCK_BYTES);
        for block in first_block..first_block + block_count {
            payload.extend_from_slice(&block_contents(seed, round, id, block));
        }
        let issued_at = shared.clock.fetch_add(1, Ordering::SeqCst);
        shared.records.lock().unwrap().insert(
            id,
            WriteRecord {
                first_block,
                block_count,
                issued_at,
                completed_at: None,
                fua,
            },
        );
        if conn
            .write(first_block * BLOCK_BYTES as u64, &payload, fua)
            .is_err()
        {
            return; // the daemon died: this write stays in flight
        }
        let completed_at = shared.clock.fetch_add(1, Ordering::SeqCst);
        shared
            .records
            .lock()
            .unwrap()
            .get_mut(&id)
            .expect("record")
            .completed_at = Some(completed_at);
        shared.completed_count.fetch_add(1, Ordering::SeqCst);
        if flush_after && conn.flush().is_err() {
            return;
        }
    }
}

/// Checks one block against the model; returns a description of the violation if any.
fn check_block(
    block: u64,
    actual: &[u8],
    baseline: &[u8],
    writers_of_block: &[(u64, &WriteRecord)],
    seed: u64,
    round: u64,
) -> Result<(), String> {
    let any_completed = writers_of_block
        .iter()
        .any(|(_, record)| record.completed_at.is_some());
    if actual == baseline {
        if any_completed {
            let latest = writers_of_block
                .iter()
                .filter_map(|(id, record)| record.completed_at.map(|at| (at, *id, record.fua)))
                .max();
            return Err(format!(
                "block {block}: holds its pre-round contents, but write {:?} (completed at, id, fua) completed",
                latest
            ));
        }
        return Ok(());
    }
    if actual[0..8] != HEADER_MAGIC[..]
        || u64::from_le_bytes(actual[8..16].try_into().unwrap()) != round
    {
        return Err(format!(
            "block {block}: contents from no write of this round (first bytes {:02x?})",
            &actual[..32]
        ));
    }
    let id = u64::from_le_bytes(actual[16..24].try_into().unwrap());
    let Some((_, record)) = writers_of_block
        .iter()
        .find(|(candidate, _)| *candidate == id)
    else {
        return Err(format!(
            "block {block}: header names write {id:#x}, which never wrote this block"
        ));
    };
    if actual != block_contents(seed, round, id, block).as_slice() {
        return Err(format!(
            "block {block}: write {id:#x} is there but its bytes are corrupt (torn or mixed)"
        ));
    }
    if let Some(completed_at) = record.completed_at {
        if let Some((newer_id, newer)) = writers_of_block
            .iter()
            .find(|(_, other)| other.issued_at > completed_at && other.completed_at.is_some())
        {
            return Err(format!(
                "block {block}: holds write {id:#x} (completed at {completed_at}), but write {newer_id:#x} \
                 issued at {} after it completed at {:?} (fua {}) is lost",
                newer.issued_at, newer.completed_at, newer.fua
            ));
        }
    }
    Ok(())
}

fn read_region(daemon: &Daemon) -> Vec<u8> {
    let mut conn = NbdConn::connect_unix(&daemon.nbd_socket, "vol0").expect("connect for verify");
    let mut region = Vec::with_capacity(REGION_BLOCKS as usize * BLOCK_BYTES);
    let chunk_blocks = 256u64;
    for first in (0..REGION_BLOCKS).step_by(chunk_blocks as usize) {
        let data = conn
            .read(
                first * BLOCK_BYTES as u64,
                (chunk_blocks as usize * BLOCK_BYTES) as u32,
            )
            .expect("read region");
        region.extend_from_slice(&data);
    }
    conn.disconnect();
    region
}

fn crash_round(daemon: &mut Daemon, seed: u64, round: u64, baseline: &[u8]) -> Vec<u8> {
    let shared = Arc::new(Shared {
        clock: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        records: Mutex::new(HashMap::new()),
        completed_count: AtomicU64::new(0),
    });
    let mut round_rng =
        rand::rngs::StdRng::seed_from_u64(seed ^ round.wrapping_mul(0x5851_f42d_4c95_7f2d));
    let kill_after = Duration::from_millis(round_rng.gen_range(100..1500));
    let threads: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let shared = Arc::clone(&shared);
            let socket = daemon.nbd_socket.clone();
            let tcp = daemon.tcp_addr();
            std::thread::spawn(move || writer_loop(socket, tcp, writer, seed, round, shared))
        })
        .collect();
    std::thread::sleep(kill_after);
    daemon.kill9();
    shared.stop.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(60);
    for thread in threads {
        assert!(Instant::now() < deadline, "writers did not stop");
        thread.join().expect("writer thread panicked");
    }
    daemon.restart();

    let records = shared.records.lock().unwrap().clone();
    let completed = shared.completed_count.load(Ordering::SeqCst);
    let status = daemon.volume_status();
    eprintln!(
        "round {round}: killed after {kill_after:?}, {} writes issued, {completed} completed; recovery {}",
        records.len(),
        status["recovery"]
    );
    for key in ["records_replayed", "bytes_replayed", "torn_tail_bytes"] {
        assert!(
            status["recovery"][key].is_u64(),
            "status.recovery.{key} missing: {status}"
        );
    }
    assert!(
        status["recovery"].get("stopped_reason").is_some(),
        "status.recovery.stopped_reason missing: {status}"
    );

    let mut per_block: HashMap<u64, Vec<(u64, &WriteRecord)>> = HashMap::new();
    for (id, record) in &records {
        for block in record.first_block..record.first_block + record.block_count {
            per_block.entry(block).or_default().push((*id, record));
        }
    }
    let region = read_region(daemon);
    let mut violations = Vec::new();
    for block in 0..REGION_BLOCKS {
        let range = block as usize * BLOCK_BYTES..(block as usize + 1) * BLOCK_BYTES;
        let writers_of_block = per_block.get(&block).map(Vec::as_slice).unwrap_or(&[]);
        if let Err(violation) = check_block(
            block,
            &region[range.clone()],
            &baseline[range],
            writers_of_block,
            seed,
            round,
        ) {
            violations.push(violation);
        }
    }
    assert!(
        violations.is_empty(),
        "seed {seed} round {round}: {} blocks violate crash consistency (replay with FERRY_SEED={seed}); first ones:\n{}",
        violations.len(),
        violations.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
    region
}

#[test]
fn kill9_under_concurrent_writes_keeps_completed_writes() {
    let seed = harness::test_seed("kill9_under_concurrent_writes_keeps_completed_writes");
    let rounds = if harness::long_mode() { 50 } else { 3 };
    let mut daemon = Daemon::start_with(VolumeOptions {
        size: "64MiB".to_string(),
        journal_size: "32MiB".to_string(),
        ..VolumeOptions::default()
    });
    let mut baseline = read_region(&daemon);
    assert!(
        baseline.iter().all(|byte| *byte == 0),
        "a new volume reads as zeros"
    );
    for round in 0..rounds {
        baseline = crash_round(&mut daemon, seed, round, &baseline);
    }
    daemon.stop();
}
