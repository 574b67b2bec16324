//! Power loss for real processes: an undo log beside every file, so that a test can kill
//! `ferry run` with SIGKILL and then take back every write the process had not made durable,
//! leaving the files as a disk would hold them after a power cut. Compiled only with the
//! `fault-injection` feature.
//!
//! # The model
//!
//! The test kills the process; the operating system survives it, page cache included. What a
//! power cut would have lost at that instant is exactly what the process wrote and did not make
//! durable, so the wrapper ([`wrap`]; [`super::open`] applies it to every file it opens when
//! `FERRY_FAULT_POWER_LOSS=1`) records, for the file `PATH`, how to take those writes back, in
//! the undo log `PATH.undo`:
//!
//! - Before each `write_at` or `zero_range` it reads the current contents of the range, widened
//!   to whole 512-byte sectors, from the inner storage, and appends them to the undo log as the
//!   write's "before" records. The appends are plain writes with no fsync: the operating system
//!   outlives the process, so a record whose append returned is in the log when the data write
//!   is issued, whatever happens to the process afterwards.
//! - A `dsync` write is logged in the same way, because while it is in flight the disk may hold
//!   any mix of its sectors. Once it completes, a "durable" record marks it, and a revert keeps
//!   every sector it wrote at least as new as that write.
//! - `sync` forgets every write that had completed when the sync started: fdatasync made them
//!   durable. Writes still in flight when it started are not covered, and keep their records:
//!   the log is rewritten under a temporary name and renamed over `PATH.undo`, so that at every
//!   moment it holds them. With nothing left to revert, the log is truncated to its header.
//! - Writes whose sectors overlap run one after the other, in the order they were issued (first
//!   polled). A disk promises no order between overlapping writes in flight together, while a
//!   revert needs, for every sector, the order in which writes reached it: the "before" contents
//!   of a write must be the contents the previous write left.
//!
//! [`revert`] then plays the power loss, after the process is dead, with the rule of
//! [`super::FaultDisk`]: every sector touched by a logged write ends as it was after some
//! prefix, chosen by a seeded generator, of the logged writes to it (none of them, some or all).
//! The prefix always includes the last durable write to the sector, so nothing made durable by
//! a `dsync` write or a sync is ever undone. Sectors are atomic: never part old, part new.
//!
//! A log left by a process that was killed without a revert (a crash the operating system
//! survived) is taken over by the next one: its writes count as completed and not yet durable,
//! which is what they are until the new process syncs the file.
//!
//! # The undo log
//!
//! `PATH.undo` starts with a 48-byte header: the magic `FRYUNDO1`, the format version (u32, 1),
//! the sector size (u32, 512), the device number, inode number and birth time in nanoseconds
//! (0 if unknown) of `PATH` (u64 each: a log is never applied to another file that took the
//! name), a CRC-32 of the 40 bytes before it, and 4 zero bytes. Records follow, each a 40-byte
//! header and a payload; integers are little-endian:
//!
//! | bytes  | field                                                                       |
//! |--------|-----------------------------------------------------------------------------|
//! | 0..4   | magic `FUR1`                                                                |
//! | 4      | kind: 1 = before (the old contents of a range), 2 = durable                 |
//! | 5      | flags: bit 0 = the old contents are all zeros (then there is no payload)    |
//! | 6..8   | zero                                                                        |
//! | 8..16  | sequence number of the write the record belongs to                          |
//! | 16..24 | offset in `PATH`: a multiple of 512 (before), 0 (durable)                   |
//! | 24..32 | length in bytes: 1 to 1 MiB (before), 0 (durable)                           |
//! | 32..36 | CRC-32 of bytes 0..32 and the payload                                       |
//! | 36..40 | zero                                                                        |
//!
//! The payload of a before record without the zeros flag is `length` bytes of old contents. A
//! write longer than 1 MiB has one before record per MiB, so the memory held per write in
//! flight stays bounded.
//!
//! A record cut short at the end of the log (the process died while appending it) is ignored:
//! the data write it was to protect had not been issued, since the append completes first.
//! Anything else malformed (a bad magic, a whole record failing its CRC, a length over the
//! limit) is an error: the log is corrupt, and reverting it could invent data.
//!
//! # Not covered
//!
//! Only files opened through [`super::open`] (or wrapped with [`super::maybe_power_loss`]) have
//! an undo log; files written with `std::fs` are as the process left them. Metadata (file
//! sizes, renames, directory entries) is never reverted. An O_DIRECT write that io_uring still
//! had in flight when the process was killed can land after the process is reaped; it then
//! lands whole sectors of a write that was never durable, which the rule above allows anyway.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio::sync::Notify;

use super::{AlignedBuf, IoFuture, SharedBuf, Storage};

/// The environment variable that switches the wrapper on in [`super::open`]: `1` on; unset,
/// empty or `0` off; anything else is an error (a misspelt switch must not silently test
/// nothing).
pub const POWER_LOSS_ENV: &str = "FERRY_FAULT_POWER_LOSS";

/// The atomic unit of a power loss, as in [`super::FaultDisk`].
pub use super::SECTOR_BYTES;

/// What is appended to a file's path to name its undo log.
pub const UNDO_SUFFIX: &str = ".undo";

const LOG_MAGIC: [u8; 8] = *b"FRYUNDO1";
const LOG_VERSION: u32 = 1;
const LOG_HEADER_BYTES: u64 = 48;
const RECORD_MAGIC: [u8; 4] = *b"FUR1";
const RECORD_HEADER_BYTES: u64 = 40;
const KIND_BEFORE: u8 = 1;
const KIND_DURABLE: u8 = 2;
const FLAG_ZEROS: u8 = 1;
/// The most old contents one before record carries.
const RECORD_DATA_BYTES_MAX: u64 = 1 << 20;

/// Whether `FERRY_FAULT_POWER_LOSS` asks for the wrapper.
pub fn enabled_by_env() -> io::Result<bool> {
    parse_switch(std::env::var(POWER_LOSS_ENV).ok().as_deref())
}

fn parse_switch(value: Option<&str>) -> io::Result<bool> {
    match value {
        None | Some("") | Some("0") => Ok(false),
        Some("1") => Ok(true),
        Some(other) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{POWER_LOSS_ENV}={other:?}: expected 1 (on) or 0 (off)"),
        )),
    }
}

/// The undo log of `path`: `PATH.undo`.
pub fn undo_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(UNDO_SUFFIX);
    PathBuf::from(name)
}

/// Where a log is rewritten before it is renamed over the old one.
fn rewrite_path(undo: &Path) -> PathBuf {
    let mut name = undo.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

fn with_path(path: &Path, what: &str, error: io::Error) -> io::Error {
    io::Error::new(error.kind(), format!("{what} {}: {error}", path.display()))
}

fn corrupt(path: &Path, at: u64, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("undo log {}: {what} at byte {at}", path.display()),
    )
}

/// Which file a log belongs to. The birth time tells apart a file that reuses the inode of a
/// deleted one (0 where the filesystem does not record it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct FileIdentity {
    dev: u64,
    ino: u64,
    birth_ns: u64,
}

impl FileIdentity {
    fn of(metadata: &fs::Metadata) -> FileIdentity {
        let birth_ns = metadata
            .created()
            .ok()
            .and_then(|created| created.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |since| {
                u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
            });
        FileIdentity {
            dev: metadata.dev(),
            ino: metadata.ino(),
            birth_ns,
        }
    }
}

