//! `VOLUME.catchup.N`: where a regional secondary stores a catch-up whole before any of it
//! reaches the device (the format is `ferry_protocol::catchup`). Written through [`Storage`],
//! so the power-loss tests cover it.
//!
//! The file grows by segments of [`SEGMENT_BYTES`], each created (and its space reserved)
//! when the catch-up reaches it, so a filesystem without room for the catch-up shows as an
//! error of [`CatchUpFile::append`] while nothing depends on the file yet; the replicator
//! then abandons the staged catch-up and the next one writes the device in place. Appends
//! are gathered in memory into writes of [`CHUNK_BYTES`]; nothing is durable before
//! [`CatchUpFile::commit`]. Every [`WRITEBACK_BYTES`] written, an fdatasync of the segment
//! starts in the background, so the page cache does not hold the whole catch-up until the
//! commit (the kernel would start writing it back only after 30 s or gigabytes) and the commit
//! waits for the last few MiB, not for hundreds: the commit is on the path from the catch-up's
//! last byte to the copy being in sync again.
//!
//! [`CatchUpFile::apply`] writes a committed catch-up to the device once every record of it
//! checks out, each block once (the content of the last record covering it), in device
//! order, in writes of up to [`APPLY_WRITE_BYTES`], [`APPLY_WRITES_IN_FLIGHT`] at a time.

use std::collections::{btree_map, BTreeMap};
use std::io;
use std::iter::Peekable;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use ferry_protocol::catchup::{
    self, CatchUpHeader, CatchUpRecord, RecordRange, HEADER_BYTES, PAD_BYTES, RECORD_HEADER_BYTES,
    SEGMENT_BYTES,
};

use crate::datadir;
use crate::nbd::Export;
use crate::storage::{self, first_done, AlignedBuf, OpenOptions, Storage};
use crate::volume::Volume;

/// Bytes of one write to the file (a segment holds a whole number of them).
pub const CHUNK_BYTES: u64 = 1 << 20;
const _: () = assert!(SEGMENT_BYTES.is_multiple_of(CHUNK_BYTES));
/// Bytes written to the file between two background fdatasyncs (one at a time). At a
/// catch-up over a 100 Mbit/s link that is one every 1.3 s; the commit then finds at most
/// this much (plus what arrived during the last fdatasync) not yet on the disk.
pub const WRITEBACK_BYTES: u64 = 16 << 20;
/// Largest device write of an apply (adjacent ranges gathered).
pub const APPLY_WRITE_BYTES: u64 = 1 << 20;
/// Pieces of a device write this close in the file are read at once (the bytes between
/// them read for nothing).
pub const READ_GAP_BYTES: u64 = 64 << 10;
/// Device writes of an apply in flight at once.
pub const APPLY_WRITES_IN_FLIGHT: usize = 8;

/// The catch-up file of one volume: its segments and the catch-up being written.
pub struct CatchUpFile {
    /// `DATA_DIR/VOLUME.catchup`; segment N is this path with `.N` appended.
    base: PathBuf,
    segments: Vec<Arc<dyn Storage>>,
    /// The catch-up being written, if any.
    current: Option<u64>,
    /// Bytes appended but not yet written, starting at logical offset `written`.
    pending: Vec<u8>,
    written: u64,
    count: u64,
    /// The first error of this catch-up's writes: every later append and the commit fail.
    error: Option<String>,
    /// The background fdatasync of the segment being written, if one runs, and the logical
    /// offset up to which the last one started.
    writeback: Option<tokio::task::JoinHandle<io::Result<()>>>,
    writeback_from: u64,
}

impl std::fmt::Debug for CatchUpFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CatchUpFile")
            .field("base", &self.base)
            .field("current", &self.current)
            .finish()
    }
}

impl CatchUpFile {
    /// The catch-up file at `base` (`DATA_DIR/VOLUME.catchup`), with the segments already
    /// there (a catch-up the meta may name); nothing is created.
    pub fn open(base: &Path) -> io::Result<CatchUpFile> {
        let mut segments = Vec::new();
        loop {
            let path = segment_path(base, segments.len());
            if !path.exists() {
                break;
            }
            let opts = OpenOptions {
                direct: false,
                create_len_bytes: None,
            };
            segments.push(storage::open(&path, &opts)?);
        }
        Ok(CatchUpFile {
            base: base.to_path_buf(),
            segments,
            current: None,
            pending: Vec::new(),
            written: HEADER_BYTES as u64,
            count: 0,
            error: None,
            writeback: None,
            writeback_from: HEADER_BYTES as u64,
        })
    }

