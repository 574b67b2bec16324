//! The persistent dirty map: which 4 KiB blocks of a volume the metro peer may be missing.
//!
//! Like DRBD's on-disk bitmap, one bit stands for one [`DIRTY_CHUNK_BYTES`] chunk of the volume.
//! A set bit means "the peer may not have this chunk"; after an outage the primary resyncs only
//! set chunks, and clears them as the peer acknowledges them. The map lives in memory (32 MiB
//! per TiB of volume) and is written back page by page to a file that survives `kill -9` and
//! power loss.
//!
//! # File format
//!
//! ```text
//! offset 0     header, 4096 bytes:
//!                0  magic        b"FERRYDM1"
//!                8  version      u32 LE = 1
//!               12  size_bytes   u64 LE (volume size)
//!               20  chunk_bytes  u64 LE = 4096
//!               28  bit count    u64 LE = ceil(size_bytes / chunk_bytes)
//!               36  CRC-32       u32 LE (crc32fast) of bytes 0..36
//!               40  zero up to 4096 (reserved: written as zero, ignored on read)
//! offset 4096  bitmap: little-endian u64 words, bit i of word w = chunk 64*w + i,
//!              zero-padded to a multiple of 4096 bytes
//! ```
//!
//! The header is written once, when the file is created (under a temporary name that is
//! fsynced, renamed into place, and whose directory is fsynced), and never again, so a crash can
//! never tear it. An existing file whose header does not match what the caller expects is an
//! error, never silently reset: a reset would forget which chunks the peer is missing.
//!
//! # Invariants
//!
//! - Bits past the bit count (in the last word) and the padding of the last page are always
//!   zero, in memory and on disk; `open` rejects a file where they are not.
//! - `set_bits` is the number of set bits, so [`DirtyMap::is_clean`] is O(1).
//! - Every bitmap page changed in memory since the last [`DirtyMap::prepare_persist`] is marked
//!   in `changed_pages`; a job carries a copy of those pages, so the map can keep changing while
//!   the job writes.
//!
//! # Durability contract
//!
//! [`DirtyMap::mark`] and [`DirtyMap::clear`] change memory only. A bit is durable once a
//! [`PersistJob`] prepared after the change has returned `Ok` from [`PersistJob::run`] (or
//! [`DirtyMap::persist`] has returned `Ok`). That holds even when `mark` returned `false`
//! because the bits were already set by an earlier mark whose job is still in flight: a job
//! only succeeds once every job prepared before it has, so `Ok` means the whole in-memory state
//! at preparation time is on disk. To keep that true:
//!
//! - Jobs run one at a time in the order they were prepared: [`PersistJob::run`] blocks until
//!   every earlier job has run or been dropped. (Do not run a later job on the thread that still
//!   holds an earlier, unrun job: it would wait forever.)
//! - A job that fails, or is dropped without running, leaves the file behind memory in pages the
//!   map no longer tracks. The map then rewrites every page in the next job, and a job prepared
//!   before that recovery (which lacks those pages) fails instead of claiming durability.
//!   Rewriting everything is also the right answer to a failed `fdatasync`, after which the
//!   kernel may have dropped the dirty page-cache pages it could not write.
//!
//! # Why torn writes are safe
//!
//! A job `pwrite`s whole 4 KiB pages and then `fdatasync`s. A crash in between can leave any
//! mix of old and new pages, and within a page any mix of old and new 512-byte sectors (the
//! device guarantees sector atomicity, no more). Every such mix is still a well-formed map
//! because both old and new contents keep the padding and trailing bits zero, and each bit
//! individually holds its old or its new value:
//!
//! - A bit being set (old 0, new 1) that reads back as 0: the crash happened before the job
//!   returned, so no caller relied on that bit yet (a write is not completed, nor the peer
//!   skipped, before the mark is persisted).
//! - A bit being cleared (old 1, new 0) that reads back as 1: the chunk gets resynced once more,
//!   which is harmless.
//!
//! The header is never rewritten, and the file length never changes after creation, so
//! `fdatasync` (no metadata) is enough.

use std::collections::BTreeSet;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Bytes of volume per bit: one bit per 4 KiB block, like DRBD.
pub const DIRTY_CHUNK_BYTES: u64 = 4096;

const MAGIC: [u8; 8] = *b"FERRYDM1";
const VERSION: u32 = 1;
/// Size of the header; the bitmap starts right after it.
const HEADER_BYTES: u64 = 4096;
/// Unit of change tracking and of the bitmap's padding.
const PAGE_BYTES: u64 = 4096;
const WORDS_PER_PAGE: usize = (PAGE_BYTES / 8) as usize;
const CRC_OFFSET: usize = 36;
/// Largest buffer used when creating or reading the whole bitmap, and the most pages one job
/// write call carries.
const IO_BATCH_BYTES: usize = 1 << 20;

/// A persistent bitmap of dirty chunks of one volume. See the module docs for the format, the
/// invariants and the durability contract.
pub struct DirtyMap {
    path: PathBuf,
    shared: Arc<Shared>,
    size_bytes: u64,
    /// Number of chunks = bits: `ceil(size_bytes / DIRTY_CHUNK_BYTES)`.
    chunks: u64,
    /// The bitmap; bits at or past `chunks` are always zero.
    words: Vec<u64>,
    /// Number of set bits in `words`.
    set_bits: u64,
    /// Bitset of bitmap pages changed since the last `prepare_persist`.
    changed_pages: Vec<u64>,
    /// True when any bit of `changed_pages` is set.
    changed_any: bool,
    /// Sequence number the next job gets (jobs are numbered from 1).
    next_seq: u64,
}

/// State shared by a map and its jobs.
struct Shared {
    file: File,
    chain: Mutex<Chain>,
    turn: Condvar,
}

