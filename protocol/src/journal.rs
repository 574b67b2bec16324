//! The on-disk format of a volume's journal, with no I/O in it.
//!
//! A journal file is two superblock slots followed by a ring of batches:
//!
//! ```text
//! offset 0      superblock slot 0   (4 KiB)
//! offset 4096   superblock slot 1   (4 KiB)
//! offset 8192   ring: batch, batch, ..., wrap marker, (back to ring offset 0)
//! ```
//!
//! A *batch* is what one group commit writes with one I/O: a 4 KiB header block holding up to
//! [`RECORDS_PER_BATCH_MAX`] record descriptors, followed by each write record's payload padded
//! to 4 KiB. Every block boundary is 4 KiB-aligned so the ring can be written with O_DIRECT on
//! any device. Each record descriptor carries its LSN, volume offset, length and a CRC-32 over
//! the descriptor and the payload, so a torn payload is caught record by record; the header
//! has its own CRC over all descriptors.
//!
//! Superblocks are written alternately to the two slots with a growing sequence number; the
//! valid slot with the highest sequence wins, so a torn superblock write never loses the
//! previous one. The superblock names where the oldest live batch starts (`tail_offset`) and
//! which LSN it must begin with (`tail_lsn`). Recovery scans from there and stops at the first
//! block that is not the batch it expects (wrong magic, journal id, LSN or checksum).

use thiserror::Error;

/// Every I/O unit of the journal.
pub const BLOCK_BYTES: usize = 4096;
/// [`BLOCK_BYTES`] as the superblock stores it.
const BLOCK_BYTES_U32: u32 = 4096;
const _: () = assert!(BLOCK_BYTES_U32 as usize == BLOCK_BYTES);
/// Two superblock slots precede the ring.
pub const RING_START_BYTES: u64 = 2 * BLOCK_BYTES as u64;
/// The largest payload one record carries; larger writes are split into several records.
pub const RECORD_BYTES_MAX: usize = 1 << 20;
/// Descriptors that fit in one header block after the fixed header.
pub const RECORDS_PER_BATCH_MAX: usize = (BLOCK_BYTES - BATCH_FIXED_BYTES) / DESCRIPTOR_BYTES;

const SUPERBLOCK_MAGIC: &[u8; 8] = b"FERRYSB1";
const BATCH_MAGIC: u32 = 0x4642_4a31; // "FBJ1"
const FORMAT_VERSION: u16 = 1;
const SUPERBLOCK_BYTES: usize = 80;
const BATCH_FIXED_BYTES: usize = 40;
const DESCRIPTOR_BYTES: usize = 32;

/// Why bytes are not a valid superblock or batch header.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FormatError {
    /// The block does not start with the expected magic: never written, or not ours.
    #[error("bad magic")]
    BadMagic,
    /// The block was written by a format version this build does not read.
    #[error("unsupported format version {0}")]
    UnsupportedVersion(u16),
    /// The checksum does not match the contents: a torn or corrupted write.
    #[error("checksum mismatch")]
    ChecksumMismatch,
    /// A batch of another journal file (a copy, or an old journal at the same path).
    #[error("batch belongs to journal {found:#x}, expected {expected:#x}")]
    ForeignJournal { expected: u64, found: u64 },
    /// A batch whose first LSN is not the next one: stale data from an earlier lap of the ring.
    #[error("batch starts at LSN {found}, expected {expected}")]
    UnexpectedLsn { expected: u64, found: u64 },
    /// A field holds a value no writer produces.
    #[error("invalid field: {0}")]
    Invalid(&'static str),
    /// Fewer bytes than the structure needs.
    #[error("truncated: need {needed} bytes, have {have}")]
    Truncated { needed: usize, have: usize },
}

