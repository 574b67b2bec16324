//! The files an operator deploys (deploy/) checked with the tools that will read them:
//! `promtool check rules` and `promtool test rules` on the alert rules, every dashboard query
//! parsed by promtool, every metric named in rules and dashboards present in the contract
//! (docs/metrics.txt), every alert with a `for:`, a runbook link and a runbook section, the
//! Kubernetes manifests parsed (PyYAML) and checked for the probes the docs promise, and the
//! systemd unit checked by `systemd-analyze verify`.

use std::collections::BTreeSet;
use std::fs;
use std::path::PathBuf;

use serde_json::Value;

use crate::contract::{contract, repo_root};
use crate::harness::{self, cmd, require_tools, run};

const ALERTS: &str = "deploy/prometheus/ferry-alerts.yml";
const ALERT_TESTS: &str = "deploy/prometheus/ferry-alerts.test.yml";
const DASHBOARD: &str = "deploy/grafana/ferry.json";
const RUNBOOK: &str = "docs/runbook.md";
const METRICS_DOC: &str = "docs/metrics.md";
const UNIT: &str = "deploy/systemd/ferry.service";
const KUBERNETES: &str = "deploy/kubernetes";

fn read(relative: &str) -> String {
    let path = repo_root().join(relative);
    fs::read_to_string(&path).unwrap_or_else(|error| panic!("read {}: {error}", path.display()))
}

/// Every `ferry_...` word of `text`.
fn ferry_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut index = 0;
    while let Some(found) = text[index..].find("ferry_") {
        let start = index + found;
        let preceded =
            start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start + "ferry_".len();
        while end < bytes.len()
            && (bytes[end].is_ascii_lowercase()
                || bytes[end].is_ascii_digit()
                || bytes[end] == b'_')
        {
            end += 1;
        }
        if !preceded {
            names.insert(text[start..end].to_owned());
        }
        index = end;
    }
    names
}

/// The contract's families by name, with their type.
fn contract_families() -> Vec<(String, String)> {
    contract()
        .iter()
        .map(|line| {
            let mut words = line.split(' ');
            let name = words.next().expect("a name").to_owned();
            let kind = words.next().expect("a type").to_owned();
            (name, kind)
        })
        .collect()
}

/// Whether `name` is a series of a contract family (a histogram's `_bucket`, `_sum`, `_count`
/// included).
fn in_contract(families: &[(String, String)], name: &str) -> bool {
    families.iter().any(|(family, kind)| {
        name == family
            || (kind == "histogram"
                && ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|suffix| name.strip_suffix(suffix) == Some(family)))
    })
}

/// The dashboard's queries: panel targets and annotation queries.
fn dashboard_queries(dashboard: &Value) -> Vec<String> {
    let mut queries = Vec::new();
    let panels = dashboard["panels"].as_array().expect("panels");
    for panel in panels {
        for target in panel["targets"].as_array().into_iter().flatten() {
            queries.push(target["expr"].as_str().expect("a target's expr").to_owned());
        }
    }
    for annotation in dashboard["annotations"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if let Some(expr) = annotation["expr"].as_str() {
            queries.push(expr.to_owned());
        }
    }
    queries
}

/// The alerts of the rule file, each with the text of its block (line-based: the file keeps
/// one `- alert:` line per rule).
fn alert_blocks(rules: &str) -> Vec<(String, String)> {
    let mut blocks: Vec<(String, String)> = Vec::new();
    for line in rules.lines() {
        if let Some(name) = line.trim().strip_prefix("- alert: ") {
            blocks.push((name.trim().to_owned(), String::new()));
        } else if line.trim_start().starts_with("- name: ") {
            blocks.push((String::new(), String::new()));
        } else if let Some((_, block)) = blocks.last_mut() {
            block.push_str(line);
            block.push('\n');
        }
    }
    blocks.retain(|(name, _)| !name.is_empty());
    blocks
}

/// GitHub's anchor of a Markdown heading (lower case, spaces to dashes, most punctuation
/// dropped).
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

#[test]
fn rules_and_dashboard_use_only_contract_metrics() {
    let families = contract_families();
    for file in [ALERTS, ALERT_TESTS, DASHBOARD, RUNBOOK, METRICS_DOC] {
        let unknown: Vec<String> = ferry_names(&read(file))
            .into_iter()
            .filter(|name| !in_contract(&families, name))
            .collect();
        assert!(
            unknown.is_empty(),
            "{file} names metrics that docs/metrics.txt does not list: {unknown:?}"
        );
    }
    // Every metric is documented for people too.
    let documented = ferry_names(&read(METRICS_DOC));
    let undocumented: Vec<&String> = families
        .iter()
        .map(|(name, _)| name)
        .filter(|name| !documented.contains(*name))
        .collect();
    assert!(
        undocumented.is_empty(),
        "{METRICS_DOC} does not describe {undocumented:?}"
    );
}

