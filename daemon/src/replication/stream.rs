//! The two tasks of one (volume, peer) stream: the writer encodes what the replicator asks to
//! transmit, the reader decodes frames and hands them in, no faster than the replicator can take
//! them ([`Replicator::can_receive`]): a secondary whose disk is behind stops reading, QUIC's
//! flow control stops the sender, and the sender's windows fill. Nothing a peer sends grows
//! memory here beyond one read buffer and one batch of decoded messages; what the peer makes
//! this node answer is bounded by the writer's queue (see [`cost`]).
//!
//! [`Replicator::can_receive`]: ferry_protocol::replication::Replicator::can_receive

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::BytesMut;
use ferry_protocol::repl::{self, Message};
use quinn::{RecvStream, SendStream};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use super::VolumeReplication;

/// Most bytes the writer coalesces into one stream write.
const WRITE_COALESCE_BYTES_MAX: usize = 4 << 20;
/// Most messages the reader hands in at once.
const DELIVER_BATCH_MAX: usize = 256;
/// Bytes the reader asks for at a time.
const READ_CHUNK_BYTES: usize = 1 << 20;

/// Set to N to corrupt the N-th write frame this node sends, after its CRC is computed (QUIC's
/// own integrity checks never let a flipped bit through a real network). Read only by builds
/// with the `fault-injection` feature.
#[cfg(feature = "fault-injection")]
pub const FAULT_CORRUPT_FRAME_ENV: &str = "FERRY_FAULT_CORRUPT_FRAME";