/// The journal's anchor: where the live part of the ring starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superblock {
    /// Grows with every superblock write; the valid slot with the highest value wins.
    pub sequence: u64,
    /// Random identity of this journal file; every batch carries it.
    pub journal_id: u64,
    /// Size of the whole journal file.
    pub file_bytes: u64,
    /// Size of the volume this journal belongs to.
    pub volume_bytes: u64,
    /// Ring offset (from [`RING_START_BYTES`]) of the oldest batch not yet reclaimed.
    pub tail_offset: u64,
    /// LSN of the first record at `tail_offset` (the next LSN when the ring is empty).
    pub tail_lsn: u64,
    /// Volume generation (raised by promotion); kept here so it is durable with the journal.
    pub generation: u64,
}

impl Superblock {
    /// The slot (0 or 1) this superblock is written to.
    pub fn slot(&self) -> u64 {
        self.sequence % 2
    }

    /// Bytes of the ring, after the superblock slots.
    pub fn ring_bytes(&self) -> u64 {
        self.file_bytes - RING_START_BYTES
    }

    /// Encodes into a zero-padded block.
    pub fn encode(&self) -> [u8; BLOCK_BYTES] {
        let mut block = [0u8; BLOCK_BYTES];
        let mut w = Writer::new(&mut block);
        w.bytes(SUPERBLOCK_MAGIC);
        w.u16(FORMAT_VERSION);
        w.u16(0);
        w.u32(BLOCK_BYTES_U32);
        w.u64(self.sequence);
        w.u64(self.journal_id);
        w.u64(self.file_bytes);
        w.u64(self.volume_bytes);
        w.u64(self.tail_offset);
        w.u64(self.tail_lsn);
        w.u64(self.generation);
        let used = w.pos;
        let crc = crc32fast::hash(&block[..used]);
        block[used..used + 4].copy_from_slice(&crc.to_le_bytes());
        debug_assert_eq!(used + 4, SUPERBLOCK_BYTES - 4);
        block
    }

    /// Decodes and validates a superblock slot.
    pub fn decode(block: &[u8]) -> Result<Superblock, FormatError> {
        need(block, SUPERBLOCK_BYTES)?;
        if &block[..8] != SUPERBLOCK_MAGIC {
            return Err(FormatError::BadMagic);
        }
        let mut r = Reader::new(&block[8..]);
        let version = r.u16();
        if version != FORMAT_VERSION {
            return Err(FormatError::UnsupportedVersion(version));
        }
        let _reserved = r.u16();
        let block_bytes = r.u32();
        let sb = Superblock {
            sequence: r.u64(),
            journal_id: r.u64(),
            file_bytes: r.u64(),
            volume_bytes: r.u64(),
            tail_offset: r.u64(),
            tail_lsn: r.u64(),
            generation: r.u64(),
        };
        let used = 8 + r.pos;
        let stored_crc = u32::from_le_bytes(block[used..used + 4].try_into().expect("4 bytes"));
        if crc32fast::hash(&block[..used]) != stored_crc {
            return Err(FormatError::ChecksumMismatch);
        }
        if block_bytes as usize != BLOCK_BYTES {
            return Err(FormatError::Invalid("block size"));
        }
        if sb.file_bytes <= RING_START_BYTES || !sb.file_bytes.is_multiple_of(BLOCK_BYTES as u64) {
            return Err(FormatError::Invalid("file size"));
        }
        if sb.tail_offset >= sb.ring_bytes() || !sb.tail_offset.is_multiple_of(BLOCK_BYTES as u64) {
            return Err(FormatError::Invalid("tail offset"));
        }
        Ok(sb)
    }
}

/// What a record does to the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// Data follows in the batch's payload area.
    Write,
    /// The range reads back as zeros; its blocks stay allocated (WRITE_ZEROES with NO_HOLE).
    Zero,
    /// The range reads back as zeros and may be deallocated (TRIM, WRITE_ZEROES).
    Punch,
}

impl RecordKind {
    pub(crate) fn to_u8(self) -> u8 {
        match self {
            RecordKind::Write => 1,
            RecordKind::Zero => 2,
            RecordKind::Punch => 3,
        }
    }

