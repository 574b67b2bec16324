//! The NBD wire protocol (fixed newstyle handshake and transmission), with no I/O in it.
//!
//! Everything here follows the NBD protocol document (`doc/proto.md` of the
//! NetworkBlockDevice/nbd repository). Encoders append to a `Vec<u8>`; decoders read from a
//! byte slice and return `Ok(None)` when the slice holds only part of a message ("need more"),
//! `Ok(Some((message, consumed_bytes)))` when it holds a whole one, and an error when the bytes
//! can never become a valid message. Decoders never read past the slice they are given and
//! never allocate more than the bounds below allow, whatever the peer sends.
//!
//! [`validate_request`] is the single place that decides which errno a transmission request
//! gets; the daemon's server only executes what it lets through.

use thiserror::Error;

// ---------------------------------------------------------------------------------------------
// Magic numbers.

/// `NBDMAGIC`, the first eight bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: follows `NBDMAGIC` in the greeting and starts every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Starts every option reply of the fixed newstyle handshake.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Starts every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Starts every simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Starts every structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// ---------------------------------------------------------------------------------------------
// Handshake flags (server, 16 bits) and client flags (32 bits).

pub const HANDSHAKE_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const HANDSHAKE_FLAG_NO_ZEROES: u16 = 1 << 1;

pub const CLIENT_FLAG_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_FLAG_NO_ZEROES: u32 = 1 << 1;

// ---------------------------------------------------------------------------------------------
// Option codes.

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
/// Withdrawn; answered as unsupported.
pub const OPT_PEEK_EXPORT: u32 = 4;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Answered as unsupported (Ferry has no metadata contexts).
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Answered as unsupported (Ferry has no metadata contexts).
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Answered as unsupported (Ferry speaks only the compact 28-byte request header).
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// ---------------------------------------------------------------------------------------------
// Option reply types. Errors have bit 31 set.

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERROR_BIT: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERROR_BIT | 1;
pub const REP_ERR_POLICY: u32 = REP_ERROR_BIT | 2;
pub const REP_ERR_INVALID: u32 = REP_ERROR_BIT | 3;
pub const REP_ERR_PLATFORM: u32 = REP_ERROR_BIT | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_ERROR_BIT | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERROR_BIT | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERROR_BIT | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERROR_BIT | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_ERROR_BIT | 9;

/// Whether an option reply type is an error (bit 31 set).
pub const fn is_rep_error(reply_type: u32) -> bool {
    reply_type & REP_ERROR_BIT != 0
}

// ---------------------------------------------------------------------------------------------
// Information types for NBD_OPT_INFO / NBD_OPT_GO.

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---------------------------------------------------------------------------------------------
// Transmission flags (16 bits, sent with the export size).

pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// ---------------------------------------------------------------------------------------------
// Command types and command flags.

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const CMD_RESIZE: u16 = 8;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// ---------------------------------------------------------------------------------------------
// Structured reply chunk types and flags. Error chunk types have bit 15 set.

pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

pub const REPLY_FLAG_DONE: u16 = 1 << 0;

// ---------------------------------------------------------------------------------------------
// Error values carried in replies. These are the protocol's numbers, not the host's errno.

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

// ---------------------------------------------------------------------------------------------
// Sizes and bounds.

/// Server greeting: NBDMAGIC, IHAVEOPT, handshake flags.
pub const SERVER_GREETING_BYTES: usize = 18;
pub const CLIENT_FLAGS_BYTES: usize = 4;
pub const OPTION_HEADER_BYTES: usize = 16;
pub const OPTION_REPLY_HEADER_BYTES: usize = 20;
/// Reply to NBD_OPT_EXPORT_NAME without the 124 reserved zero bytes.
pub const EXPORT_NAME_REPLY_BYTES: usize = 10;
pub const EXPORT_NAME_REPLY_ZEROES_BYTES: usize = 124;
pub const REQUEST_BYTES: usize = 28;
pub const SIMPLE_REPLY_BYTES: usize = 16;
pub const CHUNK_HEADER_BYTES: usize = 20;

/// Largest option payload accepted. Real options (an export name plus a few info requests)
/// are tiny; the protocol's own string limit is 4096 bytes.
pub const OPTION_DATA_BYTES_MAX: u32 = 64 * 1024;
/// Largest option reply payload a client accepts (the same reasoning, from the other side).
pub const OPTION_REPLY_DATA_BYTES_MAX: u32 = 64 * 1024;
/// The protocol's limit on any string (export names, messages).
pub const STRING_BYTES_MAX: usize = 4096;

/// Ferry's advertised block size constraints. 512 is the smallest sector any client uses,
/// and stays the minimum on devices with larger logical blocks (4Kn disks): clients that
/// connect with NBD_OPT_EXPORT_NAME, the Linux kernel client among them, never learn a larger
/// minimum, so Ferry serves sub-block requests itself rather than refusing them. 4096 (or the
/// device's logical block, when larger) matches the journal's alignment; 32 MiB is the
/// largest request the protocol document says must never be treated as a denial of service.
pub const MIN_BLOCK_BYTES: u32 = 512;
pub const PREFERRED_BLOCK_BYTES: u32 = 4096;
pub const BLOCK_BYTES_MAX: u32 = 32 * 1024 * 1024;

/// Everything that makes a byte sequence an invalid NBD message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NbdError {
    /// A message did not start with its magic number; the stream cannot be resynchronised.
    #[error("bad magic: expected {expected:#x}, found {found:#x}")]
    BadMagic { expected: u64, found: u64 },
    /// An option's data is longer than [`OPTION_DATA_BYTES_MAX`]; the server may skip it and
    /// answer `NBD_REP_ERR_TOO_BIG`.
    #[error("option {option} carries {length_bytes} bytes, more than the limit")]
    OptionTooLarge { option: u32, length_bytes: u32 },
    /// An option reply's data is longer than [`OPTION_REPLY_DATA_BYTES_MAX`].
    #[error("option reply carries {length_bytes} bytes, more than the limit")]
    OptionReplyTooLarge { length_bytes: u32 },
    /// The client set flags the server did not advertise; the protocol requires a disconnect.
    #[error("client flags {0:#x} not understood")]
    UnknownClientFlags(u32),
    /// An option's payload does not have the layout its option code requires.
    #[error("malformed option payload: {0}")]
    MalformedOption(&'static str),
    /// A reply from the server does not have the layout its type requires.
    #[error("malformed reply: {0}")]
    MalformedReply(&'static str),
    /// A string is not UTF-8, contains NUL, or is longer than [`STRING_BYTES_MAX`].
    #[error("invalid string: {0}")]
    InvalidString(&'static str),
}

/// The result type of every decoder: `Ok(None)` means "need more bytes".
pub type Decoded<T> = Result<Option<(T, usize)>, NbdError>;

// Byte readers that never panic: each returns None when the slice is too short.
fn be_u16(bytes: &[u8], at: usize) -> Option<u16> {
    let end = at.checked_add(2)?;
    let raw: [u8; 2] = bytes.get(at..end)?.try_into().ok()?;
    Some(u16::from_be_bytes(raw))
}

fn be_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let end = at.checked_add(4)?;
    let raw: [u8; 4] = bytes.get(at..end)?.try_into().ok()?;
    Some(u32::from_be_bytes(raw))
}

fn be_u64(bytes: &[u8], at: usize) -> Option<u64> {
    let end = at.checked_add(8)?;
    let raw: [u8; 8] = bytes.get(at..end)?.try_into().ok()?;
    Some(u64::from_be_bytes(raw))
}

/// Checks a protocol string: UTF-8, no NUL, at most [`STRING_BYTES_MAX`].
pub fn parse_string(bytes: &[u8]) -> Result<&str, NbdError> {
    if bytes.len() > STRING_BYTES_MAX {
        return Err(NbdError::InvalidString("longer than 4096 bytes"));
    }
    if bytes.contains(&0) {
        return Err(NbdError::InvalidString("contains NUL"));
    }
    std::str::from_utf8(bytes).map_err(|_| NbdError::InvalidString("not UTF-8"))
}

// Lengths on the wire are u32; every caller passes at most STRING_BYTES_MAX or a payload
// whose length was checked against BLOCK_BYTES_MAX, so saturating never changes a value in
// practice and keeps encoders total.
fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

// ---------------------------------------------------------------------------------------------
// Handshake.

/// S→C: the newstyle greeting.
pub fn encode_server_greeting(out: &mut Vec<u8>, handshake_flags: u16) {
    out.extend_from_slice(&NBD_MAGIC.to_be_bytes());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&handshake_flags.to_be_bytes());
}

