//! The replication wire format: framed messages between two peers of a volume, with no I/O.
//!
//! Every frame is a fixed 16-byte header followed by the payload:
//!
//! ```text
//! magic u16 (0xFE11) | version u8 (2) | type u8 | flags u16 (0) | reserved u16 (0)
//! length u32 (payload bytes) | crc u32 (CRC-32 over the header with crc = 0, then the payload)
//! ```
//!
//! All integers are little-endian; strings are a u16 byte length then UTF-8, capped. The
//! length is checked against [`PAYLOAD_BYTES_MAX`] before waiting for the payload, so a peer
//! (or a flipped bit) cannot make a reader buffer gigabytes. [`decode`] splits whole frames off
//! a `BytesMut` and hands out payload data as `Bytes` slices of it, without copying.
//!
//! QUIC streams are reliable and ordered, so a frame that fails to decode means a broken peer
//! or corruption under TLS: the connection must be closed, never resynchronised by skipping.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;

use crate::generation::{Decision, GenerationEntry, GenerationInfo, Role, HISTORY_ENTRIES_MAX};
use crate::journal::RecordKind;

/// First two bytes of every frame.
pub const MAGIC: u16 = 0xFE11;
/// The frame format and message set this build speaks.
pub const VERSION: u8 = 2;
/// Bytes of the fixed frame header.
pub const HEADER_BYTES: usize = 16;
/// Largest data block a `Write` or `ResyncData` carries.
pub const DATA_BYTES_MAX: usize = 8 << 20;
/// Largest payload: one data block plus room for the fields around it.
pub const PAYLOAD_BYTES_MAX: usize = DATA_BYTES_MAX + 4096;
/// Longest string (node, volume, reason) a message carries.
pub const STRING_BYTES_MAX: usize = 1024;
/// Most ranges in one `DirtyRanges` frame (16 bytes each: 1 MiB).
pub const DIRTY_RANGES_PER_FRAME_MAX: usize = 65536;
/// Most peers one `Progress` message lists.
pub const PROGRESS_PEERS_MAX: usize = 64;
/// Most digests one `VerifyReply` carries (16 bytes each: 64 KiB).
pub const VERIFY_DIGESTS_MAX: usize = 4096;
/// Bytes of one verify digest (a truncated SHA-256 of a block).
pub const VERIFY_DIGEST_BYTES: usize = 16;

/// Why bytes are not a valid frame, or a message cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    /// The frame does not start with [`MAGIC`]: not a Ferry peer, or a corrupted stream.
    #[error("bad frame magic {found:#06x}")]
    BadMagic { found: u16 },
    /// The peer speaks a frame version this build does not.
    #[error("unsupported frame version {found}")]
    UnsupportedVersion { found: u8 },
    /// The declared payload is larger than [`PAYLOAD_BYTES_MAX`].
    #[error("frame payload of {length_bytes} bytes exceeds {PAYLOAD_BYTES_MAX}")]
    FrameTooLarge { length_bytes: u64 },
    /// The CRC does not match: corruption on the wire (counted as `where="wire"`).
    #[error("frame checksum mismatch: computed {computed:#010x}, frame says {stored:#010x}")]
    ChecksumMismatch { computed: u32, stored: u32 },
    /// The type byte names no message.
    #[error("unknown message type {0}")]
    UnknownType(u8),
    /// Flags or reserved bits are set that this version does not define.
    #[error("reserved header bits set: flags {flags:#06x}, reserved {reserved:#06x}")]
    ReservedBits { flags: u16, reserved: u16 },
    /// The payload ends before the message does.
    #[error("payload truncated in {message}")]
    Truncated { message: &'static str },
    /// The payload continues after the message ends.
    #[error("{extra_bytes} trailing bytes after {message}")]
    TrailingBytes {
        message: &'static str,
        extra_bytes: usize,
    },
    /// A string is longer than [`STRING_BYTES_MAX`].
    #[error("string of {len_bytes} bytes exceeds {STRING_BYTES_MAX}")]
    StringTooLong { len_bytes: usize },
    /// A string is not UTF-8.
    #[error("string is not UTF-8")]
    BadUtf8,
    /// A list is longer than its cap.
    #[error("list of {count} entries exceeds {max}")]
    TooManyEntries { count: usize, max: usize },
    /// A data block is larger than [`DATA_BYTES_MAX`], or its length disagrees with the record.
    #[error("data of {len_bytes} bytes is too large or does not match the record")]
    BadDataLength { len_bytes: u64 },
    /// A field holds a value no encoder produces.
    #[error("invalid {0}")]
    Invalid(&'static str),
}

impl FrameError {
    /// Whether the error looks like corruption of a frame rather than a peer speaking another
    /// protocol (what `ferry_checksum_errors_total{where="wire"}` counts).
    pub fn is_checksum_error(&self) -> bool {
        matches!(self, FrameError::ChecksumMismatch { .. })
    }
}

/// Why a peer refuses a hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefuseCode {
    /// The protocol version is not one this node speaks.
    VersionMismatch,
    /// This node has no volume of that name configured with the sender as a peer.
    UnknownVolume,
    /// The volume sizes differ.
    SizeMismatch,
    /// The hello's generation history is malformed.
    BadGeneration,
    /// The hello came from another node than the one this session expects.
    WrongNode,
}

impl RefuseCode {
    /// The stable kebab-case name (control-socket error codes and `last_error`).
    pub fn as_str(self) -> &'static str {
        match self {
            RefuseCode::VersionMismatch => "version-mismatch",
            RefuseCode::UnknownVolume => "unknown-volume",
            RefuseCode::SizeMismatch => "size-mismatch",
            RefuseCode::BadGeneration => "bad-generation",
            RefuseCode::WrongNode => "wrong-node",
        }
    }
}

/// Whether a resync copies the whole volume or only what changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResyncKind {
    /// Initial sync of a never-synced copy: every block.
    Full,
    /// Only the ranges that changed since the common point (both sides' dirty maps merged).
    Delta,
}

/// What each side says about itself when a volume's stream opens. Both sides send one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The replication protocol version (the session's, not the frame's).
    pub protocol_version: u16,
    /// The sender's node name (must match its certificate; checked by the transport).
    pub node: String,
    /// The volume this stream replicates.
    pub volume: String,
    /// The volume's size; both copies must agree.
    pub size_bytes: u64,
    /// The sender's role for the volume.
    pub role: Role,
    /// The sender's lineage: volume id, generation history and journal head LSN.
    pub generation: GenerationInfo,
    /// The newest LSN durable on the sender (its own records, or its primary's it holds).
    pub durable_lsn: u64,
    /// The sender's copy is consistent: no resync into it was interrupted.
    pub consistent: bool,
    /// The sender's operator chose to discard its writes since a split brain with the
    /// receiver (`ferry resolve --discard-local`): a split brain between the two resolves in
    /// the receiver's favour.
    pub discarding_local: bool,
}

/// What a primary knows of one of its other metro peers, for its secondaries' bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerProgress {
    /// The peer's node name.
    pub node: String,
    /// The peer holds the primary's records durably up to here; `None` while it is not
    /// receiving records (disconnected, being resynced): the receivers of this message track
    /// what they hold for that peer themselves.
    pub durable_lsn: Option<u64>,
}

/// A journal record shipped to a secondary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteRecord {
    /// Its LSN; a stream carries consecutive LSNs.
    pub lsn: u64,
    /// Write, Zero or Punch, as in the journal.
    pub kind: RecordKind,
    /// The client asked for durability on completion.
    pub fua: bool,
    /// Where on the volume.
    pub offset_bytes: u64,
    /// How many bytes (for Zero and Punch, the range length; no data travels).
    pub len_bytes: u32,
    /// The payload, only for `Write` (length `len_bytes`), empty otherwise.
    pub data: Bytes,
}

/// A changed range of a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DirtyRange {
    /// Start of the range.
    pub offset_bytes: u64,
    /// Length of the range.
    pub len_bytes: u64,
}

