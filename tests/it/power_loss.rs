//! Power loss of a real `ferry run` (feature `fault-injection`): the daemon runs with
//! `FERRY_FAULT_POWER_LOSS=1`, so every file it opens through its storage layer keeps an undo
//! log; the test kills it with SIGKILL under concurrent writes, takes back every write it had
//! not made durable (`ferry::storage::power_loss::revert_dir`, seeded), restarts it, and checks
//! every block with the power-loss rule of `model.rs`: each write made durable by FUA or by a
//! later completed FLUSH is there, each block holds exactly one write or its contents from
//! before the round, nothing else. Every other round has neither FUA nor FLUSH, so that the
//! journal's write-ahead rule alone keeps blocks whole. Seeded: FERRY_SEED replays a run,
//! FERRY_LONG=1 runs 30 rounds.
//!
//! Also here: the switches are off unless set, and a malformed one stops the daemon at start;
//! `FERRY_FAULT_DEVICE_WRITE_DELAY_US` slows the backing device and not the journal.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ferry::storage::power_loss::{self, RevertReport};

use crate::crash::{self, CrashStamp};
use crate::harness::{self, Daemon, VolumeOptions, FERRY_BIN};
use crate::model::{self, WriteShape};
use crate::nbd_wire::NbdConn;

const POWER_LOSS_ENV: (&str, &str) = ("FERRY_FAULT_POWER_LOSS", "1");
const DEVICE_WRITE_DELAY_ENV: &str = "FERRY_FAULT_DEVICE_WRITE_DELAY_US";
/// Directory levels searched for undo logs under a test directory (it has `data/` inside).
const SEARCH_DEPTH_MAX: usize = 4;

