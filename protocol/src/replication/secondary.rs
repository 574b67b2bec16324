//! The receiving side: records journaled under the primary's LSNs, progress reports, learned
//! generations, and the resyncs this copy receives.

use std::collections::VecDeque;

use super::{
    Action, DeviceOp, EndStep, InPhase, PendingAppend, Replicator, ResyncIn, TailRecord,
    DEVICE_BYTES_IN_FLIGHT_MAX,
};
use crate::generation::Role;
use crate::repl::{DirtyRange, Message, PeerProgress, WriteRecord, DIRTY_RANGES_PER_FRAME_MAX};

impl Replicator {
    pub(super) fn on_record(&mut self, p: usize, record: WriteRecord) {
        if self.role != Role::Secondary || !self.peers[p].is_my_primary {
            return self.close_link(p, "a record from a peer that is not this copy's primary");
        }
        if let Some(resync) = self.peers[p].resync_in.as_ref() {
            if !resync.end_received {
                // Records follow a resync's end (their LSNs count from it): one before it
                // could never be journaled in order.
                return self.close_link(
                    p,
                    &format!("record {} arrived before the resync's end", record.lsn),
                );
            }
            // It follows the resync's end: journaled once the end is done.
            self.peers[p].deferred.push_back(record);
            return;
        }
        // The session checked the order against what this link received; the journal must
        // take the record next too (a link that began while records of an earlier one were
        // still being journaled is closed in `start_receiving`, so only a peer that broke
        // the protocol gets here). Never an assertion: this runs on a peer's input.
        let next = self.appended_up_to.saturating_add(1);
        if record.lsn != next {
            return self.close_link(
                p,
                &format!(
                    "record {} does not follow this copy's journal (its next LSN is {next})",
                    record.lsn
                ),
            );
        }
        self.appended_up_to = record.lsn;
        self.appends.push_back(PendingAppend {
            lsn: record.lsn,
            offset_bytes: record.offset_bytes,
            len_bytes: u64::from(record.len_bytes),
            fua: record.fua,
        });
        self.actions.push_back(Action::Append { record });
    }

    /// The oldest [`Action::Append`] completed (they complete in the order issued).
    pub fn appended(&mut self, result: Result<(), String>) {
        let Some(PendingAppend {
            lsn,
            offset_bytes,
            len_bytes,
            fua,
        }) = self.appends.pop_front()
        else {
            return;
        };
        if let Err(error) = result {
            return self.fail(format!("journaling record {lsn}: {error}"));
        }
        assert_eq!(lsn, self.head_lsn + 1, "records are journaled in LSN order");
        self.head_lsn = lsn;
        self.tail.push_back(TailRecord {
            lsn,
            offset_bytes,
            len_bytes,
        });
        if fua {
            self.local_durable_lsn = lsn;
        }
        for p in 0..self.peers.len() {
            if self.peers[p].is_my_primary && self.peers[p].resync_in.is_none() {
                let durable = self.local_durable_lsn;
                if let Err(error) = self.peers[p].session.acknowledge(lsn, durable) {
                    self.close_for(p, error);
                }
            }
        }
    }

    pub(super) fn on_progress(&mut self, p: usize, durable_lsn: u64, peers: &[PeerProgress]) {
        if !self.peers[p].is_my_primary || self.peers[p].resync_in.is_some() {
            return;
        }
        let head = self.head_lsn;
        self.peers[p].confirm(durable_lsn.min(head));
        for q in 0..self.peers.len() {
            if q == p {
                continue;
            }
            let name = self.peers[q].config.name.clone();
            let reported = peers
                .iter()
                .find(|entry| entry.node == name)
                .and_then(|entry| entry.durable_lsn);
            self.peers[q].third_durable_lsn = reported;
            if let Some(lsn) = reported {
                self.peers[q].confirm(lsn.min(head));
            }
        }
    }

