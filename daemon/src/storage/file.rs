//! Opening files and block devices, and the blocking system calls both real backends share
//! (fallocate, the block-device ioctls, pwritev2).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use super::{OpenOptions, SharedBuf};

/// `_IOR(0x12, 114, size_t)`: size of a block device in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `_IO(0x12, 127)`: zero a byte range of a block device, keeping it allocated.
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// Most iovecs one `pwritev`/`IORING_OP_WRITEV` accepts (IOV_MAX on Linux).
pub(super) const IOVECS_PER_CALL_MAX: usize = 1024;

/// An opened file or block device with what the backends need to know about it.
#[derive(Debug)]
pub(super) struct OpenedFile {
    pub file: File,
    pub len_bytes: u64,
    pub is_block_device: bool,
    /// Whether O_DIRECT is in effect (asked for, and accepted by the filesystem).
    pub direct: bool,
}

/// Set once the first O_DIRECT refusal has been logged, so a test suite or a daemon with many
/// volumes on tmpfs warns once rather than once per file.
static DIRECT_REFUSED_WARNED: AtomicBool = AtomicBool::new(false);

/// Opens `path` read-write (see [`super::OpenOptions`]).
pub(super) fn open_file(path: &Path, opts: &OpenOptions) -> io::Result<OpenedFile> {
    // The message gains the path; the kind (NotFound, PermissionDenied...) stays matchable.
    let with_path = |error: io::Error, what: &str| {
        io::Error::new(error.kind(), format!("{what} {}: {error}", path.display()))
    };
    match std::fs::metadata(path) {
        Ok(_) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            let Some(len_bytes) = opts.create_len_bytes else {
                return Err(with_path(error, "opening"));
            };
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
            {
                // Sparse: the journal writes zeros itself where it needs allocated blocks.
                Ok(file) => file
                    .set_len(len_bytes)
                    .map_err(|e| with_path(e, "sizing"))?,
                // Someone else created it between our metadata() and open(): use theirs.
                Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
                Err(error) => return Err(with_path(error, "creating")),
            }
        }
        Err(error) => return Err(with_path(error, "inspecting")),
    }

    let open_with = |extra_flags: libc::c_int| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | extra_flags)
            .open(path)
    };
    let (file, direct) = if opts.direct {
        match open_with(libc::O_DIRECT) {
            Ok(file) => (file, true),
            Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
                if !DIRECT_REFUSED_WARNED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(path = %path.display(), "filesystem refuses O_DIRECT, using buffered I/O");
                }
                (open_with(0).map_err(|e| with_path(e, "opening"))?, false)
            }
            Err(error) => return Err(with_path(error, "opening")),
        }
    } else {
        (open_with(0).map_err(|e| with_path(e, "opening"))?, false)
    };

    let metadata = file.metadata().map_err(|e| with_path(e, "inspecting"))?;
    let file_type = metadata.file_type();
    let (len_bytes, is_block_device) = if file_type.is_block_device() {
        (
            block_device_len_bytes(&file).map_err(|e| with_path(e, "sizing"))?,
            true,
        )
    } else if file_type.is_file() {
        (metadata.len(), false)
    } else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is neither a regular file nor a block device",
                path.display()
            ),
        ));
    };
    Ok(OpenedFile {
        file,
        len_bytes,
        is_block_device,
        direct,
    })
}

fn block_device_len_bytes(file: &File) -> io::Result<u64> {
    let mut len_bytes: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to a live local.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut len_bytes as *mut u64) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(len_bytes)
}

fn to_off_t(value: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(value)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset does not fit in off_t"))
}

