//! The replication simulator: two or three nodes running the real [`Replicator`] over
//! simulated disks, network and clock, driven through seeded fault schedules (TigerBeetle's
//! VOPR is the model). Everything non-deterministic is faked: the clock jumps to the next
//! event, the network delivers in order per link with delays and drops links, and each node's
//! disks are a journal, a device, a metadata file, dirty-map files, and (for a regional copy)
//! the stage file and the catch-up file, with page caches that a `kill -9` keeps and a power
//! loss tears.
//!
//! Seeds below [`REGIONAL_SEEDS`] run metro peers only. From it on, the last node is a
//! regional copy (of a metro pair, or of a lone primary): a batch is stored whole in the stage
//! file (one write and an fdatasync: it lands whole, not at all, or torn), then applied (device
//! writes, device sync, journal restarted, stage cleared; a crash stops it after any step); a
//! catch-up is appended to the catch-up file (unsynced), committed (sync, header, sync),
//! named by the meta, then applied the same way. A start does what the daemon's
//! `open_catchup` and `open_stage` do: a committed catch-up the meta names is applied again
//! and recorded, a stored batch above the journal's head is applied again. Crashes are aimed
//! at those I/Os, links to the regional copy are cut long enough for catch-ups, the operator
//! pauses and resumes shipping to it (`ferry pause` / `ferry resume`), and the primary's site
//! is lost with `promote --force` of the regional copy, even mid catch-up.
//!
//! The sim plays the daemon's part exactly as `ferry run` does: records get their LSN and
//! are tapped before their journal write completes; a client write completes when its record
//! is written (durably, for FUA) and the replicator says it is settled; the applier applies
//! records up to the replicator's apply limit; recovery replays the journal and marks what it
//! replayed in every dirty map; role changes drain client writes.
//!
//! The oracle, checked after every event:
//!
//! - **RPO 0.** A write completed with a peer's acknowledgement is held by that peer (in its
//!   record history at the write's LSN) for as long as the peer does not legitimately drop it:
//!   a power loss may take what it acknowledged only as journaled. An acknowledgement counts
//!   unless the peer gave the record up by adopting another copy's data before the write
//!   completed: a peer that restarted and followed a copy promoted past it (a split brain in
//!   the making, which its old primary cannot see until its link times out).
//! - **Nothing discarded silently.** When a copy adopts another's data (a resync's end), every
//!   completed write it held must be held by the copy it adopts from, unless the operator
//!   chose to discard this copy's writes (`resolve --discard-local`).
//! - **Convergence.** At quiet checkpoints (all nodes up, links healed, no writes, time to
//!   settle), with no split brain outstanding, every copy is in sync, consistent, and holds
//!   exactly the primary's records: byte for byte the same blocks as the record history says.
//!   Every completed write is in the final history or was discarded by an operator.
//! - **Regional consistency.** A regional copy that is a consistent secondary holds, block
//!   for block, the volume after the writes of its history, which only moves forward along
//!   its primary's history (to a batch's or catch-up's end); promoted, it is at its last
//!   batch boundary. Completed writes of the old lineage above it are the regional RPO. After
//!   the failover, the old primary comes back without a split brain and is resynced by a
//!   delta. Its acknowledgements promise no RPO 0.
//! - The replicator's own assertions.
//!
//! `FERRY_SEED=N` replays one seed (`FERRY_TRACE=1` prints every event); `FERRY_LONG=1` runs
//! many thousands.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{
    Action, Meta, OnDisconnect, OpOutcome, PeerConfig, RegionalConfig, ReplicaState, Replicator,
    ReplicatorConfig, StartPeer, Startup, WINDOW_BYTES,
};
use crate::bitmap::{BlockBitmap, BLOCK_BYTES};
use crate::generation::{GenerationInfo, Role};
use crate::journal::RecordKind;
use crate::repl::{Message, ResyncKind, WriteRecord, VERIFY_DIGEST_BYTES};

const VOLUME_BLOCKS: u64 = 48;
const SIZE_BYTES: u64 = VOLUME_BLOCKS * BLOCK_BYTES;
const PEER_TIMEOUT: Duration = Duration::from_millis(400);
const REOPEN_DELAY: Duration = Duration::from_millis(100);
const APPLY_INTERVAL: Duration = Duration::from_millis(60);
/// Seeds from here on run a topology with a regional copy (below: metro only), so every seed
/// says what it runs and the metro seeds keep their schedules.
const REGIONAL_SEEDS: u64 = 1 << 32;
/// Histories of batch and catch-up ends a node keeps until it stores what they end.
const END_HISTORIES_MAX: usize = 16;

/// splitmix64: a tiny seeded generator, so every run replays from its seed.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

/// What a block holds: 0 for zeros, else the id of the write that put it there.
type Content = u64;

/// Bytes of `blocks` blocks whose contents are the given ids (8 bytes of id, then zeros).
fn encode_blocks(ids: &[Content]) -> Bytes {
    let mut out = vec![0u8; ids.len() * BLOCK_BYTES as usize];
    for (i, id) in ids.iter().enumerate() {
        out[i * BLOCK_BYTES as usize..][..8].copy_from_slice(&id.to_le_bytes());
    }
    Bytes::from(out)
}

fn decode_blocks(data: &[u8]) -> Vec<Content> {
    data.chunks(BLOCK_BYTES as usize)
        .map(|b| u64::from_le_bytes(b[..8].try_into().expect("8 bytes")))
        .collect()
}

/// One record in a simulated journal.
#[derive(Debug, Clone)]
struct JRec {
    lsn: u64,
    first_block: u64,
    /// Per block, what it holds after this record.
    contents: Vec<Content>,
    fua: bool,
    written: bool,
}

/// A journal with a page cache: written records survive kill -9, only durable ones (and a
/// random prefix of the rest) survive a power loss.
#[derive(Debug, Clone, Default)]
struct Journal {
    next_lsn: u64,
    records: BTreeMap<u64, JRec>,
    durable_lsn: u64,
    applied_lsn: u64,
}

/// A device with a page cache.
#[derive(Debug, Clone)]
struct Device {
    blocks: Vec<Content>,
    synced: Vec<Content>,
}

impl Device {
    fn new() -> Device {
        Device {
            blocks: vec![0; VOLUME_BLOCKS as usize],
            synced: vec![0; VOLUME_BLOCKS as usize],
        }
    }
    fn sync(&mut self) {
        self.synced = self.blocks.clone();
    }
    fn power_loss(&mut self, rng: &mut Rng) {
        for i in 0..self.blocks.len() {
            if self.blocks[i] != self.synced[i] && rng.chance(50) {
                self.blocks[i] = self.synced[i];
            }
        }
        self.synced = self.blocks.clone();
    }
}

/// A stored file written whole (the metadata): in flight it may land or not.
#[derive(Debug, Clone)]
struct MapFile {
    words: Vec<u64>,
    state: super::MapState,
}

/// One range of a batch or catch-up: its first block and what each block holds.
type Range = (u64, Vec<Content>);

/// The ranges of records, as a batch or the device sees them.
fn record_ranges(records: &[WriteRecord]) -> Vec<Range> {
    records
        .iter()
        .map(|record| {
            let first_block = record.offset_bytes / BLOCK_BYTES;
            let contents = match record.kind {
                RecordKind::Write => decode_blocks(&record.data),
                RecordKind::Zero | RecordKind::Punch => {
                    vec![0; (u64::from(record.len_bytes) / BLOCK_BYTES) as usize]
                }
            };
            (first_block, contents)
        })
        .collect()
}

/// A whole batch in `VOLUME.stage`. `history` is the model's record history the batch leads
/// to (its sender's, up to `lsn`): bookkeeping of the oracle, not bytes of the file.
#[derive(Debug, Clone)]
struct StagedBatch {
    lsn: u64,
    ranges: Vec<Range>,
    history: Vec<Content>,
}

/// `VOLUME.catchup.N`: ranges appended in order (in the page cache until the commit's
/// fdatasync), and the header a commit writes after it, naming the LSN the catch-up leads to
/// (with the history it leads to, for the oracle).
#[derive(Debug, Clone, Default)]
struct CatchUpFile {
    catchup: Option<u64>,
    ranges: Vec<Range>,
    /// Ranges made durable (by a commit).
    synced: usize,
    committed: Option<(u64, Vec<Content>)>,
}

impl CatchUpFile {
    /// The file of catch-up `catchup`: a new one starts empty (the daemon removes the old).
    fn start(&mut self, catchup: u64) {
        if self.catchup != Some(catchup) {
            *self = CatchUpFile {
                catchup: Some(catchup),
                ..CatchUpFile::default()
            };
        }
    }
}

/// A batch or a committed catch-up being applied, in steps: one device write per range, the
/// device's fdatasync, the journal's restart at `lsn + 1`, and for a batch the stage file's
/// clearing. A crash stops it after any step.
#[derive(Debug, Clone)]
struct ApplyInFlight {
    lsn: u64,
    ranges: Vec<Range>,
    clears_stage: bool,
    /// The record history the copy holds once the journal restarted.
    history: Vec<Content>,
}

impl ApplyInFlight {
    fn steps(&self) -> usize {
        self.ranges.len() + 2 + usize::from(self.clears_stage)
    }
}

/// Everything of a node that survives its process.
#[derive(Debug, Clone)]
struct Disks {
    journal: Journal,
    device: Device,
    meta: Meta,
    meta_in_flight: Option<Meta>,
    maps: Vec<MapFile>,
    /// A map persist in flight per peer: the pages it carries.
    maps_in_flight: Vec<Option<(Vec<(usize, Vec<u64>)>, super::MapState)>>,
    /// `VOLUME.stage` (regional secondary), and a store in flight (one write and one
    /// fdatasync: it lands whole, not at all, or torn, which reads as no batch).
    stage: Option<StagedBatch>,
    stage_in_flight: Option<StagedBatch>,
    catchup: CatchUpFile,
    /// A commit in flight: (catch-up, LSN, history).
    catchup_commit_in_flight: Option<(u64, u64, Vec<Content>)>,
    apply_in_flight: Option<ApplyInFlight>,
}

/// Restarts the journal empty at `next_lsn` (applying what it holds first), as the daemon's
/// `Journal::reset` does.
fn restart_journal(disks: &mut Disks, next_lsn: u64) {
    for record in disks.journal.records.values() {
        for (k, content) in record.contents.iter().enumerate() {
            disks.device.blocks[(record.first_block + k as u64) as usize] = *content;
        }
    }
    disks.device.sync();
    disks.journal.records.clear();
    disks.journal.next_lsn = next_lsn;
    disks.journal.durable_lsn = next_lsn - 1;
    disks.journal.applied_lsn = next_lsn - 1;
}

/// Carries out the first `steps` steps of `apply` on `node`'s disks (all of them when it
/// completes; fewer when a crash cuts it).
fn apply_steps(node: &mut Node, apply: &ApplyInFlight, steps: usize, seed: u64, i: usize) {
    let disks = &mut node.disks;
    for (first_block, contents) in apply.ranges.iter().take(steps) {
        for (k, content) in contents.iter().enumerate() {
            disks.device.blocks[(first_block + k as u64) as usize] = *content;
        }
    }
    let writes = apply.ranges.len();
    if steps > writes {
        disks.device.sync();
    }
    if steps > writes + 1 {
        restart_journal(disks, apply.lsn + 1);
        // From here the copy is as of `lsn`: a restart does not apply it again.
        check_forward(seed, i, &node.history, &apply.history, "an apply");
        node.history = apply.history.clone();
    }
    if steps > writes + 2 {
        node.disks.stage = None;
    }
}

/// Checks that a regional copy moving from `old` to `new` moves forward in the same history
/// (write order is kept: what it held is a prefix of what it now holds).
fn check_forward(seed: u64, node: usize, old: &[Content], new: &[Content], what: &str) {
    assert!(
        new.len() >= old.len(),
        "seed {seed}: {} goes back from LSN {} to {} by {what}",
        node_name(node),
        old.len(),
        new.len()
    );
    for (k, (a, b)) in old.iter().zip(new).enumerate() {
        assert!(
            a == b || *a == u64::MAX || *b == u64::MAX,
            "seed {seed}: {} held write {a} at LSN {} and {what} puts write {b} there: not a later point of the same history",
            node_name(node),
            k + 1
        );
    }
}

/// A client write as the client sees it.
#[derive(Debug, Clone)]
struct ClientWrite {
    id: u64,
    node: usize,
    boot: u64,
    lsn: u64,
    first_block: u64,
    blocks: u64,
    fua: bool,
    completed: bool,
    /// Nodes whose acknowledgement settled it (journal level), and durably.
    acked_journal: BTreeSet<usize>,
    acked_durable: BTreeSet<usize>,
}

#[derive(Debug, Clone)]
struct ClientFlush {
    node: usize,
    boot: u64,
    lsn: u64,
    journal_flushed: bool,
}

/// The simulated process of a node.
struct Process {
    rep: Replicator,
    boot: u64,
    failed: bool,
    draining: bool,
    /// Actions waiting for their completion time.
    next_apply: Instant,
    /// The journal writes complete in order: the time of the last one scheduled.
    last_journal_done: Instant,
    /// Last published settled LSNs.
    settled: (u64, u64),
    /// The catch-up file's I/O runs in one task, in order: when the last one completes.
    last_catchup_done: Instant,
}

struct Node {
    disks: Disks,
    process: Option<Process>,
    /// Slow disk: latency multiplier.
    slow: u64,
    /// Persists of metadata or maps fail while set.
    fail_persist: bool,
    /// The record history: which write each LSN holds in this copy's lineage (index lsn-1).
    history: Vec<Content>,
    /// Writes made on this node as primary (ids), for the split-brain check.
    own_writes: BTreeSet<u64>,
    restart_at: Option<Instant>,
    /// Histories of the resync ends this node received, and of the batch ends over a
    /// regional link, newest last, as (LSN, sender's history up to it): what a resync, a
    /// stored batch or a catch-up leads to.
    end_histories: VecDeque<(u64, Vec<Content>)>,
}

