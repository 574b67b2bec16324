//! A volume: its backing device, its journal, its role, and the NBD operations on it.
//!
//! The client's path is: NBD request → [`Volume`] → [`Journal::append`] (the only write on the
//! path) → reply. Reads merge the journal's unapplied records with the device. The volume
//! persists its role in `DATA_DIR/NAME.meta` so that `initial_role` applies on first start only.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::Poll;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use ferry_protocol::repl::WriteRecord;
use thiserror::Error;

use crate::config::{Role, VolumeConfig};
use crate::index::Content;
use crate::journal::{
    Journal, JournalError, JournalStats, JournalTap, Op, RecoveryHook, RecoveryReport,
};
use crate::metrics::VolumeMetrics;
use crate::nbd::{BoxFuture, Export, ExportError};
use crate::storage::{self, AlignedBuf, OpenOptions, SharedBuf, Storage};

#[derive(Debug, Error)]
pub enum VolumeError {
    #[error("volume {volume}: {what} {path}: {source}")]
    Io {
        volume: String,
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("volume {volume}: {source}")]
    Journal {
        volume: String,
        source: JournalError,
    },
    #[error("volume {volume}: device {path} has {size_bytes} bytes, not a multiple of 512")]
    BadSize {
        volume: String,
        path: PathBuf,
        size_bytes: u64,
    },
}

/// Sees, at open, the volume size, the ranges of every record journal recovery replayed
/// (merged where adjacent) and the LSN of the last one, before the journal forgets them (see
/// [`Journal::open`]); what it returns must be durable when it completes.
pub type VolumeOpenHook =
    Box<dyn FnOnce(u64, Vec<(u64, u64)>, u64) -> BoxFuture<'static, io::Result<()>> + Send>;

/// What a replicated volume's writes wait for besides the local journal (see `replication/`).
pub trait WriteGate: Send + Sync {
    /// Completes when the record `lsn` may be reported complete (see "Completion" in
    /// `ferry_protocol::replication`); `durable` for FUA writes and FLUSH.
    fn settled(&self, lsn: u64, durable: bool) -> BoxFuture<'_, Result<(), ExportError>>;

    /// A client FLUSH made the local journal durable up to `lsn`: the peers are asked for the
    /// same before [`settled`](Self::settled) is awaited.
    fn flushed(&self, lsn: u64);

    /// Completes when a new write may enter the journal, or refuses it: held while a
    /// restarted primary is fenced and during a resync's final hand-over; refused once the
    /// volume failed or a demotion started.
    fn admit(&self) -> BoxFuture<'_, Result<(), ExportError>>;
}

/// Device writes of a batch's apply in flight at once.
pub const BATCH_APPLY_IN_FLIGHT: usize = 16;

/// One record of a batch being written to the device, and the range it covers.
struct InFlightWrite<'a> {
    start: u64,
    end: u64,
    write: Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>,
}

impl InFlightWrite<'_> {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start < end && start < self.end
    }
}

impl Future for InFlightWrite<'_> {
    type Output = Result<(), String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        self.write.as_mut().poll(cx)
    }
}

pub struct Volume {
    name: String,
    size_bytes: u64,
    primary: AtomicBool,
    journal: Journal,
    /// The backing device, opened with O_DIRECT where the filesystem allows: the applier's
    /// writes then cost no page-cache copy and no writeback burst at fdatasync, and reads do
    /// not cache a second copy of what the client's own cache already holds.
    device: Arc<dyn Storage>,
    device_label: String,
    metrics: VolumeMetrics,
    recovery: RecoveryReport,
    gate: OnceLock<Arc<dyn WriteGate>>,
    /// Writes started and not yet answered, so that a demote can drain them.
    writes_in_flight: tokio::sync::watch::Sender<u64>,
    /// Reads hold it shared; a regional batch is applied holding it alone, so that no read
    /// sees part of a batch.
    read_gate: tokio::sync::RwLock<()>,
}