/// Zeroes `[offset, offset + len)` with the kernel's help (blocking). An error for which
/// [`super::is_unsupported`] holds means the caller should write zeros instead.
///
/// - Regular files: `fallocate(PUNCH_HOLE)` when `punch`, else `fallocate(ZERO_RANGE)`, both
///   with KEEP_SIZE.
/// - Block devices: `fallocate(PUNCH_HOLE)` when `punch` (the kernel turns it into
///   WRITE_ZEROES that may unmap, and guarantees zeros), falling back to `BLKZEROOUT`
///   (WRITE_ZEROES without unmap, or the kernel writes zeros itself).
pub(super) fn zero_range_blocking(
    file: &File,
    is_block_device: bool,
    offset: u64,
    len: u64,
    punch: bool,
) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let mode = libc::FALLOC_FL_KEEP_SIZE
        | if punch {
            libc::FALLOC_FL_PUNCH_HOLE
        } else {
            libc::FALLOC_FL_ZERO_RANGE
        };
    if is_block_device {
        if punch {
            match fallocate(file, mode, offset, len) {
                Err(error) if super::is_unsupported(&error) => {}
                other => return other,
            }
        }
        let range: [u64; 2] = [offset, len];
        // SAFETY: BLKZEROOUT reads two u64 (start, length) through the pointer, which points
        // to a live local array of exactly that shape.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKZEROOUT, range.as_ptr()) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    } else {
        fallocate(file, mode, offset, len)
    }
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let (offset, len) = (to_off_t(offset)?, to_off_t(len)?);
    loop {
        // SAFETY: plain system call on a file descriptor we own; no memory is passed.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) };
        if rc == 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// Writes the concatenation of `bufs` at `offset` with `pwritev2`, resubmitting the rest after
/// a short write. With `dsync`, uses RWF_DSYNC, or write + fdatasync on kernels without it.
pub(super) fn pwritev_all(
    file: &File,
    bufs: &[SharedBuf],
    offset: u64,
    dsync: bool,
) -> io::Result<()> {
    let mut flags = if dsync { libc::RWF_DSYNC } else { 0 };
    let mut sync_after = false;
    // Position: index of the first unwritten buffer and bytes already written from it.
    let (mut index, mut skip_bytes) = (0usize, 0usize);
    let mut offset = offset;
    let mut iovecs: Vec<libc::iovec> = Vec::with_capacity(bufs.len().min(IOVECS_PER_CALL_MAX));
    while index < bufs.len() {
        if bufs[index].len() == skip_bytes {
            index += 1;
            skip_bytes = 0;
            continue;
        }
        iovecs.clear();
        for (i, buf) in bufs[index..].iter().take(IOVECS_PER_CALL_MAX).enumerate() {
            let start = if i == 0 { skip_bytes } else { 0 };
            iovecs.push(libc::iovec {
                iov_base: buf[start..].as_ptr() as *mut libc::c_void,
                iov_len: buf.len() - start,
            });
        }
        let count =
            libc::c_int::try_from(iovecs.len()).expect("at most IOVECS_PER_CALL_MAX iovecs");
        // SAFETY: every iovec points into a buffer borrowed by `bufs` for this whole call, and
        // pwritev2 only reads through them. The count matches the array.
        let written = unsafe {
            libc::pwritev2(
                file.as_raw_fd(),
                iovecs.as_ptr(),
                count,
                to_off_t(offset)?,
                flags,
            )
        };
        if written < 0 {
            let error = io::Error::last_os_error();
            match error.raw_os_error() {
                Some(libc::EINTR) => continue,
                // Kernels before 4.7 reject RWF_DSYNC: write plainly and fdatasync after.
                Some(libc::EOPNOTSUPP) if flags != 0 => {
                    flags = 0;
                    sync_after = true;
                    continue;
                }
                _ => return Err(error),
            }
        }
        if written == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("pwritev2 wrote nothing at offset {offset}"),
            ));
        }
        // Non-negative and at most the iovec total, which fits in usize.
        let mut written = written.cast_unsigned();
        offset += written as u64;
        while written > 0 {
            let left = bufs[index].len() - skip_bytes;
            if written >= left {
                written -= left;
                index += 1;
                skip_bytes = 0;
            } else {
                skip_bytes += written;
                written = 0;
            }
        }
    }
    if sync_after {
        file.sync_data()?;
    }
    Ok(())
}