/// The order and outcome of persist jobs.
struct Chain {
    /// Sequence number of the job allowed to run next; earlier jobs have run or been dropped.
    next_to_run: u64,
    /// Jobs dropped unrun whose turn has not come yet; skipped when it does.
    abandoned: BTreeSet<u64>,
    /// The file holds (and has synced) the map as of this job's preparation; 0 = as opened.
    durable: u64,
    /// The file may be behind memory in pages no longer tracked: the next job writes them all.
    rewrite_all: bool,
}

impl Chain {
    /// The job whose turn it was has finished (run or dropped): pass the turn on.
    fn advance(&mut self) {
        self.next_to_run += 1;
        while self.abandoned.remove(&self.next_to_run) {
            self.next_to_run += 1;
        }
    }
}

impl Shared {
    fn chain(&self) -> MutexGuard<'_, Chain> {
        // Nothing panics while holding the lock; if something did, the state is still sound.
        self.chain.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Everything that changed in a [`DirtyMap`] up to one [`DirtyMap::prepare_persist`]: copies of
/// the changed bitmap pages and the file to write them to. `Send + 'static`, so it can run on a
/// blocking thread while the map keeps changing.
pub struct PersistJob {
    shared: Arc<Shared>,
    seq: u64,
    /// Carries every page, so it does not depend on earlier jobs having succeeded.
    full: bool,
    /// (file offset, whole pages) for runs of consecutive changed pages.
    writes: Vec<(u64, Vec<u8>)>,
    /// False once `run` has taken responsibility for finishing the job.
    armed: bool,
}

fn invalid(path: &Path, what: impl fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("dirty map {}: {what}", path.display()),
    )
}

fn with_path(path: &Path, action: &str, e: io::Error) -> io::Error {
    io::Error::new(
        e.kind(),
        format!("dirty map {}: {action}: {e}", path.display()),
    )
}

fn chunk_count(size_bytes: u64) -> u64 {
    size_bytes.div_ceil(DIRTY_CHUNK_BYTES)
}

fn word_count(chunks: u64) -> usize {
    usize::try_from(chunks.div_ceil(64)).expect("dirty map too large for this machine")
}

fn page_count(words: usize) -> usize {
    words.div_ceil(WORDS_PER_PAGE)
}

/// Mask of bits `lo..hi` of a word (`lo < hi <= 64`).
fn bit_mask(lo: u64, hi: u64) -> u64 {
    debug_assert!(lo < hi && hi <= 64);
    let upper = if hi == 64 { !0 } else { (1u64 << hi) - 1 };
    upper & !((1u64 << lo) - 1)
}

