//! Online verify (`ferry verify`): the primary compares its copy with a peer's by digests of
//! ranges, while I/O goes on. Only digests cross the network: a first pass by 1 MiB blocks,
//! then each differing block again by 4 KiB blocks.
//!
//! Never a false difference: each request names the LSN the peer must hold before it reads
//! (the primary's head when it asked), and the primary reads its own copy after that. In a
//! request that a record touched between the request and the comparison, a block whose two
//! digests differ is compared again later (a few times, then reported as busy, never as
//! different): so a difference is reported only where both copies held the same records.
//! Equal digests are equal contents, written meanwhile or not: a write lands the same on both
//! copies, so a block that read the same on both once cannot come to differ from writes alone.
//! Only those blocks are tried again, never the whole request, so a light load in one corner
//! of the volume leaves the rest compared. TRIM and zeroes read back as zeros on both.
//!
//! `checked_bytes` counts the bytes with a verdict (equal or different), `busy` those given up;
//! the two add up to the volume once a verify ran to its end. A verify stopped early (the link
//! lost, a resync started) has compared less: a 1 MiB block whose first pass differed and
//! whose 4 KiB pass never ran has no verdict, so it is in neither.

use std::time::{Duration, Instant};

use super::{
    Action, OpError, Peer, RangeSet, Replicator, Verify, VerifyRequest, VerifyStatus,
    VERIFY_COARSE_BLOCK_BYTES, VERIFY_RATE_DEFAULT_BYTES_PER_S, VERIFY_REQUEST_BYTES,
    VERIFY_RETRIES_MAX,
};
use crate::bitmap::BLOCK_BYTES;
use crate::generation::Role;
use crate::repl::{Message, VERIFY_DIGEST_BYTES};

/// Requests in flight per verify.
const VERIFY_REQUESTS_MAX: usize = 2;
/// Digest requests from a peer waiting to be served, at most.
const VERIFY_SERVED_MAX: usize = 16;

/// What a digest action is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DigestFor {
    /// This copy's side of its own verify request `id` to peer `peer`.
    Local { peer: usize, id: u64 },
    /// The reply to the peer's request `id`.
    Reply { peer: usize, id: u64 },
}

/// A peer's digest request waiting until this copy holds `at_lsn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Served {
    pub peer: usize,
    pub id: u64,
    pub offset_bytes: u64,
    pub len_bytes: u64,
    pub block_bytes: u64,
    pub at_lsn: u64,
}

impl Verify {
    /// A record touched `[offset, offset + len)`: requests over it compare again later.
    pub(super) fn written(&mut self, offset_bytes: u64, len_bytes: u64) {
        for request in self.requests.values_mut() {
            let end = request.offset_bytes + request.len_bytes;
            if offset_bytes < end && offset_bytes + len_bytes > request.offset_bytes {
                request.written = true;
            }
        }
    }
}

impl Replicator {
    /// `ferry verify VOLUME --peer NAME [--repair]` (SPEC §3).
    pub fn begin_verify(&mut self, peer: &str, repair: bool, now: Instant) -> Result<(), OpError> {
        self.now = now;
        let Some(p) = self.peers.iter().position(|q| q.name() == peer) else {
            return Err(OpError::UnknownPeer {
                peer: peer.to_owned(),
                volume: self.volume().to_owned(),
            });
        };
        if self.role != Role::Primary {
            // The message ends "it is {state}": say what this node is, and where to run it.
            return Err(OpError::CannotVerify {
                volume: self.volume().to_owned(),
                peer: peer.to_owned(),
                state: "a secondary; run it on the primary",
            });
        }
        if !self.shipping_records(p) {
            return Err(OpError::CannotVerify {
                volume: self.volume().to_owned(),
                peer: peer.to_owned(),
                state: self.peer_state(p).as_str(),
            });
        }
        if self.peers[p].verify.as_ref().is_some_and(|v| !v.done) {
            return Err(OpError::Busy {
                volume: self.volume().to_owned(),
            });
        }
        let mut todo = RangeSet::default();
        todo.insert(0, self.config.size_bytes);
        self.peers[p].verify = Some(Verify {
            repair,
            todo,
            fine_todo: RangeSet::default(),
            requests: Default::default(),
            total_bytes: self.config.size_bytes,
            checked_bytes: 0,
            differing: RangeSet::default(),
            busy: RangeSet::default(),
            retries: Default::default(),
            read_bytes: 0,
            started_at: now,
            done: false,
            repair_started: false,
        });
        Ok(())
    }

