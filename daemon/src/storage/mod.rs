//! The backing store of journals and volumes, behind one narrow trait.
//!
//! [`Storage`] is positional, asynchronous block I/O on one file or block device: vectored
//! writes (optionally durable on completion), exact reads, `fdatasync` and zeroing. It has
//! four implementations:
//!
//! - `uring` ([`open_uring`]): one io_uring per opened file, completions reaped by a tokio task
//!   woken through an eventfd. This is the production path.
//! - `posix` ([`open_posix`]): `pwritev2`/`pread` on tokio's blocking pool; the fallback when
//!   the kernel refuses io_uring, and the reference in the differential test.
//! - [`MemStorage`]: a `Vec<u8>` behind a mutex, for unit tests.
//! - [`FaultDisk`]: a simulated disk with a page cache, failing or tearing the Nth write,
//!   failing the Nth sync, and simulating process crashes and power loss.
//!
//! With the `fault-injection` feature (tests of real processes; off in production builds),
//! two wrappers go around any of them: `power_loss` keeps an undo log beside a file so that a
//! test can take back, after killing the process, every write it had not made durable
//! ([`maybe_power_loss`], switched on by `FERRY_FAULT_POWER_LOSS=1` for every file [`open`]
//! opens), and `delay` makes writes slower ([`maybe_device_write_delay`], switched on by
//! `FERRY_FAULT_DEVICE_WRITE_DELAY_US` for volumes' backing devices). Without the feature
//! neither is compiled and no fault environment variable is read.
//!
//! Devices with logical blocks larger than 512 bytes (4Kn disks, `losetup --sector-size
//! 4096`): Ferry's I/O is 512-byte granular (the NBD minimum block size), so such a device is
//! opened buffered (the page cache does the read-modify-write of partial blocks), and
//! [`zero`] zeroes the aligned middle of a range with the kernel's help and writes the
//! unaligned head and tail as zeros. O_DIRECT is used only where the alignment it needs is
//! known (statx `STATX_DIOALIGN`, or `BLKSSZGET` for block devices) and met by every I/O the
//! caller issues; see [`open_for_io`].
//!
//! Invariants shared by every implementation:
//! - The size is fixed when the storage is opened. Writing or zeroing past it is an
//!   `InvalidInput` error and reading past it an `UnexpectedEof` error, both raised before any
//!   I/O is submitted.
//! - A failed I/O is returned to the caller; nothing is retried behind its back except short
//!   transfers, whose remainder is resubmitted, and io_uring completions that report EAGAIN
//!   (the request did not run), resubmitted a bounded number of times.
//! - Buffers handed to the kernel stay owned by the backend until the kernel is done with
//!   them, even if the caller's future is dropped first.

mod buf;
#[cfg(feature = "fault-injection")]
pub mod delay;
mod fault;
mod file;
mod mem;
mod posix;
#[cfg(feature = "fault-injection")]
pub mod power_loss;
#[cfg(test)]
mod tests;
mod uring;

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

pub use buf::{align_up, AlignedBuf, SharedBuf, DIRECT_ALIGN, MEMORY_ALIGN};
pub use fault::FaultDisk;
pub use mem::MemStorage;

