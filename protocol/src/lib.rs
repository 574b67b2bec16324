//! Ferry's wire formats and state machines, with no I/O in them: the NBD protocol, the
//! journal's on-disk records, the replication frames, generation histories and the metro
//! replication of a volume ([`replication::Replicator`]). Nothing here reads a clock, opens a
//! file or a socket: time, bytes and I/O completions come in as arguments.

#![forbid(unsafe_code)]

pub mod bitmap;
pub mod generation;
pub mod journal;
pub mod nbd;
pub mod repl;
pub mod replication;
