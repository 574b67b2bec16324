//! A peer that completes a valid handshake and then sends anything: the replicator never
//! panics, whatever the order, whichever role it and the peer play. (The session's own checks
//! are tested in `session.rs`; this drives the whole replicator, so that no assertion behind
//! them is reachable from the network.)

use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;

use super::{
    Action, Meta, OnDisconnect, PeerConfig, Replicator, ReplicatorConfig, StartPeer, Startup,
    LSN_MAX,
};
use crate::bitmap::BlockBitmap;
use crate::generation::{GenerationEntry, GenerationInfo, Role};
use crate::journal::RecordKind;
use crate::repl::{DirtyRange, Hello, Message, PeerProgress, ResyncKind, WriteRecord};

const SIZE: u64 = 16 << 20;

fn replicator(role: Role, now: Instant) -> Replicator {
    let mut meta = Meta::empty(role);
    meta.lineage = GenerationInfo::create(9, "a").expect("lineage");
    let peers = ["b", "c"]
        .iter()
        .map(|name| PeerConfig {
            name: (*name).into(),
            on_disconnect: OnDisconnect::Degrade,
            peer_timeout: Duration::from_secs(5),
            resync_max_rate_bytes_per_s: None,
            regional: None,
        })
        .collect();
    Replicator::new(
        ReplicatorConfig {
            node: "a".into(),
            volume: "vol".into(),
            size_bytes: SIZE,
            peers,
            window_bytes: 1 << 20,
        },
        Startup {
            meta,
            head_lsn: 4,
            peers: (0..2)
                .map(|_| StartPeer {
                    bitmap: BlockBitmap::new(SIZE),
                    state: Default::default(),
                })
                .collect(),
        },
        now,
    )
}

fn peer_hello(role: Role, head_lsn: u64) -> Hello {
    let mut generation = GenerationInfo::create(9, "a").expect("lineage");
    generation.head_lsn = head_lsn;
    Hello {
        protocol_version: super::session::PROTOCOL_VERSION,
        node: "b".into(),
        volume: "vol".into(),
        size_bytes: SIZE,
        role,
        generation,
        durable_lsn: head_lsn,
        consistent: true,
        discarding_local: false,
    }
}

/// Completes I/O the way a daemon would (successfully), so the replicator moves on.
fn run_actions(rep: &mut Replicator) {
    for _ in 0..10_000 {
        let Some(action) = rep.poll_action() else {
            return;
        };
        match action {
            Action::PersistMeta { .. } => rep.meta_persisted(Ok(())),
            Action::PersistMap { peer, .. } => rep.map_persisted(peer, Ok(())),
            Action::Append { .. } => rep.appended(Ok(())),
            Action::JournalFlush => {
                let head = rep.head_lsn();
                rep.journal_flushed(Ok(head));
            }
            Action::JournalReset { .. } => rep.journal_reset(Ok(())),
            Action::DeviceWrite { id, .. } | Action::DeviceZero { id, .. } => {
                rep.device_done(id, Ok(()))
            }
            Action::DeviceSync => rep.device_synced(Ok(())),
            Action::StageBatch { peer, .. } => rep.batch_staged(peer, Ok(())),
            Action::ApplyBatch { peer, .. } => rep.batch_applied(peer, Ok(())),
            Action::CatchUpWrite { id, .. } => rep.device_done(id, Ok(())),
            Action::CatchUpCommit { .. } => rep.catchup_committed(Ok(())),
            Action::CatchUpApply { .. } => rep.catchup_applied(Ok(())),
            Action::CatchUpDrop => {}
            Action::Read { id, len_bytes, .. } => {
                rep.read_done(id, Ok(Bytes::from(vec![0; len_bytes as usize])))
            }
            Action::Digest { id, .. } => rep.digest_done(id, Ok(Vec::new())),
            Action::Drain => rep.writes_drained(),
            Action::Transmit { .. } | Action::CloseStream { .. } | Action::Fail { .. } => {}
        }
    }
}

