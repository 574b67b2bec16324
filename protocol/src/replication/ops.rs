//! Operator commands that change roles: promote, demote, resolve. Each is started by a
//! `begin_*` call, moves on in [`Replicator::advance`], and ends with a result the daemon
//! collects with [`Replicator::take_op_result`].

use std::time::Instant;

use super::{Action, OpError, OpOutcome, PendingOp, Plan, Replicator};
use crate::generation::Role;

impl Replicator {
    /// The result of the operator command in progress, once it has one.
    pub fn take_op_result(&mut self) -> Option<Result<OpOutcome, OpError>> {
        self.op_result.take()
    }

    /// Whether an operator command (or a demotion the peer required) is in progress.
    pub fn op_in_progress(&self) -> bool {
        self.op.is_some()
    }

    fn busy(&self) -> Option<OpError> {
        if let Some(reason) = &self.failed {
            return Some(OpError::Failed {
                volume: self.volume().to_owned(),
                reason: reason.clone(),
            });
        }
        self.op.as_ref().map(|_| OpError::Busy {
            volume: self.volume().to_owned(),
        })
    }

    /// `ferry promote` (SPEC §3).
    pub fn begin_promote(&mut self, force: bool, now: Instant) -> Result<(), OpError> {
        self.now = now;
        if let Some(error) = self.busy() {
            return Err(error);
        }
        if self.role == Role::Primary {
            if let (Some(error), true, false) = (self.newer_peer(), self.fenced, force) {
                return Err(error);
            }
            if self.fenced {
                // The operator asserts that no peer was promoted meanwhile: like any
                // promotion, the writes from here on are in a generation of their own.
                self.op = Some(PendingOp::Unfence {
                    generation_started: false,
                });
            } else {
                self.op_result = Some(Ok(OpOutcome::Promoted {
                    generation: self.meta_persisted.lineage.current_generation(),
                }));
            }
            return Ok(());
        }
        if self.meta.lineage.is_empty() {
            return Err(OpError::NeverSynced {
                volume: self.volume().to_owned(),
            });
        }
        if !self.meta.consistent || !self.meta_persisted.consistent {
            return Err(OpError::NotConsistent {
                volume: self.volume().to_owned(),
            });
        }
        if let (Some(error), false) = (self.newer_peer(), force) {
            return Err(error);
        }
        let wait = self
            .peers
            .iter()
            .map(|p| p.config.peer_timeout)
            .max()
            .unwrap_or_default();
        self.op = Some(PendingOp::Promote {
            force,
            deadline: now + wait,
            closed: false,
            generation_started: false,
        });
        Ok(())
    }

    /// A peer whose last handshake found it holding writes this copy lacks (kept while the
    /// link is down: its last word stands until a new handshake or a resync from it):
    /// promoting this copy without `--force` would set them aside (DRBD refuses to promote
    /// an outdated disk alike). A peer that is a live primary is left to the primary check.
    pub(super) fn newer_peer(&self) -> Option<OpError> {
        self.peers
            .iter()
            .filter(|p| {
                !p.session
                    .peer()
                    .is_some_and(|(hello, _)| hello.role == Role::Primary)
            })
            .find(|p| p.holds_newer)
            .map(|p| OpError::PeerIsNewer {
                peer: p.name().to_owned(),
                volume: self.volume().to_owned(),
            })
    }

    /// `ferry demote` (SPEC §3). Admission closes at once; the daemon drains the writes in
    /// flight ([`Action::Drain`]) and the role is stored after.
    pub fn begin_demote(&mut self) -> Result<(), OpError> {
        if let Some(error) = self.busy() {
            return Err(error);
        }
        if self.role == Role::Secondary {
            self.op_result = Some(Ok(OpOutcome::Demoted));
            return Ok(());
        }
        self.start_demote(None);
        self.demote_planned = true;
        Ok(())
    }

    fn start_demote(&mut self, resolve_with: Option<String>) {
        self.demoting = true;
        self.demote_planned = false;
        for p in 0..self.peers.len() {
            let hold = self.confirming(p);
            self.peers[p].demotion_hold = hold;
        }
        self.op = Some(PendingOp::Demote {
            drained: false,
            resolve_with,
            stored: false,
        });
        self.actions.push_back(Action::Drain);
    }

    /// A handshake found the peer ahead of this primary: it demotes itself.
    pub(super) fn demote_required(&mut self, _p: usize) {
        if self.role == Role::Primary && self.op.is_none() {
            self.start_demote(None);
        }
    }

