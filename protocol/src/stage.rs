//! The stage file of a regional secondary, `VOLUME.stage`: the last complete batch it
//! received, stored before it is acknowledged and applied (see
//! [`replication::regional`](crate::replication::regional)).
//!
//! One image, written with one write and one fdatasync from offset 0:
//!
//! ```text
//!  0  magic       b"FERRYST1"
//!  8  lsn         u64 LE: the volume is as of this LSN once the batch is applied
//! 16  count       u32 LE: records
//! 20  body bytes  u32 LE
//! 24  body CRC-32 u32 LE (crc32fast) of the body
//! 28  CRC-32      u32 LE of bytes 0..28
//! 4096  body: per record, LSN u64, offset u64, length u32, kind u8, 3 zero bytes, then the
//!       payload of a write; zero padding to a multiple of 512
//! ```
//!
//! A torn store fails one of the CRCs and is ignored: a batch is acknowledged only once its
//! store completed, so nothing promised is lost. A stored batch at or below the journal's head
//! was applied; one above it is applied again at start (applying is idempotent: the records
//! are whole contents of their ranges, written in LSN order).

use bytes::Bytes;

use crate::journal::RecordKind;
use crate::repl::WriteRecord;

/// Bytes of the header block.
pub const HEADER_BYTES: usize = 4096;
/// Bytes of one record's descriptor in the body.
const RECORD_HEADER_BYTES: usize = 24;
const MAGIC: [u8; 8] = *b"FERRYST1";
/// Stored images are padded to this.
const PAD_BYTES: usize = 512;

/// Why a stored batch cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StageError {
    #[error("no batch is stored (magic)")]
    Empty,
    #[error("the header's checksum does not match (a torn store)")]
    HeaderChecksum,
    #[error("the body's checksum does not match (a torn store)")]
    BodyChecksum,
    #[error("the body is malformed: {0}")]
    Malformed(&'static str),
}

/// A stored batch's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StageHeader {
    pub lsn: u64,
    pub count: u32,
    pub body_bytes: u32,
    body_crc: u32,
}

/// The image of a batch: header block, body, padding. `None` if the body would not fit in
/// a `u32` of bytes (the caller bounds batches far below that).
pub fn encode(lsn: u64, records: &[WriteRecord]) -> Option<Vec<u8>> {
    let body_bytes: usize = records
        .iter()
        .map(|r| RECORD_HEADER_BYTES + r.data.len())
        .sum();
    let body_len = u32::try_from(body_bytes).ok()?;
    let count = u32::try_from(records.len()).ok()?;
    let total = (HEADER_BYTES + body_bytes).next_multiple_of(PAD_BYTES);
    let mut image = Vec::with_capacity(total);
    image.resize(HEADER_BYTES, 0);
    for record in records {
        image.extend_from_slice(&record.lsn.to_le_bytes());
        image.extend_from_slice(&record.offset_bytes.to_le_bytes());
        image.extend_from_slice(&record.len_bytes.to_le_bytes());
        image.push(record.kind.to_u8());
        image.extend_from_slice(&[0; 3]);
        image.extend_from_slice(&record.data);
    }
    let body_crc = crc32fast::hash(&image[HEADER_BYTES..]);
    image[0..8].copy_from_slice(&MAGIC);
    image[8..16].copy_from_slice(&lsn.to_le_bytes());
    image[16..20].copy_from_slice(&count.to_le_bytes());
    image[20..24].copy_from_slice(&body_len.to_le_bytes());
    image[24..28].copy_from_slice(&body_crc.to_le_bytes());
    let crc = crc32fast::hash(&image[0..28]);
    image[28..32].copy_from_slice(&crc.to_le_bytes());
    image.resize(total, 0);
    Some(image)
}

fn le_u32(bytes: &[u8]) -> u32 {
    u32::from_le_bytes(bytes.try_into().expect("four bytes"))
}

fn le_u64(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes.try_into().expect("eight bytes"))
}

