//! NBD: the server that exports Ferry's volumes ([`server`], re-exported here), and Ferry's
//! own client ([`client`]) for `ferry demo` and the tests. Wire formats live in
//! `ferry_protocol::nbd`, shared by both.

pub mod client;
mod server;

pub use server::*;
