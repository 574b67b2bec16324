//! Prometheus metrics with the names of SPEC §6, and the `/metrics` HTTP endpoint.
//!
//! Hot paths hold pre-resolved handles ([`VolumeMetrics`], [`ReplicaMetrics`]): looking a label
//! set up takes a lock and a hash, which a 4 KiB write at loopback latency should not pay.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    exponential_buckets, Counter, CounterVec, Gauge, GaugeVec, Histogram, HistogramOpts,
    HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use ferry_protocol::replication::ReplicaState;

use crate::accept::serve_bounded;

/// Smallest latency bucket: a loopback journal write is tens of microseconds.
const LATENCY_BUCKET_START_SECONDS: f64 = 5e-6;
/// Each bucket is 1.6 times the previous one: about 20% resolution around any value.
const LATENCY_BUCKET_FACTOR: f64 = 1.6;
/// 5 µs · 1.6^31 ≈ 10.4 s, enough for a WAN round trip under load.
const LATENCY_BUCKET_COUNT: usize = 32;

/// Request heads larger than this are refused: `/metrics` needs no more than a request line.
const HTTP_HEAD_LENGTH_MAX: usize = 8 * 1024;
/// A scraper that does not send its request in this time is dropped, so it cannot hold a slot.
const HTTP_HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Bounds the time spent writing to a scraper that stopped reading.
const HTTP_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent scrape connections; more wait in the kernel's accept queue.
const HTTP_CONNECTIONS_MAX: usize = 16;

/// Where corruption is detected (`ferry_checksum_errors_total{where}`): a journal record at
/// replay, a replication frame, a block of `ferry verify`. Every volume exports all three from
/// its start, so that `increase()` sees the first error.
pub const CHECKSUM_WHERE: [&str; 3] = ["journal", "replication", "verify"];
/// The roles of `ferry_volume_role` and the `to` label of `ferry_volume_role_changes_total`.
const ROLES: [&str; 2] = ["primary", "secondary"];

/// NBD ops that get a pre-resolved counter; others fall back to a label lookup.
const COMMON_OPS: [&str; 6] = ["read", "write", "flush", "trim", "write_zeroes", "disc"];
/// The states of SPEC §5 (and `standby`: two secondaries of one primary, connected);
/// `ferry_replica_state` is 1 for the current one, 0 for the others.
pub const REPLICA_STATES: [&str; ReplicaState::ALL.len()] = {
    let mut names = [""; ReplicaState::ALL.len()];
    let mut i = 0;
    while i < names.len() {
        names[i] = ReplicaState::ALL[i].as_str();
        i += 1;
    }
    names
};