#[derive(Debug, Clone)]
enum Event {
    /// An I/O of `node`'s process `boot` completes.
    Io { node: usize, boot: u64, io: Io },
    /// A message arrives over link `link` at epoch `epoch`, for `to`.
    Deliver {
        link: usize,
        epoch: u64,
        to: usize,
        message: Message,
        /// For the end of a batch or catch-up over a regional link: the sender's history up
        /// to its LSN when it was sent.
        history: Option<Vec<Content>>,
    },
    /// A stream closes at `to` (the other end closed it).
    Closed { link: usize, epoch: u64, to: usize },
    /// Try to (re)open a link.
    Reopen { link: usize },
    /// A partition of `link` heals.
    Heal { link: usize },
    /// kill -9 or a power loss of `node`'s process `boot`, in the middle of an I/O.
    Crash { node: usize, boot: u64, power: bool },
    /// The primary's site is lost and the regional copy `node` is promoted (`--force`).
    RegionalFailover { node: usize, boot: u64 },
}

#[derive(Debug, Clone)]
enum Io {
    JournalWrite {
        lsn: u64,
    },
    Append {
        lsn: u64,
    },
    Flush,
    Reset {
        next_lsn: u64,
    },
    Meta,
    Map {
        peer: usize,
    },
    DeviceWrite {
        id: u64,
        first_block: u64,
        contents: Vec<Content>,
    },
    DeviceSync,
    /// The contents are taken when the read is issued and delivered later: a real read may
    /// take its snapshot at any point in between, and the earliest is the hardest case.
    Read {
        id: u64,
        data: Bytes,
    },
    Digest {
        id: u64,
        offset: u64,
        len: u64,
        block: u64,
    },
    ClientFlush {
        flush: usize,
    },
    StageBatch {
        peer: usize,
    },
    ApplyBatch {
        peer: usize,
    },
    CatchUpWrite {
        id: u64,
        catchup: u64,
        range: Range,
    },
    CatchUpCommit,
    CatchUpApply,
    CatchUpDrop,
}

#[derive(Debug, Clone)]
struct Link {
    a: usize,
    b: usize,
    up: bool,
    epoch: u64,
    partitioned: bool,
    /// When the last message in each direction (a→b, b→a) is delivered (in order).
    last_delivery: [Instant; 2],
    reopen_pending: bool,
}

/// Knobs of one run.
#[derive(Debug, Clone)]
struct Faults {
    nodes: usize,
    kill_percent: u64,
    power_percent: u64,
    partition_percent: u64,
    drop_percent: u64,
    slow_percent: u64,
    persist_fail_percent: u64,
    operator_percent: u64,
    corrupt_percent: u64,
    suspend: bool,
    /// The node whose links are regional (the others are a metro pair), if any.
    regional: Option<usize>,
    regional_interval: Duration,
    /// Chance that a stage, apply or catch-up I/O of the regional copy is cut by a crash.
    regional_crash_percent: u64,
    /// Chance (in tenths of a percent) that a staged range of a catch-up is followed by the
    /// loss of the primary's site and `promote --force` of the regional copy.
    regional_failover_permille: u64,
}

struct Sim {
    seed: u64,
    rng: Rng,
    base: Instant,
    now: Instant,
    seq: u64,
    events: BTreeMap<(Instant, u64), Event>,
    nodes: Vec<Node>,
    links: Vec<Link>,
    writes: Vec<ClientWrite>,
    flushes: Vec<ClientFlush>,
    next_write_id: u64,
    faults: Faults,
    /// Writes an operator chose to discard (resolve), by id.
    discarded: BTreeSet<u64>,
    /// Writes lost to a power loss of every node that held them (only non-durable ones may).
    lost: BTreeSet<u64>,
    trace: bool,
    split_brains: u64,
    failovers: u64,
    resyncs: u64,
    steps: u64,
    /// Writes of zeros (their blocks read as 0).
    zero_writes: BTreeSet<u64>,
    /// The node whose message is being handled (a zero record's id is its record's).
    sender: Option<usize>,
    /// Since a promotion of the regional copy, and until the next quiet checkpoint: its
    /// lowest LSN then. Writes of the old lineage above it are the regional RPO, given up by
    /// design.
    regional_boundary: Option<u64>,
    /// A failover to the regional copy after the primary's site was lost: (promoted, old
    /// primary, promotion done). No split brain may follow while no other operator command
    /// intervenes (it is dropped then).
    regional_failover: Option<(usize, usize, bool)>,
    /// The node on which the operator paused shipping to the regional copy (`ferry pause`),
    /// until `ferry resume` there or a restart of it (a pause is not stored).
    paused_on: Option<usize>,
    /// (node, write): records a node gave up by adopting another copy's data (a resync's
    /// end), completed or not at the time: an acknowledgement of one of them no longer stands.
    given_up: BTreeSet<(usize, u64)>,
    /// The regional copy's expected blocks, for the history they were computed from.
    regional_expected: Option<(Vec<Content>, Option<Vec<Content>>)>,
    /// The node that issued the last client write.
    last_writer: Option<usize>,
    stats: RegionalStats,
}

/// What the regional side of the runs did, summed over seeds.
#[derive(Debug, Clone, Copy, Default)]
struct RegionalStats {
    batches_applied: u64,
    catchups_applied: u64,
    catchups_abandoned: u64,
    reapplied_at_start: u64,
    crashes_mid_io: u64,
    failovers: u64,
    checks: u64,
}

fn node_name(i: usize) -> String {
    ["a", "b", "c"][i].to_owned()
}

impl Sim {
    fn new(seed: u64, faults: Faults) -> Sim {
        let base = Instant::now(); // the only real clock read: the virtual clock's origin
        let nodes = faults.nodes;
        let mut sim = Sim {
            seed,
            rng: Rng(seed ^ 0x5eed_f00d),
            base,
            now: base,
            seq: 0,
            events: BTreeMap::new(),
            nodes: Vec::new(),
            links: Vec::new(),
            writes: Vec::new(),
            flushes: Vec::new(),
            next_write_id: 1,
            faults,
            discarded: BTreeSet::new(),
            lost: BTreeSet::new(),
            trace: std::env::var_os("FERRY_TRACE").is_some(),
            split_brains: 0,
            failovers: 0,
            resyncs: 0,
            steps: 0,
            zero_writes: BTreeSet::new(),
            sender: None,
            regional_boundary: None,
            regional_failover: None,
            paused_on: None,
            given_up: BTreeSet::new(),
            regional_expected: None,
            last_writer: None,
            stats: RegionalStats::default(),
        };
        let lineage = GenerationInfo::create(0x7777, "a").expect("a lineage");
        for i in 0..nodes {
            let mut meta = Meta::empty(if i == 0 {
                Role::Primary
            } else {
                Role::Secondary
            });
            if i == 0 {
                meta.lineage = lineage.clone();
            }
            let words = BlockBitmap::word_count(SIZE_BYTES);
            // A primary that has no map yet cannot know what its peers hold: all dirty.
            let mut full = BlockBitmap::new(SIZE_BYTES);
            full.mark_all();
            let maps = (0..nodes - 1)
                .map(|_| {
                    if i == 0 {
                        MapFile {
                            words: full.words().to_vec(),
                            state: super::MapState {
                                marked_through_lsn: 0,
                                resync_only: true,
                            },
                        }
                    } else {
                        MapFile {
                            words: vec![0; words],
                            state: super::MapState::default(),
                        }
                    }
                })
                .collect();
            sim.nodes.push(Node {
                disks: Disks {
                    journal: Journal {
                        next_lsn: 1,
                        ..Journal::default()
                    },
                    device: Device::new(),
                    meta,
                    meta_in_flight: None,
                    maps,
                    maps_in_flight: vec![None; nodes - 1],
                    stage: None,
                    stage_in_flight: None,
                    catchup: CatchUpFile::default(),
                    catchup_commit_in_flight: None,
                    apply_in_flight: None,
                },
                process: None,
                slow: 1,
                fail_persist: false,
                history: Vec::new(),
                own_writes: BTreeSet::new(),
                restart_at: None,
                end_histories: VecDeque::new(),
            });
        }
        for a in 0..nodes {
            for b in a + 1..nodes {
                sim.links.push(Link {
                    a,
                    b,
                    up: false,
                    epoch: 0,
                    partitioned: false,
                    last_delivery: [base, base],
                    reopen_pending: false,
                });
            }
        }
        for i in 0..nodes {
            sim.start(i);
        }
        for link in 0..sim.links.len() {
            sim.schedule(Duration::from_millis(1), Event::Reopen { link });
        }
        sim
    }

    fn ms(&self) -> u128 {
        (self.now - self.base).as_millis()
    }

    fn trace(&self, what: impl FnOnce() -> String) {
        if self.trace {
            eprintln!("{:>7} ms {}", self.ms(), what());
        }
    }

    fn schedule(&mut self, after: Duration, event: Event) {
        self.seq += 1;
        self.events.insert((self.now + after, self.seq), event);
    }

    /// The peer index of node `other` in node `node`'s replicator (its config lists the
    /// other nodes in order).
    fn peer_index(node: usize, other: usize) -> usize {
        if other < node {
            other
        } else {
            other - 1
        }
    }

    fn node_of_peer(node: usize, peer: usize) -> usize {
        if peer < node {
            peer
        } else {
            peer + 1
        }
    }

    /// Whether the link between nodes `x` and `y` is regional.
    fn regional_link(&self, x: usize, y: usize) -> bool {
        self.faults.regional.is_some_and(|r| r == x || r == y)
    }

    fn link_of(&self, x: usize, y: usize) -> usize {
        let (a, b) = (x.min(y), x.max(y));
        self.links
            .iter()
            .position(|l| l.a == a && l.b == b)
            .expect("a link per pair")
    }

    // ---- processes: start, crash ------------------------------------------------------------

    fn config(&self, node: usize) -> ReplicatorConfig {
        let peers = (0..self.nodes.len())
            .filter(|j| *j != node)
            .map(|j| PeerConfig {
                name: node_name(j),
                on_disconnect: if self.faults.suspend {
                    OnDisconnect::Suspend
                } else {
                    OnDisconnect::Degrade
                },
                peer_timeout: PEER_TIMEOUT,
                resync_max_rate_bytes_per_s: None,
                regional: self.regional_link(node, j).then_some(RegionalConfig {
                    interval: self.faults.regional_interval,
                }),
            })
            .collect();
        ReplicatorConfig {
            node: node_name(node),
            volume: "vol".into(),
            size_bytes: SIZE_BYTES,
            peers,
            window_bytes: WINDOW_BYTES,
        }
    }

    /// Boots node `i`: recovery replays its journal (marking every replayed record in every
    /// dirty map, durably, as the daemon's open hook does) and the replicator starts.
    fn start(&mut self, i: usize) {
        let config = self.config(i);
        let node = &mut self.nodes[i];
        let disks = &mut node.disks;
        // Recovery: replay written records onto the device, in LSN order.
        let replayed: Vec<JRec> = disks.journal.records.values().cloned().collect();
        let mut head = disks.journal.applied_lsn.max(disks.journal.next_lsn - 1);
        let mut ranges = Vec::new();
        for record in &replayed {
            for (k, content) in record.contents.iter().enumerate() {
                disks.device.blocks[(record.first_block + k as u64) as usize] = *content;
            }
            ranges.push((
                record.first_block * BLOCK_BYTES,
                record.contents.len() as u64 * BLOCK_BYTES,
            ));
            head = head.max(record.lsn);
        }
        disks.device.sync();
        disks.journal.records.clear();
        disks.journal.next_lsn = head + 1;
        disks.journal.durable_lsn = head;
        disks.journal.applied_lsn = head;
        // The open hook marks what recovery replayed in every map, durably.
        for map in &mut disks.maps {
            let mut bitmap =
                BlockBitmap::from_words(SIZE_BYTES, map.words.clone()).expect("a valid map");
            super::mark_replayed(&mut bitmap, &mut map.state, &ranges, head);
            map.words = bitmap.words().to_vec();
        }
        // `open_catchup`: a committed catch-up the meta names is applied again, whole, and
        // recorded (every map as of its LSN, the meta no longer naming it); any other
        // catch-up file was abandoned and goes.
        let mut reached: Option<(Vec<Content>, &str)> = None;
        let mut reapplied = 0;
        if let Some(lsn) = disks.meta.catchup_lsn {
            let Some((committed_lsn, history)) = disks.catchup.committed.clone() else {
                panic!(
                    "seed {}: the meta of {} names the catch-up to {lsn}, and its file holds no committed catch-up",
                    self.seed,
                    node_name(i)
                );
            };
            assert_eq!(
                committed_lsn,
                lsn,
                "seed {}: the meta of {} names the catch-up to {lsn}, its file holds the one to {committed_lsn}",
                self.seed,
                node_name(i)
            );
            for (first_block, contents) in &disks.catchup.ranges {
                for (k, content) in contents.iter().enumerate() {
                    disks.device.blocks[(first_block + k as u64) as usize] = *content;
                }
            }
            disks.device.sync();
            restart_journal(disks, lsn + 1);
            head = lsn;
            for map in &mut disks.maps {
                map.state.marked_through_lsn = lsn;
                map.state.resync_only = false;
            }
            disks.meta.catchup_lsn = None;
            reached = Some((history, "the catch-up applied again at start"));
            reapplied += 1;
        }
        disks.catchup = CatchUpFile::default();
        // `open_stage`: a stored batch above the journal's head is applied again (its ranges
        // marked in every map first); the stage file is cleared.
        if let Some(batch) = disks.stage.take() {
            if batch.lsn > head {
                for map in &mut disks.maps {
                    let mut bitmap = BlockBitmap::from_words(SIZE_BYTES, map.words.clone())
                        .expect("a valid map");
                    for (first_block, contents) in &batch.ranges {
                        bitmap.mark(
                            first_block * BLOCK_BYTES,
                            contents.len() as u64 * BLOCK_BYTES,
                        );
                    }
                    map.words = bitmap.words().to_vec();
                    map.state.marked(batch.lsn);
                }
                for (first_block, contents) in &batch.ranges {
                    for (k, content) in contents.iter().enumerate() {
                        disks.device.blocks[(first_block + k as u64) as usize] = *content;
                    }
                }
                disks.device.sync();
                restart_journal(disks, batch.lsn + 1);
                head = batch.lsn;
                reached = Some((batch.history, "the batch applied again at start"));
                reapplied += 1;
            }
        }
        if let Some((history, what)) = reached {
            check_forward(self.seed, i, &node.history, &history, what);
            node.history = history;
        }
        self.stats.reapplied_at_start += reapplied;
        let node = &mut self.nodes[i];
        let disks = &mut node.disks;
        // Writes this node made that a power loss took from its journal: allowed for writes
        // neither FUA nor flushed (SPEC §2, crash recovery).
        let dropped: Vec<u64> = node.history.iter().skip(head as usize).copied().collect();
        node.history.truncate(head as usize);
        let resolving = disks.meta.resolving_with.is_some();
        let resyncing = !disks.meta.consistent;
        let nodes = self.faults.nodes;
        for id in dropped {
            let unprotected = self.writes.iter().find(|w| w.id == id).is_some_and(|w| {
                (0..nodes)
                    .filter(|j| *j != w.node)
                    .all(|j| self.faults.regional.is_some_and(|r| r == w.node || r == j))
            });
            if resolving {
                // A resync the operator chose (resolve) restarted the journal before the
                // crash: what it dropped was this copy's writes since the split.
                self.discarded.insert(id);
            } else if resyncing && unprotected {
                // A resync from a copy promoted meanwhile was rewriting this one: it gives
                // up a tail written where every peer was regional (the regional RPO, as at
                // the resync's end in `collect_adoptions`).
                self.discarded.insert(id);
            } else {
                // A power loss took it from this copy's journal (a kill -9 never does): allowed
                // for writes neither FUA nor flushed, wherever they were written (SPEC §2).
                self.lost.insert(id);
            }
        }
        let mut peers = Vec::new();
        for map in &disks.maps {
            let bitmap =
                BlockBitmap::from_words(SIZE_BYTES, map.words.clone()).expect("a valid map");
            peers.push(StartPeer {
                bitmap,
                state: map.state,
            });
        }
        let startup = Startup {
            meta: disks.meta.clone(),
            head_lsn: head,
            peers,
        };
        let boot = node.process.as_ref().map_or(0, |p| p.boot) + 1 + self.steps;
        let rep = Replicator::new(config, startup, self.now);
        node.process = Some(Process {
            rep,
            boot,
            failed: false,
            draining: false,
            next_apply: self.now + APPLY_INTERVAL,
            last_journal_done: self.now,
            settled: (head, head),
            last_catchup_done: self.now,
        });
        node.restart_at = None;
        self.trace(|| format!("{} boots at head {head}", node_name(i)));
        self.run_node(i);
    }

