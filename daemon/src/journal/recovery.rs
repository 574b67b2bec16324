//! Recovery, when a journal is opened: the ring scan (from the superblock's tail, one
//! verified batch at a time, stopping at the first block that is not the expected batch),
//! the replay of the intact prefix onto the device, and a fresh empty ring under a new
//! journal id. A device that refuses the replay leaves the journal untouched and its records
//! in an index, so that the volume stays readable.

use ferry_protocol::journal::{
    BatchHeader, FormatError, RecordDescriptor, Superblock, BLOCK_BYTES, RING_START_BYTES,
};

use super::applier::{write_coalesced, APPLY_WAVE_MAX};
use super::{
    device_err, io_err, write_superblock, JournalError, Op, RecoveryHook, RecoveryReport,
    RECORD_MEMORY_BYTES, UNAPPLIED_ROUND_BYTES_MAX,
};
use crate::index::Index;
use crate::storage::{AlignedBuf, SharedBuf, Storage};

async fn read_block(
    storage: &dyn Storage,
    offset: u64,
    len: usize,
) -> Result<AlignedBuf, JournalError> {
    let (result, buf) = storage.read_at(offset, AlignedBuf::zeroed(len)).await;
    result.map_err(io_err("reading the journal"))?;
    Ok(buf)
}

/// What recovery leaves behind.
pub(super) struct Recovered {
    /// The superblock in effect: a new one naming an empty ring, or (after a device failure)
    /// the one found, untouched.
    pub(super) superblock: Superblock,
    pub(super) report: RecoveryReport,
    /// Ring offset where the next batch goes.
    pub(super) head: u64,
    pub(super) next_lsn: u64,
    /// Set when the device failed during the replay (see [`DeviceFailure`]).
    pub(super) device_failure: Option<DeviceFailure>,
}

/// The device refused the replay: the journal is left exactly as found (nothing written, so
/// the next start scans and replays the same records), and its records are kept in an index
/// so that reads still see every completed write. Their memory is bounded like at run time:
/// the ring only ever holds unapplied records, which the writer caps at
/// [`UNAPPLIED_MEMORY_BYTES_MAX`](super::UNAPPLIED_MEMORY_BYTES_MAX) (plus the batches in
/// flight).
pub(super) struct DeviceFailure {
    pub(super) error: JournalError,
    pub(super) index: Index,
    /// Ring bytes the records occupy.
    pub(super) used_bytes: u64,
}

/// Walks the ring from a superblock's tail, one verified batch at a time.
struct RingScan<'a> {
    journal: &'a dyn Storage,
    superblock: Superblock,
    /// Ring offset of the next batch.
    pos: u64,
    /// LSN the next record must carry.
    lsn: u64,
    scanned_bytes: u64,
    /// Why and where the scan stopped; counts of torn and corrupt batches.
    report: RecoveryReport,
    done: bool,
}

