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

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use ferry_protocol::journal::{
    padded, BatchHeader, FormatError, RecordDescriptor, RecordKind, Superblock, BLOCK_BYTES,
    RECORDS_PER_BATCH_MAX, RECORD_BYTES_MAX, RING_START_BYTES,
};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

use crate::index::{Content, Found, Index};
use crate::metrics::VolumeMetrics;
use crate::storage::{AlignedBuf, SharedBuf, Storage};

/// Payload bytes one batch carries at most; bigger requests span several batches.
const BATCH_PAYLOAD_BYTES_MAX: u64 = 4 << 20;
/// Batches written concurrently. More overlap buys little on one device and delays acks.
const INFLIGHT_BATCHES_MAX: usize = 4;
/// Records queued in the writer beyond the request channel.
const PENDING_RECORDS_MAX: usize = 1024;
/// Buffers in one vectored device write (the kernel's IOV_MAX is 1024).
const IOVECS_PER_WRITE_MAX: usize = 1024;
/// Bytes in one coalesced device write.
const APPLY_WRITE_BYTES_MAX: u64 = 8 << 20;
/// Device writes the applier keeps in flight at once.
const APPLY_WAVE_MAX: usize = 64;
/// Device writes in flight while the journal is keeping up (see `Applier::run`).
const IDLE_APPLY_WAVE: usize = 8;
/// Batches the applier takes per round before making the device durable.
const APPLY_BATCHES_MAX: usize = 4096;
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
/// "Journal full" is logged at most this often; the metrics count every episode.
const FULL_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
/// How long the applier gathers batches before applying them as one round.
const APPLY_DELAY: std::time::Duration = std::time::Duration::from_millis(250);
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

/// Hands one record to the tap; the text of its panic if it panicked. A panic in the tap
/// (replication) must not unwind through the index lock, held here: that would poison it and
/// take every read of the volume down with it. The caller stops the journal instead.
fn tap_record(tap: &dyn JournalTap, lsn: u64, op: &Op, fua: bool) -> Option<String> {
    std::panic::catch_unwind(AssertUnwindSafe(|| tap.record(lsn, op, fua)))
        .err()
        .map(|payload| panic_message(payload.as_ref()))
}

/// The text of a caught panic.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|text| (*text).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
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
/// the peers starts together with the local journal write.
pub trait JournalTap: Send + Sync {
    fn record(&self, lsn: u64, op: &Op, fua: bool);
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
        let applier = Applier {
            journal: journal.clone(),
            device,
            shared: shared.clone(),
            superblock,
            events: events_tx.clone(),
            apply_limit: apply_limit_rx,
        };
        tokio::spawn(applier.run(apply_rx));
        let writer = Writer {
            storage: journal,
            shared: shared.clone(),
            journal_id: superblock.journal_id,
            ring_bytes: capacity_bytes,
            head,
            next_lsn,
            used_bytes: 0,
            pending: VecDeque::new(),
            inflight: VecDeque::new(),
            next_batch_id: 0,
            written_lsn: next_lsn - 1,
            completed_lsn: next_lsn - 1,
            durable_lsn: next_lsn - 1,
            sync_running: false,
            flush_waiters: Vec::new(),
            events_tx,
            apply_tx: Some(apply_tx),
            full_since: None,
            full_logged_at: None,
            unapplied_memory_bytes: 0,
            resetting: None,
        };
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

async fn read_block(
    storage: &dyn Storage,
    offset: u64,
    len: usize,
) -> Result<AlignedBuf, JournalError> {
    let (result, buf) = storage.read_at(offset, AlignedBuf::zeroed(len)).await;
    result.map_err(io_err("reading the journal"))?;
    Ok(buf)
}

/// What recovery leaves behind.
struct Recovered {
    /// The superblock in effect: a new one naming an empty ring, or (after a device failure)
    /// the one found, untouched.
    superblock: Superblock,
    report: RecoveryReport,
    /// Ring offset where the next batch goes.
    head: u64,
    next_lsn: u64,
    /// Set when the device failed during the replay (see [`DeviceFailure`]).
    device_failure: Option<DeviceFailure>,
}

/// The device refused the replay: the journal is left exactly as found (nothing written, so
/// the next start scans and replays the same records), and its records are kept in an index
/// so that reads still see every completed write. Their memory is bounded like at run time:
/// the ring only ever holds unapplied records, which the writer caps at
/// [`UNAPPLIED_MEMORY_BYTES_MAX`] (plus the batches in flight).
struct DeviceFailure {
    error: JournalError,
    index: Index,
    /// Ring bytes the records occupy.
    used_bytes: u64,
}

/// Walks the ring from a superblock's tail, one verified batch at a time.
struct RingScan<'a> {
    journal: &'a dyn Storage,
    superblock: Superblock,
    /// Ring offset of the next batch.
    pos: u64,
    /// LSN the next record must carry.
    lsn: u64,
    scanned_bytes: u64,
    /// Why and where the scan stopped; counts of torn and corrupt batches.
    report: RecoveryReport,
    done: bool,
}

