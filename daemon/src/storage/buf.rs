//! Buffers that can be handed to O_DIRECT I/O.
//!
//! O_DIRECT needs the memory address and the length of every I/O to be aligned to the
//! device's logical block size. `Vec<u8>` gives no alignment guarantee, so this module
//! allocates with an explicit `Layout`. A write payload is read from the client's socket
//! straight into an `AlignedBuf`, frozen into a `SharedBuf`, and the same memory then serves
//! the journal write (as one iovec), the in-memory index (reads of unapplied data) and the
//! background apply, without another copy.

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut, Range};
use std::ptr::NonNull;
use std::sync::Arc;

/// Lengths of O_DIRECT I/O are padded to this: the largest logical block size Ferry expects
/// (4 KiB devices).
pub const DIRECT_ALIGN: usize = 4096;

/// Alignment of the memory itself. O_DIRECT needs the buffer address aligned to the device's
/// DMA alignment (`stx_dio_mem_align`), 512 bytes or less on the devices Ferry runs on; asking
/// the allocator for 4096 would make glibc spend a whole extra page on every 4 KiB payload.
pub const MEMORY_ALIGN: usize = 512;

/// Rounds `len` up to a multiple of [`DIRECT_ALIGN`].
pub const fn align_up(len: usize) -> usize {
    len.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN
}

/// An allocation for `len` bytes, rounded up to [`DIRECT_ALIGN`]: its address and capacity.
fn allocate(len: usize, zeroed: bool) -> (NonNull<u8>, usize) {
    let capacity = align_up(len.max(1));
    let layout =
        Layout::from_size_align(capacity, MEMORY_ALIGN).expect("buffer size overflows isize");
    // SAFETY: layout has a non-zero size.
    let raw = unsafe {
        if zeroed {
            alloc::alloc_zeroed(layout)
        } else {
            alloc::alloc(layout)
        }
    };
    let Some(ptr) = NonNull::new(raw) else {
        alloc::handle_alloc_error(layout)
    };
    (ptr, capacity)
}

/// An owned, [`MEMORY_ALIGN`]-aligned byte buffer whose allocation is a multiple of
/// [`DIRECT_ALIGN`]. Every byte of the allocation is initialised, and those past `len` are zero
/// (a record padded to the block size never carries stale data).
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    capacity: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out &[u8].
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A buffer of `len` zero bytes; the allocation is rounded up to [`DIRECT_ALIGN`].
    pub fn zeroed(len: usize) -> AlignedBuf {
        let (ptr, capacity) = allocate(len, true);
        AlignedBuf { ptr, len, capacity }
    }

    /// An allocation for `len` bytes whose first `len` bytes the caller must initialise
    /// before it sets `len`; the tail past `len` is zeroed here. Until then the buffer breaks
    /// the type's invariant (every byte initialised, zero past `len`) in [0, len), which is why
    /// this is private: its `len` is 0, so nothing can read that part through it, and dropping
    /// it early only frees the memory.
    ///
    /// This is what `zeroed` would be without its memset: with a 512-byte alignment the
    /// allocator cannot hand out pre-zeroed memory, so `alloc_zeroed` writes every byte, and a
    /// payload about to be overwritten whole (read from a socket, copied from a frame) paid
    /// for that twice (6-9 % of each node's CPU under 1 MiB metro writes).
    fn uninit_for(len: usize) -> AlignedBuf {
        let (ptr, capacity) = allocate(len, false);
        // SAFETY: [len, capacity) lies inside the allocation.
        unsafe { std::ptr::write_bytes(ptr.as_ptr().add(len), 0, capacity - len) };
        AlignedBuf {
            ptr,
            len: 0,
            capacity,
        }
    }

    /// A buffer holding a copy of `data`.
    pub fn copy_from(data: &[u8]) -> AlignedBuf {
        let mut buf = AlignedBuf::uninit_for(data.len());
        // SAFETY: the allocation holds at least `data.len()` bytes and cannot overlap `data`.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), buf.ptr.as_ptr(), data.len());
        }
        buf.len = data.len();
        buf
    }

    /// Reads exactly `len` bytes from `reader` into a new buffer, without zeroing them first.
    /// End of stream before `len` bytes is `UnexpectedEof`, as `read_exact` reports it.
    pub(crate) async fn read_exact_from<R>(
        reader: &mut R,
        len: usize,
    ) -> std::io::Result<AlignedBuf>
    where
        R: tokio::io::AsyncRead + Unpin,
    {
        let mut buf = AlignedBuf::uninit_for(len);
        // SAFETY: [0, len) lies inside the allocation, and MaybeUninit<u8> has u8's layout;
        // ReadBuf only ever writes into the unfilled part and reports what it initialised.
        let target: &mut [std::mem::MaybeUninit<u8>] = unsafe {
            std::slice::from_raw_parts_mut(
                buf.ptr.as_ptr().cast::<std::mem::MaybeUninit<u8>>(),
                len,
            )
        };
        let mut read_buf = tokio::io::ReadBuf::uninit(target);
        while read_buf.remaining() > 0 {
            let before = read_buf.filled().len();
            std::future::poll_fn(|cx| {
                std::pin::Pin::new(&mut *reader).poll_read(cx, &mut read_buf)
            })
            .await?;
            // A reader may swap in a ReadBuf of its own (safe code can); what it filled then
            // is not this allocation. Tokio's `read_buf` makes the same check.
            assert_eq!(
                read_buf.filled().as_ptr(),
                buf.ptr.as_ptr().cast_const(),
                "the reader replaced the ReadBuf"
            );
            if read_buf.filled().len() == before {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        // Every byte of [0, len) was written by the reads above.
        buf.len = len;
        Ok(buf)
    }

    /// Bytes in use.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes allocated: `len` rounded up to [`DIRECT_ALIGN`].
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Changes the length within the allocation; new bytes are zero (the tail past `len` is
    /// kept zeroed by `set_len` shrinking it).
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.capacity, "set_len past the allocation");
        if len < self.len {
            // Keep the invariant that bytes past `len` are zero, so growing again and
            // padding a record to the block size never exposes stale data.
            // SAFETY: [len, self.len) lies inside the allocation.
            unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(len), 0, self.len - len) };
        }
        self.len = len;
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Makes the buffer shareable between the journal, the index and the applier.
    pub fn freeze(self) -> SharedBuf {
        let len = self.len;
        SharedBuf {
            buf: Arc::new(self),
            start: 0,
            len,
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.capacity, MEMORY_ALIGN)
            .expect("layout was valid at allocation");
        // SAFETY: ptr was allocated by `allocate` with this same layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) };
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for `capacity >= len` initialised bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for `capacity >= len` initialised bytes and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish()
    }
}

