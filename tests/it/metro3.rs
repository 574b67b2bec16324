//! Metro replication with three copies of a volume: node a is primary, b and c are its metro
//! secondaries, and every node lists the other two as peers and metro replicas (SPEC §4:
//! configs are symmetric). A write completes only when it is in the journal of the primary and
//! of every connected metro peer (SPEC §1), so a third copy adds nothing to the promises; the
//! tests check that they still hold:
//!
//! - only the primary sends a copy data: the secondaries never resync each other, whether at
//!   the initial syncs or when one of them comes back after an outage;
//! - a copy that was away (link cut, or killed) comes back byte-identical to the primary;
//! - after the primary dies and one secondary is promoted, the promoted copy holds every
//!   completed write (Metro RPO 0, SPEC §2) and the third copy follows it with a delta resync
//!   and ends byte-identical to it, while the promoted copy stays primary.
//!
//! The workload and its model are `metro.rs`'s. Seeded: FERRY_SEED replays a run.

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::cluster::{
    self, format_states, Cluster, ClusterOptions, NodeId,
    NodeId::{A, B, C},
    VOLUME,
};
use crate::harness;
use crate::metro::{
    self, block_contents, describe_block, read_region, Outcome, Workload, WorkloadSpec,
    DEGRADE_SLACK, RESYNC_TIMEOUT, ROLE_TIMEOUT, SYNC_TIMEOUT,
};
use crate::model::{self, BLOCK_BYTES};
use crate::nbd_wire::NbdConn;

/// Writes of the prefill before the secondaries start (4 KiB to 64 KiB each, over the whole
/// volume), so that the initial syncs carry data and not only zero ranges.
const PREFILL_WRITES: usize = 200;
/// Blocks the promoted secondary writes after the failover, right after the workload's region.
const PROMOTED_WRITE_BLOCKS: u64 = 32;
/// The round number stamped into the promoted node's own writes (the workload uses 0 and 1).
const PROMOTED_ROUND: u64 = 0x70;
/// How long the copies may take to settle (every replica in sync, nothing left to send).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How many differing blocks a copy comparison describes.
const DIFFERENCES_SHOWN: usize = 8;

/// Three nodes, a relay on every link (so one link can be cut and the others kept).
fn three_nodes(seed: u64) -> ClusterOptions {
    ClusterOptions {
        node_count: 3,
        relay: true,
        seed,
        ..ClusterOptions::default()
    }
}

/// Starts node a alone and fills the volume with seeded data, then returns the contents of the
/// workload's region (the model's baseline). The secondaries are not started.
fn prefill_primary(cluster: &mut Cluster, seed: u64, spec: &WorkloadSpec) -> Vec<u8> {
    cluster.start_node(A);
    let mut image = vec![0u8; cluster.volume_size_bytes() as usize];
    metro::write_phase(&cluster.nbd_socket(A), &mut image, seed, PREFILL_WRITES);
    read_region(&cluster.nbd_socket(A), spec.region_blocks)
}

/// Waits until `primary` reports every replica in `peers` in-sync with nothing left to send;
/// Err with the last status otherwise.
fn settle(
    cluster: &Cluster,
    primary: NodeId,
    peers: &[NodeId],
    timeout: Duration,
) -> Result<serde_json::Value, String> {
    cluster.poll_volume(primary, timeout, |volume| {
        peers.iter().all(|peer| {
            cluster::replica_of(volume, peer.name())
                .map(|replica| replica["state"] == "in-sync" && replica["lag_bytes"] == 0)
                .unwrap_or(false)
        })
    })
}

