//! The demo's scenario, one function per phase: set up two nodes and sync them, write one at a
//! time, write pipelined and kill the primary mid-flight, promote the secondary and check every
//! block against the model, write on it alone, restart the old primary and let it rejoin,
//! compare both copies, print the report.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{json, Value};

use super::{
    bytes, client, connect, describe_bad, fetch_metrics, free_tcp, free_udp, generation, ms,
    read_all, read_only, replica, role, sample, scrape_means, send_one, setup, state, status,
    volume, wait_until, Clock, Daemon, DemoError, FailoverCheck, InFlight, Latencies, Model, Node,
    BLOCK_BYTES, FAILOVER_WRITES, JOURNAL_BYTES, PEER_TIMEOUT, PIPELINED_MAX, PIPELINED_MIN,
    PIPELINE_DEPTH, PROMOTE_RETRY_LIMIT, QD1_WRITES, REGIONAL_INTERVAL, STAMP_BLOCKS, STATE_LIMIT,
    VOLUME_BYTES,
};
use crate::control;
use crate::nbd::client::NbdClient;

/// Write, FUA write and FLUSH latencies of one phase.
#[derive(Default)]
struct PhaseLatencies {
    write: Latencies,
    fua: Latencies,
    flush: Latencies,
}

impl PhaseLatencies {
    fn print(&mut self, [write, fua, flush]: [&str; 3]) {
        println!("{}", self.write.line(write));
        println!("{}", self.fua.line(fua));
        println!("{}", self.flush.line(flush));
    }
}

/// What the phases share and the report needs, filled in as they run.
struct Run {
    clock: Clock,
    rng: StdRng,
    model: Model,
    /// Where Ferry departed from SPEC.md (the demo still verifies the data and passes).
    deviations: Vec<String>,
    /// Findings worth a line that are not a departure from the SPEC.
    notes: Vec<String>,
    qd1: PhaseLatencies,
    pipelined: PhaseLatencies,
    alone: PhaseLatencies,
    /// Means from a's /metrics after the QD1 phase.
    server_means: Result<Vec<(String, f64, u64)>, String>,
}

/// The state of things right after `a` was killed.
struct Killed {
    at: Instant,
    /// a's status while its pipeline was full, just before the kill.
    before: Value,
    /// Writes in flight that got no reply: each block may hold the old or the new contents.
    uncertain: HashMap<u64, Vec<u8>>,
    /// Bytes written for c and sent to it, from a's /metrics just before the kill.
    regional_bytes: (f64, f64),
}

/// The promoted copy b, how long the failover took and what the check of b found.
struct Failover {
    promote_time: Duration,
    writable_after_kill: Duration,
    lag_after_promote: u64,
    check: FailoverCheck,
    /// CRC-32 of what every block of b must hold from now on.
    expected_crc: Vec<u32>,
}

/// The old primary back as b's secondary.
struct Rejoined {
    time: Duration,
    resynced: u64,
}

