//! `VOLUME.PEER.dirty`: the file behind one peer's dirty map. The bitmap and its meaning are
//! `ferry_protocol::bitmap` and the replicator's (see "The ledger" in
//! `ferry_protocol::replication`); this module stores the pages and the map's state through
//! [`Storage`], so power-loss and torn-write tests cover it.
//!
//! # File format
//!
//! ```text
//! offset 0     header (sector 0), written once at creation:
//!                0  magic        b"FERRYDM1"
//!                8  version      u32 LE = 1
//!               12  size_bytes   u64 LE (volume size)
//!               20  chunk_bytes  u64 LE = 4096
//!               28  bit count    u64 LE = ceil(size_bytes / 4096)
//!               36  CRC-32       u32 LE (crc32fast) of bytes 0..36
//! offset 512   state slot 0 (sector 1); offset 1024: state slot 1 (sector 2):
//!                0  magic        b"FERRYDS1"
//!                8  sequence     u64 LE
//!               16  marked_through_lsn u64 LE
//!               24  flags        u8, bit 0 = resync_only
//!               28  CRC-32       u32 LE of bytes 0..28
//! up to 4096   zero
//! offset 4096  bitmap: little-endian u64 words, bit i of word w = block 64*w + i,
//!              zero-padded to a multiple of 4096 bytes
//! ```
//!
//! Files written before the state slots existed have zeros there; they load with the most
//! careful state (`resync_only`, nothing known of which records the marks stand for), which
//! only a resync clears.
//!
//! # Why torn writes are safe
//!
//! A persist writes the state (when it changed) to the slot the newest is not in and
//! fdatasyncs, then writes the changed pages and fdatasyncs. The replicator relies on nothing
//! before the whole persist returned, so what a crash can leave is: any mix, per 512-byte
//! sector, of old and new pages (each bit holds its old or new value, both well-formed), with
//! the old or the new state. A state is only ever as careful as the bits it lands with or more:
//! it goes down (marks cleared as stale) only together with the bits it describes, and when it
//! goes up (newer marks, resync-only marks) it is durable before any of those bits are.
//! A bit being set that reads back clear was not yet relied on; a bit being cleared that reads
//! back set costs one block of resync.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ferry_protocol::bitmap::{BitmapChanges, BlockBitmap, BLOCK_BYTES, PAGE_BYTES, WORDS_PER_PAGE};
use ferry_protocol::replication::MapState;

use crate::datadir;
use crate::storage::{self, AlignedBuf, OpenOptions, SharedBuf, Storage};

const MAGIC: [u8; 8] = *b"FERRYDM1";
const VERSION: u32 = 1;
/// The header block; the bitmap starts right after it.
pub const HEADER_BYTES: u64 = 4096;
const CRC_OFFSET: usize = 36;
const STATE_MAGIC: [u8; 8] = *b"FERRYDS1";
const STATE_SLOTS: [u64; 2] = [512, 1024];
const STATE_BYTES: usize = 512;
/// Largest single write or read of bitmap pages.
const IO_BATCH_BYTES: u64 = 1 << 20;

const _: () = assert!(PAGE_BYTES == 4096 && BLOCK_BYTES == 4096);
const _: () = assert!(STATE_SLOTS[1] + STATE_BYTES as u64 <= HEADER_BYTES);
const _: () = assert!(IO_BATCH_BYTES.is_multiple_of(PAGE_BYTES));

/// The open map file of one (volume, peer).
pub struct DirtyFile {
    path: PathBuf,
    storage: Arc<dyn Storage>,
    /// The newest state slot's sequence number.
    sequence: AtomicU64,
    /// The state the file holds.
    state: Mutex<MapState>,
}

impl std::fmt::Debug for DirtyFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyFile")
            .field("path", &self.path)
            .finish()
    }
}

/// What to start from when the map file does not exist yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// The peer holds everything this copy holds (this copy holds nothing yet).
    Clean,
    /// The peer may lack anything: every block marked, cleared only by a resync.
    AllDirty,
}