/// What the secondaries `ids` sent as resync data, by every account the daemon gives: the
/// counter `ferry_resync_bytes_total` (SPEC §6, per peer since the process started) and each
/// replica's `resynced_bytes` and `resync_remaining_bytes` (SPEC §5). A secondary sends
/// nothing: one line per figure that is not zero.
fn resync_sent_by_secondaries(cluster: &Cluster, ids: &[NodeId], when: &str) -> Vec<String> {
    let mut lines = Vec::new();
    for &id in ids {
        let metrics = cluster.metrics(id);
        let volume = cluster.volume_status(id);
        let role = volume["role"].as_str().unwrap_or("(no role)").to_string();
        for peer in cluster.peers_of(id) {
            let label = format!("peer=\"{}\"", peer.name());
            let sent_bytes =
                cluster::metric_sum(&metrics, "ferry_resync_bytes_total", &[&label]).unwrap_or(0.0);
            if sent_bytes > 0.0 {
                lines.push(format!(
                    "{when}: node {} ({role}) sent {sent_bytes} bytes of resync data to node {} \
                     (ferry_resync_bytes_total{{{label}}})",
                    id.name(),
                    peer.name()
                ));
            }
            let replica = cluster::replica_of(&volume, peer.name())
                .unwrap_or_else(|error| panic!("node {}: {error}", id.name()));
            for key in ["resynced_bytes", "resync_remaining_bytes"] {
                if replica[key].as_u64() != Some(0) {
                    lines.push(format!(
                        "{when}: node {} ({role}) reports {key} {} towards node {}: {replica}",
                        id.name(),
                        replica[key],
                        peer.name()
                    ));
                }
            }
        }
    }
    lines
}

/// A line if a monitor of the replica between two secondaries saw a sync in either direction
/// (`syncing` or `resyncing`: one of them was sending the other a copy).
fn resyncs_between_secondaries(seen: &[(Duration, String)], who: &str) -> Option<String> {
    seen.iter()
        .any(|(_, state)| state == "syncing" || state == "resyncing")
        .then(|| {
            format!(
                "{who}: the replica between the two secondaries went through a sync: {}",
                format_states(seen)
            )
        })
}

/// Compares the whole volume of nodes `x` and `y` block by block; None if identical, else how
/// many 4 KiB blocks differ and what the first ones hold on each side.
fn compare_copies(cluster: &Cluster, x: NodeId, y: NodeId) -> Option<String> {
    let blocks = cluster.volume_size_bytes() / BLOCK_BYTES as u64;
    let left = read_region(&cluster.nbd_socket(x), blocks);
    let right = read_region(&cluster.nbd_socket(y), blocks);
    let differing: Vec<usize> = (0..blocks as usize)
        .filter(|block| {
            let range = block * BLOCK_BYTES..(block + 1) * BLOCK_BYTES;
            left[range.clone()] != right[range]
        })
        .collect();
    if differing.is_empty() {
        return None;
    }
    let shown: Vec<String> = differing
        .iter()
        .take(DIFFERENCES_SHOWN)
        .map(|block| {
            let range = block * BLOCK_BYTES..(block + 1) * BLOCK_BYTES;
            format!(
                "  block {block}: {} holds [{}]; {} holds [{}]",
                x.name(),
                describe_block(&left[range.clone()], &right[range.clone()]),
                y.name(),
                describe_block(&right[range.clone()], &left[range]),
            )
        })
        .collect();
    Some(format!(
        "nodes {} and {} differ in {} of {blocks} blocks (\"old\" = the same bytes as the other \
         copy, rN/wID/bB/sS = the stamp of write ID of round N); the first ones:\n{}",
        x.name(),
        y.name(),
        differing.len(),
        shown.join("\n")
    ))
}

/// Model violations of node `id`'s copy of the workload's region after `outcome`, one line
/// per block (empty when the copy holds what the model allows).
fn violations_on(cluster: &Cluster, id: NodeId, baseline: &[u8], outcome: &Outcome) -> Vec<String> {
    let region = read_region(&cluster.nbd_socket(id), outcome.spec.region_blocks);
    model::verify_region(&region, baseline, &outcome.records, &outcome.spec)
}

/// One line summing up model violations (`what`: which copy, when), or None.
fn violations_line(violations: &[String], what: &str, seed: u64) -> Option<String> {
    (!violations.is_empty()).then(|| {
        format!(
            "{what}: {} blocks violate the model (replay with FERRY_SEED={seed}); the first \
             ones:\n  {}",
            violations.len(),
            violations
                .iter()
                .take(DIFFERENCES_SHOWN)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n  ")
        )
    })
}