#[test]
fn every_alert_has_a_for_a_summary_and_a_runbook_section() {
    let rules = read(ALERTS);
    let runbook = read(RUNBOOK);
    let anchors: BTreeSet<String> = runbook
        .lines()
        .filter_map(|line| line.strip_prefix("## "))
        .map(anchor)
        .collect();
    let blocks = alert_blocks(&rules);
    assert!(blocks.len() >= 10, "{ALERTS}: only {} alerts", blocks.len());
    for (alert, block) in &blocks {
        for key in ["expr:", "for:", "summary:", "description:", "severity:"] {
            assert!(block.contains(key), "alert {alert} has no {key}\n{block}");
        }
        let link = format!("runbook_url: \"{RUNBOOK}#{}\"", alert.to_lowercase());
        assert!(
            block.contains(&link),
            "alert {alert} lacks `{link}`\n{block}"
        );
        assert!(
            anchors.contains(&alert.to_lowercase()),
            "{RUNBOOK} has no `## {alert}` section (anchors: {anchors:?})"
        );
        let tests = read(ALERT_TESTS);
        assert!(
            tests.contains(&format!("alertname: {alert}\n")),
            "{ALERT_TESTS} never evaluates {alert}"
        );
    }
}

#[test]
fn alert_rules_pass_promtool() {
    if !require_tools("alert rules", &[("promtool", "prometheus")]) {
        return;
    }
    let dir = repo_root().join("deploy/prometheus");
    let mut check = cmd("promtool", &["check", "rules", "ferry-alerts.yml"]);
    check.current_dir(&dir);
    run(check);
    // Rule paths in the test file are relative to it: run from its directory.
    let mut test = cmd("promtool", &["test", "rules", "ferry-alerts.test.yml"]);
    test.current_dir(&dir);
    let output = run(test);
    assert!(output.stdout.contains("SUCCESS"), "{output}");
}

#[test]
fn dashboard_is_well_formed_and_its_queries_parse() {
    let dashboard: Value = serde_json::from_str(&read(DASHBOARD))
        .unwrap_or_else(|error| panic!("{DASHBOARD} is not JSON: {error}"));
    assert_eq!(dashboard["uid"], "ferry-overview", "a stable uid for links");
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    for panel in panels {
        let id = panel["id"]
            .as_u64()
            .unwrap_or_else(|| panel_error(panel, "no id"));
        assert!(ids.insert(id), "panel id {id} used twice");
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "panel {} does not use the datasource variable",
            panel["title"]
        );
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {} has no query", panel["title"]);
        let mut refs = BTreeSet::new();
        for target in targets {
            let ref_id = target["refId"].as_str().expect("refId");
            assert!(
                refs.insert(ref_id),
                "refId {ref_id} twice in {}",
                panel["title"]
            );
        }
    }
    // Panels the issue asks for, by title.
    let titles: Vec<&str> = panels.iter().filter_map(|p| p["title"].as_str()).collect();
    for wanted in [
        "Write latency by stage",
        "IOPS by op",
        "Throughput",
        "Roles and replica states now",
        "Lag (seconds) against the target",
        "Lag (bytes)",
        "Journal fill",
        "Resync progress",
        "Resync time left",
        "Checksum errors",
        "Peer certificates refused",
    ] {
        assert!(
            titles.contains(&wanted),
            "no panel {wanted:?} in {titles:?}"
        );
    }
    let queries = dashboard_queries(&dashboard);
    for quantile in ["0.5", "0.99", "0.999"] {
        assert!(
            queries
                .iter()
                .any(|q| q.contains(&format!("histogram_quantile({quantile}, "))
                    && q.contains("ferry_write_latency_seconds_bucket")),
            "no write latency p{quantile} query"
        );
    }
    let families = contract_families();
    let unknown: Vec<String> = queries
        .iter()
        .flat_map(|q| ferry_names(q))
        .filter(|name| !in_contract(&families, name))
        .collect();
    assert!(
        unknown.is_empty(),
        "{DASHBOARD} queries unknown metrics {unknown:?}"
    );

    // promtool parses each query, as a recording rule with the dashboard's variables replaced.
    if !require_tools("dashboard queries", &[("promtool", "prometheus")]) {
        return;
    }
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (index, query) in queries.iter().enumerate() {
        let query = query
            .replace("$__rate_interval", "5m")
            .replace("$lag_target_seconds", "30")
            .replace("$instance", ".*")
            .replace("$volume", ".*")
            .replace("$peer", ".*");
        assert!(!query.contains('$'), "an unknown variable in {query}");
        // A JSON string is a YAML double-quoted scalar.
        let quoted = serde_json::to_string(&query).expect("a string");
        rules.push_str(&format!(
            "      - record: dashboard:query_{index}\n        expr: {quoted}\n"
        ));
    }
    let dir = harness::test_tempdir("ferry-dashboard-");
    let file = dir.path().join("queries.yml");
    fs::write(&file, rules).expect("write the queries");
    run(cmd(
        "promtool",
        &["check", "rules", &file.to_string_lossy()],
    ));
}