    /// Removes every segment (the catch-up they held is applied and recorded, or abandoned).
    pub fn remove(&mut self) {
        // A writeback of the old file may still run on its descriptor; its result no longer
        // matters to anything.
        self.writeback = None;
        self.segments.clear();
        self.current = None;
        self.pending = Vec::new();
        for n in 0.. {
            match std::fs::remove_file(segment_path(&self.base, n)) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::NotFound => break,
                Err(error) => {
                    tracing::warn!(path = %segment_path(&self.base, n).display(), %error, "removing a catch-up segment");
                    break;
                }
            }
        }
    }

    /// Appends one range of catch-up `id`, starting a fresh file when `id` is new. The range
    /// is durable only once [`commit`](Self::commit) returns.
    pub async fn append(&mut self, id: u64, record: &CatchUpRecord) -> Result<(), String> {
        self.start(id);
        if let Some(error) = &self.error {
            return Err(error.clone());
        }
        catchup::encode_record(record, &mut self.pending);
        self.count += 1;
        let result = self.write_full_chunks().await;
        self.keep_error(result)
    }

    /// Makes catch-up `id` durable and marks it complete, leading to `lsn`.
    pub async fn commit(&mut self, id: u64, lsn: u64) -> Result<(), String> {
        self.start(id);
        if let Some(error) = &self.error {
            return Err(error.clone());
        }
        let result = self.commit_inner(id, lsn).await;
        self.keep_error(result)
    }

    async fn commit_inner(&mut self, id: u64, lsn: u64) -> io::Result<()> {
        self.write_full_chunks().await?;
        // Its error must come out here: the fdatasyncs below, on the same descriptors, would
        // not report a writeback error the background one already consumed.
        if let Some(running) = self.writeback.take() {
            joined(running.await)?;
        }
        if !self.pending.is_empty() {
            let mut tail = std::mem::take(&mut self.pending);
            let len = tail.len();
            tail.resize(len.next_multiple_of(PAD_BYTES), 0);
            self.write_logical(self.written, &tail).await?;
            self.written += len as u64;
        }
        if self.segments.is_empty() {
            self.segment(0).await?;
        }
        for segment in &self.segments {
            segment.sync().await?;
        }
        let header = CatchUpHeader {
            catchup: id,
            lsn,
            body_bytes: self.written - HEADER_BYTES as u64,
            count: self.count,
        };
        let block = catchup::encode_header(&header);
        self.segments[0]
            .write_at(0, vec![AlignedBuf::copy_from(&block).freeze()], false)
            .await?;
        self.segments[0].sync().await
    }

    /// The committed catch-up's header, if the file holds one.
    pub async fn header(&self) -> io::Result<Option<CatchUpHeader>> {
        let Some(first) = self.segments.first() else {
            return Ok(None);
        };
        let (result, block) = first.read_at(0, AlignedBuf::zeroed(HEADER_BYTES)).await;
        result?;
        Ok(catchup::decode_header(&block).ok())
    }

    /// Applies the committed catch-up to `lsn` to `volume`'s device as one unit, in two
    /// passes:
    ///
    /// 1. *check*: reads the whole file once, checks the header and every record (its
    ///    checksums, its range inside the volume) and builds an index (`Newest`): which part
    ///    of the file holds the newest content of each device range. A damaged file fails
    ///    here, before the device changes.
    /// 2. *write*, with reads of `volume` held: writes the index's ranges in device order,
    ///    adjacent ones gathered into writes of up to [`APPLY_WRITE_BYTES`] (zero ranges
    ///    through the device's zeroing), [`APPLY_WRITES_IN_FLIGHT`] at a time, reading back
    ///    from the file only the newest content; then fdatasyncs the device and restarts the
    ///    (empty) journal at `lsn + 1`.
    ///
    /// The device ends as if every record had been written in file order (later records
    /// win), and so again when it is applied again after a crash at any point. The second
    /// pass reads back parts of records the first one checked, without checksumming them
    /// again (a part of a record has no checksum of its own). An error of the second pass
    /// (a device write, or a read of the file) leaves the device in part written: the
    /// caller fails the volume, and the next start applies it again whole.
    /// `at_run_time`: not the start's apply (with the `fault-injection` feature and
    /// `FERRY_FAULT_KILL_MID_CATCHUP_APPLY=1`, the process kills itself halfway through the
    /// device writes, the first half of them complete).
    pub async fn apply(
        &self,
        volume: &Volume,
        lsn: u64,
        at_run_time: bool,
    ) -> Result<ApplyReport, String> {
        let started = Instant::now();
        let header = self
            .header()
            .await
            .map_err(|e| format!("reading the catch-up file: {e}"))?
            .filter(|h| h.lsn == lsn)
            .ok_or_else(|| {
                format!(
                    "{} holds no committed catch-up to {lsn}",
                    segment_path(&self.base, 0).display()
                )
            })?;
        // Every record is checked before the device changes: a damaged file changes nothing.
        let newest = self.check(&header, volume.size_bytes()).await?;
        let checked = started.elapsed();
        let kill_at = kill_point(at_run_time, || Plan::new(&newest).count());
        let (writes, device_bytes) = {
            let _reads_held = volume.hold_reads().await;
            let done = self.write_ops(volume, Plan::new(&newest), kill_at).await?;
            volume
                .sync_device()
                .await
                .map_err(|e| format!("fdatasync of the device: {e}"))?;
            volume
                .journal_reset(Some(lsn + 1))
                .await
                .map_err(|e| format!("restarting the journal at {}: {e}", lsn + 1))?;
            done
        };
        Ok(ApplyReport {
            records: header.count,
            file_bytes: header.body_bytes,
            device_bytes,
            writes,
            check_seconds: checked.as_secs_f64(),
            write_seconds: (started.elapsed() - checked).as_secs_f64(),
        })
    }

    /// The check pass of [`apply`](Self::apply): every record of the committed catch-up
    /// checked (its checksums, its range inside a volume of `size_bytes`), and where the
    /// newest content of each device range is.
    async fn check(&self, header: &CatchUpHeader, size_bytes: u64) -> Result<Newest, String> {
        let mut newest = Newest::default();
        self.for_each(header, |index, range, payload_at, _| {
            let end = range.offset_bytes + range.len_bytes;
            if end > size_bytes {
                return Err(format!(
                    "record {index}: {} bytes at {} pass the end of the volume ({size_bytes} bytes)",
                    range.len_bytes, range.offset_bytes
                ));
            }
            let source = if range.data {
                Source::Data { at: payload_at }
            } else {
                Source::Zero
            };
            newest.insert(range.offset_bytes, end, source);
            Ok(())
        })
        .await?;
        Ok(newest)
    }

    /// The device writes of [`apply`](Self::apply), [`APPLY_WRITES_IN_FLIGHT`] at a time
    /// (they cover disjoint ranges, so their order does not matter). Kills the process
    /// before write `kill_at`, every write before it complete. Returns once no write is in
    /// flight: the first error if any, else the writes and the bytes they covered.
    async fn write_ops(
        &self,
        volume: &Volume,
        ops: Plan<'_>,
        kill_at: Option<usize>,
    ) -> Result<(u64, u64), String> {
        let mut in_flight = Vec::with_capacity(APPLY_WRITES_IN_FLIGHT);
        let (mut writes, mut bytes) = (0u64, 0u64);
        let mut failed = None;
        for (n, op) in ops.enumerate() {
            if Some(n) == kill_at {
                while !in_flight.is_empty() {
                    let _ = first_done(&mut in_flight).await;
                }
                kill_self();
            }
            if in_flight.len() == APPLY_WRITES_IN_FLIGHT {
                if let Err(error) = first_done(&mut in_flight).await {
                    failed = Some(error);
                    break;
                }
            }
            writes += 1;
            bytes += op.len_bytes();
            in_flight.push(Box::pin(self.write_op(volume, op)));
        }
        while !in_flight.is_empty() {
            if let Err(error) = first_done(&mut in_flight).await {
                failed.get_or_insert(error);
            }
        }
        failed.map_or(Ok((writes, bytes)), Err)
    }

    /// One device write (or zeroing) of an apply, its data read from the file first.
    async fn write_op(&self, volume: &Volume, op: Op) -> Result<(), String> {
        match op {
            Op::Zero { offset, len } => volume
                .zero_device(offset, len)
                .await
                .map_err(|e| format!("zeroing {len} bytes at {offset} of the device: {e}")),
            Op::Data {
                offset,
                len,
                pieces,
            } => {
                let mut buf = AlignedBuf::zeroed(crate::usize_from(len));
                self.gather(&pieces, &mut buf)
                    .await
                    .map_err(|e| format!("reading the catch-up file: {e}"))?;
                volume
                    .write_device_buf(offset, buf.freeze())
                    .await
                    .map_err(|e| format!("writing {len} bytes at {offset} to the device: {e}"))
            }
        }
    }

    /// Checks every record of the committed catch-up, in order, calling `f` on each with its
    /// index, its range, the logical offset of its payload in the file and the payload
    /// (empty for zeros).
    async fn for_each<F>(&self, header: &CatchUpHeader, mut f: F) -> Result<(), String>
    where
        F: FnMut(u64, RecordRange, u64, &[u8]) -> Result<(), String>,
    {
        let end = HEADER_BYTES as u64 + header.body_bytes;
        let mut at = HEADER_BYTES as u64;
        // `buf[used..]` holds the file from logical offset `buf_at + used`.
        let mut buf: Vec<u8> = Vec::new();
        let mut buf_at = at;
        let mut used = 0usize;
        let mut index = 0u64;
        while index < header.count {
            match catchup::check_record(&buf[used..], index).map_err(|e| e.to_string())? {
                Some((range, len)) => {
                    let payload = &buf[used + RECORD_HEADER_BYTES..used + len];
                    let payload_at = buf_at + (used + RECORD_HEADER_BYTES) as u64;
                    f(index, range, payload_at, payload)?;
                    used += len;
                    index += 1;
                }
                None => {
                    if at >= end {
                        return Err(format!("the catch-up file ends inside record {index}"));
                    }
                    buf.drain(..used);
                    buf_at += used as u64;
                    used = 0;
                    let len = CHUNK_BYTES.min(end - at).next_multiple_of(PAD_BYTES as u64);
                    let len = len.min(SEGMENT_BYTES - at % SEGMENT_BYTES);
                    let chunk = self
                        .read_logical(at, crate::usize_from(len))
                        .await
                        .map_err(|e| format!("reading the catch-up file: {e}"))?;
                    let keep = crate::usize_from(len.min(end - at));
                    buf.extend_from_slice(&chunk[..keep]);
                    at += len;
                }
            }
        }
        if used != buf.len() || at < end {
            return Err("bytes after the catch-up's last record".into());
        }
        Ok(())
    }

    fn start(&mut self, id: u64) {
        if self.current == Some(id) {
            return;
        }
        self.remove();
        self.current = Some(id);
        self.written = HEADER_BYTES as u64;
        self.writeback_from = self.written;
        self.count = 0;
        self.error = None;
    }

    fn keep_error(&mut self, result: io::Result<()>) -> Result<(), String> {
        result.map_err(|error| {
            let error = error.to_string();
            self.error = Some(error.clone());
            error
        })
    }

    /// Writes the appended bytes that fill whole chunks.
    async fn write_full_chunks(&mut self) -> io::Result<()> {
        loop {
            let boundary = (self.written / CHUNK_BYTES + 1) * CHUNK_BYTES;
            let need = crate::usize_from(boundary - self.written);
            if self.pending.len() < need {
                return Ok(());
            }
            let rest = self.pending.split_off(need);
            let chunk = std::mem::replace(&mut self.pending, rest);
            self.write_logical(self.written, &chunk).await?;
            self.written = boundary;
            self.start_writeback().await?;
        }
    }

    /// Starts an fdatasync of the segment being written in the background once
    /// [`WRITEBACK_BYTES`] were written since the last one started, unless that one still
    /// runs; returns the error of one that failed. Durability still comes only from the
    /// commit, which syncs every segment.
    async fn start_writeback(&mut self) -> io::Result<()> {
        if self.written - self.writeback_from < WRITEBACK_BYTES {
            return Ok(());
        }
        if let Some(running) = &self.writeback {
            if !running.is_finished() {
                return Ok(());
            }
            let finished = self.writeback.take().expect("checked above");
            // It has finished: this does not wait.
            joined(finished.await)?;
        }
        let n = crate::usize_from((self.written - 1) / SEGMENT_BYTES);
        let segment = self.segments[n].clone();
        self.writeback_from = self.written;
        self.writeback = Some(tokio::spawn(async move { segment.sync().await }));
        Ok(())
    }

    /// Writes `data` (within one segment) at logical offset `at`.
    async fn write_logical(&mut self, at: u64, data: &[u8]) -> io::Result<()> {
        let n = crate::usize_from(at / SEGMENT_BYTES);
        let segment = self.segment(n).await?;
        segment
            .write_at(
                at % SEGMENT_BYTES,
                vec![AlignedBuf::copy_from(data).freeze()],
                false,
            )
            .await
    }

    /// Reads `len` bytes (within one segment) at logical offset `at`.
    async fn read_logical(&self, at: u64, len: usize) -> io::Result<AlignedBuf> {
        let n = crate::usize_from(at / SEGMENT_BYTES);
        let segment = self.segments.get(n).ok_or_else(|| {
            io::Error::other(format!(
                "{} is missing",
                segment_path(&self.base, n).display()
            ))
        })?;
        let (result, buf) = segment
            .read_at(at % SEGMENT_BYTES, AlignedBuf::zeroed(len))
            .await;
        result?;
        Ok(buf)
    }

    /// Fills `out` with the file's (logical offset, bytes) `pieces` one after the other.
    /// Pieces that follow each other closely in the file (at most [`READ_GAP_BYTES`] apart,
    /// within one segment, spanning at most [`APPLY_WRITE_BYTES`]) are read at once.
    async fn gather(&self, pieces: &[(u64, u64)], out: &mut [u8]) -> io::Result<()> {
        let mut filled = 0;
        let mut rest = pieces;
        while let Some(&(first, first_len)) = rest.first() {
            let segment_end = (first / SEGMENT_BYTES + 1) * SEGMENT_BYTES;
            let mut end = first + first_len;
            let mut n = 1;
            for &(at, len) in &rest[1..] {
                if at < end
                    || at - end > READ_GAP_BYTES
                    || at + len > segment_end
                    || at + len - first > APPLY_WRITE_BYTES
                {
                    break;
                }
                end = at + len;
                n += 1;
            }
            if n == 1 {
                // Alone (maybe across segments): straight into its place.
                let len = crate::usize_from(first_len);
                self.read_into(first, &mut out[filled..filled + len])
                    .await?;
                filled += len;
            } else {
                let span = self
                    .read_logical(first, crate::usize_from(end - first))
                    .await?;
                for &(at, len) in &rest[..n] {
                    let (from, len) = (crate::usize_from(at - first), crate::usize_from(len));
                    out[filled..filled + len].copy_from_slice(&span[from..from + len]);
                    filled += len;
                }
            }
            rest = &rest[n..];
        }
        debug_assert_eq!(filled, out.len());
        Ok(())
    }

    /// Fills `out` from logical offset `at`, across segments.
    async fn read_into(&self, mut at: u64, out: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < out.len() {
            let len = (out.len() - done).min(crate::usize_from(SEGMENT_BYTES - at % SEGMENT_BYTES));
            let chunk = self.read_logical(at, len).await?;
            out[done..done + len].copy_from_slice(&chunk);
            done += len;
            at += len as u64;
        }
        Ok(())
    }

    /// Segment `n`, created (space reserved, directory synced) with those before it if
    /// missing.
    async fn segment(&mut self, n: usize) -> io::Result<Arc<dyn Storage>> {
        while self.segments.len() <= n {
            let path = segment_path(&self.base, self.segments.len());
            let _ = std::fs::remove_file(&path);
            let opts = OpenOptions {
                direct: false,
                create_len_bytes: Some(SEGMENT_BYTES),
            };
            let segment = storage::open(&path, &opts)?;
            datadir::sync_dir(&path)?;
            self.segments.push(segment);
        }
        Ok(self.segments[n].clone())
    }
}

