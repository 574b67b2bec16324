//! A simulated disk for crash tests: injected I/O errors, torn writes, process crashes and
//! power loss, each reproducible.
//!
//! # The model
//!
//! A [`FaultDisk`] is the disk plus the operating system's page cache, shared by every "boot"
//! of the process under test (it is a cheap `Clone` around an `Arc`). It holds:
//!
//! - the **synced image**: the contents as of the last successful `sync` (or power loss);
//! - the **unsynced log**: every write since then, in order, each marked whether it was a
//!   `dsync` write;
//! - the **cached image**: the synced image with the log applied, which is what reads see —
//!   like a page cache, a write is visible to readers as soon as it completes.
//!
//! Writes (`write_at` and `zero_range`, which counts as one write of zeros) update the cached
//! image and append to the log. A `dsync` write is durable when it completes: the log keeps it
//! marked, and nothing older than it can be lost where it landed (see power loss). `sync`
//! makes the cached image the synced image and clears the log.
//!
//! The process under test reaches the disk through handles from [`FaultDisk::storage`]. Each
//! handle belongs to the boot it was made in; a crash, power loss or torn write starts a new
//! boot, after which every I/O on the old handles fails with EIO (the old process is dead
//! and can do nothing more), while [`FaultDisk::storage`] hands out working handles for the
//! new boot.
//!
//! Faults, counted from the moment they are set (`n = 1` is the next one):
//!
//! - [`FaultDisk::set_fail_write`]: the n-th write returns EIO and changes nothing.
//! - [`FaultDisk::set_tear_write`]: the n-th write applies only its first `keep_bytes` bytes
//!   (to the cache, and durably if it was `dsync`), returns EIO, and the process dies there.
//! - [`FaultDisk::set_fail_sync`]: the n-th sync returns EIO and changes nothing: the writes it
//!   should have made durable stay unsynced (callers must treat a failed sync as fatal, never
//!   retry it and assume the data is safe).
//! - [`FaultDisk::set_persistent_write_error`]: every write and zeroing fails with the given
//!   errno and changes nothing, until cleared; the disk stays alive. This is a device that
//!   refuses the same request again and again (EINVAL), a full filesystem under a sparse file
//!   (ENOSPC), a read-only device (EROFS): errors that no retry or restart makes go away.
//!
//! A disk made with [`FaultDisk::with_logical_block_bytes`] behaves like a block device with
//! that logical block size opened buffered, as the kernel treats it: reads and writes must be
//! 512-byte aligned (the page cache does the rest), and `zero_range` (fallocate, BLKZEROOUT)
//! must be aligned to the logical block, or it fails with EINVAL.
//! - [`FaultDisk::crash_process`]: kill -9. The OS survives, so the cache (unsynced writes
//!   included) stays and the next boot reads it.
//! - [`FaultDisk::power_loss`]: the cache is lost. Every 512-byte sector touched by the log
//!   ends up, independently and chosen by the seeded generator, as it was after some prefix
//!   of the log's writes to it: the synced contents (no write reached the disk), or the
//!   contents after the first, second, ... or last write touching it. The prefix always
//!   includes the last `dsync` write to the sector. Sectors are atomic: never part old, part
//!   new. The result becomes the new synced image.
//!
//! [`FaultDisk::durable_image`] is the lower bound every power loss respects: the synced image
//! with the `dsync` writes of the log applied.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::{AlignedBuf, IoFuture, SharedBuf, Storage};

use super::SECTOR_BYTES;

/// A simulated disk shared between boots. See the module documentation for the model.
#[derive(Clone)]
pub struct FaultDisk {
    state: Arc<Mutex<DiskState>>,
}

/// A write since the last sync.
struct LoggedWrite {
    offset: u64,
    data: Vec<u8>,
    dsync: bool,
}

