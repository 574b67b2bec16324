//! Ferry: a block replication daemon. See ARCHITECTURE.md for the map of this crate.

pub mod accept;
pub mod config;
pub mod control;
pub mod daemon;
pub mod demo;
pub mod dirty;
pub mod index;
pub mod journal;
pub mod metrics;
pub mod nbd;
pub mod nbd_client;
pub mod replica;
pub mod storage;
pub mod tls;
pub mod transport;
pub mod volume;

#[cfg(test)]
mod crash_tests;
