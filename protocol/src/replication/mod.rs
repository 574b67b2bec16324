//! Metro replication of one volume on one node, with no I/O: the [`Replicator`].
//!
//! One `Replicator` per (node, volume) owns everything that decides the promises of SPEC §2
//! across all of the volume's metro peers: what each peer may lack and how that is known
//! durably (the *ledger*), when a client write may complete, how far the journal may be
//! applied, the generations, who resyncs whom and what, what a secondary does with what it
//! receives, role changes, fencing, split-brain resolution and online verify. The daemon feeds
//! it inputs (journal records as they get their LSN, messages, I/O completions, the clock,
//! operator commands) and executes the [`Action`]s it asks for (send a message, persist the
//! metadata or a dirty map, append to the journal, write the device, read for a resync). The
//! same code runs under the simulator in `sim.rs`, which fakes disks, network and clock and
//! checks the promises after every step.
//!
//! # The ledger
//!
//! For every peer P, each copy keeps a dirty map M[P] (one bit per 4 KiB block) and two LSNs:
//!
//! - `covered`: every record this copy holds with an LSN at or below it is either *confirmed*
//!   (P holds it durably, see below) or marked in M[P] in memory;
//! - `covered_persisted`: the same with the marks durable in M[P]'s file.
//!
//! A record is confirmed for P by P's durable acknowledgement when this copy ships to P, by
//! the primary's `Progress` message when P is this copy's primary (P's own durability) or a
//! fellow secondary (P's acknowledgements to the primary). While P confirms, records wait for
//! it; when P stops confirming (lost, being resynced, split) every record past the last
//! confirmation is marked and the marks are persisted. The journal may release a record only
//! when every peer has it covered durably (the apply limit is the minimum of
//! `covered_persisted`), and crash recovery marks every replayed record in every map, so
//! *nothing a peer may lack, or hold differently, is ever only in memory*.
//!
//! This holds on every copy, primary or secondary, and for records a copy received as well as
//! records it wrote. So when two copies meet after any failure — a power loss that took a
//! primary's journal tail while its secondary kept it, a failover, a third copy that was away
//! — the blocks where they may differ are within M_a[b] ∪ M_b[a]: the copy that is behind
//! sends its map to the one that is ahead (`DirtyRanges`), which resyncs the union. A resync
//! clears M[P] on both sides when P durably holds its end; marks are also cleared when P
//! confirms every marked record (`marked_through_lsn`), unless they are resync-only marks
//! (ranges a peer sent, a full sync, a verify repair).
//!
//! # Completion (primary)
//!
//! A client write (or FLUSH) of LSN l completes when, for every peer P, l is settled: acked
//! into P's journal (durably, for FUA and FLUSH), or covered by marks — unless
//! `on_disconnect = "suspend"` holds while P is unreachable — *and* in a generation P cannot
//! hold. The last condition is the generation rule: a write completed without P must be in a
//! generation P has never been told about, so that a copy promoted meanwhile meets it as a
//! split brain, never as a tail to discard. When P stops confirming while it may know the
//! current generation, the primary starts a new generation (after making its journal durable)
//! at the first record some peer has not settled, persists it, and only then lets marks settle
//! records for P. Peers still receiving records learn it (`NewGeneration`); a copy that was
//! resynced adopts the sender's whole lineage at the resync's end.
//!
//! Marks settle a record as soon as they are in memory (`covered`), not only once they are in
//! M[P]'s file: the journal is the activity log. A record above `covered_persisted` is never
//! released from the journal (the apply limit), so until its marks are durable the record
//! itself is, as far as the write was promised: a completed write is in the journal (a FUA
//! write or a FLUSHed one durably), and crash recovery marks every record it replays in every
//! map, and stores those maps, before the ring is emptied. So a write the peer lacks is, after
//! any crash, either still in the journal (marked again at recovery) or durably marked; and
//! a write a power loss took from the journal was neither FUA nor FLUSHed, so it may be lost
//! on this copy, and the peer, which was not confirming, cannot be the only one to hold it
//! unnoticed (its own map of this copy marks what it received and this copy did not confirm
//! durable). This keeps the map's fdatasyncs off the client's path when a peer is lost
//! (DRBD's activity log buys the same with a coarse on-disk extent record; the journal
//! already is that record here). The map is still stored as soon as it changes, off the
//! client's path, which is what lets the journal release the records.
//!
//! # Who ships
//!
//! Only a primary ships, and only to a secondary: the handshake's decision and both roles go
//! through [`plan::plan`], which both sides compute identically. Two secondaries keep their
//! link up (so a promotion is seen at once) but exchange nothing else (`standby`). A primary
//! that meets a newer generation demotes itself; a copy that must give up records (a
//! secondary beyond its primary after the primary's power loss, the loser of a resolved split
//! brain) reports its changed blocks and receives them back from the primary.
//!
//! # Roles
//!
//! A restarted primary whose peers have protected it is *fenced*: it holds writes until each
//! of them has answered a handshake that keeps it primary, or an operator promotes it again.
//! A demotion closes admission, waits (in the daemon) for the writes in flight, then stores
//! the role. A promotion stops receiving, waits for what it received to be on disk, makes its
//! journal durable, starts a generation and stores the role. Every change that safety rests
//! on is persisted before it takes effect, and a failed persist fails the volume.
//!
//! # Lock order (in the daemon)
//!
//! The journal calls [`Replicator::tap`] under its index lock, so the order is: journal index
//! lock, then the replicator's lock. Nothing here calls back into the journal; the daemon runs
//! every [`Action`] after releasing the replicator's lock.

#[cfg(test)]
mod fuzz;
mod handshake;
pub mod meta;
mod ops;
pub mod plan;
mod primary;
pub mod ranges;
pub mod regional;
mod secondary;
pub mod session;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod testing;
mod verify;

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::bitmap::{BitmapChanges, BlockBitmap, BLOCK_BYTES};
use crate::generation::{GenerationEntry, GenerationInfo, Role};
use crate::repl::{Hello, Message, PeerProgress, WriteRecord, VERIFY_DIGEST_BYTES};

pub use meta::{Meta, PeerMeta};
pub use plan::{Plan, Side};
pub use ranges::RangeSet;
pub use regional::RegionalConfig;
pub use session::{Incoming, Mode, Session, SessionConfig, SessionError, LSN_MAX};

/// Bytes of records, and separately of resync data, in flight to one peer.
pub const WINDOW_BYTES: u64 = 64 << 20;
/// A primary stores the map of a peer that is not confirming its records as they come (a
/// regional peer, or a metro peer that is away, resyncing or idle) at most this often. Nothing but
/// the journal's release waits for those marks: a record stays in the journal until its
/// marks are stored, and recovery marks every record it replays, so after a crash a write
/// the peer lacks is in the journal or durably marked. A store per pass costs a state slot,
/// a page and two fdatasyncs per client write at QD1, on the same disk as the journal
/// (measured: regional QD1 write p50 2.0x standalone; degraded metro 1.3-1.9x).
pub const MAP_PERSIST_INTERVAL: Duration = Duration::from_millis(200);
/// Resync bytes in flight to a peer (sent, not yet written there) before its write rate is
/// measured.
pub const RESYNC_WINDOW_START_BYTES: u64 = 16 << 20;
/// Resync bytes in flight at least, whatever the measured rate.
pub const RESYNC_WINDOW_MIN_BYTES: u64 = 4 << 20;
/// Once the peer's write rate is measured, the resync keeps this much time of it in flight
/// (up to [`WINDOW_BYTES`]): enough to cover a long round trip and the peer's writes, and
/// no more, as DRBD's resync controller keeps a fill target rather than a fixed buffer.
/// Bytes sent beyond it only wait in queues: at 100 Mbit/s a full window is 5 s of them,
/// during which a block written again must be sent again, and the resync looks done that
/// long before the peer has it.
pub const RESYNC_QUEUE_TARGET: Duration = Duration::from_millis(500);
/// How long one sample of the peer's write rate lasts.
pub const RESYNC_RATE_SAMPLE: Duration = Duration::from_millis(250);
/// Largest resync chunk read and sent at once.
pub const RESYNC_CHUNK_BYTES: u64 = 1 << 20;
/// Resync reads in flight at once per peer.
pub const RESYNC_READS_MAX: usize = 8;
/// Longest zero range one resync message carries.
pub const ZERO_RUN_BYTES_MAX: u64 = 1 << 30;
/// A resync holds new writes for its hand-over once at most this much is left to send.
pub const HANDOVER_HOLD_BYTES: u64 = 2 << 20;
/// Every copy with a metro peer makes its journal durable at least this often while records
/// arrive, so the other copies' journals keep moving; the primary reports its progress as
/// often. (A regional primary makes it durable through each batch's and catch-up's end
/// instead, `durable_through`.)
pub const DURABLE_INTERVAL: Duration = Duration::from_millis(20);
/// Records a secondary has asked the journal to append and not seen complete, at most.
pub const APPENDS_IN_FLIGHT_MAX: usize = 4096;
/// Resync bytes a secondary has asked the device to write and not seen complete, at most.
pub const DEVICE_BYTES_IN_FLIGHT_MAX: u64 = 64 << 20;
/// Bytes one verify request covers, and the block of its first pass.
pub const VERIFY_REQUEST_BYTES: u64 = 64 << 20;
/// Block of a verify's first pass (a differing one is checked again by 4 KiB blocks).
pub const VERIFY_COARSE_BLOCK_BYTES: u64 = 1 << 20;
/// Times a range written during its verify is tried again before it is reported as busy.
pub const VERIFY_RETRIES_MAX: u32 = 8;
/// Verify requests of peers this copy holds at once (waiting or being digested); a verifier
/// keeps at most a few in flight, a peer that sends more is closed.
pub const VERIFY_SERVING_MAX: usize = 16;
/// Verify reads per second when the replica sets no `resync_max_rate`.
pub const VERIFY_RATE_DEFAULT_BYTES_PER_S: u64 = 256 << 20;

