//! The in-memory half of a dirty map: one bit per [`BLOCK_BYTES`] block of a volume, with the
//! bitmap pages changed since the last persist tracked so that only those are written.
//!
//! A set bit means "this block may differ between this copy and one peer". The file that makes
//! a map durable (its header, its page layout, when it is synced) belongs to the daemon; this
//! type only says which pages changed and hands out their contents. Persists are sequenced by
//! the caller: one at a time per map, each either completing ([`BlockBitmap::persisted`]) or
//! failing ([`BlockBitmap::persist_failed`], after which the next persist carries every page,
//! because a failed `fdatasync` may have dropped pages the bitmap no longer tracks).
//!
//! Invariants, checked by [`BlockBitmap::check`] in tests and after every change in debug
//! builds: bits at or past the block count are zero; `set_bits` counts the set bits; every page
//! changed since the last [`BlockBitmap::take_changes`] is flagged in `changed_pages`.

/// Bytes of volume per bit: one bit per 4 KiB block, like DRBD.
pub const BLOCK_BYTES: u64 = 4096;
/// Bytes of bitmap per page, the unit of change tracking and of persistence.
pub const PAGE_BYTES: u64 = 4096;
/// 64-bit words in one page.
pub const WORDS_PER_PAGE: usize = (PAGE_BYTES / 8) as usize;

const _: () = assert!(PAGE_BYTES.is_multiple_of(8));
const _: () = assert!(BLOCK_BYTES.is_power_of_two());

/// The pages one persist must write: their indexes and contents, in page order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapChanges {
    /// Every page is carried (after a failed persist, or the first persist of a new map).
    pub full: bool,
    /// (page index, the page's words), for every changed page.
    pub pages: Vec<(usize, Vec<u64>)>,
}

impl BitmapChanges {
    /// Whether nothing needs writing.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }
}

/// A bitmap of blocks of a volume of `size_bytes`. See the module doc.
#[derive(Clone, PartialEq, Eq)]
pub struct BlockBitmap {
    size_bytes: u64,
    /// Number of blocks = bits: `ceil(size_bytes / BLOCK_BYTES)`.
    blocks: u64,
    /// The bitmap; bits at or past `blocks` are always zero.
    words: Vec<u64>,
    /// Number of set bits in `words`.
    set_bits: u64,
    /// One bit per page changed since the last `take_changes`.
    changed_pages: Vec<u64>,
    /// The next `take_changes` must carry every page.
    rewrite_all: bool,
}

impl std::fmt::Debug for BlockBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockBitmap")
            .field("size_bytes", &self.size_bytes)
            .field("dirty_bytes", &self.dirty_bytes())
            .field("rewrite_all", &self.rewrite_all)
            .finish()
    }
}

/// Mask of bits `lo..hi` of a word (`lo < hi <= 64`).
fn bit_mask(lo: u64, hi: u64) -> u64 {
    debug_assert!(lo < hi && hi <= 64);
    let upper = if hi == 64 { !0 } else { (1u64 << hi) - 1 };
    upper & !((1u64 << lo) - 1)
}

/// Why words read back from a file are not a bitmap of the expected volume.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BitmapError {
    /// The number of words does not match the volume size.
    #[error("{found} bitmap words, expected {expected}")]
    WrongLength { found: usize, expected: usize },
    /// A bit past the last block is set: the file is corrupt.
    #[error("bits set past the last block ({blocks} blocks)")]
    BitsPastEnd { blocks: u64 },
}

impl BlockBitmap {
    /// A clean bitmap of a volume of `size_bytes`.
    pub fn new(size_bytes: u64) -> BlockBitmap {
        let blocks = size_bytes.div_ceil(BLOCK_BYTES);
        let words = Self::word_count(size_bytes);
        BlockBitmap {
            size_bytes,
            blocks,
            words: vec![0; words],
            set_bits: 0,
            changed_pages: vec![0; Self::page_count_for(words).div_ceil(64)],
            rewrite_all: false,
        }
    }

    /// Words a bitmap of a volume of `size_bytes` has.
    pub fn word_count(size_bytes: u64) -> usize {
        usize::try_from(size_bytes.div_ceil(BLOCK_BYTES).div_ceil(64))
            .expect("a bitmap of this volume does not fit in memory")
    }

    fn page_count_for(words: usize) -> usize {
        words.div_ceil(WORDS_PER_PAGE)
    }

    /// Pages a bitmap of a volume of `size_bytes` has (what its file holds after the header).
    pub fn page_count(size_bytes: u64) -> usize {
        Self::page_count_for(Self::word_count(size_bytes))
    }

