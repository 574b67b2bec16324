//! The portable backend: positional system calls on tokio's blocking pool.
//!
//! Used when the kernel refuses io_uring, and as the reference implementation the io_uring
//! backend is compared with in the differential test. Every operation owns its buffers and
//! an `Arc` of the file inside the blocking closure, so a dropped future leaves the system
//! call running on memory it still owns.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::file::{self, OpenedFile};
use super::{AlignedBuf, IoFuture, SharedBuf, Storage};

/// Storage on one file or block device through pread/pwritev2.
pub(super) struct PosixStorage {
    file: Arc<File>,
    len_bytes: u64,
    is_block_device: bool,
    logical_block_bytes: u64,
}

impl PosixStorage {
    pub(super) fn new(opened: OpenedFile) -> PosixStorage {
        tracing::debug!(
            direct = opened.direct,
            len_bytes = opened.len_bytes,
            "opened posix storage"
        );
        PosixStorage {
            file: Arc::new(opened.file),
            len_bytes: opened.len_bytes,
            is_block_device: opened.is_block_device,
            logical_block_bytes: opened.logical_block_bytes,
        }
    }

    async fn write_all(&self, offset: u64, bufs: Vec<SharedBuf>, dsync: bool) -> io::Result<()> {
        let total_bytes = super::total_len_bytes(&bufs)?;
        super::check_write_range(self.len_bytes, offset, total_bytes)?;
        if total_bytes == 0 {
            return Ok(());
        }
        let file = Arc::clone(&self.file);
        tokio::task::spawn_blocking(move || file::pwritev_all(&file, &bufs, offset, dsync))
            .await
            .map_err(io::Error::other)?
    }

    async fn read_exact(&self, offset: u64, buf: AlignedBuf) -> (io::Result<()>, AlignedBuf) {
        if let Err(error) = super::check_read_range(self.len_bytes, offset, buf.len() as u64) {
            return (Err(error), buf);
        }
        let len = buf.len();
        let file = Arc::clone(&self.file);
        let mut buf = buf;
        // read_exact_at retries short reads and EINTR, and reports end of file as UnexpectedEof.
        let joined =
            tokio::task::spawn_blocking(move || (file.read_exact_at(&mut buf[..], offset), buf))
                .await;
        match joined {
            Ok(outcome) => outcome,
            // The closure panicked and took the buffer with it.
            Err(error) => (Err(io::Error::other(error)), AlignedBuf::zeroed(len)),
        }
    }

    async fn datasync(&self) -> io::Result<()> {
        let file = Arc::clone(&self.file);
        tokio::task::spawn_blocking(move || file.sync_data())
            .await
            .map_err(io::Error::other)?
    }

    async fn zero(&self, offset: u64, len: u64, punch: bool) -> io::Result<()> {
        super::check_write_range(self.len_bytes, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let file = Arc::clone(&self.file);
        let is_block_device = self.is_block_device;
        let result = tokio::task::spawn_blocking(move || {
            file::zero_range_blocking(&file, is_block_device, offset, len, punch)
        })
        .await
        .map_err(io::Error::other)?;
        match result {
            Err(error) if super::is_unsupported(&error) => {
                super::write_zeros(self, offset, len).await
            }
            other => other,
        }
    }
}

impl Storage for PosixStorage {
    fn len_bytes(&self) -> u64 {
        self.len_bytes
    }

    fn write_at(
        &self,
        offset: u64,
        bufs: Vec<SharedBuf>,
        dsync: bool,
    ) -> IoFuture<'_, io::Result<()>> {
        Box::pin(self.write_all(offset, bufs, dsync))
    }

    fn read_at(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, (io::Result<()>, AlignedBuf)> {
        Box::pin(self.read_exact(offset, buf))
    }

    fn sync(&self) -> IoFuture<'_, io::Result<()>> {
        Box::pin(self.datasync())
    }

    fn zero_range(&self, offset: u64, len: u64, punch: bool) -> IoFuture<'_, io::Result<()>> {
        Box::pin(self.zero(offset, len, punch))
    }

    fn logical_block_bytes(&self) -> u64 {
        self.logical_block_bytes
    }
}