    /// kill -9 (`power` false) or a power loss: the process is gone; its disks keep what
    /// the fault model says.
    fn crash(&mut self, i: usize, power: bool) {
        if self.nodes[i].process.is_none() {
            return;
        }
        if self.paused_on == Some(i) {
            self.paused_on = None;
        }
        self.trace(|| {
            format!(
                "{} {}",
                node_name(i),
                if power { "POWER LOSS" } else { "kill -9" }
            )
        });
        let node = &mut self.nodes[i];
        node.process = None;
        let disks = &mut node.disks;
        // Writes in flight: journal writes not completed are lost; a metadata write or map
        // persist in flight lands or not (the dual-slot metadata and the map's pages make
        // either state readable).
        disks.journal.records.retain(|_, r| r.written);
        if let Some(meta) = disks.meta_in_flight.take() {
            if self.rng.chance(50) {
                disks.meta = meta;
            }
        }
        for p in 0..disks.maps_in_flight.len() {
            if let Some((pages, state)) = disks.maps_in_flight[p].take() {
                for (page, words) in pages {
                    if self.rng.chance(60) {
                        let start = page * crate::bitmap::WORDS_PER_PAGE;
                        for (k, w) in words.iter().enumerate() {
                            if start + k < disks.maps[p].words.len() {
                                disks.maps[p].words[start + k] = *w;
                            }
                        }
                    }
                }
                if self.rng.chance(50) {
                    disks.maps[p].state = state;
                }
            }
        }
        // The regional secondary's files: a stage store in flight lands whole, not at all, or
        // torn (no whole batch, ignored at start); a catch-up commit in flight lands or not
        // (its header is written after the ranges are synced); an apply stops after any of
        // its steps, what it wrote in the page cache (kill -9 keeps it, a power loss tears
        // what was not synced, below).
        if let Some(batch) = disks.stage_in_flight.take() {
            match self.rng.below(3) {
                0 => {}
                1 => disks.stage = Some(batch),
                _ => disks.stage = None,
            }
        }
        if let Some((catchup, lsn, history)) = disks.catchup_commit_in_flight.take() {
            if self.rng.chance(50) {
                disks.catchup.start(catchup);
                disks.catchup.synced = disks.catchup.ranges.len();
                disks.catchup.committed = Some((lsn, history));
            }
        }
        if let Some(apply) = disks.apply_in_flight.take() {
            let steps = self.rng.below(apply.steps() as u64 + 1) as usize;
            apply_steps(node, &apply, steps, self.seed, i);
        }
        let disks = &mut node.disks;
        let unsynced = disks.catchup.ranges.len() - disks.catchup.synced;
        if power && unsynced > 0 {
            // Appends to the catch-up file that no commit synced: a random prefix survives.
            let keep = disks.catchup.synced + self.rng.below(unsynced as u64 + 1) as usize;
            disks.catchup.ranges.truncate(keep);
        }
        if power {
            // Only durable journal records survive, plus a random prefix of the rest.
            let durable = disks.journal.durable_lsn;
            let mut keep = true;
            let mut lost_lsns = Vec::new();
            for (lsn, _) in disks.journal.records.iter() {
                if *lsn > durable {
                    if keep && self.rng.chance(30) {
                        keep = false;
                    }
                    if !keep {
                        lost_lsns.push(*lsn);
                    }
                }
            }
            for lsn in lost_lsns {
                disks.journal.records.remove(&lsn);
            }
            let last = disks
                .journal
                .records
                .keys()
                .next_back()
                .copied()
                .unwrap_or(disks.journal.applied_lsn)
                .max(disks.journal.applied_lsn);
            disks.journal.next_lsn = last + 1;
            disks.device.power_loss(&mut self.rng);
        } else {
            let last = disks
                .journal
                .records
                .keys()
                .next_back()
                .copied()
                .unwrap_or(disks.journal.applied_lsn)
                .max(disks.journal.applied_lsn);
            disks.journal.next_lsn = last + 1;
        }
        // Links of the node drop; the peers notice by timeout (no reset reaches them).
        for link in 0..self.links.len() {
            if self.links[link].a == i || self.links[link].b == i {
                self.links[link].up = false;
                self.links[link].epoch += 1;
            }
        }
        // What the node acknowledged only as journaled may be gone after a power loss.
        if power {
            let held = self.nodes[i].history.len();
            let _ = held;
        }
    }

    // ---- the daemon's part ------------------------------------------------------------------

    /// Runs node `i`'s replicator: advance, then execute every action.
    fn run_node(&mut self, i: usize) {
        for _ in 0..1000 {
            let Some(process) = self.nodes[i].process.as_mut() else {
                return;
            };
            process.rep.advance(self.now);
            let mut actions = Vec::new();
            while let Some(action) = process.rep.poll_action() {
                actions.push(action);
            }
            // A resync that just ended changes the model before the records after it land.
            self.collect_adoptions(i);
            if actions.is_empty() {
                break;
            }
            for action in actions {
                self.execute(i, action);
            }
        }
        self.publish(i);
    }

    fn latency(&mut self, i: usize, lo: u64, hi: u64) -> Duration {
        let slow = self.nodes[i].slow;
        self.rng.ms(lo, hi) * slow as u32
    }

    fn io(&mut self, i: usize, after: Duration, io: Io) {
        let boot = self.nodes[i].process.as_ref().expect("running").boot;
        self.schedule(after, Event::Io { node: i, boot, io });
    }

    fn execute(&mut self, i: usize, action: Action) {
        if self.trace {
            let text = match &action {
                Action::Transmit { peer, message } => match message {
                    Message::Write(r) => format!(
                        "-> {} write {}",
                        node_name(Self::node_of_peer(i, *peer)),
                        r.lsn
                    ),
                    Message::ResyncData { offset_bytes, .. } => format!(
                        "-> {} resync data at {}",
                        node_name(Self::node_of_peer(i, *peer)),
                        offset_bytes / BLOCK_BYTES
                    ),
                    Message::Heartbeat { .. } | Message::HeartbeatReply { .. } => String::new(),
                    Message::Hello(h) => format!(
                        "-> {} hello {:?} head {} durable {} gen {:?} consistent {}",
                        node_name(Self::node_of_peer(i, *peer)),
                        h.role,
                        h.generation.head_lsn,
                        h.durable_lsn,
                        h.generation
                            .history
                            .iter()
                            .map(|g| (g.generation, g.start_lsn))
                            .collect::<Vec<_>>(),
                        h.consistent
                    ),
                    other => format!("-> {} {:?}", node_name(Self::node_of_peer(i, *peer)), other),
                },
                Action::Append { record } => format!("append {}", record.lsn),
                Action::DeviceWrite {
                    id,
                    offset_bytes,
                    data,
                } => format!(
                    "device write {id} at block {} of {} blocks",
                    offset_bytes / BLOCK_BYTES,
                    data.len() as u64 / BLOCK_BYTES
                ),
                Action::PersistMeta { meta } => format!(
                    "persist meta {:?} gen {:?} consistent {} resolving {:?}",
                    meta.role,
                    meta.lineage
                        .history
                        .iter()
                        .map(|g| (g.generation, g.start_lsn))
                        .collect::<Vec<_>>(),
                    meta.consistent,
                    meta.resolving_with
                ),
                Action::PersistMap { peer, state, .. } => format!("persist map {peer} {state:?}"),
                other => format!("{other:?}"),
            };
            if !text.is_empty() {
                self.trace(|| format!("{}: {text}", node_name(i)));
            }
        }
        match action {
            Action::Transmit { peer, message } => {
                let to = Self::node_of_peer(i, peer);
                self.send(i, to, message);
            }
            Action::CloseStream { peer, .. } => {
                let to = Self::node_of_peer(i, peer);
                let link = self.link_of(i, to);
                if self.links[link].up {
                    let epoch = self.links[link].epoch;
                    self.links[link].up = false;
                    self.links[link].epoch += 1;
                    let after = self.rng.ms(1, 5);
                    self.schedule(after, Event::Closed { link, epoch, to });
                }
                self.schedule_reopen(link);
            }
            Action::PersistMeta { meta } => {
                self.nodes[i].disks.meta_in_flight = Some(meta);
                let after = self.latency(i, 1, 6);
                self.io(i, after, Io::Meta);
            }
            Action::PersistMap {
                peer,
                changes,
                state,
            } => {
                self.nodes[i].disks.maps_in_flight[peer] = Some((changes.pages, state));
                let after = self.latency(i, 1, 6);
                self.io(i, after, Io::Map { peer });
            }
            Action::Append { record } => {
                let lsn = record.lsn;
                // A zero record carries no id: it is the record its primary holds at that LSN.
                self.sender = self.nodes[i]
                    .process
                    .as_ref()
                    .and_then(|p| p.rep.status().following)
                    .and_then(|name| (0..self.nodes.len()).find(|j| node_name(*j) == name));
                self.journal_add(i, &record);
                self.sender = None;
                let at = self.journal_done_at(i);
                self.io(i, at, Io::Append { lsn });
            }
            Action::JournalFlush => {
                let after = self.latency(i, 1, 4);
                self.io(i, after, Io::Flush);
            }
            Action::JournalReset { next_lsn } => {
                let after = self.latency(i, 1, 5);
                self.io(i, after, Io::Reset { next_lsn });
            }
            Action::DeviceWrite {
                id,
                offset_bytes,
                data,
            } => {
                let contents = decode_blocks(&data);
                let after = self.latency(i, 1, 4);
                self.io(
                    i,
                    after,
                    Io::DeviceWrite {
                        id,
                        first_block: offset_bytes / BLOCK_BYTES,
                        contents,
                    },
                );
            }
            Action::DeviceZero {
                id,
                offset_bytes,
                len_bytes,
            } => {
                let contents = vec![0; (len_bytes / BLOCK_BYTES) as usize];
                let after = self.latency(i, 1, 3);
                self.io(
                    i,
                    after,
                    Io::DeviceWrite {
                        id,
                        first_block: offset_bytes / BLOCK_BYTES,
                        contents,
                    },
                );
            }
            Action::DeviceSync => {
                let after = self.latency(i, 1, 5);
                self.io(i, after, Io::DeviceSync);
            }
            Action::StageBatch { peer, lsn, records } => {
                let history = self.end_history(i, lsn);
                let batch = StagedBatch {
                    lsn,
                    ranges: record_ranges(&records),
                    history,
                };
                let disks = &mut self.nodes[i].disks;
                assert!(disks.stage_in_flight.is_none(), "one store at a time");
                disks.stage_in_flight = Some(batch);
                let after = self.latency(i, 1, 6);
                self.maybe_crash_mid_io(i, after);
                self.io(i, after, Io::StageBatch { peer });
            }
            Action::ApplyBatch { peer, lsn, records } => {
                let seed = self.seed;
                let disks = &mut self.nodes[i].disks;
                let Some(stored) = disks.stage.clone().filter(|b| b.lsn == lsn) else {
                    panic!(
                        "seed {seed}: {} applies batch {lsn}, which its stage file does not hold",
                        node_name(i)
                    );
                };
                assert_eq!(
                    record_ranges(&records),
                    stored.ranges,
                    "seed {seed}: the batch applied is the one stored"
                );
                assert!(disks.apply_in_flight.is_none(), "one apply at a time");
                disks.apply_in_flight = Some(ApplyInFlight {
                    lsn,
                    ranges: stored.ranges,
                    clears_stage: true,
                    history: stored.history,
                });
                let after = self.latency(i, 2, 8);
                self.maybe_crash_mid_io(i, after);
                self.io(i, after, Io::ApplyBatch { peer });
            }
            Action::CatchUpWrite {
                id,
                catchup,
                offset_bytes,
                len_bytes,
                data,
            } => {
                let contents = match data {
                    Some(data) => decode_blocks(&data),
                    None => vec![0; (len_bytes / BLOCK_BYTES) as usize],
                };
                let range = (offset_bytes / BLOCK_BYTES, contents);
                let after = self.catchup_done_at(i);
                self.maybe_crash_mid_io(i, after);
                if self.rng.below(1000) < self.faults.regional_failover_permille {
                    let boot = self.nodes[i].process.as_ref().expect("running").boot;
                    let at = self.rng.ms(0, 3);
                    self.schedule(at, Event::RegionalFailover { node: i, boot });
                }
                self.io(i, after, Io::CatchUpWrite { id, catchup, range });
            }
            Action::CatchUpCommit { catchup, lsn } => {
                let history = self.end_history(i, lsn);
                let disks = &mut self.nodes[i].disks;
                assert!(
                    disks.catchup_commit_in_flight.is_none(),
                    "one commit at a time"
                );
                disks.catchup_commit_in_flight = Some((catchup, lsn, history));
                let after = self.catchup_done_at(i);
                self.maybe_crash_mid_io(i, after);
                self.io(i, after, Io::CatchUpCommit);
            }
            Action::CatchUpApply { lsn } => {
                let seed = self.seed;
                let disks = &mut self.nodes[i].disks;
                let Some((_, history)) = disks.catchup.committed.clone().filter(|c| c.0 == lsn)
                else {
                    panic!(
                        "seed {seed}: {} applies the catch-up to {lsn}, which its file does not hold committed",
                        node_name(i)
                    );
                };
                assert!(disks.apply_in_flight.is_none(), "one apply at a time");
                disks.apply_in_flight = Some(ApplyInFlight {
                    lsn,
                    ranges: disks.catchup.ranges.clone(),
                    clears_stage: false,
                    history,
                });
                let after = self.catchup_done_at(i);
                self.maybe_crash_mid_io(i, after);
                self.io(i, after, Io::CatchUpApply);
            }
            Action::CatchUpDrop => {
                let after = self.catchup_done_at(i);
                self.io(i, after, Io::CatchUpDrop);
            }
            Action::Read {
                id,
                offset_bytes,
                len_bytes,
            } => {
                let after = self.latency(i, 1, 3);
                let contents =
                    self.read_volume(i, offset_bytes / BLOCK_BYTES, len_bytes / BLOCK_BYTES);
                let data = encode_blocks(&contents);
                self.io(i, after, Io::Read { id, data });
            }
            Action::Digest {
                id,
                offset_bytes,
                len_bytes,
                block_bytes,
            } => {
                let after = self.latency(i, 1, 3);
                self.io(
                    i,
                    after,
                    Io::Digest {
                        id,
                        offset: offset_bytes,
                        len: len_bytes,
                        block: block_bytes,
                    },
                );
            }
            Action::Fail { reason } => {
                self.trace(|| format!("{} FAILS: {reason}", node_name(i)));
                if let Some(process) = self.nodes[i].process.as_mut() {
                    process.failed = true;
                }
            }
            Action::Drain => {
                if let Some(process) = self.nodes[i].process.as_mut() {
                    process.draining = true;
                }
            }
        }
    }

