//! The peer session: one per (volume, peer), a sans-IO state machine in the quinn-proto style.
//!
//! The daemon feeds it with `handle_connected`, `handle_disconnected`, `handle_message`,
//! `handle_timeout` and the local write path's calls (`submit_write`, `flush` on a primary;
//! `journaled`, `durable` on a secondary), then drains `poll_transmit` (messages to write to
//! the volume's stream, in order), `poll_event` (what the daemon must act on) and
//! `poll_timeout` (when to call `handle_timeout` next). Time only comes in as `now`.
//!
//! Handshake: on connect both sides send a [`Hello`]. On receiving the peer's hello each side
//! runs [`decide`] over the hello it sent and the one it received, and answers with a
//! `Welcome` carrying its decision. Each side then checks that the peer's decision mirrors its
//! own (same inputs, so any difference is a bug or a tampered peer) before acting on it.
//!
//! The stream is reliable and ordered (QUIC), so anything out of sequence (an LSN gap, a
//! duplicate, an ack going backwards, an ack of something never sent) is a protocol error: the
//! session reports it, asks the daemon to close the connection, and a reconnect resumes from
//! the LSNs exchanged in the next handshake. Nothing is ever applied out of order.
//!
//! Timers: a heartbeat every `peer_timeout / 4`; the peer is lost when nothing arrived for
//! `peer_timeout`, or when the oldest unacknowledged record is `peer_timeout` old.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use thiserror::Error;

use crate::generation::{decide, Decision, GenerationEntry, GenerationInfo, Role};
use crate::repl::{
    DirtyRange, Hello, Message, RefuseCode, ResyncKind, WriteRecord, MAX_DATA_BYTES,
    MAX_DIRTY_RANGES_PER_FRAME,
};

/// The replication protocol version carried in hellos.
pub const PROTOCOL_VERSION: u16 = 1;
/// Window cost of a record beyond its data, so zero-length records are bounded too.
pub const RECORD_OVERHEAD_BYTES: u64 = 64;
/// Events the daemon may leave undrained before it is a bug (the session asserts it).
const MAX_QUEUED_EVENTS: usize = 1 << 16;
/// Messages the session may queue before it is a bug: the in-flight window bounds writes.
const MAX_QUEUED_TRANSMITS: usize = 1 << 20;

/// What went wrong in a session.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SessionError {
    /// The in-flight window is full; retry after an `Acked` event frees space.
    #[error("in-flight window full ({inflight_bytes} of {max_inflight_bytes} bytes)")]
    Blocked {
        inflight_bytes: u64,
        max_inflight_bytes: u64,
    },
    /// The peer is not receiving writes now (not connected, not in sync, or resync by dirty
    /// map in progress): track the write for a later resync.
    #[error("peer is not receiving writes (state {state})")]
    NotReplicating { state: &'static str },
    /// A record was submitted out of LSN order; the daemon must ship consecutive LSNs.
    #[error("record LSN {found} submitted, expected {expected}")]
    OutOfOrder { expected: u64, found: u64 },
    /// The call does not fit the local role (a secondary cannot ship writes).
    #[error("operation needs role {needed}")]
    WrongRole { needed: &'static str },
    /// A message arrived that the state does not allow.
    #[error("unexpected {message} in state {state}")]
    UnexpectedMessage {
        message: &'static str,
        state: &'static str,
    },
    /// A record arrived with an LSN other than the next one: a gap or a duplicate.
    #[error("received LSN {found}, expected {expected}")]
    LsnGap { expected: u64, found: u64 },
    /// The peer acknowledged less than it had before on the same connection.
    #[error("ack went backwards: {field} {found} after {previous}")]
    AckBackwards {
        field: &'static str,
        previous: u64,
        found: u64,
    },
    /// The peer acknowledged an LSN that was never sent to it.
    #[error("ack of LSN {acked} but only {sent} sent")]
    AckBeyondSent { acked: u64, sent: u64 },
    /// The peer claims durability beyond what it has journaled.
    #[error("durable LSN {durable} beyond journal LSN {journal}")]
    DurableBeyondJournal { durable: u64, journal: u64 },
    /// The peer asked for a flush beyond what it sent.
    #[error("flush up to {upto} but only {received} received")]
    FlushBeyondReceived { upto: u64, received: u64 },
    /// The peer's decision does not mirror ours: a bug or a tampered peer.
    #[error("peer decided {theirs}, we decided {ours}")]
    DecisionMismatch {
        ours: &'static str,
        theirs: &'static str,
    },
    /// The peer's hello is not acceptable.
    #[error("hello refused ({}): {reason}", code.as_str())]
    Refused { code: RefuseCode, reason: String },
    /// The peer holds records the primary does not, in the same generation.
    #[error("peer head LSN {peer} beyond primary head {local} in the same generation")]
    PeerBeyondPrimary { peer: u64, local: u64 },
    /// Resync data exceeded the window or a size cap.
    #[error("resync chunk of {len_bytes} bytes refused")]
    ResyncChunk { len_bytes: u64 },
    /// A record or resync range past the end of the volume.
    #[error(
        "range of {len_bytes} bytes at {offset_bytes} is outside the {size_bytes}-byte volume"
    )]
    BadRange {
        offset_bytes: u64,
        len_bytes: u64,
        size_bytes: u64,
    },
}

/// Replica states, named as in SPEC §5.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplicaState {
    /// No handshake completed on the current connection (or none yet).
    Connecting,
    /// Initial full sync of a never-synced copy.
    Syncing,
    /// Delta resync (from the journal or the merged dirty maps).
    Resyncing,
    /// Every completed write is at the peer.
    InSync,
    /// Regional only: behind by more than the interval (not produced by the metro session).
    Lagging,
    /// Peer unreachable; changes are tracked for a delta resync.
    Degraded,
    /// Peer unreachable and `on_disconnect = "suspend"`: client I/O is held.
    Suspended,
    /// Shipping stopped by the operator.
    Paused,
    /// Both copies wrote since they split; an operator must resolve.
    SplitBrain,
}

impl ReplicaState {
    /// The name used by `ferry status` and the `state` metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaState::Connecting => "connecting",
            ReplicaState::Syncing => "syncing",
            ReplicaState::Resyncing => "resyncing",
            ReplicaState::InSync => "in-sync",
            ReplicaState::Lagging => "lagging",
            ReplicaState::Degraded => "degraded",
            ReplicaState::Suspended => "suspended",
            ReplicaState::Paused => "paused",
            ReplicaState::SplitBrain => "split-brain",
        }
    }
}

/// What a metro primary does when its peer is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnDisconnect {
    /// Keep serving; track changed blocks.
    Degrade,
    /// Hold client I/O until the peer returns or an operator acts.
    Suspend,
}

/// Fixed settings of a session.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// This node's name.
    pub node: String,
    /// The peer's node name; a hello from another node is refused.
    pub peer: String,
    /// The volume name.
    pub volume: String,
    /// The volume size.
    pub size_bytes: u64,
    /// Silence after which the peer is lost; heartbeats go every quarter of it.
    pub peer_timeout: Duration,
    /// What a primary does when the peer is lost.
    pub on_disconnect: OnDisconnect,
    /// Bytes shipped but not yet acknowledged (writes, or resync data) before `Blocked`.
    pub max_inflight_bytes: u64,
}

/// What the daemon must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    /// The replica state changed.
    StateChanged(ReplicaState),
    /// The handshake completed with this decision; `peer` is the peer's hello.
    Handshake {
        decision: Decision,
        peer: Box<Hello>,
    },
    /// Primary: the peer has records up to `journal_lsn` in its journal, up to `durable_lsn`
    /// durable. Cumulative; never goes backwards within a connection.
    Acked { journal_lsn: u64, durable_lsn: u64 },
    /// Primary (or the copy that is ahead): ship records from `from_lsn` to the peer —
    /// `submit_write` from the journal if it still holds them and the peer needs no
    /// rollback, else a `begin_resync` of `kind` (merged with the peer's dirty ranges).
    ResyncNeeded {
        kind: ResyncKind,
        from_lsn: u64,
        peer_head_lsn: u64,
    },
    /// The copy that is behind: discard local records after `common_lsn` and send the
    /// ranges they touched (and the dirty map since) with `send_dirty_ranges`.
    RollbackNeeded { common_lsn: u64 },
    /// The peer's dirty ranges, to merge into the resync.
    PeerDirtyRanges { ranges: Vec<DirtyRange>, last: bool },
    /// Secondary: journal this record (then call `journaled`).
    Received(WriteRecord),
    /// Secondary: make records up to `upto_lsn` durable (then call `durable`).
    FlushRequested { upto_lsn: u64 },
    /// Secondary: a resync starts.
    ResyncBegin {
        kind: ResyncKind,
        total_bytes: u64,
        target_lsn: u64,
    },
    /// Secondary: write these resync bytes.
    ResyncData { offset_bytes: u64, data: Bytes },
    /// Secondary: this range reads as zeros.
    ResyncZero { offset_bytes: u64, len_bytes: u64 },
    /// Secondary: the resync is complete; make it durable, then call `journaled(lsn)`.
    ResyncEnd { lsn: u64 },
    /// The peer changed role (and, when promoted, started `generation`).
    PeerRoleChanged {
        role: Role,
        generation: Option<GenerationEntry>,
    },
    /// This node is primary but the peer is ahead: it must demote before replicating.
    DemoteRequired,
    /// A heartbeat round trip.
    Rtt(Duration),
    /// The peer was lost (timeout, disconnect, goodbye or error).
    PeerLost,
    /// The daemon must close the transport stream, then call `handle_disconnected`.
    CloseConnection,
    /// The peer broke the protocol; the connection is being closed.
    ProtocolError(SessionError),
    /// The copies diverged; an operator must resolve.
    SplitBrain { common_generation: u64 },
    /// The handshake ended without replication: unrelated copies, both primary, refused.
    HandshakeFailed { reason: String },
}