/// One replication message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Opens the handshake (both sides send one).
    Hello(Hello),
    /// Answers a hello: the sender's [`Decision`] from its own point of view.
    Welcome { decision: Decision },
    /// Refuses a hello; the connection closes.
    Refuse { code: RefuseCode, reason: String },
    /// A journal record (primary to secondary).
    Write(WriteRecord),
    /// Cumulative: records up to `journal_lsn` are in the sender's journal, up to
    /// `durable_lsn` durable.
    Ack { journal_lsn: u64, durable_lsn: u64 },
    /// Asks for durability up to `upto_lsn`; answered by an `Ack`.
    Flush { upto_lsn: u64 },
    /// Liveness and RTT probe; the receiver echoes it.
    Heartbeat { sent_at_us: u64, seq: u64 },
    /// The echo of a heartbeat.
    HeartbeatReply { sent_at_us: u64, seq: u64 },
    /// A resync starts; the receiver's head becomes `target_lsn` at `ResyncEnd`.
    ResyncBegin {
        kind: ResyncKind,
        total_bytes: u64,
        target_lsn: u64,
    },
    /// Resync contents of a range.
    ResyncData { offset_bytes: u64, data: Bytes },
    /// A range that reads as zeros, sent as a range rather than data.
    ResyncZero { offset_bytes: u64, len_bytes: u64 },
    /// Cumulative resync bytes written to the receiver's device (the sender's window).
    ResyncAck { written_bytes: u64 },
    /// The resync is complete: the receiver now holds the volume as of `lsn`, in the sender's
    /// lineage `lineage` (whose head is `lsn`).
    ResyncEnd { lsn: u64, lineage: GenerationInfo },
    /// Part of the sender's dirty map since the common point; `last` ends the list.
    DirtyRanges { ranges: Vec<DirtyRange>, last: bool },
    /// The sender changed role.
    RoleChange { role: Role },
    /// The sender closes the stream on purpose.
    Goodbye { reason: String },
    /// Primary to secondary: a generation the primary started; it covers the records from its
    /// start LSN on, some of which the receiver may already hold.
    NewGeneration { entry: GenerationEntry },
    /// Primary to secondary: how far the primary itself and its other peers hold its records
    /// durably (see [`PeerProgress`]).
    Progress {
        durable_lsn: u64,
        peers: Vec<PeerProgress>,
    },
    /// Asks for digests of `[offset_bytes, offset_bytes + len_bytes)`, one per `block_bytes`,
    /// once the receiver holds every record up to `at_lsn` (online verify).
    VerifyRequest {
        id: u64,
        offset_bytes: u64,
        len_bytes: u64,
        block_bytes: u64,
        at_lsn: u64,
    },
    /// The digests a `VerifyRequest` asked for, in block order.
    VerifyReply {
        id: u64,
        digests: Vec<[u8; VERIFY_DIGEST_BYTES]>,
    },
    /// Primary to a regional secondary: the batch of records since the previous end is
    /// complete; the receiver holds the volume as of `lsn` once it applies it. The records
    /// of a batch keep their LSNs but need not be consecutive (overwritten ones are left out).
    BatchEnd { lsn: u64 },
}

const TYPE_HELLO: u8 = 1;
const TYPE_WELCOME: u8 = 2;
const TYPE_REFUSE: u8 = 3;
const TYPE_WRITE: u8 = 4;
const TYPE_ACK: u8 = 5;
const TYPE_FLUSH: u8 = 6;
const TYPE_HEARTBEAT: u8 = 7;
const TYPE_HEARTBEAT_REPLY: u8 = 8;
const TYPE_RESYNC_BEGIN: u8 = 9;
const TYPE_RESYNC_DATA: u8 = 10;
const TYPE_RESYNC_ZERO: u8 = 11;
const TYPE_RESYNC_ACK: u8 = 12;
const TYPE_RESYNC_END: u8 = 13;
const TYPE_DIRTY_RANGES: u8 = 14;
const TYPE_ROLE_CHANGE: u8 = 15;
const TYPE_GOODBYE: u8 = 16;
const TYPE_NEW_GENERATION: u8 = 17;
const TYPE_PROGRESS: u8 = 18;
const TYPE_VERIFY_REQUEST: u8 = 19;
const TYPE_VERIFY_REPLY: u8 = 20;
const TYPE_BATCH_END: u8 = 21;
/// A `Write` whose payload is zstd-compressed: decodes to [`Message::Write`].
const TYPE_WRITE_ZSTD: u8 = 22;

impl Message {
    fn type_byte(&self) -> u8 {
        match self {
            Message::Hello(_) => TYPE_HELLO,
            Message::Welcome { .. } => TYPE_WELCOME,
            Message::Refuse { .. } => TYPE_REFUSE,
            Message::Write(_) => TYPE_WRITE,
            Message::Ack { .. } => TYPE_ACK,
            Message::Flush { .. } => TYPE_FLUSH,
            Message::Heartbeat { .. } => TYPE_HEARTBEAT,
            Message::HeartbeatReply { .. } => TYPE_HEARTBEAT_REPLY,
            Message::ResyncBegin { .. } => TYPE_RESYNC_BEGIN,
            Message::ResyncData { .. } => TYPE_RESYNC_DATA,
            Message::ResyncZero { .. } => TYPE_RESYNC_ZERO,
            Message::ResyncAck { .. } => TYPE_RESYNC_ACK,
            Message::ResyncEnd { .. } => TYPE_RESYNC_END,
            Message::DirtyRanges { .. } => TYPE_DIRTY_RANGES,
            Message::RoleChange { .. } => TYPE_ROLE_CHANGE,
            Message::Goodbye { .. } => TYPE_GOODBYE,
            Message::NewGeneration { .. } => TYPE_NEW_GENERATION,
            Message::Progress { .. } => TYPE_PROGRESS,
            Message::VerifyRequest { .. } => TYPE_VERIFY_REQUEST,
            Message::VerifyReply { .. } => TYPE_VERIFY_REPLY,
            Message::BatchEnd { .. } => TYPE_BATCH_END,
        }
    }

    /// A name for logs and errors.
    pub fn name(&self) -> &'static str {
        type_name(self.type_byte())
    }
}

fn type_name(type_byte: u8) -> &'static str {
    match type_byte {
        TYPE_HELLO => "hello",
        TYPE_WELCOME => "welcome",
        TYPE_REFUSE => "refuse",
        TYPE_WRITE => "write",
        TYPE_ACK => "ack",
        TYPE_FLUSH => "flush",
        TYPE_HEARTBEAT => "heartbeat",
        TYPE_HEARTBEAT_REPLY => "heartbeat-reply",
        TYPE_RESYNC_BEGIN => "resync-begin",
        TYPE_RESYNC_DATA => "resync-data",
        TYPE_RESYNC_ZERO => "resync-zero",
        TYPE_RESYNC_ACK => "resync-ack",
        TYPE_RESYNC_END => "resync-end",
        TYPE_DIRTY_RANGES => "dirty-ranges",
        TYPE_ROLE_CHANGE => "role-change",
        TYPE_GOODBYE => "goodbye",
        TYPE_NEW_GENERATION => "new-generation",
        TYPE_PROGRESS => "progress",
        TYPE_VERIFY_REQUEST => "verify-request",
        TYPE_VERIFY_REPLY => "verify-reply",
        TYPE_BATCH_END => "batch-end",
        TYPE_WRITE_ZSTD => "write-zstd",
        _ => "unknown",
    }
}

/// Appends one frame to `out`. Fails, writing nothing, if a field exceeds its cap.
pub fn encode(message: &Message, out: &mut BytesMut) -> Result<(), FrameError> {
    encode_frame(message.type_byte(), out, |out| encode_payload(message, out))
}