/// Writes PROMOTED_WRITE_BLOCKS blocks right after the workload's region on node `id` (one
/// FUA write per block, then a FLUSH): the newly promoted primary's own writes, which the third
/// copy must receive too.
fn write_on_promoted(cluster: &Cluster, id: NodeId, spec: &WorkloadSpec) {
    let mut conn = NbdConn::connect_unix(&cluster.nbd_socket(id), VOLUME)
        .unwrap_or_else(|error| panic!("connect to the promoted node {}: {error}", id.name()));
    let first = spec.region_blocks;
    for block in first..first + PROMOTED_WRITE_BLOCKS {
        let data = block_contents(spec.seed, PROMOTED_ROUND, block, block);
        conn.write(block * BLOCK_BYTES as u64, &data, true)
            .unwrap_or_else(|error| {
                panic!(
                    "write of block {block} on the promoted node {} failed: {error}; status {}",
                    id.name(),
                    cluster.volume_status(id)
                )
            });
    }
    conn.flush().expect("flush on the promoted node");
    conn.disconnect();
}

/// Stops the running nodes `ids` and fails with `failures`, if any, and the replication log
/// lines of every node.
fn stop_and_report(cluster: &mut Cluster, ids: &[NodeId], failures: &[String], seed: u64) {
    let logs: Vec<String> = cluster
        .ids()
        .into_iter()
        .map(|id| {
            format!(
                "--- replication log lines of {}:\n{}",
                id.name(),
                cluster.replication_log(id, 40)
            )
        })
        .collect();
    for &id in ids {
        cluster.stop(id);
    }
    assert!(
        failures.is_empty(),
        "{} failed checks (seed {seed}, replay with FERRY_SEED={seed}):\n- {}\n{}",
        failures.len(),
        failures.join("\n- "),
        logs.join("\n")
    );
}