impl<'a> RingScan<'a> {
    fn new(journal: &'a dyn Storage, superblock: Superblock) -> RingScan<'a> {
        RingScan {
            journal,
            superblock,
            pos: superblock.tail_offset,
            lsn: superblock.tail_lsn,
            scanned_bytes: 0,
            report: RecoveryReport::default(),
            done: false,
        }
    }

    /// The records of the next intact batch with their payloads, in LSN order; `None` at the
    /// first block that is not the expected batch (the report says why, unless it is the
    /// clean end of the journal).
    async fn next_batch(
        &mut self,
    ) -> Result<Option<Vec<(RecordDescriptor, SharedBuf)>>, JournalError> {
        let ring_bytes = self.superblock.ring_bytes();
        // Bounded: every iteration either returns or moves `scanned_bytes` forward.
        while !self.done && self.scanned_bytes < ring_bytes {
            let pos = self.pos;
            let header_block =
                read_block(self.journal, RING_START_BYTES + pos, BLOCK_BYTES).await?;
            let header =
                match BatchHeader::decode(&header_block, self.superblock.journal_id, self.lsn) {
                    Ok(header) => header,
                    Err(
                        FormatError::BadMagic
                        | FormatError::UnexpectedLsn { .. }
                        | FormatError::ForeignJournal { .. },
                    ) => break,
                    Err(error) => {
                        self.report.stopped_reason =
                            Some(format!("batch header at ring offset {pos}: {error}"));
                        if error == FormatError::ChecksumMismatch {
                            self.report.checksum_errors += 1;
                        }
                        break;
                    }
                };
            let batch_bytes = header.batch_bytes();
            let records = match header {
                BatchHeader::Wrap { .. } => {
                    self.scanned_bytes += ring_bytes - pos;
                    self.pos = 0;
                    continue;
                }
                BatchHeader::Records { records, .. } => records,
            };
            if pos + batch_bytes > ring_bytes {
                self.report.stopped_reason = Some(format!(
                    "batch at ring offset {pos} runs past the end of the ring"
                ));
                break;
            }
            let payload = read_block(
                self.journal,
                RING_START_BYTES + pos + BLOCK_BYTES as u64,
                crate::usize_from(batch_bytes - BLOCK_BYTES as u64),
            )
            .await?;
            let payload = payload.freeze();
            let mut at = 0usize;
            let mut parts = Vec::with_capacity(records.len());
            for record in &records {
                let data = if record.kind.has_payload() {
                    payload.slice(at..at + record.len_bytes as usize)
                } else {
                    payload.slice(0..0)
                };
                if let Err(error) = record.verify(&data) {
                    // The batch never completed, so none of its records was acknowledged:
                    // drop it all.
                    self.report.torn_tail_bytes = batch_bytes;
                    self.report.checksum_errors += 1;
                    self.report.stopped_reason = Some(format!(
                        "torn batch dropped: record LSN {} at ring offset {pos}: {error}",
                        record.lsn
                    ));
                    self.done = true;
                    return Ok(None);
                }
                at += crate::usize_from(record.payload_area_bytes());
                parts.push((*record, data));
            }
            self.lsn += records.len() as u64;
            self.scanned_bytes += batch_bytes;
            self.pos += batch_bytes;
            if self.pos == ring_bytes {
                self.pos = 0;
            }
            return Ok(Some(parts));
        }
        self.done = true;
        Ok(None)
    }
}

/// Scans the ring from the superblock's tail, replays every intact batch onto the device in
/// order, stops at the first batch that is not the expected one, and leaves an empty ring
/// starting where the scan stopped. If the device fails during the replay, the journal is
/// left untouched and its records are returned in an index instead (see [`DeviceFailure`]).
pub(super) async fn recover(
    journal: &dyn Storage,
    device: &dyn Storage,
    name: &str,
    on_replayed: Option<RecoveryHook>,
) -> Result<Recovered, JournalError> {
    // A process killed before its last fdatasync leaves batches in the page cache, and this
    // scan replays them. Made durable first (the write-ahead rule), so that a power loss
    // during the replay cannot leave device blocks torn by records the journal then lacks.
    journal
        .sync()
        .await
        .map_err(io_err("fdatasync of the journal before recovery"))?;
    let superblock = read_superblock(journal, name).await?;
    let Replayed {
        scan,
        records,
        bytes,
        ranges,
        device_error,
    } = replay(journal, device, superblock, on_replayed.is_some()).await?;
    if let Some(error) = device_error {
        return keep_in_journal(journal, superblock, name, on_replayed, error).await;
    }
    let mut report = scan.report;
    report.records_replayed = records;
    report.bytes_replayed = bytes;
    let (pos, lsn) = (scan.pos, scan.lsn);
    if let Some(hook) = on_replayed {
        hook(ranges, lsn - 1)
            .await
            .map_err(io_err("recording the replayed ranges"))?;
    }
    let recovered = restart_ring(journal, superblock, pos, lsn).await?;
    if report.records_replayed > 0 || report.stopped_reason.is_some() {
        tracing::info!(
            volume = name,
            records = report.records_replayed,
            bytes = report.bytes_replayed,
            torn_tail_bytes = report.torn_tail_bytes,
            stopped = report.stopped_reason.as_deref().unwrap_or("clean end"),
            "journal recovered"
        );
    }
    Ok(Recovered {
        superblock: recovered,
        report,
        head: pos,
        next_lsn: lsn,
        device_failure: None,
    })
}

/// The newest valid superblock, checked against the file it describes.
async fn read_superblock(journal: &dyn Storage, name: &str) -> Result<Superblock, JournalError> {
    let corrupt = |reason: String| JournalError::Corrupt {
        path: name.to_string(),
        reason,
    };
    let slots = read_block(journal, 0, 2 * BLOCK_BYTES).await?;
    let superblock = [
        Superblock::decode(&slots[..BLOCK_BYTES]),
        Superblock::decode(&slots[BLOCK_BYTES..]),
    ]
    .into_iter()
    .filter_map(Result::ok)
    .max_by_key(|sb| sb.sequence)
    .ok_or_else(|| corrupt("neither superblock slot is valid".into()))?;
    if superblock.file_bytes != journal.len_bytes() {
        return Err(corrupt(format!(
            "superblock says {} bytes, file has {}",
            superblock.file_bytes,
            journal.len_bytes()
        )));
    }
    Ok(superblock)
}

/// What the replay did.
struct Replayed<'a> {
    /// The scan, stopped where the intact prefix of the ring ends.
    scan: RingScan<'a>,
    records: u64,
    bytes: u64,
    /// The replayed records' (offset, length), merged where adjacent; collected only when
    /// asked for.
    ranges: Vec<(u64, u64)>,
    /// The device refused the replay (its write or its fdatasync).
    device_error: Option<JournalError>,
}

