//! The session with one peer for one volume: the handshake, liveness, flow-control windows and
//! the checks every incoming message must pass. Sans-IO, in the quinn-proto style: messages
//! come in through [`Session::handle_message`], timers through [`Session::handle_timeout`],
//! messages to send go out through [`Session::poll_transmit`]; time only comes in as `now`.
//!
//! The session decides nothing about the volume: once the handshake completes it reports the
//! decision and the peer's hello ([`Incoming::Ready`]), and the [`Replicator`] that owns it
//! picks what the link carries ([`Mode`]). From then on the session checks that every message
//! fits the mode and the counters (LSNs consecutive, acks monotonic and never beyond what was
//! sent, windows respected, ranges inside the volume, lengths within the limits) and hands the
//! valid ones up ([`Incoming::Message`]). Anything else is a protocol error that closes the
//! link ([`Incoming::Closed`]); nothing a peer sends can make it panic or grow memory without
//! bound.
//!
//! Handshake: on connect both sides send a [`Hello`]. On receiving the peer's hello each side
//! runs [`decide`] over the hello it sent and the one it received and answers with a `Welcome`
//! carrying its decision; each then checks that the peer's decision mirrors its own (same
//! inputs, so any difference is a bug or a tampered peer).
//!
//! Timers: a heartbeat every `peer_timeout / 4`; the peer is lost when nothing arrived for
//! `peer_timeout`, when the handshake has not completed within `peer_timeout`, or when the
//! oldest unacknowledged record is `peer_timeout` old.
//!
//! [`Replicator`]: super::Replicator

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::generation::{decide, Decision, Role};
use crate::journal::RECORD_BYTES_MAX;
use crate::repl::{Hello, Message, RefuseCode, VERIFY_DIGESTS_MAX};

/// The replication protocol version carried in hellos.
pub const PROTOCOL_VERSION: u16 = 2;
/// Window cost of a record beyond its data, so zero-length records are bounded too.
pub const RECORD_OVERHEAD_BYTES: u64 = 64;
/// The largest LSN either side accepts: far beyond any real journal (2^62 records at ten
/// million a second is 14 000 years), and low enough that no `lsn + 1` can overflow.
pub const LSN_MAX: u64 = 1 << 62;
/// A receiver refuses a peer that has more than this many times its own window in flight:
/// an honest sender never exceeds the window, so this only stops a flood.
const WINDOW_SLACK_FACTOR: u64 = 2;
/// Messages queued for the stream before the session gives up on a peer that does not read.
pub const TRANSMITS_MAX: usize = 1 << 16;

/// Why a session closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// Nothing arrived for `peer_timeout`.
    #[error("peer timeout: nothing received")]
    Silent,
    /// The oldest record sent was not acknowledged within `peer_timeout`.
    #[error("peer timeout: write not acknowledged")]
    Unacknowledged,
    /// The handshake did not complete within `peer_timeout`.
    #[error("peer timeout: handshake did not complete")]
    HandshakeTimeout,
    /// The peer closed the session on purpose.
    #[error("peer said goodbye: {0}")]
    Goodbye(String),
    /// The peer refused our hello.
    #[error("hello refused ({}): {reason}", code.as_str())]
    Refused { code: RefuseCode, reason: String },
    /// We refused the peer's hello.
    #[error("refused the peer's hello ({}): {reason}", code.as_str())]
    RefusedPeer { code: RefuseCode, reason: String },
    /// A message arrived that the state does not allow.
    #[error("unexpected {message} while {state}")]
    UnexpectedMessage {
        message: &'static str,
        state: &'static str,
    },
    /// A record arrived with an LSN other than the next one: a gap or a duplicate.
    #[error("received LSN {found}, expected {expected}")]
    LsnGap { expected: u64, found: u64 },
    /// An LSN beyond [`LSN_MAX`].
    #[error("LSN {lsn} is out of range")]
    LsnOutOfRange { lsn: u64 },
    /// The peer acknowledged less than it had before on the same connection.
    #[error("ack went backwards: {field} {found} after {previous}")]
    AckBackwards {
        field: &'static str,
        previous: u64,
        found: u64,
    },
    /// The peer acknowledged something never sent to it.
    #[error("ack of {what} {acked} but only {sent} sent")]
    AckBeyondSent {
        what: &'static str,
        acked: u64,
        sent: u64,
    },
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
    /// A record or range past the end of the volume.
    #[error(
        "range of {len_bytes} bytes at {offset_bytes} is outside the {size_bytes}-byte volume"
    )]
    BadRange {
        offset_bytes: u64,
        len_bytes: u64,
        size_bytes: u64,
    },
    /// A range not aligned to 512 bytes (NBD's smallest block).
    #[error("range of {len_bytes} bytes at {offset_bytes} is not 512-byte aligned")]
    Misaligned { offset_bytes: u64, len_bytes: u64 },
    /// A record longer than the journal can replay.
    #[error("record of {len_bytes} bytes exceeds {RECORD_BYTES_MAX}")]
    RecordTooLong { len_bytes: u64 },
    /// The peer sent more than its window allows without waiting for acknowledgements.
    #[error("peer exceeded the window: {inflight_bytes} bytes in flight")]
    WindowExceeded { inflight_bytes: u64 },
    /// The peer does not read what this side sends.
    #[error("peer is not reading: {queued} messages queued")]
    NotReading { queued: usize },
    /// A verify request or reply that does not fit the protocol.
    #[error("bad verify message: {0}")]
    BadVerify(&'static str),
}

impl SessionError {
    /// Whether this is a timeout, as opposed to something the peer sent.
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            SessionError::Silent | SessionError::Unacknowledged | SessionError::HandshakeTimeout
        )
    }
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
    /// Bytes of records (and, separately, of resync data) in flight before the sender waits.
    pub window_bytes: u64,
    /// A regional link: records come in batches, each closed by a `BatchEnd`, and within a
    /// batch their LSNs only increase (records overwritten later in the batch are left out).
    pub batched: bool,
}

/// What the link carries once the handshake is done, as the replicator decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Nothing flows but heartbeats and role changes (both secondary, split brain, ...).
    Idle,
    /// This side ships: records after `sent_lsn`, or a resync.
    Ship,
    /// This side receives: records after `received_lsn`, or a resync.
    Receive,
}

/// What a message did, for the replicator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// Nothing for the replicator (liveness, or a handshake step).
    Nothing,
    /// The handshake completed: pick a mode with [`Session::set_mode`].
    Ready {
        decision: Decision,
        peer: Box<Hello>,
    },
    /// A valid message for the replicator.
    Message(Message),
    /// A heartbeat round trip completed.
    Rtt(Duration),
    /// The session is closed: the transport stream must be closed.
    Closed(SessionError),
}