    pub(crate) fn from_u8(value: u8) -> Result<RecordKind, FormatError> {
        match value {
            1 => Ok(RecordKind::Write),
            2 => Ok(RecordKind::Zero),
            3 => Ok(RecordKind::Punch),
            _ => Err(FormatError::Invalid("record kind")),
        }
    }

    /// Whether the record carries payload bytes.
    pub fn has_payload(self) -> bool {
        self == RecordKind::Write
    }
}

/// One record's descriptor in a batch header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordDescriptor {
    pub lsn: u64,
    pub kind: RecordKind,
    /// The client asked for this write to be durable on completion.
    pub fua: bool,
    pub offset_bytes: u64,
    pub len_bytes: u32,
    /// CRC-32 over the encoded descriptor (with this field zero) and the unpadded payload.
    pub crc: u32,
}

impl RecordDescriptor {
    /// Builds a descriptor and computes its checksum over `payload` (empty unless a write).
    pub fn new(
        lsn: u64,
        kind: RecordKind,
        fua: bool,
        offset_bytes: u64,
        len_bytes: u32,
        payload: &[u8],
    ) -> Self {
        assert!(
            !kind.has_payload() || payload.len() == len_bytes as usize,
            "payload length differs from the record length"
        );
        let mut d = RecordDescriptor {
            lsn,
            kind,
            fua,
            offset_bytes,
            len_bytes,
            crc: 0,
        };
        d.crc = d.compute_crc(payload);
        d
    }

    fn encode_into(&self, out: &mut [u8]) {
        let mut w = Writer::new(out);
        w.u64(self.lsn);
        w.u8(self.kind.to_u8());
        w.u8(u8::from(self.fua));
        w.u16(0);
        w.u32(self.len_bytes);
        w.u64(self.offset_bytes);
        w.u32(self.crc);
        w.u32(0);
    }

    fn decode(bytes: &[u8]) -> Result<RecordDescriptor, FormatError> {
        need(bytes, DESCRIPTOR_BYTES)?;
        let mut r = Reader::new(bytes);
        let lsn = r.u64();
        let kind = RecordKind::from_u8(r.u8())?;
        let fua = match r.u8() {
            0 => false,
            1 => true,
            _ => return Err(FormatError::Invalid("fua flag")),
        };
        let _reserved = r.u16();
        let len_bytes = r.u32();
        let offset_bytes = r.u64();
        let crc = r.u32();
        if kind.has_payload() && len_bytes as usize > RECORD_BYTES_MAX {
            return Err(FormatError::Invalid("record length"));
        }
        Ok(RecordDescriptor {
            lsn,
            kind,
            fua,
            offset_bytes,
            len_bytes,
            crc,
        })
    }

    fn compute_crc(&self, payload: &[u8]) -> u32 {
        let mut encoded = [0u8; DESCRIPTOR_BYTES];
        RecordDescriptor { crc: 0, ..*self }.encode_into(&mut encoded);
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&encoded);
        hasher.update(payload);
        hasher.finalize()
    }

    /// Checks the payload against the stored checksum.
    pub fn verify(&self, payload: &[u8]) -> Result<(), FormatError> {
        if self.kind.has_payload() && payload.len() != self.len_bytes as usize {
            return Err(FormatError::Invalid("payload length"));
        }
        if self.compute_crc(payload) != self.crc {
            return Err(FormatError::ChecksumMismatch);
        }
        Ok(())
    }

    /// Bytes this record occupies in the payload area (its payload padded to a block).
    pub fn payload_area_bytes(&self) -> u64 {
        if self.kind.has_payload() {
            padded(self.len_bytes as u64)
        } else {
            0
        }
    }
}

/// What a header block introduces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchHeader {
    /// Records, with their payloads in the blocks after the header.
    Records {
        journal_id: u64,
        first_lsn: u64,
        records: Vec<RecordDescriptor>,
    },
    /// The rest of the ring is unused; the next batch is at ring offset 0 and starts at `next_lsn`.
    Wrap { journal_id: u64, next_lsn: u64 },
}

