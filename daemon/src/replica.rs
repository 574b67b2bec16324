//! Metro replication of one volume to its peers: the glue between the journal, the sans-IO
//! [`Session`] of each (volume, peer) and the QUIC stream that carries it.
//!
//! Write path (primary). The journal writer calls [`JournalTap::record`] as it gives a record
//! its LSN, so the send to every peer starts together with the local journal write. Per
//! replica, a record is either *shipped* (the session is replicating records and this is the
//! next LSN) or *marked* in the replica's persistent dirty map. A client's write completes when
//! the journal has it and, for every metro replica, the record is *settled*: acknowledged into
//! the peer's journal (durable, for FUA and FLUSH), or marked in a dirty map that has been
//! made durable. The second case is the "degrade" policy; with `on_disconnect = "suspend"` a
//! replica that was in sync does not settle by marking, so writes wait until it is back.
//!
//! What a peer may lack is always known durably, which is what makes every resync a delta:
//! - records shipped but not durably acknowledged stay in memory (`pending`) *and* in the
//!   journal: the applier may not release a record until every replica has it durably or has
//!   it in its persisted dirty map (the apply limit);
//! - when the peer is lost, `pending` goes into the dirty map, which is persisted before any
//!   further write completes; every write after that is marked;
//! - after a crash, recovery hands the ranges of every replayed record to the dirty maps
//!   before it empties the ring (`on_replayed` in [`Volume::open`]).
//!
//! Resync (the copy that is ahead). The session decides at each handshake (generation
//! histories, see `ferry_protocol::generation`). A resync sends the dirty map's blocks (read
//! through the volume, so the newest data) while writes go on: a write during the resync marks
//! its blocks again, and the blocks are sent again. The resync ends, under the replica lock, at
//! the moment nothing is left to send: every record up to the last LSN tapped is then at the
//! peer, so `end_resync(last LSN)` hands over to record shipping without holding writes.
//! The dirty map is cleared only when the peer has the end of the resync durably.
//!
//! Receiving side (secondary). Records go into the local journal under the primary's LSNs
//! and are acknowledged when journaled; durability is acknowledged after a journal fdatasync
//! (on request, and every [`DURABLE_ACK_INTERVAL`] so the primary can release its journal).
//! A resync first applies and empties the local journal, marks the copy inconsistent (it may
//! not be promoted), writes the blocks straight to the device, and at its end makes the
//! device durable, restarts the journal at the primary's LSN and adopts its lineage.
//!
//! Generations. The primary starts a new generation when it starts, when it is promoted, and
//! when a metro peer leaves in-sync: any write it accepts without its peer is then in a
//! generation the peer does not know, so a copy promoted meanwhile meets it as a split brain,
//! never as something to overwrite silently.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use ferry_protocol::generation::{GenerationInfo, Role as GenRole};
use ferry_protocol::journal::RecordKind;
use ferry_protocol::repl::{
    self, DirtyRange, Message, ResyncKind, WriteRecord, MAX_DIRTY_RANGES_PER_FRAME,
};
use ferry_protocol::session::{
    OnDisconnect as SessionOnDisconnect, ReplicaState, Session, SessionConfig, SessionEvent,
};
use quinn::{Connection, RecvStream, SendStream};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, watch, Notify};

use crate::config::{OnDisconnect, ReplicaMode, Role, VolumeConfig};
use crate::control::ReplicaStatus;
use crate::dirty::DirtyMap;
use crate::journal::{JournalTap, Op};
use crate::metrics::{ReplicaMetrics, VolumeMetrics};
use crate::nbd::{BoxFuture, Export, ExportError};
use crate::storage::AlignedBuf;
use crate::transport;
use crate::volume::{Lineage, Volume, WriteGate};

/// Bytes shipped and not yet acknowledged per replica before the session pushes back.
const MAX_INFLIGHT_BYTES: u64 = 64 << 20;
/// Largest resync message: big enough for disk speed, small enough to interleave.
const RESYNC_CHUNK_BYTES: u64 = 1 << 20;
/// A secondary makes its journal durable at least this often while records arrive, so the
/// primary's apply limit keeps moving.
const DURABLE_ACK_INTERVAL: Duration = Duration::from_millis(20);
/// Longest zero range one resync message carries.
const MAX_ZERO_RUN_BYTES: u64 = 1 << 30;
/// How often the replica task recomputes the lag gauges.
const METRICS_REFRESH: Duration = Duration::from_millis(200);
/// A resync holds new writes for its hand-over once at most this much is left to send.
const HANDOVER_HOLD_BYTES: u64 = 2 << 20;
/// The replica task checks its session's timers at least this often.
const TIMER_GRANULARITY: Duration = Duration::from_millis(10);
/// Wait before reopening a volume stream that closed on a live connection.
const REOPEN_DELAY: Duration = Duration::from_millis(200);
/// Set to N to corrupt the N-th write frame this node sends (after its CRC is computed): the
/// fault the corrupt-frame test injects, since QUIC's own integrity checks never let a flipped
/// bit through the network.
pub const FAULT_CORRUPT_FRAME_ENV: &str = "FERRY_FAULT_CORRUPT_FRAME";

/// The metro replication of one volume.
pub struct VolumeReplication {
    volume: Arc<Volume>,
    node: String,
    replicas: Vec<Arc<Replica>>,
    /// The next write made while a metro peer is not in sync starts a new generation (set at
    /// start and when a peer is lost; cleared when a peer is in sync, since it then shares
    /// this copy's lineage).
    needs_generation: Arc<AtomicBool>,
    /// The tap ships or marks records: true while primary, and until a demotion has drained
    /// every write that passed the volume's role check (so none is left neither shipped nor
    /// marked).
    tapping: Arc<AtomicBool>,
}

/// One (volume, peer) replica.
pub struct Replica {
    peer: String,
    node: String,
    volume: Arc<Volume>,
    volume_metrics: VolumeMetrics,
    metrics: ReplicaMetrics,
    on_disconnect: OnDisconnect,
    peer_timeout: Duration,
    /// `resync_max_rate`: resync data bytes per second to this peer.
    resync_max_rate_bytes_per_s: Option<u64>,
    /// This node opens the volume's stream (the smaller node name does); the other accepts.
    opener: bool,
    inner: Mutex<Inner>,
    /// Wakes the replica's task: events to handle, a stream to attach, a resync to pump.
    wake: Notify,
    /// (journal, durable): every record up to these LSNs is settled for this replica.
    settled: watch::Sender<(u64, u64)>,
    /// Siblings, to recompute the volume's apply limit.
    limits: Mutex<Option<Arc<LimitShared>>>,
    /// Shared with the volume's replication (see `VolumeReplication::needs_generation`).
    needs_generation: Arc<AtomicBool>,
    /// Shared with the volume's replication (see `VolumeReplication::tapping`).
    tapping: Arc<AtomicBool>,
    /// When the oldest write the peer does not have was made (the live RPO while not in
    /// sync); None when in sync.
    oldest_unsynced: Mutex<Option<Instant>>,
    /// Whether new writes may enter the journal (see `WriteGate::admit`).
    admits: watch::Sender<bool>,
    /// A primary that started holds writes until it has heard from this peer or
    /// peer_timeout has passed: the peer may have been promoted meanwhile.
    started_at: Instant,
    contacted: AtomicBool,
    /// Writes are held for a resync's final hand-over.
    holding: AtomicBool,
    /// When the lag gauges were last computed.
    metrics_refreshed: Mutex<Option<Instant>>,
}

/// The apply limit is the minimum over the volume's replicas.
struct LimitShared {
    volume: Arc<Volume>,
    replicas: Vec<Arc<Replica>>,
}

struct Inner {
    session: Session,
    dirty: DirtyMap,
    /// A dirty-map persist job is running.
    persisting: bool,
    /// The newest LSN whose mark is not yet persisted (a persist must run).
    unpersisted_lsn: Option<u64>,
    /// Every record up to here that was not shipped is in the persisted dirty map.
    persisted_lsn: u64,
    /// The newest LSN the tap has seen.
    last_tapped: u64,
    /// Records waiting for room in the session's window, in LSN order.
    queue: VecDeque<WriteRecord>,
    /// Shipped and not durably acknowledged: (lsn, offset, len, shipped at).
    pending: VecDeque<(u64, u64, u64, Instant)>,
    acked_journal: u64,
    acked_durable: u64,
    resync: Option<Resync>,
    resync_remaining_bytes: u64,
    resynced_bytes: u64,
    /// The current stream's outgoing queue and its id.
    stream: Option<(u64, mpsc::UnboundedSender<Message>)>,
    next_stream_id: u64,
    connection: Option<Connection>,
    reopen_at: Option<Instant>,
    /// The peer's hello of the current connection (its lineage, for adopting after a resync).
    peer_generation: Option<GenerationInfo>,
    /// Receiving side.
    journaled_lsn: u64,
    flush_wanted: u64,
    durable_requested: u64,
    flush_running: bool,
    last_error: Option<String>,
    /// The state last reported to the log and metrics.
    reported_state: ReplicaState,
    /// The peer's role, from its hello and its role changes.
    peer_role_cache: Option<GenRole>,
    /// The next loss of the peer starts no generation (one was just started on purpose).
    skip_generation_on_loss: bool,
    /// The last refused TLS handshake with this peer, until a handshake succeeds.
    auth_error: Option<String>,
}

