//! The io_uring backend: one ring per opened file, shared by every task using it.
//!
//! Submission: a task takes a permit from a semaphore sized to the submission queue (so a
//! full ring means *waiting* for a permit, never an error), then, under the slot-table lock,
//! stores the operation's buffers and iovec array in a free slot of the slab and pushes one
//! SQE whose `user_data` is the slot index. The `io_uring_enter` system call happens after
//! the lock is released, so tasks do not queue behind each other's system calls.
//!
//! Completion: the ring signals an eventfd; a tokio task (the reaper) waits on it through
//! [`AsyncFd`], reads the counter until it would block, and drains the completion queue after
//! every successful read. For each CQE it takes the slot, releases the permit and hands the
//! result and the buffers back through a oneshot channel — on the tokio worker that reaped
//! it, with no extra thread hop.
//!
//! Memory safety rests on one rule: **a slot owns its buffers from before its SQE is
//! published until its CQE has been reaped**. A caller dropping its future only drops the
//! oneshot receiver; the slot, and so the memory the kernel may read or write, lives on
//! until the completion arrives. Dropping the storage lets the reaper finish the in-flight
//! operations before it exits, and if the ring itself is torn down with operations in
//! flight (the runtime shut down), it first waits for their completions.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use io_uring::{opcode, squeue, types, IoUring};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{oneshot, Notify, OwnedSemaphorePermit, Semaphore};

use super::file::{self, OpenedFile, IOVECS_PER_CALL_MAX};
use super::{AlignedBuf, IoFuture, SharedBuf, Storage};

/// Submission queue entries per ring, and so the most operations in flight per file.
const QUEUE_DEPTH: u32 = 256;
/// Largest single read request; the kernel caps one transfer just under 2 GiB anyway.
const READ_BYTES_PER_OP_MAX: usize = 1 << 30;
/// Bound on retrying `io_uring_enter` after EINTR/EAGAIN/EBUSY before reporting the error.
const SUBMIT_ATTEMPTS_MAX: u32 = 1000;
/// Poll period of the fallback reaper used if the eventfd ever stops working.
const FALLBACK_POLL_INTERVAL_MS: u64 = 1;

/// Creates a ring. `SUBMIT_ALL` (Linux 5.18) keeps submitting after an SQE fails to prepare,
/// so one bad request never leaves the others queued; older kernels get a plain ring.
pub(super) fn new_ring() -> io::Result<IoUring> {
    match IoUring::builder().setup_submit_all().build(QUEUE_DEPTH) {
        Err(error) if error.raw_os_error() == Some(libc::EINVAL) => IoUring::new(QUEUE_DEPTH),
        other => other,
    }
}

/// The operations this backend submits, by name.
const OPCODES_USED: [(u8, &str); 3] = [
    (opcode::Writev::CODE, "WRITEV"),
    (opcode::Read::CODE, "READ"),
    (opcode::Fsync::CODE, "FSYNC"),
];

/// What the kernel behind `ring` lacks of what this backend needs, or `None` when it has
/// everything. A kernel can create a ring (Linux 5.1) and still not know `IORING_OP_READ`
/// (5.6): every read would then fail, so the caller falls back to pread/pwrite instead. A
/// kernel without `IORING_REGISTER_PROBE` (before 5.6) lacks `READ` as well.
pub(super) fn missing_features(ring: &IoUring) -> Option<String> {
    let mut probe = io_uring::Probe::new();
    if let Err(error) = ring.submitter().register_probe(&mut probe) {
        return Some(format!(
            "no opcode probe ({error}), so no IORING_OP_READ either"
        ));
    }
    let missing: Vec<&str> = OPCODES_USED
        .iter()
        .filter(|(code, _)| !probe.is_supported(*code))
        .map(|(_, name)| *name)
        .collect();
    (!missing.is_empty()).then(|| format!("no IORING_OP_{}", missing.join(", IORING_OP_")))
}

/// Times one operation is resubmitted after its completion reported EAGAIN before the error
/// is returned: the kernel may post EAGAIN for a request it could not queue without blocking
/// (a busy block device), which is no failure of the request.
const EAGAIN_RESUBMITS_MAX: u32 = 1000;