/// Decodes the greeting; yields the handshake flags.
pub fn decode_server_greeting(bytes: &[u8]) -> Decoded<u16> {
    let (Some(magic), Some(opt_magic), Some(flags)) =
        (be_u64(bytes, 0), be_u64(bytes, 8), be_u16(bytes, 16))
    else {
        return Ok(None);
    };
    if magic != NBD_MAGIC {
        return Err(NbdError::BadMagic {
            expected: NBD_MAGIC,
            found: magic,
        });
    }
    if opt_magic != IHAVEOPT {
        return Err(NbdError::BadMagic {
            expected: IHAVEOPT,
            found: opt_magic,
        });
    }
    Ok(Some((flags, SERVER_GREETING_BYTES)))
}

/// C→S: the client flags.
pub fn encode_client_flags(out: &mut Vec<u8>, client_flags: u32) {
    out.extend_from_slice(&client_flags.to_be_bytes());
}

/// Decodes the client flags without judging them; see [`check_client_flags`].
pub fn decode_client_flags(bytes: &[u8]) -> Decoded<u32> {
    Ok(be_u32(bytes, 0).map(|flags| (flags, CLIENT_FLAGS_BYTES)))
}

/// The server must drop a client that sets a flag it does not know or did not advertise.
pub fn check_client_flags(client_flags: u32, handshake_flags: u16) -> Result<(), NbdError> {
    let mut allowed = 0;
    if handshake_flags & HANDSHAKE_FLAG_FIXED_NEWSTYLE != 0 {
        allowed |= CLIENT_FLAG_FIXED_NEWSTYLE;
    }
    if handshake_flags & HANDSHAKE_FLAG_NO_ZEROES != 0 {
        allowed |= CLIENT_FLAG_NO_ZEROES;
    }
    if client_flags & !allowed != 0 {
        return Err(NbdError::UnknownClientFlags(client_flags));
    }
    Ok(())
}

/// The fixed part of a client option; `length_bytes` of data follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length_bytes: u32,
}

/// C→S: an option with its data.
pub fn encode_option(out: &mut Vec<u8>, option: u32, data: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&len_u32(data.len()).to_be_bytes());
    out.extend_from_slice(data);
}

/// Decodes an option header. Data longer than [`OPTION_DATA_BYTES_MAX`] is a distinct error
/// carrying the option and its length, so the server can skip the data and answer
/// `NBD_REP_ERR_TOO_BIG` instead of buffering it.
pub fn decode_option_header(bytes: &[u8]) -> Decoded<OptionHeader> {
    let (Some(magic), Some(option), Some(length_bytes)) =
        (be_u64(bytes, 0), be_u32(bytes, 8), be_u32(bytes, 12))
    else {
        return Ok(None);
    };
    if magic != IHAVEOPT {
        return Err(NbdError::BadMagic {
            expected: IHAVEOPT,
            found: magic,
        });
    }
    if length_bytes > OPTION_DATA_BYTES_MAX {
        return Err(NbdError::OptionTooLarge {
            option,
            length_bytes,
        });
    }
    Ok(Some((
        OptionHeader {
            option,
            length_bytes,
        },
        OPTION_HEADER_BYTES,
    )))
}

/// The payload of NBD_OPT_INFO and NBD_OPT_GO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub export_name: String,
    /// Requested `INFO_*` types, in the client's order.
    pub info_types: Vec<u16>,
}

/// C: the payload of NBD_OPT_INFO / NBD_OPT_GO.
pub fn encode_info_request(out: &mut Vec<u8>, export_name: &str, info_types: &[u16]) {
    out.extend_from_slice(&len_u32(export_name.len()).to_be_bytes());
    out.extend_from_slice(export_name.as_bytes());
    let count = u16::try_from(info_types.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&count.to_be_bytes());
    for info in info_types.iter().take(usize::from(count)) {
        out.extend_from_slice(&info.to_be_bytes());
    }
}

/// Parses a whole NBD_OPT_INFO / NBD_OPT_GO payload (the option header gave its length, so
/// there is no "need more" here). Any error means the server answers `NBD_REP_ERR_INVALID`.
pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest, NbdError> {
    let name_len = be_u32(data, 0).ok_or(NbdError::MalformedOption("shorter than 6 bytes"))?;
    let name_len =
        usize::try_from(name_len).map_err(|_| NbdError::MalformedOption("name length"))?;
    // The name must leave room for the 16-bit request count: name_len <= data.len() - 6.
    if data.len() < 6 || name_len > data.len() - 6 {
        return Err(NbdError::MalformedOption("name length exceeds option data"));
    }
    let name = parse_string(&data[4..4 + name_len])?;
    let count_at = 4 + name_len;
    let count = be_u16(data, count_at).ok_or(NbdError::MalformedOption("missing request count"))?;
    let list = &data[count_at + 2..];
    if list.len() != usize::from(count) * 2 {
        return Err(NbdError::MalformedOption(
            "information request count does not match length",
        ));
    }
    let info_types = list
        .chunks_exact(2)
        .map(|pair| u16::from_be_bytes([pair[0], pair[1]]))
        .collect();
    Ok(InfoRequest {
        export_name: name.to_owned(),
        info_types,
    })
}

/// An option reply as a client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionReply {
    pub option: u32,
    pub reply_type: u32,
    pub data: Vec<u8>,
}

/// S→C: a generic option reply.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&len_u32(data.len()).to_be_bytes());
    out.extend_from_slice(data);
}

pub fn encode_rep_ack(out: &mut Vec<u8>, option: u32) {
    encode_option_reply(out, option, REP_ACK, &[]);
}

/// S→C: one export in the answer to NBD_OPT_LIST.
pub fn encode_rep_server(out: &mut Vec<u8>, export_name: &str) {
    let mut data = Vec::with_capacity(4 + export_name.len());
    data.extend_from_slice(&len_u32(export_name.len()).to_be_bytes());
    data.extend_from_slice(export_name.as_bytes());
    encode_option_reply(out, OPT_LIST, REP_SERVER, &data);
}