/// A resync this node is sending.
struct Resync {
    kind: ResyncKind,
    /// Waiting for the peer's dirty ranges (it must roll back) before starting.
    waiting_for_peer_ranges: bool,
    started: bool,
    /// Blocks still to send.
    todo: RangeSet,
    /// `end_resync` was sent at this LSN; cleared of the dirty map once durable at the peer.
    ended_at: Option<u64>,
    /// Bytes the resync covered (data and zero ranges).
    sent_bytes: u64,
    /// Data bytes sent, and since when, for the rate cap.
    data_bytes: u64,
    started_at: Instant,
    /// What the first pass has to send (the dirty map when the resync started).
    first_pass_bytes: u64,
    /// Zero chunks read and not sent yet, merged into one range.
    zero_run: Option<(u64, u64)>,
}

impl VolumeReplication {
    /// Sets up replication for `volume` from its config. Must run before the volume serves
    /// writes (the dirty maps must be open before the journal's records can be released).
    pub fn new(
        volume: Arc<Volume>,
        config: &VolumeConfig,
        node: &str,
        dirty_maps: Vec<(String, DirtyMap)>,
        volume_metrics: VolumeMetrics,
        metrics: impl Fn(&str) -> ReplicaMetrics,
    ) -> Arc<VolumeReplication> {
        let lineage = volume.lineage();
        let head = lineage.generation.head_lsn;
        let mut maps: BTreeMap<String, DirtyMap> = dirty_maps.into_iter().collect();
        let mut replicas = Vec::new();
        let needs_generation = Arc::new(AtomicBool::new(false));
        let tapping = Arc::new(AtomicBool::new(volume.role() == Role::Primary));
        for replica in &config.replicas {
            let ReplicaMode::Metro {
                on_disconnect,
                peer_timeout,
                resync_max_rate_bytes_per_s,
            } = replica.mode
            else {
                continue;
            };
            let dirty = maps
                .remove(&replica.peer)
                .expect("a dirty map per metro replica");
            let session = Session::new(
                SessionConfig {
                    node: node.to_string(),
                    peer: replica.peer.clone(),
                    volume: volume.name().to_string(),
                    size_bytes: volume.size_bytes(),
                    peer_timeout,
                    on_disconnect: match on_disconnect {
                        OnDisconnect::Degrade => SessionOnDisconnect::Degrade,
                        OnDisconnect::Suspend => SessionOnDisconnect::Suspend,
                    },
                    max_inflight_bytes: MAX_INFLIGHT_BYTES,
                },
                gen_role(lineage.role),
                lineage.generation.clone(),
                Instant::now(),
            );
            let replica_metrics = metrics(&replica.peer);
            replica_metrics.set_state(ReplicaState::Connecting.as_str());
            replicas.push(Arc::new(Replica {
                peer: replica.peer.clone(),
                node: node.to_string(),
                volume: volume.clone(),
                volume_metrics: volume_metrics.clone(),
                metrics: replica_metrics,
                on_disconnect,
                peer_timeout,
                resync_max_rate_bytes_per_s,
                opener: node < replica.peer.as_str(),
                inner: Mutex::new(Inner {
                    session,
                    dirty,
                    persisting: false,
                    unpersisted_lsn: None,
                    // Recovery recorded every replayed record in the dirty maps; everything
                    // older was durable at the peers or recorded before.
                    persisted_lsn: head,
                    last_tapped: head,
                    queue: VecDeque::new(),
                    pending: VecDeque::new(),
                    acked_journal: 0,
                    acked_durable: 0,
                    resync: None,
                    resync_remaining_bytes: 0,
                    resynced_bytes: 0,
                    stream: None,
                    next_stream_id: 1,
                    connection: None,
                    reopen_at: None,
                    peer_generation: None,
                    journaled_lsn: head,
                    flush_wanted: 0,
                    durable_requested: 0,
                    flush_running: false,
                    last_error: None,
                    reported_state: ReplicaState::Connecting,
                    peer_role_cache: None,
                    skip_generation_on_loss: false,
                    auth_error: None,
                }),
                wake: Notify::new(),
                settled: watch::channel((head, head)).0,
                limits: Mutex::new(None),
                needs_generation: needs_generation.clone(),
                tapping: tapping.clone(),
                oldest_unsynced: Mutex::new(None),
                admits: watch::channel(lineage.role != Role::Primary).0,
                started_at: Instant::now(),
                contacted: AtomicBool::new(lineage.role != Role::Primary),
                holding: AtomicBool::new(false),
                metrics_refreshed: Mutex::new(None),
            }));
        }
        let limits = Arc::new(LimitShared {
            volume: volume.clone(),
            replicas: replicas.clone(),
        });
        for replica in &replicas {
            *replica.limits.lock().expect("limits lock") = Some(limits.clone());
        }
        let replication = Arc::new(VolumeReplication {
            volume: volume.clone(),
            node: node.to_string(),
            replicas,
            needs_generation,
            tapping,
        });
        limits.update();
        if !replication.replicas.is_empty() {
            volume.set_journal_tap(Some(replication.clone()));
            volume.set_write_gate(replication.clone());
        }
        replication
    }

    pub fn replicas(&self) -> &[Arc<Replica>] {
        &self.replicas
    }

    /// Starts each replica's task.
    pub fn start(self: &Arc<Self>) {
        for replica in &self.replicas {
            tokio::spawn(replica.clone().run());
        }
    }

    /// A primary that starts before its peers are in sync writes its first record in a new
    /// generation (see the module doc).
    pub fn arm_generation_at_start(&self) {
        if self.volume.role() == Role::Primary && !self.replicas.is_empty() {
            self.needs_generation.store(true, Ordering::SeqCst);
        }
    }

    /// In the tap: starts a generation at `lsn` when writes go on without a peer in sync.
    fn generation_before_write(&self, lsn: u64) {
        // Needed only while some peer is not even connected: a connected peer is being
        // resynced (it cannot be promoted while inconsistent) and, once in sync, shares this
        // copy's lineage. Starting a generation under a connected peer would also leave it
        // adopting a stale history at the end of its resync.
        if !self.needs_generation.load(Ordering::SeqCst)
            || self
                .replicas
                .iter()
                .all(|r| r.lock().peer_generation.is_some())
        {
            return;
        }
        // The journal's index lock is held here: the stored lineage, with the head set to
        // the record before this one.
        let mut lineage = self.volume.stored_lineage();
        lineage.generation.head_lsn = lsn - 1;
        if let Err(error) = lineage.generation.start_generation(&self.node, 0) {
            tracing::error!(volume = %self.volume.name(), %error, "cannot start a generation for writes without the peer");
            return;
        }
        if let Err(error) = self.volume.set_lineage(lineage.clone()) {
            tracing::error!(volume = %self.volume.name(), %error, "cannot persist a generation for writes without the peer");
            return;
        }
        self.needs_generation.store(false, Ordering::SeqCst);
        tracing::info!(volume = %self.volume.name(), generation = format_args!("{:#x}", lineage.generation.current_generation()), start_lsn = lsn, "writes continue without the peer in a new generation");
        for replica in &self.replicas {
            let mut inner = replica.lock();
            inner
                .session
                .set_local(GenRole::Primary, lineage.generation.clone());
        }
    }

    fn new_generation(&self, role: Role) -> Result<(), String> {
        new_generation(&self.volume, &self.node, role)?;
        let lineage = self.volume.lineage();
        for replica in &self.replicas {
            let mut inner = replica.lock();
            inner
                .session
                .set_local(gen_role(role), lineage.generation.clone());
            replica.flush_transmits(&mut inner);
        }
        Ok(())
    }

    /// Replica statuses for `ferry status`.
    pub fn status(&self) -> Vec<ReplicaStatus> {
        self.replicas.iter().map(|r| r.status()).collect()
    }