struct DiskState {
    synced: Vec<u8>,
    cached: Vec<u8>,
    unsynced: Vec<LoggedWrite>,
    /// The current boot; handles from older boots fail every I/O.
    boot: u64,
    /// Write attempts by live handles, failed ones included.
    write_count: u64,
    /// Sync attempts by live handles, failed ones included.
    sync_count: u64,
    /// `write_count` value of the write to fail.
    fail_write_at: Option<u64>,
    /// `write_count` value of the write to tear, and how many of its bytes to keep.
    tear_write_at: Option<(u64, u64)>,
    /// `sync_count` value of the sync to fail.
    fail_sync_at: Option<u64>,
    /// Every write and zeroing fails with this errno while set.
    persistent_write_errno: Option<i32>,
    /// What `zero_range` needs its range aligned to.
    logical_block_bytes: u64,
    /// Whether reads and writes must be 512-byte aligned (a simulated block device).
    sector_aligned_io: bool,
}

/// An injected failure: a bare EIO, as the kernel would report it, so code converting errors
/// to errnos at the edge sees exactly what a real disk error gives.
fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

impl DiskState {
    fn len_bytes(&self) -> u64 {
        self.cached.len() as u64
    }

    fn check_alive(&self, handle_boot: u64) -> io::Result<()> {
        if handle_boot != self.boot {
            return Err(eio());
        }
        Ok(())
    }

    /// A write of `data` at `offset` (already range-checked), with faults applied.
    fn write(&mut self, offset: u64, mut data: Vec<u8>, dsync: bool) -> io::Result<()> {
        self.write_count += 1;
        if let Some(errno) = self.persistent_write_errno {
            return Err(io::Error::from_raw_os_error(errno));
        }
        if self.fail_write_at == Some(self.write_count) {
            self.fail_write_at = None;
            return Err(eio());
        }
        if let Some((at, keep_bytes)) = self.tear_write_at {
            if at == self.write_count {
                self.tear_write_at = None;
                data.truncate(usize::try_from(keep_bytes).unwrap_or(usize::MAX));
                self.apply(offset, data, dsync);
                self.boot += 1;
                return Err(eio());
            }
        }
        self.apply(offset, data, dsync);
        Ok(())
    }

    fn apply(&mut self, offset: u64, data: Vec<u8>, dsync: bool) {
        let start = crate::usize_from(offset);
        self.cached[start..start + data.len()].copy_from_slice(&data);
        self.unsynced.push(LoggedWrite {
            offset,
            data,
            dsync,
        });
    }

    /// The synced image with the `dsync` writes of the log applied.
    fn durable_image(&self) -> Vec<u8> {
        let mut image = self.synced.clone();
        for write in self.unsynced.iter().filter(|write| write.dsync) {
            let start = crate::usize_from(write.offset);
            image[start..start + write.data.len()].copy_from_slice(&write.data);
        }
        image
    }

    /// What survives a power loss; see the module documentation.
    fn image_after_power_loss(&self, seed: u64) -> Vec<u8> {
        let mut rng = StdRng::seed_from_u64(seed);
        // Sector number -> indices into `unsynced` of the writes touching it, in order. A
        // BTreeMap so the generator is consumed in the same order on every run.
        let mut writes_by_sector: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        for (index, write) in self.unsynced.iter().enumerate() {
            if write.data.is_empty() {
                continue;
            }
            let first_sector = write.offset / SECTOR_BYTES;
            let last_sector = (write.offset + write.data.len() as u64 - 1) / SECTOR_BYTES;
            for sector in first_sector..=last_sector {
                writes_by_sector.entry(sector).or_default().push(index);
            }
        }
        let mut image = self.synced.clone();
        for (sector, writes) in writes_by_sector {
            let last_dsync = writes.iter().rposition(|&index| self.unsynced[index].dsync);
            let prefix_min = last_dsync.map_or(0, |position| position + 1);
            let prefix_len = rng.random_range(prefix_min..=writes.len());
            let sector_start = sector * SECTOR_BYTES;
            let sector_end = (sector_start + SECTOR_BYTES).min(self.len_bytes());
            for &index in &writes[..prefix_len] {
                let write = &self.unsynced[index];
                let start = write.offset.max(sector_start);
                let end = (write.offset + write.data.len() as u64).min(sector_end);
                let source =
                    crate::usize_from(start - write.offset)..crate::usize_from(end - write.offset);
                image[crate::usize_from(start)..crate::usize_from(end)]
                    .copy_from_slice(&write.data[source]);
            }
        }
        image
    }
}

