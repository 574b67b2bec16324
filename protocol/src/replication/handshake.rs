//! What a completed handshake sets in motion: the plan (see `plan.rs`) applied to this copy.

use super::{Plan, Replicator, Side};
use crate::generation::{Decision, Role};
use crate::repl::Hello;

impl Replicator {
    pub(super) fn on_ready(&mut self, p: usize, decision: Decision, peer_hello: &Hello) {
        let Some(sent) = self.peers[p].session.sent_hello().cloned() else {
            return;
        };
        let local_first = sent.node < peer_hello.node;
        let local = Side {
            role: sent.role,
            head_lsn: sent.generation.head_lsn,
            consistent: sent.consistent,
            discarding_local: sent.discarding_local,
            name_rank: u8::from(!local_first),
        };
        let remote = Side {
            role: peer_hello.role,
            head_lsn: peer_hello.generation.head_lsn,
            consistent: peer_hello.consistent,
            discarding_local: peer_hello.discarding_local,
            name_rank: u8::from(local_first),
        };
        let plan = super::plan::plan(decision, &local, &remote);
        {
            let peer = &mut self.peers[p];
            peer.knows_generation = peer
                .knows_generation
                .max(peer_hello.generation.current_generation());
        }
        // The decision was made over the hellos as sent. If this copy changed since (a write
        // in a new generation, a role change) and the plan would discard its data, the
        // decision is stale: decide again rather than lose the write.
        let discards_local = match plan {
            Plan::Demote => true,
            Plan::Receive { from_lsn, .. } => self.head_lsn > from_lsn,
            _ => false,
        };
        // A generation being stored counts too: once stored, the records after its start
        // may complete by marks, and a demotion decided without it would discard them.
        let changed = self.role != sent.role
            || self.persisted_lineage().history != sent.generation.history
            || self.meta.lineage.current_generation()
                != self.meta_persisted.lineage.current_generation()
            || (self.role == Role::Primary && self.head_lsn != sent.generation.head_lsn);
        if (discards_local && changed) || (self.role != sent.role) {
            return self.close_link(p, "this copy changed during the handshake; deciding again");
        }
        if matches!(plan, Plan::Receive { .. }) {
            // One primary at a time (two only exist in a split brain): the second waits
            // until this copy no longer follows the first.
            if let Some(other) = self
                .peers
                .iter()
                .enumerate()
                .find(|(q, peer)| {
                    *q != p
                        && ((peer.is_my_primary && peer.session.is_up())
                            || peer.resync_in.is_some())
                })
                .map(|(_, peer)| peer.name().to_owned())
            {
                return self.close_link(p, &format!("this copy already follows {other}"));
            }
        }
        self.peers[p].plan = Some(plan);
        self.peers[p].peer_consistent = peer_hello.consistent;
        self.peers[p].holds_newer = matches!(
            super::plan::resolve(decision, &local, &remote),
            Decision::RemoteAhead { .. } | Decision::LocalEmpty
        );
        if !matches!(plan, Plan::SplitBrain { .. }) {
            self.peers[p].split_brain = false;
        }
        match plan {
            Plan::Ship {
                resync,
                full,
                from_lsn,
            } => self.start_shipping(p, resync, full, from_lsn, peer_hello.durable_lsn),
            Plan::Receive {
                resync,
                full,
                from_lsn,
            } => self.start_receiving(p, resync, full, from_lsn),
            Plan::Idle => {
                self.peers[p].session.set_mode(super::Mode::Idle, 0, 0);
                self.peers[p].last_error = match self.role {
                    Role::Primary if remote.consistent && remote.role == Role::Primary => {
                        Some("the peer is primary in an older generation and steps down".into())
                    }
                    Role::Primary => Some(format!(
                        "the peer's copy is newer but inconsistent (a resync into it did not finish): it takes nothing until `ferry resolve {} --discard-local` runs on it",
                        self.volume()
                    )),
                    Role::Secondary => None,
                };
            }
            Plan::Demote => {
                self.peers[p].session.set_mode(super::Mode::Idle, 0, 0);
                self.peers[p].last_error =
                    Some("the peer holds newer data: this copy demotes".into());
                self.demote_required(p);
            }
            Plan::SplitBrain { .. } => {
                self.peers[p].session.set_mode(super::Mode::Idle, 0, 0);
                self.peers[p].split_brain = true;
                self.peers[p].last_error = Some(format!(
                    "split brain: both copies were written since they split; run `ferry resolve {} --discard-local` on the copy whose writes should go",
                    self.volume()
                ));
            }
            Plan::Refuse => {
                let reason = format!("the copies cannot replicate: {}", decision.as_str());
                self.close_link(p, &reason);
            }
        }
        self.flush_transmits(p);
    }