pub fn encode_rep_info_export(
    out: &mut Vec<u8>,
    option: u32,
    size_bytes: u64,
    transmission_flags: u16,
) {
    let mut data = [0u8; 12];
    data[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    data[2..10].copy_from_slice(&size_bytes.to_be_bytes());
    data[10..12].copy_from_slice(&transmission_flags.to_be_bytes());
    encode_option_reply(out, option, REP_INFO, &data);
}

pub fn encode_rep_info_name(out: &mut Vec<u8>, option: u32, export_name: &str) {
    let mut data = Vec::with_capacity(2 + export_name.len());
    data.extend_from_slice(&INFO_NAME.to_be_bytes());
    data.extend_from_slice(export_name.as_bytes());
    encode_option_reply(out, option, REP_INFO, &data);
}

pub fn encode_rep_info_block_size(out: &mut Vec<u8>, option: u32, sizes: BlockSizes) {
    let mut data = [0u8; 14];
    data[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    data[2..6].copy_from_slice(&sizes.min_bytes.to_be_bytes());
    data[6..10].copy_from_slice(&sizes.preferred_bytes.to_be_bytes());
    data[10..14].copy_from_slice(&sizes.max_bytes.to_be_bytes());
    encode_option_reply(out, option, REP_INFO, &data);
}

/// S→C: an error reply with a human-readable message (cut to the protocol's string limit).
pub fn encode_rep_error(out: &mut Vec<u8>, option: u32, reply_type: u32, message: &str) {
    debug_assert!(is_rep_error(reply_type));
    encode_option_reply(
        out,
        option,
        reply_type,
        truncate_str(message, STRING_BYTES_MAX).as_bytes(),
    );
}

// Cuts a string at a character boundary so that it stays valid UTF-8.
fn truncate_str(text: &str, max_bytes: usize) -> &str {
    if text.len() <= max_bytes {
        return text;
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Decodes an option reply (client side); data is bounded by
/// [`OPTION_REPLY_DATA_BYTES_MAX`].
pub fn decode_option_reply(bytes: &[u8]) -> Decoded<OptionReply> {
    let (Some(magic), Some(option), Some(reply_type), Some(length_bytes)) = (
        be_u64(bytes, 0),
        be_u32(bytes, 8),
        be_u32(bytes, 12),
        be_u32(bytes, 16),
    ) else {
        return Ok(None);
    };
    if magic != OPTION_REPLY_MAGIC {
        return Err(NbdError::BadMagic {
            expected: OPTION_REPLY_MAGIC,
            found: magic,
        });
    }
    if length_bytes > OPTION_REPLY_DATA_BYTES_MAX {
        return Err(NbdError::OptionReplyTooLarge { length_bytes });
    }
    // length_bytes <= 64 KiB, so the sum cannot overflow.
    let total = OPTION_REPLY_HEADER_BYTES + length_bytes as usize;
    let Some(data) = bytes.get(OPTION_REPLY_HEADER_BYTES..total) else {
        return Ok(None);
    };
    Ok(Some((
        OptionReply {
            option,
            reply_type,
            data: data.to_vec(),
        },
        total,
    )))
}

/// Block size constraints, as sent in `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    pub min_bytes: u32,
    pub preferred_bytes: u32,
    pub max_bytes: u32,
}

impl Default for BlockSizes {
    fn default() -> BlockSizes {
        BlockSizes {
            min_bytes: MIN_BLOCK_BYTES,
            preferred_bytes: PREFERRED_BLOCK_BYTES,
            max_bytes: BLOCK_BYTES_MAX,
        }
    }
}

/// The payload of an `NBD_REP_INFO` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    Export {
        size_bytes: u64,
        transmission_flags: u16,
    },
    Name(String),
    Description(String),
    BlockSize(BlockSizes),
    /// An information type this code does not know; clients must ignore it.
    Unknown(u16),
}

/// Parses the data of an `NBD_REP_INFO` reply.
pub fn parse_info(data: &[u8]) -> Result<Info, NbdError> {
    let info_type = be_u16(data, 0).ok_or(NbdError::MalformedReply("info shorter than 2 bytes"))?;
    let rest = &data[2..];
    match info_type {
        INFO_EXPORT => {
            if rest.len() != 10 {
                return Err(NbdError::MalformedReply("INFO_EXPORT length is not 12"));
            }
            let size_bytes = be_u64(rest, 0).ok_or(NbdError::MalformedReply("INFO_EXPORT"))?;
            let transmission_flags =
                be_u16(rest, 8).ok_or(NbdError::MalformedReply("INFO_EXPORT"))?;
            Ok(Info::Export {
                size_bytes,
                transmission_flags,
            })
        }
        INFO_NAME => Ok(Info::Name(parse_string(rest)?.to_owned())),
        INFO_DESCRIPTION => Ok(Info::Description(parse_string(rest)?.to_owned())),
        INFO_BLOCK_SIZE => {
            if rest.len() != 12 {
                return Err(NbdError::MalformedReply("INFO_BLOCK_SIZE length is not 14"));
            }
            let (Some(min_bytes), Some(preferred_bytes), Some(max_bytes)) =
                (be_u32(rest, 0), be_u32(rest, 4), be_u32(rest, 8))
            else {
                return Err(NbdError::MalformedReply("INFO_BLOCK_SIZE"));
            };
            Ok(Info::BlockSize(BlockSizes {
                min_bytes,
                preferred_bytes,
                max_bytes,
            }))
        }
        other => Ok(Info::Unknown(other)),
    }
}

/// Parses the data of an `NBD_REP_SERVER` reply into the export name.
pub fn parse_rep_server(data: &[u8]) -> Result<String, NbdError> {
    let name_len =
        be_u32(data, 0).ok_or(NbdError::MalformedReply("REP_SERVER shorter than 4 bytes"))?;
    let name_len = usize::try_from(name_len)
        .map_err(|_| NbdError::MalformedReply("REP_SERVER name length"))?;
    let name =
        data.get(4..)
            .and_then(|rest| rest.get(..name_len))
            .ok_or(NbdError::MalformedReply(
                "REP_SERVER name longer than the reply",
            ))?;
    Ok(parse_string(name)?.to_owned())
}

/// S→C: the answer to NBD_OPT_EXPORT_NAME. The 124 reserved zero bytes are left out when the
/// client negotiated NO_ZEROES.
pub fn encode_export_name_reply(
    out: &mut Vec<u8>,
    size_bytes: u64,
    transmission_flags: u16,
    no_zeroes: bool,
) {
    out.extend_from_slice(&size_bytes.to_be_bytes());
    out.extend_from_slice(&transmission_flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; EXPORT_NAME_REPLY_ZEROES_BYTES]);
    }
}

/// Decodes the answer to NBD_OPT_EXPORT_NAME into (size, transmission flags).
pub fn decode_export_name_reply(bytes: &[u8], no_zeroes: bool) -> Decoded<(u64, u16)> {
    let total = if no_zeroes {
        EXPORT_NAME_REPLY_BYTES
    } else {
        EXPORT_NAME_REPLY_BYTES + EXPORT_NAME_REPLY_ZEROES_BYTES
    };
    if bytes.len() < total {
        return Ok(None);
    }
    let (Some(size_bytes), Some(flags)) = (be_u64(bytes, 0), be_u16(bytes, 8)) else {
        return Ok(None);
    };
    Ok(Some(((size_bytes, flags), total)))
}

// ---------------------------------------------------------------------------------------------
// Transmission.

/// A request's command type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    Resize,
    /// A type this code does not know; answered with EINVAL.
    Unknown(u16),
}

impl Command {
    pub fn from_u16(value: u16) -> Command {
        match value {
            CMD_READ => Command::Read,
            CMD_WRITE => Command::Write,
            CMD_DISC => Command::Disc,
            CMD_FLUSH => Command::Flush,
            CMD_TRIM => Command::Trim,
            CMD_CACHE => Command::Cache,
            CMD_WRITE_ZEROES => Command::WriteZeroes,
            CMD_BLOCK_STATUS => Command::BlockStatus,
            CMD_RESIZE => Command::Resize,
            other => Command::Unknown(other),
        }
    }

    pub fn to_u16(self) -> u16 {
        match self {
            Command::Read => CMD_READ,
            Command::Write => CMD_WRITE,
            Command::Disc => CMD_DISC,
            Command::Flush => CMD_FLUSH,
            Command::Trim => CMD_TRIM,
            Command::Cache => CMD_CACHE,
            Command::WriteZeroes => CMD_WRITE_ZEROES,
            Command::BlockStatus => CMD_BLOCK_STATUS,
            Command::Resize => CMD_RESIZE,
            Command::Unknown(other) => other,
        }
    }