#[derive(Debug)]
enum Link {
    Down,
    Handshake {
        sent: Box<Hello>,
        ours: Option<Decision>,
        theirs: Option<Decision>,
        peer: Option<Box<Hello>>,
    },
    Up {
        sent: Box<Hello>,
        peer: Box<Hello>,
        decision: Decision,
    },
}

/// One record sent and not yet acknowledged into the peer's journal.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    lsn: u64,
    cost_bytes: u64,
    sent_at: Instant,
}

/// One peer session. See the module doc.
#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    /// Base of the heartbeat timestamps.
    epoch: Instant,
    link: Link,
    mode: Mode,

    // Shipping side.
    sent_lsn: u64,
    acked_journal_lsn: u64,
    acked_durable_lsn: u64,
    inflight: VecDeque<InFlight>,
    inflight_bytes: u64,
    resync_sent_bytes: u64,
    resync_written_bytes: u64,
    /// A resync's end was sent at this LSN and not yet acknowledged.
    resync_end_sent: Option<u64>,

    // Receiving side.
    received_lsn: u64,
    /// Bytes of records received and not yet acknowledged (the peer's window, seen here).
    received_unacked: VecDeque<(u64, u64)>,
    received_unacked_bytes: u64,
    journaled_lsn: u64,
    durable_acked_lsn: u64,
    receiving_resync: bool,
    resync_received_bytes: u64,
    resync_acked_bytes: u64,
    /// A `ResyncEnd` was received and its acknowledgement is owed.
    resync_end_received: Option<u64>,

    // Timers.
    last_received_at: Instant,
    handshake_deadline: Option<Instant>,
    next_heartbeat_at: Option<Instant>,
    heartbeat_seq: u64,

    transmits: VecDeque<Message>,
}

impl Session {
    /// A session, not yet connected.
    pub fn new(config: SessionConfig, now: Instant) -> Session {
        assert!(!config.peer_timeout.is_zero(), "peer_timeout is positive");
        assert!(config.window_bytes > 0, "the window is positive");
        Session {
            config,
            epoch: now,
            link: Link::Down,
            mode: Mode::Idle,
            sent_lsn: 0,
            acked_journal_lsn: 0,
            acked_durable_lsn: 0,
            inflight: VecDeque::new(),
            inflight_bytes: 0,
            resync_sent_bytes: 0,
            resync_written_bytes: 0,
            resync_end_sent: None,
            received_lsn: 0,
            received_unacked: VecDeque::new(),
            received_unacked_bytes: 0,
            journaled_lsn: 0,
            durable_acked_lsn: 0,
            receiving_resync: false,
            resync_received_bytes: 0,
            resync_acked_bytes: 0,
            resync_end_received: None,
            last_received_at: now,
            handshake_deadline: None,
            next_heartbeat_at: None,
            heartbeat_seq: 0,
            transmits: VecDeque::new(),
        }
    }

    /// The session's settings.
    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    /// A transport stream is open and no handshake has completed on it yet, or it has.
    pub fn is_connected(&self) -> bool {
        !matches!(self.link, Link::Down)
    }

    /// The handshake is complete on the current stream.
    pub fn is_up(&self) -> bool {
        matches!(self.link, Link::Up { .. })
    }

    /// The peer's hello and the decision, once the handshake is complete.
    pub fn peer(&self) -> Option<(&Hello, Decision)> {
        match &self.link {
            Link::Up { peer, decision, .. } => Some((peer, *decision)),
            _ => None,
        }
    }

    /// The hello this side sent on the current stream.
    pub fn sent_hello(&self) -> Option<&Hello> {
        match &self.link {
            Link::Handshake { sent, .. } | Link::Up { sent, .. } => Some(sent),
            Link::Down => None,
        }
    }

    /// Changes the peer's role as seen by this session (a `RoleChange`).
    fn set_peer_role(&mut self, role: Role) {
        if let Link::Up { peer, .. } = &mut self.link {
            peer.role = role;
        }
    }

    /// The mode the replicator picked.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Highest LSN sent on this connection.
    pub fn sent_lsn(&self) -> u64 {
        self.sent_lsn
    }

    /// Highest LSN the peer acknowledged into its journal on this connection.
    pub fn acked_journal_lsn(&self) -> u64 {
        self.acked_journal_lsn
    }

    /// Highest LSN the peer acknowledged as durable on this connection.
    pub fn acked_durable_lsn(&self) -> u64 {
        self.acked_durable_lsn
    }

    /// Highest LSN received on this connection.
    pub fn received_lsn(&self) -> u64 {
        self.received_lsn
    }

    /// Resync bytes sent and not yet written at the peer.
    pub fn resync_inflight_bytes(&self) -> u64 {
        self.resync_sent_bytes - self.resync_written_bytes
    }

    /// Whether a record of `len_bytes` data fits the window now.
    pub fn can_send(&self, len_bytes: u64) -> bool {
        self.inflight.is_empty()
            || self
                .inflight_bytes
                .saturating_add(len_bytes.saturating_add(RECORD_OVERHEAD_BYTES))
                <= self.config.window_bytes
    }

    /// Resync bytes written at the peer (acknowledged) in this session.
    pub fn resync_written_bytes(&self) -> u64 {
        self.resync_written_bytes
    }

    /// Whether `len_bytes` more resync bytes fit in `window_bytes` (at most the session's
    /// window) now.
    pub fn can_send_resync(&self, len_bytes: u64, window_bytes: u64) -> bool {
        let inflight = self.resync_inflight_bytes();
        inflight == 0
            || inflight.saturating_add(len_bytes) <= window_bytes.min(self.config.window_bytes)
    }

    fn heartbeat_interval(&self) -> Duration {
        self.config.peer_timeout / 4
    }

    // ---- outputs ------------------------------------------------------------------------

    /// The next message to write to the stream, in order.
    pub fn poll_transmit(&mut self) -> Option<Message> {
        self.transmits.pop_front()
    }

    /// Messages waiting to be written.
    pub fn queued_transmits(&self) -> usize {
        self.transmits.len()
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if matches!(self.link, Link::Down) {
            return None;
        }
        let mut deadline = self.last_received_at + self.config.peer_timeout;
        if let Some(oldest) = self.inflight.front() {
            deadline = deadline.min(oldest.sent_at + self.config.peer_timeout);
        }
        for at in [self.next_heartbeat_at, self.handshake_deadline]
            .into_iter()
            .flatten()
        {
            deadline = deadline.min(at);
        }
        Some(deadline)
    }