/// What an apply did, for its log line.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ApplyReport {
    /// Records in the file.
    pub records: u64,
    /// Bytes of the file's body (descriptors and payloads).
    pub file_bytes: u64,
    /// Bytes of the device written or zeroed: each block once, however often the file
    /// holds it.
    pub device_bytes: u64,
    /// Device writes and zeroings.
    pub writes: u64,
    /// The check pass.
    pub check_seconds: f64,
    /// The write pass, with reads held: the device's writes, its fdatasync and the
    /// journal's restart.
    pub write_seconds: f64,
}

/// Where the newest content of a device range is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// In the file, from this logical offset.
    Data { at: u64 },
    /// Zeros.
    Zero,
}

impl Source {
    /// The source of the range that starts `bytes` further on the device.
    fn advanced(self, bytes: u64) -> Source {
        match self {
            Source::Data { at } => Source::Data { at: at + bytes },
            Source::Zero => Source::Zero,
        }
    }
}

/// Which part of a catch-up holds the newest content of each device range: non-overlapping
/// ranges, start → (end, source). A record inserted in file order replaces what it covers
/// of the ranges before it (cutting those it covers in part), so at the end every block
/// maps to the last record covering it. Each insert adds at most two ranges (its own, and
/// the tail of one it cuts in two), so the map holds at most twice as many ranges as the
/// file has records, about 50 bytes of memory each: at most about 100 bytes per record
/// (measured: 50 for records that do not overlap, 8 for records that mostly rewrite the
/// same blocks). The apply's other memory is bounded by its writes in flight.
#[derive(Debug, Default)]
struct Newest {
    ranges: BTreeMap<u64, (u64, Source)>,
}

