//! Ferry: a block replication daemon. See ARCHITECTURE.md for the map of this crate.

// Tests build fixtures with plain casts and long scenario functions; the code they test may not.
#![cfg_attr(
    test,
    allow(
        clippy::cast_possible_truncation,
        clippy::too_many_lines,
        clippy::type_complexity
    )
)]

pub mod accept;
pub mod config;
pub mod control;
pub mod daemon;
pub mod datadir;
pub mod demo;
pub mod index;
pub mod journal;
pub mod metrics;
pub mod nbd;
pub mod replication;
pub mod status;
pub mod storage;
pub mod volume;

// Ferry runs on 64-bit Linux (io_uring): a `usize` holds every offset and length a `u64` does,
// so `usize_from` below never truncates.
const _: () = assert!(usize::BITS >= u64::BITS, "Ferry needs a 64-bit target");

/// A byte offset, length or count as a `usize`, for indexing a buffer or sizing one. Lossless
/// on the targets Ferry builds for (asserted at compile time above); the one place such a
/// cast is written.
#[inline]
#[must_use]
#[allow(clippy::cast_possible_truncation)] // usize is 64 bits wide: asserted above
pub const fn usize_from(value: u64) -> usize {
    value as usize
}

/// A `u64` counter or size as the `i64` a Prometheus gauge holds, saturating at `i64::MAX`
/// (2^63 bytes or LSNs are never reached; a saturated gauge is still truthful about order).
#[inline]
#[must_use]
pub fn gauge_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod crash_tests;