/// Three copies, the primary writing all along: the initial syncs of b and c (which start
/// while a writes), then a cut of the a–c link under load (the b–c link stays up), then kill -9
/// of a, promote --force of b, c following b, and the old primary a restarting.
///
/// Checked: only the primary ever sends resync data (counters and replica states of the
/// secondaries), c comes back byte-identical to a, the promoted b holds every completed write
/// (SPEC §2, Metro RPO 0), b stays primary, c follows b with a delta resync and ends
/// byte-identical to it, and the restarted a becomes b's secondary without sending anything.
#[test]
fn metro_three_nodes_secondaries_never_resync_each_other() {
    let seed = harness::test_seed("metro_three_nodes_secondaries_never_resync_each_other");
    let mut rng = StdRng::seed_from_u64(seed ^ 0x0033_6e6f_6465);
    let spec = WorkloadSpec::once(seed, 4, 2048); // 8 MiB of the 64 MiB volume
    let mut cluster = Cluster::configure(three_nodes(seed));
    let size = cluster.volume_size_bytes();
    let mut failures = Vec::new();

    // 1. The secondaries join a primary that holds data and keeps writing: a syncs both.
    let baseline = prefill_primary(&mut cluster, seed, &spec);
    let monitor_b = cluster.monitor_to(B, C);
    let monitor_c = cluster.monitor_to(C, B);
    cluster.start_node(B);
    cluster.start_node(C);
    let sync_started = Instant::now();
    let load = Workload::start(&cluster.nbd_socket(A), spec);
    for peer in [B, C] {
        cluster.wait_replica_state_to(A, peer, "in-sync", SYNC_TIMEOUT);
    }
    eprintln!(
        "initial syncs of b and c done after {:?}; a: {}",
        sync_started.elapsed(),
        cluster.volume_status(A)["replicas"]
    );
    load.assert_progress(
        20,
        Duration::from_secs(10),
        "after the initial syncs",
        &cluster,
    );
    failures.extend(resync_sent_by_secondaries(
        &cluster,
        &[B, C],
        "after the initial syncs",
    ));

    // 2. The a–c link is cut under load while the b–c link stays up: a degrades its replica
    // towards c and keeps writing with b; then the link heals and a brings c back.
    std::thread::sleep(Duration::from_millis(rng.random_range(300..1000)));
    cluster.link(A, C).cut();
    let degrade_timeout = cluster.peer_timeout() + DEGRADE_SLACK;
    cluster.wait_replica_state_to(A, C, "degraded", degrade_timeout);
    let cut_clock = load.clock();
    load.assert_progress(
        20,
        Duration::from_secs(10),
        "with the a–c link cut",
        &cluster,
    );
    let replica_b = cluster.replica_to(A, B);
    if replica_b["state"] != "in-sync" {
        failures.push(format!(
            "a's replica towards b left in-sync when only the a–c link was cut: {replica_b}"
        ));
    }
    std::thread::sleep(Duration::from_millis(rng.random_range(500..1500)));
    let heal_clock = load.clock();
    cluster.link(A, C).restore();
    cluster.wait_replica_state_to(A, C, "in-sync", RESYNC_TIMEOUT);
    load.assert_progress(20, Duration::from_secs(10), "after c came back", &cluster);
    let outcome = load.finish();
    outcome.assert_no_errors();
    if let Err(last) = settle(&cluster, A, &[B, C], SETTLE_TIMEOUT) {
        failures.push(format!(
            "a did not report b and c in-sync with no lag within {SETTLE_TIMEOUT:?} after the \
             load stopped: {last}"
        ));
    }
    let replica_c = cluster.replica_to(A, C);
    let written_while_cut = outcome.distinct_bytes_issued_between(cut_clock, heal_clock);
    eprintln!(
        "{} writes completed; a's replica towards c after the cut: {replica_c}; distinct bytes \
         written while cut: {written_while_cut}",
        outcome.completed()
    );
    let resynced = replica_c["resynced_bytes"].as_u64().unwrap_or(u64::MAX);
    if resynced > size / 4 {
        failures.push(format!(
            "a resynced {resynced} bytes to c after a cut of a few seconds, of a {size}-byte \
             volume whose writes touch {} bytes: not a delta resync",
            spec.region_blocks * BLOCK_BYTES as u64
        ));
    }
    failures.extend(resync_sent_by_secondaries(
        &cluster,
        &[B, C],
        "after the a–c cut healed",
    ));
    for (monitor, who) in [(monitor_b, "b towards c"), (monitor_c, "c towards b")] {
        let seen = monitor.stop();
        eprintln!("replica {who}: {}", format_states(&seen));
        failures.extend(resyncs_between_secondaries(&seen, who));
    }

    // 3. The primary holds what the model allows; both secondaries are byte-identical to it.
    metro::check_node(
        &cluster,
        A,
        &baseline,
        &outcome,
        "primary a after the a–c cut",
        "(see above)",
    );
    for id in [B, C] {
        if let Some(difference) = compare_copies(&cluster, A, id) {
            failures.push(format!(
                "after the initial syncs and the a–c cut, with every replica of a in-sync: \
                 {difference}"
            ));
        }
    }

    // 4. kill -9 of a under load, promote --force of b: b holds every completed write.
    let spec = WorkloadSpec { round: 1, ..spec };
    let baseline = read_region(&cluster.nbd_socket(A), spec.region_blocks);
    let generation_a = cluster.generation(A);
    let load = Workload::start(&cluster.nbd_socket(A), spec);
    load.assert_progress(50, Duration::from_secs(10), "before the kill", &cluster);
    std::thread::sleep(Duration::from_millis(rng.random_range(200..1500)));
    let killed_at = Instant::now();
    cluster.kill9(A);
    let outcome = load.finish();
    let early_errors = outcome.errors_before(killed_at);
    assert!(
        early_errors.is_empty(),
        "writes failed before the kill of a: {early_errors:?}"
    );
    if let Err(reason) = cluster.promote(B, true) {
        panic!(
            "promote --force on b refused after a was killed: {reason}\nstatus b: {}",
            cluster.volume_status(B)
        );
    }
    let generation_b = cluster.generation(B);
    eprintln!(
        "a killed with {} writes completed; b promoted: generation {generation_a} -> \
         {generation_b}",
        outcome.completed()
    );
    failures.extend(violations_line(
        &violations_on(&cluster, B, &baseline, &outcome),
        "node b, promoted after kill -9 of a (Metro RPO 0)",
        seed,
    ));
    write_on_promoted(&cluster, B, &spec);

    // 5. c follows b: a delta resync, b stays primary, c ends identical to b.
    let followed = cluster.poll_volume(B, RESYNC_TIMEOUT, |volume| {
        cluster::replica_of(volume, C.name())
            .map(|replica| replica["state"] == "in-sync" && replica["lag_bytes"] == 0)
            .unwrap_or(false)
    });
    check_third_copy_follows(&cluster, followed, None, &mut failures);

    // 6. The old primary a comes back: it must learn that b was promoted and follow b like c
    // (SPEC §2, "Fencing"), send nothing to anyone, and leave c as it is.
    cluster.restart(A);
    if let Err(last) = cluster.poll_volume(A, ROLE_TIMEOUT, |volume| volume["role"] == "secondary")
    {
        failures.push(format!(
            "the old primary a, restarted after b was promoted, is not secondary within \
             {ROLE_TIMEOUT:?}: {last}"
        ));
    }
    if let Err(last) = settle(&cluster, B, &[A, C], RESYNC_TIMEOUT) {
        failures.push(format!(
            "the promoted b does not report a and c in-sync with no lag within \
             {RESYNC_TIMEOUT:?} of a's restart: {last}"
        ));
    }
    failures.extend(resync_sent_by_secondaries(
        &cluster,
        &[A, C],
        "after the old primary a restarted",
    ));
    for id in [C, A] {
        if let Some(difference) = compare_copies(&cluster, B, id) {
            failures.push(format!(
                "after the old primary a restarted, with b primary: {difference}"
            ));
        }
    }
    stop_and_report(&mut cluster, &[A, B, C], &failures, seed);
}