impl<'a> RingScan<'a> {
    fn new(journal: &'a dyn Storage, superblock: Superblock) -> RingScan<'a> {
        RingScan {
            journal,
            superblock,
            pos: superblock.tail_offset,
            lsn: superblock.tail_lsn,
            scanned_bytes: 0,
            report: RecoveryReport::default(),
            done: false,
        }
    }

    /// The records of the next intact batch with their payloads, in LSN order; `None` at the
    /// first block that is not the expected batch (the report says why, unless it is the
    /// clean end of the journal).
    async fn next_batch(
        &mut self,
    ) -> Result<Option<Vec<(RecordDescriptor, SharedBuf)>>, JournalError> {
        let ring_bytes = self.superblock.ring_bytes();
        // Bounded: every iteration either returns or moves `scanned_bytes` forward.
        while !self.done && self.scanned_bytes < ring_bytes {
            let pos = self.pos;
            let header_block =
                read_block(self.journal, RING_START_BYTES + pos, BLOCK_BYTES).await?;
            let header =
                match BatchHeader::decode(&header_block, self.superblock.journal_id, self.lsn) {
                    Ok(header) => header,
                    Err(
                        FormatError::BadMagic
                        | FormatError::UnexpectedLsn { .. }
                        | FormatError::ForeignJournal { .. },
                    ) => break,
                    Err(error) => {
                        self.report.stopped_reason =
                            Some(format!("batch header at ring offset {pos}: {error}"));
                        if error == FormatError::ChecksumMismatch {
                            self.report.checksum_errors += 1;
                        }
                        break;
                    }
                };
            let batch_bytes = header.batch_bytes();
            let records = match header {
                BatchHeader::Wrap { .. } => {
                    self.scanned_bytes += ring_bytes - pos;
                    self.pos = 0;
                    continue;
                }
                BatchHeader::Records { records, .. } => records,
            };
            if pos + batch_bytes > ring_bytes {
                self.report.stopped_reason = Some(format!(
                    "batch at ring offset {pos} runs past the end of the ring"
                ));
                break;
            }
            let payload = read_block(
                self.journal,
                RING_START_BYTES + pos + BLOCK_BYTES as u64,
                crate::usize_from(batch_bytes - BLOCK_BYTES as u64),
            )
            .await?;
            let payload = payload.freeze();
            let mut at = 0usize;
            let mut parts = Vec::with_capacity(records.len());
            for record in &records {
                let data = if record.kind.has_payload() {
                    payload.slice(at..at + record.len_bytes as usize)
                } else {
                    payload.slice(0..0)
                };
                if let Err(error) = record.verify(&data) {
                    // The batch never completed, so none of its records was acknowledged:
                    // drop it all.
                    self.report.torn_tail_bytes = batch_bytes;
                    self.report.checksum_errors += 1;
                    self.report.stopped_reason = Some(format!(
                        "torn batch dropped: record LSN {} at ring offset {pos}: {error}",
                        record.lsn
                    ));
                    self.done = true;
                    return Ok(None);
                }
                at += crate::usize_from(record.payload_area_bytes());
                parts.push((*record, data));
            }
            self.lsn += records.len() as u64;
            self.scanned_bytes += batch_bytes;
            self.pos += batch_bytes;
            if self.pos == ring_bytes {
                self.pos = 0;
            }
            return Ok(Some(parts));
        }
        self.done = true;
        Ok(None)
    }
}

/// Scans the ring from the superblock's tail, replays every intact batch onto the device in
/// order, stops at the first batch that is not the expected one, and leaves an empty ring
/// starting where the scan stopped. If the device fails during the replay, the journal is
/// left untouched and its records are returned in an index instead (see [`DeviceFailure`]).
async fn recover(
    journal: &dyn Storage,
    device: &dyn Storage,
    name: &str,
    on_replayed: Option<RecoveryHook>,
) -> Result<Recovered, JournalError> {
    let mut replayed_ranges: Vec<(u64, u64)> = Vec::new();
    let corrupt = |reason: String| JournalError::Corrupt {
        path: name.to_string(),
        reason,
    };
    // A process killed before its last fdatasync leaves batches in the page cache, and this
    // scan replays them. Made durable first (the write-ahead rule), so that a power loss
    // during the replay cannot leave device blocks torn by records the journal then lacks.
    journal
        .sync()
        .await
        .map_err(io_err("fdatasync of the journal before recovery"))?;
    let slots = read_block(journal, 0, 2 * BLOCK_BYTES).await?;
    let superblock = [
        Superblock::decode(&slots[..BLOCK_BYTES]),
        Superblock::decode(&slots[BLOCK_BYTES..]),
    ]
    .into_iter()
    .filter_map(Result::ok)
    .max_by_key(|sb| sb.sequence)
    .ok_or_else(|| corrupt("neither superblock slot is valid".into()))?;
    if superblock.file_bytes != journal.len_bytes() {
        return Err(corrupt(format!(
            "superblock says {} bytes, file has {}",
            superblock.file_bytes,
            journal.len_bytes()
        )));
    }
    let mut scan = RingScan::new(journal, superblock);
    let mut records_replayed = 0u64;
    let mut bytes_replayed = 0u64;
    // Intact records not yet written to the device, and the memory they hold.
    let mut replay: Vec<(u64, Op)> = Vec::new();
    let mut replay_memory_bytes = 0u64;
    let mut device_error = None;
    while let Some(parts) = scan.next_batch().await? {
        for (record, data) in parts {
            // Zero records count too (RECORD_MEMORY_BYTES), so a ring full of small discards
            // is replayed in bounded chunks.
            replay_memory_bytes += record.payload_area_bytes() + RECORD_MEMORY_BYTES;
            records_replayed += 1;
            bytes_replayed += record.len_bytes as u64;
            let op = Op::from_record(&record, data);
            if on_replayed.is_some() {
                match replayed_ranges.last_mut() {
                    Some((at, len)) if *at + *len == op.range().0 => *len += op.range().1,
                    _ => replayed_ranges.push(op.range()),
                }
            }
            replay.push((record.lsn, op));
        }
        // Replay through the applier's coalescing writer, a bounded chunk at a time.
        if replay_memory_bytes >= UNAPPLIED_ROUND_BYTES_MAX {
            if let Err(error) = replay_chunk(device, &mut replay).await {
                device_error = Some(error);
                break;
            }
            replay_memory_bytes = 0;
        }
    }
    if device_error.is_none() {
        device_error = replay_chunk(device, &mut replay).await.err();
    }
    if device_error.is_none() {
        device_error = device
            .sync()
            .await
            .map_err(device_err("syncing the device after replay"))
            .err();
    }
    if let Some(error) = device_error {
        drop(replay);
        return keep_in_journal(journal, superblock, name, on_replayed, error).await;
    }
    let mut report = scan.report;
    report.records_replayed = records_replayed;
    report.bytes_replayed = bytes_replayed;
    let (pos, lsn) = (scan.pos, scan.lsn);
    if let Some(hook) = on_replayed {
        hook(replayed_ranges, lsn - 1)
            .await
            .map_err(io_err("recording the replayed ranges"))?;
    }
    // Destroy the block where the scan stopped: a torn batch there keeps a valid header, and a
    // later batch torn at the same place must not make its old payload look whole again.
    let zero = AlignedBuf::zeroed(BLOCK_BYTES).freeze();
    journal
        .write_at(RING_START_BYTES + pos, vec![zero], true)
        .await
        .map_err(io_err("clearing the end of the journal"))?;
    // A new journal id for the batches of this boot. Batches of the previous boot that were
    // written after the stop point (up to INFLIGHT_BATCHES_MAX - 1 of them, never acknowledged)
    // carry the very LSNs this boot is about to reuse; with the old id, a later scan that
    // reached them would replay them over newer acknowledged writes. Every live record has
    // just been replayed and synced, so no batch still needs the old id.
    let journal_id = loop {
        let id: u64 = rand::random();
        if id != superblock.journal_id {
            break id;
        }
    };
    let recovered = Superblock {
        sequence: superblock.sequence + 1,
        journal_id,
        tail_offset: pos,
        tail_lsn: lsn,
        ..superblock
    };
    write_superblock(journal, &recovered).await?;
    if report.records_replayed > 0 || report.stopped_reason.is_some() {
        tracing::info!(
            volume = name,
            records = report.records_replayed,
            bytes = report.bytes_replayed,
            torn_tail_bytes = report.torn_tail_bytes,
            stopped = report.stopped_reason.as_deref().unwrap_or("clean end"),
            "journal recovered"
        );
    }
    Ok(Recovered {
        superblock: recovered,
        report,
        head: pos,
        next_lsn: lsn,
        device_failure: None,
    })
}

/// After the device failed during replay: scans the ring again (the same scan, since nothing
/// was written to the journal) and keeps every record in an index, newest first as the
/// writer would, so that reads see every completed write. `on_replayed` still sees the
/// records' ranges: marking them for the peers is safe whether or not they reach the device.
async fn keep_in_journal(
    journal: &dyn Storage,
    superblock: Superblock,
    name: &str,
    on_replayed: Option<RecoveryHook>,
    error: JournalError,
) -> Result<Recovered, JournalError> {
    let mut scan = RingScan::new(journal, superblock);
    let mut index = Index::new();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut records_kept = 0u64;
    while let Some(parts) = scan.next_batch().await? {
        for (record, data) in parts {
            let op = Op::from_record(&record, data);
            let (offset, len) = op.range();
            index.insert(offset, len, record.lsn, op.content());
            match ranges.last_mut() {
                Some((at, run)) if *at + *run == offset => *run += len,
                _ => ranges.push((offset, len)),
            }
            records_kept += 1;
        }
    }
    if let Some(hook) = on_replayed {
        hook(ranges, scan.lsn - 1)
            .await
            .map_err(io_err("recording the replayed ranges"))?;
    }
    tracing::error!(
        volume = name,
        records = records_kept,
        held_bytes = index.data_bytes(),
        %error,
        "the device failed during journal replay; the volume serves reads and refuses writes"
    );
    Ok(Recovered {
        superblock,
        report: scan.report,
        head: scan.pos,
        next_lsn: scan.lsn,
        device_failure: Some(DeviceFailure {
            error,
            index,
            used_bytes: scan.scanned_bytes,
        }),
    })
}

/// Writes the collected records to the device and empties the list.
async fn replay_chunk(
    device: &dyn Storage,
    records: &mut Vec<(u64, Op)>,
) -> Result<(), JournalError> {
    write_coalesced(
        device,
        records.iter().map(|(lsn, op)| (*lsn, op)),
        APPLY_WAVE_MAX,
    )
    .await
    .map_err(device_err("replaying the journal onto the device"))?;
    records.clear();
    Ok(())
}

/// A record on its way to the device.
#[derive(Clone)]
struct ApplyRecord {
    lsn: u64,
    op: Op,
}

/// A completed batch, handed to the applier in ring order.
struct CompletedBatch {
    records: Vec<ApplyRecord>,
    last_lsn: u64,
    /// Ring position just after this batch: the new tail once it is applied.
    end_pos: u64,
    /// Ring bytes it occupies, including space skipped by a wrap before it.
    ring_bytes: u64,
    /// Memory its records keep until it is applied ([`Op::memory_bytes`]).
    memory_bytes: u64,
}

struct Inflight {
    id: u64,
    first_lsn: u64,
    last_lsn: u64,
    end_pos: u64,
    ring_bytes: u64,
    memory_bytes: u64,
    records: Vec<ApplyRecord>,
    waiters: Vec<Waiter>,
    fua: bool,
    dsync: bool,
    written: bool,
}

enum Event {
    BatchWritten {
        id: u64,
        result: std::io::Result<()>,
    },
    Synced {
        covers_lsn: u64,
        result: std::io::Result<()>,
    },
    Released {
        ring_bytes: u64,
        memory_bytes: u64,
    },
    ApplyFailed(JournalError),
    /// The applier has applied everything it was given and stopped.
    ApplierDone,
    /// The applier applied everything and wrote an empty ring (see [`Journal::reset`]).
    ResetDone {
        next_lsn: u64,
        journal_id: u64,
        result: Result<(), JournalError>,
    },
}

/// What the writer hands the applier, in ring order.
enum ApplyItem {
    Batch(CompletedBatch),
    /// Apply everything before, then persist an empty ring at `head` whose next record is
    /// `next_lsn`, under `journal_id`.
    Reset {
        head: u64,
        next_lsn: u64,
        journal_id: u64,
    },
}

/// A client waiting for its record: where to answer, when it was queued, its LSN.
type Waiter = (oneshot::Sender<Result<u64, JournalError>>, Instant, u64);

/// A record waiting for a batch: the change, its FUA flag, its waiter, when it was queued.
type Pending = (
    Op,
    bool,
    oneshot::Sender<Result<u64, JournalError>>,
    Instant,
);

struct Writer {
    storage: Arc<dyn Storage>,
    shared: Arc<Shared>,
    journal_id: u64,
    ring_bytes: u64,
    head: u64,
    next_lsn: u64,
    used_bytes: u64,
    pending: VecDeque<Pending>,
    inflight: VecDeque<Inflight>,
    next_batch_id: u64,
    /// Every batch up to here is written to the journal (not necessarily durable).
    written_lsn: u64,
    /// Every record up to here is acknowledged to its client.
    completed_lsn: u64,
    /// Every record up to here is durable.
    durable_lsn: u64,
    sync_running: bool,
    /// Flushes waiting for `durable_lsn` to reach their target.
    flush_waiters: Vec<(u64, oneshot::Sender<Result<u64, JournalError>>)>,
    events_tx: mpsc::UnboundedSender<Event>,
    apply_tx: Option<mpsc::UnboundedSender<ApplyItem>>,
    /// When the writer started waiting for space, for the full-wait metric.
    full_since: Option<Instant>,
    /// When "journal full" was last logged: once per interval, not once per episode.
    full_logged_at: Option<Instant>,
    /// Memory of every record submitted and not yet released by the applier
    /// ([`Op::memory_bytes`]): what the journal's records keep alive (payloads, index pieces,
    /// queued and in-round records).
    unapplied_memory_bytes: u64,
    /// A reset waiting for the queue to drain, then for the applier.
    resetting: Option<Resetting>,
}

struct Resetting {
    next_lsn: Option<u64>,
    done: oneshot::Sender<Result<u64, JournalError>>,
    /// Handed to the applier; waiting for `ResetDone`.
    started: bool,
}

impl Writer {
    async fn run(
        mut self,
        mut requests: mpsc::Receiver<Request>,
        mut events: mpsc::UnboundedReceiver<Event>,
    ) {
        let mut closing: Option<oneshot::Sender<()>> = None;
        let mut open = true;
        loop {
            tokio::select! {
                biased;
                Some(event) = events.recv() => self.handle_event(event),
                request = requests.recv(), if open && closing.is_none() && self.resetting.is_none() && self.pending.len() < PENDING_RECORDS_MAX => match request {
                    Some(request) => {
                        self.handle_request(request, &mut closing);
                        // Take whatever else is queued right now into the same batch.
                        while self.pending.len() < PENDING_RECORDS_MAX && closing.is_none() && self.resetting.is_none() {
                            match requests.try_recv() {
                                Ok(request) => self.handle_request(request, &mut closing),
                                Err(_) => break,
                            }
                        }
                    }
                    None => open = false,
                },
                else => break,
            }
            if self.shared.failed.load(Ordering::SeqCst) {
                self.fail_everything();
            }
            self.submit_batches();
            self.maybe_start_reset();
            if (closing.is_some() || !open)
                && self.pending.is_empty()
                && self.inflight.is_empty()
                && self.flush_waiters.is_empty()
                && !self.sync_running
            {
                if self.durable_lsn < self.written_lsn && !self.shared.failed.load(Ordering::SeqCst)
                {
                    self.start_sync();
                    continue;
                }
                break;
            }
        }
        // Closing: let the applier drain everything, then report.
        if let Some(apply_tx) = self.apply_tx.take() {
            drop(apply_tx);
            while let Some(event) = events.recv().await {
                match event {
                    Event::ApplierDone => break,
                    Event::Released { .. } | Event::ApplyFailed(_) | Event::ResetDone { .. } => {
                        self.handle_event(event)
                    }
                    _ => {}
                }
            }
        }
        if let Some(done) = closing {
            let _ = done.send(());
        }
    }