    pub(super) fn on_resync_message(&mut self, p: usize, message: Message) {
        if self.role != Role::Secondary || !self.peers[p].is_my_primary {
            return self.close_link(p, "resync data from a peer that is not this copy's primary");
        }
        if let Message::ResyncBegin { kind, .. } = &message {
            if self.peers[p].resync_in.is_none() {
                // A resync the primary starts on a link that was carrying records (records
                // it marked during the handshake, a verify repair): nothing to report first.
                // The link carried records: this copy holds a prefix of the primary's.
                let resync = self.new_resync_in(p, *kind == crate::repl::ResyncKind::Full, true);
                self.peers[p].resync_in = Some(ResyncIn {
                    phase: InPhase::Preparing {
                        reset_issued: false,
                    },
                    ..resync
                });
                return;
            }
        }
        let Some(resync) = self.peers[p].resync_in.as_mut() else {
            return self.close_link(p, "resync data outside a resync");
        };
        if resync.end_received && !matches!(message, Message::ResyncBegin { .. }) {
            return self.close_link(p, "resync data after the resync's end");
        }
        if matches!(message, Message::ResyncEnd { .. }) {
            resync.end_received = true;
        }
        match (&message, resync.phase) {
            (Message::ResyncBegin { kind, .. }, InPhase::Reporting | InPhase::AwaitingBegin) => {
                resync.full = *kind == crate::repl::ResyncKind::Full;
                resync.phase = InPhase::Preparing {
                    reset_issued: false,
                };
            }
            (Message::ResyncBegin { .. }, _) => {
                self.close_link(p, "a second resync begin");
            }
            _ => {
                // Write-ahead marking: the blocks are marked for every peer now, and written
                // once the marks are durable (see `Replicator::mark_seq`).
                let range = match &message {
                    Message::ResyncData { offset_bytes, data } => {
                        Some((*offset_bytes, data.len() as u64))
                    }
                    Message::ResyncZero {
                        offset_bytes,
                        len_bytes,
                    } => Some((*offset_bytes, *len_bytes)),
                    _ => None,
                };
                let seq = match range {
                    Some((offset, len)) => {
                        self.mark_seq += 1;
                        for peer in &mut self.peers {
                            peer.map.mark(offset, len);
                            peer.map_state.marked_through_lsn = u64::MAX;
                        }
                        self.mark_seq
                    }
                    None => 0,
                };
                if let Some(resync) = self.peers[p].resync_in.as_mut() {
                    resync.backlog.push_back((message, seq));
                }
            }
        }
    }

    /// A resync from peer `p` into this copy. `forward`: this copy holds nothing the primary
    /// lacks (it rolls nothing back), so the resync only moves it to a later point of the
    /// same history. A forward, delta resync of a consistent copy over a regional link is
    /// *staged*: it goes to the catch-up file first and reaches the device as one unit at
    /// its end, so the copy stays at its last batch boundary until then.
    pub(super) fn new_resync_in(&mut self, p: usize, full: bool, forward: bool) -> ResyncIn {
        let id = self.next_resync_id;
        self.next_resync_id += 1;
        let regional_delta = self.is_regional(p) && !full && forward;
        let consistent = self.meta.consistent && self.meta_persisted.consistent;
        let staged = regional_delta && consistent && self.peers[p].regional.stage_refused.is_none();
        if let (true, true, Some(reason)) = (
            regional_delta,
            consistent,
            self.peers[p].regional.stage_refused.as_ref(),
        ) {
            self.notices.push_back(format!(
                "volume {}: the catch-up from {} writes the device in place, because the catch-up file could not take the last one ({reason}): this copy is inconsistent, and cannot be promoted, until it ends",
                self.config.volume,
                self.peers[p].name()
            ));
        }
        ResyncIn {
            staged,
            batches_first: self.peers[p].regional.batches.len(),
            id,
            full,
            phase: InPhase::Reporting,
            backlog: VecDeque::new(),
            written_bytes: 0,
            lineage: None,
            end_received: false,
        }
    }