/// Errors of the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The metrics_listen address could not be bound.
    #[error(
        "cannot listen for /metrics on {addr}: {source}; pick a free address for metrics_listen"
    )]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Every Ferry metric, registered in a private registry (not the global one, so tests and
/// several daemons in one process do not collide).
pub struct Metrics {
    registry: Registry,
    build_info: IntGaugeVec,
    write_latency: HistogramVec,
    flush_latency: HistogramVec,
    read_latency: HistogramVec,
    io_requests: IntCounterVec,
    io_errors: IntCounterVec,
    io_bytes: IntCounterVec,
    volume_role: IntGaugeVec,
    volume_role_changes: IntCounterVec,
    replica_state: IntGaugeVec,
    replica_split_brain: IntGaugeVec,
    replica_lag_bytes: IntGaugeVec,
    replica_lag_seconds: GaugeVec,
    replica_rtt: HistogramVec,
    replication_bytes: IntCounterVec,
    regional_apply_bytes: IntCounterVec,
    regional_apply_seconds: CounterVec,
    journal_used_bytes: IntGaugeVec,
    journal_capacity_bytes: IntGaugeVec,
    journal_head_lsn: IntGaugeVec,
    journal_applied_lsn: IntGaugeVec,
    journal_unapplied_bytes: IntGaugeVec,
    journal_full_waits: IntCounterVec,
    journal_full_wait_seconds: CounterVec,
    resync_remaining_bytes: IntGaugeVec,
    resync_total_bytes: IntGaugeVec,
    resync_bytes: IntCounterVec,
    peer_auth_failures: IntCounterVec,
    checksum_errors: IntCounterVec,
    recovery_replayed_records: IntGaugeVec,
    recovery_replayed_bytes: IntGaugeVec,
    recovery_torn_tail_bytes: IntGaugeVec,
    volume_failed: IntGaugeVec,
    volume_writes_held: IntGaugeVec,
    volume_io_suspended: IntGaugeVec,
    volume_consistent: IntGaugeVec,
    verify_differing_bytes: IntGaugeVec,
}

/// Handles for one volume. Cloning is cheap (reference counts).
#[derive(Clone)]
pub struct VolumeMetrics {
    /// `ferry_write_latency_seconds{stage="total"}`: what the NBD client sees.
    pub write_latency_total: Histogram,
    /// `ferry_write_latency_seconds{stage="journal"}`: the local journal append.
    pub write_latency_journal: Histogram,
    pub flush_latency: Histogram,
    pub read_latency: Histogram,
    /// `ferry_io_bytes_total{op="read"}`: bytes returned by successful reads.
    pub read_bytes_total: IntCounter,
    /// `ferry_io_bytes_total{op="write"}`: bytes of successful writes (not zeroes or trims).
    pub write_bytes_total: IntCounter,
    pub journal_used_bytes: IntGauge,
    pub journal_capacity_bytes: IntGauge,
    pub journal_head_lsn: IntGauge,
    pub journal_applied_lsn: IntGauge,
    /// Bytes in the journal not yet applied to the backing device.
    pub journal_unapplied_bytes: IntGauge,
    /// Writes that had to wait for journal space.
    pub journal_full_waits_total: IntCounter,
    /// Total time writes spent waiting for journal space.
    pub journal_full_wait_seconds_total: Counter,
    pub recovery_replayed_records: IntGauge,
    pub recovery_replayed_bytes: IntGauge,
    pub recovery_torn_tail_bytes: IntGauge,
    /// `ferry_volume_failed`: 1 once a journal or device I/O failed and the volume stopped
    /// serving writes (until restart).
    pub volume_failed: IntGauge,
    /// `ferry_volume_writes_held`: 1 while client writes are held (fencing, a hand-over).
    pub writes_held: IntGauge,
    /// `ferry_volume_io_suspended`: 1 while a metro replica with `on_disconnect = "suspend"`
    /// has lost its peer: writes do not complete until it is back.
    pub io_suspended: IntGauge,
    /// `ferry_volume_consistent`: 0 while a resync into this copy has not finished.
    pub volume_consistent: IntGauge,
    role_primary: IntGauge,
    role_secondary: IntGauge,
    role_vec: IntGaugeVec,
    /// `ferry_volume_role_changes_total{to}`, in the order of [`ROLES`].
    role_changes: [IntCounter; ROLES.len()],
    role_changes_vec: IntCounterVec,
    io_requests_common: [IntCounter; COMMON_OPS.len()],
    io_errors_common: [IntCounter; COMMON_OPS.len()],
    io_requests_vec: IntCounterVec,
    io_errors_vec: IntCounterVec,
    checksum_errors_vec: IntCounterVec,
    volume: Arc<str>,
}

/// Handles for one replica (a volume on one peer). Cloning is cheap.
#[derive(Clone)]
pub struct ReplicaMetrics {
    /// `ferry_write_latency_seconds{stage="replica"}` of the volume: the wait for metro peers.
    pub write_latency_replica: Histogram,
    pub lag_bytes: IntGauge,
    pub lag_seconds: Gauge,
    pub rtt: Histogram,
    /// `ferry_replication_bytes_total{kind="logical"}`: bytes written by clients.
    pub logical_bytes_total: IntCounter,
    /// `ferry_replication_bytes_total{kind="wire"}`: bytes sent after compression, coalescing.
    pub wire_bytes_total: IntCounter,
    /// `ferry_regional_apply_bytes_total`: payload bytes of the batches from this peer that
    /// this regional secondary applied to its device.
    pub regional_apply_bytes_total: IntCounter,
    /// `ferry_regional_apply_seconds_total`: time spent applying them (after each batch was
    /// stored): so the apply rate is the ratio of the two.
    pub regional_apply_seconds_total: Counter,
    pub resync_remaining_bytes: IntGauge,
    /// `ferry_resync_total_bytes`: the running resync's size (sent plus remaining).
    pub resync_total_bytes: IntGauge,
    pub resync_bytes_total: IntCounter,
    /// `ferry_verify_differing_bytes`: what the last verify against the peer found.
    pub verify_differing_bytes: IntGauge,
    states: [IntGauge; REPLICA_STATES.len()],
    /// `ferry_replica_split_brain`: follows the `split-brain` state (see `set_state`).
    split_brain: IntGauge,
}

fn latency_buckets() -> Vec<f64> {
    // The constants are valid (start > 0, factor > 1, count ≥ 1), so this cannot fail.
    exponential_buckets(
        LATENCY_BUCKET_START_SECONDS,
        LATENCY_BUCKET_FACTOR,
        LATENCY_BUCKET_COUNT,
    )
    .expect("constant bucket parameters are valid")
    .into_iter()
    // Three significant digits: `le="0.0000128"` rather than `le="0.000012800000000000003"`
    // (a tenth of the bytes of a scrape: bucket lines are most of it).
    .map(|bound| {
        format!("{bound:.2e}")
            .parse()
            .expect("a formatted float parses")
    })
    .collect()
}

impl Metrics {
    // One declaration per series, in the order of SPEC §6: a flat list reads better than pieces.
    #[allow(clippy::too_many_lines)]
    pub fn new() -> Arc<Metrics> {
        let registry = Registry::new();
        // Registration fails only on a duplicate or malformed name, which are constants here:
        // a failure is a programming error, caught by the first test that builds Metrics.
        fn register<C: prometheus::core::Collector + Clone + 'static>(
            registry: &Registry,
            collector: C,
        ) -> C {
            registry
                .register(Box::new(collector.clone()))
                .expect("metric names are unique constants");
            collector
        }
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            let opts = HistogramOpts::new(name, help).buckets(latency_buckets());
            register(
                &registry,
                HistogramVec::new(opts, labels).expect("valid histogram"),
            )
        };
        let int_gauge = |name: &str, help: &str, labels: &[&str]| {
            register(
                &registry,
                IntGaugeVec::new(Opts::new(name, help), labels).expect("valid gauge"),
            )
        };
        let int_counter = |name: &str, help: &str, labels: &[&str]| {
            register(
                &registry,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter"),
            )
        };
        let metrics = Metrics {
            build_info: int_gauge(
                "ferry_build_info",
                "Always 1; the version label says which Ferry this is.",
                &["version"],
            ),
            write_latency: histogram(
                "ferry_write_latency_seconds",
                "Client-visible write latency (stage=total) and its parts (journal, replica).",
                &["volume", "stage"],
            ),
            flush_latency: histogram("ferry_flush_latency_seconds", "FLUSH latency.", &["volume"]),
            read_latency: histogram("ferry_read_latency_seconds", "Read latency.", &["volume"]),
            io_requests: int_counter(
                "ferry_io_requests_total",
                "NBD requests by op.",
                &["volume", "op"],
            ),
            io_errors: int_counter(
                "ferry_io_errors_total",
                "NBD requests answered with an error, by op.",
                &["volume", "op"],
            ),
            io_bytes: int_counter(
                "ferry_io_bytes_total",
                "Bytes of successful NBD reads (op=read) and writes (op=write).",
                &["volume", "op"],
            ),
            volume_role: int_gauge(
                "ferry_volume_role",
                "1 for the volume's current role, 0 otherwise.",
                &["volume", "role"],
            ),
            volume_role_changes: int_counter(
                "ferry_volume_role_changes_total",
                "Role changes of the volume since the daemon started, by the role taken.",
                &["volume", "to"],
            ),
            replica_state: int_gauge(
                "ferry_replica_state",
                "1 for the replica's current state, 0 otherwise.",
                &["volume", "peer", "state"],
            ),
            replica_split_brain: int_gauge(
                "ferry_replica_split_brain",
                "1 while this copy and the peer's both wrote since they split; an operator must resolve.",
                &["volume", "peer"],
            ),
            replica_lag_bytes: int_gauge(
                "ferry_replica_lag_bytes",
                "Completed writes not yet durable at the peer.",
                &["volume", "peer"],
            ),
            replica_lag_seconds: register(
                &registry,
                GaugeVec::new(
                    Opts::new(
                        "ferry_replica_lag_seconds",
                        "Age of the oldest completed write not yet durable at the peer (live RPO).",
                    ),
                    &["volume", "peer"],
                )
                .expect("valid gauge"),
            ),
            replica_rtt: histogram(
                "ferry_replica_rtt_seconds",
                "Peer round trip.",
                &["volume", "peer"],
            ),
            replication_bytes: int_counter(
                "ferry_replication_bytes_total",
                "Bytes written (kind=logical) vs bytes sent (kind=wire).",
                &["volume", "peer", "kind"],
            ),
            regional_apply_bytes: int_counter(
                "ferry_regional_apply_bytes_total",
                "Payload bytes of the regional batches from the peer that this secondary applied to its device.",
                &["volume", "peer"],
            ),
            regional_apply_seconds: register(
                &registry,
                CounterVec::new(
                    Opts::new(
                        "ferry_regional_apply_seconds_total",
                        "Time this regional secondary spent applying the peer's stored batches to its device.",
                    ),
                    &["volume", "peer"],
                )
                .expect("valid counter"),
            ),
            journal_used_bytes: int_gauge(
                "ferry_journal_used_bytes",
                "Journal bytes in use.",
                &["volume"],
            ),
            journal_capacity_bytes: int_gauge(
                "ferry_journal_capacity_bytes",
                "Journal capacity.",
                &["volume"],
            ),
            journal_head_lsn: int_gauge(
                "ferry_journal_head_lsn",
                "LSN of the newest journal record.",
                &["volume"],
            ),
            journal_applied_lsn: int_gauge(
                "ferry_journal_applied_lsn",
                "LSN up to which the journal is applied to the backing device.",
                &["volume"],
            ),
            journal_unapplied_bytes: int_gauge(
                "ferry_journal_unapplied_bytes",
                "Journal bytes not yet applied to the backing device.",
                &["volume"],
            ),
            journal_full_waits: int_counter(
                "ferry_journal_full_waits_total",
                "Writes that waited for journal space.",
                &["volume"],
            ),
            journal_full_wait_seconds: register(
                &registry,
                CounterVec::new(
                    Opts::new(
                        "ferry_journal_full_wait_seconds_total",
                        "Time writes spent waiting for journal space.",
                    ),
                    &["volume"],
                )
                .expect("valid counter"),
            ),
            resync_remaining_bytes: int_gauge(
                "ferry_resync_remaining_bytes",
                "Bytes left to resync.",
                &["volume", "peer"],
            ),
            resync_total_bytes: int_gauge(
                "ferry_resync_total_bytes",
                "Size of the running resync: bytes sent plus bytes left (0 when none runs).",
                &["volume", "peer"],
            ),
            resync_bytes: int_counter(
                "ferry_resync_bytes_total",
                "Data bytes sent by resyncs (initial, delta, verify repair); ranges of zeroes are not counted.",
                &["volume", "peer"],
            ),
            peer_auth_failures: int_counter(
                "ferry_peer_auth_failures_total",
                "Peers refused for their certificate.",
                &["peer"],
            ),
            checksum_errors: int_counter(
                "ferry_checksum_errors_total",
                "Detected corruption, by where it was found.",
                &["volume", "where"],
            ),
            recovery_replayed_records: int_gauge(
                "ferry_journal_recovery_replayed_records",
                "Journal records replayed by the last start.",
                &["volume"],
            ),
            recovery_replayed_bytes: int_gauge(
                "ferry_journal_recovery_replayed_bytes",
                "Journal bytes replayed by the last start.",
                &["volume"],
            ),
            recovery_torn_tail_bytes: int_gauge(
                "ferry_journal_recovery_torn_tail_bytes",
                "Bytes of torn journal tail dropped by the last start.",
                &["volume"],
            ),
            volume_failed: int_gauge(
                "ferry_volume_failed",
                "1 when a journal or device I/O failed and the volume serves no writes until restart.",
                &["volume"],
            ),
            volume_writes_held: int_gauge(
                "ferry_volume_writes_held",
                "1 while client writes are held (a restarted primary fenced until its peers answer, a resync's hand-over).",
                &["volume"],
            ),
            volume_io_suspended: int_gauge(
                "ferry_volume_io_suspended",
                "1 while a metro replica with on_disconnect = \"suspend\" has lost its peer: writes do not complete until it is back.",
                &["volume"],
            ),
            volume_consistent: int_gauge(
                "ferry_volume_consistent",
                "0 while a resync into this copy has not finished (it cannot be promoted).",
                &["volume"],
            ),
            verify_differing_bytes: int_gauge(
                "ferry_verify_differing_bytes",
                "Bytes the last verify found different between this copy and the peer's.",
                &["volume", "peer"],
            ),
            registry,
        };
        metrics
            .build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        Arc::new(metrics)
    }

    /// Resolves the handles of one volume. Calling it again for the same name returns handles
    /// to the same series.
    pub fn volume(&self, name: &str) -> VolumeMetrics {
        let v = |vec: &IntGaugeVec| vec.with_label_values(&[name]);
        let ops = |vec: &IntCounterVec| COMMON_OPS.map(|op| vec.with_label_values(&[name, op]));
        VolumeMetrics {
            write_latency_total: self.write_latency.with_label_values(&[name, "total"]),
            write_latency_journal: self.write_latency.with_label_values(&[name, "journal"]),
            flush_latency: self.flush_latency.with_label_values(&[name]),
            read_latency: self.read_latency.with_label_values(&[name]),
            read_bytes_total: self.io_bytes.with_label_values(&[name, "read"]),
            write_bytes_total: self.io_bytes.with_label_values(&[name, "write"]),
            journal_used_bytes: v(&self.journal_used_bytes),
            journal_capacity_bytes: v(&self.journal_capacity_bytes),
            journal_head_lsn: v(&self.journal_head_lsn),
            journal_applied_lsn: v(&self.journal_applied_lsn),
            journal_unapplied_bytes: v(&self.journal_unapplied_bytes),
            journal_full_waits_total: self.journal_full_waits.with_label_values(&[name]),
            journal_full_wait_seconds_total: self
                .journal_full_wait_seconds
                .with_label_values(&[name]),
            recovery_replayed_records: v(&self.recovery_replayed_records),
            recovery_replayed_bytes: v(&self.recovery_replayed_bytes),
            recovery_torn_tail_bytes: v(&self.recovery_torn_tail_bytes),
            volume_failed: v(&self.volume_failed),
            writes_held: v(&self.volume_writes_held),
            io_suspended: v(&self.volume_io_suspended),
            volume_consistent: {
                let gauge = v(&self.volume_consistent);
                gauge.set(1);
                gauge
            },
            role_primary: self.volume_role.with_label_values(&[name, "primary"]),
            role_secondary: self.volume_role.with_label_values(&[name, "secondary"]),
            role_vec: self.volume_role.clone(),
            role_changes: ROLES.map(|to| self.volume_role_changes.with_label_values(&[name, to])),
            role_changes_vec: self.volume_role_changes.clone(),
            io_requests_common: ops(&self.io_requests),
            io_errors_common: ops(&self.io_errors),
            io_requests_vec: self.io_requests.clone(),
            io_errors_vec: self.io_errors.clone(),
            checksum_errors_vec: {
                for where_ in CHECKSUM_WHERE {
                    self.checksum_errors.with_label_values(&[name, where_]);
                }
                self.checksum_errors.clone()
            },
            volume: Arc::from(name),
        }
    }

    /// Resolves the handles of one replica of `volume` on `peer`.
    pub fn replica(&self, volume: &str, peer: &str) -> ReplicaMetrics {
        let pair = [volume, peer];
        ReplicaMetrics {
            write_latency_replica: self.write_latency.with_label_values(&[volume, "replica"]),
            lag_bytes: self.replica_lag_bytes.with_label_values(&pair),
            lag_seconds: self.replica_lag_seconds.with_label_values(&pair),
            rtt: self.replica_rtt.with_label_values(&pair),
            logical_bytes_total: self
                .replication_bytes
                .with_label_values(&[volume, peer, "logical"]),
            wire_bytes_total: self
                .replication_bytes
                .with_label_values(&[volume, peer, "wire"]),
            regional_apply_bytes_total: self.regional_apply_bytes.with_label_values(&pair),
            regional_apply_seconds_total: self.regional_apply_seconds.with_label_values(&pair),
            resync_remaining_bytes: self.resync_remaining_bytes.with_label_values(&pair),
            resync_total_bytes: self.resync_total_bytes.with_label_values(&pair),
            resync_bytes_total: self.resync_bytes.with_label_values(&pair),
            verify_differing_bytes: self.verify_differing_bytes.with_label_values(&pair),
            states: REPLICA_STATES
                .map(|state| self.replica_state.with_label_values(&[volume, peer, state])),
            split_brain: self.replica_split_brain.with_label_values(&pair),
        }
    }

    /// Exports `ferry_peer_auth_failures_total` of a configured peer from the start (at 0), so
    /// that `increase()` sees its first refusal.
    pub fn peer(&self, peer: &str) {
        self.peer_auth_failures.with_label_values(&[peer]);
    }

    /// Counts a peer refused for its certificate.
    pub fn peer_auth_failure(&self, peer: &str) {
        self.peer_auth_failures.with_label_values(&[peer]).inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn gather_text(&self) -> String {
        let mut text = String::new();
        // Encoding fails only for malformed metric families, which a Registry does not produce;
        // a scrape should still get whatever was encoded rather than nothing.
        if let Err(error) = TextEncoder::new().encode_utf8(&self.registry.gather(), &mut text) {
            tracing::error!(%error, "encoding metrics failed");
        }
        text
    }
}