/// The future returned by every [`Storage`] operation.
pub type IoFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Positional asynchronous I/O on one file or block device.
pub trait Storage: Send + Sync + 'static {
    /// Size in bytes of the file or device.
    fn len_bytes(&self) -> u64;
    /// Writes the concatenation of `bufs` at `offset` (one vectored write; loop on short writes).
    /// With `dsync` the data is durable when this completes (RWF_DSYNC / O_DSYNC semantics).
    fn write_at(
        &self,
        offset: u64,
        bufs: Vec<SharedBuf>,
        dsync: bool,
    ) -> IoFuture<'_, io::Result<()>>;
    /// Fills `buf` completely from `offset`; reading past the end is an UnexpectedEof error.
    fn read_at(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, (io::Result<()>, AlignedBuf)>;
    /// fdatasync: everything written before this call is durable when it completes.
    fn sync(&self) -> IoFuture<'_, io::Result<()>>;
    /// Makes [offset, offset+len) read back as zeros. `punch`: deallocation is welcome (TRIM,
    /// WRITE_ZEROES without NO_HOLE); otherwise keep the blocks allocated (FALLOC_FL_ZERO_RANGE
    /// or writing zeros). Block devices: BLKZEROOUT/BLKDISCARD-with-zeroing or fallocate; fall
    /// back to writing zeros when the kernel says EOPNOTSUPP. Like the kernel's calls on a
    /// block device, this may refuse a range not aligned to
    /// [`logical_block_bytes`](Self::logical_block_bytes) with EINVAL (files take any range);
    /// [`zero`] takes any 512-byte aligned range on any storage.
    fn zero_range(&self, offset: u64, len: u64, punch: bool) -> IoFuture<'_, io::Result<()>>;
    /// The granularity [`zero_range`](Self::zero_range) needs: a block device's logical block
    /// size (BLKSSZGET), [`SECTOR_BYTES`] for files and simulated disks. Reads and writes take
    /// any 512-byte aligned range whatever this is (the storage is opened buffered when they
    /// could not).
    fn logical_block_bytes(&self) -> u64;
}

/// The unit of every I/O Ferry issues on a volume's device: NBD's minimum block size.
pub const SECTOR_BYTES: u64 = 512;

/// Makes `[offset, offset + len)` read back as zeros on any storage, whatever its logical
/// block size: the part aligned to [`Storage::logical_block_bytes`] through
/// [`Storage::zero_range`] (fast, may deallocate), the unaligned head and tail as written
/// zeros. Those edges exist only on storage with blocks larger than 512 bytes, which is opened
/// buffered ([`open_for_io`]), so the page cache turns the 512-byte writes into
/// read-modify-writes of the device's blocks. Without this, the kernel refuses a sub-block
/// zeroing of a block device with EINVAL.
pub async fn zero(storage: &dyn Storage, offset: u64, len: u64, punch: bool) -> io::Result<()> {
    let (head, middle, tail) = split_at_blocks(offset, len, storage.logical_block_bytes());
    for (at, edge_bytes) in [head, tail] {
        if edge_bytes > 0 {
            write_zeros(storage, at, edge_bytes).await?;
        }
    }
    match middle {
        (at, middle_bytes) if middle_bytes > 0 => storage.zero_range(at, middle_bytes, punch).await,
        _ => Ok(()),
    }
}

/// Splits `[offset, offset + len)` into a head before the first boundary of `block_bytes`, a
/// middle of whole blocks, and a tail after the last boundary: three (offset, length) pairs,
/// each possibly empty, together exactly the range. A range without a whole block is all
/// head.
fn split_at_blocks(
    offset: u64,
    len: u64,
    block_bytes: u64,
) -> ((u64, u64), (u64, u64), (u64, u64)) {
    let block_bytes = block_bytes.max(1);
    // Callers range-check first, so `offset + len` does not overflow; saturating keeps a
    // wrong call from panicking (the storage refuses the range afterwards).
    let end = offset.saturating_add(len);
    let middle_start = offset.div_ceil(block_bytes).saturating_mul(block_bytes);
    let middle_end = end / block_bytes * block_bytes;
    if middle_start >= middle_end {
        return ((offset, len), (end, 0), (end, 0));
    }
    (
        (offset, middle_start - offset),
        (middle_start, middle_end - middle_start),
        (middle_end, end - middle_end),
    )
}