/// Like [`encode`], but the payload of a write record travels zstd-compressed at `level`
/// when that saves at least a sixteenth of it (regional links; the receiver decodes the
/// same [`Message::Write`]). Compressing is the caller's CPU: keep it off latency-critical
/// threads.
pub fn encode_compressed(
    message: &Message,
    out: &mut BytesMut,
    level: i32,
) -> Result<(), FrameError> {
    let Message::Write(record) = message else {
        return encode(message, out);
    };
    if !record.kind.has_payload() || record.data.len() < COMPRESS_MIN_BYTES {
        return encode(message, out);
    }
    let Some(compressed) = zstd_context::compress(&record.data, level) else {
        return encode(message, out);
    };
    if compressed.len() + record.data.len() / 16 >= record.data.len() {
        return encode(message, out);
    }
    encode_frame(TYPE_WRITE_ZSTD, out, |out| {
        put_record_header(out, record)?;
        put_data(out, &compressed)
    })
}

/// Payloads shorter than this are sent as they are.
const COMPRESS_MIN_BYTES: usize = 512;

/// zstd contexts, one of each per thread and reused. Records are compressed one at a time,
/// and creating a context costs more than compressing a 4 KiB record with it: before, a
/// profile of a regional primary under 4 KiB writes had `ZSTD_createCCtx` at 5 % of its
/// samples, twice the compression proper.
mod zstd_context {
    use std::cell::RefCell;

    use zstd::bulk::{Compressor, Decompressor};