impl Newest {
    /// `[start, end)` now reads from `source`.
    fn insert(&mut self, start: u64, end: u64, source: Source) {
        // A range that starts before `start` and reaches into it keeps its head, and its
        // tail when it passes `end`.
        if let Some((&before, &(before_end, before_source))) =
            self.ranges.range(..start).next_back()
        {
            if before_end > start {
                self.ranges.insert(before, (start, before_source));
                if before_end > end {
                    self.ranges
                        .insert(end, (before_end, before_source.advanced(end - before)));
                }
            }
        }
        // Ranges that start inside go, but for a tail past `end`.
        while let Some((&inside, &(inside_end, inside_source))) =
            self.ranges.range(start..end).next()
        {
            self.ranges.remove(&inside);
            if inside_end > end {
                self.ranges
                    .insert(end, (inside_end, inside_source.advanced(end - inside)));
            }
        }
        self.ranges.insert(start, (end, source));
    }
}

/// One device operation of an apply.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    /// `len` bytes at `offset`, gathered from the file's (logical offset, bytes) pieces in
    /// order.
    Data {
        offset: u64,
        len: u64,
        pieces: Vec<(u64, u64)>,
    },
    /// `len` bytes at `offset` that read as zeros.
    Zero { offset: u64, len: u64 },
}

