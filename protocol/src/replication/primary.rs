//! The primary's side: records as they get their LSN, shipping, acknowledgements, progress
//! reports, the generation rule and the resyncs it sends.

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{
    Action, Peer, Plan, RangeSet, Replicator, ResyncOut, TailRecord, HANDOVER_HOLD_BYTES,
    RESYNC_CHUNK_BYTES, RESYNC_QUEUE_TARGET, RESYNC_RATE_SAMPLE, RESYNC_READS_MAX,
    RESYNC_WINDOW_MIN_BYTES, RESYNC_WINDOW_START_BYTES, ZERO_RUN_BYTES_MAX,
};
use crate::generation::Role;
use crate::repl::{DirtyRange, Message, PeerProgress, ResyncKind, WriteRecord};

impl Replicator {
    /// A record got its LSN in the primary's journal (called by the journal writer, in LSN
    /// order, as it assigns the LSN). Ships it to every peer receiving records; for the
    /// others it is marked at the next [`advance`](Self::advance).
    pub fn tap(&mut self, record: WriteRecord, now: Instant) {
        self.now = self.now.max(now);
        assert!(
            self.role == Role::Primary,
            "only a primary's journal is tapped"
        );
        assert_eq!(
            record.lsn,
            self.head_lsn + 1,
            "records are tapped in LSN order"
        );
        self.head_lsn = record.lsn;
        self.appended_up_to = record.lsn;
        let len_bytes = u64::from(record.len_bytes);
        if self.peers.is_empty() {
            return; // a standalone volume: nobody to ship to or mark for
        }
        self.tail.push_back(TailRecord {
            lsn: record.lsn,
            offset_bytes: record.offset_bytes,
            len_bytes,
        });
        for p in 0..self.peers.len() {
            if self.is_regional(p) {
                self.peers[p]
                    .regional
                    .lag
                    .push(record.lsn, now, len_bytes.max(1));
                if self.shipping_records(p) {
                    self.batch_record(p, record.clone());
                    self.pump_queue(p);
                    self.flush_transmits(p);
                    continue;
                }
            }
            if self.shipping_records(p) {
                self.peers[p].queue.push_back(record.clone());
                self.pump_queue(p);
                self.flush_transmits(p);
            } else if let Some(resync) = self.peers[p].resync_out.as_mut() {
                if resync.started && resync.ended_at.is_none() {
                    // Its blocks are read again: the read that sends them may predate it.
                    resync.todo.insert(record.offset_bytes, len_bytes);
                    let end = record.offset_bytes + len_bytes;
                    for (id, (offset, len)) in &resync.reads {
                        if *offset < end && record.offset_bytes < offset + len {
                            resync.stale_reads.insert(*id);
                        }
                    }
                }
            }
            if let Some(verify) = self.peers[p].verify.as_mut() {
                verify.written(record.offset_bytes, len_bytes);
            }
        }
    }

    /// Whether records ship to peer `p` as they are tapped.
    pub(super) fn shipping_records(&self, p: usize) -> bool {
        let peer = &self.peers[p];
        self.role == Role::Primary
            && peer.session.is_up()
            && matches!(peer.plan, Some(Plan::Ship { .. }))
            && peer
                .resync_out
                .as_ref()
                .is_none_or(|r| r.ended_at.is_some() || r.end_pending.is_some())
    }

    /// A client FLUSH made the local journal durable up to `lsn`: asks every peer receiving
    /// records for the same (they otherwise make theirs durable every [`DURABLE_INTERVAL`]).
    ///
    /// [`DURABLE_INTERVAL`]: super::DURABLE_INTERVAL
    pub fn request_durable(&mut self, lsn: u64) {
        self.local_durable(lsn);
        if self.role != Role::Primary {
            return;
        }
        let lsn = lsn.min(self.head_lsn);
        for p in 0..self.peers.len() {
            let peer = &mut self.peers[p];
            peer.flush_request_lsn = peer.flush_request_lsn.max(lsn);
            if self.shipping_records(p) {
                self.pump_queue(p);
                self.flush_transmits(p);
            }
        }
    }