    /// Queues a message. A peer that does not read makes the queue full: the session closes
    /// rather than grow it.
    fn transmit(&mut self, message: Message) -> Result<(), SessionError> {
        if self.transmits.len() >= TRANSMITS_MAX {
            return Err(SessionError::NotReading {
                queued: self.transmits.len(),
            });
        }
        self.transmits.push_back(message);
        Ok(())
    }

    // ---- inputs: transport and clock -----------------------------------------------------

    /// A transport stream is open: sends `hello` and starts the handshake.
    pub fn connect(&mut self, hello: Hello, now: Instant) {
        self.reset();
        self.transmits.push_back(Message::Hello(hello.clone()));
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

    /// Forgets the current stream (it closed, or is being closed).
    pub fn disconnect(&mut self) {
        self.reset();
        self.link = Link::Down;
    }

    /// Closes on purpose, telling the peer why (shutdown, role change).
    pub fn close(&mut self, reason: &str) {
        if !matches!(self.link, Link::Down) {
            let reason: String = reason.chars().take(256).collect();
            self.transmits.push_back(Message::Goodbye { reason });
        }
        self.link = Link::Down;
        let transmits = std::mem::take(&mut self.transmits);
        self.reset();
        self.transmits = transmits;
    }

    fn reset(&mut self) {
        self.mode = Mode::Idle;
        self.handshake_deadline = None;
        self.next_heartbeat_at = None;
        self.sent_lsn = 0;
        self.acked_journal_lsn = 0;
        self.acked_durable_lsn = 0;
        self.inflight.clear();
        self.inflight_bytes = 0;
        self.resync_sent_bytes = 0;
        self.resync_written_bytes = 0;
        self.resync_end_sent = None;
        self.received_lsn = 0;
        self.received_unacked.clear();
        self.received_unacked_bytes = 0;
        self.journaled_lsn = 0;
        self.durable_acked_lsn = 0;
        self.receiving_resync = false;
        self.resync_received_bytes = 0;
        self.resync_acked_bytes = 0;
        self.resync_end_received = None;
        self.transmits.clear();
    }

    /// Timers: heartbeats and peer loss.
    pub fn handle_timeout(&mut self, now: Instant) -> Option<SessionError> {
        if matches!(self.link, Link::Down) {
            return None;
        }
        let silent = now >= self.last_received_at + self.config.peer_timeout;
        let unacked = self
            .inflight
            .front()
            .is_some_and(|oldest| now >= oldest.sent_at + self.config.peer_timeout);
        let no_handshake = self.handshake_deadline.is_some_and(|at| now >= at);
        let error = if silent {
            Some(SessionError::Silent)
        } else if unacked {
            Some(SessionError::Unacknowledged)
        } else if no_handshake {
            Some(SessionError::HandshakeTimeout)
        } else {
            None
        };
        if let Some(error) = error {
            self.disconnect();
            return Some(error);
        }
        if self.next_heartbeat_at.is_some_and(|at| now >= at) {
            self.heartbeat_seq += 1;
            let sent_at_us = u64::try_from(now.saturating_duration_since(self.epoch).as_micros())
                .unwrap_or(u64::MAX);
            let seq = self.heartbeat_seq;
            if let Err(error) = self.transmit(Message::Heartbeat { sent_at_us, seq }) {
                self.disconnect();
                return Some(error);
            }
            self.next_heartbeat_at = Some(now + self.heartbeat_interval());
        }
        None
    }

    // ---- inputs: messages ------------------------------------------------------------------

    /// A message decoded from the stream. Never panics on what the peer sent.
    pub fn handle_message(&mut self, message: Message, now: Instant) -> Incoming {
        if matches!(self.link, Link::Down) {
            // A message racing a close; the stream is being dropped anyway.
            return Incoming::Nothing;
        }
        self.last_received_at = now;
        match self.on_message(message, now) {
            Ok(incoming) => incoming,
            Err(error) => {
                // What is queued (a `Refuse` saying why) still goes out before the close.
                let transmits = std::mem::take(&mut self.transmits);
                self.disconnect();
                self.transmits = transmits;
                Incoming::Closed(error)
            }
        }
    }

    fn unexpected(&self, message: &Message) -> SessionError {
        SessionError::UnexpectedMessage {
            message: message.name(),
            state: match (&self.link, self.mode) {
                (Link::Down, _) => "disconnected",
                (Link::Handshake { .. }, _) => "in the handshake",
                (Link::Up { .. }, Mode::Idle) => "idle",
                (Link::Up { .. }, Mode::Ship) => "shipping",
                (Link::Up { .. }, Mode::Receive) => "receiving",
            },
        }
    }

    fn on_message(&mut self, message: Message, now: Instant) -> Result<Incoming, SessionError> {
        match message {
            Message::Heartbeat { sent_at_us, seq } => {
                self.transmit(Message::HeartbeatReply { sent_at_us, seq })?;
                Ok(Incoming::Nothing)
            }
            Message::HeartbeatReply { sent_at_us, seq } => {
                if seq > self.heartbeat_seq {
                    return Err(self.unexpected(&message));
                }
                let sent_at = self.epoch.checked_add(Duration::from_micros(sent_at_us));
                Ok(sent_at
                    .and_then(|at| now.checked_duration_since(at))
                    .map_or(Incoming::Nothing, Incoming::Rtt))
            }
            Message::Goodbye { reason } => Err(SessionError::Goodbye(reason)),
            Message::Refuse { code, reason } => Err(SessionError::Refused { code, reason }),
            Message::Hello(hello) => self.on_hello(hello),
            Message::Welcome { decision } => self.on_welcome(decision),
            Message::RoleChange { role } if self.is_up() => {
                self.set_peer_role(role);
                Ok(Incoming::Message(Message::RoleChange { role }))
            }
            other if self.is_up() => self.on_replication(other, now),
            other => Err(self.unexpected(&other)),
        }
    }

    fn refusal(&self, hello: &Hello) -> Option<(RefuseCode, String)> {
        if hello.protocol_version != PROTOCOL_VERSION {
            return Some((
                RefuseCode::VersionMismatch,
                format!(
                    "protocol version {} not supported, this node speaks {PROTOCOL_VERSION}",
                    hello.protocol_version
                ),
            ));
        }
        if hello.node != self.config.peer {
            return Some((
                RefuseCode::WrongNode,
                format!(
                    "hello from node {:?}, expected {:?}",
                    hello.node, self.config.peer
                ),
            ));
        }
        if hello.volume != self.config.volume {
            return Some((
                RefuseCode::UnknownVolume,
                format!(
                    "volume {:?} is not replicated with this peer here",
                    hello.volume
                ),
            ));
        }
        if hello.size_bytes != self.config.size_bytes {
            return Some((
                RefuseCode::SizeMismatch,
                format!(
                    "volume size {} here, {} at the peer",
                    self.config.size_bytes, hello.size_bytes
                ),
            ));
        }
        if let Err(error) = hello.generation.validate() {
            return Some((RefuseCode::BadGeneration, error.to_string()));
        }
        if hello.generation.head_lsn > LSN_MAX || hello.durable_lsn > hello.generation.head_lsn {
            return Some((
                RefuseCode::BadGeneration,
                format!(
                    "head LSN {} and durable LSN {} are not a valid pair",
                    hello.generation.head_lsn, hello.durable_lsn
                ),
            ));
        }
        None
    }

    fn on_hello(&mut self, hello: Hello) -> Result<Incoming, SessionError> {
        let Link::Handshake { sent, peer, .. } = &self.link else {
            return Err(self.unexpected(&Message::Hello(hello)));
        };
        if peer.is_some() {
            return Err(self.unexpected(&Message::Hello(hello)));
        }
        if let Some((code, reason)) = self.refusal(&hello) {
            self.transmits.push_back(Message::Refuse {
                code,
                reason: reason.clone(),
            });
            return Err(SessionError::RefusedPeer { code, reason });
        }
        // Decide over the hello we sent, so both sides decide over the same two inputs.
        let decision = decide(&sent.generation, sent.role, &hello.generation, hello.role);
        if let Link::Handshake { ours, peer, .. } = &mut self.link {
            *ours = Some(decision);
            *peer = Some(Box::new(hello));
        }
        self.transmit(Message::Welcome { decision })?;
        Ok(self.maybe_ready())
    }

    fn on_welcome(
        &mut self,
        decision: crate::generation::Decision,
    ) -> Result<Incoming, SessionError> {
        let Link::Handshake { theirs, .. } = &mut self.link else {
            return Err(self.unexpected(&Message::Welcome { decision }));
        };
        if theirs.is_some() {
            return Err(self.unexpected(&Message::Welcome { decision }));
        }
        *theirs = Some(decision);
        match self.maybe_ready() {
            Incoming::Nothing => Ok(Incoming::Nothing),
            ready => Ok(ready),
        }
    }

    fn maybe_ready(&mut self) -> Incoming {
        let Link::Handshake {
            ours: Some(ours),
            theirs: Some(theirs),
            peer: Some(_),
            ..
        } = &self.link
        else {
            return Incoming::Nothing;
        };
        let (ours, theirs) = (*ours, *theirs);
        if theirs.mirror() != ours {
            self.disconnect();
            return Incoming::Closed(SessionError::DecisionMismatch {
                ours: ours.as_str(),
                theirs: theirs.as_str(),
            });
        }
        let Link::Handshake {
            sent,
            peer: Some(peer),
            ..
        } = std::mem::replace(&mut self.link, Link::Down)
        else {
            unreachable!("checked above");
        };
        self.handshake_deadline = None;
        self.link = Link::Up {
            sent,
            peer: peer.clone(),
            decision: ours,
        };
        Incoming::Ready {
            decision: ours,
            peer,
        }
    }

    /// The replicator's choice after [`Incoming::Ready`]: ship from `lsn` (records after it),
    /// receive from `lsn` (the next record has `lsn + 1`), or idle. `durable_lsn` is what the
    /// peer already holds durably (shipping) or what this side does (receiving).
    pub fn set_mode(&mut self, mode: Mode, lsn: u64, durable_lsn: u64) {
        assert!(self.is_up(), "a mode is set after the handshake");
        assert!(durable_lsn <= lsn, "durable never exceeds the journal");
        self.mode = mode;
        match mode {
            Mode::Ship => {
                self.sent_lsn = lsn;
                self.acked_journal_lsn = lsn;
                self.acked_durable_lsn = durable_lsn;
            }
            Mode::Receive => {
                self.received_lsn = lsn;
                self.journaled_lsn = lsn;
                self.durable_acked_lsn = durable_lsn;
            }
            Mode::Idle => {}
        }
    }

    fn check_lsn(lsn: u64) -> Result<(), SessionError> {
        if lsn > LSN_MAX {
            return Err(SessionError::LsnOutOfRange { lsn });
        }
        Ok(())
    }

    /// A range from the peer must lie inside the volume and be 512-byte aligned.
    fn check_range(&self, offset_bytes: u64, len_bytes: u64) -> Result<(), SessionError> {
        let inside = offset_bytes
            .checked_add(len_bytes)
            .is_some_and(|end| end <= self.config.size_bytes);
        if !inside {
            return Err(SessionError::BadRange {
                offset_bytes,
                len_bytes,
                size_bytes: self.config.size_bytes,
            });
        }
        if !offset_bytes.is_multiple_of(512) || !len_bytes.is_multiple_of(512) {
            return Err(SessionError::Misaligned {
                offset_bytes,
                len_bytes,
            });
        }
        Ok(())
    }

    fn window_limit(&self) -> u64 {
        self.config.window_bytes.saturating_mul(WINDOW_SLACK_FACTOR)
    }

    fn on_replication(
        &mut self,
        message: Message,
        _now: Instant,
    ) -> Result<Incoming, SessionError> {
        match self.mode {
            Mode::Ship => self.check_from_receiver(&message)?,
            Mode::Receive => self.check_from_shipper(&message)?,
            Mode::Idle => return Err(self.unexpected(&message)),
        }
        Ok(Incoming::Message(message))
    }

    /// What the receiving peer may send while this side ships.
    fn check_from_receiver(&mut self, message: &Message) -> Result<(), SessionError> {
        match message {
            Message::Ack {
                journal_lsn,
                durable_lsn,
            } => self.on_ack(*journal_lsn, *durable_lsn)?,
            Message::ResyncAck { written_bytes } => {
                if *written_bytes < self.resync_written_bytes {
                    return Err(SessionError::AckBackwards {
                        field: "resync",
                        previous: self.resync_written_bytes,
                        found: *written_bytes,
                    });
                }
                if *written_bytes > self.resync_sent_bytes {
                    return Err(SessionError::AckBeyondSent {
                        what: "resync bytes",
                        acked: *written_bytes,
                        sent: self.resync_sent_bytes,
                    });
                }
                self.resync_written_bytes = *written_bytes;
            }
            Message::DirtyRanges { ranges, .. } => {
                for range in ranges {
                    self.check_range(range.offset_bytes, range.len_bytes)?;
                }
            }
            Message::VerifyReply { digests, .. } => {
                if digests.len() > VERIFY_DIGESTS_MAX {
                    return Err(SessionError::BadVerify("too many digests"));
                }
            }
            _ => return Err(self.unexpected(message)),
        }
        Ok(())
    }

    /// What the shipping peer may send while this side receives.
    fn check_from_shipper(&mut self, message: &Message) -> Result<(), SessionError> {
        match message {
            Message::Write(record) if !self.receiving_resync => {
                Self::check_lsn(record.lsn)?;
                self.check_range(record.offset_bytes, record.len_bytes.into())?;
                if record.kind.has_payload() && record.len_bytes as usize > RECORD_BYTES_MAX {
                    return Err(SessionError::RecordTooLong {
                        len_bytes: record.len_bytes.into(),
                    });
                }
                let expected = self.received_lsn + 1;
                let in_order = if self.config.batched {
                    record.lsn >= expected
                } else {
                    record.lsn == expected
                };
                if !in_order {
                    return Err(SessionError::LsnGap {
                        expected,
                        found: record.lsn,
                    });
                }
                let cost_bytes = record.data.len() as u64 + RECORD_OVERHEAD_BYTES;
                if self.received_unacked_bytes + cost_bytes > self.window_limit() {
                    return Err(SessionError::WindowExceeded {
                        inflight_bytes: self.received_unacked_bytes + cost_bytes,
                    });
                }
                self.received_lsn = record.lsn;
                self.received_unacked.push_back((record.lsn, cost_bytes));
                self.received_unacked_bytes += cost_bytes;
            }
            Message::BatchEnd { lsn } if self.config.batched && !self.receiving_resync => {
                Self::check_lsn(*lsn)?;
                if *lsn < self.received_lsn {
                    return Err(self.unexpected(message));
                }
                self.received_lsn = *lsn;
            }
            Message::Flush { upto_lsn } => {
                if *upto_lsn > self.received_lsn {
                    return Err(SessionError::FlushBeyondReceived {
                        upto: *upto_lsn,
                        received: self.received_lsn,
                    });
                }
            }
            Message::NewGeneration { entry } => {
                Self::check_lsn(entry.start_lsn)?;
                if entry.start_lsn > self.received_lsn + 1 {
                    return Err(self.unexpected(message));
                }
            }
            Message::Progress { durable_lsn, peers } => {
                Self::check_lsn(*durable_lsn)?;
                for peer in peers {
                    if let Some(lsn) = peer.durable_lsn {
                        Self::check_lsn(lsn)?;
                    }
                }
            }
            Message::ResyncBegin { target_lsn, .. } if !self.receiving_resync => {
                Self::check_lsn(*target_lsn)?;
                self.receiving_resync = true;
                self.resync_received_bytes = 0;
                self.resync_acked_bytes = 0;
            }
            Message::ResyncData { offset_bytes, data } if self.receiving_resync => {
                self.check_range(*offset_bytes, data.len() as u64)?;
                self.resync_received_bytes += data.len() as u64;
                let inflight = self.resync_received_bytes - self.resync_acked_bytes;
                if inflight > self.window_limit() {
                    return Err(SessionError::WindowExceeded {
                        inflight_bytes: inflight,
                    });
                }
            }
            Message::ResyncZero {
                offset_bytes,
                len_bytes,
            } if self.receiving_resync => {
                self.check_range(*offset_bytes, *len_bytes)?;
            }
            Message::ResyncEnd { lsn, lineage } if self.receiving_resync => {
                Self::check_lsn(*lsn)?;
                if *lsn < self.received_lsn || lineage.head_lsn != *lsn {
                    return Err(self.unexpected(message));
                }
                if let Err(error) = lineage.validate() {
                    return Err(SessionError::RefusedPeer {
                        code: RefuseCode::BadGeneration,
                        reason: error.to_string(),
                    });
                }
                self.receiving_resync = false;
                self.received_lsn = *lsn;
                self.resync_end_received = Some(*lsn);
            }
            Message::VerifyRequest {
                offset_bytes,
                len_bytes,
                block_bytes,
                at_lsn,
                ..
            } => {
                Self::check_lsn(*at_lsn)?;
                self.check_range(*offset_bytes, *len_bytes)?;
                if *block_bytes == 0
                    || *block_bytes % 4096 != 0
                    || len_bytes.div_ceil(*block_bytes) > VERIFY_DIGESTS_MAX as u64
                {
                    return Err(SessionError::BadVerify("block size"));
                }
                // A verifier asks for 1 MiB or 4 KiB blocks: a larger one would make this
                // side read (and hold) that much at once for one digest.
                if *block_bytes > super::VERIFY_COARSE_BLOCK_BYTES {
                    return Err(SessionError::BadVerify("block larger than 1 MiB"));
                }
            }
            _ => return Err(self.unexpected(message)),
        }
        Ok(())
    }

    fn on_ack(&mut self, journal_lsn: u64, durable_lsn: u64) -> Result<(), SessionError> {
        if journal_lsn < self.acked_journal_lsn {
            return Err(SessionError::AckBackwards {
                field: "journal",
                previous: self.acked_journal_lsn,
                found: journal_lsn,
            });
        }
        if durable_lsn < self.acked_durable_lsn {
            return Err(SessionError::AckBackwards {
                field: "durable",
                previous: self.acked_durable_lsn,
                found: durable_lsn,
            });
        }
        if journal_lsn > self.sent_lsn {
            return Err(SessionError::AckBeyondSent {
                what: "LSN",
                acked: journal_lsn,
                sent: self.sent_lsn,
            });
        }
        if durable_lsn > journal_lsn {
            return Err(SessionError::DurableBeyondJournal {
                durable: durable_lsn,
                journal: journal_lsn,
            });
        }
        self.acked_journal_lsn = journal_lsn;
        self.acked_durable_lsn = durable_lsn;
        while self.inflight.front().is_some_and(|f| f.lsn <= journal_lsn) {
            let done = self.inflight.pop_front().expect("checked");
            self.inflight_bytes -= done.cost_bytes;
        }
        if self.resync_end_sent.is_some_and(|lsn| journal_lsn >= lsn) {
            self.resync_end_sent = None;
        }
        assert!(
            self.acked_journal_lsn <= self.sent_lsn,
            "acked never exceeds sent"
        );
        Ok(())
    }

    // ---- the shipping side ------------------------------------------------------------------

    /// Ships one record; the caller checked [`can_send`](Self::can_send) and sends consecutive
    /// LSNs. Returns the error that closed the session if the peer stopped reading.
    pub fn send_record(
        &mut self,
        record: crate::repl::WriteRecord,
        now: Instant,
    ) -> Result<(), SessionError> {
        assert_eq!(self.mode, Mode::Ship, "records ship in ship mode");
        if self.config.batched {
            assert!(record.lsn > self.sent_lsn, "records ship in LSN order");
        } else {
            assert_eq!(record.lsn, self.sent_lsn + 1, "records ship in LSN order");
        }
        let cost_bytes = record.data.len() as u64 + RECORD_OVERHEAD_BYTES;
        self.sent_lsn = record.lsn;
        self.inflight.push_back(InFlight {
            lsn: record.lsn,
            cost_bytes,
            sent_at: now,
        });
        self.inflight_bytes += cost_bytes;
        self.send(Message::Write(record))
    }

    /// Closes a batch of a regional link at `lsn` (at or past its last record): the peer
    /// acknowledges the batch as a whole.
    pub fn send_batch_end(&mut self, lsn: u64, now: Instant) -> Result<(), SessionError> {
        assert_eq!(self.mode, Mode::Ship, "batches ship in ship mode");
        assert!(self.config.batched, "only a regional link carries batches");
        assert!(lsn >= self.sent_lsn, "a batch ends at or past its records");
        if lsn > self.sent_lsn {
            self.sent_lsn = lsn;
            self.inflight.push_back(InFlight {
                lsn,
                cost_bytes: RECORD_OVERHEAD_BYTES,
                sent_at: now,
            });
            self.inflight_bytes += RECORD_OVERHEAD_BYTES;
        }
        self.send(Message::BatchEnd { lsn })
    }

    /// Sends a message of the shipping or receiving side that carries no counters (flush
    /// requests, progress, verify, role changes, dirty ranges, resync begin or zero ranges).
    pub fn send(&mut self, message: Message) -> Result<(), SessionError> {
        match self.transmit(message) {
            Ok(()) => Ok(()),
            Err(error) => {
                self.disconnect();
                Err(error)
            }
        }
    }

    /// Starts a resync: the resync window restarts (the receiver counts from here too).
    pub fn send_resync_begin(
        &mut self,
        kind: crate::repl::ResyncKind,
        total_bytes: u64,
        target_lsn: u64,
    ) -> Result<(), SessionError> {
        assert_eq!(self.mode, Mode::Ship, "a resync starts in ship mode");
        self.resync_sent_bytes = 0;
        self.resync_written_bytes = 0;
        self.send(Message::ResyncBegin {
            kind,
            total_bytes,
            target_lsn,
        })
    }

    /// Sends resync data, counted against the resync window.
    pub fn send_resync_data(
        &mut self,
        offset_bytes: u64,
        data: bytes::Bytes,
    ) -> Result<(), SessionError> {
        assert_eq!(self.mode, Mode::Ship, "resync data ships in ship mode");
        self.resync_sent_bytes += data.len() as u64;
        self.send(Message::ResyncData { offset_bytes, data })
    }

    /// Ends a resync at `lsn` (the peer then holds the volume as of `lsn`): records after it
    /// ship next. Its acknowledgement is an `Ack` of `lsn`.
    pub fn send_resync_end(
        &mut self,
        lsn: u64,
        lineage: crate::generation::GenerationInfo,
    ) -> Result<(), SessionError> {
        assert_eq!(self.mode, Mode::Ship, "a resync ends in ship mode");
        assert!(
            lsn >= self.sent_lsn,
            "a resync never ends before what was sent"
        );
        self.sent_lsn = lsn;
        self.resync_end_sent = Some(lsn);
        self.send(Message::ResyncEnd { lsn, lineage })
    }

    /// A resync's end was sent and not yet acknowledged.
    pub fn resync_end_pending(&self) -> Option<u64> {
        self.resync_end_sent
    }

    // ---- the receiving side ------------------------------------------------------------------

    /// Records up to `lsn` are in the local journal (and, with `durable_lsn`, durable):
    /// acknowledges them.
    pub fn acknowledge(&mut self, journal_lsn: u64, durable_lsn: u64) -> Result<(), SessionError> {
        if !self.is_up() || self.mode != Mode::Receive {
            return Ok(());
        }
        let journal_lsn = journal_lsn.min(self.received_lsn);
        let durable_lsn = durable_lsn.min(journal_lsn);
        let owed = self
            .resync_end_received
            .is_some_and(|lsn| journal_lsn >= lsn);
        if journal_lsn <= self.journaled_lsn && durable_lsn <= self.durable_acked_lsn && !owed {
            return Ok(());
        }
        if owed {
            self.resync_end_received = None;
        }
        self.journaled_lsn = self.journaled_lsn.max(journal_lsn);
        self.durable_acked_lsn = self.durable_acked_lsn.max(durable_lsn);
        while self
            .received_unacked
            .front()
            .is_some_and(|(lsn, _)| *lsn <= self.journaled_lsn)
        {
            let (_, cost) = self.received_unacked.pop_front().expect("checked");
            self.received_unacked_bytes -= cost;
        }
        assert!(
            self.durable_acked_lsn <= self.journaled_lsn,
            "durable never exceeds journaled"
        );
        self.send(Message::Ack {
            journal_lsn: self.journaled_lsn,
            durable_lsn: self.durable_acked_lsn,
        })
    }

    /// Resync bytes up to `written_bytes` (cumulative) are on the device: acknowledges them.
    pub fn acknowledge_resync(&mut self, written_bytes: u64) -> Result<(), SessionError> {
        if !self.is_up() || self.mode != Mode::Receive || written_bytes <= self.resync_acked_bytes {
            return Ok(());
        }
        self.resync_acked_bytes = written_bytes.min(self.resync_received_bytes);
        self.send(Message::ResyncAck {
            written_bytes: self.resync_acked_bytes,
        })
    }

    /// Whether a resync is being received.
    pub fn receiving_resync(&self) -> bool {
        self.receiving_resync
    }
}

#[cfg(test)]
mod tests {
    //! What a peer can send, honest or not: every message that breaks a rule closes the
    //! session with the error that names it, and nothing panics or grows without bound.

