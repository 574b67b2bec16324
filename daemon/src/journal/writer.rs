//! The writer task: owns the ring. It takes the clients' requests, assigns LSNs and inserts
//! each record into the index in LSN order (handing it to the tap on the way), gathers what
//! is queued into batches (group commit) and writes each with one vectored I/O, completes the
//! batches to their clients strictly in ring order, makes FLUSH and FUA durable (an
//! fdatasync, or RWF_DSYNC when everything before is durable already), and makes writes wait
//! while the ring or the memory cap is full (backpressure). Completed batches go to the
//! applier, which hands their space back with [`Event::Released`].

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use ferry_protocol::journal::{
    BatchHeader, Superblock, BLOCK_BYTES, RECORDS_PER_BATCH_MAX, RING_START_BYTES,
};
use tokio::sync::{mpsc, oneshot};

use super::applier::{ApplyItem, ApplyRecord, CompletedBatch};
use super::{
    lock_value, JournalError, JournalTap, Op, Request, Shared, UNAPPLIED_MEMORY_BYTES_MAX,
};
use crate::storage::{AlignedBuf, SharedBuf, Storage};

/// Payload bytes one batch carries at most; bigger requests span several batches.
const BATCH_PAYLOAD_BYTES_MAX: u64 = 4 << 20;
/// Batches written concurrently. More overlap buys little on one device and delays acks.
const INFLIGHT_BATCHES_MAX: usize = 4;
/// Records queued in the writer beyond the request channel.
const PENDING_RECORDS_MAX: usize = 1024;
/// "Journal full" is logged at most this often; the metrics count every episode.
const FULL_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// How a batch is written: with RWF_DSYNC, and after the runtime's turn that lets the records
/// the tap sent reach the wire (see `Writer::write_batch`).
#[derive(Debug, Clone, Copy)]
struct WriteHow {
    dsync: bool,
    after_sends: bool,
}

/// Hands one record to the tap: whether it sent something to a peer, or the text of its panic
/// if it panicked. A panic in the tap (replication) must not unwind through the index lock,
/// held here: that would poison it and take every read of the volume down with it. The caller
/// stops the journal instead.
fn tap_record(tap: &dyn JournalTap, lsn: u64, op: &Op, fua: bool) -> Result<bool, String> {
    std::panic::catch_unwind(AssertUnwindSafe(|| tap.record(lsn, op, fua)))
        .map_err(|payload| panic_message(payload.as_ref()))
}

/// The text of a caught panic.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|text| (*text).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

struct Inflight {
    id: u64,
    first_lsn: u64,
    last_lsn: u64,
    end_pos: u64,
    ring_bytes: u64,
    memory_bytes: u64,
    records: Vec<ApplyRecord>,
    waiters: Vec<Waiter>,
    fua: bool,
    dsync: bool,
    written: bool,
}

/// What the writer learns from the I/O it started and from the applier.
pub(super) enum Event {
    BatchWritten {
        id: u64,
        result: std::io::Result<()>,
    },
    Synced {
        covers_lsn: u64,
        result: std::io::Result<()>,
    },
    /// The applier applied records up to `applied_lsn`, made them durable on the device and
    /// persisted the tail past them: their space and memory may be reused.
    Released {
        ring_bytes: u64,
        memory_bytes: u64,
        applied_lsn: u64,
    },
    ApplyFailed(JournalError),
    /// The applier has applied everything it was given and stopped.
    ApplierDone,
    /// The applier applied everything and wrote an empty ring (see
    /// [`Journal::reset`](super::Journal::reset)).
    ResetDone {
        next_lsn: u64,
        journal_id: u64,
        result: Result<(), JournalError>,
    },
}

/// A client waiting for its record: where to answer, when it was queued, its LSN.
type Waiter = (oneshot::Sender<Result<u64, JournalError>>, Instant, u64);

/// A record waiting for a batch: the change, its FUA flag, its waiter, when it was queued.
type Pending = (
    Op,
    bool,
    oneshot::Sender<Result<u64, JournalError>>,
    Instant,
);