    thread_local! {
        static COMPRESSOR: RefCell<Option<(i32, Compressor<'static>)>> = const { RefCell::new(None) };
        static DECOMPRESSOR: RefCell<Option<Decompressor<'static>>> = const { RefCell::new(None) };
    }

    /// `data` compressed at `level`; `None` if zstd failed.
    pub(super) fn compress(data: &[u8], level: i32) -> Option<Vec<u8>> {
        COMPRESSOR.with_borrow_mut(|slot| {
            if slot.as_ref().is_none_or(|(at, _)| *at != level) {
                *slot = Some((level, Compressor::new(level).ok()?));
            }
            let (_, compressor) = slot.as_mut()?;
            compressor.compress(data).ok()
        })
    }

    /// `packed` decompressed, never more than `capacity` bytes; `None` if it is not a zstd
    /// frame of at most that size.
    pub(super) fn decompress(packed: &[u8], capacity: usize) -> Option<Vec<u8>> {
        DECOMPRESSOR.with_borrow_mut(|slot| {
            if slot.is_none() {
                *slot = Some(Decompressor::new().ok()?);
            }
            slot.as_mut()?.decompress(packed, capacity).ok()
        })
    }
}

fn encode_frame(
    type_byte: u8,
    out: &mut BytesMut,
    payload: impl FnOnce(&mut BytesMut) -> Result<(), FrameError>,
) -> Result<(), FrameError> {
    let start = out.len();
    out.put_u16_le(MAGIC);
    out.put_u8(VERSION);
    out.put_u8(type_byte);
    out.put_u16_le(0); // flags
    out.put_u16_le(0); // reserved
    out.put_u32_le(0); // length, filled below
    out.put_u32_le(0); // crc, filled below
    if let Err(error) = payload(out) {
        out.truncate(start);
        return Err(error);
    }
    let payload_bytes = out.len() - start - HEADER_BYTES;
    if payload_bytes > PAYLOAD_BYTES_MAX {
        out.truncate(start);
        return Err(FrameError::FrameTooLarge {
            length_bytes: payload_bytes as u64,
        });
    }
    let Ok(length) = u32::try_from(payload_bytes) else {
        out.truncate(start);
        return Err(FrameError::FrameTooLarge {
            length_bytes: payload_bytes as u64,
        });
    };
    out[start + 8..start + 12].copy_from_slice(&length.to_le_bytes());
    let crc = crc32fast::hash(&out[start..]);
    out[start + 12..start + 16].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// A count as the integer type of its field, refused like any count over its cap.
pub(crate) fn count_field<T: TryFrom<usize>>(count: usize, max: usize) -> Result<T, FrameError> {
    T::try_from(count).map_err(|_| FrameError::TooManyEntries { count, max })
}

pub(crate) fn put_string(out: &mut BytesMut, value: &str) -> Result<(), FrameError> {
    if value.len() > STRING_BYTES_MAX {
        return Err(FrameError::StringTooLong {
            len_bytes: value.len(),
        });
    }
    let len = u16::try_from(value.len()).map_err(|_| FrameError::StringTooLong {
        len_bytes: value.len(),
    })?;
    out.put_u16_le(len);
    out.put_slice(value.as_bytes());
    Ok(())
}

fn put_data(out: &mut BytesMut, data: &[u8]) -> Result<(), FrameError> {
    if data.len() > DATA_BYTES_MAX {
        return Err(FrameError::BadDataLength {
            len_bytes: data.len() as u64,
        });
    }
    let len = u32::try_from(data.len()).map_err(|_| FrameError::BadDataLength {
        len_bytes: data.len() as u64,
    })?;
    out.put_u32_le(len);
    out.put_slice(data);
    Ok(())
}

pub(crate) fn role_byte(role: Role) -> u8 {
    match role {
        Role::Primary => 1,
        Role::Secondary => 2,
    }
}

fn kind_byte(kind: RecordKind) -> u8 {
    match kind {
        RecordKind::Write => 1,
        RecordKind::Zero => 2,
        RecordKind::Punch => 3,
    }
}

pub(crate) fn put_entry(out: &mut BytesMut, entry: &GenerationEntry) -> Result<(), FrameError> {
    out.put_u64_le(entry.generation);
    out.put_u64_le(entry.start_lsn);
    put_string(out, &entry.promoted_by)
}

pub(crate) fn put_lineage(out: &mut BytesMut, info: &GenerationInfo) -> Result<(), FrameError> {
    out.put_u64_le(info.volume_id);
    out.put_u64_le(info.head_lsn);
    if info.history.len() > HISTORY_ENTRIES_MAX {
        return Err(FrameError::TooManyEntries {
            count: info.history.len(),
            max: HISTORY_ENTRIES_MAX,
        });
    }
    out.put_u16_le(count_field(info.history.len(), HISTORY_ENTRIES_MAX)?);
    for entry in &info.history {
        put_entry(out, entry)?;
    }
    Ok(())
}

fn put_decision(out: &mut BytesMut, decision: Decision) {
    let (tag, generation, lsn) = match decision {
        Decision::Same => (1, 0, 0),
        Decision::LocalAhead {
            common_generation,
            common_lsn,
        } => (2, common_generation, common_lsn),
        Decision::RemoteAhead {
            common_generation,
            common_lsn,
        } => (3, common_generation, common_lsn),
        Decision::SplitBrain {
            common_generation,
            common_lsn,
        } => (4, common_generation, common_lsn),
        Decision::Unrelated => (5, 0, 0),
        Decision::LocalEmpty => (6, 0, 0),
        Decision::RemoteEmpty => (7, 0, 0),
        Decision::BothPrimary => (8, 0, 0),
    };
    out.put_u8(tag);
    out.put_u64_le(generation);
    out.put_u64_le(lsn);
}

fn put_hello(out: &mut BytesMut, hello: &Hello) -> Result<(), FrameError> {
    out.put_u16_le(hello.protocol_version);
    put_string(out, &hello.node)?;
    put_string(out, &hello.volume)?;
    out.put_u64_le(hello.size_bytes);
    out.put_u8(role_byte(hello.role));
    out.put_u64_le(hello.durable_lsn);
    out.put_u8(u8::from(hello.consistent) | (u8::from(hello.discarding_local) << 1));
    put_lineage(out, &hello.generation)
}

fn put_record(out: &mut BytesMut, record: &WriteRecord) -> Result<(), FrameError> {
    put_record_header(out, record)?;
    out.put_slice(&record.data);
    Ok(())
}

/// A record's fields, checked, without its payload.
fn put_record_header(out: &mut BytesMut, record: &WriteRecord) -> Result<(), FrameError> {
    let data_ok = if record.kind.has_payload() {
        record.data.len() == record.len_bytes as usize
    } else {
        record.data.is_empty()
    };
    if !data_ok || record.data.len() > DATA_BYTES_MAX {
        return Err(FrameError::BadDataLength {
            len_bytes: record.data.len() as u64,
        });
    }
    out.put_u64_le(record.lsn);
    out.put_u8(kind_byte(record.kind));
    out.put_u8(u8::from(record.fua));
    out.put_u64_le(record.offset_bytes);
    out.put_u32_le(record.len_bytes);
    Ok(())
}

fn put_dirty_ranges(
    out: &mut BytesMut,
    ranges: &[DirtyRange],
    last: bool,
) -> Result<(), FrameError> {
    let count = count_field::<u32>(ranges.len(), DIRTY_RANGES_PER_FRAME_MAX)?;
    if ranges.len() > DIRTY_RANGES_PER_FRAME_MAX {
        return Err(FrameError::TooManyEntries {
            count: ranges.len(),
            max: DIRTY_RANGES_PER_FRAME_MAX,
        });
    }
    out.put_u8(u8::from(last));
    out.put_u32_le(count);
    for range in ranges {
        out.put_u64_le(range.offset_bytes);
        out.put_u64_le(range.len_bytes);
    }
    Ok(())
}

fn put_progress(
    out: &mut BytesMut,
    durable_lsn: u64,
    peers: &[PeerProgress],
) -> Result<(), FrameError> {
    if peers.len() > PROGRESS_PEERS_MAX {
        return Err(FrameError::TooManyEntries {
            count: peers.len(),
            max: PROGRESS_PEERS_MAX,
        });
    }
    out.put_u64_le(durable_lsn);
    out.put_u8(count_field(peers.len(), PROGRESS_PEERS_MAX)?);
    for peer in peers {
        put_string(out, &peer.node)?;
        match peer.durable_lsn {
            None => out.put_u8(0),
            Some(lsn) => {
                out.put_u8(1);
                out.put_u64_le(lsn);
            }
        }
    }
    Ok(())
}

fn encode_payload(message: &Message, out: &mut BytesMut) -> Result<(), FrameError> {
    match message {
        Message::Hello(hello) => put_hello(out, hello)?,
        Message::Welcome { decision } => put_decision(out, *decision),
        Message::Refuse { code, reason } => {
            out.put_u8(match code {
                RefuseCode::VersionMismatch => 1,
                RefuseCode::UnknownVolume => 2,
                RefuseCode::SizeMismatch => 3,
                RefuseCode::BadGeneration => 4,
                RefuseCode::WrongNode => 5,
            });
            put_string(out, reason)?;
        }
        Message::Write(record) => put_record(out, record)?,
        Message::Ack {
            journal_lsn,
            durable_lsn,
        } => {
            out.put_u64_le(*journal_lsn);
            out.put_u64_le(*durable_lsn);
        }
        Message::Flush { upto_lsn } => out.put_u64_le(*upto_lsn),
        Message::BatchEnd { lsn } => out.put_u64_le(*lsn),
        Message::Heartbeat { sent_at_us, seq } | Message::HeartbeatReply { sent_at_us, seq } => {
            out.put_u64_le(*sent_at_us);
            out.put_u64_le(*seq);
        }
        Message::ResyncBegin {
            kind,
            total_bytes,
            target_lsn,
        } => {
            out.put_u8(match kind {
                ResyncKind::Full => 1,
                ResyncKind::Delta => 2,
            });
            out.put_u64_le(*total_bytes);
            out.put_u64_le(*target_lsn);
        }
        Message::ResyncData { offset_bytes, data } => {
            out.put_u64_le(*offset_bytes);
            put_data(out, data)?;
        }
        Message::ResyncZero {
            offset_bytes,
            len_bytes,
        } => {
            out.put_u64_le(*offset_bytes);
            out.put_u64_le(*len_bytes);
        }
        Message::ResyncAck { written_bytes } => out.put_u64_le(*written_bytes),
        Message::ResyncEnd { lsn, lineage } => {
            out.put_u64_le(*lsn);
            put_lineage(out, lineage)?;
        }
        Message::DirtyRanges { ranges, last } => put_dirty_ranges(out, ranges, *last)?,
        Message::RoleChange { role } => out.put_u8(role_byte(*role)),
        Message::Goodbye { reason } => put_string(out, reason)?,
        Message::NewGeneration { entry } => put_entry(out, entry)?,
        Message::Progress { durable_lsn, peers } => put_progress(out, *durable_lsn, peers)?,
        Message::VerifyRequest {
            id,
            offset_bytes,
            len_bytes,
            block_bytes,
            at_lsn,
        } => {
            out.put_u64_le(*id);
            out.put_u64_le(*offset_bytes);
            out.put_u64_le(*len_bytes);
            out.put_u64_le(*block_bytes);
            out.put_u64_le(*at_lsn);
        }
        Message::VerifyReply { id, digests } => {
            if digests.len() > VERIFY_DIGESTS_MAX {
                return Err(FrameError::TooManyEntries {
                    count: digests.len(),
                    max: VERIFY_DIGESTS_MAX,
                });
            }
            out.put_u64_le(*id);
            out.put_u32_le(count_field(digests.len(), VERIFY_DIGESTS_MAX)?);
            for digest in digests {
                out.put_slice(digest);
            }
        }
    }
    Ok(())
}

/// Decodes the frame at the front of `buf` and removes it.
///
/// `Ok(None)`: not a whole frame yet, nothing consumed. `Ok(Some(_))`: exactly one frame was
/// split off. `Err(_)`: the stream is unusable and the connection must be closed; the buffer's
/// contents are then unspecified. Header errors (magic, version, length) are reported as soon
/// as the header is in, before the payload arrives.
pub fn decode(buf: &mut BytesMut) -> Result<Option<Message>, FrameError> {
    let Some(header) = buf.get(..HEADER_BYTES) else {
        return Ok(None);
    };
    let mut h = header;
    let magic = h.get_u16_le();
    let version = h.get_u8();
    let type_byte = h.get_u8();
    let flags = h.get_u16_le();
    let reserved = h.get_u16_le();
    let length_bytes = h.get_u32_le();
    let stored = h.get_u32_le();
    if magic != MAGIC {
        return Err(FrameError::BadMagic { found: magic });
    }
    if version != VERSION {
        return Err(FrameError::UnsupportedVersion { found: version });
    }
    let length = length_bytes as usize;
    if length > PAYLOAD_BYTES_MAX {
        return Err(FrameError::FrameTooLarge {
            length_bytes: u64::from(length_bytes),
        });
    }
    // Cannot overflow: length <= PAYLOAD_BYTES_MAX.
    let frame_bytes = HEADER_BYTES + length;
    if buf.len() < frame_bytes {
        return Ok(None);
    }
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&buf[..12]);
    hasher.update(&[0u8; 4]);
    hasher.update(&buf[HEADER_BYTES..frame_bytes]);
    let computed = hasher.finalize();
    if computed != stored {
        return Err(FrameError::ChecksumMismatch { computed, stored });
    }
    if flags != 0 || reserved != 0 {
        return Err(FrameError::ReservedBits { flags, reserved });
    }
    let frame = buf.split_to(frame_bytes).freeze();
    let payload = frame.slice(HEADER_BYTES..);
    decode_payload(type_byte, payload).map(Some)
}

/// A bounds-checked reader over a payload; every read fails instead of panicking.
pub(crate) struct Reader {
    pub(crate) payload: Bytes,
    pub(crate) message: &'static str,
}

impl Reader {
    pub(crate) fn truncated(&self) -> FrameError {
        FrameError::Truncated {
            message: self.message,
        }
    }
    pub(crate) fn u8(&mut self) -> Result<u8, FrameError> {
        if self.payload.remaining() < 1 {
            return Err(self.truncated());
        }
        Ok(self.payload.get_u8())
    }
    pub(crate) fn u16(&mut self) -> Result<u16, FrameError> {
        if self.payload.remaining() < 2 {
            return Err(self.truncated());
        }
        Ok(self.payload.get_u16_le())
    }
    pub(crate) fn u32(&mut self) -> Result<u32, FrameError> {
        if self.payload.remaining() < 4 {
            return Err(self.truncated());
        }
        Ok(self.payload.get_u32_le())
    }
    pub(crate) fn u64(&mut self) -> Result<u64, FrameError> {
        if self.payload.remaining() < 8 {
            return Err(self.truncated());
        }
        Ok(self.payload.get_u64_le())
    }
    pub(crate) fn bool(&mut self) -> Result<bool, FrameError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(FrameError::Invalid("boolean")),
        }
    }
    /// Zero-copy: a slice of the frame.
    pub(crate) fn bytes(&mut self, len: usize) -> Result<Bytes, FrameError> {
        if self.payload.remaining() < len {
            return Err(self.truncated());
        }
        Ok(self.payload.split_to(len))
    }
    pub(crate) fn string(&mut self) -> Result<String, FrameError> {
        let len = usize::from(self.u16()?);
        if len > STRING_BYTES_MAX {
            return Err(FrameError::StringTooLong { len_bytes: len });
        }
        let raw = self.bytes(len)?;
        String::from_utf8(raw.to_vec()).map_err(|_| FrameError::BadUtf8)
    }
    pub(crate) fn data(&mut self) -> Result<Bytes, FrameError> {
        let len = self.u32()?;
        if len as usize > DATA_BYTES_MAX {
            return Err(FrameError::BadDataLength {
                len_bytes: u64::from(len),
            });
        }
        self.bytes(len as usize)
    }
    pub(crate) fn role(&mut self) -> Result<Role, FrameError> {
        match self.u8()? {
            1 => Ok(Role::Primary),
            2 => Ok(Role::Secondary),
            _ => Err(FrameError::Invalid("role")),
        }
    }
    pub(crate) fn entry(&mut self) -> Result<GenerationEntry, FrameError> {
        Ok(GenerationEntry {
            generation: self.u64()?,
            start_lsn: self.u64()?,
            promoted_by: self.string()?,
        })
    }
    pub(crate) fn lineage(&mut self) -> Result<GenerationInfo, FrameError> {
        let volume_id = self.u64()?;
        let head_lsn = self.u64()?;
        let count = usize::from(self.u16()?);
        if count > HISTORY_ENTRIES_MAX {
            return Err(FrameError::TooManyEntries {
                count,
                max: HISTORY_ENTRIES_MAX,
            });
        }
        let mut history = Vec::with_capacity(count);
        for _ in 0..count {
            history.push(self.entry()?);
        }
        Ok(GenerationInfo {
            volume_id,
            history,
            head_lsn,
        })
    }
    pub(crate) fn finish(self) -> Result<(), FrameError> {
        if self.payload.has_remaining() {
            return Err(FrameError::TrailingBytes {
                message: self.message,
                extra_bytes: self.payload.remaining(),
            });
        }
        Ok(())
    }
}

