//! The in-memory index of journal records not yet applied to the backing device.
//!
//! Writes complete once they are in the journal; the device is updated in the background.
//! Until then, reads must find the newest data here. The index maps disjoint volume ranges
//! to the newest record covering them: inserting a range cuts away whatever it overlaps, so a
//! lookup never has to compare LSNs. Applying a record removes only the pieces that still
//! carry that record's LSN; pieces a newer write replaced stay until that write is applied.

use std::collections::BTreeMap;

use crate::storage::SharedBuf;

/// What a piece of the volume holds.
#[derive(Clone, Debug)]
pub enum Content {
    /// Bytes of a write payload (exactly the piece's length).
    Data(SharedBuf),
    /// Zeros (WRITE_ZEROES or TRIM); `punch` when the blocks may be deallocated.
    Zero { punch: bool },
}

impl Content {
    fn slice(&self, start: u64, end: u64) -> Content {
        match self {
            Content::Data(buf) => {
                Content::Data(buf.slice(crate::usize_from(start)..crate::usize_from(end)))
            }
            Content::Zero { punch } => Content::Zero { punch: *punch },
        }
    }

    fn data_bytes(&self) -> u64 {
        match self {
            Content::Data(buf) => buf.len() as u64,
            Content::Zero { .. } => 0,
        }
    }
}

#[derive(Clone, Debug)]
struct Piece {
    end: u64,
    lsn: u64,
    content: Content,
}

/// A piece of a lookup: `offset..offset+len` of the volume, and where to read it.
#[derive(Clone, Debug)]
pub struct Found {
    pub offset: u64,
    pub len: u64,
    /// `None`: not in the index, read the device.
    pub content: Option<Content>,
}

/// Disjoint ranges of unapplied data, keyed by start offset.
#[derive(Default)]
pub struct Index {
    pieces: BTreeMap<u64, Piece>,
    data_bytes: u64,
}

impl Index {
    pub fn new() -> Index {
        Index::default()
    }

    /// Payload bytes held in memory.
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    /// Records that `offset..offset+len` now holds `content`, written at `lsn`.
    /// LSNs must be inserted in increasing order (the journal writer assigns and inserts them
    /// in one place), so the newest record always wins.
    pub fn insert(&mut self, offset: u64, len: u64, lsn: u64, content: Content) {
        if len == 0 {
            return;
        }
        if let Content::Data(buf) = &content {
            assert_eq!(
                buf.len() as u64,
                len,
                "data length differs from the range length"
            );
        }
        let end = offset + len;
        debug_assert!(
            self.overlapping(offset, end)
                .all(|(_, piece)| piece.lsn < lsn),
            "LSNs are inserted in increasing order: the newest write wins"
        );
        self.cut(offset, end);
        self.data_bytes += content.data_bytes();
        self.pieces.insert(offset, Piece { end, lsn, content });
    }

    /// Removes the pieces of `offset..offset+len` that still belong to record `lsn`, once that
    /// record is durable on the device.
    pub fn remove_applied(&mut self, offset: u64, len: u64, lsn: u64) {
        let end = offset + len;
        let starts: Vec<u64> = self
            .overlapping(offset, end)
            .filter(|(_, p)| p.lsn == lsn)
            .map(|(s, _)| s)
            .collect();
        for start in starts {
            let piece = self.pieces.remove(&start).expect("piece listed above");
            self.data_bytes -= piece.content.data_bytes();
            // A record's pieces lie within its own range, so nothing outside it is touched.
            assert!(
                start >= offset && piece.end <= end,
                "a record's piece escapes its range"
            );
        }
    }

    /// Splits `offset..offset+len` into pieces found in the index and gaps to read from the
    /// device, in order.
    pub fn lookup(&self, offset: u64, len: u64) -> Vec<Found> {
        let end = offset + len;
        let mut found = Vec::new();
        let mut at = offset;
        let mut hits: Vec<(u64, &Piece)> = self.overlapping(offset, end).collect();
        hits.reverse();
        for (start, piece) in hits {
            let lo = start.max(offset);
            let hi = piece.end.min(end);
            if lo > at {
                found.push(Found {
                    offset: at,
                    len: lo - at,
                    content: None,
                });
            }
            found.push(Found {
                offset: lo,
                len: hi - lo,
                content: Some(piece.content.slice(lo - start, hi - start)),
            });
            at = hi;
        }
        if at < end {
            found.push(Found {
                offset: at,
                len: end - at,
                content: None,
            });
        }
        found
    }