    use super::*;
    use crate::generation::GenerationInfo;
    use crate::journal::RecordKind;
    use crate::repl::{DirtyRange, ResyncKind, WriteRecord};
    use bytes::Bytes;
    use proptest::prelude::*;

    const SIZE: u64 = 64 << 20;
    const WINDOW: u64 = 1 << 20;

    fn config(node: &str, peer: &str) -> SessionConfig {
        SessionConfig {
            node: node.into(),
            peer: peer.into(),
            volume: "vol".into(),
            size_bytes: SIZE,
            peer_timeout: Duration::from_secs(5),
            window_bytes: WINDOW,
            batched: false,
        }
    }

    fn hello(node: &str, role: Role, head_lsn: u64) -> Hello {
        let mut generation = GenerationInfo::create(7, "a").expect("lineage");
        generation.head_lsn = head_lsn;
        Hello {
            protocol_version: PROTOCOL_VERSION,
            node: node.into(),
            volume: "vol".into(),
            size_bytes: SIZE,
            role,
            generation,
            durable_lsn: head_lsn,
            consistent: true,
            discarding_local: false,
        }
    }

    /// A receiving session (this side is b, the peer a ships) up to `set_mode`.
    fn receiver(now: Instant) -> Session {
        let mut b = Session::new(config("b", "a"), now);
        b.connect(hello("b", Role::Secondary, 10), now);
        while b.poll_transmit().is_some() {}
        let incoming = b.handle_message(Message::Hello(hello("a", Role::Primary, 10)), now);
        assert_eq!(incoming, Incoming::Nothing);
        let incoming = b.handle_message(
            Message::Welcome {
                decision: Decision::Same,
            },
            now,
        );
        assert!(matches!(incoming, Incoming::Ready { .. }), "{incoming:?}");
        b.set_mode(Mode::Receive, 10, 10);
        while b.poll_transmit().is_some() {}
        b
    }

