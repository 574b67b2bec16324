//! A volume's write-ahead journal: group commit, recovery, background apply, space reclaim.
//!
//! Three actors share one journal:
//!
//! - **Clients** (NBD request tasks) call [`Journal::append`] and [`Journal::flush`].
//! - **The writer task** owns the ring. It assigns LSNs, inserts each record into the
//!   [`Index`] (in LSN order, so the newest write always wins), gathers everything queued while
//!   earlier batches are in flight into the next batch (group commit), and writes each batch
//!   with one vectored I/O. Batches complete to clients strictly in ring order, because
//!   recovery keeps only a prefix of the ring: acknowledging batch N+1 before N is on disk could
//!   lose an acknowledged write if N were then torn.
//! - **The applier task** copies completed records to the backing device, makes the device
//!   durable, drops the records from the index, persists the new tail in the superblock and only
//!   then hands the space back to the writer.
//!
//! Durability: a batch written with O_DIRECT has reached the device but may sit in its volatile
//! cache. FLUSH waits for an fdatasync that started after every write it covers completed. A
//! FUA record is durable only together with everything before it (recovery stops at the first
//! missing batch), so a FUA batch is written with RWF_DSYNC when everything before it is already
//! durable, and otherwise acknowledged only after an fdatasync that covers it.
//!
//! The files follow the actors: `writer.rs` (the writer task), `applier.rs` (the applier task,
//! and the coalescing device writer that recovery shares) and `recovery.rs` (ring scan,
//! replay, a fresh ring). This file holds the [`Journal`] handle and its public API, the
//! state the tasks share (`Shared`), the change a record describes ([`Op`]), the errors and
//! the limits more than one file needs.

mod applier;
mod recovery;
mod writer;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use ferry_protocol::journal::{
    padded, RecordDescriptor, RecordKind, Superblock, BLOCK_BYTES, RECORD_BYTES_MAX,
    RING_START_BYTES,
};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

use crate::index::{Content, Found, Index};
use crate::metrics::VolumeMetrics;
use crate::storage::{AlignedBuf, SharedBuf, Storage};

use self::applier::Applier;
use self::recovery::{recover, DeviceFailure, Recovered};
use self::writer::Writer;

/// Journal bytes the applier gathers at most before applying them: the index holds their
/// payloads in memory until then, so this bounds the daemon's memory per volume.
const UNAPPLIED_ROUND_BYTES_MAX: u64 = 32 << 20;
/// Memory unapplied records hold at most (payloads plus [`RECORD_MEMORY_BYTES`] each); past
/// this, writes wait for the applier exactly as they do when the ring is full.
pub const UNAPPLIED_MEMORY_BYTES_MAX: u64 = 2 * UNAPPLIED_ROUND_BYTES_MAX;
/// What one record costs in memory besides its payload until it is applied: its index piece,
/// its apply record, its piece in the round's coalescing index and its device write (about
/// 250 bytes together). Charged against [`UNAPPLIED_MEMORY_BYTES_MAX`] so that records
/// without a payload (WRITE_ZEROES, TRIM) are bounded too: without it a client streaming
/// small discards could queue up to 126 records per 4 KiB of ring, several GiB of memory
/// for a 1 GiB journal. The cap allows at most 262,144 unapplied records.
pub const RECORD_MEMORY_BYTES: u64 = 256;
/// Smallest journal that can hold two of the largest batches plus a wrap.
pub const MIN_JOURNAL_BYTES: u64 = 16 << 20;

#[derive(Debug, Clone, Error)]
pub enum JournalError {
    #[error("journal I/O failed at {what}: {message}")]
    Io { what: &'static str, message: String },
    /// The backing device refused or failed an I/O: the records stay in the journal.
    #[error("device I/O failed at {what}: {message}; writes are refused and reads continue (completed writes wait in the journal); fix the device and restart to apply them")]
    Device { what: &'static str, message: String },
    #[error("journal {path} is unusable: {reason}")]
    Corrupt { path: String, reason: String },
    #[error("journal has failed earlier ({0}); the volume stops serving writes until restart")]
    Failed(String),
    #[error("journal is closing")]
    Closed,
    #[error("journal of {file_bytes} bytes is too small: at least {MIN_JOURNAL_BYTES} bytes")]
    TooSmall { file_bytes: u64 },
    #[error("record LSN {found} does not follow the journal's LSN {expected}")]
    LsnMismatch { expected: u64, found: u64 },
    #[error(
        "the volume's replication panicked ({0}); the volume stops serving writes until restart"
    )]
    TapPanicked(String),
}