    /// When a journal write issued now completes (journal writes complete in order).
    fn journal_done_at(&mut self, i: usize) -> Duration {
        let latency = self.latency(i, 1, 3);
        let process = self.nodes[i].process.as_mut().expect("running");
        let at = (self.now + latency).max(process.last_journal_done + Duration::from_micros(10));
        process.last_journal_done = at;
        at - self.now
    }

    /// When a catch-up file I/O issued now completes (they run in one task, in order).
    fn catchup_done_at(&mut self, i: usize) -> Duration {
        let latency = self.latency(i, 1, 4);
        let process = self.nodes[i].process.as_mut().expect("running");
        let at = (self.now + latency).max(process.last_catchup_done + Duration::from_micros(10));
        process.last_catchup_done = at;
        at - self.now
    }

    /// Sometimes cuts an I/O of the regional copy (completing `after` from now) by a crash
    /// before it completes: kill -9 or a power loss in the middle of a stage, an apply, a
    /// catch-up.
    fn maybe_crash_mid_io(&mut self, i: usize, after: Duration) {
        if self.faults.regional != Some(i) || !self.rng.chance(self.faults.regional_crash_percent) {
            return;
        }
        let boot = self.nodes[i].process.as_ref().expect("running").boot;
        let power = self.rng.chance(50);
        let at = Duration::from_micros(self.rng.below(after.as_micros() as u64));
        self.schedule(
            at,
            Event::Crash {
                node: i,
                boot,
                power,
            },
        );
    }

    /// The sender's history up to `lsn`, as of the end of the batch or catch-up to `lsn`
    /// that node `i` received last.
    fn end_history(&self, i: usize, lsn: u64) -> Vec<Content> {
        self.nodes[i]
            .end_histories
            .iter()
            .rev()
            .find(|(end, _)| *end == lsn)
            .map(|(_, history)| history.clone())
            .unwrap_or_else(|| {
                panic!(
                    "seed {}: {} stores something ending at {lsn}, and received no end there",
                    self.seed,
                    node_name(i)
                )
            })
    }

    fn journal_add(&mut self, i: usize, record: &WriteRecord) {
        let first_block = record.offset_bytes / BLOCK_BYTES;
        let contents = match record.kind {
            RecordKind::Write => decode_blocks(&record.data),
            RecordKind::Zero | RecordKind::Punch => {
                vec![0; (u64::from(record.len_bytes) / BLOCK_BYTES) as usize]
            }
        };
        let journal = &mut self.nodes[i].disks.journal;
        assert_eq!(
            record.lsn, journal.next_lsn,
            "the journal takes the next LSN"
        );
        journal.next_lsn += 1;
        journal.records.insert(
            record.lsn,
            JRec {
                lsn: record.lsn,
                first_block,
                contents,
                fua: record.fua,
                written: false,
            },
        );
        let history = &mut self.nodes[i].history;
        history.truncate(record.lsn as usize - 1);
        while (history.len() as u64) < record.lsn - 1 {
            history.push(u64::MAX); // a record this copy holds but the model does not know
        }
        let id = match record.kind {
            RecordKind::Write => decode_blocks(&record.data)[0],
            // A zero record carries no id: it is the sender's record at that LSN.
            RecordKind::Zero | RecordKind::Punch => match self.sender {
                Some(from) => self.nodes[from]
                    .history
                    .get(record.lsn as usize - 1)
                    .copied()
                    .unwrap_or(u64::MAX),
                None => self.next_write_id,
            },
        };
        self.nodes[i].history.push(id);
    }

    /// Reads the volume: unapplied journal records over the device, newest last.
    fn read_volume(&self, i: usize, first_block: u64, blocks: u64) -> Vec<Content> {
        let disks = &self.nodes[i].disks;
        let mut out: Vec<Content> = (first_block..first_block + blocks)
            .map(|b| disks.device.blocks[b as usize])
            .collect();
        for record in disks.journal.records.values() {
            for (k, content) in record.contents.iter().enumerate() {
                let block = record.first_block + k as u64;
                if block >= first_block && block < first_block + blocks {
                    out[(block - first_block) as usize] = *content;
                }
            }
        }
        out
    }

    fn complete_io(&mut self, i: usize, io: Io) {
        match io {
            Io::JournalWrite { lsn } => {
                let journal = &mut self.nodes[i].disks.journal;
                if let Some(record) = journal.records.get_mut(&lsn) {
                    record.written = true;
                    if record.fua {
                        // Durable with everything before it (RWF_DSYNC after a sync).
                        journal.durable_lsn = journal.durable_lsn.max(lsn);
                        for r in journal.records.values_mut() {
                            if r.lsn <= lsn && !r.written {
                                // Cannot happen: written in order.
                                unreachable!("journal writes complete in order");
                            }
                        }
                    }
                }
                let durable = self.nodes[i].disks.journal.durable_lsn;
                self.rep(i).local_durable(durable);
            }
            Io::Append { lsn } => {
                let journal = &mut self.nodes[i].disks.journal;
                let fua = journal.records.get(&lsn).is_some_and(|r| r.fua);
                if let Some(record) = journal.records.get_mut(&lsn) {
                    record.written = true;
                }
                if fua {
                    journal.durable_lsn = journal.durable_lsn.max(lsn);
                }
                self.rep(i).appended(Ok(()));
            }
            Io::Flush => {
                let journal = &mut self.nodes[i].disks.journal;
                let written = journal
                    .records
                    .values()
                    .take_while(|r| r.written)
                    .last()
                    .map_or(journal.applied_lsn, |r| r.lsn)
                    .max(journal.applied_lsn);
                journal.durable_lsn = journal.durable_lsn.max(written);
                let durable = journal.durable_lsn;
                self.rep(i).journal_flushed(Ok(durable));
            }
            Io::Reset { next_lsn } => {
                let disks = &mut self.nodes[i].disks;
                assert!(
                    disks.journal.records.values().all(|r| r.written),
                    "a reset waits for queued records"
                );
                for record in disks.journal.records.values() {
                    for (k, content) in record.contents.iter().enumerate() {
                        disks.device.blocks[(record.first_block + k as u64) as usize] = *content;
                    }
                }
                disks.device.sync();
                disks.journal.records.clear();
                disks.journal.next_lsn = next_lsn;
                disks.journal.durable_lsn = next_lsn - 1;
                disks.journal.applied_lsn = next_lsn - 1;
                self.rep(i).journal_reset(Ok(()));
            }
            Io::Meta => {
                let fail = self.nodes[i].fail_persist;
                let disks = &mut self.nodes[i].disks;
                let Some(meta) = disks.meta_in_flight.take() else {
                    return;
                };
                if fail {
                    self.rep(i).meta_persisted(Err("injected failure".into()));
                } else {
                    disks.meta = meta;
                    self.rep(i).meta_persisted(Ok(()));
                }
            }
            Io::Map { peer } => {
                let fail = self.nodes[i].fail_persist;
                let disks = &mut self.nodes[i].disks;
                let Some((pages, state)) = disks.maps_in_flight[peer].take() else {
                    return;
                };
                if fail {
                    self.rep(i)
                        .map_persisted(peer, Err("injected failure".into()));
                } else {
                    for (page, words) in pages {
                        let start = page * crate::bitmap::WORDS_PER_PAGE;
                        for (k, w) in words.iter().enumerate() {
                            if start + k < disks.maps[peer].words.len() {
                                disks.maps[peer].words[start + k] = *w;
                            }
                        }
                    }
                    disks.maps[peer].state = state;
                    self.rep(i).map_persisted(peer, Ok(()));
                }
            }
            Io::DeviceWrite {
                id,
                first_block,
                contents,
            } => {
                let disks = &mut self.nodes[i].disks;
                for (k, content) in contents.iter().enumerate() {
                    disks.device.blocks[(first_block + k as u64) as usize] = *content;
                }
                self.rep(i).device_done(id, Ok(()));
            }
            Io::DeviceSync => {
                self.nodes[i].disks.device.sync();
                self.rep(i).device_synced(Ok(()));
            }
            Io::Read { id, data } => {
                self.rep(i).read_done(id, Ok(data));
            }
            Io::Digest {
                id,
                offset,
                len,
                block,
            } => {
                let contents = self.read_volume(i, offset / BLOCK_BYTES, len / BLOCK_BYTES);
                let per = (block / BLOCK_BYTES) as usize;
                let digests: Vec<[u8; VERIFY_DIGEST_BYTES]> = contents
                    .chunks(per)
                    .map(|chunk| {
                        let mut digest = [0u8; VERIFY_DIGEST_BYTES];
                        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
                        for c in chunk {
                            h = (h ^ c).wrapping_mul(0x100_0000_01b3);
                        }
                        digest[..8].copy_from_slice(&h.to_le_bytes());
                        digest
                    })
                    .collect();
                self.rep(i).digest_done(id, Ok(digests));
            }
            Io::StageBatch { peer } => {
                let fail = self.nodes[i].fail_persist;
                let Some(batch) = self.nodes[i].disks.stage_in_flight.take() else {
                    return;
                };
                if fail {
                    // A failed fdatasync: the file may hold the batch or not.
                    if self.rng.chance(50) {
                        self.nodes[i].disks.stage = Some(batch);
                    }
                    self.rep(i)
                        .batch_staged(peer, Err("injected failure".into()));
                } else {
                    self.nodes[i].disks.stage = Some(batch);
                    self.rep(i).batch_staged(peer, Ok(()));
                }
            }
            Io::ApplyBatch { peer } => {
                let apply = self.nodes[i]
                    .disks
                    .apply_in_flight
                    .take()
                    .expect("an apply in flight");
                apply_steps(&mut self.nodes[i], &apply, apply.steps(), self.seed, i);
                self.stats.batches_applied += 1;
                self.trace(|| format!("{} applied the batch to {}", node_name(i), apply.lsn));
                self.rep(i).batch_applied(peer, Ok(()));
            }
            Io::CatchUpWrite { id, catchup, range } => {
                let fail = self.nodes[i].fail_persist;
                self.catchup_file(i, catchup);
                if fail {
                    self.stats.catchups_abandoned += 1;
                    self.rep(i)
                        .device_done(id, Err("No space left on device (injected)".into()));
                } else {
                    self.nodes[i].disks.catchup.ranges.push(range);
                    self.rep(i).device_done(id, Ok(()));
                }
            }
            Io::CatchUpCommit => {
                let fail = self.nodes[i].fail_persist;
                let Some((catchup, lsn, history)) =
                    self.nodes[i].disks.catchup_commit_in_flight.take()
                else {
                    return;
                };
                self.catchup_file(i, catchup);
                if fail {
                    self.rep(i)
                        .catchup_committed(Err("injected failure".into()));
                } else {
                    let file = &mut self.nodes[i].disks.catchup;
                    file.synced = file.ranges.len();
                    file.committed = Some((lsn, history));
                    self.rep(i).catchup_committed(Ok(()));
                }
            }
            Io::CatchUpApply => {
                let apply = self.nodes[i]
                    .disks
                    .apply_in_flight
                    .take()
                    .expect("an apply in flight");
                apply_steps(&mut self.nodes[i], &apply, apply.steps(), self.seed, i);
                self.stats.catchups_applied += 1;
                self.trace(|| format!("{} applied the catch-up to {}", node_name(i), apply.lsn));
                self.rep(i).catchup_applied(Ok(()));
            }
            Io::CatchUpDrop => {
                self.nodes[i].disks.catchup = CatchUpFile::default();
            }
            Io::ClientFlush { flush } => {
                let journal = &mut self.nodes[i].disks.journal;
                let target = self.flushes[flush].lsn;
                let written = journal
                    .records
                    .values()
                    .take_while(|r| r.written)
                    .last()
                    .map_or(journal.applied_lsn, |r| r.lsn)
                    .max(journal.applied_lsn);
                journal.durable_lsn = journal.durable_lsn.max(written);
                let durable = journal.durable_lsn;
                if durable >= target {
                    self.flushes[flush].journal_flushed = true;
                }
                self.rep(i).request_durable(durable);
            }
        }
    }