fn corrupt_frame_at() -> Option<u64> {
    #[cfg(feature = "fault-injection")]
    {
        std::env::var(FAULT_CORRUPT_FRAME_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
    }
    #[cfg(not(feature = "fault-injection"))]
    {
        None
    }
}

/// What a queued message counts against the stream's queue bound: its payload and a fixed
/// overhead (so that floods of small messages count too).
///
/// Records and resync data are bounded by the replicator's windows; everything else a node
/// sends is small and mostly an answer to what the peer sent (heartbeat replies, acks, verify
/// replies). Those count [`CONTROL_COST_BYTES`] each, far more than they take, so that a peer
/// that sends without reading the answers is cut off after some 190 000 of them (a few tens
/// of MiB held), not millions.
pub(super) fn cost(message: &Message) -> u64 {
    const OVERHEAD_BYTES: u64 = 64;
    let payload = match message {
        Message::Write(record) => record.data.len(),
        Message::ResyncData { data, .. } => data.len(),
        Message::DirtyRanges { ranges, .. } => ranges.len() * 16,
        Message::VerifyReply { digests, .. } => digests.len() * 16,
        _ => return CONTROL_COST_BYTES,
    };
    payload as u64 + OVERHEAD_BYTES
}

/// What a message without payload counts against the stream's queue bound (see [`cost`]).
const CONTROL_COST_BYTES: u64 = 1024;

/// Frames of several messages, and where each one ends in `buf`.
struct Frames {
    buf: BytesMut,
    ends: Vec<usize>,
}

/// Encodes `messages` in order; write payloads compressed at `level` when given.
fn encode_all(messages: &[Message], level: Option<i32>) -> Result<Frames, repl::FrameError> {
    let mut buf = BytesMut::new();
    let mut ends = Vec::with_capacity(messages.len());
    for message in messages {
        match level {
            Some(level) => repl::encode_compressed(message, &mut buf, level)?,
            None => repl::encode(message, &mut buf)?,
        }
        ends.push(buf.len());
    }
    Ok(Frames { buf, ends })
}

/// Encodes messages onto the stream, coalescing what is queued. Ends when the replication
/// drops the sender (the stream closes after what was queued is written) or a write fails.
pub(super) async fn write_loop(
    replication: Arc<VolumeReplication>,
    peer: usize,
    id: u64,
    mut send: SendStream,
    mut rx: mpsc::UnboundedReceiver<Message>,
    queued: Arc<AtomicU64>,
) {
    let corrupt_at = corrupt_frame_at();
    let metrics = replication.peer_metrics(peer).clone();
    let regional = replication.peer_is_regional(peer);
    let compression = replication.peer_compression(peer);
    let mut writes_sent = 0u64;
    let result: Result<(), String> = async {
        while let Some(message) = rx.recv().await {
            // What is queued goes out in one chunk, up to a bound.
            let mut messages = vec![message];
            let mut queued_bytes = 0;
            let mut taken = 0;
            loop {
                let last = messages.last().expect("one at least");
                taken += cost(last);
                queued_bytes += cost(last);
                if queued_bytes >= WRITE_COALESCE_BYTES_MAX as u64 {
                    break;
                }
                match rx.try_recv() {
                    Ok(next) => messages.push(next),
                    Err(_) => break,
                }
            }
            let encoded = match compression {
                // zstd costs CPU the client path must not wait behind: off the runtime.
                Some(level) => tokio::task::spawn_blocking(move || {
                    encode_all(&messages, Some(level)).map(|buf| (buf, messages))
                })
                .await
                .map_err(|e| e.to_string())?,
                None => encode_all(&messages, None).map(|buf| (buf, messages)),
            };
            let (mut frames, messages) = encoded.map_err(|e| e.to_string())?;
            for (message, end) in messages.iter().zip(frames.ends.iter()) {
                match message {
                    Message::Write(record) => {
                        writes_sent += 1;
                        if !regional {
                            metrics
                                .logical_bytes_total
                                .inc_by(u64::from(record.len_bytes));
                        }
                        if corrupt_at == Some(writes_sent) && *end > 20 {
                            frames.buf[*end - 1] ^= 0x5a;
                            tracing::warn!(volume = %replication.name(), peer = %replication.peer_name(peer), "fault injection: corrupted write frame {writes_sent}");
                        }
                    }
                    Message::ResyncData { data, .. } => {
                        metrics.resync_bytes_total.inc_by(data.len() as u64);
                    }
                    _ => {}
                }
            }
            let frame = frames.buf.freeze();
            metrics.wire_bytes_total.inc_by(frame.len() as u64);
            send.write_chunk(frame).await.map_err(|e| e.to_string())?;
            queued.fetch_sub(taken, Ordering::Relaxed);
        }
        let _ = send.finish();
        Ok(())
    }
    .await;
    if let Err(why) = result {
        replication.stream_closed(peer, id, format!("stream write failed: {why}"));
    }
}

/// Decodes frames from the stream and hands them to the replicator in batches, waiting while
/// it cannot take more. A bad frame (CRC, length, unknown type) closes the stream.
pub(super) async fn read_loop(
    replication: Arc<VolumeReplication>,
    peer: usize,
    id: u64,
    mut recv: RecvStream,
) {
    let mut buf = BytesMut::with_capacity(READ_CHUNK_BYTES);
    let mut batch = Vec::with_capacity(DELIVER_BATCH_MAX);
    let why = 'outer: loop {
        // Hand in every whole frame buffered, a batch at a time.
        loop {
            let mut bad = None;
            let mut drained = false;
            while batch.len() < DELIVER_BATCH_MAX {
                match repl::decode(&mut buf) {
                    Ok(Some(message)) => batch.push(message),
                    Ok(None) => {
                        drained = true;
                        break;
                    }
                    Err(error) => {
                        if error.is_checksum_error() {
                            replication.volume_metrics().checksum_error("replication");
                        }
                        bad = Some(error);
                        break;
                    }
                }
            }
            if !batch.is_empty() {
                replication.wait_for_room(peer).await;
                if !replication.deliver(peer, id, &mut batch) {
                    return; // the stream was replaced or closed meanwhile
                }
            }
            if let Some(error) = bad {
                tracing::warn!(volume = %replication.name(), peer = %replication.peer_name(peer), %error, "bad replication frame; closing the stream");
                let _ = recv.stop(quinn::VarInt::from_u32(1));
                break 'outer format!("bad frame from the peer: {error}");
            }
            if drained {
                break;
            }
        }
        if buf.capacity() - buf.len() < READ_CHUNK_BYTES / 16 {
            buf.reserve(READ_CHUNK_BYTES);
        }
        match recv.read_buf(&mut buf).await {
            Ok(0) => break "the peer closed the stream".to_string(),
            Ok(_) => {}
            Err(error) => break format!("stream read failed: {error}"),
        }
    };
    replication.stream_closed(peer, id, why);
}