    /// A bitmap with the contents read back from a file (no page is flagged as changed).
    pub fn from_words(size_bytes: u64, words: Vec<u64>) -> Result<BlockBitmap, BitmapError> {
        let mut bitmap = BlockBitmap::new(size_bytes);
        if words.len() != bitmap.words.len() {
            return Err(BitmapError::WrongLength {
                found: words.len(),
                expected: bitmap.words.len(),
            });
        }
        let tail = bitmap.blocks % 64;
        if tail != 0 && words.last().is_some_and(|w| w & !bit_mask(0, tail) != 0) {
            return Err(BitmapError::BitsPastEnd {
                blocks: bitmap.blocks,
            });
        }
        bitmap.set_bits = words.iter().map(|w| u64::from(w.count_ones())).sum();
        bitmap.words = words;
        Ok(bitmap)
    }

    /// The volume size this bitmap covers.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Sets or clears the blocks `first..end` (`end <= blocks`); returns whether any changed.
    fn set_range(&mut self, first: u64, end: u64, value: bool) -> bool {
        if first >= end {
            return false;
        }
        assert!(end <= self.blocks, "range past the last block");
        let mut changed = false;
        let mut block = first;
        while block < end {
            let word = (block / 64) as usize;
            let lo = block % 64;
            let hi = (end - word as u64 * 64).min(64);
            let mask = bit_mask(lo, hi);
            let old = self.words[word];
            let new = if value { old | mask } else { old & !mask };
            if new != old {
                let diff = u64::from((old ^ new).count_ones());
                if value {
                    self.set_bits += diff;
                } else {
                    self.set_bits -= diff;
                }
                self.words[word] = new;
                let page = word / WORDS_PER_PAGE;
                self.changed_pages[page / 64] |= 1 << (page % 64);
                changed = true;
            }
            block = word as u64 * 64 + hi;
        }
        debug_assert!(self.check().is_ok());
        changed
    }

    /// Marks every block that `[offset_bytes, offset_bytes + len_bytes)` touches, partially
    /// covered blocks included. Clamped to the volume; returns whether a bit was newly set.
    pub fn mark(&mut self, offset_bytes: u64, len_bytes: u64) -> bool {
        if len_bytes == 0 || offset_bytes >= self.size_bytes {
            return false;
        }
        let end = offset_bytes.saturating_add(len_bytes).min(self.size_bytes);
        let first = offset_bytes / BLOCK_BYTES;
        let last = (end - 1) / BLOCK_BYTES;
        self.set_range(first, last + 1, true)
    }

    /// Marks the whole volume.
    pub fn mark_all(&mut self) -> bool {
        self.set_range(0, self.blocks, true)
    }

    /// Clears only the blocks lying fully inside the range (a partly covered block may still
    /// differ outside it). The last block counts as fully covered when the range reaches the
    /// end of the volume. Returns whether a bit changed.
    pub fn clear(&mut self, offset_bytes: u64, len_bytes: u64) -> bool {
        if len_bytes == 0 || offset_bytes >= self.size_bytes {
            return false;
        }
        let end = offset_bytes.saturating_add(len_bytes).min(self.size_bytes);
        let first = offset_bytes.div_ceil(BLOCK_BYTES);
        let end_block = if end == self.size_bytes {
            self.blocks
        } else {
            end / BLOCK_BYTES
        };
        self.set_range(first, end_block, false)
    }

    /// Clears every block.
    pub fn clear_all(&mut self) -> bool {
        self.set_range(0, self.blocks, false)
    }

    /// No block is marked. O(1).
    pub fn is_clean(&self) -> bool {
        self.set_bits == 0
    }

    /// Bytes of volume covered by marked blocks (the last block by its real size).
    pub fn dirty_bytes(&self) -> u64 {
        let mut bytes = self.set_bits * BLOCK_BYTES;
        let tail = self.size_bytes % BLOCK_BYTES;
        if tail != 0 && self.bit(self.blocks - 1) {
            bytes -= BLOCK_BYTES - tail;
        }
        bytes
    }

    /// Whether the block holding byte `offset_bytes` is marked.
    pub fn is_marked(&self, offset_bytes: u64) -> bool {
        offset_bytes < self.size_bytes && self.bit(offset_bytes / BLOCK_BYTES)
    }