    /// The catch-up file as catch-up `catchup` writes it: a new catch-up starts a fresh file,
    /// which must never throw away a committed catch-up the stored meta names.
    fn catchup_file(&mut self, i: usize, catchup: u64) {
        let disks = &mut self.nodes[i].disks;
        if disks.catchup.catchup != Some(catchup) {
            assert!(
                disks.meta.catchup_lsn.is_none(),
                "seed {}: {} starts catch-up {catchup} while its meta names the committed one to {:?}",
                self.seed,
                node_name(i),
                disks.meta.catchup_lsn
            );
        }
        disks.catchup.start(catchup);
    }

    /// The applier: records up to the apply limit (and written) go to the device, which is
    /// synced, and leave the journal.
    fn apply(&mut self, i: usize) {
        let limit = self.rep(i).apply_limit();
        let disks = &mut self.nodes[i].disks;
        let ready: Vec<u64> = disks
            .journal
            .records
            .values()
            .take_while(|r| r.written && r.lsn <= limit)
            .map(|r| r.lsn)
            .collect();
        if ready.is_empty() {
            return;
        }
        for lsn in &ready {
            let record = disks.journal.records.remove(lsn).expect("listed");
            for (k, content) in record.contents.iter().enumerate() {
                disks.device.blocks[(record.first_block + k as u64) as usize] = *content;
            }
        }
        disks.device.sync();
        let last = *ready.last().expect("not empty");
        disks.journal.applied_lsn = last;
        disks.journal.durable_lsn = disks.journal.durable_lsn.max(last);
        self.rep(i).local_durable(last);
    }

    fn rep(&mut self, i: usize) -> &mut Replicator {
        &mut self.nodes[i].process.as_mut().expect("running").rep
    }

    /// Publishes the settled LSNs and completes client writes and flushes.
    fn publish(&mut self, i: usize) {
        let peers = self.nodes.len() - 1;
        let Some(process) = self.nodes[i].process.as_mut() else {
            return;
        };
        let settled = process.rep.settled();
        process.settled = settled;
        let boot = process.boot;
        // A regional peer's acknowledgement promises the client nothing (RPO 0 is metro's):
        // its copy is checked by the regional oracle instead.
        let regional = self.faults.regional;
        let acks: Vec<(u64, u64)> = (0..peers)
            .map(|p| {
                let node = Self::node_of_peer(i, p);
                if regional.is_some_and(|r| r == i || r == node) {
                    (0, 0)
                } else {
                    process.rep.acked_by(p)
                }
            })
            .collect();
        let journal = &self.nodes[i].disks.journal;
        let written_lsn = journal
            .records
            .values()
            .take_while(|r| r.written)
            .last()
            .map_or(journal.applied_lsn, |r| r.lsn)
            .max(journal.applied_lsn);
        let durable_lsn = journal.durable_lsn;
        let mut completed = Vec::new();
        let given_up = &self.given_up;
        for (k, write) in self.writes.iter_mut().enumerate() {
            if write.completed || write.node != i || write.boot != boot {
                continue;
            }
            let journaled = written_lsn >= write.lsn && (!write.fua || durable_lsn >= write.lsn);
            let replicated = if write.fua {
                settled.1 >= write.lsn
            } else {
                settled.0 >= write.lsn
            };
            if journaled && replicated {
                write.completed = true;
                for (p, (journal, durable)) in acks.iter().enumerate() {
                    let node = Self::node_of_peer(i, p);
                    // An acknowledgement a peer took back by adopting another copy's data
                    // since (a copy promoted past it, while this primary, still serving, could
                    // not hear of it) settles nothing. Any other loss of an acknowledged
                    // record is still held against the peer.
                    if given_up.contains(&(node, write.id)) {
                        continue;
                    }
                    if *journal >= write.lsn {
                        write.acked_journal.insert(node);
                    }
                    if *durable >= write.lsn {
                        write.acked_durable.insert(node);
                    }
                }
                completed.push(k);
            }
        }
        for flush in &mut self.flushes {
            if flush.node == i
                && flush.boot == boot
                && flush.journal_flushed
                && settled.1 >= flush.lsn
            {
                // A completed flush makes every earlier write durable: record who holds them.
                let lsn = flush.lsn;
                flush.journal_flushed = false;
                flush.lsn = u64::MAX;
                for write in self.writes.iter_mut() {
                    if write.node == i && write.boot == boot && write.completed && write.lsn <= lsn
                    {
                        write.fua = true;
                        for (p, (_, durable)) in acks.iter().enumerate() {
                            let node = Self::node_of_peer(i, p);
                            if *durable >= write.lsn && !given_up.contains(&(node, write.id)) {
                                write.acked_durable.insert(node);
                            }
                        }
                    }
                }
            }
        }
        if self.trace && !completed.is_empty() {
            let ids: Vec<u64> = completed.iter().map(|k| self.writes[*k].id).collect();
            self.trace(|| format!("{} completes writes {ids:?}", node_name(i)));
            if let Some(process) = &self.nodes[i].process {
                for p in 0..self.nodes.len() - 1 {
                    let why = process.rep.explain(p);
                    self.trace(|| {
                        format!(
                            "   {} for {}: {why}",
                            node_name(i),
                            node_name(Self::node_of_peer(i, p))
                        )
                    });
                }
            }
        }
    }

    // ---- the network ------------------------------------------------------------------------

    fn send(&mut self, from: usize, to: usize, message: Message) {
        let link = self.link_of(from, to);
        if !self.links[link].up || self.links[link].partitioned {
            return;
        }
        if self.rng.chance(self.faults.drop_percent) && self.rng.chance(5) {
            // A lost packet that QUIC could not recover in time: the connection drops.
            let epoch = self.links[link].epoch;
            self.links[link].up = false;
            self.links[link].epoch += 1;
            self.schedule(Duration::from_millis(2), Event::Closed { link, epoch, to });
            self.schedule(
                Duration::from_millis(2),
                Event::Closed {
                    link,
                    epoch,
                    to: from,
                },
            );
            self.schedule_reopen(link);
            return;
        }
        if let (Message::ResyncBegin { kind, .. }, Some((_, old, true))) =
            (&message, self.regional_failover)
        {
            assert!(
                to != old || *kind != ResyncKind::Full,
                "seed {}: the old primary {} is resynced in full after the failover to the regional copy, not by a delta",
                self.seed,
                node_name(old)
            );
        }
        // What a resync's end (on any link) or a batch's end leads the receiver to: the
        // sender's history as it is now, which a power loss of the sender may cut before the
        // receiver adopts it.
        let regional = self.regional_link(from, to);
        let history = match &message {
            Message::ResyncEnd { lsn, .. } | Message::BatchEnd { lsn }
                if regional || matches!(message, Message::ResyncEnd { .. }) =>
            {
                let history = self.nodes[from].history.get(..*lsn as usize);
                Some(
                    history
                        .unwrap_or_else(|| {
                            panic!(
                                "seed {}: {} ends a batch or catch-up at {lsn} beyond its history",
                                self.seed,
                                node_name(from)
                            )
                        })
                        .to_vec(),
                )
            }
            _ => None,
        };
        let direction = usize::from(from != self.links[link].a);
        let delay = self.rng.ms(0, 3);
        let at = (self.now + delay).max(self.links[link].last_delivery[direction]);
        self.links[link].last_delivery[direction] = at;
        let epoch = self.links[link].epoch;
        self.seq += 1;
        self.events.insert(
            (at, self.seq),
            Event::Deliver {
                link,
                epoch,
                to,
                message,
                history,
            },
        );
    }

    fn schedule_reopen(&mut self, link: usize) {
        if !self.links[link].reopen_pending {
            self.links[link].reopen_pending = true;
            self.schedule(REOPEN_DELAY, Event::Reopen { link });
        }
    }

    fn reopen(&mut self, link: usize) {
        self.links[link].reopen_pending = false;
        let (a, b) = (self.links[link].a, self.links[link].b);
        if self.links[link].up {
            return;
        }
        if self.links[link].partitioned
            || self.nodes[a].process.is_none()
            || self.nodes[b].process.is_none()
        {
            self.schedule_reopen(link);
            return;
        }
        self.links[link].up = true;
        self.links[link].epoch += 1;
        self.links[link].last_delivery = [self.now, self.now];
        self.trace(|| format!("link {link} up (epoch {})", self.links[link].epoch));
        let now = self.now;
        for (x, y) in [(a, b), (b, a)] {
            let p = Self::peer_index(x, y);
            self.rep(x).disconnected(p, "a new stream replaces it", now);
            self.rep(x).connected(p, now);
            self.run_node(x);
        }
    }

    // ---- the event loop ---------------------------------------------------------------------

    fn step(&mut self) -> bool {
        let Some((&(at, seq), _)) = self.events.iter().next() else {
            return false;
        };
        let event = self.events.remove(&(at, seq)).expect("found");
        assert!(at >= self.now, "the virtual clock never goes back");
        self.now = at;
        self.steps += 1;
        match event {
            Event::Io { node, boot, io } => {
                let alive = self.nodes[node]
                    .process
                    .as_ref()
                    .is_some_and(|p| p.boot == boot);
                if !alive {
                    return true;
                }
                self.complete_io(node, io);
                self.run_node(node);
            }
            Event::Deliver {
                link,
                epoch,
                to,
                message,
                history,
            } => {
                if self.links[link].epoch != epoch || !self.links[link].up {
                    return true;
                }
                if self.nodes[to].process.is_none() {
                    return true;
                }
                if let (Some(history), Message::BatchEnd { lsn } | Message::ResyncEnd { lsn, .. }) =
                    (history, &message)
                {
                    let ends = &mut self.nodes[to].end_histories;
                    if ends.len() >= END_HISTORIES_MAX {
                        ends.pop_front();
                    }
                    ends.push_back((*lsn, history));
                }
                let from = if self.links[link].a == to {
                    self.links[link].b
                } else {
                    self.links[link].a
                };
                let p = Self::peer_index(to, from);
                let now = self.now;
                self.rep(to).message(p, message, now);
                self.run_node(to);
            }
            Event::Closed { link, epoch, to } => {
                self.trace(|| {
                    format!(
                        "link {link} closed at {} (epoch {epoch}, now {})",
                        node_name(to),
                        self.links[link].epoch
                    )
                });
                if self.nodes[to].process.is_none() || self.links[link].epoch > epoch + 1 {
                    // A close of an older stream than the current one.
                    return true;
                }
                let from = if self.links[link].a == to {
                    self.links[link].b
                } else {
                    self.links[link].a
                };
                let p = Self::peer_index(to, from);
                let now = self.now;
                self.rep(to)
                    .disconnected(p, "the peer closed the stream", now);
                self.run_node(to);
                self.schedule_reopen(link);
            }
            Event::Reopen { link } => self.reopen(link),
            Event::Heal { link } => {
                if self.links[link].partitioned {
                    self.links[link].partitioned = false;
                    self.trace(|| format!("link {link} healed"));
                    self.schedule_reopen(link);
                }
            }
            Event::Crash { node, boot, power } => {
                if self.nodes[node]
                    .process
                    .as_ref()
                    .is_some_and(|p| p.boot == boot)
                {
                    self.stats.crashes_mid_io += 1;
                    self.crash(node, power);
                    let after = self.rng.ms(50, 1500);
                    self.nodes[node].restart_at = Some(self.now + after);
                    self.check_rpo();
                }
            }
            Event::RegionalFailover { node, boot } => {
                if self.nodes[node]
                    .process
                    .as_ref()
                    .is_some_and(|p| p.boot == boot)
                {
                    self.regional_failover(node);
                }
            }
        }
        true
    }

    /// Runs until `until`, firing timers, the applier and restarts, and checking the oracle.
    fn run_until(&mut self, until: Instant) {
        let mut guard = 0u64;
        loop {
            guard += 1;
            assert!(
                guard < 5_000_000,
                "seed {}: the simulation does not advance",
                self.seed
            );
            // Timers of every node, the applier, drains, restarts.
            let mut next = until;
            for i in 0..self.nodes.len() {
                if let Some(at) = self.nodes[i].restart_at {
                    next = next.min(at);
                }
                if let Some(process) = &self.nodes[i].process {
                    if let Some(at) = process.rep.poll_timeout() {
                        next = next.min(at.max(self.now));
                    }
                    next = next.min(process.next_apply);
                }
            }
            if let Some((&(at, _), _)) = self.events.iter().next() {
                if at <= next {
                    self.step();
                    self.after_event();
                    continue;
                }
            }
            if next >= until {
                if std::env::var_os("FERRY_TRACE_LOOP").is_some() {
                    eprintln!(
                        "run_until: jump to {:?} (next {:?}, events {})",
                        until - self.base,
                        next - self.base,
                        self.events.len()
                    );
                    for (i, n) in self.nodes.iter().enumerate() {
                        eprintln!(
                            "  node {i}: process {} restart {:?} timeout {:?} apply {:?}",
                            n.process.is_some(),
                            n.restart_at.map(|t| t - self.base),
                            n.process
                                .as_ref()
                                .and_then(|p| p.rep.poll_timeout())
                                .map(|t| t.saturating_duration_since(self.base)),
                            n.process.as_ref().map(|p| p.next_apply - self.base)
                        );
                    }
                }
                self.now = until.max(self.now);
                break;
            }
            self.now = next.max(self.now);
            for i in 0..self.nodes.len() {
                if self.nodes[i].restart_at.is_some_and(|at| at <= self.now) {
                    self.start(i);
                    continue;
                }
                let Some(process) = self.nodes[i].process.as_mut() else {
                    continue;
                };
                if process.next_apply <= self.now {
                    process.next_apply = self.now + APPLY_INTERVAL;
                    self.apply(i);
                }
                let now = self.now;
                if let Some(process) = self.nodes[i].process.as_mut() {
                    if process.rep.poll_timeout().is_some_and(|at| at <= now) {
                        process.rep.timeout(now);
                    }
                }
                self.run_node(i);
            }
            self.after_event();
        }
    }