const _: () = assert!(RESYNC_CHUNK_BYTES.is_multiple_of(BLOCK_BYTES));
const _: () = assert!(VERIFY_COARSE_BLOCK_BYTES.is_multiple_of(BLOCK_BYTES));
const _: () = assert!(VERIFY_REQUEST_BYTES.is_multiple_of(VERIFY_COARSE_BLOCK_BYTES));
const _: () = assert!(
    VERIFY_REQUEST_BYTES / VERIFY_COARSE_BLOCK_BYTES <= crate::repl::VERIFY_DIGESTS_MAX as u64
);
const _: () =
    assert!(VERIFY_COARSE_BLOCK_BYTES / BLOCK_BYTES <= crate::repl::VERIFY_DIGESTS_MAX as u64);
const _: () = assert!(RESYNC_CHUNK_BYTES <= crate::repl::DATA_BYTES_MAX as u64);

/// What a metro primary does when a peer that protects it is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDisconnect {
    /// Keep serving; track changed blocks.
    Degrade,
    /// Hold client writes until the peer returns or an operator acts.
    Suspend,
}

/// A peer of the volume: metro, or regional when `regional` is set.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    pub name: String,
    /// Metro only (a regional peer never holds writes).
    pub on_disconnect: OnDisconnect,
    pub peer_timeout: Duration,
    pub resync_max_rate_bytes_per_s: Option<u64>,
    pub regional: Option<RegionalConfig>,
}

/// Fixed settings of a replicator.
#[derive(Debug, Clone)]
pub struct ReplicatorConfig {
    pub node: String,
    pub volume: String,
    pub size_bytes: u64,
    pub peers: Vec<PeerConfig>,
    /// Bytes of records (and of resync data) in flight per peer.
    pub window_bytes: u64,
}

/// Replica states, named as in SPEC §5.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplicaState {
    /// No handshake on the current link, or none yet.
    Connecting,
    /// Initial full sync of a never-synced copy.
    Syncing,
    /// Delta resync.
    Resyncing,
    /// Every completed write is at the peer.
    InSync,
    /// Regional only: behind by more than the interval.
    Lagging,
    /// Peer unreachable; changes are tracked for a delta resync.
    Degraded,
    /// Peer unreachable and `on_disconnect = "suspend"`: client writes are held.
    Suspended,
    /// Shipping stopped by the operator.
    Paused,
    /// Both copies wrote since they split; an operator must resolve.
    SplitBrain,
    /// Connected, neither replicates the other (two secondaries of one primary).
    Standby,
}

impl ReplicaState {
    /// The name used by `ferry status` and the `state` metric label.
    pub const fn as_str(self) -> &'static str {
        match self {
            ReplicaState::Connecting => "connecting",
            ReplicaState::Syncing => "syncing",
            ReplicaState::Resyncing => "resyncing",
            ReplicaState::InSync => "in-sync",
            ReplicaState::Lagging => "lagging",
            ReplicaState::Degraded => "degraded",
            ReplicaState::Suspended => "suspended",
            ReplicaState::Paused => "paused",
            ReplicaState::SplitBrain => "split-brain",
            ReplicaState::Standby => "standby",
        }
    }

    /// Every state, for metrics that export one gauge per state.
    pub const ALL: [ReplicaState; 10] = [
        ReplicaState::Connecting,
        ReplicaState::Syncing,
        ReplicaState::Resyncing,
        ReplicaState::InSync,
        ReplicaState::Lagging,
        ReplicaState::Degraded,
        ReplicaState::Suspended,
        ReplicaState::Paused,
        ReplicaState::SplitBrain,
        ReplicaState::Standby,
    ];
}

/// What a dirty map's file keeps besides its bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MapState {
    /// The highest LSN of a record marked in the map: once the peer confirms it, the marks
    /// are stale and the map may be cleared. `u64::MAX` while that is unknown.
    pub marked_through_lsn: u64,
    /// Some marks are not of records (a peer's ranges, a full sync, a verify repair, blocks
    /// received by a resync): only a completed resync clears the map.
    pub resync_only: bool,
}

impl MapState {
    /// Folds in the marks of records up to `lsn`.
    pub fn marked(&mut self, lsn: u64) {
        self.marked_through_lsn = self.marked_through_lsn.max(lsn);
    }
}

/// Recovery replayed these record ranges, the newest at `head_lsn`: mark them in a peer's map
/// (before the journal forgets them, the daemon persists the map).
pub fn mark_replayed(
    bitmap: &mut BlockBitmap,
    state: &mut MapState,
    ranges: &[(u64, u64)],
    head_lsn: u64,
) {
    for &(offset, len) in ranges {
        bitmap.mark(offset, len);
    }
    if !ranges.is_empty() {
        state.marked(head_lsn);
    }
}

/// One peer's dirty map as loaded at start.
#[derive(Debug, Clone)]
pub struct StartPeer {
    pub bitmap: BlockBitmap,
    pub state: MapState,
}

/// What the replicator starts from.
#[derive(Debug, Clone)]
pub struct Startup {
    /// The stored metadata (its lineage's head is ignored).
    pub meta: Meta,
    /// The journal's head after recovery: every record up to it is durable.
    pub head_lsn: u64,
    /// One per configured peer, in config order.
    pub peers: Vec<StartPeer>,
}

/// Work the daemon does for the replicator. Each completes through the matching input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write `message` to the peer's stream, in order.
    Transmit { peer: usize, message: Message },
    /// Close the peer's stream; open or accept a new one later and call `connected`.
    CloseStream { peer: usize, reason: String },
    /// Store `meta` atomically and durably; then [`Replicator::meta_persisted`].
    PersistMeta { meta: Meta },
    /// Write these bitmap pages and the state to the peer's map file, then fdatasync; then
    /// [`Replicator::map_persisted`]. One at a time per peer.
    PersistMap {
        peer: usize,
        changes: BitmapChanges,
        state: MapState,
    },
    /// Secondary: journal this record under its LSN (in order); then
    /// [`Replicator::appended`]. A FUA record completes only once durable.
    Append { record: WriteRecord },
    /// Make the journal durable; then [`Replicator::journal_flushed`].
    JournalFlush,
    /// Apply the whole journal to the device and restart it empty at `next_lsn`; then
    /// [`Replicator::journal_reset`]. Issued only with no append in flight.
    JournalReset { next_lsn: u64 },
    /// Secondary resync: write `data` at `offset_bytes` of the device; then
    /// [`Replicator::device_done`].
    DeviceWrite {
        id: u64,
        offset_bytes: u64,
        data: Bytes,
    },
    /// Secondary resync: make the range read as zeros; then [`Replicator::device_done`].
    DeviceZero {
        id: u64,
        offset_bytes: u64,
        len_bytes: u64,
    },
    /// fdatasync of the device; then [`Replicator::device_synced`].
    DeviceSync,
    /// Regional secondary: store this complete batch (it ends at `lsn`) in the stage file,
    /// durably, replacing what the file held; then [`Replicator::batch_staged`].
    StageBatch {
        peer: usize,
        lsn: u64,
        records: Vec<WriteRecord>,
    },
    /// Regional secondary: with reads of the volume held, write the stored batch to the
    /// device, fdatasync it and restart the (empty) journal at `lsn + 1`; then
    /// [`Replicator::batch_applied`].
    ApplyBatch {
        peer: usize,
        lsn: u64,
        records: Vec<WriteRecord>,
    },
    /// Regional secondary, staged catch-up `catchup`: append this range's contents (`data`,
    /// or zeros when `None`) to the catch-up file, in the order issued, starting a fresh file
    /// for a new `catchup`; the device is not touched. Then [`Replicator::device_done`] (once
    /// the range is in the file's order; it is durable only at the commit).
    CatchUpWrite {
        id: u64,
        catchup: u64,
        offset_bytes: u64,
        len_bytes: u64,
        data: Option<Bytes>,
    },
    /// Regional secondary: make catch-up `catchup` durable and mark it complete in its file
    /// as leading to `lsn`; then [`Replicator::catchup_committed`].
    CatchUpCommit { catchup: u64, lsn: u64 },
    /// Regional secondary: with reads of the volume held, write the committed catch-up to the
    /// device, fdatasync it and restart the (empty) journal at `lsn + 1`; then
    /// [`Replicator::catchup_applied`].
    CatchUpApply { lsn: u64 },
    /// Regional secondary: the catch-up file's contents are no longer needed (applied and
    /// recorded, or abandoned); free its space. Nothing reports back.
    CatchUpDrop,
    /// Read the volume (the newest data, journal included); then [`Replicator::read_done`].
    Read {
        id: u64,
        offset_bytes: u64,
        len_bytes: u64,
    },
    /// Read the volume and digest it by `block_bytes` (SHA-256, first 16 bytes); then
    /// [`Replicator::digest_done`].
    Digest {
        id: u64,
        offset_bytes: u64,
        len_bytes: u64,
        block_bytes: u64,
    },
    /// The volume must stop taking writes: something safety rests on could not be stored.
    Fail { reason: String },
    /// Admission is closed for a role change: wait until no client write is in flight, then
    /// call [`Replicator::writes_drained`].
    Drain,
}

/// The operator commands that change roles, and what they return.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoleOp {
    Promote { force: bool },
    Demote,
    Resolve { peer: Option<String> },
}