pub(super) async fn scenario(dir: &Path) -> Result<(), DemoError> {
    let seed: u64 = std::env::var("FERRY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("ferry demo: a primary with a metro (synchronous) peer and a regional (asynchronous) peer on this");
    println!("machine; the primary is killed with SIGKILL mid-write, the metro peer is promoted and verified");
    println!("block by block, the regional copy is checked as a prefix, the old primary rejoins");
    println!(
        "  directory {}   seed {seed} (FERRY_SEED={seed} replays the workload)",
        dir.display()
    );
    let (a, b, c) = create_nodes(dir)?;
    let mut run = Run {
        clock: Clock(Instant::now()),
        rng: StdRng::seed_from_u64(seed),
        model: Model::new(VOLUME_BYTES / BLOCK_BYTES as u64 - STAMP_BLOCKS),
        deviations: Vec::new(),
        notes: Vec::new(),
        qd1: PhaseLatencies::default(),
        pipelined: PhaseLatencies::default(),
        alone: PhaseLatencies::default(),
        server_means: Ok(Vec::new()),
    };

    let (mut da, mut db) = start_pair(&run, &a, &b).await?;
    let mut dc = start_regional(&run, &a, &c).await?;
    let mut na = connect(&a, &mut da).await?;
    if read_only(&na) {
        return Err(DemoError::Verify(
            "a's export is read-only although a is primary".into(),
        ));
    }
    write_qd1(&mut run, &mut na).await?;
    run.server_means = scrape_means(a.metrics).await;
    // Numbered writes on a second connection, alone for a batch interval and a half, then
    // beside the pipelined writes until the kill.
    let stamps = Stamps::start(&a, run.model.blocks, run.rng.random()).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    run.clock.step(format!(
        "numbered 4 KiB writes at QD1 on a second connection to a, into its last {STAMP_BLOCKS} blocks (they go on until the kill)"
    ));
    let killed = write_pipelined_then_kill(&mut run, &a, na, &mut da).await?;
    drop(da);
    let stamped = stamps.finish().await;
    let regional = check_regional(&mut run, &c, &mut dc, &stamped, &killed).await?;
    let (mut nb, mut failover) = promote_b(&mut run, &b, &mut db, &killed).await?;
    verify_promoted(&mut run, &mut nb, &mut failover, &killed).await?;
    let written_alone = write_alone(&mut run, &b, &mut nb, &mut failover).await?;
    let mut da = Daemon::start(&a, "a-restart.log")?;
    let rejoined = rejoin(
        &mut run,
        [(&a, &mut da), (&b, &mut db)],
        &failover,
        &killed,
        &written_alone,
    )
    .await?;
    compare_copies(&run, &a, &mut da, &mut nb, &failover).await?;
    nb.disconnect().await.map_err(client("disconnect from b"))?;
    let stop_a = da.terminate("a")?;
    let stop_b = db.terminate("b")?;
    let stop_c = dc.terminate("c")?;
    run.clock.step(format!(
        "SIGTERM: a stopped cleanly in {}, b in {}, c in {} (exit 0)",
        ms(stop_a),
        ms(stop_b),
        ms(stop_c)
    ));
    print_report(&mut run, &failover, &killed, &rejoined);
    regional.print();
    print_findings(&run.notes, &run.deviations);
    Ok(())
}

/// Certificates, ports and configs of nodes a (primary), b (its metro secondary) and c (its
/// regional secondary).
fn create_nodes(dir: &Path) -> Result<(Node, Node, Node), DemoError> {
    let certs = dir.join("certs");
    std::fs::create_dir(&certs).map_err(setup("certificate directory"))?;
    let names = ["a", "b", "c"].map(String::from);
    crate::replication::tls::cert_init(&certs, &names).map_err(setup("making certificates"))?;
    let udp = [free_udp()?, free_udp()?, free_udp()?];
    let tcp = [free_tcp()?, free_tcp()?, free_tcp()?];
    let addr = |r: std::io::Result<std::net::SocketAddr>| r.map_err(setup("local address"));
    let listen = [
        addr(udp[0].local_addr())?,
        addr(udp[1].local_addr())?,
        addr(udp[2].local_addr())?,
    ];
    let metrics = [
        addr(tcp[0].local_addr())?,
        addr(tcp[1].local_addr())?,
        addr(tcp[2].local_addr())?,
    ];
    let a = Node::create(
        dir,
        &certs,
        ("a", "primary"),
        listen[0],
        metrics[0],
        &[("b", listen[1], false), ("c", listen[2], true)],
    )?;
    let b = Node::create(
        dir,
        &certs,
        ("b", "secondary"),
        listen[1],
        metrics[1],
        &[("a", listen[0], false), ("c", listen[2], true)],
    )?;
    let c = Node::create(
        dir,
        &certs,
        ("c", "secondary"),
        listen[2],
        metrics[2],
        &[("a", listen[0], true), ("b", listen[1], true)],
    )?;
    drop((udp, tcp));
    println!(
        "  setup   CA + certificates for a, b and c (mutual TLS); QUIC a {} b {} c {};",
        listen[0], listen[1], listen[2]
    );
    println!(
        "          volume `{}` {} MiB, journal {} MiB per node; a primary; b metro (peer_timeout {PEER_TIMEOUT});",
        super::VOLUME,
        VOLUME_BYTES >> 20,
        JOURNAL_BYTES >> 20
    );
    println!("          c regional (interval {REGIONAL_INTERVAL}, zstd), all on loopback");
    println!();
    Ok((a, b, c))
}

/// Starts c and waits until a's regional replica of it is in sync.
async fn start_regional(run: &Run, a: &Node, c: &Node) -> Result<Daemon, DemoError> {
    let mut dc = Daemon::start(c, "c.log")?;
    let t = Instant::now();
    loop {
        dc.check_alive("c")?;
        let sa = status(a).await?;
        let to_c = &volume(&sa)["replicas"][1];
        if to_c["state"] == "in-sync" {
            run.clock.step(format!(
                "started c; a's regional replica of c in-sync {} after start",
                ms(t.elapsed())
            ));
            return Ok(dc);
        }
        if t.elapsed() > STATE_LIMIT {
            return Err(DemoError::Daemon(format!(
                "a's regional replica of c not in-sync within {STATE_LIMIT:?}: {to_c}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A second client of a that writes numbered stamps one at a time into the last blocks,
/// while the main client writes pipelined: the order the regional copy must keep.
struct Stamps {
    task: tokio::task::JoinHandle<Vec<(u64, u64, Instant)>>,
}

fn stamp(id: u64) -> Vec<u8> {
    id.to_le_bytes().repeat(BLOCK_BYTES / 8)
}

impl Stamps {
    async fn start(a: &Node, first_block: u64, seed: u64) -> Result<Stamps, DemoError> {
        let mut conn = NbdClient::connect_unix(&a.nbd, super::VOLUME)
            .await
            .map_err(client("connect the stamp writer to a"))?;
        let task = tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut done = Vec::new();
            for id in 1.. {
                let block = first_block + rng.random_range(0..STAMP_BLOCKS);
                let offset = block * BLOCK_BYTES as u64;
                if conn.write(offset, &stamp(id), false).await.is_err() {
                    break; // a is gone
                }
                done.push((id, block, Instant::now()));
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            done
        });
        Ok(Stamps { task })
    }

    /// The stamps a completed, in order, once a is gone.
    async fn finish(self) -> Vec<(u64, u64, Instant)> {
        match tokio::time::timeout(STATE_LIMIT, self.task).await {
            Ok(Ok(done)) => done,
            _ => Vec::new(),
        }
    }
}

/// What the regional copy held when a died.
struct RegionalCheck {
    stamped: u64,
    held: u64,
    oldest_missing: Option<Duration>,
    lag_seconds: f64,
    logical: f64,
    wire: f64,
}

impl RegionalCheck {
    fn print(&self) {
        println!(
            "  regional: c's numbered blocks held exactly the first {} of the {} numbered writes a completed (a prefix,",
            self.held, self.stamped
        );
        println!(
            "            nothing after a gap); the oldest it lacked completed {} before the kill (interval {REGIONAL_INTERVAL});",
            self.oldest_missing.map_or("-".to_string(), ms)
        );
        println!(
            "            its lag_seconds just before the kill {:.2}; bytes to c {} on the wire for {} written ({:.2}x)",
            self.lag_seconds,
            bytes(whole(self.wire)),
            bytes(whole(self.logical)),
            self.wire / self.logical.max(1.0)
        );
        println!();
    }
}

#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // a byte counter
fn whole(value: f64) -> u64 {
    value.max(0.0) as u64
}

/// Reads c's stamped blocks (its read-only export, before anyone is promoted): they must be
/// what a held after the first k stamped writes for some k (SPEC §2, regional consistency).
async fn check_regional(
    run: &mut Run,
    c: &Node,
    dc: &mut Daemon,
    stamped: &[(u64, u64, Instant)],
    killed: &Killed,
) -> Result<RegionalCheck, DemoError> {
    let first_block = run.model.blocks;
    let mut nc = connect(c, dc).await?;
    let data = nc
        .read(
            first_block * BLOCK_BYTES as u64,
            u32::try_from(STAMP_BLOCKS * BLOCK_BYTES as u64).unwrap_or(u32::MAX),
        )
        .await
        .map_err(client("read c"))?;
    let mut held = Vec::with_capacity(crate::usize_from(STAMP_BLOCKS));
    for block in data.chunks(BLOCK_BYTES) {
        let id = u64::from_le_bytes(block[..8].try_into().unwrap_or([0; 8]));
        if block != stamp(id).as_slice() && block.iter().any(|b| *b != 0) {
            return Err(DemoError::Verify(
                "a stamped block of c is torn (not one whole write)".into(),
            ));
        }
        held.push(id);
    }
    let k = held.iter().copied().max().unwrap_or(0);
    let n = stamped.len() as u64;
    let mut expected = vec![0u64; held.len()];
    for (id, block, _) in stamped {
        if *id <= k {
            expected[crate::usize_from(*block - first_block)] = *id;
        }
    }
    if k == n + 1 {
        if let Some(at) = held.iter().position(|id| *id == k) {
            expected[at] = k; // the write in flight at the kill
        }
    }
    let wrong = (0..held.len()).filter(|&i| held[i] != expected[i]).count();
    if k > n + 1 || wrong > 0 {
        return Err(DemoError::Verify(format!(
            "the regional copy c is not a prefix of a's writes: it holds stamp {k} of {n}, and {wrong} blocks differ from a's volume after stamp {k}"
        )));
    }
    let oldest_missing = stamped
        .iter()
        .find(|(id, _, _)| *id > k)
        .map(|(_, _, at)| killed.at.saturating_duration_since(*at));
    let to_c = &volume(&killed.before)["replicas"][1];
    run.clock.step(format!(
        "read c's stamped blocks (read-only export, before any promotion): the first {k} of {n} stamps, a prefix"
    ));
    Ok(RegionalCheck {
        stamped: n,
        held: k,
        oldest_missing,
        lag_seconds: to_c["lag_seconds"].as_f64().unwrap_or(0.0),
        logical: killed.regional_bytes.0,
        wire: killed.regional_bytes.1,
    })
}

/// Starts both nodes and waits for the initial full sync.
async fn start_pair(run: &Run, a: &Node, b: &Node) -> Result<(Daemon, Daemon), DemoError> {
    let mut da = Daemon::start(a, "a.log")?;
    let mut db = Daemon::start(b, "b.log")?;
    let (initial_sync, sa, _) = wait_until(
        "initial sync (a's and b's replicas in-sync)",
        [(a, &mut da), (b, &mut db)],
        |sa, sb| {
            role(sa) == "primary"
                && role(sb) == "secondary"
                && state(sa) == "in-sync"
                && state(sb) == "in-sync"
        },
    )
    .await?;
    run.clock.step(format!(
        "started a and b; initial sync done: in-sync {} after start ({} sent a -> b)",
        ms(initial_sync),
        bytes(replica(&sa)["resynced_bytes"].as_u64().unwrap_or(0))
    ));
    Ok((da, db))
}

/// Writes one at a time on the metro pair (1 in 8 FUA, 1 in 20 followed by a FLUSH): the
/// latency figures.
async fn write_qd1(run: &mut Run, na: &mut NbdClient) -> Result<(), DemoError> {
    let (mut fuas, mut flushes) = (0, 0);
    let started = Instant::now();
    for _ in 0..QD1_WRITES {
        let (block, data) = run.model.next_write(&mut run.rng);
        let fua = run.rng.random_ratio(1, 8);
        let t = Instant::now();
        na.write(block * BLOCK_BYTES as u64, &data, fua)
            .await
            .map_err(client("write to a"))?;
        if fua {
            fuas += 1;
            run.qd1.fua.add(t);
        } else {
            run.qd1.write.add(t);
        }
        run.model.complete(block, data);
        if run.rng.random_ratio(1, 20) {
            let t = Instant::now();
            na.flush().await.map_err(client("flush on a"))?;
            flushes += 1;
            run.qd1.flush.add(t);
        }
    }
    run.clock.step(format!(
        "{QD1_WRITES} writes at QD1 on a ({fuas} FUA, {flushes} followed by FLUSH) in {:.2} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// Pipelined writes and FLUSHes on a, then kill -9 a with a full pipeline; replies already on
/// their way count as completions, the rest are uncertain.
async fn write_pipelined_then_kill(
    run: &mut Run,
    a: &Node,
    mut na: NbdClient,
    da: &mut Daemon,
) -> Result<Killed, DemoError> {
    let mut inflight: HashMap<u64, InFlight> = HashMap::new();
    let kill_after = run.rng.random_range(PIPELINED_MIN..PIPELINED_MAX);
    let mut sent = 0usize;
    let started = Instant::now();
    let mut completed = 0usize;
    loop {
        while inflight.len() < PIPELINE_DEPTH && sent < kill_after {
            send_one(&mut na, &mut run.model, &mut run.rng, &mut inflight).await?;
            sent += 1;
        }
        if sent >= kill_after {
            break;
        }
        let (cookie, result) = na.recv_reply().await.map_err(client("reply from a"))?;
        result.map_err(client("request to a"))?;
        match inflight.remove(&cookie) {
            Some(InFlight::Write {
                block,
                data,
                fua,
                sent,
            }) => {
                if fua {
                    run.pipelined.fua.add(sent);
                } else {
                    run.pipelined.write.add(sent);
                }
                run.model.complete(block, data);
                completed += 1;
            }
            Some(InFlight::Flush { sent }) => run.pipelined.flush.add(sent),
            None => {
                return Err(DemoError::Client(format!(
                    "reply for unknown cookie {cookie}"
                )))
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    // While the pipeline is full: what a says about b, then refill it and kill a at once.
    let before = status(a).await?;
    let text = fetch_metrics(a.metrics).await.unwrap_or_default();
    let regional_bytes = (
        sample(
            &text,
            "ferry_replication_bytes_total",
            "kind=\"logical\",peer=\"c\"",
        )
        .unwrap_or(0.0),
        sample(
            &text,
            "ferry_replication_bytes_total",
            "kind=\"wire\",peer=\"c\"",
        )
        .unwrap_or(0.0),
    );
    for _ in 0..PIPELINE_DEPTH {
        send_one(&mut na, &mut run.model, &mut run.rng, &mut inflight).await?;
    }
    let at_kill = inflight.len();
    let at = Instant::now();
    da.kill9();
    run.clock.step(format!(
        "pipelined writes at QD{PIPELINE_DEPTH} on a: {completed} completed in {seconds:.2} s ({:.0} writes/s); a's replica of b: {}, lag {} bytes",
        completed as f64 / seconds,
        state(&before),
        replica(&before)["lag_bytes"]
    ));
    let (answered, errors) = drain_replies(run, &mut na, &mut inflight).await;
    drop(na);
    let uncertain_fua = inflight
        .values()
        .filter(|op| matches!(op, InFlight::Write { fua: true, .. }))
        .count();
    let uncertain_flushes = inflight
        .values()
        .filter(|op| matches!(op, InFlight::Flush { .. }))
        .count();
    let uncertain: HashMap<u64, Vec<u8>> = inflight
        .drain()
        .filter_map(|(_, op)| match op {
            InFlight::Write { block, data, .. } => Some((block, data)),
            InFlight::Flush { .. } => None,
        })
        .collect();
    run.clock.step(format!(
        "kill -9 a with {at_kill} requests in flight: {answered} replies already on their way (counted as completed), {} unanswered ({} writes, {uncertain_fua} of them FUA, may be old or new; {uncertain_flushes} FLUSH){}",
        at_kill - answered,
        uncertain.len(),
        if errors.is_empty() {
            String::new()
        } else {
            format!("; error replies: {}", errors.join(", "))
        }
    ));
    Ok(Killed {
        at,
        before,
        uncertain,
        regional_bytes,
    })
}

/// Reads the replies a sent before it died: completions the client sees now, so they count.
async fn drain_replies(
    run: &mut Run,
    na: &mut NbdClient,
    inflight: &mut HashMap<u64, InFlight>,
) -> (usize, Vec<String>) {
    let mut answered = 0;
    let mut errors = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), na.recv_reply()).await {
            Ok(Ok((cookie, Ok(_)))) => {
                answered += 1;
                if let Some(InFlight::Write { block, data, .. }) = inflight.remove(&cookie) {
                    run.model.complete(block, data);
                }
            }
            Ok(Ok((cookie, Err(e)))) => errors.push(format!("cookie {cookie}: {e}")),
            Ok(Err(_)) | Err(_) => break,
        }
    }
    (answered, errors)
}

/// `promote --force` on b. SPEC §3: --force overrides an unreachable peer at once. A refusal
/// is reported as a deviation, and the demo retries (bounded) so the data can still be checked.
async fn promote_b(
    run: &mut Run,
    b: &Node,
    db: &mut Daemon,
    killed: &Killed,
) -> Result<(NbdClient, Failover), DemoError> {
    let t = Instant::now();
    let mut refusals = 0usize;
    let mut first_refusal = String::new();
    let promoted = loop {
        let request = json!({"op": "promote", "volume": super::VOLUME, "force": true});
        match control::request(&b.control, request).await {
            Ok(result) => break result,
            Err(e) if e.code() == control::PEER_IS_PRIMARY && t.elapsed() < PROMOTE_RETRY_LIMIT => {
                if refusals == 0 {
                    first_refusal = format!(
                        "{} after the kill: {}: {e}",
                        ms(killed.at.elapsed()),
                        e.code()
                    );
                }
                refusals += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => {
                return Err(DemoError::Daemon(format!(
                    "`promote --force` on b was refused ({}) {} after the kill{}: {e}",
                    e.code(),
                    ms(killed.at.elapsed()),
                    if refusals > 0 {
                        format!(" (and {refusals} times before, first {first_refusal})")
                    } else {
                        String::new()
                    }
                )))
            }
        }
    };
    if refusals > 0 {
        run.deviations.push(format!(
            "`promote --force` on b was refused {refusals} times although a was dead (first at {first_refusal});\n\
             it was accepted only {} after the kill, once b itself noticed a was gone (peer_timeout {PEER_TIMEOUT}).\n\
             SPEC §3: --force overrides an unreachable peer at once, without waiting for peer_timeout.",
            ms(killed.at.elapsed())
        ));
        run.clock.step(format!(
            "DEVIATION: promote --force on b refused {refusals} times (peer-is-primary) until b noticed a was gone; see the end"
        ));
    }
    let promote_time = t.elapsed();
    let sb = status(b).await?;
    if role(&sb) != "primary" {
        return Err(DemoError::Daemon(format!(
            "b answered promote with {promoted} but its status says role {}",
            role(&sb)
        )));
    }
    let nb = connect(b, db).await?;
    let writable_after_kill = killed.at.elapsed();
    if read_only(&nb) {
        return Err(DemoError::Verify(
            "b's export is still read-only after promote".into(),
        ));
    }
    let lag_after_promote = replica(&sb)["lag_bytes"].as_u64().unwrap_or(0);
    run.clock.step(format!(
        "promote --force on b: {} (generation {:#x}) in {}; kill -> b writable over NBD: {}\n\
         b's replica of a: {}, lag_bytes {} before any write on b",
        role(&sb),
        generation(&sb),
        ms(promote_time),
        ms(writable_after_kill),
        state(&sb),
        bytes(lag_after_promote)
    ));
    let failover = Failover {
        promote_time,
        writable_after_kill,
        lag_after_promote,
        check: FailoverCheck::default(),
        expected_crc: Vec::new(),
    };
    Ok((nb, failover))
}

/// Reads every block of the promoted copy and checks it against the model (SPEC §2, metro
/// RPO 0): its last completed write, or for a write in flight at the kill old or new contents.
async fn verify_promoted(
    run: &mut Run,
    nb: &mut NbdClient,
    failover: &mut Failover,
    killed: &Killed,
) -> Result<(), DemoError> {
    let t = Instant::now();
    let model = &run.model;
    let zero_crc = crc32fast::hash(&[0u8; BLOCK_BYTES]);
    let mut expected_crc = vec![zero_crc; crate::usize_from(VOLUME_BYTES / BLOCK_BYTES as u64)];
    let mut check = FailoverCheck::default();
    read_all(nb, |block, got| {
        expected_crc[crate::usize_from(block)] = crc32fast::hash(got);
        if block >= model.blocks {
            return; // the stamped blocks: compared between a and b after the rejoin
        }
        let in_flight = killed.uncertain.get(&block);
        let old_ok = match model.completed.get(&block) {
            Some(data) => data == got,
            None => got.iter().all(|b| *b == 0),
        };
        if in_flight.is_some_and(|d| d == got) {
            check.inflight_new += 1;
        } else if old_ok && in_flight.is_some() {
            check.inflight_old += 1;
        } else if old_ok && model.completed.contains_key(&block) {
            check.completed_ok += 1;
        } else if old_ok {
            check.never_written_zero += 1;
        } else {
            check.bad_count += 1;
            if check.bad.len() < 10 {
                check.bad.push(describe_bad(model, block, got, in_flight));
            }
        }
    })
    .await?;
    if check.bad_count > 0 {
        return Err(DemoError::Verify(format!(
            "{} of {} blocks on the promoted copy (b) are wrong ({} completed writes, {} in flight at the kill; a's replica of b was {} just before the kill):\n  {}",
            check.bad_count,
            model.blocks,
            model.completed_writes,
            killed.uncertain.len(),
            state(&killed.before),
            check.bad.join("\n  ")
        )));
    }
    run.clock.step(format!(
        "verified b (all {} blocks read back in {}): {} blocks hold their last completed write; in-flight writes: {} new, {} old; {} never-written blocks read as zeros",
        model.blocks,
        ms(t.elapsed()),
        check.completed_ok,
        check.inflight_new,
        check.inflight_old,
        check.never_written_zero
    ));
    failover.check = check;
    failover.expected_crc = expected_crc;
    Ok(())
}

/// b alone takes writes (a is down): the resync has to bring them to a. Returns the blocks
/// written.
async fn write_alone(
    run: &mut Run,
    b: &Node,
    nb: &mut NbdClient,
    failover: &mut Failover,
) -> Result<HashSet<u64>, DemoError> {
    let mut blocks = HashSet::new();
    for _ in 0..FAILOVER_WRITES {
        let (block, data) = run.model.next_write(&mut run.rng);
        let fua = run.rng.random_ratio(1, 8);
        let t = Instant::now();
        nb.write(block * BLOCK_BYTES as u64, &data, fua)
            .await
            .map_err(client("write to b"))?;
        if fua {
            run.alone.fua.add(t);
        } else {
            run.alone.write.add(t);
        }
        failover.expected_crc[crate::usize_from(block)] = crc32fast::hash(&data);
        blocks.insert(block);
        if run.rng.random_ratio(1, 20) {
            let t = Instant::now();
            nb.flush().await.map_err(client("flush on b"))?;
            run.alone.flush.add(t);
        }
    }
    nb.flush().await.map_err(client("flush on b"))?;
    let sb = status(b).await?;
    run.clock.step(format!(
        "{FAILOVER_WRITES} writes on b alone; b's replica of a: {}, lag_bytes {}{}",
        state(&sb),
        bytes(replica(&sb)["lag_bytes"].as_u64().unwrap_or(0)),
        replica(&sb)["last_error"]
            .as_str()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default()
    ));
    Ok(blocks)
}

/// The restarted a must learn b's newer generation, become its secondary and catch up by a
/// delta resync.
async fn rejoin(
    run: &mut Run,
    nodes: [(&Node, &mut Daemon); 2],
    failover: &Failover,
    killed: &Killed,
    written_alone: &HashSet<u64>,
) -> Result<Rejoined, DemoError> {
    let generation_b = generation(&status(nodes[1].0).await?);
    let (time, sa, sb) = wait_until(
        "rejoin (a secondary of b's generation, both replicas in-sync)",
        nodes,
        |sa, sb| {
            role(sa) == "secondary"
                && role(sb) == "primary"
                && state(sa) == "in-sync"
                && state(sb) == "in-sync"
                && generation(sa) == generation(sb)
        },
    )
    .await?;
    let resynced = replica(&sb)["resynced_bytes"].as_u64().unwrap_or(0);
    // What actually differed: blocks written on b alone, and blocks a may have journaled
    // beyond b (its writes in flight at the kill).
    let differed = (written_alone.len() + killed.uncertain.len()) as u64 * BLOCK_BYTES as u64;
    let recovery = &volume(&sa)["recovery"];
    // What the resync had to cover (docs/operations.md, "Failback"): the blocks of
    // every record a's journal replayed (a cannot know which of them b holds; every write
    // here is whole 4 KiB blocks, so their bytes are their blocks), the blocks b held that a
    // had not yet confirmed durable when it died (b's lag right after the promotion), and
    // b's own writes since.
    let replayed = recovery["bytes_replayed"].as_u64().unwrap_or(0);
    let bound = replayed + failover.lag_after_promote + differed;
    run.clock.step(format!(
        "restarted a: journal replay {} records; it became b's secondary (generation {:#x}{}) and b's replica of a is in-sync {} after the restart\n\
         resync b -> a sent {}; at most {} differed ({} blocks written on b alone, {} in flight on a at the kill);\n\
         what it had to cover: at most {} = {} of records a replayed (b may or may not hold them) + {} b held that a had not confirmed durable + those {}",
        recovery["records_replayed"],
        generation(&sa),
        if generation(&sb) == generation_b {
            ""
        } else {
            ", b moved to a new one meanwhile"
        },
        ms(time),
        bytes(resynced),
        bytes(differed),
        written_alone.len(),
        killed.uncertain.len(),
        bytes(bound),
        bytes(replayed),
        bytes(failover.lag_after_promote),
        bytes(differed)
    ));
    if resynced > bound {
        run.notes.push(format!(
            "the delta resync after the failover sent {} although it had at most {} to cover\n\
             ({} a replayed, {} b held that a had not confirmed, {} that differed).",
            bytes(resynced),
            bytes(bound),
            bytes(replayed),
            bytes(failover.lag_after_promote),
            bytes(differed)
        ));
        run.clock.step(format!(
            "NOTE: resync sent {:.1}x what it had to cover; see the end",
            resynced as f64 / bound.max(1) as f64
        ));
    }
    Ok(Rejoined { time, resynced })
}

/// Both copies, block for block: identical, and equal to what b held after the failover plus
/// its own writes; a's export is read-only now.
async fn compare_copies(
    run: &Run,
    a: &Node,
    da: &mut Daemon,
    nb: &mut NbdClient,
    failover: &Failover,
) -> Result<(), DemoError> {
    let t = Instant::now();
    let blocks = crate::usize_from(VOLUME_BYTES / BLOCK_BYTES as u64);
    let mut na = connect(a, da).await?;
    let a_read_only = read_only(&na);
    let mut a_blocks = Vec::with_capacity(blocks);
    read_all(&mut na, |_, got| a_blocks.push(crc32fast::hash(got))).await?;
    let mut b_blocks = Vec::with_capacity(blocks);
    read_all(nb, |_, got| b_blocks.push(crc32fast::hash(got))).await?;
    let differ: Vec<usize> = (0..blocks)
        .filter(|&i| a_blocks[i] != b_blocks[i])
        .collect();
    let wrong: Vec<usize> = (0..blocks)
        .filter(|&i| b_blocks[i] != failover.expected_crc[i])
        .collect();
    if !differ.is_empty() || !wrong.is_empty() {
        return Err(DemoError::Verify(format!(
            "after the resync: {} blocks differ between a and b (first: {:?}); {} blocks of b differ from what it held after failover plus its own writes (first: {:?})",
            differ.len(),
            &differ[..differ.len().min(10)],
            wrong.len(),
            &wrong[..wrong.len().min(10)]
        )));
    }
    if !a_read_only {
        return Err(DemoError::Verify(
            "a's export accepts writes although a is now secondary".into(),
        ));
    }
    run.clock.step(format!(
        "compared a and b, all {} blocks (CRC-32 of each) in {}: identical, and equal to the model",
        run.model.blocks,
        ms(t.elapsed())
    ));
    Ok(())
}

fn print_report(run: &mut Run, failover: &Failover, killed: &Killed, rejoined: &Rejoined) {
    println!();
    println!("  latency (µs, 4 KiB, client side)        count      p50      p99    p99.9");
    run.qd1
        .print(["metro write, QD1", "metro write FUA, QD1", "metro flush"]);
    run.pipelined.print([
        &format!("metro write, QD{PIPELINE_DEPTH} pipelined"),
        &format!("metro write FUA, QD{PIPELINE_DEPTH} pipelined"),
        &format!("metro flush, QD{PIPELINE_DEPTH} pipelined"),
    ]);
    run.alone.print([
        "b alone (a down), write, QD1",
        "b alone (a down), write FUA, QD1",
        "b alone (a down), flush",
    ]);
    match &run.server_means {
        Ok(means) => {
            let parts: Vec<String> = means
                .iter()
                .map(|(what, mean, _)| format!("{what} {:.0}", mean * 1e6))
                .collect();
            println!(
                "  a's /metrics after the QD1 phase, means (µs): {}",
                parts.join("; ")
            );
        }
        Err(e) => println!("  a's /metrics could not be read: {e}"),
    }
    println!();
    println!(
        "  failover: kill -9 a -> promote --force b returned in {} -> b writable over NBD {} after the kill;",
        ms(failover.promote_time),
        ms(failover.writable_after_kill)
    );
    println!(
        "            a restarted -> back in sync as b's secondary in {}, resync sent {}",
        ms(rejoined.time),
        bytes(rejoined.resynced)
    );
    let model = &run.model;
    println!(
        "  checked:  all {} blocks of the promoted copy b: {} completed writes to {} blocks, each block holding its",
        model.blocks,
        model.completed_writes,
        model.completed.len()
    );
    println!(
        "            last completed write, or for the {} blocks with a write in flight at the kill that write ({} new) or",
        killed.uncertain.len(),
        failover.check.inflight_new
    );
    println!(
        "            the contents before it ({} old); never-written blocks read as zeros;",
        failover.check.inflight_old
    );
    println!("            the old primary rejoins as secondary of the newer generation, and both copies end identical");
    println!();
}

fn print_findings(notes: &[String], deviations: &[String]) {
    for note in notes {
        for (i, line) in note.lines().enumerate() {
            println!("  {} {line}", if i == 0 { "note:" } else { "     " });
        }
    }
    if !notes.is_empty() {
        println!();
    }
    if deviations.is_empty() {
        println!("PASS");
    } else {
        println!(
            "PASS (data verified), with {} deviation(s) from the SPEC:",
            deviations.len()
        );
        for deviation in deviations {
            for (i, line) in deviation.lines().enumerate() {
                println!("  {} {line}", if i == 0 { "-" } else { " " });
            }
        }
    }
}