/// After the promotion of b (`followed`: whether b reported c in-sync in time): b is still
/// primary with c as its secondary, the resync was a delta (at least `lacked_bytes` when
/// known: what c had missed), and c is byte-identical to b. Adds a line per failed check.
fn check_third_copy_follows(
    cluster: &Cluster,
    followed: Result<serde_json::Value, String>,
    lacked_bytes: Option<u64>,
    failures: &mut Vec<String>,
) {
    let size = cluster.volume_size_bytes();
    match followed {
        Err(last) => failures.push(format!(
            "the promoted b did not report c in-sync with no lag within {RESYNC_TIMEOUT:?}: \
             {last}\n  c: {}",
            cluster
                .node(C)
                .try_volume_status()
                .unwrap_or_else(|error| error.into())
        )),
        Ok(volume) => {
            let replica = cluster::replica_of(&volume, C.name()).expect("replica towards c");
            let resynced = replica["resynced_bytes"].as_u64().unwrap_or(u64::MAX);
            eprintln!("b's replica towards c after the failover: {replica}");
            if resynced > size / 4 {
                failures.push(format!(
                    "b resynced {resynced} bytes to c, of a {size}-byte volume: not a delta \
                     resync"
                ));
            }
            if let Some(lacked) = lacked_bytes.filter(|lacked| resynced < *lacked) {
                failures.push(format!(
                    "b resynced {resynced} bytes to c, less than the {lacked} bytes of distinct \
                     blocks written while c was away: {replica}"
                ));
            }
        }
    }
    let role_b = cluster.role(B);
    if role_b != "primary" {
        failures.push(format!(
            "the promoted b is {role_b} after c reconnected (nothing asked it to step down): {}",
            cluster.volume_status(B)
        ));
    }
    let volume_c = cluster.volume_status(C);
    if volume_c["role"] != "secondary" {
        failures.push(format!("c is not secondary after the failover: {volume_c}"));
    }
    if let Some(difference) = compare_copies(cluster, B, C) {
        failures.push(format!(
            "after the failover to b, with c reported in sync: {difference}"
        ));
    }
}

