//! What the sans-IO unit tests share: a replicator with one peer, and the daemon's part of an
//! action played at once, as storage that never fails would.

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{
    Action, Meta, OnDisconnect, PeerConfig, RegionalConfig, Replicator, ReplicatorConfig,
    StartPeer, Startup, WINDOW_BYTES,
};
use crate::bitmap::BlockBitmap;
use crate::generation::{GenerationInfo, Role};
use crate::journal::RecordKind;
use crate::repl::{Message, WriteRecord};

/// A client write of `len` bytes at `offset_bytes`, filled with its LSN.
pub(super) fn write(lsn: u64, offset_bytes: u64, len: u32) -> WriteRecord {
    WriteRecord {
        lsn,
        kind: RecordKind::Write,
        fua: false,
        offset_bytes,
        len_bytes: len,
        data: Bytes::from(vec![lsn as u8; len as usize]),
    }
}

/// A fresh copy of a `size`-byte volume on node `name` with one peer `peer`; a primary starts
/// a lineage, a secondary holds none. `regional` makes the peer a regional replica.
pub(super) fn replicator(
    name: &str,
    peer: &str,
    role: Role,
    now: Instant,
    size: u64,
    regional: Option<RegionalConfig>,
) -> Replicator {
    let mut meta = Meta::empty(role);
    if role == Role::Primary {
        meta.lineage = GenerationInfo::create(7, name).expect("lineage");
    }
    started(name, peer, now, size, regional, meta, 0)
}

/// `me` (node `name`) after a crash: what its meta file and journal held, a clean map.
pub(super) fn restarted(me: &Replicator, name: &str, peer: &str, now: Instant) -> Replicator {
    let regional = me.peers[0].config.regional;
    let size = me.config.size_bytes;
    started(
        name,
        peer,
        now,
        size,
        regional,
        me.meta().clone(),
        me.head_lsn(),
    )
}

fn started(
    name: &str,
    peer: &str,
    now: Instant,
    size: u64,
    regional: Option<RegionalConfig>,
    meta: Meta,
    head_lsn: u64,
) -> Replicator {
    Replicator::new(
        ReplicatorConfig {
            node: name.into(),
            volume: "vol".into(),
            size_bytes: size,
            peers: vec![PeerConfig {
                name: peer.into(),
                on_disconnect: OnDisconnect::Degrade,
                peer_timeout: Duration::from_secs(10),
                resync_max_rate_bytes_per_s: None,
                regional,
            }],
            window_bytes: WINDOW_BYTES,
        },
        Startup {
            meta,
            head_lsn,
            peers: vec![StartPeer {
                bitmap: BlockBitmap::new(size),
                state: Default::default(),
            }],
        },
        now,
    )
}

/// Completes `action` of side `side` (0 or 1) at once; returns the message of a `Transmit`
/// for the caller to carry. Reads return ones (never a zero range); digests are
/// `digests(side, ..)`; a journal flush makes everything up to the head durable.
pub(super) fn carry_out(me: &mut Replicator, side: usize, action: Action) -> Option<Message> {
    match action {
        Action::Transmit { message, .. } => return Some(message),
        Action::Digest {
            id,
            len_bytes,
            block_bytes,
            ..
        } => me.digest_done(id, Ok(digests(side, len_bytes, block_bytes))),
        Action::StageBatch { peer, .. } => me.batch_staged(peer, Ok(())),
        Action::ApplyBatch { peer, .. } => me.batch_applied(peer, Ok(())),
        Action::CloseStream { .. } | Action::CatchUpDrop => {}
        Action::PersistMeta { .. } => me.meta_persisted(Ok(())),
        Action::PersistMap { peer, .. } => me.map_persisted(peer, Ok(())),
        Action::Append { .. } => me.appended(Ok(())),
        Action::JournalFlush => {
            let head = me.head_lsn();
            me.journal_flushed(Ok(head));
        }
        Action::JournalReset { .. } => me.journal_reset(Ok(())),
        Action::DeviceWrite { id, .. } | Action::DeviceZero { id, .. } => {
            me.device_done(id, Ok(()))
        }
        Action::DeviceSync => me.device_synced(Ok(())),
        Action::Read { id, len_bytes, .. } => {
            me.read_done(id, Ok(Bytes::from(vec![1; len_bytes as usize])))
        }
        Action::CatchUpWrite { id, .. } => me.device_done(id, Ok(())),
        Action::CatchUpCommit { .. } => me.catchup_committed(Ok(())),
        Action::CatchUpApply { .. } => me.catchup_applied(Ok(())),
        Action::Drain => me.writes_drained(),
        other => panic!("unexpected action {other:?}"),
    }
    None
}

/// The digests side `side` reports: every block of one side alike, the two sides apart.
pub(super) fn digests(side: usize, len_bytes: u64, block_bytes: u64) -> Vec<[u8; 16]> {
    let blocks = usize::try_from(len_bytes.div_ceil(block_bytes)).expect("a small volume");
    vec![[u8::try_from(side).expect("0 or 1"); 16]; blocks]
}

/// Carries out both sides' actions and messages until nothing moves. A side that closes
/// the link is not heard again until `reconnect`.
pub(super) fn settle(a: &mut Replicator, b: &mut Replicator, now: Instant) {
    settle_watching(a, b, now, &mut |_, _| {});
}

/// `settle`, with `watch` called after every action of either side.
pub(super) fn settle_watching(
    a: &mut Replicator,
    b: &mut Replicator,
    now: Instant,
    watch: &mut dyn FnMut(&Replicator, &Replicator),
) {
    pump(
        a,
        b,
        now,
        &mut |me, side, action| carry_out(me, side, action),
        watch,
    );
}

/// Runs both sides until nothing moves: `handle` carries out each action of side `side` (0
/// is `a`) and returns the message to deliver to the other side, if any; `watch` sees both
/// sides after every action.
pub(super) fn pump(
    a: &mut Replicator,
    b: &mut Replicator,
    now: Instant,
    handle: &mut dyn FnMut(&mut Replicator, usize, Action) -> Option<Message>,
    watch: &mut dyn FnMut(&Replicator, &Replicator),
) {
    for _ in 0..5000 {
        let mut moved = false;
        for side in 0..2 {
            let (me, other) = if side == 0 {
                (&mut *a, &mut *b)
            } else {
                (&mut *b, &mut *a)
            };
            me.advance(now);
            while let Some(action) = me.poll_action() {
                moved = true;
                if let Some(message) = handle(me, side, action) {
                    other.message(0, message, now);
                }
                if side == 0 {
                    watch(me, other);
                } else {
                    watch(other, me);
                }
            }
        }
        if !moved {
            return;
        }
    }
    panic!("the two sides never settle");
}

/// Carries out one side's actions with the link down.
pub(super) fn alone(me: &mut Replicator, side: usize, now: Instant) {
    for _ in 0..5000 {
        me.advance(now);
        let mut moved = false;
        while let Some(action) = me.poll_action() {
            moved = true;
            let _ = carry_out(me, side, action);
        }
        if !moved {
            return;
        }
    }
    panic!("{side} never settles");
}

pub(super) fn cut(a: &mut Replicator, b: &mut Replicator, now: Instant) {
    a.disconnected(0, "cut", now);
    b.disconnected(0, "cut", now);
}

pub(super) fn reconnect(a: &mut Replicator, b: &mut Replicator, now: Instant) {
    cut(a, b, now);
    a.connected(0, now);
    b.connected(0, now);
}