    fn handle_request(&mut self, request: Request, closing: &mut Option<oneshot::Sender<()>>) {
        match request {
            Request::Append {
                op,
                fua,
                at_lsn,
                done,
                queued_at,
            } => {
                if let Err(error) = self.shared.check() {
                    let _ = done.send(Err(error));
                    return;
                }
                let expected = self.next_lsn + self.pending.len() as u64;
                if let Some(found) = at_lsn.filter(|lsn| *lsn != expected) {
                    let _ = done.send(Err(JournalError::LsnMismatch { expected, found }));
                    return;
                }
                self.pending.push_back((op, fua, done, queued_at));
            }
            Request::Reset { next_lsn, done } => {
                self.resetting = Some(Resetting {
                    next_lsn,
                    done,
                    started: false,
                });
            }
            Request::Flush { done } => {
                // A flush covers writes completed before it arrived: those are at or below
                // completed_lsn. Writes still in flight are not covered.
                let target = self.completed_lsn;
                if target <= self.durable_lsn {
                    let _ = done.send(Ok(self.durable_lsn));
                } else {
                    self.flush_waiters.push((target, done));
                    if !self.sync_running {
                        self.start_sync();
                    }
                }
            }
            Request::Close { done } => *closing = Some(done),
        }
    }

    fn handle_event(&mut self, event: Event) {
        match event {
            Event::BatchWritten { id, result } => {
                if let Err(error) = result {
                    self.shared.fail(&JournalError::Io {
                        what: "writing a batch",
                        message: error.to_string(),
                    });
                    self.fail_everything();
                    return;
                }
                if let Some(batch) = self.inflight.iter_mut().find(|b| b.id == id) {
                    batch.written = true;
                }
                self.complete_in_order();
            }
            Event::Synced { covers_lsn, result } => {
                self.sync_running = false;
                if let Err(error) = result {
                    // A failed fdatasync may have dropped dirty data: never retry and pretend.
                    self.shared.fail(&JournalError::Io {
                        what: "fdatasync of the journal",
                        message: error.to_string(),
                    });
                    self.fail_everything();
                    return;
                }
                self.durable_lsn = self.durable_lsn.max(covers_lsn);
                let durable = self.durable_lsn;
                let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.flush_waiters)
                    .into_iter()
                    .partition(|(t, _)| *t <= durable);
                self.flush_waiters = waiting;
                for (_, done) in ready {
                    let _ = done.send(Ok(durable));
                }
                self.complete_in_order();
                if !self.flush_waiters.is_empty() && !self.sync_running {
                    self.start_sync();
                }
            }
            Event::Released {
                ring_bytes,
                memory_bytes,
            } => {
                self.unapplied_memory_bytes -= memory_bytes;
                assert!(
                    ring_bytes <= self.used_bytes,
                    "released more journal space than was used"
                );
                self.used_bytes -= ring_bytes;
                self.shared
                    .used_bytes
                    .store(self.used_bytes, Ordering::Relaxed);
                self.shared
                    .metrics
                    .journal_used_bytes
                    .set(crate::gauge_i64(self.used_bytes));
            }
            Event::ApplyFailed(error) => {
                // The applier has stopped: nothing may wait for it any more (close included).
                self.apply_tx = None;
                self.shared.fail(&error);
                self.fail_everything();
            }
            Event::ApplierDone => self.apply_tx = None,
            Event::ResetDone {
                next_lsn,
                journal_id,
                result,
            } => {
                let Some(resetting) = self.resetting.take() else {
                    return;
                };
                match result {
                    Ok(()) => {
                        self.journal_id = journal_id;
                        self.next_lsn = next_lsn;
                        self.written_lsn = next_lsn - 1;
                        self.completed_lsn = next_lsn - 1;
                        self.durable_lsn = next_lsn - 1;
                        self.shared.head_lsn.store(next_lsn - 1, Ordering::Relaxed);
                        self.shared
                            .applied_lsn
                            .store(next_lsn - 1, Ordering::Relaxed);
                        self.shared
                            .metrics
                            .journal_head_lsn
                            .set(crate::gauge_i64(next_lsn - 1));
                        self.shared
                            .metrics
                            .journal_applied_lsn
                            .set(crate::gauge_i64(next_lsn - 1));
                        let _ = resetting.done.send(Ok(next_lsn));
                    }
                    Err(error) => {
                        let _ = resetting.done.send(Err(error.clone()));
                        self.shared.fail(&error);
                        self.fail_everything();
                    }
                }
            }
        }
    }