/// Locks a mutex that holds a plain value (the failure reason, the tap): a panic elsewhere
/// while it was held cannot have left it half-changed, so it is used as it is.
fn lock_value<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn io_err(what: &'static str) -> impl Fn(std::io::Error) -> JournalError {
    move |e| JournalError::Io {
        what,
        message: e.to_string(),
    }
}

fn device_err(what: &'static str) -> impl Fn(std::io::Error) -> JournalError {
    move |e| JournalError::Device {
        what,
        message: e.to_string(),
    }
}

/// One change to the volume.
#[derive(Clone, Debug)]
pub enum Op {
    Write {
        offset_bytes: u64,
        data: SharedBuf,
    },
    /// Zeros over the range; `punch` allows deallocating it.
    Zero {
        offset_bytes: u64,
        len_bytes: u32,
        punch: bool,
    },
}

impl Op {
    fn payload_bytes(&self) -> u64 {
        match self {
            Op::Write { data, .. } => padded(data.len() as u64),
            Op::Zero { .. } => 0,
        }
    }

    /// The journal record of this change at `lsn`.
    fn descriptor(&self, lsn: u64, fua: bool) -> RecordDescriptor {
        match self {
            Op::Write { offset_bytes, data } => RecordDescriptor::new(
                lsn,
                RecordKind::Write,
                fua,
                *offset_bytes,
                // `split` cuts writes into records of at most RECORD_BYTES_MAX (1 MiB).
                u32::try_from(data.len()).expect("a record is at most RECORD_BYTES_MAX"),
                data,
            ),
            Op::Zero {
                offset_bytes,
                len_bytes,
                punch,
            } => {
                let kind = if *punch {
                    RecordKind::Punch
                } else {
                    RecordKind::Zero
                };
                RecordDescriptor::new(lsn, kind, fua, *offset_bytes, *len_bytes, &[])
            }
        }
    }

    /// What the record holds in memory until it is applied (see [`RECORD_MEMORY_BYTES`]).
    fn memory_bytes(&self) -> u64 {
        self.payload_bytes() + RECORD_MEMORY_BYTES
    }

    /// What the range holds after this change, as the index stores it.
    fn content(&self) -> Content {
        match self {
            Op::Write { data, .. } => Content::Data(data.clone()),
            Op::Zero { punch, .. } => Content::Zero { punch: *punch },
        }
    }

    /// The change a verified journal record describes; `data` is its payload (empty unless a
    /// write).
    fn from_record(record: &RecordDescriptor, data: SharedBuf) -> Op {
        match record.kind {
            RecordKind::Write => Op::Write {
                offset_bytes: record.offset_bytes,
                data,
            },
            RecordKind::Zero | RecordKind::Punch => Op::Zero {
                offset_bytes: record.offset_bytes,
                len_bytes: record.len_bytes,
                punch: record.kind == RecordKind::Punch,
            },
        }
    }

    fn range(&self) -> (u64, u64) {
        match self {
            Op::Write { offset_bytes, data } => (*offset_bytes, data.len() as u64),
            Op::Zero {
                offset_bytes,
                len_bytes,
                ..
            } => (*offset_bytes, *len_bytes as u64),
        }
    }
}

/// Sees the (offset, length) of every record recovery replayed, merged where adjacent, and the
/// LSN of the last one (the head); see [`Journal::open`].
pub type RecoveryHook = Box<
    dyn FnOnce(Vec<(u64, u64)>, u64) -> crate::nbd::BoxFuture<'static, std::io::Result<()>> + Send,
>;

/// What recovery found when the journal was opened.
#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    pub records_replayed: u64,
    pub bytes_replayed: u64,
    /// Bytes of a batch whose header was intact but whose payload was not (a torn write).
    pub torn_tail_bytes: u64,
    /// Why the scan stopped, when it was not the clean end of the journal.
    pub stopped_reason: Option<String>,
    /// Checksum mismatches seen (a torn tail counts one).
    pub checksum_errors: u64,
}