    /// Every piece, in volume order: (offset, length, content).
    pub fn pieces(&self) -> impl Iterator<Item = (u64, u64, &Content)> {
        self.pieces
            .iter()
            .map(|(start, piece)| (*start, piece.end - start, &piece.content))
    }

    /// Pieces overlapping `offset..end`, from the highest start down.
    fn overlapping(&self, offset: u64, end: u64) -> impl Iterator<Item = (u64, &Piece)> {
        self.pieces
            .range(..end)
            .rev()
            .take_while(move |(_, p)| p.end > offset)
            .map(|(s, p)| (*s, p))
    }

    /// Removes `offset..end` from every piece, keeping the parts outside it.
    fn cut(&mut self, offset: u64, end: u64) {
        let starts: Vec<u64> = self.overlapping(offset, end).map(|(s, _)| s).collect();
        for start in starts {
            let piece = self.pieces.remove(&start).expect("piece listed above");
            self.data_bytes -= piece.content.data_bytes();
            if start < offset {
                let left = Piece {
                    end: offset,
                    lsn: piece.lsn,
                    content: piece.content.slice(0, offset - start),
                };
                self.data_bytes += left.content.data_bytes();
                self.pieces.insert(start, left);
            }
            if piece.end > end {
                let right = Piece {
                    end: piece.end,
                    lsn: piece.lsn,
                    content: piece.content.slice(end - start, piece.end - start),
                };
                self.data_bytes += right.content.data_bytes();
                self.pieces.insert(end, right);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::AlignedBuf;
    use proptest::prelude::*;

    const VOLUME: u64 = 64;

    /// Applies a lookup onto a copy of the "device" and returns what a read would see.
    fn read(index: &Index, device: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for f in index.lookup(0, VOLUME) {
            match f.content {
                None => {
                    out.extend_from_slice(&device[f.offset as usize..(f.offset + f.len) as usize])
                }
                Some(Content::Zero { .. }) => out.extend(std::iter::repeat_n(0, f.len as usize)),
                Some(Content::Data(b)) => out.extend_from_slice(&b),
            }
        }
        out
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write { offset: u64, len: u64, fill: u8 },
        Zero { offset: u64, len: u64 },
        ApplyOldest,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..VOLUME, 1..16u64, 1..255u8).prop_map(|(o, l, f)| Op::Write {
                offset: o,
                len: l.min(VOLUME - o),
                fill: f
            }),
            (0..VOLUME, 1..16u64).prop_map(|(o, l)| Op::Zero {
                offset: o,
                len: l.min(VOLUME - o)
            }),
            Just(Op::ApplyOldest),
        ]
    }

    proptest! {
        /// Reads through the index always equal a model that applies every write at once,
        /// while the "device" only receives records when the applier gets to them, in order.
        #[test]
        fn index_matches_model(ops in proptest::collection::vec(op(), 1..80)) {
            let mut index = Index::new();
            let mut model = vec![0u8; VOLUME as usize];
            let mut device = vec![0u8; VOLUME as usize];
            let mut unapplied = std::collections::VecDeque::new();
            let mut lsn = 0;
            for op in ops {
                match op {
                    Op::Write { offset, len, fill } => {
                        lsn += 1;
                        let buf = AlignedBuf::copy_from(&vec![fill; len as usize]).freeze();
                        index.insert(offset, len, lsn, Content::Data(buf));
                        model[offset as usize..(offset + len) as usize].fill(fill);
                        unapplied.push_back((lsn, offset, len, fill));
                    }
                    Op::Zero { offset, len } => {
                        lsn += 1;
                        index.insert(offset, len, lsn, Content::Zero { punch: true });
                        model[offset as usize..(offset + len) as usize].fill(0);
                        unapplied.push_back((lsn, offset, len, 0));
                    }
                    Op::ApplyOldest => {
                        if let Some((lsn, offset, len, fill)) = unapplied.pop_front() {
                            device[offset as usize..(offset + len) as usize].fill(fill);
                            index.remove_applied(offset, len, lsn);
                        }
                    }
                }
                prop_assert_eq!(&read(&index, &device), &model);
            }
            while let Some((lsn, offset, len, fill)) = unapplied.pop_front() {
                device[offset as usize..(offset + len) as usize].fill(fill);
                index.remove_applied(offset, len, lsn);
            }
            prop_assert_eq!(index.data_bytes(), 0);
            prop_assert!(index.pieces.is_empty());
            prop_assert_eq!(&device, &model);
        }
    }
}
