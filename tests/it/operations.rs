//! The runbook test: every procedure of docs/operations.md run against real `ferry run`
//! processes, with the commands taken from the document itself.
//!
//! Each `sh` block under a `## ` heading is read line by line and carried out on a two-node
//! cluster (nodes `a` and `b`, volume `vol`): the document's `site-a`, `site-b` and `pg-data`
//! are renamed, `/etc/ferry/ferry.toml` is the node's config, `/etc/ferry` the cluster's
//! certificate directory, and `ferry ...` runs the real CLI against the node named by the last
//! `# on NODE` line. `systemctl start|stop|restart ferry` starts and stops that node's daemon
//! (SIGTERM, exit 0), `until CMD; do sleep N; done` retries CMD for at most [`WAIT_TIMEOUT`],
//! `# exit N` after a command is the status it must exit with, `scp` is a no-op (the nodes
//! share one directory here), and `mkdir -p` and `cp` work on the renamed paths. A line the
//! test does not understand fails it, so the document can only say what the test runs.
//!
//! Each procedure has one test here, which sets up the situation the text describes (a node
//! killed, a split brain, a node's disks replaced) and checks the outcome; the headings of the
//! document and the tests are kept in step by `operations_doc_and_tests_in_step`.

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cluster::{Cluster, ClusterOptions, NodeId, NodeId::A, NodeId::B, VOLUME};
use crate::harness::{run_with_timeout, Output, COMMAND_TIMEOUT, FERRY_BIN};
use crate::nbd_wire::NbdConn;

/// The runbook.
const DOC: &str = include_str!("../../docs/operations.md");
/// How long an `until ...; do sleep N; done` of the document may take here.
const WAIT_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a test waits for a cluster state it sets up itself.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Every procedure of the document and the test that runs it; headings not listed (the
/// reference section on `ferry status`) hold no procedure.
const PROCEDURES: [(&str, &str); 11] = [
    ("First setup", "operations_first_setup"),
    ("Planned switchover", "operations_planned_switchover"),
    ("Unplanned failover", "operations_unplanned_failover"),
    ("Failback", "operations_failback"),
    ("Split brain", "operations_split_brain"),
    ("A full journal", "operations_a_full_journal"),
    (
        "Pausing a regional replica",
        "operations_pausing_a_regional_replica",
    ),
    (
        "Failover to the regional site",
        "operations_failover_to_the_regional_site",
    ),
    ("Replacing a node", "operations_replacing_a_node"),
    (
        "Upgrading Ferry without a full resync",
        "operations_upgrading_without_a_full_resync",
    ),
    ("Rotating certificates", "operations_rotating_certificates"),
];
/// Headings of the document that are reference, not procedures.
const REFERENCE_SECTIONS: [&str; 1] = ["`ferry status` for people and for checks"];

/// Where a line of the document runs.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Place {
    Admin,
    Node(NodeId),
}