impl VolumeMetrics {
    /// Counts one NBD request; `op` is a lower-case NBD command name ("read", "write", ...).
    pub fn io_request(&self, op: &str) {
        match COMMON_OPS.iter().position(|common| *common == op) {
            Some(index) => self.io_requests_common[index].inc(),
            None => self
                .io_requests_vec
                .with_label_values(&[&*self.volume, op])
                .inc(),
        }
    }

    /// Counts one NBD request answered with an error.
    pub fn io_error(&self, op: &str) {
        match COMMON_OPS.iter().position(|common| *common == op) {
            Some(index) => self.io_errors_common[index].inc(),
            None => self
                .io_errors_vec
                .with_label_values(&[&*self.volume, op])
                .inc(),
        }
    }

    /// Sets `ferry_volume_role`: 1 for `role`, 0 for the other of primary/secondary, and counts
    /// a change in `ferry_volume_role_changes_total` (the first role set at start is not one).
    pub fn set_role(&self, role: &str) {
        let previous = if self.role_primary.get() == 1 {
            Some("primary")
        } else if self.role_secondary.get() == 1 {
            Some("secondary")
        } else {
            None
        };
        if previous.is_some_and(|previous| previous != role) {
            match ROLES.iter().position(|known| *known == role) {
                Some(index) => self.role_changes[index].inc(),
                None => self
                    .role_changes_vec
                    .with_label_values(&[&*self.volume, role])
                    .inc(),
            }
        }
        match role {
            "primary" => {
                self.role_primary.set(1);
                self.role_secondary.set(0);
            }
            "secondary" => {
                self.role_primary.set(0);
                self.role_secondary.set(1);
            }
            other => {
                self.role_primary.set(0);
                self.role_secondary.set(0);
                self.role_vec
                    .with_label_values(&[&*self.volume, other])
                    .set(1);
            }
        }
    }