    /// The plan says this copy ships to peer `p`, from `from_lsn`, after a resync if `resync`.
    fn start_shipping(
        &mut self,
        p: usize,
        resync: bool,
        full: bool,
        from_lsn: u64,
        peer_durable_lsn: u64,
    ) {
        let durable = peer_durable_lsn.min(from_lsn);
        self.peers[p]
            .session
            .set_mode(super::Mode::Ship, from_lsn, durable);
        self.peers[p].contacted = true;
        self.peers[p].split_brain = false;
        self.peers[p].last_error = None;
        if !resync {
            // The peer holds this copy's records up to `from_lsn` (its head).
            self.peers[p].acked_journal_lsn = from_lsn;
            self.peers[p].confirm(durable);
            self.peers[p].regional.lag.confirm(durable);
        }
        if resync {
            self.notice_peer_tail(p, from_lsn);
            let out = self.new_resync_out(full, true);
            self.peers[p].resync_out = Some(out);
        } else if self.head_lsn > from_lsn
            || (self.is_regional(p)
                && self.peers[p].map_state.resync_only
                && !self.peers[p].map.is_clean())
        {
            // Records tapped during the handshake were marked, not queued; or, for a regional
            // peer, marks that only a resync clears are left from one whose end the peer
            // applied but never confirmed (it stopped first): they go in a resync the peer
            // did not have to report anything for, rather than staying marked until the next
            // outage. (A metro peer keeps them until its next resync.)
            let out = self.new_resync_out(false, false);
            self.peers[p].resync_out = Some(out);
        } else if self.meta.protecting(self.peers[p].name()) {
            // In sync at once.
        } else {
            let name = self.peers[p].config.name.clone();
            self.meta.set_protecting(&name, true);
        }
    }

    /// The plan says this copy receives from peer `p` (its primary), after a resync if
    /// `resync`.
    fn start_receiving(&mut self, p: usize, resync: bool, full: bool, from_lsn: u64) {
        let next_after = from_lsn.min(self.head_lsn);
        if !resync && self.appended_up_to != next_after {
            // Records of an earlier link were still being journaled when this copy's hello
            // named its head (or were journaled since): the peer would send them, or others
            // under their LSNs, again. Once the journal holds them, the next handshake
            // decides over them.
            let reason = format!(
                "records up to {} were still being journaled when this copy's hello named head {from_lsn}; deciding again",
                self.appended_up_to
            );
            return self.close_link(p, &reason);
        }
        let durable = self.local_durable_lsn.min(from_lsn);
        self.peers[p]
            .session
            .set_mode(super::Mode::Receive, next_after, durable);
        self.peers[p].is_my_primary = true;
        self.peers[p].split_brain = false;
        self.peers[p].last_error = None;
        // The two copies share a lineage from now on: a restart of either as primary
        // must hear from the other first.
        let name = self.peers[p].config.name.clone();
        self.meta.set_protecting(&name, true);
        if resync {
            let resync_in = self.new_resync_in(p, full, from_lsn >= self.head_lsn);
            self.peers[p].resync_in = Some(resync_in);
        }
    }

    /// A secondary that holds records of this copy past its journal's head (a power loss
    /// took them from this copy before they were flushed) gives them up in the resync: said
    /// once, so an operator knows which writes went (never a FLUSHed or FUA one).
    fn notice_peer_tail(&mut self, p: usize, from_lsn: u64) {
        let Some((hello, _)) = self.peers[p].session.peer() else {
            return;
        };
        let peer_head = hello.generation.head_lsn;
        if hello.role == Role::Secondary && peer_head > self.head_lsn && from_lsn >= self.head_lsn {
            let notice = format!(
                "{} holds records {}..={} of this copy that its journal lost (a power loss took them before they were flushed); the resync gives them up so that both copies match, as a disk with a volatile cache would (FLUSHed and FUA writes are never among them; fail over to {} instead to keep them)",
                self.peers[p].name(),
                self.head_lsn + 1,
                peer_head,
                self.peers[p].name(),
            );
            self.notices.push_back(notice);
        }
    }
}