    /// A shipping session (this side is a) with records 11..=`sent` sent.
    fn shipper(now: Instant, sent: u64) -> Session {
        let mut a = Session::new(config("a", "b"), now);
        a.connect(hello("a", Role::Primary, 10), now);
        a.handle_message(Message::Hello(hello("b", Role::Secondary, 10)), now);
        let incoming = a.handle_message(
            Message::Welcome {
                decision: Decision::Same,
            },
            now,
        );
        assert!(matches!(incoming, Incoming::Ready { .. }), "{incoming:?}");
        a.set_mode(Mode::Ship, 10, 10);
        for lsn in 11..=sent {
            a.send_record(record(lsn, 0, 4096), now).expect("sent");
        }
        while a.poll_transmit().is_some() {}
        a
    }

    fn record(lsn: u64, offset_bytes: u64, len: usize) -> WriteRecord {
        WriteRecord {
            lsn,
            kind: RecordKind::Write,
            fua: false,
            offset_bytes,
            len_bytes: u32::try_from(len).expect("small"),
            data: Bytes::from(vec![0xab; len]),
        }
    }

    fn closed(incoming: Incoming) -> SessionError {
        match incoming {
            Incoming::Closed(error) => error,
            other => panic!("expected the session to close, got {other:?}"),
        }
    }

