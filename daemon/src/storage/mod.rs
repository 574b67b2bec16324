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
//! Invariants shared by every implementation:
//! - The size is fixed when the storage is opened. Writing or zeroing past it is an
//!   `InvalidInput` error and reading past it an `UnexpectedEof` error, both raised before any
//!   I/O is submitted.
//! - A failed I/O is returned to the caller; nothing is retried behind its back except short
//!   transfers, whose remainder is resubmitted.
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
    /// back to writing zeros when the kernel says EOPNOTSUPP.
    fn zero_range(&self, offset: u64, len: u64, punch: bool) -> IoFuture<'_, io::Result<()>>;
}

/// How [`open`], [`open_uring`] and [`open_posix`] open a path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OpenOptions {
    /// Ask for O_DIRECT (bypass the page cache). Falls back to buffered I/O, with one warning
    /// per process, where the filesystem refuses it.
    pub direct: bool,
    /// Create a missing regular file with this size (sparse). `None`: a missing file is an
    /// error. An existing file is opened as it is, whatever its size.
    pub create_len_bytes: Option<u64>,
}

/// Opens a regular file (created with `create_len_bytes` if missing; error if missing and None)
/// or a block device, with io_uring. Must be called inside a tokio runtime: the task reaping
/// completions is spawned on it.
pub fn open_uring(path: &Path, opts: &OpenOptions) -> io::Result<Arc<dyn Storage>> {
    let opened = file::open_file(path, opts)?;
    let ring = uring::new_ring()?;
    Ok(Arc::new(uring::UringStorage::new(opened, ring)?))
}

/// Opens like [`open_uring`], but does I/O with pread/pwrite on tokio's blocking pool.
pub fn open_posix(path: &Path, opts: &OpenOptions) -> io::Result<Arc<dyn Storage>> {
    let opened = file::open_file(path, opts)?;
    Ok(Arc::new(posix::PosixStorage::new(opened)))
}

/// io_uring, falling back to posix with a warning when the kernel refuses io_uring
/// (ENOSYS: not built in or disabled; EPERM: forbidden by sysctl or seccomp). Goes through
/// [`maybe_power_loss`].
pub fn open(path: &Path, opts: &OpenOptions) -> io::Result<Arc<dyn Storage>> {
    let opened = file::open_file(path, opts)?;
    let storage: Arc<dyn Storage> = match uring::new_ring() {
        Ok(ring) => Arc::new(uring::UringStorage::new(opened, ring)?),
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