impl Volume {
    /// Opens (creating on first start) the device, the journal and the metadata of a
    /// configured volume, and replays the journal.
    pub async fn open(
        config: &VolumeConfig,
        journal_path: &Path,
        role: Role,
        metrics: VolumeMetrics,
        on_replayed: Option<VolumeOpenHook>,
    ) -> Result<Volume, VolumeError> {
        let name = config.name.clone();
        let io_error = |what: &'static str, path: &Path| {
            let volume = name.clone();
            let path = path.to_path_buf();
            move |source| VolumeError::Io {
                volume,
                what,
                path,
                source,
            }
        };
        // Clients may read and write any 512-byte aligned range (the export's minimum block
        // size): O_DIRECT only where the device takes that, buffered otherwise (a 4 KiB-sector
        // device; see `storage::open_for_io`).
        let device = storage::open_for_io(
            &config.device,
            &OpenOptions {
                direct: true,
                create_len_bytes: config.size_bytes,
            },
            storage::SECTOR_BYTES,
        )
        .map_err(io_error("cannot open device", &config.device))?;
        let device = storage::maybe_device_write_delay(device)
            .map_err(io_error("cannot open device", &config.device))?;
        if let Some(size) = config.size_bytes {
            if size != device.len_bytes() {
                tracing::warn!(volume = %name, configured = size, actual = device.len_bytes(), "device size differs from config; using the device's size");
            }
        }
        if !journal_path.exists() {
            create_journal(journal_path, config.journal_size_bytes, device.len_bytes())
                .await
                .map_err(io_error("cannot create journal", journal_path))?;
        }
        // Every journal I/O is 4 KiB aligned: O_DIRECT fits wherever the filesystem's
        // direct-I/O alignment is at most that.
        let journal = storage::open_for_io(
            journal_path,
            &OpenOptions {
                direct: true,
                create_len_bytes: None,
            },
            ferry_protocol::journal::BLOCK_BYTES as u64,
        )
        .map_err(io_error("cannot open journal", journal_path))?;
        Volume::open_inner(
            &name,
            device,
            journal,
            role,
            metrics,
            config.device.display().to_string(),
            on_replayed,
        )
        .await
    }

    /// Opens a volume on storage the caller provides (tests use in-memory and faulty disks).
    /// The journal storage must already be formatted with [`Journal::format`].
    pub async fn open_on(
        name: &str,
        device: Arc<dyn Storage>,
        journal: Arc<dyn Storage>,
        role: Role,
        metrics: VolumeMetrics,
        device_label: String,
    ) -> Result<Volume, VolumeError> {
        Volume::open_inner(name, device, journal, role, metrics, device_label, None).await
    }

    async fn open_inner(
        name: &str,
        device: Arc<dyn Storage>,
        journal: Arc<dyn Storage>,
        role: Role,
        metrics: VolumeMetrics,
        device_label: String,
        on_replayed: Option<VolumeOpenHook>,
    ) -> Result<Volume, VolumeError> {
        // NBD's minimum block size is 512: a tail smaller than that could never be addressed.
        let size_bytes = device.len_bytes() / 512 * 512;
        if size_bytes == 0 {
            return Err(VolumeError::BadSize {
                volume: name.into(),
                path: device_label.into(),
                size_bytes: device.len_bytes(),
            });
        }
        let on_replayed = on_replayed.map(|hook| -> RecoveryHook {
            Box::new(move |ranges, head| hook(size_bytes, ranges, head))
        });
        let (journal, recovery, _superblock) =
            Journal::open(journal, device.clone(), metrics.clone(), name, on_replayed)
                .await
                .map_err(|source| VolumeError::Journal {
                    volume: name.into(),
                    source,
                })?;
        metrics
            .recovery_replayed_records
            .set(crate::gauge_i64(recovery.records_replayed));
        metrics
            .recovery_replayed_bytes
            .set(crate::gauge_i64(recovery.bytes_replayed));
        metrics
            .recovery_torn_tail_bytes
            .set(crate::gauge_i64(recovery.torn_tail_bytes));
        let primary = role == Role::Primary;
        metrics.set_role(role.as_str());
        Ok(Volume {
            name: name.to_string(),
            size_bytes,
            primary: AtomicBool::new(primary),
            journal,
            device,
            device_label,
            metrics,
            recovery,
            gate: OnceLock::new(),
            writes_in_flight: tokio::sync::watch::channel(0).0,
            read_gate: tokio::sync::RwLock::new(()),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the export takes writes (primary, and not demoting).
    pub fn writable(&self) -> bool {
        self.primary.load(Ordering::SeqCst)
    }

    /// Follows the replicator's role: `writable` while primary and not demoting. New writes
    /// are refused at once when it turns false; those in flight finish.
    pub fn set_role(&self, role: Role, writable: bool) {
        self.primary.store(writable, Ordering::SeqCst);
        self.metrics.set_role(role.as_str());
    }

    /// Makes every further write wait for `gate` as well (replicated volumes).
    pub fn set_write_gate(&self, gate: Arc<dyn WriteGate>) {
        let _ = self.gate.set(gate);
    }

    /// Installs the journal tap (see [`JournalTap`]).
    pub fn set_journal_tap(&self, tap: Option<Arc<dyn JournalTap>>) {
        self.journal.set_tap(tap);
    }

    /// Keeps records above `lsn` in the journal (see [`Journal::set_apply_limit`]).
    pub fn set_apply_limit(&self, lsn: u64) {
        self.journal.set_apply_limit(lsn);
    }

    /// Waits until no write is in flight (after the role stopped accepting new ones).
    pub async fn drain_writes(&self) {
        let mut rx = self.writes_in_flight.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    /// Secondary: journals the primary's record `lsn` (in call order). The receiver completes
    /// when it is in the journal.
    pub async fn append_at(
        &self,
        lsn: u64,
        op: Op,
        fua: bool,
    ) -> Result<tokio::sync::oneshot::Receiver<Result<u64, JournalError>>, JournalError> {
        self.journal.append_at(lsn, op, fua).await
    }

    /// Makes the journal durable; returns the LSN it is durable up to.
    pub async fn journal_flush(&self) -> Result<u64, JournalError> {
        self.journal.flush().await
    }

    /// Applies the whole journal and restarts it empty at `next_lsn` (see [`Journal::reset`]).
    pub async fn journal_reset(&self, next_lsn: Option<u64>) -> Result<u64, JournalError> {
        self.journal.reset(next_lsn).await
    }

    /// Secondary resync: writes straight to the device (the journal is empty meanwhile).
    pub async fn write_device(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.device
            .write_at(offset, vec![AlignedBuf::copy_from(data).freeze()], false)
            .await
    }

    /// Writes a buffer the caller filled (aligned, as O_DIRECT wants it) without copying it.
    pub async fn write_device_buf(&self, offset: u64, data: SharedBuf) -> io::Result<()> {
        self.device.write_at(offset, vec![data], false).await
    }

    /// Secondary resync: a range that reads as zeros.
    pub async fn zero_device(&self, offset: u64, len: u64) -> std::io::Result<()> {
        storage::zero(&*self.device, offset, len, true).await
    }

    pub async fn sync_device(&self) -> std::io::Result<()> {
        self.device.sync().await
    }

    /// Regional secondary: applies a stored batch as one unit: with reads held, writes its
    /// records to the device, [`BATCH_APPLY_IN_FLIGHT`] at a time, fdatasyncs it, and restarts
    /// the (empty) journal at `lsn + 1`, which records that the volume is now as of `lsn`.
    /// The device ends as if the records were written one after the other in LSN order: a
    /// record waits for every earlier one it overlaps (a batch keeps only partial overlaps;
    /// one a later record covers whole was dropped when the batch was cut).
    pub async fn apply_batch(&self, lsn: u64, records: &[WriteRecord]) -> Result<(), String> {
        let _reads_held = self.read_gate.write().await;
        let mut in_flight = Vec::new();
        for record in records {
            let start = record.offset_bytes;
            let end = start + u64::from(record.len_bytes);
            while in_flight.len() >= BATCH_APPLY_IN_FLIGHT
                || in_flight
                    .iter()
                    .any(|w: &InFlightWrite<'_>| w.overlaps(start, end))
            {
                storage::first_done(&mut in_flight).await?;
            }
            in_flight.push(InFlightWrite {
                start,
                end,
                write: Box::pin(self.apply_record(record)),
            });
        }
        while !in_flight.is_empty() {
            storage::first_done(&mut in_flight).await?;
        }
        self.device
            .sync()
            .await
            .map_err(|e| format!("fdatasync of the device: {e}"))?;
        self.journal
            .reset(Some(lsn + 1))
            .await
            .map_err(|e| format!("restarting the journal at {}: {e}", lsn + 1))?;
        Ok(())
    }

    async fn apply_record(&self, record: &WriteRecord) -> Result<(), String> {
        let result = if record.kind.has_payload() {
            self.write_device(record.offset_bytes, &record.data).await
        } else {
            storage::zero(
                &*self.device,
                record.offset_bytes,
                u64::from(record.len_bytes),
                record.kind == ferry_protocol::journal::RecordKind::Punch,
            )
            .await
        };
        result.map_err(|e| format!("writing record {} to the device: {e}", record.lsn))
    }

    /// Holds every read of the volume until the guard drops: something applied to the device
    /// as one unit is never seen in part.
    pub async fn hold_reads(&self) -> tokio::sync::RwLockWriteGuard<'_, ()> {
        self.read_gate.write().await
    }

    pub fn recovery(&self) -> &RecoveryReport {
        &self.recovery
    }

    pub fn journal_stats(&self) -> JournalStats {
        self.journal.stats()
    }

    pub fn device_label(&self) -> &str {
        &self.device_label
    }

    /// Why the volume stopped serving writes, if it did.
    pub fn failure(&self) -> Option<String> {
        self.journal.failure()
    }

    /// Reads `len` bytes: unapplied journal records where there are any, the device elsewhere.
    pub async fn read(&self, offset: u64, len: u32) -> Result<Bytes, ExportError> {
        let started = Instant::now();
        let _gate = self.read_gate.read().await;
        let pieces = self.journal.lookup(offset, len as u64);
        let result = if let [only] = pieces.as_slice() {
            match &only.content {
                // The common case: nothing unapplied here, hand the device's buffer over as is.
                None => self
                    .read_device(offset, len as usize)
                    .await
                    .map(|buf| Bytes::from_owner(OwnedBuf(buf))),
                Some(content) => Ok(content_bytes(content, len as usize)),
            }
        } else {
            let mut out = BytesMut::with_capacity(len as usize);
            let mut result = Ok(());
            for piece in pieces {
                match piece.content {
                    None => match self
                        .read_device(piece.offset, crate::usize_from(piece.len))
                        .await
                    {
                        Ok(buf) => out.extend_from_slice(&buf),
                        Err(error) => {
                            result = Err(error);
                            break;
                        }
                    },
                    Some(Content::Zero { .. }) => {
                        out.resize(out.len() + crate::usize_from(piece.len), 0)
                    }
                    Some(Content::Data(data)) => out.extend_from_slice(&data),
                }
            }
            result.map(|()| out.freeze())
        };
        self.metrics
            .read_latency
            .observe(started.elapsed().as_secs_f64());
        if result.is_ok() {
            self.metrics.read_bytes_total.inc_by(u64::from(len));
        }
        result
    }

    async fn read_device(&self, offset: u64, len: usize) -> Result<AlignedBuf, ExportError> {
        let (result, buf) = self.device.read_at(offset, AlignedBuf::zeroed(len)).await;
        result.map_err(|e| {
            tracing::error!(volume = %self.name, offset, len, error = %e, "device read failed");
            ExportError::Io(e.to_string())
        })?;
        Ok(buf)
    }

    async fn append(&self, op: Op, fua: bool) -> Result<(), ExportError> {
        let _in_flight = InFlight::enter(&self.writes_in_flight);
        if !self.primary.load(Ordering::SeqCst) {
            return Err(ExportError::ReadOnly);
        }
        let started = Instant::now();
        if let Some(gate) = self.gate.get() {
            gate.admit().await?;
            // The volume may have been demoted while the write waited.
            if !self.primary.load(Ordering::SeqCst) {
                return Err(ExportError::ReadOnly);
            }
        }
        let result = match self.journal.append(op, fua).await {
            Ok(lsn) => match self.gate.get() {
                Some(gate) => gate.settled(lsn, fua).await,
                None => Ok(()),
            },
            Err(error) => Err(journal_to_export(error)),
        };
        self.metrics
            .write_latency_total
            .observe(started.elapsed().as_secs_f64());
        result
    }

    pub async fn write(&self, offset: u64, data: SharedBuf, fua: bool) -> Result<(), ExportError> {
        let len_bytes = data.len() as u64;
        let result = self
            .append(
                Op::Write {
                    offset_bytes: offset,
                    data,
                },
                fua,
            )
            .await;
        if result.is_ok() {
            self.metrics.write_bytes_total.inc_by(len_bytes);
        }
        result
    }

    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        no_hole: bool,
    ) -> Result<(), ExportError> {
        self.append(
            Op::Zero {
                offset_bytes: offset,
                len_bytes: len,
                punch: !no_hole,
            },
            fua,
        )
        .await
    }

    pub async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), ExportError> {
        // TRIM reads back as zeros (SPEC §2), so copies stay byte-identical.
        self.append(
            Op::Zero {
                offset_bytes: offset,
                len_bytes: len,
                punch: true,
            },
            fua,
        )
        .await
    }

    pub async fn flush(&self) -> Result<(), ExportError> {
        let started = Instant::now();
        let _in_flight = InFlight::enter(&self.writes_in_flight);
        let result = match self.journal.flush().await {
            Ok(lsn) => match self.gate.get() {
                Some(gate) => {
                    gate.flushed(lsn);
                    gate.settled(lsn, true).await
                }
                None => Ok(()),
            },
            Err(error) => Err(journal_to_export(error)),
        };
        self.metrics
            .flush_latency
            .observe(started.elapsed().as_secs_f64());
        result
    }

    /// Drains the journal onto the device; used at clean shutdown.
    pub async fn close(&self) {
        self.journal.close().await;
    }
}

/// Counts a write (or flush) in flight for as long as it lives.
struct InFlight<'a>(&'a tokio::sync::watch::Sender<u64>);

