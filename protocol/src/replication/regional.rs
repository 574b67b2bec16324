//! Regional (asynchronous) replicas: batches on the primary, batch-at-a-time application on
//! the secondary.
//!
//! # Primary
//!
//! A regional peer never holds a client write: its records are always marked in its dirty
//! map (the ledger of the module doc, exactly as for a metro peer that is away), so the
//! journal releases them at its own pace, and shipping is an optimisation on top of the map.
//! While the link is up, every tapped record joins the peer's *open batch*, which keeps only
//! the newest contents of each range: a record fully covered by a later one of the same batch
//! is dropped before it is ever sent. The batch is *cut* when its oldest record is
//! `interval` old or it holds [`BATCH_CUT_BYTES`]; a cut moves its records to the send queue
//! followed by a `BatchEnd` at the head LSN of the cut. What waits (open batch and queue)
//! is bounded by [`BATCH_BUFFER_BYTES`]: past it the link is given up (`degraded`), and the
//! peer catches up from the map with a delta resync when it returns. A `BatchEnd` (and a
//! catch-up's `ResyncEnd`) goes only once the primary's journal is durable through it, so a
//! regional copy never holds a record its primary could still lose in a power loss. An
//! operator's `ferry demote` cuts the open batch at once and waits until every regional peer
//! still shipping holds every write. Completion, fencing,
//! `on_disconnect` and the generation rule never consider a regional peer: the copy it
//! holds is a prefix of the primary's writes, and a promotion of it starts a generation that
//! makes the primary's later writes a tail to give up, never a split brain.
//!
//! # Secondary
//!
//! Records of a regional link gather in memory until their `BatchEnd` (nothing of an
//! incomplete batch is ever stored or acknowledged). A complete batch is then, in order:
//! stored whole and durably in the volume's stage file ([`Action::StageBatch`]) and
//! acknowledged (the primary may forget it); its ranges are marked for every peer, durably
//! (write-ahead marking, as for a resync); then applied as one unit
//! ([`Action::ApplyBatch`]): written to the device, the device synced and the journal
//! restarted at the batch's LSN, with reads of the volume held meanwhile. A crash at any
//! point leaves either the previous batch boundary (the stage file holds an incomplete or
//! older batch, ignored) or a stored batch above the journal's head, which the daemon
//! applies again before anything reads the volume. So the copy, its read-only export and a
//! promotion only ever see batch boundaries.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use super::{Action, OpError, Replicator};
use crate::generation::Role;
use crate::repl::WriteRecord;

/// A batch is cut once it holds this many payload bytes, whatever its age.
pub const BATCH_CUT_BYTES: u64 = 16 << 20;
/// Bytes of batches (open and queued) one regional peer may hold back before its link is
/// given up and it catches up from its dirty map instead.
pub const BATCH_BUFFER_BYTES: u64 = 256 << 20;
/// Bytes of one batch a secondary accepts: a cut batch plus one record of the largest size,
/// with room to spare.
pub const BATCH_RECEIVE_BYTES_MAX: u64 = 128 << 20;
/// What one record of a batch counts besides its payload (its descriptor in the stage file
/// is smaller), so that batches of zero ranges are bounded too: what the link's window counts.
pub const BATCH_RECORD_COST_BYTES: u64 = super::session::RECORD_OVERHEAD_BYTES;
/// Complete batches a secondary holds waiting to be stored and applied.
pub const BATCHES_WAITING_MAX: usize = 2;
/// Bytes a regional link may send at once above its `max_rate` after being idle.
pub const RATE_BURST_BYTES: f64 = (1 << 20) as f64;
/// Lag is tracked in steps of this length (bounded memory whatever the write rate).
const LAG_STEP: Duration = Duration::from_millis(10);
/// Lag steps kept at most; older ones are merged.
const LAG_STEPS_MAX: usize = 100_000;

const _: () =
    assert!(BATCH_CUT_BYTES + crate::repl::DATA_BYTES_MAX as u64 <= BATCH_RECEIVE_BYTES_MAX);
const _: () = assert!(BATCH_RECEIVE_BYTES_MAX <= super::WINDOW_BYTES * 2);
/// The secondary acknowledges a batch only once it has all of it: the largest batch (cut at
/// [`BATCH_CUT_BYTES`], plus the record that crossed it) must fit the link's window, or the
/// sender would wait for an acknowledgement that never comes.
pub const BATCH_WINDOW_BYTES_MIN: u64 =
    BATCH_CUT_BYTES + crate::repl::DATA_BYTES_MAX as u64 + 2 * BATCH_RECORD_COST_BYTES;
const _: () = assert!(BATCH_WINDOW_BYTES_MIN <= super::WINDOW_BYTES);

/// Whether a regional peer whose oldest write not yet durable there is `lag_seconds` old is
/// behind by more than `interval` (state `lagging`). A batch is cut when its oldest write is
/// `interval` old and still has to cross the link and be stored, so a peer on schedule holds
/// every write older than `interval` plus one batch's transfer: only a lag beyond a second
/// `interval` says the shipping fell behind. Measured against `interval` alone, a healthy
/// link flipped between `in-sync` and `lagging` on every batch.
pub fn behind_schedule(lag_seconds: f64, config: RegionalConfig) -> bool {
    lag_seconds > 2.0 * config.interval.as_secs_f64()
}

/// The settings of a regional peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionalConfig {
    /// A batch is cut at least this often while records come.
    pub interval: Duration,
}

/// The records of the batch being gathered, newest contents per range.
#[derive(Debug, Default)]
pub(super) struct OpenBatch {
    records: Vec<Option<WriteRecord>>,
    /// Live records by (offset, LSN) → index in `records`.
    live: BTreeMap<(u64, u64), usize>,
    cost_bytes: u64,
    opened_at: Option<Instant>,
    /// Payload bytes of records dropped because a later one covered them.
    pub(super) coalesced_bytes: u64,
}

impl OpenBatch {
    pub(super) fn push(&mut self, record: WriteRecord, now: Instant) {
        let start = record.offset_bytes;
        let end = start + u64::from(record.len_bytes);
        let covered: Vec<(u64, u64)> = self
            .live
            .range((start, 0)..(end, 0))
            .filter(|(_, index)| {
                let older = self.records[**index].as_ref().expect("live");
                older.offset_bytes + u64::from(older.len_bytes) <= end
            })
            .map(|(key, _)| *key)
            .collect();
        for key in covered {
            let index = self.live.remove(&key).expect("listed");
            let older = self.records[index].take().expect("live");
            let bytes = older.data.len() as u64;
            self.cost_bytes -= bytes + BATCH_RECORD_COST_BYTES;
            self.coalesced_bytes += bytes;
        }
        self.cost_bytes += record.data.len() as u64 + BATCH_RECORD_COST_BYTES;
        self.live.insert((start, record.lsn), self.records.len());
        self.records.push(Some(record));
        self.opened_at.get_or_insert(now);
    }

    pub(super) fn cost_bytes(&self) -> u64 {
        self.cost_bytes
    }

    pub(super) fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// When the batch must be cut by age.
    pub(super) fn due(&self, interval: Duration) -> Option<Instant> {
        self.opened_at.map(|at| at + interval)
    }