impl Op {
    fn len_bytes(&self) -> u64 {
        match self {
            Op::Data { len, .. } | Op::Zero { len, .. } => *len,
        }
    }
}

/// The device operations that write a [`Newest`], in device order: adjacent data ranges
/// gathered into writes of up to [`APPLY_WRITE_BYTES`], adjacent zero ranges into one
/// zeroing. Made one at a time as the writes go, so that only the index is held whole.
struct Plan<'a> {
    ranges: Peekable<btree_map::Iter<'a, u64, (u64, Source)>>,
    /// The rest of a data range the last write ended inside: start, end, source.
    rest: Option<(u64, u64, Source)>,
}

impl<'a> Plan<'a> {
    fn new(newest: &'a Newest) -> Plan<'a> {
        Plan {
            ranges: newest.ranges.iter().peekable(),
            rest: None,
        }
    }

    /// The next range (start, end, source); with `follows` = (offset, zeros), only one that
    /// starts at that offset and is of that kind.
    fn next_range(&mut self, follows: Option<(u64, bool)>) -> Option<(u64, u64, Source)> {
        let range = self.rest.or_else(|| {
            self.ranges
                .peek()
                .map(|(&start, &(end, source))| (start, end, source))
        })?;
        if let Some((offset, zeros)) = follows {
            if range.0 != offset || (range.2 == Source::Zero) != zeros {
                return None;
            }
        }
        if self.rest.take().is_none() {
            self.ranges.next();
        }
        Some(range)
    }
}

impl Iterator for Plan<'_> {
    type Item = Op;

    fn next(&mut self) -> Option<Op> {
        let (offset, mut end, source) = self.next_range(None)?;
        let Source::Data { at } = source else {
            while let Some((_, next_end, _)) = self.next_range(Some((end, true))) {
                end = next_end;
            }
            return Some(Op::Zero {
                offset,
                len: end - offset,
            });
        };
        let (mut start, mut at) = (offset, at);
        let mut pieces = Vec::new();
        let done = loop {
            let take = (end - start).min(APPLY_WRITE_BYTES - (start - offset));
            pieces.push((at, take));
            let done = start + take;
            if done < end {
                self.rest = Some((done, end, Source::Data { at: at + take }));
                break done;
            }
            if done - offset == APPLY_WRITE_BYTES {
                break done;
            }
            match self.next_range(Some((end, false))) {
                Some((next, next_end, Source::Data { at: next_at })) => {
                    (start, end, at) = (next, next_end, next_at);
                }
                _ => break done,
            }
        };
        Some(Op::Data {
            offset,
            len: done - offset,
            pieces,
        })
    }
}

/// Before which of its device operations (`writes` counts them) a run-time apply kills the
/// process (see [`CatchUpFile::apply`]), if it does.
#[cfg(feature = "fault-injection")]
fn kill_point(at_run_time: bool, writes: impl FnOnce() -> usize) -> Option<usize> {
    let wanted = std::env::var("FERRY_FAULT_KILL_MID_CATCHUP_APPLY").is_ok_and(|v| v == "1");
    (at_run_time && wanted).then(|| writes() / 2)
}

#[cfg(not(feature = "fault-injection"))]
fn kill_point(_at_run_time: bool, _writes: impl FnOnce() -> usize) -> Option<usize> {
    None
}

/// kill -9 of this process (fault injection only).
fn kill_self() {
    tracing::warn!("FERRY_FAULT_KILL_MID_CATCHUP_APPLY: killing this process halfway through the catch-up's apply");
    // SAFETY: kill(2) on this process's own pid.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
}

/// The result of a background fdatasync's task (a panic in it is an I/O error here).
fn joined(result: Result<io::Result<()>, tokio::task::JoinError>) -> io::Result<()> {
    result.map_err(|e| io::Error::other(format!("background fdatasync: {e}")))?
}