    #[test]
    fn records_that_break_a_limit_close_the_session() {
        let now = Instant::now();
        let cases: Vec<(WriteRecord, &str)> = vec![
            (record(12, 0, 4096), "received LSN 12, expected 11"),
            (record(11, SIZE - 512, 4096), "outside the"),
            (record(11, 100, 4096), "not 512-byte aligned"),
            (record(11, 0, RECORD_BYTES_MAX + 4096), "exceeds"),
            (record(LSN_MAX + 1, 0, 4096), "out of range"),
            (record(u64::MAX, 0, 512), "out of range"),
        ];
        for (record, wanted) in cases {
            let mut b = receiver(now);
            let error = closed(b.handle_message(Message::Write(record), now));
            assert!(
                error.to_string().contains(wanted),
                "{error} (wanted {wanted})"
            );
            assert!(!b.is_connected(), "a protocol error drops the link");
        }
    }

    #[test]
    fn a_sender_past_its_window_is_cut_off() {
        let now = Instant::now();
        let mut b = receiver(now);
        let per = 64 << 10;
        let mut lsn = 11;
        let error = loop {
            match b.handle_message(Message::Write(record(lsn, 0, per)), now) {
                Incoming::Message(_) => lsn += 1,
                other => break closed(other),
            }
            assert!(lsn < 1000, "the window never closed");
        };
        assert!(
            matches!(error, SessionError::WindowExceeded { .. }),
            "{error}"
        );
        // Twice the window, not more: an honest sender never gets there.
        let accepted = (lsn - 11) * (per as u64 + RECORD_OVERHEAD_BYTES);
        assert!(accepted <= 2 * WINDOW, "{accepted}");
    }