/// One line of a procedure, understood.
#[derive(Clone, Debug, PartialEq)]
enum Step {
    /// `ferry ARGS` with the exit status it must have.
    Ferry {
        args: Vec<String>,
        exit: i32,
    },
    /// `until ferry ARGS; do sleep N; done`.
    Until {
        args: Vec<String>,
        sleep: Duration,
    },
    Systemctl(&'static str),
    Scp,
    MkdirP(String),
    Cp {
        sources: Vec<String>,
        target: String,
    },
}

#[derive(Clone, Debug)]
struct Line {
    place: Place,
    text: String,
    step: Step,
}

/// A procedure: its heading and its `sh` blocks.
struct Procedure {
    title: String,
    blocks: Vec<Vec<Line>>,
}

/// The document's names as the cluster's.
fn rename(text: &str) -> String {
    text.replace("pg-data", VOLUME)
        .replace("site-a", A.name())
        .replace("site-b", B.name())
}

/// Parses one line of a `sh` block (after `# on` and comment lines were handled).
fn parse_step(line: &str) -> Result<Step, String> {
    let (command, comment) = match line.split_once(" #") {
        Some((command, comment)) => (command.trim(), comment.trim()),
        None => (line.trim(), ""),
    };
    let exit = match comment.strip_prefix("exit ") {
        Some(rest) => rest
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| format!("`# exit N` without a number: {line}"))?,
        None => 0,
    };
    if command.contains(['"', '\'', '|', '>', '<', '&', '$', '`']) {
        return Err(format!(
            "shell syntax the runbook test does not run: {line}"
        ));
    }
    let words: Vec<String> = command.split_whitespace().map(str::to_string).collect();
    let first = words.first().map(String::as_str).unwrap_or_default();
    match first {
        "ferry" => Ok(Step::Ferry {
            args: words[1..].to_vec(),
            exit,
        }),
        "until" => {
            // until ferry ARGS; do sleep N; done
            let rest = command.strip_prefix("until ").unwrap_or_default();
            let (condition, tail) = rest
                .split_once("; do sleep ")
                .ok_or_else(|| format!("not `until CMD; do sleep N; done`: {line}"))?;
            let seconds = tail
                .strip_suffix("; done")
                .and_then(|n| n.trim().parse::<u64>().ok())
                .ok_or_else(|| format!("not `until CMD; do sleep N; done`: {line}"))?;
            let args: Vec<String> = condition.split_whitespace().map(str::to_string).collect();
            if args.first().map(String::as_str) != Some("ferry") {
                return Err(format!("`until` runs only ferry commands here: {line}"));
            }
            Ok(Step::Until {
                args: args[1..].to_vec(),
                sleep: Duration::from_secs(seconds),
            })
        }
        "systemctl" => match words.as_slice() {
            [_, action, unit] if unit == "ferry" => match action.as_str() {
                "start" => Ok(Step::Systemctl("start")),
                "stop" => Ok(Step::Systemctl("stop")),
                "restart" => Ok(Step::Systemctl("restart")),
                _ => Err(format!("systemctl {action}: not run by the test: {line}")),
            },
            _ => Err(format!("not `systemctl ACTION ferry`: {line}")),
        },
        "scp" => Ok(Step::Scp),
        "mkdir" => match words.as_slice() {
            [_, flag, dir] if flag == "-p" => Ok(Step::MkdirP(dir.clone())),
            _ => Err(format!("not `mkdir -p DIR`: {line}")),
        },
        "cp" if words.len() >= 3 => Ok(Step::Cp {
            sources: words[1..words.len() - 1].to_vec(),
            target: words[words.len() - 1].clone(),
        }),
        _ => Err(format!("a command the runbook test does not run: {line}")),
    }
}

/// Every `## ` section with its `sh` blocks, parsed.
fn procedures() -> Result<Vec<Procedure>, String> {
    let mut procedures: Vec<Procedure> = Vec::new();
    let mut block: Option<Vec<Line>> = None;
    let mut in_other_block = false;
    let mut place = None;
    for (number, raw) in DOC.lines().enumerate() {
        let at = |message: String| format!("docs/operations.md:{}: {message}", number + 1);
        if let Some(lines) = block.as_mut() {
            if raw.trim() == "```" {
                let lines = block.take().unwrap_or_default();
                procedures
                    .last_mut()
                    .ok_or_else(|| at("a sh block before any heading".into()))?
                    .blocks
                    .push(lines);
                continue;
            }
            let trimmed = raw.trim();
            if let Some(node) = trimmed.strip_prefix("# on ") {
                place = Some(match node {
                    "site-a" => Place::Node(A),
                    "site-b" => Place::Node(B),
                    "the admin machine" => Place::Admin,
                    other => return Err(at(format!("unknown place `{other}`"))),
                });
                continue;
            }
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let place = place.ok_or_else(|| at(format!("no `# on NODE` before `{trimmed}`")))?;
            let step = parse_step(trimmed).map_err(at)?;
            lines.push(Line {
                place,
                text: trimmed.to_string(),
                step,
            });
            continue;
        }
        if in_other_block {
            in_other_block = raw.trim() != "```";
            continue;
        }
        if let Some(title) = raw.strip_prefix("## ") {
            procedures.push(Procedure {
                title: title.trim().to_string(),
                blocks: Vec::new(),
            });
            place = None;
        } else if raw.trim() == "```sh" {
            block = Some(Vec::new());
        } else if raw.trim_start().starts_with("```") {
            in_other_block = true;
        }
    }
    if block.is_some() || in_other_block {
        return Err("docs/operations.md ends inside a code block".into());
    }
    Ok(procedures)
}