    /// `ferry promote`: see SPEC §3.
    pub async fn promote(&self, force: bool) -> Result<u64, (&'static str, String)> {
        let lineage = self.volume.lineage();
        if lineage.role == Role::Primary {
            return Ok(lineage.generation.current_generation());
        }
        if !lineage.consistent || lineage.generation.is_empty() {
            return Err((
                "not-consistent",
                format!(
                    "volume {} is not consistent here (a resync to it has not finished); promoting it would serve a mix of old and new blocks",
                    self.volume.name()
                ),
            ));
        }
        for replica in &self.replicas {
            if !force {
                // A peer that still looks connected may just have died: give the session
                // peer_timeout to notice. A live primary keeps the link up all along and is
                // refused below; --force skips the wait (the operator knows it is gone).
                let deadline = tokio::time::Instant::now() + replica.peer_timeout;
                while replica.lock().peer_is_primary() && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            // --force: the operator asserts the primary is gone, even if this node has not
            // noticed yet (peer_timeout has not passed since its last message).
            if !force && replica.lock().peer_is_primary() {
                return Err((
                    "peer-is-primary",
                    format!(
                        "peer {} is primary for {} and reachable; demote it first (ferry demote {} on {})",
                        replica.peer,
                        self.volume.name(),
                        self.volume.name(),
                        replica.peer
                    ),
                ));
            }
        }
        // What this copy holds is all the peer's or less: nothing to mark. Records it writes
        // from now on are tracked like any primary's; the tap is on before the role lets the
        // first write in.
        let head = self.volume.lineage().generation.head_lsn;
        for replica in &self.replicas {
            replica.rebase(head);
        }
        self.tapping.store(true, Ordering::SeqCst);
        self.new_generation(Role::Primary)
            .map_err(|e| ("internal", e))?;
        for replica in &self.replicas {
            let mut inner = replica.lock();
            // A planned promotion (peer connected) must not count as losing the peer.
            inner.skip_generation_on_loss = inner.peer_generation.is_some();
            replica.restart_stream(&mut inner, "promoted");
        }
        self.update_limits();
        let generation = self.volume.generation();
        tracing::info!(volume = %self.volume.name(), generation = format_args!("{generation:#x}"), force, "promoted to primary");
        Ok(generation)
    }

    /// `ferry demote`: stop accepting writes, drain them, become secondary.
    pub async fn demote(&self) -> Result<(), (&'static str, String)> {
        let mut lineage = self.volume.lineage();
        if lineage.role == Role::Secondary {
            return Ok(());
        }
        // New writes are refused from here on; the ones already past the role check still
        // go through the tap (shipped or marked) and are drained before the role is stored.
        self.volume.refuse_writes();
        for replica in &self.replicas {
            replica.release_admission();
        }
        self.volume.drain_writes().await;
        lineage.role = Role::Secondary;
        self.volume
            .set_lineage(lineage.clone())
            .map_err(|e| ("internal", e.to_string()))?;
        self.tapping.store(false, Ordering::SeqCst);
        let lineage = self.volume.lineage();
        for replica in &self.replicas {
            replica.rebase(lineage.generation.head_lsn);
            let mut inner = replica.lock();
            inner
                .session
                .set_local(GenRole::Secondary, lineage.generation.clone());
            inner.journaled_lsn = lineage.generation.head_lsn;
            replica.restart_stream(&mut inner, "demoted");
        }
        self.update_limits();
        tracing::info!(volume = %self.volume.name(), "demoted to secondary");
        Ok(())
    }

    fn update_limits(&self) {
        if let Some(replica) = self.replicas.first() {
            if let Some(limits) = replica.limits.lock().expect("limits lock").clone() {
                limits.update();
            }
        }
    }

    /// Clean shutdown: tell the peers, and let the journal apply everything.
    pub async fn close(&self) {
        for replica in &self.replicas {
            let mut inner = replica.lock();
            inner.last_error = Some("this node is shutting down".into());
            inner.session.close("node shutting down", Instant::now());
            replica.report_state(&mut inner);
            replica.flush_transmits(&mut inner);
            drop(inner);
            // What was shipped and not durably acknowledged goes into the dirty map now: the
            // journal is about to be applied and emptied.
            replica.peer_lost_inner(false);
        }
        // Persist the dirty maps, then let the journal drain.
        let mut all_persisted = true;
        for replica in &self.replicas {
            let job = replica.lock().dirty.prepare_persist();
            if let Some(job) = job {
                if let Err(error) = tokio::task::spawn_blocking(move || job.run())
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
                {
                    tracing::error!(volume = %self.volume.name(), peer = %replica.peer, %error, "persisting the dirty map at shutdown failed; the journal keeps what the peer may lack");
                    all_persisted = false;
                    continue;
                }
            }
            let mut inner = replica.lock();
            inner.persisted_lsn = inner.last_tapped;
            inner.unpersisted_lsn = None;
        }
        if all_persisted {
            self.volume.set_apply_limit(u64::MAX);
        }
    }
}

fn gen_role(role: Role) -> GenRole {
    match role {
        Role::Primary => GenRole::Primary,
        Role::Secondary => GenRole::Secondary,
    }
}

/// Starts a new generation on `node` and persists it with `role`.
fn new_generation(volume: &Volume, node: &str, role: Role) -> Result<(), String> {
    let mut lineage = volume.lineage();
    lineage
        .generation
        .start_generation(node, 0)
        .map_err(|e| e.to_string())?;
    lineage.role = role;
    volume.set_lineage(lineage).map_err(|e| e.to_string())
}

impl JournalTap for VolumeReplication {
    fn record(&self, lsn: u64, op: &Op, fua: bool) {
        // A secondary's journal holds the primary's records: nothing to ship or track.
        if !self.tapping.load(Ordering::SeqCst) {
            return;
        }
        self.generation_before_write(lsn);
        for replica in &self.replicas {
            replica.tap(lsn, op, fua);
        }
    }
}

impl WriteGate for VolumeReplication {
    fn admit(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            for replica in &self.replicas {
                let mut rx = replica.admits.subscribe();
                let _ = rx.wait_for(|admits| *admits).await;
            }
        })
    }

    fn settled(&self, lsn: u64, durable: bool) -> BoxFuture<'_, Result<(), ExportError>> {
        Box::pin(async move {
            // A secondary's journal holds its primary's records (a FLUSH on its read-only
            // export): its peers owe it nothing.
            if !self.tapping.load(Ordering::SeqCst) {
                return Ok(());
            }
            let started = Instant::now();
            if durable {
                // A FLUSH (FUA records carry their own flag): ask the peers for durability.
                for replica in &self.replicas {
                    let mut inner = replica.lock();
                    if inner.acked_durable < lsn && inner.session.flush(lsn).is_ok() {
                        replica.flush_transmits(&mut inner);
                    }
                }
            }
            for replica in &self.replicas {
                let mut rx = replica.settled.subscribe();
                let _ = rx
                    .wait_for(|(journal, durable_lsn)| {
                        if durable {
                            *durable_lsn >= lsn
                        } else {
                            *journal >= lsn
                        }
                    })
                    .await;
            }
            if let Some(replica) = self.replicas.first() {
                replica
                    .metrics
                    .write_latency_replica
                    .observe(started.elapsed().as_secs_f64());
            }
            Ok(())
        })
    }
}

impl LimitShared {
    fn update(&self) {
        let limit = self
            .replicas
            .iter()
            .map(|r| r.apply_limit())
            .min()
            .unwrap_or(u64::MAX);
        self.volume.set_apply_limit(limit);
    }
}

impl Inner {
    fn session_up(&self) -> bool {
        self.peer_generation.is_some()
            && !matches!(
                self.session.state(),
                ReplicaState::Connecting
                    | ReplicaState::Degraded
                    | ReplicaState::Suspended
                    | ReplicaState::Paused
            )
    }

    fn peer_role(&self) -> Option<GenRole> {
        self.peer_role_cache
    }

    /// The first record shipped (or queued to ship) and not durably acknowledged.
    fn first_unacked(&self) -> Option<u64> {
        self.pending
            .front()
            .map(|p| p.0)
            .into_iter()
            .chain(self.queue.front().map(|r| r.lsn))
            .min()
    }

    /// Records up to here are settled by the persisted dirty map. A record shipped and not
    /// durably acknowledged (in `pending` or `queue`) is not in the map until the loss of the
    /// peer moves it there, so it bounds what marks can settle.
    fn settled_by_marks(&self) -> u64 {
        match self.first_unacked() {
            Some(lsn) => self.persisted_lsn.min(lsn - 1),
            None => self.persisted_lsn,
        }
    }

    /// The peer is connected, past the handshake, and primary.
    fn peer_is_primary(&self) -> bool {
        self.session_up() && self.peer_role() == Some(GenRole::Primary)
    }
}

impl Replica {
    pub fn peer(&self) -> &str {
        &self.peer
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().expect("replica lock")
    }

    /// Recomputes whether writes may enter (see `admits`).
    fn update_admission(&self) {
        let admits = self.contacted.load(Ordering::SeqCst) && !self.holding.load(Ordering::SeqCst);
        self.admits.send_if_modified(|current| {
            let changed = *current != admits;
            *current = admits;
            changed
        });
    }

    /// Startup hold: released once the peer answered a handshake or peer_timeout passed.
    fn check_contact(&self, inner: &Inner) {
        if self.contacted.load(Ordering::SeqCst) {
            return;
        }
        let heard = inner.peer_generation.is_some();
        let timed_out = self.started_at.elapsed() >= self.peer_timeout;
        if heard || timed_out {
            if timed_out && !heard {
                tracing::warn!(volume = %self.volume.name(), peer = %self.peer, "peer not reachable within peer_timeout of the start: serving writes without it");
            }
            self.contacted.store(true, Ordering::SeqCst);
            self.update_admission();
        }
    }

    /// Forgets the shipping bookkeeping of an earlier role or journal position: the journal
    /// now continues after `head` (a promotion, a demotion, or a received resync that moved
    /// the journal, possibly backwards).
    fn rebase(&self, head: u64) {
        let mut inner = self.lock();
        inner.last_tapped = head;
        inner.persisted_lsn = head;
        inner.unpersisted_lsn = None;
        inner.acked_journal = inner.acked_journal.min(head);
        inner.acked_durable = inner.acked_durable.min(head);
        inner.pending.clear();
        inner.queue.clear();
        inner.journaled_lsn = head;
        inner.durable_requested = inner.durable_requested.min(head);
        inner.flush_wanted = inner.flush_wanted.min(head);
        self.settled.send_replace((head, head));
    }

