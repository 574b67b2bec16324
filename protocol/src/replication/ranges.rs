//! A set of disjoint byte ranges: what a resync still has to send, what a verify found.

use std::collections::BTreeMap;

/// Disjoint, non-adjacent byte ranges with their total size.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    /// start → end (exclusive).
    ranges: BTreeMap<u64, u64>,
    bytes: u64,
}

impl RangeSet {
    /// Adds `[offset, offset + len)`, merging with every range it overlaps or touches.
    pub fn insert(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let mut start = offset;
        let mut end = offset.saturating_add(len);
        let touching: Vec<(u64, u64)> = self
            .ranges
            .range(..=end)
            .rev()
            .take_while(|(_, e)| **e >= start)
            .map(|(s, e)| (*s, *e))
            .collect();
        for (s, e) in touching {
            self.ranges.remove(&s);
            self.bytes -= e - s;
            start = start.min(s);
            end = end.max(e);
        }
        self.ranges.insert(start, end);
        self.bytes += end - start;
    }

    /// Takes up to `max` bytes from the start of the first range.
    pub fn pop(&mut self, max: u64) -> Option<(u64, u64)> {
        let (&start, &end) = self.ranges.iter().next()?;
        self.ranges.remove(&start);
        let len = (end - start).min(max);
        if start + len < end {
            self.ranges.insert(start + len, end);
        }
        self.bytes -= len;
        Some((start, len))
    }

    /// Whether any byte of `[offset, offset + len)` is in the set.
    pub fn overlaps(&self, offset: u64, len: u64) -> bool {
        let end = offset.saturating_add(len);
        self.ranges
            .range(..end)
            .next_back()
            .is_some_and(|(_, e)| *e > offset)
    }

    /// Total bytes in the set.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// No range.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The ranges as (offset, len), in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().map(|(s, e)| (*s, e - s))
    }

    /// Empties the set.
    pub fn clear(&mut self) {
        self.ranges.clear();
        self.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::RangeSet;

    #[test]
    fn merges_pops_and_overlaps() {
        let mut set = RangeSet::default();
        set.insert(4096, 4096);
        set.insert(0, 4096);
        set.insert(16384, 4096);
        set.insert(8192, 100);
        assert_eq!(set.bytes(), 8192 + 100 + 4096);
        assert!(set.overlaps(8291, 10));
        assert!(!set.overlaps(8292, 8092));
        assert!(set.overlaps(0, 1));
        assert_eq!(set.pop(5000), Some((0, 5000)));
        assert_eq!(set.pop(1 << 20), Some((5000, 8292 - 5000)));
        assert_eq!(set.pop(1 << 20), Some((16384, 4096)));
        assert_eq!(set.pop(1), None);
        assert_eq!(set.bytes(), 0);
        set.insert(0, 10);
        set.insert(5, 10);
        set.insert(100, 1);
        set.insert(0, 200);
        assert_eq!(set.bytes(), 200);
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![(0, 200)]);
    }
}