    fn watch_blocks(&self) {
        if let Ok(blocks) = std::env::var("FERRY_WATCH_BLOCKS") {
            for b in blocks.split(',').filter_map(|b| b.parse::<u64>().ok()) {
                let mut line = format!("block {b}:");
                for i in 0..self.nodes.len() {
                    let content = self.read_volume(i, b, 1)[0];
                    line.push_str(&format!(" {}={content}", node_name(i)));
                    if let Some(p) = &self.nodes[i].process {
                        for peer in 0..self.nodes.len() - 1 {
                            let (m, covered, acked, state) = p.rep.marked(peer, b * BLOCK_BYTES);
                            line.push_str(&format!(
                                "[{}:{} c{} a{} t{}]",
                                node_name(Self::node_of_peer(i, peer)),
                                u8::from(m),
                                covered,
                                acked,
                                state.marked_through_lsn.min(9999)
                            ));
                        }
                    }
                }
                self.trace(|| line.clone());
            }
        }
    }

    fn after_event(&mut self) {
        if self.trace {
            self.watch_blocks();
        }
        for i in 0..self.nodes.len() {
            self.drain_if_asked(i);
            self.collect_op(i);
        }
        self.check_rpo();
        self.check_regional();
    }

    /// A role change asked the daemon to drain client writes: once none is in flight.
    fn drain_if_asked(&mut self, i: usize) {
        let Some(process) = self.nodes[i].process.as_ref() else {
            return;
        };
        if !process.draining {
            return;
        }
        let boot = process.boot;
        let in_flight = self.writes.iter().any(|w| {
            w.node == i
                && w.boot == boot
                && !w.completed
                && w.lsn <= self.nodes[i].disks.journal.next_lsn
        });
        if in_flight {
            return;
        }
        let process = self.nodes[i].process.as_mut().expect("checked");
        process.draining = false;
        process.rep.writes_drained();
        self.run_node(i);
    }

    fn collect_op(&mut self, i: usize) {
        let Some(process) = self.nodes[i].process.as_mut() else {
            return;
        };
        if let Some(result) = process.rep.take_op_result() {
            self.trace(|| format!("{} op result {result:?}", node_name(i)));
            if let Ok(OpOutcome::Promoted { .. }) = result {
                self.failovers += 1;
                if self.faults.regional == Some(i) {
                    self.regional_promoted(i);
                } else if self.faults.regional.is_some() && self.last_writer == self.faults.regional
                {
                    // The regional copy was the primary (its writes completed with no copy
                    // holding them, every link of it is regional) and another is promoted:
                    // what it wrote above this copy's head is the regional RPO too.
                    let boundary = self.nodes[i].history.len() as u64;
                    self.give_up_above(boundary);
                }
            }
        }
    }

    // ---- clients ----------------------------------------------------------------------------

    fn primary(&self) -> Option<usize> {
        (0..self.nodes.len()).find(|i| {
            self.nodes[*i].process.as_ref().is_some_and(|p| {
                p.rep.role() == Role::Primary && p.rep.admits_writes() && !p.failed
            })
        })
    }

    /// Issues a client write on every node that takes writes (two only in a split brain).
    fn client_write(&mut self) {
        let candidates: Vec<usize> = (0..self.nodes.len())
            .filter(|i| {
                self.nodes[*i].process.as_ref().is_some_and(|p| {
                    p.rep.role() == Role::Primary && p.rep.admits_writes() && !p.failed
                })
            })
            .collect();
        if candidates.is_empty() {
            return;
        }
        let i = candidates[self.rng.below(candidates.len() as u64) as usize];
        self.last_writer = Some(i);
        let blocks = 1 + self.rng.below(3);
        let first_block = self.rng.below(VOLUME_BLOCKS - blocks + 1);
        let fua = self.rng.chance(20);
        let zero = self.rng.chance(8);
        let id = self.next_write_id;
        let lsn = self.nodes[i].disks.journal.next_lsn;
        if zero {
            self.zero_writes.insert(id);
        }
        let record = WriteRecord {
            lsn,
            kind: if zero {
                RecordKind::Punch
            } else {
                RecordKind::Write
            },
            fua,
            offset_bytes: first_block * BLOCK_BYTES,
            len_bytes: (blocks * BLOCK_BYTES) as u32,
            data: if zero {
                Bytes::new()
            } else {
                encode_blocks(&vec![id; blocks as usize])
            },
        };
        self.journal_add(i, &record);
        self.next_write_id += 1;
        let boot = self.nodes[i].process.as_ref().expect("running").boot;
        self.writes.push(ClientWrite {
            id,
            node: i,
            boot,
            lsn,
            first_block,
            blocks,
            fua,
            completed: false,
            acked_journal: BTreeSet::new(),
            acked_durable: BTreeSet::new(),
        });
        self.nodes[i].own_writes.insert(id);
        let now = self.now;
        self.rep(i).tap(record, now);
        let at = self.journal_done_at(i);
        self.io(i, at, Io::JournalWrite { lsn });
        self.run_node(i);
    }

    fn client_flush(&mut self) {
        let Some(i) = self.primary() else {
            return;
        };
        let lsn = self.nodes[i].disks.journal.next_lsn - 1;
        let boot = self.nodes[i].process.as_ref().expect("running").boot;
        self.flushes.push(ClientFlush {
            node: i,
            boot,
            lsn,
            journal_flushed: false,
        });
        let flush = self.flushes.len() - 1;
        let after = self.latency(i, 1, 4);
        self.io(i, after, Io::ClientFlush { flush });
    }

    // ---- the oracle -------------------------------------------------------------------------

    /// RPO 0: a completed write stays in the history of every node whose acknowledgement
    /// settled it, except what a power loss may take from a journal-only acknowledgement.
    fn check_rpo(&mut self) {
        for w in &self.writes {
            if !w.completed || self.discarded.contains(&w.id) {
                continue;
            }
            for &node in &w.acked_durable {
                // A copy a resync is rewriting holds nothing promotable until its end (when
                // what it gives up is checked against the other copies).
                let consistent = match &self.nodes[node].process {
                    Some(p) => p.rep.meta().consistent,
                    None => self.nodes[node].disks.meta.consistent,
                };
                if !consistent {
                    continue;
                }
                let history = &self.nodes[node].history;
                let held = history.get(w.lsn as usize - 1) == Some(&w.id);
                assert!(
                    held,
                    "seed {}: write {} (LSN {} on {}) was durably acknowledged by {} but is not in its history at {} ms (history len {}, holds {:?})",
                    self.seed,
                    w.id,
                    w.lsn,
                    node_name(w.node),
                    node_name(node),
                    self.ms(),
                    history.len(),
                    history.get(w.lsn as usize - 1)
                );
            }
        }
    }

    /// The quiet checkpoint: everything up, healed, no writes; after settling, every copy is
    /// in sync with the primary and identical to it, and holds what the history says.
    fn converge_and_check(&mut self, settle: Duration) {
        self.trace(|| "checkpoint: healing everything".to_string());
        let drop_percent = std::mem::replace(&mut self.faults.drop_percent, 0);
        for link in 0..self.links.len() {
            self.links[link].partitioned = false;
            self.schedule_reopen(link);
        }
        for i in 0..self.nodes.len() {
            self.nodes[i].slow = 1;
            self.nodes[i].fail_persist = false;
            if self.nodes[i].process.is_none()
                || self.nodes[i].process.as_ref().is_some_and(|p| p.failed)
            {
                self.crash(i, false);
                self.start(i);
            }
        }
        if self.paused_on.is_some() {
            if let Some(r) = self.faults.regional {
                self.toggle_pause(r);
            }
        }
        let until = self.now + settle;
        self.run_until(until);
        // The operator's part, until the cluster settles: resolve split brains (one side
        // discards), and promote a copy when none is primary (a copy that meets a newer one
        // demotes again, and another is tried).
        for _ in 0..12 {
            if let Some((x, y)) = self.split_brain_pair() {
                let (victim, winner) = if self.rng.chance(50) { (x, y) } else { (y, x) };
                if !self.resolve(victim, winner) {
                    self.resolve(winner, victim);
                }
            } else if self.nodes.iter().all(|n| {
                n.process
                    .as_ref()
                    .is_none_or(|p| p.rep.role() != Role::Primary)
            }) {
                // Preferably not a copy the operator told to give up its writes to another:
                // that one is promoted instead (a winner that is a secondary is what is left
                // to do).
                let consistent = |i: &usize, resolving_ok: bool| {
                    self.nodes[*i].process.as_ref().is_some_and(|p| {
                        p.rep.meta().consistent
                            && (resolving_ok || p.rep.status().resolving_with.is_none())
                    })
                };
                let mut candidates: Vec<usize> = (0..self.nodes.len())
                    .filter(|i| consistent(i, false))
                    .collect();
                if candidates.is_empty() {
                    candidates = (0..self.nodes.len())
                        .filter(|i| consistent(i, true))
                        .collect();
                }
                if candidates.is_empty() {
                    break;
                }
                // As an operator reading `ferry status`: a plain promote first, which refuses
                // on a copy a peer is known to be ahead of; --force when every one refuses.
                let first = self.rng.below(candidates.len() as u64) as usize;
                candidates.rotate_left(first);
                let plain = candidates.iter().copied().find(|i| {
                    !self.nodes[*i]
                        .process
                        .as_ref()
                        .is_some_and(|p| p.rep.would_refuse_promote())
                });
                match plain {
                    Some(i) => self.operator_promote(i, false),
                    None => self.operator_promote(candidates[0], true),
                }
            } else if self.settled_cluster() {
                break;
            }
            let until = self.now + settle;
            self.run_until(until);
        }
        let until = self.now + settle;
        self.run_until(until);
        self.check_converged();
        self.faults.drop_percent = drop_percent;
        // Settled: every copy holds the primary's history, what a regional failover gave up
        // is given up everywhere.
        self.regional_boundary = None;
        self.regional_failover = None;
    }

    /// A pair in split brain that no operator is resolving yet (or an inconsistent copy
    /// that a primary cannot resync without an operator's word).
    fn split_brain_pair(&self) -> Option<(usize, usize)> {
        for i in 0..self.nodes.len() {
            if let Some(process) = &self.nodes[i].process {
                let status = process.rep.status();
                if !status.consistent && status.resolving_with.is_none() {
                    let primary = (0..self.nodes.len()).find(|j| {
                        *j != i
                            && self.nodes[*j]
                                .process
                                .as_ref()
                                .is_some_and(|p| p.rep.role() == Role::Primary)
                    });
                    if let Some(j) = primary {
                        return Some((i, j));
                    }
                }
            }
        }
        for i in 0..self.nodes.len() {
            let Some(process) = &self.nodes[i].process else {
                continue;
            };
            let status = process.rep.status();
            if status.resolving_with.is_some() || status.following.is_some() {
                continue;
            }
            for status in status.peers {
                if status.state == ReplicaState::SplitBrain {
                    let j = (0..self.nodes.len())
                        .find(|j| node_name(*j) == status.peer)
                        .expect("a node");
                    let other_resolving = self.nodes[j].process.as_ref().is_none_or(|p| {
                        let status = p.rep.status();
                        status.resolving_with.is_some() || status.following.is_some()
                    });
                    if !other_resolving {
                        return Some((i, j));
                    }
                }
            }
        }
        None
    }

    fn resolve(&mut self, victim: usize, winner: usize) -> bool {
        self.regional_failover = None;
        let winner_name = node_name(winner);
        self.trace(|| {
            format!(
                "operator: resolve on {} in favour of {winner_name}",
                node_name(victim)
            )
        });
        let result = self.rep(victim).begin_resolve(Some(&winner_name));
        self.trace(|| format!("  -> {result:?}"));
        let ok = result.is_ok();
        if ok {
            self.split_brains += 1;
        }
        self.run_node(victim);
        ok
    }

    fn operator_promote(&mut self, i: usize, force: bool) {
        if self
            .regional_failover
            .is_some_and(|(promoted, _, _)| promoted != i)
        {
            self.regional_failover = None;
        }
        self.trace(|| {
            format!(
                "operator: promote {}{}",
                node_name(i),
                if force { " --force" } else { "" }
            )
        });
        let now = self.now;
        let _ = self.rep(i).begin_promote(force, now);
        self.run_node(i);
    }

    /// One primary, every peer of it in sync.
    fn settled_cluster(&self) -> bool {
        let primaries: Vec<&Process> = self
            .nodes
            .iter()
            .filter_map(|n| n.process.as_ref())
            .filter(|p| p.rep.role() == Role::Primary)
            .collect();
        primaries.len() == 1
            && primaries[0]
                .rep
                .status()
                .peers
                .iter()
                .all(|p| p.state == ReplicaState::InSync)
    }