/// Three copies in sync; c is killed with -9 under load, so it lags; then the primary is killed
/// with -9 and b is promoted with --force while c is still away. When c returns it must follow
/// b and receive everything it missed, including the writes it missed while a was still
/// primary (b received those as a secondary), and end byte-identical to b.
#[test]
fn metro_three_nodes_lagging_copy_catches_up_from_a_promoted_secondary() {
    let seed =
        harness::test_seed("metro_three_nodes_lagging_copy_catches_up_from_a_promoted_secondary");
    let mut rng = StdRng::seed_from_u64(seed ^ 0x006c_6167);
    let spec = WorkloadSpec::once(seed, 4, 2048);
    let mut cluster = Cluster::configure(three_nodes(seed));
    let mut failures = Vec::new();

    // 1. Three copies in sync on a volume that holds data (no load during the initial syncs).
    let baseline = prefill_primary(&mut cluster, seed, &spec);
    cluster.start_node(B);
    cluster.start_node(C);
    for peer in [B, C] {
        cluster.wait_replica_state_to(A, peer, "in-sync", SYNC_TIMEOUT);
    }
    if let Err(last) = settle(&cluster, A, &[B, C], SETTLE_TIMEOUT) {
        panic!("three copies not in sync with no lag after the initial syncs: {last}");
    }

    // 2. c is killed under load: a goes on with b alone, and c misses those writes.
    let load = Workload::start(&cluster.nbd_socket(A), spec);
    load.assert_progress(50, Duration::from_secs(10), "with three copies", &cluster);
    std::thread::sleep(Duration::from_millis(rng.random_range(200..800)));
    let c_killed_clock = load.clock();
    cluster.kill9(C);
    let degrade_timeout = cluster.peer_timeout() + DEGRADE_SLACK;
    cluster.wait_replica_state_to(A, C, "degraded", degrade_timeout);
    load.assert_progress(50, Duration::from_secs(10), "with c down", &cluster);
    std::thread::sleep(Duration::from_millis(rng.random_range(300..1200)));

    // 3. a is killed under load; b, in sync all along, is promoted: RPO 0.
    let killed_at = Instant::now();
    cluster.kill9(A);
    let outcome = load.finish();
    let early_errors = outcome.errors_before(killed_at);
    assert!(
        early_errors.is_empty(),
        "writes failed before the kill of a: {early_errors:?}"
    );
    if let Err(reason) = cluster.promote(B, true) {
        panic!(
            "promote --force on b refused after a was killed: {reason}\nstatus b: {}",
            cluster.volume_status(B)
        );
    }
    let missed_by_c = outcome.distinct_bytes_issued_between(c_killed_clock, u64::MAX);
    eprintln!(
        "{} writes completed; c missed {missed_by_c} bytes of distinct blocks",
        outcome.completed()
    );
    failures.extend(violations_line(
        &violations_on(&cluster, B, &baseline, &outcome),
        "node b, promoted after kill -9 of a (Metro RPO 0)",
        seed,
    ));
    write_on_promoted(&cluster, B, &spec);

    // 4. c returns and follows b.
    cluster.restart(C);
    let followed = cluster.poll_volume(B, RESYNC_TIMEOUT, |volume| {
        cluster::replica_of(volume, C.name())
            .map(|replica| replica["state"] == "in-sync" && replica["lag_bytes"] == 0)
            .unwrap_or(false)
    });
    let lacked = missed_by_c + PROMOTED_WRITE_BLOCKS * BLOCK_BYTES as u64;
    check_third_copy_follows(&cluster, followed, Some(lacked), &mut failures);
    // What c holds of the workload, against the model: its lost writes by name.
    failures.extend(violations_line(
        &violations_on(&cluster, C, &baseline, &outcome),
        "node c, after following the promoted b",
        seed,
    ));
    stop_and_report(&mut cluster, &[B, C], &failures, seed);
}