fn record(lsn: u64, offset_bytes: u64, len: u32, kind: RecordKind) -> WriteRecord {
    WriteRecord {
        lsn,
        kind,
        fua: lsn.is_multiple_of(3),
        offset_bytes,
        len_bytes: len,
        data: if kind == RecordKind::Write {
            Bytes::from(vec![7; len as usize])
        } else {
            Bytes::new()
        },
    }
}

fn arb_message() -> impl Strategy<Value = Message> {
    let lsn = prop_oneof![0u64..30, Just(LSN_MAX), Just(u64::MAX)];
    let offset = prop_oneof![(0u64..(SIZE / 512 + 4)).prop_map(|b| b * 512), any::<u64>()];
    let len = prop_oneof![
        Just(0u32),
        Just(512),
        Just(4096),
        Just(1 << 20),
        any::<u32>()
    ];
    prop_oneof![
        (lsn.clone(), offset.clone(), len.clone(), 0usize..3).prop_map(|(l, o, n, k)| {
            let kind = [RecordKind::Write, RecordKind::Zero, RecordKind::Punch][k];
            let n = if kind == RecordKind::Write {
                n.min(1 << 20)
            } else {
                n
            };
            Message::Write(record(l, o, n, kind))
        }),
        (lsn.clone(), lsn.clone()).prop_map(|(journal_lsn, durable_lsn)| Message::Ack {
            journal_lsn,
            durable_lsn
        }),
        lsn.clone().prop_map(|upto_lsn| Message::Flush { upto_lsn }),
        (0usize..2, any::<u64>(), lsn.clone()).prop_map(|(k, total_bytes, target_lsn)| {
            Message::ResyncBegin {
                kind: [ResyncKind::Delta, ResyncKind::Full][k],
                total_bytes,
                target_lsn,
            }
        }),
        (offset.clone(), 0usize..3).prop_map(|(offset_bytes, n)| Message::ResyncData {
            offset_bytes,
            data: Bytes::from(vec![3; [512, 4096, 65536][n]]),
        }),
        (offset.clone(), any::<u64>()).prop_map(|(offset_bytes, len_bytes)| {
            Message::ResyncZero {
                offset_bytes,
                len_bytes,
            }
        }),
        any::<u64>().prop_map(|written_bytes| Message::ResyncAck { written_bytes }),
        lsn.clone().prop_map(|lsn| {
            let mut lineage = GenerationInfo::create(9, "a").expect("lineage");
            lineage.head_lsn = lsn;
            Message::ResyncEnd { lsn, lineage }
        }),
        (offset.clone(), any::<u64>(), any::<bool>()).prop_map(
            |(offset_bytes, len_bytes, last)| {
                Message::DirtyRanges {
                    ranges: vec![DirtyRange {
                        offset_bytes,
                        len_bytes,
                    }],
                    last,
                }
            }
        ),
        (0usize..2).prop_map(|r| Message::RoleChange {
            role: [Role::Primary, Role::Secondary][r]
        }),
        (lsn.clone(), any::<u64>()).prop_map(|(start_lsn, generation)| Message::NewGeneration {
            entry: GenerationEntry {
                generation,
                start_lsn,
                promoted_by: "b".into(),
            }
        }),
        (lsn.clone(), proptest::option::of(lsn.clone())).prop_map(|(durable_lsn, c)| {
            Message::Progress {
                durable_lsn,
                peers: vec![PeerProgress {
                    node: "c".into(),
                    durable_lsn: c,
                }],
            }
        }),
        (
            any::<u64>(),
            offset.clone(),
            any::<u64>(),
            any::<u64>(),
            lsn.clone()
        )
            .prop_map(|(id, offset_bytes, len_bytes, block_bytes, at_lsn)| {
                Message::VerifyRequest {
                    id,
                    offset_bytes,
                    len_bytes,
                    block_bytes,
                    at_lsn,
                }
            }),
        (any::<u64>(), 0usize..100).prop_map(|(id, n)| Message::VerifyReply {
            id,
            digests: vec![[1; 16]; n]
        }),
        (any::<u64>(), 0u64..4)
            .prop_map(|(sent_at_us, seq)| Message::Heartbeat { sent_at_us, seq }),
        Just(Message::Goodbye {
            reason: "bye".into()
        }),
    ]
}