    /// Lets every held write through (to find the volume demoted and fail read-only).
    fn release_admission(&self) {
        self.contacted.store(true, Ordering::SeqCst);
        self.holding.store(false, Ordering::SeqCst);
        self.update_admission();
    }

    fn set_holding(&self, holding: bool) {
        if self.holding.swap(holding, Ordering::SeqCst) != holding {
            self.update_admission();
        }
    }

    /// Records above this LSN must stay in the journal for this replica.
    fn apply_limit(&self) -> u64 {
        let inner = self.lock();
        if self.volume.role() != Role::Primary {
            return u64::MAX;
        }
        inner.acked_durable.max(inner.settled_by_marks())
    }

    fn update_limits(&self) {
        let limits = self.limits.lock().expect("limits lock").clone();
        if let Some(limits) = limits {
            limits.update();
        }
    }

    /// The journal tap (see the module doc). Runs in the journal writer, under its index lock.
    fn tap(&self, lsn: u64, op: &Op, fua: bool) {
        let mut inner = self.lock();
        inner.last_tapped = inner.last_tapped.max(lsn);
        let (offset, len) = op_range(op);
        self.metrics.logical_bytes_total.inc_by(len);
        let ships = !inner.queue.is_empty() || inner.session.next_ship_lsn() == Some(lsn);
        let resyncing = inner.resync.as_ref().is_some_and(|r| r.ended_at.is_none());
        if ships && !resyncing {
            let record = to_record(lsn, op, fua);
            inner.queue.push_back(record);
            self.pump_queue(&mut inner);
        } else {
            inner.session.note_local_head(lsn);
            self.mark(&mut inner, lsn, offset, len);
        }
        self.flush_transmits(&mut inner);
        self.refresh_settled(&mut inner);
    }

    /// Marks a record's blocks dirty (and for the running resync).
    fn mark(&self, inner: &mut Inner, lsn: u64, offset: u64, len: u64) {
        if let Some(resync) = &mut inner.resync {
            if resync.started && resync.ended_at.is_none() {
                resync.todo.insert(offset, len);
            }
        }
        self.oldest_unsynced
            .lock()
            .expect("rpo lock")
            .get_or_insert_with(Instant::now);
        let new_bits = inner.dirty.mark(offset, len);
        if new_bits || inner.persisting || inner.unpersisted_lsn.is_some() {
            inner.unpersisted_lsn = Some(lsn);
        } else {
            inner.persisted_lsn = inner.persisted_lsn.max(lsn);
        }
        // The task persists, or at least moves the apply limit.
        self.wake.notify_one();
    }

    /// Marks every record still waiting to be shipped, in LSN order, and empties the queue.
    fn mark_queued(&self, inner: &mut Inner) {
        let queued: Vec<WriteRecord> = inner.queue.drain(..).collect();
        for record in queued {
            self.mark(
                inner,
                record.lsn,
                record.offset_bytes,
                record.len_bytes as u64,
            );
        }
    }

    /// Ships queued records while the session's window has room.
    fn pump_queue(&self, inner: &mut Inner) {
        let now = Instant::now();
        while let Some(record) = inner.queue.front() {
            let (lsn, offset, len) = (record.lsn, record.offset_bytes, record.len_bytes as u64);
            let record = record.clone();
            match inner.session.submit_write(record, now) {
                Ok(()) => {
                    inner.queue.pop_front();
                    inner.pending.push_back((lsn, offset, len, now));
                }
                Err(ferry_protocol::session::SessionError::Blocked { .. }) => break,
                Err(_) => {
                    // Not replicating any more: the queue becomes dirty blocks.
                    self.mark_queued(inner);
                    break;
                }
            }
        }
    }

    /// Moves what the session wants sent to the stream's writer.
    fn flush_transmits(&self, inner: &mut Inner) {
        while let Some(message) = inner.session.poll_transmit() {
            if let Some((_, tx)) = &inner.stream {
                let _ = tx.send(message);
            }
        }
    }

    /// Publishes the settled LSNs (see the module doc).
    fn refresh_settled(&self, inner: &mut Inner) {
        let holds = self.on_disconnect == OnDisconnect::Suspend
            && inner.session.state() == ReplicaState::Suspended;
        let by_marks = if holds { 0 } else { inner.settled_by_marks() };
        let journal = inner.acked_journal.max(by_marks);
        let durable = inner.acked_durable.max(by_marks);
        self.settled.send_if_modified(|settled| {
            let next = (settled.0.max(journal), settled.1.max(durable));
            let changed = next != *settled;
            *settled = next;
            changed
        });
    }

    fn status(&self) -> ReplicaStatus {
        let inner = self.lock();
        let now = Instant::now();
        let state = inner.session.state();
        let pending_bytes: u64 = inner.pending.iter().map(|p| p.2).sum::<u64>()
            + inner.queue.iter().map(|r| r.len_bytes as u64).sum::<u64>();
        let lag_bytes = if state == ReplicaState::InSync {
            pending_bytes
        } else {
            pending_bytes + inner.dirty.dirty_bytes()
        };
        let oldest = inner
            .pending
            .front()
            .map(|p| p.3)
            .into_iter()
            .chain(*self.oldest_unsynced.lock().expect("rpo lock"))
            .min();
        let lag_seconds = if state == ReplicaState::InSync && inner.pending.is_empty() {
            0.0
        } else {
            oldest.map_or(0.0, |at| now.duration_since(at).as_secs_f64())
        };
        self.metrics.lag_bytes.set(lag_bytes as i64);
        self.metrics.lag_seconds.set(lag_seconds);
        ReplicaStatus {
            peer: self.peer.clone(),
            mode: "metro".into(),
            state: state.as_str().into(),
            acked_lsn: inner.acked_journal,
            lag_bytes,
            lag_seconds,
            resync_remaining_bytes: inner.resync_remaining_bytes,
            resynced_bytes: inner.resynced_bytes,
            last_error: if state == ReplicaState::InSync {
                None
            } else {
                inner
                    .auth_error
                    .clone()
                    .or_else(|| inner.session.last_error().map(str::to_owned))
                    .or_else(|| inner.last_error.clone())
            },
        }
    }

    /// A new transport connection to the peer (or none).
    pub fn set_connection(&self, connection: Option<Connection>) {
        let mut inner = self.lock();
        inner.connection = connection;
        inner.reopen_at = Some(Instant::now());
        drop(inner);
        self.wake.notify_one();
    }

    /// The transport refused the peer's (or our) certificate.
    pub fn auth_refused(&self, reason: String) {
        let mut inner = self.lock();
        inner.auth_error = Some(reason);
    }

    /// Attaches a stream the peer opened for this volume.
    pub fn accept_stream(self: &Arc<Self>, send: SendStream, recv: RecvStream) {
        let mut inner = self.lock();
        self.attach(&mut inner, send, recv);
    }

    fn attach(self: &Arc<Self>, inner: &mut Inner, send: SendStream, recv: RecvStream) {
        if inner.stream.is_some() {
            inner.session.handle_disconnected(Instant::now());
            inner.stream = None;
            self.report_state(inner);
        }
        let id = inner.next_stream_id;
        inner.next_stream_id += 1;
        let (tx, rx) = mpsc::unbounded_channel();
        inner.stream = Some((id, tx));
        inner.peer_generation = None;
        tokio::spawn(write_loop(self.clone(), id, send, rx));
        tokio::spawn(read_loop(self.clone(), id, recv));
        inner.session.handle_connected(Instant::now());
        self.flush_transmits(inner);
        self.wake.notify_one();
    }

    /// Closes the current stream and lets a fresh handshake decide (after a role change).
    fn restart_stream(&self, inner: &mut Inner, why: &str) {
        inner.session.close(why, Instant::now());
        self.flush_transmits(inner);
        inner.stream = None;
        inner.peer_generation = None;
        inner.reopen_at = Some(Instant::now() + REOPEN_DELAY);
        self.report_state(inner);
        self.wake.notify_one();
    }

    fn stream_closed(&self, id: u64, why: String) {
        let mut inner = self.lock();
        if inner.stream.as_ref().map(|s| s.0) != Some(id) {
            return;
        }
        inner.stream = None;
        inner.peer_generation = None;
        inner.last_error.get_or_insert(why);
        inner.session.handle_disconnected(Instant::now());
        inner.reopen_at = Some(Instant::now() + REOPEN_DELAY);
        drop(inner);
        self.wake.notify_one();
    }

    fn incoming(&self, id: u64, message: Message) {
        let mut inner = self.lock();
        if inner.stream.as_ref().map(|s| s.0) != Some(id) {
            return;
        }
        inner.session.handle_message(message, Instant::now());
        self.flush_transmits(&mut inner);
        drop(inner);
        self.wake.notify_one();
    }