    /// The operation name used in metrics and logs.
    pub fn op_name(self) -> &'static str {
        match self {
            Command::Read => "read",
            Command::Write => "write",
            Command::Disc => "disc",
            Command::Flush => "flush",
            Command::Trim => "trim",
            Command::Cache => "cache",
            Command::WriteZeroes => "write_zeroes",
            Command::BlockStatus => "block_status",
            Command::Resize | Command::Unknown(_) => "unknown",
        }
    }
}

/// A transmission request header. A WRITE is followed by `length_bytes` of payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: Command,
    pub cookie: u64,
    pub offset: u64,
    pub length_bytes: u32,
}

pub fn encode_request(out: &mut Vec<u8>, request: &Request) {
    out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out.extend_from_slice(&request.flags.to_be_bytes());
    out.extend_from_slice(&request.kind.to_u16().to_be_bytes());
    out.extend_from_slice(&request.cookie.to_be_bytes());
    out.extend_from_slice(&request.offset.to_be_bytes());
    out.extend_from_slice(&request.length_bytes.to_be_bytes());
}

/// Decodes a request header. A bad magic means the stream is out of step and the connection
/// must be dropped.
pub fn decode_request(bytes: &[u8]) -> Decoded<Request> {
    let Some(magic) = be_u32(bytes, 0) else {
        return Ok(None);
    };
    if magic != REQUEST_MAGIC {
        return Err(NbdError::BadMagic {
            expected: u64::from(REQUEST_MAGIC),
            found: u64::from(magic),
        });
    }
    let (Some(flags), Some(kind), Some(cookie), Some(offset), Some(length_bytes)) = (
        be_u16(bytes, 4),
        be_u16(bytes, 6),
        be_u64(bytes, 8),
        be_u64(bytes, 16),
        be_u32(bytes, 24),
    ) else {
        return Ok(None);
    };
    Ok(Some((
        Request {
            flags,
            kind: Command::from_u16(kind),
            cookie,
            offset,
            length_bytes,
        },
        REQUEST_BYTES,
    )))
}

/// A simple reply header; a successful READ's data follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub cookie: u64,
}

pub fn encode_simple_reply(out: &mut Vec<u8>, error: u32, cookie: u64) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// Decodes a simple reply header (client side, when only simple replies were negotiated).
pub fn decode_simple_reply(bytes: &[u8]) -> Decoded<SimpleReply> {
    let (Some(magic), Some(error), Some(cookie)) =
        (be_u32(bytes, 0), be_u32(bytes, 4), be_u64(bytes, 8))
    else {
        return Ok(None);
    };
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(NbdError::BadMagic {
            expected: u64::from(SIMPLE_REPLY_MAGIC),
            found: u64::from(magic),
        });
    }
    Ok(Some((SimpleReply { error, cookie }, SIMPLE_REPLY_BYTES)))
}

/// A structured reply chunk header; `length_bytes` of payload follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub length_bytes: u32,
}

pub fn encode_chunk_header(out: &mut Vec<u8>, header: &ChunkHeader) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&header.flags.to_be_bytes());
    out.extend_from_slice(&header.kind.to_be_bytes());
    out.extend_from_slice(&header.cookie.to_be_bytes());
    out.extend_from_slice(&header.length_bytes.to_be_bytes());
}

/// Decodes a chunk header only; the caller reads the payload (whose size it must bound by
/// what it asked for) and parses it with [`parse_chunk_payload`].
pub fn decode_chunk_header(bytes: &[u8]) -> Decoded<ChunkHeader> {
    let (Some(magic), Some(flags), Some(kind), Some(cookie), Some(length_bytes)) = (
        be_u32(bytes, 0),
        be_u16(bytes, 4),
        be_u16(bytes, 6),
        be_u64(bytes, 8),
        be_u32(bytes, 16),
    ) else {
        return Ok(None);
    };
    if magic != STRUCTURED_REPLY_MAGIC {
        return Err(NbdError::BadMagic {
            expected: u64::from(STRUCTURED_REPLY_MAGIC),
            found: u64::from(magic),
        });
    }
    Ok(Some((
        ChunkHeader {
            flags,
            kind,
            cookie,
            length_bytes,
        },
        CHUNK_HEADER_BYTES,
    )))
}

/// Writes the header and the 8-byte offset of an OFFSET_DATA chunk; the caller sends the
/// `data_len_bytes` of data right after (so large reads go out without a copy). Fails when
/// the data cannot fit the chunk's 32-bit length.
pub fn encode_chunk_offset_data_prefix(
    out: &mut Vec<u8>,
    cookie: u64,
    offset: u64,
    data_len_bytes: usize,
    done: bool,
) -> Result<(), NbdError> {
    let length_bytes = u32::try_from(data_len_bytes)
        .ok()
        .and_then(|len| len.checked_add(8))
        .ok_or(NbdError::MalformedReply(
            "OFFSET_DATA chunk longer than 2^32 - 8 bytes",
        ))?;
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    encode_chunk_header(
        out,
        &ChunkHeader {
            flags,
            kind: REPLY_TYPE_OFFSET_DATA,
            cookie,
            length_bytes,
        },
    );
    out.extend_from_slice(&offset.to_be_bytes());
    Ok(())
}

/// A whole OFFSET_DATA chunk (header, offset, data).
pub fn encode_chunk_offset_data(
    out: &mut Vec<u8>,
    cookie: u64,
    offset: u64,
    data: &[u8],
    done: bool,
) -> Result<(), NbdError> {
    encode_chunk_offset_data_prefix(out, cookie, offset, data.len(), done)?;
    out.extend_from_slice(data);
    Ok(())
}

pub fn encode_chunk_offset_hole(
    out: &mut Vec<u8>,
    cookie: u64,
    offset: u64,
    hole_bytes: u32,
    done: bool,
) {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    encode_chunk_header(
        out,
        &ChunkHeader {
            flags,
            kind: REPLY_TYPE_OFFSET_HOLE,
            cookie,
            length_bytes: 12,
        },
    );
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&hole_bytes.to_be_bytes());
}

/// An ERROR chunk; it is always the final chunk of a Ferry reply, so DONE is set.
pub fn encode_chunk_error(out: &mut Vec<u8>, cookie: u64, error: u32, message: &str) {
    let message = truncate_str(message, STRING_BYTES_MAX);
    let message_len = u16::try_from(message.len()).expect("truncated to STRING_BYTES_MAX");
    let length_bytes = 6 + u32::from(message_len);
    encode_chunk_header(
        out,
        &ChunkHeader {
            flags: REPLY_FLAG_DONE,
            kind: REPLY_TYPE_ERROR,
            cookie,
            length_bytes,
        },
    );
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&message_len.to_be_bytes());
    out.extend_from_slice(message.as_bytes());
}

/// The NONE chunk that ends a reply; DONE is mandatory for it.
pub fn encode_chunk_none(out: &mut Vec<u8>, cookie: u64) {
    encode_chunk_header(
        out,
        &ChunkHeader {
            flags: REPLY_FLAG_DONE,
            kind: REPLY_TYPE_NONE,
            cookie,
            length_bytes: 0,
        },
    );
}

/// A parsed chunk payload; data borrows from the caller's buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkPayload<'a> {
    None,
    OffsetData {
        offset: u64,
        data: &'a [u8],
    },
    OffsetHole {
        offset: u64,
        hole_bytes: u32,
    },
    Error {
        error: u32,
        message: &'a str,
    },
    ErrorOffset {
        error: u32,
        message: &'a str,
        offset: u64,
    },
    /// Any other type. One with bit 15 set is still an error for its request.
    Unknown {
        kind: u16,
    },
}