fn encode_header(size_bytes: u64) -> Vec<u8> {
    let mut h = vec![0u8; HEADER_BYTES as usize];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..20].copy_from_slice(&size_bytes.to_le_bytes());
    h[20..28].copy_from_slice(&DIRTY_CHUNK_BYTES.to_le_bytes());
    h[28..36].copy_from_slice(&chunk_count(size_bytes).to_le_bytes());
    let crc = crc32fast::hash(&h[..CRC_OFFSET]);
    h[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
    h
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Checks a header read from `path` against what the caller expects.
fn check_header(path: &Path, h: &[u8], size_bytes: u64) -> io::Result<()> {
    if h[0..8] != MAGIC {
        return Err(invalid(
            path,
            format!(
                "bad magic {:02x?} (expected {:?}): not a Ferry dirty map",
                &h[0..8],
                std::str::from_utf8(&MAGIC).unwrap()
            ),
        ));
    }
    let version = le_u32(h, 8);
    if version != VERSION {
        return Err(invalid(
            path,
            format!("version is {version} in the file, this build reads version {VERSION}"),
        ));
    }
    let stored_crc = le_u32(h, CRC_OFFSET);
    let crc = crc32fast::hash(&h[..CRC_OFFSET]);
    if stored_crc != crc {
        return Err(invalid(
            path,
            format!("header CRC is {stored_crc:#010x} in the file but the header hashes to {crc:#010x}: header corrupt"),
        ));
    }
    let chunk = le_u64(h, 20);
    if chunk != DIRTY_CHUNK_BYTES {
        return Err(invalid(
            path,
            format!("chunk size is {chunk} bytes in the file, expected {DIRTY_CHUNK_BYTES}"),
        ));
    }
    let file_size = le_u64(h, 12);
    if file_size != size_bytes {
        return Err(invalid(
            path,
            format!(
                "size_bytes is {file_size} in the file but the volume is {size_bytes} bytes; \
                 not resetting it"
            ),
        ));
    }
    let bits = le_u64(h, 28);
    if bits != chunk_count(size_bytes) {
        return Err(invalid(
            path,
            format!(
                "bit count is {bits} in the file, expected {} for {size_bytes} bytes",
                chunk_count(size_bytes)
            ),
        ));
    }
    Ok(())
}

/// Serializes `words` into zero-padded whole pages.
fn page_bytes(words: &[u64], first_page: usize, pages: usize) -> Vec<u8> {
    let mut buf = vec![0u8; pages * PAGE_BYTES as usize];
    let start = first_page * WORDS_PER_PAGE;
    let end = ((first_page + pages) * WORDS_PER_PAGE).min(words.len());
    if start < end {
        for (dst, w) in buf.chunks_exact_mut(8).zip(&words[start..end]) {
            dst.copy_from_slice(&w.to_le_bytes());
        }
    }
    buf
}

fn page_offset(page: usize) -> u64 {
    HEADER_BYTES + page as u64 * PAGE_BYTES
}

fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

impl DirtyMap {
    /// Opens the map at `path` for a volume of `size_bytes`, or creates it when `path` does not
    /// exist: header and bitmap, every bit set when `create_all_dirty` (the peer has nothing
    /// yet) and clear otherwise. Creation writes a temporary file next to `path`, fsyncs it,
    /// renames it into place and fsyncs the directory, so a crash leaves either no map or a
    /// complete one.
    ///
    /// An existing file is checked, never reset: a wrong magic, version, header CRC, chunk size,
    /// size or length, or nonzero padding, is an `InvalidData` error naming the path and what
    /// differs. The file must have a single owner (one map per file in one process).
    pub fn open(path: &Path, size_bytes: u64, create_all_dirty: bool) -> io::Result<DirtyMap> {
        let chunks = chunk_count(size_bytes);
        let nwords = word_count(chunks);
        let npages = page_count(nwords);
        let expected_len = HEADER_BYTES + npages as u64 * PAGE_BYTES;

        let (file, words) = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(file) => {
                let words = Self::load(path, &file, size_bytes, chunks, nwords, expected_len)?;
                (file, words)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let mut words = vec![0u64; nwords];
                if create_all_dirty {
                    words.fill(!0);
                    let tail = chunks % 64;
                    if tail != 0 {
                        *words.last_mut().unwrap() = bit_mask(0, tail);
                    }
                }
                let file = Self::create(path, size_bytes, &words)?;
                (file, words)
            }
            Err(e) => return Err(with_path(path, "open", e)),
        };
        let set_bits = words.iter().map(|w| u64::from(w.count_ones())).sum();
        Ok(DirtyMap {
            path: path.to_owned(),
            shared: Arc::new(Shared {
                file,
                chain: Mutex::new(Chain {
                    next_to_run: 1,
                    abandoned: BTreeSet::new(),
                    durable: 0,
                    rewrite_all: false,
                }),
                turn: Condvar::new(),
            }),
            size_bytes,
            chunks,
            words,
            set_bits,
            changed_pages: vec![0; npages.div_ceil(64)],
            changed_any: false,
            next_seq: 1,
        })
    }

    /// Reads and checks an existing map file.
    fn load(
        path: &Path,
        file: &File,
        size_bytes: u64,
        chunks: u64,
        nwords: usize,
        expected_len: u64,
    ) -> io::Result<Vec<u64>> {
        let len = file
            .metadata()
            .map_err(|e| with_path(path, "stat", e))?
            .len();
        if len < HEADER_BYTES {
            return Err(invalid(
                path,
                format!("file is {len} bytes, shorter than the {HEADER_BYTES}-byte header"),
            ));
        }
        let mut header = vec![0u8; HEADER_BYTES as usize];
        file.read_exact_at(&mut header, 0)
            .map_err(|e| with_path(path, "read header", e))?;
        check_header(path, &header, size_bytes)?;
        if len != expected_len {
            return Err(invalid(
                path,
                format!("file is {len} bytes, expected {expected_len} for {size_bytes} bytes"),
            ));
        }

        let mut words = Vec::with_capacity(nwords);
        let bitmap_len = (expected_len - HEADER_BYTES) as usize;
        let mut buf = vec![0u8; IO_BATCH_BYTES.min(bitmap_len)];
        let mut done = 0usize;
        while done < bitmap_len {
            let n = buf.len().min(bitmap_len - done);
            file.read_exact_at(&mut buf[..n], HEADER_BYTES + done as u64)
                .map_err(|e| with_path(path, "read bitmap", e))?;
            for bytes in buf[..n].chunks_exact(8) {
                let w = u64::from_le_bytes(bytes.try_into().unwrap());
                if words.len() < nwords {
                    words.push(w);
                } else if w != 0 {
                    return Err(invalid(path, "nonzero padding after the bitmap: corrupt"));
                }
            }
            done += n;
        }
        let tail = chunks % 64;
        if tail != 0 {
            let last = *words.last().unwrap();
            if last & !bit_mask(0, tail) != 0 {
                return Err(invalid(
                    path,
                    format!("bits set past the last chunk ({chunks} chunks): corrupt"),
                ));
            }
        }
        Ok(words)
    }

    /// Creates the file under a temporary name, then renames it into place.
    fn create(path: &Path, size_bytes: u64, words: &[u64]) -> io::Result<File> {
        let name = path.file_name().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("dirty map {}: not a file path", path.display()),
            )
        })?;
        let mut tmp_name = name.to_owned();
        tmp_name.push(".tmp");
        let tmp = path.with_file_name(tmp_name);

        let result = (|| {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            file.write_all_at(&encode_header(size_bytes), 0)?;
            // Write every page, zeros included, so the blocks are allocated now rather than
            // failing with ENOSPC at some later persist.
            let npages = page_count(words.len());
            let batch_pages = IO_BATCH_BYTES / PAGE_BYTES as usize;
            let mut page = 0;
            while page < npages {
                let n = batch_pages.min(npages - page);
                file.write_all_at(&page_bytes(words, page, n), page_offset(page))?;
                page += n;
            }
            file.sync_all()?;
            std::fs::rename(&tmp, path)?;
            sync_dir(path)?;
            Ok(file)
        })();
        result.map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            with_path(path, "create", e)
        })
    }

    /// Sets or clears the chunks `first..end` (`end <= chunks`); returns whether any changed.
    fn set_range(&mut self, first: u64, end: u64, value: bool) -> bool {
        if first >= end {
            return false;
        }
        let mut changed = false;
        let mut chunk = first;
        while chunk < end {
            let wi = (chunk / 64) as usize;
            let lo = chunk % 64;
            let hi = (end - wi as u64 * 64).min(64);
            let mask = bit_mask(lo, hi);
            let old = self.words[wi];
            let new = if value { old | mask } else { old & !mask };
            if new != old {
                let diff = u64::from((old ^ new).count_ones());
                if value {
                    self.set_bits += diff;
                } else {
                    self.set_bits -= diff;
                }
                self.words[wi] = new;
                let page = wi / WORDS_PER_PAGE;
                self.changed_pages[page / 64] |= 1 << (page % 64);
                self.changed_any = true;
                changed = true;
            }
            chunk = wi as u64 * 64 + hi;
        }
        changed
    }

    /// Marks every chunk that `[offset_bytes, offset_bytes + len_bytes)` touches, partially
    /// covered chunks included. `len_bytes == 0` is a no-op; the range is clamped to the volume.
    ///
    /// Returns true when at least one bit was newly set. Either way the mark is durable only
    /// once a persist prepared after this call has returned `Ok` (see the module docs).
    pub fn mark(&mut self, offset_bytes: u64, len_bytes: u64) -> bool {
        if len_bytes == 0 || offset_bytes >= self.size_bytes {
            return false;
        }
        let end = offset_bytes.saturating_add(len_bytes).min(self.size_bytes);
        let first = offset_bytes / DIRTY_CHUNK_BYTES;
        let last = (end - 1) / DIRTY_CHUNK_BYTES;
        self.set_range(first, last + 1, true)
    }

    /// Marks the whole volume. Returns true when at least one bit was newly set.
    pub fn mark_all(&mut self) -> bool {
        self.set_range(0, self.chunks, true)
    }

    /// Clears, in memory, only the chunks lying FULLY inside `[offset_bytes, offset_bytes +
    /// len_bytes)`: a partially covered chunk stays dirty, since the part outside the range may
    /// still differ on the peer. The last chunk of a volume whose size is not a multiple of the
    /// chunk size counts as fully covered when the range reaches the end of the volume. The
    /// range is clamped to the volume. Returns true if any bit changed.
    pub fn clear(&mut self, offset_bytes: u64, len_bytes: u64) -> bool {
        if len_bytes == 0 || offset_bytes >= self.size_bytes {
            return false;
        }
        let end = offset_bytes.saturating_add(len_bytes).min(self.size_bytes);
        let first = offset_bytes.div_ceil(DIRTY_CHUNK_BYTES);
        let end_chunk = if end == self.size_bytes {
            self.chunks
        } else {
            end / DIRTY_CHUNK_BYTES
        };
        self.set_range(first, end_chunk, false)
    }

    /// Clears the whole volume in memory. Returns true if any bit changed.
    pub fn clear_all(&mut self) -> bool {
        self.set_range(0, self.chunks, false)
    }

    /// True when no chunk is dirty. O(1).
    pub fn is_clean(&self) -> bool {
        self.set_bits == 0
    }

    /// Bytes of volume covered by dirty chunks; the last chunk counts by its real size.
    pub fn dirty_bytes(&self) -> u64 {
        let mut bytes = self.set_bits * DIRTY_CHUNK_BYTES;
        let tail = self.size_bytes % DIRTY_CHUNK_BYTES;
        if tail != 0 && self.bit(self.chunks - 1) {
            bytes -= DIRTY_CHUNK_BYTES - tail;
        }
        bytes
    }

    /// The volume size this map covers.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// The file this map persists to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True when memory has changes not yet handed to a [`PersistJob`].
    pub fn has_unpersisted_changes(&self) -> bool {
        self.changed_any
    }

    fn bit(&self, chunk: u64) -> bool {
        self.words[(chunk / 64) as usize] & (1 << (chunk % 64)) != 0
    }

    /// First set chunk at or after `from`, if any.
    fn next_set(&self, from: u64) -> Option<u64> {
        if from >= self.chunks {
            return None;
        }
        let wi = (from / 64) as usize;
        let w = self.words[wi] & (!0u64 << (from % 64));
        if w != 0 {
            return Some(wi as u64 * 64 + u64::from(w.trailing_zeros()));
        }
        // Skip all-zero words; bits past `chunks` are zero, so any hit is a real chunk.
        let rest = &self.words[wi + 1..];
        let skip = rest.iter().position(|&w| w != 0)?;
        let wj = wi + 1 + skip;
        Some(wj as u64 * 64 + u64::from(self.words[wj].trailing_zeros()))
    }

    /// First clear chunk at or after `from`, or `chunks` when all the rest are set.
    fn next_clear(&self, from: u64) -> u64 {
        if from >= self.chunks {
            return self.chunks;
        }
        let wi = (from / 64) as usize;
        let w = !self.words[wi] & (!0u64 << (from % 64));
        if w != 0 {
            return (wi as u64 * 64 + u64::from(w.trailing_zeros())).min(self.chunks);
        }
        let rest = &self.words[wi + 1..];
        match rest.iter().position(|&w| w != !0) {
            Some(skip) => {
                let wj = wi + 1 + skip;
                (wj as u64 * 64 + u64::from((!self.words[wj]).trailing_zeros())).min(self.chunks)
            }
            None => self.chunks,
        }
    }

    /// Dirty ranges `(offset, len)` in offset order, starting the scan at `from_offset` rounded
    /// down to a chunk. Adjacent dirty chunks merge into one range; a run longer than
    /// `max_range_bytes` (rounded down to whole chunks, at least one chunk) is split. A range
    /// ending at the end of the volume ends at `size_bytes`, not at a chunk boundary. Returns at
    /// most `max_ranges` ranges; to continue, call again from the end of the last one.
    ///
    /// The scan skips all-zero words, so a mostly clean map is cheap to walk.
    pub fn ranges_from(
        &self,
        from_offset: u64,
        max_range_bytes: u64,
        max_ranges: usize,
    ) -> Vec<(u64, u64)> {
        let max_chunks = (max_range_bytes / DIRTY_CHUNK_BYTES).max(1);
        let mut out = Vec::new();
        let mut pos = from_offset / DIRTY_CHUNK_BYTES;
        while out.len() < max_ranges {
            let Some(start) = self.next_set(pos) else {
                break;
            };
            let end = self.next_clear(start);
            let mut s = start;
            while s < end && out.len() < max_ranges {
                let e = s.saturating_add(max_chunks).min(end);
                let off = s * DIRTY_CHUNK_BYTES;
                out.push((off, (e * DIRTY_CHUNK_BYTES).min(self.size_bytes) - off));
                s = e;
            }
            pos = end;
        }
        out
    }

    /// Hands everything changed in memory since the last call to a [`PersistJob`] holding
    /// copies of the changed bitmap pages (adjacent pages merged into one write), and forgets
    /// those changes. Run the job with [`PersistJob::run`], typically via
    /// `tokio::task::spawn_blocking`.
    ///
    /// Returns `None` when nothing changed and the file is already known to hold the current
    /// state. When nothing changed but an earlier job is still in flight (or failed), returns
    /// a job anyway, so waiting for it still tells the caller that the state is durable. After
    /// a failed or dropped job, the next job carries every page.
    pub fn prepare_persist(&mut self) -> Option<PersistJob> {
        let full = {
            let mut chain = self.shared.chain();
            let full = std::mem::take(&mut chain.rewrite_all);
            if !full && !self.changed_any && chain.durable == self.next_seq - 1 {
                return None;
            }
            full
        };
        let npages = page_count(self.words.len());
        let max_run = IO_BATCH_BYTES / PAGE_BYTES as usize;
        let mut writes = Vec::new();
        if full {
            let mut page = 0;
            while page < npages {
                let n = max_run.min(npages - page);
                writes.push((page_offset(page), page_bytes(&self.words, page, n)));
                page += n;
            }
        } else if self.changed_any {
            // Collect runs of consecutive changed pages, skipping clean words of the page set.
            let mut run: Option<(usize, usize)> = None;
            for (wi, &w) in self.changed_pages.iter().enumerate() {
                let mut bits = w;
                while bits != 0 {
                    let page = wi * 64 + bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    run = match run {
                        Some((first, n)) if first + n == page && n < max_run => {
                            Some((first, n + 1))
                        }
                        Some((first, n)) => {
                            writes.push((page_offset(first), page_bytes(&self.words, first, n)));
                            Some((page, 1))
                        }
                        None => Some((page, 1)),
                    };
                }
            }
            if let Some((first, n)) = run {
                writes.push((page_offset(first), page_bytes(&self.words, first, n)));
            }
        }
        self.changed_pages.fill(0);
        self.changed_any = false;
        let seq = self.next_seq;
        self.next_seq += 1;
        Some(PersistJob {
            shared: Arc::clone(&self.shared),
            seq,
            full,
            writes,
            armed: true,
        })
    }

    /// [`prepare_persist`](Self::prepare_persist) and [`PersistJob::run`], synchronously.
    /// Blocks on file I/O (and on earlier jobs still running).
    pub fn persist(&mut self) -> io::Result<()> {
        match self.prepare_persist() {
            Some(job) => job.run(),
            None => Ok(()),
        }
    }
}