    async fn run(self: Arc<Self>) {
        let mut durable_tick = tokio::time::interval(DURABLE_ACK_INTERVAL);
        durable_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let timeout = {
                let mut inner = self.lock();
                let now = Instant::now();
                if inner.session.poll_timeout().is_some_and(|t| t <= now) {
                    inner.session.handle_timeout(now);
                    self.flush_transmits(&mut inner);
                }
                inner.session.poll_timeout()
            };
            self.step().await;
            // Timers move as records are shipped; a short cap keeps them honest without
            // a wake-up per write.
            let cap = tokio::time::Instant::now() + TIMER_GRANULARITY;
            let sleep_until = timeout
                .map(tokio::time::Instant::from_std)
                .map_or(cap, |t| t.min(cap));
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep_until(sleep_until) => {}
                _ = durable_tick.tick() => self.durable_tick(),
            }
        }
    }

    /// One round of the task: events, persistence, the stream, the resync.
    async fn step(self: &Arc<Self>) {
        // Events may need awaiting (journal appends, device writes); take them one at a time.
        loop {
            let event = self.lock().session.poll_event();
            let Some(event) = event else { break };
            self.handle_event(event).await;
        }
        self.maybe_persist();
        self.maybe_open_stream();
        self.pump_resync().await;
        let mut inner = self.lock();
        self.check_contact(&inner);
        if inner.resync.is_none() {
            self.set_holding(false);
        }
        self.pump_queue(&mut inner);
        self.flush_transmits(&mut inner);
        self.refresh_settled(&mut inner);
        self.report_state(&mut inner);
        drop(inner);
        // Once per step: every event that can raise the apply limit (acks, persisted marks)
        // is handled in a step. Role changes, which can lower it, update it themselves.
        self.update_limits();
        // Keeps the lag gauges current between calls of `status`, a few times a second.
        let mut refreshed = self.metrics_refreshed.lock().expect("metrics lock");
        if refreshed.is_none_or(|at| at.elapsed() >= METRICS_REFRESH) {
            *refreshed = Some(Instant::now());
            drop(refreshed);
            let _ = self.status();
        }
    }

    fn report_state(&self, inner: &mut Inner) {
        let state = inner.session.state();
        if state != inner.reported_state {
            let why = inner
                .session
                .last_error()
                .or(inner.last_error.as_deref())
                .unwrap_or("this node closed the connection")
                .to_string();
            if matches!(
                state,
                ReplicaState::Degraded | ReplicaState::Suspended | ReplicaState::SplitBrain
            ) {
                tracing::warn!(volume = %self.volume.name(), peer = %self.peer, from = inner.reported_state.as_str(), to = state.as_str(), why = %why, "replica state");
            } else {
                tracing::info!(volume = %self.volume.name(), peer = %self.peer, from = inner.reported_state.as_str(), to = state.as_str(), "replica state");
            }
            inner.reported_state = state;
            self.metrics.set_state(state.as_str());
            if state == ReplicaState::InSync && self.volume.role() == Role::Primary {
                self.needs_generation.store(false, Ordering::SeqCst);
                *self.oldest_unsynced.lock().expect("rpo lock") = None;
            }
        }
    }

    fn maybe_open_stream(self: &Arc<Self>) {
        let mut inner = self.lock();
        if !self.opener || inner.stream.is_some() {
            return;
        }
        let Some(connection) = inner.connection.clone() else {
            return;
        };
        if connection.close_reason().is_some() {
            inner.connection = None;
            return;
        }
        if inner.reopen_at.is_some_and(|at| at > Instant::now()) {
            let at = inner.reopen_at.expect("checked");
            let me = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
                me.wake.notify_one();
            });
            return;
        }
        inner.reopen_at = Some(Instant::now() + REOPEN_DELAY);
        let me = self.clone();
        let volume = self.volume.name().to_string();
        tokio::spawn(async move {
            match transport::open_volume_stream(&connection, &volume).await {
                Ok((send, recv)) => {
                    let mut inner = me.lock();
                    if inner.stream.is_none() {
                        me.attach(&mut inner, send, recv);
                    }
                }
                Err(error) => {
                    tracing::debug!(volume = %volume, peer = %me.peer, %error, "opening the volume stream failed");
                    me.wake.notify_one();
                }
            }
        });
    }

    /// Persists the dirty map when marks are waiting (one job at a time; marks made while it
    /// runs go with the next one).
    fn maybe_persist(self: &Arc<Self>) {
        let mut inner = self.lock();
        if inner.persisting {
            return;
        }
        let Some(upto) = inner.unpersisted_lsn.take() else {
            return;
        };
        let Some(job) = inner.dirty.prepare_persist() else {
            inner.persisted_lsn = inner.persisted_lsn.max(upto);
            self.refresh_settled(&mut inner);
            return;
        };
        inner.persisting = true;
        let me = self.clone();
        tokio::spawn(async move {
            let result = tokio::task::spawn_blocking(move || job.run())
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
            let mut inner = me.lock();
            inner.persisting = false;
            match result {
                Ok(()) => {
                    inner.persisted_lsn = inner.persisted_lsn.max(upto);
                    me.refresh_settled(&mut inner);
                }
                Err(error) => {
                    // Writes stay unsettled: completing them without a durable record of
                    // what the peer lacks would break the promise. Retried at the next step.
                    tracing::error!(volume = %me.volume.name(), peer = %me.peer, %error, "persisting the dirty map failed; writes wait");
                    inner.dirty.mark_all();
                    inner.unpersisted_lsn = Some(upto.max(inner.unpersisted_lsn.unwrap_or(0)));
                }
            }
            drop(inner);
            // The step this wakes raises the apply limit.
            me.wake.notify_one();
        });
    }

    async fn handle_event(self: &Arc<Self>, event: SessionEvent) {
        match event {
            SessionEvent::StateChanged(_) => {
                let mut inner = self.lock();
                self.report_state(&mut inner);
            }
            SessionEvent::Handshake { decision, peer } => {
                let mut inner = self.lock();
                inner.peer_generation = Some(peer.generation.clone());
                inner.peer_role_cache = Some(peer.role);
                inner.last_error = None;
                inner.auth_error = None;
                inner.skip_generation_on_loss = false;
                tracing::info!(volume = %self.volume.name(), peer = %self.peer, decision = decision.as_str(), peer_head = peer.generation.head_lsn, "replica handshake");
            }
            SessionEvent::Acked {
                journal_lsn,
                durable_lsn,
            } => {
                let mut inner = self.lock();
                inner.acked_journal = inner.acked_journal.max(journal_lsn);
                inner.acked_durable = inner.acked_durable.max(durable_lsn);
                while inner.pending.front().is_some_and(|p| p.0 <= durable_lsn) {
                    inner.pending.pop_front();
                }
                let ended = inner
                    .resync
                    .as_ref()
                    .and_then(|r| r.ended_at)
                    .is_some_and(|at| durable_lsn >= at);
                if ended {
                    let resync = inner.resync.take().expect("checked");
                    inner.dirty.clear_all();
                    inner.unpersisted_lsn = Some(inner.last_tapped);
                    inner.resynced_bytes = resync.sent_bytes;
                    inner.resync_remaining_bytes = 0;
                    self.metrics.resync_remaining_bytes.set(0);
                    tracing::info!(volume = %self.volume.name(), peer = %self.peer, kind = ?resync.kind, bytes = resync.sent_bytes, "resync complete");
                }
                self.pump_queue(&mut inner);
                self.refresh_settled(&mut inner);
            }
            SessionEvent::ResyncNeeded {
                kind,
                from_lsn,
                peer_head_lsn,
            } => {
                let mut inner = self.lock();
                if kind == ResyncKind::Full {
                    inner.dirty.mark_all();
                    let last = inner.last_tapped;
                    inner.unpersisted_lsn = Some(last);
                }
                inner.resync = Some(Resync {
                    kind,
                    waiting_for_peer_ranges: peer_head_lsn >= from_lsn,
                    started: false,
                    todo: RangeSet::default(),
                    ended_at: None,
                    sent_bytes: 0,
                    data_bytes: 0,
                    started_at: Instant::now(),
                    first_pass_bytes: 0,
                    zero_run: None,
                });
                // Queued records are not shipped during a resync: they become blocks to send.
                self.mark_queued(&mut inner);
            }
            SessionEvent::PeerDirtyRanges { ranges, last } => {
                let mut inner = self.lock();
                let lsn = inner.last_tapped;
                for range in ranges {
                    if inner.dirty.mark(range.offset_bytes, range.len_bytes) {
                        inner.unpersisted_lsn = Some(lsn);
                    }
                }
                if last {
                    if let Some(resync) = &mut inner.resync {
                        resync.waiting_for_peer_ranges = false;
                    }
                }
            }
            SessionEvent::RollbackNeeded { common_lsn } => {
                self.rollback(common_lsn).await;
            }
            SessionEvent::Received(record) => {
                if misaligned(record.offset_bytes, record.len_bytes.into()) {
                    return self.fail_stream(format!(
                        "the peer sent record {} at {} of {} bytes, not 512-byte aligned",
                        record.lsn, record.offset_bytes, record.len_bytes
                    ));
                }
                self.receive(record).await
            }
            SessionEvent::FlushRequested { upto_lsn } => {
                let mut inner = self.lock();
                inner.flush_wanted = inner.flush_wanted.max(upto_lsn);
                self.maybe_flush(&mut inner);
            }
            SessionEvent::ResyncBegin {
                kind, total_bytes, ..
            } => {
                tracing::info!(volume = %self.volume.name(), peer = %self.peer, ?kind, total_bytes, "receiving a resync");
                self.set_consistent(false);
                if let Err(error) = self.volume.journal_reset(None).await {
                    self.fail_stream(format!("emptying the journal for a resync: {error}"));
                }
            }
            SessionEvent::ResyncData { offset_bytes, data }
                if misaligned(offset_bytes, data.len() as u64) =>
            {
                self.fail_stream(format!(
                    "the peer sent resync data at {offset_bytes} of {} bytes, not 512-byte aligned",
                    data.len()
                ));
            }
            SessionEvent::ResyncZero {
                offset_bytes,
                len_bytes,
            } if misaligned(offset_bytes, len_bytes) => {
                self.fail_stream(format!(
                    "the peer sent a resync zero range at {offset_bytes} of {len_bytes} bytes, not 512-byte aligned"
                ));
            }
            SessionEvent::ResyncData { offset_bytes, data } => {
                if let Err(error) = self.volume.write_device(offset_bytes, &data).await {
                    self.fail_stream(format!("writing resync data: {error}"));
                }
            }
            SessionEvent::ResyncZero {
                offset_bytes,
                len_bytes,
            } => {
                if let Err(error) = self.volume.zero_device(offset_bytes, len_bytes).await {
                    self.fail_stream(format!("writing resync zeros: {error}"));
                }
            }
            SessionEvent::ResyncEnd { lsn } => self.resync_end(lsn).await,
            SessionEvent::PeerRoleChanged { role, generation } => {
                let mut inner = self.lock();
                inner.peer_role_cache = Some(role);
                if let (GenRole::Primary, Some(entry)) = (role, generation) {
                    if self.volume.role() == Role::Secondary {
                        let mut lineage = self.volume.lineage();
                        if lineage.generation.learn(entry).is_ok() {
                            if let Err(error) = self.volume.set_lineage(lineage.clone()) {
                                tracing::error!(volume = %self.volume.name(), %error, "cannot persist the peer's new generation");
                            }
                            inner
                                .session
                                .set_local(GenRole::Secondary, lineage.generation);
                        }
                    }
                }
            }
            SessionEvent::DemoteRequired => {
                tracing::warn!(volume = %self.volume.name(), peer = %self.peer, "the peer holds a newer generation: this copy becomes its secondary");
                let mut lineage = self.volume.lineage();
                lineage.role = Role::Secondary;
                if let Err(error) = self.volume.set_lineage(lineage) {
                    tracing::error!(volume = %self.volume.name(), %error, "cannot persist the demotion");
                    return;
                }
                // Writes held at admission now fail as read-only. The drain runs apart from
                // this task, whose steps (acks, dirty-map persists) the drained writes need.
                self.release_admission();
                let me = self.clone();
                tokio::spawn(async move {
                    me.volume.drain_writes().await;
                    me.tapping.store(false, Ordering::SeqCst);
                    let lineage = me.volume.lineage();
                    me.rebase(lineage.generation.head_lsn);
                    let mut inner = me.lock();
                    inner
                        .session
                        .set_local(GenRole::Secondary, lineage.generation.clone());
                    me.restart_stream(&mut inner, "demoted: the peer holds a newer generation");
                    drop(inner);
                    me.update_limits();
                });
            }
            SessionEvent::Rtt(rtt) => self.metrics.rtt.observe(rtt.as_secs_f64()),
            SessionEvent::PeerLost => self.peer_lost(),
            SessionEvent::CloseConnection => {
                let mut inner = self.lock();
                inner.stream = None;
                inner.peer_generation = None;
                inner.reopen_at = Some(Instant::now() + REOPEN_DELAY);
            }
            SessionEvent::ProtocolError(error) => {
                tracing::warn!(volume = %self.volume.name(), peer = %self.peer, %error, "replication protocol error; the stream is reset");
            }
            SessionEvent::SplitBrain { common_generation } => {
                tracing::error!(volume = %self.volume.name(), peer = %self.peer, common_generation = format_args!("{common_generation:#x}"), "split brain: both copies were written since they split; resolve by discarding one side's writes");
            }
            SessionEvent::HandshakeFailed { reason } => {
                tracing::warn!(volume = %self.volume.name(), peer = %self.peer, %reason, "replication handshake failed");
            }
        }
    }

    /// The peer is gone: what it may lack goes into the dirty map, and a primary that had it
    /// in sync starts a new generation before any further write completes.
    fn peer_lost(&self) {
        self.peer_lost_inner(true);
    }

    /// See `peer_lost`; at shutdown no generation is started (nothing is written after).
    fn peer_lost_inner(&self, may_start_generation: bool) {
        let mut inner = self.lock();
        inner.resync = None;
        inner.resync_remaining_bytes = 0;
        self.metrics.resync_remaining_bytes.set(0);
        inner.peer_generation = None;
        if self.volume.role() != Role::Primary {
            return;
        }
        let skip = std::mem::take(&mut inner.skip_generation_on_loss);
        let was_in_sync = inner.reported_state == ReplicaState::InSync && !skip;
        // Shipped records not durably acknowledged complete once marked, without the peer:
        // they must be in a generation the peer does not know, started at the first of them
        // and persisted before the marks (so before they complete). Otherwise a copy promoted
        // meanwhile would later see them as an in-flight tail and discard them silently.
        let first_unacked = inner.first_unacked();
        let mut generation_started = false;
        if let (true, true, Some(first)) = (may_start_generation, was_in_sync, first_unacked) {
            let mut lineage = self.volume.lineage();
            let head = lineage.generation.head_lsn;
            lineage.generation.head_lsn = first - 1;
            match lineage.generation.start_generation(&self.node, 0) {
                Ok(_) => {
                    lineage.generation.head_lsn = head;
                    match self.volume.set_lineage(lineage.clone()) {
                        Ok(()) => {
                            generation_started = true;
                            tracing::info!(volume = %self.volume.name(), peer = %self.peer, generation = format_args!("{:#x}", lineage.generation.current_generation()), start_lsn = first, "peer lost with writes in flight: they complete in a new generation");
                            inner
                                .session
                                .set_local(GenRole::Primary, lineage.generation);
                        }
                        Err(error) => {
                            tracing::error!(volume = %self.volume.name(), %error, "cannot persist a generation after losing the peer")
                        }
                    }
                }
                Err(error) => {
                    tracing::error!(volume = %self.volume.name(), %error, "cannot start a generation after losing the peer")
                }
            }
        }
        let pending: Vec<(u64, u64, u64, Instant)> = inner.pending.drain(..).collect();
        for (lsn, offset, len, _) in pending {
            self.mark(&mut inner, lsn, offset, len);
        }
        self.mark_queued(&mut inner);
        let last = inner.last_tapped;
        inner.unpersisted_lsn = Some(last.max(inner.unpersisted_lsn.unwrap_or(0)));
        if was_in_sync && !generation_started && may_start_generation {
            // Writes from now on are this node's alone: the next one starts a new generation,
            // persisted in the tap before it can complete.
            self.needs_generation.store(true, Ordering::SeqCst);
        }
        self.wake.notify_one();
    }

    /// Sends the next resync blocks while the window has room; ends the resync when nothing
    /// is left.
    async fn pump_resync(self: &Arc<Self>) {
        loop {
            let (offset, len) = {
                let mut inner = self.lock();
                let persisting = inner.persisting || inner.unpersisted_lsn.is_some();
                let Some(resync) = &mut inner.resync else {
                    return;
                };
                if resync.ended_at.is_some() || resync.waiting_for_peer_ranges {
                    return;
                }
                if !resync.started {
                    // The dirty map (with the peer's ranges) must be durable before the
                    // resync relies on it.
                    if persisting {
                        return;
                    }
                    let mut todo = RangeSet::default();
                    let mut from = 0;
                    loop {
                        let ranges = inner.dirty.ranges_from(from, u64::MAX / 2, 4096);
                        let Some(&(at, len)) = ranges.last() else {
                            break;
                        };
                        for (o, l) in ranges {
                            todo.insert(o, l);
                        }
                        from = at + len;
                    }
                    let total = todo.bytes();
                    let target = inner.last_tapped;
                    let kind = inner.resync.as_ref().expect("checked").kind;
                    if let Err(error) = inner.session.begin_resync(kind, total, target) {
                        tracing::warn!(volume = %self.volume.name(), peer = %self.peer, %error, "cannot start the resync");
                        inner.resync = None;
                        return;
                    }
                    tracing::info!(volume = %self.volume.name(), peer = %self.peer, ?kind, bytes = total, "resync started");
                    let resync = inner.resync.as_mut().expect("checked");
                    resync.started = true;
                    resync.started_at = Instant::now();
                    resync.first_pass_bytes = total;
                    resync.todo = todo;
                    inner.resync_remaining_bytes = total;
                    self.metrics.resync_remaining_bytes.set(total as i64);
                    self.flush_transmits(&mut inner);
                    continue;
                }
                // The rate cap does not apply to the hand-over (at most HANDOVER_HOLD_BYTES),
                // which holds writes.
                let holding = self.holding.load(Ordering::SeqCst);
                if let Some(rate) = self.resync_max_rate_bytes_per_s.filter(|_| !holding) {
                    // Stay under the cap on average since the resync started.
                    let due = resync.started_at
                        + Duration::from_secs_f64(resync.data_bytes as f64 / rate as f64);
                    if due > Instant::now() {
                        let me = self.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await;
                            me.wake.notify_one();
                        });
                        return;
                    }
                }
                // Writes during a resync re-mark their blocks; under a steady load the last
                // blocks would be chased forever. Once a first pass is done and little is
                // left, new writes wait at admission for the hand-over (milliseconds).
                if resync.sent_bytes >= resync.first_pass_bytes
                    && resync.todo.bytes() <= HANDOVER_HOLD_BYTES
                {
                    self.set_holding(true);
                }
                match resync.todo.pop(RESYNC_CHUNK_BYTES) {
                    Some(chunk) => chunk,
                    None if !self.flush_zero_run(&mut inner) => return,
                    None => {
                        // Nothing left: every record up to the last tapped LSN is at the peer.
                        let lsn = inner.last_tapped;
                        if let Err(error) = inner.session.end_resync(lsn, Instant::now()) {
                            tracing::warn!(volume = %self.volume.name(), peer = %self.peer, %error, "cannot end the resync");
                            inner.resync = None;
                            return;
                        }
                        inner.resync.as_mut().expect("checked").ended_at = Some(lsn);
                        self.set_holding(false);
                        inner.resync_remaining_bytes = 0;
                        self.metrics.resync_remaining_bytes.set(0);
                        self.flush_transmits(&mut inner);
                        return;
                    }
                }
            };
            let data = match self.volume.read(offset, len as u32).await {
                Ok(data) => data,
                Err(error) => {
                    tracing::error!(volume = %self.volume.name(), peer = %self.peer, offset, len, ?error, "reading for the resync failed");
                    let mut inner = self.lock();
                    if let Some(resync) = &mut inner.resync {
                        resync.todo.insert(offset, len);
                    }
                    return;
                }
            };
            let mut inner = self.lock();
            let Some(resync) = &mut inner.resync else {
                return;
            };
            if !resync.started || resync.ended_at.is_some() {
                return;
            }
            let zero = data.iter().all(|b| *b == 0);
            let result = if zero {
                // Consecutive zero chunks travel as one range: a sparse volume's full sync
                // is a handful of messages, not one per chunk.
                let resync = inner.resync.as_mut().expect("checked");
                match &mut resync.zero_run {
                    Some((at, run)) if *at + *run == offset && *run + len <= MAX_ZERO_RUN_BYTES => {
                        *run += len;
                        Ok(())
                    }
                    _ => {
                        if !self.flush_zero_run(&mut inner) {
                            if let Some(resync) = &mut inner.resync {
                                resync.todo.insert(offset, len);
                            }
                            return;
                        }
                        inner.resync.as_mut().expect("checked").zero_run = Some((offset, len));
                        Ok(())
                    }
                }
            } else if !self.flush_zero_run(&mut inner) {
                Err(())
            } else {
                inner.session.send_resync_data(offset, data).map_err(|_| ())
            };
            match result {
                Ok(()) => {
                    let resync = inner.resync.as_mut().expect("checked");
                    resync.sent_bytes += len;
                    if !zero {
                        resync.data_bytes += len;
                    }
                    let remaining = resync.todo.bytes();
                    inner.resync_remaining_bytes = remaining;
                    self.metrics.resync_remaining_bytes.set(remaining as i64);
                    self.metrics.resync_bytes_total.inc_by(len);
                    self.flush_transmits(&mut inner);
                }
                Err(_) => {
                    // Window full (or the link went): put it back and wait for progress.
                    if let Some(resync) = &mut inner.resync {
                        resync.todo.insert(offset, len);
                    }
                    return;
                }
            }
        }
    }

    /// Sends the pending zero range of the resync; false (and the range back in `todo`) when
    /// the session cannot take it now.
    fn flush_zero_run(&self, inner: &mut Inner) -> bool {
        let Some(resync) = &mut inner.resync else {
            return false;
        };
        let Some((offset, len)) = resync.zero_run.take() else {
            return true;
        };
        if inner.session.send_resync_zero(offset, len).is_ok() {
            self.flush_transmits(inner);
            true
        } else {
            if let Some(resync) = &mut inner.resync {
                resync.todo.insert(offset, len);
            }
            false
        }
    }

    // ---- receiving side -----------------------------------------------------------------

    async fn receive(self: &Arc<Self>, record: WriteRecord) {
        let lsn = record.lsn;
        let fua = record.fua;
        let op = match record.kind {
            RecordKind::Write => Op::Write {
                offset_bytes: record.offset_bytes,
                data: AlignedBuf::copy_from(&record.data).freeze(),
            },
            RecordKind::Zero | RecordKind::Punch => Op::Zero {
                offset_bytes: record.offset_bytes,
                len_bytes: record.len_bytes,
                punch: record.kind == RecordKind::Punch,
            },
        };
        // A FUA record completes in the journal only once durable with everything before it.
        match self.volume.append_at(lsn, op, fua).await {
            Ok(done) => {
                let me = self.clone();
                tokio::spawn(async move {
                    match done.await {
                        Ok(Ok(_)) => {
                            let mut inner = me.lock();
                            inner.journaled_lsn = inner.journaled_lsn.max(lsn);
                            inner.session.journaled(lsn);
                            if fua {
                                inner.session.durable(lsn);
                                inner.durable_requested = inner.durable_requested.max(lsn);
                            }
                            me.maybe_flush(&mut inner);
                            me.flush_transmits(&mut inner);
                        }
                        Ok(Err(error)) => {
                            me.fail_stream(format!("journaling record {lsn}: {error}"))
                        }
                        Err(_) => me.fail_stream("the journal closed".into()),
                    }
                });
            }
            Err(error) => self.fail_stream(format!("journaling record {lsn}: {error}")),
        }
    }

    /// Starts a journal fdatasync when the primary waits for one (or the periodic tick).
    fn maybe_flush(self: &Arc<Self>, inner: &mut Inner) {
        if inner.flush_running
            || inner.flush_wanted <= inner.durable_requested
            || inner.journaled_lsn < inner.flush_wanted
        {
            return;
        }
        inner.flush_running = true;
        inner.durable_requested = inner.journaled_lsn;
        let me = self.clone();
        tokio::spawn(async move {
            let result = me.volume.journal_flush().await;
            let mut inner = me.lock();
            inner.flush_running = false;
            match result {
                Ok(durable) => {
                    let lsn = durable.min(inner.journaled_lsn);
                    inner.session.durable(lsn);
                    me.maybe_flush(&mut inner);
                    me.flush_transmits(&mut inner);
                }
                Err(error) => {
                    drop(inner);
                    me.fail_stream(format!("journal fdatasync: {error}"));
                }
            }
        });
    }

    fn durable_tick(self: &Arc<Self>) {
        let mut inner = self.lock();
        if self.volume.role() == Role::Secondary && inner.journaled_lsn > inner.durable_requested {
            inner.flush_wanted = inner.flush_wanted.max(inner.journaled_lsn);
            self.maybe_flush(&mut inner);
        }
    }

    fn set_consistent(&self, consistent: bool) {
        let mut lineage = self.volume.lineage();
        if lineage.consistent != consistent {
            lineage.consistent = consistent;
            if let Err(error) = self.volume.set_lineage(lineage) {
                tracing::error!(volume = %self.volume.name(), %error, "cannot persist the copy's consistency");
            }
        }
    }

    async fn rollback(self: &Arc<Self>, common_lsn: u64) {
        tracing::warn!(volume = %self.volume.name(), peer = %self.peer, common_lsn, "this copy holds records the peer never had: discarding them, the peer resyncs their blocks");
        self.set_consistent(false);
        if let Err(error) = self.volume.journal_reset(None).await {
            self.fail_stream(format!("emptying the journal for a rollback: {error}"));
            return;
        }
        let mut inner = self.lock();
        let mut ranges: Vec<DirtyRange> = Vec::new();
        // The dirty map knows what this copy wrote only if it wrote as primary in its current
        // generation (its own records past the common point, not ones it received).
        let lineage = self.volume.lineage();
        let own_generation = lineage
            .generation
            .current()
            .is_some_and(|g| g.promoted_by == self.node);
        // Records past the common point that the peer itself shipped here (its generation)
        // are in the peer's dirty map: it marked everything it had not seen durably
        // acknowledged when it lost this copy, and the records past the common point are
        // exactly those.
        let peers_records = lineage
            .generation
            .history
            .iter()
            .rev()
            .find(|g| g.start_lsn <= common_lsn.saturating_add(1))
            .is_some_and(|g| g.promoted_by == self.peer);
        if peers_records && !own_generation {
            ranges.clear();
        } else if !own_generation || inner.dirty.is_clean() {
            // No record of what those records touched: the whole volume must come back.
            ranges.push(DirtyRange {
                offset_bytes: 0,
                len_bytes: self.volume.size_bytes(),
            });
        } else {
            let mut from = 0;
            loop {
                let batch = inner.dirty.ranges_from(from, u64::MAX / 2, 4096);
                let Some(&(at, len)) = batch.last() else {
                    break;
                };
                ranges.extend(
                    batch
                        .into_iter()
                        .map(|(offset_bytes, len_bytes)| DirtyRange {
                            offset_bytes,
                            len_bytes,
                        }),
                );
                from = at + len;
            }
        }
        let frames: Vec<Vec<DirtyRange>> = ranges
            .chunks(MAX_DIRTY_RANGES_PER_FRAME)
            .map(|c| c.to_vec())
            .collect();
        let count = frames.len().max(1);
        let mut frames = frames.into_iter();
        for i in 0..count {
            let frame = frames.next().unwrap_or_default();
            if inner
                .session
                .send_dirty_ranges(frame, i + 1 == count)
                .is_err()
            {
                break;
            }
        }
        self.flush_transmits(&mut inner);
    }

    async fn resync_end(self: &Arc<Self>, lsn: u64) {
        if self.lock().peer_generation.is_none() || lsn == u64::MAX {
            // The end of a resync whose connection is gone: the next handshake starts over.
            return;
        }
        let result = async {
            self.volume
                .sync_device()
                .await
                .map_err(|e| format!("syncing the device: {e}"))?;
            self.volume
                .journal_reset(Some(lsn + 1))
                .await
                .map_err(|e| format!("restarting the journal at {}: {e}", lsn + 1))?;
            Ok::<(), String>(())
        }
        .await;
        if let Err(error) = result {
            self.fail_stream(format!("finishing the resync: {error}"));
            return;
        }
        self.rebase(lsn);
        let mut inner = self.lock();
        if let Some(peer) = inner.peer_generation.clone() {
            let mut lineage: Lineage = self.volume.lineage();
            lineage.generation.adopt(&peer, lsn);
            lineage.consistent = true;
            if let Err(error) = self.volume.set_lineage(lineage.clone()) {
                tracing::error!(volume = %self.volume.name(), %error, "cannot persist the lineage after a resync");
            }
            inner
                .session
                .set_local(GenRole::Secondary, lineage.generation);
        }
        // What this copy wrote as a primary is now overwritten by the peer's copy.
        if inner.dirty.clear_all() {
            inner.unpersisted_lsn = Some(inner.last_tapped);
        }
        inner.journaled_lsn = lsn;
        inner.session.journaled(lsn);
        inner.session.durable(lsn);
        inner.durable_requested = lsn;
        self.flush_transmits(&mut inner);
        tracing::info!(volume = %self.volume.name(), peer = %self.peer, lsn, "resync received; the copy is consistent");
    }

    /// A local failure while receiving: the stream is reset; the next handshake resumes.
    fn fail_stream(&self, why: String) {
        tracing::error!(volume = %self.volume.name(), peer = %self.peer, %why, "replication receive failed; resetting the stream");
        let mut inner = self.lock();
        inner.last_error = Some(why);
        inner.stream = None;
        inner.peer_generation = None;
        inner.session.handle_disconnected(Instant::now());
        inner.reopen_at = Some(Instant::now() + REOPEN_DELAY);
        drop(inner);
        self.wake.notify_one();
    }
}