/// How [`open`], [`open_uring`] and [`open_posix`] open a path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OpenOptions {
    /// Ask for O_DIRECT (bypass the page cache). Granted only where the file's direct-I/O
    /// alignment is known and met ([`open_for_io`]); buffered otherwise, with one warning per
    /// process where the filesystem refuses it outright.
    pub direct: bool,
    /// Create a missing regular file with this size, its blocks reserved with fallocate where
    /// the filesystem can (so that applying writes later does not fail with ENOSPC), and its
    /// directory fsynced. `None`: a missing file is an error. An existing file is opened as
    /// it is, whatever its size.
    pub create_len_bytes: Option<u64>,
}

/// Opens a regular file (created with `create_len_bytes` if missing; error if missing and None)
/// or a block device, with io_uring. Must be called inside a tokio runtime: the task reaping
/// completions is spawned on it. With `direct`, the caller's I/O is taken to be 512-byte
/// aligned (see [`open_for_io`]).
pub fn open_uring(path: &Path, opts: &OpenOptions) -> io::Result<Arc<dyn Storage>> {
    let opened = file::open_file(path, opts, SECTOR_BYTES)?;
    let ring = uring::new_ring()?;
    Ok(Arc::new(uring::UringStorage::new(opened, ring)?))
}

/// Opens like [`open_uring`], but does I/O with pread/pwrite on tokio's blocking pool.
pub fn open_posix(path: &Path, opts: &OpenOptions) -> io::Result<Arc<dyn Storage>> {
    let opened = file::open_file(path, opts, SECTOR_BYTES)?;
    Ok(Arc::new(posix::PosixStorage::new(opened)))
}

/// [`open_for_io`] for callers whose I/O is 512-byte aligned (the NBD minimum), the smallest
/// alignment Ferry issues.
pub fn open(path: &Path, opts: &OpenOptions) -> io::Result<Arc<dyn Storage>> {
    open_for_io(path, opts, SECTOR_BYTES)
}

/// io_uring, falling back to posix with a warning when the kernel refuses io_uring
/// (ENOSYS: not built in or disabled; EPERM: forbidden by sysctl or seccomp) or lacks an
/// operation the backend uses (probed at open). Goes through [`maybe_power_loss`].
///
/// `io_align_bytes` is the alignment of every offset and length the caller will use (512 for
/// a volume's device, 4096 for a journal). `opts.direct` asks for O_DIRECT, which is granted
/// only when the file's direct-I/O alignment is known and `io_align_bytes` and Ferry's
/// buffers ([`MEMORY_ALIGN`]) meet it; otherwise the file is opened buffered, so that an I/O
/// the device cannot take directly never fails with EINVAL.
pub fn open_for_io(
    path: &Path,
    opts: &OpenOptions,
    io_align_bytes: u64,
) -> io::Result<Arc<dyn Storage>> {
    let opened = file::open_file(path, opts, io_align_bytes)?;
    let storage: Arc<dyn Storage> = match uring::new_ring() {
        Ok(ring) => match uring::missing_features(&ring) {
            None => Arc::new(uring::UringStorage::new(opened, ring)?),
            Some(missing) => {
                tracing::warn!(path = %path.display(), %missing, "io_uring too old for Ferry, using pread/pwrite");
                Arc::new(posix::PosixStorage::new(opened))
            }
        },
        Err(error) if matches!(error.raw_os_error(), Some(libc::ENOSYS) | Some(libc::EPERM)) => {
            tracing::warn!(path = %path.display(), %error, "io_uring unavailable, using pread/pwrite");
            Arc::new(posix::PosixStorage::new(opened))
        }
        Err(error) => return Err(error),
    };
    maybe_power_loss(storage, path)
}

/// `inner`, the storage of the file at `path`, behind an undo log (`power_loss::wrap`) when
/// built with the `fault-injection` feature and run with `FERRY_FAULT_POWER_LOSS=1`; `inner`
/// itself otherwise. Files Ferry opens by other means than [`open`] call this to be covered
/// by power-loss tests too. Without the feature it reads no environment variable.
pub fn maybe_power_loss(inner: Arc<dyn Storage>, path: &Path) -> io::Result<Arc<dyn Storage>> {
    #[cfg(feature = "fault-injection")]
    {
        if power_loss::enabled_by_env()? {
            return power_loss::wrap(inner, path);
        }
    }
    #[cfg(not(feature = "fault-injection"))]
    let _ = path;
    Ok(inner)
}