/// A point-in-time view for `status` and `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct JournalStats {
    pub used_bytes: u64,
    pub capacity_bytes: u64,
    pub head_lsn: u64,
    pub applied_lsn: u64,
    pub unapplied_bytes: u64,
    pub full_waits: u64,
}

struct Shared {
    index: Mutex<Index>,
    tap: Mutex<Option<Arc<dyn JournalTap>>>,
    /// Records above this LSN stay in the journal (not applied, their space not reused):
    /// replication still needs them to know what a peer may lack. `u64::MAX` when nothing
    /// needs them.
    apply_limit: tokio::sync::watch::Sender<u64>,
    metrics: VolumeMetrics,
    capacity_bytes: u64,
    used_bytes: AtomicU64,
    head_lsn: AtomicU64,
    applied_lsn: AtomicU64,
    full_waits: AtomicU64,
    failed: AtomicBool,
    failure: Mutex<Option<String>>,
}

impl Shared {
    fn fail(&self, error: &JournalError) {
        let mut failure = lock_value(&self.failure);
        if failure.is_none() {
            tracing::error!(%error, "journal failed; refusing further writes until restart");
            *failure = Some(error.to_string());
            self.metrics.volume_failed.set(1);
        }
        self.failed.store(true, Ordering::SeqCst);
    }

    fn check(&self) -> Result<(), JournalError> {
        if self.failed.load(Ordering::SeqCst) {
            let reason = self
                .failure
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
                .unwrap_or_default();
            return Err(JournalError::Failed(reason));
        }
        Ok(())
    }
}

enum Request {
    Append {
        op: Op,
        fua: bool,
        /// The LSN the record must get (a secondary journals its primary's LSNs).
        at_lsn: Option<u64>,
        done: oneshot::Sender<Result<u64, JournalError>>,
        queued_at: Instant,
    },
    Flush {
        done: oneshot::Sender<Result<u64, JournalError>>,
    },
    Reset {
        next_lsn: Option<u64>,
        done: oneshot::Sender<Result<u64, JournalError>>,
    },
    Close {
        done: oneshot::Sender<()>,
    },
}

/// Sees every record as the writer assigns its LSN, in LSN order, while the record's range is
/// being inserted into the index (under the index lock): a reader that takes the index lock
/// after `record` returned sees the record's data. Replication hangs here, so that the send to
/// the peers starts before the local journal write is submitted.
pub trait JournalTap: Send + Sync {
    /// Returns whether something went to the stream of a peer whose acknowledgement the
    /// write waits for (a metro peer) now: the writer then lets it reach the wire before it
    /// submits the batch's write (see `write_batch` in `writer.rs`).
    fn record(&self, lsn: u64, op: &Op, fua: bool) -> bool;
}

/// Handle to a volume's journal; cheap to share.
pub struct Journal {
    requests: mpsc::Sender<Request>,
    shared: Arc<Shared>,
}

impl Journal {
    /// Writes a fresh, empty journal onto `storage`: zeros over the whole ring (so later O_DIRECT
    /// writes overwrite allocated blocks and need no metadata update) and then the superblock.
    pub async fn format(
        storage: &dyn Storage,
        volume_bytes: u64,
    ) -> Result<Superblock, JournalError> {
        let file_bytes = storage.len_bytes();
        if file_bytes < MIN_JOURNAL_BYTES {
            return Err(JournalError::TooSmall { file_bytes });
        }
        let chunk = AlignedBuf::zeroed(1 << 20).freeze();
        let mut at = RING_START_BYTES;
        while at < file_bytes {
            let len = crate::usize_from((file_bytes - at).min(chunk.len() as u64));
            storage
                .write_at(at, vec![chunk.slice(0..len)], false)
                .await
                .map_err(io_err("zero-filling the journal"))?;
            at += len as u64;
        }
        let superblock = Superblock {
            sequence: 1,
            journal_id: rand::random(),
            file_bytes,
            volume_bytes,
            tail_offset: 0,
            tail_lsn: 1,
            generation: 1,
        };
        storage
            .sync()
            .await
            .map_err(io_err("syncing the zero-filled journal"))?;
        write_superblock(storage, &superblock).await?;
        Ok(superblock)
    }