    /// The verify of peer `peer`, if one ran.
    pub fn verify(&self, peer: &str) -> Option<VerifyStatus> {
        let p = self.peers.iter().position(|q| q.name() == peer)?;
        self.peers[p].verify.as_ref().map(|v| self.verify_status(v))
    }

    pub(super) fn verify_status(&self, verify: &Verify) -> VerifyStatus {
        let repairing = verify.repair_started
            && self.peers.iter().any(|p| {
                p.verify.as_ref().is_some_and(|v| std::ptr::eq(v, verify)) && p.resync_out.is_some()
            });
        VerifyStatus {
            running: !verify.done || repairing,
            repair: verify.repair,
            total_bytes: verify.total_bytes,
            checked_bytes: verify.checked_bytes,
            differing_bytes: verify.differing.bytes(),
            differing_ranges: verify.differing.iter().take(64).collect(),
            busy_bytes: verify.busy.bytes(),
            repaired: verify.repair_started && !repairing,
        }
    }

    fn verify_rate(peer: &Peer) -> u64 {
        peer.config
            .resync_max_rate_bytes_per_s
            .unwrap_or(VERIFY_RATE_DEFAULT_BYTES_PER_S)
            .max(1)
    }

    /// When the rate cap lets the verify read next, if it waits for it.
    pub(super) fn verify_due(&self, peer: &Peer, verify: &Verify) -> Option<Instant> {
        if verify.done {
            return None;
        }
        let due = verify.started_at
            + Duration::from_secs_f64(verify.read_bytes as f64 / Self::verify_rate(peer) as f64);
        (due > self.now).then_some(due)
    }

    pub(super) fn pump_verify(&mut self, p: usize, now: Instant) {
        self.serve_verify_requests();
        let Some(verify) = self.peers[p].verify.as_ref() else {
            return;
        };
        if verify.done {
            return;
        }
        if !self.shipping_records(p) {
            // The link went, or a resync started: what was compared stands, the rest is not
            // known. The operator runs verify again once the peer is in sync.
            let verify = self.peers[p].verify.as_mut().expect("checked");
            verify.done = true;
            verify.requests.clear();
            return;
        }
        let due = self.verify_due(&self.peers[p], verify);
        let at_lsn = self.head_lsn;
        let peer = &mut self.peers[p];
        let verify = peer.verify.as_mut().expect("checked");
        // One request per step at most keeps the rate check honest.
        let next = if due.is_none() && verify.requests.len() < VERIFY_REQUESTS_MAX {
            if let Some((offset, len)) = verify.fine_todo.pop(VERIFY_COARSE_BLOCK_BYTES) {
                Some((offset, len, BLOCK_BYTES))
            } else {
                verify
                    .todo
                    .pop(VERIFY_REQUEST_BYTES)
                    .map(|(offset, len)| (offset, len, VERIFY_COARSE_BLOCK_BYTES))
            }
        } else {
            None
        };
        if let Some((offset_bytes, len_bytes, block_bytes)) = next {
            let id = self.next_id;
            self.next_id += 1;
            verify.requests.insert(
                id,
                VerifyRequest {
                    offset_bytes,
                    len_bytes,
                    block_bytes,
                    local: None,
                    remote: None,
                    written: false,
                },
            );
            verify.read_bytes += len_bytes;
            self.digests.insert(id, DigestFor::Local { peer: p, id });
            self.actions.push_back(Action::Digest {
                id,
                offset_bytes,
                len_bytes,
                block_bytes,
            });
            let message = Message::VerifyRequest {
                id,
                offset_bytes,
                len_bytes,
                block_bytes,
                at_lsn,
            };
            if let Err(error) = peer.session.send(message) {
                return self.close_for(p, error);
            }
        }
        let _ = now;
        let verify = self.peers[p].verify.as_mut().expect("checked");
        if verify.todo.is_empty() && verify.fine_todo.is_empty() && verify.requests.is_empty() {
            verify.done = true;
            if !verify.differing.is_empty() {
                let notice = difference_notice(
                    &self.config.volume,
                    self.peers[p].name(),
                    self.peers[p].verify.as_ref().expect("checked"),
                );
                self.notices.push_back(notice);
            }
            let verify = self.peers[p].verify.as_mut().expect("checked");
            if verify.repair && !verify.differing.is_empty() && !verify.repair_started {
                verify.repair_started = true;
                let ranges: Vec<(u64, u64)> = verify.differing.iter().collect();
                let peer = &mut self.peers[p];
                for (offset, len) in ranges {
                    peer.map.mark(offset, len);
                }
                peer.map_state.resync_only = true;
                let out = self.new_resync_out(false, false);
                self.peers[p].resync_out = Some(out);
            }
        }
    }