/// Parses a chunk payload of the given type, checking the length rules of each type.
pub fn parse_chunk_payload(kind: u16, payload: &[u8]) -> Result<ChunkPayload<'_>, NbdError> {
    match kind {
        REPLY_TYPE_NONE if payload.is_empty() => Ok(ChunkPayload::None),
        REPLY_TYPE_NONE => Err(NbdError::MalformedReply("NONE chunk with a payload")),
        REPLY_TYPE_OFFSET_DATA => {
            let offset = be_u64(payload, 0)
                .ok_or(NbdError::MalformedReply("OFFSET_DATA shorter than 9 bytes"))?;
            let data = &payload[8..];
            if data.is_empty() {
                return Err(NbdError::MalformedReply("OFFSET_DATA shorter than 9 bytes"));
            }
            Ok(ChunkPayload::OffsetData { offset, data })
        }
        REPLY_TYPE_OFFSET_HOLE => {
            if payload.len() != 12 {
                return Err(NbdError::MalformedReply("OFFSET_HOLE length is not 12"));
            }
            let (Some(offset), Some(hole_bytes)) = (be_u64(payload, 0), be_u32(payload, 8)) else {
                return Err(NbdError::MalformedReply("OFFSET_HOLE"));
            };
            if hole_bytes == 0 {
                return Err(NbdError::MalformedReply("OFFSET_HOLE of zero bytes"));
            }
            Ok(ChunkPayload::OffsetHole { offset, hole_bytes })
        }
        REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
            let (Some(error), Some(message_len)) = (be_u32(payload, 0), be_u16(payload, 4)) else {
                return Err(NbdError::MalformedReply("error chunk shorter than 6 bytes"));
            };
            let message_end = 6 + usize::from(message_len);
            let message = payload
                .get(6..message_end)
                .ok_or(NbdError::MalformedReply("error message longer than chunk"))?;
            let message = parse_string(message)?;
            if kind == REPLY_TYPE_ERROR {
                return Ok(ChunkPayload::Error { error, message });
            }
            if payload.len() != message_end + 8 {
                return Err(NbdError::MalformedReply("ERROR_OFFSET length"));
            }
            let offset = be_u64(payload, message_end)
                .ok_or(NbdError::MalformedReply("ERROR_OFFSET offset"))?;
            Ok(ChunkPayload::ErrorOffset {
                error,
                message,
                offset,
            })
        }
        other => Ok(ChunkPayload::Unknown { kind: other }),
    }
}

// ---------------------------------------------------------------------------------------------
// Request validation.

/// What the server knows about the export and the connection when judging a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    pub size_bytes: u64,
    pub read_only: bool,
    pub min_block_bytes: u32,
    pub max_block_bytes: u32,
    pub structured_replies: bool,
}

/// Why a request is not executed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Reply with this error. For a WRITE the server must first read and discard its payload
    /// (its length is at most the maximum block size, or the verdict would be `Disconnect`).
    Errno(u32),
    /// A WRITE whose payload is too large to consume: the protocol allows only a hard
    /// disconnect, since the stream cannot be kept in step otherwise.
    Disconnect,
}

/// The command flags valid for each command. FUA is valid on every command (the document
/// says the server must accept it when SEND_FUA is advertised, which Ferry always does).
fn allowed_flags(kind: Command, structured_replies: bool) -> u16 {
    match kind {
        // DF only makes sense with structured replies, and SEND_DF is advertised only then.
        Command::Read if structured_replies => CMD_FLAG_FUA | CMD_FLAG_DF,
        Command::WriteZeroes => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        _ => CMD_FLAG_FUA,
    }
}

