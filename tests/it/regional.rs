//! Regional replication across real processes, over a relay with a WAN's delay: after kill -9
//! of the primary and `promote --force` of the regional copy, the copy holds the volume after
//! a prefix of the completed writes, and the writes it lacks are recent ones.
//!
//! Each write stamps its 4 KiB block with its sequence number, so the copy read back says
//! which writes it holds; a prefix means: some k such that every block shows the last write
//! numbered k or less that touched it. `FERRY_REGIONAL_ROUNDS` sets the rounds (default 3).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::cluster::{metric_sum, replica_of, Cluster, ClusterOptions, NodeId};
use crate::nbd_wire::NbdConn;

const BLOCK: u64 = 4096;
/// Blocks the writer picks from (a hot set, so batches coalesce overwrites).
const BLOCKS: u64 = 2048;
const INTERVAL: Duration = Duration::from_secs(1);

fn rounds() -> u64 {
    std::env::var("FERRY_REGIONAL_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

fn stamp(id: u64) -> Vec<u8> {
    let mut block = vec![0u8; BLOCK as usize];
    for chunk in block.chunks_mut(8) {
        chunk.copy_from_slice(&id.to_le_bytes());
    }
    block
}

/// The write number a block read back carries (0: never written). A block mixing two
/// writes is a torn block, which no prefix explains.
fn stamp_of(block: &[u8]) -> Result<u64, String> {
    let first = u64::from_le_bytes(block[..8].try_into().expect("8 bytes"));
    if block
        .chunks(8)
        .any(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")) != first)
    {
        return Err(format!("a torn block (starts with write {first})"));
    }
    Ok(first)
}

/// Completed writes in completion order: (write number, block, completed at).
type Completed = Arc<Mutex<Vec<(u64, u64, Instant)>>>;

/// A seeded writer on its own thread: one connection, numbered writes at QD1 (one in ten
/// FUA, a FLUSH now and then), about 2 MB/s, a load the WAN of these tests carries (the
/// promise holds while the link keeps up; a link that does not is the state `lagging`).
struct Writer {
    stop: Arc<AtomicBool>,
    completed: Completed,
    /// The last write made durable to the client: completed with FUA, or before a FLUSH that
    /// completed.
    durable: Arc<std::sync::atomic::AtomicU64>,
    handle: std::thread::JoinHandle<()>,
}

impl Writer {
    fn start(nbd: std::path::PathBuf, seed: u64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let completed: Completed = Arc::default();
        let durable = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let handle = std::thread::spawn({
            let (stop, completed, durable) = (stop.clone(), completed.clone(), durable.clone());
            move || {
                let mut rng = StdRng::seed_from_u64(seed);
                let Ok(mut conn) = NbdConn::connect_unix(&nbd, crate::cluster::VOLUME) else {
                    return;
                };
                let mut id = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    id += 1;
                    let block = rng.random_range(0..BLOCKS);
                    let fua = rng.random_range(0..10) == 0;
                    if conn.write(block * BLOCK, &stamp(id), fua).is_err() {
                        return; // the primary is gone
                    }
                    completed
                        .lock()
                        .expect("completed")
                        .push((id, block, Instant::now()));
                    if fua {
                        durable.store(id, Ordering::Relaxed);
                    }
                    if rng.random_range(0..50) == 0 {
                        if conn.flush().is_err() {
                            return;
                        }
                        durable.store(id, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_micros(1500));
                }
            }
        });
        Writer {
            stop,
            completed,
            durable,
            handle,
        }
    }

    /// Writes completed so far.
    fn count(&self) -> usize {
        self.completed.lock().expect("completed").len()
    }

    /// Stops the writer; the writes it saw complete, in order.
    fn stop(self) -> Vec<(u64, u64, Instant)> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("writer");
        let completed = self.completed.lock().expect("completed");
        completed.clone()
    }
}

/// Two nodes, a primary and its regional peer b (`interval`), through a relay adding
/// `one_way` each way, with `env_b` for b's daemon; returns once b is in sync.
fn regional_pair(
    seed: u64,
    interval: &str,
    one_way: Duration,
    env_b: Vec<(String, String)>,
) -> Cluster {
    let cluster = Cluster::start(ClusterOptions {
        size: "32MiB".into(),
        journal_size: "32MiB".into(),
        relay: true,
        seed,
        regional: Some((NodeId::B, interval.into())),
        env_b,
        ..ClusterOptions::default()
    });
    cluster.relay().both().set_delay(one_way);
    cluster.wait_replica_state(NodeId::A, "in-sync", Duration::from_secs(60));
    cluster
}

#[test]
fn regional_copy_promoted_after_kill9_holds_a_prefix_of_the_completed_writes() {
    let seed = crate::harness::test_seed("regional_prefix");
    for round in 0..rounds() {
        let round_seed = seed.wrapping_add(round);
        let mut rng = StdRng::seed_from_u64(round_seed);
        // A WAN: 20 ms each way, 100 Mbit/s, a little loss.
        let mut cluster = regional_pair(round_seed, "1s", Duration::from_millis(20), Vec::new());
        cluster
            .relay()
            .both()
            .set_rate(Some(12 << 20))
            .set_loss(0.001);
        let writer = Writer::start(cluster.nbd_socket(NodeId::A), round_seed);
        std::thread::sleep(Duration::from_millis(rng.random_range(1500..4000)));
        let killed_at = Instant::now();
        cluster.kill9(NodeId::A);
        let completed = writer.stop();
        cluster
            .promote(NodeId::B, true)
            .expect("promote --force of the regional copy");
        let held = read_stamps(&cluster, NodeId::B);
        let context = format!("round {round} (seed {round_seed})");
        check_prefix(&held, &completed, killed_at, &context);
        cluster.kill9(NodeId::B);
    }
}

/// Waits (bounded) until a's regional replica of b is in sync with nothing to ship and b's
/// head is a's (acknowledged means stored at b; applied is when its head reaches a's);
/// returns a's replica status.
fn wait_caught_up(cluster: &Cluster) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let replica = cluster.replica(NodeId::A);
        let heads = (
            cluster.volume_status(NodeId::A)["journal"]["head_lsn"].clone(),
            cluster.volume_status(NodeId::B)["journal"]["head_lsn"].clone(),
        );
        if replica["state"] == "in-sync" && replica["lag_bytes"] == 0 && heads.0 == heads.1 {
            return replica;
        }
        assert!(Instant::now() < deadline, "never caught up: {replica}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until b has caught up with a (see [`wait_caught_up`]) and checks that both copies hold
/// the same writes; `context` says which test and seed.
fn assert_converges(cluster: &Cluster, context: &str) {
    wait_caught_up(cluster);
    assert_eq!(
        read_stamps(cluster, NodeId::A),
        read_stamps(cluster, NodeId::B),
        "the regional copy differs from the primary after catching up ({context})"
    );
}

/// The write number each block of the region holds on node `id`.
fn read_stamps(cluster: &Cluster, id: NodeId) -> Vec<u64> {
    let mut conn =
        NbdConn::connect_unix(&cluster.nbd_socket(id), crate::cluster::VOLUME).expect("connect");
    let data = conn.read(0, (BLOCKS * BLOCK) as u32).expect("read");
    data.chunks(BLOCK as usize)
        .map(stamp_of)
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("node {}: {e}", id.name()))
}

/// Checks that `held` is the volume after the first k completed writes for some k (write
/// n + 1, in flight at the kill, may be there or not), that what is missing completed
/// recently, and returns k.
fn check_prefix(
    held: &[u64],
    completed: &[(u64, u64, Instant)],
    killed_at: Instant,
    context: &str,
) -> u64 {
    let k = held.iter().copied().max().unwrap_or(0);
    let n = completed.len() as u64;
    assert!(
        k <= n + 1,
        "{context}: the copy holds write {k}, but only {n} completed and one was in flight"
    );
    // The model after writes 1..=k; write n + 1 was in flight at the kill, and the one
    // block holding it is where it went.
    let mut expected = vec![0u64; BLOCKS as usize];
    for (id, block, _) in completed {
        if *id <= k {
            expected[*block as usize] = *id;
        }
    }
    if k == n + 1 {
        let at = held.iter().position(|id| *id == k).expect("k is held");
        expected[at] = k;
    }
    let wrong: Vec<usize> = (0..BLOCKS as usize)
        .filter(|&b| held[b] != expected[b])
        .collect();
    assert!(
        wrong.is_empty(),
        "{context}: not a prefix: {} blocks differ from the volume after write {k}, first block {} holds {} where {} was expected",
        wrong.len(),
        wrong[0],
        held[wrong[0]],
        expected[wrong[0]]
    );
    // What is missing completed within interval + transfer of the kill.
    let missing = completed.iter().filter(|(id, _, _)| *id > k).count();
    let oldest_missing = completed
        .iter()
        .find(|(id, _, _)| *id > k)
        .map(|(_, _, at)| killed_at.saturating_duration_since(*at));
    eprintln!(
        "{context}: {n} writes completed, the copy holds the first {k}; {missing} missing, the oldest completed {oldest_missing:?} before the kill"
    );
    if let Some(age) = oldest_missing {
        assert!(
            age <= INTERVAL * 3,
            "{context}: a write completed {age:?} before the kill is missing; the interval is {INTERVAL:?}"
        );
    }
    k
}

#[test]
fn metro_peer_keeps_every_write_and_regional_peer_a_prefix_of_the_same_primary() {
    let seed = crate::harness::test_seed("metro_and_regional");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut cluster = Cluster::start(ClusterOptions {
        node_count: 3,
        size: "32MiB".into(),
        journal_size: "32MiB".into(),
        relay: true,
        seed,
        regional: Some((NodeId::C, "1s".into())),
        ..ClusterOptions::default()
    });
    // Site c is far away; a and b are a metro pair.
    for (x, y) in [(NodeId::A, NodeId::C), (NodeId::B, NodeId::C)] {
        cluster
            .pair_relay(x, y)
            .both()
            .set_delay(Duration::from_millis(20))
            .set_rate(Some(12 << 20));
    }
    cluster.wait_replica_state_to(NodeId::A, NodeId::B, "in-sync", Duration::from_secs(60));
    cluster.wait_replica_state_to(NodeId::A, NodeId::C, "in-sync", Duration::from_secs(60));
    let writer = Writer::start(cluster.nbd_socket(NodeId::A), seed);
    std::thread::sleep(Duration::from_millis(rng.random_range(1500..3500)));
    let killed_at = Instant::now();
    cluster.kill9(NodeId::A);
    let completed = writer.stop();
    // Metro: b holds every completed write (its read-only export, before any promotion).
    let held_b = read_stamps(&cluster, NodeId::B);
    let mut last = vec![0u64; BLOCKS as usize];
    for (id, block, _) in &completed {
        last[*block as usize] = *id;
    }
    let n = completed.len() as u64;
    for block in 0..BLOCKS as usize {
        assert!(
            held_b[block] == last[block] || held_b[block] == n + 1,
            "seed {seed}: metro peer b lost a completed write: block {block} holds {} where write {} completed",
            held_b[block],
            last[block]
        );
    }
    // Regional: c, promoted instead, holds a prefix.
    cluster
        .promote(NodeId::C, true)
        .expect("promote --force of the regional copy");
    let held_c = read_stamps(&cluster, NodeId::C);
    let k = check_prefix(&held_c, &completed, killed_at, &format!("seed {seed}"));
    eprintln!("metro peer b holds all {n} completed writes; regional peer c the first {k}");
}

#[test]
fn regional_secondary_killed_mid_stream_comes_back_at_a_batch_boundary() {
    let seed = crate::harness::test_seed("regional_secondary_kill");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut cluster = regional_pair(seed, "200ms", Duration::from_millis(20), Vec::new());
    let writer = Writer::start(cluster.nbd_socket(NodeId::A), seed);
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(rng.random_range(300..1200)));
        cluster.kill9(NodeId::B);
        cluster.start_node(NodeId::B);
    }
    std::thread::sleep(Duration::from_millis(500));
    let completed = writer.stop();
    let n = completed.len();
    assert!(
        n > 0,
        "the primary kept taking writes while its regional peer restarted"
    );
    // Once caught up, the copy equals the primary block for block.
    wait_caught_up(&cluster);
    let (held_a, held_b) = (
        read_stamps(&cluster, NodeId::A),
        read_stamps(&cluster, NodeId::B),
    );
    let differ: Vec<(usize, u64, u64)> = (0..held_a.len())
        .filter(|&i| held_a[i] != held_b[i])
        .map(|i| (i, held_a[i], held_b[i]))
        .take(10)
        .collect();
    assert!(
        differ.is_empty(),
        "the regional copy differs from the primary after catching up (seed {seed}): (block, primary, regional) {differ:?}\n{}",
        cluster.node(NodeId::B).log_tail()
    );
    let metrics = cluster.metrics(NodeId::A);
    let logical = metric_sum(
        &metrics,
        "ferry_replication_bytes_total",
        &[r#"kind="logical""#],
    )
    .unwrap_or(0.0);
    let wire = metric_sum(
        &metrics,
        "ferry_replication_bytes_total",
        &[r#"kind="wire""#],
    )
    .unwrap_or(0.0);
    eprintln!(
        "{n} writes; regional wire/logical bytes {:.3}",
        wire / logical.max(1.0)
    );
}

#[test]
fn regional_link_cut_then_restored_catches_up_without_holding_writes() {
    let seed = crate::harness::test_seed("regional_link_cut");
    let cluster = regional_pair(seed, "500ms", Duration::from_millis(20), Vec::new());
    let writer = Writer::start(cluster.nbd_socket(NodeId::A), seed);
    std::thread::sleep(Duration::from_millis(500));
    cluster.relay().both().cut();
    let before = writer.count();
    // Longer than the peer timeout: the primary gives the link up and tracks the peer.
    cluster.wait_replica_state(NodeId::A, "degraded", Duration::from_secs(30));
    let during = writer.count();
    assert!(
        during > before + 100,
        "writes kept completing with the regional peer cut off ({before} then {during})"
    );
    cluster.relay().both().restore();
    std::thread::sleep(Duration::from_millis(1500));
    writer.stop();
    assert_converges(&cluster, &format!("seed {seed}"));
}

#[test]
fn pause_stops_shipping_and_resume_catches_up_with_only_what_changed() {
    let seed = crate::harness::test_seed("regional_pause");
    let cluster = Cluster::start(ClusterOptions {
        size: "32MiB".into(),
        journal_size: "32MiB".into(),
        seed,
        regional: Some((NodeId::B, "200ms".into())),
        ..ClusterOptions::default()
    });
    cluster.wait_replica_state(NodeId::A, "in-sync", Duration::from_secs(60));
    // Only regional replicas pause; an unknown peer is refused.
    let a = cluster.node(NodeId::A);
    let unknown = a.ctl(&["pause", crate::cluster::VOLUME, "--peer", "nobody"]);
    assert_eq!(unknown.status.code(), Some(1), "{unknown}");
    let paused = a.ctl(&["pause", crate::cluster::VOLUME]);
    assert_eq!(paused.status.code(), Some(0), "{paused}");
    cluster.wait_replica_state(NodeId::A, "paused", Duration::from_secs(10));
    let head_b = cluster.volume_status(NodeId::B)["journal"]["head_lsn"].clone();
    let mut conn = NbdConn::connect_unix(&cluster.nbd_socket(NodeId::A), crate::cluster::VOLUME)
        .expect("connect");
    for id in 1..=200u64 {
        conn.write((id % 64) * BLOCK, &stamp(id), false)
            .expect("write while paused");
    }
    std::thread::sleep(Duration::from_millis(600));
    let replica = cluster.replica(NodeId::A);
    assert_eq!(replica["state"], "paused", "{replica}");
    assert!(replica["lag_bytes"].as_u64().unwrap_or(0) > 0, "{replica}");
    assert_eq!(
        cluster.volume_status(NodeId::B)["journal"]["head_lsn"],
        head_b,
        "nothing shipped while paused"
    );
    let resumed = a.ctl(&["resume", crate::cluster::VOLUME, "--peer", "b"]);
    assert_eq!(resumed.status.code(), Some(0), "{resumed}");
    let replica = wait_caught_up(&cluster);
    // A delta: the 64 blocks written, not the volume.
    let resynced = replica["resynced_bytes"].as_u64().unwrap_or(u64::MAX);
    assert!(
        resynced <= 64 * BLOCK,
        "resume sent {resynced} bytes: {replica}"
    );
    assert_eq!(
        read_stamps(&cluster, NodeId::A),
        read_stamps(&cluster, NodeId::B),
        "the copies differ after resume (seed {seed})"
    );
}

/// A planned switchover to the regional copy loses nothing: `ferry demote` ships the open
/// batch at once (the interval is far longer than the test) and returns only once the regional
/// copy holds every completed write; `ferry promote` there (not forced) then finds them all.
#[test]
fn planned_switchover_to_the_regional_copy_keeps_every_completed_write() {
    let seed = crate::harness::test_seed("regional_switchover");
    let cluster = regional_pair(seed, "30s", Duration::from_millis(5), Vec::new());
    let mut conn = NbdConn::connect_unix(&cluster.nbd_socket(NodeId::A), crate::cluster::VOLUME)
        .expect("connect");
    for id in 1..=BLOCKS {
        conn.write((id - 1) * BLOCK, &stamp(id), false)
            .expect("write");
    }
    drop(conn);
    let expected = read_stamps(&cluster, NodeId::A);
    let demoted = cluster
        .node(NodeId::A)
        .ctl(&["demote", crate::cluster::VOLUME]);
    assert_eq!(demoted.status.code(), Some(0), "{demoted}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let promoted = cluster
            .node(NodeId::B)
            .ctl(&["promote", crate::cluster::VOLUME]);
        if promoted.status.code() == Some(0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the regional copy refused promotion: {promoted}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        read_stamps(&cluster, NodeId::B),
        expected,
        "the regional copy lacks writes the demoted primary completed (seed {seed})"
    );
}

/// The secondary counts what it applies: every byte of the batches (distinct blocks, so no
/// write is coalesced away), and the time it took; the primary applies no batch.
#[test]
fn regional_secondary_counts_the_bytes_and_time_of_the_batches_it_applies() {
    let seed = crate::harness::test_seed("regional_apply_metrics");
    let cluster = regional_pair(seed, "200ms", Duration::ZERO, Vec::new());
    let mut conn = NbdConn::connect_unix(&cluster.nbd_socket(NodeId::A), crate::cluster::VOLUME)
        .expect("connect");
    let blocks = 300u64;
    for id in 1..=blocks {
        conn.write(id * BLOCK, &stamp(id), false).expect("write");
    }
    wait_caught_up(&cluster);
    // The counters move after the batch's journal restart that wait_caught_up sees.
    let deadline = Instant::now() + Duration::from_secs(10);
    let bytes = "ferry_regional_apply_bytes_total";
    while cluster.metric(NodeId::B, bytes, &[]) < (blocks * BLOCK) as f64 {
        assert!(
            Instant::now() < deadline,
            "b applied {} bytes of batches, not {} (seed {seed})",
            cluster.metric(NodeId::B, bytes, &[]),
            blocks * BLOCK
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        cluster.metric(NodeId::B, bytes, &[]),
        (blocks * BLOCK) as f64
    );
    let seconds = "ferry_regional_apply_seconds_total";
    assert!(cluster.metric(NodeId::B, seconds, &[]) > 0.0);
    assert_eq!(cluster.metric(NodeId::A, bytes, &[]), 0.0);
    assert_eq!(cluster.metric(NodeId::A, seconds, &[]), 0.0);
}

// Power loss needs a daemon built with fault injection.
#[cfg(feature = "fault-injection")]
/// Plays a power loss on every file of node `id` that kept an undo log (its device image, its
/// journal, its stage file, its maps and meta).
fn power_loss_revert(cluster: &Cluster, id: NodeId, seed: u64) -> u64 {
    let dir = cluster.node(id).spec.dir.clone();
    let mut sectors = 0;
    for (index, dir) in [dir.clone(), dir.join("data")].iter().enumerate() {
        let reports = ferry::storage::power_loss::revert_dir(dir, seed ^ ((index as u64) << 56))
            .unwrap_or_else(|error| panic!("revert the undo logs in {}: {error}", dir.display()));
        assert!(
            index == 1 || !reports.is_empty(),
            "no undo log under {} (is FERRY_FAULT_POWER_LOSS=1 working?)",
            dir.display()
        );
        sectors += reports.iter().map(|(_, r)| r.sectors_reverted).sum::<u64>();
    }
    sectors
}

#[cfg(feature = "fault-injection")]
#[test]
fn regional_secondary_power_cut_mid_apply_comes_back_at_a_batch_boundary() {
    let seed = crate::harness::test_seed("regional_secondary_power_loss");
    let mut rng = StdRng::seed_from_u64(seed);
    // A slow device: applying a batch takes a while, so the power often goes mid-apply.
    let mut cluster = regional_pair(
        seed,
        "200ms",
        Duration::from_millis(10),
        vec![
            ("FERRY_FAULT_POWER_LOSS".into(), "1".into()),
            ("FERRY_FAULT_DEVICE_WRITE_DELAY_US".into(), "1500".into()),
        ],
    );
    let writer = Writer::start(cluster.nbd_socket(NodeId::A), seed);
    std::thread::sleep(Duration::from_millis(rng.random_range(800..2500)));
    // The power goes on b (batches arrive every 200 ms, so one is likely being stored or
    // applied); the link stays cut so that b comes back alone, as of what it had on disk.
    cluster.relay().both().cut();
    let cut_at = Instant::now();
    cluster.kill9(NodeId::B);
    let completed = writer.stop();
    let sectors = power_loss_revert(&cluster, NodeId::B, seed);
    cluster.start_node(NodeId::B);
    let held = read_stamps(&cluster, NodeId::B);
    let k = check_prefix(
        &held,
        &completed,
        cut_at,
        &format!("seed {seed}, after a power loss on b ({sectors} sectors taken back)"),
    );
    // Back on the link, it catches up to the primary exactly.
    cluster.relay().both().restore();
    assert_converges(&cluster, &format!("seed {seed}, it held {k}"));
}

/// Cuts the link until the primary gives the regional peer up (`degraded`), with the writer
/// running; stops the writer and restores the link through a slow pipe (`rate` bytes/s), so
/// that the catch-up from the map takes a while; returns once b reports it staged, with the
/// writes that completed and when the link was cut.
fn cut_until_degraded_then_catch_up_slowly(
    cluster: &Cluster,
    seed: u64,
    rate: u64,
) -> (Vec<(u64, u64, Instant)>, Instant) {
    let writer = Writer::start(cluster.nbd_socket(NodeId::A), seed);
    std::thread::sleep(Duration::from_millis(1500));
    cluster.relay().both().cut();
    let cut_at = Instant::now();
    cluster.wait_replica_state(NodeId::A, "degraded", Duration::from_secs(30));
    let completed = writer.stop();
    cluster.relay().both().set_rate(Some(rate)).restore();
    let volume = cluster.wait_volume(
        NodeId::B,
        "catching up, staged",
        Duration::from_secs(60),
        |volume| replica_of(volume, "a").is_ok_and(|replica| replica["catch_up"] == "staged"),
    );
    assert_eq!(
        volume["consistent"], true,
        "a staged catch-up leaves the copy consistent: {volume}"
    );
    (completed, cut_at)
}

#[test]
fn regional_copy_promoted_during_its_catch_up_holds_a_prefix_of_the_completed_writes() {
    let seed = crate::harness::test_seed("regional_promote_mid_catch_up");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut cluster = regional_pair(seed, "500ms", Duration::from_millis(20), Vec::new());
    let (completed, cut_at) = cut_until_degraded_then_catch_up_slowly(&cluster, seed, 256 << 10);
    // Its read-only export shows its last batch boundary meanwhile.
    let during = read_stamps(&cluster, NodeId::B);
    check_prefix(
        &during,
        &completed,
        cut_at,
        &format!("seed {seed}, b's export during its catch-up"),
    );
    std::thread::sleep(Duration::from_millis(rng.random_range(0..1500)));
    let status = cluster.volume_status(NodeId::B);
    cluster.kill9(NodeId::A);
    cluster.promote(NodeId::B, true).unwrap_or_else(|error| {
        panic!("promote --force during the catch-up (seed {seed}): {error}; b was {status}")
    });
    let held = read_stamps(&cluster, NodeId::B);
    let k = check_prefix(
        &held,
        &completed,
        cut_at,
        &format!("seed {seed}, b promoted during its catch-up"),
    );
    eprintln!("b was {}", status["replicas"]);
    assert!(k > 0, "b held nothing of the first writes (seed {seed})");
}

#[cfg(feature = "fault-injection")]
#[test]
fn regional_secondary_power_cut_during_its_catch_up_comes_back_at_a_boundary() {
    let seed = crate::harness::test_seed("regional_power_loss_mid_catch_up");
    let mut rng = StdRng::seed_from_u64(seed);
    // A slow device: the catch-up's apply takes a while, so the power often goes during it
    // (or while it is still being stored: both must come back at a boundary).
    let mut cluster = regional_pair(
        seed,
        "500ms",
        Duration::from_millis(10),
        vec![
            ("FERRY_FAULT_POWER_LOSS".into(), "1".into()),
            ("FERRY_FAULT_DEVICE_WRITE_DELAY_US".into(), "3000".into()),
        ],
    );
    let (completed, cut_at) = cut_until_degraded_then_catch_up_slowly(&cluster, seed, 1 << 20);
    std::thread::sleep(Duration::from_millis(rng.random_range(0..4000)));
    cluster.relay().both().cut();
    let status = cluster.volume_status(NodeId::B);
    cluster.kill9(NodeId::B);
    let sectors = power_loss_revert(&cluster, NodeId::B, seed);
    cluster.start_node(NodeId::B);
    let held = read_stamps(&cluster, NodeId::B);
    let k = check_prefix(
        &held,
        &completed,
        cut_at,
        &format!(
            "seed {seed}, b after a power loss during its catch-up ({sectors} sectors taken back)"
        ),
    );
    let log =
        std::fs::read_to_string(cluster.node(NodeId::B).spec.stderr_path()).unwrap_or_default();
    eprintln!(
        "b was {}; at its start it {}",
        status["replicas"],
        if log.contains("applied the stored catch-up again") {
            "applied the stored catch-up again"
        } else {
            "had no stored catch-up to apply"
        }
    );
    assert_eq!(
        cluster.volume_status(NodeId::B)["consistent"],
        true,
        "seed {seed}"
    );
    cluster.relay().both().set_rate(None).restore();
    assert_converges(&cluster, &format!("seed {seed}, it held {k}"));
}

#[cfg(feature = "fault-injection")]
#[test]
fn regional_secondary_killed_mid_catch_up_apply_applies_it_whole_at_start() {
    let seed = crate::harness::test_seed("regional_kill_mid_catch_up_apply");
    // b kills itself halfway through writing the committed catch-up to its device, and the
    // power goes with it.
    let mut cluster = regional_pair(
        seed,
        "500ms",
        Duration::from_millis(10),
        vec![
            ("FERRY_FAULT_POWER_LOSS".into(), "1".into()),
            ("FERRY_FAULT_KILL_MID_CATCHUP_APPLY".into(), "1".into()),
        ],
    );
    let (completed, cut_at) = cut_until_degraded_then_catch_up_slowly(&cluster, seed, 4 << 20);
    let deadline = Instant::now() + Duration::from_secs(60);
    while cluster.node(NodeId::B).try_volume_status().is_ok() {
        assert!(
            Instant::now() < deadline,
            "b never reached the catch-up's apply (seed {seed})"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    cluster.relay().both().cut();
    cluster.kill9(NodeId::B);
    let sectors = power_loss_revert(&cluster, NodeId::B, seed);
    // Later catch-ups run to their end.
    cluster
        .node_mut(NodeId::B)
        .spec
        .env
        .retain(|(name, _)| name != "FERRY_FAULT_KILL_MID_CATCHUP_APPLY");
    cluster.start_node(NodeId::B);
    let log =
        std::fs::read_to_string(cluster.node(NodeId::B).spec.stderr_path()).unwrap_or_default();
    assert!(
        log.contains("applied the stored catch-up again"),
        "b did not apply its stored catch-up at start (seed {seed})"
    );
    // The catch-up led to the primary's head after the writer stopped: every write.
    let held = read_stamps(&cluster, NodeId::B);
    let k = check_prefix(
        &held,
        &completed,
        cut_at,
        &format!("seed {seed}, b killed mid-apply ({sectors} sectors taken back)"),
    );
    assert_eq!(
        k,
        completed.len() as u64,
        "the catch-up was committed: b holds every write (seed {seed})"
    );
    cluster.relay().both().set_rate(None).restore();
    assert_converges(&cluster, &format!("seed {seed}"));
}

#[cfg(feature = "fault-injection")]
#[test]
fn regional_primary_power_loss_then_both_copies_hold_the_same_prefix() {
    let seed = crate::harness::test_seed("regional_primary_power_loss");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut cluster = Cluster::start(ClusterOptions {
        size: "32MiB".into(),
        journal_size: "32MiB".into(),
        relay: true,
        seed,
        regional: Some((NodeId::B, "300ms".into())),
        env_a: vec![("FERRY_FAULT_POWER_LOSS".into(), "1".into())],
        ..ClusterOptions::default()
    });
    cluster.relay().both().set_delay(Duration::from_millis(10));
    cluster.wait_replica_state(NodeId::A, "in-sync", Duration::from_secs(60));
    let writer = Writer::start(cluster.nbd_socket(NodeId::A), seed);
    std::thread::sleep(Duration::from_millis(rng.random_range(1000..3000)));
    // The power goes on the primary: what it had not made durable may go, though its
    // regional peer may already hold some of it.
    let lost_at = Instant::now();
    cluster.kill9(NodeId::A);
    let durable = writer.durable.load(Ordering::Relaxed);
    let completed = writer.stop();
    let sectors = power_loss_revert(&cluster, NodeId::A, seed);
    cluster.start_node(NodeId::A);
    let held = read_stamps(&cluster, NodeId::A);
    let k = check_prefix(
        &held,
        &completed,
        lost_at,
        &format!("seed {seed}, a after a power loss ({sectors} sectors taken back)"),
    );
    assert!(
        k >= durable,
        "a lost write {durable}, which completed durably (FUA or FLUSH), holding only {k} (seed {seed})"
    );
    // b gives up what a lost (never a durable write) and the copies converge.
    wait_caught_up(&cluster);
    assert_eq!(
        read_stamps(&cluster, NodeId::B),
        held,
        "the regional copy differs from the primary after its power loss (seed {seed})"
    );
}