fn handshake(rep: &mut Replicator, role: Role, peer_role: Role, peer_head: u64, now: Instant) {
    rep.disconnected(0, "a new stream", now);
    run_actions(rep);
    handshake_now(rep, role, peer_role, peer_head, now);
    run_actions(rep);
}

/// A new stream and a valid handshake with I/O of the earlier link still in flight (journal
/// appends, device writes): a peer may reconnect at once, the replicator must not wait for
/// its own I/O to be safe.
fn handshake_now(rep: &mut Replicator, role: Role, peer_role: Role, peer_head: u64, now: Instant) {
    handshake_with(rep, role, peer_role, Some(peer_head), now);
}

/// [`handshake_now`] with the peer naming `peer_head`, or (None) the head this copy's hello
/// named: the copies look in sync, and records flow at once.
fn handshake_with(
    rep: &mut Replicator,
    role: Role,
    peer_role: Role,
    peer_head: Option<u64>,
    now: Instant,
) {
    rep.disconnected(0, "a new stream", now);
    rep.connected(0, now);
    let named = rep.peers[0]
        .session
        .sent_hello()
        .map_or(rep.head_lsn(), |sent| sent.generation.head_lsn);
    let hello = peer_hello(peer_role, peer_head.unwrap_or(named));
    // The decision over the hello the replicator sent (its head as it named it).
    let own = rep.peers[0]
        .session
        .sent_hello()
        .map(|sent| sent.generation.clone())
        .unwrap_or_else(|| {
            let mut own = rep.meta().lineage.clone();
            own.head_lsn = rep.head_lsn();
            own
        });
    let decision = crate::generation::decide(&hello.generation, peer_role, &own, role);
    rep.message(0, Message::Hello(hello), now);
    rep.message(0, Message::Welcome { decision }, now);
    rep.advance(now);
}

/// The next record a receiving link takes (valid: the LSN its session expects, inside the
/// volume), so that hostile sequences reach past the session's LSN check.
fn next_record(rep: &Replicator, block: u64) -> Message {
    let lsn = rep.peers[0].session.received_lsn() + 1;
    Message::Write(record(
        lsn,
        (block % (SIZE / 4096)) * 4096,
        4096,
        RecordKind::Write,
    ))
}

/// One step of a hostile peer: a message, the next valid record, a reconnect with I/O still
/// in flight, or the daemon completing the I/O it was asked for.
#[derive(Debug, Clone)]
enum Step {
    Message(Message),
    NextRecord(u64),
    /// A new stream with the peer naming this head (None: the head this copy names).
    Reconnect(Option<u64>),
    Io,
}

fn arb_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => arb_message().prop_map(Step::Message),
        3 => any::<u64>().prop_map(Step::NextRecord),
        1 => proptest::option::of(0u64..12).prop_map(Step::Reconnect),
        1 => Just(Step::Io),
    ]
}

/// A secondary at head 4 following a primary at head 4 (in sync, records flow).
fn following_secondary(now: Instant) -> Replicator {
    let mut rep = replicator(Role::Secondary, now);
    rep.advance(now);
    run_actions(&mut rep);
    handshake(&mut rep, Role::Secondary, Role::Primary, 4, now);
    assert_eq!(rep.status().peers[0].state, super::ReplicaState::InSync);
    rep
}

fn last_error(rep: &Replicator) -> String {
    rep.status().peers[0].last_error.clone().unwrap_or_default()
}