    #[test]
    fn acknowledgements_the_shipper_cannot_have_earned_close_the_session() {
        let now = Instant::now();
        let cases = [
            (
                Message::Ack {
                    journal_lsn: 16,
                    durable_lsn: 10,
                },
                "only 15 sent",
            ),
            (
                Message::Ack {
                    journal_lsn: 12,
                    durable_lsn: 13,
                },
                "beyond journal",
            ),
            (
                Message::Ack {
                    journal_lsn: 9,
                    durable_lsn: 9,
                },
                "went backwards",
            ),
            (Message::ResyncAck { written_bytes: 1 }, "only 0 sent"),
            (
                Message::DirtyRanges {
                    ranges: vec![DirtyRange {
                        offset_bytes: SIZE,
                        len_bytes: 4096,
                    }],
                    last: true,
                },
                "outside the",
            ),
            (
                Message::Write(record(11, 0, 4096)),
                "unexpected write while shipping",
            ),
        ];
        for (message, wanted) in cases {
            let mut a = shipper(now, 15);
            let error = closed(a.handle_message(message, now));
            assert!(
                error.to_string().contains(wanted),
                "{error} (wanted {wanted})"
            );
        }
    }

    #[test]
    fn resync_and_flush_messages_out_of_place_close_the_session() {
        let now = Instant::now();
        let cases = [
            (
                Message::ResyncData {
                    offset_bytes: 0,
                    data: Bytes::from(vec![0; 4096]),
                },
                "unexpected resync-data",
            ),
            (Message::Flush { upto_lsn: 11 }, "only 10 received"),
            (
                Message::VerifyRequest {
                    id: 1,
                    offset_bytes: 0,
                    len_bytes: SIZE,
                    block_bytes: 4096,
                    at_lsn: 10,
                },
                "block size",
            ),
            (
                Message::Progress {
                    durable_lsn: u64::MAX,
                    peers: Vec::new(),
                },
                "out of range",
            ),
        ];
        for (message, wanted) in cases {
            let mut b = receiver(now);
            let error = closed(b.handle_message(message, now));
            assert!(
                error.to_string().contains(wanted),
                "{error} (wanted {wanted})"
            );
        }
        // Resync data past the resync window.
        let mut b = receiver(now);
        let begin = Message::ResyncBegin {
            kind: ResyncKind::Delta,
            total_bytes: SIZE,
            target_lsn: 10,
        };
        assert!(matches!(b.handle_message(begin, now), Incoming::Message(_)));
        let mut offset = 0;
        let error = loop {
            let data = Message::ResyncData {
                offset_bytes: offset,
                data: Bytes::from(vec![1; 1 << 20]),
            };
            match b.handle_message(data, now) {
                Incoming::Message(_) => offset += 1 << 20,
                other => break closed(other),
            }
        };
        assert!(
            matches!(error, SessionError::WindowExceeded { .. }),
            "{error}"
        );
    }