    fn bit(&self, block: u64) -> bool {
        self.words[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    /// First marked block at or after `from`.
    fn next_set(&self, from: u64) -> Option<u64> {
        if from >= self.blocks {
            return None;
        }
        let word = (from / 64) as usize;
        let w = self.words[word] & (!0u64 << (from % 64));
        if w != 0 {
            return Some(word as u64 * 64 + u64::from(w.trailing_zeros()));
        }
        // Bits past `blocks` are zero, so any hit in a later word is a real block.
        let skip = self.words[word + 1..].iter().position(|&w| w != 0)?;
        let at = word + 1 + skip;
        Some(at as u64 * 64 + u64::from(self.words[at].trailing_zeros()))
    }

    /// First clear block at or after `from`, or `blocks` when every later one is marked.
    fn next_clear(&self, from: u64) -> u64 {
        if from >= self.blocks {
            return self.blocks;
        }
        let word = (from / 64) as usize;
        let w = !self.words[word] & (!0u64 << (from % 64));
        if w != 0 {
            return (word as u64 * 64 + u64::from(w.trailing_zeros())).min(self.blocks);
        }
        match self.words[word + 1..].iter().position(|&w| w != !0) {
            Some(skip) => {
                let at = word + 1 + skip;
                (at as u64 * 64 + u64::from((!self.words[at]).trailing_zeros())).min(self.blocks)
            }
            None => self.blocks,
        }
    }

    /// Marked ranges `(offset, len)` in offset order from `from_offset` (rounded down to a
    /// block): adjacent marked blocks merge; a run longer than `max_range_bytes` (at least one
    /// block) is split; a range reaching the end of the volume ends at `size_bytes`. At most
    /// `max_ranges` ranges; continue from the end of the last one.
    pub fn ranges_from(
        &self,
        from_offset: u64,
        max_range_bytes: u64,
        max_ranges: usize,
    ) -> Vec<(u64, u64)> {
        let max_blocks = (max_range_bytes / BLOCK_BYTES).max(1);
        let mut out = Vec::new();
        let mut position = from_offset / BLOCK_BYTES;
        while out.len() < max_ranges {
            let Some(start) = self.next_set(position) else {
                break;
            };
            let end = self.next_clear(start);
            let mut at = start;
            while at < end && out.len() < max_ranges {
                let stop = at.saturating_add(max_blocks).min(end);
                let offset = at * BLOCK_BYTES;
                out.push((offset, (stop * BLOCK_BYTES).min(self.size_bytes) - offset));
                at = stop;
            }
            position = end;
        }
        out
    }

    /// Every marked range, merged, in offset order.
    pub fn all_ranges(&self) -> Vec<(u64, u64)> {
        self.ranges_from(0, u64::MAX, usize::MAX)
    }

    /// Whether pages changed since the last [`take_changes`](Self::take_changes) (or a failed
    /// persist left the file behind).
    pub fn has_changes(&self) -> bool {
        self.rewrite_all || self.changed_pages.iter().any(|w| *w != 0)
    }

    /// Hands out the pages changed since the last call (all of them after a failed persist)
    /// and forgets the changes. The caller writes them and reports back with
    /// [`persisted`](Self::persisted) or [`persist_failed`](Self::persist_failed).
    pub fn take_changes(&mut self) -> BitmapChanges {
        let full = std::mem::take(&mut self.rewrite_all);
        let pages_total = Self::page_count_for(self.words.len());
        let mut pages = Vec::new();
        for page in 0..pages_total {
            let changed = self.changed_pages[page / 64] & (1 << (page % 64)) != 0;
            if full || changed {
                let start = page * WORDS_PER_PAGE;
                let end = (start + WORDS_PER_PAGE).min(self.words.len());
                let mut words = self.words[start..end].to_vec();
                words.resize(WORDS_PER_PAGE, 0);
                pages.push((page, words));
            }
        }
        self.changed_pages.fill(0);
        BitmapChanges { full, pages }
    }

    /// The last changes handed out did not reach the file: the next persist writes every page.
    pub fn persist_failed(&mut self) {
        self.rewrite_all = true;
    }

    /// The next persist writes every page (a new file, or one of unknown contents).
    pub fn rewrite_all(&mut self) {
        self.rewrite_all = true;
    }

    /// Checks the invariants of the module doc.
    pub fn check(&self) -> Result<(), String> {
        let tail = self.blocks % 64;
        if tail != 0
            && self
                .words
                .last()
                .is_some_and(|w| w & !bit_mask(0, tail) != 0)
        {
            return Err("bits set past the last block".into());
        }
        let counted: u64 = self.words.iter().map(|w| u64::from(w.count_ones())).sum();
        if counted != self.set_bits {
            return Err(format!("set_bits {} but {counted} bits set", self.set_bits));
        }
        Ok(())
    }

    /// The words, for tests and for writing a whole new file.
    pub fn words(&self) -> &[u64] {
        &self.words
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    const B: u64 = BLOCK_BYTES;

    fn blocks_of(bitmap: &BlockBitmap) -> BTreeSet<u64> {
        bitmap
            .all_ranges()
            .into_iter()
            .flat_map(|(offset, len)| (offset / B)..(offset + len).div_ceil(B))
            .collect()
    }

    #[test]
    fn mark_clear_and_ranges() {
        let mut bitmap = BlockBitmap::new(10 * B + 100);
        assert!(bitmap.is_clean());
        assert!(bitmap.mark(B + 1, 1));
        assert!(!bitmap.mark(B, B), "already marked");
        assert!(bitmap.mark(3 * B, 2 * B));
        assert_eq!(bitmap.all_ranges(), vec![(B, B), (3 * B, 2 * B)]);
        assert!(bitmap.mark(10 * B, 50));
        assert_eq!(bitmap.dirty_bytes(), 3 * B + 100);
        assert_eq!(bitmap.ranges_from(0, B, 2), vec![(B, B), (3 * B, B)]);
        // A partly covered block stays marked; the volume's last block clears to the end.
        assert!(!bitmap.clear(3 * B + 1, B));
        assert!(bitmap.clear(10 * B, 100));
        assert!(bitmap.clear(3 * B, 2 * B));
        assert_eq!(blocks_of(&bitmap), BTreeSet::from([1]));
        assert!(bitmap.clear_all());
        assert!(bitmap.is_clean());
        assert!(!bitmap.mark(11 * B, 1), "past the end");
        bitmap.check().unwrap();
    }

    #[test]
    fn changes_carry_changed_pages_then_everything_after_a_failure() {
        let size = 3 * WORDS_PER_PAGE as u64 * 64 * B;
        let mut bitmap = BlockBitmap::new(size);
        assert!(!bitmap.has_changes());
        bitmap.mark(0, B);
        bitmap.mark(size - B, B);
        let changes = bitmap.take_changes();
        assert!(!changes.full);
        assert_eq!(
            changes.pages.iter().map(|p| p.0).collect::<Vec<_>>(),
            vec![0, 2]
        );
        assert_eq!(changes.pages[0].1[0], 1);
        assert!(!bitmap.has_changes());
        bitmap.persist_failed();
        assert!(bitmap.has_changes());
        let changes = bitmap.take_changes();
        assert!(changes.full);
        assert_eq!(changes.pages.len(), 3);
        assert!(bitmap.take_changes().is_empty());
    }

    #[test]
    fn from_words_checks_length_and_tail() {
        let size = 70 * B;
        assert_eq!(
            BlockBitmap::from_words(size, vec![0]),
            Err(BitmapError::WrongLength {
                found: 1,
                expected: 2
            })
        );
        assert_eq!(
            BlockBitmap::from_words(size, vec![0, 1 << 10]),
            Err(BitmapError::BitsPastEnd { blocks: 70 })
        );
        let bitmap = BlockBitmap::from_words(size, vec![!0, 0b11]).unwrap();
        assert_eq!(bitmap.dirty_bytes(), 66 * B);
        assert!(!bitmap.has_changes());
    }

    proptest! {
        #[test]
        fn matches_a_set_of_blocks(
            blocks in 1u64..300,
            ops in proptest::collection::vec((any::<bool>(), 0u64..1_400_000, 0u64..200_000), 0..40),
        ) {
            let size = blocks * B - (blocks % 3) * 100;
            let mut bitmap = BlockBitmap::new(size);
            let mut model = BTreeSet::new();
            for (set, offset, len) in ops {
                let end = offset.saturating_add(len).min(size);
                if set {
                    bitmap.mark(offset, len);
                    if len > 0 && offset < size {
                        model.extend((offset / B)..=((end - 1) / B));
                    }
                } else {
                    bitmap.clear(offset, len);
                    if len > 0 && offset < size {
                        let first = offset.div_ceil(B);
                        let stop = if end == size { size.div_ceil(B) } else { end / B };
                        for block in first..stop {
                            model.remove(&block);
                        }
                    }
                }
                prop_assert!(bitmap.check().is_ok());
                prop_assert_eq!(blocks_of(&bitmap), model.clone());
            }
        }
    }
}