/// Records 5 and 6 arrive and are handed to the journal; the link drops and the primary
/// reconnects before the journal wrote them. The secondary's hello still names head 4, so an
/// honest primary at head 4 (it lost 5 and 6 to a power loss) or a hostile one sends a new
/// record 5. That once reached `assert_eq!(record.lsn, appended_up_to + 1)` in `on_record`
/// and panicked under the daemon's replication lock. The link must close with the reason
/// instead, and the next handshake, once the journal holds 5 and 6, decides over them.
#[test]
fn a_reconnect_while_records_are_being_journaled_closes_the_link() {
    let now = Instant::now();
    let mut rep = following_secondary(now);
    for lsn in 5..=6 {
        rep.message(
            0,
            Message::Write(record(lsn, lsn * 4096, 4096, RecordKind::Write)),
            now,
        );
    }
    rep.advance(now);
    assert_eq!(rep.head_lsn(), 4, "the appends are still in flight");
    handshake_now(&mut rep, Role::Secondary, Role::Primary, 4, now);
    rep.message(
        0,
        Message::Write(record(5, 0, 4096, RecordKind::Write)),
        now,
    );
    rep.advance(now);
    assert_eq!(rep.status().peers[0].state, super::ReplicaState::Connecting);
    let error = last_error(&rep);
    assert!(error.contains("still being journaled"), "{error}");
    // The journal writes 5 and 6; the next handshake names head 6 and decides over it.
    run_actions(&mut rep);
    assert_eq!(rep.head_lsn(), 6);
    handshake(&mut rep, Role::Secondary, Role::Primary, 6, now);
    assert_eq!(rep.status().peers[0].state, super::ReplicaState::InSync);
    rep.message(
        0,
        Message::Write(record(7, 0, 4096, RecordKind::Write)),
        now,
    );
    rep.advance(now);
    run_actions(&mut rep);
    assert_eq!(rep.head_lsn(), 7);
}

/// The same with the journal done before the new link decides: the hello named head 4, the
/// journal holds 6 by the welcome. The plan's "receive from 4" would take 5 and 6 again.
#[test]
fn a_journal_that_moved_during_the_handshake_closes_the_link() {
    let now = Instant::now();
    let mut rep = following_secondary(now);
    for lsn in 5..=6 {
        rep.message(
            0,
            Message::Write(record(lsn, lsn * 4096, 4096, RecordKind::Write)),
            now,
        );
    }
    rep.disconnected(0, "a new stream", now);
    rep.connected(0, now);
    run_actions(&mut rep); // the journal writes 5 and 6 after the hello named 4
    assert_eq!(rep.head_lsn(), 6);
    let hello = peer_hello(Role::Primary, 4);
    let mut own = rep.meta().lineage.clone();
    own.head_lsn = 4;
    let decision =
        crate::generation::decide(&hello.generation, Role::Primary, &own, Role::Secondary);
    rep.message(0, Message::Hello(hello), now);
    rep.message(0, Message::Welcome { decision }, now);
    rep.message(
        0,
        Message::Write(record(5, 0, 4096, RecordKind::Write)),
        now,
    );
    rep.advance(now);
    assert_eq!(rep.status().peers[0].state, super::ReplicaState::Connecting);
    let error = last_error(&rep);
    assert!(error.contains("still being journaled"), "{error}");
}