fn segment_path(base: &Path, n: usize) -> PathBuf {
    let mut name = base.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Role;
    use crate::journal::{Journal, MIN_JOURNAL_BYTES};
    use crate::metrics::Metrics;
    use crate::storage::{FaultDisk, MemStorage};
    use bytes::Bytes;
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    const LSN: u64 = 40;
    const SECTOR: u64 = 512;

    /// A volume on `device` with a fresh in-memory journal, as a secondary holds it.
    async fn volume_on(device: Arc<dyn Storage>) -> Volume {
        let journal = MemStorage::new(MIN_JOURNAL_BYTES);
        Journal::format(&*journal, device.len_bytes())
            .await
            .expect("format");
        open_volume(device, journal).await
    }

    async fn open_volume(device: Arc<dyn Storage>, journal: Arc<dyn Storage>) -> Volume {
        Volume::open_on(
            "v",
            device,
            journal,
            Role::Secondary,
            Metrics::new().volume("v"),
            "test".into(),
        )
        .await
        .expect("open the volume")
    }

    /// What the device holds before a catch-up: no byte is zero, so zero ranges show.
    fn before(len: u64) -> Vec<u8> {
        (0..len).map(|i| 1 + (i / SECTOR % 251) as u8).collect()
    }

    /// `image` with `records` written one after the other, in order.
    fn applied_in_order(mut image: Vec<u8>, records: &[CatchUpRecord]) -> Vec<u8> {
        for r in records {
            let range = r.offset_bytes as usize..(r.offset_bytes + r.len_bytes) as usize;
            match &r.data {
                Some(data) => image[range].copy_from_slice(data),
                None => image[range].fill(0),
            }
        }
        image
    }

    fn zeros(offset: u64, len: u64) -> CatchUpRecord {
        CatchUpRecord {
            offset_bytes: offset,
            len_bytes: len,
            data: None,
        }
    }

    /// Random bytes, so that a piece read from the wrong place shows.
    fn random_record(rng: &mut StdRng, offset: u64, len: u64) -> CatchUpRecord {
        let mut data = vec![0u8; len as usize];
        rng.fill(&mut data[..]);
        CatchUpRecord {
            offset_bytes: offset,
            len_bytes: len,
            data: Some(Bytes::from(data)),
        }
    }

    /// A committed catch-up (to [`LSN`]) of `records` in `dir`.
    async fn committed(dir: &Path, records: &[CatchUpRecord]) -> CatchUpFile {
        let mut file = CatchUpFile::open(&dir.join("v.catchup")).expect("open");
        for r in records {
            file.append(1, r).await.expect("append");
        }
        file.commit(1, LSN).await.expect("commit");
        file
    }

    /// Applies `records` as a catch-up to a device holding [`before`], checks the device
    /// against applying them in order, and returns the report.
    async fn apply_and_check(records: &[CatchUpRecord], len: u64) -> ApplyReport {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = committed(dir.path(), records).await;
        let device = MemStorage::new(len);
        device
            .write_at(0, vec![AlignedBuf::copy_from(&before(len)).freeze()], false)
            .await
            .expect("fill");
        let volume = volume_on(device.clone()).await;
        let report = file.apply(&volume, LSN, false).await.expect("apply");
        let expected = applied_in_order(before(len), records);
        let held = device.snapshot();
        if let Some(at) = (0..held.len()).find(|&i| held[i] != expected[i]) {
            panic!("byte {at} differs from the records applied in order: {records:?}");
        }
        assert_eq!(volume.journal_stats().head_lsn, LSN, "journal restarted");
        report
    }

    #[tokio::test]
    async fn later_records_win_whatever_they_overlap() {
        let mut rng = StdRng::seed_from_u64(1);
        let k = 4096;
        let records = vec![
            random_record(&mut rng, 0, 4 * k),
            // Inside the first one.
            random_record(&mut rng, k, k),
            // Zeros over the first one's tail and past it.
            zeros(3 * k, 2 * k),
            // Data over the zeros' tail and past them.
            random_record(&mut rng, 4 * k + 512, 2 * k),
            // The first block again.
            random_record(&mut rng, 0, k),
            // Zeros, then data inside them, then the same range as the second record.
            zeros(10 * k, 4 * k),
            random_record(&mut rng, 11 * k, 1024),
            random_record(&mut rng, k, k),
            // Two records, then one over both and past either end.
            random_record(&mut rng, 16 * k, k),
            random_record(&mut rng, 17 * k, k),
            random_record(&mut rng, 15 * k + 512, 4 * k),
            // Data, then zeros over all of it.
            random_record(&mut rng, 24 * k, 2 * k),
            zeros(23 * k, 4 * k),
        ];
        let report = apply_and_check(&records, 32 * k).await;
        assert_eq!(report.records, records.len() as u64);
        // Each block once: [0, 6k + 512), [10k, 14k), [15k + 512, 19k + 512), [23k, 27k).
        assert_eq!(report.device_bytes, 6 * k + 512 + 4 * k + 4 * k + 4 * k);
    }

    #[tokio::test]
    async fn random_overlapping_catch_ups_end_as_applied_in_order() {
        let seed = ferry_testkit::seed::test_seed("random_overlapping_catch_ups");
        let mut rng = StdRng::seed_from_u64(seed);
        let len = 256 << 10;
        for round in 0..40 {
            let count = rng.random_range(1..80);
            let records: Vec<_> = (0..count)
                .map(|_| {
                    let sectors = rng.random_range(1..=64u64);
                    let offset = rng.random_range(0..=len / SECTOR - sectors) * SECTOR;
                    if rng.random_ratio(1, 4) {
                        zeros(offset, sectors * SECTOR)
                    } else {
                        random_record(&mut rng, offset, sectors * SECTOR)
                    }
                })
                .collect();
            eprintln!("round {round}: {count} records");
            apply_and_check(&records, len).await;
        }
    }

    #[tokio::test]
    async fn adjacent_small_records_are_gathered_into_large_writes() {
        let mut rng = StdRng::seed_from_u64(2);
        let k = 4096;
        // 4 MiB of adjacent 4 KiB records, in a shuffled order; then 64 adjacent zero
        // ranges after them.
        let mut blocks: Vec<u64> = (0..1024).collect();
        for i in (1..blocks.len()).rev() {
            blocks.swap(i, rng.random_range(0..=i));
        }
        let mut records: Vec<_> = blocks
            .iter()
            .map(|&b| random_record(&mut rng, b * k, k))
            .collect();
        records.extend((0..64).map(|i| zeros((1024 + i) * k, k)));
        let report = apply_and_check(&records, 8 << 20).await;
        assert_eq!(
            report.writes,
            4 + 1,
            "four writes of {APPLY_WRITE_BYTES} bytes and one zeroing"
        );
        assert_eq!(report.device_bytes, (1024 + 64) * k);
    }

    #[test]
    fn the_index_maps_each_sector_to_its_last_record() {
        let seed = ferry_testkit::seed::test_seed("the_index_maps_each_sector");
        let mut rng = StdRng::seed_from_u64(seed);
        for _ in 0..200 {
            let sectors = 64u64;
            let mut newest = Newest::default();
            // Per sector: the source of the last record covering it, as it should read.
            let mut model: Vec<Option<Source>> = vec![None; sectors as usize];
            for n in 0..rng.random_range(1..40u64) {
                let start = rng.random_range(0..sectors);
                let end = rng.random_range(start + 1..=sectors);
                let source = if rng.random_ratio(1, 3) {
                    Source::Zero
                } else {
                    Source::Data { at: n << 32 }
                };
                newest.insert(start * SECTOR, end * SECTOR, source);
                for s in start..end {
                    model[s as usize] = Some(source.advanced((s - start) * SECTOR));
                }
            }
            let mut mapped: Vec<Option<Source>> = vec![None; sectors as usize];
            let mut last_end = 0;
            for (&start, &(end, source)) in &newest.ranges {
                assert!(start >= last_end && end > start, "{:?}", newest.ranges);
                last_end = end;
                for s in start / SECTOR..end / SECTOR {
                    mapped[s as usize] = Some(source.advanced(s * SECTOR - start));
                }
            }
            assert_eq!(mapped, model);
            // The plan writes exactly the mapped sectors, each from its source.
            let mut planned: Vec<Option<Source>> = vec![None; sectors as usize];
            for op in Plan::new(&newest) {
                match op {
                    Op::Zero { offset, len } => {
                        for s in offset / SECTOR..(offset + len) / SECTOR {
                            planned[s as usize] = Some(Source::Zero);
                        }
                    }
                    Op::Data {
                        offset,
                        len,
                        pieces,
                    } => {
                        assert!(len <= APPLY_WRITE_BYTES);
                        assert_eq!(pieces.iter().map(|p| p.1).sum::<u64>(), len);
                        let mut s = offset / SECTOR;
                        for (at, piece_len) in pieces {
                            for i in 0..piece_len / SECTOR {
                                planned[s as usize] = Some(Source::Data {
                                    at: at + i * SECTOR,
                                });
                                s += 1;
                            }
                        }
                    }
                }
            }
            assert_eq!(planned, model);
        }
    }

    #[tokio::test]
    async fn a_damaged_record_anywhere_changes_nothing() {
        let mut rng = StdRng::seed_from_u64(3);
        let len = 1 << 20;
        let records: Vec<_> = (0..20u64)
            .map(|i| {
                if i % 5 == 4 {
                    zeros(i * 8192, 4096)
                } else {
                    random_record(&mut rng, i * 8192, 8192)
                }
            })
            .collect();
        // Where each record starts in the file (one segment: the logical offset).
        let mut starts = Vec::new();
        let mut at = HEADER_BYTES as u64;
        for r in &records {
            starts.push(at);
            at += catchup::record_bytes(r);
        }
        // The first, some in the middle, the last; in a descriptor or a payload (record 19,
        // like 14, is zeros: a descriptor alone).
        for (index, within) in [(0, 40), (9, 3), (10, 100), (18, 8000), (19, 20), (14, 9)] {
            let dir = tempfile::tempdir().expect("tempdir");
            let file = committed(dir.path(), &records).await;
            let segment = segment_path(&dir.path().join("v.catchup"), 0);
            let mut bytes = std::fs::read(&segment).expect("read the segment");
            bytes[(starts[index] + within) as usize] ^= 0x10;
            std::fs::write(&segment, &bytes).expect("damage the segment");
            let device = FaultDisk::new(len);
            let volume = volume_on(device.storage()).await;
            let error = file
                .apply(&volume, LSN, false)
                .await
                .expect_err(&format!("record {index} damaged: the file is refused"));
            assert!(error.contains(&format!("record {index}")), "{error}");
            assert_eq!(
                device.write_count(),
                0,
                "record {index}: the device changed"
            );
            assert_eq!(volume.journal_stats().head_lsn, 0, "the journal moved");
        }
        // A record past the end of the volume is refused the same way.
        let dir = tempfile::tempdir().expect("tempdir");
        let mut past = records.clone();
        past.insert(7, zeros(len - 4096, 8192));
        let file = committed(dir.path(), &past).await;
        let device = FaultDisk::new(len);
        let volume = volume_on(device.storage()).await;
        let error = file.apply(&volume, LSN, false).await.expect_err("refused");
        assert!(error.contains("record 7"), "{error}");
        assert_eq!(device.write_count(), 0);
    }

    #[tokio::test]
    async fn a_crash_during_the_writes_then_the_apply_again_gives_the_whole_catch_up() {
        let seed = ferry_testkit::seed::test_seed("a_crash_during_the_catch_up_writes");
        let mut rng = StdRng::seed_from_u64(seed);
        let len: u64 = 8 << 20;
        // Large, small, rewritten and zero ranges: a plan of many writes.
        let records: Vec<_> = (0..200)
            .map(|_| {
                let sectors = rng.random_range(1..=256u64);
                let offset = rng.random_range(0..=len / SECTOR - sectors) * SECTOR;
                if rng.random_ratio(1, 8) {
                    zeros(offset, sectors * SECTOR)
                } else {
                    random_record(&mut rng, offset, sectors * SECTOR)
                }
            })
            .collect();
        let expected = applied_in_order(before(len), &records);
        let dir = tempfile::tempdir().expect("tempdir");
        let file = committed(dir.path(), &records).await;
        let writes = apply_and_check(&records, len).await.writes;
        assert!(writes >= 8, "{writes} writes");
        for (tear_at, power_loss) in [
            (1, false),
            (writes / 2, true),
            (writes, true),
            (writes / 3, false),
        ] {
            let device = FaultDisk::new(len);
            let journal = FaultDisk::new(MIN_JOURNAL_BYTES);
            device
                .storage()
                .write_at(0, vec![AlignedBuf::copy_from(&before(len)).freeze()], false)
                .await
                .expect("fill");
            device.storage().sync().await.expect("sync");
            Journal::format(&*journal.storage(), len)
                .await
                .expect("format");
            journal.storage().sync().await.expect("sync");
            let volume = open_volume(device.storage(), journal.storage()).await;
            let keep = rng.random_range(0..8) * SECTOR;
            device.set_tear_write(tear_at, keep);
            let error = file
                .apply(&volume, LSN, true)
                .await
                .expect_err("the device died");
            eprintln!("write {tear_at} of {writes} torn: {error}");
            drop(volume);
            if power_loss {
                device.power_loss(rng.random());
                journal.power_loss(rng.random());
            } else {
                device.crash_process();
                journal.crash_process();
            }
            // The next start applies it again, whole.
            let volume = open_volume(device.storage(), journal.storage()).await;
            file.apply(&volume, LSN, false).await.expect("apply again");
            drop(volume);
            assert!(
                device.durable_image() == expected,
                "seed {seed}: write {tear_at} of {writes} torn, then applied again"
            );
        }
    }

    fn record(offset: u64, fill: u8, len: usize) -> CatchUpRecord {
        CatchUpRecord {
            offset_bytes: offset,
            len_bytes: len as u64,
            data: Some(Bytes::from(vec![fill; len])),
        }
    }

    async fn read_all(file: &CatchUpFile, header: &CatchUpHeader) -> Vec<CatchUpRecord> {
        let mut out = Vec::new();
        file.for_each(header, |_, range, _, payload| {
            out.push(CatchUpRecord {
                offset_bytes: range.offset_bytes,
                len_bytes: range.len_bytes,
                data: range.data.then(|| Bytes::copy_from_slice(payload)),
            });
            Ok(())
        })
        .await
        .expect("read back");
        out
    }

    #[tokio::test]
    async fn a_committed_catch_up_across_segments_reads_back_and_a_new_one_replaces_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("v.catchup");
        let mut file = CatchUpFile::open(&base).expect("open");
        assert_eq!(file.header().await.expect("header"), None);
        // 70 MiB of records of 3 MiB + 5 bytes: chunk and segment boundaries inside records.
        let mut records = Vec::new();
        for i in 0..23u64 {
            records.push(record(i << 22, i as u8, (3 << 20) + 5));
            records.push(CatchUpRecord {
                offset_bytes: (i << 22) + (3 << 20) + 512,
                len_bytes: 4096,
                data: None,
            });
        }
        for r in &records {
            file.append(1, r).await.expect("append");
        }
        assert!(
            file.writeback_from > 3 * WRITEBACK_BYTES,
            "fdatasyncs start in the background while the catch-up grows"
        );
        assert_eq!(file.header().await.expect("header"), None, "not committed");
        file.commit(1, 77).await.expect("commit");
        assert!(
            file.writeback.is_none(),
            "the commit waited for the last one"
        );
        assert!(segment_path(&base, 1).exists());
        drop(file);
        let file = CatchUpFile::open(&base).expect("reopen");
        let header = file.header().await.expect("header").expect("committed");
        assert_eq!(header.lsn, 77);
        assert_eq!(header.count, records.len() as u64);
        assert_eq!(read_all(&file, &header).await, records);
        // Applied, pieces cut by segment and read boundaries reach the device whole.
        let device = MemStorage::new(96 << 20);
        let volume = volume_on(device.clone()).await;
        file.apply(&volume, 77, false).await.expect("apply");
        for r in &records {
            let (result, back) = device
                .read_at(r.offset_bytes, AlignedBuf::zeroed(r.len_bytes as usize))
                .await;
            result.expect("read");
            match &r.data {
                Some(data) => assert!(back[..] == data[..], "record at {}", r.offset_bytes),
                None => assert!(back.iter().all(|&b| b == 0)),
            }
        }
        // A new catch-up starts a fresh file: the old segments go.
        let mut file = file;
        file.append(2, &record(0, 9, 4096)).await.expect("append");
        assert!(!segment_path(&base, 1).exists());
        assert_eq!(file.header().await.expect("header"), None);
        file.commit(2, 80).await.expect("commit");
        let header = file.header().await.expect("header").expect("committed");
        assert_eq!(read_all(&file, &header).await, vec![record(0, 9, 4096)]);
        file.remove();
        assert!(!segment_path(&base, 0).exists());
    }

    #[tokio::test]
    async fn an_empty_catch_up_commits() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut file = CatchUpFile::open(&dir.path().join("v.catchup")).expect("open");
        file.commit(4, 12).await.expect("commit");
        let header = file.header().await.expect("header").expect("committed");
        assert_eq!((header.lsn, header.count), (12, 0));
        assert!(read_all(&file, &header).await.is_empty());
    }
}