    /// Opens a formatted journal: replays every intact record onto `device`, makes the device
    /// durable, and starts the writer and applier tasks on the current tokio runtime.
    /// `on_replayed`, when given, sees the ranges of every replayed record after they are on
    /// the device and before the ring is emptied: replication records them as possibly
    /// missing at a peer, and must have done so durably before the records are gone.
    ///
    /// A device that fails during the replay (EINVAL, ENOSPC, EIO, a read-only device) does
    /// not make this fail: the journal opens failed ([`Journal::failure`] says why), leaves
    /// its file untouched, serves reads of its records from memory and refuses every write,
    /// so that the volume stays readable and the node's other volumes keep serving. The next
    /// open, once the device is fixed, replays the same records.
    pub async fn open(
        journal: Arc<dyn Storage>,
        device: Arc<dyn Storage>,
        metrics: VolumeMetrics,
        name: &str,
        on_replayed: Option<RecoveryHook>,
    ) -> Result<(Journal, RecoveryReport, Superblock), JournalError> {
        let Recovered {
            superblock,
            report,
            head,
            next_lsn,
            device_failure,
        } = recover(&*journal, &*device, name, on_replayed).await?;
        if let Some(failure) = device_failure {
            let journal = Journal::failed(metrics, superblock, next_lsn, failure);
            return Ok((journal, report, superblock));
        }
        let capacity_bytes = superblock.ring_bytes();
        let (apply_limit, apply_limit_rx) = tokio::sync::watch::channel(u64::MAX);
        let shared = Arc::new(Shared {
            index: Mutex::new(Index::new()),
            tap: Mutex::new(None),
            apply_limit,
            metrics,
            capacity_bytes,
            used_bytes: AtomicU64::new(0),
            head_lsn: AtomicU64::new(next_lsn - 1),
            applied_lsn: AtomicU64::new(next_lsn - 1),
            full_waits: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
        });
        shared
            .metrics
            .journal_capacity_bytes
            .set(crate::gauge_i64(capacity_bytes));
        shared
            .metrics
            .journal_head_lsn
            .set(crate::gauge_i64(next_lsn - 1));
        shared
            .metrics
            .journal_applied_lsn
            .set(crate::gauge_i64(next_lsn - 1));
        shared.metrics.journal_used_bytes.set(0);
        for _ in 0..report.checksum_errors {
            shared.metrics.checksum_error("journal");
        }
        let (requests, request_rx) = mpsc::channel(1024);
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (apply_tx, apply_rx) = mpsc::unbounded_channel();
        let applier = Applier::new(
            journal.clone(),
            device,
            shared.clone(),
            superblock,
            events_tx.clone(),
            apply_limit_rx,
        );
        tokio::spawn(applier.run(apply_rx));
        let writer = Writer::new(
            journal,
            shared.clone(),
            &superblock,
            head,
            next_lsn,
            events_tx,
            apply_tx,
        );
        tokio::spawn(writer.run(request_rx, events_rx));
        Ok((Journal { requests, shared }, report, superblock))
    }

    /// A journal whose device failed during recovery: no writer and no applier, every write
    /// refused, reads served from `failure.index`.
    fn failed(
        metrics: VolumeMetrics,
        superblock: Superblock,
        next_lsn: u64,
        failure: DeviceFailure,
    ) -> Journal {
        let capacity_bytes = superblock.ring_bytes();
        let applied_lsn = superblock.tail_lsn - 1;
        let head_lsn = next_lsn - 1;
        metrics
            .journal_capacity_bytes
            .set(crate::gauge_i64(capacity_bytes));
        metrics
            .journal_used_bytes
            .set(crate::gauge_i64(failure.used_bytes));
        metrics.journal_head_lsn.set(crate::gauge_i64(head_lsn));
        metrics
            .journal_applied_lsn
            .set(crate::gauge_i64(applied_lsn));
        metrics
            .journal_unapplied_bytes
            .set(crate::gauge_i64(failure.index.data_bytes()));
        let shared = Arc::new(Shared {
            index: Mutex::new(failure.index),
            tap: Mutex::new(None),
            apply_limit: tokio::sync::watch::channel(u64::MAX).0,
            metrics,
            capacity_bytes,
            used_bytes: AtomicU64::new(failure.used_bytes),
            head_lsn: AtomicU64::new(head_lsn),
            applied_lsn: AtomicU64::new(applied_lsn),
            full_waits: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
        });
        shared.fail(&failure.error);
        // Nobody receives: every request finds the journal failed (or closed) at once.
        let (requests, _) = mpsc::channel(1);
        Journal { requests, shared }
    }

