//! The catch-up file of a regional secondary, `VOLUME.catchup.N`: a catch-up (a delta resync
//! after the link was down, paused or given up) is stored here whole before any of it reaches
//! the device, so the copy stays at its last batch boundary, consistent and promotable, for
//! the whole catch-up (see [`replication::regional`](crate::replication::regional)).
//!
//! One logical file cut into segments of [`SEGMENT_BYTES`] (`VOLUME.catchup.0`, `.1`, ...),
//! created as it grows, so its size follows the catch-up and a full filesystem shows when a
//! segment is created, before anything depends on it:
//!
//! ```text
//!  0     header block (written last, at the commit; zeros before):
//!        0  magic       b"FERRYCU1"
//!        8  catch-up    u64 LE: which catch-up (a fresh file starts every one)
//!       16  lsn         u64 LE: the volume is as of this LSN once it is applied
//!       24  body bytes  u64 LE
//!       32  count       u64 LE: records
//!       40  CRC-32      u32 LE of bytes 0..40
//!  4096  body: per record a descriptor, then the payload of a data record
//!        0  offset      u64 LE
//!        8  length      u64 LE
//!       16  kind        u8: 1 data, 2 zeros
//!       17  zero        3 bytes
//!       20  payload CRC u32 LE (0 for zeros)
//!       24  CRC-32      u32 LE of bytes 0..24
//!       28  zero        4 bytes
//! ```
//!
//! Records are whole contents of their ranges in the order the primary sent them, so
//! applying them in order, once or again after a crash, gives the same device; so does
//! writing each block once with the content of the last record covering it, which is what
//! the daemon does. The header is written and synced only after the body is durable: a file
//! without a valid header holds no catch-up. Every record is checked before the first one is
//! applied.

use bytes::Bytes;

/// Bytes of the header block.
pub const HEADER_BYTES: usize = 4096;
/// Bytes of one segment file.
pub const SEGMENT_BYTES: u64 = 64 << 20;
/// Bytes of one record's descriptor.
pub const RECORD_HEADER_BYTES: usize = 32;
/// Writes to the file are padded to this.
pub const PAD_BYTES: usize = 512;
const MAGIC: [u8; 8] = *b"FERRYCU1";
const KIND_DATA: u8 = 1;
const KIND_ZERO: u8 = 2;

/// Why a catch-up file cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatchUpError {
    #[error("no committed catch-up (magic)")]
    Empty,
    #[error("the header's checksum does not match")]
    HeaderChecksum,
    #[error("record {index}: {what}")]
    Record { index: u64, what: &'static str },
}

/// A committed catch-up's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatchUpHeader {
    pub catchup: u64,
    pub lsn: u64,
    pub body_bytes: u64,
    pub count: u64,
}

/// One range of a catch-up: its contents, or zeros.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatchUpRecord {
    pub offset_bytes: u64,
    pub len_bytes: u64,
    /// `None`: the range reads as zeros.
    pub data: Option<Bytes>,
}

/// The header block of a committed catch-up.
pub fn encode_header(header: &CatchUpHeader) -> Vec<u8> {
    let mut block = vec![0u8; HEADER_BYTES];
    block[0..8].copy_from_slice(&MAGIC);
    block[8..16].copy_from_slice(&header.catchup.to_le_bytes());
    block[16..24].copy_from_slice(&header.lsn.to_le_bytes());
    block[24..32].copy_from_slice(&header.body_bytes.to_le_bytes());
    block[32..40].copy_from_slice(&header.count.to_le_bytes());
    let crc = crc32fast::hash(&block[0..40]);
    block[40..44].copy_from_slice(&crc.to_le_bytes());
    block
}

/// Reads a header block (at least 44 bytes of it).
pub fn decode_header(block: &[u8]) -> Result<CatchUpHeader, CatchUpError> {
    if block.len() < 44 || block[0..8] != MAGIC {
        return Err(CatchUpError::Empty);
    }
    if crc32fast::hash(&block[0..40]) != le_u32(&block[40..44]) {
        return Err(CatchUpError::HeaderChecksum);
    }
    Ok(CatchUpHeader {
        catchup: le_u64(&block[8..16]),
        lsn: le_u64(&block[16..24]),
        body_bytes: le_u64(&block[24..32]),
        count: le_u64(&block[32..40]),
    })
}

/// Appends one record to `out`.
pub fn encode_record(record: &CatchUpRecord, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&record.offset_bytes.to_le_bytes());
    out.extend_from_slice(&record.len_bytes.to_le_bytes());
    let (kind, payload_crc) = match &record.data {
        Some(data) => (KIND_DATA, crc32fast::hash(data)),
        None => (KIND_ZERO, 0),
    };
    out.push(kind);
    out.extend_from_slice(&[0; 3]);
    out.extend_from_slice(&payload_crc.to_le_bytes());
    let crc = crc32fast::hash(&out[start..start + 24]);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    if let Some(data) = &record.data {
        out.extend_from_slice(data);
    }
}

/// The bytes `record` takes in the body.
pub fn record_bytes(record: &CatchUpRecord) -> u64 {
    RECORD_HEADER_BYTES as u64 + record.data.as_ref().map_or(0, |d| d.len() as u64)
}