/// The journal and the device take 512-byte aligned ranges only (NBD's minimum block size).
fn misaligned(offset_bytes: u64, len_bytes: u64) -> bool {
    !offset_bytes.is_multiple_of(512) || !len_bytes.is_multiple_of(512)
}

fn op_range(op: &Op) -> (u64, u64) {
    match op {
        Op::Write { offset_bytes, data } => (*offset_bytes, data.len() as u64),
        Op::Zero {
            offset_bytes,
            len_bytes,
            ..
        } => (*offset_bytes, u64::from(*len_bytes)),
    }
}

fn to_record(lsn: u64, op: &Op, fua: bool) -> WriteRecord {
    match op {
        Op::Write { offset_bytes, data } => WriteRecord {
            lsn,
            kind: RecordKind::Write,
            fua,
            offset_bytes: *offset_bytes,
            len_bytes: data.len() as u32,
            data: Bytes::from_owner(SharedBytes(data.clone())),
        },
        Op::Zero {
            offset_bytes,
            len_bytes,
            punch,
        } => WriteRecord {
            lsn,
            kind: if *punch {
                RecordKind::Punch
            } else {
                RecordKind::Zero
            },
            fua,
            offset_bytes: *offset_bytes,
            len_bytes: *len_bytes,
            data: Bytes::new(),
        },
    }
}