    /// Hands a requested reset to the applier once nothing is queued, in flight or syncing.
    fn maybe_start_reset(&mut self) {
        let Some(resetting) = &mut self.resetting else {
            return;
        };
        if resetting.started
            || !self.pending.is_empty()
            || !self.inflight.is_empty()
            || self.sync_running
        {
            return;
        }
        if let Err(error) = self.shared.check() {
            let resetting = self.resetting.take().expect("checked above");
            let _ = resetting.done.send(Err(error));
            return;
        }
        let Some(apply_tx) = &self.apply_tx else {
            let resetting = self.resetting.take().expect("checked above");
            let _ = resetting.done.send(Err(JournalError::Closed));
            return;
        };
        let next_lsn = resetting.next_lsn.unwrap_or(self.next_lsn);
        let journal_id = loop {
            let id: u64 = rand::random();
            if id != self.journal_id {
                break id;
            }
        };
        resetting.started = true;
        let _ = apply_tx.send(ApplyItem::Reset {
            head: self.head,
            next_lsn,
            journal_id,
        });
    }

    /// Acknowledges written batches from the front of the queue, in ring order.
    fn complete_in_order(&mut self) {
        for batch in self.inflight.iter() {
            if batch.last_lsn <= self.written_lsn {
                continue;
            }
            if !batch.written {
                break;
            }
            assert_eq!(
                batch.first_lsn,
                self.written_lsn + 1,
                "batches are written in LSN order"
            );
            self.written_lsn = batch.last_lsn;
        }
        while let Some(front) = self.inflight.front() {
            if !front.written {
                return;
            }
            assert_eq!(
                front.first_lsn,
                self.completed_lsn + 1,
                "batches complete in LSN order"
            );
            if front.dsync && self.durable_lsn + 1 == front.first_lsn {
                // Written with RWF_DSYNC after everything before it was durable.
                self.durable_lsn = front.last_lsn;
            }
            if front.fua && self.durable_lsn < front.last_lsn {
                // Durable only once an fdatasync covers it and everything before it.
                if !self.sync_running {
                    self.start_sync();
                }
                return;
            }
            let batch = self.inflight.pop_front().expect("front exists");
            self.completed_lsn = batch.last_lsn;
            let now = Instant::now();
            for (done, queued_at, lsn) in batch.waiters {
                self.shared
                    .metrics
                    .write_latency_journal
                    .observe(now.duration_since(queued_at).as_secs_f64());
                let _ = done.send(Ok(lsn));
            }
            if let Some(apply_tx) = &self.apply_tx {
                let _ = apply_tx.send(ApplyItem::Batch(CompletedBatch {
                    records: batch.records,
                    last_lsn: batch.last_lsn,
                    end_pos: batch.end_pos,
                    ring_bytes: batch.ring_bytes,
                    memory_bytes: batch.memory_bytes,
                }));
            }
        }
    }