/// Why an operator command was refused. Each has a stable code (`ferry` exit 1).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    #[error("volume {volume} is not consistent here (a resync into it has not finished); promoting it would serve a mix of old and new blocks")]
    NotConsistent { volume: String },
    #[error("volume {volume} has never been synced here: there is nothing to promote")]
    NeverSynced { volume: String },
    #[error("peer {peer} is primary for {volume} and reachable; demote it first (ferry demote {volume} on {peer}), or use --force if it is gone")]
    PeerIsPrimary { peer: String, volume: String },
    #[error("peer {peer} holds writes of {volume} this copy lacks (it was promoted after this copy's last write): promote {peer} instead, or wait until this copy is resynced from it; --force promotes this copy anyway, and {peer}'s writes then meet it as a split brain")]
    PeerIsNewer { peer: String, volume: String },
    #[error("another role change of {volume} is in progress; wait for it")]
    Busy { volume: String },
    #[error("volume {volume} is not in split brain with any peer; there is nothing to resolve")]
    NoSplitBrain { volume: String },
    #[error("volume {volume} is in split brain with several peers ({peers}); name the one whose copy wins with --peer")]
    WhichPeer { volume: String, peers: String },
    #[error("peer {peer} holds this copy's writes of {volume} too; discarding them here would lose them there as well. Resolve on the other side of the split brain instead")]
    WouldLoseData { peer: String, volume: String },
    #[error("this copy of {volume} follows {primary}, which holds the same writes; resolve the split brain on {primary} instead")]
    FollowsPrimary { primary: String, volume: String },
    #[error("peer {peer}'s copy of {volume} is not consistent (a resync into it did not finish): it cannot be the copy that wins; resolve on {peer} instead")]
    WinnerInconsistent { peer: String, volume: String },
    #[error("unknown peer {peer} for volume {volume}")]
    UnknownPeer { peer: String, volume: String },
    #[error("volume {volume} has failed: {reason}")]
    Failed { volume: String, reason: String },
    #[error("the link to {peer} was lost while the demotion of {volume} drained its writes: this copy stays primary (the writes in flight complete as degraded writes, tracked for {peer}); run ferry demote again once {peer} is back")]
    PeerLost { peer: String, volume: String },
    #[error("{peer} is not a regional replica of {volume}: pause and resume apply to regional replicas only")]
    NotRegional { peer: String, volume: String },
    #[error("verify of {volume} needs this node to be primary and {peer} in sync; it is {state}")]
    CannotVerify {
        volume: String,
        peer: String,
        state: &'static str,
    },
}

impl OpError {
    /// The stable control-socket error code.
    pub fn code(&self) -> &'static str {
        match self {
            OpError::NotConsistent { .. } => "not-consistent",
            OpError::NeverSynced { .. } => "not-consistent",
            OpError::PeerIsPrimary { .. } => "peer-is-primary",
            OpError::Busy { .. } => "busy",
            OpError::NoSplitBrain { .. } => "no-split-brain",
            OpError::WhichPeer { .. } => "ambiguous-peer",
            OpError::WouldLoseData { .. } => "would-lose-data",
            OpError::PeerIsNewer { .. } => "would-lose-data",
            OpError::FollowsPrimary { .. } => "would-lose-data",
            OpError::WinnerInconsistent { .. } => "would-lose-data",
            OpError::UnknownPeer { .. } => "unknown-peer",
            OpError::Failed { .. } => "volume-failed",
            OpError::PeerLost { .. } => "peer-lost",
            OpError::CannotVerify { .. } => "cannot-verify",
            OpError::NotRegional { .. } => "not-regional",
        }
    }
}

/// What a completed operator command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpOutcome {
    /// This copy is primary in this generation.
    Promoted { generation: u64 },
    /// This copy is secondary.
    Demoted,
    /// This copy gives up its writes and is resynced from `peer`.
    Resolving { peer: String },
}

/// A record this copy holds above the apply limit (what a mark pass may still have to mark).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TailRecord {
    lsn: u64,
    offset_bytes: u64,
    len_bytes: u64,
}

/// A record a secondary asked its journal to append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PendingAppend {
    lsn: u64,
    offset_bytes: u64,
    len_bytes: u64,
    fua: bool,
}

/// A device write of a resync into this copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DeviceOp {
    peer: usize,
    resync: u64,
    /// An append to the catch-up file, not a device write.
    staged: bool,
    offset_bytes: u64,
    len_bytes: u64,
}

/// A resync this copy sends.
#[derive(Debug)]
struct ResyncOut {
    full: bool,
    /// Waiting for the peer's ranges (`DirtyRanges` with `last`).
    waiting_for_ranges: bool,
    started: bool,
    todo: RangeSet,
    /// Reads in flight: id → (offset, len).
    reads: BTreeMap<u64, (u64, u64)>,
    /// Reads in flight that a record overlapped after they were issued: they may hold older
    /// data than a later read of the same blocks and complete after it, so their data is
    /// dropped and the range read again.
    stale_reads: std::collections::BTreeSet<u64>,
    /// Zero chunks completed in order and not sent yet, merged into one range.
    zero_run: Option<(u64, u64)>,
    /// Bytes covered by what was sent (data and zero ranges).
    sent_bytes: u64,
    /// Data bytes sent since `started_at`, for the rate cap.
    data_bytes: u64,
    started_at: Instant,
    first_pass_bytes: u64,
    /// The end was sent at this LSN.
    ended_at: Option<u64>,
    /// Regional: the end is fixed at this LSN and waits for this copy's journal to be
    /// durable through it; records tapped meanwhile go into batches, sent after the end.
    end_pending: Option<u64>,
    /// The rate at which the peer writes what the resync sends (bytes per second, from its
    /// acknowledgements), once measured; it sizes the bytes in flight (`resync_window`).
    written_rate: Option<f64>,
    /// The current sample of that rate: since when, and the bytes written by then.
    rate_sample: Option<(Instant, u64)>,
}

/// Where a resync into this copy stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InPhase {
    /// This copy marks what it holds that the primary may not and reports its map.
    Reporting,
    /// Waiting for `ResyncBegin`.
    AwaitingBegin,
    /// The journal's records are being marked for every peer and the journal emptied before
    /// the device is written directly.
    Preparing {
        reset_issued: bool,
    },
    Receiving,
    /// The end arrived: writes drain, the device is synced, the journal restarts at `lsn`,
    /// the maps and then the lineage are stored, and only then is the end acknowledged.
    Ending {
        lsn: u64,
        step: EndStep,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EndStep {
    Drain,
    Sync,
    Reset,
    /// Staged: the catch-up file is being made durable and marked complete.
    Commit,
    /// Staged: the meta names the committed catch-up and the lineage it leads to.
    Adopt,
    /// Staged: the catch-up is being written to the device, with reads held.
    Apply,
    Maps,
    Meta,
}

/// A resync this copy receives.
#[derive(Debug)]
struct ResyncIn {
    /// Tells its device writes from those of an earlier resync still in flight.
    id: u64,
    full: bool,
    phase: InPhase,
    /// Messages not yet turned into device writes, in order, each with the mark sequence
    /// number its blocks were marked under (0 for messages that write nothing).
    backlog: VecDeque<(Message, u64)>,
    written_bytes: u64,
    lineage: Option<GenerationInfo>,
    /// The resync's end arrived (it may still wait in the backlog): records may follow it,
    /// resync messages may not.
    end_received: bool,
    /// A regional catch-up that goes to the catch-up file first and reaches the device as
    /// one unit at its end, so the copy stays at its last batch boundary (consistent,
    /// promotable) until then. See [`regional`].
    staged: bool,
    /// Regional: complete batches that arrived before this resync began (a repair on a
    /// live link), still to be applied. They go first, as they came first; batches that
    /// follow the resync's end wait for it.
    batches_first: usize,
}

/// An online verify this copy runs against one peer.
#[derive(Debug)]
struct Verify {
    repair: bool,
    /// Coarse ranges still to compare.
    todo: RangeSet,
    /// Fine (4 KiB) ranges still to compare.
    fine_todo: RangeSet,
    /// Requests in flight: id → state.
    requests: BTreeMap<u64, VerifyRequest>,
    total_bytes: u64,
    checked_bytes: u64,
    differing: RangeSet,
    busy: RangeSet,
    retries: BTreeMap<u64, u32>,
    read_bytes: u64,
    started_at: Instant,
    done: bool,
    repair_started: bool,
}

#[derive(Debug)]
struct VerifyRequest {
    offset_bytes: u64,
    len_bytes: u64,
    block_bytes: u64,
    local: Option<Vec<[u8; VERIFY_DIGEST_BYTES]>>,
    remote: Option<Vec<[u8; VERIFY_DIGEST_BYTES]>>,
    /// A record touched the range after the request: compare again later.
    written: bool,
}

/// The status of one verify, for `ferry verify` and `ferry status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyStatus {
    pub running: bool,
    pub repair: bool,
    pub total_bytes: u64,
    pub checked_bytes: u64,
    pub differing_bytes: u64,
    /// The first differing ranges (offset, len), merged.
    pub differing_ranges: Vec<(u64, u64)>,
    /// Bytes that could not be compared because writes kept changing them.
    pub busy_bytes: u64,
    pub repaired: bool,
}

/// The status of one peer, for `ferry status` and `/metrics`.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerStatus {
    pub peer: String,
    pub state: ReplicaState,
    /// Highest LSN the peer acknowledged into its journal (this copy's records).
    pub acked_lsn: u64,
    /// Highest LSN the peer holds durably, as far as this copy knows on the current link.
    pub durable_lsn: u64,
    /// Bytes of completed writes the peer may lack: records not confirmed durable, plus the
    /// dirty map when it is not in sync.
    pub lag_bytes: u64,
    pub resync_remaining_bytes: u64,
    /// The running resync's size: bytes sent so far plus `resync_remaining_bytes` (it grows
    /// when writes land on ranges already sent); 0 when no resync is sent. With the remaining
    /// bytes it gives the progress and, with the rate of bytes sent, the time left.
    pub resync_total_bytes: u64,
    pub resynced_bytes: u64,
    /// Resyncs sent to the peer that completed since this copy started, and whether the
    /// last one was full: a resync shorter than a status poll still shows.
    pub resyncs_completed: u64,
    pub last_resync_full: bool,
    pub last_error: Option<String>,
    /// The map's marked bytes.
    pub dirty_bytes: u64,
    pub verify: Option<VerifyStatus>,
    /// Whether the peer protects this copy (in sync at least once).
    pub protecting: bool,
    /// Regional peers: the age of the oldest write the peer lacks (the live RPO).
    pub lag_seconds: Option<f64>,
    /// Regional peers: payload bytes of records left out of batches because a later write
    /// of the same batch covered them.
    pub coalesced_bytes: u64,
    /// Regional peers: times shipping stopped because batches piled up.
    pub fell_behind: u64,
    /// This copy receives a delta resync from the peer: `"staged"` (stored whole first, the
    /// copy stays at its last batch boundary and promotable) or `"in-place"` (written to
    /// the device as it comes, the copy inconsistent until it ends).
    pub catch_up: Option<&'static str>,
}