fn encode_log_header(identity: FileIdentity) -> [u8; crate::usize_from(LOG_HEADER_BYTES)] {
    let mut header = [0u8; crate::usize_from(LOG_HEADER_BYTES)];
    header[0..8].copy_from_slice(&LOG_MAGIC);
    header[8..12].copy_from_slice(&LOG_VERSION.to_le_bytes());
    header[12..16].copy_from_slice(
        &u32::try_from(SECTOR_BYTES)
            .expect("a sector size fits in u32")
            .to_le_bytes(),
    );
    header[16..24].copy_from_slice(&identity.dev.to_le_bytes());
    header[24..32].copy_from_slice(&identity.ino.to_le_bytes());
    header[32..40].copy_from_slice(&identity.birth_ns.to_le_bytes());
    let crc = crc32fast::hash(&header[0..40]);
    header[40..44].copy_from_slice(&crc.to_le_bytes());
    header
}

/// The identity in a log's header; None when the header itself is cut short (the process died
/// creating the log, before any record).
fn decode_log_header(bytes: &[u8], path: &Path) -> io::Result<Option<FileIdentity>> {
    if (bytes.len() as u64) < LOG_HEADER_BYTES {
        return Ok(None);
    }
    let header = &bytes[..crate::usize_from(LOG_HEADER_BYTES)];
    if header[0..8] != LOG_MAGIC {
        return Err(corrupt(path, 0, "not an undo log (bad magic)"));
    }
    if crc32fast::hash(&header[0..40]) != le_u32(&header[40..44]) {
        return Err(corrupt(path, 0, "header checksum mismatch"));
    }
    if le_u32(&header[8..12]) != LOG_VERSION {
        return Err(corrupt(path, 8, "unknown version"));
    }
    if u64::from(le_u32(&header[12..16])) != SECTOR_BYTES {
        return Err(corrupt(path, 12, "unexpected sector size"));
    }
    Ok(Some(FileIdentity {
        dev: le_u64(&header[16..24]),
        ino: le_u64(&header[24..32]),
        birth_ns: le_u64(&header[32..40]),
    }))
}

fn le_u32(bytes: &[u8]) -> u32 {
    let mut array = [0u8; 4];
    array.copy_from_slice(bytes);
    u32::from_le_bytes(array)
}

fn le_u64(bytes: &[u8]) -> u64 {
    let mut array = [0u8; 8];
    array.copy_from_slice(bytes);
    u64::from_le_bytes(array)
}

fn encode_record(kind: u8, flags: u8, seq: u64, offset: u64, len: u64, payload: &[u8]) -> Vec<u8> {
    let mut record = Vec::with_capacity(crate::usize_from(RECORD_HEADER_BYTES) + payload.len());
    record.extend_from_slice(&RECORD_MAGIC);
    record.push(kind);
    record.push(flags);
    record.extend_from_slice(&[0, 0]);
    record.extend_from_slice(&seq.to_le_bytes());
    record.extend_from_slice(&offset.to_le_bytes());
    record.extend_from_slice(&len.to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&record);
    crc.update(payload);
    record.extend_from_slice(&crc.finalize().to_le_bytes());
    record.extend_from_slice(&[0; 4]);
    record.extend_from_slice(payload);
    record
}

/// A before record: `old` is what `[offset, offset + old.len())` held before write `seq`.
fn encode_before(seq: u64, offset: u64, old: &[u8]) -> Vec<u8> {
    if old.iter().all(|&byte| byte == 0) {
        encode_record(KIND_BEFORE, FLAG_ZEROS, seq, offset, old.len() as u64, &[])
    } else {
        encode_record(KIND_BEFORE, 0, seq, offset, old.len() as u64, old)
    }
}

fn encode_durable(seq: u64) -> Vec<u8> {
    encode_record(KIND_DURABLE, 0, seq, 0, 0, &[])
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum RecordKind {
    /// The old contents of `[offset, offset + len)`: the payload's position in the log, or
    /// None for zeros.
    Before {
        offset: u64,
        len: u64,
        payload_at: Option<u64>,
    },
    Durable,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct ParsedRecord {
    seq: u64,
    kind: RecordKind,
    /// Where the record starts in the log, and its length with the header.
    at: u64,
    record_bytes: u64,
}

/// The whole records of a log whose header is valid.
#[derive(Debug)]
struct ParsedRecords {
    records: Vec<ParsedRecord>,
    /// End of the last whole record.
    valid_bytes: u64,
    /// Bytes of a record cut short at the end, ignored.
    torn_tail_bytes: u64,
}

fn parse_records(bytes: &[u8], path: &Path) -> io::Result<ParsedRecords> {
    let total_bytes = bytes.len() as u64;
    let mut records = Vec::new();
    let mut at = LOG_HEADER_BYTES;
    // Bounded: every iteration consumes at least one record header.
    while at < total_bytes {
        let left_bytes = total_bytes - at;
        if left_bytes < RECORD_HEADER_BYTES {
            break;
        }
        // In memory, so positions fit in usize.
        let start = crate::usize_from(at);
        let header = &bytes[start..start + crate::usize_from(RECORD_HEADER_BYTES)];
        if header[0..4] != RECORD_MAGIC {
            return Err(corrupt(path, at, "bad record magic"));
        }
        let (kind, flags) = (header[4], header[5]);
        let seq = le_u64(&header[8..16]);
        let offset = le_u64(&header[16..24]);
        let len = le_u64(&header[24..32]);
        let payload_bytes = match kind {
            KIND_BEFORE => {
                if flags & !FLAG_ZEROS != 0 {
                    return Err(corrupt(path, at, "unknown record flags"));
                }
                if len == 0 || len > RECORD_DATA_BYTES_MAX {
                    return Err(corrupt(path, at, "before record length out of range"));
                }
                if !offset.is_multiple_of(SECTOR_BYTES) || offset.checked_add(len).is_none() {
                    return Err(corrupt(path, at, "before record offset out of range"));
                }
                if flags & FLAG_ZEROS != 0 {
                    0
                } else {
                    len
                }
            }
            KIND_DURABLE => {
                if flags != 0 || offset != 0 || len != 0 {
                    return Err(corrupt(path, at, "malformed durable record"));
                }
                0
            }
            _ => return Err(corrupt(path, at, "unknown record kind")),
        };
        let record_bytes = RECORD_HEADER_BYTES + payload_bytes;
        if left_bytes < record_bytes {
            break;
        }
        let payload = &bytes[start + crate::usize_from(RECORD_HEADER_BYTES)
            ..start + crate::usize_from(record_bytes)];
        let mut crc = crc32fast::Hasher::new();
        crc.update(&header[0..32]);
        crc.update(payload);
        if crc.finalize() != le_u32(&header[32..36]) {
            return Err(corrupt(path, at, "record checksum mismatch"));
        }
        let kind = if kind == KIND_BEFORE {
            RecordKind::Before {
                offset,
                len,
                payload_at: (payload_bytes > 0).then_some(at + RECORD_HEADER_BYTES),
            }
        } else {
            RecordKind::Durable
        };
        records.push(ParsedRecord {
            seq,
            kind,
            at,
            record_bytes,
        });
        at += record_bytes;
    }
    Ok(ParsedRecords {
        records,
        valid_bytes: at,
        torn_tail_bytes: total_bytes - at,
    })
}

/// Files with a live wrapper in this process: two wrappers appending to one log would corrupt
/// it, so a second one is refused.
static WRAPPED: Mutex<BTreeSet<FileIdentity>> = Mutex::new(BTreeSet::new());

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves its data consistent before anything in it can panic.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Wraps `inner`, the storage of the file at `path`, so that every write is logged in
/// `PATH.undo` first (see the module documentation). Takes over a log left there by a killed
/// process; discards one that belongs to another file. Fails if `path` already has a live
/// wrapper in this process. Must be called inside a tokio runtime.
pub fn wrap(inner: Arc<dyn Storage>, path: &Path) -> io::Result<Arc<dyn Storage>> {
    let metadata = fs::metadata(path).map_err(|e| with_path(path, "inspecting", e))?;
    let identity = FileIdentity::of(&metadata);
    if !lock(&WRAPPED).insert(identity) {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} already has a power-loss wrapper in this process",
                path.display()
            ),
        ));
    }
    let undo = undo_path(path);
    match open_log(&undo, identity) {
        Ok(state) => Ok(Arc::new(PowerLossStorage {
            shared: Arc::new(Shared {
                inner,
                undo_path: undo,
                identity,
                state: Mutex::new(state),
                write_done: Notify::new(),
            }),
        })),
        Err(error) => {
            lock(&WRAPPED).remove(&identity);
            Err(with_path(&undo, "opening undo log", error))
        }
    }
}