    /// The daemon drained the writes [`Action::Drain`] asked for.
    pub fn writes_drained(&mut self) {
        if let Some(PendingOp::Demote { drained, .. }) = &mut self.op {
            *drained = true;
        }
    }

    /// `ferry resolve VOLUME --discard-local [--peer NAME]` (SPEC §3): this copy gives up
    /// its writes since the split brain with `peer` and is resynced from it, by the blocks
    /// either side changed since their common point.
    pub fn begin_resolve(&mut self, peer: Option<&str>) -> Result<(), OpError> {
        if let Some(error) = self.busy() {
            return Err(error);
        }
        if let Some(winner) = &self.meta.resolving_with {
            self.op_result = Some(Ok(OpOutcome::Resolving {
                peer: winner.clone(),
            }));
            return Ok(());
        }
        // A copy a resync left inconsistent has nothing of its own to keep: it may give way to
        // any peer (the primary, when it is connected).
        let inconsistent = !self.meta.consistent || !self.meta_persisted.consistent;
        let split: Vec<usize> = (0..self.peers.len())
            .filter(|p| {
                self.peers[*p].split_brain
                    || (inconsistent
                        && self.peers[*p]
                            .session
                            .peer()
                            .is_some_and(|(hello, _)| hello.role == Role::Primary))
            })
            .collect();
        let chosen = match peer {
            Some(name) => {
                let Some(p) = self.peers.iter().position(|q| q.name() == name) else {
                    return Err(OpError::UnknownPeer {
                        peer: name.to_owned(),
                        volume: self.volume().to_owned(),
                    });
                };
                if !self.peers[p].split_brain && !inconsistent {
                    return Err(OpError::NoSplitBrain {
                        volume: self.volume().to_owned(),
                    });
                }
                p
            }
            None => match split.as_slice() {
                [] => {
                    return Err(OpError::NoSplitBrain {
                        volume: self.volume().to_owned(),
                    })
                }
                [only] => *only,
                several => {
                    return Err(OpError::WhichPeer {
                        volume: self.volume().to_owned(),
                        peers: several
                            .iter()
                            .map(|p| self.peers[*p].name())
                            .collect::<Vec<_>>()
                            .join(", "),
                    })
                }
            },
        };
        if !self.peers[chosen].peer_consistent {
            return Err(OpError::WinnerInconsistent {
                peer: self.peers[chosen].name().to_owned(),
                volume: self.volume().to_owned(),
            });
        }
        if let Some(primary) = self
            .peers
            .iter()
            .enumerate()
            .find(|(q, p)| *q != chosen && p.is_my_primary && p.session.is_up())
        {
            return Err(OpError::FollowsPrimary {
                primary: primary.1.name().to_owned(),
                volume: self.volume().to_owned(),
            });
        }
        // A peer this copy ships to holds these writes too: discarding them only here would
        // leave that peer in the same split brain, with data nobody can resync from.
        if let Some(other) = (0..self.peers.len())
            .find(|q| *q != chosen && matches!(self.peers[*q].plan, Some(Plan::Ship { .. })))
        {
            return Err(OpError::WouldLoseData {
                peer: self.peers[other].name().to_owned(),
                volume: self.volume().to_owned(),
            });
        }
        let winner = self.peers[chosen].name().to_owned();
        if self.role == Role::Primary {
            self.start_demote(Some(winner));
        } else {
            self.meta.resolving_with = Some(winner.clone());
            self.op = Some(PendingOp::Resolve { peer: winner });
        }
        Ok(())
    }