    fn check_converged(&mut self) {
        let seed = self.seed;
        let primaries: Vec<usize> = (0..self.nodes.len())
            .filter(|i| {
                self.nodes[*i]
                    .process
                    .as_ref()
                    .is_some_and(|p| p.rep.role() == Role::Primary)
            })
            .collect();
        let describe = |sim: &Sim| -> String {
            let mut out = String::new();
            for (i, node) in sim.nodes.iter().enumerate() {
                if let Some(p) = &node.process {
                    let status = p.rep.status();
                    out.push_str(&format!(
                        "\n  {}: {:?} gen {:#x} head {} consistent {} held {:?} failed {:?} resolving {:?} peers {:?}",
                        node_name(i),
                        status.role,
                        status.generation,
                        p.rep.head_lsn(),
                        status.consistent,
                        status.writes_held,
                        status.failed,
                        status.resolving_with,
                        status
                            .peers
                            .iter()
                            .map(|s| (s.peer.clone(), s.state.as_str(), s.last_error.clone(), s.dirty_bytes, s.lag_seconds))
                            .collect::<Vec<_>>()
                    ));
                } else {
                    out.push_str(&format!("\n  {}: down", node_name(i)));
                }
            }
            out
        };
        assert_eq!(
            primaries.len(),
            1,
            "seed {seed}: not exactly one primary after settling: {}",
            describe(self)
        );
        let primary = primaries[0];
        for i in 0..self.nodes.len() {
            let process = self.nodes[i].process.as_ref().expect("all up");
            let status = process.rep.status();
            assert!(
                status.consistent,
                "seed {seed}: {} is not consistent: {}",
                node_name(i),
                describe(self)
            );
            for peer in &status.peers {
                let expected = if i == primary || node_name(primary) == peer.peer {
                    ReplicaState::InSync
                } else {
                    ReplicaState::Standby
                };
                assert_eq!(
                    peer.state,
                    expected,
                    "seed {seed}: {} sees {} as {} after settling: {}",
                    node_name(i),
                    peer.peer,
                    peer.state.as_str(),
                    describe(self)
                );
            }
        }
        // Every copy holds the same blocks, and they are what the primary's history says.
        let expected = self.content_of_history(primary);
        for i in 0..self.nodes.len() {
            let actual = self.read_volume(i, 0, VOLUME_BLOCKS);
            let mut differing = Vec::new();
            for b in 0..VOLUME_BLOCKS as usize {
                if actual[b] != expected[b] {
                    differing.push((b, actual[b], expected[b]));
                }
            }
            assert!(
                differing.is_empty(),
                "seed {seed}: {} differs from the primary's history at blocks {:?} (block, has, expected){}",
                node_name(i),
                differing,
                describe(self)
            );
        }
        // Every completed write is in the final history, or an operator discarded it, or a
        // power loss took it before anything acknowledged it durably.
        let history = self.nodes[primary].history.clone();
        for w in &self.writes {
            if !w.completed || self.discarded.contains(&w.id) {
                continue;
            }
            let held = history.get(w.lsn as usize - 1) == Some(&w.id);
            let durable_somewhere = !w.acked_durable.is_empty() || w.fua;
            let lost_to_power = self.lost.contains(&w.id) && !w.fua && w.acked_durable.is_empty();
            if !held && durable_somewhere && !lost_to_power {
                panic!(
                    "seed {seed}: completed write {} (LSN {} on {}, fua {}, acked durably by {:?}) is lost{}",
                    w.id,
                    w.lsn,
                    node_name(w.node),
                    w.fua,
                    w.acked_durable,
                    describe(self)
                );
            }
        }
    }

    /// The blocks the history of node `i` describes.
    fn content_of_history(&self, i: usize) -> Vec<Content> {
        let mut blocks = vec![0; VOLUME_BLOCKS as usize];
        let by_id: BTreeMap<u64, &ClientWrite> = self.writes.iter().map(|w| (w.id, w)).collect();
        for id in &self.nodes[i].history {
            let w = by_id.get(id).unwrap_or_else(|| {
                panic!(
                    "seed {}: history of {} names an unknown write {id}",
                    self.seed,
                    node_name(i)
                )
            });
            for b in w.first_block..w.first_block + w.blocks {
                blocks[b as usize] = self.write_content(w);
            }
        }
        blocks
    }

    fn write_content(&self, w: &ClientWrite) -> Content {
        if self.zero_writes.contains(&w.id) {
            0
        } else {
            w.id
        }
    }
}

impl Sim {
    /// Applies the resyncs nodes received to the model, checking that none silently drops a
    /// completed write.
    fn collect_adoptions(&mut self, i: usize) {
        let Some(process) = self.nodes[i].process.as_mut() else {
            return;
        };
        let adoptions = process.rep.take_adoptions();
        for (peer, lsn, resolution) in adoptions {
            let from = Self::node_of_peer(i, peer);
            // The copy took the sender's history as it was when the resync's end left
            // (recorded then): the sender may have changed its own copy since (a power loss
            // that cut its journal's tail, a resolve, a rollback) while this copy finished.
            let sent = self.nodes[i]
                .end_histories
                .iter()
                .rev()
                .find(|(end, _)| *end == lsn)
                .map(|(_, history)| history.clone());
            let mut adopted: Vec<Content> =
                sent.unwrap_or_else(|| self.nodes[from].history.clone());
            adopted.truncate(lsn as usize);
            assert_eq!(
                adopted.len() as u64,
                lsn,
                "seed {}: {} resynced from {} up to {lsn}, which holds only {}",
                self.seed,
                node_name(i),
                node_name(from),
                self.nodes[from].history.len()
            );
            let before = &self.nodes[i].history;
            for w in &self.writes {
                if !w.completed || self.discarded.contains(&w.id) {
                    continue;
                }
                let held = before.get(w.lsn as usize - 1) == Some(&w.id);
                let kept = adopted.get(w.lsn as usize - 1) == Some(&w.id);
                if held && !kept && resolution {
                    // The operator chose to discard this copy's writes since the split.
                    self.discarded.insert(w.id);
                    continue;
                }
                let unprotected = (0..self.nodes.len())
                    .filter(|j| *j != w.node)
                    .all(|j| self.regional_link(w.node, j));
                if held
                    && !kept
                    && (unprotected || self.regional_boundary.is_some_and(|b| w.lsn > b))
                {
                    // The regional copy was promoted at `b`: the old lineage's writes after
                    // it are the regional RPO (docs/regional.md, "Failover"). So are the
                    // writes of a primary whose every peer is regional, once another copy is
                    // promoted: the generation rule ignores regional peers, so they are a tail
                    // to give up, never a split brain.
                    self.discarded.insert(w.id);
                    continue;
                }
                // Giving up a write another copy still holds loses nothing yet: that copy
                // meets this lineage as a split brain, or gives it up itself (checked then).
                let elsewhere = (0..self.nodes.len()).any(|j| {
                    j != i && self.nodes[j].history.get(w.lsn as usize - 1) == Some(&w.id)
                }) || (self.lost.contains(&w.id) && !w.fua);
                assert!(
                    !held || kept || elsewhere,
                    "seed {}: {} drops completed write {} (LSN {}, written on {}) by taking {}'s copy up to {lsn} at {} ms: a silent loss",
                    self.seed,
                    node_name(i),
                    w.id,
                    w.lsn,
                    node_name(w.node),
                    node_name(from),
                    self.ms()
                );
            }
            self.trace(|| {
                format!(
                    "{} resynced from {} up to {lsn}",
                    node_name(i),
                    node_name(from)
                )
            });
            // What this copy acknowledged and now gives up lives on elsewhere (checked above):
            // its acknowledgement no longer says it holds it.
            for w in &mut self.writes {
                if adopted.get(w.lsn as usize - 1) != Some(&w.id) {
                    if before.get(w.lsn as usize - 1) == Some(&w.id) {
                        self.given_up.insert((i, w.id));
                    }
                    w.acked_durable.remove(&i);
                    w.acked_journal.remove(&i);
                }
            }
            self.nodes[i].history = adopted;
            self.resyncs += 1;
        }
    }

    /// One random thing happens: a write, a flush, a fault, an operator command.
    fn random_event(&mut self) {
        let roll = self.rng.below(1000);
        let n = self.nodes.len();
        let f = self.faults.clone();
        if roll < 600 {
            self.client_write();
        } else if roll < 680 {
            self.client_flush();
        } else if roll < 680 + f.kill_percent * 3 {
            let i = self.rng.below(n as u64) as usize;
            if self.nodes[i].process.is_some() {
                self.crash(i, false);
                let after = self.rng.ms(50, 1500);
                self.nodes[i].restart_at = Some(self.now + after);
            }
        } else if roll < 680 + (f.kill_percent + f.power_percent) * 3 {
            let i = self.rng.below(n as u64) as usize;
            if self.nodes[i].process.is_some() {
                self.crash(i, true);
                let after = self.rng.ms(50, 1500);
                self.nodes[i].restart_at = Some(self.now + after);
                self.check_rpo();
            }
        } else if roll < 680 + (f.kill_percent + f.power_percent + f.partition_percent) * 3 {
            let link = self.rng.below(self.links.len() as u64) as usize;
            let cut = !self.links[link].partitioned;
            self.links[link].partitioned = cut;
            if cut && self.links[link].up {
                // A partition: what is in flight is lost and nothing more arrives; QUIC gives
                // up on the connection, and both ends notice only by silence.
                self.links[link].up = false;
                self.links[link].epoch += 1;
            }
            self.trace(|| format!("link {link} {}", if cut { "CUT" } else { "healed" }));
            if !cut {
                self.schedule_reopen(link);
            }
        } else if roll
            < 680 + (f.kill_percent + f.power_percent + f.partition_percent + f.slow_percent) * 3
        {
            let i = self.rng.below(n as u64) as usize;
            self.nodes[i].slow = if self.nodes[i].slow == 1 { 20 } else { 1 };
        } else if roll
            < 680
                + (f.kill_percent
                    + f.power_percent
                    + f.partition_percent
                    + f.slow_percent
                    + f.persist_fail_percent)
                    * 3
        {
            let i = self.rng.below(n as u64) as usize;
            self.nodes[i].fail_persist = !self.nodes[i].fail_persist;
        } else if roll < 900 + f.operator_percent {
            self.operator_event();
        } else if roll < 900 + f.operator_percent + f.corrupt_percent {
            // Nothing here corrupts; verify runs at checkpoints.
        } else if let (Some(r), true) = (f.regional, roll >= 975) {
            self.regional_event(r);
        }
    }

    /// A fault aimed at the regional copy `r`: its links cut for long enough that a catch-up
    /// follows, a crash, or the loss of the primary's site and a failover to it.
    fn regional_event(&mut self, r: usize) {
        let choice = self.rng.below(22);
        if choice >= 20 {
            return self.toggle_pause(r);
        }
        if choice < 10 {
            let links: Vec<usize> = (0..self.links.len())
                .filter(|l| self.links[*l].a == r || self.links[*l].b == r)
                .collect();
            let link = links[self.rng.below(links.len() as u64) as usize];
            if !self.links[link].partitioned {
                self.links[link].partitioned = true;
                if self.links[link].up {
                    self.links[link].up = false;
                    self.links[link].epoch += 1;
                }
                let after = self.rng.ms(200, 3000);
                self.trace(|| format!("link {link} CUT for {after:?}"));
                self.schedule(after, Event::Heal { link });
            }
        } else if choice < 19 {
            if self.nodes[r].process.is_some() {
                let power = self.rng.chance(50);
                self.crash(r, power);
                let after = self.rng.ms(50, 1500);
                self.nodes[r].restart_at = Some(self.now + after);
                self.check_rpo();
            }
        } else {
            self.regional_failover(r);
        }
    }

    /// `ferry pause VOLUME --peer r` on the primary, or `ferry resume` where it was paused.
    /// Writes go on and are tracked; the regional copy stays at a batch boundary meanwhile
    /// and catches up from the map on resume.
    fn toggle_pause(&mut self, r: usize) {
        let (i, paused) = match self.paused_on {
            Some(i) => (i, false),
            None => match self.primary() {
                Some(i) if i != r => (i, true),
                _ => return,
            },
        };
        let name = node_name(r);
        self.trace(|| {
            format!(
                "operator: {} {name} on {}",
                if paused { "pause" } else { "resume" },
                node_name(i)
            )
        });
        let result = self.rep(i).set_paused(Some(&name), paused);
        assert!(
            result.is_ok(),
            "seed {}: {}: {result:?}",
            self.seed,
            if paused { "pause" } else { "resume" }
        );
        self.paused_on = paused.then_some(i);
        self.run_node(i);
    }

    /// The primary's site is lost (its process killed or its power cut) and the operator
    /// promotes the regional copy `r` with `--force`. The old primary comes back later.
    fn regional_failover(&mut self, r: usize) {
        let Some(primary) = self.primary() else {
            return;
        };
        let ready = self.nodes[r].process.as_ref().is_some_and(|p| {
            p.rep.role() == Role::Secondary && !p.rep.op_in_progress() && p.rep.meta().consistent
        });
        if primary == r || !ready {
            return;
        }
        // The promise holds for a copy that followed the primary it replaces; one whose
        // lineage an operator forked meanwhile meets it as a split brain, rightly.
        let followed = self.nodes[r].process.as_ref().is_some_and(|p| {
            p.rep.status().following.as_deref() == Some(node_name(primary).as_str())
        });
        let power = self.rng.chance(50);
        self.trace(|| {
            format!(
                "the site of {} is lost; the regional copy {} is promoted",
                node_name(primary),
                node_name(r)
            )
        });
        self.crash(primary, power);
        let after = self.rng.ms(300, 2500);
        self.nodes[primary].restart_at = Some(self.now + after);
        self.check_rpo();
        let now = self.now;
        let result = self.rep(r).begin_promote(true, now);
        self.trace(|| format!("  -> {result:?}"));
        // A split brain already there (or being resolved) is the operator's, not the
        // failover's.
        let split = self.split_brain_pair().is_some()
            || self
                .nodes
                .iter()
                .filter_map(|n| n.process.as_ref())
                .any(|p| {
                    let status = p.rep.status();
                    status.resolving_with.is_some()
                        || status
                            .peers
                            .iter()
                            .any(|s| s.state == ReplicaState::SplitBrain)
                });
        if result.is_ok() && !split && followed {
            self.regional_failover = Some((r, primary, false));
        }
        self.run_node(r);
    }

    /// The regional copy `r` became primary: it must be at its last batch boundary, and the
    /// old lineage's writes above it are the regional RPO.
    fn regional_promoted(&mut self, r: usize) {
        self.stats.failovers += 1;
        let boundary = self.nodes[r].history.len() as u64;
        let head = self.rep(r).head_lsn();
        assert_eq!(
            head,
            boundary,
            "seed {}: the regional copy {} is promoted at {head}, and its last batch boundary is {boundary}",
            self.seed,
            node_name(r)
        );
        self.check_regional_copy(r, "promoted");
        self.trace(|| {
            format!(
                "the regional copy {} is primary at {boundary}",
                node_name(r)
            )
        });
        self.give_up_above(boundary);
        if let Some((promoted, old, false)) = self.regional_failover {
            if promoted == r {
                self.regional_failover = Some((promoted, old, true));
            }
        }
    }