/// Whether an operation whose completion carried `result` should be submitted again after
/// `resubmits` earlier retries.
fn resubmit_after(result: i32, resubmits: u32) -> bool {
    result == -libc::EAGAIN && resubmits < EAGAIN_RESUBMITS_MAX
}

/// The pause before resubmitting after EAGAIN: short, growing with the retries, at most 10 ms.
fn eagain_backoff(resubmits: u32) -> Duration {
    Duration::from_micros(u64::from(resubmits.min(100)) * 100)
}

/// An iovec array pointing into the buffers stored next to it in the same slot. Only the
/// kernel reads it; Rust just keeps it alive.
struct IoVecs(#[allow(dead_code)] Box<[libc::iovec]>);

// SAFETY: the iovecs only point into the `SharedBuf`s kept beside them in `OpBuffers::Write`,
// which are Send and Sync and never mutated; moving the array between threads together with
// those buffers cannot create a data race.
unsafe impl Send for IoVecs {}

/// The memory an operation lends the kernel, owned by its slot while in flight.
enum OpBuffers {
    /// fsync: no memory.
    None,
    /// Writev: the iovec array and the buffers it points into.
    Write {
        bufs: Vec<SharedBuf>,
        #[allow(dead_code)] // Read by the kernel only.
        iovecs: IoVecs,
    },
    /// Read: the destination buffer.
    Read(AlignedBuf),
}

/// The outcome of one SQE: the raw CQE result (bytes, or a negated errno) and the buffers.
struct Completion {
    result: i32,
    buffers: OpBuffers,
}

/// One in-flight operation.
struct Slot {
    buffers: OpBuffers,
    sender: oneshot::Sender<Completion>,
    /// Returned to the semaphore when the slot is freed, i.e. when the CQE has been reaped.
    permit: OwnedSemaphorePermit,
}

/// The slab of in-flight operations, indexed by SQE `user_data`.
struct SlotTable {
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    in_flight: usize,
}

/// Everything the storage handle, its futures and the reaper share.
///
/// Field order matters for drop: `Drop for Shared` first waits for in-flight operations,
/// then the ring is closed, then the file.
struct Shared {
    ring: IoUring,
    table: Mutex<SlotTable>,
    /// One permit per submission queue entry.
    permits: Arc<Semaphore>,
    file: File,
    /// Set when the storage handle is dropped: the reaper exits once nothing is in flight.
    closing: AtomicBool,
    close_notify: Notify,
}

/// Why an operation did not produce a completion. `buffers` is `Some` when the SQE was never
/// published, so the caller gets its memory back; `None` when the kernel may still use it.
struct RunError {
    error: io::Error,
    buffers: Option<OpBuffers>,
}

impl Shared {
    fn lock_table(&self) -> MutexGuard<'_, SlotTable> {
        // A panic while holding this lock means the slab may be inconsistent with the ring;
        // carrying on could free memory the kernel still uses, so crash loudly instead.
        self.table.lock().expect("io_uring slot table poisoned")
    }

    /// Submits `entry`, whose pointers refer to memory owned by `buffers`, and waits for its
    /// completion.
    async fn run(&self, entry: squeue::Entry, buffers: OpBuffers) -> Result<Completion, RunError> {
        // The ring-full wait: at most QUEUE_DEPTH operations hold a permit, so the push below
        // always finds room and the completion queue (twice as large) never overflows.
        let permit = match Arc::clone(&self.permits).acquire_owned().await {
            Ok(permit) => permit,
            Err(_) => {
                return Err(RunError {
                    error: io::Error::other("io_uring closed"),
                    buffers: Some(buffers),
                })
            }
        };
        let (sender, receiver) = oneshot::channel();
        {
            let mut table = self.lock_table();
            let index = match table.free.pop() {
                Some(index) => index,
                None => {
                    table.slots.push(None);
                    table.slots.len() - 1
                }
            };
            // SAFETY: submission queues are only borrowed with the table lock held, so this is
            // the only `SubmissionQueue` in existence.
            let mut submission = unsafe { self.ring.submission_shared() };
            // SAFETY: every pointer in `entry` (iovec array, buffers) points to heap memory
            // owned by `buffers`. `buffers` moves into slot `index` below, before the table lock
            // is released and so before the reaper can look for this CQE, and the reaper frees
            // the slot only after the CQE arrives. Moving `buffers` does not move the heap
            // memory the pointers refer to.
            let pushed = unsafe { submission.push(&entry.user_data(index as u64)) };
            drop(submission); // Publishes the new tail to the kernel.
            if pushed.is_err() {
                // Cannot happen while permits match the queue size; report it, never hang.
                table.free.push(index);
                return Err(RunError {
                    error: io::Error::other("io_uring submission queue full despite a permit"),
                    buffers: Some(buffers),
                });
            }
            let slot = table
                .slots
                .get_mut(index)
                .expect("slot index comes from this table");
            assert!(slot.is_none(), "a free slot must be empty");
            *slot = Some(Slot {
                buffers,
                sender,
                permit,
            });
            table.in_flight += 1;
        }
        if let Err(error) = self.submit() {
            // The SQE stays in the ring and its slot keeps the buffers; the next successful
            // submit (by any task) hands it to the kernel. The caller only learns that this
            // operation's fate is unknown, which callers treat as a failed write.
            return Err(RunError {
                error,
                buffers: None,
            });
        }
        match receiver.await {
            Ok(completion) => Ok(completion),
            // The sender lives in the slot until the CQE is reaped, and `Shared` (holding the
            // slot) outlives `&self`; only a panic in the reaper can get here.
            Err(_) => Err(RunError {
                error: io::Error::other("io_uring reaper stopped"),
                buffers: None,
            }),
        }
    }

    /// `io_uring_enter` for everything queued, retrying transient refusals a bounded number
    /// of times.
    fn submit(&self) -> io::Result<()> {
        let mut attempts: u32 = 0;
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(error) => {
                    attempts += 1;
                    let transient = matches!(
                        error.raw_os_error(),
                        Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
                    );
                    if !transient || attempts >= SUBMIT_ATTEMPTS_MAX {
                        return Err(error);
                    }
                    std::thread::yield_now();
                }
            }
        }
    }

    /// Reaps every available CQE, completes their operations, and returns how many
    /// operations are still in flight. `completed` is scratch space, reused so the hot path
    /// does not allocate; senders run after the lock is released.
    fn drain(&self, completed: &mut Vec<(Slot, i32)>) -> usize {
        let in_flight = {
            let mut table = self.lock_table();
            // SAFETY: completion queues are only borrowed with the table lock held, so this is
            // the only `CompletionQueue` in existence.
            let completion_queue = unsafe { self.ring.completion_shared() };
            for cqe in completion_queue {
                let index = usize::try_from(cqe.user_data()).expect("user_data is a slot index");
                let slot = table.slots.get_mut(index).and_then(Option::take);
                let slot = slot.expect("io_uring completion for a slot with nothing in flight");
                table.free.push(index);
                table.in_flight -= 1;
                completed.push((slot, cqe.result()));
            }
            table.in_flight
        };
        for (slot, result) in completed.drain(..) {
            let Slot {
                buffers,
                sender,
                permit,
            } = slot;
            // An error means the caller dropped its future. The kernel is done with the
            // buffers now, so dropping them with the returned completion is safe.
            let _ = sender.send(Completion { result, buffers });
            drop(permit);
        }
        in_flight
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Normally the reaper has already seen every completion. If the runtime went away
        // with operations in flight, wait for them here: closing the ring does not wait for
        // the kernel to stop touching their buffers.
        let mut completed = Vec::new();
        while self.drain(&mut completed) > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    tracing::error!(%error, "io_uring wait failed at shutdown; leaking in-flight buffers");
                    let slots = std::mem::take(&mut self.lock_table().slots);
                    std::mem::forget(slots);
                    return;
                }
            }
        }
    }
}