    fn start_sync(&mut self) {
        assert!(!self.sync_running, "one fdatasync at a time");
        self.sync_running = true;
        // Everything written so far is on the device; the sync makes it durable.
        let covers_lsn = self.written_lsn;
        let storage = self.storage.clone();
        let events = self.events_tx.clone();
        tokio::spawn(async move {
            let result = storage.sync().await;
            let _ = events.send(Event::Synced { covers_lsn, result });
        });
    }

    fn fail_everything(&mut self) {
        let error = match self.shared.check() {
            Err(error) => error,
            Ok(()) => return,
        };
        for (_, _, done, _) in self.pending.drain(..) {
            let _ = done.send(Err(error.clone()));
        }
        let mut index = self.shared.index.lock().expect("index lock");
        for batch in self.inflight.drain(..) {
            // Never written: reads must not keep returning data the client was told failed.
            for record in &batch.records {
                let (offset, len) = record.op.range();
                index.remove_applied(offset, len, record.lsn);
            }
            for (done, _, _) in batch.waiters {
                let _ = done.send(Err(error.clone()));
            }
        }
        drop(index);
        for (_, done) in self.flush_waiters.drain(..) {
            let _ = done.send(Err(error.clone()));
        }
    }

    /// Forms batches from pending records while there is space and room in flight.
    fn submit_batches(&mut self) {
        while !self.pending.is_empty()
            && self.inflight.len() < INFLIGHT_BATCHES_MAX
            && !self.shared.failed.load(Ordering::SeqCst)
        {
            let mut count = 0;
            let mut payload_bytes = 0;
            for (op, _, _, _) in self.pending.iter() {
                if count == RECORDS_PER_BATCH_MAX
                    || (count > 0 && payload_bytes + op.payload_bytes() > BATCH_PAYLOAD_BYTES_MAX)
                {
                    break;
                }
                count += 1;
                payload_bytes += op.payload_bytes();
            }
            let batch_bytes = BLOCK_BYTES as u64 + payload_bytes;
            let (start, skipped_bytes) = if self.head + batch_bytes > self.ring_bytes {
                (0, self.ring_bytes - self.head)
            } else {
                (self.head, 0)
            };
            let unapplied_bytes = self.unapplied_memory_bytes;
            if self.used_bytes + skipped_bytes + batch_bytes > self.ring_bytes
                || unapplied_bytes >= UNAPPLIED_MEMORY_BYTES_MAX
            {
                // Journal full: wait for the applier to release space. Writes wait; they never
                // fail and memory does not grow, since pending and the channel are bounded.
                if self.full_since.is_none() {
                    self.full_since = Some(Instant::now());
                    self.shared
                        .full_waits
                        .fetch_add(count as u64, Ordering::Relaxed);
                    self.shared
                        .metrics
                        .journal_full_waits_total
                        .inc_by(count as u64);
                    let now = Instant::now();
                    if self
                        .full_logged_at
                        .is_none_or(|at| now.duration_since(at) >= FULL_LOG_INTERVAL)
                    {
                        self.full_logged_at = Some(now);
                        tracing::warn!(
                            used_bytes = self.used_bytes,
                            capacity_bytes = self.ring_bytes,
                            unapplied_bytes,
                            "journal full: writes wait for apply"
                        );
                    }
                }
                return;
            }
            if let Some(since) = self.full_since.take() {
                self.shared
                    .metrics
                    .journal_full_wait_seconds_total
                    .inc_by(since.elapsed().as_secs_f64());
            }
            self.submit_one(count, start, skipped_bytes, batch_bytes);
        }
    }