/// Reads the header block (at least 32 bytes of it).
pub fn decode_header(header: &[u8]) -> Result<StageHeader, StageError> {
    if header.len() < 32 || header[0..8] != MAGIC {
        return Err(StageError::Empty);
    }
    if crc32fast::hash(&header[0..28]) != le_u32(&header[28..32]) {
        return Err(StageError::HeaderChecksum);
    }
    Ok(StageHeader {
        lsn: le_u64(&header[8..16]),
        count: le_u32(&header[16..20]),
        body_bytes: le_u32(&header[20..24]),
        body_crc: le_u32(&header[24..28]),
    })
}

/// The records of a body read after `header` (at least `header.body_bytes` long).
pub fn decode_body(header: &StageHeader, body: &[u8]) -> Result<Vec<WriteRecord>, StageError> {
    let len = header.body_bytes as usize;
    let body = body.get(..len).ok_or(StageError::Malformed("short body"))?;
    if crc32fast::hash(body) != header.body_crc {
        return Err(StageError::BodyChecksum);
    }
    let mut records = Vec::with_capacity(header.count.min(1 << 20) as usize);
    let mut at = 0;
    let mut last_lsn = 0;
    for _ in 0..header.count {
        let desc = body
            .get(at..at + RECORD_HEADER_BYTES)
            .ok_or(StageError::Malformed("short record"))?;
        let lsn = le_u64(&desc[0..8]);
        let offset_bytes = le_u64(&desc[8..16]);
        let len_bytes = le_u32(&desc[16..20]);
        let kind =
            RecordKind::from_u8(desc[20]).map_err(|_| StageError::Malformed("record kind"))?;
        if lsn <= last_lsn || lsn > header.lsn {
            return Err(StageError::Malformed("record LSNs out of order"));
        }
        last_lsn = lsn;
        at += RECORD_HEADER_BYTES;
        let data = if kind.has_payload() {
            let data = body
                .get(at..at + len_bytes as usize)
                .ok_or(StageError::Malformed("short payload"))?;
            at += data.len();
            Bytes::copy_from_slice(data)
        } else {
            Bytes::new()
        };
        records.push(WriteRecord {
            lsn,
            kind,
            fua: false,
            offset_bytes,
            len_bytes,
            data,
        });
    }
    if at != len {
        return Err(StageError::Malformed("bytes after the last record"));
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records() -> Vec<WriteRecord> {
        vec![
            WriteRecord {
                lsn: 3,
                kind: RecordKind::Write,
                fua: false,
                offset_bytes: 4096,
                len_bytes: 512,
                data: Bytes::from(vec![7u8; 512]),
            },
            WriteRecord {
                lsn: 9,
                kind: RecordKind::Punch,
                fua: false,
                offset_bytes: 1 << 20,
                len_bytes: 8192,
                data: Bytes::new(),
            },
        ]
    }

    #[test]
    fn a_batch_reads_back_as_stored() {
        let image = encode(10, &records()).expect("fits");
        assert_eq!(image.len() % PAD_BYTES, 0);
        let header = decode_header(&image[..HEADER_BYTES]).expect("header");
        assert_eq!(header.lsn, 10);
        assert_eq!(header.count, 2);
        let back = decode_body(&header, &image[HEADER_BYTES..]).expect("body");
        assert_eq!(back, records());
    }

    #[test]
    fn a_torn_or_foreign_image_is_refused() {
        let image = encode(10, &records()).expect("fits");
        assert_eq!(decode_header(&[0u8; HEADER_BYTES]), Err(StageError::Empty));
        let mut torn = image.clone();
        torn[9] ^= 1;
        assert_eq!(
            decode_header(&torn[..HEADER_BYTES]),
            Err(StageError::HeaderChecksum)
        );
        let mut torn = image.clone();
        torn[HEADER_BYTES + 30] ^= 1;
        let header = decode_header(&torn[..HEADER_BYTES]).expect("header intact");
        assert_eq!(
            decode_body(&header, &torn[HEADER_BYTES..]),
            Err(StageError::BodyChecksum)
        );
        let header = decode_header(&image[..HEADER_BYTES]).expect("header");
        assert_eq!(
            decode_body(&header, &image[HEADER_BYTES..HEADER_BYTES + 10]),
            Err(StageError::Malformed("short body"))
        );
    }
}