    /// Sends queued records while the window has room, then the durability a FLUSH asked
    /// for, as far as it was sent.
    pub(super) fn pump_queue(&mut self, p: usize) {
        if self.is_regional(p) {
            // No FLUSH waits for a regional peer.
            return self.pump_batches(p);
        }
        let now = self.now;
        while let Some(record) = self.peers[p].queue.front() {
            let len_bytes = record.data.len() as u64;
            if !self.peers[p].session.can_send(len_bytes) {
                break;
            }
            let record = self.peers[p].queue.pop_front().expect("checked");
            if let Err(error) = self.peers[p].session.send_record(record, now) {
                self.close_for(p, error);
                return;
            }
        }
        let shipping = self.shipping_records(p);
        let peer = &mut self.peers[p];
        let upto = peer.flush_request_lsn.min(peer.session.sent_lsn());
        if shipping && upto > peer.flush_sent_lsn && upto > peer.acked_durable_lsn {
            peer.flush_sent_lsn = upto;
            if let Err(error) = peer.session.send(Message::Flush { upto_lsn: upto }) {
                self.close_for(p, error);
            }
        }
    }

    pub(super) fn on_ack(&mut self, p: usize, journal_lsn: u64, durable_lsn: u64) {
        let head = self.head_lsn;
        let peer = &mut self.peers[p];
        peer.acked_journal_lsn = peer.acked_journal_lsn.max(journal_lsn);
        peer.confirm(durable_lsn);
        peer.regional.lag.confirm(durable_lsn);
        let ended = peer
            .resync_out
            .as_ref()
            .and_then(|r| r.ended_at)
            .is_some_and(|end| durable_lsn >= end);
        if ended {
            let resync = peer.resync_out.take().expect("checked");
            if peer.config.regional.is_some() {
                // A regional peer's records are always marked, those tapped since the end
                // too, and it may not hold them yet: the marks stay until it confirms every
                // record marked (never cleared here: that lost writes after a restart of the
                // peer, tests/it/regional.rs).
                peer.map_state = super::MapState {
                    marked_through_lsn: head,
                    resync_only: false,
                };
            } else {
                // The peer holds this copy as of the end, durably: every mark is stale.
                peer.map.clear_all();
                peer.map_state = super::MapState::default();
            }
            peer.resynced_bytes = resync.sent_bytes;
            peer.resyncs_completed += 1;
            peer.last_resync_full = resync.full;
            peer.split_brain = false;
            peer.last_error = None;
            // Progress sent while the peer was finishing the resync was not taken, and is not
            // sent again until it changes: the peer's marks for third copies then stay until
            // the next write (a needless resync at worst). Re-sending it at once let a secondary
            // clear marks of blocks the resync had written that a third copy lacked
            // (simulator seed 2155).
            let name = peer.config.name.clone();
            self.meta.set_protecting(&name, true);
        }
        self.pump_queue(p);
    }

    /// Tells each peer receiving records how far this copy and its other peers hold them.
    pub(super) fn send_progress(&mut self) {
        for p in 0..self.peers.len() {
            if !self.shipping_records(p) {
                continue;
            }
            let peers: Vec<PeerProgress> = (0..self.peers.len())
                .filter(|q| *q != p)
                .map(|q| PeerProgress {
                    node: self.peers[q].config.name.clone(),
                    durable_lsn: self
                        .confirming(q)
                        .then_some(self.peers[q].acked_durable_lsn),
                })
                .collect();
            // Only what the peer itself was sent: its acks bound what it may confirm.
            let durable_lsn = self.local_durable_lsn.min(self.peers[p].session.sent_lsn());
            let progress = (durable_lsn, peers);
            if self.peers[p].progress_sent.as_ref() == Some(&progress) {
                continue;
            }
            self.peers[p].progress_sent = Some(progress.clone());
            let (durable_lsn, peers) = progress;
            if let Err(error) = self.peers[p]
                .session
                .send(Message::Progress { durable_lsn, peers })
            {
                self.close_for(p, error);
            }
        }
    }