    /// The tap panicked on a record of this batch: the replication of this volume is gone.
    /// The journal stops taking writes, with the reason (the writer fails everything queued
    /// next); this batch is never written: its writes fail and reads forget them. Reads keep
    /// working.
    fn fail_tapped_batch(
        &mut self,
        message: String,
        records: &[ApplyRecord],
        waiters: Vec<Waiter>,
    ) {
        self.shared.fail(&JournalError::TapPanicked(message));
        let error = match self.shared.check() {
            Err(error) => error,
            Ok(()) => JournalError::Closed,
        };
        let mut index = self.shared.index.lock().expect("index lock");
        for record in records {
            let (offset, len) = record.op.range();
            index.remove_applied(offset, len, record.lsn);
        }
        drop(index);
        for (done, _, _) in waiters {
            let _ = done.send(Err(error.clone()));
        }
    }

    fn submit_one(&mut self, count: usize, start: u64, skipped_bytes: u64, batch_bytes: u64) {
        let first_lsn = self.next_lsn;
        let mut descriptors = Vec::with_capacity(count);
        let mut records = Vec::with_capacity(count);
        let mut waiters = Vec::with_capacity(count);
        let mut iovecs = Vec::with_capacity(count + 1);
        iovecs.push(SharedBuf::from(AlignedBuf::zeroed(0))); // placeholder for the header
        let mut fua = false;
        let mut tap_panic = None;
        {
            let tap = lock_value(&self.shared.tap).clone();
            let mut index = self.shared.index.lock().expect("index lock");
            for (i, (op, record_fua, done, queued_at)) in self.pending.drain(..count).enumerate() {
                let lsn = first_lsn + i as u64;
                fua |= record_fua;
                if let Op::Write { data, .. } = &op {
                    iovecs.push(data.padded_view());
                }
                let descriptor = op.descriptor(lsn, record_fua);
                let (offset, len) = op.range();
                index.insert(offset, len, lsn, op.content());
                if let Some(tap) = tap.as_ref().filter(|_| tap_panic.is_none()) {
                    tap_panic = tap_record(&**tap, lsn, &op, record_fua);
                }
                descriptors.push(descriptor);
                records.push(ApplyRecord { lsn, op });
                waiters.push((done, queued_at, lsn));
            }
        }
        if let Some(message) = tap_panic {
            return self.fail_tapped_batch(message, &records, waiters);
        }
        let header = BatchHeader::Records {
            journal_id: self.journal_id,
            first_lsn,
            records: descriptors,
        };
        debug_assert_eq!(header.batch_bytes(), batch_bytes);
        iovecs[0] = AlignedBuf::copy_from(&header.encode()).freeze();
        let last_lsn = first_lsn + count as u64 - 1;
        self.next_lsn = last_lsn + 1;
        self.shared.head_lsn.store(last_lsn, Ordering::Relaxed);
        self.shared
            .metrics
            .journal_head_lsn
            .set(crate::gauge_i64(last_lsn));

        // RWF_DSYNC makes this batch durable by itself; that is enough for its FUA records only
        // if everything before it is durable already.
        let dsync = fua && self.inflight.is_empty() && self.durable_lsn == self.completed_lsn;
        let wrap_at = (skipped_bytes > 0).then_some(self.head);
        let end_pos = if start + batch_bytes == self.ring_bytes {
            0
        } else {
            start + batch_bytes
        };
        let ring_bytes = skipped_bytes + batch_bytes;
        self.used_bytes += ring_bytes;
        self.shared
            .used_bytes
            .store(self.used_bytes, Ordering::Relaxed);
        self.shared
            .metrics
            .journal_used_bytes
            .set(crate::gauge_i64(self.used_bytes));
        self.head = end_pos;
        let id = self.next_batch_id;
        self.next_batch_id += 1;
        let memory_bytes = records.iter().map(|record| record.op.memory_bytes()).sum();
        self.unapplied_memory_bytes += memory_bytes;
        self.inflight.push_back(Inflight {
            id,
            first_lsn,
            last_lsn,
            end_pos,
            ring_bytes,
            memory_bytes,
            records,
            waiters,
            fua,
            dsync,
            written: false,
        });

        let storage = self.storage.clone();
        let events = self.events_tx.clone();
        let journal_id = self.journal_id;
        tokio::spawn(async move {
            let wrap = async {
                match wrap_at {
                    // The rest of the ring is skipped; the marker tells recovery to continue at 0.
                    Some(at) => {
                        let marker = BatchHeader::Wrap {
                            journal_id,
                            next_lsn: first_lsn,
                        }
                        .encode();
                        storage
                            .write_at(
                                RING_START_BYTES + at,
                                vec![AlignedBuf::copy_from(&marker).freeze()],
                                dsync,
                            )
                            .await
                    }
                    None => Ok(()),
                }
            };
            let batch = storage.write_at(RING_START_BYTES + start, iovecs, dsync);
            let (wrap_result, batch_result) = tokio::join!(wrap, batch);
            let _ = events.send(Event::BatchWritten {
                id,
                result: wrap_result.and(batch_result),
            });
        });
    }
}