impl<'a> InFlight<'a> {
    fn enter(counter: &'a tokio::sync::watch::Sender<u64>) -> InFlight<'a> {
        counter.send_modify(|n| *n += 1);
        InFlight(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

fn journal_to_export(error: JournalError) -> ExportError {
    match error {
        JournalError::Closed => ExportError::ShuttingDown,
        other => ExportError::Io(other.to_string()),
    }
}

fn content_bytes(content: &Content, len: usize) -> Bytes {
    match content {
        Content::Zero { .. } => Bytes::from(vec![0u8; len]),
        Content::Data(data) => Bytes::from_owner(SharedOwner(data.clone())),
    }
}

/// Lets `Bytes` own an aligned buffer without copying it.
struct OwnedBuf(AlignedBuf);
impl AsRef<[u8]> for OwnedBuf {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

struct SharedOwner(SharedBuf);
impl AsRef<[u8]> for SharedOwner {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Export for Volume {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// The device's logical block when larger than 4 KiB (whole blocks need no
    /// read-modify-write in the page cache); 4 KiB otherwise, the journal's block.
    fn preferred_block_bytes(&self) -> u32 {
        let preferred = self
            .device
            .logical_block_bytes()
            .max(u64::from(ferry_protocol::nbd::PREFERRED_BLOCK_BYTES));
        u32::try_from(preferred).unwrap_or(ferry_protocol::nbd::BLOCK_BYTES_MAX)
    }

    fn read_only(&self) -> bool {
        !self.primary.load(Ordering::Relaxed)
    }

    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<Bytes, ExportError>> {
        Box::pin(Volume::read(self, offset, len))
    }

    fn write(
        &self,
        offset: u64,
        data: SharedBuf,
        fua: bool,
    ) -> BoxFuture<'_, Result<(), ExportError>> {
        Box::pin(Volume::write(self, offset, data, fua))
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        no_hole: bool,
    ) -> BoxFuture<'_, Result<(), ExportError>> {
        Box::pin(Volume::write_zeroes(self, offset, len, fua, no_hole))
    }

    fn trim(&self, offset: u64, len: u32, fua: bool) -> BoxFuture<'_, Result<(), ExportError>> {
        Box::pin(Volume::trim(self, offset, len, fua))
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), ExportError>> {
        Box::pin(Volume::flush(self))
    }

    fn observe(&self, op: &'static str, ok: bool) {
        self.metrics.io_request(op);
        if !ok {
            self.metrics.io_error(op);
        }
    }
}

/// Formats a new journal whole or not at all ([`crate::datadir::create_durably`]), so that a
/// crash during creation never leaves a half-formatted file that would look like a corrupt
/// journal.
async fn create_journal(path: &Path, file_bytes: u64, volume_bytes: u64) -> io::Result<()> {
    crate::datadir::create_durably(path, |tmp| async move {
        // Buffered: formatting writes the file once, and whether O_DIRECT fits is decided
        // when the formatted journal is opened.
        let storage = storage::open(
            &tmp,
            &OpenOptions {
                direct: false,
                create_len_bytes: Some(file_bytes),
            },
        )?;
        Journal::format(&*storage, volume_bytes)
            .await
            .map_err(io::Error::other)?;
        Ok(())
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{Journal, MIN_JOURNAL_BYTES};
    use crate::metrics::Metrics;
    use crate::storage::MemStorage;
    use ferry_protocol::journal::RecordKind;
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    const SECTOR: u64 = 512;

    /// `inner` with each write and zeroing held back for a few polls that depend on its
    /// range, so writes issued together complete in another order than they were issued.
    struct Reordering {
        inner: Arc<dyn Storage>,
    }

    impl Reordering {
        async fn hold(offset: u64, len: u64) {
            for _ in 0..(offset / SECTOR * 7919 + len / SECTOR * 104_729) % 13 {
                tokio::task::yield_now().await;
            }
        }
    }

    impl Storage for Reordering {
        fn len_bytes(&self) -> u64 {
            self.inner.len_bytes()
        }

        fn write_at(
            &self,
            offset: u64,
            bufs: Vec<SharedBuf>,
            dsync: bool,
        ) -> storage::IoFuture<'_, io::Result<()>> {
            Box::pin(async move {
                let len = bufs.iter().map(|b| b.len() as u64).sum();
                Self::hold(offset, len).await;
                self.inner.write_at(offset, bufs, dsync).await
            })
        }

        fn read_at(
            &self,
            offset: u64,
            buf: AlignedBuf,
        ) -> storage::IoFuture<'_, (io::Result<()>, AlignedBuf)> {
            self.inner.read_at(offset, buf)
        }

        fn sync(&self) -> storage::IoFuture<'_, io::Result<()>> {
            self.inner.sync()
        }

        fn zero_range(
            &self,
            offset: u64,
            len: u64,
            punch: bool,
        ) -> storage::IoFuture<'_, io::Result<()>> {
            Box::pin(async move {
                Self::hold(offset, len).await;
                self.inner.zero_range(offset, len, punch).await
            })
        }

        fn logical_block_bytes(&self) -> u64 {
            self.inner.logical_block_bytes()
        }
    }

    #[tokio::test]
    async fn a_batch_applied_concurrently_ends_as_its_records_written_in_order() {
        let len = 1 << 20;
        for seed in 0..40u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let device = MemStorage::new(len);
            let journal = MemStorage::new(MIN_JOURNAL_BYTES);
            Journal::format(&*journal, len).await.expect("format");
            let reordering: Arc<dyn Storage> = Arc::new(Reordering {
                inner: device.clone(),
            });
            let volume = Volume::open_on(
                "v",
                reordering,
                journal,
                Role::Secondary,
                Metrics::new().volume("v"),
                "test".into(),
            )
            .await
            .expect("open the volume");
            // Many small records over a small range: most overlap an earlier one in part,
            // some exactly, some not at all; zero and punch ranges among them.
            let mut expected = vec![0u8; len as usize];
            let mut records = Vec::new();
            for lsn in 1..=300u64 {
                let offset = rng.random_range(0..(len / SECTOR - 64)) * SECTOR / 8;
                let offset = offset - offset % SECTOR;
                let sectors = rng.random_range(1..=32u64);
                let len_bytes = (sectors * SECTOR) as u32;
                let kind = match rng.random_range(0..10) {
                    0 => RecordKind::Zero,
                    1 => RecordKind::Punch,
                    _ => RecordKind::Write,
                };
                let range = offset as usize..offset as usize + len_bytes as usize;
                let data = if kind == RecordKind::Write {
                    let fill = (lsn % 255 + 1) as u8;
                    expected[range].fill(fill);
                    Bytes::from(vec![fill; len_bytes as usize])
                } else {
                    expected[range].fill(0);
                    Bytes::new()
                };
                records.push(WriteRecord {
                    lsn,
                    kind,
                    fua: false,
                    offset_bytes: offset,
                    len_bytes,
                    data,
                });
            }
            volume.apply_batch(300, &records).await.expect("apply");
            let (result, image) = device.read_at(0, AlignedBuf::zeroed(len as usize)).await;
            result.expect("read");
            assert!(image[..] == expected[..], "seed {seed}");
        }
    }
}
