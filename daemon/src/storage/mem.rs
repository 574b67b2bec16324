//! An in-memory [`Storage`] for unit tests: a `Vec<u8>` behind a mutex. Everything written is
//! immediately "durable"; for crash behaviour use [`super::FaultDisk`].

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{AlignedBuf, IoFuture, SharedBuf, Storage};

/// A fixed-size byte array behaving like a disk that never fails.
pub struct MemStorage {
    bytes: Mutex<Vec<u8>>,
}

impl MemStorage {
    /// A zero-filled storage of `len_bytes` bytes.
    pub fn new(len_bytes: u64) -> Arc<MemStorage> {
        let len = usize::try_from(len_bytes).expect("MemStorage size must fit in memory");
        Arc::new(MemStorage {
            bytes: Mutex::new(vec![0; len]),
        })
    }

    /// A copy of the current contents.
    pub fn snapshot(&self) -> Vec<u8> {
        self.lock().clone()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        // Every operation leaves the bytes consistent, so a panic elsewhere while holding the
        // lock cannot have left a half-applied write behind that matters to a test.
        self.bytes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write_now(&self, offset: u64, bufs: &[SharedBuf]) -> io::Result<()> {
        let total_bytes = super::total_len_bytes(bufs)?;
        let mut bytes = self.lock();
        super::check_write_range(bytes.len() as u64, offset, total_bytes)?;
        // In range, so the offset fits in usize.
        let mut position = crate::usize_from(offset);
        for buf in bufs {
            bytes[position..position + buf.len()].copy_from_slice(buf);
            position += buf.len();
        }
        Ok(())
    }

    fn read_now(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let bytes = self.lock();
        super::check_read_range(bytes.len() as u64, offset, buf.len() as u64)?;
        let start = crate::usize_from(offset);
        buf.copy_from_slice(&bytes[start..start + buf.len()]);
        Ok(())
    }

    fn zero_now(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut bytes = self.lock();
        super::check_write_range(bytes.len() as u64, offset, len)?;
        let start = crate::usize_from(offset);
        bytes[start..start + crate::usize_from(len)].fill(0);
        Ok(())
    }
}

impl Storage for MemStorage {
    fn len_bytes(&self) -> u64 {
        self.lock().len() as u64
    }

    fn write_at(
        &self,
        offset: u64,
        bufs: Vec<SharedBuf>,
        _dsync: bool,
    ) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async move { self.write_now(offset, &bufs) })
    }

    fn read_at(&self, offset: u64, buf: AlignedBuf) -> IoFuture<'_, (io::Result<()>, AlignedBuf)> {
        Box::pin(async move {
            let mut buf = buf;
            let result = self.read_now(offset, &mut buf);
            (result, buf)
        })
    }

    fn sync(&self) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async { Ok(()) })
    }

    fn zero_range(&self, offset: u64, len: u64, _punch: bool) -> IoFuture<'_, io::Result<()>> {
        Box::pin(async move { self.zero_now(offset, len) })
    }

    fn logical_block_bytes(&self) -> u64 {
        super::SECTOR_BYTES
    }
}