    /// The live records, in LSN order; the batch starts empty again.
    pub(super) fn take(&mut self) -> Vec<WriteRecord> {
        let records = std::mem::take(&mut self.records);
        self.live.clear();
        self.cost_bytes = 0;
        self.opened_at = None;
        records.into_iter().flatten().collect()
    }
}

/// Completed writes not yet durable at a peer, by age: the live RPO.
#[derive(Debug, Default)]
pub(super) struct Lag {
    /// (last LSN, time of the first write, bytes) per step, oldest first.
    steps: VecDeque<(u64, Instant, u64)>,
    bytes: u64,
}

impl Lag {
    pub(super) fn push(&mut self, lsn: u64, now: Instant, bytes: u64) {
        self.bytes += bytes;
        let full = self.steps.len() >= LAG_STEPS_MAX;
        if let Some(last) = self.steps.back_mut() {
            if now < last.1 + LAG_STEP || full {
                last.0 = lsn;
                last.2 += bytes;
                return;
            }
        }
        self.steps.push_back((lsn, now, bytes));
    }

    /// Everything up to `lsn` is durable at the peer.
    pub(super) fn confirm(&mut self, lsn: u64) {
        while self.steps.front().is_some_and(|step| step.0 <= lsn) {
            let (_, _, bytes) = self.steps.pop_front().expect("checked");
            self.bytes -= bytes;
        }
    }

    pub(super) fn bytes(&self) -> u64 {
        self.bytes
    }

    pub(super) fn seconds(&self, now: Instant) -> f64 {
        self.steps.front().map_or(0.0, |step| {
            now.saturating_duration_since(step.1).as_secs_f64()
        })
    }
}

/// Where a complete batch stands on a secondary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BatchStep {
    /// Waiting for the stage file to be free.
    Waiting,
    /// Being stored in the stage file.
    Storing,
    /// Stored and acknowledged; its marks become durable under this sequence number.
    Marking { seq: u64 },
    /// Being applied.
    Applying,
}

/// A complete batch a secondary received.
#[derive(Debug)]
pub(super) struct BatchIn {
    pub(super) lsn: u64,
    pub(super) records: Vec<WriteRecord>,
    pub(super) step: BatchStep,
}

/// The regional side of one peer.
#[derive(Debug, Default)]
pub(super) struct RegionalPeer {
    /// Primary: the batch being gathered.
    pub(super) open: OpenBatch,
    /// Primary: the LSNs of cut batches whose `BatchEnd` is not sent yet, in order.
    pub(super) cuts: VecDeque<u64>,
    /// Primary: payload bytes in the send queue.
    pub(super) queued_bytes: u64,
    /// Primary: what the peer lacks, by age.
    pub(super) lag: Lag,
    /// Primary: times the link was given up because batches piled up.
    pub(super) fell_behind: u64,
    /// Primary, with `max_rate`: bytes the link may send now (a token bucket of
    /// [`RATE_BURST_BYTES`]), as of `tokens_at`.
    pub(super) tokens: f64,
    pub(super) tokens_at: Option<Instant>,
    /// `ferry pause`: no link to the peer until `ferry resume` (its writes are in its map).
    pub(super) paused: bool,
    /// Secondary: records of the batch being received.
    pub(super) receiving: Vec<WriteRecord>,
    pub(super) receiving_bytes: u64,
    /// Secondary: complete batches, oldest first (the first one is being worked on).
    pub(super) batches: VecDeque<BatchIn>,
    /// Secondary: the catch-up file could not take a catch-up (no space, an I/O error):
    /// the next one writes the device in place, leaving the copy inconsistent until it ends.
    pub(super) stage_refused: Option<String>,
}

impl Replicator {
    pub(super) fn is_regional(&self, p: usize) -> bool {
        self.peers[p].config.regional.is_some()
    }

    /// `ferry pause` / `ferry resume` (SPEC §3) for one regional peer, or every one: a paused
    /// peer's link closes and stays closed; its writes keep being marked in its map, so a
    /// resume catches it up with a delta resync, never a full copy. Not stored: a restart
    /// ships again. Returns the peers it applied to.
    pub fn set_paused(&mut self, peer: Option<&str>, paused: bool) -> Result<Vec<String>, OpError> {
        let targets: Vec<usize> = match peer {
            Some(name) => {
                let Some(p) = self.peers.iter().position(|q| q.name() == name) else {
                    return Err(OpError::UnknownPeer {
                        peer: name.to_owned(),
                        volume: self.volume().to_owned(),
                    });
                };
                if !self.is_regional(p) {
                    return Err(OpError::NotRegional {
                        peer: name.to_owned(),
                        volume: self.volume().to_owned(),
                    });
                }
                vec![p]
            }
            None => (0..self.peers.len())
                .filter(|p| self.is_regional(*p))
                .collect(),
        };
        if targets.is_empty() {
            return Err(OpError::NotRegional {
                peer: "no replica".to_owned(),
                volume: self.volume().to_owned(),
            });
        }
        for &p in &targets {
            self.peers[p].regional.paused = paused;
            if paused && self.peers[p].session.is_connected() {
                self.close_link(p, "paused by the operator (ferry pause)");
            }
        }
        Ok(targets
            .iter()
            .map(|p| self.peers[*p].name().to_owned())
            .collect())
    }

    // ---- primary ---------------------------------------------------------------------------

    /// A tapped record for a regional peer whose link ships.
    pub(super) fn batch_record(&mut self, p: usize, record: WriteRecord) {
        let now = self.now;
        let regional = &mut self.peers[p].regional;
        regional.open.push(record, now);
        self.maybe_cut(p);
    }

    /// Cuts the open batch when it is old or large enough, then sends what the window allows.
    pub(super) fn maybe_cut(&mut self, p: usize) {
        let Some(config) = self.peers[p].config.regional else {
            return;
        };
        if !self.shipping_records(p) {
            return;
        }
        let now = self.now;
        let head = self.head_lsn;
        // A planned demotion ships what is open at once (see `regional_drain_pending`).
        let demoting = self.demoting && self.demote_planned;
        let peer = &mut self.peers[p];
        let open = &peer.regional.open;
        let due = demoting || open.due(config.interval).is_some_and(|at| now >= at);
        if !open.is_empty() && (due || open.cost_bytes() >= BATCH_CUT_BYTES) {
            let records = peer.regional.open.take();
            for record in records {
                peer.regional.queued_bytes += record.data.len() as u64 + BATCH_RECORD_COST_BYTES;
                peer.queue.push_back(record);
            }
            peer.regional.cuts.push_back(head);
        }
        let waiting = peer.regional.queued_bytes + peer.regional.open.cost_bytes();
        if waiting > BATCH_BUFFER_BYTES {
            peer.regional.fell_behind += 1;
            let message = format!(
                "more than {} MiB of batches waited for the link: shipping stops, what the peer lacks is in its dirty map, and it catches up with a delta resync when the link is back",
                BATCH_BUFFER_BYTES >> 20
            );
            self.notices.push_back(format!(
                "volume {}: regional peer {} fell behind: {message}",
                self.config.volume, self.peers[p].config.name
            ));
            self.close_link(p, &format!("fell behind: {message}"));
        }
    }

