//! The metrics contract (docs/metrics.txt) held against running daemons: a two-node metro
//! cluster exports exactly the families of the list, with their types and label names, on both
//! nodes, so that a renamed or dropped metric fails here before it breaks an alert or a
//! dashboard; and the series added for operators move with what they describe (role changes
//! on a switchover, writes suspended while the peer of a `suspend` replica is away).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferry::metrics::{contract_file_lines, contract_lines};

use crate::cluster::{
    metric_sum, Cluster, ClusterOptions,
    NodeId::{self, A, B},
};
use crate::harness;
use crate::metro::{RESYNC_TIMEOUT, ROLE_TIMEOUT, SYNC_TIMEOUT};

/// How long a gauge may take to follow a state change (the replication loop refreshes them
/// at least every tick).
const GAUGE_TIMEOUT: Duration = Duration::from_secs(20);

/// The repository's root (the daemon crate's parent).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the daemon crate has a parent directory")
        .to_path_buf()
}

/// The contract lines of docs/metrics.txt.
pub fn contract() -> Vec<String> {
    let path = repo_root().join("docs/metrics.txt");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("read {}: {error}", path.display()));
    contract_file_lines(&text)
}

fn assert_exports_the_contract(cluster: &Cluster, id: NodeId, contract: &[String]) {
    let text = cluster.metrics(id);
    let exported = contract_lines(&text);
    let missing: Vec<&String> = contract.iter().filter(|l| !exported.contains(l)).collect();
    let extra: Vec<&String> = exported.iter().filter(|l| !contract.contains(l)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "node {} does not export docs/metrics.txt: missing {missing:?}, not in the list \
         {extra:?}\n{text}",
        id.name()
    );
    // Prometheus' own lint of names, types and units (promtool is in Debian's `prometheus`,
    // which tests/run.sh installs).
    if harness::require_tools("promtool check metrics", &[("promtool", "prometheus")]) {
        let scrape = harness::test_tempdir("ferry-scrape-");
        let file = scrape.path().join("metrics.txt");
        std::fs::write(&file, &text).expect("write the scrape");
        let script = format!("promtool check metrics < '{}'", file.display());
        harness::run(harness::cmd("sh", &["-c", &script]));
    }
}

/// Polls node `id`'s metrics until the sum of `name{labels}` equals `want`.
fn wait_metric(cluster: &Cluster, id: NodeId, name: &str, labels: &[&str], want: f64) {
    let deadline = Instant::now() + GAUGE_TIMEOUT;
    loop {
        let text = cluster.metrics(id);
        let got = metric_sum(&text, name, labels);
        if got == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {}: {name}{labels:?} is {got:?}, not {want}, after {GAUGE_TIMEOUT:?}\n{text}",
            id.name()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn running_cluster_exports_the_contract() {
    let contract = contract();
    let mut cluster = Cluster::start(ClusterOptions {
        on_disconnect: "suspend".to_string(),
        ..ClusterOptions::default()
    });
    cluster.wait_replica_state(A, "in-sync", SYNC_TIMEOUT);
    for id in [A, B] {
        assert_exports_the_contract(&cluster, id, &contract);
        wait_metric(
            &cluster,
            id,
            "ferry_build_info",
            &[&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))],
            1.0,
        );
    }
    // The initial sync is over: no resync runs, none is left. (Its bytes are not checked:
    // a new volume is zeroes, sent as ranges, which ferry_resync_bytes_total does not count.)
    wait_metric(&cluster, A, "ferry_resync_total_bytes", &[], 0.0);
    wait_metric(&cluster, A, "ferry_resync_remaining_bytes", &[], 0.0);
    wait_metric(&cluster, A, "ferry_replica_split_brain", &[], 0.0);

    // A planned switchover: one change on each node, none counted for the roles taken at
    // start.
    cluster.switchover(A, B);
    cluster.wait_replica_state(B, "in-sync", RESYNC_TIMEOUT);
    let to = |role: &str| format!("to=\"{role}\"");
    wait_metric(
        &cluster,
        A,
        "ferry_volume_role_changes_total",
        &[&to("secondary")],
        1.0,
    );
    wait_metric(
        &cluster,
        A,
        "ferry_volume_role_changes_total",
        &[&to("primary")],
        0.0,
    );
    wait_metric(
        &cluster,
        B,
        "ferry_volume_role_changes_total",
        &[&to("primary")],
        1.0,
    );
    wait_metric(
        &cluster,
        B,
        "ferry_volume_role_changes_total",
        &[&to("secondary")],
        0.0,
    );

    // The new primary's `suspend` replica loses its peer: its writes are suspended (they enter
    // the journal but do not complete) until the peer is back; that is not a hold of
    // admission (`ferry_volume_writes_held`, fencing and hand-overs).
    wait_metric(&cluster, B, "ferry_volume_io_suspended", &[], 0.0);
    cluster.kill9(A);
    cluster.wait_replica_state(B, "suspended", ROLE_TIMEOUT);
    wait_metric(&cluster, B, "ferry_volume_io_suspended", &[], 1.0);
    wait_metric(&cluster, B, "ferry_volume_writes_held", &[], 0.0);
    cluster.restart(A);
    cluster.wait_replica_state(B, "in-sync", RESYNC_TIMEOUT);
    wait_metric(&cluster, B, "ferry_volume_io_suspended", &[], 0.0);
    for id in [A, B] {
        assert_exports_the_contract(&cluster, id, &contract);
    }
}