impl FaultDisk {
    /// A zero-filled disk of `len_bytes` bytes, fully synced.
    pub fn new(len_bytes: u64) -> FaultDisk {
        FaultDisk::with_block(len_bytes, SECTOR_BYTES, false)
    }

    /// A zero-filled block device of `len_bytes` bytes with `logical_block_bytes` logical
    /// blocks, opened buffered (see the module documentation).
    pub fn with_logical_block_bytes(len_bytes: u64, logical_block_bytes: u64) -> FaultDisk {
        assert!(
            logical_block_bytes.is_power_of_two() && logical_block_bytes >= SECTOR_BYTES,
            "a logical block is a power of two of at least 512 bytes"
        );
        assert!(
            len_bytes.is_multiple_of(logical_block_bytes),
            "a block device holds whole logical blocks"
        );
        FaultDisk::with_block(len_bytes, logical_block_bytes, true)
    }

    fn with_block(len_bytes: u64, logical_block_bytes: u64, sector_aligned_io: bool) -> FaultDisk {
        let len = usize::try_from(len_bytes).expect("FaultDisk size must fit in memory");
        FaultDisk {
            state: Arc::new(Mutex::new(DiskState {
                synced: vec![0; len],
                cached: vec![0; len],
                unsynced: Vec::new(),
                boot: 0,
                write_count: 0,
                sync_count: 0,
                fail_write_at: None,
                tear_write_at: None,
                fail_sync_at: None,
                persistent_write_errno: None,
                logical_block_bytes,
                sector_aligned_io,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, DiskState> {
        lock_state(&self.state)
    }

    /// A handle for the current boot; it fails every I/O once the process crashes.
    pub fn storage(&self) -> Arc<dyn Storage> {
        let state = self.lock();
        Arc::new(FaultStorage {
            state: Arc::clone(&self.state),
            boot: state.boot,
            len_bytes: state.len_bytes(),
            logical_block_bytes: state.logical_block_bytes,
        })
    }

    /// Size of the disk in bytes.
    pub fn len_bytes(&self) -> u64 {
        self.lock().len_bytes()
    }

    /// The `n`-th write from now (1 = the next) returns EIO and changes nothing.
    pub fn set_fail_write(&self, n: u64) {
        assert!(n >= 1, "writes are counted from 1");
        let mut state = self.lock();
        state.fail_write_at = Some(state.write_count + n);
    }

    /// The `n`-th write from now (1 = the next) persists only its first `keep_bytes` bytes,
    /// returns EIO, and the process dies: every later I/O on existing handles fails.
    pub fn set_tear_write(&self, n: u64, keep_bytes: u64) {
        assert!(n >= 1, "writes are counted from 1");
        let mut state = self.lock();
        state.tear_write_at = Some((state.write_count + n, keep_bytes));
    }

    /// The `n`-th sync from now (1 = the next) returns EIO and makes nothing durable.
    pub fn set_fail_sync(&self, n: u64) {
        assert!(n >= 1, "syncs are counted from 1");
        let mut state = self.lock();
        state.fail_sync_at = Some(state.sync_count + n);
    }

    /// From now on every write and zeroing fails with `errno` and changes nothing, until
    /// called with `None`. Survives crashes and power losses (it is the device's state, not the
    /// process's), and [`clear_faults`](Self::clear_faults) leaves it alone.
    pub fn set_persistent_write_error(&self, errno: Option<i32>) {
        self.lock().persistent_write_errno = errno;
    }

    /// Disarms every fault set but not yet fired (the next boot should start clean).
    pub fn clear_faults(&self) {
        let mut state = self.lock();
        state.fail_write_at = None;
        state.tear_write_at = None;
        state.fail_sync_at = None;
    }

    /// The process is killed: unsynced writes stay in the (surviving) page cache; existing
    /// handles fail every I/O from now on.
    pub fn crash_process(&self) {
        self.lock().boot += 1;
    }

    /// The machine loses power: unsynced writes are lost except for a `seed`-chosen subset of
    /// whole sectors (see the module documentation); existing handles fail every I/O.
    pub fn power_loss(&self, seed: u64) {
        let mut state = self.lock();
        let image = state.image_after_power_loss(seed);
        state.cached.copy_from_slice(&image);
        state.synced = image;
        state.unsynced.clear();
        state.boot += 1;
    }

    /// What is guaranteed to survive a power loss right now.
    pub fn durable_image(&self) -> Vec<u8> {
        self.lock().durable_image()
    }

    /// Write attempts (`write_at` and `zero_range`) by live handles so far, failed ones
    /// included.
    pub fn write_count(&self) -> u64 {
        self.lock().write_count
    }

    /// Sync attempts by live handles so far, failed ones included.
    pub fn sync_count(&self) -> u64 {
        self.lock().sync_count
    }
}

fn lock_state(state: &Mutex<DiskState>) -> MutexGuard<'_, DiskState> {
    // Every method leaves the state consistent before it can panic (asserts come first).
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A handle on a [`FaultDisk`] for one boot.
struct FaultStorage {
    state: Arc<Mutex<DiskState>>,
    boot: u64,
    len_bytes: u64,
    logical_block_bytes: u64,
}

/// EINVAL unless `offset` and `len` are multiples of `block_bytes`: the kernel's answer to a
/// misaligned request.
fn check_aligned(offset: u64, len: u64, block_bytes: u64) -> io::Result<()> {
    if offset.is_multiple_of(block_bytes) && len.is_multiple_of(block_bytes) {
        return Ok(());
    }
    Err(io::Error::from_raw_os_error(libc::EINVAL))
}

impl FaultStorage {
    fn write_now(&self, offset: u64, bufs: &[SharedBuf], dsync: bool) -> io::Result<()> {
        let total_bytes = super::total_len_bytes(bufs)?;
        let mut state = lock_state(&self.state);
        state.check_alive(self.boot)?;
        super::check_write_range(self.len_bytes, offset, total_bytes)?;
        if state.sector_aligned_io {
            check_aligned(offset, total_bytes, SECTOR_BYTES)?;
        }
        let mut data = Vec::with_capacity(crate::usize_from(total_bytes));
        for buf in bufs {
            data.extend_from_slice(buf);
        }
        state.write(offset, data, dsync)
    }

    fn zero_now(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut state = lock_state(&self.state);
        state.check_alive(self.boot)?;
        super::check_write_range(self.len_bytes, offset, len)?;
        if state.sector_aligned_io {
            check_aligned(offset, len, state.logical_block_bytes)?;
        }
        state.write(offset, vec![0; crate::usize_from(len)], false)
    }

    fn read_now(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let state = lock_state(&self.state);
        state.check_alive(self.boot)?;
        super::check_read_range(self.len_bytes, offset, buf.len() as u64)?;
        if state.sector_aligned_io {
            check_aligned(offset, buf.len() as u64, SECTOR_BYTES)?;
        }
        let start = crate::usize_from(offset);
        buf.copy_from_slice(&state.cached[start..start + buf.len()]);
        Ok(())
    }

    fn sync_now(&self) -> io::Result<()> {
        let mut state = lock_state(&self.state);
        state.check_alive(self.boot)?;
        state.sync_count += 1;
        if state.fail_sync_at == Some(state.sync_count) {
            state.fail_sync_at = None;
            return Err(eio());
        }
        let cached = state.cached.clone();
        state.synced = cached;
        state.unsynced.clear();
        Ok(())
    }
}

impl Storage for FaultStorage {
    fn len_bytes(&self) -> u64 {
        self.len_bytes
    }

    fn write_at(
        &self,
        offset: u64,
        bufs: Vec<SharedBuf>,
        dsync: bool,
    ) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async move { self.write_now(offset, &bufs, dsync) })
    }

    fn read_at(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, (io::Result<()>, AlignedBuf)> {
        Box::pin(async move {
            let mut buf = buf;
            let result = self.read_now(offset, &mut buf);
            (result, buf)
        })
    }

    fn sync(&self) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async move { self.sync_now() })
    }

    fn zero_range(&self, offset: u64, len: u64, _punch: bool) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async move { self.zero_now(offset, len) })
    }

    fn logical_block_bytes(&self) -> u64 {
        self.logical_block_bytes
    }
}