fn read_hello(r: &mut Reader) -> Result<Message, FrameError> {
    Ok({
        let protocol_version = r.u16()?;
        let node = r.string()?;
        let volume = r.string()?;
        let size_bytes = r.u64()?;
        let role = r.role()?;
        let durable_lsn = r.u64()?;
        let flags = r.u8()?;
        if flags & !0b11 != 0 {
            return Err(FrameError::Invalid("hello flags"));
        }
        let generation = r.lineage()?;
        Message::Hello(Hello {
            protocol_version,
            node,
            volume,
            size_bytes,
            role,
            generation,
            durable_lsn,
            consistent: flags & 1 != 0,
            discarding_local: flags & 2 != 0,
        })
    })
}

fn read_welcome(r: &mut Reader) -> Result<Message, FrameError> {
    Ok({
        let tag = r.u8()?;
        let common_generation = r.u64()?;
        let common_lsn = r.u64()?;
        let decision = match (tag, common_generation, common_lsn) {
            (1, 0, 0) => Decision::Same,
            (2, ..) => Decision::LocalAhead {
                common_generation,
                common_lsn,
            },
            (3, ..) => Decision::RemoteAhead {
                common_generation,
                common_lsn,
            },
            (4, ..) => Decision::SplitBrain {
                common_generation,
                common_lsn,
            },
            (5, 0, 0) => Decision::Unrelated,
            (6, 0, 0) => Decision::LocalEmpty,
            (7, 0, 0) => Decision::RemoteEmpty,
            (8, 0, 0) => Decision::BothPrimary,
            _ => return Err(FrameError::Invalid("decision")),
        };
        Message::Welcome { decision }
    })
}

fn read_record(r: &mut Reader, compressed: bool) -> Result<Message, FrameError> {
    Ok({
        let lsn = r.u64()?;
        let kind = match r.u8()? {
            1 => RecordKind::Write,
            2 => RecordKind::Zero,
            3 => RecordKind::Punch,
            _ => return Err(FrameError::Invalid("record kind")),
        };
        let fua = r.bool()?;
        let offset_bytes = r.u64()?;
        let len_bytes = r.u32()?;
        let data = if kind.has_payload() {
            if len_bytes as usize > DATA_BYTES_MAX {
                return Err(FrameError::BadDataLength {
                    len_bytes: u64::from(len_bytes),
                });
            }
            if compressed {
                let length = r.u32()? as usize;
                let packed = r.bytes(length)?;
                // Bounded: never more than the record's stated length (at most
                // DATA_BYTES_MAX) is decompressed.
                let data = zstd_context::decompress(&packed, len_bytes as usize)
                    .ok_or(FrameError::Invalid("compressed payload"))?;
                if data.len() != len_bytes as usize {
                    return Err(FrameError::Invalid("compressed payload length"));
                }
                Bytes::from(data)
            } else {
                r.bytes(len_bytes as usize)?
            }
        } else if compressed {
            return Err(FrameError::Invalid("a compressed record without payload"));
        } else {
            Bytes::new()
        };
        Message::Write(WriteRecord {
            lsn,
            kind,
            fua,
            offset_bytes,
            len_bytes,
            data,
        })
    })
}

fn read_dirty_ranges(r: &mut Reader) -> Result<Message, FrameError> {
    Ok({
        let last = r.bool()?;
        let count = r.u32()? as usize;
        if count > DIRTY_RANGES_PER_FRAME_MAX {
            return Err(FrameError::TooManyEntries {
                count,
                max: DIRTY_RANGES_PER_FRAME_MAX,
            });
        }
        // Allocate only what the payload can actually hold, whatever the count says.
        let mut ranges = Vec::with_capacity(count.min(r.payload.remaining() / 16));
        for _ in 0..count {
            ranges.push(DirtyRange {
                offset_bytes: r.u64()?,
                len_bytes: r.u64()?,
            });
        }
        Message::DirtyRanges { ranges, last }
    })
}

fn read_progress(r: &mut Reader) -> Result<Message, FrameError> {
    Ok({
        let durable_lsn = r.u64()?;
        let count = usize::from(r.u8()?);
        if count > PROGRESS_PEERS_MAX {
            return Err(FrameError::TooManyEntries {
                count,
                max: PROGRESS_PEERS_MAX,
            });
        }
        let mut peers = Vec::with_capacity(count);
        for _ in 0..count {
            let node = r.string()?;
            let durable_lsn = if r.bool()? { Some(r.u64()?) } else { None };
            peers.push(PeerProgress { node, durable_lsn });
        }
        Message::Progress { durable_lsn, peers }
    })
}