/// Decides a request's fate, following the protocol document's "Error values" and "Block size
/// constraints" sections. `Ok(())` means execute it (a zero-length request is valid and is a
/// no-op). DISC is always `Ok`: it has no reply.
pub fn validate_request(request: &Request, limits: &RequestLimits) -> Result<(), Rejection> {
    let kind = request.kind;
    let length_bytes = request.length_bytes;
    match kind {
        Command::Disc => return Ok(()),
        // No metadata context can be negotiated and RESIZE is not advertised, so these are
        // unknown commands as far as this connection goes.
        Command::BlockStatus | Command::Resize | Command::Unknown(_) => {
            return Err(Rejection::Errno(EINVAL))
        }
        _ => {}
    }
    // Checked first: whatever else is wrong with such a WRITE, its payload cannot be skipped.
    if kind == Command::Write && length_bytes > limits.max_block_bytes {
        return Err(Rejection::Disconnect);
    }
    if request.flags & !allowed_flags(kind, limits.structured_replies) != 0 {
        return Err(Rejection::Errno(EINVAL));
    }
    if kind == Command::Flush {
        // Offset and length are reserved and must be zero.
        if request.offset != 0 || length_bytes != 0 {
            return Err(Rejection::Errno(EINVAL));
        }
        return Ok(());
    }
    let writes = matches!(kind, Command::Write | Command::Trim | Command::WriteZeroes);
    if writes && limits.read_only {
        return Err(Rejection::Errno(EPERM));
    }
    let min_block_bytes = u64::from(limits.min_block_bytes.max(1));
    if !request.offset.is_multiple_of(min_block_bytes)
        || !u64::from(length_bytes).is_multiple_of(min_block_bytes)
    {
        return Err(Rejection::Errno(EINVAL));
    }
    // The maximum block size binds the commands with a payload (READ, WRITE) and CACHE.
    // TRIM and WRITE_ZEROES carry none, and the protocol lets a server take them larger; the
    // Linux client sends WRITE_ZEROES of up to 4 GiB without FAST_ZERO, and refusing them
    // would turn BLKZEROOUT on /dev/nbdX into an I/O error.
    let bounded_by_max = matches!(kind, Command::Read | Command::Write | Command::Cache);
    if bounded_by_max && length_bytes > limits.max_block_bytes {
        return Err(Rejection::Errno(EINVAL));
    }
    let end = request.offset.checked_add(u64::from(length_bytes));
    if end.is_none_or(|end| end > limits.size_bytes) {
        // Writing past the end is "no space"; reading, trimming or caching past it is invalid.
        let errno = if matches!(kind, Command::Write | Command::WriteZeroes) {
            ENOSPC
        } else {
            EINVAL
        };
        return Err(Rejection::Errno(errno));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn unhex(text: &str) -> Vec<u8> {
        let digits: Vec<u8> = text.bytes().filter(|b| b.is_ascii_hexdigit()).collect();
        digits
            .chunks(2)
            .map(|pair| {
                u8::from_str_radix(std::str::from_utf8(pair).expect("ascii"), 16)
                    .expect("hex digit")
            })
            .collect()
    }

    /// Encoder direction: the bytes an encoder produces must equal `expected` (spaces and line
    /// breaks in `expected` are for reading only).
    fn check_encode(encode: impl FnOnce(&mut Vec<u8>), expected: &str) {
        let mut out = Vec::new();
        encode(&mut out);
        assert_eq!(hex(&out), hex(&unhex(expected)));
    }

    /// Decoder direction: decoding `input` yields `expected` and consumes all of it, and every
    /// strict prefix of `input` is "need more".
    fn check_decode<T: PartialEq + std::fmt::Debug>(
        decode: impl Fn(&[u8]) -> Decoded<T>,
        input: &str,
        expected: T,
    ) {
        let bytes = unhex(input);
        for cut in 0..bytes.len() {
            assert_eq!(decode(&bytes[..cut]), Ok(None), "prefix of {cut} bytes");
        }
        let mut longer = bytes.clone();
        longer.extend_from_slice(&[0xee; 3]);
        assert_eq!(decode(&longer), Ok(Some((expected, bytes.len()))));
    }

    fn limits() -> RequestLimits {
        RequestLimits {
            size_bytes: 1 << 30,
            read_only: false,
            min_block_bytes: MIN_BLOCK_BYTES,
            max_block_bytes: BLOCK_BYTES_MAX,
            structured_replies: false,
        }
    }

    /// Validation direction: one table row per case.
    fn check_validate(
        kind: Command,
        flags: u16,
        offset: u64,
        length_bytes: u32,
        limits: RequestLimits,
        expected: Result<(), Rejection>,
    ) {
        let request = Request {
            flags,
            kind,
            cookie: 1,
            offset,
            length_bytes,
        };
        assert_eq!(validate_request(&request, &limits), expected, "{request:?}");
    }

    #[test]
    fn server_greeting() {
        check_encode(
            |out| {
                encode_server_greeting(
                    out,
                    HANDSHAKE_FLAG_FIXED_NEWSTYLE | HANDSHAKE_FLAG_NO_ZEROES,
                )
            },
            "4e42444d41474943 49484156454f5054 0003",
        );
        check_decode(
            decode_server_greeting,
            "4e42444d41474943 49484156454f5054 0003",
            3,
        );
        assert!(matches!(
            decode_server_greeting(&unhex("4e42444d41474944 49484156454f5054 0003")),
            Err(NbdError::BadMagic { .. })
        ));
    }

    #[test]
    fn client_flags() {
        check_encode(
            |out| encode_client_flags(out, CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES),
            "00000003",
        );
        check_decode(decode_client_flags, "00000003", 3);
        assert_eq!(check_client_flags(3, 3), Ok(()));
        assert_eq!(
            check_client_flags(2, 1),
            Err(NbdError::UnknownClientFlags(2))
        );
        assert_eq!(
            check_client_flags(4, 3),
            Err(NbdError::UnknownClientFlags(4))
        );
    }

    #[test]
    fn option_header() {
        check_encode(
            |out| encode_option(out, OPT_GO, b"ab"),
            "49484156454f5054 00000007 00000002 6162",
        );
        check_decode(
            decode_option_header,
            "49484156454f5054 00000007 00000002",
            OptionHeader {
                option: OPT_GO,
                length_bytes: 2,
            },
        );
        assert_eq!(
            decode_option_header(&unhex("49484156454f5054 00000007 00010001")),
            Err(NbdError::OptionTooLarge {
                option: 7,
                length_bytes: 0x10001
            })
        );
        check_decode(
            decode_option_header,
            "49484156454f5054 00000003 00010000",
            OptionHeader {
                option: OPT_LIST,
                length_bytes: 0x10000,
            },
        );
        assert!(matches!(
            decode_option_header(&unhex("0000000000000000 00000007 00000000")),
            Err(NbdError::BadMagic { .. })
        ));
    }

    #[test]
    fn info_request() {
        check_encode(
            |out| encode_info_request(out, "vol", &[INFO_BLOCK_SIZE, INFO_NAME]),
            "00000003 766f6c 0002 0003 0001",
        );
        assert_eq!(
            parse_info_request(&unhex("00000003 766f6c 0002 0003 0001")),
            Ok(InfoRequest {
                export_name: "vol".into(),
                info_types: vec![3, 1]
            })
        );
        assert_eq!(
            parse_info_request(&unhex("00000000 0000")),
            Ok(InfoRequest {
                export_name: String::new(),
                info_types: vec![]
            })
        );
        for bad in [
            "",                          // nothing
            "00000000 00",               // no room for the count
            "00000004 766f6c 0000",      // name runs into the count
            "ffffffff 0000",             // absurd name length
            "00000003 766f6c 0002 0003", // fewer requests than counted
            "00000003 766f6c 0000 0003", // trailing bytes
            "00000002 ff00 0000",        // not UTF-8
            "00000002 6100 0000",        // NUL
        ] {
            assert!(parse_info_request(&unhex(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn option_replies() {
        check_encode(
            |out| encode_rep_ack(out, OPT_GO),
            "0003e889045565a9 00000007 00000001 00000000",
        );
        check_encode(
            |out| encode_rep_server(out, "vol"),
            "0003e889045565a9 00000003 00000002 00000007 00000003 766f6c",
        );
        check_encode(
            |out| encode_rep_info_export(out, OPT_GO, 0x1_0000_0000, 0x0d6d),
            "0003e889045565a9 00000007 00000003 0000000c 0000 0000000100000000 0d6d",
        );
        check_encode(
            |out| encode_rep_info_name(out, OPT_INFO, "vol"),
            "0003e889045565a9 00000006 00000003 00000005 0001 766f6c",
        );
        check_encode(
            |out| encode_rep_info_block_size(out, OPT_GO, BlockSizes::default()),
            "0003e889045565a9 00000007 00000003 0000000e 0003 00000200 00001000 02000000",
        );
        check_encode(
            |out| encode_rep_error(out, OPT_GO, REP_ERR_UNKNOWN, "no"),
            "0003e889045565a9 00000007 80000006 00000002 6e6f",
        );
        check_decode(
            decode_option_reply,
            "0003e889045565a9 00000007 80000006 00000002 6e6f",
            OptionReply {
                option: OPT_GO,
                reply_type: REP_ERR_UNKNOWN,
                data: b"no".to_vec(),
            },
        );
        assert_eq!(
            decode_option_reply(&unhex("0003e889045565a9 00000007 80000006 00010001")),
            Err(NbdError::OptionReplyTooLarge {
                length_bytes: 0x10001
            })
        );
        assert_eq!(
            parse_info(&unhex("0000 0000000100000000 0d6d")),
            Ok(Info::Export {
                size_bytes: 1 << 32,
                transmission_flags: 0x0d6d
            })
        );
        assert_eq!(
            parse_info(&unhex("0001 766f6c")),
            Ok(Info::Name("vol".into()))
        );
        assert_eq!(
            parse_info(&unhex("0002 6869")),
            Ok(Info::Description("hi".into()))
        );
        assert_eq!(
            parse_info(&unhex("0003 00000200 00001000 02000000")),
            Ok(Info::BlockSize(BlockSizes::default()))
        );
        assert_eq!(parse_info(&unhex("0009 00")), Ok(Info::Unknown(9)));
        assert!(parse_info(&unhex("0000 00")).is_err());
        assert!(parse_info(&unhex("0003 00000200")).is_err());
        assert_eq!(
            parse_rep_server(&unhex("00000003 766f6c")),
            Ok("vol".into())
        );
        assert!(parse_rep_server(&unhex("00000004 766f6c")).is_err());
    }

    #[test]
    fn export_name_reply() {
        let zeroes = "00".repeat(124);
        check_encode(
            |out| encode_export_name_reply(out, 4096, 0x0003, true),
            "0000000000001000 0003",
        );
        check_encode(
            |out| encode_export_name_reply(out, 4096, 0x0003, false),
            &format!("0000000000001000 0003 {zeroes}"),
        );
        check_decode(
            |bytes| decode_export_name_reply(bytes, true),
            "0000000000001000 0003",
            (4096, 3),
        );
        check_decode(
            |bytes| decode_export_name_reply(bytes, false),
            &format!("0000000000001000 0003 {zeroes}"),
            (4096, 3),
        );
    }

    #[test]
    fn request() {
        let request = Request {
            flags: CMD_FLAG_FUA,
            kind: Command::Write,
            cookie: 0x0102030405060708,
            offset: 0x1000,
            length_bytes: 0x200,
        };
        let wire = "25609513 0001 0001 0102030405060708 0000000000001000 00000200";
        check_encode(|out| encode_request(out, &request), wire);
        check_decode(decode_request, wire, request);
        check_decode(
            decode_request,
            "25609513 0000 00ff 0000000000000001 0000000000000000 00000000",
            Request {
                flags: 0,
                kind: Command::Unknown(0xff),
                cookie: 1,
                offset: 0,
                length_bytes: 0,
            },
        );
        assert!(matches!(
            decode_request(&unhex("25609514")),
            Err(NbdError::BadMagic { .. })
        ));
        for value in 0..=20u16 {
            assert_eq!(Command::from_u16(value).to_u16(), value);
        }
    }

    #[test]
    fn simple_reply() {
        check_encode(
            |out| encode_simple_reply(out, EINVAL, 7),
            "67446698 00000016 0000000000000007",
        );
        check_decode(
            decode_simple_reply,
            "67446698 00000016 0000000000000007",
            SimpleReply {
                error: EINVAL,
                cookie: 7,
            },
        );
        assert!(matches!(
            decode_simple_reply(&unhex("668e33ef 00000000 0000000000000007")),
            Err(NbdError::BadMagic { .. })
        ));
    }

    #[test]
    fn structured_chunks() {
        check_encode(
            |out| encode_chunk_offset_data(out, 7, 0x200, b"ab", true).expect("fits"),
            "668e33ef 0001 0001 0000000000000007 0000000a 0000000000000200 6162",
        );
        check_encode(
            |out| encode_chunk_offset_hole(out, 7, 0x200, 0x1000, false),
            "668e33ef 0000 0002 0000000000000007 0000000c 0000000000000200 00001000",
        );
        check_encode(
            |out| encode_chunk_error(out, 7, ENOSPC, "full"),
            "668e33ef 0001 8001 0000000000000007 0000000a 0000001c 0004 66756c6c",
        );
        check_encode(
            |out| encode_chunk_none(out, 7),
            "668e33ef 0001 0000 0000000000000007 00000000",
        );
        check_decode(
            decode_chunk_header,
            "668e33ef 0001 8001 0000000000000007 0000000a",
            ChunkHeader {
                flags: REPLY_FLAG_DONE,
                kind: REPLY_TYPE_ERROR,
                cookie: 7,
                length_bytes: 10,
            },
        );
        assert_eq!(
            parse_chunk_payload(REPLY_TYPE_NONE, &[]),
            Ok(ChunkPayload::None)
        );
        assert_eq!(
            parse_chunk_payload(REPLY_TYPE_OFFSET_DATA, &unhex("0000000000000200 6162")),
            Ok(ChunkPayload::OffsetData {
                offset: 0x200,
                data: b"ab"
            })
        );
        assert_eq!(
            parse_chunk_payload(REPLY_TYPE_OFFSET_HOLE, &unhex("0000000000000200 00001000")),
            Ok(ChunkPayload::OffsetHole {
                offset: 0x200,
                hole_bytes: 0x1000
            })
        );
        assert_eq!(
            parse_chunk_payload(REPLY_TYPE_ERROR, &unhex("0000001c 0004 66756c6c")),
            Ok(ChunkPayload::Error {
                error: ENOSPC,
                message: "full"
            })
        );
        assert_eq!(
            parse_chunk_payload(
                REPLY_TYPE_ERROR_OFFSET,
                &unhex("00000005 0000 0000000000000200")
            ),
            Ok(ChunkPayload::ErrorOffset {
                error: EIO,
                message: "",
                offset: 0x200
            })
        );
        assert!(parse_chunk_payload(REPLY_TYPE_NONE, &[0]).is_err());
        assert!(parse_chunk_payload(REPLY_TYPE_OFFSET_DATA, &[0; 8]).is_err());
        assert!(parse_chunk_payload(REPLY_TYPE_OFFSET_HOLE, &[0; 12]).is_err());
        assert!(parse_chunk_payload(REPLY_TYPE_ERROR, &unhex("0000001c 0005 66756c6c")).is_err());
    }

    #[test]
    fn long_messages_are_cut_at_a_character_boundary() {
        let message = "é".repeat(3000); // 6000 bytes
        let mut out = Vec::new();
        encode_chunk_error(&mut out, 1, EIO, &message);
        let (header, used) = decode_chunk_header(&out).expect("valid").expect("whole");
        let payload = &out[used..];
        assert_eq!(payload.len(), header.length_bytes as usize);
        let ChunkPayload::Error { message, .. } =
            parse_chunk_payload(header.kind, payload).expect("valid")
        else {
            panic!("not an error chunk");
        };
        assert_eq!(message.len(), 4096);
    }

    #[test]
    fn validation_follows_the_protocol_document() {
        let ro = RequestLimits {
            read_only: true,
            ..limits()
        };
        let structured = RequestLimits {
            structured_replies: true,
            ..limits()
        };
        let size = limits().size_bytes;
        let max = BLOCK_BYTES_MAX;
        use Command::*;
        type Case = (Command, u16, u64, u32, RequestLimits, Result<(), Rejection>);
        let cases: &[Case] = &[
            (Read, 0, 0, 4096, limits(), Ok(())),
            (Write, CMD_FLAG_FUA, 4096, 4096, limits(), Ok(())),
            (Flush, 0, 0, 0, limits(), Ok(())),
            (Flush, CMD_FLAG_FUA, 0, 0, limits(), Ok(())),
            (Trim, CMD_FLAG_FUA, 0, 1 << 30, limits(), Ok(())),
            (
                WriteZeroes,
                CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO | CMD_FLAG_FUA,
                0,
                4096,
                limits(),
                Ok(()),
            ),
            (Disc, 0xffff, 1, 1, limits(), Ok(())),
            (Cache, 0, 0, 4096, limits(), Ok(())),
            // Zero-length requests are valid no-ops, also right at the end.
            (Read, 0, size, 0, limits(), Ok(())),
            (Write, 0, 0, 0, limits(), Ok(())),
            // Unknown commands and flags.
            (
                Unknown(99),
                0,
                0,
                0,
                limits(),
                Err(Rejection::Errno(EINVAL)),
            ),
            (
                BlockStatus,
                0,
                0,
                512,
                structured,
                Err(Rejection::Errno(EINVAL)),
            ),
            (Resize, 0, 0, 0, limits(), Err(Rejection::Errno(EINVAL))),
            (
                Read,
                1 << 9,
                0,
                512,
                limits(),
                Err(Rejection::Errno(EINVAL)),
            ),
            (
                Write,
                CMD_FLAG_NO_HOLE,
                0,
                512,
                limits(),
                Err(Rejection::Errno(EINVAL)),
            ),
            (
                Read,
                CMD_FLAG_DF,
                0,
                512,
                limits(),
                Err(Rejection::Errno(EINVAL)),
            ),
            (Read, CMD_FLAG_DF, 0, 512, structured, Ok(())),
            (
                Trim,
                CMD_FLAG_FAST_ZERO,
                0,
                512,
                limits(),
                Err(Rejection::Errno(EINVAL)),
            ),
            (
                WriteZeroes,
                CMD_FLAG_REQ_ONE,
                0,
                512,
                limits(),
                Err(Rejection::Errno(EINVAL)),
            ),
            (Flush, 0, 512, 0, limits(), Err(Rejection::Errno(EINVAL))),
            (Flush, 0, 0, 512, limits(), Err(Rejection::Errno(EINVAL))),
            // Past the end.
            (
                Read,
                0,
                size - 512,
                1024,
                limits(),
                Err(Rejection::Errno(EINVAL)),
            ),
            (Trim, 0, size, 512, limits(), Err(Rejection::Errno(EINVAL))),
            (Cache, 0, size, 512, limits(), Err(Rejection::Errno(EINVAL))),
            (
                Write,
                0,
                size - 512,
                1024,
                limits(),
                Err(Rejection::Errno(ENOSPC)),
            ),
            (
                WriteZeroes,
                0,
                size,
                512,
                limits(),
                Err(Rejection::Errno(ENOSPC)),
            ),
            (
                Read,
                0,
                u64::MAX - 511,
                1024,
                limits(),
                Err(Rejection::Errno(EINVAL)),
            ),
            (
                Write,
                0,
                u64::MAX - 511,
                1024,
                limits(),
                Err(Rejection::Errno(ENOSPC)),
            ),
            // Misaligned to the minimum block size.
            (Read, 0, 1, 512, limits(), Err(Rejection::Errno(EINVAL))),
            (Write, 0, 0, 100, limits(), Err(Rejection::Errno(EINVAL))),
            (Trim, 0, 256, 512, limits(), Err(Rejection::Errno(EINVAL))),
            // Over the maximum block size.
            (
                Read,
                0,
                0,
                max + 512,
                limits(),
                Err(Rejection::Errno(EINVAL)),
            ),
            (Read, 0, 0, max, limits(), Ok(())),
            (Write, 0, 0, max, limits(), Ok(())),
            (Write, 0, 0, max + 512, limits(), Err(Rejection::Disconnect)),
            (Write, 0xffff, 1, u32::MAX, ro, Err(Rejection::Disconnect)),
            (WriteZeroes, 0, 0, max + 512, limits(), Ok(())),
            (
                WriteZeroes,
                CMD_FLAG_FAST_ZERO,
                0,
                max + 512,
                limits(),
                Ok(()),
            ),
            (
                WriteZeroes,
                CMD_FLAG_NO_HOLE,
                0,
                u32::MAX - 511,
                RequestLimits {
                    size_bytes: 1 << 40,
                    ..limits()
                },
                Ok(()),
            ),
            (Trim, 0, 0, max + 512, limits(), Ok(())),
            // Read-only export.
            (Write, 0, 0, 512, ro, Err(Rejection::Errno(EPERM))),
            (Trim, 0, 0, 512, ro, Err(Rejection::Errno(EPERM))),
            (WriteZeroes, 0, 0, 512, ro, Err(Rejection::Errno(EPERM))),
            (Read, 0, 0, 512, ro, Ok(())),
            (Flush, 0, 0, 0, ro, Ok(())),
        ];
        for &(kind, flags, offset, length_bytes, limits, expected) in cases {
            check_validate(kind, flags, offset, length_bytes, limits, expected);
        }
    }

    fn arb_command() -> impl Strategy<Value = Command> {
        any::<u16>().prop_map(Command::from_u16)
    }

    fn arb_request() -> impl Strategy<Value = Request> {
        (
            any::<u16>(),
            arb_command(),
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
        )
            .prop_map(|(flags, kind, cookie, offset, length_bytes)| Request {
                flags,
                kind,
                cookie,
                offset,
                length_bytes,
            })
    }

    proptest! {
        #[test]
        fn request_round_trips(request in arb_request()) {
            let mut out = Vec::new();
            encode_request(&mut out, &request);
            prop_assert_eq!(decode_request(&out), Ok(Some((request, REQUEST_BYTES))));
        }

        #[test]
        fn info_request_round_trips(name in "[a-z0-9/_-]{0,64}", infos in proptest::collection::vec(any::<u16>(), 0..16)) {
            let mut out = Vec::new();
            encode_info_request(&mut out, &name, &infos);
            prop_assert_eq!(parse_info_request(&out), Ok(InfoRequest { export_name: name, info_types: infos }));
        }

        #[test]
        fn option_reply_round_trips(option in any::<u32>(), reply_type in any::<u32>(), data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut out = Vec::new();
            encode_option_reply(&mut out, option, reply_type, &data);
            let len = out.len();
            prop_assert_eq!(decode_option_reply(&out), Ok(Some((OptionReply { option, reply_type, data }, len))));
        }

        #[test]
        fn chunks_round_trip(cookie in any::<u64>(), offset in any::<u64>(), data in proptest::collection::vec(any::<u8>(), 1..256), error in 1u32.., message in "[ -~]{0,64}") {
            let mut out = Vec::new();
            encode_chunk_offset_data(&mut out, cookie, offset, &data, true).expect("fits");
            let (header, used) = decode_chunk_header(&out).expect("valid").expect("whole");
            prop_assert_eq!(header.cookie, cookie);
            prop_assert_eq!(parse_chunk_payload(header.kind, &out[used..]), Ok(ChunkPayload::OffsetData { offset, data: &data }));
            let mut out = Vec::new();
            encode_chunk_error(&mut out, cookie, error, &message);
            let (header, used) = decode_chunk_header(&out).expect("valid").expect("whole");
            prop_assert_eq!(parse_chunk_payload(header.kind, &out[used..]), Ok(ChunkPayload::Error { error, message: &message }));
        }

        #[test]
        fn export_replies_round_trip(size in any::<u64>(), flags in any::<u16>(), no_zeroes in any::<bool>()) {
            let mut out = Vec::new();
            encode_export_name_reply(&mut out, size, flags, no_zeroes);
            let len = out.len();
            prop_assert_eq!(decode_export_name_reply(&out, no_zeroes), Ok(Some(((size, flags), len))));
            let mut out = Vec::new();
            encode_rep_info_export(&mut out, OPT_GO, size, flags);
            let (reply, _) = decode_option_reply(&out).expect("valid").expect("whole");
            prop_assert_eq!(parse_info(&reply.data), Ok(Info::Export { size_bytes: size, transmission_flags: flags }));
        }

        /// The fuzz target: arbitrary bytes never panic any decoder, and no decoder claims to
        /// have consumed more than it was given.
        #[test]
        fn decoders_never_panic_or_over_read(bytes in proptest::collection::vec(any::<u8>(), 0..512), kind in any::<u16>()) {
            fn within<T>(result: Decoded<T>, len: usize) -> bool {
                !matches!(result, Ok(Some((_, used))) if used > len)
            }
            let len = bytes.len();
            prop_assert!(within(decode_server_greeting(&bytes), len));
            prop_assert!(within(decode_client_flags(&bytes), len));
            prop_assert!(within(decode_option_header(&bytes), len));
            prop_assert!(within(decode_option_reply(&bytes), len));
            prop_assert!(within(decode_export_name_reply(&bytes, true), len));
            prop_assert!(within(decode_export_name_reply(&bytes, false), len));
            prop_assert!(within(decode_request(&bytes), len));
            prop_assert!(within(decode_simple_reply(&bytes), len));
            prop_assert!(within(decode_chunk_header(&bytes), len));
            let _ = parse_info_request(&bytes);
            let _ = parse_info(&bytes);
            let _ = parse_rep_server(&bytes);
            let _ = parse_chunk_payload(kind, &bytes);
            // Also with a valid-looking magic in front, so decoding gets past the first check.
            for magic in [&REQUEST_MAGIC.to_be_bytes()[..], &STRUCTURED_REPLY_MAGIC.to_be_bytes()[..], &OPTION_REPLY_MAGIC.to_be_bytes()[..], &IHAVEOPT.to_be_bytes()[..]] {
                let mut prefixed = magic.to_vec();
                prefixed.extend_from_slice(&bytes);
                let len = prefixed.len();
                prop_assert!(within(decode_request(&prefixed), len));
                prop_assert!(within(decode_chunk_header(&prefixed), len));
                prop_assert!(within(decode_option_reply(&prefixed), len));
                prop_assert!(within(decode_option_header(&prefixed), len));
            }
        }

        #[test]
        fn validation_never_panics(request in arb_request(), size in any::<u64>(), read_only in any::<bool>(), structured in any::<bool>()) {
            let limits = RequestLimits { size_bytes: size, read_only, min_block_bytes: MIN_BLOCK_BYTES, max_block_bytes: BLOCK_BYTES_MAX, structured_replies: structured };
            if validate_request(&request, &limits).is_ok() && request.kind != Command::Disc && request.kind != Command::Flush {
                prop_assert!(request.offset.checked_add(u64::from(request.length_bytes)).is_some_and(|end| end <= size));
            }
        }
    }
}