/// Scans the ring from the superblock's tail and writes every intact record onto the device,
/// a bounded chunk at a time, then makes the device durable. A device error stops the replay
/// and is returned in [`Replayed`]; a journal error fails it.
async fn replay<'a>(
    journal: &'a dyn Storage,
    device: &dyn Storage,
    superblock: Superblock,
    collect_ranges: bool,
) -> Result<Replayed<'a>, JournalError> {
    let mut scan = RingScan::new(journal, superblock);
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut records = 0u64;
    let mut bytes = 0u64;
    // Intact records not yet written to the device, and the memory they hold.
    let mut replay: Vec<(u64, Op)> = Vec::new();
    let mut replay_memory_bytes = 0u64;
    let mut device_error = None;
    while let Some(parts) = scan.next_batch().await? {
        for (record, data) in parts {
            // What the writer acknowledged is a prefix of the ring; the scan keeps a prefix.
            debug_assert_eq!(
                record.lsn,
                superblock.tail_lsn + records,
                "recovery replays the ring from its tail without a gap"
            );
            // Zero records count too (RECORD_MEMORY_BYTES), so a ring full of small discards
            // is replayed in bounded chunks.
            replay_memory_bytes += record.payload_area_bytes() + RECORD_MEMORY_BYTES;
            records += 1;
            bytes += record.len_bytes as u64;
            let op = Op::from_record(&record, data);
            if collect_ranges {
                match ranges.last_mut() {
                    Some((at, len)) if *at + *len == op.range().0 => *len += op.range().1,
                    _ => ranges.push(op.range()),
                }
            }
            replay.push((record.lsn, op));
        }
        // Replay through the applier's coalescing writer, a bounded chunk at a time.
        if replay_memory_bytes >= UNAPPLIED_ROUND_BYTES_MAX {
            if let Err(error) = replay_chunk(device, &mut replay).await {
                device_error = Some(error);
                break;
            }
            replay_memory_bytes = 0;
        }
    }
    if device_error.is_none() {
        device_error = replay_chunk(device, &mut replay).await.err();
    }
    if device_error.is_none() {
        device_error = device
            .sync()
            .await
            .map_err(device_err("syncing the device after replay"))
            .err();
    }
    Ok(Replayed {
        scan,
        records,
        bytes,
        ranges,
        device_error,
    })
}