impl fmt::Debug for DirtyMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirtyMap")
            .field("path", &self.path)
            .field("size_bytes", &self.size_bytes)
            .field("dirty_bytes", &self.dirty_bytes())
            .field("unpersisted", &self.changed_any)
            .finish()
    }
}

impl PersistJob {
    /// Waits until every job prepared before this one has run or been dropped, then `pwrite`s
    /// every page this job carries and `fdatasync`s. Blocking: run it with
    /// `tokio::task::spawn_blocking` from async code.
    ///
    /// `Ok` means the file durably holds the map as it was when this job was prepared (except
    /// where a later job has since written newer contents). An error — this job's I/O failed,
    /// or an earlier job failed or was dropped and this one lacks its pages — makes the map
    /// rewrite every page in its next job; persist again.
    pub fn run(mut self) -> io::Result<()> {
        self.armed = false;
        let shared = Arc::clone(&self.shared);
        let mut chain = shared.chain();
        while chain.next_to_run != self.seq {
            chain = shared.turn.wait(chain).unwrap_or_else(|e| e.into_inner());
        }
        let complete = self.full || chain.durable + 1 == self.seq;
        drop(chain);

        // Our turn: no other job writes until we advance the chain.
        let result = if complete {
            self.write()
        } else {
            Err(io::Error::other(
                "an earlier dirty map persist failed or was dropped; persist again",
            ))
        };

        let mut chain = shared.chain();
        match result {
            Ok(()) => chain.durable = self.seq,
            Err(_) => chain.rewrite_all = true,
        }
        chain.advance();
        drop(chain);
        shared.turn.notify_all();
        result
    }