    /// Moves the command in progress on (called from `advance`).
    pub(super) fn advance_op(&mut self, now: Instant) {
        let Some(op) = self.op.take() else {
            return;
        };
        self.op = match op {
            PendingOp::Promote {
                force,
                deadline,
                closed,
                generation_started,
            } => self.advance_promote(force, deadline, closed, generation_started, now),
            PendingOp::Demote {
                drained,
                resolve_with,
                stored,
            } => self.advance_demote(drained, resolve_with, stored),
            PendingOp::Resolve { peer } => {
                if self.meta_settled() {
                    // Every link decides again with this copy discarding its writes.
                    for p in 0..self.peers.len() {
                        self.close_link(
                            p,
                            "resolving a split brain: this copy discards its writes",
                        );
                    }
                    self.op_result = Some(Ok(OpOutcome::Resolving { peer }));
                    None
                } else {
                    Some(PendingOp::Resolve { peer })
                }
            }
            PendingOp::Unfence { generation_started } => {
                if !generation_started {
                    if self.local_durable_lsn < self.head_lsn {
                        self.flush_wanted_lsn = self.flush_wanted_lsn.max(self.head_lsn);
                        Some(PendingOp::Unfence {
                            generation_started: false,
                        })
                    } else {
                        self.start_own_generation();
                        Some(PendingOp::Unfence {
                            generation_started: true,
                        })
                    }
                } else if self.meta_settled() {
                    self.fenced = false;
                    self.op_result = Some(Ok(OpOutcome::Promoted {
                        generation: self.meta_persisted.lineage.current_generation(),
                    }));
                    None
                } else {
                    Some(PendingOp::Unfence {
                        generation_started: true,
                    })
                }
            }
        };
        if self.failed.is_some() {
            if let Some(_op) = self.op.take() {
                let reason = self.failed.clone().unwrap_or_default();
                self.op_result = Some(Err(OpError::Failed {
                    volume: self.volume().to_owned(),
                    reason,
                }));
                self.demoting = false;
            }
        }
    }

    /// Starts a generation of this node at head + 1 (the journal is durable up to the head).
    fn start_own_generation(&mut self) {
        let highest_seen = self
            .peers
            .iter()
            .map(|p| p.knows_generation)
            .max()
            .unwrap_or(0);
        let mut lineage = self.lineage();
        match lineage.start_generation(&self.config.node, highest_seen) {
            Ok(_) => {
                lineage.head_lsn = 0;
                self.meta.lineage = lineage;
            }
            Err(error) => self.fail(format!("cannot start a generation: {error}")),
        }
    }

    fn advance_promote(
        &mut self,
        force: bool,
        deadline: Instant,
        mut closed: bool,
        mut generation_started: bool,
        now: Instant,
    ) -> Option<PendingOp> {
        if !closed {
            // A peer that still looks like a live primary may just have died: give the link
            // `peer_timeout` to notice. --force skips the wait (the operator knows).
            let primary = self.peers.iter().find(|p| {
                p.session
                    .peer()
                    .is_some_and(|(hello, _)| hello.role == Role::Primary)
            });
            if let (Some(error), false) = (self.newer_peer(), force) {
                // A handshake while the promotion waited found the peer ahead.
                self.op_result = Some(Err(error));
                return None;
            }
            if let (Some(peer), false) = (primary, force) {
                if now < deadline {
                    return Some(PendingOp::Promote {
                        force,
                        deadline,
                        closed,
                        generation_started,
                    });
                }
                self.op_result = Some(Err(OpError::PeerIsPrimary {
                    peer: peer.name().to_owned(),
                    volume: self.volume().to_owned(),
                }));
                return None;
            }
            // Stop receiving: nothing from the old primary may land after the promotion.
            for p in 0..self.peers.len() {
                self.close_link(p, "this node is being promoted");
            }
            closed = true;
        }
        if !self.appends.is_empty()
            || !self.device_ops.is_empty()
            || self.reset_in_flight
            || self.device_sync_in_flight
            || self.peers.iter().any(|p| p.resync_in.is_some())
            || self.batches_pending()
        {
            // What this copy received lands first (a resync whose end arrived finishes).
            return Some(PendingOp::Promote {
                force,
                deadline,
                closed,
                generation_started,
            });
        }
        if !self.meta.consistent || !self.meta_persisted.consistent {
            // A resync wrote this copy after the checks.
            self.op_result = Some(Err(OpError::NotConsistent {
                volume: self.volume().to_owned(),
            }));
            return None;
        }
        if !generation_started {
            if self.local_durable_lsn < self.head_lsn {
                self.flush_wanted_lsn = self.flush_wanted_lsn.max(self.head_lsn);
                return Some(PendingOp::Promote {
                    force,
                    deadline,
                    closed,
                    generation_started,
                });
            }
            self.start_own_generation();
            self.meta.role = Role::Primary;
            // A promotion overrides a pending `resolve --discard-local`: the writes this copy
            // takes from now on are not the ones the operator chose to discard.
            self.meta.resolving_with = None;
            generation_started = true;
        }
        if !self.meta_settled() {
            return Some(PendingOp::Promote {
                force,
                deadline,
                closed,
                generation_started,
            });
        }
        self.role = Role::Primary;
        self.fenced = false;
        self.appended_up_to = self.head_lsn;
        for peer in &mut self.peers {
            if !peer.session.is_up() {
                peer.last_error = Some("not connected since this node was promoted".into());
            }
        }
        // This copy's client writes start after the head; what it published before (as a
        // primary of another lineage, or at start) says nothing about them.
        self.settled_published = (self.head_lsn, self.head_lsn);
        for peer in &mut self.peers {
            peer.third_durable_lsn = None;
            peer.is_my_primary = false;
        }
        self.op_result = Some(Ok(OpOutcome::Promoted {
            generation: self.meta_persisted.lineage.current_generation(),
        }));
        None
    }