    /// Journals one client request. Completes once every record is written to the journal
    /// (and durable, with `fua`). Writes over [`RECORD_BYTES_MAX`] become several records.
    /// Returns the LSN of its last record.
    pub async fn append(&self, op: Op, fua: bool) -> Result<u64, JournalError> {
        self.shared.check()?;
        let mut waits = Vec::new();
        let queued_at = Instant::now();
        for part in split(op) {
            let (done, wait) = oneshot::channel();
            self.requests
                .send(Request::Append {
                    op: part,
                    fua,
                    at_lsn: None,
                    done,
                    queued_at,
                })
                .await
                .map_err(|_| JournalError::Closed)?;
            waits.push(wait);
        }
        let mut last_lsn = 0;
        for wait in waits {
            last_lsn = wait.await.map_err(|_| JournalError::Closed)??;
        }
        Ok(last_lsn)
    }

    /// Queues one record that must get `lsn` (a secondary journals the primary's records
    /// under the primary's LSNs). Queuing is in call order; the returned receiver completes
    /// when the record is in the journal. A record whose LSN is not the journal's next one is
    /// refused with [`JournalError::LsnMismatch`].
    pub async fn append_at(
        &self,
        lsn: u64,
        op: Op,
        fua: bool,
    ) -> Result<oneshot::Receiver<Result<u64, JournalError>>, JournalError> {
        self.shared.check()?;
        let (done, wait) = oneshot::channel();
        self.requests
            .send(Request::Append {
                op,
                fua,
                at_lsn: Some(lsn),
                done,
                queued_at: Instant::now(),
            })
            .await
            .map_err(|_| JournalError::Closed)?;
        Ok(wait)
    }

    /// Completes when every write completed before this call is durable; returns the LSN up
    /// to which the journal is durable.
    pub async fn flush(&self) -> Result<u64, JournalError> {
        self.shared.check()?;
        let (done, wait) = oneshot::channel();
        self.requests
            .send(Request::Flush { done })
            .await
            .map_err(|_| JournalError::Closed)?;
        wait.await.map_err(|_| JournalError::Closed)?
    }

    /// Waits for every queued record, applies the whole journal to the device, and leaves an
    /// empty ring whose next record gets `next_lsn` (or the current next LSN), under a new
    /// journal id so that no older batch can ever be replayed after it. Returns the next LSN.
    /// A secondary does this before a resync writes the device directly, and after it to take
    /// the LSN the resync ended at.
    pub async fn reset(&self, next_lsn: Option<u64>) -> Result<u64, JournalError> {
        self.shared.check()?;
        let (done, wait) = oneshot::channel();
        self.requests
            .send(Request::Reset { next_lsn, done })
            .await
            .map_err(|_| JournalError::Closed)?;
        wait.await.map_err(|_| JournalError::Closed)?
    }

    /// Installs the tap that sees every record at LSN assignment (see [`JournalTap`]).
    pub fn set_tap(&self, tap: Option<Arc<dyn JournalTap>>) {
        *lock_value(&self.shared.tap) = tap;
    }

    /// Records above `lsn` are kept in the journal until the limit rises (see `Shared`).
    pub fn set_apply_limit(&self, lsn: u64) {
        self.shared.apply_limit.send_if_modified(|limit| {
            let changed = *limit != lsn;
            *limit = lsn;
            changed
        });
    }

    /// Unapplied pieces of the range, and gaps to read from the device.
    pub fn lookup(&self, offset_bytes: u64, len_bytes: u64) -> Vec<Found> {
        self.shared
            .index
            .lock()
            .expect("index lock")
            .lookup(offset_bytes, len_bytes)
    }