    /// The generation rule (module doc): when a peer that may hold the current generation
    /// stops confirming records of it, start a new one, once the journal is durable.
    pub(super) fn maybe_start_generation(&mut self) {
        if self.role != Role::Primary || self.failed.is_some() {
            return;
        }
        let (generation, start) = self.persisted_generation();
        if self.meta.lineage.current_generation() != generation {
            return; // one is being stored
        }
        let needed = (0..self.peers.len()).any(|p| {
            let peer = &self.peers[p];
            // A regional peer holds a prefix: writes it lacks are a tail to give up if it is
            // promoted, not a split brain.
            peer.config.regional.is_none()
                && !self.confirming(p)
                && peer.knows_generation >= generation
                && self.head_lsn >= start
                && self.head_lsn > peer.acked_durable_lsn
        });
        if !needed {
            return;
        }
        if self.local_durable_lsn < self.head_lsn {
            // A generation never starts past the durable head: a power loss must not leave
            // a history naming records this copy lost.
            self.flush_wanted_lsn = self.flush_wanted_lsn.max(self.head_lsn);
            return;
        }
        // Records up to what completion has published are done; every later one may yet
        // complete by marks, so the new generation starts right after. With no such record
        // yet, it waits for the first: a generation that holds nothing would only outrank,
        // in a handshake, a copy an operator promoted meanwhile (a restarted primary, fenced,
        // must give way to it).
        let first_unsettled = self.settled().1.saturating_add(1);
        if first_unsettled > self.head_lsn {
            return;
        }
        let start_lsn = first_unsettled.clamp(start, self.head_lsn + 1);
        let highest_seen = self
            .peers
            .iter()
            .map(|p| p.knows_generation)
            .max()
            .unwrap_or(0);
        let mut lineage = self.meta.lineage.clone();
        lineage.head_lsn = start_lsn - 1;
        if let Err(error) = lineage.start_generation(&self.config.node, highest_seen) {
            self.fail(format!("cannot start a generation: {error}"));
            return;
        }
        lineage.head_lsn = 0;
        self.meta.lineage = lineage;
    }

    /// Peers receiving records learn a generation this copy started (so that a promotion of
    /// one of them meets this copy as related, not as a split brain).
    pub(super) fn announce_generation(&mut self) {
        if self.role != Role::Primary {
            return;
        }
        let Some(entry) = self.meta_persisted.lineage.current().cloned() else {
            return;
        };
        for p in 0..self.peers.len() {
            if !self.shipping_records(p)
                || self.peers[p].knows_generation >= entry.generation
                || entry.start_lsn > self.peers[p].session.sent_lsn() + 1
            {
                continue;
            }
            self.peers[p].knows_generation = entry.generation;
            let message = Message::NewGeneration {
                entry: entry.clone(),
            };
            if let Err(error) = self.peers[p].session.send(message) {
                self.close_for(p, error);
            }
        }
    }

    /// A fenced primary is released once every peer that protects it has answered.
    pub(super) fn update_fence(&mut self) {
        if self.fenced
            && self.peers.iter().all(|p| {
                p.contacted || p.config.regional.is_some() || !self.meta.protecting(p.name())
            })
        {
            self.fenced = false;
        }
    }

    /// A resync near its end holds new writes so the hand-over converges under load.
    pub(super) fn update_holding(&mut self) {
        // Never for a regional peer: the WAN must not stall the primary.
        self.holding = self.peers.iter().any(|peer| {
            peer.config.regional.is_none()
                && peer.resync_out.as_ref().is_some_and(|r| {
                    r.started
                        && r.ended_at.is_none()
                        && !r.waiting_for_ranges
                        && r.sent_bytes >= r.first_pass_bytes
                        && r.todo.bytes() <= HANDOVER_HOLD_BYTES
                })
        });
    }

    // ---- the resync this copy sends ------------------------------------------------------

    pub(super) fn new_resync_out(&self, full: bool, waiting_for_ranges: bool) -> ResyncOut {
        ResyncOut {
            full,
            waiting_for_ranges,
            started: false,
            todo: RangeSet::default(),
            reads: Default::default(),
            stale_reads: Default::default(),
            zero_run: None,
            sent_bytes: 0,
            data_bytes: 0,
            started_at: self.now,
            first_pass_bytes: 0,
            ended_at: None,
            end_pending: None,
            written_rate: None,
            rate_sample: None,
        }
    }