const KIND_RECORDS: u16 = 1;
const KIND_WRAP: u16 = 2;

impl BatchHeader {
    /// Total bytes of the batch in the ring: header block plus padded payloads.
    pub fn batch_bytes(&self) -> u64 {
        match self {
            BatchHeader::Records { records, .. } => {
                BLOCK_BYTES as u64
                    + records
                        .iter()
                        .map(RecordDescriptor::payload_area_bytes)
                        .sum::<u64>()
            }
            BatchHeader::Wrap { .. } => BLOCK_BYTES as u64,
        }
    }

    /// The LSN the batch after this one must start with.
    pub fn next_lsn(&self) -> u64 {
        match self {
            BatchHeader::Records {
                first_lsn, records, ..
            } => first_lsn + records.len() as u64,
            BatchHeader::Wrap { next_lsn, .. } => *next_lsn,
        }
    }

    /// Encodes the header block. Panics if the batch breaks an invariant the writer owns.
    pub fn encode(&self) -> [u8; BLOCK_BYTES] {
        let mut block = [0u8; BLOCK_BYTES];
        let (kind, journal_id, lsn, records): (u16, u64, u64, &[RecordDescriptor]) = match self {
            BatchHeader::Records {
                journal_id,
                first_lsn,
                records,
            } => (KIND_RECORDS, *journal_id, *first_lsn, records),
            BatchHeader::Wrap {
                journal_id,
                next_lsn,
            } => (KIND_WRAP, *journal_id, *next_lsn, &[]),
        };
        assert!(
            records.len() <= RECORDS_PER_BATCH_MAX,
            "too many records for one batch"
        );
        for (i, record) in records.iter().enumerate() {
            assert_eq!(
                record.lsn,
                lsn + i as u64,
                "record LSNs in a batch must be consecutive"
            );
            record.encode_into(&mut block[BATCH_FIXED_BYTES + i * DESCRIPTOR_BYTES..]);
        }
        let payload_blocks = u32::try_from(self.batch_bytes() / BLOCK_BYTES as u64 - 1)
            .expect("a batch is far smaller than 2^32 blocks");
        let mut w = Writer::new(&mut block);
        w.u32(BATCH_MAGIC);
        w.u16(FORMAT_VERSION);
        w.u16(kind);
        w.u64(journal_id);
        w.u64(lsn);
        w.u32(u32::try_from(records.len()).expect("at most RECORDS_PER_BATCH_MAX records"));
        w.u32(payload_blocks);
        w.u32(0); // crc, filled below
        w.u32(0);
        debug_assert_eq!(w.pos, BATCH_FIXED_BYTES);
        let crc = crc32fast::hash(&block);
        block[32..36].copy_from_slice(&crc.to_le_bytes());
        block
    }

