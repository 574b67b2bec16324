//! Ferry: a block replication daemon. See ARCHITECTURE.md for the map of this crate.

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
pub mod nbd_client;
pub mod replication;
pub mod storage;
pub mod volume;

#[cfg(test)]
mod crash_tests;