struct Applier {
    journal: Arc<dyn Storage>,
    device: Arc<dyn Storage>,
    shared: Arc<Shared>,
    superblock: Superblock,
    events: mpsc::UnboundedSender<Event>,
    apply_limit: tokio::sync::watch::Receiver<u64>,
}

impl Applier {
    /// Waits until records up to `lsn` may leave the journal. A dropped limit counts as no
    /// limit.
    async fn allowed(&mut self, lsn: u64) {
        let _ = self.apply_limit.wait_for(|limit| *limit >= lsn).await;
    }

    async fn run(mut self, mut batches: mpsc::UnboundedReceiver<ApplyItem>) {
        // Applying costs an fdatasync of the device, which queues behind and in front of the
        // journal's own writes on the same disk. Gathering a round for a short while (or until a
        // quarter of the ring waits) keeps that off the client's latency; the index serves reads
        // of the data meanwhile, and memory stays bounded by the ring.
        let eager_bytes = (self.shared.capacity_bytes / 4).min(UNAPPLIED_ROUND_BYTES_MAX);
        let mut carried: Option<ApplyItem> = None;
        loop {
            let item = match carried.take() {
                Some(item) => item,
                None => match batches.recv().await {
                    Some(item) => item,
                    None => break,
                },
            };
            let first = match item {
                ApplyItem::Batch(batch) => batch,
                ApplyItem::Reset {
                    head,
                    next_lsn,
                    journal_id,
                } => {
                    let result = self.reset(head, next_lsn, journal_id).await;
                    let failed = result.is_err();
                    let _ = self.events.send(Event::ResetDone {
                        next_lsn,
                        journal_id,
                        result,
                    });
                    if failed {
                        break;
                    }
                    continue;
                }
            };
            self.allowed(first.last_lsn).await;
            let deadline = tokio::time::Instant::now() + APPLY_DELAY;
            let mut ring_bytes = first.ring_bytes;
            let mut round = vec![first];
            while round.len() < APPLY_BATCHES_MAX && ring_bytes < eager_bytes {
                match tokio::time::timeout_at(deadline, batches.recv()).await {
                    Ok(Some(ApplyItem::Batch(batch)))
                        if batch.last_lsn <= *self.apply_limit.borrow() =>
                    {
                        ring_bytes += batch.ring_bytes;
                        round.push(batch);
                    }
                    // Not yet allowed, or a reset: the next round starts with it.
                    Ok(Some(item)) => {
                        carried = Some(item);
                        break;
                    }
                    // Closing (apply everything now) or the round's time is up.
                    Ok(None) | Err(_) => break,
                }
            }
            // A round cut short by size means writes are arriving faster than they are applied:
            // apply with full concurrency. Otherwise trickle, so that the device queue stays
            // short for the journal writes that clients are waiting on.
            let wave = if ring_bytes >= eager_bytes {
                APPLY_WAVE_MAX
            } else {
                IDLE_APPLY_WAVE
            };
            if let Err(error) = self.apply_round(&round, wave).await {
                self.shared.fail(&error);
                let _ = self.events.send(Event::ApplyFailed(error));
                break;
            }
        }
        let _ = self.events.send(Event::ApplierDone);
    }

    /// Everything before was applied (rounds run in order); persists an empty ring at `head`.
    async fn reset(
        &mut self,
        head: u64,
        next_lsn: u64,
        journal_id: u64,
    ) -> Result<(), JournalError> {
        self.device
            .sync()
            .await
            .map_err(device_err("fdatasync of the device"))?;
        self.superblock = Superblock {
            sequence: self.superblock.sequence + 1,
            journal_id,
            tail_offset: head,
            tail_lsn: next_lsn,
            ..self.superblock
        };
        write_superblock(&*self.journal, &self.superblock).await?;
        Ok(())
    }