    pub fn stats(&self) -> JournalStats {
        JournalStats {
            used_bytes: self.shared.used_bytes.load(Ordering::Relaxed),
            capacity_bytes: self.shared.capacity_bytes,
            head_lsn: self.shared.head_lsn.load(Ordering::Relaxed),
            applied_lsn: self.shared.applied_lsn.load(Ordering::Relaxed),
            unapplied_bytes: self.shared.index.lock().expect("index lock").data_bytes(),
            full_waits: self.shared.full_waits.load(Ordering::Relaxed),
        }
    }

    /// The reason the journal stopped accepting writes, if it did.
    pub fn failure(&self) -> Option<String> {
        lock_value(&self.shared.failure).clone()
    }

    /// Finishes queued writes, makes them durable, applies everything to the device and
    /// persists an empty ring, so that the next start has nothing to replay.
    pub async fn close(&self) {
        let (done, wait) = oneshot::channel();
        if self.requests.send(Request::Close { done }).await.is_ok() {
            let _ = wait.await;
        }
    }
}

/// Cuts a write into records of at most [`RECORD_BYTES_MAX`]. Every cut is block-aligned, so
/// each part can still be written with O_DIRECT from its original buffer.
fn split(op: Op) -> Vec<Op> {
    match op {
        Op::Write { offset_bytes, data } if data.len() > RECORD_BYTES_MAX => (0..data.len())
            .step_by(RECORD_BYTES_MAX)
            .map(|at| Op::Write {
                offset_bytes: offset_bytes + at as u64,
                data: data.slice(at..(at + RECORD_BYTES_MAX).min(data.len())),
            })
            .collect(),
        other => vec![other],
    }
}

/// Writes `superblock` into its slot with RWF_DSYNC: it is durable when this returns.
async fn write_superblock(
    storage: &dyn Storage,
    superblock: &Superblock,
) -> Result<(), JournalError> {
    let block = AlignedBuf::copy_from(&superblock.encode()).freeze();
    storage
        .write_at(superblock.slot() * BLOCK_BYTES as u64, vec![block], true)
        .await
        .map_err(io_err("writing the superblock"))
}

