//! kill -9 at a random moment under concurrent writes (SPEC §2, crash recovery): after a
//! restart, every write whose completion a client saw reads back exactly (unless a write that
//! started after it completed overwrote it), in-flight writes may be old or new, and nothing
//! else may appear. Seeded: FERRY_SEED replays a run, FERRY_LONG=1 runs 50 rounds.
//!
//! The model (issue and completion on one logical clock, what a block may hold) is in
//! `model.rs`, shared with `metro.rs`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, RngExt, SeedableRng};

use crate::harness::{self, Daemon, VolumeOptions};
use crate::model::{self, History, Stamp, WriteShape, BLOCK_BYTES};
use crate::nbd_wire::NbdConn;

const EXPORT: &str = "vol0";
/// Writes land in the first 16 MiB so that blocks are overwritten often; each writer stops
/// after 200 000 writes even if the kill comes late (bounded loop). One write in 8 has FUA,
/// one in 16 is followed by a FLUSH.
pub(crate) const SHAPE: WriteShape = WriteShape {
    region_blocks: 4096,
    max_blocks_per_write: 4,
    writes_max: 200_000,
    fua_one_in: 8,
    flush_one_in: 16,
};
const WRITERS: u64 = 4;
const HEADER_MAGIC: &[u8; 8] = b"FERRYCRT";

/// A block of round `round` starts with a header naming the write, then seeded noise.
pub(crate) struct CrashStamp {
    pub(crate) seed: u64,
    pub(crate) round: u64,
}

impl Stamp for CrashStamp {
    fn write_of(&self, _block: u64, actual: &[u8]) -> Option<u64> {
        (actual[0..8] == HEADER_MAGIC[..]
            && u64::from_le_bytes(actual[8..16].try_into().unwrap()) == self.round)
            .then(|| u64::from_le_bytes(actual[16..24].try_into().unwrap()))
    }

    fn contents(&self, id: u64, block: u64) -> Vec<u8> {
        let mut bytes = vec![0u8; BLOCK_BYTES];
        bytes[0..8].copy_from_slice(HEADER_MAGIC);
        bytes[8..16].copy_from_slice(&self.round.to_le_bytes());
        bytes[16..24].copy_from_slice(&id.to_le_bytes());
        bytes[24..32].copy_from_slice(&block.to_le_bytes());
        let mut rng = rand::rngs::StdRng::seed_from_u64(
            self.seed ^ self.round.rotate_left(40) ^ id.rotate_left(8) ^ block,
        );
        rng.fill_bytes(&mut bytes[32..]);
        bytes
    }

    fn describe(&self, actual: &[u8], _baseline: &[u8]) -> String {
        format!("first bytes {:02x?}", &actual[..32])
    }
}

/// One writer: even writers over the Unix socket, odd ones over TCP. A failed write (the
/// daemon died) stays in flight in the model.
fn writer_loop(
    daemon_socket: std::path::PathBuf,
    tcp_addr: String,
    writer: u64,
    (seed, round): (u64, u64),
    shape: WriteShape,
    history: &History,
) {
    let connection = if writer.is_multiple_of(2) {
        NbdConn::connect_unix(&daemon_socket, EXPORT)
    } else {
        NbdConn::connect_tcp(&tcp_addr, EXPORT)
    };
    let mut conn = match connection {
        Ok(conn) => conn,
        Err(error) => panic!("writer {writer}: connect: {error}"),
    };
    let mut rng =
        rand::rngs::StdRng::seed_from_u64(seed ^ (round << 32) ^ writer.wrapping_mul(0x9e37_79b9));
    let stamp = CrashStamp { seed, round };
    model::run_writer(&mut conn, writer, &mut rng, shape, &stamp, history);
}

/// Reads back the region the writers write to.
pub(crate) fn read_region(daemon: &Daemon) -> Vec<u8> {
    model::read_region(&daemon.nbd_socket, EXPORT, SHAPE.region_blocks)
}

/// The volume the crash tests write to: small, so that a round overwrites blocks often and
/// the journal wraps.
pub(crate) fn volume_options() -> VolumeOptions {
    VolumeOptions {
        size: "64MiB".to_string(),
        journal_size: "32MiB".to_string(),
        ..VolumeOptions::default()
    }
}

/// Runs the writers of round `round` (writes of `shape`) against `daemon`, kills it with
/// SIGKILL at a seeded moment and waits for the writers to notice. Returns what they did and
/// when the kill came.
pub(crate) fn write_until_killed(
    daemon: &mut Daemon,
    seed: u64,
    round: u64,
    shape: WriteShape,
) -> (Arc<History>, Duration) {
    let history = Arc::new(History::default());
    let mut round_rng =
        rand::rngs::StdRng::seed_from_u64(seed ^ round.wrapping_mul(0x5851_f42d_4c95_7f2d));
    let kill_after = Duration::from_millis(round_rng.random_range(100..1500));
    let threads: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let history = Arc::clone(&history);
            let socket = daemon.nbd_socket.clone();
            let tcp = daemon.tcp_addr();
            std::thread::spawn(move || {
                writer_loop(socket, tcp, writer, (seed, round), shape, &history)
            })
        })
        .collect();
    std::thread::sleep(kill_after);
    daemon.kill9();
    history.stop();
    let deadline = Instant::now() + Duration::from_secs(60);
    for thread in threads {
        assert!(Instant::now() < deadline, "writers did not stop");
        thread.join().expect("writer thread panicked");
    }
    (history, kill_after)
}

/// After the restart: prints what the round did and checks that the status reports recovery.
pub(crate) fn report_recovery(
    daemon: &Daemon,
    round: u64,
    history: &History,
    kill_after: Duration,
) {
    let status = daemon.volume_status();
    eprintln!(
        "round {round}: killed after {kill_after:?}, {} writes issued, {} completed; recovery {}",
        history.records().len(),
        history.completed(),
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
}

/// Panics with the first violations, if any, naming the seed that replays them.
pub(crate) fn assert_no_violations(violations: &[String], seed: u64, round: u64, what: &str) {
    assert!(
        violations.is_empty(),
        "seed {seed} round {round}: {} blocks violate {what} (replay with FERRY_SEED={seed}); first ones:\n{}",
        violations.len(),
        violations.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
}

fn crash_round(daemon: &mut Daemon, seed: u64, round: u64, baseline: &[u8]) -> Vec<u8> {
    let (history, kill_after) = write_until_killed(daemon, seed, round, SHAPE);
    daemon.restart();
    report_recovery(daemon, round, &history, kill_after);
    let region = read_region(daemon);
    let violations = model::verify_region(
        &region,
        baseline,
        &history.records(),
        &CrashStamp { seed, round },
    );
    assert_no_violations(&violations, seed, round, "crash consistency");
    region
}

#[test]
fn kill9_under_concurrent_writes_keeps_completed_writes() {
    let seed = harness::test_seed("kill9_under_concurrent_writes_keeps_completed_writes");
    let rounds = if harness::long_mode() { 50 } else { 3 };
    let mut daemon = Daemon::start_with(volume_options());
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
