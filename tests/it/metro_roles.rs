//! Metro role changes under faults, on two real `ferry run` processes with a relay between
//! them (SPEC §2, §3):
//!
//! - a planned switchover whose link is lost while the demotion drains the writes in flight:
//!   every write a client saw complete must be on the promoted copy (Metro RPO 0);
//! - an old primary restarted while a partition keeps it from its peer, which was promoted
//!   meanwhile: it must hold writes (Fencing), say so in `ferry status`, and become the new
//!   primary's secondary when the partition heals;
//! - a primary with `on_disconnect = "suspend"` restarted while its peer is unreachable: it
//!   must not complete writes until the peer is back.
//!
//! The workload and its model are `metro.rs`'s. Seeded: FERRY_SEED replays a run.

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::Value;

use crate::cluster::{
    self, format_states, Cluster, ClusterOptions, NodeId,
    NodeId::{A, B},
    VOLUME,
};
use crate::harness::{self, run_with_timeout, Output, COMMAND_TIMEOUT, FERRY_BIN};
use crate::metro::{
    self, block_contents, describe_block, first_difference, read_region, Workload, WorkloadSpec,
    RESYNC_TIMEOUT, ROLE_TIMEOUT,
};
use crate::model::{self, BLOCK_BYTES};
use crate::nbd_wire::NbdConn;

/// One-way delay of the records from a to b while the demotion starts: long enough that every
/// write in flight when a starts to refuse writes is still inside the relay when the link is
/// cut a few milliseconds later, so that neither the record nor its acknowledgement arrives
/// (with room for a status poll on a loaded machine; still well within `peer_timeout`).
const DRAIN_DELAY: Duration = Duration::from_millis(800);
/// How long the test waits for the old primary to start refusing writes after `ferry demote`.
const REFUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// A held write that is still held after this much time past the heal of the partition has
/// not resumed.
const RESUME_TIMEOUT: Duration = Duration::from_secs(30);
/// Log lines shown per node in a failure report.
const LOG_LINES_MAX: usize = 60;
/// The round number stamped into the writes the tests make outside the workload (the
/// promoted node's own writes, probes).
const EXTRA_ROUND: u64 = 0x62;

/// A `ferry` client command running on its own thread (a demotion blocks while it drains).
struct Background {
    command: String,
    thread: Option<JoinHandle<Output>>,
}

impl Background {
    /// `ferry --socket SOCKET ARGS...` with the harness's command timeout.
    fn ctl(socket: &Path, args: &[&str]) -> Background {
        let mut command = Command::new(FERRY_BIN);
        command.arg("--socket").arg(socket).args(args);
        let description = format!("ferry {}", args.join(" "));
        Background {
            command: description,
            thread: Some(std::thread::spawn(move || {
                run_with_timeout(command, COMMAND_TIMEOUT)
            })),
        }
    }

    fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// The command's output; Err if it did not finish within `timeout` or the harness gave up
    /// on it (its own timeout).
    fn wait(mut self, timeout: Duration) -> Result<Output, String> {
        let deadline = Instant::now() + timeout;
        while !self.is_finished() {
            if Instant::now() >= deadline {
                return Err(format!(
                    "`{}` still running after {timeout:?}",
                    self.command
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let thread = self.thread.take().expect("not joined yet");
        thread.join().map_err(|panic| {
            let text = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|text| text.to_string()))
                .unwrap_or_default();
            format!("`{}`: {text}", self.command)
        })
    }
}

/// How long after it was sent the server answered a write, and how; None while it is held.
type Answer = Option<(Duration, Result<(), String>)>;

/// One write (FUA) on its own connection and thread, so that a test can watch whether and when
/// the server completes it while it is meant to be held. The thread ends by itself within the
/// socket timeout given at start, or as soon as the daemon closes the connection.
struct PendingWrite {
    answer: Arc<Mutex<Answer>>,
}

impl PendingWrite {
    fn start(socket: &Path, offset: u64, data: Vec<u8>, socket_timeout: Duration) -> PendingWrite {
        let answer = Arc::new(Mutex::new(None));
        let slot = Arc::clone(&answer);
        let socket = socket.to_path_buf();
        let started_at = Instant::now();
        std::thread::spawn(move || {
            let result = (|| {
                let stream = std::os::unix::net::UnixStream::connect(&socket)
                    .map_err(|error| format!("connect: {error}"))?;
                stream
                    .set_read_timeout(Some(socket_timeout))
                    .and_then(|()| stream.set_write_timeout(Some(socket_timeout)))
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
        PendingWrite { answer }
    }

    /// The answer so far: None while the write is held.
    fn answer(&self) -> Answer {
        self.answer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits up to `timeout` for an answer.
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

/// The contents of the test's own 4 KiB block `block` (not a workload write).
fn extra_block(seed: u64, block: u64) -> Vec<u8> {
    block_contents(seed, EXTRA_ROUND, block, block)
}

/// Writes `blocks` on node `id` with one FUA write each, then a FLUSH; each must complete.
fn write_extra_blocks(cluster: &Cluster, id: NodeId, seed: u64, blocks: std::ops::Range<u64>) {
    let mut conn = NbdConn::connect_unix(&cluster.nbd_socket(id), VOLUME)
        .unwrap_or_else(|error| panic!("connect to node {}: {error}", id.name()));
    for block in blocks {
        conn.write(block * BLOCK_BYTES as u64, &extra_block(seed, block), true)
            .unwrap_or_else(|error| {
                panic!(
                    "write of block {block} on node {} failed: {error}; status {}",
                    id.name(),
                    cluster.volume_status(id)
                )
            });
    }
    conn.flush().expect("flush");
    conn.disconnect();
}

/// Every string in a JSON value, depth first.
fn strings_in(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::String(text) => out.push(text.clone()),
        Value::Array(items) => items.iter().for_each(|item| strings_in(item, out)),
        Value::Object(fields) => fields.values().for_each(|field| strings_in(field, out)),
        _ => {}
    }
}

/// Compares the whole volume of both nodes; None if identical, else the first difference with
/// what each side holds there.
fn compare_nodes(cluster: &Cluster) -> Option<String> {
    let blocks = cluster.volume_size_bytes() / BLOCK_BYTES as u64;
    let a = read_region(&cluster.nbd_socket(A), blocks);
    let b = read_region(&cluster.nbd_socket(B), blocks);
    first_difference(&a, &b).map(|at| {
        let block = at / BLOCK_BYTES;
        let range = block * BLOCK_BYTES..(block + 1) * BLOCK_BYTES;
        let differing = (0..blocks as usize)
            .filter(|block| {
                let range = block * BLOCK_BYTES..(block + 1) * BLOCK_BYTES;
                a[range.clone()] != b[range]
            })
            .count();
        format!(
            "a and b differ in {differing} blocks; the first is block {block}: a holds [{}], b \
             holds [{}]",
            describe_block(&a[range.clone()], &b[range.clone()]),
            describe_block(&b[range.clone()], &a[range]),
        )
    })
}

/// Fails the test with `failures` (if any), both nodes' status and their replication log
/// lines; stops both nodes first when `stop` (they must exit 0).
fn report(cluster: &mut Cluster, failures: &[String], seed: u64, stop: bool) {
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
    if stop {
        cluster.stop(A);
        cluster.stop(B);
    }
    assert!(
        failures.is_empty(),
        "{} failed checks (seed {seed}, replay with FERRY_SEED={seed}):\n- {}\n{text}",
        failures.len(),
        failures.join("\n- ")
    );
}

// ---------------------------------------------------------------------------------------------
// A link lost while a demotion drains
// ---------------------------------------------------------------------------------------------

/// A planned switchover whose link is lost while the old primary drains: `ferry demote` on a
/// makes it refuse new writes and wait for the ones in flight; the link is cut before their
/// records or acknowledgements get through, for longer than peer_timeout, then heals; then b
/// is promoted. SPEC §2 (Metro RPO 0) and §3 (`ferry demote` drains in-flight writes): every
/// write a client saw complete, including those that completed during the drain, must be on b.
#[test]
fn metro_demote_draining_across_a_link_loss_keeps_completed_writes() {
    let seed =
        harness::test_seed("metro_demote_draining_across_a_link_loss_keeps_completed_writes");
    let mut rng = StdRng::seed_from_u64(seed ^ 0x6472_6169_6e00);
    let spec = WorkloadSpec::once(seed, 4, 2048);
    let options = ClusterOptions {
        relay: true,
        seed,
        ..ClusterOptions::default()
    };
    let (mut cluster, baseline) = metro::start_in_sync(options, spec.region_blocks);
    let mut failures = Vec::new();
    let monitor = cluster.monitor(A);
    let load = Workload::start(&cluster.nbd_socket(A), spec);
    load.assert_progress(
        50,
        Duration::from_secs(10),
        "before the switchover",
        &cluster,
    );
    std::thread::sleep(Duration::from_millis(rng.random_range(200..800)));

    // 1. Records from a to b now spend DRAIN_DELAY in the relay; the writers slow down to
    // one write per DRAIN_DELAY each, and each always has one in flight.
    cluster.link_from(A, B).set_delay(DRAIN_DELAY);
    load.assert_progress(8, Duration::from_secs(10), "with the delay", &cluster);

    // 2. `ferry demote` on a; as soon as a refuses writes (its status says the demotion holds
    // them while it drains) the link is cut both ways.
    let demote = Background::ctl(&cluster.node(A).spec.control_socket(), &["demote", VOLUME]);
    let refusing = cluster.poll_volume(A, REFUSE_TIMEOUT, |volume| {
        volume["role"] == "secondary"
            || volume["writes_held"]
                .as_str()
                .is_some_and(|held| held.contains("demotion"))
    });
    cluster.relay().both().cut();
    let cut_clock = load.clock();
    let in_flight_at_cut = load.in_flight();
    let demote_running_at_cut = !demote.is_finished();
    if let Err(last) = refusing {
        panic!("a did not start refusing writes within {REFUSE_TIMEOUT:?} of ferry demote: {last}");
    }
    eprintln!(
        "link cut while the demotion drains: {in_flight_at_cut} writes in flight, demote still \
         running: {demote_running_at_cut}"
    );
    assert!(
        demote_running_at_cut && in_flight_at_cut > 0,
        "the demotion had drained before the cut ({in_flight_at_cut} writes in flight, demote \
         running {demote_running_at_cut}): the test could not put the link loss inside the \
         drain (seed {seed})"
    );

    // 3. The cut outlasts peer_timeout, so a declares b lost during the drain; then it heals.
    std::thread::sleep(cluster.peer_timeout() + Duration::from_secs(1));
    eprintln!(
        "during the cut: demote running {}, a: {}",
        !demote.is_finished(),
        cluster
            .node(A)
            .try_volume_status()
            .map_or_else(|e| e, |v| v.to_string())
    );
    cluster.link_from(A, B).set_delay(Duration::ZERO);
    cluster.relay().both().restore();
    // A switchover that loses its peer while draining is aborted: a stays primary, and the
    // writes in flight complete as degraded writes (tracked for b, in a generation b does
    // not know). It must say so; then, with b back and in sync, the switchover is run again.
    let mut demoted = false;
    match demote.wait(COMMAND_TIMEOUT + Duration::from_secs(5)) {
        Ok(output) if output.status.success() => {
            eprintln!("demote returned: {}", output.stdout);
            demoted = true;
        }
        Ok(output) => {
            eprintln!("demote refused: {output}");
            if !output.stderr.contains("was lost while the demotion") {
                failures.push(format!(
                    "ferry demote on a failed without saying that the peer was lost: {output}"
                ));
            }
        }
        Err(error) => failures.push(format!("ferry demote on a did not return: {error}")),
    }
    let outcome = load.finish();
    if !demoted {
        let role = cluster.role(A);
        if role != "primary" {
            failures.push(format!(
                "after an aborted demotion a must still be primary; it is {role}"
            ));
        }
        cluster.wait_replica_state_to(A, B, "in-sync", RESYNC_TIMEOUT);
        cluster.demote(A);
    }
    let states = format_states(&monitor.stop());
    let completed_during_drain = outcome
        .records
        .values()
        .filter(|record| record.issued_at < cut_clock)
        .filter(|record| record.completed_at.is_some_and(|at| at > cut_clock))
        .count();
    eprintln!(
        "{} writes completed, {completed_during_drain} of them in flight at the cut; writer \
         errors (new writes refused by the demotion): {:?}; a's replica states: {states}",
        outcome.completed(),
        outcome.errors
    );

    // 4. The switchover completes: b is promoted (retried while it is not yet allowed).
    let promote_deadline = Instant::now() + RESYNC_TIMEOUT;
    let promoted = loop {
        match cluster.promote(B, false) {
            Ok(()) => break Ok(()),
            Err(reason) if Instant::now() >= promote_deadline => break Err(reason),
            Err(reason) => {
                eprintln!("promote of b refused (retrying): {reason}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    if let Err(reason) = promoted {
        failures.push(format!(
            "after the demotion of a, b could not be promoted within {RESYNC_TIMEOUT:?}: \
             {reason}"
        ));
    }

    // 5. b holds every write a client saw complete.
    let region = read_region(&cluster.nbd_socket(B), spec.region_blocks);
    let violations = model::verify_region(&region, &baseline, &outcome.records, &spec);
    if !violations.is_empty() {
        failures.push(format!(
            "node b, promoted after the demotion of a: {} blocks violate the model (Metro RPO \
             0; {completed_during_drain} writes in flight at the cut completed during the \
             drain); the first ones:\n  {}",
            violations.len(),
            violations
                .iter()
                .take(12)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n  ")
        ));
    }
    // And a follows b and ends identical to it.
    if let Err(last) = cluster.poll_volume(B, RESYNC_TIMEOUT, |volume| {
        cluster::replica_of(volume, A.name())
            .map(|replica| replica["state"] == "in-sync" && replica["lag_bytes"] == 0)
            .unwrap_or(false)
    }) {
        failures.push(format!(
            "b does not report a in-sync within {RESYNC_TIMEOUT:?} after the switchover: {last}"
        ));
    } else if let Some(difference) = compare_nodes(&cluster) {
        failures.push(format!(
            "after the switchover, with a in sync: {difference}"
        ));
    }
    report(&mut cluster, &failures, seed, true);
}

// ---------------------------------------------------------------------------------------------
// Fencing: an old primary restarted behind a partition
// ---------------------------------------------------------------------------------------------

/// What a fenced node's `ferry status --json` must say (SPEC §2, "Fencing": `ferry status`
/// says which it is waiting for, with the command): some text naming `ferry promote`.
fn status_names_the_override(status: &Value) -> bool {
    let mut texts = Vec::new();
    strings_in(status, &mut texts);
    texts.iter().any(|text| text.contains("ferry promote"))
}

/// The old primary a is killed with -9 under load and b is promoted with --force and writes;
/// then a partition separates them and a restarts behind it. SPEC §2, "Fencing": a holds writes
/// until it hears from b (and learns that b was promoted) or an operator promotes it, and
/// `ferry status` says so with the command. A write to a must not complete within three peer
/// timeouts (nor later: b is primary). When the partition heals, a must become b's secondary and
/// end identical to b, and b must keep every write (its own and the model's).
#[test]
fn metro_restarted_old_primary_behind_a_partition_is_fenced() {
    let seed = harness::test_seed("metro_restarted_old_primary_behind_a_partition_is_fenced");
    let mut rng = StdRng::seed_from_u64(seed ^ 0x0066_656e_6365);
    let spec = WorkloadSpec::once(seed, 4, 2048);
    let options = ClusterOptions {
        relay: true,
        seed,
        ..ClusterOptions::default()
    };
    let (mut cluster, baseline) = metro::start_in_sync(options, spec.region_blocks);
    let mut failures = Vec::new();

    // 1. kill -9 of a under load, promote --force of b: b holds every completed write.
    let kill_after = Duration::from_millis(rng.random_range(300..1500));
    let (region_b, _) =
        metro::load_kill_promote_verify(&mut cluster, A, spec, &baseline, |_, _| {
            std::thread::sleep(kill_after)
        });
    let own_blocks = spec.region_blocks..spec.region_blocks + 16;
    write_extra_blocks(&cluster, B, seed, own_blocks.clone());

    // 2. A partition; a restarts behind it and a client writes to it.
    cluster.relay().both().cut();
    cluster.restart(A);
    let window = cluster.peer_timeout() * 3;
    let probe_block = own_blocks.end;
    let probe = PendingWrite::start(
        &cluster.nbd_socket(A),
        probe_block * BLOCK_BYTES as u64,
        extra_block(seed ^ 0xa, probe_block),
        window + RESUME_TIMEOUT + ROLE_TIMEOUT,
    );
    let answer = probe.wait(window);
    let status_a = cluster.status_cli(A);
    eprintln!(
        "a, restarted behind the partition, after {window:?}: write {answer:?}; status {status_a}"
    );
    match &answer {
        Some((after, Ok(()))) => failures.push(format!(
            "a, restarted while cut off from b (promoted meanwhile), completed a client write \
             {after:?} after the write was sent (peer_timeout {}): a second primary; SPEC §2 \
             (Fencing) says it holds writes until it hears from b or an operator promotes it",
            cluster.options.peer_timeout
        )),
        Some((after, Err(error))) => {
            eprintln!("the write to the fenced a failed after {after:?} (not completed): {error}")
        }
        None => {}
    }
    if !status_names_the_override(&status_a) {
        failures.push(format!(
            "while a holds (or should hold) writes behind the partition, `ferry status --json` \
             does not say so with the command (no text naming `ferry promote`): {status_a}"
        ));
    }

    // 3. The partition heals: a learns that b was promoted and becomes its secondary.
    cluster.relay().both().restore();
    if let Err(last) = cluster.poll_volume(A, ROLE_TIMEOUT, |volume| volume["role"] == "secondary")
    {
        failures.push(format!(
            "a is not secondary within {ROLE_TIMEOUT:?} after the partition healed: {last}"
        ));
    }
    let synced = cluster.poll_volume(B, RESYNC_TIMEOUT, |volume| {
        cluster::replica_of(volume, A.name())
            .map(|replica| replica["state"] == "in-sync" && replica["lag_bytes"] == 0)
            .unwrap_or(false)
    });
    if let Err(last) = &synced {
        failures.push(format!(
            "b does not report a in-sync within {RESYNC_TIMEOUT:?} after the partition healed: \
             {last}"
        ));
    }
    if answer.is_none() {
        if let Some((after, Ok(()))) = probe.wait(Duration::from_secs(5)) {
            failures.push(format!(
                "the write held by a completed {after:?} after it was sent, once the partition \
                 healed, although b is primary: a write b never receives"
            ));
        }
    }

    // 4. b kept everything it had, and a is identical to b.
    let region_now = read_region(&cluster.nbd_socket(B), spec.region_blocks);
    if let Some(at) = first_difference(&region_now, &region_b) {
        failures.push(format!(
            "b's copy of the workload's region changed after a rejoined (first at byte {at}): \
             a overwrote the primary"
        ));
    }
    let mut conn = NbdConn::connect_unix(&cluster.nbd_socket(B), VOLUME).expect("connect to b");
    for block in own_blocks {
        let data = conn
            .read(block * BLOCK_BYTES as u64, BLOCK_BYTES as u32)
            .expect("read b's own block");
        if data != extra_block(seed, block) {
            failures.push(format!(
                "b lost its own write to block {block} after a rejoined"
            ));
            break;
        }
    }
    conn.disconnect();
    if synced.is_ok() {
        if let Some(difference) = compare_nodes(&cluster) {
            failures.push(format!("after a rejoined, with a in sync: {difference}"));
        }
    }
    report(&mut cluster, &failures, seed, true);
}

/// `on_disconnect = "suspend"` (SPEC §4: hold I/O while the peer is away) after a restart: a
/// primary stopped cleanly and started again while the link to its in-sync secondary is cut
/// must not complete a write within three peer timeouts, and `ferry status` must say why
/// (SPEC §2, "Never silent"). When the link heals, the held write resumes, completes, and
/// reaches b.
#[test]
fn metro_suspend_holds_writes_of_a_primary_restarted_without_its_peer() {
    let seed =
        harness::test_seed("metro_suspend_holds_writes_of_a_primary_restarted_without_its_peer");
    let options = ClusterOptions {
        relay: true,
        seed,
        on_disconnect: "suspend".to_string(),
        ..ClusterOptions::default()
    };
    let (mut cluster, _) = metro::start_in_sync(options, 1);
    let mut failures = Vec::new();
    write_extra_blocks(&cluster, A, seed, 0..64);
    metro::wait_in_sync_no_lag(&cluster);

    // 1. a restarts while the link is cut; a client writes to it.
    cluster.stop(A);
    cluster.relay().both().cut();
    cluster.restart(A);
    let window = cluster.peer_timeout() * 3;
    let probe_block = 64;
    let probe_data = extra_block(seed ^ 0x5, probe_block);
    let probe = PendingWrite::start(
        &cluster.nbd_socket(A),
        probe_block * BLOCK_BYTES as u64,
        probe_data.clone(),
        window + RESUME_TIMEOUT,
    );
    let answer = probe.wait(window);
    let replica = cluster.replica(A);
    eprintln!(
        "a restarted with the link cut, after {window:?}: write {answer:?}; replica {replica}"
    );
    match &answer {
        Some((after, Ok(()))) => failures.push(format!(
            "a (on_disconnect = \"suspend\"), restarted while its in-sync peer b is unreachable, \
             completed a client write {after:?} after it was sent (peer_timeout {}): the write \
             is on a alone; suspend holds I/O while the peer is away (SPEC §4, §5), and a \
             restarted primary holds writes until it hears from its peer (SPEC §2, Fencing)",
            cluster.options.peer_timeout
        )),
        Some((after, Err(error))) => failures.push(format!(
            "the write to a failed after {after:?} instead of being held: {error}"
        )),
        None => {}
    }
    let explained = replica["state"] == "suspended" || replica["last_error"].is_string();
    if replica["state"] == "in-sync" || !explained {
        failures.push(format!(
            "a's replica does not say why writes are held (SPEC §2, Never silent: state \
             suspended, or a last_error): {replica}"
        ));
    }

    // 2. The link heals: the held write resumes and completes, and b receives it.
    cluster.relay().both().restore();
    let resumed = probe.wait(RESUME_TIMEOUT);
    match &resumed {
        Some((_, Ok(()))) => {}
        Some((after, Err(error))) => failures.push(format!(
            "the held write failed {after:?} after it was sent, after the link healed: {error}"
        )),
        None => failures.push(format!(
            "the held write is still held {RESUME_TIMEOUT:?} after the link healed"
        )),
    }
    if let Err(last) = cluster.poll_volume(A, RESYNC_TIMEOUT, |volume| {
        cluster::replica_of(volume, B.name())
            .map(|replica| replica["state"] == "in-sync" && replica["lag_bytes"] == 0)
            .unwrap_or(false)
    }) {
        failures.push(format!(
            "a does not report b in-sync within {RESYNC_TIMEOUT:?} after the link healed: {last}"
        ));
    } else {
        if let Some((_, Ok(()))) = resumed {
            let mut conn =
                NbdConn::connect_unix(&cluster.nbd_socket(B), VOLUME).expect("connect to b");
            let on_b = conn
                .read(probe_block * BLOCK_BYTES as u64, BLOCK_BYTES as u32)
                .expect("read the probe block on b");
            conn.disconnect();
            if on_b != probe_data {
                failures.push("the completed write is not on b after the resync".to_string());
            }
        }
        if let Some(difference) = compare_nodes(&cluster) {
            failures.push(format!(
                "after the link healed, with b in sync: {difference}"
            ));
        }
    }
    report(&mut cluster, &failures, seed, true);
}