/// A primary that sends a record before the resync it owes (the receiving side defers
/// records until the resync's end, whose LSN the record cannot follow): refused, not
/// replayed after the end where its LSN no longer fits.
#[test]
fn a_record_before_the_resync_is_refused() {
    let now = Instant::now();
    let mut rep = replicator(Role::Secondary, now);
    rep.advance(now);
    run_actions(&mut rep);
    // The primary is at 6: a resync from 4.
    handshake(&mut rep, Role::Secondary, Role::Primary, 6, now);
    assert_eq!(rep.status().peers[0].state, super::ReplicaState::Resyncing);
    rep.message(
        0,
        Message::Write(record(5, 0, 4096, RecordKind::Write)),
        now,
    );
    rep.advance(now);
    run_actions(&mut rep);
    let mut lineage = GenerationInfo::create(9, "a").expect("lineage");
    lineage.head_lsn = 5;
    for message in [
        Message::ResyncBegin {
            kind: ResyncKind::Delta,
            total_bytes: 0,
            target_lsn: 5,
        },
        Message::ResyncEnd { lsn: 5, lineage },
    ] {
        rep.message(0, message, now);
        rep.advance(now);
        run_actions(&mut rep);
    }
    for _ in 0..10 {
        rep.advance(now);
        run_actions(&mut rep);
    }
    assert_ne!(rep.status().peers[0].state, super::ReplicaState::InSync);
    let error = last_error(&rep);
    assert!(error.contains("before the resync"), "{error}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// After a valid handshake, any sequence of messages from the peer (with valid records
    /// among them, and reconnects while the replicator's I/O is still in flight): no panic,
    /// and the replicator keeps answering (status, timers) afterwards.
    #[test]
    fn hostile_messages_never_panic_the_replicator(
        local_primary in any::<bool>(),
        peer_head in 0u64..8,
        steps in proptest::collection::vec(arb_step(), 1..40),
        io_between in any::<bool>(),
    ) {
        let mut now = Instant::now();
        let role = if local_primary { Role::Primary } else { Role::Secondary };
        let peer_role = if local_primary { Role::Secondary } else { Role::Primary };
        let mut rep = replicator(role, now);
        rep.advance(now);
        run_actions(&mut rep);
        let mut handshakes = 0;
        for step in steps {
            if rep.status().peers[0].state == super::ReplicaState::Connecting && handshakes < 20 {
                // The last message closed the link (or none is up yet): a new stream and a
                // valid handshake, so that every message reaches a live link.
                handshake(&mut rep, role, peer_role, peer_head, now);
                handshakes += 1;
            }
            now += Duration::from_millis(3);
            match step {
                Step::Message(message) => rep.message(0, message, now),
                Step::NextRecord(block) => {
                    let message = next_record(&rep, block);
                    rep.message(0, message, now);
                }
                Step::Reconnect(head) if handshakes < 20 => {
                    handshake_with(&mut rep, role, peer_role, head, now);
                    handshakes += 1;
                }
                Step::Reconnect(_) => {}
                Step::Io => run_actions(&mut rep),
            }
            rep.advance(now);
            if io_between {
                run_actions(&mut rep);
            }
        }
        now += Duration::from_secs(10);
        rep.timeout(now);
        run_actions(&mut rep);
        let _ = rep.status();
    }
}

/// Verify requests cost the receiving copy reads: a block over 1 MiB (one digest would read
/// that much at once) is refused, and so are more requests in flight than a verifier keeps.
#[test]
fn verify_requests_are_bounded() {
    let now = Instant::now();
    let mut rep = following_secondary(now);
    rep.message(
        0,
        Message::VerifyRequest {
            id: 1,
            offset_bytes: 0,
            len_bytes: SIZE,
            block_bytes: SIZE,
            at_lsn: 4,
        },
        now,
    );
    assert_eq!(rep.status().peers[0].state, super::ReplicaState::Connecting);
    let error = last_error(&rep);
    assert!(error.contains("block larger than 1 MiB"), "{error}");

    handshake(&mut rep, Role::Secondary, Role::Primary, 4, now);
    assert_eq!(rep.status().peers[0].state, super::ReplicaState::InSync);
    for id in 0..super::VERIFY_SERVING_MAX as u64 + 1 {
        rep.message(
            0,
            Message::VerifyRequest {
                id,
                offset_bytes: 0,
                len_bytes: 1 << 20,
                block_bytes: 1 << 20,
                at_lsn: 4,
            },
            now,
        );
        rep.advance(now);
    }
    assert_eq!(rep.status().peers[0].state, super::ReplicaState::Connecting);
    let error = last_error(&rep);
    assert!(error.contains("too many verify requests"), "{error}");
}