    /// Counts one detected corruption; `where_` says where ("journal", "replica", "verify").
    pub fn checksum_error(&self, where_: &str) {
        self.checksum_errors_vec
            .with_label_values(&[&*self.volume, where_])
            .inc();
    }
}

impl ReplicaMetrics {
    /// Sets `ferry_replica_state`: 1 for `state`, 0 for every other state of SPEC §5.
    /// `ferry_replica_split_brain` follows it.
    pub fn set_state(&self, state: &str) {
        debug_assert!(REPLICA_STATES.contains(&state), "unknown state {state}");
        for (name, gauge) in REPLICA_STATES.iter().zip(&self.states) {
            gauge.set(i64::from(*name == state));
        }
        self.split_brain
            .set(i64::from(state == ReplicaState::SplitBrain.as_str()));
    }
}

/// Binds the metrics_listen address.
pub async fn bind_http(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })
}

/// Serves `GET /metrics` until `shutdown` becomes true (or its sender is dropped).
// Hand-written: there is one fixed GET path, and hyper would add a large dependency tree for it.
pub async fn serve_http(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) {
    serve_bounded(
        listener,
        HTTP_CONNECTIONS_MAX,
        "metrics",
        shutdown,
        |stream, _| {
            let metrics = Arc::clone(&metrics);
            async move { serve_connection(stream, &metrics).await }
        },
    )
    .await;
}

