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
    /// Whether O_DIRECT is in effect (asked for, its alignment known and met, and accepted by
    /// the filesystem).
    pub direct: bool,
    /// What fallocate and BLKZEROOUT need offsets and lengths aligned to: the logical block
    /// size of a block device, [`super::SECTOR_BYTES`] for a regular file (whose filesystem
    /// zeroes partial blocks itself).
    pub logical_block_bytes: u64,
}

/// Set once the first O_DIRECT refusal has been logged, so a test suite or a daemon with many
/// volumes on tmpfs warns once rather than once per file.
static DIRECT_REFUSED_WARNED: AtomicBool = AtomicBool::new(false);

/// What the kernel says direct I/O on a file needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum DioAlignment {
    /// Offsets and lengths must be multiples of `offset_bytes`, buffer addresses of
    /// `memory_bytes`.
    Known {
        offset_bytes: u64,
        memory_bytes: u64,
    },
    /// The file cannot do direct I/O at all (statx reports an alignment of 0).
    Unsupported,
    /// The kernel does not say (Linux < 6.1, or a filesystem without STATX_DIOALIGN).
    Unknown,
}

/// Whether to open with O_DIRECT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum DirectDecision {
    Direct,
    Buffered,
    /// Try O_DIRECT and check it with one read at Ferry's real alignment ([`probe_direct`]).
    Probe,
}

/// Decides O_DIRECT from what the kernel says it needs and what the caller's I/O guarantees
/// (`io_align_bytes`, its offsets and lengths) with Ferry's buffers ([`super::MEMORY_ALIGN`]).
/// An unknown alignment counts as "not met" for a volume's device, whose reads and writes may
/// be 512-byte granular; a journal (4 KiB I/O) on a filesystem that does not say is probed.
pub(super) fn direct_decision(alignment: DioAlignment, io_align_bytes: u64) -> DirectDecision {
    let memory_align = super::MEMORY_ALIGN as u64;
    match alignment {
        DioAlignment::Known {
            offset_bytes,
            memory_bytes,
        } if offset_bytes > 0
            && io_align_bytes.is_multiple_of(offset_bytes)
            && memory_bytes <= memory_align =>
        {
            DirectDecision::Direct
        }
        DioAlignment::Known { .. } | DioAlignment::Unsupported => DirectDecision::Buffered,
        DioAlignment::Unknown if io_align_bytes >= super::DIRECT_ALIGN as u64 => {
            DirectDecision::Probe
        }
        DioAlignment::Unknown => DirectDecision::Buffered,
    }
}

/// The direct-I/O alignment of an open file. Block devices on kernels without
/// STATX_DIOALIGN: their logical block size, which before Linux 6.0 bound buffer addresses
/// too.
fn dio_alignment(file: &File, is_block_device: bool, logical_block_bytes: u64) -> DioAlignment {
    // SAFETY: statx is a plain C struct of integers, for which all-zero bytes are valid.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a NUL-terminated empty string, AT_EMPTY_PATH makes statx look at the
    // descriptor we own, and `stx` is a struct we own for the call.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 {
        if stx.stx_dio_offset_align == 0 {
            return DioAlignment::Unsupported;
        }
        return DioAlignment::Known {
            offset_bytes: u64::from(stx.stx_dio_offset_align),
            memory_bytes: u64::from(stx.stx_dio_mem_align),
        };
    }
    if is_block_device {
        return DioAlignment::Known {
            offset_bytes: logical_block_bytes,
            memory_bytes: logical_block_bytes,
        };
    }
    DioAlignment::Unknown
}

/// Bytes [`probe_direct`] reads.
const PROBE_BYTES: usize = 4096;

/// Checks O_DIRECT on a file whose alignment the kernel does not report, with the buffers
/// Ferry uses: one 4 KiB read at offset 0 into memory aligned to [`super::MEMORY_ALIGN`] and
/// to nothing larger. The first block must be allocated (a journal's superblock is), since
/// some filesystems skip the alignment check over holes. False on any error.
fn probe_direct(file: &File) -> bool {
    use std::alloc::{alloc_zeroed, dealloc, Layout};
    let Ok(layout) =
        Layout::from_size_align(PROBE_BYTES + super::DIRECT_ALIGN, super::DIRECT_ALIGN)
    else {
        return false;
    };
    // SAFETY: the layout has a non-zero size.
    let base = unsafe { alloc_zeroed(layout) };
    if base.is_null() {
        return false;
    }
    // SAFETY: MEMORY_ALIGN + PROBE_BYTES <= the allocation's size, so the buffer stays inside
    // it; it is aligned to MEMORY_ALIGN and, the base being aligned to DIRECT_ALIGN, to no
    // larger power of two.
    let buffer = unsafe { base.add(super::MEMORY_ALIGN) };
    // SAFETY: pread writes at most PROBE_BYTES bytes into the buffer, which has them.
    let read = unsafe { libc::pread(file.as_raw_fd(), buffer.cast(), PROBE_BYTES, 0) };
    // SAFETY: `base` was allocated above with this layout.
    unsafe { dealloc(base, layout) };
    read >= 0
}