    pub(super) fn on_verify_reply(
        &mut self,
        p: usize,
        id: u64,
        digests: Vec<[u8; VERIFY_DIGEST_BYTES]>,
    ) {
        let Some(request) = self.peers[p]
            .verify
            .as_mut()
            .and_then(|v| v.requests.get_mut(&id))
        else {
            return; // a verify that was abandoned
        };
        if digests.len() as u64 != request.len_bytes.div_ceil(request.block_bytes) {
            return self.close_link(p, "a verify reply of the wrong length");
        }
        request.remote = Some(digests);
        self.compare(p, id);
    }

    pub(super) fn on_verify_request(
        &mut self,
        p: usize,
        id: u64,
        offset_bytes: u64,
        len_bytes: u64,
        block_bytes: u64,
        at_lsn: u64,
    ) {
        if self.served.len() >= VERIFY_SERVED_MAX {
            return self.close_link(p, "too many verify requests in flight");
        }
        self.served.push_back(super::verify::Served {
            peer: p,
            id,
            offset_bytes,
            len_bytes,
            block_bytes,
            at_lsn,
        });
    }

    /// Digests the peer asked for, once this copy holds the records they name.
    fn serve_verify_requests(&mut self) {
        while let Some(request) = self.served.front() {
            if request.at_lsn > self.head_lsn {
                return;
            }
            let request = self.served.pop_front().expect("checked");
            let id = self.next_id;
            self.next_id += 1;
            self.digests.insert(
                id,
                DigestFor::Reply {
                    peer: request.peer,
                    id: request.id,
                },
            );
            self.actions.push_back(Action::Digest {
                id,
                offset_bytes: request.offset_bytes,
                len_bytes: request.len_bytes,
                block_bytes: request.block_bytes,
            });
        }
    }