enum Head {
    Complete(Vec<u8>),
    TooLarge,
    /// The peer closed without sending anything.
    Empty,
}

async fn read_head(stream: &mut TcpStream) -> std::io::Result<Head> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            // A half-sent head is still answered (likely with 400) so the client learns why.
            return Ok(if head.is_empty() {
                Head::Empty
            } else {
                Head::Complete(head)
            });
        }
        head.extend_from_slice(&chunk[..read]);
        if let Some(end) = find_head_end(&head) {
            head.truncate(end);
            return Ok(Head::Complete(head));
        }
        if head.len() > HTTP_HEAD_LENGTH_MAX {
            return Ok(Head::TooLarge);
        }
    }
}

fn find_head_end(bytes: &[u8]) -> Option<usize> {
    let crlf = bytes.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = bytes.windows(2).position(|w| w == b"\n\n");
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

async fn serve_connection(mut stream: TcpStream, metrics: &Metrics) {
    let response = match tokio::time::timeout(HTTP_HEAD_TIMEOUT, read_head(&mut stream)).await {
        Err(_) => simple_response(408, "Request Timeout", ""),
        Ok(Err(_)) | Ok(Ok(Head::Empty)) => return,
        Ok(Ok(Head::TooLarge)) => simple_response(431, "Request Header Fields Too Large", ""),
        Ok(Ok(Head::Complete(head))) => route(&head, metrics),
    };
    let write = async {
        stream.write_all(&response).await?;
        stream.shutdown().await
    };
    // The scraper may have gone away; nothing to do about it but drop the connection.
    let _ = tokio::time::timeout(HTTP_WRITE_TIMEOUT, write).await;
}

fn route(head: &[u8], metrics: &Metrics) -> Vec<u8> {
    let line_end = head.iter().position(|b| *b == b'\n').unwrap_or(head.len());
    let Ok(line) = std::str::from_utf8(&head[..line_end]) else {
        return simple_response(400, "Bad Request", "");
    };
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return simple_response(400, "Bad Request", "");
    };
    let method_ok = !method.is_empty() && method.bytes().all(|b| b.is_ascii_uppercase());
    if !method_ok || !target.starts_with('/') || !version.starts_with("HTTP/1.") {
        return simple_response(400, "Bad Request", "");
    }
    if method != "GET" {
        return simple_response(405, "Method Not Allowed", "Allow: GET\r\n");
    }
    let path = target.split('?').next().unwrap_or(target);
    if path != "/metrics" {
        return simple_response(404, "Not Found", "");
    }
    let body = metrics.gather_text();
    response(200, "OK", prometheus::TEXT_FORMAT, "", body.as_bytes())
}