/// After a replay made the device durable: leaves an empty ring at ring offset `pos` whose
/// next record is `lsn`, under a new journal id, and returns its superblock (durable).
async fn restart_ring(
    journal: &dyn Storage,
    superblock: Superblock,
    pos: u64,
    lsn: u64,
) -> Result<Superblock, JournalError> {
    // Destroy the block where the scan stopped: a torn batch there keeps a valid header, and a
    // later batch torn at the same place must not make its old payload look whole again.
    let zero = AlignedBuf::zeroed(BLOCK_BYTES).freeze();
    journal
        .write_at(RING_START_BYTES + pos, vec![zero], true)
        .await
        .map_err(io_err("clearing the end of the journal"))?;
    // A new journal id for the batches of this boot. Batches of the previous boot that were
    // written after the stop point (up to INFLIGHT_BATCHES_MAX - 1 of them, never acknowledged)
    // carry the very LSNs this boot is about to reuse; with the old id, a later scan that
    // reached them would replay them over newer acknowledged writes. Every live record has
    // just been replayed and synced, so no batch still needs the old id.
    let journal_id = loop {
        let id: u64 = rand::random();
        if id != superblock.journal_id {
            break id;
        }
    };
    let recovered = Superblock {
        sequence: superblock.sequence + 1,
        journal_id,
        tail_offset: pos,
        tail_lsn: lsn,
        ..superblock
    };
    write_superblock(journal, &recovered).await?;
    Ok(recovered)
}

/// After the device failed during replay: scans the ring again (the same scan, since nothing
/// was written to the journal) and keeps every record in an index, newest first as the
/// writer would, so that reads see every completed write. `on_replayed` still sees the
/// records' ranges: marking them for the peers is safe whether or not they reach the device.
async fn keep_in_journal(
    journal: &dyn Storage,
    superblock: Superblock,
    name: &str,
    on_replayed: Option<RecoveryHook>,
    error: JournalError,
) -> Result<Recovered, JournalError> {
    let mut scan = RingScan::new(journal, superblock);
    let mut index = Index::new();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut records_kept = 0u64;
    while let Some(parts) = scan.next_batch().await? {
        for (record, data) in parts {
            let op = Op::from_record(&record, data);
            let (offset, len) = op.range();
            index.insert(offset, len, record.lsn, op.content());
            match ranges.last_mut() {
                Some((at, run)) if *at + *run == offset => *run += len,
                _ => ranges.push((offset, len)),
            }
            records_kept += 1;
        }
    }
    if let Some(hook) = on_replayed {
        hook(ranges, scan.lsn - 1)
            .await
            .map_err(io_err("recording the replayed ranges"))?;
    }
    tracing::error!(
        volume = name,
        records = records_kept,
        held_bytes = index.data_bytes(),
        %error,
        "the device failed during journal replay; the volume serves reads and refuses writes"
    );
    Ok(Recovered {
        superblock,
        report: scan.report,
        head: scan.pos,
        next_lsn: scan.lsn,
        device_failure: Some(DeviceFailure {
            error,
            index,
            used_bytes: scan.scanned_bytes,
        }),
    })
}

/// Writes the collected records to the device and empties the list.
async fn replay_chunk(
    device: &dyn Storage,
    records: &mut Vec<(u64, Op)>,
) -> Result<(), JournalError> {
    write_coalesced(
        device,
        records.iter().map(|(lsn, op)| (*lsn, op)),
        // `recover` made the whole journal file durable before the scan read any record.
        u64::MAX,
        APPLY_WAVE_MAX,
    )
    .await
    .map_err(device_err("replaying the journal onto the device"))?;
    records.clear();
    Ok(())
}
