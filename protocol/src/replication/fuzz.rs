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
    rep.connected(0, now);
    let hello = peer_hello(peer_role, peer_head);
    let mut own = rep.meta().lineage.clone();
    own.head_lsn = rep.head_lsn();
    let decision = crate::generation::decide(&hello.generation, peer_role, &own, role);
    rep.message(0, Message::Hello(hello), now);
    rep.message(0, Message::Welcome { decision }, now);
    rep.advance(now);
    run_actions(rep);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// After a valid handshake, any sequence of messages from the peer: no panic, and the
    /// replicator keeps answering (status, timers) afterwards.
    #[test]
    fn hostile_messages_never_panic_the_replicator(
        local_primary in any::<bool>(),
        peer_head in 0u64..8,
        messages in proptest::collection::vec(arb_message(), 1..40),
        io_between in any::<bool>(),
    ) {
        let mut now = Instant::now();
        let role = if local_primary { Role::Primary } else { Role::Secondary };
        let peer_role = if local_primary { Role::Secondary } else { Role::Primary };
        let mut rep = replicator(role, now);
        rep.advance(now);
        run_actions(&mut rep);
        let mut handshakes = 0;
        for message in messages {
            if rep.status().peers[0].state == super::ReplicaState::Connecting && handshakes < 20 {
                // The last message closed the link (or none is up yet): a new stream and a
                // valid handshake, so that every message reaches a live link.
                handshake(&mut rep, role, peer_role, peer_head, now);
                handshakes += 1;
            }
            now += Duration::from_millis(3);
            rep.message(0, message, now);
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