fn simple_response(status: u16, reason: &str, extra_headers: &str) -> Vec<u8> {
    let body = format!("{status} {reason}\n");
    response(
        status,
        reason,
        "text/plain; charset=utf-8",
        extra_headers,
        body.as_bytes(),
    )
}

fn response(
    status: u16,
    reason: &str,
    content_type: &str,
    extra_headers: &str,
    body: &[u8],
) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n{extra_headers}\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// The metric families of a text exposition in the form of the contract file
/// (`docs/metrics.txt`): one line per family, `NAME TYPE LABEL,LABEL`, sorted, label names
/// sorted (a histogram's `le` left out). Two expositions with the same lines export the same
/// names, types and label names, whatever the label values and samples are.
pub fn contract_lines(exposition: &str) -> Vec<String> {
    use std::collections::{BTreeMap, BTreeSet};
    let mut families: BTreeMap<&str, (&str, BTreeSet<String>)> = BTreeMap::new();
    for line in exposition.lines() {
        let mut words = line.split_whitespace();
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (words.next(), words.next(), words.next(), words.next())
        {
            families.entry(name).or_insert((kind, BTreeSet::new())).0 = kind;
        }
    }
    for line in exposition.lines().filter(|line| !line.starts_with('#')) {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let sample = &line[..name_end];
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|suffix| sample.strip_suffix(suffix))
            .find(|base| {
                families
                    .get(base)
                    .is_some_and(|(kind, _)| *kind == "histogram")
            })
            .unwrap_or(sample);
        let Some((_, labels)) = families.get_mut(family) else {
            continue; // a sample without a TYPE line: not a family of this exposition
        };
        if line[name_end..].starts_with('{') {
            labels.extend(
                label_names(&line[name_end + 1..])
                    .into_iter()
                    .filter(|label| label != "le"),
            );
        }
    }
    families
        .into_iter()
        .map(|(name, (kind, labels))| {
            let labels: Vec<String> = labels.into_iter().collect();
            format!("{name} {kind} {}", labels.join(","))
                .trim_end()
                .to_owned()
        })
        .collect()
}

/// The label names of `a="x",b="y\"z"}...` (the text after a sample's `{`).
fn label_names(mut rest: &str) -> Vec<String> {
    let mut names = Vec::new();
    // Each pass consumes one `name="value"` pair; a pair takes at least 3 bytes, so the
    // loop ends within the line's length.
    while let Some(eq) = rest.find('=') {
        let name = rest[..eq].trim_start_matches([',', ' ']);
        if name.contains('}') {
            break;
        }
        names.push(name.to_owned());
        let value = &rest[eq + 1..];
        let Some(value) = value.strip_prefix('"') else {
            break;
        };
        let mut escaped = false;
        let mut end = None;
        for (index, byte) in value.bytes().enumerate() {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => {
                    end = Some(index);
                    break;
                }
                _ => {}
            }
        }
        let Some(end) = end else { break };
        rest = &value[end + 1..];
        if rest.starts_with('}') {
            break;
        }
    }
    names
}