/// Lets a record's payload travel as `Bytes` without a copy.
struct SharedBytes(crate::storage::SharedBuf);
impl AsRef<[u8]> for SharedBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Encodes the session's messages onto the stream, coalescing what is queued.
async fn write_loop(
    replica: Arc<Replica>,
    id: u64,
    mut send: SendStream,
    mut rx: mpsc::UnboundedReceiver<Message>,
) {
    let corrupt_at: Option<u64> = std::env::var(FAULT_CORRUPT_FRAME_ENV)
        .ok()
        .and_then(|v| v.parse().ok());
    let mut writes_sent = 0u64;
    let mut buf = BytesMut::new();
    let result: Result<(), String> = async {
        while let Some(message) = rx.recv().await {
            let mut next = Some(message);
            while let Some(message) = next.take() {
                let start = buf.len();
                repl::encode(&message, &mut buf).map_err(|e| e.to_string())?;
                if matches!(message, Message::Write(_)) {
                    writes_sent += 1;
                    if corrupt_at == Some(writes_sent) && buf.len() > start + 20 {
                        let at = buf.len() - 1;
                        buf[at] ^= 0x5a;
                        tracing::warn!(volume = %replica.volume.name(), peer = %replica.peer, "fault injection: corrupted write frame {writes_sent}");
                    }
                }
                if buf.len() < (4 << 20) {
                    next = rx.try_recv().ok();
                }
            }
            let frame = buf.split().freeze();
            replica.metrics.wire_bytes_total.inc_by(frame.len() as u64);
            send.write_chunk(frame).await.map_err(|e| e.to_string())?;
        }
        let _ = send.finish();
        Ok(())
    }
    .await;
    if let Err(why) = result {
        replica.stream_closed(id, format!("stream write failed: {why}"));
    }
}