    /// Decodes a header block and checks that it is the batch the scan expects next.
    pub fn decode(
        block: &[u8],
        journal_id: u64,
        expected_lsn: u64,
    ) -> Result<BatchHeader, FormatError> {
        need(block, BLOCK_BYTES)?;
        let mut r = Reader::new(block);
        if r.u32() != BATCH_MAGIC {
            return Err(FormatError::BadMagic);
        }
        let version = r.u16();
        if version != FORMAT_VERSION {
            return Err(FormatError::UnsupportedVersion(version));
        }
        let kind = r.u16();
        let found_id = r.u64();
        let lsn = r.u64();
        let count = r.u32() as usize;
        let payload_blocks = r.u32();
        let stored_crc = r.u32();
        let mut copy = [0u8; BLOCK_BYTES];
        copy.copy_from_slice(&block[..BLOCK_BYTES]);
        copy[32..36].fill(0);
        if crc32fast::hash(&copy) != stored_crc {
            return Err(FormatError::ChecksumMismatch);
        }
        if found_id != journal_id {
            return Err(FormatError::ForeignJournal {
                expected: journal_id,
                found: found_id,
            });
        }
        if lsn != expected_lsn {
            return Err(FormatError::UnexpectedLsn {
                expected: expected_lsn,
                found: lsn,
            });
        }
        let header = match kind {
            KIND_WRAP if count == 0 => BatchHeader::Wrap {
                journal_id,
                next_lsn: lsn,
            },
            KIND_RECORDS if (1..=RECORDS_PER_BATCH_MAX).contains(&count) => {
                let mut records = Vec::with_capacity(count);
                for i in 0..count {
                    let at = BATCH_FIXED_BYTES + i * DESCRIPTOR_BYTES;
                    let record = RecordDescriptor::decode(&block[at..at + DESCRIPTOR_BYTES])?;
                    if record.lsn != lsn + i as u64 {
                        return Err(FormatError::Invalid("record LSN"));
                    }
                    records.push(record);
                }
                BatchHeader::Records {
                    journal_id,
                    first_lsn: lsn,
                    records,
                }
            }
            _ => return Err(FormatError::Invalid("batch kind or record count")),
        };
        if header.batch_bytes() / BLOCK_BYTES as u64 - 1 != payload_blocks as u64 {
            return Err(FormatError::Invalid("payload block count"));
        }
        Ok(header)
    }
}

/// Rounds up to the journal block size.
pub fn padded(len_bytes: u64) -> u64 {
    len_bytes.div_ceil(BLOCK_BYTES as u64) * BLOCK_BYTES as u64
}

fn need(bytes: &[u8], needed: usize) -> Result<(), FormatError> {
    if bytes.len() < needed {
        return Err(FormatError::Truncated {
            needed,
            have: bytes.len(),
        });
    }
    Ok(())
}

/// Little-endian writer over a buffer the caller sized; overrunning it is a bug, not input.
struct Writer<'a> {
    out: &'a mut [u8],
    pos: usize,
}

