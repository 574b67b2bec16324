//! Ferry's test support, one copy of each: the seed of a randomized test ([`seed`]), the UDP
//! relay that plays the network's faults ([`relay`], also the benchmark's delay line), an
//! independent blocking NBD client written from the protocol document ([`nbd_wire`]), and the
//! write model that checks a region read back against what clients saw complete ([`model`]).
//!
//! Used by the integration tests (`tests/it`) and the benchmark relay (`benches/relay`); it
//! depends on no Ferry crate, so the tests never check Ferry with Ferry's own code.

// Test support: fixtures use plain casts on small known values and long scenario functions.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss,
    clippy::too_many_lines
)]

pub mod model;
#[allow(dead_code)] // the protocol constants are listed whole, used or not
pub mod nbd_wire;
pub mod relay;
pub mod seed;