    fn advance_demote(
        &mut self,
        drained: bool,
        resolve_with: Option<String>,
        mut stored: bool,
    ) -> Option<PendingOp> {
        if !drained {
            if let Some(p) = (0..self.peers.len())
                .find(|p| self.peers[*p].demotion_hold && !self.peers[*p].session.is_up())
            {
                // The switchover lost its peer: abort, and stay the primary.
                self.demoting = false;
                for peer in &mut self.peers {
                    peer.demotion_hold = false;
                }
                self.op_result = Some(Err(OpError::PeerLost {
                    peer: self.peers[p].name().to_owned(),
                    volume: self.volume().to_owned(),
                }));
                return None;
            }
            return Some(PendingOp::Demote {
                drained,
                resolve_with,
                stored,
            });
        }
        // An operator's switchover hands the regional copies everything too; a copy giving
        // up its writes (a resolve, or a handshake that found a newer copy) does not wait to
        // ship them.
        if !stored
            && self.demote_planned
            && (0..self.peers.len()).any(|p| self.regional_drain_pending(p))
        {
            return Some(PendingOp::Demote {
                drained,
                resolve_with,
                stored,
            });
        }
        if !stored {
            self.meta.role = Role::Secondary;
            if let Some(winner) = &resolve_with {
                self.meta.resolving_with = Some(winner.clone());
            }
            stored = true;
        }
        if !self.meta_settled() {
            return Some(PendingOp::Demote {
                drained,
                resolve_with,
                stored,
            });
        }
        self.role = Role::Secondary;
        self.demoting = false;
        for peer in &mut self.peers {
            peer.demotion_hold = false;
        }
        self.fenced = false;
        self.holding = false;
        for p in 0..self.peers.len() {
            self.close_link(p, "this node demoted");
        }
        self.op_result = Some(Ok(match resolve_with {
            Some(peer) => OpOutcome::Resolving { peer },
            None => OpOutcome::Demoted,
        }));
        None
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::super::testing::{
        alone, cut, reconnect, replicator, restarted, settle, settle_watching, write,
    };
    use super::super::{OpError, OpOutcome, ReplicaState, Replicator};
    use crate::generation::Role;

    const SIZE: u64 = 16 << 20;

    fn state(me: &Replicator) -> ReplicaState {
        me.status().peers[0].state
    }

    /// A metro pair that held write 1 together; then `a` was killed, `b` was promoted with
    /// `--force` and took write 2, and `a` restarts (a fenced primary) and is back.
    fn failed_over(start: Instant) -> (Replicator, Replicator, Instant) {
        failed_over_watching(start, &mut |_, _| {})
    }

    fn failed_over_watching(
        start: Instant,
        watch: &mut dyn FnMut(&Replicator, &Replicator),
    ) -> (Replicator, Replicator, Instant) {
        let mut a = replicator("a", "b", Role::Primary, start, SIZE, None);
        let mut b = replicator("b", "a", Role::Secondary, start, SIZE, None);
        a.connected(0, start);
        b.connected(0, start);
        settle(&mut a, &mut b, start);
        assert_eq!(state(&a), ReplicaState::InSync);
        a.tap(write(1, 0, 4096), start);
        settle(&mut a, &mut b, start);
        assert_eq!(b.head_lsn(), 1);
        let now = start + Duration::from_secs(1);
        cut(&mut a, &mut b, now);
        b.begin_promote(true, now).expect("promote --force");
        alone(&mut b, 1, now);
        assert!(matches!(
            b.take_op_result(),
            Some(Ok(OpOutcome::Promoted { .. }))
        ));
        b.tap(write(2, 65536, 4096), now);
        alone(&mut b, 1, now);
        let mut a = restarted(&a, "a", "b", now);
        alone(&mut a, 0, now);
        assert!(a.writes_held().is_some_and(|why| why.starts_with("fenced")));
        a.connected(0, now);
        b.connected(0, now);
        settle_watching(&mut a, &mut b, now, watch);
        (a, b, now)
    }

    #[test]
    fn a_primary_whose_old_primary_is_stepping_down_does_not_call_it_standby() {
        // `ferry status --check` passes on in-sync and standby: a failback that demoted b
        // while a was still stepping down left a without b's write 2 and no primary.
        let start = Instant::now();
        let idle_seen = std::cell::Cell::new(false);
        let mut check = |a: &Replicator, b: &Replicator| {
            if b.role() == Role::Primary && a.head_lsn() < 2 {
                let status = b.status();
                let peer = &status.peers[0];
                assert!(
                    !matches!(peer.state, ReplicaState::Standby | ReplicaState::InSync),
                    "b reports {:?} for a, which lacks write 2",
                    peer.state
                );
                if peer
                    .last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("steps down"))
                {
                    idle_seen.set(true);
                    assert_eq!(peer.state, ReplicaState::Degraded);
                }
            }
        };
        let (mut a, mut b, now) = failed_over_watching(start, &mut check);
        assert!(idle_seen.get(), "b saw a while a stepped down");
        assert_eq!(
            a.role(),
            Role::Secondary,
            "a meets a newer copy and demotes"
        );
        reconnect(&mut a, &mut b, now);
        settle_watching(&mut a, &mut b, now, &mut check);
        assert_eq!(state(&b), ReplicaState::InSync);
        assert_eq!(a.head_lsn(), 2);
        // Resynced, a lacks nothing: a promotion waits for b, the live primary, and says so.
        a.begin_promote(false, now).expect("a waits for b");
        let later = now + Duration::from_secs(60);
        settle(&mut a, &mut b, later);
        let result = a.take_op_result();
        assert!(
            matches!(result, Some(Err(OpError::PeerIsPrimary { .. }))),
            "{result:?}"
        );
    }