/// Opens (creating) the undo log of the file `identity`, taking over its whole records.
fn open_log(undo: &Path, identity: FileIdentity) -> io::Result<State> {
    let _ = fs::remove_file(rewrite_path(undo));
    let log = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(undo)?;
    let bytes = fs::read(undo)?;
    let mut state = State {
        log,
        log_end_bytes: LOG_HEADER_BYTES,
        next_seq: 1,
        completions: 0,
        pending: BTreeMap::new(),
        logged: BTreeMap::new(),
    };
    let taken_over = match decode_log_header(&bytes, undo) {
        Ok(Some(found)) if found == identity => true,
        Ok(Some(_)) => {
            tracing::warn!(path = %undo.display(), "undo log of a file no longer there; discarded");
            false
        }
        // Cut short while it was being created: no record can follow.
        Ok(None) => false,
        // A file of another kind under our name: not ours to keep.
        Err(error) => {
            tracing::warn!(path = %undo.display(), %error, "unreadable undo log; discarded");
            false
        }
    };
    if !taken_over {
        state.log.set_len(0)?;
        state.log.write_all_at(&encode_log_header(identity), 0)?;
        return Ok(state);
    }
    let parsed = parse_records(&bytes, undo)?;
    // The torn tail goes, or new records would follow it and hide behind it.
    state.log.set_len(parsed.valid_bytes)?;
    state.log_end_bytes = parsed.valid_bytes;
    for record in &parsed.records {
        let write = state.logged.entry(record.seq).or_insert(LoggedWrite {
            records: Vec::new(),
            // The process that made them is dead: they are complete, durable or not.
            completed_at: Some(0),
            durable: false,
        });
        match record.kind {
            RecordKind::Before { .. } => write.records.push((record.at, record.record_bytes)),
            RecordKind::Durable => write.durable = true,
        }
        state.next_seq = state.next_seq.max(record.seq.saturating_add(1));
    }
    state.truncate_if_nothing_to_revert()?;
    Ok(state)
}

/// A file's storage with an undo log. See the module documentation.
struct PowerLossStorage {
    shared: Arc<Shared>,
}

struct Shared {
    inner: Arc<dyn Storage>,
    undo_path: PathBuf,
    identity: FileIdentity,
    state: Mutex<State>,
    /// Woken whenever a write completes, so that writes queued behind it look again.
    write_done: Notify,
}

struct State {
    log: File,
    log_end_bytes: u64,
    next_seq: u64,
    /// Writes completed so far; each completion takes the next value.
    completions: u64,
    /// Writes issued and not completed: sequence number -> sectors [first, end).
    pending: BTreeMap<u64, (u64, u64)>,
    /// Every write that has (or is about to have) records in the log.
    logged: BTreeMap<u64, LoggedWrite>,
}

struct LoggedWrite {
    /// Position and length of each of its before records in the log.
    records: Vec<(u64, u64)>,
    /// None while in flight; the value of `completions` it took when it completed.
    completed_at: Option<u64>,
    /// A `dsync` write that completed.
    durable: bool,
}

impl State {
    fn append(&mut self, record: &[u8]) -> io::Result<u64> {
        let at = self.log_end_bytes;
        if let Err(error) = self.log.write_all_at(record, at) {
            // Cut a partial append off, so that later records do not follow garbage.
            let _ = self.log.set_len(at);
            return Err(error);
        }
        self.log_end_bytes += record.len() as u64;
        Ok(at)
    }

    /// When no record in the log can change anything in a revert (every write that has records
    /// is durable, so every sector it touched keeps its newest contents), empties the log.
    fn truncate_if_nothing_to_revert(&mut self) -> io::Result<()> {
        if self.log_end_bytes == LOG_HEADER_BYTES
            || !self
                .logged
                .values()
                .all(|write| write.durable || write.records.is_empty())
        {
            return Ok(());
        }
        self.log.set_len(LOG_HEADER_BYTES)?;
        self.log_end_bytes = LOG_HEADER_BYTES;
        self.logged.retain(|_, write| !write.durable);
        Ok(())
    }
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Issues a write of sectors [first, end): it takes the next sequence number, and runs
    /// once every earlier write overlapping it has completed ([`Shared::wait_turn`]).
    fn issue(&self, first_sector: u64, end_sector: u64) -> u64 {
        let mut state = self.state();
        let seq = state.next_seq;
        state.next_seq += 1;
        state.pending.insert(seq, (first_sector, end_sector));
        state.logged.insert(
            seq,
            LoggedWrite {
                records: Vec::new(),
                completed_at: None,
                durable: false,
            },
        );
        seq
    }

    async fn wait_turn(&self, seq: u64) {
        // Bounded by the writes issued before this one: each wake-up follows a completion.
        loop {
            // Created before looking, so a completion between the look and the wait is seen.
            let completed = self.write_done.notified();
            {
                let state = self.state();
                let Some(&(first, end)) = state.pending.get(&seq) else {
                    return;
                };
                let blocked = state
                    .pending
                    .range(..seq)
                    .any(|(_, &(other_first, other_end))| other_first < end && first < other_end);
                if !blocked {
                    return;
                }
            }
            completed.await;
        }
    }

    fn append_before(&self, seq: u64, offset: u64, old: &[u8]) -> io::Result<()> {
        let record = encode_before(seq, offset, old);
        let mut state = self.state();
        let at = state.append(&record)?;
        if let Some(write) = state.logged.get_mut(&seq) {
            write.records.push((at, record.len() as u64));
        }
        Ok(())
    }

    /// Write `seq` completed (or failed, or was abandoned: it may have happened all the same).
    fn complete(&self, seq: u64, durable: bool) -> io::Result<()> {
        let result = {
            let mut state = self.state();
            state.pending.remove(&seq);
            state.completions += 1;
            let tick = state.completions;
            let has_records = match state.logged.get_mut(&seq) {
                Some(write) => {
                    write.completed_at = Some(tick);
                    !write.records.is_empty()
                }
                None => false,
            };
            if !has_records {
                // Nothing was logged (it failed before writing): nothing to revert.
                state.logged.remove(&seq);
                Ok(())
            } else if durable {
                state.append(&encode_durable(seq)).and_then(|_| {
                    if let Some(write) = state.logged.get_mut(&seq) {
                        write.durable = true;
                    }
                    state.truncate_if_nothing_to_revert()
                })
            } else {
                Ok(())
            }
        };
        self.write_done.notify_waiters();
        result
    }

    async fn sync(&self) -> io::Result<()> {
        // fdatasync covers what completed before it was called, and nothing later.
        let covered = self.state().completions;
        self.inner.sync().await?;
        self.forget_synced(covered)
            .map_err(|e| with_path(&self.undo_path, "rewriting undo log", e))
    }

    /// Forgets the writes completed at or before `covered`, which a sync made durable.
    fn forget_synced(&self, covered: u64) -> io::Result<()> {
        let mut state = self.state();
        let before = state.logged.len();
        state
            .logged
            .retain(|_, write| !matches!(write.completed_at, Some(at) if at <= covered));
        if state.logged.len() == before {
            return Ok(());
        }
        state.truncate_if_nothing_to_revert()?;
        if state.log_end_bytes == LOG_HEADER_BYTES {
            return Ok(());
        }
        self.rewrite(&mut state)
    }