    /// Measures the rate at which peer `p` writes what the resync sends, in samples of
    /// [`RESYNC_RATE_SAMPLE`], each started only while something is in flight (so a resync
    /// waiting for its reads does not read as a slow peer; a pause inside a sample still
    /// lowers it, and the average of two samples recovers within the next).
    fn sample_resync_rate(&mut self, p: usize) {
        let now = self.now;
        let peer = &mut self.peers[p];
        let written = peer.session.resync_written_bytes();
        let busy = peer.session.resync_inflight_bytes() > 0;
        let Some(resync) = peer.resync_out.as_mut() else {
            return;
        };
        match resync.rate_sample {
            Some((_, base)) if written < base => {
                // A new session counts from zero again.
                resync.rate_sample = busy.then_some((now, written));
            }
            Some((since, base)) if now >= since + RESYNC_RATE_SAMPLE => {
                let rate = (written - base) as f64 / (now - since).as_secs_f64();
                resync.written_rate = Some(match resync.written_rate {
                    Some(before) => (before + rate) / 2.0,
                    None => rate,
                });
                resync.rate_sample = busy.then_some((now, written));
            }
            Some(_) => {}
            None => resync.rate_sample = busy.then_some((now, written)),
        }
    }

    /// Resync bytes peer `p` may have in flight now: [`RESYNC_QUEUE_TARGET`] of its measured
    /// write rate, within [`RESYNC_WINDOW_MIN_BYTES`] and the session's window.
    fn resync_window(&self, resync: &ResyncOut) -> u64 {
        let most = self.config.window_bytes;
        match resync.written_rate {
            None => RESYNC_WINDOW_START_BYTES.min(most),
            Some(rate) => {
                let want = (rate * RESYNC_QUEUE_TARGET.as_secs_f64()).clamp(0.0, most as f64);
                // In [0, most]: the conversion neither truncates beyond u64 nor loses a sign.
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let want = want as u64;
                want.clamp(RESYNC_WINDOW_MIN_BYTES.min(most), most)
            }
        }
    }

    pub(super) fn on_dirty_ranges(&mut self, p: usize, ranges: &[DirtyRange], last: bool) {
        let peer = &mut self.peers[p];
        let Some(resync) = peer.resync_out.as_mut() else {
            return;
        };
        if !resync.waiting_for_ranges {
            return;
        }
        for range in ranges {
            peer.map.mark(range.offset_bytes, range.len_bytes);
        }
        if !ranges.is_empty() {
            // The peer's own changes: only a resync explains them.
            peer.map_state.resync_only = true;
        }
        if last {
            resync.waiting_for_ranges = false;
        }
    }

    /// When the rate cap lets the resync read next, if it is waiting for it.
    pub(super) fn resync_due(&self, peer: &Peer, resync: &ResyncOut) -> Option<Instant> {
        let rate = peer.config.resync_max_rate_bytes_per_s?;
        if !resync.started || resync.ended_at.is_some() || self.holding {
            return None;
        }
        let due =
            resync.started_at + Duration::from_secs_f64(resync.data_bytes as f64 / rate as f64);
        (due > self.now).then_some(due)
    }