    /// Everything of the receiving side that waits on a condition.
    pub(super) fn advance_receiving(&mut self, p: usize) {
        self.learn_pending_generation(p);
        if self.peers[p].resync_in.is_none() {
            return;
        }
        let phase = self.peers[p].resync_in.as_ref().expect("checked").phase;
        match phase {
            InPhase::Reporting => self.report_ranges(p),
            InPhase::AwaitingBegin => {}
            InPhase::Preparing { reset_issued } => self.prepare_resync(p, reset_issued),
            InPhase::Receiving => self.drain_backlog(p),
            InPhase::Ending { lsn, step } => self.end_resync_in(p, lsn, step),
        }
    }

    /// A generation the primary started, learned once this copy holds its first record's
    /// predecessor (and stored like any lineage change).
    fn learn_pending_generation(&mut self, p: usize) {
        if self.peers[p].resync_in.is_some() {
            return; // it follows the resync's end, and applies to the lineage adopted there
        }
        let Some(entry) = self.peers[p].pending_generation.as_ref() else {
            return;
        };
        if entry.start_lsn > self.head_lsn + 1 {
            return;
        }
        let entry = self.peers[p].pending_generation.take().expect("checked");
        let mut lineage = self.lineage();
        if lineage.learn_relabel(entry).is_ok() {
            lineage.head_lsn = 0;
            self.meta.lineage = lineage;
        }
    }

    /// Sends this copy's map for the primary (after marking every record it holds that the
    /// primary has not confirmed): the blocks the primary must send back.
    fn report_ranges(&mut self, p: usize) {
        // The mark pass of this step ran before (the peer does not confirm while a resync is
        // pending): the map covers the whole journal.
        if self.peers[p].covered_lsn < self.head_lsn {
            return;
        }
        let ranges: Vec<DirtyRange> = self.peers[p]
            .map
            .all_ranges()
            .into_iter()
            .map(|(offset_bytes, len_bytes)| DirtyRange {
                offset_bytes,
                len_bytes,
            })
            .collect();
        let frames: Vec<&[DirtyRange]> = ranges.chunks(DIRTY_RANGES_PER_FRAME_MAX).collect();
        let count = frames.len().max(1);
        for i in 0..count {
            let frame = frames.get(i).map_or_else(Vec::new, |f| f.to_vec());
            let message = Message::DirtyRanges {
                ranges: frame,
                last: i + 1 == count,
            };
            if let Err(error) = self.peers[p].session.send(message) {
                return self.close_for(p, error);
            }
        }
        if let Some(resync) = self.peers[p].resync_in.as_mut() {
            resync.phase = InPhase::AwaitingBegin;
        }
    }

    /// Before the device is written directly, every record of the journal is marked for
    /// every peer (durably), and the journal is applied and emptied.
    fn prepare_resync(&mut self, p: usize, reset_issued: bool) {
        if reset_issued {
            return; // `journal_reset` moves on
        }
        let head = self.head_lsn;
        let all_covered = self
            .peers
            .iter()
            .all(|peer| peer.covered_persisted_lsn >= head);
        // Batches that arrived before the resync began are applied first; those that follow
        // its end (they may arrive while this copy prepares) wait for it. Another peer's
        // batches (a primary this copy followed before) are applied first too: the journal
        // must not restart under them.
        let batches_first = self.peers[p]
            .resync_in
            .as_ref()
            .is_some_and(|resync| resync.batches_first > 0)
            || self
                .peers
                .iter()
                .enumerate()
                .any(|(q, peer)| q != p && !peer.regional.batches.is_empty());
        if !all_covered || !self.appends.is_empty() || self.reset_in_flight || batches_first {
            return;
        }
        self.reset_in_flight = true;
        self.actions
            .push_back(Action::JournalReset { next_lsn: head + 1 });
        if let Some(resync) = self.peers[p].resync_in.as_mut() {
            resync.phase = InPhase::Preparing { reset_issued: true };
        }
        // This copy's records are about to change: what the peers confirmed of them no
        // longer says anything about what it will hold.
        for peer in &mut self.peers {
            peer.acked_journal_lsn = 0;
            peer.acked_durable_lsn = 0;
            peer.confirmed = false;
        }
    }