pub(super) struct Writer {
    storage: Arc<dyn Storage>,
    shared: Arc<Shared>,
    journal_id: u64,
    ring_bytes: u64,
    head: u64,
    next_lsn: u64,
    used_bytes: u64,
    pending: VecDeque<Pending>,
    inflight: VecDeque<Inflight>,
    next_batch_id: u64,
    /// Every batch up to here is written to the journal (not necessarily durable).
    written_lsn: u64,
    /// Every record up to here is acknowledged to its client.
    completed_lsn: u64,
    /// Every record up to here is durable.
    durable_lsn: u64,
    sync_running: bool,
    /// Flushes waiting for `durable_lsn` to reach their target.
    flush_waiters: Vec<(u64, oneshot::Sender<Result<u64, JournalError>>)>,
    events_tx: mpsc::UnboundedSender<Event>,
    apply_tx: Option<mpsc::UnboundedSender<ApplyItem>>,
    /// When the writer started waiting for space, for the full-wait metric.
    full_since: Option<Instant>,
    /// When "journal full" was last logged: once per interval, not once per episode.
    full_logged_at: Option<Instant>,
    /// Memory of every record submitted and not yet released by the applier
    /// ([`Op::memory_bytes`]): what the journal's records keep alive (payloads, index pieces,
    /// queued and in-round records).
    unapplied_memory_bytes: u64,
    /// A reset waiting for the queue to drain, then for the applier.
    resetting: Option<Resetting>,
}

struct Resetting {
    next_lsn: Option<u64>,
    done: oneshot::Sender<Result<u64, JournalError>>,
    /// Handed to the applier; waiting for `ResetDone`.
    started: bool,
}

impl Writer {
    /// A writer for the ring `superblock` describes, whose next batch goes at ring offset
    /// `head` and whose next record gets `next_lsn`; the ring is empty.
    pub(super) fn new(
        storage: Arc<dyn Storage>,
        shared: Arc<Shared>,
        superblock: &Superblock,
        head: u64,
        next_lsn: u64,
        events_tx: mpsc::UnboundedSender<Event>,
        apply_tx: mpsc::UnboundedSender<ApplyItem>,
    ) -> Writer {
        Writer {
            storage,
            shared,
            journal_id: superblock.journal_id,
            ring_bytes: superblock.ring_bytes(),
            head,
            next_lsn,
            used_bytes: 0,
            pending: VecDeque::new(),
            inflight: VecDeque::new(),
            next_batch_id: 0,
            written_lsn: next_lsn - 1,
            completed_lsn: next_lsn - 1,
            durable_lsn: next_lsn - 1,
            sync_running: false,
            flush_waiters: Vec::new(),
            events_tx,
            apply_tx: Some(apply_tx),
            full_since: None,
            full_logged_at: None,
            unapplied_memory_bytes: 0,
            resetting: None,
        }
    }

    pub(super) async fn run(
        mut self,
        mut requests: mpsc::Receiver<Request>,
        mut events: mpsc::UnboundedReceiver<Event>,
    ) {
        let mut closing: Option<oneshot::Sender<()>> = None;
        let mut open = true;
        loop {
            tokio::select! {
                biased;
                Some(event) = events.recv() => self.handle_event(event),
                request = requests.recv(), if open && closing.is_none() && self.resetting.is_none() && self.pending.len() < PENDING_RECORDS_MAX => match request {
                    Some(request) => {
                        self.handle_request(request, &mut closing);
                        // Take whatever else is queued right now into the same batch.
                        while self.pending.len() < PENDING_RECORDS_MAX && closing.is_none() && self.resetting.is_none() {
                            match requests.try_recv() {
                                Ok(request) => self.handle_request(request, &mut closing),
                                Err(_) => break,
                            }
                        }
                    }
                    None => open = false,
                },
                else => break,
            }
            if self.shared.failed.load(Ordering::SeqCst) {
                self.fail_everything();
            }
            self.submit_batches();
            self.maybe_start_reset();
            if (closing.is_some() || !open)
                && self.pending.is_empty()
                && self.inflight.is_empty()
                && self.flush_waiters.is_empty()
                && !self.sync_running
            {
                if self.durable_lsn < self.written_lsn && !self.shared.failed.load(Ordering::SeqCst)
                {
                    self.start_sync();
                    continue;
                }
                break;
            }
        }
        // Closing: let the applier drain everything, then report.
        if let Some(apply_tx) = self.apply_tx.take() {
            drop(apply_tx);
            while let Some(event) = events.recv().await {
                match event {
                    Event::ApplierDone => break,
                    Event::Released { .. } | Event::ApplyFailed(_) | Event::ResetDone { .. } => {
                        self.handle_event(event)
                    }
                    _ => {}
                }
            }
        }
        if let Some(done) = closing {
            let _ = done.send(());
        }
    }

