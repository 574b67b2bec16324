//! The applier task: takes completed batches from the writer in ring order, gathers them
//! into rounds (up to `APPLY_DELAY` or a quarter of the ring), and applies each round as one:
//! fdatasync of the journal (write-ahead), coalesced device writes, fdatasync of the device,
//! removal of the round's records from the index, a durable superblock naming the new tail,
//! and only then the release of the round's space and memory to the writer. Also carries out
//! resets (an empty ring under a new journal id) and, through [`write_coalesced`], recovery's
//! replay.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use ferry_protocol::journal::Superblock;
use tokio::sync::mpsc;

use super::writer::Event;
use super::{
    device_err, io_err, join_all, write_superblock, JournalError, Op, Shared,
    UNAPPLIED_ROUND_BYTES_MAX,
};
use crate::index::{Content, Index};
use crate::storage::{SharedBuf, Storage};

/// Buffers in one vectored device write (the kernel's IOV_MAX is 1024).
const IOVECS_PER_WRITE_MAX: usize = 1024;
/// Bytes in one coalesced device write.
const APPLY_WRITE_BYTES_MAX: u64 = 8 << 20;
/// Device writes the applier keeps in flight at once.
pub(super) const APPLY_WAVE_MAX: usize = 64;
/// Device writes in flight while the journal is keeping up (see `Applier::run`).
const IDLE_APPLY_WAVE: usize = 8;
/// Batches the applier takes per round before making the device durable.
const APPLY_BATCHES_MAX: usize = 4096;
/// How long the applier gathers batches before applying them as one round.
const APPLY_DELAY: std::time::Duration = std::time::Duration::from_millis(250);

/// A record on its way to the device.
#[derive(Clone)]
pub(super) struct ApplyRecord {
    pub(super) lsn: u64,
    pub(super) op: Op,
}

/// A completed batch, handed to the applier in ring order.
pub(super) struct CompletedBatch {
    pub(super) records: Vec<ApplyRecord>,
    pub(super) last_lsn: u64,
    /// Ring position just after this batch: the new tail once it is applied.
    pub(super) end_pos: u64,
    /// Ring bytes it occupies, including space skipped by a wrap before it.
    pub(super) ring_bytes: u64,
    /// Memory its records keep until it is applied ([`Op::memory_bytes`]).
    pub(super) memory_bytes: u64,
}

/// What the writer hands the applier, in ring order.
pub(super) enum ApplyItem {
    Batch(CompletedBatch),
    /// Apply everything before, then persist an empty ring at `head` whose next record is
    /// `next_lsn`, under `journal_id`.
    Reset {
        head: u64,
        next_lsn: u64,
        journal_id: u64,
    },
}

pub(super) struct Applier {
    journal: Arc<dyn Storage>,
    device: Arc<dyn Storage>,
    shared: Arc<Shared>,
    superblock: Superblock,
    events: mpsc::UnboundedSender<Event>,
    apply_limit: tokio::sync::watch::Receiver<u64>,
    /// Every record up to here is durable in the journal: this applier's fdatasync of the
    /// journal covered it (or recovery's, before the first round).
    journal_durable_lsn: u64,
    /// Every record up to here is written to the device and the device fdatasynced.
    device_durable_lsn: u64,
}

impl Applier {
    /// An applier for the ring `superblock` describes, whose records up to the superblock's
    /// tail are on the device and durable.
    pub(super) fn new(
        journal: Arc<dyn Storage>,
        device: Arc<dyn Storage>,
        shared: Arc<Shared>,
        superblock: Superblock,
        events: mpsc::UnboundedSender<Event>,
        apply_limit: tokio::sync::watch::Receiver<u64>,
    ) -> Applier {
        Applier {
            journal,
            device,
            shared,
            superblock,
            events,
            apply_limit,
            journal_durable_lsn: superblock.tail_lsn - 1,
            device_durable_lsn: superblock.tail_lsn - 1,
        }
    }

    /// Waits until records up to `lsn` may leave the journal. A dropped limit counts as no
    /// limit.
    async fn allowed(&mut self, lsn: u64) {
        let _ = self.apply_limit.wait_for(|limit| *limit >= lsn).await;
    }