#[derive(Debug)]
enum Link {
    /// No transport.
    Down,
    /// Hello sent; waiting for the peer's hello and welcome.
    Handshake {
        sent: Box<Hello>,
        ours: Option<Decision>,
        theirs: Option<Decision>,
        peer: Option<Box<Hello>>,
    },
    /// Handshake done.
    Up { peer_role: Role },
}

/// Where a primary's shipping stands on the current connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shipping {
    /// Nothing may be shipped.
    Off,
    /// `submit_write` ships records.
    Records,
    /// A dirty-map resync is between `ResyncBegin` and `ResyncEnd`.
    Resync,
}

/// One peer session. See the module doc.
#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    /// Base of the heartbeat timestamps.
    epoch: Instant,
    role: Role,
    local: GenerationInfo,
    durable_lsn: u64,
    applied_lsn: u64,
    state: ReplicaState,
    link: Link,
    last_error: Option<String>,
    ever_in_sync: bool,

    // Shipping side (the copy that is ahead; normally the primary).
    shipping: Shipping,
    /// Highest LSN sent on this connection.
    sent_lsn: u64,
    acked_journal_lsn: u64,
    acked_durable_lsn: u64,
    /// In sync once the peer's journal holds this LSN.
    resync_target_lsn: Option<u64>,
    /// Sent, unacknowledged records: (LSN, window cost, sent at).
    inflight: VecDeque<(u64, u64, Instant)>,
    inflight_bytes: u64,
    resync_sent_bytes: u64,
    resync_acked_bytes: u64,

    // Receiving side.
    /// Highest LSN received on this connection (records arrive consecutively).
    received_lsn: u64,
    journaled_lsn: u64,
    durable_acked_lsn: u64,
    receiving_resync: bool,
    resync_received_bytes: u64,
    /// A `ResyncEnd` was received: its acknowledgement is owed even when its LSN is not
    /// above what was acknowledged before (a resync that changed no LSN).
    resync_end_ack_owed: bool,

    // Timers.
    last_received_at: Instant,
    /// A handshake must complete by then: heartbeats alone would keep a connection whose
    /// hello was lost alive forever.
    handshake_deadline: Option<Instant>,
    next_heartbeat_at: Option<Instant>,
    heartbeat_seq: u64,

    transmits: VecDeque<Message>,
    events: VecDeque<SessionEvent>,
}