fn panel_error(panel: &Value, what: &str) -> ! {
    panic!("{DASHBOARD}: panel {}: {what}", panel["title"])
}

/// Checks of the manifests that PyYAML can make offline (`kubernetes-validate` checks them
/// against the Kubernetes schemas where it is installed).
const MANIFEST_CHECK: &str = r#"
import sys, yaml
kinds = {}
for path in sys.argv[1:]:
    for doc in yaml.safe_load_all(open(path)):
        if doc is None:
            continue
        for key in ("apiVersion", "kind", "metadata"):
            assert key in doc, f"{path}: a document without {key}"
        kinds.setdefault(doc["kind"], []).append((path, doc))
for needed in ("DaemonSet", "ConfigMap", "Secret", "Pod"):
    assert needed in kinds, f"no {needed} in the manifests"
def containers(doc):
    spec = doc["spec"]["template"]["spec"] if doc["kind"] == "DaemonSet" else doc["spec"]
    return spec.get("initContainers", []) + spec.get("containers", [])
for kind in ("DaemonSet", "Pod"):
    for path, doc in kinds[kind]:
        ferry = [c for c in containers(doc) if c["name"] == "ferry"]
        assert len(ferry) == 1, f"{path}: one container named ferry"
        ferry = ferry[0]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert probe in ferry, f"{path}: ferry has no {probe}"
        # The liveness probe must never depend on the peer: only the local control socket.
        # `ferry status --check` exits 1 or 2 for a replica out of sync (a partition); plain
        # `ferry status` exits 0 whenever the daemon answers: no probe may use --check.
        for probe in ("startupProbe", "livenessProbe"):
            command = " ".join(ferry[probe]["exec"]["command"])
            assert "ferry status" in command and "consistent" not in command, f"{path}: {command}"
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            command = " ".join(ferry[probe]["exec"]["command"])
            assert "--check" not in command, f"{path}: {probe} fails on a degraded replica: {command}"
        annotations = doc["spec"]["template"]["metadata"]["annotations"] if kind == "DaemonSet" else doc["metadata"]["annotations"]
        assert annotations.get("prometheus.io/scrape") == "true", f"{path}: not annotated for scraping"
print("ok", sorted(kinds))
"#;

#[test]
fn kubernetes_manifests_and_systemd_unit_check() {
    if !require_tools(
        "deploy files",
        &[("python3", "python3-yaml"), ("systemd-analyze", "systemd")],
    ) {
        return;
    }
    let dir = repo_root().join(KUBERNETES);
    let mut manifests: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|error| panic!("read {}: {error}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "yaml"))
        .collect();
    manifests.sort();
    assert!(!manifests.is_empty(), "no manifests in {}", dir.display());
    let mut args = vec!["-c".to_owned(), MANIFEST_CHECK.to_owned()];
    args.extend(manifests.iter().map(|p| p.to_string_lossy().into_owned()));
    // /usr/bin/python3: Debian's, which has PyYAML (python3-yaml).
    run(cmd("/usr/bin/python3", &args));
    // The Kubernetes schemas, offline, where `pip install kubernetes-validate` was done.
    if harness::find_in_path("kubernetes-validate").is_some() {
        let mut args = vec!["-k".to_owned(), "1.30".to_owned(), "--strict".to_owned()];
        args.extend(manifests.iter().map(|p| p.to_string_lossy().into_owned()));
        run(cmd("kubernetes-validate", &args));
    } else {
        eprintln!(
            "NOTE: kubernetes-validate (PyPI) is not installed: the manifests were parsed and \
             checked for their probes, not validated against the Kubernetes schemas"
        );
    }

    // systemd-analyze verify wants the binary of ExecStart to exist: check a copy of the unit
    // that points at the binary under test.
    let unit = read(UNIT);
    assert!(unit.contains("ExecStart=/usr/local/bin/ferry run --config /etc/ferry/ferry.toml"));
    let scratch = harness::test_tempdir("ferry-unit-");
    let copy = scratch.path().join("ferry.service");
    fs::write(
        &copy,
        unit.replace("/usr/local/bin/ferry", harness::FERRY_BIN),
    )
    .expect("write the unit");
    let output = run(cmd("systemd-analyze", &["verify", &copy.to_string_lossy()]));
    let complaints: Vec<&str> = output
        .stderr
        .lines()
        .chain(output.stdout.lines())
        .filter(|line| line.contains("ferry.service"))
        .collect();
    assert!(
        complaints.is_empty(),
        "systemd-analyze verify: {complaints:?}"
    );
}

#[test]
fn ferry_names_finds_metric_words() {
    let names = ferry_names("rate(ferry_io_requests_total[5m]) x_ferry_no ferry_a_bucket{");
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["ferry_a_bucket", "ferry_io_requests_total"]
    );
}