/// Reads (and so resets) the eventfd counter. EAGAIN surfaces as `WouldBlock`.
fn read_eventfd(eventfd: &OwnedFd) -> io::Result<()> {
    let mut counter: u64 = 0;
    // SAFETY: reads exactly 8 bytes, the size eventfd requires, into a live local u64.
    let read_bytes = unsafe {
        libc::read(
            eventfd.as_raw_fd(),
            (&mut counter as *mut u64).cast::<libc::c_void>(),
            8,
        )
    };
    if read_bytes < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The reaper task. Exits when the storage handle is gone and nothing is in flight.
async fn reap(shared: Arc<Shared>, eventfd: AsyncFd<OwnedFd>) {
    let mut completed = Vec::with_capacity(QUEUE_DEPTH as usize);
    loop {
        let in_flight = shared.drain(&mut completed);
        if in_flight == 0 && shared.closing.load(Ordering::Acquire) {
            return;
        }
        tokio::select! {
            ready = eventfd.readable() => {
                let mut guard = match ready {
                    Ok(guard) => guard,
                    Err(error) => {
                        tracing::error!(%error, "io_uring eventfd unusable; polling for completions");
                        return reap_by_polling(shared, completed).await;
                    }
                };
                // Read until WouldBlock so the readiness is only cleared when the counter is
                // really zero; drain after each read so no completion waits for a new signal.
                loop {
                    match guard.try_io(|eventfd| read_eventfd(eventfd.get_ref())) {
                        Ok(Ok(())) => {
                            shared.drain(&mut completed);
                        }
                        Ok(Err(error)) if error.kind() == io::ErrorKind::Interrupted => {}
                        Ok(Err(error)) => {
                            tracing::error!(%error, "reading the io_uring eventfd failed; polling for completions");
                            return reap_by_polling(shared, completed).await;
                        }
                        Err(_would_block) => break,
                    }
                }
            }
            () = shared.close_notify.notified() => {}
        }
    }
}

/// A degraded reaper for a broken eventfd: slower, but in-flight operations still complete.
async fn reap_by_polling(shared: Arc<Shared>, mut completed: Vec<(Slot, i32)>) {
    loop {
        let in_flight = shared.drain(&mut completed);
        if in_flight == 0 && shared.closing.load(Ordering::Acquire) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(FALLBACK_POLL_INTERVAL_MS)).await;
    }
}

