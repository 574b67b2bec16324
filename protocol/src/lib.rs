//! Ferry's wire formats and state machines, with no I/O in them: the NBD protocol, the
//! journal's on-disk records, the replication frames, generation histories and the metro
//! replication of a volume ([`replication::Replicator`]). Nothing here reads a clock, opens a
//! file or a socket: time, bytes and I/O completions come in as arguments.

#![forbid(unsafe_code)]
// Tests build fixtures with plain casts and long scenario functions; the code they test may not.
#![cfg_attr(
    test,
    allow(
        clippy::cast_possible_truncation,
        clippy::too_many_lines,
        clippy::type_complexity
    )
)]

pub mod bitmap;
pub mod catchup;
pub mod generation;
pub mod journal;
pub mod nbd;
pub mod repl;
pub mod replication;
pub mod stage;