/// Every `*.undo` file under `dir`, searched `SEARCH_DEPTH_MAX` levels deep.
fn undo_logs(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut to_visit = vec![(dir.to_path_buf(), 0)];
    while let Some((dir, depth)) = to_visit.pop() {
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|error| panic!("list {}: {error}", dir.display()));
        for entry in entries {
            let path = entry.expect("directory entry").path();
            if path.is_dir() && depth + 1 < SEARCH_DEPTH_MAX {
                to_visit.push((path, depth + 1));
            } else if path
                .extension()
                .is_some_and(|extension| extension == "undo")
            {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// Plays the power loss on every file of `daemon` that has an undo log.
fn revert_all(daemon: &Daemon, seed: u64) -> Vec<(PathBuf, RevertReport)> {
    let mut reverted = Vec::new();
    for dir in [daemon.dir.clone(), daemon.dir.join("data")] {
        let reports = power_loss::revert_dir(&dir, seed ^ reverted.len() as u64)
            .unwrap_or_else(|error| panic!("revert the undo logs in {}: {error}", dir.display()));
        reverted.extend(reports);
    }
    let left = undo_logs(&daemon.dir);
    assert!(left.is_empty(), "undo logs left after the revert: {left:?}");
    reverted
}

/// One round: writes, SIGKILL, power loss, restart, check. Returns the region as it is now
/// (the next round's baseline) and the sectors the power loss took back.
///
/// Odd rounds send neither FUA nor FLUSH: nothing is promised durable, so only the journal's
/// write-ahead rule keeps every block whole (a record applied to the device before its batch
/// was durable could be torn there and then lost from the journal).
fn power_loss_round(daemon: &mut Daemon, seed: u64, round: u64, baseline: &[u8]) -> (Vec<u8>, u64) {
    let shape = if round.is_multiple_of(2) {
        crash::SHAPE
    } else {
        WriteShape {
            fua_one_in: 0,
            flush_one_in: 0,
            ..crash::SHAPE
        }
    };
    let (history, kill_after) = crash::write_until_killed(daemon, seed, round, shape);
    let revert_seed = seed ^ round.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ 0x00f0_0d00;
    let reverted = revert_all(daemon, revert_seed);
    for file in [
        daemon.device_path.clone(),
        daemon.dir.join("data/vol0.journal"),
    ] {
        assert!(
            reverted.iter().any(|(path, _)| *path == file),
            "no undo log for {}: {reverted:?}",
            file.display()
        );
    }
    for (path, report) in &reverted {
        eprintln!(
            "round {round}: power loss on {}: {report:?}",
            path.display()
        );
    }
    daemon.restart();
    crash::report_recovery(daemon, round, &history, kill_after);
    let flushes = history.flushes();
    eprintln!(
        "round {round}: {} flushes issued, {} completed",
        flushes.len(),
        flushes
            .iter()
            .filter(|flush| flush.completed_at.is_some())
            .count()
    );
    let region = crash::read_region(daemon);
    let violations = model::verify_region_after_power_loss(
        &region,
        baseline,
        &history.records(),
        &flushes,
        &CrashStamp { seed, round },
    );
    crash::assert_no_violations(&violations, seed, round, "the power-loss rule");
    let sectors_reverted = reverted
        .iter()
        .map(|(_, report)| report.sectors_reverted)
        .sum();
    (region, sectors_reverted)
}

#[test]
fn power_loss_under_concurrent_writes_keeps_durable_writes() {
    let seed = harness::test_seed("power_loss_under_concurrent_writes_keeps_durable_writes");
    let rounds = if harness::long_mode() { 30 } else { 3 };
    let mut daemon = Daemon::start_with_env(crash::volume_options(), &[POWER_LOSS_ENV]);
    let mut baseline = crash::read_region(&daemon);
    assert!(
        baseline.iter().all(|byte| *byte == 0),
        "a new volume reads as zeros"
    );
    let mut sectors_reverted = 0;
    for round in 0..rounds {
        let (region, reverted) = power_loss_round(&mut daemon, seed, round, &baseline);
        baseline = region;
        sectors_reverted += reverted;
    }
    // Writers keep unsynced journal batches in flight all the time: a power loss that never
    // takes anything back means the undo logs are not doing their work.
    assert!(
        sectors_reverted > 0,
        "seed {seed}: no sector was reverted in {rounds} rounds"
    );
    daemon.stop();
}

#[test]
fn without_the_switch_the_daemon_keeps_no_undo_logs() {
    let mut daemon = Daemon::start_with(VolumeOptions {
        size: "16MiB".to_string(),
        journal_size: "16MiB".to_string(),
        ..VolumeOptions::default()
    });
    let mut conn = NbdConn::connect_unix(&daemon.nbd_socket, "vol0").expect("connect");
    for block in 0..64u64 {
        conn.write(block * 4096, &[block as u8; 4096], block % 8 == 0)
            .expect("write");
    }
    conn.flush().expect("flush");
    conn.write(0, &[0xee; 4096], false).expect("write");
    conn.disconnect();
    daemon.kill9();
    assert_eq!(undo_logs(&daemon.dir), Vec::<PathBuf>::new());
    daemon.restart();
    daemon.stop();
    assert_eq!(undo_logs(&daemon.dir), Vec::<PathBuf>::new());
}

#[test]
fn a_malformed_fault_switch_stops_the_daemon_at_start() {
    let daemon = Daemon::configure(VolumeOptions::default());
    for (key, value) in [
        ("FERRY_FAULT_POWER_LOSS", "yes"),
        (DEVICE_WRITE_DELAY_ENV, "5ms"),
    ] {
        let output = harness::run_with_timeout(
            Command::new(FERRY_BIN)
                .arg("run")
                .arg("--config")
                .arg(&daemon.config_path)
                .env(key, value),
            Duration::from_secs(30),
        );
        assert!(
            !output.status.success() && output.stderr.contains(key),
            "{key}={value}: {output}"
        );
    }
}

#[test]
fn a_slow_device_delays_applying_and_not_the_client() {
    let delay = Duration::from_secs(1);
    let delay_us = delay.as_micros().to_string();
    let mut daemon = Daemon::start_with_env(
        VolumeOptions {
            size: "16MiB".to_string(),
            journal_size: "16MiB".to_string(),
            ..VolumeOptions::default()
        },
        &[(DEVICE_WRITE_DELAY_ENV, &delay_us)],
    );
    let mut conn = NbdConn::connect_unix(&daemon.nbd_socket, "vol0").expect("connect");
    let started = Instant::now();
    conn.write(0, &[0x5a; 4096], true).expect("FUA write");
    let written_after = started.elapsed();
    assert!(
        written_after < delay,
        "a FUA write took {written_after:?}: the journal must not be delayed"
    );
    // The write reaches the device only after the delay: the applied LSN catches up with the
    // head no sooner than that. Bounded: 30 s.
    let deadline = started + Duration::from_secs(30);
    let applied_after = loop {
        let journal = &daemon.volume_status()["journal"];
        if journal["applied_lsn"].as_u64() >= journal["head_lsn"].as_u64() {
            break started.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "the write was not applied within 30 s: {journal}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        applied_after >= delay,
        "applied after {applied_after:?}, before the device delay of {delay:?}"
    );
    assert_eq!(conn.read(0, 4096).expect("read"), vec![0x5a; 4096]);
    conn.disconnect();
    daemon.stop();
}