    /// Sends queued records and batch ends while the window (and `max_rate`) has room.
    pub(super) fn pump_batches(&mut self, p: usize) {
        if self.peers[p]
            .resync_out
            .as_ref()
            .is_some_and(|r| r.end_pending.is_some())
        {
            return; // records after a catch-up's end wait for the end to go first
        }
        let now = self.now;
        let rate = self.peers[p].config.resync_max_rate_bytes_per_s;
        if let Some(rate) = rate {
            let regional = &mut self.peers[p].regional;
            let at = regional.tokens_at.unwrap_or(now);
            let earned = now.saturating_duration_since(at).as_secs_f64() * rate as f64;
            regional.tokens = (regional.tokens + earned).min(RATE_BURST_BYTES);
            regional.tokens_at = Some(now);
        }
        loop {
            let peer = &mut self.peers[p];
            let next_record = peer.queue.front().map(|r| (r.lsn, r.data.len() as u64));
            if let Some(&cut) = peer.regional.cuts.front() {
                if next_record.is_none_or(|(lsn, _)| lsn > cut) {
                    if !self.durable_through(cut) {
                        return; // `journal_flushed` moves on
                    }
                    let peer = &mut self.peers[p];
                    peer.regional.cuts.pop_front();
                    if let Err(error) = peer.session.send_batch_end(cut, now) {
                        return self.close_for(p, error);
                    }
                    continue;
                }
            }
            let Some((_, len_bytes)) = next_record else {
                return;
            };
            if !peer.session.can_send(len_bytes) {
                return;
            }
            if rate.is_some() && peer.regional.tokens < len_bytes as f64 {
                return; // `max_rate`: `batch_due` says when
            }
            if rate.is_some() {
                peer.regional.tokens -= len_bytes as f64;
            }
            let record = peer.queue.pop_front().expect("checked");
            peer.regional.queued_bytes -= record.data.len() as u64 + BATCH_RECORD_COST_BYTES;
            if let Err(error) = peer.session.send_record(record, now) {
                return self.close_for(p, error);
            }
        }
    }

    /// Whether everything regional peer `p`'s link carried before a resync on it (a verify
    /// repair on a live link) has gone out in whole batches: the open batch is cut at its
    /// newest record, then the queue and the ends are sent as the window allows. The resync's
    /// begin waits for it: a record or batch end after it would fall below the resync's end
    /// (the session refuses that), and a batch cut in two would be half at the peer. Records
    /// tapped since the resync was planned are not in the batch: they are marked, and the
    /// resync sends their blocks.
    pub(super) fn batches_out_before_resync(&mut self, p: usize) -> bool {
        let peer = &mut self.peers[p];
        let records = peer.regional.open.take();
        if let Some(newest) = records.iter().map(|record| record.lsn).max() {
            for record in records {
                peer.regional.queued_bytes += record.data.len() as u64 + BATCH_RECORD_COST_BYTES;
                peer.queue.push_back(record);
            }
            peer.regional.cuts.push_back(newest);
        }
        self.pump_batches(p);
        let peer = &self.peers[p];
        peer.queue.is_empty() && peer.regional.cuts.is_empty()
    }

    /// Whether a planned demotion still waits for regional peer `p`: a switchover loses
    /// nothing on any copy that is receiving, so a regional peer shipping on a live link gets
    /// the open batch at once and the demotion waits until it holds every write durably. A
    /// peer that is away, paused or catching up is not waited for (what it lacks is in its
    /// map, and `ferry status` says so), nor one whose link drops meanwhile.
    pub(super) fn regional_drain_pending(&self, p: usize) -> bool {
        self.is_regional(p)
            && self.shipping_records(p)
            && self.peers[p].acked_durable_lsn < self.head_lsn
    }

    /// Whether this copy's journal is durable through `lsn`; if not, makes it so (once).
    ///
    /// A regional copy is only handed a boundary (a batch's end, a resync's end) its primary
    /// cannot lose: the primary keeps no periodic durability for regional peers, so a power
    /// loss could otherwise take records the regional copy holds, and the primary would then
    /// write others under the same LSNs in the same generation, a history the copy never
    /// learns it left. One fdatasync per batch, off the client's path.
    pub(super) fn durable_through(&mut self, lsn: u64) -> bool {
        if self.local_durable_lsn >= lsn {
            return true;
        }
        self.flush_wanted_lsn = self.flush_wanted_lsn.max(lsn);
        if !self.flush_in_flight {
            self.flush_in_flight = true;
            self.actions.push_back(Action::JournalFlush);
        }
        false
    }