    async fn apply_round(
        &mut self,
        round: &[CompletedBatch],
        wave: usize,
    ) -> Result<(), JournalError> {
        let records: Vec<&ApplyRecord> = round.iter().flat_map(|b| b.records.iter()).collect();
        // The write-ahead rule: no record reaches the device before it is durable in the
        // journal. Completed batches may still be in the disk's (or the page) cache; applied
        // early, a power loss before the device's fdatasync could tear device blocks between
        // their old contents and a record whose batch was lost, which no replay repairs. Every
        // batch of the round is written, so one fdatasync per round covers them all (most
        // often a FUA or FLUSH already did, and it finds nothing to write).
        self.journal
            .sync()
            .await
            .map_err(io_err("fdatasync of the journal before applying"))?;
        write_coalesced(&*self.device, records.iter().map(|r| (r.lsn, &r.op)), wave)
            .await
            .map_err(device_err("applying the journal to the device"))?;
        self.device
            .sync()
            .await
            .map_err(device_err("fdatasync of the device"))?;
        {
            let mut index = self.shared.index.lock().expect("index lock");
            for record in &records {
                let (offset, len) = record.op.range();
                index.remove_applied(offset, len, record.lsn);
            }
            self.shared
                .metrics
                .journal_unapplied_bytes
                .set(crate::gauge_i64(index.data_bytes()));
        }
        let last = round.last().expect("a round has a batch");
        self.superblock = Superblock {
            sequence: self.superblock.sequence + 1,
            tail_offset: last.end_pos,
            tail_lsn: last.last_lsn + 1,
            ..self.superblock
        };
        // The records are durable on the device; only now may their journal space be reused.
        write_superblock(&*self.journal, &self.superblock).await?;
        self.shared
            .applied_lsn
            .store(last.last_lsn, Ordering::Relaxed);
        self.shared
            .metrics
            .journal_applied_lsn
            .set(crate::gauge_i64(last.last_lsn));
        let ring_bytes = round.iter().map(|b| b.ring_bytes).sum();
        let memory_bytes = round.iter().map(|b| b.memory_bytes).sum();
        let _ = self.events.send(Event::Released {
            ring_bytes,
            memory_bytes,
        });
        Ok(())
    }
}

/// Writes records (given in LSN order) to the device as their final state: replaying them into
/// a private index leaves the newest contents of every range as disjoint pieces, so
/// overwritten data is written once, adjacent pieces become one vectored write, and up to
/// `concurrency` writes run at once. The device ends up exactly as if every record had been
/// applied in order; the caller makes it durable. Used by the applier and by recovery.
async fn write_coalesced<'a>(
    device: &dyn Storage,
    records: impl Iterator<Item = (u64, &'a Op)>,
    concurrency: usize,
) -> std::io::Result<()> {
    let mut coalesced = Index::new();
    for (lsn, op) in records {
        let (offset, len) = op.range();
        coalesced.insert(offset, len, lsn, op.content());
    }
    let mut writes: Vec<DeviceWrite> = Vec::new();
    for (offset, len, content) in coalesced.pieces() {
        match (writes.last_mut(), content) {
            (
                Some(DeviceWrite::Data {
                    offset: at,
                    bufs,
                    len: run,
                }),
                Content::Data(data),
            ) if *at + *run == offset
                && bufs.len() < IOVECS_PER_WRITE_MAX
                && *run + len <= APPLY_WRITE_BYTES_MAX =>
            {
                bufs.push(data.clone());
                *run += len;
            }
            (
                Some(DeviceWrite::Zero {
                    offset: at,
                    len: run,
                    punch: p,
                }),
                Content::Zero { punch },
            ) if *at + *run == offset && p == punch => {
                *run += len;
            }
            (_, Content::Data(data)) => writes.push(DeviceWrite::Data {
                offset,
                bufs: vec![data.clone()],
                len,
            }),
            (_, Content::Zero { punch }) => writes.push(DeviceWrite::Zero {
                offset,
                len,
                punch: *punch,
            }),
        }
    }
    drop(coalesced);
    for wave in writes.chunks(concurrency.max(1)) {
        let ios = wave.iter().map(|write| async move {
            match write {
                DeviceWrite::Data { offset, bufs, .. } => {
                    device.write_at(*offset, bufs.clone(), false).await
                }
                // Any 512-byte aligned range, whatever the device's logical block size.
                DeviceWrite::Zero { offset, len, punch } => {
                    crate::storage::zero(device, *offset, *len, *punch).await
                }
            }
        });
        for result in join_all(ios).await {
            result?;
        }
    }
    Ok(())
}

/// One write of a coalesced apply round.
enum DeviceWrite {
    Data {
        offset: u64,
        bufs: Vec<SharedBuf>,
        len: u64,
    },
    Zero {
        offset: u64,
        len: u64,
        punch: bool,
    },
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
        fn record(&self, _lsn: u64, _op: &Op, _fua: bool) {
            if self.0.fetch_add(1, Ordering::SeqCst) == 1 {
                panic!("replication lock: PoisonError");
            }
        }
    }

    fn write(offset_bytes: u64, byte: u8) -> Op {
        Op::Write {
            offset_bytes,
            data: AlignedBuf::copy_from(&[byte; 4096]).freeze(),
        }
    }

    /// A panic in the tap stops the journal with a clear error and nothing else: the index
    /// lock is not poisoned, so reads (index lookups) and status keep working, and later
    /// writes are refused with the reason rather than panicking.
    #[test]
    fn a_panicking_tap_fails_writes_and_leaves_reads_working() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let device = MemStorage::new(VOLUME_BYTES);
            let journal_storage = MemStorage::new(MIN_JOURNAL_BYTES);
            Journal::format(&*journal_storage, VOLUME_BYTES)
                .await
                .expect("format");
            let metrics = Metrics::new();
            let (journal, _, _) =
                Journal::open(journal_storage, device, metrics.volume("tap"), "tap", None)
                    .await
                    .expect("open");
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