    /// Replaces the log with one holding only the records of the writes still in `logged`.
    /// Written aside and renamed over, so the records of writes in flight are in `PATH.undo`
    /// at every moment.
    fn rewrite(&self, state: &mut State) -> io::Result<()> {
        let tmp_path = rewrite_path(&self.undo_path);
        let tmp = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp_path)?;
        tmp.write_all_at(&encode_log_header(self.identity), 0)?;
        let mut end_bytes = LOG_HEADER_BYTES;
        let mut moved: Vec<(u64, Vec<(u64, u64)>)> = Vec::with_capacity(state.logged.len());
        let mut buffer = Vec::new();
        for (&seq, write) in &state.logged {
            let mut records = Vec::with_capacity(write.records.len());
            for &(at, record_bytes) in &write.records {
                // A record is at most a header and 1 MiB.
                buffer.resize(crate::usize_from(record_bytes), 0);
                state.log.read_exact_at(&mut buffer, at)?;
                tmp.write_all_at(&buffer, end_bytes)?;
                records.push((end_bytes, record_bytes));
                end_bytes += record_bytes;
            }
            if write.durable {
                let marker = encode_durable(seq);
                tmp.write_all_at(&marker, end_bytes)?;
                end_bytes += marker.len() as u64;
            }
            moved.push((seq, records));
        }
        fs::rename(&tmp_path, &self.undo_path)?;
        for (seq, records) in moved {
            if let Some(write) = state.logged.get_mut(&seq) {
                write.records = records;
            }
        }
        state.log = tmp;
        state.log_end_bytes = end_bytes;
        Ok(())
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let state = self
            .state
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // An empty log says nothing; a clean close leaves no file behind.
        if state.log_end_bytes == LOG_HEADER_BYTES {
            let _ = fs::remove_file(&self.undo_path);
        }
        lock(&WRAPPED).remove(&self.identity);
    }
}

/// Completes a write however its task ends: a write that was issued and then abandoned (the
/// runtime shut down) may have happened, and writes queued behind it must not wait forever.
struct Issued {
    shared: Arc<Shared>,
    seq: u64,
    completed: bool,
}

impl Issued {
    fn complete(mut self, durable: bool) -> io::Result<()> {
        self.completed = true;
        self.shared.complete(self.seq, durable)
    }
}

impl Drop for Issued {
    fn drop(&mut self) {
        if !self.completed {
            let _ = self.shared.complete(self.seq, false);
        }
    }
}

enum WriteOp {
    Data { bufs: Vec<SharedBuf>, dsync: bool },
    Zero { punch: bool },
}

impl WriteOp {
    async fn run(self, storage: &dyn Storage, offset: u64, len: u64) -> io::Result<()> {
        match self {
            WriteOp::Data { bufs, dsync } => storage.write_at(offset, bufs, dsync).await,
            WriteOp::Zero { punch } => storage.zero_range(offset, len, punch).await,
        }
    }
}

/// A write through the undo log: issued when first polled, then run in a task of its own, so
/// that a caller dropping its future cannot leave the write half-recorded.
async fn logged_write(shared: Arc<Shared>, offset: u64, len: u64, op: WriteOp) -> io::Result<()> {
    let file_bytes = shared.inner.len_bytes();
    super::check_write_range(file_bytes, offset, len)?;
    if len == 0 {
        return op.run(&*shared.inner, offset, len).await;
    }
    // In range (checked above), so neither end overflows.
    let start = offset / SECTOR_BYTES * SECTOR_BYTES;
    let end = (offset + len)
        .next_multiple_of(SECTOR_BYTES)
        .min(file_bytes);
    let seq = shared.issue(start / SECTOR_BYTES, end.div_ceil(SECTOR_BYTES));
    let issued = Issued {
        shared,
        seq,
        completed: false,
    };
    let task = tokio::spawn(async move {
        let shared = Arc::clone(&issued.shared);
        shared.wait_turn(seq).await;
        let mut at = start;
        while at < end {
            // At most RECORD_DATA_BYTES_MAX, so it fits in usize.
            let chunk_bytes = (end - at).min(RECORD_DATA_BYTES_MAX) as usize;
            let (result, old) = shared
                .inner
                .read_at(at, AlignedBuf::zeroed(chunk_bytes))
                .await;
            result?;
            shared
                .append_before(seq, at, &old)
                .map_err(|e| with_path(&shared.undo_path, "appending to undo log", e))?;
            at += chunk_bytes as u64;
        }
        let dsync = matches!(op, WriteOp::Data { dsync: true, .. });
        let result = op.run(&*shared.inner, offset, len).await;
        let logged = issued
            .complete(dsync && result.is_ok())
            .map_err(|e| with_path(&shared.undo_path, "appending to undo log", e));
        result.and(logged)
    });
    task.await.map_err(io::Error::other)?
}

impl Storage for PowerLossStorage {
    fn len_bytes(&self) -> u64 {
        self.shared.inner.len_bytes()
    }

    fn write_at(
        &self,
        offset: u64,
        bufs: Vec<SharedBuf>,
        dsync: bool,
    ) -> IoFuture<'_, io::Result<()>> {
        let shared = Arc::clone(&self.shared);
        Box::pin(async move {
            let len = super::total_len_bytes(&bufs)?;
            logged_write(shared, offset, len, WriteOp::Data { bufs, dsync }).await
        })
    }

    fn read_at(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, (io::Result<()>, AlignedBuf)> {
        self.shared.inner.read_at(offset, buf)
    }

    fn sync(&self) -> IoFuture<'_, io::Result<()>> {
        Box::pin(self.shared.sync())
    }

    fn zero_range(&self, offset: u64, len: u64, punch: bool) -> IoFuture<'_, io::Result<()>> {
        let shared = Arc::clone(&self.shared);
        Box::pin(logged_write(shared, offset, len, WriteOp::Zero { punch }))
    }

    fn logical_block_bytes(&self) -> u64 {
        self.shared.inner.logical_block_bytes()
    }
}

/// A before record, as [`revert`] looks it up by sector.
#[derive(Clone, Copy)]
struct BeforeRecord {
    seq: u64,
    offset: u64,
    len: u64,
    /// Where its payload is in the log; None for zeros.
    payload_at: Option<u64>,
}

/// What [`revert`] found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RevertReport {
    /// Writes with before records in the log, durable ones included.
    pub writes_logged: u64,
    /// Of those, the `dsync` writes that had completed.
    pub writes_durable: u64,
    /// Sectors touched by the logged writes.
    pub sectors_logged: u64,
    /// Sectors given older contents back.
    pub sectors_reverted: u64,
    /// Bytes of a record cut short at the end of the log (ignored).
    pub torn_tail_bytes: u64,
}