    /// When the open batch of a regional peer must be cut, or `max_rate` lets the next queued
    /// record go.
    pub(super) fn batch_due(&self, p: usize) -> Option<Instant> {
        let peer = &self.peers[p];
        let config = peer.config.regional?;
        if !self.shipping_records(p) {
            return None;
        }
        let cut = peer.regional.open.due(config.interval);
        let paced = match (peer.config.resync_max_rate_bytes_per_s, peer.queue.front()) {
            (Some(rate), Some(record)) if rate > 0 => {
                let missing = record.data.len() as f64 - peer.regional.tokens;
                (missing > 0.0).then(|| {
                    peer.regional.tokens_at.unwrap_or(self.now)
                        + Duration::from_secs_f64(missing / rate as f64)
                })
            }
            _ => None,
        };
        match (cut, paced) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    // ---- secondary -------------------------------------------------------------------------

    /// A record of a regional link: it waits in memory for its batch's end.
    pub(super) fn on_batch_record(&mut self, p: usize, record: WriteRecord) {
        let regional = &mut self.peers[p].regional;
        regional.receiving_bytes += record.data.len() as u64 + BATCH_RECORD_COST_BYTES;
        if regional.receiving_bytes > BATCH_RECEIVE_BYTES_MAX {
            return self.close_link(
                p,
                &format!(
                    "a batch of more than {} MiB: the primary cuts batches far smaller",
                    BATCH_RECEIVE_BYTES_MAX >> 20
                ),
            );
        }
        regional.receiving.push(record);
    }

    /// A batch is complete: it is stored, acknowledged, marked and applied, in that order.
    pub(super) fn on_batch_end(&mut self, p: usize, lsn: u64) {
        if self.role != Role::Secondary || !self.peers[p].is_my_primary {
            return self.close_link(p, "a batch from a peer that is not this copy's primary");
        }
        if self.peers[p]
            .resync_in
            .as_ref()
            .is_some_and(|r| !r.end_received)
        {
            return self.close_link(p, "a batch end during a resync");
        }
        let regional = &mut self.peers[p].regional;
        let records = std::mem::take(&mut regional.receiving);
        regional.receiving_bytes = 0;
        if regional.batches.len() >= BATCHES_WAITING_MAX {
            // `can_receive` stopped reading before this: only a peer ignoring flow control
            // gets here.
            return self.close_link(p, "too many batches waiting to be applied");
        }
        regional.batches.push_back(BatchIn {
            lsn,
            records,
            step: BatchStep::Waiting,
        });
    }

    /// Moves the oldest complete batch of each regional link along.
    pub(super) fn advance_batches(&mut self, p: usize) {
        if self.peers[p]
            .resync_in
            .as_ref()
            .is_some_and(|resync| resync.batches_first == 0)
        {
            return; // batches that follow a resync's end wait for it to finish
        }
        let Some(batch) = self.peers[p].regional.batches.front() else {
            return;
        };
        match batch.step {
            BatchStep::Waiting => {
                if self.failed.is_some() {
                    return;
                }
                let batch = self.peers[p].regional.batches.front_mut().expect("checked");
                batch.step = BatchStep::Storing;
                let action = Action::StageBatch {
                    peer: p,
                    lsn: batch.lsn,
                    records: batch.records.clone(),
                };
                self.actions.push_back(action);
            }
            BatchStep::Storing | BatchStep::Applying => {}
            BatchStep::Marking { seq } => {
                let durable = self
                    .peers
                    .iter()
                    .map(|peer| peer.persisted_mark_seq)
                    .min()
                    .unwrap_or(u64::MAX);
                if durable < seq || self.failed.is_some() {
                    return;
                }
                let batch = self.peers[p].regional.batches.front_mut().expect("checked");
                batch.step = BatchStep::Applying;
                let action = Action::ApplyBatch {
                    peer: p,
                    lsn: batch.lsn,
                    records: batch.records.clone(),
                };
                self.actions.push_back(action);
            }
        }
    }

    /// An [`Action::StageBatch`] completed: the batch is durable here.
    pub fn batch_staged(&mut self, p: usize, result: Result<(), String>) {
        let Some(batch) = self.peers[p].regional.batches.front_mut() else {
            return;
        };
        if batch.step != BatchStep::Storing {
            return;
        }
        if let Err(error) = result {
            return self.fail(format!("storing a batch in the stage file: {error}"));
        }
        let lsn = batch.lsn;
        // Write-ahead marking: every peer may lack these blocks until it confirms `lsn`.
        self.mark_seq += 1;
        let seq = self.mark_seq;
        let ranges: Vec<(u64, u64)> = batch
            .records
            .iter()
            .map(|r| (r.offset_bytes, u64::from(r.len_bytes)))
            .collect();
        batch.step = BatchStep::Marking { seq };
        for peer in &mut self.peers {
            for &(offset, len) in &ranges {
                peer.map.mark(offset, len);
            }
            peer.map_state.marked(lsn);
        }
        if self.peers[p].is_my_primary {
            if let Err(error) = self.peers[p].session.acknowledge(lsn, lsn) {
                self.close_for(p, error);
            }
        }
    }

    /// An [`Action::ApplyBatch`] completed: this copy holds the primary's volume as of the
    /// batch's LSN.
    pub fn batch_applied(&mut self, p: usize, result: Result<(), String>) {
        let Some(batch) = self.peers[p].regional.batches.front() else {
            return;
        };
        if batch.step != BatchStep::Applying {
            return;
        }
        if let Err(error) = result {
            return self.fail(format!("applying batch {}: {error}", batch.lsn));
        }
        let lsn = batch.lsn;
        self.peers[p].regional.batches.pop_front();
        if let Some(resync) = self.peers[p].resync_in.as_mut() {
            resync.batches_first = resync.batches_first.saturating_sub(1);
        }
        assert!(lsn >= self.head_lsn, "batches apply in LSN order");
        self.head_lsn = lsn;
        self.appended_up_to = lsn;
        self.local_durable_lsn = lsn;
        self.settled_published = (lsn, lsn);
        for peer in &mut self.peers {
            // The batch's blocks were marked durably before it was applied.
            peer.covered_lsn = peer.covered_lsn.max(lsn);
            peer.covered_persisted_lsn = peer.covered_persisted_lsn.max(lsn);
        }
    }

    /// Whether a batch is being stored or applied, or waits to be.
    pub(super) fn batches_pending(&self) -> bool {
        self.peers.iter().any(|p| !p.regional.batches.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::RecordKind;
    use bytes::Bytes;

    use super::super::testing::write;

    #[test]
    fn a_batch_keeps_only_what_later_writes_do_not_cover() {
        let now = Instant::now();
        let mut batch = OpenBatch::default();
        batch.push(write(1, 0, 8192), now);
        batch.push(write(2, 4096, 4096), now); // partly over 1: both stay
        batch.push(write(3, 65536, 4096), now);
        assert_eq!(batch.cost_bytes(), 16384 + 3 * BATCH_RECORD_COST_BYTES);
        batch.push(write(4, 0, 16384), now); // covers 1 and 2 wholly
        assert_eq!(batch.coalesced_bytes, 8192 + 4096);
        let zero = WriteRecord {
            kind: RecordKind::Punch,
            data: Bytes::new(),
            ..write(5, 65536, 8192)
        };
        batch.push(zero, now); // a trim covers 3
        let lsns: Vec<u64> = batch.take().iter().map(|r| r.lsn).collect();
        assert_eq!(lsns, vec![4, 5], "the survivors, in LSN order");
        assert!(batch.is_empty());
        assert_eq!(batch.cost_bytes(), 0);
        assert_eq!(batch.due(Duration::from_secs(1)), None);
    }

    #[test]
    fn lag_is_the_age_of_the_oldest_write_not_confirmed() {
        let start = Instant::now();
        let mut lag = Lag::default();
        lag.push(1, start, 4096);
        lag.push(2, start + Duration::from_millis(1), 4096); // same step
        lag.push(3, start + Duration::from_millis(50), 512);
        assert_eq!(lag.bytes(), 8704);
        let now = start + Duration::from_millis(100);
        assert!((lag.seconds(now) - 0.1).abs() < 1e-9);
        lag.confirm(1); // a step goes only once all of it is confirmed
        assert_eq!(lag.bytes(), 8704);
        lag.confirm(2);
        assert_eq!(lag.bytes(), 512);
        assert!((lag.seconds(now) - 0.05).abs() < 1e-9);
        lag.confirm(3);
        assert_eq!((lag.bytes(), lag.seconds(now)), (0, 0.0));
    }

    // ---- two replicators over an in-memory link ----------------------------------------

    use super::super::testing::{carry_out, digests, pump, replicator};
    use super::super::{OpOutcome, ReplicaState, VERIFY_COARSE_BLOCK_BYTES};
    use crate::repl::Message;
    use std::collections::VecDeque;

    const SIZE: u64 = 16 << 20;

    fn node(name: &str, peer: &str, role: Role, now: Instant) -> Replicator {
        node_sized(name, peer, role, now, SIZE)
    }

    fn node_sized(name: &str, peer: &str, role: Role, now: Instant, size: u64) -> Replicator {
        let regional = RegionalConfig {
            interval: Duration::from_secs(1),
        };
        replicator(name, peer, role, now, size, Some(regional))
    }

    /// A primary `a` and its regional secondary `b`, linked and settled at `start`.
    fn linked_pair(start: Instant) -> (Replicator, Replicator) {
        let mut a = node("a", "b", Role::Primary, start);
        let mut b = node("b", "a", Role::Secondary, start);
        a.connected(0, start);
        b.connected(0, start);
        settle(&mut a, &mut b, start);
        (a, b)
    }

    /// Carries out every action of both sides until nothing moves; returns the batches the
    /// secondary applied.
    fn settle(a: &mut Replicator, b: &mut Replicator, now: Instant) -> Vec<(u64, Vec<u64>)> {
        let mut io = Vec::new();
        settle_catchup(a, b, now, &|_| true, &mut io);
        io.into_iter()
            .filter_map(|event| match event {
                Io::Applied(lsn, lsns) => Some((lsn, lsns)),
                _ => None,
            })
            .collect()
    }

    /// What the secondary's side of a staged catch-up did, in order.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Io {
        DeviceWrite,
        Staged(u64),
        Commit(u64),
        Apply(u64),
        Drop,
        /// A batch applied: its LSN and the LSNs of its records.
        Applied(u64, Vec<u64>),
    }

    /// Carries out every action of both sides until nothing moves, with `deliver` choosing
    /// which of `a`'s messages reach `b`, and the secondary's I/O recorded in `io`.
    fn settle_catchup(
        a: &mut Replicator,
        b: &mut Replicator,
        now: Instant,
        deliver: &dyn Fn(&Message) -> bool,
        io: &mut Vec<Io>,
    ) {
        drive(a, b, now, deliver, false, io)
    }

    /// Like `settle_catchup`, but holds the secondary's `CatchUpCommit` (recorded in `io`,
    /// never completed).
    fn settle_holding_commit(
        a: &mut Replicator,
        b: &mut Replicator,
        now: Instant,
        io: &mut Vec<Io>,
    ) {
        drive(a, b, now, &|_| true, true, io)
    }

    fn drive(
        a: &mut Replicator,
        b: &mut Replicator,
        now: Instant,
        deliver: &dyn Fn(&Message) -> bool,
        hold_commit: bool,
        io: &mut Vec<Io>,
    ) {
        let mut handle = |me: &mut Replicator, side: usize, action: Action| {
            // What the secondary's side did, in order; reads return zeros here.
            match &action {
                Action::DeviceWrite { .. } | Action::DeviceZero { .. } => io.push(Io::DeviceWrite),
                Action::CatchUpWrite { offset_bytes, .. } => io.push(Io::Staged(*offset_bytes)),
                Action::CatchUpCommit { lsn, .. } => {
                    io.push(Io::Commit(*lsn));
                    if hold_commit {
                        return None;
                    }
                }
                Action::CatchUpApply { lsn } => io.push(Io::Apply(*lsn)),
                Action::CatchUpDrop => io.push(Io::Drop),
                Action::ApplyBatch { lsn, records, .. } => {
                    io.push(Io::Applied(*lsn, records.iter().map(|r| r.lsn).collect()))
                }
                Action::Read { id, len_bytes, .. } => {
                    let zeros = Bytes::from(vec![0; *len_bytes as usize]);
                    me.read_done(*id, Ok(zeros));
                    return None;
                }
                _ => {}
            }
            carry_out(me, side, action).filter(|message| side == 1 || deliver(message))
        };
        pump(a, b, now, &mut handle, &mut |_, _| {});
    }

    /// A primary and its regional secondary that holds batch 1; then the link drops and the
    /// primary writes blocks 2..=5 the secondary lacks.
    fn apart_after_one_batch(start: Instant) -> (Replicator, Replicator, Instant) {
        let (mut a, mut b) = linked_pair(start);
        a.tap(write(1, 0, 4096), start);
        let mut now = start + Duration::from_secs(1);
        settle(&mut a, &mut b, now);
        assert_eq!(b.head_lsn(), 1);
        a.disconnected(0, "cut", now);
        b.disconnected(0, "cut", now);
        settle(&mut a, &mut b, now);
        for lsn in 2..=5u64 {
            a.tap(write(lsn, lsn * 65536, 4096), now);
        }
        now += Duration::from_millis(100);
        settle(&mut a, &mut b, now);
        (a, b, now)
    }

    #[test]
    fn a_catch_up_reaches_the_device_whole_at_its_end_and_the_copy_stays_consistent() {
        let start = Instant::now();
        let (mut a, mut b, now) = apart_after_one_batch(start);
        a.connected(0, now);
        b.connected(0, now);
        let mut io = Vec::new();
        settle_catchup(&mut a, &mut b, now, &|_| true, &mut io);
        assert!(!io.contains(&Io::DeviceWrite), "{io:?}");
        let staged = io.iter().filter(|e| matches!(e, Io::Staged(_))).count();
        // The four blocks it lacks, and block 0 of batch 1, still in its own map for the
        // primary (marked when applied, not yet cleared): the delta of the two maps.
        assert_eq!(staged, 5, "what the copy lacks is staged: {io:?}");
        let commit = io.iter().position(|e| *e == Io::Commit(5)).expect("commit");
        let apply = io.iter().position(|e| *e == Io::Apply(5)).expect("apply");
        let dropped = io.iter().position(|e| *e == Io::Drop).expect("drop");
        assert!(commit < apply && apply < dropped, "{io:?}");
        assert!(io[..commit].iter().all(|e| matches!(e, Io::Staged(_))));
        assert_eq!(b.head_lsn(), 5);
        assert!(b.meta().consistent);
        assert_eq!(b.meta().catchup_lsn, None);
        assert_eq!(a.status().peers[0].state, ReplicaState::InSync);
    }

    #[test]
    fn a_copy_promoted_during_its_catch_up_stays_at_its_last_batch() {
        let start = Instant::now();
        let (mut a, mut b, now) = apart_after_one_batch(start);
        a.connected(0, now);
        b.connected(0, now);
        let mut io = Vec::new();
        // The primary is lost after sending part of the catch-up, before its end.
        let deliver = |m: &Message| !matches!(m, Message::ResyncEnd { .. });
        settle_catchup(&mut a, &mut b, now, &deliver, &mut io);
        assert!(io.iter().any(|e| matches!(e, Io::Staged(_))), "{io:?}");
        assert!(
            b.meta().consistent,
            "a staged catch-up leaves the copy consistent"
        );
        b.begin_promote(true, now)
            .expect("a consistent copy may be promoted");
        let mut rest = Vec::new();
        let mut idle = node("x", "y", Role::Secondary, now);
        settle_catchup(&mut idle, &mut b, now, &|_| false, &mut rest);
        assert!(
            matches!(b.take_op_result(), Some(Ok(OpOutcome::Promoted { .. }))),
            "{:?}",
            b.status()
        );
        assert_eq!(b.role(), Role::Primary);
        assert_eq!(b.head_lsn(), 1, "promoted at its last batch boundary");
        assert!(
            !io.iter()
                .chain(&rest)
                .any(|e| matches!(e, Io::DeviceWrite | Io::Commit(_) | Io::Apply(_))),
            "nothing of the unfinished catch-up reached the device: {io:?} {rest:?}"
        );
        assert!(rest.contains(&Io::Drop) || io.contains(&Io::Drop));
    }

    /// Found by the simulator (seed 4294967297): a primary rolled back by a resync kept the
    /// lag of the writes it had tapped before, above its new head, so once primary again it
    /// showed its regional peer `lagging`, with a `lag_seconds` growing for ever.
    #[test]
    fn a_copy_rolled_back_and_promoted_again_counts_no_lag_of_its_old_writes() {
        let start = Instant::now();
        let (mut a, mut b, mut now) = apart_after_one_batch(start);
        // a's site is lost: b is promoted at its last batch (1); a held writes 2..=5.
        b.begin_promote(true, now).expect("promote b");
        let mut io = Vec::new();
        let mut idle = node("x", "y", Role::Secondary, now);
        settle_catchup(&mut idle, &mut b, now, &|_| false, &mut io);
        assert_eq!(b.role(), Role::Primary);
        // a comes back, meets the newer generation and gives up its writes after 1.
        a.connected(0, now);
        b.connected(0, now);
        settle_catchup(&mut a, &mut b, now, &|_| true, &mut io);
        assert_eq!(a.role(), Role::Secondary);
        // Its demotion closed the stream: the next one resyncs it.
        a.disconnected(0, "demoted", now);
        b.disconnected(0, "demoted", now);
        a.connected(0, now);
        b.connected(0, now);
        settle_catchup(&mut a, &mut b, now, &|_| true, &mut io);
        assert_eq!(a.head_lsn(), 1, "{:?} {:?}", a.status(), b.status());
        // Failing back: b steps down, a is promoted, and b follows it again.
        now += Duration::from_secs(1);
        b.begin_demote().expect("demote b");
        settle_catchup(&mut a, &mut b, now, &|_| true, &mut io);
        a.disconnected(0, "failback", now);
        b.disconnected(0, "failback", now);
        a.begin_promote(true, now).expect("promote a");
        settle_catchup(&mut a, &mut idle, now, &|_| false, &mut io);
        assert_eq!(a.role(), Role::Primary);
        a.connected(0, now);
        b.connected(0, now);
        settle_catchup(&mut a, &mut b, now, &|_| true, &mut io);
        now += Duration::from_secs(5);
        settle_catchup(&mut a, &mut b, now, &|_| true, &mut io);
        let status = a.status();
        assert_eq!(
            status.peers[0].state,
            ReplicaState::InSync,
            "no write is missing at b: {status:?}"
        );
        assert_eq!(status.peers[0].lag_seconds, Some(0.0));
    }

    #[test]
    fn a_catch_up_the_file_cannot_take_is_abandoned_and_the_next_one_writes_in_place() {
        let start = Instant::now();
        let (mut a, mut b, now) = apart_after_one_batch(start);
        a.connected(0, now);
        b.connected(0, now);
        // The first staged write fails (no space): the catch-up is abandoned.
        a.advance(now);
        b.advance(now);
        let mut failed = false;
        for _ in 0..200 {
            while let Some(action) = a.poll_action() {
                match action {
                    Action::Transmit { message, .. } => b.message(0, message, now),
                    Action::PersistMeta { .. } => a.meta_persisted(Ok(())),
                    Action::PersistMap { peer, .. } => a.map_persisted(peer, Ok(())),
                    Action::JournalFlush => {
                        let head = a.head_lsn();
                        a.journal_flushed(Ok(head));
                    }
                    Action::Read { id, len_bytes, .. } => {
                        a.read_done(id, Ok(bytes::Bytes::from(vec![7; len_bytes as usize])))
                    }
                    _ => {}
                }
            }
            while let Some(action) = b.poll_action() {
                match action {
                    Action::Transmit { message, .. } => a.message(0, message, now),
                    Action::PersistMeta { .. } => b.meta_persisted(Ok(())),
                    Action::PersistMap { peer, .. } => b.map_persisted(peer, Ok(())),
                    Action::JournalReset { .. } => b.journal_reset(Ok(())),
                    Action::CatchUpWrite { id, .. } => {
                        failed = true;
                        b.device_done(id, Err("No space left on device".into()))
                    }
                    Action::DeviceWrite { .. } => panic!("staged first"),
                    _ => {}
                }
            }
            a.advance(now);
            b.advance(now);
            if failed {
                break;
            }
        }
        assert!(failed);
        assert!(b.meta().consistent);
        assert_eq!(b.head_lsn(), 1);
        assert!(b
            .take_notices()
            .iter()
            .any(|n| n.contains("could not take the catch-up")));
        // The next link catches up in place.
        a.disconnected(0, "restart", now);
        b.disconnected(0, "restart", now);
        let mut io = Vec::new();
        settle_catchup(&mut a, &mut b, now, &|_| true, &mut io);
        a.connected(0, now);
        b.connected(0, now);
        settle_catchup(&mut a, &mut b, now, &|_| true, &mut io);
        assert!(io.contains(&Io::DeviceWrite), "{io:?}");
        assert!(!io.iter().any(|e| matches!(e, Io::Staged(_))), "{io:?}");
        assert_eq!(b.head_lsn(), 5);
        assert!(b.meta().consistent);
    }

    #[test]
    fn writes_never_wait_and_the_secondary_applies_whole_coalesced_batches() {
        let start = Instant::now();
        let (mut a, mut b) = linked_pair(start);
        assert_eq!(
            a.status().peers[0].state,
            ReplicaState::InSync,
            "{:?}",
            a.status()
        );
        let generation = a.status().generation;
        // Three writes, the first overwritten by the third: each completes at once.
        let mut now = start + Duration::from_millis(10);
        for (lsn, offset) in [(1, 0), (2, 8192), (3, 0)] {
            a.tap(write(lsn, offset, 4096), now);
            assert_eq!(
                a.settled(),
                (lsn, lsn),
                "a regional peer never holds a write"
            );
        }
        assert!(
            settle(&mut a, &mut b, now).is_empty(),
            "nothing ships before the cut"
        );
        assert!(a.status().peers[0].lag_bytes > 0);
        now += Duration::from_secs(1);
        let applied = settle(&mut a, &mut b, now);
        assert_eq!(
            applied,
            vec![(3, vec![2, 3])],
            "one batch, without the overwritten write"
        );
        assert_eq!(b.head_lsn(), 3, "the secondary is as of the batch's end");
        let status = a.status();
        assert_eq!(status.peers[0].lag_bytes, 0);
        assert_eq!(status.peers[0].coalesced_bytes, 4096);
        assert_eq!(
            status.generation, generation,
            "no generation for a regional peer"
        );
    }

    #[test]
    fn a_batch_ends_only_where_the_primary_journal_is_durable() {
        let start = Instant::now();
        let (mut a, mut b) = linked_pair(start);
        for lsn in 1..=3u64 {
            a.tap(write(lsn, lsn * 8192, 4096), start);
        }
        // No tick makes the journal durable for a regional peer, so at the cut the records
        // go, and the batch's end waits for one fdatasync.
        let now = start + Duration::from_secs(1);
        a.advance(now);
        let mut flushes = 0;
        while let Some(action) = a.poll_action() {
            match action {
                Action::Transmit {
                    message: Message::BatchEnd { .. },
                    ..
                } => panic!("a batch end before the journal is durable through it"),
                Action::Transmit { message, .. } => b.message(0, message, now),
                Action::JournalFlush => flushes += 1,
                _ => {}
            }
        }
        assert_eq!(flushes, 1);
        assert_eq!(b.peers[0].regional.receiving.len(), 3);
        a.journal_flushed(Ok(3));
        a.advance(now);
        let mut ends = Vec::new();
        while let Some(action) = a.poll_action() {
            if let Action::Transmit {
                message: Message::BatchEnd { lsn },
                ..
            } = action
            {
                ends.push(lsn);
            }
        }
        assert_eq!(ends, vec![3]);
    }

    #[test]
    fn lagging_means_a_whole_interval_behind_the_batch_schedule() {
        let config = RegionalConfig {
            interval: Duration::from_secs(1),
        };
        assert!(!behind_schedule(0.0, config));
        assert!(!behind_schedule(1.4, config), "a batch crossing the link");
        assert!(behind_schedule(2.1, config));
    }

    #[test]
    fn a_planned_demotion_ships_the_open_batch_and_waits_until_the_peer_holds_it() {
        let start = Instant::now();
        let now = start + Duration::from_millis(10);
        let pair = || {
            let (mut a, b) = linked_pair(start);
            for lsn in 1..=3u64 {
                a.tap(write(lsn, lsn * 8192, 4096), now);
            }
            a.begin_demote().expect("demote");
            (a, b)
        };
        // The batch goes before its interval, and the role changes (closing the link) only
        // once the peer holds it.
        let (mut a, mut b) = pair();
        let applied = settle(&mut a, &mut b, now);
        assert_eq!(applied, vec![(3, vec![1, 2, 3])]);
        assert_eq!(b.head_lsn(), 3, "the regional copy holds every write");
        assert_eq!(a.take_op_result(), Some(Ok(OpOutcome::Demoted)));
        // While nothing reaches the peer, the role does not change; a link that drops is not
        // waited for (what the peer lacks is in its map).
        let (mut a, mut b) = pair();
        settle_catchup(&mut a, &mut b, now, &|_| false, &mut Vec::new());
        assert_eq!(a.take_op_result(), None, "waits for the regional peer");
        assert_eq!(a.status().role, Role::Primary);
        a.disconnected(0, "lost", now);
        settle_catchup(&mut a, &mut b, now, &|_| false, &mut Vec::new());
        assert_eq!(a.take_op_result(), Some(Ok(OpOutcome::Demoted)));
    }

    #[test]
    fn a_catch_up_refused_after_its_end_drops_the_batches_that_followed_it() {
        let start = Instant::now();
        let (mut a, mut b, now) = apart_after_one_batch(start);
        a.connected(0, now);
        b.connected(0, now);
        let mut io = Vec::new();
        settle_holding_commit(&mut a, &mut b, now, &mut io);
        assert!(io.contains(&Io::Commit(5)), "{io:?}");
        // The primary ships on after the catch-up's end: one batch, record 6.
        a.tap(write(6, 7 * 65536, 4096), now);
        let later = now + Duration::from_secs(2);
        settle_holding_commit(&mut a, &mut b, later, &mut io);
        // The catch-up file cannot take the commit (no space).
        b.catchup_committed(Err("No space left on device".into()));
        let mut idle = node("x", "y", Role::Secondary, later);
        let mut rest = Vec::new();
        settle_catchup(&mut idle, &mut b, later, &|_| false, &mut rest);
        assert!(
            !io.iter().chain(&rest).any(|e| *e == Io::Apply(5)),
            "the catch-up never applied"
        );
        assert!(
            !rest.iter().any(|e| matches!(e, Io::Applied(6, _))),
            "batch 6 applied onto the copy at LSN 1 that lacks 2..=5: head {} consistent {}",
            b.head_lsn(),
            b.meta().consistent
        );
    }

    #[test]
    fn a_catch_up_ends_while_writes_keep_arriving_during_each_flush() {
        let start = Instant::now();
        let (mut a, mut b, now) = apart_after_one_batch(start);
        a.connected(0, now);
        b.connected(0, now);
        let mut next = 6u64;
        let mut flushes = 0;
        let mut ended = false;
        'outer: for _ in 0..5000 {
            let mut moved = false;
            for side in 0..2 {
                let (me, other) = if side == 0 {
                    (&mut a, &mut b)
                } else {
                    (&mut b, &mut a)
                };
                me.advance(now);
                while let Some(action) = me.poll_action() {
                    moved = true;
                    match action {
                        Action::Transmit { message, .. } => {
                            if matches!(message, Message::ResyncEnd { .. }) {
                                ended = true;
                            }
                            other.message(0, message, now)
                        }
                        Action::JournalFlush => {
                            flushes += 1;
                            let head = me.head_lsn();
                            if side == 0 && flushes < 200 {
                                // A client write lands while the fdatasync runs.
                                me.tap(write(next, (next % 64) * 65536, 4096), now);
                                next += 1;
                            }
                            me.journal_flushed(Ok(head));
                        }
                        Action::CloseStream { .. } => {}
                        Action::PersistMeta { .. } => me.meta_persisted(Ok(())),
                        Action::PersistMap { peer, .. } => me.map_persisted(peer, Ok(())),
                        Action::JournalReset { .. } => me.journal_reset(Ok(())),
                        Action::DeviceWrite { id, .. } | Action::DeviceZero { id, .. } => {
                            me.device_done(id, Ok(()))
                        }
                        Action::DeviceSync => me.device_synced(Ok(())),
                        Action::Read { id, len_bytes, .. } => {
                            me.read_done(id, Ok(bytes::Bytes::from(vec![0; len_bytes as usize])))
                        }
                        Action::CatchUpWrite { id, .. } => me.device_done(id, Ok(())),
                        Action::CatchUpCommit { .. } => me.catchup_committed(Ok(())),
                        Action::CatchUpApply { .. } => me.catchup_applied(Ok(())),
                        Action::CatchUpDrop => {}
                        Action::StageBatch { peer, .. } => me.batch_staged(peer, Ok(())),
                        Action::ApplyBatch { peer, .. } => me.batch_applied(peer, Ok(())),
                        other => panic!("unexpected action {other:?}"),
                    }
                }
            }
            if !moved {
                break 'outer;
            }
        }
        assert!(ended, "the catch-up's end went while writes kept coming");
        assert!(
            flushes < 5,
            "one flush per catch-up end, not one per write that arrives during it: {flushes}"
        );
    }

    #[test]
    fn a_resync_keeps_about_half_a_second_of_the_peers_rate_in_flight() {
        // The initial sync of a 256 MiB volume over a link that carries 12.5 MB/s (100 Mbit/s)
        // of resync data: what is sent beyond what the link carries waits in a queue. Time
        // moves in 10 ms steps; the primary's messages wait in a FIFO that lets that step's
        // share of bytes through.
        const RATE: f64 = 12.5e6;
        let step = Duration::from_millis(10);
        let start = Instant::now();
        let mut a = node_sized("a", "b", Role::Primary, start, 256 << 20);
        let mut b = node_sized("b", "a", Role::Secondary, start, 256 << 20);
        a.connected(0, start);
        b.connected(0, start);
        let mut link: VecDeque<Message> = VecDeque::new();
        let (mut now, mut carried, mut credit) = (start, 0u64, 0.0f64);
        let mut most_in_flight = 0u64;
        for n in 0..500u32 {
            credit += RATE * step.as_secs_f64();
            while let Some(message) = link.front() {
                let len = match message {
                    Message::ResyncData { data, .. } => data.len() as u64,
                    _ => 0,
                };
                if len as f64 > credit {
                    break;
                }
                credit -= len as f64;
                carried += len;
                let message = link.pop_front().expect("front");
                b.message(0, message, now);
            }
            if link.is_empty() {
                credit = credit.min(RATE * step.as_secs_f64());
            }
            for side in 0..2 {
                let me = if side == 0 { &mut a } else { &mut b };
                let mut to_a = Vec::new();
                me.advance(now);
                while let Some(action) = me.poll_action() {
                    match carry_out(me, side, action) {
                        Some(message) if side == 0 => link.push_back(message),
                        Some(message) => to_a.push(message),
                        None => {}
                    }
                }
                for message in to_a {
                    a.message(0, message, now);
                }
            }
            // After the first window (16 MiB, before a rate is measured) has drained.
            if n >= 300 {
                most_in_flight = most_in_flight.max(a.peers[0].session.resync_inflight_bytes());
            }
            now += step;
        }
        let seconds = (now - start).as_secs_f64();
        assert!(
            carried as f64 >= 0.9 * RATE * seconds,
            "the link stays busy: {carried} bytes in {seconds} s"
        );
        let target = RATE * super::super::RESYNC_QUEUE_TARGET.as_secs_f64();
        assert!(
            (most_in_flight as f64) < 1.5 * target,
            "in flight at most {most_in_flight} bytes, about {target} wanted, not the whole \
             window of {}",
            super::super::WINDOW_BYTES
        );
    }

    /// Carries out both sides' actions until nothing moves, except those of the secondary
    /// `hold` picks, which go to `held`. Digests read as all 0 on the primary and all 1 on
    /// the secondary.
    fn step_holding(
        a: &mut Replicator,
        b: &mut Replicator,
        now: Instant,
        hold: &mut dyn FnMut(&Action) -> bool,
        held: &mut Vec<Action>,
    ) {
        let mut handle = |me: &mut Replicator, side: usize, action: Action| {
            if side == 1 && hold(&action) {
                held.push(action);
                return None;
            }
            carry_out(me, side, action)
        };
        pump(a, b, now, &mut handle, &mut |_, _| {});
    }

    #[test]
    fn a_verify_repair_that_begins_behind_a_batch_being_stored_ends() {
        // A verify with repair where every block differs: while the secondary computes its
        // last digests, the primary cuts a batch (a write to blocks already compared) and it
        // reaches the secondary; the repair's resync then begins on the link behind it, while
        // the secondary still stores the batch. The batch came first: it must be applied, and
        // the resync must then run and end. Around it: a write still in the open batch when
        // the repair starts (it goes out in a batch before the resync begins), and one after.
        let start = Instant::now();
        let (mut a, mut b) = linked_pair(start);
        a.tap(write(1, 0, 4096), start);
        let mut now = start + Duration::from_secs(1);
        let mut held = Vec::new();
        step_holding(&mut a, &mut b, now, &mut |_| false, &mut held);
        assert_eq!(b.head_lsn(), 1);
        a.begin_verify("b", true, now).expect("verify");
        // The secondary's digests: one coarse request, then one per differing MiB; the last
        // is held.
        let last = 1 + SIZE / VERIFY_COARSE_BLOCK_BYTES;
        let mut served = 0;
        for _ in 0..1000 {
            now += Duration::from_millis(10);
            let mut hold = |action: &Action| {
                if matches!(action, Action::Digest { .. }) {
                    served += 1;
                    return served == last;
                }
                false
            };
            step_holding(&mut a, &mut b, now, &mut hold, &mut held);
            if !held.is_empty() {
                break;
            }
        }
        let [Action::Digest {
            id,
            len_bytes,
            block_bytes,
            ..
        }] = std::mem::take(&mut held)[..]
        else {
            panic!("the secondary's last digest is held");
        };
        a.tap(write(2, 0, 4096), now);
        now += Duration::from_secs(1);
        let mut hold_stage = |action: &Action| matches!(action, Action::StageBatch { .. });
        step_holding(&mut a, &mut b, now, &mut hold_stage, &mut held);
        assert!(
            matches!(held[..], [Action::StageBatch { lsn: 2, .. }]),
            "{held:?}"
        );
        // A write the open batch still holds when the repair starts: it goes out whole
        // before the resync begins, not after its end (below it).
        a.tap(write(3, 131_072, 4096), now);
        b.digest_done(id, Ok(digests(1, len_bytes, block_bytes)));
        step_holding(&mut a, &mut b, now, &mut hold_stage, &mut held);
        // A write after the repair began: its block goes with the resync.
        a.tap(write(4, 196_608, 4096), now);
        now += Duration::from_secs(1);
        step_holding(&mut a, &mut b, now, &mut hold_stage, &mut held);
        assert!(a.peers[0]
            .resync_out
            .as_ref()
            .is_some_and(|resync| resync.ended_at == Some(4)));
        let Some(Action::StageBatch { peer, .. }) = held.pop() else {
            panic!("the batch is held");
        };
        b.batch_staged(peer, Ok(()));
        let mut hold_apply = |action: &Action| matches!(action, Action::ApplyBatch { .. });
        for _ in 0..100 {
            now += Duration::from_millis(10);
            step_holding(&mut a, &mut b, now, &mut hold_apply, &mut held);
        }
        assert!(
            b.peers[0].resync_in.is_some(),
            "the repair's resync began behind the batch"
        );
        let Some(Action::ApplyBatch { peer, lsn: 2, .. }) = held.pop() else {
            panic!("the batch that came first is applied first, resync or not: {held:?}");
        };
        b.batch_applied(peer, Ok(()));
        for _ in 0..1000 {
            now += Duration::from_millis(10);
            step_holding(&mut a, &mut b, now, &mut |_| false, &mut held);
        }
        assert_eq!(b.head_lsn(), a.head_lsn());
        assert!(
            b.peers[0].resync_in.is_none() && !b.batches_pending(),
            "the batch was applied and the repair's resync ended"
        );
        let verify = a.verify("b").expect("a verify ran");
        assert!(
            !verify.running && verify.repaired && verify.differing_bytes > 0,
            "{verify:?}"
        );
    }

    #[test]
    fn max_rate_paces_what_a_batch_puts_on_the_link() {
        let start = Instant::now();
        let mut a = node("a", "b", Role::Primary, start);
        a.peers[0].config.resync_max_rate_bytes_per_s = Some(1 << 20);
        let mut b = node("b", "a", Role::Secondary, start);
        a.connected(0, start);
        b.connected(0, start);
        settle(&mut a, &mut b, start);
        // 2 MiB written in 64 KiB records; the batch is cut after the interval.
        for lsn in 1..=32u64 {
            a.tap(write(lsn, lsn * 65536, 65536), start);
        }
        let mut now = start + Duration::from_secs(1);
        settle(&mut a, &mut b, now);
        now += Duration::from_millis(500);
        settle(&mut a, &mut b, now);
        let received = b.peers[0].regional.receiving.len();
        // A burst of 1 MiB after the idle second, then 1 MiB/s: well short of the 32.
        assert!(
            (8..=25).contains(&received),
            "1 MiB of burst and half a second at 1 MiB/s let 16 to 24 records of 64 KiB go, not {received}"
        );
        let mut applied = Vec::new();
        for _ in 0..1000 {
            let due = a
                .poll_timeout()
                .expect("the paced records wait for a timer");
            now = now.max(due);
            applied.extend(settle(&mut a, &mut b, now));
            if !applied.is_empty() {
                break;
            }
        }
        assert_eq!(applied.len(), 1, "the whole batch arrives, paced");
        let took = now - (start + Duration::from_secs(1));
        assert!(
            took >= Duration::from_millis(900) && took <= Duration::from_millis(2200),
            "2 MiB at 1 MiB/s with a 1 MiB burst took {took:?}"
        );
    }
}