/// The volume-wide status.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicatorStatus {
    pub role: Role,
    pub generation: u64,
    pub consistent: bool,
    /// Why writes are held, when they are (fencing, suspend, a hand-over, a role change).
    pub writes_held: Option<String>,
    pub failed: Option<String>,
    pub resolving_with: Option<String>,
    /// The peer this copy receives from (its primary), when it does.
    pub following: Option<String>,
    pub peers: Vec<PeerStatus>,
}

/// One peer's part of the replicator.
#[derive(Debug)]
struct Peer {
    config: PeerConfig,
    session: Session,
    plan: Option<Plan>,
    last_error: Option<String>,
    map: BlockBitmap,
    map_state: MapState,
    /// A persist in flight: the covered LSN and the mark sequence number it establishes.
    map_persist: Option<(u64, u64)>,
    /// Marks up to this sequence number are in the map's file (see `Replicator::mark_seq`).
    persisted_mark_seq: u64,
    covered_lsn: u64,
    covered_persisted_lsn: u64,
    /// The peer holds this copy's records up to here in its journal, and durably: what it
    /// acknowledged on the current link (or the primary reported of it).
    acked_journal_lsn: u64,
    acked_durable_lsn: u64,
    /// The newest generation of this copy the peer may hold.
    knows_generation: u64,
    /// Primary: records tapped while shipping to this peer and not sent yet.
    queue: VecDeque<WriteRecord>,
    resync_out: Option<ResyncOut>,
    resync_in: Option<ResyncIn>,
    /// A handshake on this link kept this copy primary (fencing).
    contacted: bool,
    /// Secondary: the primary's last word on this fellow secondary (`None`: not receiving).
    third_durable_lsn: Option<u64>,
    /// Secondary: a generation the primary started, learned once its start is journaled.
    pending_generation: Option<GenerationEntry>,
    /// Secondary: durability the primary asked for.
    flush_wanted_lsn: u64,
    /// Primary: durability a client FLUSH asked of this peer, and what was asked of it on
    /// the current link.
    flush_request_lsn: u64,
    flush_sent_lsn: u64,
    /// Primary: the last progress sent (durable LSN, peers' part).
    progress_sent: Option<(u64, Vec<PeerProgress>)>,
    verify: Option<Verify>,
    resynced_bytes: u64,
    /// Resyncs sent to this peer that completed, and whether the last was full.
    resyncs_completed: u64,
    last_resync_full: bool,
    /// Secondary: the peer is this copy's primary on the current link.
    is_my_primary: bool,
    /// Secondary: records that followed a resync's end, journaled once it is finished.
    deferred: VecDeque<WriteRecord>,
    /// The last handshake found a split brain; cleared when a resync with the peer ends.
    split_brain: bool,
    /// Primary: when the map was last stored (see [`MAP_PERSIST_INTERVAL`]).
    map_persisted_at: Option<Instant>,
    /// The peer confirmed something since `acked_durable_lsn` was last reset: only then
    /// does `acked_durable_lsn` say the peer holds this copy's records up to it (0 included:
    /// marks a resync ending at LSN 0 made stand until a peer confirms that).
    confirmed: bool,
    /// The peer's copy was consistent at the last handshake.
    peer_consistent: bool,
    /// The last handshake found the peer holding writes this copy lacks (a newer lineage):
    /// while the link stays up, promoting this copy without `--force` is refused.
    holds_newer: bool,
    /// The map state the file holds.
    map_state_persisted: MapState,
    /// Heartbeat round trips not yet collected by the daemon.
    rtts: Vec<Duration>,
    /// A demotion started while this peer confirmed records: the writes it drains complete
    /// only by the peer's acknowledgements (a planned switchover never completes a write
    /// the new primary lacks), and losing the peer aborts the demotion.
    demotion_hold: bool,
    /// Batches, for a regional peer.
    regional: regional::RegionalPeer,
}

/// Metro replication of one volume. See the module doc.
#[derive(Debug)]
pub struct Replicator {
    config: ReplicatorConfig,
    /// What the metadata should be.
    meta: Meta,
    /// What the metadata file holds.
    meta_persisted: Meta,
    /// A persist in flight, of this value.
    meta_in_flight: Option<Meta>,
    failed: Option<String>,
    /// The effective role: changes once the stored role changed.
    role: Role,
    head_lsn: u64,
    local_durable_lsn: u64,
    tail: VecDeque<TailRecord>,
    /// Secondary: records asked to be appended, in order, not yet journaled.
    appends: VecDeque<PendingAppend>,
    /// The LSN of the last record asked to be appended (secondary), or tapped (primary).
    appended_up_to: u64,
    /// Device writes of resyncs in flight: id → (peer, resync id, offset, len).
    device_ops: BTreeMap<u64, DeviceOp>,
    device_bytes_in_flight: u64,
    next_resync_id: u64,
    /// Numbers the marks a resync into this copy makes before writing the device: a block is
    /// written only once every map has persisted its mark (write-ahead marking), so that a
    /// crash in the middle leaves what changed known to every peer.
    mark_seq: u64,
    flush_in_flight: bool,
    flush_wanted_lsn: u64,
    reset_in_flight: bool,
    device_sync_in_flight: bool,
    fenced: bool,
    demoting: bool,
    /// The demotion in progress is an operator's `ferry demote` (it drains regional peers).
    demote_planned: bool,
    holding: bool,
    op: Option<PendingOp>,
    op_result: Option<Result<OpOutcome, OpError>>,
    next_durable_tick: Option<Instant>,
    next_id: u64,
    actions: VecDeque<Action>,
    now: Instant,
    peers: Vec<Peer>,
    /// Completion LSNs already published (they never go back).
    settled_published: (u64, u64),
    /// Digest actions in flight and what each is for.
    digests: BTreeMap<u64, verify::DigestFor>,
    /// Peers' verify requests waiting for this copy to hold their LSN.
    served: VecDeque<verify::Served>,
    /// Things an operator must hear about that change no state (each logged once).
    notices: VecDeque<String>,
    /// Resyncs received, (peer, LSN, whether it resolved a split brain), for the
    /// simulator's model of what each copy holds.
    #[cfg(test)]
    adoptions: Vec<(usize, u64, bool)>,
}

#[derive(Debug)]
enum PendingOp {
    /// Promotion: waiting until `deadline` for a primary peer to go away (unless forced),
    /// then for receive I/O to finish and the journal to be durable, then for the meta.
    Promote {
        force: bool,
        deadline: Instant,
        closed: bool,
        generation_started: bool,
    },
    /// Demotion (or the demotion before a resolve): admission is closed; `drained` once the
    /// daemon says the writes in flight are done.
    Demote {
        drained: bool,
        resolve_with: Option<String>,
        stored: bool,
    },
    /// A resolve on a secondary: the meta naming the winner is being stored.
    Resolve { peer: String },
    /// An operator promote of a fenced primary: a new generation is being stored.
    Unfence { generation_started: bool },
}

impl Replicator {
    /// A replicator for a volume opened with `startup` (after journal recovery).
    pub fn new(config: ReplicatorConfig, startup: Startup, now: Instant) -> Replicator {
        assert_eq!(
            startup.peers.len(),
            config.peers.len(),
            "one dirty map per configured peer"
        );
        assert!(startup.head_lsn <= LSN_MAX, "the journal head is in range");
        assert!(
            config.peers.iter().all(|p| p.regional.is_none())
                || config.window_bytes >= regional::BATCH_WINDOW_BYTES_MIN,
            "a regional peer's window holds a whole batch"
        );
        let mut meta = startup.meta;
        meta.lineage.head_lsn = 0;
        // What the file holds; compared with `meta` to know when to store it again.
        let meta_persisted = meta.clone();
        meta.lineage.head_lsn = startup.head_lsn;
        // A secondary learns a generation before its journal is durable; a power loss may
        // then have taken the records it starts at. The history this copy can vouch for is
        // the trimmed one, stored at the first step.
        meta.lineage.trim_to_head();
        meta.lineage.head_lsn = 0;
        let role = meta.role;
        let head = startup.head_lsn;
        let current_generation = meta.lineage.current_generation();
        let peers: Vec<Peer> = config
            .peers
            .iter()
            .zip(startup.peers)
            .map(|(peer, start)| {
                let knows = if meta.protecting(&peer.name) {
                    current_generation
                } else {
                    0
                };
                Peer::new(&config, peer, start, head, knows, now)
            })
            .collect();
        let fenced = role == Role::Primary
            && peers
                .iter()
                .any(|p| p.config.regional.is_none() && meta.protecting(&p.config.name));
        let mut peers = peers;
        if fenced {
            for peer in &mut peers {
                if peer.config.regional.is_none() && meta.protecting(&peer.config.name) {
                    peer.last_error = Some(
                        "not heard from since this node started; writes are held until it answers (fencing)"
                            .into(),
                    );
                }
            }
        }
        Replicator {
            meta_persisted,
            meta,
            meta_in_flight: None,
            failed: None,
            role,
            head_lsn: head,
            local_durable_lsn: head,
            tail: VecDeque::new(),
            appends: VecDeque::new(),
            appended_up_to: head,
            device_ops: BTreeMap::new(),
            device_bytes_in_flight: 0,
            next_resync_id: 1,
            mark_seq: 0,
            flush_in_flight: false,
            flush_wanted_lsn: 0,
            reset_in_flight: false,
            device_sync_in_flight: false,
            fenced,
            demoting: false,
            demote_planned: false,
            holding: false,
            op: None,
            op_result: None,
            next_durable_tick: None,
            next_id: 1,
            actions: VecDeque::new(),
            now,
            peers,
            settled_published: (head, head),
            digests: BTreeMap::new(),
            served: VecDeque::new(),
            notices: VecDeque::new(),
            #[cfg(test)]
            adoptions: Vec::new(),
            config,
        }
    }
}