/// Plays a power loss on the file at `path`, whose process is dead: undoes, sector by sector
/// and chosen by `seed`, the writes its undo log `PATH.undo` holds (see the module
/// documentation for the rule), makes the result durable, and removes the log. Fails if there
/// is no log, if it belongs to another file, or if it is corrupt (then nothing is changed).
pub fn revert(path: &Path, seed: u64) -> io::Result<RevertReport> {
    let undo = undo_path(path);
    let bytes = fs::read(&undo).map_err(|e| with_path(&undo, "reading", e))?;
    let mut report = RevertReport::default();
    let Some(identity) = decode_log_header(&bytes, &undo)? else {
        report.torn_tail_bytes = bytes.len() as u64;
        fs::remove_file(&undo).map_err(|e| with_path(&undo, "removing", e))?;
        return Ok(report);
    };
    let mut data = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| with_path(path, "opening", e))?;
    let metadata = data
        .metadata()
        .map_err(|e| with_path(path, "inspecting", e))?;
    if FileIdentity::of(&metadata) != identity {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "undo log {} belongs to another file than {} (device or inode differ)",
                undo.display(),
                path.display()
            ),
        ));
    }
    // Seeking works for block devices too, whose metadata length is 0.
    let file_bytes = data
        .seek(SeekFrom::End(0))
        .map_err(|e| with_path(path, "sizing", e))?;
    let parsed = parse_records(&bytes, &undo)?;
    report.torn_tail_bytes = parsed.torn_tail_bytes;

    let durable: BTreeSet<u64> = parsed
        .records
        .iter()
        .filter(|record| record.kind == RecordKind::Durable)
        .map(|record| record.seq)
        .collect();
    // Sector -> the before records covering it. A BTreeMap, so the generator is consumed in
    // the same order on every run.
    let mut by_sector: BTreeMap<u64, Vec<BeforeRecord>> = BTreeMap::new();
    let mut writes = BTreeSet::new();
    for record in &parsed.records {
        let RecordKind::Before {
            offset,
            len,
            payload_at,
        } = record.kind
        else {
            continue;
        };
        // parse_records checked that this does not overflow.
        if offset + len > file_bytes {
            return Err(corrupt(
                &undo,
                record.at,
                "before record past the end of the file",
            ));
        }
        writes.insert(record.seq);
        for sector in offset / SECTOR_BYTES..(offset + len).div_ceil(SECTOR_BYTES) {
            by_sector.entry(sector).or_default().push(BeforeRecord {
                seq: record.seq,
                offset,
                len,
                payload_at,
            });
        }
    }
    report.writes_logged = writes.len() as u64;
    report.writes_durable = writes.intersection(&durable).count() as u64;
    report.sectors_logged = by_sector.len() as u64;

    let mut rng = StdRng::seed_from_u64(seed);
    // Runs of adjacent sectors to restore: (offset, old contents).
    let mut restores: Vec<(u64, Vec<u8>)> = Vec::new();
    for (sector, mut touching) in by_sector {
        // Overlapping writes ran in sequence order, so this is the order they reached the
        // sector in. A write covers a sector once; a duplicate would be a corrupt log.
        touching.sort_unstable_by_key(|before| before.seq);
        touching.dedup_by_key(|before| before.seq);
        let prefix_min = touching
            .iter()
            .rposition(|before| durable.contains(&before.seq))
            .map_or(0, |position| position + 1);
        let prefix_len = rng.random_range(prefix_min..=touching.len());
        // The contents after `prefix_len` writes are what the next write found there; after
        // all of them, the sector stays as it is.
        let Some(&BeforeRecord {
            offset,
            len,
            payload_at,
            ..
        }) = touching.get(prefix_len)
        else {
            continue;
        };
        let sector_start = sector * SECTOR_BYTES;
        let sector_end = (sector_start + SECTOR_BYTES).min(offset + len);
        // The log is in memory, so these positions fit in usize.
        let sector_len = crate::usize_from(sector_end - sector_start);
        let old: Vec<u8> = match payload_at {
            Some(payload_at) => {
                let from = crate::usize_from(payload_at + sector_start - offset);
                bytes[from..from + sector_len].to_vec()
            }
            None => vec![0; sector_len],
        };
        report.sectors_reverted += 1;
        match restores.last_mut() {
            Some((run_start, run)) if *run_start + run.len() as u64 == sector_start => {
                run.extend_from_slice(&old)
            }
            _ => restores.push((sector_start, old)),
        }
    }
    for (offset, old) in &restores {
        data.write_all_at(old, *offset)
            .map_err(|e| with_path(path, "reverting", e))?;
    }
    data.sync_all().map_err(|e| with_path(path, "syncing", e))?;
    fs::remove_file(&undo).map_err(|e| with_path(&undo, "removing", e))?;
    let _ = fs::remove_file(rewrite_path(&undo));
    Ok(report)
}

/// [`revert`] for every undo log directly in `dir` (not in subdirectories), in name order,
/// each with its own seed derived from `seed`. Returns the reverted files with their reports.
pub fn revert_dir(dir: &Path, seed: u64) -> io::Result<Vec<(PathBuf, RevertReport)>> {
    let mut data_paths = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| with_path(dir, "listing", e))? {
        let log = entry.map_err(|e| with_path(dir, "listing", e))?.path();
        let data_name = log
            .file_name()
            .and_then(|name| name.to_str())
            .and_then(|name| name.strip_suffix(UNDO_SUFFIX))
            .filter(|data_name| !data_name.is_empty())
            .map(str::to_owned);
        if let Some(data_name) = data_name {
            if log.is_file() {
                data_paths.push(log.with_file_name(data_name));
            }
        }
    }
    data_paths.sort();
    let mut reports = Vec::with_capacity(data_paths.len());
    for (index, data) in data_paths.into_iter().enumerate() {
        let file_seed = seed ^ (index as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let report = revert(&data, file_seed)?;
        reports.push((data, report));
    }
    Ok(reports)
}

#[cfg(test)]
mod tests {
    //! Each test writes through the wrapper onto a real file, "kills" the process (drops the
    //! storage without syncing), reverts with a seed, and checks every sector against a model
    //! of what a power loss may leave. Randomized tests print their seed; `FERRY_SEED`
    //! replays one.

    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::journal::join_all;
    use crate::storage::{open_posix, open_uring, OpenOptions};

    fn seed_from_env(test: &str) -> u64 {
        let seed = match std::env::var("FERRY_SEED") {
            Ok(text) => text.parse().expect("FERRY_SEED must be a u64"),
            Err(_) => rand::random(),
        };
        eprintln!("{test}: seed {seed} (replay with FERRY_SEED={seed})");
        seed
    }

    fn shared(data: &[u8]) -> SharedBuf {
        AlignedBuf::copy_from(data).freeze()
    }

    fn pattern(tag: u64, len: usize) -> Vec<u8> {
        let mut rng = StdRng::seed_from_u64(tag);
        (0..len).map(|_| rng.random_range(1..=255u8)).collect()
    }

    /// Creates a file of `len_bytes` zeros and opens it through the wrapper.
    fn open_wrapped(path: &Path, len_bytes: u64, uring: bool) -> Arc<dyn Storage> {
        let opts = OpenOptions {
            direct: uring,
            create_len_bytes: Some(len_bytes),
        };
        let inner = if uring {
            open_uring(path, &opts).unwrap()
        } else {
            open_posix(path, &opts).unwrap()
        };
        wrap(inner, path).unwrap()
    }

    /// What a power loss may leave: the synced image, and the writes since, in the order they
    /// reached the file, each marked durable when it was a completed `dsync` write.
    struct Model {
        synced: Vec<u8>,
        unsynced: Vec<(u64, Vec<u8>, bool)>,
    }

    impl Model {
        fn new(len_bytes: usize) -> Model {
            Model {
                synced: vec![0; len_bytes],
                unsynced: Vec::new(),
            }
        }

        fn write(&mut self, offset: u64, data: Vec<u8>, durable: bool) {
            if !data.is_empty() {
                self.unsynced.push((offset, data, durable));
            }
        }

        fn current(&self) -> Vec<u8> {
            let mut image = self.synced.clone();
            for (offset, data, _) in &self.unsynced {
                let start = *offset as usize;
                image[start..start + data.len()].copy_from_slice(data);
            }
            image
        }

        fn sync(&mut self) {
            self.synced = self.current();
            self.unsynced.clear();
        }

