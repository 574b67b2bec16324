//! Ferry's one integration test crate: the daemon binary driven from outside, through its
//! config, control socket, metrics endpoint and NBD listeners.
//!
//! - `harness`: the `Daemon` fixture and command helpers (timeouts, tool checks).
//! - from `ferry-testkit` (`testkit/`): `nbd_wire`, an independent blocking NBD client, also
//!   used to send malformed bytes; `model`, the write model (concurrent writers, their history,
//!   and the check of a region read back against it); `relay`, the UDP relay with delay, loss,
//!   rate cap and cuts per direction; the seed helper (`harness::test_seed`).
//! - `interop`: third-party NBD clients (nbdinfo, qemu-io, nbdcopy, fio, nbdfuse + ext4),
//!   metrics, status, config check.
//! - `wire`: malformed and out-of-range input over raw sockets.
//! - `contract`: the metrics contract (docs/metrics.txt) against a running two-node cluster:
//!   exactly the listed families on both nodes, `promtool check metrics` clean, and the
//!   operator series (role changes, writes suspended, resync size) following the cluster.
//! - `prometheus`: a real Prometheus scraping a two-node cluster under load: every dashboard
//!   query returns data, every alert's metrics are scraped, FerryReplicaNotInSync fires during
//!   a partition and resolves after it.
//! - `deploy`: the deploy/ files with the tools that read them: `promtool check rules` and
//!   `promtool test rules`, every dashboard query parsed, only contract metrics in rules,
//!   dashboard and docs, a runbook section per alert, the Kubernetes manifests (PyYAML) and
//!   the systemd unit (`systemd-analyze verify`).
//! - `crash`: kill -9 under concurrent writes, checked against the model.
//! - `power_loss` (with the `fault-injection` feature, which `tests/run.sh` turns on): kill -9
//!   plus the loss of every write the daemon had not made durable, replayed from the undo logs
//!   the daemon keeps with `FERRY_FAULT_POWER_LOSS=1`; the fault switches themselves.
//! - `cluster`: the two- or three-node fixture (certificates, configs, an optional relay per
//!   link) for replication.
//! - `metro`: metro replication: initial sync, RPO 0 under kill -9, resync after a secondary
//!   crash or a link cut, a corrupt frame, foreign certificates, switchover with real clients.
//! - `metro_repair`: the operator's repair commands: `ferry resolve --discard-local` after a
//!   split brain (a delta resync of the loser, the refusals), `ferry verify [--repair]` (no
//!   false difference with zeroes, trims and a light load; blocks flipped behind Ferry's back
//!   found exactly, logged and repaired, also under a light load and in a short last block; a
//!   verify cut between its passes is not a clean result).
//! - `metro_roles`: role changes under faults: a link lost while a demotion drains, an old
//!   primary restarted behind a partition (fencing), `on_disconnect = "suspend"` after a
//!   restart.
//! - `metro_power` (with the `fault-injection` feature): a power loss of the metro primary
//!   (its unflushed journal tail gone, its secondary holding it), then failover and rejoin, or
//!   a restart as primary; both must end with every completed write kept and identical copies.
//! - `metro_hostile`: an authenticated but hostile metro peer (the test plays b against a real
//!   primary, and a against a real secondary: valid frames, hostile contents), and a slow
//!   secondary device (`fault-injection`) during a resync: bounded memory, no timeouts.
//! - `real_disk`: a loop device with 4096-byte logical sectors driven at 512-byte granularity
//!   (qemu-io, kill -9, ext4 with discard through nbdfuse), and a device file whose
//!   filesystem fills up (one volume fails readable, the node serves on, a restart recovers);
//!   peak memory under streams of small discards and under many connections.
//! - `operations`: the runbook test: every procedure of docs/operations.md (first setup,
//!   switchover, failover, failback, split brain, a full journal, replacing a node, upgrading,
//!   rotating certificates) run from the document's own commands against a real pair; also
//!   `ferry status`'s exit codes and fixes, JSON logs, and a quiet steady state.
//! - `metro3`: three metro copies: the secondaries never resync each other, a copy that was
//!   away catches up, the third copy follows a promoted secondary.
//!
//! Environment: FERRY_SKIP_INTEROP=1 skips the third-party tool tests (printed), FERRY_SEED
//! replays a randomized test, FERRY_LONG=1 runs the long variants, FERRY_KEEP=1 keeps the
//! test directories.

// Without the `fault-injection` feature the power-loss tests are left out (the daemon cannot
// inject the fault), and the helpers only they use are unused; the README's test command
// builds with the feature and checks them all.
#![cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
// Test fixtures use plain casts on small known values and long scenario functions (each a
// story of one fault); the daemon's own code may not.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss,
    clippy::too_many_lines,
    clippy::type_complexity
)]

mod cluster;
mod contract;
mod crash;
mod deploy;
mod harness;
mod interop;
mod metro;
mod metro3;
mod metro_hostile;
#[cfg(feature = "fault-injection")]
mod metro_power;
mod metro_repair;
mod metro_roles;
mod operations;
#[cfg(feature = "fault-injection")]
mod power_loss;
mod prometheus;
mod real_disk;
mod regional;
mod wire;

// The shared test support (one seed helper, relay, NBD client and write model).
use ferry_testkit::{model, nbd_wire, relay};