impl Peer {
    /// A peer as a replicator starts: its map loaded, every record up to `head` covered
    /// (recovery marked every replayed one), nothing acknowledged on any link yet.
    fn new(
        replicator: &ReplicatorConfig,
        peer: &PeerConfig,
        start: StartPeer,
        head: u64,
        knows_generation: u64,
        now: Instant,
    ) -> Peer {
        Peer {
            session: Session::new(
                SessionConfig {
                    node: replicator.node.clone(),
                    peer: peer.name.clone(),
                    volume: replicator.volume.clone(),
                    size_bytes: replicator.size_bytes,
                    peer_timeout: peer.peer_timeout,
                    window_bytes: replicator.window_bytes,
                    batched: peer.regional.is_some(),
                },
                now,
            ),
            config: peer.clone(),
            plan: None,
            last_error: None,
            map: start.bitmap,
            map_state: start.state,
            map_persist: None,
            persisted_mark_seq: 0,
            // Recovery marked every replayed record: everything up to the head is
            // confirmed or in the persisted map.
            covered_lsn: head,
            covered_persisted_lsn: head,
            acked_journal_lsn: 0,
            acked_durable_lsn: 0,
            // A peer that protected this copy may know its current generation.
            knows_generation,
            queue: VecDeque::new(),
            resync_out: None,
            resync_in: None,
            contacted: false,
            third_durable_lsn: None,
            pending_generation: None,
            flush_wanted_lsn: 0,
            flush_request_lsn: 0,
            flush_sent_lsn: 0,
            progress_sent: None,
            verify: None,
            resynced_bytes: 0,
            resyncs_completed: 0,
            last_resync_full: false,
            is_my_primary: false,
            deferred: VecDeque::new(),
            split_brain: false,
            map_persisted_at: None,
            confirmed: false,
            peer_consistent: true,
            holds_newer: false,
            map_state_persisted: start.state,
            rtts: Vec::new(),
            demotion_hold: false,
            regional: regional::RegionalPeer::default(),
        }
    }
}

// ---- helpers shared by the submodules ------------------------------------------------------

impl Peer {
    fn name(&self) -> &str {
        &self.config.name
    }

    /// Confirmations only ever rise; a confirmation covers the records up to it.
    fn confirm(&mut self, durable_lsn: u64) {
        self.confirmed = true;
        self.acked_durable_lsn = self.acked_durable_lsn.max(durable_lsn);
        self.covered_lsn = self.covered_lsn.max(durable_lsn);
        self.covered_persisted_lsn = self.covered_persisted_lsn.max(durable_lsn);
    }

    /// Whether a resync between this copy and the peer is under way on the current link.
    fn resyncing(&self) -> bool {
        self.resync_in.is_some()
            || self
                .resync_out
                .as_ref()
                .is_some_and(|r| r.ended_at.is_none())
    }
}

impl Replicator {
    fn volume(&self) -> &str {
        &self.config.volume
    }

    /// Moves what a peer's session wants sent into actions, in order.
    fn flush_transmits(&mut self, p: usize) {
        while let Some(message) = self.peers[p].session.poll_transmit() {
            self.actions
                .push_back(Action::Transmit { peer: p, message });
        }
    }

    /// The lineage with the current head, as the journal holds it.
    fn lineage(&self) -> GenerationInfo {
        let mut lineage = self.meta.lineage.clone();
        lineage.head_lsn = self.head_lsn;
        lineage
    }

    /// The stored lineage with the current head (without a generation a power loss took
    /// the start of, until the trimmed history is stored).
    fn persisted_lineage(&self) -> GenerationInfo {
        let mut lineage = self.meta_persisted.lineage.clone();
        lineage.head_lsn = self.head_lsn;
        lineage.trim_to_head();
        lineage
    }

    /// The stored current generation and its first LSN.
    fn persisted_generation(&self) -> (u64, u64) {
        self.meta_persisted
            .lineage
            .current()
            .map_or((0, 1), |g| (g.generation, g.start_lsn))
    }

    /// The meta is stored as wanted (no change pending or in flight).
    fn meta_settled(&self) -> bool {
        self.meta_in_flight.is_none() && self.meta == self.meta_persisted
    }

    /// Whether a peer confirms this copy's records as they come (so they wait for it rather
    /// than being marked). See the module doc.
    fn confirming(&self, p: usize) -> bool {
        let peer = &self.peers[p];
        if !peer.session.is_up() || peer.resyncing() {
            return false;
        }
        match self.role {
            // A regional peer's records are always marked: it never holds the journal.
            Role::Primary => {
                peer.config.regional.is_none() && matches!(peer.plan, Some(Plan::Ship { .. }))
            }
            Role::Secondary => {
                if peer.is_my_primary {
                    return true;
                }
                peer.third_durable_lsn.is_some()
                    && self
                        .peers
                        .iter()
                        .any(|q| q.is_my_primary && q.session.is_up() && !q.resyncing())
            }
        }
    }

    /// The link to a peer is gone (or being restarted): forget what belonged to it.
    fn link_down(&mut self, p: usize, why: String) {
        let was_primary = self.peers[p].is_my_primary;
        let peer = &mut self.peers[p];
        peer.plan = None;
        peer.queue.clear();
        peer.resync_out = None;
        // A resync whose end arrived holds everything the sender sent: it finishes without
        // the link (only its acknowledgement is lost). Any other is abandoned: device writes
        // in flight finish on their own, and the copy stays as consistent as its meta says.
        let ending = peer
            .resync_in
            .as_ref()
            .is_some_and(|r| matches!(r.phase, InPhase::Ending { .. }));
        if !ending {
            self.abandon_resync_in(p);
        }
        let peer = &mut self.peers[p];
        peer.is_my_primary = false;
        peer.deferred.clear();
        // Nothing of a batch is stored before its end: an incomplete one is dropped (complete
        // ones still apply). Batches not sent are in the map.
        peer.regional.open.take();
        peer.regional.cuts.clear();
        peer.regional.queued_bytes = 0;
        peer.regional.receiving.clear();
        peer.regional.receiving_bytes = 0;
        // Its verify requests not yet digested go with it: nobody would read the replies.
        self.served.retain(|request| request.peer != p);
        let peer = &mut self.peers[p];
        peer.pending_generation = None;
        peer.flush_wanted_lsn = 0;
        peer.flush_sent_lsn = 0;
        peer.progress_sent = None;
        // What the peer acknowledged says what it held on this link: once the link is gone
        // it may change its copy (take another lineage) without this copy hearing of it.
        peer.acked_journal_lsn = 0;
        peer.acked_durable_lsn = 0;
        peer.confirmed = false;
        if let Some(verify) = peer.verify.as_mut() {
            if !verify.done {
                verify.done = true;
            }
        }
        if peer.last_error.is_none() || !why.is_empty() {
            peer.last_error = Some(why);
        }
        if was_primary {
            // The primary's word on the other peers no longer arrives.
            for peer in &mut self.peers {
                peer.third_durable_lsn = None;
            }
        }
    }

    /// Gives up the resync into this copy from peer `p`, if any: the copy stays as
    /// consistent as its meta says, and nothing of a staged catch-up reached the device.
    /// Batches that came after its end wait for it (they continue the history it was bringing
    /// this copy to): they go too, or they would apply onto a copy that never got there.
    fn abandon_resync_in(&mut self, p: usize) {
        let Some(abandoned) = self.peers[p].resync_in.take() else {
            return;
        };
        if abandoned.staged {
            self.actions.push_back(Action::CatchUpDrop);
        }
        // Batches that arrived before the resync began still apply (they came first); of
        // the others, those that only wait came after its end and go.
        let mut before = abandoned.batches_first;
        self.peers[p].regional.batches.retain(|batch| {
            let first = before > 0;
            before = before.saturating_sub(1);
            first || batch.step != regional::BatchStep::Waiting
        });
    }

    /// Closes a peer's stream on purpose; the daemon reconnects later.
    fn close_link(&mut self, p: usize, reason: &str) {
        let connected = self.peers[p].session.is_connected();
        self.peers[p].session.close(reason);
        self.flush_transmits(p);
        if connected {
            self.actions.push_back(Action::CloseStream {
                peer: p,
                reason: reason.to_owned(),
            });
        }
        self.link_down(p, reason.to_owned());
    }

    /// Something safety rests on could not be stored: the volume stops taking writes.
    fn fail(&mut self, reason: String) {
        if self.failed.is_none() {
            self.failed = Some(reason.clone());
            self.actions.push_back(Action::Fail {
                reason: reason.clone(),
            });
            // Fail-stop: a copy whose stores failed tells its peers nothing more. What it would
            // send (a resync's end, progress) rests on state it could not store, and a peer
            // that took it would hold a generation this copy forgets at its restart.
            for p in 0..self.peers.len() {
                self.close_link(p, &format!("this copy failed: {reason}"));
            }
        }
    }

    fn hello(&self, p: usize) -> Hello {
        let lineage = self.persisted_lineage();
        Hello {
            protocol_version: session::PROTOCOL_VERSION,
            node: self.config.node.clone(),
            volume: self.config.volume.clone(),
            size_bytes: self.config.size_bytes,
            role: self.role,
            durable_lsn: self.local_durable_lsn.min(lineage.head_lsn),
            generation: lineage,
            consistent: self.meta_persisted.consistent && self.meta.consistent,
            // The operator's choice discards this copy's writes since the split, whichever copy
            // of the winner's lineage resyncs it.
            discarding_local: self.meta.resolving_with.is_some() && p < self.peers.len(),
        }
    }
}