fn invalid(path: &Path, what: impl std::fmt::Display) -> io::Error {
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

fn file_bytes(size_bytes: u64) -> u64 {
    HEADER_BYTES + BlockBitmap::page_count(size_bytes) as u64 * PAGE_BYTES
}

impl DirtyFile {
    /// Opens the map at `path` of a volume of `size_bytes`, or creates it as `missing` says.
    /// An existing file is checked, never reset: a wrong magic, version, header CRC, size or
    /// length, or bits past the end, is an `InvalidData` error naming the path and what
    /// differs (a reset would forget what the peer lacks).
    pub async fn open(
        path: &Path,
        size_bytes: u64,
        missing: Missing,
    ) -> io::Result<(DirtyFile, BlockBitmap, MapState)> {
        match std::fs::metadata(path) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                create(path, size_bytes, missing)
                    .await
                    .map_err(|e| with_path(path, "create", e))?;
            }
            Err(e) => return Err(with_path(path, "stat", e)),
        }
        let storage = storage::open(
            path,
            &OpenOptions {
                direct: false,
                create_len_bytes: None,
            },
        )
        .map_err(|e| with_path(path, "open", e))?;
        let expected = file_bytes(size_bytes);
        if storage.len_bytes() != expected {
            return Err(invalid(
                path,
                format!(
                    "file is {} bytes, expected {expected} for a volume of {size_bytes} bytes",
                    storage.len_bytes()
                ),
            ));
        }
        let header = read(&*storage, 0, crate::usize_from(HEADER_BYTES))
            .await
            .map_err(|e| with_path(path, "read header", e))?;
        check_header(path, &header, size_bytes)?;
        let slots = STATE_SLOTS.map(|at| {
            decode_state(&header[crate::usize_from(at)..crate::usize_from(at) + STATE_BYTES])
        });
        let newest = slots
            .iter()
            .flatten()
            .max_by_key(|(sequence, _)| *sequence)
            .copied();
        let mut words = Vec::with_capacity(BlockBitmap::word_count(size_bytes));
        let mut at = HEADER_BYTES;
        while at < expected {
            let len = (expected - at).min(IO_BATCH_BYTES);
            let buf = read(&*storage, at, len as usize)
                .await
                .map_err(|e| with_path(path, "read bitmap", e))?;
            words.extend(
                buf.chunks_exact(8)
                    .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))),
            );
            at += len;
        }
        let wanted = BlockBitmap::word_count(size_bytes);
        if words[wanted..].iter().any(|w| *w != 0) {
            return Err(invalid(path, "nonzero padding after the bitmap: corrupt"));
        }
        words.truncate(wanted);
        let bitmap = BlockBitmap::from_words(size_bytes, words).map_err(|e| invalid(path, e))?;
        let (sequence, state) = match newest {
            Some(found) => found,
            // No state stored (a file of an earlier build): the most careful one.
            None if bitmap.is_clean() => (0, MapState::default()),
            None => (
                0,
                MapState {
                    marked_through_lsn: u64::MAX,
                    resync_only: true,
                },
            ),
        };
        Ok((
            DirtyFile {
                path: path.to_path_buf(),
                storage,
                sequence: AtomicU64::new(sequence),
                state: Mutex::new(state),
            },
            bitmap,
            state,
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `state` (when it changed) and then the changed pages, each made durable before
    /// the next step (see the module doc). One persist at a time per file.
    pub async fn persist(&self, changes: &BitmapChanges, state: MapState) -> io::Result<()> {
        let stored = *self.state.lock().expect("state lock");
        if stored != state {
            let sequence = self.sequence.load(Ordering::SeqCst) + 1;
            let slot = STATE_SLOTS[(sequence % 2) as usize];
            let bytes = encode_state(sequence, state);
            self.storage
                .write_at(slot, vec![AlignedBuf::copy_from(&bytes).freeze()], false)
                .await
                .map_err(|e| with_path(&self.path, "write state", e))?;
            self.storage
                .sync()
                .await
                .map_err(|e| with_path(&self.path, "fdatasync", e))?;
            self.sequence.store(sequence, Ordering::SeqCst);
            *self.state.lock().expect("state lock") = state;
        }
        if changes.pages.is_empty() {
            return Ok(());
        }
        for (first_page, bufs) in runs(changes) {
            self.storage
                .write_at(HEADER_BYTES + first_page as u64 * PAGE_BYTES, bufs, false)
                .await
                .map_err(|e| with_path(&self.path, "write pages", e))?;
        }
        self.storage
            .sync()
            .await
            .map_err(|e| with_path(&self.path, "fdatasync", e))
    }
}

impl DirtyFile {
    /// Recovery: marks the ranges of the records it replayed (the newest at `head_lsn`) and
    /// stores the map before the journal forgets them. The state is stored even when every
    /// bit was set already: a `marked_through_lsn` left below `head_lsn` in the file would let
    /// an acknowledgement of an older LSN clear marks of the replayed records after the next
    /// restart, and completed writes rely on exactly these marks (see "Completion" in
    /// `ferry_protocol::replication`).
    pub async fn mark_replayed(
        &self,
        bitmap: &mut BlockBitmap,
        state: &mut MapState,
        ranges: &[(u64, u64)],
        head_lsn: u64,
    ) -> io::Result<()> {
        let loaded = *state;
        ferry_protocol::replication::mark_replayed(bitmap, state, ranges, head_lsn);
        if bitmap.has_changes() || *state != loaded {
            self.persist(&bitmap.take_changes(), *state).await?;
        }
        Ok(())
    }
}

/// Runs of consecutive changed pages, each at most [`IO_BATCH_BYTES`], as one vectored write.
fn runs(changes: &BitmapChanges) -> Vec<(usize, Vec<SharedBuf>)> {
    let max_pages = (IO_BATCH_BYTES / PAGE_BYTES) as usize;
    let mut out: Vec<(usize, Vec<SharedBuf>)> = Vec::new();
    for (page, words) in &changes.pages {
        debug_assert_eq!(words.len(), WORDS_PER_PAGE);
        let mut bytes = Vec::with_capacity(crate::usize_from(PAGE_BYTES));
        for word in words {
            bytes.extend_from_slice(&word.to_le_bytes());
        }
        let buf = AlignedBuf::copy_from(&bytes).freeze();
        match out.last_mut() {
            Some((first, bufs)) if *first + bufs.len() == *page && bufs.len() < max_pages => {
                bufs.push(buf)
            }
            _ => out.push((*page, vec![buf])),
        }
    }
    out
}

async fn read(storage: &dyn Storage, offset: u64, len: usize) -> io::Result<AlignedBuf> {
    let (result, buf) = storage.read_at(offset, AlignedBuf::zeroed(len)).await;
    result.map(|()| buf)
}

async fn create(path: &Path, size_bytes: u64, missing: Missing) -> io::Result<()> {
    let mut header = encode_header(size_bytes);
    let state = match missing {
        Missing::Clean => MapState::default(),
        Missing::AllDirty => MapState {
            marked_through_lsn: 0,
            resync_only: true,
        },
    };
    let slot = crate::usize_from(STATE_SLOTS[1]);
    header[slot..slot + STATE_BYTES].copy_from_slice(&encode_state(1, state));
    let mut bitmap = BlockBitmap::new(size_bytes);
    if missing == Missing::AllDirty {
        bitmap.mark_all();
    }
    datadir::create_durably(path, |tmp| async move {
        use std::io::Write;
        let mut file = std::io::BufWriter::new(std::fs::File::create(tmp)?);
        file.write_all(&header)?;
        // Every page, zeros included, so the blocks are allocated now rather than failing
        // with ENOSPC at some later persist.
        let words = bitmap.words();
        for page in 0..BlockBitmap::page_count(size_bytes) {
            let start = page * WORDS_PER_PAGE;
            for i in start..start + WORDS_PER_PAGE {
                file.write_all(&words.get(i).copied().unwrap_or(0).to_le_bytes())?;
            }
        }
        file.flush()
    })
    .await
}

fn encode_header(size_bytes: u64) -> Vec<u8> {
    let mut h = vec![0u8; crate::usize_from(HEADER_BYTES)];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..20].copy_from_slice(&size_bytes.to_le_bytes());
    h[20..28].copy_from_slice(&BLOCK_BYTES.to_le_bytes());
    h[28..36].copy_from_slice(&size_bytes.div_ceil(BLOCK_BYTES).to_le_bytes());
    let crc = crc32fast::hash(&h[..CRC_OFFSET]);
    h[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
    h
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn check_header(path: &Path, h: &[u8], size_bytes: u64) -> io::Result<()> {
    if h[0..8] != MAGIC {
        return Err(invalid(path, "bad magic: not a Ferry dirty map"));
    }
    let version = le_u32(h, 8);
    if version != VERSION {
        return Err(invalid(
            path,
            format!("version is {version} in the file, this build reads version {VERSION}"),
        ));
    }
    let stored = le_u32(h, CRC_OFFSET);
    let crc = crc32fast::hash(&h[..CRC_OFFSET]);
    if stored != crc {
        return Err(invalid(
            path,
            format!("header CRC is {stored:#010x} in the file but the header hashes to {crc:#010x}: header corrupt"),
        ));
    }
    let chunk = le_u64(h, 20);
    if chunk != BLOCK_BYTES {
        return Err(invalid(
            path,
            format!("block size is {chunk} bytes in the file, expected {BLOCK_BYTES}"),
        ));
    }
    let file_size = le_u64(h, 12);
    if file_size != size_bytes {
        return Err(invalid(
            path,
            format!("size_bytes is {file_size} in the file but the volume is {size_bytes} bytes; not resetting it"),
        ));
    }
    let bits = le_u64(h, 28);
    if bits != size_bytes.div_ceil(BLOCK_BYTES) {
        return Err(invalid(path, format!("bit count is {bits} in the file")));
    }
    Ok(())
}

fn encode_state(sequence: u64, state: MapState) -> Vec<u8> {
    let mut s = vec![0u8; STATE_BYTES];
    s[0..8].copy_from_slice(&STATE_MAGIC);
    s[8..16].copy_from_slice(&sequence.to_le_bytes());
    s[16..24].copy_from_slice(&state.marked_through_lsn.to_le_bytes());
    s[24] = u8::from(state.resync_only);
    let crc = crc32fast::hash(&s[..28]);
    s[28..32].copy_from_slice(&crc.to_le_bytes());
    s
}

fn decode_state(s: &[u8]) -> Option<(u64, MapState)> {
    if s[0..8] != STATE_MAGIC || le_u32(s, 28) != crc32fast::hash(&s[..28]) || s[24] > 1 {
        return None;
    }
    Some((
        le_u64(s, 8),
        MapState {
            marked_through_lsn: le_u64(s, 16),
            resync_only: s[24] == 1,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u64 = (64 << 20) + 4096 * 3;

    #[tokio::test]
    async fn created_maps_load_back_and_persist_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v.b.dirty");
        let (file, mut bitmap, state) = DirtyFile::open(&path, SIZE, Missing::Clean)
            .await
            .expect("created");
        assert!(bitmap.is_clean());
        assert_eq!(state, MapState::default());
        bitmap.mark(8192, 4096);
        bitmap.mark(SIZE - 4096, 4096);
        let changes = bitmap.take_changes();
        let state = MapState {
            marked_through_lsn: 42,
            resync_only: false,
        };
        file.persist(&changes, state).await.expect("persisted");
        drop(file);
        let (_, loaded, loaded_state) = DirtyFile::open(&path, SIZE, Missing::AllDirty)
            .await
            .expect("reopened");
        assert_eq!(loaded.words(), bitmap.words());
        assert_eq!(loaded_state, state);
        assert_eq!(loaded.dirty_bytes(), 8192);
    }

    #[tokio::test]
    async fn replayed_records_store_their_lsn_even_when_their_blocks_were_marked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v.b.dirty");
        let (file, mut bitmap, _) = DirtyFile::open(&path, SIZE, Missing::Clean)
            .await
            .expect("created");
        bitmap.mark(0, 4096);
        let old = MapState {
            marked_through_lsn: 10,
            resync_only: false,
        };
        file.persist(&bitmap.take_changes(), old)
            .await
            .expect("persisted");
        drop(file);
        let (file, mut bitmap, mut state) = DirtyFile::open(&path, SIZE, Missing::Clean)
            .await
            .expect("reopened");
        // Recovery replayed LSNs up to 50, one of them on the block marked already.
        file.mark_replayed(&mut bitmap, &mut state, &[(0, 4096)], 50)
            .await
            .expect("stored");
        assert_eq!(state.marked_through_lsn, 50);
        drop(file);
        let (file, mut bitmap, mut state) = DirtyFile::open(&path, SIZE, Missing::Clean)
            .await
            .expect("reopened");
        assert_eq!(state.marked_through_lsn, 50, "the state reached the file");
        assert!(bitmap.is_marked(0));
        // Nothing replayed: nothing changes, nothing is written.
        file.mark_replayed(&mut bitmap, &mut state, &[], 60)
            .await
            .expect("nothing to store");
        assert_eq!(state.marked_through_lsn, 50);
    }

    #[tokio::test]
    async fn a_missing_map_of_a_copy_with_data_is_all_dirty_and_resync_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v.b.dirty");
        let (_, bitmap, state) = DirtyFile::open(&path, SIZE, Missing::AllDirty)
            .await
            .expect("created");
        assert_eq!(bitmap.dirty_bytes(), SIZE);
        assert!(state.resync_only);
    }

    #[tokio::test]
    async fn state_slots_alternate_and_a_torn_slot_is_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v.b.dirty");
        let (file, mut bitmap, _) = DirtyFile::open(&path, SIZE, Missing::Clean)
            .await
            .expect("created");
        let empty = bitmap.take_changes();
        for lsn in 1..=3 {
            let state = MapState {
                marked_through_lsn: lsn,
                resync_only: false,
            };
            file.persist(&empty, state).await.expect("persisted");
        }
        drop(file);
        // Tear the newest slot (sequence 4, slot 0): the one before it wins.
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[512 + 17] ^= 0xff;
        std::fs::write(&path, &bytes).expect("write");
        let (_, _, state) = DirtyFile::open(&path, SIZE, Missing::Clean)
            .await
            .expect("reopened");
        assert_eq!(state.marked_through_lsn, 2);
    }

    #[tokio::test]
    async fn a_map_without_state_slots_loads_with_the_most_careful_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v.b.dirty");
        let (file, mut bitmap, _) = DirtyFile::open(&path, SIZE, Missing::Clean)
            .await
            .expect("created");
        bitmap.mark(0, 4096);
        file.persist(&bitmap.take_changes(), MapState::default())
            .await
            .expect("persisted");
        drop(file);
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[512..1536].fill(0);
        std::fs::write(&path, &bytes).expect("write");
        let (_, _, state) = DirtyFile::open(&path, SIZE, Missing::Clean)
            .await
            .expect("reopened");
        assert!(state.resync_only);
        assert_eq!(state.marked_through_lsn, u64::MAX);
    }

    #[tokio::test]
    async fn bad_files_are_refused_not_reset() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("v.b.dirty");
        drop(
            DirtyFile::open(&path, SIZE, Missing::Clean)
                .await
                .expect("created"),
        );
        let good = std::fs::read(&path).expect("read");
        let cases: Vec<(Box<dyn Fn(&mut Vec<u8>)>, u64, &str)> = vec![
            (Box::new(|b| b[0] = b'X'), SIZE, "bad magic"),
            (Box::new(|b| b[13] ^= 1), SIZE, "header CRC"),
            (Box::new(|_| {}), SIZE + 4096, "not resetting it"),
            (
                Box::new(|b| b.truncate(b.len() - 4096)),
                SIZE,
                "bytes, expected",
            ),
            (
                Box::new(|b| {
                    let last = b.len() - 1;
                    b[last] = 1
                }),
                SIZE,
                "padding",
            ),
        ];
        for (corrupt, size, wanted) in cases {
            let mut bytes = good.clone();
            corrupt(&mut bytes);
            std::fs::write(&path, &bytes).expect("write");
            let error = DirtyFile::open(&path, size, Missing::Clean)
                .await
                .unwrap_err();
            assert!(error.to_string().contains(wanted), "{wanted}: {error}");
            assert!(error.to_string().contains("v.b.dirty"), "{error}");
            assert_eq!(std::fs::read(&path).expect("read"), bytes, "never reset");
        }
    }
}