/// The blocks of the procedure titled `title`.
fn procedure(title: &str) -> Vec<Vec<Line>> {
    let procedures = procedures().unwrap_or_else(|error| panic!("{error}"));
    procedures
        .into_iter()
        .find(|p| p.title == title)
        .unwrap_or_else(|| panic!("docs/operations.md has no section `## {title}`"))
        .blocks
}

/// Runs the document's lines on the cluster.
struct Runbook<'a> {
    cluster: &'a mut Cluster,
}

impl Runbook<'_> {
    fn run_blocks(&mut self, title: &str, blocks: &[Vec<Line>]) {
        for block in blocks {
            self.run_block(title, block);
        }
    }

    fn run_block(&mut self, title: &str, block: &[Line]) {
        for line in block {
            eprintln!("[{title}] {:?}: {}", line.place, line.text);
            self.run_line(line);
        }
    }

    fn node(line: &Line) -> NodeId {
        match line.place {
            Place::Node(id) => id,
            Place::Admin => panic!("`{}` needs a node, not the admin machine", line.text),
        }
    }

    /// A path of the document as the test's: the node's config, the certificates.
    fn path(&self, place: Place, text: &str) -> PathBuf {
        let text = rename(text);
        if text == "/etc/ferry/ferry.toml" {
            let Place::Node(id) = place else {
                panic!("the config is a node's, not the admin machine's");
            };
            return self.cluster.node(id).spec.config_path();
        }
        if let Some(rest) = text.strip_prefix("/etc/ferry") {
            return self.cluster.certs.join(rest.trim_start_matches('/'));
        }
        panic!("a path the runbook test does not map: {text}");
    }

    fn ferry(&self, place: Place, args: &[String]) -> Output {
        let mut command = Command::new(FERRY_BIN);
        if let Place::Node(id) = place {
            command
                .arg("--socket")
                .arg(self.cluster.node(id).spec.control_socket());
        }
        for arg in args {
            let arg = rename(arg);
            if arg.starts_with('/') {
                command.arg(self.path(place, &arg));
            } else {
                command.arg(arg);
            }
        }
        run_with_timeout(command, COMMAND_TIMEOUT)
    }

    fn run_line(&mut self, line: &Line) {
        match &line.step {
            Step::Ferry { args, exit } => {
                let output = self.ferry(line.place, args);
                eprintln!("{}", output.stdout.trim_end());
                assert_eq!(
                    output.status.code(),
                    Some(*exit),
                    "`{}` on {:?}: {output}",
                    line.text,
                    line.place
                );
            }
            Step::Until { args, sleep } => {
                let deadline = Instant::now() + WAIT_TIMEOUT;
                loop {
                    let output = self.ferry(line.place, args);
                    if output.status.success() {
                        eprintln!("{}", output.stdout.trim_end());
                        break;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "`{}` on {:?} still failing after {WAIT_TIMEOUT:?}: {output}",
                        line.text,
                        line.place
                    );
                    // The document's pause, shortened: the test has a deadline of its own.
                    std::thread::sleep((*sleep).min(Duration::from_millis(500)));
                }
            }
            Step::Systemctl(action) => {
                let id = Self::node(line);
                match *action {
                    "start" => self.cluster.start_node(id),
                    "stop" => self.cluster.stop(id),
                    _ => {
                        self.cluster.stop(id);
                        self.cluster.start_node(id);
                    }
                }
            }
            Step::Scp => eprintln!("(scp: the test's nodes share one directory)"),
            Step::MkdirP(dir) => {
                let dir = self.path(line.place, dir);
                fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir -p {dir:?}: {e}"));
            }
            Step::Cp { sources, target } => {
                let target = self.path(line.place, target);
                for source in sources {
                    let source = self.path(line.place, source);
                    let destination = if target.is_dir() {
                        target.join(source.file_name().expect("a file name"))
                    } else {
                        target.clone()
                    };
                    fs::copy(&source, &destination)
                        .unwrap_or_else(|e| panic!("cp {source:?} {destination:?}: {e}"));
                }
            }
        }
    }
}