        /// The contents sector `sector` may hold after a power loss: after each prefix of the
        /// writes touching it that includes the last durable one.
        fn allowed(&self, sector: u64) -> Vec<Vec<u8>> {
            let start = (sector * SECTOR_BYTES) as usize;
            let end = (start + SECTOR_BYTES as usize).min(self.synced.len());
            let mut contents = self.synced[start..end].to_vec();
            let mut states = vec![contents.clone()];
            let mut prefix_min = 0;
            for (offset, data, durable) in &self.unsynced {
                let (write_start, write_end) = (*offset as usize, *offset as usize + data.len());
                if write_end <= start || end <= write_start {
                    continue;
                }
                let (from, to) = (write_start.max(start), write_end.min(end));
                contents[from - start..to - start]
                    .copy_from_slice(&data[from - write_start..to - write_start]);
                states.push(contents.clone());
                if *durable {
                    prefix_min = states.len() - 1;
                }
            }
            states.split_off(prefix_min)
        }

        /// Panics with the first sector of `actual` the model does not allow.
        fn check(&self, actual: &[u8], context: &str) {
            assert_eq!(actual.len(), self.synced.len(), "{context}: file size");
            for sector in 0..(actual.len() as u64).div_ceil(SECTOR_BYTES) {
                let start = (sector * SECTOR_BYTES) as usize;
                let end = (start + SECTOR_BYTES as usize).min(actual.len());
                let allowed = self.allowed(sector);
                assert!(
                    allowed.iter().any(|state| state[..] == actual[start..end]),
                    "{context}: sector {sector} holds {:02x?}..., which no prefix of its writes \
                     left ({} allowed states)",
                    &actual[start..start + 8],
                    allowed.len()
                );
            }
        }
    }

    /// One operation of a random history.
    enum Op {
        Write {
            offset: u64,
            data: Vec<u8>,
            dsync: bool,
        },
        Zero {
            offset: u64,
            len: u64,
            punch: bool,
        },
    }

    fn random_op(rng: &mut StdRng, len_bytes: u64, aligned: bool, tag: u64) -> Op {
        let (offset, len) = if aligned {
            let sectors = len_bytes / SECTOR_BYTES;
            let len = rng.random_range(1..=16u64.min(sectors));
            let first = rng.random_range(0..=sectors - len);
            (first * SECTOR_BYTES, len * SECTOR_BYTES)
        } else {
            let len = rng.random_range(1..=3000u64);
            (rng.random_range(0..=len_bytes - len), len)
        };
        if rng.random_ratio(1, 6) {
            Op::Zero {
                offset,
                len,
                punch: rng.random(),
            }
        } else {
            Op::Write {
                offset,
                data: pattern(tag, len as usize),
                dsync: rng.random_ratio(1, 5),
            }
        }
    }

    /// Runs a random history of writes, zeroings and syncs (several writes in flight at once,
    /// overlapping ones included) through the wrapper, drops it, reverts, and checks the
    /// file against the model.
    async fn random_history(seed: u64, uring: bool) {
        const LEN_BYTES: u64 = 64 << 10;
        const ROUNDS: u64 = 12;
        let mut totals = RevertReport::default();
        for round in 0..ROUNDS {
            let context = format!("seed {seed} round {round} uring {uring}");
            let mut rng = StdRng::seed_from_u64(seed ^ round.wrapping_mul(0x5851_f42d_4c95_7f2d));
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("data");
            let storage = open_wrapped(&path, LEN_BYTES, uring);
            let mut model = Model::new(LEN_BYTES as usize);
            for step in 0..40u64 {
                if rng.random_ratio(1, 10) {
                    storage.sync().await.unwrap();
                    model.sync();
                    continue;
                }
                // Issued in list order, completed together.
                let group: Vec<Op> = (0..rng.random_range(1..=4u64))
                    .map(|index| random_op(&mut rng, LEN_BYTES, uring, seed ^ (step << 8) ^ index))
                    .collect();
                let results = join_all(group.iter().map(|op| match op {
                    Op::Write {
                        offset,
                        data,
                        dsync,
                    } => storage.write_at(*offset, vec![shared(data)], *dsync),
                    Op::Zero { offset, len, punch } => storage.zero_range(*offset, *len, *punch),
                }))
                .await;
                for (op, result) in group.into_iter().zip(results) {
                    result.unwrap();
                    match op {
                        Op::Write {
                            offset,
                            data,
                            dsync,
                        } => model.write(offset, data, dsync),
                        Op::Zero { offset, len, .. } => {
                            model.write(offset, vec![0; len as usize], false)
                        }
                    }
                }
            }
            // Before the power loss the file holds everything written.
            assert_eq!(fs::read(&path).unwrap(), model.current(), "{context}");
            drop(storage);
            if !undo_path(&path).exists() {
                // A clean close removes a log with nothing to revert: every sector must have
                // only one possible state.
                for sector in 0..LEN_BYTES / SECTOR_BYTES {
                    assert_eq!(model.allowed(sector).len(), 1, "{context}: sector {sector}");
                }
                continue;
            }
            let report = revert(&path, seed ^ round).unwrap();
            model.check(&fs::read(&path).unwrap(), &context);
            assert!(!undo_path(&path).exists(), "{context}: the log is removed");
            assert!(
                report.sectors_reverted <= report.sectors_logged,
                "{context}"
            );
            totals.sectors_logged += report.sectors_logged;
            totals.sectors_reverted += report.sectors_reverted;
            totals.writes_durable += report.writes_durable;
        }
        // Over all rounds, a revert that never reverts (or never keeps) anything would be broken.
        assert!(totals.sectors_reverted > 0, "seed {seed}: {totals:?}");
        assert!(
            totals.sectors_reverted < totals.sectors_logged,
            "seed {seed}: {totals:?}"
        );
        assert!(totals.writes_durable > 0, "seed {seed}: {totals:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn random_histories_revert_to_what_a_power_loss_may_leave_posix() {
        let seed = seed_from_env("random_histories_revert_to_what_a_power_loss_may_leave_posix");
        random_history(seed, false).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn random_histories_revert_to_what_a_power_loss_may_leave_uring() {
        let seed = seed_from_env("random_histories_revert_to_what_a_power_loss_may_leave_uring");
        random_history(seed, true).await;
    }

    /// The data file and its undo log, to replay one revert with several seeds.
    struct Snapshot {
        data: Vec<u8>,
        log: Vec<u8>,
    }

    impl Snapshot {
        fn take(path: &Path) -> Snapshot {
            Snapshot {
                data: fs::read(path).unwrap(),
                log: fs::read(undo_path(path)).unwrap(),
            }
        }

        /// Puts the contents back in place (same file, same inode).
        fn restore(&self, path: &Path) {
            fs::OpenOptions::new()
                .write(true)
                .open(path)
                .unwrap()
                .write_all_at(&self.data, 0)
                .unwrap();
            fs::write(undo_path(path), &self.log).unwrap();
        }
    }

    /// Reverts with seeds 0..64 from `snapshot`, checking each result against `model`; returns
    /// the distinct contents each of `sectors` ended with.
    fn revert_many(
        path: &Path,
        snapshot: &Snapshot,
        model: &Model,
        sectors: &[u64],
    ) -> Vec<BTreeSet<Vec<u8>>> {
        let mut seen = vec![BTreeSet::new(); sectors.len()];
        for seed in 0..64 {
            snapshot.restore(path);
            revert(path, seed).unwrap();
            let actual = fs::read(path).unwrap();
            model.check(&actual, &format!("seed {seed}"));
            for (seen, &sector) in seen.iter_mut().zip(sectors) {
                let start = (sector * SECTOR_BYTES) as usize;
                seen.insert(actual[start..start + SECTOR_BYTES as usize].to_vec());
            }
        }
        seen
    }

    #[tokio::test]
    async fn a_dsync_write_is_never_reverted_and_makes_nothing_else_durable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let storage = open_wrapped(&path, 8 * SECTOR_BYTES, false);
        let mut model = Model::new(8 * SECTOR_BYTES as usize);
        // Sectors 0..4 unsynced, then sector 1 overwritten durably, then sector 3 durably and
        // overwritten again without dsync.
        let steps: [(u64, u64, u64, bool); 4] = [
            (0, 4, 1, false),
            (1, 1, 2, true),
            (3, 1, 3, true),
            (3, 1, 4, false),
        ];
        for (first, count, tag, dsync) in steps {
            let data = pattern(tag, (count * SECTOR_BYTES) as usize);
            storage
                .write_at(first * SECTOR_BYTES, vec![shared(&data)], dsync)
                .await
                .unwrap();
            model.write(first * SECTOR_BYTES, data, dsync);
        }
        drop(storage);
        let snapshot = Snapshot::take(&path);
        let seen = revert_many(&path, &snapshot, &model, &[0, 1, 2, 3]);
        let sector = |tag: u64, index: usize| {
            let data = pattern(tag, 4 * SECTOR_BYTES as usize);
            data[index * SECTOR_BYTES as usize..(index + 1) * SECTOR_BYTES as usize].to_vec()
        };
        let zeros = vec![0u8; SECTOR_BYTES as usize];
        assert_eq!(seen[0], BTreeSet::from([zeros.clone(), sector(1, 0)]));
        assert_eq!(seen[1], BTreeSet::from([pattern(2, SECTOR_BYTES as usize)]));
        assert_eq!(seen[2], BTreeSet::from([zeros, sector(1, 2)]));
        assert_eq!(
            seen[3],
            BTreeSet::from([
                pattern(3, SECTOR_BYTES as usize),
                pattern(4, SECTOR_BYTES as usize)
            ])
        );
    }

    #[tokio::test]
    async fn a_sync_empties_the_log_and_what_it_covered_is_never_reverted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let storage = open_wrapped(&path, 8 * SECTOR_BYTES, false);
        let mut model = Model::new(8 * SECTOR_BYTES as usize);
        for tag in 0..3u64 {
            let data = pattern(tag, 2 * SECTOR_BYTES as usize);
            storage
                .write_at(tag * SECTOR_BYTES, vec![shared(&data)], false)
                .await
                .unwrap();
            model.write(tag * SECTOR_BYTES, data, false);
        }
        storage.zero_range(0, SECTOR_BYTES, true).await.unwrap();
        model.write(0, vec![0; SECTOR_BYTES as usize], false);
        storage.sync().await.unwrap();
        model.sync();
        assert_eq!(
            fs::metadata(undo_path(&path)).unwrap().len(),
            LOG_HEADER_BYTES
        );
        let data = pattern(9, SECTOR_BYTES as usize);
        storage
            .write_at(SECTOR_BYTES, vec![shared(&data)], false)
            .await
            .unwrap();
        model.write(SECTOR_BYTES, data, false);
        drop(storage);
        let snapshot = Snapshot::take(&path);
        let seen = revert_many(&path, &snapshot, &model, &[0, 1, 2]);
        assert_eq!(seen[0].len(), 1, "sector 0 was synced");
        assert_eq!(seen[1].len(), 2, "sector 1 is old or new");
        assert_eq!(seen[2].len(), 1, "sector 2 was synced");
    }