    pub(super) async fn run(mut self, mut batches: mpsc::UnboundedReceiver<ApplyItem>) {
        // Applying costs an fdatasync of the device, which queues behind and in front of the
        // journal's own writes on the same disk. Gathering a round for a short while (or until a
        // quarter of the ring waits) keeps that off the client's latency; the index serves reads
        // of the data meanwhile, and memory stays bounded by the ring.
        let eager_bytes = (self.shared.capacity_bytes / 4).min(UNAPPLIED_ROUND_BYTES_MAX);
        let mut carried: Option<ApplyItem> = None;
        loop {
            let item = match carried.take() {
                Some(item) => item,
                None => match batches.recv().await {
                    Some(item) => item,
                    None => break,
                },
            };
            let first = match item {
                ApplyItem::Batch(batch) => batch,
                ApplyItem::Reset {
                    head,
                    next_lsn,
                    journal_id,
                } => {
                    let result = self.reset(head, next_lsn, journal_id).await;
                    let failed = result.is_err();
                    let _ = self.events.send(Event::ResetDone {
                        next_lsn,
                        journal_id,
                        result,
                    });
                    if failed {
                        break;
                    }
                    continue;
                }
            };
            self.allowed(first.last_lsn).await;
            let deadline = tokio::time::Instant::now() + APPLY_DELAY;
            let mut ring_bytes = first.ring_bytes;
            let mut round = vec![first];
            while round.len() < APPLY_BATCHES_MAX && ring_bytes < eager_bytes {
                match tokio::time::timeout_at(deadline, batches.recv()).await {
                    Ok(Some(ApplyItem::Batch(batch)))
                        if batch.last_lsn <= *self.apply_limit.borrow() =>
                    {
                        ring_bytes += batch.ring_bytes;
                        round.push(batch);
                    }
                    // Not yet allowed, or a reset: the next round starts with it.
                    Ok(Some(item)) => {
                        carried = Some(item);
                        break;
                    }
                    // Closing (apply everything now) or the round's time is up.
                    Ok(None) | Err(_) => break,
                }
            }
            // A round cut short by size means writes are arriving faster than they are applied:
            // apply with full concurrency. Otherwise trickle, so that the device queue stays
            // short for the journal writes that clients are waiting on.
            let wave = if ring_bytes >= eager_bytes {
                APPLY_WAVE_MAX
            } else {
                IDLE_APPLY_WAVE
            };
            if let Err(error) = self.apply_round(&round, wave).await {
                self.shared.fail(&error);
                let _ = self.events.send(Event::ApplyFailed(error));
                break;
            }
        }
        let _ = self.events.send(Event::ApplierDone);
    }

    /// Everything before was applied (rounds run in order); persists an empty ring at `head`.
    async fn reset(
        &mut self,
        head: u64,
        next_lsn: u64,
        journal_id: u64,
    ) -> Result<(), JournalError> {
        self.device
            .sync()
            .await
            .map_err(device_err("fdatasync of the device"))?;
        // The ring restarts empty at `next_lsn`: everything before it is on the device.
        self.journal_durable_lsn = next_lsn - 1;
        self.device_durable_lsn = next_lsn - 1;
        self.superblock = Superblock {
            sequence: self.superblock.sequence + 1,
            journal_id,
            tail_offset: head,
            tail_lsn: next_lsn,
            ..self.superblock
        };
        write_superblock(&*self.journal, &self.superblock).await?;
        Ok(())
    }