/// Runs every block of the procedure `title` on the cluster.
fn run_procedure(cluster: &mut Cluster, title: &str) {
    let blocks = procedure(title);
    Runbook { cluster }.run_blocks(title, &blocks);
}

/// A 4 KiB block of `byte`, written with FUA at block `index` through node `id`'s export.
fn write_block(cluster: &Cluster, id: NodeId, index: u64, byte: u8) {
    let mut conn = NbdConn::connect_unix(&cluster.nbd_socket(id), VOLUME)
        .unwrap_or_else(|e| panic!("connect to {}'s export: {e}", id.name()));
    conn.write(index * 4096, &[byte; 4096], true)
        .unwrap_or_else(|e| panic!("write block {index} on {}: {e}", id.name()));
    conn.disconnect();
}

/// The first byte of every byte of block `index` on node `id`, asserting the block is uniform.
fn read_block(cluster: &Cluster, id: NodeId, index: u64) -> u8 {
    let mut conn = NbdConn::connect_unix(&cluster.nbd_socket(id), VOLUME)
        .unwrap_or_else(|e| panic!("connect to {}'s export: {e}", id.name()));
    let data = conn
        .read(index * 4096, 4096)
        .unwrap_or_else(|e| panic!("read block {index} on {}: {e}", id.name()));
    conn.disconnect();
    assert!(
        data.iter().all(|b| *b == data[0]),
        "block {index} on {} is not uniform",
        id.name()
    );
    data[0]
}

fn start_in_sync(options: ClusterOptions) -> Cluster {
    let cluster = Cluster::start(options);
    cluster.wait_replica_state(A, "in-sync", SETUP_TIMEOUT);
    cluster
}

/// Lines of node `id`'s log that report a replica entering `state`, over all its runs.
fn state_changes_to(cluster: &Cluster, id: NodeId, state: &str) -> usize {
    cluster
        .node(id)
        .log_tail()
        .lines()
        .filter(|line| line.contains("replica state"))
        .filter(|line| {
            line.contains(&format!("to=\"{state}\""))
                || line.contains(&format!("to={state} "))
                || line.contains(&format!("\"to\":\"{state}\""))
        })
        .count()
}

// ---- the procedures --------------------------------------------------------------------------

