//! `VOLUME.catchup.N`: where a regional secondary stores a catch-up whole before any of it
//! reaches the device (the format is `ferry_protocol::catchup`). Written through [`Storage`],
//! so the power-loss tests cover it.
//!
//! The file grows by segments of [`SEGMENT_BYTES`], each created (and its space reserved)
//! when the catch-up reaches it, so a filesystem without room for the catch-up shows as an
//! error of [`CatchUpFile::append`] while nothing depends on the file yet; the replicator
//! then abandons the staged catch-up and the next one writes the device in place. Appends
//! are gathered in memory into writes of [`CHUNK_BYTES`]; nothing is durable before
//! [`CatchUpFile::commit`].

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use ferry_protocol::catchup::{
    self, CatchUpHeader, CatchUpRecord, HEADER_BYTES, PAD_BYTES, SEGMENT_BYTES,
};

use crate::datadir;
use crate::storage::{self, AlignedBuf, OpenOptions, Storage};
use crate::volume::Volume;

/// Bytes of one write to the file (a segment holds a whole number of them).
pub const CHUNK_BYTES: u64 = 1 << 20;
const _: () = assert!(SEGMENT_BYTES.is_multiple_of(CHUNK_BYTES));

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
        })
    }

    /// Removes every segment (the catch-up they held is applied and recorded, or abandoned).
    pub fn remove(&mut self) {
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

    /// With reads of `volume` held: checks every record of the committed catch-up to `lsn`,
    /// then writes them to the device, fdatasyncs it and restarts the (empty) journal at
    /// `lsn + 1`. Applying again after a crash gives the same device. `at_run_time`: not the
    /// start's apply (with the `fault-injection` feature and
    /// `FERRY_FAULT_KILL_MID_CATCHUP_APPLY=1`, the process kills itself halfway through).
    pub async fn apply(&self, volume: &Volume, lsn: u64, at_run_time: bool) -> Result<(), String> {
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
        let _reads_held = volume.hold_reads().await;
        // Every record is checked before the device changes: a damaged file changes nothing.
        self.for_each(&header, |_| async { Ok(()) }).await?;
        let kill_at = kill_point(at_run_time, header.count);
        let applied = std::sync::atomic::AtomicU64::new(0);
        let applied = &applied;
        self.for_each(&header, |record| async move {
            let n = applied.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if Some(n) == kill_at {
                kill_self();
            }
            let result = match &record.data {
                Some(data) => volume.write_device(record.offset_bytes, data).await,
                None => {
                    volume
                        .zero_device(record.offset_bytes, record.len_bytes)
                        .await
                }
            };
            result.map_err(|e| {
                format!(
                    "writing {} bytes at {} to the device: {e}",
                    record.len_bytes, record.offset_bytes
                )
            })
        })
        .await?;
        volume
            .sync_device()
            .await
            .map_err(|e| format!("fdatasync of the device: {e}"))?;
        volume
            .journal_reset(Some(lsn + 1))
            .await
            .map_err(|e| format!("restarting the journal at {}: {e}", lsn + 1))?;
        Ok(())
    }

    /// Calls `f` on every record of the committed catch-up, in order.
    async fn for_each<F, Fut>(&self, header: &CatchUpHeader, mut f: F) -> Result<(), String>
    where
        F: FnMut(CatchUpRecord) -> Fut,
        Fut: std::future::Future<Output = Result<(), String>>,
    {
        let end = HEADER_BYTES as u64 + header.body_bytes;
        let mut at = HEADER_BYTES as u64;
        let mut buf: Vec<u8> = Vec::new();
        let mut used = 0usize;
        let mut index = 0u64;
        while index < header.count {
            match catchup::decode_record(&buf[used..], index).map_err(|e| e.to_string())? {
                Some((record, len)) => {
                    used += len;
                    index += 1;
                    f(record).await?;
                }
                None => {
                    if at >= end {
                        return Err(format!("the catch-up file ends inside record {index}"));
                    }
                    buf.drain(..used);
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
        }
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

    async fn read_logical(&self, at: u64, len: usize) -> io::Result<Bytes> {
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
        Ok(Bytes::copy_from_slice(&buf))
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

/// Where a run-time apply kills the process (see [`CatchUpFile::apply`]), if it does.
#[cfg(feature = "fault-injection")]
fn kill_point(at_run_time: bool, count: u64) -> Option<u64> {
    let wanted = std::env::var("FERRY_FAULT_KILL_MID_CATCHUP_APPLY").is_ok_and(|v| v == "1");
    (at_run_time && wanted).then_some(count / 2)
}

#[cfg(not(feature = "fault-injection"))]
fn kill_point(_at_run_time: bool, _count: u64) -> Option<u64> {
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

fn segment_path(base: &Path, n: usize) -> PathBuf {
    let mut name = base.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(offset: u64, fill: u8, len: usize) -> CatchUpRecord {
        CatchUpRecord {
            offset_bytes: offset,
            len_bytes: len as u64,
            data: Some(Bytes::from(vec![fill; len])),
        }
    }

    async fn read_all(file: &CatchUpFile, header: &CatchUpHeader) -> Vec<CatchUpRecord> {
        let out = std::sync::Mutex::new(Vec::new());
        file.for_each(header, |r| {
            out.lock().unwrap().push(r);
            async { Ok(()) }
        })
        .await
        .expect("read back");
        out.into_inner().unwrap()
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
        assert_eq!(file.header().await.expect("header"), None, "not committed");
        file.commit(1, 77).await.expect("commit");
        assert!(segment_path(&base, 1).exists());
        drop(file);
        let file = CatchUpFile::open(&base).expect("reopen");
        let header = file.header().await.expect("header").expect("committed");
        assert_eq!(header.lsn, 77);
        assert_eq!(header.count, records.len() as u64);
        assert_eq!(read_all(&file, &header).await, records);
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