    async fn apply_round(
        &mut self,
        round: &[CompletedBatch],
        wave: usize,
    ) -> Result<(), JournalError> {
        let records: Vec<&ApplyRecord> = round.iter().flat_map(|b| b.records.iter()).collect();
        let last = round.last().expect("a round has a batch");
        // The writer completes batches in LSN order, so the tail only ever moves past a prefix
        // of the ring.
        assert_eq!(
            records.first().map(|record| record.lsn),
            Some(self.superblock.tail_lsn),
            "a round starts at the journal's tail"
        );
        debug_assert!(
            records
                .iter()
                .zip(self.superblock.tail_lsn..)
                .all(|(record, lsn)| record.lsn == lsn),
            "a round holds consecutive LSNs"
        );
        debug_assert_eq!(records.last().map(|record| record.lsn), Some(last.last_lsn));
        // The write-ahead rule: no record reaches the device before it is durable in the
        // journal. Completed batches may still be in the disk's (or the page) cache; applied
        // early, a power loss before the device's fdatasync could tear device blocks between
        // their old contents and a record whose batch was lost, which no replay repairs. Every
        // batch of the round is written, so one fdatasync per round covers them all (most
        // often a FUA or FLUSH already did, and it finds nothing to write).
        self.journal
            .sync()
            .await
            .map_err(io_err("fdatasync of the journal before applying"))?;
        self.journal_durable_lsn = last.last_lsn;
        write_coalesced(
            &*self.device,
            records.iter().map(|r| (r.lsn, &r.op)),
            self.journal_durable_lsn,
            wave,
        )
        .await
        .map_err(device_err("applying the journal to the device"))?;
        self.device
            .sync()
            .await
            .map_err(device_err("fdatasync of the device"))?;
        self.device_durable_lsn = last.last_lsn;
        {
            let mut index = self.shared.index.lock().expect("index lock");
            for record in &records {
                let (offset, len) = record.op.range();
                index.remove_applied(offset, len, record.lsn);
            }
            self.shared
                .metrics
                .journal_unapplied_bytes
                .set(crate::gauge_i64(index.data_bytes()));
        }
        self.superblock = Superblock {
            sequence: self.superblock.sequence + 1,
            tail_offset: last.end_pos,
            tail_lsn: last.last_lsn + 1,
            ..self.superblock
        };
        // The records are durable on the device; only now may their journal space be reused.
        assert!(
            self.superblock.tail_lsn - 1 <= self.device_durable_lsn,
            "the tail moves only past records written to the device and fdatasynced"
        );
        write_superblock(&*self.journal, &self.superblock).await?;
        self.shared
            .applied_lsn
            .store(last.last_lsn, Ordering::Relaxed);
        self.shared
            .metrics
            .journal_applied_lsn
            .set(crate::gauge_i64(last.last_lsn));
        let ring_bytes = round.iter().map(|b| b.ring_bytes).sum();
        let memory_bytes = round.iter().map(|b| b.memory_bytes).sum();
        // `write_superblock` wrote with RWF_DSYNC: the new tail is durable.
        let _ = self.events.send(Event::Released {
            ring_bytes,
            memory_bytes,
            applied_lsn: last.last_lsn,
        });
        Ok(())
    }
}

/// Writes records (given in LSN order) to the device as their final state: replaying them into
/// a private index leaves the newest contents of every range as disjoint pieces, so
/// overwritten data is written once, adjacent pieces become one vectored write, and up to
/// `concurrency` writes run at once. The device ends up exactly as if every record had been
/// applied in order; the caller makes it durable. Used by the applier and by recovery, which
/// both make the journal durable first: every record is at or below `journal_durable_lsn`.
pub(super) async fn write_coalesced<'a>(
    device: &dyn Storage,
    records: impl Iterator<Item = (u64, &'a Op)>,
    journal_durable_lsn: u64,
    concurrency: usize,
) -> std::io::Result<()> {
    let mut coalesced = Index::new();
    for (lsn, op) in records {
        assert!(
            lsn <= journal_durable_lsn,
            "write-ahead: a record reaches the device only once it is durable in the journal"
        );
        let (offset, len) = op.range();
        coalesced.insert(offset, len, lsn, op.content());
    }
    let mut writes: Vec<DeviceWrite> = Vec::new();
    for (offset, len, content) in coalesced.pieces() {
        match (writes.last_mut(), content) {
            (
                Some(DeviceWrite::Data {
                    offset: at,
                    bufs,
                    len: run,
                }),
                Content::Data(data),
            ) if *at + *run == offset
                && bufs.len() < IOVECS_PER_WRITE_MAX
                && *run + len <= APPLY_WRITE_BYTES_MAX =>
            {
                bufs.push(data.clone());
                *run += len;
            }
            (
                Some(DeviceWrite::Zero {
                    offset: at,
                    len: run,
                    punch: p,
                }),
                Content::Zero { punch },
            ) if *at + *run == offset && p == punch => {
                *run += len;
            }
            (_, Content::Data(data)) => writes.push(DeviceWrite::Data {
                offset,
                bufs: vec![data.clone()],
                len,
            }),
            (_, Content::Zero { punch }) => writes.push(DeviceWrite::Zero {
                offset,
                len,
                punch: *punch,
            }),
        }
    }
    drop(coalesced);
    for wave in writes.chunks(concurrency.max(1)) {
        let ios = wave.iter().map(|write| async move {
            match write {
                DeviceWrite::Data { offset, bufs, .. } => {
                    device.write_at(*offset, bufs.clone(), false).await
                }
                // Any 512-byte aligned range, whatever the device's logical block size.
                DeviceWrite::Zero { offset, len, punch } => {
                    crate::storage::zero(device, *offset, *len, *punch).await
                }
            }
        });
        for result in join_all(ios).await {
            result?;
        }
    }
    Ok(())
}

/// One write of a coalesced apply round.
enum DeviceWrite {
    Data {
        offset: u64,
        bufs: Vec<SharedBuf>,
        len: u64,
    },
    Zero {
        offset: u64,
        len: u64,
        punch: bool,
    },
}