#[test]
fn operations_first_setup() {
    // Node b logs JSON lines (`FERRY_LOG_FORMAT` is `--log-format`'s variable).
    let options = ClusterOptions {
        env_b: vec![("FERRY_LOG_FORMAT".into(), "json".into())],
        ..ClusterOptions::default()
    };
    let mut cluster = Cluster::configure(options);
    // The fixture made certificates; the document makes its own, at the same paths.
    fs::remove_dir_all(&cluster.certs).expect("remove the fixture's certificates");
    run_procedure(&mut cluster, "First setup");
    for name in ["ca.pem", "ca.key", "a.pem", "a.key", "b.pem", "b.key"] {
        assert!(cluster.certs.join(name).is_file(), "no {name}");
    }
    assert_eq!(cluster.role(A), "primary");
    assert_eq!(cluster.replica_state(A), "in-sync");

    // The view for people: healthy, and the exit status a check reads.
    let output = cluster.node(A).ctl(&["status", "--check"]);
    assert_eq!(output.status.code(), Some(0), "{output}");
    assert!(output.stdout.starts_with("node a: OK\n"), "{output}");
    let json = cluster.status_cli(A);
    assert_eq!(json["schema_version"], 1, "{json}");
    // --watch, piped: plain snapshots under a time line, bounded by --count; with --json one
    // object per line.
    let output = cluster
        .node(A)
        .ctl(&["status", "--watch", "1", "--count", "2"]);
    assert_eq!(output.status.code(), Some(0), "{output}");
    assert_eq!(output.stdout.matches("\n--- ").count() + 1, 2, "{output}");
    assert!(
        !output.stdout.contains('\x1b'),
        "terminal codes in a pipe: {output}"
    );
    let output = cluster
        .node(A)
        .ctl(&["status", "--json", "--watch", "1", "--count", "2"]);
    assert_eq!(output.status.code(), Some(0), "{output}");
    let lines: Vec<&str> = output.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{output}");
    for line in lines {
        let snapshot: Value = serde_json::from_str(line).expect("one JSON object per line");
        assert_eq!(snapshot["schema_version"], 1, "{line}");
    }
    // No daemon: UNKNOWN (3) for the check, also for a usage error of the check; 1 and 2
    // without --check, as every command (SPEC §3).
    let missing = cluster.dir.join("no-such.sock");
    for (check, unreachable, usage) in [(true, 3, 3), (false, 1, 2)] {
        let mut command = Command::new(FERRY_BIN);
        command.arg("--socket").arg(&missing).arg("status");
        if check {
            command.arg("--check");
        }
        let output = run_with_timeout(&mut command, COMMAND_TIMEOUT);
        assert_eq!(output.status.code(), Some(unreachable), "{output}");
        assert!(output.stderr.contains("UNKNOWN"), "{output}");
        let mut args = vec!["status", "--watch", "0"];
        if check {
            args.push("--check");
        }
        let output = cluster.node(A).ctl(&args);
        assert_eq!(output.status.code(), Some(usage), "{output}");
    }
    let output = cluster.node(A).ctl(&["promote"]);
    assert_eq!(output.status.code(), Some(2), "{output}");

    // Steady state is quiet: nothing logged while nothing changes.
    let before = [A, B].map(|id| cluster.node(id).log_tail().lines().count());
    std::thread::sleep(Duration::from_secs(3));
    for (id, before) in [A, B].into_iter().zip(before) {
        let log = cluster.node(id).log_tail();
        let new: Vec<&str> = log.lines().skip(before).collect();
        assert!(
            new.is_empty(),
            "node {} logged in steady state: {new:#?}",
            id.name()
        );
    }
    // b's log is JSON, one object per line, with the state change and its fields.
    let log = cluster.node(B).log_tail();
    let mut saw_state = false;
    for line in log.lines().filter(|line| !line.starts_with("=====")) {
        let event: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("b's log line is not JSON ({e}): {line}"));
        assert!(
            event["timestamp"].is_string() && event["level"].is_string(),
            "{line}"
        );
        if event["message"] == "replica state" && event["to"] == "in-sync" {
            assert_eq!(event["volume"], VOLUME, "{line}");
            assert_eq!(event["peer"], "a", "{line}");
            saw_state = true;
        }
    }
    assert!(
        saw_state,
        "no JSON `replica state` line to in-sync in b's log:\n{log}"
    );
}

#[test]
fn operations_planned_switchover() {
    let mut cluster = start_in_sync(ClusterOptions::default());
    write_block(&cluster, A, 7, 0xa1);
    run_procedure(&mut cluster, "Planned switchover");
    assert_eq!(cluster.role(B), "primary");
    assert_eq!(cluster.role(A), "secondary");
    assert_eq!(read_block(&cluster, B, 7), 0xa1);
    write_block(&cluster, B, 8, 0xb2);
    cluster.wait_replica_state(B, "in-sync", SETUP_TIMEOUT);
}

#[test]
fn operations_unplanned_failover() {
    let mut cluster = start_in_sync(ClusterOptions::default());
    write_block(&cluster, A, 3, 0xc3);
    cluster.kill9(A);
    run_procedure(&mut cluster, "Unplanned failover");
    assert_eq!(cluster.role(B), "primary");
    // Every write a completed is on b (RPO 0), and b takes writes.
    assert_eq!(read_block(&cluster, B, 3), 0xc3);
    write_block(&cluster, B, 4, 0xd4);
}