fn decode_payload(type_byte: u8, payload: Bytes) -> Result<Message, FrameError> {
    let mut r = Reader {
        payload,
        message: type_name(type_byte),
    };
    let message = match type_byte {
        TYPE_HELLO => read_hello(&mut r)?,
        TYPE_WELCOME => read_welcome(&mut r)?,
        TYPE_REFUSE => {
            let code = match r.u8()? {
                1 => RefuseCode::VersionMismatch,
                2 => RefuseCode::UnknownVolume,
                3 => RefuseCode::SizeMismatch,
                4 => RefuseCode::BadGeneration,
                5 => RefuseCode::WrongNode,
                _ => return Err(FrameError::Invalid("refuse code")),
            };
            Message::Refuse {
                code,
                reason: r.string()?,
            }
        }
        TYPE_WRITE => read_record(&mut r, false)?,
        TYPE_WRITE_ZSTD => read_record(&mut r, true)?,
        TYPE_ACK => Message::Ack {
            journal_lsn: r.u64()?,
            durable_lsn: r.u64()?,
        },
        TYPE_FLUSH => Message::Flush { upto_lsn: r.u64()? },
        TYPE_BATCH_END => Message::BatchEnd { lsn: r.u64()? },
        TYPE_HEARTBEAT => Message::Heartbeat {
            sent_at_us: r.u64()?,
            seq: r.u64()?,
        },
        TYPE_HEARTBEAT_REPLY => Message::HeartbeatReply {
            sent_at_us: r.u64()?,
            seq: r.u64()?,
        },
        TYPE_RESYNC_BEGIN => {
            let kind = match r.u8()? {
                1 => ResyncKind::Full,
                2 => ResyncKind::Delta,
                _ => return Err(FrameError::Invalid("resync kind")),
            };
            Message::ResyncBegin {
                kind,
                total_bytes: r.u64()?,
                target_lsn: r.u64()?,
            }
        }
        TYPE_RESYNC_DATA => Message::ResyncData {
            offset_bytes: r.u64()?,
            data: r.data()?,
        },
        TYPE_RESYNC_ZERO => Message::ResyncZero {
            offset_bytes: r.u64()?,
            len_bytes: r.u64()?,
        },
        TYPE_RESYNC_ACK => Message::ResyncAck {
            written_bytes: r.u64()?,
        },
        TYPE_RESYNC_END => Message::ResyncEnd {
            lsn: r.u64()?,
            lineage: r.lineage()?,
        },
        TYPE_DIRTY_RANGES => read_dirty_ranges(&mut r)?,
        TYPE_ROLE_CHANGE => Message::RoleChange { role: r.role()? },
        TYPE_GOODBYE => Message::Goodbye {
            reason: r.string()?,
        },
        TYPE_NEW_GENERATION => Message::NewGeneration { entry: r.entry()? },
        TYPE_PROGRESS => read_progress(&mut r)?,
        TYPE_VERIFY_REQUEST => Message::VerifyRequest {
            id: r.u64()?,
            offset_bytes: r.u64()?,
            len_bytes: r.u64()?,
            block_bytes: r.u64()?,
            at_lsn: r.u64()?,
        },
        TYPE_VERIFY_REPLY => {
            let id = r.u64()?;
            let count = r.u32()? as usize;
            if count > VERIFY_DIGESTS_MAX {
                return Err(FrameError::TooManyEntries {
                    count,
                    max: VERIFY_DIGESTS_MAX,
                });
            }
            let mut digests =
                Vec::with_capacity(count.min(r.payload.remaining() / VERIFY_DIGEST_BYTES));
            for _ in 0..count {
                let raw = r.bytes(VERIFY_DIGEST_BYTES)?;
                let mut digest = [0u8; VERIFY_DIGEST_BYTES];
                digest.copy_from_slice(&raw);
                digests.push(digest);
            }
            Message::VerifyReply { id, digests }
        }
        other => return Err(FrameError::UnknownType(other)),
    };
    r.finish()?;
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn unhex(text: &str) -> Vec<u8> {
        let text: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    }

    /// The one codec check: `message` encodes to a frame of type `type_byte` whose payload is
    /// exactly `payload_hex`, with the header and CRC computed independently here, and that
    /// frame decodes back to `message`, consuming all of it.
    fn check(type_byte: u8, payload_hex: &str, message: Message) {
        let payload = unhex(payload_hex);
        let mut expected = vec![0x11, 0xfe, VERSION, type_byte, 0, 0, 0, 0];
        expected.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&expected);
        crc.update(&[0; 4]);
        crc.update(&payload);
        expected.extend_from_slice(&crc.finalize().to_le_bytes());
        expected.extend_from_slice(&payload);

        let mut encoded = BytesMut::new();
        encode(&message, &mut encoded).unwrap();
        assert_eq!(hex(&encoded), hex(&expected), "encoding of {message:?}");
        let mut buf = BytesMut::from(&expected[..]);
        assert_eq!(decode(&mut buf), Ok(Some(message)));
        assert!(buf.is_empty());
    }

    fn entry(generation: u64, start_lsn: u64, node: &str) -> GenerationEntry {
        GenerationEntry {
            generation,
            start_lsn,
            promoted_by: node.to_owned(),
        }
    }

    fn hello() -> Hello {
        Hello {
            protocol_version: 1,
            node: "a".into(),
            volume: "vol".into(),
            size_bytes: 4096,
            role: Role::Primary,
            generation: GenerationInfo {
                volume_id: 0x1122,
                history: vec![entry(0x10005, 1, "a")],
                head_lsn: 9,
            },
            durable_lsn: 8,
            consistent: true,
            discarding_local: false,
        }
    }

    #[test]
    fn hello_and_handshake_bytes_are_exact() {
        let payload = concat!(
            "0100",
            "0100",
            "61",
            "0300",
            "766f6c",
            "0010000000000000",
            "01", // version, node, volume, size, role
            "0800000000000000",
            "01", // durable, flags (consistent)
            "2211000000000000",
            "0900000000000000", // volume id, head
            "0100",
            "0500010000000000",
            "0100000000000000",
            "0100",
            "61", // one history entry
        );
        check(TYPE_HELLO, payload, Message::Hello(hello()));
        check(
            TYPE_WELCOME,
            "01 0000000000000000 0000000000000000",
            Message::Welcome {
                decision: Decision::Same,
            },
        );
        check(
            TYPE_WELCOME,
            "03 0500010000000000 0400000000000000",
            Message::Welcome {
                decision: Decision::RemoteAhead {
                    common_generation: 0x10005,
                    common_lsn: 4,
                },
            },
        );
        check(
            TYPE_WELCOME,
            "04 0500010000000000 0400000000000000",
            Message::Welcome {
                decision: Decision::SplitBrain {
                    common_generation: 0x10005,
                    common_lsn: 4,
                },
            },
        );
        check(
            TYPE_WELCOME,
            "08 0000000000000000 0000000000000000",
            Message::Welcome {
                decision: Decision::BothPrimary,
            },
        );
        check(
            TYPE_REFUSE,
            "03 0200 6869",
            Message::Refuse {
                code: RefuseCode::SizeMismatch,
                reason: "hi".into(),
            },
        );
    }

    #[test]
    fn replication_bytes_are_exact() {
        let write = WriteRecord {
            lsn: 5,
            kind: RecordKind::Write,
            fua: true,
            offset_bytes: 4096,
            len_bytes: 3,
            data: Bytes::from_static(b"abc"),
        };
        check(
            TYPE_WRITE,
            "0500000000000000 01 01 0010000000000000 03000000 616263",
            Message::Write(write),
        );
        let zero = WriteRecord {
            lsn: 6,
            kind: RecordKind::Punch,
            fua: false,
            offset_bytes: 0,
            len_bytes: 1 << 20,
            data: Bytes::new(),
        };
        check(
            TYPE_WRITE,
            "0600000000000000 03 00 0000000000000000 00001000",
            Message::Write(zero),
        );
        check(
            TYPE_ACK,
            "0700000000000000 0600000000000000",
            Message::Ack {
                journal_lsn: 7,
                durable_lsn: 6,
            },
        );
        check(
            TYPE_FLUSH,
            "0900000000000000",
            Message::Flush { upto_lsn: 9 },
        );
        check(
            TYPE_HEARTBEAT,
            "e803000000000000 0200000000000000",
            Message::Heartbeat {
                sent_at_us: 1000,
                seq: 2,
            },
        );
        check(
            TYPE_HEARTBEAT_REPLY,
            "e803000000000000 0200000000000000",
            Message::HeartbeatReply {
                sent_at_us: 1000,
                seq: 2,
            },
        );
        check(
            TYPE_GOODBYE,
            "0400 62796521",
            Message::Goodbye {
                reason: "bye!".into(),
            },
        );
        check(
            TYPE_ROLE_CHANGE,
            "02",
            Message::RoleChange {
                role: Role::Secondary,
            },
        );
        check(
            TYPE_NEW_GENERATION,
            "0100020000000000 0a00000000000000 0100 62",
            Message::NewGeneration {
                entry: entry(0x20001, 10, "b"),
            },
        );
        check(
            TYPE_PROGRESS,
            "0900000000000000 02 0100 62 01 0700000000000000 0100 63 00",
            Message::Progress {
                durable_lsn: 9,
                peers: vec![
                    PeerProgress {
                        node: "b".into(),
                        durable_lsn: Some(7),
                    },
                    PeerProgress {
                        node: "c".into(),
                        durable_lsn: None,
                    },
                ],
            },
        );
        check(
            TYPE_VERIFY_REQUEST,
            "0300000000000000 0000100000000000 0000100000000000 0010000000000000 0500000000000000",
            Message::VerifyRequest {
                id: 3,
                offset_bytes: 1 << 20,
                len_bytes: 1 << 20,
                block_bytes: 4096,
                at_lsn: 5,
            },
        );
        check(
            TYPE_BATCH_END,
            "2a00000000000000",
            Message::BatchEnd { lsn: 42 },
        );
        check(
            TYPE_VERIFY_REPLY,
            "0300000000000000 01000000 000102030405060708090a0b0c0d0e0f",
            Message::VerifyReply {
                id: 3,
                digests: vec![[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]],
            },
        );
    }

    #[test]
    fn compressed_writes_decode_to_the_same_record_and_bombs_are_refused() {
        let record = WriteRecord {
            lsn: 7,
            kind: RecordKind::Write,
            fua: true,
            offset_bytes: 4096,
            len_bytes: 8192,
            data: Bytes::from(b"ferry ".repeat(1366)[..8192].to_vec()),
        };
        let mut plain = BytesMut::new();
        encode(&Message::Write(record.clone()), &mut plain).expect("encode");
        let mut packed = BytesMut::new();
        encode_compressed(&Message::Write(record.clone()), &mut packed, 1).expect("encode");
        assert!(
            packed.len() * 4 < plain.len(),
            "{} vs {}",
            packed.len(),
            plain.len()
        );
        assert_eq!(packed[3], TYPE_WRITE_ZSTD);
        let decoded = decode(&mut packed).expect("decode").expect("whole frame");
        assert_eq!(decoded, Message::Write(record.clone()));
        // Incompressible data goes as it is.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..8192)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect();
        let random = WriteRecord {
            data: Bytes::from(noise),
            ..record.clone()
        };
        let mut out = BytesMut::new();
        encode_compressed(&Message::Write(random), &mut out, 1).expect("encode");
        assert_eq!(out[3], TYPE_WRITE);
        // A frame whose stated length is smaller than what the data decompresses to (a
        // decompression bomb, or a lie) is refused, not expanded.
        let small = WriteRecord {
            len_bytes: 1024,
            data: record.data.slice(..1024),
            ..record
        };
        let mut frame = BytesMut::new();
        encode_compressed(&Message::Write(small), &mut frame, 1).expect("encode");
        assert_eq!(frame[3], TYPE_WRITE_ZSTD);
        // Rewrite the record's length field (offset 16 + 8 + 1 + 1 + 8) to 512 and fix the CRC.
        frame[34..38].copy_from_slice(&512u32.to_le_bytes());
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&frame[..12]);
        hasher.update(&[0u8; 4]);
        hasher.update(&frame[HEADER_BYTES..]);
        let crc = hasher.finalize();
        frame[12..16].copy_from_slice(&crc.to_le_bytes());
        assert!(decode(&mut frame).is_err());
    }

    #[test]
    fn resync_bytes_are_exact() {
        check(
            TYPE_RESYNC_BEGIN,
            "02 0000100000000000 2a00000000000000",
            Message::ResyncBegin {
                kind: ResyncKind::Delta,
                total_bytes: 1 << 20,
                target_lsn: 42,
            },
        );
        check(
            TYPE_RESYNC_DATA,
            "0020000000000000 02000000 ffee",
            Message::ResyncData {
                offset_bytes: 8192,
                data: Bytes::from_static(&[0xff, 0xee]),
            },
        );
        check(
            TYPE_RESYNC_ZERO,
            "0000000000000000 0000010000000000",
            Message::ResyncZero {
                offset_bytes: 0,
                len_bytes: 1 << 16,
            },
        );
        check(
            TYPE_RESYNC_ACK,
            "0200000000000000",
            Message::ResyncAck { written_bytes: 2 },
        );
        check(
            TYPE_RESYNC_END,
            "2a00000000000000 2211000000000000 2a00000000000000 0100 0500010000000000 0100000000000000 0100 61",
            Message::ResyncEnd {
                lsn: 42,
                lineage: GenerationInfo {
                    volume_id: 0x1122,
                    history: vec![entry(0x10005, 1, "a")],
                    head_lsn: 42,
                },
            },
        );
        let ranges = vec![DirtyRange {
            offset_bytes: 4096,
            len_bytes: 512,
        }];
        check(
            TYPE_DIRTY_RANGES,
            "01 01000000 0010000000000000 0002000000000000",
            Message::DirtyRanges { ranges, last: true },
        );
    }

    #[test]
    fn partial_frames_wait_and_consume_nothing() {
        let mut encoded = BytesMut::new();
        encode(&Message::Flush { upto_lsn: 1 }, &mut encoded).unwrap();
        encode(
            &Message::Ack {
                journal_lsn: 1,
                durable_lsn: 0,
            },
            &mut encoded,
        )
        .unwrap();
        for cut in 0..HEADER_BYTES + 8 {
            let mut buf = BytesMut::from(&encoded[..cut]);
            assert_eq!(decode(&mut buf), Ok(None));
            assert_eq!(buf.len(), cut);
        }
        let mut buf = encoded.clone();
        assert_eq!(decode(&mut buf), Ok(Some(Message::Flush { upto_lsn: 1 })));
        assert_eq!(
            decode(&mut buf),
            Ok(Some(Message::Ack {
                journal_lsn: 1,
                durable_lsn: 0
            }))
        );
        assert_eq!(decode(&mut buf), Ok(None));
    }

    #[test]
    fn oversized_and_malformed_frames_are_refused() {
        let mut header = BytesMut::from(&unhex("11fe 02 05 0000 0000 00008100 00000000")[..]);
        assert_eq!(
            decode(&mut header),
            Err(FrameError::FrameTooLarge {
                length_bytes: 0x0081_0000
            })
        );
        let mut bad_magic = BytesMut::from(&[0u8; 16][..]);
        assert_eq!(
            decode(&mut bad_magic),
            Err(FrameError::BadMagic { found: 0 })
        );
        let long = "x".repeat(STRING_BYTES_MAX + 1);
        let mut out = BytesMut::new();
        assert_eq!(
            encode(&Message::Goodbye { reason: long }, &mut out),
            Err(FrameError::StringTooLong {
                len_bytes: STRING_BYTES_MAX + 1
            })
        );
        assert!(out.is_empty(), "a refused encode writes nothing");
        let bad = WriteRecord {
            lsn: 1,
            kind: RecordKind::Write,
            fua: false,
            offset_bytes: 0,
            len_bytes: 4,
            data: Bytes::from_static(b"abc"),
        };
        assert!(encode(&Message::Write(bad), &mut out).is_err());
    }

    fn arb_string() -> impl Strategy<Value = String> {
        "[a-z0-9-]{0,20}"
    }

    fn arb_entry() -> impl Strategy<Value = GenerationEntry> {
        (any::<u64>(), any::<u64>(), arb_string()).prop_map(
            |(generation, start_lsn, promoted_by)| GenerationEntry {
                generation,
                start_lsn,
                promoted_by,
            },
        )
    }

    fn arb_role() -> impl Strategy<Value = Role> {
        prop_oneof![Just(Role::Primary), Just(Role::Secondary)]
    }

    fn arb_decision() -> impl Strategy<Value = Decision> {
        (0u8..8, any::<u64>(), any::<u64>()).prop_map(|(tag, common_generation, common_lsn)| {
            match tag {
                0 => Decision::Same,
                1 => Decision::LocalAhead {
                    common_generation,
                    common_lsn,
                },
                2 => Decision::RemoteAhead {
                    common_generation,
                    common_lsn,
                },
                3 => Decision::SplitBrain {
                    common_generation,
                    common_lsn,
                },
                4 => Decision::Unrelated,
                5 => Decision::LocalEmpty,
                6 => Decision::RemoteEmpty,
                _ => Decision::BothPrimary,
            }
        })
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        let data = proptest::collection::vec(any::<u8>(), 0..300).prop_map(Bytes::from);
        prop_oneof![
            (
                any::<u16>(),
                arb_string(),
                arb_string(),
                any::<u64>(),
                arb_role(),
                any::<[u64; 3]>(),
                arb_lineage(),
                any::<[bool; 2]>(),
            )
                .prop_map(
                    |(protocol_version, node, volume, size_bytes, role, n, generation, flags)| {
                        Message::Hello(Hello {
                            protocol_version,
                            node,
                            volume,
                            size_bytes,
                            role,
                            generation,
                            durable_lsn: n[2],
                            consistent: flags[0],
                            discarding_local: flags[1],
                        })
                    }
                ),
            arb_decision().prop_map(|decision| Message::Welcome { decision }),
            arb_string().prop_map(|reason| Message::Refuse {
                code: RefuseCode::WrongNode,
                reason
            }),
            (
                any::<u64>(),
                0u8..3,
                any::<bool>(),
                any::<u64>(),
                any::<u32>(),
                data.clone()
            )
                .prop_map(|(lsn, kind, fua, offset_bytes, len, data)| {
                    let kind =
                        [RecordKind::Write, RecordKind::Zero, RecordKind::Punch][kind as usize];
                    let (len_bytes, data) = if kind.has_payload() {
                        (data.len() as u32, data)
                    } else {
                        (len, Bytes::new())
                    };
                    Message::Write(WriteRecord {
                        lsn,
                        kind,
                        fua,
                        offset_bytes,
                        len_bytes,
                        data,
                    })
                }),
            (any::<u64>(), any::<u64>()).prop_map(|(journal_lsn, durable_lsn)| Message::Ack {
                journal_lsn,
                durable_lsn
            }),
            any::<u64>().prop_map(|upto_lsn| Message::Flush { upto_lsn }),
            (any::<u64>(), any::<u64>())
                .prop_map(|(sent_at_us, seq)| Message::Heartbeat { sent_at_us, seq }),
            (any::<u64>(), any::<u64>())
                .prop_map(|(sent_at_us, seq)| Message::HeartbeatReply { sent_at_us, seq }),
            (any::<bool>(), any::<u64>(), any::<u64>()).prop_map(
                |(full, total_bytes, target_lsn)| Message::ResyncBegin {
                    kind: if full {
                        ResyncKind::Full
                    } else {
                        ResyncKind::Delta
                    },
                    total_bytes,
                    target_lsn
                }
            ),
            (any::<u64>(), data)
                .prop_map(|(offset_bytes, data)| Message::ResyncData { offset_bytes, data }),
            (any::<u64>(), any::<u64>()).prop_map(|(offset_bytes, len_bytes)| {
                Message::ResyncZero {
                    offset_bytes,
                    len_bytes,
                }
            }),
            any::<u64>().prop_map(|written_bytes| Message::ResyncAck { written_bytes }),
            (any::<u64>(), arb_lineage())
                .prop_map(|(lsn, lineage)| Message::ResyncEnd { lsn, lineage }),
            (
                proptest::collection::vec((any::<u64>(), any::<u64>()), 0..10),
                any::<bool>()
            )
                .prop_map(|(ranges, last)| Message::DirtyRanges {
                    ranges: ranges
                        .into_iter()
                        .map(|(offset_bytes, len_bytes)| DirtyRange {
                            offset_bytes,
                            len_bytes
                        })
                        .collect(),
                    last
                }),
            arb_role().prop_map(|role| Message::RoleChange { role }),
            arb_string().prop_map(|reason| Message::Goodbye { reason }),
            arb_entry().prop_map(|entry| Message::NewGeneration { entry }),
            (
                any::<u64>(),
                proptest::collection::vec((arb_string(), proptest::option::of(any::<u64>())), 0..4)
            )
                .prop_map(|(durable_lsn, peers)| Message::Progress {
                    durable_lsn,
                    peers: peers
                        .into_iter()
                        .map(|(node, durable_lsn)| PeerProgress { node, durable_lsn })
                        .collect()
                }),
            any::<[u64; 5]>().prop_map(|n| Message::VerifyRequest {
                id: n[0],
                offset_bytes: n[1],
                len_bytes: n[2],
                block_bytes: n[3],
                at_lsn: n[4]
            }),
            (
                any::<u64>(),
                proptest::collection::vec(any::<[u8; 16]>(), 0..5)
            )
                .prop_map(|(id, digests)| Message::VerifyReply { id, digests }),
        ]
    }

    fn arb_lineage() -> impl Strategy<Value = GenerationInfo> {
        (
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec(arb_entry(), 0..4),
        )
            .prop_map(|(volume_id, head_lsn, history)| GenerationInfo {
                volume_id,
                history,
                head_lsn,
            })
    }

    proptest! {
        #[test]
        fn round_trip(messages in proptest::collection::vec(arb_message(), 1..5)) {
            let mut buf = BytesMut::new();
            for message in &messages {
                encode(message, &mut buf).unwrap();
            }
            for message in &messages {
                let decoded = decode(&mut buf).unwrap();
                prop_assert_eq!(decoded.as_ref(), Some(message));
            }
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn arbitrary_bytes_never_panic_or_over_read(bytes in proptest::collection::vec(any::<u8>(), 0..200), valid_header in any::<bool>()) {
            let mut bytes = bytes;
            if valid_header && bytes.len() >= 4 {
                // Give the payload parsers a chance: a valid magic and version.
                bytes[..3].copy_from_slice(&[0x11, 0xfe, VERSION]);
            }
            let mut buf = BytesMut::from(&bytes[..]);
            let given = buf.len();
            if let Ok(Some(_)) = decode(&mut buf) {
                prop_assert!(buf.len() < given);
            } else {
                prop_assert!(buf.len() <= given);
            }
        }

        #[test]
        fn arbitrary_payloads_with_valid_crc_never_panic(type_byte in 0u8..24, payload in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut frame = vec![0x11, 0xfe, VERSION, type_byte, 0, 0, 0, 0];
            frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            let mut crc = crc32fast::Hasher::new();
            crc.update(&frame);
            crc.update(&[0; 4]);
            crc.update(&payload);
            frame.extend_from_slice(&crc.finalize().to_le_bytes());
            frame.extend_from_slice(&payload);
            let _ = decode(&mut BytesMut::from(&frame[..]));
        }

        #[test]
        fn single_bit_flips_are_detected(message in arb_message(), bit_seed in any::<u64>()) {
            let mut frame = BytesMut::new();
            encode(&message, &mut frame).unwrap();
            let bit = (bit_seed % (frame.len() as u64 * 8)) as usize;
            frame[bit / 8] ^= 1 << (bit % 8);
            let mut buf = frame.clone();
            let result = decode(&mut buf);
            if result == Ok(None) {
                // The flip grew the length field: the bytes that follow on the stream complete
                // the frame, and the checksum catches it then.
                let declared = u32::from_le_bytes(frame[8..12].try_into().unwrap()) as usize;
                buf.resize(HEADER_BYTES + declared, 0);
                prop_assert!(decode(&mut buf).is_err());
            } else {
                prop_assert!(result.is_err(), "flipped bit {} accepted", bit);
            }
        }
    }
}