/// Turns a CQE result into bytes transferred or the errno it carries.
fn cqe_result(result: i32) -> io::Result<usize> {
    if result < 0 {
        // Negation cannot overflow: errnos are small positive numbers.
        return Err(io::Error::from_raw_os_error(-result));
    }
    Ok(result.unsigned_abs() as usize)
}

/// What is left of `bufs` after the kernel wrote their first `written_bytes` bytes.
fn unwritten_rest(bufs: Vec<SharedBuf>, written_bytes: usize) -> Vec<SharedBuf> {
    let mut skip_bytes = written_bytes;
    let mut rest = Vec::new();
    for buf in bufs {
        if skip_bytes >= buf.len() {
            skip_bytes -= buf.len();
        } else {
            rest.push(buf.slice(skip_bytes..buf.len()));
            skip_bytes = 0;
        }
    }
    assert_eq!(
        skip_bytes, 0,
        "the kernel reported more bytes written than submitted"
    );
    rest
}

/// Storage on one file or block device through its own io_uring.
pub(super) struct UringStorage {
    shared: Arc<Shared>,
    len_bytes: u64,
    is_block_device: bool,
    logical_block_bytes: u64,
}

impl UringStorage {
    /// Wires `ring` to an eventfd and spawns the reaper on the current tokio runtime.
    pub(super) fn new(opened: OpenedFile, ring: IoUring) -> io::Result<UringStorage> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            io::Error::other("the io_uring storage must be opened inside a tokio runtime")
        })?;
        // SAFETY: plain system call; no memory is passed.
        let raw_eventfd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if raw_eventfd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: eventfd just returned this descriptor; nothing else owns it.
        let eventfd = unsafe { OwnedFd::from_raw_fd(raw_eventfd) };
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        let eventfd = {
            let _entered = runtime.enter();
            // SAFETY: the OwnedFd owns the descriptor and keeps it open, always returning the
            // same number from as_raw_fd, until the AsyncFd holding it is dropped.
            unsafe { AsyncFd::register_with_interest(eventfd, Interest::READABLE) }?
        };
        tracing::debug!(
            direct = opened.direct,
            len_bytes = opened.len_bytes,
            "opened io_uring storage"
        );
        let sq_entries = ring.params().sq_entries() as usize;
        let shared = Arc::new(Shared {
            ring,
            table: Mutex::new(SlotTable {
                slots: Vec::with_capacity(sq_entries),
                free: Vec::with_capacity(sq_entries),
                in_flight: 0,
            }),
            permits: Arc::new(Semaphore::new(sq_entries)),
            file: opened.file,
            closing: AtomicBool::new(false),
            close_notify: Notify::new(),
        });
        runtime.spawn(reap(Arc::clone(&shared), eventfd));
        Ok(UringStorage {
            shared,
            len_bytes: opened.len_bytes,
            is_block_device: opened.is_block_device,
            logical_block_bytes: opened.logical_block_bytes,
        })
    }

    fn fd(&self) -> types::Fd {
        types::Fd(self.shared.file.as_raw_fd())
    }

    async fn write_all(&self, offset: u64, bufs: Vec<SharedBuf>, dsync: bool) -> io::Result<()> {
        let total_bytes = super::total_len_bytes(&bufs)?;
        super::check_write_range(self.len_bytes, offset, total_bytes)?;
        let rw_flags = if dsync { libc::RWF_DSYNC } else { 0 };
        let mut pending: VecDeque<SharedBuf> =
            bufs.into_iter().filter(|buf| !buf.is_empty()).collect();
        let mut offset = offset;
        let mut resubmits = 0u32;
        while !pending.is_empty() {
            let count = pending.len().min(IOVECS_PER_CALL_MAX);
            let op_bufs: Vec<SharedBuf> = pending.drain(..count).collect();
            let iovecs: Box<[libc::iovec]> = op_bufs
                .iter()
                .map(|buf| libc::iovec {
                    iov_base: buf.as_ptr() as *mut libc::c_void,
                    iov_len: buf.len(),
                })
                .collect();
            // `count` is at most IOVECS_PER_CALL_MAX, so it fits in u32.
            let entry = opcode::Writev::new(
                self.fd(),
                iovecs.as_ptr(),
                u32::try_from(count).expect("at most IOVECS_PER_CALL_MAX"),
            )
            .offset(offset)
            .rw_flags(rw_flags)
            .build();
            let buffers = OpBuffers::Write {
                bufs: op_bufs,
                iovecs: IoVecs(iovecs),
            };
            let completion = self
                .shared
                .run(entry, buffers)
                .await
                .map_err(|failed| failed.error)?;
            let OpBuffers::Write { bufs: op_bufs, .. } = completion.buffers else {
                unreachable!("a write completes with the buffers it was submitted with");
            };
            if resubmit_after(completion.result, resubmits) {
                resubmits += 1;
                tokio::time::sleep(eagain_backoff(resubmits)).await;
                for buf in op_bufs.into_iter().rev() {
                    pending.push_front(buf);
                }
                continue;
            }
            let written_bytes = cqe_result(completion.result)?;
            if written_bytes == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("write at offset {offset} wrote nothing"),
                ));
            }
            offset += written_bytes as u64;
            // Short write (or more than IOV_MAX buffers): put what is left back at the front.
            for buf in unwritten_rest(op_bufs, written_bytes).into_iter().rev() {
                pending.push_front(buf);
            }
        }
        Ok(())
    }

    async fn read_exact(&self, offset: u64, buf: AlignedBuf) -> (io::Result<()>, AlignedBuf) {
        if let Err(error) = super::check_read_range(self.len_bytes, offset, buf.len() as u64) {
            return (Err(error), buf);
        }
        let len = buf.len();
        let mut buf = buf;
        let mut done_bytes = 0usize;
        let mut resubmits = 0u32;
        while done_bytes < len {
            let chunk_bytes = (len - done_bytes).min(READ_BYTES_PER_OP_MAX);
            // SAFETY: done_bytes < len <= capacity, so the pointer stays inside the allocation.
            let destination = unsafe { buf.as_mut_ptr().add(done_bytes) };
            // chunk_bytes <= READ_BYTES_PER_OP_MAX fits in u32.
            let entry = opcode::Read::new(
                self.fd(),
                destination,
                u32::try_from(chunk_bytes).expect("at most READ_BYTES_PER_OP_MAX"),
            )
            .offset(offset + done_bytes as u64)
            .build();
            let completion = match self.shared.run(entry, OpBuffers::Read(buf)).await {
                Ok(completion) => completion,
                Err(RunError {
                    error,
                    buffers: Some(OpBuffers::Read(returned)),
                }) => return (Err(error), returned),
                // The kernel may still write into the original buffer, which its slot keeps;
                // hand the caller a fresh one.
                Err(RunError { error, .. }) => return (Err(error), AlignedBuf::zeroed(len)),
            };
            let OpBuffers::Read(returned) = completion.buffers else {
                unreachable!("a read completes with the buffer it was submitted with");
            };
            buf = returned;
            if resubmit_after(completion.result, resubmits) {
                resubmits += 1;
                tokio::time::sleep(eagain_backoff(resubmits)).await;
                continue;
            }
            match cqe_result(completion.result) {
                Err(error) => return (Err(error), buf),
                Ok(0) => {
                    let error = io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("end of file at offset {}", offset + done_bytes as u64),
                    );
                    return (Err(error), buf);
                }
                Ok(read_bytes) => done_bytes += read_bytes,
            }
        }
        (Ok(()), buf)
    }

    async fn datasync(&self) -> io::Result<()> {
        let mut resubmits = 0u32;
        loop {
            let entry = opcode::Fsync::new(self.fd())
                .flags(types::FsyncFlags::DATASYNC)
                .build();
            let completion = self
                .shared
                .run(entry, OpBuffers::None)
                .await
                .map_err(|failed| failed.error)?;
            // EAGAIN means the sync did not run; any other error may have dropped dirty data
            // and is returned, never retried.
            if resubmit_after(completion.result, resubmits) {
                resubmits += 1;
                tokio::time::sleep(eagain_backoff(resubmits)).await;
                continue;
            }
            return cqe_result(completion.result).map(drop);
        }
    }

    async fn zero(&self, offset: u64, len: u64, punch: bool) -> io::Result<()> {
        super::check_write_range(self.len_bytes, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        // fallocate and the block-device ioctls always run on a kernel worker thread, even
        // through io_uring, so the blocking pool costs nothing extra here.
        let shared = Arc::clone(&self.shared);
        let is_block_device = self.is_block_device;
        let result = tokio::task::spawn_blocking(move || {
            file::zero_range_blocking(&shared.file, is_block_device, offset, len, punch)
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

impl Drop for UringStorage {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::Release);
        self.shared.close_notify.notify_one();
    }
}

impl Storage for UringStorage {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_write_leaves_the_unwritten_tail_in_order() {
        let data =
            AlignedBuf::copy_from(&(0..=255u8).cycle().take(3000).collect::<Vec<u8>>()).freeze();
        let bufs = vec![
            data.slice(0..1000),
            data.slice(1000..1500),
            data.slice(1500..3000),
        ];
        let check = |written_bytes: usize| {
            let rest: Vec<u8> = unwritten_rest(bufs.clone(), written_bytes)
                .iter()
                .flat_map(|b| b.to_vec())
                .collect();
            assert_eq!(rest, data[written_bytes..], "after {written_bytes} bytes");
        };
        for written_bytes in [0, 1, 999, 1000, 1001, 1499, 1500, 2999, 3000] {
            check(written_bytes);
        }
        assert_eq!(unwritten_rest(bufs.clone(), 1200).len(), 2);
        assert!(unwritten_rest(bufs, 3000).is_empty());
    }

    #[test]
    fn only_eagain_is_resubmitted_and_only_so_often() {
        assert!(resubmit_after(-libc::EAGAIN, 0));
        assert!(resubmit_after(-libc::EAGAIN, EAGAIN_RESUBMITS_MAX - 1));
        assert!(!resubmit_after(-libc::EAGAIN, EAGAIN_RESUBMITS_MAX));
        for result in [
            0,
            4096,
            -libc::EIO,
            -libc::EINVAL,
            -libc::ENOSPC,
            -libc::EINTR,
        ] {
            assert!(!resubmit_after(result, 0), "{result}");
        }
        assert!(eagain_backoff(EAGAIN_RESUBMITS_MAX) <= Duration::from_millis(10));
    }

    #[test]
    fn this_kernel_has_every_opcode_the_backend_uses() {
        let ring = new_ring().expect("io_uring on the test machines");
        assert_eq!(missing_features(&ring), None);
    }

    #[test]
    #[should_panic(expected = "more bytes written than submitted")]
    fn a_completion_larger_than_the_write_is_a_bug() {
        let data = AlignedBuf::copy_from(&[1; 10]).freeze();
        unwritten_rest(vec![data], 11);
    }
}