    #[tokio::test]
    async fn a_clean_close_leaves_no_log_and_a_second_wrapper_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let storage = open_wrapped(&path, 8 * SECTOR_BYTES, false);
        let again = open_posix(&path, &OpenOptions::default()).unwrap();
        let refused = wrap(again, &path)
            .err()
            .expect("a second wrapper is refused");
        assert_eq!(refused.kind(), io::ErrorKind::AlreadyExists);
        storage
            .write_at(0, vec![shared(&[1; 512])], false)
            .await
            .unwrap();
        storage.sync().await.unwrap();
        drop(storage);
        assert!(!undo_path(&path).exists());
        // Closed, so it may be wrapped again.
        let again = open_posix(&path, &OpenOptions::default()).unwrap();
        drop(wrap(again, &path).unwrap());
    }

    /// Passes reads through and holds every write until the test lets it go.
    struct GatedWrites {
        inner: Arc<dyn Storage>,
        gate: Arc<tokio::sync::Semaphore>,
        waiting: Arc<AtomicBool>,
    }

    impl Storage for GatedWrites {
        fn len_bytes(&self) -> u64 {
            self.inner.len_bytes()
        }

        fn write_at(
            &self,
            offset: u64,
            bufs: Vec<SharedBuf>,
            dsync: bool,
        ) -> IoFuture<'_, io::Result<()>> {
            Box::pin(async move {
                self.waiting.store(true, Ordering::SeqCst);
                let _permit = self.gate.acquire().await.map_err(io::Error::other)?;
                self.inner.write_at(offset, bufs, dsync).await
            })
        }

        fn read_at(
            &self,
            offset: u64,
            buf: AlignedBuf,
        ) -> IoFuture<'_, (io::Result<()>, AlignedBuf)> {
            self.inner.read_at(offset, buf)
        }

        fn sync(&self) -> IoFuture<'_, io::Result<()>> {
            self.inner.sync()
        }

        fn zero_range(&self, offset: u64, len: u64, punch: bool) -> IoFuture<'_, io::Result<()>> {
            self.inner.zero_range(offset, len, punch)
        }

        fn logical_block_bytes(&self) -> u64 {
            self.inner.logical_block_bytes()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_in_flight_during_a_sync_stays_revertible() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let opts = OpenOptions {
            direct: false,
            create_len_bytes: Some(8 * SECTOR_BYTES),
        };
        let gate = Arc::new(tokio::sync::Semaphore::new(1));
        let waiting = Arc::new(AtomicBool::new(false));
        let gated = Arc::new(GatedWrites {
            inner: open_posix(&path, &opts).unwrap(),
            gate: Arc::clone(&gate),
            waiting: Arc::clone(&waiting),
        });
        let storage = wrap(gated, &path).unwrap();
        let mut model = Model::new(8 * SECTOR_BYTES as usize);
        // The first write passes the gate; the second waits at it while a sync runs.
        let first = pattern(1, 2 * SECTOR_BYTES as usize);
        storage
            .write_at(0, vec![shared(&first)], false)
            .await
            .unwrap();
        model.write(0, first, false);
        let permit = gate.clone().acquire_owned().await.unwrap();
        waiting.store(false, Ordering::SeqCst);
        let second = pattern(2, SECTOR_BYTES as usize);
        let in_flight = {
            let storage = Arc::clone(&storage);
            let second = second.clone();
            tokio::spawn(async move {
                storage
                    .write_at(SECTOR_BYTES, vec![shared(&second)], false)
                    .await
            })
        };
        // Bounded: the write reaches the gate within milliseconds.
        for _ in 0..1000 {
            if waiting.load(Ordering::SeqCst) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert!(
            waiting.load(Ordering::SeqCst),
            "the second write reached the gate"
        );
        storage.sync().await.unwrap();
        model.sync();
        // Only the write in flight is left in the (rewritten) log.
        let log = fs::read(undo_path(&path)).unwrap();
        let records = parse_records(&log, &path).unwrap().records;
        assert_eq!(records.len(), 1, "{records:?}");
        assert!(
            matches!(records[0].kind, RecordKind::Before { offset, .. } if offset == SECTOR_BYTES)
        );
        drop(permit);
        in_flight.await.unwrap().unwrap();
        model.write(SECTOR_BYTES, second, false);
        drop(storage);
        let snapshot = Snapshot::take(&path);
        let seen = revert_many(&path, &snapshot, &model, &[0, 1]);
        assert_eq!(seen[0].len(), 1, "sector 0 was synced");
        assert_eq!(
            seen[1].len(),
            2,
            "sector 1 may lose the write that was in flight"
        );
    }

    #[tokio::test]
    async fn a_torn_tail_of_the_log_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let storage = open_wrapped(&path, 16 * SECTOR_BYTES, false);
        let mut model = Model::new(16 * SECTOR_BYTES as usize);
        for (first, tag, dsync) in [(0u64, 1u64, false), (2, 2, true), (1, 3, false)] {
            let data = pattern(tag, 2 * SECTOR_BYTES as usize);
            storage
                .write_at(first * SECTOR_BYTES, vec![shared(&data)], dsync)
                .await
                .unwrap();
            model.write(first * SECTOR_BYTES, data, dsync);
        }
        // The process dies while appending the next write's record: the data write was never
        // issued, so the file is as it is now.
        let before = Snapshot::take(&path);
        let next = pattern(4, 3 * SECTOR_BYTES as usize);
        storage
            .write_at(SECTOR_BYTES, vec![shared(&next)], false)
            .await
            .unwrap();
        drop(storage);
        let full_log = fs::read(undo_path(&path)).unwrap();
        let whole_bytes = before.log.len();
        assert!(full_log.len() > whole_bytes + RECORD_HEADER_BYTES as usize);
        assert_eq!(full_log[..whole_bytes], before.log[..]);
        for cut in whole_bytes..full_log.len() {
            let torn = Snapshot {
                data: before.data.clone(),
                log: full_log[..cut].to_vec(),
            };
            torn.restore(&path);
            let report = revert(&path, cut as u64).unwrap();
            assert_eq!(report.torn_tail_bytes, (cut - whole_bytes) as u64);
            model.check(&fs::read(&path).unwrap(), &format!("log cut at {cut}"));
        }
        // A log cut inside its own header holds nothing.
        for cut in 0..LOG_HEADER_BYTES as usize {
            Snapshot {
                data: before.data.clone(),
                log: full_log[..cut].to_vec(),
            }
            .restore(&path);
            revert(&path, 0).unwrap();
            assert_eq!(fs::read(&path).unwrap(), before.data, "header cut at {cut}");
            assert!(!undo_path(&path).exists());
        }
    }

    #[tokio::test]
    async fn a_corrupt_log_or_one_for_another_file_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let storage = open_wrapped(&path, 8 * SECTOR_BYTES, false);
        storage
            .write_at(0, vec![shared(&pattern(1, 1024))], false)
            .await
            .unwrap();
        storage
            .write_at(0, vec![shared(&pattern(2, 512))], false)
            .await
            .unwrap();
        drop(storage);
        let snapshot = Snapshot::take(&path);
        // A flipped byte in the payload of a whole record, and a record with a bad magic.
        let last = snapshot.log.len() - 1;
        for at in [last, LOG_HEADER_BYTES as usize] {
            let mut bad = snapshot.log.clone();
            bad[at] ^= 0xff;
            fs::write(undo_path(&path), &bad).unwrap();
            let error = revert(&path, 1).unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
            assert_eq!(fs::read(&path).unwrap(), snapshot.data);
            assert!(undo_path(&path).exists());
        }
        // The same name, another file (created before the old one goes, so that it cannot
        // reuse its inode): the log must not be applied, and a new wrapper starts a fresh one.
        fs::write(undo_path(&path), &snapshot.log).unwrap();
        let replacement = dir.path().join("replacement");
        fs::write(&replacement, vec![7u8; 4096]).unwrap();
        fs::rename(&replacement, &path).unwrap();
        let error = revert(&path, 1).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
        assert_eq!(fs::read(&path).unwrap(), vec![7u8; 4096]);
        let storage = wrap(open_posix(&path, &OpenOptions::default()).unwrap(), &path).unwrap();
        assert_eq!(
            fs::metadata(undo_path(&path)).unwrap().len(),
            LOG_HEADER_BYTES
        );
        drop(storage);
    }

    #[tokio::test]
    async fn a_log_left_by_a_killed_process_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let mut model = Model::new(4 * SECTOR_BYTES as usize);
        // First process: one unsynced write, then killed (no revert: the OS survived).
        let storage = open_wrapped(&path, 4 * SECTOR_BYTES, false);
        let first = pattern(1, SECTOR_BYTES as usize);
        storage
            .write_at(0, vec![shared(&first)], false)
            .await
            .unwrap();
        model.write(0, first, false);
        drop(storage);
        // Second process: writes the same sector, then the power goes.
        let storage = wrap(open_posix(&path, &OpenOptions::default()).unwrap(), &path).unwrap();
        let second = pattern(2, SECTOR_BYTES as usize);
        storage
            .write_at(0, vec![shared(&second)], false)
            .await
            .unwrap();
        model.write(0, second, false);
        drop(storage);
        let snapshot = Snapshot::take(&path);
        let seen = revert_many(&path, &snapshot, &model, &[0]);
        assert_eq!(seen[0].len(), 3, "zeros, the first write or the second");
        // A third process that syncs makes both durable and leaves no log.
        snapshot.restore(&path);
        let storage = wrap(open_posix(&path, &OpenOptions::default()).unwrap(), &path).unwrap();
        storage.sync().await.unwrap();
        drop(storage);
        assert!(!undo_path(&path).exists());
    }

    #[tokio::test]
    async fn a_long_write_is_logged_in_bounded_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let len_bytes = 3 * RECORD_DATA_BYTES_MAX;
        let storage = open_wrapped(&path, len_bytes, false);
        let mut model = Model::new(len_bytes as usize);
        let old = pattern(1, len_bytes as usize);
        storage
            .write_at(0, vec![shared(&old)], false)
            .await
            .unwrap();
        storage.sync().await.unwrap();
        model.write(0, old, false);
        model.sync();
        // 2.5 MiB at an odd sector, and a zeroing across most of the file.
        let offset = 3 * SECTOR_BYTES;
        let new = pattern(2, (5 * RECORD_DATA_BYTES_MAX / 2) as usize);
        storage
            .write_at(offset, vec![shared(&new)], false)
            .await
            .unwrap();
        model.write(offset, new, false);
        storage
            .zero_range(SECTOR_BYTES, len_bytes - 2 * SECTOR_BYTES, false)
            .await
            .unwrap();
        model.write(
            SECTOR_BYTES,
            vec![0; (len_bytes - 2 * SECTOR_BYTES) as usize],
            false,
        );
        drop(storage);
        let log = fs::read(undo_path(&path)).unwrap();
        let records = parse_records(&log, &path).unwrap().records;
        assert_eq!(records.len(), 6, "three records per write");
        assert!(records
            .iter()
            .all(|r| r.record_bytes <= RECORD_HEADER_BYTES + RECORD_DATA_BYTES_MAX));
        let report = revert(
            &path,
            seed_from_env("a_long_write_is_logged_in_bounded_records"),
        )
        .unwrap();
        assert_eq!(report.writes_logged, 2);
        model.check(&fs::read(&path).unwrap(), "long writes");
    }

    #[test]
    fn the_switch_is_1_or_0() {
        assert!(!parse_switch(None).unwrap());
        assert!(!parse_switch(Some("")).unwrap());
        assert!(!parse_switch(Some("0")).unwrap());
        assert!(parse_switch(Some("1")).unwrap());
        for bad in ["yes", "true", "2", " 1"] {
            let error = parse_switch(Some(bad)).unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
            assert!(error.to_string().contains(POWER_LOSS_ENV), "{error}");
        }
    }

    #[test]
    fn revert_dir_finds_every_log_and_needs_one_per_file() {
        let dir = tempfile::tempdir().unwrap();
        assert!(revert_dir(dir.path(), 0).unwrap().is_empty());
        let path = dir.path().join("missing");
        assert_eq!(
            revert(&path, 0).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        assert_eq!(undo_path(Path::new("/a/b.img")), Path::new("/a/b.img.undo"));
    }
}