impl Session {
    /// A session for a copy in `role` with lineage `local`, not yet connected.
    pub fn new(config: SessionConfig, role: Role, local: GenerationInfo, now: Instant) -> Session {
        assert!(
            !config.peer_timeout.is_zero(),
            "peer_timeout must be positive"
        );
        assert!(
            config.max_inflight_bytes > 0,
            "max_inflight_bytes must be positive"
        );
        Session {
            config,
            epoch: now,
            role,
            durable_lsn: local.head_lsn,
            applied_lsn: 0,
            local,
            state: ReplicaState::Connecting,
            link: Link::Down,
            last_error: None,
            ever_in_sync: false,
            shipping: Shipping::Off,
            sent_lsn: 0,
            acked_journal_lsn: 0,
            acked_durable_lsn: 0,
            resync_target_lsn: None,
            inflight: VecDeque::new(),
            inflight_bytes: 0,
            resync_sent_bytes: 0,
            resync_acked_bytes: 0,
            received_lsn: 0,
            journaled_lsn: 0,
            durable_acked_lsn: 0,
            receiving_resync: false,
            resync_received_bytes: 0,
            resync_end_ack_owed: false,
            last_received_at: now,
            handshake_deadline: None,
            next_heartbeat_at: None,
            heartbeat_seq: 0,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// The replica state (SPEC §5).
    pub fn state(&self) -> ReplicaState {
        self.state
    }

    /// Why the replica is not in sync, if it is not.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// The local lineage as the session knows it (head LSN included).
    pub fn local(&self) -> &GenerationInfo {
        &self.local
    }

    /// The local role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Highest LSN the peer acknowledged into its journal on this connection.
    pub fn acked_journal_lsn(&self) -> u64 {
        self.acked_journal_lsn
    }

    /// Highest LSN the peer acknowledged as durable on this connection.
    pub fn acked_durable_lsn(&self) -> u64 {
        self.acked_durable_lsn
    }

    /// Bytes shipped and not yet acknowledged.
    pub fn inflight_bytes(&self) -> u64 {
        self.inflight_bytes
    }

    /// Whether a record of `len_bytes` data would be accepted by `submit_write` now.
    pub fn can_send(&self, len_bytes: u64) -> bool {
        self.shipping == Shipping::Records
            && self.window_has_room(len_bytes.saturating_add(RECORD_OVERHEAD_BYTES))
    }

    fn window_has_room(&self, cost_bytes: u64) -> bool {
        // An empty window always takes one record, so a record larger than the window
        // cannot wedge the session.
        self.inflight.is_empty()
            || self.inflight_bytes.saturating_add(cost_bytes) <= self.config.max_inflight_bytes
    }

    fn heartbeat_interval(&self) -> Duration {
        self.config.peer_timeout / 4
    }

    // ---- outputs ------------------------------------------------------------------------

    /// The next message to write to the stream, in order.
    pub fn poll_transmit(&mut self) -> Option<Message> {
        self.transmits.pop_front()
    }

    /// The next event for the daemon.
    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        self.events.pop_front()
    }

    /// When `handle_timeout` must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if matches!(self.link, Link::Down) {
            return None;
        }
        let mut deadline = self.last_received_at + self.config.peer_timeout;
        if let Some(&(_, _, sent_at)) = self.inflight.front() {
            deadline = deadline.min(sent_at + self.config.peer_timeout);
        }
        if let Some(heartbeat_at) = self.next_heartbeat_at {
            deadline = deadline.min(heartbeat_at);
        }
        if let Some(handshake_deadline) = self.handshake_deadline {
            deadline = deadline.min(handshake_deadline);
        }
        Some(deadline)
    }

    fn transmit(&mut self, message: Message) {
        assert!(
            self.transmits.len() < MAX_QUEUED_TRANSMITS,
            "transmit queue not drained"
        );
        self.transmits.push_back(message);
    }

    fn event(&mut self, event: SessionEvent) {
        assert!(
            self.events.len() < MAX_QUEUED_EVENTS,
            "event queue not drained"
        );
        self.events.push_back(event);
    }

    fn set_state(&mut self, state: ReplicaState) {
        if self.state != state {
            self.state = state;
            if state == ReplicaState::InSync {
                self.ever_in_sync = true;
                self.last_error = None;
            }
            self.event(SessionEvent::StateChanged(state));
        }
    }

    // ---- inputs: transport and clock -----------------------------------------------------

    /// The transport stream for this volume is open: start the handshake.
    pub fn handle_connected(&mut self, now: Instant) {
        if !matches!(self.link, Link::Down) {
            self.drop_link(now);
        }
        let hello = self.hello();
        self.transmit(Message::Hello(hello.clone()));
        self.link = Link::Handshake {
            sent: Box::new(hello),
            ours: None,
            theirs: None,
            peer: None,
        };
        self.last_received_at = now;
        self.handshake_deadline = Some(now + self.config.peer_timeout);
        self.next_heartbeat_at = Some(now + self.heartbeat_interval());
    }

    /// The transport stream closed (or failed).
    pub fn handle_disconnected(&mut self, now: Instant) {
        if !matches!(self.link, Link::Down) {
            self.last_error
                .get_or_insert_with(|| "connection closed".to_owned());
            self.drop_link(now);
        }
    }

    /// Timers: heartbeats and peer loss.
    pub fn handle_timeout(&mut self, now: Instant) {
        if matches!(self.link, Link::Down) {
            return;
        }
        let silent = now >= self.last_received_at + self.config.peer_timeout;
        let unacked = self
            .inflight
            .front()
            .is_some_and(|&(_, _, sent_at)| now >= sent_at + self.config.peer_timeout);
        let no_handshake = self
            .handshake_deadline
            .is_some_and(|deadline| now >= deadline);
        if silent || unacked || no_handshake {
            let why = if silent {
                "peer timeout: nothing received"
            } else if unacked {
                "peer timeout: write not acknowledged"
            } else {
                "peer timeout: handshake did not complete"
            };
            self.last_error = Some(why.to_owned());
            self.event(SessionEvent::CloseConnection);
            self.drop_link(now);
            return;
        }
        if self.next_heartbeat_at.is_some_and(|at| now >= at) {
            self.heartbeat_seq += 1;
            let sent_at_us = u64::try_from(now.saturating_duration_since(self.epoch).as_micros())
                .unwrap_or(u64::MAX);
            self.transmit(Message::Heartbeat {
                sent_at_us,
                seq: self.heartbeat_seq,
            });
            self.next_heartbeat_at = Some(now + self.heartbeat_interval());
        }
    }

    /// Forgets the connection: the peer is lost and the state follows the policy.
    fn drop_link(&mut self, _now: Instant) {
        self.link = Link::Down;
        self.handshake_deadline = None;
        self.next_heartbeat_at = None;
        self.shipping = Shipping::Off;
        self.inflight.clear();
        self.inflight_bytes = 0;
        self.resync_target_lsn = None;
        self.receiving_resync = false;
        self.resync_end_ack_owed = false;
        self.event(SessionEvent::PeerLost);
        let state = match self.state {
            ReplicaState::SplitBrain => ReplicaState::SplitBrain,
            _ if self.role == Role::Primary && self.ever_in_sync => match self.config.on_disconnect
            {
                OnDisconnect::Degrade => ReplicaState::Degraded,
                OnDisconnect::Suspend => ReplicaState::Suspended,
            },
            ReplicaState::Degraded | ReplicaState::Suspended if self.role == Role::Primary => {
                self.state
            }
            _ => ReplicaState::Connecting,
        };
        self.set_state(state);
    }

    /// The peer broke the protocol: report, and have the connection closed. Never panics on
    /// what the peer sent.
    fn protocol_error(&mut self, now: Instant, error: SessionError) {
        self.last_error = Some(error.to_string());
        self.event(SessionEvent::ProtocolError(error));
        self.event(SessionEvent::CloseConnection);
        self.drop_link(now);
        self.set_state(ReplicaState::Connecting);
    }

    fn hello(&self) -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            node: self.config.node.clone(),
            volume: self.config.volume.clone(),
            size_bytes: self.config.size_bytes,
            role: self.role,
            generation: self.local.clone(),
            durable_lsn: self.durable_lsn.min(self.local.head_lsn),
            applied_lsn: self.applied_lsn.min(self.local.head_lsn),
        }
    }

    // ---- inputs: messages ------------------------------------------------------------------

    /// A message decoded from the stream.
    pub fn handle_message(&mut self, message: Message, now: Instant) {
        if matches!(self.link, Link::Down) {
            // A message racing a close; the daemon drops the stream anyway.
            return;
        }
        self.last_received_at = now;
        let name = message.name();
        match message {
            Message::Heartbeat { sent_at_us, seq } => {
                self.transmit(Message::HeartbeatReply { sent_at_us, seq })
            }
            Message::HeartbeatReply { sent_at_us, seq } => {
                if seq > self.heartbeat_seq {
                    return self.protocol_error(
                        now,
                        SessionError::UnexpectedMessage {
                            message: name,
                            state: self.state.as_str(),
                        },
                    );
                }
                let sent_at = self.epoch.checked_add(Duration::from_micros(sent_at_us));
                if let Some(rtt) = sent_at.and_then(|at| now.checked_duration_since(at)) {
                    self.event(SessionEvent::Rtt(rtt));
                }
            }
            Message::Goodbye { reason } => {
                self.last_error = Some(format!("peer said goodbye: {reason}"));
                self.event(SessionEvent::CloseConnection);
                self.drop_link(now);
            }
            Message::Refuse { code, reason } => {
                let error = SessionError::Refused { code, reason };
                self.last_error = Some(error.to_string());
                self.event(SessionEvent::HandshakeFailed {
                    reason: error.to_string(),
                });
                self.event(SessionEvent::CloseConnection);
                self.drop_link(now);
            }
            Message::Hello(hello) => self.on_hello(hello, now),
            Message::Welcome { decision } => self.on_welcome(decision, now),
            other => {
                if !matches!(self.link, Link::Up { .. }) {
                    return self.protocol_error(
                        now,
                        SessionError::UnexpectedMessage {
                            message: name,
                            state: "handshake",
                        },
                    );
                }
                self.on_replication(other, now);
            }
        }
    }

    fn on_hello(&mut self, hello: Hello, now: Instant) {
        let Link::Handshake {
            sent, ours, peer, ..
        } = &mut self.link
        else {
            return self.protocol_error(
                now,
                SessionError::UnexpectedMessage {
                    message: "hello",
                    state: self.state.as_str(),
                },
            );
        };
        if peer.is_some() {
            return self.protocol_error(
                now,
                SessionError::UnexpectedMessage {
                    message: "hello",
                    state: "handshake",
                },
            );
        }
        let refusal = if hello.protocol_version != PROTOCOL_VERSION {
            Some((
                RefuseCode::VersionMismatch,
                format!(
                    "protocol version {} not supported, this node speaks {PROTOCOL_VERSION}",
                    hello.protocol_version
                ),
            ))
        } else if hello.node != self.config.peer {
            Some((
                RefuseCode::WrongNode,
                format!(
                    "hello from node {:?}, expected {:?}",
                    hello.node, self.config.peer
                ),
            ))
        } else if hello.volume != self.config.volume {
            Some((
                RefuseCode::UnknownVolume,
                format!(
                    "volume {:?} is not replicated with this peer here",
                    hello.volume
                ),
            ))
        } else if hello.size_bytes != self.config.size_bytes {
            Some((
                RefuseCode::SizeMismatch,
                format!(
                    "volume size {} here, {} at the peer",
                    self.config.size_bytes, hello.size_bytes
                ),
            ))
        } else if let Err(error) = hello.generation.validate() {
            Some((RefuseCode::BadGeneration, error.to_string()))
        } else {
            None
        };
        if let Some((code, reason)) = refusal {
            self.transmit(Message::Refuse {
                code,
                reason: reason.clone(),
            });
            self.last_error = Some(reason.clone());
            self.event(SessionEvent::HandshakeFailed { reason });
            self.event(SessionEvent::CloseConnection);
            return self.drop_link(now);
        }
        // Decide over the hello we sent, not the current state, so both sides decide over the
        // same two inputs and their answers must mirror.
        let decision = decide(&sent.generation, sent.role, &hello.generation, hello.role);
        *ours = Some(decision);
        *peer = Some(Box::new(hello));
        self.transmit(Message::Welcome { decision });
        self.maybe_complete_handshake(now);
    }

    fn on_welcome(&mut self, decision: Decision, now: Instant) {
        let Link::Handshake { theirs, .. } = &mut self.link else {
            return self.protocol_error(
                now,
                SessionError::UnexpectedMessage {
                    message: "welcome",
                    state: self.state.as_str(),
                },
            );
        };
        if theirs.is_some() {
            return self.protocol_error(
                now,
                SessionError::UnexpectedMessage {
                    message: "welcome",
                    state: "handshake",
                },
            );
        }
        *theirs = Some(decision);
        self.maybe_complete_handshake(now);
    }

    fn maybe_complete_handshake(&mut self, now: Instant) {
        let Link::Handshake {
            sent,
            ours: Some(ours),
            theirs: Some(theirs),
            peer: Some(peer),
        } = &self.link
        else {
            return;
        };
        let (ours, theirs) = (*ours, *theirs);
        if theirs.mirror() != ours {
            return self.protocol_error(
                now,
                SessionError::DecisionMismatch {
                    ours: ours.as_str(),
                    theirs: theirs.as_str(),
                },
            );
        }
        let sent_head_lsn = sent.generation.head_lsn;
        let peer = peer.clone();
        let peer_role = peer.role;
        let peer_head_lsn = peer.generation.head_lsn;
        self.link = Link::Up { peer_role };
        self.handshake_deadline = None;
        self.event(SessionEvent::Handshake {
            decision: ours,
            peer: peer.clone(),
        });
        // Fresh per-connection bookkeeping: the peer may have lost a non-durable tail since
        // the last connection, so acks are monotonic per connection only.
        self.sent_lsn = 0;
        self.acked_journal_lsn = 0;
        self.acked_durable_lsn = 0;
        self.received_lsn = 0;
        self.journaled_lsn = 0;
        self.durable_acked_lsn = 0;
        self.resync_sent_bytes = 0;
        self.resync_acked_bytes = 0;
        self.resync_received_bytes = 0;
        let shipper = self.role == Role::Primary;
        match ours {
            Decision::Same if shipper => {
                if peer_head_lsn > sent_head_lsn {
                    return self.protocol_error(
                        now,
                        SessionError::PeerBeyondPrimary {
                            peer: peer_head_lsn,
                            local: sent_head_lsn,
                        },
                    );
                }
                self.start_shipping(
                    peer_head_lsn,
                    peer.durable_lsn.min(peer_head_lsn),
                    self.local.head_lsn,
                );
                if peer_head_lsn < self.local.head_lsn {
                    self.event(SessionEvent::ResyncNeeded {
                        kind: ResyncKind::Delta,
                        from_lsn: peer_head_lsn + 1,
                        peer_head_lsn,
                    });
                }
            }
            Decision::Same => {
                // Secondary (or both secondary): receive from our head on.
                self.received_lsn = self.local.head_lsn;
                self.journaled_lsn = self.local.head_lsn;
                self.durable_acked_lsn = self.durable_lsn.min(self.local.head_lsn);
                if peer_role == Role::Primary && peer_head_lsn > self.local.head_lsn {
                    self.resync_target_lsn = Some(peer_head_lsn);
                    self.set_state(ReplicaState::Resyncing);
                } else {
                    self.set_state(ReplicaState::InSync);
                }
            }
            Decision::LocalAhead { .. } | Decision::RemoteEmpty => {
                let (kind, common_lsn) = match ours {
                    Decision::LocalAhead { common_lsn, .. } => (ResyncKind::Delta, common_lsn),
                    _ => (ResyncKind::Full, 0),
                };
                self.start_shipping(common_lsn, 0, self.local.head_lsn);
                self.set_state(if kind == ResyncKind::Full {
                    ReplicaState::Syncing
                } else {
                    ReplicaState::Resyncing
                });
                self.event(SessionEvent::ResyncNeeded {
                    kind,
                    from_lsn: common_lsn + 1,
                    peer_head_lsn,
                });
            }
            Decision::RemoteAhead { .. } | Decision::LocalEmpty => {
                if self.role == Role::Primary {
                    self.last_error =
                        Some("the peer holds newer data; demote this copy".to_owned());
                    self.event(SessionEvent::DemoteRequired);
                    self.set_state(ReplicaState::Connecting);
                    return;
                }
                let common_lsn = match ours {
                    Decision::RemoteAhead { common_lsn, .. } => common_lsn,
                    _ => 0,
                };
                self.received_lsn = common_lsn;
                self.journaled_lsn = common_lsn;
                self.durable_acked_lsn = common_lsn;
                if self.local.head_lsn > common_lsn {
                    self.event(SessionEvent::RollbackNeeded { common_lsn });
                }
                self.resync_target_lsn = Some(peer_head_lsn);
                self.set_state(if ours == Decision::LocalEmpty {
                    ReplicaState::Syncing
                } else {
                    ReplicaState::Resyncing
                });
            }
            Decision::SplitBrain {
                common_generation, ..
            } => {
                self.last_error =
                    Some("split brain: both copies wrote since they split".to_owned());
                self.event(SessionEvent::SplitBrain { common_generation });
                self.set_state(ReplicaState::SplitBrain);
            }
            Decision::Unrelated | Decision::BothPrimary => {
                let reason = format!("copies cannot replicate: {}", ours.as_str());
                self.last_error = Some(reason.clone());
                self.event(SessionEvent::HandshakeFailed { reason });
                self.event(SessionEvent::CloseConnection);
                self.drop_link(now);
            }
        }
    }

    /// The peer holds records up to `peer_head_lsn`: ship from there; in sync once it holds
    /// `target_lsn`.
    fn start_shipping(&mut self, peer_head_lsn: u64, peer_durable_lsn: u64, target_lsn: u64) {
        self.sent_lsn = peer_head_lsn;
        self.acked_journal_lsn = peer_head_lsn;
        self.acked_durable_lsn = peer_durable_lsn;
        self.shipping = Shipping::Records;
        if peer_head_lsn >= target_lsn {
            self.resync_target_lsn = None;
            self.set_state(ReplicaState::InSync);
        } else {
            self.resync_target_lsn = Some(target_lsn);
            self.set_state(ReplicaState::Resyncing);
        }
    }

    fn on_replication(&mut self, message: Message, now: Instant) {
        let name = message.name();
        let unexpected = |state: ReplicaState| SessionError::UnexpectedMessage {
            message: name,
            state: state.as_str(),
        };
        match message {
            Message::Ack {
                journal_lsn,
                durable_lsn,
            } => {
                if self.shipping == Shipping::Off && self.resync_target_lsn.is_none() {
                    return self.protocol_error(now, unexpected(self.state));
                }
                if journal_lsn < self.acked_journal_lsn {
                    return self.protocol_error(
                        now,
                        SessionError::AckBackwards {
                            field: "journal",
                            previous: self.acked_journal_lsn,
                            found: journal_lsn,
                        },
                    );
                }
                if durable_lsn < self.acked_durable_lsn {
                    return self.protocol_error(
                        now,
                        SessionError::AckBackwards {
                            field: "durable",
                            previous: self.acked_durable_lsn,
                            found: durable_lsn,
                        },
                    );
                }
                if journal_lsn > self.sent_lsn {
                    return self.protocol_error(
                        now,
                        SessionError::AckBeyondSent {
                            acked: journal_lsn,
                            sent: self.sent_lsn,
                        },
                    );
                }
                if durable_lsn > journal_lsn {
                    return self.protocol_error(
                        now,
                        SessionError::DurableBeyondJournal {
                            durable: durable_lsn,
                            journal: journal_lsn,
                        },
                    );
                }
                self.acked_journal_lsn = journal_lsn;
                self.acked_durable_lsn = durable_lsn;
                while let Some(&(lsn, cost_bytes, _)) = self.inflight.front() {
                    if lsn > journal_lsn {
                        break;
                    }
                    self.inflight.pop_front();
                    self.inflight_bytes -= cost_bytes;
                }
                assert!(
                    self.acked_journal_lsn <= self.sent_lsn,
                    "acked never exceeds sent"
                );
                self.event(SessionEvent::Acked {
                    journal_lsn,
                    durable_lsn,
                });
                if self
                    .resync_target_lsn
                    .is_some_and(|target| journal_lsn >= target)
                {
                    self.resync_target_lsn = None;
                    self.set_state(ReplicaState::InSync);
                }
            }
            Message::ResyncAck { received_bytes } => {
                if received_bytes < self.resync_acked_bytes
                    || received_bytes > self.resync_sent_bytes
                {
                    return self.protocol_error(now, unexpected(self.state));
                }
                self.resync_acked_bytes = received_bytes;
            }
            Message::DirtyRanges { ranges, last } => {
                self.event(SessionEvent::PeerDirtyRanges { ranges, last })
            }
            Message::RoleChange { role, generation } => {
                if let Link::Up { peer_role } = &mut self.link {
                    *peer_role = role;
                }
                self.event(SessionEvent::PeerRoleChanged { role, generation });
            }
            Message::Write(record) => {
                if self.role != Role::Secondary || self.receiving_resync {
                    return self.protocol_error(now, unexpected(self.state));
                }
                if let Err(error) = self.check_range(record.offset_bytes, record.len_bytes.into()) {
                    return self.protocol_error(now, error);
                }
                let expected = self.received_lsn.saturating_add(1);
                if record.lsn != expected {
                    return self.protocol_error(
                        now,
                        SessionError::LsnGap {
                            expected,
                            found: record.lsn,
                        },
                    );
                }
                self.received_lsn = record.lsn;
                self.event(SessionEvent::Received(record));
            }
            Message::Flush { upto_lsn } => {
                if self.role != Role::Secondary {
                    return self.protocol_error(now, unexpected(self.state));
                }
                if upto_lsn > self.received_lsn {
                    return self.protocol_error(
                        now,
                        SessionError::FlushBeyondReceived {
                            upto: upto_lsn,
                            received: self.received_lsn,
                        },
                    );
                }
                self.event(SessionEvent::FlushRequested { upto_lsn });
            }
            Message::ResyncBegin {
                kind,
                total_bytes,
                target_lsn,
            } => {
                if self.role != Role::Secondary
                    || self.receiving_resync
                    || target_lsn < self.received_lsn
                {
                    return self.protocol_error(now, unexpected(self.state));
                }
                self.receiving_resync = true;
                self.set_state(if kind == ResyncKind::Full {
                    ReplicaState::Syncing
                } else {
                    ReplicaState::Resyncing
                });
                self.event(SessionEvent::ResyncBegin {
                    kind,
                    total_bytes,
                    target_lsn,
                });
            }
            Message::ResyncData { offset_bytes, data } => {
                if !self.receiving_resync {
                    return self.protocol_error(now, unexpected(self.state));
                }
                if let Err(error) = self.check_range(offset_bytes, data.len() as u64) {
                    return self.protocol_error(now, error);
                }
                self.resync_received_bytes =
                    self.resync_received_bytes.saturating_add(data.len() as u64);
                self.transmit(Message::ResyncAck {
                    received_bytes: self.resync_received_bytes,
                });
                self.event(SessionEvent::ResyncData { offset_bytes, data });
            }
            Message::ResyncZero {
                offset_bytes,
                len_bytes,
            } => {
                if !self.receiving_resync {
                    return self.protocol_error(now, unexpected(self.state));
                }
                if let Err(error) = self.check_range(offset_bytes, len_bytes) {
                    return self.protocol_error(now, error);
                }
                self.event(SessionEvent::ResyncZero {
                    offset_bytes,
                    len_bytes,
                });
            }
            Message::ResyncEnd { lsn } => {
                if !self.receiving_resync || lsn < self.received_lsn || lsn == u64::MAX {
                    return self.protocol_error(now, unexpected(self.state));
                }
                self.receiving_resync = false;
                self.received_lsn = lsn;
                self.resync_end_ack_owed = true;
                self.event(SessionEvent::ResyncEnd { lsn });
            }
            // Handshake and liveness messages are handled by the caller.
            Message::Hello(_)
            | Message::Welcome { .. }
            | Message::Refuse { .. }
            | Message::Heartbeat { .. }
            | Message::HeartbeatReply { .. }
            | Message::Goodbye { .. } => self.protocol_error(now, unexpected(self.state)),
        }
    }

    /// A range from the peer must lie inside the volume.
    fn check_range(&self, offset_bytes: u64, len_bytes: u64) -> Result<(), SessionError> {
        let inside = offset_bytes
            .checked_add(len_bytes)
            .is_some_and(|end| end <= self.config.size_bytes);
        if inside {
            Ok(())
        } else {
            Err(SessionError::BadRange {
                offset_bytes,
                len_bytes,
                size_bytes: self.config.size_bytes,
            })
        }
    }

    // ---- inputs: the local write path (shipping side) ------------------------------------

    /// A new record is in the local journal (whether or not it can be shipped): the head the
    /// next hello announces.
    pub fn note_local_head(&mut self, head_lsn: u64) {
        assert!(
            head_lsn >= self.local.head_lsn,
            "the journal head only grows"
        );
        self.local.head_lsn = head_lsn;
    }

    /// The LSN `submit_write` accepts next, when records are being shipped. The daemon's
    /// shipper reads its journal from here, so it never has to track a cursor of its own
    /// across reconnects.
    pub fn next_ship_lsn(&self) -> Option<u64> {
        (self.shipping == Shipping::Records && matches!(self.link, Link::Up { .. }))
            .then(|| self.sent_lsn + 1)
    }

    /// Ships a journal record. Records go out in consecutive LSN order; a write submitted
    /// while shipping must be completed only after its `Acked` (metro).
    pub fn submit_write(&mut self, record: WriteRecord, now: Instant) -> Result<(), SessionError> {
        if self.role != Role::Primary {
            return Err(SessionError::WrongRole { needed: "primary" });
        }
        if record.lsn > self.local.head_lsn {
            self.note_local_head(record.lsn);
        }
        if self.shipping != Shipping::Records || !matches!(self.link, Link::Up { .. }) {
            return Err(SessionError::NotReplicating {
                state: self.state.as_str(),
            });
        }
        let expected = self.sent_lsn + 1;
        if record.lsn != expected {
            return Err(SessionError::OutOfOrder {
                expected,
                found: record.lsn,
            });
        }
        let cost_bytes = record.data.len() as u64 + RECORD_OVERHEAD_BYTES;
        if !self.window_has_room(cost_bytes) {
            return Err(SessionError::Blocked {
                inflight_bytes: self.inflight_bytes,
                max_inflight_bytes: self.config.max_inflight_bytes,
            });
        }
        assert!(record.lsn > self.sent_lsn, "sent LSNs only grow");
        self.sent_lsn = record.lsn;
        self.inflight.push_back((record.lsn, cost_bytes, now));
        self.inflight_bytes += cost_bytes;
        self.transmit(Message::Write(record));
        Ok(())
    }

    /// Asks the peer for durability up to `upto_lsn` (answered by an `Acked` event).
    pub fn flush(&mut self, upto_lsn: u64) -> Result<(), SessionError> {
        if self.role != Role::Primary {
            return Err(SessionError::WrongRole { needed: "primary" });
        }
        if self.shipping == Shipping::Off || !matches!(self.link, Link::Up { .. }) {
            return Err(SessionError::NotReplicating {
                state: self.state.as_str(),
            });
        }
        let upto_lsn = upto_lsn.min(self.sent_lsn);
        self.transmit(Message::Flush { upto_lsn });
        Ok(())
    }

    /// Starts a dirty-map (or full) resync after `ResyncNeeded`; records are not shipped until
    /// `end_resync`. `target_lsn` is the LSN the peer will hold when it ends.
    pub fn begin_resync(
        &mut self,
        kind: ResyncKind,
        total_bytes: u64,
        target_lsn: u64,
    ) -> Result<(), SessionError> {
        if self.shipping != Shipping::Records || !matches!(self.link, Link::Up { .. }) {
            return Err(SessionError::NotReplicating {
                state: self.state.as_str(),
            });
        }
        self.shipping = Shipping::Resync;
        self.transmit(Message::ResyncBegin {
            kind,
            total_bytes,
            target_lsn,
        });
        Ok(())
    }

    /// Sends resync contents, within the in-flight window.
    pub fn send_resync_data(&mut self, offset_bytes: u64, data: Bytes) -> Result<(), SessionError> {
        if self.shipping != Shipping::Resync {
            return Err(SessionError::NotReplicating {
                state: self.state.as_str(),
            });
        }
        let len_bytes = data.len() as u64;
        if data.len() > MAX_DATA_BYTES {
            return Err(SessionError::ResyncChunk { len_bytes });
        }
        let inflight_bytes = self.resync_sent_bytes - self.resync_acked_bytes;
        if inflight_bytes > 0
            && inflight_bytes.saturating_add(len_bytes) > self.config.max_inflight_bytes
        {
            return Err(SessionError::Blocked {
                inflight_bytes,
                max_inflight_bytes: self.config.max_inflight_bytes,
            });
        }
        self.resync_sent_bytes += len_bytes;
        self.transmit(Message::ResyncData { offset_bytes, data });
        Ok(())
    }

    /// Sends a range that reads as zeros.
    pub fn send_resync_zero(
        &mut self,
        offset_bytes: u64,
        len_bytes: u64,
    ) -> Result<(), SessionError> {
        if self.shipping != Shipping::Resync {
            return Err(SessionError::NotReplicating {
                state: self.state.as_str(),
            });
        }
        self.transmit(Message::ResyncZero {
            offset_bytes,
            len_bytes,
        });
        Ok(())
    }

    /// Ends the resync: the peer holds the volume as of `lsn`; records after it ship as usual.
    pub fn end_resync(&mut self, lsn: u64, now: Instant) -> Result<(), SessionError> {
        if self.shipping != Shipping::Resync {
            return Err(SessionError::NotReplicating {
                state: self.state.as_str(),
            });
        }
        if lsn < self.sent_lsn {
            return Err(SessionError::OutOfOrder {
                expected: self.sent_lsn,
                found: lsn,
            });
        }
        self.transmit(Message::ResyncEnd { lsn });
        self.sent_lsn = lsn;
        self.inflight.push_back((lsn, RECORD_OVERHEAD_BYTES, now));
        self.inflight_bytes += RECORD_OVERHEAD_BYTES;
        self.resync_target_lsn = Some(lsn.max(self.resync_target_lsn.unwrap_or(0)));
        self.shipping = Shipping::Records;
        Ok(())
    }

    // ---- inputs: the local write path (receiving side) ------------------------------------

    /// The copy that is behind sends the ranges it must have overwritten (see
    /// `RollbackNeeded`), at most [`MAX_DIRTY_RANGES_PER_FRAME`] per call.
    pub fn send_dirty_ranges(
        &mut self,
        ranges: Vec<DirtyRange>,
        last: bool,
    ) -> Result<(), SessionError> {
        if !matches!(self.link, Link::Up { .. }) {
            return Err(SessionError::NotReplicating {
                state: self.state.as_str(),
            });
        }
        if ranges.len() > MAX_DIRTY_RANGES_PER_FRAME {
            return Err(SessionError::ResyncChunk {
                len_bytes: ranges.len() as u64,
            });
        }
        self.transmit(Message::DirtyRanges { ranges, last });
        Ok(())
    }

    /// Secondary: records up to `lsn` are in the local journal. Acknowledges them.
    pub fn journaled(&mut self, lsn: u64) {
        let owed = self.resync_end_ack_owed && lsn == self.received_lsn;
        if (lsn <= self.journaled_lsn && !owed)
            || lsn > self.received_lsn
            || !matches!(self.link, Link::Up { .. })
        {
            // A late completion from before a reconnect: nothing to acknowledge on this
            // connection; the next hello carries the head.
            self.local.head_lsn = self.local.head_lsn.max(lsn);
            return;
        }
        self.resync_end_ack_owed = false;
        self.journaled_lsn = lsn;
        self.local.head_lsn = lsn;
        self.send_ack();
    }

    /// Secondary: records up to `lsn` are durable. Acknowledges them, up to what this
    /// connection has acknowledged as journaled (a sync that started before a reconnect may
    /// cover records this connection has not acknowledged yet; those follow with `journaled`).
    pub fn durable(&mut self, lsn: u64) {
        self.durable_lsn = self.durable_lsn.max(lsn);
        let lsn = lsn.min(self.journaled_lsn);
        if !matches!(self.link, Link::Up { .. }) || lsn <= self.durable_acked_lsn {
            return;
        }
        self.durable_acked_lsn = lsn;
        self.send_ack();
    }

    fn send_ack(&mut self) {
        assert!(
            self.durable_acked_lsn <= self.journaled_lsn,
            "durable never exceeds journaled"
        );
        self.transmit(Message::Ack {
            journal_lsn: self.journaled_lsn,
            durable_lsn: self.durable_acked_lsn,
        });
        let caught_up = self
            .resync_target_lsn
            .is_none_or(|target| self.journaled_lsn >= target);
        if matches!(self.state, ReplicaState::Resyncing | ReplicaState::Syncing)
            && self.role == Role::Secondary
            && !self.receiving_resync
            && caught_up
        {
            self.resync_target_lsn = None;
            self.set_state(ReplicaState::InSync);
        }
    }

    // ---- role changes ------------------------------------------------------------------------

    /// The local role or lineage changed (promote, demote, adopt after a resync, resolve).
    /// A connected peer is told with a `RoleChange`.
    pub fn set_local(&mut self, role: Role, local: GenerationInfo) {
        let promoted = role == Role::Primary && self.role != Role::Primary;
        self.role = role;
        self.local = local;
        if matches!(self.link, Link::Up { .. }) {
            let generation = if promoted {
                self.local.current().cloned()
            } else {
                None
            };
            self.transmit(Message::RoleChange { role, generation });
        }
    }

    /// Closes the session on purpose (shutdown, pause): tells the peer why.
    pub fn close(&mut self, reason: &str, now: Instant) {
        if !matches!(self.link, Link::Down) {
            let reason: String = reason.chars().take(256).collect();
            self.transmit(Message::Goodbye { reason });
            self.drop_link(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::RecordKind;
    use crate::repl::{decode, encode};
    use bytes::BytesMut;

    const TIMEOUT: Duration = Duration::from_millis(1000);

    fn config(node: &str, peer: &str) -> SessionConfig {
        SessionConfig {
            node: node.into(),
            peer: peer.into(),
            volume: "vol".into(),
            size_bytes: 1 << 20,
            peer_timeout: TIMEOUT,
            on_disconnect: OnDisconnect::Degrade,
            max_inflight_bytes: 4096,
        }
    }

    /// splitmix64: a tiny seeded generator, so every run replays from its seed.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn chance(&mut self, percent: u64) -> bool {
            self.next() % 100 < percent
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[derive(Clone, Copy)]
    struct Faults {
        drop_percent: u64,
        duplicate_percent: u64,
        corrupt_percent: u64,
        delay_ms_max: u64,
    }

    const NO_FAULTS: Faults = Faults {
        drop_percent: 0,
        duplicate_percent: 0,
        corrupt_percent: 0,
        delay_ms_max: 1,
    };

    /// Two sessions, a primary daemon model and a secondary daemon model, a faulty network
    /// and a virtual clock that jumps to the next deadline.
    struct Sim {
        rng: Rng,
        base: Instant,
        now: Instant,
        primary: Session,
        secondary: Session,
        /// In flight per direction: (deliver at, frame bytes). 0 = primary to secondary.
        wire: [Vec<(Instant, u64, BytesMut)>; 2],
        wire_seq: u64,
        link_up: bool,
        partitioned: bool,
        reconnect_at: Option<Instant>,
        faults: Faults,
        /// The primary's journal: record i has LSN i + 1.
        journal: Vec<WriteRecord>,
        /// What the secondary's daemon journaled, by LSN.
        secondary_journal: Vec<WriteRecord>,
        max_acked_lsn: u64,
        resets: u64,
    }

    impl Sim {
        fn new(seed: u64, faults: Faults) -> Sim {
            let base = Instant::now(); // the only real clock read: the virtual clock's origin
            let lineage = GenerationInfo::create(9, "a").unwrap();
            Sim {
                rng: Rng(seed),
                base,
                now: base,
                primary: Session::new(config("a", "b"), Role::Primary, lineage.clone(), base),
                secondary: Session::new(config("b", "a"), Role::Secondary, lineage, base),
                wire: [Vec::new(), Vec::new()],
                wire_seq: 0,
                link_up: false,
                partitioned: false,
                reconnect_at: Some(base),
                faults,
                journal: Vec::new(),
                secondary_journal: Vec::new(),
                max_acked_lsn: 0,
                resets: 0,
            }
        }

        fn ms(&self) -> u128 {
            (self.now - self.base).as_millis()
        }

        fn reset_link(&mut self) {
            if self.link_up {
                self.link_up = false;
                self.resets += 1;
                self.wire = [Vec::new(), Vec::new()];
                self.primary.handle_disconnected(self.now);
                self.secondary.handle_disconnected(self.now);
            }
            if self.reconnect_at.is_none() {
                self.reconnect_at = Some(self.now + Duration::from_millis(100));
            }
        }

        fn send(&mut self, direction: usize, message: &Message) {
            let mut frame = BytesMut::new();
            encode(message, &mut frame).unwrap();
            if !self.link_up || self.partitioned || self.rng.chance(self.faults.drop_percent) {
                return;
            }
            let copies = if self.rng.chance(self.faults.duplicate_percent) {
                2
            } else {
                1
            };
            for _ in 0..copies {
                let mut frame = frame.clone();
                if self.rng.chance(self.faults.corrupt_percent) {
                    let bit = self.rng.below(frame.len() as u64 * 8) as usize;
                    frame[bit / 8] ^= 1 << (bit % 8);
                }
                let delay = Duration::from_millis(1 + self.rng.below(self.faults.delay_ms_max));
                self.wire_seq += 1;
                self.wire[direction].push((self.now + delay, self.wire_seq, frame));
            }
        }

        /// Drains outputs of both sessions and acts as both daemons, until quiet.
        fn pump(&mut self) {
            loop {
                let mut progress = false;
                // The primary's shipper reads its journal from the cursor.
                while let Some(lsn) = self
                    .primary
                    .next_ship_lsn()
                    .filter(|lsn| *lsn <= self.journal.len() as u64)
                {
                    let record = self.journal[lsn as usize - 1].clone();
                    if self.primary.submit_write(record, self.now).is_err() {
                        break;
                    }
                    progress = true;
                }
                while let Some(message) = self.primary.poll_transmit() {
                    self.send(0, &message);
                    progress = true;
                }
                while let Some(message) = self.secondary.poll_transmit() {
                    self.send(1, &message);
                    progress = true;
                }
                while let Some(event) = self.primary.poll_event() {
                    progress = true;
                    if std::env::var_os("FERRY_TRACE").is_some() {
                        eprintln!("{} ms primary {event:?}", self.ms());
                    }
                    match event {
                        SessionEvent::Acked { journal_lsn, .. } => {
                            // The property: never acknowledged beyond what the secondary holds,
                            // and what it holds is what the primary wrote.
                            assert!(
                                journal_lsn as usize <= self.secondary_journal.len(),
                                "acked {journal_lsn} but the secondary holds {}",
                                self.secondary_journal.len()
                            );
                            assert_eq!(
                                &self.secondary_journal[..journal_lsn as usize],
                                &self.journal[..journal_lsn as usize]
                            );
                            self.max_acked_lsn = self.max_acked_lsn.max(journal_lsn);
                        }
                        SessionEvent::CloseConnection => self.reset_link(),
                        _ => {}
                    }
                }
                while let Some(event) = self.secondary.poll_event() {
                    progress = true;
                    if std::env::var_os("FERRY_TRACE").is_some()
                        && !matches!(event, SessionEvent::Received(_))
                    {
                        eprintln!("{} ms secondary {event:?}", self.ms());
                    }
                    match event {
                        SessionEvent::Received(record) => {
                            assert_eq!(
                                record.lsn as usize,
                                self.secondary_journal.len() + 1,
                                "applied out of order"
                            );
                            let lsn = record.lsn;
                            self.secondary_journal.push(record);
                            self.secondary.journaled(lsn);
                        }
                        SessionEvent::FlushRequested { upto_lsn } => {
                            self.secondary.durable(upto_lsn)
                        }
                        SessionEvent::CloseConnection => self.reset_link(),
                        _ => {}
                    }
                }
                if !progress {
                    break;
                }
            }
        }

        fn write(&mut self) {
            let lsn = self.journal.len() as u64 + 1;
            let data = Bytes::from(lsn.to_le_bytes().repeat(1 + self.rng.below(64) as usize));
            let record = WriteRecord {
                lsn,
                kind: RecordKind::Write,
                fua: false,
                offset_bytes: 0,
                len_bytes: data.len() as u32,
                data,
            };
            self.journal.push(record);
            self.primary.note_local_head(lsn);
        }

        /// Advances the clock to the next thing that happens (at most `until`) and does it.
        fn step(&mut self, until: Instant, next_write_at: Option<Instant>) {
            let mut next = until;
            for t in [
                self.primary.poll_timeout(),
                self.secondary.poll_timeout(),
                self.reconnect_at,
                next_write_at,
            ]
            .into_iter()
            .flatten()
            {
                next = next.min(t);
            }
            for direction in &self.wire {
                for (at, _, _) in direction {
                    next = next.min(*at);
                }
            }
            assert!(next >= self.now, "the virtual clock never goes back");
            self.now = next;
            if self.reconnect_at.is_some_and(|at| at <= self.now) {
                self.reconnect_at = None;
                if self.partitioned {
                    self.reconnect_at = Some(self.now + Duration::from_millis(200));
                } else if !self.link_up {
                    self.link_up = true;
                    self.primary.handle_connected(self.now);
                    self.secondary.handle_connected(self.now);
                }
            }
            for direction in 0..2 {
                // Deliver due frames in delivery-time order (ties by send order).
                self.wire[direction].sort_by_key(|(at, seq, _)| (*at, *seq));
                while self.wire[direction]
                    .first()
                    .is_some_and(|(at, _, _)| *at <= self.now)
                {
                    let (_, _, mut frame) = self.wire[direction].remove(0);
                    let receiver = if direction == 0 {
                        &mut self.secondary
                    } else {
                        &mut self.primary
                    };
                    match decode(&mut frame) {
                        Ok(Some(message)) => receiver.handle_message(message, self.now),
                        // A corrupted frame: the daemon counts it and resets the connection.
                        Ok(None) | Err(_) => {
                            self.reset_link();
                            break;
                        }
                    }
                    self.pump();
                    if !self.link_up {
                        break;
                    }
                }
            }
            if self.primary.poll_timeout().is_some_and(|t| t <= self.now) {
                self.primary.handle_timeout(self.now);
            }
            if self.secondary.poll_timeout().is_some_and(|t| t <= self.now) {
                self.secondary.handle_timeout(self.now);
            }
            if next_write_at.is_some_and(|t| t <= self.now) {
                self.write();
            }
            self.pump();
        }

        fn run(&mut self, duration: Duration, write_every_ms: Option<u64>) {
            let until = self.now + duration;
            let mut next_write_at = write_every_ms.map(|ms| self.now + Duration::from_millis(ms));
            let mut steps = 0u64;
            while self.now < until {
                steps += 1;
                assert!(steps < 2_000_000, "simulation does not advance");
                self.step(until, next_write_at);
                if let (Some(at), Some(every_ms)) = (next_write_at, write_every_ms) {
                    if at <= self.now {
                        next_write_at = Some(
                            self.now + Duration::from_millis(1 + self.rng.below(every_ms * 2)),
                        );
                    }
                }
            }
        }

        fn assert_converged(&self, seed: u64) {
            let context = format!("seed {seed} at {} ms, {} resets, link up {}, reconnect {:?}, secondary {:?}, errors {:?} / {:?}, journal {} sent {} acked {} inflight {} shipping {:?} link {:?}", self.ms(), self.resets, self.link_up, self.reconnect_at, self.secondary.state(), self.primary.last_error(), self.secondary.last_error(), self.journal.len(), self.primary.sent_lsn, self.primary.acked_journal_lsn, self.primary.inflight.len(), self.primary.shipping, self.primary.link);
            assert_eq!(
                self.primary.state(),
                ReplicaState::InSync,
                "primary not in sync: {context}"
            );
            assert_eq!(
                self.secondary.state(),
                ReplicaState::InSync,
                "secondary not in sync: {context}"
            );
            assert_eq!(
                self.secondary_journal, self.journal,
                "journals differ: {context}"
            );
            assert_eq!(
                self.max_acked_lsn,
                self.journal.len() as u64,
                "not everything acked: {context}"
            );
        }
    }

    /// One randomized run: writes under faults and a partition, then a quiet period in which
    /// both sides must reach in-sync with identical journals.
    fn simulate(seed: u64) {
        eprintln!("session simulation seed {seed} (replay: FERRY_SEED={seed})");
        let mut rng = Rng(seed ^ 0x5eed);
        let faults = Faults {
            drop_percent: rng.below(4),
            duplicate_percent: rng.below(3),
            corrupt_percent: rng.below(3),
            delay_ms_max: 1 + rng.below(20),
        };
        let mut sim = Sim::new(seed, faults);
        sim.run(Duration::from_secs(3), Some(5));
        sim.partitioned = true;
        sim.run(Duration::from_millis(500 + rng.below(3000)), Some(5));
        sim.partitioned = false;
        sim.run(Duration::from_secs(2), Some(5));
        sim.faults = NO_FAULTS;
        sim.run(Duration::from_secs(10), None);
        sim.assert_converged(seed);
    }

    #[test]
    fn random_networks_converge() {
        match std::env::var("FERRY_SEED") {
            Ok(seed) => simulate(seed.parse().expect("FERRY_SEED is a u64")),
            Err(_) => {
                let count = std::env::var("FERRY_SIM_RUNS")
                    .ok()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(40u64);
                for seed in 0..count {
                    simulate(seed);
                }
            }
        }
    }

    /// Found by the simulation: a hello lost on a connection kept alive by heartbeats left the
    /// handshake pending forever (fixed by the handshake deadline).
    #[test]
    fn regression_seed_2_lost_hello() {
        simulate(2);
    }

    /// Found by the simulation: a shipper cursor kept by the daemon went stale across a
    /// handshake (fixed by `next_ship_lsn`, the session owning the cursor).
    #[test]
    fn regression_seed_7_stale_ship_cursor() {
        simulate(7);
    }

    #[test]
    fn clean_network_reaches_in_sync_and_acks_everything() {
        let mut sim = Sim::new(1, NO_FAULTS);
        sim.run(Duration::from_secs(2), Some(3));
        sim.run(Duration::from_secs(1), None);
        sim.assert_converged(1);
        assert_eq!(sim.resets, 0);
        assert!(sim.journal.len() > 100);
    }

    #[test]
    fn heartbeat_and_peer_timeout_fire_at_the_configured_times() {
        let base = Instant::now();
        let lineage = GenerationInfo::create(9, "a").unwrap();
        let mut primary = Session::new(config("a", "b"), Role::Primary, lineage, base);
        assert_eq!(
            primary.poll_timeout(),
            None,
            "no timers without a connection"
        );
        primary.handle_connected(base);
        assert!(matches!(primary.poll_transmit(), Some(Message::Hello(_))));
        assert_eq!(primary.poll_timeout(), Some(base + TIMEOUT / 4));
        let mut now;
        for beat in 1..4u32 {
            now = primary.poll_timeout().unwrap();
            assert_eq!(now, base + TIMEOUT / 4 * beat);
            primary.handle_timeout(now);
            assert!(
                matches!(primary.poll_transmit(), Some(Message::Heartbeat { seq, .. }) if seq == u64::from(beat))
            );
        }
        // Nothing received: the peer is lost exactly at peer_timeout.
        now = primary.poll_timeout().unwrap();
        assert_eq!(now, base + TIMEOUT);
        primary.handle_timeout(now);
        let events: Vec<_> = std::iter::from_fn(|| primary.poll_event()).collect();
        assert!(events.contains(&SessionEvent::PeerLost));
        assert!(events.contains(&SessionEvent::CloseConnection));
        assert_eq!(primary.poll_timeout(), None);
        assert_eq!(
            primary.state(),
            ReplicaState::Connecting,
            "never in sync: still connecting"
        );
    }

    #[test]
    fn in_sync_primary_degrades_or_suspends_on_peer_loss() {
        for (policy, expected) in [
            (OnDisconnect::Degrade, ReplicaState::Degraded),
            (OnDisconnect::Suspend, ReplicaState::Suspended),
        ] {
            let mut sim = Sim::new(2, NO_FAULTS);
            sim.primary.config.on_disconnect = policy;
            sim.run(Duration::from_millis(300), Some(5));
            assert_eq!(sim.primary.state(), ReplicaState::InSync);
            sim.partitioned = true;
            let cut_at = sim.now;
            sim.run(TIMEOUT + Duration::from_millis(50), Some(5));
            assert_eq!(sim.primary.state(), expected);
            assert!(sim.now >= cut_at + TIMEOUT);
            sim.partitioned = false;
            sim.run(Duration::from_secs(3), None);
            sim.assert_converged(2);
        }
    }

    /// A resync that ends at the LSN the secondary already holds (a switchover with nothing
    /// to send, or two empty copies) must still be acknowledged, or the primary would wait
    /// for that ack until peer_timeout and degrade.
    #[test]
    fn a_resync_ending_at_the_held_lsn_is_acknowledged() {
        let now = Instant::now();
        let lineage = GenerationInfo::create(9, "a").unwrap();
        let mut primary = Session::new(config("a", "b"), Role::Primary, lineage, now);
        let mut secondary = Session::new(
            config("b", "a"),
            Role::Secondary,
            GenerationInfo::empty(),
            now,
        );
        primary.handle_connected(now);
        secondary.handle_connected(now);
        let exchange = |p: &mut Session, s: &mut Session| {
            for _ in 0..3 {
                while let Some(m) = p.poll_transmit() {
                    s.handle_message(m, now);
                }
                while let Some(m) = s.poll_transmit() {
                    p.handle_message(m, now);
                }
            }
        };
        exchange(&mut primary, &mut secondary);
        assert_eq!(primary.state(), ReplicaState::Syncing);
        primary.begin_resync(ResyncKind::Full, 0, 0).unwrap();
        primary.end_resync(0, now).unwrap();
        exchange(&mut primary, &mut secondary);
        let mut ended = false;
        while let Some(event) = secondary.poll_event() {
            ended |= event == SessionEvent::ResyncEnd { lsn: 0 };
        }
        assert!(ended);
        secondary.journaled(0);
        secondary.durable(0);
        exchange(&mut primary, &mut secondary);
        assert_eq!(primary.state(), ReplicaState::InSync);
        assert_eq!(secondary.state(), ReplicaState::InSync);
        assert_eq!(primary.inflight_bytes(), 0);
    }

    /// A record past the end of the volume (or whose end overflows) is refused before the
    /// daemon ever sees it.
    #[test]
    fn records_outside_the_volume_are_protocol_errors() {
        for offset in [u64::MAX - 100, 1 << 40] {
            let now = Instant::now();
            let (_, mut secondary) = connected_pair(now);
            let mut bad = record(1, 4096);
            bad.offset_bytes = offset;
            secondary.handle_message(Message::Write(bad), now);
            let mut refused = false;
            while let Some(event) = secondary.poll_event() {
                assert!(
                    !matches!(event, SessionEvent::Received(_)),
                    "applied: {event:?}"
                );
                refused |= matches!(
                    event,
                    SessionEvent::ProtocolError(SessionError::BadRange { .. })
                );
            }
            assert!(refused, "offset {offset} accepted");
        }
    }

    /// Connects a primary and a secondary session directly and finishes the handshake.
    fn connected_pair(now: Instant) -> (Session, Session) {
        let lineage = GenerationInfo::create(9, "a").unwrap();
        let mut primary = Session::new(config("a", "b"), Role::Primary, lineage.clone(), now);
        let mut secondary = Session::new(config("b", "a"), Role::Secondary, lineage, now);
        primary.handle_connected(now);
        secondary.handle_connected(now);
        for _ in 0..3 {
            while let Some(m) = primary.poll_transmit() {
                secondary.handle_message(m, now);
            }
            while let Some(m) = secondary.poll_transmit() {
                primary.handle_message(m, now);
            }
        }
        assert_eq!(primary.state(), ReplicaState::InSync);
        assert_eq!(secondary.state(), ReplicaState::InSync);
        while primary.poll_event().is_some() {}
        while secondary.poll_event().is_some() {}
        (primary, secondary)
    }

    fn record(lsn: u64, len: usize) -> WriteRecord {
        WriteRecord {
            lsn,
            kind: RecordKind::Write,
            fua: false,
            offset_bytes: 0,
            len_bytes: len as u32,
            data: Bytes::from(vec![7u8; len]),
        }
    }

    #[test]
    fn ack_beyond_sent_or_backwards_is_a_protocol_error_not_a_panic() {
        let now = Instant::now();
        let (mut primary, _) = connected_pair(now);
        primary.submit_write(record(1, 10), now).unwrap();
        primary.handle_message(
            Message::Ack {
                journal_lsn: 5,
                durable_lsn: 0,
            },
            now,
        );
        assert!(matches!(
            primary.poll_event(),
            Some(SessionEvent::ProtocolError(SessionError::AckBeyondSent {
                acked: 5,
                sent: 1
            }))
        ));
        assert_eq!(primary.state(), ReplicaState::Connecting);

        let (mut primary, _) = connected_pair(now);
        primary.submit_write(record(1, 10), now).unwrap();
        primary.submit_write(record(2, 10), now).unwrap();
        primary.handle_message(
            Message::Ack {
                journal_lsn: 2,
                durable_lsn: 1,
            },
            now,
        );
        assert_eq!(
            primary.poll_event(),
            Some(SessionEvent::Acked {
                journal_lsn: 2,
                durable_lsn: 1
            })
        );
        primary.handle_message(
            Message::Ack {
                journal_lsn: 1,
                durable_lsn: 1,
            },
            now,
        );
        assert!(matches!(
            primary.poll_event(),
            Some(SessionEvent::ProtocolError(
                SessionError::AckBackwards { .. }
            ))
        ));
    }

    #[test]
    fn gaps_and_duplicates_are_never_applied() {
        let now = Instant::now();
        let (_, mut secondary) = connected_pair(now);
        secondary.handle_message(Message::Write(record(1, 4)), now);
        assert!(matches!(secondary.poll_event(), Some(SessionEvent::Received(r)) if r.lsn == 1));
        secondary.handle_message(Message::Write(record(3, 4)), now);
        assert!(matches!(
            secondary.poll_event(),
            Some(SessionEvent::ProtocolError(SessionError::LsnGap {
                expected: 2,
                found: 3
            }))
        ));
        let (_, mut secondary) = connected_pair(now);
        secondary.handle_message(Message::Write(record(1, 4)), now);
        secondary.handle_message(Message::Write(record(1, 4)), now);
        let events: Vec<_> = std::iter::from_fn(|| secondary.poll_event()).collect();
        assert_eq!(
            events
                .iter()
                .filter(|e| matches!(e, SessionEvent::Received(_)))
                .count(),
            1
        );
        assert!(events
            .iter()
            .any(|e| matches!(e, SessionEvent::ProtocolError(SessionError::LsnGap { .. }))));
    }

    #[test]
    fn in_flight_window_blocks_and_reopens_on_ack() {
        let now = Instant::now();
        let (mut primary, _) = connected_pair(now);
        primary.submit_write(record(1, 3000), now).unwrap();
        assert!(!primary.can_send(3000));
        assert!(matches!(
            primary.submit_write(record(2, 3000), now),
            Err(SessionError::Blocked { .. })
        ));
        primary.handle_message(
            Message::Ack {
                journal_lsn: 1,
                durable_lsn: 0,
            },
            now,
        );
        assert!(primary.can_send(3000));
        primary.submit_write(record(2, 3000), now).unwrap();
        assert!(matches!(
            primary.submit_write(record(4, 1), now),
            Err(SessionError::OutOfOrder {
                expected: 3,
                found: 4
            })
        ));
    }

    #[test]
    fn old_primary_returning_after_forced_promote_must_demote() {
        let now = Instant::now();
        let lineage = GenerationInfo::create(9, "a").unwrap();
        let mut promoted = lineage.clone();
        promoted.start_generation("b", 0).unwrap();
        promoted.head_lsn = 3;
        let mut old = Session::new(config("a", "b"), Role::Primary, lineage, now);
        let mut new = Session::new(config("b", "a"), Role::Primary, promoted, now);
        old.handle_connected(now);
        new.handle_connected(now);
        for _ in 0..3 {
            while let Some(m) = old.poll_transmit() {
                new.handle_message(m, now);
            }
            while let Some(m) = new.poll_transmit() {
                old.handle_message(m, now);
            }
        }
        let old_events: Vec<_> = std::iter::from_fn(|| old.poll_event()).collect();
        assert!(
            old_events.contains(&SessionEvent::DemoteRequired),
            "{old_events:?}"
        );
        let new_events: Vec<_> = std::iter::from_fn(|| new.poll_event()).collect();
        assert!(
            new_events.iter().any(|e| matches!(
                e,
                SessionEvent::ResyncNeeded {
                    kind: ResyncKind::Delta,
                    from_lsn: 1,
                    ..
                }
            )),
            "{new_events:?}"
        );
        assert_eq!(new.state(), ReplicaState::Resyncing);
    }
}