/// Polls every future to completion concurrently. Small enough not to need the futures crate.
pub(crate) async fn join_all<F: std::future::Future>(
    futures: impl IntoIterator<Item = F>,
) -> Vec<F::Output> {
    let mut futures: Vec<_> = futures.into_iter().map(|f| Some(Box::pin(f))).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (slot, out) in futures.iter_mut().zip(outputs.iter_mut()) {
            if let Some(future) = slot {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(value) => {
                        *out = Some(value);
                        *slot = None;
                    }
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs
        .into_iter()
        .map(|o| o.expect("every future completed"))
        .collect()
}

#[cfg(test)]
mod tap_tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::storage::MemStorage;

    const VOLUME_BYTES: u64 = 1 << 20;

    /// A tap that panics on its second record, as a replication whose lock was poisoned would.
    struct PanickingTap(AtomicU64);

    impl JournalTap for PanickingTap {
        fn record(&self, _lsn: u64, _op: &Op, _fua: bool) -> bool {
            if self.0.fetch_add(1, Ordering::SeqCst) == 1 {
                panic!("replication lock: PoisonError");
            }
            false
        }
    }

    fn write(offset_bytes: u64, byte: u8) -> Op {
        Op::Write {
            offset_bytes,
            data: AlignedBuf::copy_from(&[byte; 4096]).freeze(),
        }
    }

    fn current_thread() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    /// A freshly formatted journal on `storage` over an in-memory device.
    async fn fresh_journal(storage: Arc<dyn Storage>) -> Journal {
        let device = MemStorage::new(VOLUME_BYTES);
        Journal::format(&*storage, VOLUME_BYTES)
            .await
            .expect("format");
        let metrics = Metrics::new();
        let (journal, _, _) = Journal::open(storage, device, metrics.volume("tap"), "tap", None)
            .await
            .expect("open");
        journal
    }

    /// A tap standing for replication: each record wakes the "stream writer", and the tap
    /// reports that it sent something when `sends` says so.
    struct SendingTap {
        stream: Arc<tokio::sync::Notify>,
        sends: bool,
    }

    impl JournalTap for SendingTap {
        fn record(&self, _lsn: u64, _op: &Op, _fua: bool) -> bool {
            self.stream.notify_one();
            self.sends
        }
    }

    /// In the daemon the tap wakes a volume's stream writer, and through it quinn's driver,
    /// which puts the record's packets on a UDP socket. When the tap sent something, the
    /// batch's journal write is submitted only after that has happened and the runtime has
    /// polled its I/O once, so the packets are on the wire first. Here the "stream writer"
    /// sends one datagram over loopback and a "peer" task notes how many journal writes had
    /// been submitted when the datagram reached it. Without the turn the write goes first (the
    /// peer task is woken only by the runtime's next I/O poll), which the tap that sends
    /// nothing shows.
    #[test]
    fn records_a_tap_sent_reach_the_wire_before_the_journal_write_is_submitted() {
        for sends in [true, false] {
            current_thread().block_on(async {
                let disk = crate::storage::FaultDisk::new(MIN_JOURNAL_BYTES);
                let journal = fresh_journal(disk.storage()).await;
                let peer = tokio::net::UdpSocket::bind("127.0.0.1:0")
                    .await
                    .expect("bind");
                let wire = tokio::net::UdpSocket::bind("127.0.0.1:0")
                    .await
                    .expect("bind");
                wire.connect(peer.local_addr().expect("addr"))
                    .await
                    .expect("connect");
                // One datagram first, so that both sockets' readiness is known to the runtime,
                // as a live connection's is.
                wire.send(b"hello").await.expect("send");
                peer.recv(&mut [0u8; 16]).await.expect("recv");
                let stream = Arc::new(tokio::sync::Notify::new());
                let stream_task = tokio::spawn({
                    let stream = Arc::clone(&stream);
                    async move {
                        loop {
                            stream.notified().await;
                            wire.send(b"record").await.expect("send");
                        }
                    }
                });
                let peer_task = tokio::spawn({
                    let disk = disk.clone();
                    async move {
                        let mut datagram = [0u8; 16];
                        peer.recv(&mut datagram).await.expect("recv");
                        disk.write_count()
                    }
                });
                journal.set_tap(Some(Arc::new(SendingTap {
                    stream: Arc::clone(&stream),
                    sends,
                })));
                let before = disk.write_count();
                journal.append(write(0, 1), false).await.expect("write");
                let seen = peer_task.await.expect("peer task");
                if sends {
                    assert_eq!(
                        seen, before,
                        "the record reached the peer before its journal write was submitted"
                    );
                } else {
                    // The control: nothing sent, no extra turn, the write is submitted first.
                    assert_eq!(seen, before + 1, "nothing was sent: the write went first");
                }
                stream_task.abort();
                journal.close().await;
            });
        }
    }

    /// A panic in the tap stops the journal with a clear error and nothing else: the index
    /// lock is not poisoned, so reads (index lookups) and status keep working, and later
    /// writes are refused with the reason rather than panicking.
    #[test]
    fn a_panicking_tap_fails_writes_and_leaves_reads_working() {
        current_thread().block_on(async {
            let journal = fresh_journal(MemStorage::new(MIN_JOURNAL_BYTES)).await;
            journal.set_tap(Some(Arc::new(PanickingTap(AtomicU64::new(0)))));
            journal
                .append(write(0, 1), false)
                .await
                .expect("first write");
            let second = journal.append(write(4096, 2), false).await;
            let error = second
                .expect_err("the write whose tap panicked fails")
                .to_string();
            assert!(error.contains("replication panicked"), "{error}");
            let third = journal.append(write(8192, 3), false).await;
            let error = third.expect_err("later writes are refused").to_string();
            assert!(error.contains("replication panicked"), "{error}");
            // Reads and status still work: no poisoned lock.
            assert!(
                !journal.lookup(0, 4096).is_empty(),
                "the first write is readable"
            );
            let _ = journal.stats();
            let failure = journal.failure().expect("the journal says why it stopped");
            assert!(failure.contains("replication panicked"), "{failure}");
            journal.close().await;
        });
    }
}