/// The contract lines of a contract file: the lines that are neither empty nor comments.
pub fn contract_file_lines(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    lines.sort();
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gather_contains_the_spec_names() {
        let metrics = Metrics::new();
        let volume = metrics.volume("pg-data");
        volume.write_latency_total.observe(0.000_05);
        volume.write_latency_journal.observe(0.000_02);
        volume.flush_latency.observe(0.001);
        volume.read_latency.observe(0.000_01);
        volume.io_request("write");
        volume.io_request("block_status");
        volume.io_error("read");
        volume.journal_capacity_bytes.set(1 << 30);
        volume.journal_full_waits_total.inc();
        volume.journal_full_wait_seconds_total.inc_by(0.5);
        volume.set_role("primary");
        volume.checksum_error("journal");
        volume.recovery_torn_tail_bytes.set(512);
        let replica = metrics.replica("pg-data", "site-b");
        replica.set_state("in-sync");
        replica.lag_seconds.set(0.25);
        metrics.peer_auth_failure("site-x");
        let text = metrics.gather_text();
        for wanted in [
            r#"ferry_write_latency_seconds_bucket{stage="total",volume="pg-data",le="0.000005"} 0"#,
            r#"ferry_write_latency_seconds_count{stage="journal",volume="pg-data"} 1"#,
            r#"ferry_write_latency_seconds_count{stage="replica",volume="pg-data"} 0"#,
            r#"ferry_flush_latency_seconds_count{volume="pg-data"} 1"#,
            r#"ferry_read_latency_seconds_count{volume="pg-data"} 1"#,
            r#"ferry_io_requests_total{op="write",volume="pg-data"} 1"#,
            r#"ferry_io_requests_total{op="block_status",volume="pg-data"} 1"#,
            r#"ferry_io_errors_total{op="read",volume="pg-data"} 1"#,
            r#"ferry_volume_role{role="primary",volume="pg-data"} 1"#,
            r#"ferry_volume_role{role="secondary",volume="pg-data"} 0"#,
            r#"ferry_journal_used_bytes{volume="pg-data"} 0"#,
            r#"ferry_journal_capacity_bytes{volume="pg-data"} 1073741824"#,
            r#"ferry_journal_head_lsn{volume="pg-data"} 0"#,
            r#"ferry_journal_applied_lsn{volume="pg-data"} 0"#,
            r#"ferry_journal_unapplied_bytes{volume="pg-data"} 0"#,
            r#"ferry_journal_full_waits_total{volume="pg-data"} 1"#,
            r#"ferry_journal_full_wait_seconds_total{volume="pg-data"} 0.5"#,
            r#"ferry_checksum_errors_total{volume="pg-data",where="journal"} 1"#,
            r#"ferry_journal_recovery_replayed_records{volume="pg-data"} 0"#,
            r#"ferry_journal_recovery_replayed_bytes{volume="pg-data"} 0"#,
            r#"ferry_journal_recovery_torn_tail_bytes{volume="pg-data"} 512"#,
            r#"ferry_replica_state{peer="site-b",state="in-sync",volume="pg-data"} 1"#,
            r#"ferry_replica_state{peer="site-b",state="degraded",volume="pg-data"} 0"#,
            r#"ferry_replica_lag_bytes{peer="site-b",volume="pg-data"} 0"#,
            r#"ferry_replica_lag_seconds{peer="site-b",volume="pg-data"} 0.25"#,
            r#"ferry_replica_rtt_seconds_count{peer="site-b",volume="pg-data"} 0"#,
            r#"ferry_replication_bytes_total{kind="wire",peer="site-b",volume="pg-data"} 0"#,
            r#"ferry_regional_apply_bytes_total{peer="site-b",volume="pg-data"} 0"#,
            r#"ferry_regional_apply_seconds_total{peer="site-b",volume="pg-data"} 0"#,
            r#"ferry_resync_remaining_bytes{peer="site-b",volume="pg-data"} 0"#,
            r#"ferry_resync_bytes_total{peer="site-b",volume="pg-data"} 0"#,
            r#"ferry_peer_auth_failures_total{peer="site-x"} 1"#,
        ] {
            assert!(text.contains(wanted), "missing {wanted}\n{text}");
        }
        volume.set_role("secondary");
        let text = metrics.gather_text();
        assert!(text.contains(r#"ferry_volume_role{role="primary",volume="pg-data"} 0"#));
        assert!(text.contains(r#"ferry_volume_role{role="secondary",volume="pg-data"} 1"#));
    }

    /// Every family a node with one replicated volume exports, against the contract file; the
    /// integration test `contract::running_cluster_exports_the_contract` checks a real daemon.
    #[test]
    fn families_match_the_contract_file() {
        let metrics = Metrics::new();
        let volume = metrics.volume("pg-data");
        volume.set_role("primary");
        metrics.replica("pg-data", "site-b").set_state("in-sync");
        metrics.peer("site-b");
        let contract = contract_file_lines(include_str!("../../docs/metrics.txt"));
        let exported = contract_lines(&metrics.gather_text());
        assert_eq!(
            exported, contract,
            "the exported families (left) differ from docs/metrics.txt (right)"
        );
    }

    #[test]
    fn contract_lines_read_labels_and_histograms() {
        let text = "# HELP a_seconds x\n# TYPE a_seconds histogram\n\
                    a_seconds_bucket{v=\"x,y=\\\"z\\\"\",le=\"1\"} 1\n\
                    a_seconds_sum{v=\"x\"} 1\na_seconds_count{v=\"x\"} 1\n\
                    # TYPE b_total counter\nb_total 3\n# TYPE c gauge\nc{z=\"}\",k=\"\"} 1\n";
        assert_eq!(
            contract_lines(text),
            ["a_seconds histogram v", "b_total counter", "c gauge k,z"]
        );
        assert_eq!(
            contract_file_lines("# comment\n\nc  gauge   k,z\nb_total counter\n"),
            ["b_total counter", "c gauge k,z"]
        );
    }

    #[test]
    fn new_series_follow_roles_states_and_start_at_zero() {
        let metrics = Metrics::new();
        let volume = metrics.volume("v");
        let replica = metrics.replica("v", "p");
        volume.set_role("secondary");
        volume.set_role("secondary");
        let text = metrics.gather_text();
        let version = env!("CARGO_PKG_VERSION");
        for wanted in [
            format!(r#"ferry_build_info{{version="{version}"}} 1"#),
            r#"ferry_volume_role_changes_total{to="primary",volume="v"} 0"#.to_owned(),
            r#"ferry_volume_role_changes_total{to="secondary",volume="v"} 0"#.to_owned(),
            r#"ferry_checksum_errors_total{volume="v",where="replication"} 0"#.to_owned(),
            r#"ferry_volume_io_suspended{volume="v"} 0"#.to_owned(),
            r#"ferry_replica_split_brain{peer="p",volume="v"} 0"#.to_owned(),
            r#"ferry_resync_total_bytes{peer="p",volume="v"} 0"#.to_owned(),
        ] {
            assert!(text.contains(&wanted), "missing {wanted}\n{text}");
        }
        volume.set_role("primary");
        volume.set_role("secondary");
        volume.set_role("secondary");
        replica.set_state("split-brain");
        let text = metrics.gather_text();
        for wanted in [
            r#"ferry_volume_role_changes_total{to="primary",volume="v"} 1"#,
            r#"ferry_volume_role_changes_total{to="secondary",volume="v"} 1"#,
            r#"ferry_replica_split_brain{peer="p",volume="v"} 1"#,
            r#"ferry_replica_state{peer="p",state="split-brain",volume="v"} 1"#,
        ] {
            assert!(text.contains(wanted), "missing {wanted}\n{text}");
        }
        replica.set_state("resyncing");
        assert!(metrics
            .gather_text()
            .contains(r#"ferry_replica_split_brain{peer="p",volume="v"} 0"#));
    }

    /// The series are bounded by volumes × peers: a node with 64 volumes of two peers each
    /// exports 64 times the series of one volume (plus the node's own), whatever happens.
    /// Prints the cost of one scrape (encoding time and bytes).
    #[test]
    fn scrape_of_64_volumes_is_bounded() {
        fn series(text: &str) -> usize {
            text.lines().filter(|line| !line.starts_with('#')).count()
        }
        let build = |volumes: usize| {
            let metrics = Metrics::new();
            for v in 0..volumes {
                let name = format!("volume-{v:02}");
                let volume = metrics.volume(&name);
                volume.set_role("primary");
                volume.write_latency_total.observe(0.000_1);
                for peer in ["site-b", "site-c"] {
                    metrics.peer(peer);
                    metrics.replica(&name, peer).set_state("in-sync");
                }
            }
            metrics
        };
        let one = build(1).gather_text();
        let node_series = 1 + 2; // ferry_build_info, ferry_peer_auth_failures_total × 2 peers
        let per_volume = series(&one) - node_series;
        let metrics = build(64);
        let started = std::time::Instant::now();
        let text = metrics.gather_text();
        let elapsed = started.elapsed();
        assert_eq!(series(&text), node_series + 64 * per_volume);
        eprintln!(
            "scrape of 64 volumes × 2 peers: {} series, {} bytes, encoded in {:?}",
            series(&text),
            text.len(),
            elapsed
        );
    }

    #[test]
    fn buckets_span_microseconds_to_seconds() {
        let buckets = latency_buckets();
        assert!(
            buckets.windows(2).all(|pair| pair[0] < pair[1]),
            "{buckets:?}"
        );
        assert!(buckets[0] <= 10e-6);
        assert!(*buckets.last().unwrap() >= 10.0);
        // Tens of microseconds must land in distinct buckets.
        assert!(
            buckets
                .iter()
                .filter(|b| **b > 10e-6 && **b < 100e-6)
                .count()
                >= 4
        );
    }

    fn assert_send_sync_clone<T: Send + Sync + Clone>() {}

    #[test]
    fn handles_are_send_sync_clone() {
        assert_send_sync_clone::<VolumeMetrics>();
        assert_send_sync_clone::<ReplicaMetrics>();
    }

    async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(request).await.expect("write");
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await.expect("read");
        reply
    }

    #[tokio::test]
    async fn http_serves_metrics_and_survives_bad_requests() {
        let metrics = Metrics::new();
        metrics.volume("v1").io_request("read");
        let listener = bind_http("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = watch::channel(false);
        let server = tokio::spawn(serve_http(listener, Arc::clone(&metrics), stopped));

        let ok = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.contains("Content-Type: text/plain; version=0.0.4"),
            "{ok}"
        );
        assert!(ok.contains("Connection: close"), "{ok}");
        assert!(ok.contains(r#"ferry_io_requests_total{op="read",volume="v1"} 1"#));

        let bad = exchange(addr, b"\x00\x01garbage\r\n\r\n").await;
        assert!(bad.starts_with("HTTP/1.1 400 "), "{bad}");
        let missing = exchange(addr, b"GET / HTTP/1.1\r\n\r\n").await;
        assert!(missing.starts_with("HTTP/1.1 404 "), "{missing}");
        let post = exchange(addr, b"POST /metrics HTTP/1.1\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
        assert!(post.contains("Allow: GET"), "{post}");
        // Exactly one byte over the cap, so the server has read everything before it answers
        // (unread data at close would turn the answer into a reset).
        let mut huge = b"GET /metrics HTTP/1.1\r\n".to_vec();
        huge.resize(HTTP_HEAD_LENGTH_MAX + 1, b'x');
        let huge = exchange(addr, &huge).await;
        assert!(huge.starts_with("HTTP/1.1 431 "), "{huge}");

        // Still serving after all of that.
        let again = exchange(addr, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n").await;
        assert!(again.starts_with("HTTP/1.1 200 OK\r\n"), "{again}");

        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("server stops on shutdown")
            .unwrap();
    }
}