    fn handle_request(&mut self, request: Request, closing: &mut Option<oneshot::Sender<()>>) {
        match request {
            Request::Append {
                op,
                fua,
                at_lsn,
                done,
                queued_at,
            } => {
                if let Err(error) = self.shared.check() {
                    let _ = done.send(Err(error));
                    return;
                }
                let expected = self.next_lsn + self.pending.len() as u64;
                if let Some(found) = at_lsn.filter(|lsn| *lsn != expected) {
                    let _ = done.send(Err(JournalError::LsnMismatch { expected, found }));
                    return;
                }
                self.pending.push_back((op, fua, done, queued_at));
            }
            Request::Reset { next_lsn, done } => {
                self.resetting = Some(Resetting {
                    next_lsn,
                    done,
                    started: false,
                });
            }
            Request::Flush { done } => {
                // A flush covers writes completed before it arrived: those are at or below
                // completed_lsn. Writes still in flight are not covered.
                let target = self.completed_lsn;
                // The sync started below covers every written batch, hence every completed one.
                debug_assert!(
                    target <= self.written_lsn,
                    "a write is acknowledged only after its batch is written"
                );
                if target <= self.durable_lsn {
                    let _ = done.send(Ok(self.durable_lsn));
                } else {
                    self.flush_waiters.push((target, done));
                    if !self.sync_running {
                        self.start_sync();
                    }
                }
            }
            Request::Close { done } => *closing = Some(done),
        }
    }

    fn handle_event(&mut self, event: Event) {
        match event {
            Event::BatchWritten { id, result } => {
                if let Err(error) = result {
                    self.shared.fail(&JournalError::Io {
                        what: "writing a batch",
                        message: error.to_string(),
                    });
                    self.fail_everything();
                    return;
                }
                if let Some(batch) = self.inflight.iter_mut().find(|b| b.id == id) {
                    batch.written = true;
                }
                self.complete_in_order();
            }
            Event::Synced { covers_lsn, result } => self.on_synced(covers_lsn, result),
            Event::Released {
                ring_bytes,
                memory_bytes,
                applied_lsn,
            } => {
                assert!(
                    applied_lsn <= self.completed_lsn,
                    "space comes back only from batches completed and handed to the applier"
                );
                self.unapplied_memory_bytes -= memory_bytes;
                assert!(
                    ring_bytes <= self.used_bytes,
                    "released more journal space than was used"
                );
                self.used_bytes -= ring_bytes;
                self.shared
                    .used_bytes
                    .store(self.used_bytes, Ordering::Relaxed);
                self.shared
                    .metrics
                    .journal_used_bytes
                    .set(crate::gauge_i64(self.used_bytes));
            }
            Event::ApplyFailed(error) => {
                // The applier has stopped: nothing may wait for it any more (close included).
                self.apply_tx = None;
                self.shared.fail(&error);
                self.fail_everything();
            }
            Event::ApplierDone => self.apply_tx = None,
            Event::ResetDone {
                next_lsn,
                journal_id,
                result,
            } => self.on_reset_done(next_lsn, journal_id, result),
        }
    }