/// A cheap-to-clone view into a frozen [`AlignedBuf`].
#[derive(Clone)]
pub struct SharedBuf {
    buf: Arc<AlignedBuf>,
    start: usize,
    len: usize,
}

impl SharedBuf {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A sub-view; `range` is relative to this view.
    pub fn slice(&self, range: Range<usize>) -> SharedBuf {
        assert!(range.start <= range.end, "slice start after end");
        assert!(range.end <= self.len, "slice past the end of the view");
        // Views stay within the allocation: start + len <= capacity holds for every view.
        SharedBuf {
            buf: Arc::clone(&self.buf),
            start: self.start + range.start,
            len: range.end - range.start,
        }
    }

    /// This view extended with the zero bytes that follow it up to the next [`DIRECT_ALIGN`]
    /// boundary, for writing with O_DIRECT. The view must start at an aligned position (a
    /// payload, or a slice of one at a multiple of the block size); bytes past the buffer's
    /// length are zero by construction, and past the view's end inside the buffer they belong to
    /// the same payload, so the padding never carries foreign data.
    pub fn padded_view(&self) -> SharedBuf {
        assert_eq!(
            self.start % DIRECT_ALIGN,
            0,
            "padded_view needs an aligned start"
        );
        let len = align_up(self.len);
        assert!(
            self.start + len <= self.buf.capacity(),
            "padding past the allocation"
        );
        SharedBuf {
            buf: Arc::clone(&self.buf),
            start: self.start,
            len,
        }
    }
}

impl From<AlignedBuf> for SharedBuf {
    fn from(buf: AlignedBuf) -> SharedBuf {
        buf.freeze()
    }
}

impl Deref for SharedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: every constructor keeps start + len within the allocation's `capacity`
        // bytes, all initialised before the buffer was frozen (zeroed at allocation, or
        // written up to `len` with the tail zeroed), and the allocation is immutable once frozen.
        unsafe { std::slice::from_raw_parts(self.buf.as_ptr().add(self.start), self.len) }
    }
}

impl fmt::Debug for SharedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedBuf")
            .field("start", &self.start)
            .field("len", &self.len)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        let buf = AlignedBuf::zeroed(5000);
        assert_eq!(buf.as_ptr() as usize % MEMORY_ALIGN, 0);
        assert_eq!(buf.capacity(), 8192);
        assert!(buf.iter().all(|&b| b == 0));
    }

    #[test]
    fn shared_slices_and_padding() {
        let mut buf = AlignedBuf::zeroed(10);
        buf.copy_from_slice(b"0123456789");
        let shared = buf.freeze();
        assert_eq!(&*shared.slice(2..5), b"234");
        assert_eq!(&*shared.slice(2..5).slice(1..2), b"3");
        assert_eq!(shared.padded_view().len(), 4096);
        assert!(shared.padded_view()[10..].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_copy_holds_the_data_and_a_zero_tail() {
        for len in [0, 1, 511, 4096, 5000] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8 + 1).collect();
            let buf = AlignedBuf::copy_from(&data);
            assert_eq!(&*buf, &data[..]);
            assert_eq!(buf.as_ptr() as usize % MEMORY_ALIGN, 0);
            let shared = buf.freeze();
            if len > 0 {
                assert!(shared.padded_view()[len..].iter().all(|&b| b == 0));
            }
        }
    }

    #[tokio::test]
    async fn reading_fills_the_buffer_exactly_and_zeroes_the_tail() {
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 253) as u8 + 1).collect();
        // A reader that hands out a few bytes at a time, as a socket may.
        let (mut tx, mut rx) = tokio::io::duplex(7);
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            tx.write_all(&sent).await.unwrap();
            tx.write_all(b"next").await.unwrap();
        });
        let buf = AlignedBuf::read_exact_from(&mut rx, 5000).await.unwrap();
        assert_eq!(&*buf, &data[..]);
        assert!(buf.freeze().padded_view()[5000..].iter().all(|&b| b == 0));
        // What follows the payload is left for the next read.
        let mut next = [0u8; 4];
        tokio::io::AsyncReadExt::read_exact(&mut rx, &mut next)
            .await
            .unwrap();
        assert_eq!(&next, b"next");
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn a_stream_ending_early_is_unexpected_eof() {
        let (mut tx, mut rx) = tokio::io::duplex(4096);
        {
            use tokio::io::AsyncWriteExt;
            tx.write_all(&[1u8; 100]).await.unwrap();
        }
        drop(tx);
        let error = AlignedBuf::read_exact_from(&mut rx, 4096)
            .await
            .unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn shrinking_zeroes_the_tail() {
        let mut buf = AlignedBuf::copy_from(&[7u8; 100]);
        buf.set_len(10);
        buf.set_len(100);
        assert!(buf[10..].iter().all(|&b| b == 0));
    }
}
