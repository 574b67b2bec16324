//! The dashboard and the alert rules against a real Prometheus (Debian's `prometheus`) that
//! scrapes a real two-node metro cluster under a write load: every dashboard query returns
//! data (or, for the few that only show an event, every metric it reads is scraped), every
//! metric an alert reads is scraped, and FerryReplicaNotInSync fires during a partition and
//! resolves after it. The rules are loaded as shipped except for their `for:` durations,
//! shortened to a few seconds so the test does not wait minutes.

use std::fs;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cluster::{Cluster, ClusterOptions, NodeId::A, VOLUME};
use crate::contract::repo_root;
use crate::harness::{self, cmd, require_tools, run};
use crate::metro::{RESYNC_TIMEOUT, SYNC_TIMEOUT};
use crate::nbd_wire::NbdConn;

/// Prometheus scrapes and evaluates this often.
const INTERVAL: &str = "1s";
/// The rules' `for:` in this test.
const FOR: &str = "5s";
/// What the dashboard's `$__rate_interval` becomes (several scrapes at `INTERVAL`).
const RATE_INTERVAL: &str = "30s";
/// Prometheus' first scrape lands 5 to 8 s after it starts; allow for a loaded machine.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(60);
/// A partition becomes `degraded` after peer_timeout (2 s), then the alert waits `FOR`.
const ALERT_TIMEOUT: Duration = Duration::from_secs(60);
/// Dashboard panels that show only an event (a resync running, a role change, a replica out
/// of sync): empty in steady state, so only their metrics are checked then.
const EVENT_PANELS: [&str; 4] = [
    "Replica not in sync",
    "Resync progress",
    "Resync time left",
    "Role changes (annotation)",
];