// ---- inputs ----------------------------------------------------------------------------------

impl Replicator {
    /// The next action for the daemon.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`advance`](Self::advance) must run again at the latest.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut at = self.next_durable_tick;
        let mut earliest = |t: Option<Instant>| {
            if let Some(t) = t {
                at = Some(at.map_or(t, |a| a.min(t)));
            }
        };
        for peer in &self.peers {
            earliest(peer.session.poll_timeout());
            if let Some(resync) = &peer.resync_out {
                earliest(self.resync_due(peer, resync));
            }
            if let Some(verify) = &peer.verify {
                earliest(self.verify_due(peer, verify));
            }
        }
        for p in 0..self.peers.len() {
            earliest(self.batch_due(p));
            let peer = &self.peers[p];
            if peer.map.has_changes() || peer.map_state != peer.map_state_persisted {
                earliest(self.map_persist_due(p));
            }
        }
        if let Some(PendingOp::Promote {
            deadline,
            closed: false,
            ..
        }) = &self.op
        {
            earliest(Some(*deadline));
        }
        at
    }

    /// A stream to peer `p` is open: the handshake starts.
    pub fn connected(&mut self, p: usize, now: Instant) {
        self.now = now;
        if let Some(reason) = &self.failed {
            self.actions.push_back(Action::CloseStream {
                peer: p,
                reason: format!("this copy failed: {reason}"),
            });
            return;
        }
        if !self.peers[p].regional.batches.is_empty() {
            self.actions.push_back(Action::CloseStream {
                peer: p,
                reason: "batches from this peer are still being applied".into(),
            });
            return;
        }
        if self.peers[p].regional.paused {
            self.actions.push_back(Action::CloseStream {
                peer: p,
                reason: "shipping to this peer is paused (ferry resume)".into(),
            });
            return;
        }
        if self.peers[p].resync_in.is_some() {
            // The end of a resync from this peer is still being made durable.
            self.actions.push_back(Action::CloseStream {
                peer: p,
                reason: "a resync from this peer is still ending".into(),
            });
            return;
        }
        if matches!(self.op, Some(PendingOp::Promote { closed: true, .. })) {
            // A promotion has stopped replication until the new role is stored.
            self.actions.push_back(Action::CloseStream {
                peer: p,
                reason: "this node is being promoted".into(),
            });
            return;
        }
        let hello = self.hello(p);
        self.peers[p].session.connect(hello, now);
        self.flush_transmits(p);
    }

    /// The stream to peer `p` closed (or failed).
    pub fn disconnected(&mut self, p: usize, why: &str, now: Instant) {
        self.now = now;
        if self.peers[p].session.is_connected() {
            self.peers[p].session.disconnect();
            self.link_down(p, why.to_owned());
        }
    }

    /// A message from peer `p`.
    pub fn message(&mut self, p: usize, message: Message, now: Instant) {
        self.now = now;
        match self.peers[p].session.handle_message(message, now) {
            Incoming::Nothing => {}
            Incoming::Rtt(rtt) => {
                if self.peers[p].rtts.len() < 64 {
                    self.peers[p].rtts.push(rtt);
                }
            }
            Incoming::Ready { decision, peer } => self.on_ready(p, decision, &peer),
            Incoming::Message(message) => self.on_message(p, message),
            Incoming::Closed(error) => {
                self.flush_transmits(p);
                self.actions.push_back(Action::CloseStream {
                    peer: p,
                    reason: error.to_string(),
                });
                self.link_down(p, error.to_string());
            }
        }
        self.flush_transmits(p);
    }

    /// What happened that an operator must hear about (the daemon logs each once).
    pub fn take_notices(&mut self) -> Vec<String> {
        self.notices.drain(..).collect()
    }

    /// Heartbeat round trips measured since the last call, per peer.
    pub fn take_rtts(&mut self, p: usize) -> Vec<Duration> {
        std::mem::take(&mut self.peers[p].rtts)
    }

    /// Whether the daemon may hand more messages from peer `p` in: a secondary stops reading
    /// while its disk is behind (the sender's windows then fill and it waits).
    pub fn can_receive(&self, p: usize) -> bool {
        let peer = &self.peers[p];
        let backlog = peer.resync_in.as_ref().map_or(0, |r| r.backlog.len()) + peer.deferred.len();
        self.appends.len() < APPENDS_IN_FLIGHT_MAX
            && self.device_bytes_in_flight < DEVICE_BYTES_IN_FLIGHT_MAX
            && backlog < APPENDS_IN_FLIGHT_MAX
            && peer.regional.batches.len() < regional::BATCHES_WAITING_MAX
    }

    fn on_message(&mut self, p: usize, message: Message) {
        match message {
            Message::RoleChange { .. } => {
                // The peer's role changed under the current decision: decide again.
                self.close_link(p, "the peer changed role");
            }
            Message::Ack {
                journal_lsn,
                durable_lsn,
            } => self.on_ack(p, journal_lsn, durable_lsn),
            Message::ResyncAck { .. } => {}
            Message::DirtyRanges { ranges, last } => self.on_dirty_ranges(p, &ranges, last),
            Message::VerifyReply { id, digests } => self.on_verify_reply(p, id, digests),
            Message::Write(record) if self.is_regional(p) => {
                if self.role != Role::Secondary || !self.peers[p].is_my_primary {
                    return self
                        .close_link(p, "a record from a peer that is not this copy's primary");
                }
                self.on_batch_record(p, record);
            }
            Message::Write(record) => self.on_record(p, record),
            Message::BatchEnd { lsn } => self.on_batch_end(p, lsn),
            Message::Flush { upto_lsn } => {
                let peer = &mut self.peers[p];
                peer.flush_wanted_lsn = peer.flush_wanted_lsn.max(upto_lsn);
                self.flush_wanted_lsn = self.flush_wanted_lsn.max(upto_lsn);
            }
            Message::NewGeneration { entry } => {
                self.peers[p].pending_generation = Some(entry);
            }
            Message::Progress { durable_lsn, peers } => self.on_progress(p, durable_lsn, &peers),
            message @ (Message::ResyncBegin { .. }
            | Message::ResyncData { .. }
            | Message::ResyncZero { .. }
            | Message::ResyncEnd { .. }) => self.on_resync_message(p, message),
            Message::VerifyRequest {
                id,
                offset_bytes,
                len_bytes,
                block_bytes,
                at_lsn,
            } => {
                // Requests waiting for their LSN and digests being computed for a reply, all
                // peers together: each digest reads up to 1 MiB at a time, so this bounds
                // what verify requests can make this copy read and hold at once.
                let replying = self
                    .digests
                    .values()
                    .filter(|purpose| matches!(purpose, verify::DigestFor::Reply { .. }))
                    .count();
                if self.served.len() + replying >= VERIFY_SERVING_MAX {
                    return self.close_link(p, "too many verify requests in flight");
                }
                self.on_verify_request(p, id, offset_bytes, len_bytes, block_bytes, at_lsn)
            }
            // The session handles the others and never hands them up.
            Message::Hello(_)
            | Message::Welcome { .. }
            | Message::Refuse { .. }
            | Message::Heartbeat { .. }
            | Message::HeartbeatReply { .. }
            | Message::Goodbye { .. } => {}
        }
    }

    /// The clock: timers of every session, and everything level-triggered.
    pub fn timeout(&mut self, now: Instant) {
        self.now = now;
        for p in 0..self.peers.len() {
            if let Some(error) = self.peers[p].session.handle_timeout(now) {
                self.flush_transmits(p);
                self.actions.push_back(Action::CloseStream {
                    peer: p,
                    reason: error.to_string(),
                });
                self.link_down(p, error.to_string());
            }
            self.flush_transmits(p);
        }
        self.advance(now);
    }

    /// The journal is durable up to `lsn` (a flush, a FUA write, an applied round).
    pub fn local_durable(&mut self, lsn: u64) {
        self.local_durable_lsn = self.local_durable_lsn.max(lsn.min(self.head_lsn));
    }

    /// A [`Action::JournalFlush`] completed.
    pub fn journal_flushed(&mut self, result: Result<u64, String>) {
        self.flush_in_flight = false;
        match result {
            Ok(lsn) => self.local_durable(lsn),
            Err(error) => self.fail(format!("journal fdatasync: {error}")),
        }
    }

    /// A [`Action::PersistMeta`] completed.
    pub fn meta_persisted(&mut self, result: Result<(), String>) {
        let Some(stored) = self.meta_in_flight.take() else {
            return;
        };
        match result {
            Ok(()) => self.meta_persisted = stored,
            Err(error) => self.fail(format!("storing the volume's metadata: {error}")),
        }
    }

    /// A [`Action::PersistMap`] completed.
    pub fn map_persisted(&mut self, p: usize, result: Result<(), String>) {
        let peer = &mut self.peers[p];
        let Some((covered, seq)) = peer.map_persist.take() else {
            return;
        };
        match result {
            Ok(()) => {
                peer.covered_persisted_lsn = peer.covered_persisted_lsn.max(covered);
                peer.persisted_mark_seq = peer.persisted_mark_seq.max(seq);
            }
            Err(error) => {
                peer.map.persist_failed();
                let reason = format!("storing the dirty map for {}: {error}", peer.name());
                self.fail(reason);
            }
        }
    }

    // ---- the level-triggered pass ------------------------------------------------------------

    /// Re-evaluates everything that waits on a condition and issues the actions due. Cheap
    /// when nothing changed; the daemon calls it after inputs and at [`poll_timeout`].
    ///
    /// [`poll_timeout`]: Self::poll_timeout
    pub fn advance(&mut self, now: Instant) {
        self.now = now;
        self.durable_tick(now);
        self.advance_op(now);
        for p in 0..self.peers.len() {
            self.mark_pass(p);
            self.advance_receiving(p);
            self.advance_batches(p);
            self.maybe_cut(p);
            self.maybe_clear_map(p);
            self.pump_queue(p);
            self.pump_resync(p, now);
            self.pump_verify(p, now);
            self.flush_transmits(p);
        }
        // A handshake found a peer ahead of this primary: it demotes (level-triggered, so a
        // command in progress at that moment only delays it).
        if let Some(p) = (0..self.peers.len())
            .find(|p| self.peers[*p].plan == Some(Plan::Demote) && self.peers[*p].session.is_up())
        {
            self.demote_required(p);
        }
        self.maybe_start_generation();
        self.announce_generation();
        self.update_fence();
        self.update_holding();
        for p in 0..self.peers.len() {
            self.maybe_persist_map(p);
        }
        self.maybe_persist_meta();
        self.prune_tail();
        self.check();
    }

    fn durable_tick(&mut self, now: Instant) {
        if self.peers.is_empty() {
            return;
        }
        let due = self.next_durable_tick.is_none_or(|at| now >= at);
        if due {
            self.next_durable_tick = Some(now + DURABLE_INTERVAL);
            if self.role == Role::Primary {
                self.send_progress();
            }
        }
        // Every copy with a metro peer makes its journal durable at least every tick while
        // records arrive (so the others can release theirs), and a secondary at once when its
        // primary asks. Regional peers need no such tick: a regional secondary releases what
        // it applied batch by batch, and a primary with regional peers only makes its journal
        // durable where a standalone volume does (FUA, FLUSH) and at each boundary it hands a
        // regional copy (`durable_through`), so its non-FUA writes do not share the disk with
        // an fdatasync every tick (measured: 50 journal fdatasyncs a second under 4 KiB QD1
        // writes).
        let periodic = due && self.peers.iter().any(|p| p.config.regional.is_none());
        let wanted = if periodic {
            self.head_lsn
        } else {
            self.flush_wanted_lsn.min(self.head_lsn)
        };
        if wanted > self.local_durable_lsn && !self.flush_in_flight {
            self.flush_in_flight = true;
            self.actions.push_back(Action::JournalFlush);
        }
        if self.role == Role::Secondary {
            for p in 0..self.peers.len() {
                if self.peers[p].is_my_primary && self.peers[p].resync_in.is_none() {
                    let (head, durable) = (self.head_lsn, self.local_durable_lsn);
                    if let Err(error) = self.peers[p].session.acknowledge(head, durable) {
                        self.close_for(p, error);
                    }
                }
            }
        }
    }

    /// A session error while sending: the link closes.
    fn close_for(&mut self, p: usize, error: SessionError) {
        self.flush_transmits(p);
        self.actions.push_back(Action::CloseStream {
            peer: p,
            reason: error.to_string(),
        });
        self.link_down(p, error.to_string());
    }

    /// Marks every record past what a non-confirming peer has covered.
    fn mark_pass(&mut self, p: usize) {
        if self.confirming(p) && !self.must_mark_all(p) {
            return;
        }
        let head = self.head_lsn;
        let peer = &mut self.peers[p];
        if peer.covered_lsn >= head {
            return;
        }
        let from = peer.covered_lsn;
        for record in self.tail.iter().filter(|r| r.lsn > from) {
            peer.map.mark(record.offset_bytes, record.len_bytes);
        }
        peer.map_state.marked(head);
        peer.covered_lsn = head;
    }

    /// A secondary preparing to receive a resync marks its whole journal for every peer:
    /// the journal is about to be applied and emptied.
    fn must_mark_all(&self, _p: usize) -> bool {
        self.peers.iter().any(|peer| {
            peer.resync_in
                .as_ref()
                .is_some_and(|r| matches!(r.phase, InPhase::Preparing { .. }))
        })
    }

    /// Drops marks the peer has confirmed (see [`MapState::marked_through_lsn`]).
    fn maybe_clear_map(&mut self, p: usize) {
        if self.peers.iter().any(|peer| peer.resync_in.is_some()) {
            return; // this copy's records are changing under every confirmation
        }
        let peer = &mut self.peers[p];
        if peer.map.is_clean()
            || peer.map_state.resync_only
            || peer.resyncing()
            || peer.map_persist.is_some()
            || peer.map_state.marked_through_lsn > peer.acked_durable_lsn
            // A peer confirms it holds this copy up to `acked_durable_lsn` only by saying so
            // (LSN 0 is no exception: marks a resync ending there made for a third copy stand
            // until that copy confirms). This copy's primary holds what it sent.
            || (!peer.confirmed && !peer.is_my_primary)
        {
            return;
        }
        peer.map.clear_all();
        peer.map_state = MapState::default();
    }

    /// When a primary may store peer `p`'s map next, if it must wait (see
    /// [`MAP_PERSIST_INTERVAL`]): a regional peer's, or a metro peer's while it does not
    /// confirm records as they come (away, resyncing, idle, split brain). A write-ahead mark,
    /// which a device write waits for, goes at once, and so does every store once the peer
    /// confirms again. What waits: marks of records (the journal keeps them until stored), a
    /// peer's own dirty ranges (it keeps its map until the resync ends), a full resync's marks
    /// (an interrupted full resync is planned full again) and a verify's repair ranges (a
    /// crash before their store leaves the difference to the next verify, which the log's
    /// notice of it asks for).
    fn map_persist_due(&self, p: usize) -> Option<Instant> {
        let peer = &self.peers[p];
        let paced = peer.config.regional.is_some() || !self.confirming(p);
        if !paced || self.role != Role::Primary || peer.persisted_mark_seq < self.mark_seq {
            return None;
        }
        peer.map_persisted_at
            .map(|at| at + MAP_PERSIST_INTERVAL)
            .filter(|due| *due > self.now)
    }

    fn maybe_persist_map(&mut self, p: usize) {
        let due = self.map_persist_due(p);
        let now = self.now;
        let peer = &mut self.peers[p];
        // A failed volume stores nothing more (fail-stop): what the files hold is the last
        // state that was whole, and a change half made when it failed (a promotion's role
        // without its generation) must not reach them later.
        if peer.map_persist.is_some() || self.failed.is_some() {
            return;
        }
        let state_changed = peer.map_state != peer.map_state_persisted;
        if !peer.map.has_changes() && !state_changed {
            // The bits of every record covered in memory are already in the file.
            peer.covered_persisted_lsn = peer.covered_persisted_lsn.max(peer.covered_lsn);
            peer.persisted_mark_seq = self.mark_seq;
            return;
        }
        if due.is_some() {
            return; // see MAP_PERSIST_INTERVAL
        }
        peer.map_persisted_at = Some(now);
        let changes = peer.map.take_changes();
        let state = peer.map_state;
        peer.map_state_persisted = state;
        peer.map_persist = Some((peer.covered_lsn, self.mark_seq));
        self.actions.push_back(Action::PersistMap {
            peer: p,
            changes,
            state,
        });
    }

    fn maybe_persist_meta(&mut self) {
        if self.meta_in_flight.is_some()
            || self.meta == self.meta_persisted
            || self.failed.is_some()
        {
            return;
        }
        let meta = self.meta.clone();
        self.meta_in_flight = Some(meta.clone());
        self.actions.push_back(Action::PersistMeta { meta });
    }

    /// Records every peer covers durably leave the tail (the journal may release them).
    fn prune_tail(&mut self) {
        let limit = self.apply_limit();
        while self.tail.front().is_some_and(|r| r.lsn <= limit) {
            self.tail.pop_front();
        }
    }

    /// Invariants that must hold after every step; a violation is a bug and stops loudly.
    fn check(&self) {
        for peer in &self.peers {
            assert!(
                peer.covered_persisted_lsn <= peer.covered_lsn.max(peer.acked_durable_lsn),
                "persisted coverage never exceeds coverage"
            );
            assert!(
                peer.covered_lsn <= self.head_lsn.max(peer.acked_durable_lsn),
                "coverage never exceeds the head"
            );
        }
        if let Some(first) = self.tail.front() {
            assert!(
                first.lsn > self.apply_limit(),
                "the tail starts above the limit"
            );
            assert_eq!(
                self.tail.back().map(|r| r.lsn),
                Some(self.head_lsn),
                "the tail ends at the head"
            );
        }
    }

    // ---- outputs the write path reads ------------------------------------------------------

    /// Records above this LSN must stay in the journal.
    pub fn apply_limit(&self) -> u64 {
        self.peers
            .iter()
            .map(|p| p.covered_persisted_lsn)
            .min()
            .unwrap_or(u64::MAX)
    }

    /// Whether client writes are refused outright (rather than held): the volume failed, or
    /// this copy is not primary, or a demotion is draining.
    pub fn refuses_writes(&self) -> bool {
        self.failed.is_some() || self.role != Role::Primary || self.demoting
    }

    /// A demotion is draining writes (the role is still primary).
    pub fn demoting(&self) -> bool {
        self.demoting
    }

    /// Why the volume stopped taking writes, if it did.
    pub fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// Whether new client writes may enter the journal now.
    pub fn admits_writes(&self) -> bool {
        self.writes_held().is_none()
    }

    /// Why client writes are held, when they are.
    pub fn writes_held(&self) -> Option<String> {
        if let Some(reason) = &self.failed {
            return Some(format!("the volume failed: {reason}"));
        }
        if self.role != Role::Primary {
            return Some("this copy is secondary".into());
        }
        if self.demoting {
            return Some("a demotion is draining writes".into());
        }
        if self.fenced {
            let waiting: Vec<&str> = self
                .peers
                .iter()
                .filter(|p| self.meta.protecting(p.name()) && !p.contacted)
                .map(|p| p.name())
                .collect();
            return Some(format!(
                "fenced after a restart: waiting to hear from {} (a peer may have been promoted meanwhile); `ferry promote {}` on this node overrides",
                waiting.join(", "),
                self.volume()
            ));
        }
        if self.holding {
            return Some("a resync is handing over".into());
        }
        None
    }

    /// `(journal, durable)`: every record up to these LSNs may complete (see the module doc).
    /// Never goes back.
    pub fn settled(&mut self) -> (u64, u64) {
        if self.role != Role::Primary && !self.demoting {
            return self.settled_published;
        }
        let mut settled = (self.head_lsn, self.head_lsn);
        for peer in self.peers.iter().filter(|p| p.config.regional.is_none()) {
            let (journal, durable) = self.completion(peer);
            settled.0 = settled.0.min(journal);
            settled.1 = settled.1.min(durable);
        }
        self.settled_published.0 = self.settled_published.0.max(settled.0);
        self.settled_published.1 = self.settled_published.1.max(settled.1);
        self.settled_published
    }

    /// What one peer settles for completion: its acks, or marks (in memory: the journal keeps
    /// every record whose marks are not durable yet, see "Completion" in the module doc) where
    /// the peer cannot hold the generation and suspend does not hold writes.
    fn completion(&self, peer: &Peer) -> (u64, u64) {
        let mut by_marks = peer.covered_lsn.max(peer.covered_persisted_lsn);
        if self.suspend_holds(peer) || (self.demoting && peer.demotion_hold) {
            by_marks = peer.acked_durable_lsn;
        }
        let (generation, start) = self.persisted_generation();
        if peer.knows_generation >= generation {
            by_marks = by_marks.min(peer.acked_durable_lsn.max(start.saturating_sub(1)));
        }
        (
            peer.acked_journal_lsn.max(by_marks),
            peer.acked_durable_lsn.max(by_marks),
        )
    }

    fn suspend_holds(&self, peer: &Peer) -> bool {
        peer.config.on_disconnect == OnDisconnect::Suspend
            && self.meta.protecting(peer.name())
            && !peer.session.is_up()
    }

    /// The effective role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The journal head as the replicator knows it.
    pub fn head_lsn(&self) -> u64 {
        self.head_lsn
    }

    /// The stored metadata (what `VOLUME.meta` holds, not what is about to be stored).
    #[allow(clippy::misnamed_getters)]
    pub fn meta(&self) -> &Meta {
        &self.meta_persisted
    }

    /// The status for `ferry status` and `/metrics`.
    pub fn status(&self) -> ReplicatorStatus {
        ReplicatorStatus {
            role: self.role,
            generation: self.meta_persisted.lineage.current_generation(),
            consistent: self.meta_persisted.consistent && self.meta.consistent,
            writes_held: if self.role == Role::Primary {
                self.writes_held()
            } else {
                None
            },
            failed: self.failed.clone(),
            resolving_with: self.meta.resolving_with.clone(),
            following: self
                .peers
                .iter()
                .find(|p| p.is_my_primary && p.session.is_up())
                .map(|p| p.name().to_owned()),
            peers: (0..self.peers.len()).map(|p| self.peer_status(p)).collect(),
        }
    }

    fn peer_state(&self, p: usize) -> ReplicaState {
        let peer = &self.peers[p];
        if peer.split_brain {
            return ReplicaState::SplitBrain;
        }
        if peer.regional.paused {
            return ReplicaState::Paused;
        }
        if !peer.session.is_up() {
            return match self.role {
                // Regional: what it lacks is tracked for a delta resync (until the first
                // handshake of this run, nothing says it lacks anything).
                Role::Primary if peer.config.regional.is_some() => {
                    if peer.contacted || peer.regional.lag.bytes() > 0 {
                        ReplicaState::Degraded
                    } else {
                        ReplicaState::Connecting
                    }
                }
                // Fenced: nothing is tracked as lost yet, writes wait for this peer's word.
                Role::Primary if self.fenced && !peer.contacted => ReplicaState::Connecting,
                Role::Primary if self.meta.protecting(peer.name()) => {
                    if peer.config.on_disconnect == OnDisconnect::Suspend {
                        ReplicaState::Suspended
                    } else {
                        ReplicaState::Degraded
                    }
                }
                _ => ReplicaState::Connecting,
            };
        }
        let full = peer.resync_out.as_ref().is_some_and(|r| r.full)
            || peer.resync_in.as_ref().is_some_and(|r| r.full);
        // A resync whose end is sent is over for shipping, but the peer is in sync only once
        // it holds the end durably (and the map is cleared).
        let resync_pending = peer.resync_out.is_some() || peer.resync_in.is_some();
        match peer.plan {
            Some(Plan::Ship { .. }) | Some(Plan::Receive { .. }) if resync_pending => {
                if full {
                    ReplicaState::Syncing
                } else {
                    ReplicaState::Resyncing
                }
            }
            Some(Plan::Ship { .. }) if self.role == Role::Primary => match peer.config.regional {
                Some(config)
                    if regional::behind_schedule(peer.regional.lag.seconds(self.now), config) =>
                {
                    ReplicaState::Lagging
                }
                _ => ReplicaState::InSync,
            },
            Some(Plan::Ship { .. }) | Some(Plan::Receive { .. }) => ReplicaState::InSync,
            // A primary's peer that takes nothing from it (it must step down first, or a
            // resync left it inconsistent): its writes are tracked, as for a lost peer.
            Some(Plan::Idle) if self.role == Role::Primary => {
                if peer.config.regional.is_some() || self.meta.protecting(peer.name()) {
                    ReplicaState::Degraded
                } else {
                    ReplicaState::Connecting
                }
            }
            Some(Plan::Idle) => ReplicaState::Standby,
            _ => ReplicaState::Connecting,
        }
    }

    fn peer_status(&self, p: usize) -> PeerStatus {
        let peer = &self.peers[p];
        let state = self.peer_state(p);
        let unconfirmed: u64 = self
            .tail
            .iter()
            .filter(|r| r.lsn > peer.acked_durable_lsn)
            .map(|r| r.len_bytes)
            .sum();
        let regional = peer.config.regional.is_some() && self.role == Role::Primary;
        let lag_bytes = if regional {
            // The map holds every record not confirmed too; the records' own count is the
            // better figure while shipping keeps up.
            match state {
                ReplicaState::InSync | ReplicaState::Lagging => peer.regional.lag.bytes(),
                _ => peer.regional.lag.bytes().max(peer.map.dirty_bytes()),
            }
        } else if state == ReplicaState::InSync {
            unconfirmed
        } else {
            unconfirmed + peer.map.dirty_bytes()
        };
        let resync_remaining_bytes = peer.resync_out.as_ref().map_or(0, |r| {
            r.todo.bytes() + r.reads.values().map(|(_, len)| len).sum::<u64>()
        });
        // A range leaves `todo` for `reads` when its read is issued and is counted in
        // `sent_bytes` when the read completes, so the sum never counts a range twice.
        let resync_total_bytes = peer
            .resync_out
            .as_ref()
            .filter(|r| r.started)
            .map_or(0, |r| r.sent_bytes + resync_remaining_bytes);
        PeerStatus {
            peer: peer.name().to_owned(),
            state,
            acked_lsn: peer.acked_journal_lsn,
            durable_lsn: peer.acked_durable_lsn,
            lag_bytes,
            resync_remaining_bytes,
            resync_total_bytes,
            resynced_bytes: peer.resynced_bytes,
            resyncs_completed: peer.resyncs_completed,
            last_resync_full: peer.last_resync_full,
            last_error: if state == ReplicaState::InSync {
                None
            } else {
                peer.last_error.clone()
            },
            dirty_bytes: peer.map.dirty_bytes(),
            verify: peer.verify.as_ref().map(|v| self.verify_status(v)),
            protecting: self.meta.protecting(peer.name()),
            lag_seconds: regional.then(|| peer.regional.lag.seconds(self.now)),
            coalesced_bytes: peer.regional.open.coalesced_bytes,
            fell_behind: peer.regional.fell_behind,
            catch_up: peer.resync_in.as_ref().filter(|r| !r.full).map(|r| {
                if r.staged {
                    "staged"
                } else {
                    "in-place"
                }
            }),
        }
    }
}