/// Sets or clears O_DIRECT on an open descriptor.
fn set_direct(file: &File, direct: bool) -> io::Result<()> {
    // SAFETY: plain fcntl calls on a descriptor we own; no memory is passed.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let flags = if direct {
        flags | libc::O_DIRECT
    } else {
        flags & !libc::O_DIRECT
    };
    // SAFETY: as above.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Creates the regular file `path` with `len_bytes`: its blocks reserved where the filesystem
/// can (fallocate), then the file and its directory fsynced, so that the file, its size and
/// its name survive a power loss. A filesystem that cannot preallocate leaves it sparse. Not
/// enough space is an error, and the half-made file is removed.
fn create_file(path: &Path, len_bytes: u64) -> io::Result<()> {
    let file = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
    {
        Ok(file) => file,
        // Someone else created it between our metadata() and open(): use theirs.
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(error) => return Err(error),
    };
    let prepared = file.set_len(len_bytes).and_then(|()| {
        match fallocate(&file, 0, 0, len_bytes) {
            Ok(()) => Ok(()),
            Err(error) if super::is_unsupported(&error) => {
                tracing::info!(path = %path.display(), "filesystem cannot preallocate; the file stays sparse");
                Ok(())
            }
            Err(error) => Err(error),
        }
    });
    if let Err(error) = prepared.and_then(|()| file.sync_all()) {
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(error);
    }
    crate::datadir::sync_dir(path)
}

/// Opens `path` read-write (see [`super::OpenOptions`] and [`super::open_for_io`]).
pub(super) fn open_file(
    path: &Path,
    opts: &OpenOptions,
    io_align_bytes: u64,
) -> io::Result<OpenedFile> {
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
            create_file(path, len_bytes).map_err(|e| with_path(e, "creating"))?;
        }
        Err(error) => return Err(with_path(error, "inspecting")),
    }

    // Opened buffered first: whether O_DIRECT fits is a question about the open file.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| with_path(e, "opening"))?;
    let metadata = file.metadata().map_err(|e| with_path(e, "inspecting"))?;
    let file_type = metadata.file_type();
    let (len_bytes, is_block_device, logical_block_bytes) = if file_type.is_block_device() {
        (
            block_device_len_bytes(&file).map_err(|e| with_path(e, "sizing"))?,
            true,
            block_device_logical_block_bytes(&file).map_err(|e| with_path(e, "inspecting"))?,
        )
    } else if file_type.is_file() {
        (metadata.len(), false, super::SECTOR_BYTES)
    } else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is neither a regular file nor a block device",
                path.display()
            ),
        ));
    };
    let alignment = dio_alignment(&file, is_block_device, logical_block_bytes);
    let decision = if opts.direct {
        direct_decision(alignment, io_align_bytes)
    } else {
        DirectDecision::Buffered
    };
    let direct = match decision {
        DirectDecision::Buffered => false,
        DirectDecision::Direct | DirectDecision::Probe => match set_direct(&file, true) {
            Ok(()) if decision == DirectDecision::Probe && !probe_direct(&file) => {
                set_direct(&file, false).map_err(|e| with_path(e, "opening"))?;
                false
            }
            Ok(()) => true,
            Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
                if !DIRECT_REFUSED_WARNED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(path = %path.display(), "filesystem refuses O_DIRECT, using buffered I/O");
                }
                false
            }
            Err(error) => return Err(with_path(error, "opening")),
        },
    };
    if opts.direct && !direct {
        tracing::info!(path = %path.display(), ?alignment, io_align_bytes, "direct I/O alignment unknown or not met; using buffered I/O");
    }
    Ok(OpenedFile {
        file,
        len_bytes,
        is_block_device,
        direct,
        logical_block_bytes,
    })
}

/// `BLKSSZGET`: the logical block size of a block device.
fn block_device_logical_block_bytes(file: &File) -> io::Result<u64> {
    let mut block_bytes: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points to a live local.
    let rc = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::BLKSSZGET,
            &mut block_bytes as *mut libc::c_int,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    u64::try_from(block_bytes)
        .ok()
        .filter(|bytes| bytes.is_power_of_two() && *bytes >= super::SECTOR_BYTES)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the device reports a logical block size of {block_bytes} bytes"),
            )
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