/// Decodes frames from the stream into the session. A bad frame resets the stream.
async fn read_loop(replica: Arc<Replica>, id: u64, mut recv: RecvStream) {
    let mut buf = BytesMut::with_capacity(1 << 20);
    let why = loop {
        match repl::decode(&mut buf) {
            Ok(Some(message)) => {
                replica.incoming(id, message);
                continue;
            }
            Ok(None) => {}
            Err(error) => {
                if error.is_checksum_error() {
                    replica.volume_metrics.checksum_error("replication");
                }
                tracing::warn!(volume = %replica.volume.name(), peer = %replica.peer, %error, "bad replication frame; resetting the stream");
                let _ = recv.stop(quinn::VarInt::from_u32(1));
                break format!("bad frame from the peer: {error}");
            }
        }
        if buf.capacity() - buf.len() < 64 << 10 {
            buf.reserve(1 << 20);
        }
        match recv.read_buf(&mut buf).await {
            Ok(0) => break "the peer closed the stream".to_string(),
            Ok(_) => {}
            Err(error) => break format!("stream read failed: {error}"),
        }
    };
    replica.stream_closed(id, why);
}

/// A set of disjoint byte ranges (the blocks a resync still has to send).
#[derive(Default)]
struct RangeSet {
    /// start → end (exclusive), disjoint and not adjacent.
    ranges: BTreeMap<u64, u64>,
    bytes: u64,
}

impl RangeSet {
    fn insert(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let mut start = offset;
        let mut end = offset + len;
        // Merge with every range that overlaps or touches [start, end).
        let touching: Vec<(u64, u64)> = self
            .ranges
            .range(..=end)
            .rev()
            .take_while(|(_, e)| **e >= start)
            .map(|(s, e)| (*s, *e))
            .collect();
        for (s, e) in touching {
            self.ranges.remove(&s);
            self.bytes -= e - s;
            start = start.min(s);
            end = end.max(e);
        }
        self.ranges.insert(start, end);
        self.bytes += end - start;
    }

    /// Takes up to `max` bytes from the start of the first range.
    fn pop(&mut self, max: u64) -> Option<(u64, u64)> {
        let (&start, &end) = self.ranges.iter().next()?;
        self.ranges.remove(&start);
        let len = (end - start).min(max);
        if start + len < end {
            self.ranges.insert(start + len, end);
        }
        self.bytes -= len;
        Some((start, len))
    }

    fn bytes(&self) -> u64 {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::RangeSet;

    #[test]
    fn range_set_merges_and_pops() {
        let mut set = RangeSet::default();
        set.insert(4096, 4096);
        set.insert(0, 4096);
        set.insert(16384, 4096);
        set.insert(8192, 100);
        assert_eq!(set.bytes(), 8192 + 100 + 4096);
        assert_eq!(set.pop(5000), Some((0, 5000)));
        assert_eq!(set.pop(1 << 20), Some((5000, 8292 - 5000)));
        assert_eq!(set.pop(1 << 20), Some((16384, 4096)));
        assert_eq!(set.pop(1), None);
        assert_eq!(set.bytes(), 0);
        set.insert(0, 10);
        set.insert(5, 10);
        set.insert(100, 1);
        set.insert(0, 200);
        assert_eq!(set.bytes(), 200);
    }
}