/// `device`, a volume's backing device, with every write delayed by
/// `FERRY_FAULT_DEVICE_WRITE_DELAY_US` microseconds when built with the `fault-injection`
/// feature and the variable is set; `device` itself otherwise. Without the feature it reads no
/// environment variable.
pub fn maybe_device_write_delay(device: Arc<dyn Storage>) -> io::Result<Arc<dyn Storage>> {
    #[cfg(feature = "fault-injection")]
    {
        if let Some(delay) = delay::device_write_delay_from_env()? {
            return Ok(delay::with_write_delay(device, delay));
        }
    }
    Ok(device)
}

/// Checks that a write or zeroing of `len` bytes at `offset` stays inside `len_bytes`.
fn check_write_range(len_bytes: u64, offset: u64, len: u64) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= len_bytes => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("write of {len} bytes at offset {offset} passes the end of the storage ({len_bytes} bytes)"),
        )),
    }
}

/// Checks that a read of `len` bytes at `offset` stays inside `len_bytes`.
fn check_read_range(len_bytes: u64, offset: u64, len: u64) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= len_bytes => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("read of {len} bytes at offset {offset} passes the end of the storage ({len_bytes} bytes)"),
        )),
    }
}

/// Total length of a vectored write. Checked: the same allocation may be passed many times,
/// so the sum is not bounded by memory.
fn total_len_bytes(bufs: &[SharedBuf]) -> io::Result<u64> {
    bufs.iter()
        .try_fold(0u64, |sum, buf| sum.checked_add(buf.len() as u64))
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "vectored write length overflows u64",
            )
        })
}

/// Bytes of zeros written per request when zeroing falls back to plain writes.
const ZERO_CHUNK_BYTES: usize = 1 << 20;

/// Zeroes `[offset, offset + len)` with ordinary writes, for when the kernel cannot zero or
/// deallocate the range itself (EOPNOTSUPP). One shared, aligned chunk of zeros serves every
/// request, so this works under O_DIRECT as long as the range is aligned.
async fn write_zeros(storage: &dyn Storage, offset: u64, len: u64) -> io::Result<()> {
    static ZEROS: OnceLock<SharedBuf> = OnceLock::new();
    let zeros = ZEROS.get_or_init(|| AlignedBuf::zeroed(ZERO_CHUNK_BYTES).freeze());
    let mut done_bytes = 0u64;
    while done_bytes < len {
        // The chunk fits in usize: it is at most ZERO_CHUNK_BYTES.
        let chunk_bytes = crate::usize_from((len - done_bytes).min(ZERO_CHUNK_BYTES as u64));
        storage
            .write_at(
                offset + done_bytes,
                vec![zeros.slice(0..chunk_bytes)],
                false,
            )
            .await?;
        done_bytes += chunk_bytes as u64;
    }
    Ok(())
}

/// Whether an error from fallocate/ioctl means "this file or device cannot do that" rather
/// than a real failure, so that zeroing should fall back to writing zeros.
fn is_unsupported(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::ENOSYS)
    )
}

/// Waits for the first of `in_flight` (I/Os issued together) to complete, takes it out and
/// returns its output. `in_flight` must not be empty.
pub async fn first_done<F: Future + Unpin>(in_flight: &mut Vec<F>) -> F::Output {
    std::future::poll_fn(|cx| {
        for i in 0..in_flight.len() {
            if let std::task::Poll::Ready(output) = std::pin::Pin::new(&mut in_flight[i]).poll(cx) {
                in_flight.swap_remove(i);
                return std::task::Poll::Ready(output);
            }
        }
        std::task::Poll::Pending
    })
    .await
}