#[cfg(test)]
impl Replicator {
    /// Why peer `p` settles what it settles, for traces.
    pub(crate) fn explain(&self, p: usize) -> String {
        let peer = &self.peers[p];
        format!(
            "completion {:?} acked ({}, {}) covered {} persisted {} knows {:#x} gen {:?} confirming {} suspend {}",
            self.completion(peer),
            peer.acked_journal_lsn,
            peer.acked_durable_lsn,
            peer.covered_lsn,
            peer.covered_persisted_lsn,
            peer.knows_generation,
            self.persisted_generation(),
            self.confirming(p),
            self.suspend_holds(peer)
        )
    }

    /// Whether a plain `ferry promote` would be refused now because a peer is known to hold
    /// newer writes (the settling operator's choice of copy).
    pub(crate) fn would_refuse_promote(&self) -> bool {
        self.role == Role::Secondary && self.newer_peer().is_some()
    }

    /// What peer `p` acknowledged: (journal, durable).
    pub(crate) fn acked_by(&self, p: usize) -> (u64, u64) {
        (
            self.peers[p].acked_journal_lsn,
            self.peers[p].acked_durable_lsn,
        )
    }

    /// Whether peer `p`'s map marks the block at `offset_bytes` (memory, persisted-through).
    pub(crate) fn marked(&self, p: usize, offset_bytes: u64) -> (bool, u64, u64, MapState) {
        let peer = &self.peers[p];
        (
            peer.map.is_marked(offset_bytes),
            peer.covered_lsn,
            peer.acked_durable_lsn,
            peer.map_state,
        )
    }

    /// The resyncs this copy received since the last call: (sender, LSN, resolution).
    pub(crate) fn take_adoptions(&mut self) -> Vec<(usize, u64, bool)> {
        std::mem::take(&mut self.adoptions)
    }
}