#[test]
fn operations_failback() {
    let mut cluster = start_in_sync(ClusterOptions::default());
    write_block(&cluster, A, 1, 0x11);
    cluster.kill9(A);
    cluster
        .promote(B, true)
        .unwrap_or_else(|reason| panic!("promote --force on b: {reason}"));
    write_block(&cluster, B, 2, 0x22);
    run_procedure(&mut cluster, "Failback");
    assert_eq!(cluster.role(A), "primary");
    assert_eq!(cluster.role(B), "secondary");
    assert_eq!(read_block(&cluster, A, 1), 0x11);
    assert_eq!(
        read_block(&cluster, A, 2),
        0x22,
        "b's write after the failover"
    );
}

/// A pair whose secondary b is a regional replica (batches every 200 ms), in sync.
fn start_regional() -> Cluster {
    start_in_sync(ClusterOptions {
        regional: Some((B, "200ms".into())),
        ..ClusterOptions::default()
    })
}

#[test]
fn operations_pausing_a_regional_replica() {
    let mut cluster = start_regional();
    write_block(&cluster, A, 1, 0x10);
    // The writes made while paused are in the catch-up; the document's lines run in order,
    // so the pause is checked here by hand first.
    let blocks = procedure("Pausing a regional replica");
    let (pause, rest) = blocks[0].split_at(2);
    Runbook {
        cluster: &mut cluster,
    }
    .run_block("Pausing a regional replica", pause);
    assert_eq!(cluster.replica_state(A), "paused");
    write_block(&cluster, A, 2, 0x20);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(read_block(&cluster, B, 2), 0, "nothing ships while paused");
    Runbook {
        cluster: &mut cluster,
    }
    .run_block("Pausing a regional replica", rest);
    assert_eq!(cluster.replica_state(A), "in-sync");
    cluster.wait_volume(B, "as of a's last write", SETUP_TIMEOUT, |volume| {
        volume["journal"]["head_lsn"] == cluster.volume_status(A)["journal"]["head_lsn"]
    });
    assert_eq!(read_block(&cluster, B, 1), 0x10);
    assert_eq!(read_block(&cluster, B, 2), 0x20);
}

#[test]
fn operations_failover_to_the_regional_site() {
    let mut cluster = start_regional();
    write_block(&cluster, A, 1, 0x31);
    // b holds the write once a batch carried it.
    cluster.wait_volume(B, "as of a's write", SETUP_TIMEOUT, |volume| {
        volume["journal"]["head_lsn"] == cluster.volume_status(A)["journal"]["head_lsn"]
    });
    cluster.kill9(A);
    run_procedure(&mut cluster, "Failover to the regional site");
    assert_eq!(cluster.role(B), "primary");
    assert_eq!(read_block(&cluster, B, 1), 0x31);
    write_block(&cluster, B, 2, 0x42);
    // a comes back as b's secondary, with b's writes.
    cluster.restart(A);
    cluster.wait_replica_state(B, "in-sync", SETUP_TIMEOUT);
    assert_eq!(cluster.role(A), "secondary");
    cluster.wait_volume(A, "as of b's write", SETUP_TIMEOUT, |volume| {
        volume["journal"]["head_lsn"] == cluster.volume_status(B)["journal"]["head_lsn"]
    });
    assert_eq!(read_block(&cluster, A, 2), 0x42);
}

#[test]
fn operations_split_brain() {
    let options = ClusterOptions {
        relay: true,
        ..ClusterOptions::default()
    };
    let mut cluster = start_in_sync(options);
    write_block(&cluster, A, 5, 0x55);
    cluster.relay().both().cut();
    cluster.wait_replica_state(A, "degraded", SETUP_TIMEOUT);
    cluster
        .promote(B, true)
        .unwrap_or_else(|reason| panic!("promote --force on b: {reason}"));
    write_block(&cluster, A, 6, 0xa6);
    write_block(&cluster, B, 6, 0xb6);
    write_block(&cluster, B, 9, 0xb9);
    cluster.relay().both().restore();
    cluster.wait_replica_state(A, "split-brain", SETUP_TIMEOUT);
    cluster.wait_replica_state(B, "split-brain", SETUP_TIMEOUT);

    // The fix `ferry status` prints on b is the command the document runs there.
    let output = cluster.node(B).ctl(&["status", "--check", VOLUME]);
    assert_eq!(output.status.code(), Some(2), "{output}");
    assert!(
        output
            .stdout
            .contains("here `ferry resolve vol --discard-local --peer a`"),
        "{output}"
    );

    run_procedure(&mut cluster, "Split brain");
    assert_eq!(cluster.role(A), "primary");
    assert_eq!(cluster.role(B), "secondary");
    for id in [A, B] {
        assert_eq!(read_block(&cluster, id, 5), 0x55);
        assert_eq!(
            read_block(&cluster, id, 6),
            0xa6,
            "node {}: a's write wins",
            id.name()
        );
        assert_eq!(
            read_block(&cluster, id, 9),
            0,
            "node {}: b's write is gone",
            id.name()
        );
    }
}