    pub(super) fn pump_resync(&mut self, p: usize, now: Instant) {
        if self.role != Role::Primary || !self.peers[p].session.is_up() {
            return;
        }
        let Some(resync) = self.peers[p].resync_out.as_ref() else {
            return;
        };
        if resync.waiting_for_ranges || resync.ended_at.is_some() {
            return;
        }
        if !resync.started {
            if self.is_regional(p) && !self.batches_out_before_resync(p) {
                return; // `advance` comes back once they are
            }
            self.begin_resync(p);
            return;
        }
        self.sample_resync_rate(p);
        let resync = self.peers[p].resync_out.as_ref().expect("checked");
        let due = self.resync_due(&self.peers[p], resync);
        let window = self.resync_window(resync);
        let peer = &mut self.peers[p];
        let resync = peer.resync_out.as_mut().expect("checked");
        if due.is_none() {
            // Reads in flight are sent once done: they count against the window too.
            let mut reading: u64 = resync.reads.values().map(|&(_, len)| len).sum();
            while resync.reads.len() < RESYNC_READS_MAX
                && peer
                    .session
                    .can_send_resync(reading + RESYNC_CHUNK_BYTES, window)
            {
                let Some((offset_bytes, len_bytes)) = resync.todo.pop(RESYNC_CHUNK_BYTES) else {
                    break;
                };
                let id = self.next_id;
                self.next_id += 1;
                resync.reads.insert(id, (offset_bytes, len_bytes));
                reading += len_bytes;
                self.actions.push_back(Action::Read {
                    id,
                    offset_bytes,
                    len_bytes,
                });
            }
        }
        let _ = now;
        if resync.todo.is_empty() && resync.reads.is_empty() {
            self.end_resync(p);
        }
    }

    fn begin_resync(&mut self, p: usize) {
        let head = self.head_lsn;
        let peer = &mut self.peers[p];
        let resync = peer.resync_out.as_mut().expect("a resync to begin");
        if resync.full {
            peer.map.mark_all();
            peer.map_state.resync_only = true;
        }
        let mut todo = RangeSet::default();
        for (offset, len) in peer.map.all_ranges() {
            todo.insert(offset, len);
        }
        let total = todo.bytes();
        resync.todo = todo;
        resync.first_pass_bytes = total;
        resync.started = true;
        resync.started_at = self.now;
        let kind = if resync.full {
            ResyncKind::Full
        } else {
            ResyncKind::Delta
        };
        if let Err(error) = peer.session.send_resync_begin(kind, total, head) {
            self.close_for(p, error);
        }
    }

    /// Sends the merged zero range, if any.
    fn flush_zero_run(&mut self, p: usize) -> bool {
        let Some(resync) = self.peers[p].resync_out.as_mut() else {
            return false;
        };
        let Some((offset_bytes, len_bytes)) = resync.zero_run.take() else {
            return true;
        };
        let message = Message::ResyncZero {
            offset_bytes,
            len_bytes,
        };
        match self.peers[p].session.send(message) {
            Ok(()) => true,
            Err(error) => {
                self.close_for(p, error);
                false
            }
        }
    }

    /// Nothing left to send: every record up to the head is at the peer. Ends at the head,
    /// in the stored lineage (waiting for a generation being stored).
    fn end_resync(&mut self, p: usize) {
        if !self.meta_settled() {
            return;
        }
        if !self.flush_zero_run(p) {
            return;
        }
        let pending = self.peers[p]
            .resync_out
            .as_ref()
            .and_then(|r| r.end_pending);
        let lsn = pending.unwrap_or(self.head_lsn);
        if self.is_regional(p) && !self.durable_through(lsn) {
            // The end is fixed here, so that writes that keep coming cannot push it away:
            // they go into batches, which wait behind it. `journal_flushed` moves on.
            if let Some(resync) = self.peers[p].resync_out.as_mut() {
                resync.end_pending = Some(lsn);
            }
            return;
        }
        let lineage = self.persisted_lineage();
        let generation = lineage.current_generation();
        let peer = &mut self.peers[p];
        if let Err(error) = peer.session.send_resync_end(lsn, lineage) {
            self.close_for(p, error);
            return;
        }
        peer.knows_generation = peer.knows_generation.max(generation);
        if let Some(resync) = peer.resync_out.as_mut() {
            resync.ended_at = Some(lsn);
            resync.end_pending = None;
        }
        self.holding = false;
        if self.is_regional(p) {
            self.pump_queue(p); // the batches that waited behind the end
        }
    }