    fn write(&self) -> io::Result<()> {
        if self.writes.is_empty() {
            return Ok(()); // The previous job, which succeeded, already synced everything.
        }
        let file = &self.shared.file;
        for (offset, bytes) in &self.writes {
            file.write_all_at(bytes, *offset)?;
        }
        file.sync_data()
    }
}

impl Drop for PersistJob {
    /// A job dropped without running loses its pages: the next job rewrites everything, and
    /// jobs after this one stop waiting for it.
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut chain = self.shared.chain();
        chain.rewrite_all = true;
        if chain.next_to_run == self.seq {
            chain.advance();
            drop(chain);
            self.shared.turn.notify_all();
        } else {
            chain.abandoned.insert(self.seq);
        }
    }
}

impl fmt::Debug for PersistJob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PersistJob")
            .field("seq", &self.seq)
            .field("full", &self.full)
            .field("writes", &self.writes.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    const C: u64 = DIRTY_CHUNK_BYTES;

    fn assert_send_static<T: Send + 'static>() {}

    #[test]
    fn job_is_send_static() {
        assert_send_static::<PersistJob>();
    }

    fn chunks_of(map: &DirtyMap) -> BTreeSet<u64> {
        let mut set = BTreeSet::new();
        for (off, len) in map.ranges_from(0, u64::MAX, usize::MAX) {
            for c in off / C..(off + len).div_ceil(C) {
                set.insert(c);
            }
        }
        set
    }

    fn new_map(dir: &tempfile::TempDir, size: u64, all: bool) -> DirtyMap {
        DirtyMap::open(&dir.path().join("dm"), size, all).unwrap()
    }

    #[test]
    fn mark_unaligned_and_clamped() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = new_map(&dir, 10 * C + 100, false);
        assert!(m.is_clean());
        assert!(!m.mark(5, 0));
        assert!(m.mark(C - 1, 2)); // touches chunks 0 and 1
        assert_eq!(chunks_of(&m), BTreeSet::from([0, 1]));
        assert!(!m.mark(100, 10)); // already set
        assert!(m.mark(9 * C + 5, u64::MAX)); // clamped, chunks 9 and 10 (partial last)
        assert!(!m.mark(11 * C, 5)); // past the end
        assert_eq!(chunks_of(&m), BTreeSet::from([0, 1, 9, 10]));
        assert_eq!(m.dirty_bytes(), 3 * C + 100);
        assert_eq!(
            m.ranges_from(0, u64::MAX, 10),
            vec![(0, 2 * C), (9 * C, C + 100)]
        );
        assert!(m.mark_all());
        assert!(!m.mark_all());
        assert_eq!(m.dirty_bytes(), m.size_bytes());
        assert_eq!(m.ranges_from(0, u64::MAX, 10), vec![(0, 10 * C + 100)]);
    }

    #[test]
    fn clear_only_fully_covered_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = new_map(&dir, 10 * C + 100, true);
        assert_eq!(m.dirty_bytes(), 10 * C + 100);
        assert!(!m.clear(1, C)); // covers no chunk fully
        assert!(!m.clear(0, C - 1));
        assert!(m.clear(1, 3 * C)); // chunks 1 and 2 fully covered
        assert_eq!(chunks_of(&m).len(), 9);
        assert!(!chunks_of(&m).contains(&1) && !chunks_of(&m).contains(&2));
        assert!(!m.clear(10 * C, 99)); // last chunk, not fully
        assert!(m.clear(10 * C, 100)); // reaches the end of the volume: fully covered
        assert!(!m.clear(10 * C - 1, u64::MAX)); // clamped; chunk 10 is already clear
        assert_eq!(chunks_of(&m), BTreeSet::from([0, 3, 4, 5, 6, 7, 8, 9]));
        assert_eq!(m.dirty_bytes(), 8 * C);
        assert!(m.clear_all());
        assert!(!m.clear_all());
        assert!(m.is_clean());
        assert_eq!(m.dirty_bytes(), 0);
    }

    #[test]
    fn ranges_split_and_resume() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = new_map(&dir, 1000 * C, false);
        m.mark(10 * C, 100 * C); // chunks 10..110, spans words
        m.mark(200 * C, C);
        m.mark(999 * C, C);
        assert_eq!(
            m.ranges_from(0, 40 * C, 100),
            vec![
                (10 * C, 40 * C),
                (50 * C, 40 * C),
                (90 * C, 20 * C),
                (200 * C, C),
                (999 * C, C)
            ]
        );
        // max_range_bytes below a chunk still yields one chunk per range
        assert_eq!(
            m.ranges_from(200 * C, 1, 100),
            vec![(200 * C, C), (999 * C, C)]
        );
        // from mid-run (unaligned): starts at the chunk containing the offset
        assert_eq!(
            m.ranges_from(60 * C + 17, u64::MAX, 2),
            vec![(60 * C, 50 * C), (200 * C, C)]
        );
        assert_eq!(m.ranges_from(0, 40 * C, 2).len(), 2);
        assert_eq!(m.ranges_from(0, 40 * C, 0), vec![]);
        assert_eq!(m.ranges_from(1000 * C, u64::MAX, 10), vec![]);
        assert_eq!(m.ranges_from(u64::MAX, u64::MAX, 10), vec![]);
        // a run ending exactly at a word boundary, and one running to the end of a full word
        m.clear_all();
        m.mark(0, 64 * C);
        m.mark(128 * C, 64 * C);
        assert_eq!(
            m.ranges_from(0, u64::MAX, 10),
            vec![(0, 64 * C), (128 * C, 64 * C)]
        );
    }

    #[test]
    fn run_to_end_of_word_aligned_volume() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = new_map(&dir, 128 * C, true);
        assert_eq!(m.ranges_from(5 * C, u64::MAX, 10), vec![(5 * C, 123 * C)]);
        m.clear(0, 64 * C);
        assert_eq!(m.ranges_from(0, u64::MAX, 10), vec![(64 * C, 64 * C)]);
    }

    #[test]
    fn empty_volume() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = new_map(&dir, 0, true);
        assert!(m.is_clean());
        assert!(!m.mark_all());
        assert!(!m.mark(0, 10));
        assert_eq!(m.ranges_from(0, u64::MAX, 10), vec![]);
        m.persist().unwrap();
        drop(m);
        assert!(new_map(&dir, 0, false).is_clean());
    }

    #[test]
    fn persist_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dm");
        let size = 3 * 32768 * C + 123; // four bitmap pages, partial last chunk
        let mut m = DirtyMap::open(&path, size, false).unwrap();
        assert!(!dir.path().join("dm.tmp").exists());
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            HEADER_BYTES + 4 * PAGE_BYTES
        );
        m.mark(0, 1);
        m.mark(40000 * C, 50000 * C);
        m.mark(size - 1, 1);
        let expect = chunks_of(&m);
        m.persist().unwrap();
        assert!(m.prepare_persist().is_none());
        // marks without persist: gone after "crash", but the file is never garbage
        m.mark(5 * C, C);
        drop(m);
        let mut m = DirtyMap::open(&path, size, true).unwrap();
        assert_eq!(chunks_of(&m), expect);
        assert_eq!(m.dirty_bytes(), (1 + 50000) * C + 123);

        m.clear(40000 * C, 50000 * C);
        m.persist().unwrap();
        drop(m);
        let m = DirtyMap::open(&path, size, false).unwrap();
        assert_eq!(chunks_of(&m), BTreeSet::from([0, chunk_count(size) - 1]));
    }

    #[test]
    fn create_all_dirty_persists() {
        let dir = tempfile::tempdir().unwrap();
        let m = new_map(&dir, 100 * C + 1, true);
        assert_eq!(m.dirty_bytes(), 100 * C + 1);
        drop(m);
        let m = new_map(&dir, 100 * C + 1, false);
        assert_eq!(chunks_of(&m), (0..101).collect());
    }

    #[test]
    fn header_mismatch_is_error_and_file_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dm");
        let mut m = DirtyMap::open(&path, 50 * C, false).unwrap();
        m.mark(3 * C, 5);
        m.persist().unwrap();
        drop(m);
        let before = std::fs::read(&path).unwrap();

        let err = DirtyMap::open(&path, 51 * C, true).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("size_bytes"), "{msg}");
        assert_eq!(std::fs::read(&path).unwrap(), before);

        // wrong magic
        let mut bad = before.clone();
        bad[0] = b'X';
        std::fs::write(&path, &bad).unwrap();
        let msg = DirtyMap::open(&path, 50 * C, false)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("magic"), "{msg}");
        // corrupt field: CRC catches it
        let mut bad = before.clone();
        bad[13] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        let msg = DirtyMap::open(&path, 50 * C, false)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("CRC"), "{msg}");
        // version
        let mut bad = before.clone();
        bad[8] = 2;
        std::fs::write(&path, &bad).unwrap();
        let msg = DirtyMap::open(&path, 50 * C, false)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("version"), "{msg}");
        // truncated
        std::fs::write(&path, &before[..4096]).unwrap();
        let msg = DirtyMap::open(&path, 50 * C, false)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("expected"), "{msg}");
        std::fs::write(&path, &before[..100]).unwrap();
        assert!(DirtyMap::open(&path, 50 * C, false).is_err());
        // a bit past the last chunk
        let mut bad = before.clone();
        bad[4096 + 6] = 0x80; // bit 55 of word 0; 50 chunks
        std::fs::write(&path, &bad).unwrap();
        let msg = DirtyMap::open(&path, 50 * C, false)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("past the last chunk"), "{msg}");
        // nonzero padding
        let mut bad = before.clone();
        bad[4096 + 4000] = 1;
        std::fs::write(&path, &bad).unwrap();
        assert!(DirtyMap::open(&path, 50 * C, false).is_err());

        std::fs::write(&path, &before).unwrap();
        let m = DirtyMap::open(&path, 50 * C, false).unwrap();
        assert_eq!(chunks_of(&m), BTreeSet::from([3]));
    }

    #[test]
    fn dropped_job_forces_full_rewrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dm");
        let mut m = DirtyMap::open(&path, 100_000 * C, false).unwrap();
        m.mark(7 * C, 1);
        let job = m.prepare_persist().unwrap();
        drop(job);
        assert!(!m.has_unpersisted_changes());
        m.persist().unwrap(); // must rewrite everything although nothing changed
        drop(m);
        let m = DirtyMap::open(&path, 100_000 * C, false).unwrap();
        assert_eq!(chunks_of(&m), BTreeSet::from([7]));
    }

    #[test]
    fn job_after_dropped_job_fails_then_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dm");
        let mut m = DirtyMap::open(&path, 100_000 * C, false).unwrap();
        m.mark(7 * C, 1);
        let a = m.prepare_persist().unwrap();
        m.mark(90_000 * C, 1); // another page
        let b = m.prepare_persist().unwrap();
        drop(a);
        assert!(b.run().is_err());
        m.persist().unwrap();
        drop(m);
        let m = DirtyMap::open(&path, 100_000 * C, false).unwrap();
        assert_eq!(chunks_of(&m), BTreeSet::from([7, 90_000]));
    }

    #[test]
    fn jobs_run_in_order_and_empty_job_waits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dm");
        let mut m = DirtyMap::open(&path, 1000 * C, false).unwrap();
        m.mark(0, 1);
        let a = m.prepare_persist().unwrap();
        m.mark(C, 1); // same page: b's copy is newer than a's
        let b = m.prepare_persist().unwrap();
        assert!(!m.mark(0, 1)); // already set, durable only once a is done
        let c = m.prepare_persist().expect("a and b are still in flight");
        let tb = std::thread::spawn(move || b.run());
        let tc = std::thread::spawn(move || c.run());
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!tb.is_finished() && !tc.is_finished());
        a.run().unwrap();
        tb.join().unwrap().unwrap();
        tc.join().unwrap().unwrap();
        assert!(m.prepare_persist().is_none());
        drop(m);
        let m = DirtyMap::open(&path, 1000 * C, false).unwrap();
        assert_eq!(chunks_of(&m), BTreeSet::from([0, 1]));
    }

    #[test]
    fn job_runs_on_blocking_thread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dm");
        let mut m = DirtyMap::open(&path, 1000 * C, false).unwrap();
        m.mark(500 * C, 3 * C);
        let job = m.prepare_persist().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async { tokio::task::spawn_blocking(move || job.run()).await })
            .unwrap()
            .unwrap();
        drop(m);
        let m = DirtyMap::open(&path, 1000 * C, false).unwrap();
        assert_eq!(chunks_of(&m), BTreeSet::from([500, 501, 502]));
    }

    /// Simulates a crash in the middle of a job: each 512-byte sector of the bitmap is either
    /// old or new. The map must open, and each bit must be its old or its new value.
    #[test]
    fn torn_write_yields_old_or_new_bits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dm");
        let size = 70_000 * C;
        let mut m = DirtyMap::open(&path, size, false).unwrap();
        for i in (0..70_000).step_by(3) {
            m.mark(i * C, 1);
        }
        m.persist().unwrap();
        let old = chunks_of(&m);
        let old_file = std::fs::read(&path).unwrap();
        for i in (0..70_000).step_by(5) {
            m.mark(i * C, 1);
        }
        m.clear(0, 30_000 * C);
        let new = chunks_of(&m);
        let job = m.prepare_persist().unwrap();
        let mut new_file = old_file.clone();
        for (off, bytes) in &job.writes {
            new_file[*off as usize..*off as usize + bytes.len()].copy_from_slice(bytes);
        }
        drop(job);
        drop(m);
        let mut rng = 0x1234_5678_u64;
        for _ in 0..8 {
            let mut torn = old_file.clone();
            for s in (0..torn.len()).step_by(512) {
                rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1);
                if rng >> 63 == 1 {
                    torn[s..s + 512].copy_from_slice(&new_file[s..s + 512]);
                }
            }
            std::fs::write(&path, &torn).unwrap();
            let m = DirtyMap::open(&path, size, false).unwrap();
            let got = chunks_of(&m);
            let both: BTreeSet<u64> = old.intersection(&new).copied().collect();
            let either: BTreeSet<u64> = old.union(&new).copied().collect();
            assert!(both.is_subset(&got) && got.is_subset(&either));
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Mark(u64, u64),
        Clear(u64, u64),
        MarkAll,
        ClearAll,
        Persist,
        DropJob,
        Reopen,
        Ranges(u64, u64, usize),
    }

    fn op(size: u64) -> impl Strategy<Value = Op> {
        let off = 0..size + 3 * C;
        let len = prop_oneof![0..3 * C, 0..200 * C, Just(u64::MAX)];
        prop_oneof![
            6 => (off.clone(), len.clone()).prop_map(|(o, l)| Op::Mark(o, l)),
            4 => (off.clone(), len).prop_map(|(o, l)| Op::Clear(o, l)),
            1 => Just(Op::MarkAll),
            1 => Just(Op::ClearAll),
            3 => Just(Op::Persist),
            1 => Just(Op::DropJob),
            2 => Just(Op::Reopen),
            2 => (off, 1..100 * C, 1..20usize).prop_map(|(o, m, n)| Op::Ranges(o, m, n)),
        ]
    }

    fn case() -> impl Strategy<Value = (u64, Vec<Op>)> {
        prop_oneof![1..300 * C, 1..(2 * 32768 + 500) * C]
            .prop_flat_map(|size| (Just(size), prop::collection::vec(op(size), 1..40)))
    }

    fn model_ranges(
        model: &BTreeSet<u64>,
        size: u64,
        from: u64,
        max_bytes: u64,
        max: usize,
    ) -> Vec<(u64, u64)> {
        let max_chunks = (max_bytes / C).max(1);
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut cur: Option<(u64, u64)> = None; // chunk start, chunk end
        for &c in model.range(from / C..) {
            cur = match cur {
                Some((s, e)) if e == c && e - s < max_chunks => Some((s, e + 1)),
                Some((s, e)) => {
                    out.push((s * C, (e * C).min(size) - s * C));
                    if out.len() == max {
                        return out;
                    }
                    Some((c, c + 1))
                }
                None => Some((c, c + 1)),
            };
        }
        if let Some((s, e)) = cur {
            if out.len() < max {
                out.push((s * C, (e * C).min(size) - s * C));
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn matches_model((size, ops) in case()) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("dm");
            let chunks = chunk_count(size);
            let mut m = DirtyMap::open(&path, size, false).unwrap();
            let mut mem = BTreeSet::new();
            let mut disk = BTreeSet::new();
            for op in ops {
                match op {
                    Op::Mark(o, l) => {
                        let mut new = false;
                        if l > 0 && o < size {
                            let end = o.saturating_add(l).min(size);
                            for c in o / C..=(end - 1) / C {
                                new |= mem.insert(c);
                            }
                        }
                        prop_assert_eq!(m.mark(o, l), new);
                    }
                    Op::Clear(o, l) => {
                        let mut changed = false;
                        if l > 0 && o < size {
                            let end = o.saturating_add(l).min(size);
                            for c in o.div_ceil(C)..chunks {
                                let chunk_end = ((c + 1) * C).min(size);
                                if chunk_end > end {
                                    break;
                                }
                                changed |= mem.remove(&c);
                            }
                        }
                        prop_assert_eq!(m.clear(o, l), changed);
                    }
                    Op::MarkAll => {
                        let before = mem.len();
                        mem.extend(0..chunks);
                        prop_assert_eq!(m.mark_all(), mem.len() != before);
                    }
                    Op::ClearAll => {
                        let had = !mem.is_empty();
                        mem.clear();
                        prop_assert_eq!(m.clear_all(), had);
                    }
                    Op::Persist => {
                        m.persist().unwrap();
                        disk = mem.clone();
                    }
                    Op::DropJob => {
                        drop(m.prepare_persist());
                    }
                    Op::Reopen => {
                        drop(m);
                        m = DirtyMap::open(&path, size, true).unwrap();
                        mem = disk.clone();
                        prop_assert_eq!(chunks_of(&m), mem.clone());
                    }
                    Op::Ranges(from, max_bytes, max) => {
                        prop_assert_eq!(
                            m.ranges_from(from, max_bytes, max),
                            model_ranges(&mem, size, from, max_bytes, max)
                        );
                    }
                }
                prop_assert_eq!(m.is_clean(), mem.is_empty());
                let mut bytes = mem.len() as u64 * C;
                if mem.contains(&(chunks - 1)) {
                    bytes -= chunks * C - size;
                }
                prop_assert_eq!(m.dirty_bytes(), bytes);
            }
            prop_assert_eq!(chunks_of(&m), mem.clone());
            m.persist().unwrap();
            drop(m);
            let m = DirtyMap::open(&path, size, false).unwrap();
            prop_assert_eq!(chunks_of(&m), mem);
        }
    }
}