#[cfg(feature = "fault-injection")]
#[test]
fn operations_a_full_journal() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    // A slow backing device on a (200 ms per device write) behind the smallest journal.
    let options = ClusterOptions {
        journal_size: "16MiB".into(),
        env_a: vec![("FERRY_FAULT_DEVICE_WRITE_DELAY_US".into(), "200000".into())],
        ..ClusterOptions::default()
    };
    let mut cluster = start_in_sync(options);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = Arc::clone(&stop);
        let socket = cluster.nbd_socket(A);
        std::thread::spawn(move || {
            let mut conn = NbdConn::connect_unix(&socket, VOLUME).expect("connect");
            // Scattered 4 KiB writes: each is a device write of its own when applied.
            let mut index: u64 = 0;
            while !stop.load(Ordering::SeqCst) && index < 100_000 {
                if conn
                    .write((index * 7919 % 16_000) * 4096, &[0x5a; 4096], false)
                    .is_err()
                {
                    break;
                }
                index += 1;
            }
            conn.disconnect();
        })
    };
    let full = cluster.poll_volume(A, SETUP_TIMEOUT, |volume| {
        let used = volume["journal"]["used_bytes"].as_u64().unwrap_or(0);
        let capacity = volume["journal"]["capacity_bytes"].as_u64().unwrap_or(1);
        used * 10 >= capacity * 9
    });
    let full = match full {
        Ok(volume) => volume,
        Err(last) => {
            stop.store(true, Ordering::SeqCst);
            let _ = writer.join();
            panic!("the journal never reached 90 %: {last}");
        }
    };
    eprintln!("journal: {}", full["journal"]);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run_procedure(&mut cluster, "A full journal");
    }));
    stop.store(true, Ordering::SeqCst);
    writer.join().expect("writer thread");
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

#[cfg(not(feature = "fault-injection"))]
#[test]
fn operations_a_full_journal() {
    eprintln!(
        "operations_a_full_journal needs the fault-injection feature (a slow device); skipped"
    );
}

#[test]
fn operations_replacing_a_node() {
    let mut cluster = start_in_sync(ClusterOptions::default());
    write_block(&cluster, A, 12, 0x12);
    // b's machine is replaced: an empty data directory and a new, empty device.
    cluster.kill9(B);
    // The machine is away for longer than peer_timeout: a has noticed before the new one
    // starts (otherwise its status would still show the old copy in sync).
    cluster.wait_replica_state(A, "degraded", SETUP_TIMEOUT);
    let spec = cluster.node(B).spec.clone();
    fs::remove_dir_all(spec.dir.join("data")).expect("remove b's data");
    fs::create_dir_all(spec.dir.join("data")).expect("new data dir");
    fs::remove_file(spec.device_path()).expect("remove b's device");
    let full_syncs = state_changes_to(&cluster, A, "syncing");
    run_procedure(&mut cluster, "Replacing a node");
    // The new node's device started empty: holding block 12 shows that it was synced. The
    // state log shows at most one move into `syncing` for it: the node logs states it sees
    // at its reports (every 100 ms), and a full sync of this mostly empty volume may begin
    // and end between two of them on a fast disk.
    assert!(
        state_changes_to(&cluster, A, "syncing") <= full_syncs + 1,
        "one full sync to the new node, not more"
    );
    assert_eq!(cluster.role(B), "secondary");
    assert_eq!(read_block(&cluster, B, 12), 0x12);
}