    #[test]
    fn promoting_a_copy_behind_a_reachable_peer_needs_force() {
        let start = Instant::now();
        let (mut a, mut b, now) = failed_over(start);
        assert_eq!(a.role(), Role::Secondary);
        // Right after stepping down, with the link closed, a still knows b is ahead.
        cut(&mut a, &mut b, now);
        let refused = a.begin_promote(false, now);
        assert!(
            matches!(&refused, Err(OpError::PeerIsNewer { .. })),
            "{refused:?}"
        );
        // The operator demotes b before a has b's write 2: two secondaries, a behind.
        b.begin_demote().expect("demote");
        alone(&mut b, 1, now);
        assert!(matches!(b.take_op_result(), Some(Ok(OpOutcome::Demoted))));
        reconnect(&mut a, &mut b, now);
        settle(&mut a, &mut b, now);
        assert_eq!(state(&a), ReplicaState::Standby);
        let refused = a.begin_promote(false, now);
        assert!(
            matches!(&refused, Err(OpError::PeerIsNewer { peer, .. }) if peer == "b"),
            "{refused:?}"
        );
        assert_eq!(a.role(), Role::Secondary);
        // b, the copy with every write, is promoted and resyncs a; then a may be promoted.
        b.begin_promote(false, now).expect("promote b");
        settle(&mut a, &mut b, now);
        assert!(matches!(
            b.take_op_result(),
            Some(Ok(OpOutcome::Promoted { .. }))
        ));
        reconnect(&mut a, &mut b, now);
        settle(&mut a, &mut b, now);
        assert_eq!(state(&b), ReplicaState::InSync);
        assert_eq!(a.head_lsn(), 2);
        b.begin_demote().expect("demote b");
        settle(&mut a, &mut b, now);
        reconnect(&mut a, &mut b, now);
        settle(&mut a, &mut b, now);
        a.begin_promote(false, now)
            .expect("a holds every write now");
        settle(&mut a, &mut b, now);
        assert!(matches!(
            a.take_op_result(),
            Some(Ok(OpOutcome::Promoted { .. }))
        ));
        // --force still overrides a newer peer, as the operator's word.
        let (mut c, mut d, now) = failed_over(start);
        d.begin_demote().expect("demote");
        alone(&mut d, 1, now);
        reconnect(&mut c, &mut d, now);
        settle(&mut c, &mut d, now);
        c.begin_promote(true, now).expect("promote --force");
        settle(&mut c, &mut d, now);
        assert!(matches!(
            c.take_op_result(),
            Some(Ok(OpOutcome::Promoted { .. }))
        ));
    }
}