/// A record's range, as [`check_record`] reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRange {
    pub offset_bytes: u64,
    pub len_bytes: u64,
    /// A data record: its payload follows the descriptor. Otherwise the range reads as zeros.
    pub data: bool,
}

/// Checks the record at the start of `buf` (its descriptor's and its payload's checksums)
/// without copying its payload: `Ok(None)` when `buf` does not hold all of it yet, else its
/// range and the bytes it took (the payload of a data record is the `len_bytes` bytes after
/// the first [`RECORD_HEADER_BYTES`]). `index` names it in errors.
pub fn check_record(buf: &[u8], index: u64) -> Result<Option<(RecordRange, usize)>, CatchUpError> {
    let Some(desc) = buf.get(..RECORD_HEADER_BYTES) else {
        return Ok(None);
    };
    let bad = |what| CatchUpError::Record { index, what };
    if crc32fast::hash(&desc[0..24]) != le_u32(&desc[24..28]) {
        return Err(bad("descriptor checksum"));
    }
    let offset_bytes = le_u64(&desc[0..8]);
    let len_bytes = le_u64(&desc[8..16]);
    if len_bytes == 0 || offset_bytes.checked_add(len_bytes).is_none() {
        return Err(bad("range"));
    }
    let range = |data| RecordRange {
        offset_bytes,
        len_bytes,
        data,
    };
    match desc[16] {
        KIND_ZERO => Ok(Some((range(false), RECORD_HEADER_BYTES))),
        KIND_DATA => {
            let len = usize::try_from(len_bytes).map_err(|_| bad("length"))?;
            if len > crate::repl::DATA_BYTES_MAX {
                return Err(bad("length"));
            }
            let Some(payload) = buf.get(RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + len) else {
                return Ok(None);
            };
            if crc32fast::hash(payload) != le_u32(&desc[20..24]) {
                return Err(bad("payload checksum"));
            }
            Ok(Some((range(true), RECORD_HEADER_BYTES + len)))
        }
        _ => Err(bad("kind")),
    }
}

/// Decodes the record at the start of `buf`: `Ok(None)` when `buf` does not hold all of it
/// yet, else the record and the bytes it took. `index` names it in errors.
pub fn decode_record(
    buf: &[u8],
    index: u64,
) -> Result<Option<(CatchUpRecord, usize)>, CatchUpError> {
    Ok(check_record(buf, index)?.map(|(range, used)| {
        let record = CatchUpRecord {
            offset_bytes: range.offset_bytes,
            len_bytes: range.len_bytes,
            data: range
                .data
                .then(|| Bytes::copy_from_slice(&buf[RECORD_HEADER_BYTES..used])),
        };
        (record, used)
    }))
}

fn le_u32(bytes: &[u8]) -> u32 {
    u32::from_le_bytes(bytes.try_into().expect("four bytes"))
}

fn le_u64(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes.try_into().expect("eight bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn records() -> Vec<CatchUpRecord> {
        vec![
            CatchUpRecord {
                offset_bytes: 4096,
                len_bytes: 512,
                data: Some(Bytes::from(vec![7u8; 512])),
            },
            CatchUpRecord {
                offset_bytes: 1 << 20,
                len_bytes: 8192,
                data: None,
            },
        ]
    }

    #[test]
    fn records_and_header_read_back() {
        let mut body = Vec::new();
        for record in records() {
            encode_record(&record, &mut body);
        }
        let mut at = 0;
        let mut back = Vec::new();
        while let Some((record, used)) = decode_record(&body[at..], back.len() as u64).unwrap() {
            back.push(record);
            at += used;
        }
        assert_eq!(back, records());
        assert_eq!(at, body.len());
        assert_eq!(
            check_record(&body, 0),
            Ok(Some((
                RecordRange {
                    offset_bytes: 4096,
                    len_bytes: 512,
                    data: true
                },
                RECORD_HEADER_BYTES + 512
            )))
        );
        assert_eq!(
            body.len() as u64,
            records().iter().map(record_bytes).sum::<u64>()
        );
        let header = CatchUpHeader {
            catchup: 3,
            lsn: 99,
            body_bytes: body.len() as u64,
            count: 2,
        };
        assert_eq!(decode_header(&encode_header(&header)), Ok(header));
        assert_eq!(decode_header(&[0; HEADER_BYTES]), Err(CatchUpError::Empty));
    }

    proptest! {
        /// Any flipped byte of a record is caught before it could be applied, and a prefix
        /// of a record is never taken for a whole one.
        #[test]
        fn damage_is_caught(at in 0usize..(RECORD_HEADER_BYTES + 512), bit in 0u8..8) {
            let mut body = Vec::new();
            encode_record(&records()[0], &mut body);
            for cut in 0..body.len() {
                prop_assert_eq!(decode_record(&body[..cut], 0), Ok(None));
            }
            body[at] ^= 1 << bit;
            let result = decode_record(&body, 0);
            let unused_byte = (28..32).contains(&at);
            if !unused_byte {
                prop_assert!(result.is_err(), "{:?}", result);
            }
        }
    }
}