#[test]
fn operations_upgrading_without_a_full_resync() {
    let mut cluster = start_in_sync(ClusterOptions::default());
    let blocks = procedure("Upgrading Ferry without a full resync");
    assert_eq!(blocks.len(), 2, "stop, then the rest");
    let full_syncs = [A, B].map(|id| state_changes_to(&cluster, id, "syncing"));
    let title = "upgrade";
    Runbook {
        cluster: &mut cluster,
    }
    .run_block(title, &blocks[0]);
    // The primary keeps serving while b is down ("the new binary is installed").
    write_block(&cluster, A, 20, 0x20);
    Runbook {
        cluster: &mut cluster,
    }
    .run_block(title, &blocks[1]);
    assert_eq!(cluster.role(B), "primary");
    assert_eq!(cluster.role(A), "secondary");
    assert_eq!(read_block(&cluster, B, 20), 0x20);
    // Only delta resyncs: no node started a full sync again.
    for (id, before) in [A, B].into_iter().zip(full_syncs) {
        assert_eq!(
            state_changes_to(&cluster, id, "syncing"),
            before,
            "node {} ran a full sync during the upgrade:\n{}",
            id.name(),
            cluster.replication_log(id, 40)
        );
    }
}

#[test]
fn operations_rotating_certificates() {
    let mut cluster = start_in_sync(ClusterOptions::default());
    let old = [A, B].map(|id| {
        fs::read(cluster.certs.join(format!("{}.pem", id.name()))).expect("read certificate")
    });
    let old_ca = fs::read(cluster.certs.join("ca.pem")).expect("read CA");
    run_procedure(&mut cluster, "Rotating certificates");
    for (id, old) in [A, B].into_iter().zip(old) {
        let new = fs::read(cluster.certs.join(format!("{}.pem", id.name()))).expect("read");
        assert_ne!(
            new,
            old,
            "node {}: the certificate was not replaced",
            id.name()
        );
    }
    assert_eq!(fs::read(cluster.certs.join("ca.pem")).expect("CA"), old_ca);
    cluster.wait_replica_state(A, "in-sync", SETUP_TIMEOUT);
    assert_eq!(cluster.replica(A)["last_error"], Value::Null);
}

/// Every procedure heading of the document has its test above and every test its heading;
/// every line of every `sh` block is one the test runs.
#[test]
fn operations_doc_and_tests_in_step() {
    let procedures = procedures().unwrap_or_else(|error| panic!("{error}"));
    let titles: Vec<&str> = procedures.iter().map(|p| p.title.as_str()).collect();
    for title in &titles {
        assert!(
            PROCEDURES.iter().any(|(t, _)| t == title) || REFERENCE_SECTIONS.contains(title),
            "docs/operations.md: `## {title}` has no test in tests/it/operations.rs"
        );
    }
    let source = include_str!("operations.rs");
    for (title, test) in PROCEDURES {
        assert!(
            titles.contains(&title),
            "no `## {title}` in docs/operations.md"
        );
        assert!(
            source.contains(&format!("fn {test}()")),
            "no test {test} for `## {title}`"
        );
        let procedure = procedures.iter().find(|p| p.title == title).expect("found");
        assert!(!procedure.blocks.is_empty(), "`## {title}` has no sh block");
    }
    // The exit codes of the reference section are the ones `ferry status` uses.
    for line in [
        "| 0 | OK |",
        "| 1 | WARNING |",
        "| 2 | CRITICAL |",
        "| 3 | UNKNOWN |",
    ] {
        assert!(DOC.contains(line), "docs/operations.md lacks {line}");
    }
    // The parser refuses what it does not run.
    for bad in [
        "rm -rf /var/lib/ferry",
        "ferry status | grep x",
        "until true; do sleep 1; done",
        "systemctl reload ferry",
        "ferry status # exit x",
    ] {
        assert!(parse_step(bad).is_err(), "{bad}");
    }
    assert_eq!(
        parse_step("ferry status --check pg-data    # exit 2: split-brain"),
        Ok(Step::Ferry {
            args: vec!["status".into(), "--check".into(), "pg-data".into()],
            exit: 2
        })
    );
}