    /// A promotion at `boundary` over a regional link: the completed writes above it are the
    /// regional RPO. Until the next checkpoint the lowest such LSN counts: an old primary that
    /// comes back unfenced (no metro peer) may complete writes above it before it learns of
    /// the promotion, and copies may be demoted and promoted again meanwhile.
    fn give_up_above(&mut self, boundary: u64) {
        self.regional_boundary = Some(self.regional_boundary.map_or(boundary, |b| b.min(boundary)));
        for w in &self.writes {
            if w.completed && w.lsn > boundary {
                self.discarded.insert(w.id);
            }
        }
    }

    /// The blocks of the regional copy `r` equal the volume after the writes of its history
    /// (a prefix of its primary's history, checked as it moved: a batch boundary).
    fn check_regional_copy(&mut self, r: usize, when: &str) {
        let Some(expected) = self.regional_expected_content(r) else {
            return;
        };
        self.stats.checks += 1;
        let actual = self.read_volume(r, 0, VOLUME_BLOCKS);
        let differing: Vec<(usize, Content, Content)> = (0..VOLUME_BLOCKS as usize)
            .filter(|b| actual[*b] != expected[*b])
            .map(|b| (b, actual[b], expected[b]))
            .collect();
        assert!(
            differing.is_empty(),
            "seed {}: the regional copy {} ({when}, at LSN {}) is not the volume after a prefix of the writes: blocks {differing:?} (block, has, expected) at {} ms",
            self.seed,
            node_name(r),
            self.nodes[r].history.len(),
            self.ms()
        );
    }

    /// What the regional copy's blocks must be (None while its history names a record the
    /// model does not know), computed again only when its history changed.
    fn regional_expected_content(&mut self, r: usize) -> Option<Vec<Content>> {
        if let Some((history, content)) = &self.regional_expected {
            if *history == self.nodes[r].history {
                return content.clone();
            }
        }
        let history = self.nodes[r].history.clone();
        let mut blocks = vec![0; VOLUME_BLOCKS as usize];
        let mut known = true;
        for id in &history {
            let Some(w) = (*id as usize)
                .checked_sub(1)
                .and_then(|k| self.writes.get(k))
            else {
                known = false;
                break;
            };
            assert_eq!(w.id, *id, "writes are kept in id order");
            for b in w.first_block..w.first_block + w.blocks {
                blocks[b as usize] = self.write_content(w);
            }
        }
        let content = known.then_some(blocks);
        self.regional_expected = Some((history, content.clone()));
        content
    }

    /// The regional promise, after every event: a regional copy that is a consistent
    /// secondary holds the volume after some prefix of its primary's writes. After a
    /// failover to it, no split brain follows while no other operator command intervened.
    fn check_regional(&mut self) {
        let Some(r) = self.faults.regional else {
            return;
        };
        let checked = self.nodes[r]
            .process
            .as_ref()
            .is_some_and(|p| p.rep.role() == Role::Secondary && p.rep.meta().consistent)
            && self.nodes[r].disks.meta.consistent;
        if checked {
            self.check_regional_copy(r, "a consistent secondary");
        }
        if let Some((promoted, old, true)) = self.regional_failover {
            for (x, y) in [(promoted, old), (old, promoted)] {
                let Some(process) = &self.nodes[x].process else {
                    continue;
                };
                let split = process
                    .rep
                    .status()
                    .peers
                    .iter()
                    .any(|s| s.peer == node_name(y) && s.state == ReplicaState::SplitBrain);
                assert!(
                    !split,
                    "seed {}: {} sees a split brain with {} after the failover to the regional copy at {} ms",
                    self.seed,
                    node_name(x),
                    node_name(y),
                    self.ms()
                );
            }
        }
    }

    fn operator_event(&mut self) {
        let n = self.nodes.len();
        let up: Vec<usize> = (0..n)
            .filter(|i| self.nodes[*i].process.is_some())
            .collect();
        if up.is_empty() {
            return;
        }
        let primary_alive = (0..n).any(|i| {
            self.nodes[i]
                .process
                .as_ref()
                .is_some_and(|p| p.rep.role() == Role::Primary)
        });
        let choice = self.rng.below(10);
        if !primary_alive || choice < 2 {
            // Failover: promote a secondary (forced, as after losing the primary site).
            let candidates: Vec<usize> = up
                .iter()
                .copied()
                .filter(|i| {
                    let p = self.nodes[*i].process.as_ref().expect("up");
                    p.rep.role() == Role::Secondary && !p.rep.op_in_progress()
                })
                .collect();
            if let Some(&i) =
                candidates.get(self.rng.below(candidates.len().max(1) as u64) as usize)
            {
                let force = !primary_alive || self.rng.chance(50);
                self.operator_promote(i, force);
            }
        } else if choice < 5 {
            // A planned switchover starts with a demote.
            if let Some(i) = up.iter().copied().find(|i| {
                self.nodes[*i]
                    .process
                    .as_ref()
                    .is_some_and(|p| p.rep.role() == Role::Primary && !p.rep.op_in_progress())
            }) {
                self.regional_failover = None;
                self.trace(|| format!("operator: demote {}", node_name(i)));
                let _ = self.rep(i).begin_demote();
                self.run_node(i);
            }
        } else if choice < 8 {
            if let Some((x, y)) = self.split_brain_pair() {
                let (victim, winner) = if self.rng.chance(50) { (x, y) } else { (y, x) };
                if self.nodes[victim].process.is_some() && self.nodes[winner].process.is_some() {
                    let _ = self.resolve(victim, winner);
                }
            }
        } else {
            // An operator promote of a fenced primary.
            if let Some(i) = up.iter().copied().find(|i| {
                self.nodes[*i].process.as_ref().is_some_and(|p| {
                    p.rep.role() == Role::Primary
                        && p.rep
                            .writes_held()
                            .is_some_and(|why| why.starts_with("fenced"))
                })
            }) {
                self.operator_promote(i, false);
            }
        }
    }
}

fn faults_for(seed: u64) -> Faults {
    let mut rng = Rng(seed ^ 0xfa17);
    let mut faults = Faults {
        nodes: if rng.chance(50) { 2 } else { 3 },
        kill_percent: rng.below(6),
        power_percent: rng.below(6),
        partition_percent: rng.below(8),
        drop_percent: rng.below(5),
        slow_percent: rng.below(3),
        persist_fail_percent: if rng.chance(20) { 1 } else { 0 },
        operator_percent: rng.below(30),
        corrupt_percent: 0,
        suspend: rng.chance(20),
        regional: None,
        regional_interval: Duration::ZERO,
        regional_crash_percent: 0,
        regional_failover_permille: 0,
    };
    if seed >= REGIONAL_SEEDS {
        // The last node is the regional copy: of a metro pair (three nodes), or of a lone
        // primary (two). Drawn apart, so the metro draws above stay those of the metro seeds.
        let mut rng = Rng(seed ^ 0x7e61_0a1c);
        faults.regional = Some(faults.nodes - 1);
        faults.regional_interval = rng.ms(30, 400);
        faults.regional_crash_percent = rng.below(8);
        faults.regional_failover_permille = rng.below(12);
    }
    faults
}

/// One seeded run: phases of random writes and faults, each ending at a quiet checkpoint.
fn simulate(seed: u64) -> Sim {
    let faults = faults_for(seed);
    let mut sim = Sim::new(seed, faults);
    // The initial full sync.
    let until = sim.now + Duration::from_secs(2);
    sim.run_until(until);
    let phases = 3;
    for _ in 0..phases {
        let phase_end = sim.now + Duration::from_millis(1500 + sim.rng.below(2500));
        while sim.now < phase_end {
            sim.random_event();
            for i in 0..sim.nodes.len() {
                sim.collect_adoptions(i);
            }
            let gap = sim.rng.ms(0, 12);
            let until = sim.now + gap;
            sim.run_until(until);
            for i in 0..sim.nodes.len() {
                sim.collect_adoptions(i);
            }
        }
        sim.check_rpo();
        sim.converge_and_check(Duration::from_secs(4));
        for i in 0..sim.nodes.len() {
            sim.collect_adoptions(i);
        }
    }
    sim
}

/// The seeds of one test: the metro seeds count from 0, the regional ones from
/// [`REGIONAL_SEEDS`]; `FERRY_SEED` replays one (in the test of its kind).
fn seeds_to_run(regional: bool) -> Vec<u64> {
    if let Some(seed) = ferry_testkit::seed::replay_seed() {
        return if (seed >= REGIONAL_SEEDS) == regional {
            vec![seed]
        } else {
            Vec::new()
        };
    }
    let count = if std::env::var_os("FERRY_LONG").is_some() {
        if regional {
            5_000
        } else {
            20_000
        }
    } else {
        std::env::var("FERRY_SIM_RUNS")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(if regional { 100 } else { 300 })
    };
    let first = if regional { REGIONAL_SEEDS } else { 0 };
    (first..first + count).collect()
}

#[test]
fn metro_simulation_keeps_every_promise() {
    let mut totals = (0u64, 0u64, 0u64, 0u64, 0u64);
    for seed in seeds_to_run(false) {
        eprintln!("metro simulation seed {seed} (replay: FERRY_SEED={seed})");
        let sim = simulate(seed);
        totals.0 += sim.steps;
        totals.1 += sim.writes.iter().filter(|w| w.completed).count() as u64;
        totals.2 += sim.failovers;
        totals.3 += sim.split_brains;
        totals.4 += sim.resyncs;
    }
    eprintln!(
        "metro simulation: {} steps, {} completed writes, {} failovers, {} split brains resolved, {} resyncs",
        totals.0, totals.1, totals.2, totals.3, totals.4
    );
}

#[test]
fn regional_simulation_keeps_every_promise() {
    let seeds = seeds_to_run(true);
    let runs = seeds.len();
    let mut totals = RegionalStats::default();
    let mut steps = 0;
    for seed in seeds {
        eprintln!("regional simulation seed {seed} (replay: FERRY_SEED={seed})");
        let sim = simulate(seed);
        steps += sim.steps;
        let s = sim.stats;
        totals.batches_applied += s.batches_applied;
        totals.catchups_applied += s.catchups_applied;
        totals.catchups_abandoned += s.catchups_abandoned;
        totals.reapplied_at_start += s.reapplied_at_start;
        totals.crashes_mid_io += s.crashes_mid_io;
        totals.failovers += s.failovers;
        totals.checks += s.checks;
    }
    eprintln!("regional simulation: {steps} steps, {totals:?}");
    if runs >= 50 {
        // The schedules reach what they are meant to reach.
        assert!(totals.batches_applied > 0, "{totals:?}");
        assert!(totals.catchups_applied > 0, "{totals:?}");
        assert!(totals.reapplied_at_start > 0, "{totals:?}");
        assert!(totals.crashes_mid_io > 0, "{totals:?}");
        assert!(totals.failovers > 0, "{totals:?}");
    }
}

/// Seeds that once found a bug, kept so that it stays fixed (each runs its whole schedule):
///
/// - 0: a resolve was taken back by a later promotion of the same copy, whose new writes the
///   stale resolution then discarded; two primaries resynced the same secondary at once.
/// - 5: a resync sent a block again after it was rewritten, and the two device writes raced.
/// - 24: marks were cleared on the strength of acknowledgements of records the copy had since
///   replaced (its journal was being emptied for a resync).
/// - 62: a copy promoted after a resync published completion LSNs from its previous lineage.
/// - 67: completion counted an acknowledgement from an earlier link of a peer that had since
///   taken another lineage.
/// - 161: a partition silently dropped messages from a stream that stayed up.
/// - 321: a promotion did not wait for a resync whose end had arrived, and its journal moved
///   under the new primary.
/// - 332: a copy that crashed in the middle of a resync had not recorded which blocks it had
///   received (write-ahead marking).
/// - 566 (model fix): the settling operator promoted, at random and with --force, a copy
///   another was ahead of, round after round; it now tries a plain promote first, which
///   refuses on such a copy.
/// - 632: a second resync into a copy started while the end of the first was still being
///   made durable.
/// - 1173: a primary told to demote while another command ran never demoted.
/// - 1794: a primary demoted in favour of a copy a resync had left inconsistent.
/// - 2155: progress sent again right after a resync's end let a secondary clear its marks of
///   resynced blocks that a third copy lacked.
/// - 4301: a primary started a generation while a handshake was under way and was told to
///   demote by a decision made without it (now decided again); the oracle counted the
///   acknowledgement of a peer that had since followed another promoted copy (model fix).
/// - 6764: a copy that failed (a dirty map store) went on sending a resync's end; the peer
///   took a generation the failed copy forgot at its restart, and a write it completed
///   after the restart was dropped as a rollback instead of meeting a split brain.
/// - 4294969656 (regional): a copy resynced to LSN 0 of another lineage (an empty copy promoted) let
///   its marks for a third copy go as if that copy had confirmed LSN 0: nothing had, and the
///   third copy's later resync into it missed a block.
/// - 4294969007 (regional, model fix): a regional copy that had been primary, killed while a
///   copy promoted meanwhile resynced it, gave up its tail at the restart; the model called
///   that a loss instead of the regional RPO it is at the resync's end.
/// - 4294970066 (regional): a resync from one peer restarted the journal while a batch from
///   another (the primary this copy followed before) was still being applied.
#[test]
fn regression_seeds() {
    for seed in [
        0, 5, 24, 62, 67, 161, 321, 332, 566, 632, 1004, 1173, 1794, 2155, 4301, 6764,
    ] {
        eprintln!("metro simulation regression seed {seed}");
        simulate(seed);
    }
    for seed in [
        4_294_967_436,
        4_294_967_522,
        4_294_968_942,
        4_294_969_007,
        4_294_969_656,
        4_294_970_066,
        4_294_972_243,
    ] {
        eprintln!("regional simulation regression seed {seed}");
        simulate(seed);
    }
}