impl<'a> Writer<'a> {
    fn new(out: &'a mut [u8]) -> Self {
        Writer { out, pos: 0 }
    }
    fn bytes(&mut self, b: &[u8]) {
        self.out[self.pos..self.pos + b.len()].copy_from_slice(b);
        self.pos += b.len();
    }
    fn u8(&mut self, v: u8) {
        self.bytes(&[v]);
    }
    fn u16(&mut self, v: u16) {
        self.bytes(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
}

/// Little-endian reader; callers check the length first with [`need`].
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, pos: 0 }
    }
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let out: [u8; N] = self.bytes[self.pos..self.pos + N]
            .try_into()
            .expect("length checked by caller");
        self.pos += N;
        out
    }
    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn superblock() -> Superblock {
        Superblock {
            sequence: 7,
            journal_id: 0xfeed,
            file_bytes: 1 << 24,
            volume_bytes: 1 << 30,
            tail_offset: 8192,
            tail_lsn: 42,
            generation: 3,
        }
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn superblock_bytes_are_exact() {
        let block = superblock().encode();
        let expected = concat!(
            "4645525259534231",
            "0100",
            "0000",
            "00100000", // magic, version, reserved, block size
            "0700000000000000",
            "edfe000000000000",
            "0000000100000000",
            "0000004000000000",
            "0020000000000000",
            "2a00000000000000",
            "0300000000000000",
        );
        assert_eq!(hex(&block[..72]), expected);
        assert_eq!(&block[72..76], &crc32fast::hash(&block[..72]).to_le_bytes());
        assert!(block[76..].iter().all(|&b| b == 0));
        assert_eq!(Superblock::decode(&block), Ok(superblock()));
    }

    #[test]
    fn superblock_rejects_corruption() {
        let mut block = superblock().encode();
        block[20] ^= 1;
        assert_eq!(
            Superblock::decode(&block),
            Err(FormatError::ChecksumMismatch)
        );
        assert_eq!(
            Superblock::decode(&[0u8; BLOCK_BYTES]),
            Err(FormatError::BadMagic)
        );
        assert!(matches!(
            Superblock::decode(&[0u8; 10]),
            Err(FormatError::Truncated { .. })
        ));
    }

    #[test]
    fn batch_header_bytes_are_exact() {
        let payload = [0xabu8; 10];
        let record = RecordDescriptor::new(5, RecordKind::Write, true, 4096, 10, &payload);
        let header = BatchHeader::Records {
            journal_id: 1,
            first_lsn: 5,
            records: vec![record],
        };
        let block = header.encode();
        let fixed = concat!(
            "314a4246",
            "0100",
            "0100",
            "0100000000000000",
            "0500000000000000",
            "01000000",
            "01000000"
        );
        assert_eq!(hex(&block[..32]), fixed);
        let descriptor = concat!(
            "0500000000000000",
            "01",
            "01",
            "0000",
            "0a000000",
            "0010000000000000"
        );
        assert_eq!(hex(&block[40..64]), descriptor);
        assert_eq!(header.batch_bytes(), 8192);
        assert_eq!(BatchHeader::decode(&block, 1, 5), Ok(header));
        record.verify(&payload).unwrap();
        assert_eq!(
            record.verify(&[0xac; 10]),
            Err(FormatError::ChecksumMismatch)
        );
    }

    #[test]
    fn batch_header_checks_identity_and_sequence() {
        let block = BatchHeader::Wrap {
            journal_id: 9,
            next_lsn: 100,
        }
        .encode();
        assert_eq!(
            BatchHeader::decode(&block, 9, 100),
            Ok(BatchHeader::Wrap {
                journal_id: 9,
                next_lsn: 100
            })
        );
        assert_eq!(
            BatchHeader::decode(&block, 8, 100),
            Err(FormatError::ForeignJournal {
                expected: 8,
                found: 9
            })
        );
        assert_eq!(
            BatchHeader::decode(&block, 9, 101),
            Err(FormatError::UnexpectedLsn {
                expected: 101,
                found: 100
            })
        );
        assert_eq!(
            BatchHeader::decode(&[0u8; BLOCK_BYTES], 9, 100),
            Err(FormatError::BadMagic)
        );
    }

    fn arb_record() -> impl Strategy<Value = (RecordKind, bool, u64, Vec<u8>, u32)> {
        (
            0u8..3,
            any::<bool>(),
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..3000),
            any::<u32>(),
        )
            .prop_map(|(k, fua, off, data, zlen)| {
                (RecordKind::from_u8(k + 1).unwrap(), fua, off, data, zlen)
            })
    }

    proptest! {
        #[test]
        fn batch_round_trip(id in any::<u64>(), first in 0u64..u64::MAX / 2, recs in proptest::collection::vec(arb_record(), 1..RECORDS_PER_BATCH_MAX)) {
            let records: Vec<_> = recs.iter().enumerate().map(|(i, (kind, fua, off, data, zlen))| {
                let (len, payload): (u32, &[u8]) = if kind.has_payload() { (data.len() as u32, data) } else { (*zlen, &[]) };
                RecordDescriptor::new(first + i as u64, *kind, *fua, *off, len, payload)
            }).collect();
            let header = BatchHeader::Records { journal_id: id, first_lsn: first, records };
            let decoded = BatchHeader::decode(&header.encode(), id, first).unwrap();
            prop_assert_eq!(decoded, header);
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..BLOCK_BYTES + 16), id in any::<u64>(), lsn in any::<u64>()) {
            let _ = BatchHeader::decode(&bytes, id, lsn);
            let _ = Superblock::decode(&bytes);
        }

        #[test]
        fn single_bit_flips_are_detected(bit in 0usize..(BLOCK_BYTES * 8)) {
            let payload = [1u8; 100];
            let record = RecordDescriptor::new(1, RecordKind::Write, false, 0, 100, &payload);
            let mut block = BatchHeader::Records { journal_id: 2, first_lsn: 1, records: vec![record] }.encode();
            block[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(BatchHeader::decode(&block, 2, 1).is_err());
        }
    }
}