    #[test]
    fn hellos_from_the_wrong_peer_are_refused_with_a_reason() {
        let now = Instant::now();
        let cases: Vec<(Box<dyn Fn(&mut Hello)>, RefuseCode)> = vec![
            (
                Box::new(|h| h.node = "mallory".into()),
                RefuseCode::WrongNode,
            ),
            (
                Box::new(|h| h.volume = "other".into()),
                RefuseCode::UnknownVolume,
            ),
            (Box::new(|h| h.size_bytes += 4096), RefuseCode::SizeMismatch),
            (
                Box::new(|h| h.protocol_version = 99),
                RefuseCode::VersionMismatch,
            ),
            (
                Box::new(|h| h.durable_lsn = h.generation.head_lsn + 1),
                RefuseCode::BadGeneration,
            ),
            (
                Box::new(|h| h.generation.head_lsn = LSN_MAX + 1),
                RefuseCode::BadGeneration,
            ),
        ];
        for (tamper, code) in cases {
            let mut b = Session::new(config("b", "a"), now);
            b.connect(hello("b", Role::Secondary, 10), now);
            while b.poll_transmit().is_some() {}
            let mut peer = hello("a", Role::Primary, 10);
            tamper(&mut peer);
            let error = closed(b.handle_message(Message::Hello(peer), now));
            assert!(
                matches!(&error, SessionError::RefusedPeer { code: got, .. } if *got == code),
                "{error}"
            );
            assert!(
                matches!(b.poll_transmit(), Some(Message::Refuse { code: sent, .. }) if sent == code),
                "the peer is told why"
            );
        }
    }

    #[test]
    fn a_peer_that_floods_and_never_reads_is_dropped_not_buffered() {
        let now = Instant::now();
        let mut b = receiver(now);
        let mut sent = 0usize;
        let error = loop {
            let heartbeat = Message::Heartbeat {
                sent_at_us: 1,
                seq: sent as u64,
            };
            match b.handle_message(heartbeat, now) {
                Incoming::Nothing => sent += 1,
                other => break closed(other),
            }
            assert!(sent <= TRANSMITS_MAX, "the reply queue grew past its bound");
        };
        assert!(matches!(error, SessionError::NotReading { .. }), "{error}");
        // Replies to heartbeats never sent are a protocol error, not an RTT.
        let mut b = receiver(now);
        let reply = Message::HeartbeatReply {
            sent_at_us: 0,
            seq: 1_000_000,
        };
        assert!(matches!(b.handle_message(reply, now), Incoming::Closed(_)));
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        let lsn = prop_oneof![0u64..40, Just(LSN_MAX), Just(u64::MAX)];
        let offset = prop_oneof![0u64..(SIZE + 8192), Just(u64::MAX - 511)];
        prop_oneof![
            (lsn.clone(), offset.clone(), 0usize..3).prop_map(|(lsn, offset, size)| {
                Message::Write(record(lsn, offset, [0, 512, 4096][size]))
            }),
            (lsn.clone(), lsn.clone()).prop_map(|(journal_lsn, durable_lsn)| Message::Ack {
                journal_lsn,
                durable_lsn
            }),
            lsn.clone().prop_map(|upto_lsn| Message::Flush { upto_lsn }),
            (any::<u64>(), 0u64..5)
                .prop_map(|(sent_at_us, seq)| Message::Heartbeat { sent_at_us, seq }),
            (any::<u64>(), 0u64..5)
                .prop_map(|(sent_at_us, seq)| Message::HeartbeatReply { sent_at_us, seq }),
            lsn.clone().prop_map(|target_lsn| Message::ResyncBegin {
                kind: ResyncKind::Delta,
                total_bytes: 4096,
                target_lsn
            }),
            offset.clone().prop_map(|offset_bytes| Message::ResyncData {
                offset_bytes,
                data: Bytes::from(vec![2; 4096])
            }),
            (offset.clone(), offset.clone()).prop_map(|(offset_bytes, len_bytes)| {
                Message::ResyncZero {
                    offset_bytes,
                    len_bytes,
                }
            }),
            any::<u64>().prop_map(|written_bytes| Message::ResyncAck { written_bytes }),
            (offset.clone(), offset).prop_map(|(offset_bytes, len_bytes)| {
                Message::DirtyRanges {
                    ranges: vec![DirtyRange {
                        offset_bytes,
                        len_bytes,
                    }],
                    last: true,
                }
            }),
            (lsn.clone(), any::<u64>(), any::<u64>()).prop_map(
                |(at_lsn, len_bytes, block_bytes)| {
                    Message::VerifyRequest {
                        id: 1,
                        offset_bytes: 0,
                        len_bytes,
                        block_bytes,
                        at_lsn,
                    }
                }
            ),
            (0usize..5000).prop_map(|n| Message::VerifyReply {
                id: 1,
                digests: vec![[0; 16]; n]
            }),
            lsn.prop_map(|durable_lsn| Message::Progress {
                durable_lsn,
                peers: Vec::new()
            }),
            Just(Message::Welcome {
                decision: Decision::Same
            }),
            Just(Message::Hello(hello("a", Role::Primary, 3))),
        ]
    }

    proptest! {
        /// Whatever an authenticated peer sends, in any order, the session answers with a
        /// message, nothing, or a close; it never panics and its queue stays bounded.
        #[test]
        fn no_sequence_of_messages_panics(
            messages in proptest::collection::vec(arb_message(), 1..60),
            shipping in any::<bool>(),
        ) {
            let now = Instant::now();
            let mut session = if shipping { shipper(now, 15) } else { receiver(now) };
            for message in messages {
                let _ = session.handle_message(message, now);
                prop_assert!(session.queued_transmits() <= TRANSMITS_MAX);
                if !session.is_connected() {
                    break;
                }
            }
        }
    }
}