    /// An fdatasync of the journal that covers records up to `covers_lsn` finished.
    fn on_synced(&mut self, covers_lsn: u64, result: std::io::Result<()>) {
        self.sync_running = false;
        if let Err(error) = result {
            // A failed fdatasync may have dropped dirty data: never retry and pretend.
            self.shared.fail(&JournalError::Io {
                what: "fdatasync of the journal",
                message: error.to_string(),
            });
            self.fail_everything();
            return;
        }
        // Started after those batches were written: the fdatasync made them durable.
        assert!(
            covers_lsn <= self.written_lsn,
            "an fdatasync covers only batches written before it started"
        );
        self.durable_lsn = self.durable_lsn.max(covers_lsn);
        let durable = self.durable_lsn;
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.flush_waiters)
            .into_iter()
            .partition(|(t, _)| *t <= durable);
        self.flush_waiters = waiting;
        for (target, done) in ready {
            debug_assert!(
                target <= durable,
                "a FLUSH completes only when everything before it is durable"
            );
            let _ = done.send(Ok(durable));
        }
        self.complete_in_order();
        if !self.flush_waiters.is_empty() && !self.sync_running {
            self.start_sync();
        }
    }

    /// The applier carried out the reset (see [`Resetting`]).
    fn on_reset_done(&mut self, next_lsn: u64, journal_id: u64, result: Result<(), JournalError>) {
        let Some(resetting) = self.resetting.take() else {
            return;
        };
        match result {
            Ok(()) => {
                self.journal_id = journal_id;
                self.next_lsn = next_lsn;
                self.written_lsn = next_lsn - 1;
                self.completed_lsn = next_lsn - 1;
                self.durable_lsn = next_lsn - 1;
                self.shared.head_lsn.store(next_lsn - 1, Ordering::Relaxed);
                self.shared
                    .applied_lsn
                    .store(next_lsn - 1, Ordering::Relaxed);
                self.shared
                    .metrics
                    .journal_head_lsn
                    .set(crate::gauge_i64(next_lsn - 1));
                self.shared
                    .metrics
                    .journal_applied_lsn
                    .set(crate::gauge_i64(next_lsn - 1));
                let _ = resetting.done.send(Ok(next_lsn));
            }
            Err(error) => {
                let _ = resetting.done.send(Err(error.clone()));
                self.shared.fail(&error);
                self.fail_everything();
            }
        }
    }

    /// Hands a requested reset to the applier once nothing is queued, in flight or syncing.
    fn maybe_start_reset(&mut self) {
        let Some(resetting) = &mut self.resetting else {
            return;
        };
        if resetting.started
            || !self.pending.is_empty()
            || !self.inflight.is_empty()
            || self.sync_running
        {
            return;
        }
        if let Err(error) = self.shared.check() {
            let resetting = self.resetting.take().expect("checked above");
            let _ = resetting.done.send(Err(error));
            return;
        }
        let Some(apply_tx) = &self.apply_tx else {
            let resetting = self.resetting.take().expect("checked above");
            let _ = resetting.done.send(Err(JournalError::Closed));
            return;
        };
        let next_lsn = resetting.next_lsn.unwrap_or(self.next_lsn);
        let journal_id = loop {
            let id: u64 = rand::random();
            if id != self.journal_id {
                break id;
            }
        };
        resetting.started = true;
        let _ = apply_tx.send(ApplyItem::Reset {
            head: self.head,
            next_lsn,
            journal_id,
        });
    }

    /// Acknowledges written batches from the front of the queue, in ring order.
    fn complete_in_order(&mut self) {
        for batch in self.inflight.iter() {
            if batch.last_lsn <= self.written_lsn {
                continue;
            }
            if !batch.written {
                break;
            }
            assert_eq!(
                batch.first_lsn,
                self.written_lsn + 1,
                "batches are written in LSN order"
            );
            self.written_lsn = batch.last_lsn;
        }
        while let Some(front) = self.inflight.front() {
            if !front.written {
                return;
            }
            assert_eq!(
                front.first_lsn,
                self.completed_lsn + 1,
                "batches complete in LSN order"
            );
            if front.dsync && self.durable_lsn + 1 == front.first_lsn {
                // Written with RWF_DSYNC after everything before it was durable.
                assert!(
                    front.last_lsn <= self.written_lsn,
                    "a batch is durable by RWF_DSYNC only once written"
                );
                self.durable_lsn = front.last_lsn;
            }
            if front.fua && self.durable_lsn < front.last_lsn {
                // Durable only once an fdatasync covers it and everything before it.
                if !self.sync_running {
                    self.start_sync();
                }
                return;
            }
            let batch = self.inflight.pop_front().expect("front exists");
            // Recovery keeps a prefix of the ring, and the applier makes only written batches
            // durable before applying them: both rely on these two.
            assert!(
                batch.last_lsn <= self.written_lsn,
                "a write is acknowledged only after its batch and every earlier batch are written"
            );
            assert!(
                !batch.fua || batch.last_lsn <= self.durable_lsn,
                "a FUA write completes only when it and everything before it are durable"
            );
            self.completed_lsn = batch.last_lsn;
            let now = Instant::now();
            for (done, queued_at, lsn) in batch.waiters {
                self.shared
                    .metrics
                    .write_latency_journal
                    .observe(now.duration_since(queued_at).as_secs_f64());
                let _ = done.send(Ok(lsn));
            }
            if let Some(apply_tx) = &self.apply_tx {
                let _ = apply_tx.send(ApplyItem::Batch(CompletedBatch {
                    records: batch.records,
                    last_lsn: batch.last_lsn,
                    end_pos: batch.end_pos,
                    ring_bytes: batch.ring_bytes,
                    memory_bytes: batch.memory_bytes,
                }));
            }
        }
    }

    fn start_sync(&mut self) {
        assert!(!self.sync_running, "one fdatasync at a time");
        self.sync_running = true;
        // Everything written so far is on the device; the sync makes it durable.
        let covers_lsn = self.written_lsn;
        let storage = self.storage.clone();
        let events = self.events_tx.clone();
        tokio::spawn(async move {
            let result = storage.sync().await;
            let _ = events.send(Event::Synced { covers_lsn, result });
        });
    }

    fn fail_everything(&mut self) {
        let error = match self.shared.check() {
            Err(error) => error,
            Ok(()) => return,
        };
        for (_, _, done, _) in self.pending.drain(..) {
            let _ = done.send(Err(error.clone()));
        }
        let mut index = self.shared.index.lock().expect("index lock");
        for batch in self.inflight.drain(..) {
            // Never written: reads must not keep returning data the client was told failed.
            for record in &batch.records {
                let (offset, len) = record.op.range();
                index.remove_applied(offset, len, record.lsn);
            }
            for (done, _, _) in batch.waiters {
                let _ = done.send(Err(error.clone()));
            }
        }
        drop(index);
        for (_, done) in self.flush_waiters.drain(..) {
            let _ = done.send(Err(error.clone()));
        }
    }

    /// Forms batches from pending records while there is space and room in flight.
    fn submit_batches(&mut self) {
        while !self.pending.is_empty()
            && self.inflight.len() < INFLIGHT_BATCHES_MAX
            && !self.shared.failed.load(Ordering::SeqCst)
        {
            let mut count = 0;
            let mut payload_bytes = 0;
            for (op, _, _, _) in self.pending.iter() {
                if count == RECORDS_PER_BATCH_MAX
                    || (count > 0 && payload_bytes + op.payload_bytes() > BATCH_PAYLOAD_BYTES_MAX)
                {
                    break;
                }
                count += 1;
                payload_bytes += op.payload_bytes();
            }
            let batch_bytes = BLOCK_BYTES as u64 + payload_bytes;
            let (start, skipped_bytes) = if self.head + batch_bytes > self.ring_bytes {
                (0, self.ring_bytes - self.head)
            } else {
                (self.head, 0)
            };
            let unapplied_bytes = self.unapplied_memory_bytes;
            if self.used_bytes + skipped_bytes + batch_bytes > self.ring_bytes
                || unapplied_bytes >= UNAPPLIED_MEMORY_BYTES_MAX
            {
                // Journal full: wait for the applier to release space. Writes wait; they never
                // fail and memory does not grow, since pending and the channel are bounded.
                if self.full_since.is_none() {
                    self.full_since = Some(Instant::now());
                    self.shared
                        .full_waits
                        .fetch_add(count as u64, Ordering::Relaxed);
                    self.shared
                        .metrics
                        .journal_full_waits_total
                        .inc_by(count as u64);
                    let now = Instant::now();
                    if self
                        .full_logged_at
                        .is_none_or(|at| now.duration_since(at) >= FULL_LOG_INTERVAL)
                    {
                        self.full_logged_at = Some(now);
                        tracing::warn!(
                            used_bytes = self.used_bytes,
                            capacity_bytes = self.ring_bytes,
                            unapplied_bytes,
                            "journal full: writes wait for apply"
                        );
                    }
                }
                return;
            }
            if let Some(since) = self.full_since.take() {
                self.shared
                    .metrics
                    .journal_full_wait_seconds_total
                    .inc_by(since.elapsed().as_secs_f64());
            }
            self.submit_one(count, start, skipped_bytes, batch_bytes);
        }
    }

    /// The tap panicked on a record of this batch: the replication of this volume is gone.
    /// The journal stops taking writes, with the reason (the writer fails everything queued
    /// next); this batch is never written: its writes fail and reads forget them. Reads keep
    /// working.
    fn fail_tapped_batch(
        &mut self,
        message: String,
        records: &[ApplyRecord],
        waiters: Vec<Waiter>,
    ) {
        self.shared.fail(&JournalError::TapPanicked(message));
        let error = match self.shared.check() {
            Err(error) => error,
            Ok(()) => JournalError::Closed,
        };
        let mut index = self.shared.index.lock().expect("index lock");
        for record in records {
            let (offset, len) = record.op.range();
            index.remove_applied(offset, len, record.lsn);
        }
        drop(index);
        for (done, _, _) in waiters {
            let _ = done.send(Err(error.clone()));
        }
    }

    fn submit_one(&mut self, count: usize, start: u64, skipped_bytes: u64, batch_bytes: u64) {
        let first_lsn = self.next_lsn;
        let mut descriptors = Vec::with_capacity(count);
        let mut records = Vec::with_capacity(count);
        let mut waiters = Vec::with_capacity(count);
        let mut iovecs = Vec::with_capacity(count + 1);
        iovecs.push(SharedBuf::from(AlignedBuf::zeroed(0))); // placeholder for the header
        let mut fua = false;
        let mut tap_panic = None;
        let mut transmitted = false;
        // The index relies on this: the newest write to a range has the highest LSN.
        assert_eq!(
            first_lsn,
            self.inflight
                .back()
                .map_or(self.completed_lsn, |batch| batch.last_lsn)
                + 1,
            "LSNs are assigned in increasing order, without gaps"
        );
        {
            let tap = lock_value(&self.shared.tap).clone();
            let mut index = self.shared.index.lock().expect("index lock");
            for (i, (op, record_fua, done, queued_at)) in self.pending.drain(..count).enumerate() {
                let lsn = first_lsn + i as u64;
                fua |= record_fua;
                if let Op::Write { data, .. } = &op {
                    iovecs.push(data.padded_view());
                }
                let descriptor = op.descriptor(lsn, record_fua);
                let (offset, len) = op.range();
                index.insert(offset, len, lsn, op.content());
                if let Some(tap) = tap.as_ref().filter(|_| tap_panic.is_none()) {
                    match tap_record(&**tap, lsn, &op, record_fua) {
                        Ok(sent) => transmitted |= sent,
                        Err(message) => tap_panic = Some(message),
                    }
                }
                descriptors.push(descriptor);
                records.push(ApplyRecord { lsn, op });
                waiters.push((done, queued_at, lsn));
            }
        }
        if let Some(message) = tap_panic {
            return self.fail_tapped_batch(message, &records, waiters);
        }
        let header = BatchHeader::Records {
            journal_id: self.journal_id,
            first_lsn,
            records: descriptors,
        };
        debug_assert_eq!(header.batch_bytes(), batch_bytes);
        iovecs[0] = AlignedBuf::copy_from(&header.encode()).freeze();
        let last_lsn = first_lsn + count as u64 - 1;
        self.next_lsn = last_lsn + 1;
        self.shared.head_lsn.store(last_lsn, Ordering::Relaxed);
        self.shared
            .metrics
            .journal_head_lsn
            .set(crate::gauge_i64(last_lsn));

        // RWF_DSYNC makes this batch durable by itself; that is enough for its FUA records only
        // if everything before it is durable already.
        let dsync = fua && self.inflight.is_empty() && self.durable_lsn == self.completed_lsn;
        debug_assert!(
            !dsync || self.durable_lsn + 1 == first_lsn,
            "RWF_DSYNC is used only when everything before the batch is durable"
        );
        let wrap_at = (skipped_bytes > 0).then_some(self.head);
        let end_pos = if start + batch_bytes == self.ring_bytes {
            0
        } else {
            start + batch_bytes
        };
        let ring_bytes = skipped_bytes + batch_bytes;
        self.used_bytes += ring_bytes;
        // Checked by `submit_batches`; the applier hands space back only once it is reusable.
        assert!(
            self.used_bytes <= self.ring_bytes,
            "a batch never overwrites space the applier has not released"
        );
        self.shared
            .used_bytes
            .store(self.used_bytes, Ordering::Relaxed);
        self.shared
            .metrics
            .journal_used_bytes
            .set(crate::gauge_i64(self.used_bytes));
        self.head = end_pos;
        let id = self.next_batch_id;
        self.next_batch_id += 1;
        let memory_bytes = records.iter().map(|record| record.op.memory_bytes()).sum();
        self.unapplied_memory_bytes += memory_bytes;
        self.inflight.push_back(Inflight {
            id,
            first_lsn,
            last_lsn,
            end_pos,
            ring_bytes,
            memory_bytes,
            records,
            waiters,
            fua,
            dsync,
            written: false,
        });

        let how = WriteHow {
            dsync,
            after_sends: transmitted,
        };
        self.write_batch(id, first_lsn, start, wrap_at, iovecs, how);
    }

    /// Writes batch `id` (header and payloads, `iovecs`) at ring offset `start`, after the wrap
    /// marker at `wrap_at` when the batch skips the end of the ring, and reports
    /// [`Event::BatchWritten`].
    ///
    /// When the tap sent the batch's records to a metro peer's stream (`how.after_sends`), the
    /// write waits for the runtime's next turn before it submits: every task the tap woke (the
    /// peers' stream writers, quinn's connection drivers) normally runs, and the runtime polls
    /// its I/O once, first (`tap_tests` in `journal/mod.rs` checks this order). It is an
    /// ordering of work on one thread, not a promise: quinn's pacing or congestion window may
    /// still hold packets back, and nothing waits for them. Without that turn the submission
    /// (an `io_uring_enter` that on a virtio disk includes the doorbell's VM exit) came first
    /// and the records reached the peer later, although the peer's leg is the longer one for
    /// a metro write. The stage probe, a metro pair over loopback, 4 KiB writes
    /// at QD1, without / with the turn: frame written to QUIC -> ack delivered 289 / 231 µs (of
    /// which the secondary's journal 128 / 107), server time 315 / 255 µs; `nbd_bench.py`,
    /// A/B pairs: write QD1 p50 281-301 -> 226-245 µs, FUA p50 449-536 -> 479-485 µs
    /// (benches/README.md, "Records leave before the journal write"). A standalone volume, a
    /// secondary (its tap sends nothing) and a primary whose peers are all regional or away
    /// take no extra turn: a regional write waits for no peer, and the batch chunks a tap
    /// pumps to a regional peer would only delay its journal write.
    fn write_batch(
        &self,
        id: u64,
        first_lsn: u64,
        start: u64,
        wrap_at: Option<u64>,
        iovecs: Vec<SharedBuf>,
        how: WriteHow,
    ) {
        let WriteHow { dsync, after_sends } = how;
        let storage = self.storage.clone();
        let events = self.events_tx.clone();
        let journal_id = self.journal_id;
        tokio::spawn(async move {
            if after_sends {
                // See above: the records go to the network first.
                tokio::task::yield_now().await;
            }
            let wrap = async {
                match wrap_at {
                    // The rest of the ring is skipped; the marker tells recovery to continue at 0.
                    Some(at) => {
                        let marker = BatchHeader::Wrap {
                            journal_id,
                            next_lsn: first_lsn,
                        }
                        .encode();
                        storage
                            .write_at(
                                RING_START_BYTES + at,
                                vec![AlignedBuf::copy_from(&marker).freeze()],
                                dsync,
                            )
                            .await
                    }
                    None => Ok(()),
                }
            };
            let batch = storage.write_at(RING_START_BYTES + start, iovecs, dsync);
            let (wrap_result, batch_result) = tokio::join!(wrap, batch);
            let _ = events.send(Event::BatchWritten {
                id,
                result: wrap_result.and(batch_result),
            });
        });
    }
}