    /// A [`Action::Digest`] completed.
    pub fn digest_done(&mut self, id: u64, result: Result<Vec<[u8; VERIFY_DIGEST_BYTES]>, String>) {
        let Some(purpose) = self.digests.remove(&id) else {
            return;
        };
        match purpose {
            DigestFor::Reply { peer, id } => {
                let Ok(digests) = result else {
                    return self.close_link(peer, "reading for a verify failed");
                };
                if self.peers[peer].session.is_up() {
                    if let Err(error) = self.peers[peer]
                        .session
                        .send(Message::VerifyReply { id, digests })
                    {
                        self.close_for(peer, error);
                    }
                    self.flush_transmits(peer);
                }
            }
            DigestFor::Local { peer, id } => {
                let Some(request) = self.peers[peer]
                    .verify
                    .as_mut()
                    .and_then(|v| v.requests.get_mut(&id))
                else {
                    return;
                };
                match result {
                    Ok(digests) => {
                        request.local = Some(digests);
                        self.compare(peer, id);
                    }
                    Err(_) => {
                        // This copy could not read the range: try it again later (then busy),
                        // and forget the request (a late reply from the peer is ignored).
                        let verify = self.peers[peer].verify.as_mut().expect("checked");
                        let request = verify.requests.remove(&id).expect("checked");
                        verify.again(request.offset_bytes, request.len_bytes, request.block_bytes);
                    }
                }
            }
        }
    }

    fn compare(&mut self, p: usize, id: u64) {
        let Some(verify) = self.peers[p].verify.as_mut() else {
            return;
        };
        let ready = verify
            .requests
            .get(&id)
            .is_some_and(|r| r.local.is_some() && r.remote.is_some());
        if !ready {
            return;
        }
        let request = verify.requests.remove(&id).expect("checked");
        let local = request.local.expect("checked");
        let remote = request.remote.expect("checked");
        let (offset_bytes, len_bytes, block_bytes) =
            (request.offset_bytes, request.len_bytes, request.block_bytes);
        if local.len() != remote.len() {
            // Both were asked for the same blocks; a short local read is tried again.
            return verify.again(offset_bytes, len_bytes, block_bytes);
        }
        let end = offset_bytes + len_bytes;
        for (i, (a, b)) in local.iter().zip(&remote).enumerate() {
            let offset = offset_bytes + i as u64 * block_bytes;
            let len = block_bytes.min(end - offset);
            if a == b {
                verify.checked_bytes += len;
            } else if request.written {
                // A record may have reached one copy's read and not the other's.
                verify.again(offset, len, block_bytes);
            } else if block_bytes == BLOCK_BYTES {
                verify.checked_bytes += len;
                verify.differing.insert(offset, len);
            } else {
                verify.fine_todo.insert(offset, len);
            }
        }
    }
}

impl Verify {
    /// `[offset, offset + len)`, compared by `block_bytes`, could not be compared this time:
    /// queued again, or given up as busy after [`VERIFY_RETRIES_MAX`] tries.
    fn again(&mut self, offset_bytes: u64, len_bytes: u64, block_bytes: u64) {
        // The passes count their tries apart (offsets are 4 KiB aligned: bit 0 is free).
        let key = offset_bytes | u64::from(block_bytes == BLOCK_BYTES);
        let tries = self.retries.entry(key).or_insert(0);
        *tries += 1;
        if *tries > VERIFY_RETRIES_MAX {
            self.busy.insert(offset_bytes, len_bytes);
        } else if block_bytes == BLOCK_BYTES {
            self.fine_todo.insert(offset_bytes, len_bytes);
        } else {
            self.todo.insert(offset_bytes, len_bytes);
        }
    }
}

/// What an operator reads in the log when a verify found a difference.
fn difference_notice(volume: &str, peer: &str, verify: &Verify) -> String {
    let shown: Vec<String> = verify
        .differing
        .iter()
        .take(8)
        .map(|(offset, len)| format!("{offset}+{len}"))
        .collect();
    let ranges = verify.differing.iter().count();
    format!(
        "verify of {volume} against {peer}: {} bytes differ between this copy and the peer's, \
         in {ranges} range(s) (bytes {}{}); {}",
        verify.differing.bytes(),
        shown.join(", "),
        if ranges > shown.len() { ", ..." } else { "" },
        if verify.repair {
            "repairing them by resyncing just those ranges to the peer"
        } else {
            "`ferry verify --repair` resyncs just those ranges to the peer"
        }
    )
}