    /// A [`Action::JournalReset`] completed.
    pub fn journal_reset(&mut self, result: Result<(), String>) {
        self.reset_in_flight = false;
        if let Err(error) = result {
            return self.fail(format!("restarting the journal: {error}"));
        }
        // Every record it held was covered for every peer before it was issued.
        self.tail.clear();
        for peer in &mut self.peers {
            if let Some(resync) = peer.resync_in.as_mut() {
                match resync.phase {
                    InPhase::Preparing { reset_issued: true } => resync.phase = InPhase::Receiving,
                    InPhase::Ending {
                        lsn,
                        step: EndStep::Reset,
                    } => {
                        resync.phase = InPhase::Ending {
                            lsn,
                            step: EndStep::Maps,
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Turns queued resync messages into device writes, in order, within the limits.
    fn drain_backlog(&mut self, p: usize) {
        loop {
            let marks_durable_seq = self
                .peers
                .iter()
                .map(|peer| peer.persisted_mark_seq)
                .min()
                .unwrap_or(u64::MAX);
            let Some(resync) = self.peers[p].resync_in.as_mut() else {
                return;
            };
            let Some((message, seq)) = resync.backlog.front() else {
                return;
            };
            let seq = *seq;
            match message {
                Message::ResyncEnd { lsn, lineage } => {
                    resync.lineage = Some(lineage.clone());
                    resync.phase = InPhase::Ending {
                        lsn: *lsn,
                        step: EndStep::Drain,
                    };
                    resync.backlog.pop_front();
                    return;
                }
                Message::ResyncData { .. } | Message::ResyncZero { .. } => {
                    let staged = resync.staged;
                    // The copy is marked inconsistent, durably, before its device changes (a
                    // staged catch-up leaves the device alone until its end).
                    if !staged {
                        if self.meta.consistent {
                            self.meta.consistent = false;
                        }
                        if self.meta_persisted.consistent {
                            return;
                        }
                    }
                    if marks_durable_seq < seq {
                        return; // its marks are not durable yet
                    }
                    // Writes of an earlier resync still in flight could land after this one's
                    // on the same blocks: they finish first.
                    let current = resync.id;
                    let (offset, len) = match message {
                        Message::ResyncData { offset_bytes, data } => {
                            (*offset_bytes, data.len() as u64)
                        }
                        Message::ResyncZero {
                            offset_bytes,
                            len_bytes,
                        } => (*offset_bytes, *len_bytes),
                        _ => unreachable!("matched above"),
                    };
                    // The sender sends a block again when it was written after it was read:
                    // the newer copy must land last, so it waits for any write in flight
                    // over the same blocks.
                    let overlaps = self.device_ops.values().any(|op| {
                        op.offset_bytes < offset + len && offset < op.offset_bytes + op.len_bytes
                    });
                    if self.device_bytes_in_flight >= DEVICE_BYTES_IN_FLIGHT_MAX
                        || self.device_ops.values().any(|op| op.resync != current)
                        || overlaps
                    {
                        return;
                    }
                    let (message, _) = resync.backlog.pop_front().expect("checked");
                    let id = self.next_id;
                    self.next_id += 1;
                    let (offset_bytes, len_bytes, action) =
                        resync_write(id, current, message, staged);
                    self.device_ops.insert(
                        id,
                        DeviceOp {
                            peer: p,
                            staged,
                            resync: current,
                            offset_bytes,
                            len_bytes,
                        },
                    );
                    // A zero range costs the device little but counts its size, bounded.
                    self.device_bytes_in_flight += len_bytes.min(DEVICE_BYTES_IN_FLIGHT_MAX);
                    self.actions.push_back(action);
                }
                _ => {
                    resync.backlog.pop_front();
                }
            }
        }
    }

    /// A [`Action::DeviceWrite`] or [`Action::DeviceZero`] completed.
    pub fn device_done(&mut self, id: u64, result: Result<(), String>) {
        let Some(op) = self.device_ops.remove(&id) else {
            return;
        };
        self.device_bytes_in_flight = self
            .device_bytes_in_flight
            .saturating_sub(op.len_bytes.min(DEVICE_BYTES_IN_FLIGHT_MAX));
        if let Err(error) = result {
            if op.staged {
                return self.catchup_refused(op.peer, op.resync, error);
            }
            return self.fail(format!("writing resync data to the device: {error}"));
        }
        // Its blocks were marked for every peer before it was issued.
        let peer = &mut self.peers[op.peer];
        let Some(resync) = peer.resync_in.as_mut().filter(|r| r.id == op.resync) else {
            return;
        };
        resync.written_bytes += op.len_bytes;
        let written = resync.written_bytes;
        if let Err(error) = peer.session.acknowledge_resync(written) {
            self.close_for(op.peer, error);
        }
    }

    /// The end of a resync into this copy, step by step (see [`EndStep`]).
    fn end_resync_in(&mut self, p: usize, lsn: u64, step: EndStep) {
        let staged = self.peers[p].resync_in.as_ref().is_some_and(|r| r.staged);
        let next = match step {
            EndStep::Drain if staged => {
                if !self.device_ops.is_empty() {
                    return;
                }
                let catchup = self.peers[p].resync_in.as_ref().expect("checked").id;
                self.actions
                    .push_back(Action::CatchUpCommit { catchup, lsn });
                EndStep::Commit
            }
            EndStep::Commit | EndStep::Apply => return, // their completions move on
            EndStep::Adopt => {
                // Once the meta names the committed catch-up, a restart applies it before
                // anything reads the volume: from here the copy is as of `lsn`, in the
                // sender's lineage.
                if self.meta.catchup_lsn != Some(lsn) {
                    let Some(lineage) = self.peers[p]
                        .resync_in
                        .as_ref()
                        .and_then(|r| r.lineage.clone())
                    else {
                        return;
                    };
                    self.meta.lineage.adopt(&lineage, 0);
                    self.meta.catchup_lsn = Some(lsn);
                }
                if !self.meta_settled() {
                    return;
                }
                self.actions.push_back(Action::CatchUpApply { lsn });
                EndStep::Apply
            }
            EndStep::Drain => {
                if !self.device_ops.is_empty() || self.device_sync_in_flight {
                    return;
                }
                self.device_sync_in_flight = true;
                self.actions.push_back(Action::DeviceSync);
                EndStep::Sync
            }
            EndStep::Sync => return, // `device_synced` moves on
            EndStep::Reset => {
                if self.reset_in_flight || !self.appends.is_empty() {
                    return;
                }
                self.reset_in_flight = true;
                self.actions
                    .push_back(Action::JournalReset { next_lsn: lsn + 1 });
                return; // `journal_reset` moves on to Maps
            }
            EndStep::Maps => {
                // Every block received is marked for every peer; the marks of the sender's
                // map are all explained by its copy at `lsn` now, so it confirms them once it
                // holds `lsn` durably.
                // This copy now holds exactly the sender's volume as of `lsn`: a peer that
                // holds that durably (the sender itself, or a fellow secondary the sender
                // reports) holds everything this copy does, whatever marked its blocks.
                for peer in &mut self.peers {
                    peer.map_state.marked_through_lsn = lsn;
                    peer.map_state.resync_only = false;
                }
                let pending = self.peers.iter().any(|peer| {
                    peer.map_persist.is_some()
                        || peer.map.has_changes()
                        || peer.map_state != peer.map_state_persisted
                });
                if pending {
                    return; // persisted by this step's `maybe_persist_map`, checked again
                }
                let Some(lineage) = self.peers[p]
                    .resync_in
                    .as_ref()
                    .and_then(|r| r.lineage.clone())
                else {
                    return;
                };
                let mut adopted = self.meta.lineage.clone();
                adopted.adopt(&lineage, 0);
                self.meta.lineage = adopted;
                self.meta.consistent = true;
                self.meta.catchup_lsn = None;
                // A pending resolution is done: this copy holds the winner's lineage.
                let resolution = self.meta.resolving_with.is_some();
                #[cfg(test)]
                self.adoptions.push((p, lsn, resolution));
                let _ = resolution;
                self.meta.resolving_with = None;
                EndStep::Meta
            }
            EndStep::Meta => {
                if !self.meta_settled() {
                    return;
                }
                self.finish_resync_in(p, lsn);
                return;
            }
        };
        if let Some(resync) = self.peers[p].resync_in.as_mut() {
            resync.phase = InPhase::Ending { lsn, step: next };
        }
    }

    /// A [`Action::DeviceSync`] completed.
    pub fn device_synced(&mut self, result: Result<(), String>) {
        self.device_sync_in_flight = false;
        if let Err(error) = result {
            return self.fail(format!("fdatasync of the device: {error}"));
        }
        for peer in &mut self.peers {
            if let Some(resync) = peer.resync_in.as_mut() {
                if let InPhase::Ending {
                    lsn,
                    step: EndStep::Sync,
                } = resync.phase
                {
                    resync.phase = InPhase::Ending {
                        lsn,
                        step: EndStep::Reset,
                    };
                }
            }
        }
    }

    /// The copy now holds the sender's volume as of `lsn`, durably, with its lineage stored.
    fn finish_resync_in(&mut self, p: usize, lsn: u64) {
        let resync = self.peers[p].resync_in.take();
        // This copy holds the sender's writes now.
        self.peers[p].holds_newer = false;
        if resync.is_some_and(|r| r.staged) {
            self.actions.push_back(Action::CatchUpDrop);
        }
        self.peers[p].regional.stage_refused = None;
        self.head_lsn = lsn;
        self.appended_up_to = lsn;
        self.local_durable_lsn = lsn;
        self.flush_wanted_lsn = self.flush_wanted_lsn.min(lsn);
        self.settled_published = (lsn, lsn);
        self.tail.clear();
        for peer in &mut self.peers {
            // Everything this copy holds is in the persisted maps (the `Maps` step), and the
            // journal restarted at `lsn`: coverage restarts there too.
            peer.covered_lsn = lsn;
            peer.covered_persisted_lsn = lsn;
            peer.acked_journal_lsn = 0;
            peer.acked_durable_lsn = 0;
            peer.confirmed = false;
            // Writes this copy tapped as a primary before are no longer its history (a rolled
            // back tail may even sit above `lsn`, where no acknowledgement would ever confirm
            // it): what a regional peer lacks is counted again from here.
            peer.regional.lag = super::regional::Lag::default();
        }
        let peer = &mut self.peers[p];
        peer.split_brain = false;
        peer.last_error = None;
        if let Err(error) = peer.session.acknowledge(lsn, lsn) {
            return self.close_for(p, error);
        }
        let deferred = std::mem::take(&mut self.peers[p].deferred);
        for record in deferred {
            if !self.peers[p].is_my_primary {
                break; // a record closed the link: the rest go with it
            }
            self.on_record(p, record);
        }
        // The links to the other peers decided over the lineage this copy had: decide again.
        for q in 0..self.peers.len() {
            if q != p && self.peers[q].session.is_connected() {
                self.close_link(q, "this copy took another lineage; deciding again");
            }
        }
    }
}

impl Replicator {
    /// An [`Action::CatchUpCommit`] completed.
    pub fn catchup_committed(&mut self, result: Result<(), String>) {
        let Some((p, lsn, id)) = self.staged_at(EndStep::Commit) else {
            return;
        };
        if let Err(error) = result {
            return self.catchup_refused(p, id, error);
        }
        if let Some(resync) = self.peers[p].resync_in.as_mut() {
            resync.phase = InPhase::Ending {
                lsn,
                step: EndStep::Adopt,
            };
        }
    }

    /// An [`Action::CatchUpApply`] completed: the device holds the catch-up, and the journal
    /// restarted after it.
    pub fn catchup_applied(&mut self, result: Result<(), String>) {
        let Some((p, lsn, _)) = self.staged_at(EndStep::Apply) else {
            return;
        };
        if let Err(error) = result {
            // The device may hold part of it: the meta names the catch-up, so the next start
            // applies it whole again before anything reads the volume.
            return self.fail(format!("applying the catch-up to {lsn}: {error}"));
        }
        self.tail.clear();
        if let Some(resync) = self.peers[p].resync_in.as_mut() {
            resync.phase = InPhase::Ending {
                lsn,
                step: EndStep::Maps,
            };
        }
    }

    /// The staged resync waiting at `step`: (peer, LSN, id).
    fn staged_at(&self, step: EndStep) -> Option<(usize, u64, u64)> {
        self.peers.iter().enumerate().find_map(|(p, peer)| {
            let resync = peer.resync_in.as_ref().filter(|r| r.staged)?;
            match resync.phase {
                InPhase::Ending { lsn, step: at } if at == step => Some((p, lsn, resync.id)),
                _ => None,
            }
        })
    }

    /// The catch-up file could not take staged resync `id` (no space, an I/O error): it is
    /// abandoned (nothing of it reached the device) and the link restarts; the next catch-up
    /// writes the device in place. The copy stays at its last batch boundary meanwhile.
    pub(super) fn catchup_refused(&mut self, p: usize, id: u64, error: String) {
        let Some(resync) = self.peers[p].resync_in.as_ref() else {
            return;
        };
        if resync.id != id || !resync.staged {
            return;
        }
        self.abandon_resync_in(p);
        self.notices.push_back(format!(
            "volume {}: the catch-up file could not take the catch-up from {} ({error}); it is abandoned, this copy stays at its last batch boundary, and the next catch-up writes the device in place",
            self.config.volume,
            self.peers[p].name()
        ));
        self.peers[p].regional.stage_refused = Some(error);
        self.close_link(p, "the catch-up file could not take the catch-up");
    }
}

/// The I/O that carries out one resync message into this copy: a device write, or with
/// `staged` an append to the catch-up file. Returns (offset, length, action).
fn resync_write(id: u64, catchup: u64, message: Message, staged: bool) -> (u64, u64, Action) {
    match (message, staged) {
        (Message::ResyncData { offset_bytes, data }, false) => {
            let len = data.len() as u64;
            (
                offset_bytes,
                len,
                Action::DeviceWrite {
                    id,
                    offset_bytes,
                    data,
                },
            )
        }
        (
            Message::ResyncZero {
                offset_bytes,
                len_bytes,
            },
            false,
        ) => (
            offset_bytes,
            len_bytes,
            Action::DeviceZero {
                id,
                offset_bytes,
                len_bytes,
            },
        ),
        (Message::ResyncData { offset_bytes, data }, true) => {
            let len_bytes = data.len() as u64;
            (
                offset_bytes,
                len_bytes,
                Action::CatchUpWrite {
                    id,
                    catchup,
                    offset_bytes,
                    len_bytes,
                    data: Some(data),
                },
            )
        }
        (
            Message::ResyncZero {
                offset_bytes,
                len_bytes,
            },
            true,
        ) => (
            offset_bytes,
            len_bytes,
            Action::CatchUpWrite {
                id,
                catchup,
                offset_bytes,
                len_bytes,
                data: None,
            },
        ),
        _ => unreachable!("matched above"),
    }
}