    /// A [`Action::Read`] completed.
    pub fn read_done(&mut self, id: u64, result: Result<Bytes, String>) {
        let Some(p) = self.peers.iter().position(|peer| {
            peer.resync_out
                .as_ref()
                .is_some_and(|r| r.reads.contains_key(&id))
        }) else {
            return; // the resync it was for is gone
        };
        let resync = self.peers[p].resync_out.as_mut().expect("found above");
        let (offset_bytes, len_bytes) = resync.reads.remove(&id).expect("found above");
        if resync.stale_reads.remove(&id) {
            // A record overlapped it: a later read sends the range (never older data after
            // newer).
            resync.todo.insert(offset_bytes, len_bytes);
            return;
        }
        let data = match result {
            Ok(data) if data.len() as u64 == len_bytes => data,
            Ok(_) | Err(_) => {
                // A read error is the volume's (it fails on its own); try the range again.
                resync.todo.insert(offset_bytes, len_bytes);
                return;
            }
        };
        resync.sent_bytes += len_bytes;
        if data.iter().all(|b| *b == 0) {
            match &mut resync.zero_run {
                Some((at, run))
                    if *at + *run == offset_bytes && *run + len_bytes <= ZERO_RUN_BYTES_MAX =>
                {
                    *run += len_bytes;
                    return;
                }
                _ => {}
            }
            if !self.flush_zero_run(p) {
                return;
            }
            if let Some(resync) = self.peers[p].resync_out.as_mut() {
                resync.zero_run = Some((offset_bytes, len_bytes));
            }
            return;
        }
        if !self.flush_zero_run(p) {
            return;
        }
        if let Some(resync) = self.peers[p].resync_out.as_mut() {
            resync.data_bytes += len_bytes;
        }
        if let Err(error) = self.peers[p].session.send_resync_data(offset_bytes, data) {
            self.close_for(p, error);
        }
        self.flush_transmits(p);
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::super::testing::{
        alone, carry_out, cut, pump, reconnect, replicator, settle, write,
    };
    use super::super::{Action, ReplicaState, Replicator, MAP_PERSIST_INTERVAL};
    use crate::generation::Role;

    /// A metro primary `a` and its secondary `b` (a `size`-byte volume), in sync, then cut.
    fn synced_then_cut(start: Instant, size: u64) -> (Replicator, Replicator) {
        let mut a = replicator("a", "b", Role::Primary, start, size, None);
        let mut b = replicator("b", "a", Role::Secondary, start, size, None);
        a.connected(0, start);
        b.connected(0, start);
        settle(&mut a, &mut b, start);
        cut(&mut a, &mut b, start);
        (a, b)
    }

    /// Carries out `me`'s actions with the link down; returns how many map stores it made.
    fn run_counting_stores(me: &mut Replicator, now: Instant) -> usize {
        let mut stores = 0;
        for _ in 0..1000 {
            me.advance(now);
            let mut moved = false;
            while let Some(action) = me.poll_action() {
                moved = true;
                if matches!(action, Action::PersistMap { .. }) {
                    stores += 1;
                }
                let _ = carry_out(me, 0, action);
            }
            if !moved {
                return stores;
            }
        }
        panic!("never settles");
    }

    #[test]
    fn a_lost_metro_peers_marks_are_stored_at_most_every_interval_and_at_once_when_it_returns() {
        // A store per client write (a state slot, a page, two fdatasyncs) kept degraded
        // writes 1.3-1.9x standalone; the journal holds each record until its marks are in.
        let start = Instant::now();
        let (mut a, mut b) = synced_then_cut(start, 16 << 20);
        let mut now = start;
        let mut stores = 0;
        let writes = 50u64;
        let step = Duration::from_millis(10);
        for lsn in 1..=writes {
            now += step;
            a.tap(write(lsn, lsn * 65536, 4096), now);
            stores += run_counting_stores(&mut a, now);
            assert!(
                a.apply_limit() <= a.peers[0].covered_persisted_lsn,
                "the journal keeps every record whose marks are not stored"
            );
        }
        assert_eq!(a.status().peers[0].state, ReplicaState::Degraded);
        // Completion never waited for a store: the writes settled on marks in memory (after
        // the generation that lets them, which the first ones waited for).
        assert_eq!(a.settled().1, writes, "{}", a.explain(0));
        assert!(a.peers[0].covered_persisted_lsn < writes);
        let elapsed = step * u32::try_from(writes).expect("small");
        let most = elapsed.as_millis() / MAP_PERSIST_INTERVAL.as_millis() + 1;
        assert!(
            (1..=most as usize).contains(&stores),
            "{stores} stores in {elapsed:?} for {writes} writes"
        );
        // The rest goes once the interval is over, and the journal may release everything.
        now += MAP_PERSIST_INTERVAL;
        run_counting_stores(&mut a, now);
        assert_eq!(a.peers[0].covered_persisted_lsn, writes);
        // With marks waiting, the peer's return stores them at once.
        now += Duration::from_millis(1);
        a.tap(write(writes + 1, 0, 4096), now);
        run_counting_stores(&mut a, now);
        assert!(a.peers[0].covered_persisted_lsn < writes + 1);
        reconnect(&mut a, &mut b, now);
        settle(&mut a, &mut b, now);
        assert_eq!(a.peers[0].covered_persisted_lsn, writes + 1);
        assert_eq!(a.status().peers[0].state, ReplicaState::InSync);
        assert_eq!(b.head_lsn(), writes + 1);
    }

    #[test]
    fn a_resyncing_metro_peers_marks_are_stored_at_most_every_interval() {
        // A peer that is connected but resyncing confirms nothing as it comes: its writes are
        // marked, and a store per pass would cost as much as it did for a peer away.
        let start = Instant::now();
        let (mut a, mut b) = synced_then_cut(start, 64 << 20);
        let mut now = start;
        for lsn in 1..=64u64 {
            a.tap(write(lsn, (lsn - 1) * (1 << 20), 1 << 20), now);
        }
        alone(&mut a, 0, now);
        now += MAP_PERSIST_INTERVAL;
        alone(&mut a, 0, now);
        reconnect(&mut a, &mut b, now);
        // The peer's device writes of the resync never complete: it stays resyncing.
        let stores = std::cell::Cell::new(0usize);
        let mut hold = |me: &mut Replicator, side: usize, action: Action| {
            if side == 1
                && matches!(
                    action,
                    Action::DeviceWrite { .. } | Action::DeviceZero { .. }
                )
            {
                return None;
            }
            if side == 0 && matches!(action, Action::PersistMap { .. }) {
                stores.set(stores.get() + 1);
            }
            carry_out(me, side, action)
        };
        pump(&mut a, &mut b, now, &mut hold, &mut |_, _| {});
        let still_resyncing = |a: &Replicator| {
            assert_eq!(
                a.status().peers[0].state,
                ReplicaState::Resyncing,
                "{}",
                a.explain(0)
            );
        };
        still_resyncing(&a);
        let before = stores.get();
        let writes = 50u64;
        let step = Duration::from_millis(10);
        for i in 1..=writes {
            now += step;
            a.tap(write(64 + i, i * 65536, 4096), now);
            pump(&mut a, &mut b, now, &mut hold, &mut |_, _| {});
        }
        still_resyncing(&a);
        assert_eq!(a.settled().1, 64 + writes, "{}", a.explain(0));
        let elapsed = step * u32::try_from(writes).expect("small");
        let most = elapsed.as_millis() / MAP_PERSIST_INTERVAL.as_millis() + 1;
        assert!(
            stores.get() - before <= most as usize,
            "{} stores in {elapsed:?} for {writes} writes",
            stores.get() - before
        );
        // The store left waiting is not forgotten: a wake-up comes by the interval's end (its
        // own, or an earlier timer's), the store is made then, and the journal may release
        // every record.
        let head = a.head_lsn();
        assert!(a.peers[0].covered_persisted_lsn < head);
        let wake = a.poll_timeout().expect("a wake-up for the waiting store");
        assert!(wake <= now + MAP_PERSIST_INTERVAL, "{wake:?}");
        now += MAP_PERSIST_INTERVAL;
        pump(&mut a, &mut b, now, &mut hold, &mut |_, _| {});
        assert_eq!(a.peers[0].covered_persisted_lsn, head, "{}", a.explain(0));
        assert_eq!(a.apply_limit(), head);
    }
}