/// A `prometheus` process, killed on drop.
struct Prometheus {
    child: Child,
    addr: String,
    /// Its config, rules, data and log; removed on drop.
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(targets: &[String], rules: &Value) -> Prometheus {
        let dir = harness::test_tempdir("ferry-prometheus-");
        let rules_path = dir.path().join("rules.yml");
        // JSON is YAML: the rules go in as they were read, with `for:` shortened.
        fs::write(&rules_path, rules.to_string()).expect("write the rules");
        run(cmd(
            "promtool",
            &["check", "rules", &rules_path.to_string_lossy()],
        ));
        let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        let config = format!(
            "global:\n  scrape_interval: {INTERVAL}\n  evaluation_interval: {INTERVAL}\n\
             rule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: ferry\n    static_configs:\n      - targets: [{}]\n",
            rules_path.display(),
            targets.join(", ")
        );
        let config_path = dir.path().join("prometheus.yml");
        fs::write(&config_path, config).expect("write the config");
        let addr = format!("127.0.0.1:{}", harness::free_port());
        let log = fs::File::create(dir.path().join("prometheus.log")).expect("log file");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn prometheus");
        let mut prometheus = Prometheus {
            child,
            addr,
            _dir: dir,
        };
        // Up once `/-/ready` answers 200: its listener accepts before the TSDB is open and
        // the rules are loaded, and until then every query gets 503 (seen on a loaded
        // machine).
        let deadline = Instant::now() + SCRAPE_TIMEOUT;
        while !ready(&prometheus.addr) {
            if let Ok(Some(status)) = prometheus.child.try_wait() {
                let log = fs::read_to_string(prometheus._dir.path().join("prometheus.log"));
                panic!("prometheus exited with {status}: {log:?}");
            }
            assert!(
                Instant::now() < deadline,
                "prometheus is not ready on {}",
                prometheus.addr
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        prometheus
    }

    fn get(&self, path: &str) -> Value {
        let body = harness::http_get(&self.addr, path);
        let value: Value = serde_json::from_str(&body)
            .unwrap_or_else(|error| panic!("GET {path}: not JSON ({error}): {body}"));
        assert_eq!(value["status"], "success", "GET {path}: {value}");
        value
    }

    /// The instant vector of `query` (an error answer fails the test).
    fn query(&self, query: &str) -> Vec<Value> {
        let value = self.get(&format!("/api/v1/query?query={}", url_encode(query)));
        value["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_else(|| panic!("{query}: no result vector in {value}"))
    }

    /// The alerts firing now, with their labels.
    fn firing(&self, name: &str) -> Vec<Value> {
        let value = self.get("/api/v1/alerts");
        value["data"]["alerts"]
            .as_array()
            .expect("alerts")
            .iter()
            .filter(|alert| alert["labels"]["alertname"] == name && alert["state"] == "firing")
            .cloned()
            .collect()
    }

    /// Waits until `check` holds, polling every half second.
    fn wait(&self, what: &str, timeout: Duration, mut check: impl FnMut(&Prometheus) -> bool) {
        let deadline = Instant::now() + timeout;
        while !check(self) {
            assert!(
                Instant::now() < deadline,
                "Prometheus: {what} not seen within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

fn url_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The metric names a query reads: its `ferry_...` words, and `up`.
fn metric_names(query: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = query;
    while let Some(at) = rest.find("ferry_") {
        let word: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        rest = &rest[at + word.len()..];
        names.push(word);
    }
    if query.contains("up{") {
        names.push("up".to_owned());
    }
    names
}

/// The dashboard's queries with their panel titles, its variables replaced.
fn dashboard_queries() -> Vec<(String, String)> {
    let text = fs::read_to_string(repo_root().join("deploy/grafana/ferry.json")).expect("read");
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("?").to_owned();
            queries.push((title, target["expr"].as_str().expect("expr").to_owned()));
        }
    }
    for annotation in dashboard["annotations"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if let Some(expr) = annotation["expr"].as_str() {
            let title = format!(
                "{} (annotation)",
                annotation["name"].as_str().unwrap_or("?")
            );
            queries.push((title, expr.to_owned()));
        }
    }
    queries
        .into_iter()
        .map(|(title, query)| {
            let query = query
                .replace("$__rate_interval", RATE_INTERVAL)
                .replace("$lag_target_seconds", "30")
                .replace("$instance", ".*")
                .replace("$volume", ".*")
                .replace("$peer", ".*");
            (title, query)
        })
        .collect()
}

/// The shipped rule file as JSON (PyYAML reads it), every `for:` set to [`FOR`].
fn rules_with_short_for() -> Value {
    let path = repo_root().join("deploy/prometheus/ferry-alerts.yml");
    let script = "import json, sys, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)";
    let output = run(cmd(
        "/usr/bin/python3",
        &["-c", script, &path.to_string_lossy()],
    ));
    let mut rules: Value = serde_json::from_str(&output.stdout).expect("the rules as JSON");
    for group in rules["groups"].as_array_mut().expect("groups") {
        for rule in group["rules"].as_array_mut().expect("rules") {
            if rule.get("alert").is_some() {
                rule["for"] = Value::String(FOR.to_owned());
            }
        }
    }
    rules
}

/// Writes, reads and flushes on node a until stopped (a light load, so latency, IOPS and
/// replication panels have data).
fn start_load(cluster: &Cluster, stop: Arc<AtomicBool>) -> JoinHandle<u64> {
    let socket = cluster.nbd_socket(A);
    std::thread::spawn(move || {
        let mut conn = NbdConn::connect_unix(&socket, VOLUME).expect("connect to a's export");
        let block = vec![0x5au8; 4096];
        let mut done = 0u64;
        // Bounded: at most this many rounds even if nobody stops it.
        for round in 0..1_000_000u64 {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let offset = (round % 4096) * 4096;
            conn.write(offset, &block, false).expect("write");
            if round % 10 == 0 {
                conn.flush().expect("flush");
                conn.read(offset, 4096).expect("read");
            }
            done += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
        conn.disconnect();
        done
    })
}

#[test]
fn dashboard_and_alerts_work_on_a_real_prometheus() {
    if !require_tools(
        "real Prometheus",
        &[
            ("prometheus", "prometheus"),
            ("promtool", "prometheus"),
            ("python3", "python3-yaml"),
        ],
    ) {
        return;
    }
    let cluster = Cluster::start(ClusterOptions {
        relay: true,
        ..ClusterOptions::default()
    });
    cluster.wait_replica_state(A, "in-sync", SYNC_TIMEOUT);
    let stop = Arc::new(AtomicBool::new(false));
    let load = start_load(&cluster, Arc::clone(&stop));
    let targets: Vec<String> = cluster
        .ids()
        .iter()
        .map(|id| format!("127.0.0.1:{}", cluster.node(*id).spec.metrics_port))
        .collect();
    let prometheus = Prometheus::start(&targets, &rules_with_short_for());
    prometheus.wait("both Ferry targets up", SCRAPE_TIMEOUT, |p| {
        p.query("count(up{job=\"ferry\"} == 1)")
            .first()
            .is_some_and(|sample| sample["value"][1] == "2")
    });
    // Enough scrapes for the rate windows.
    std::thread::sleep(Duration::from_secs(10));

    // Every dashboard query returns data; the event panels at least find their metrics.
    let mut empty = Vec::new();
    for (title, query) in dashboard_queries() {
        if !prometheus.query(&query).is_empty() {
            continue;
        }
        assert!(
            EVENT_PANELS.contains(&title.as_str()),
            "panel {title:?}: no data for {query}"
        );
        empty.push(title.clone());
        for name in metric_names(&query) {
            let count = prometheus.query(&format!("count({{__name__=\"{name}\"}})"));
            assert!(!count.is_empty(), "panel {title:?}: {name} is not scraped");
        }
    }
    eprintln!("event panels without data in steady state: {empty:?}");

    // Every alert expression evaluates, and every metric it reads is scraped.
    let rules = rules_with_short_for();
    for group in rules["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            let expr = rule["expr"].as_str().expect("expr");
            prometheus.query(expr);
            for name in metric_names(expr) {
                let count = prometheus.query(&format!("count({{__name__=\"{name}\"}})"));
                assert!(
                    !count.is_empty(),
                    "alert {}: {name} is not scraped",
                    rule["alert"]
                );
            }
        }
    }
    assert!(
        prometheus.firing("FerryReplicaNotInSync").is_empty(),
        "FerryReplicaNotInSync fires before the partition"
    );

    // A partition: the alert fires, on the primary's side only, and the panel shows it.
    cluster.relay().both().cut();
    prometheus.wait("FerryReplicaNotInSync firing", ALERT_TIMEOUT, |p| {
        !p.firing("FerryReplicaNotInSync").is_empty()
    });
    let firing = prometheus.firing("FerryReplicaNotInSync");
    assert_eq!(firing.len(), 1, "{firing:?}");
    assert_eq!(firing[0]["labels"]["instance"], targets[0], "{firing:?}");
    assert_eq!(firing[0]["labels"]["peer"], "b", "{firing:?}");
    let panel = dashboard_queries()
        .into_iter()
        .find(|(title, _)| title == "Replica not in sync")
        .expect("the panel");
    assert!(!prometheus.query(&panel.1).is_empty(), "{}", panel.1);

    // Healed: a delta resync, in sync again, and the alert resolves.
    cluster.relay().both().restore();
    cluster.wait_replica_state(A, "in-sync", RESYNC_TIMEOUT);
    prometheus.wait("FerryReplicaNotInSync resolved", ALERT_TIMEOUT, |p| {
        p.firing("FerryReplicaNotInSync").is_empty()
    });
    for alert in [
        "FerrySplitBrain",
        "FerryTwoPrimaries",
        "FerryVolumeFailed",
        "FerryDown",
    ] {
        assert!(prometheus.firing(alert).is_empty(), "{alert} fires");
    }
    stop.store(true, Ordering::Relaxed);
    let writes = load.join().expect("the load thread");
    assert!(writes > 0, "the load wrote nothing");
}

/// Whether Prometheus at `addr` answers `/-/ready` with 200 (not while it starts: 503).
fn ready(addr: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    if write!(
        stream,
        "GET /-/ready HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .is_err()
    {
        return false;
    }
    let mut response = Vec::new();
    if stream.read_to_end(&mut response).is_err() {
        return false;
    }
    response.starts_with(b"HTTP/1.") && response.get(9..12) == Some(b"200")
}
