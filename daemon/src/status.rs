//! `ferry status` for people and for monitoring checks: the compact view of a node's volumes
//! and replicas, what needs attention with the one command that fixes it, and the exit code.
//!
//! Everything here is a pure function of a [`StatusResult`]; the command-line client fetches
//! the status and prints. The health of a node is the worst of its findings:
//!
//! | exit | health | when |
//! |---|---|---|
//! | 0 | OK | every replica `in-sync` (or `standby`), nothing held, nothing failed |
//! | 1 | WARNING | a replica resyncing, degraded, lagging, paused or connecting; a secondary being resynced; a journal over 90 % full; a transient hold (a demotion draining, a resync handing over) |
//! | 2 | CRITICAL | a split brain; a failed volume; a primary that is not consistent; writes held by fencing; I/O suspended; a verify that found differing copies |
//! | 3 | UNKNOWN | the daemon cannot be reached or its answer is not understood (the client decides this one) |
//!
//! (the exit codes of `ferry status --check`)
//!
//! The codes are Nagios' plugin codes, so `ferry status --check` is a check as it is (without
//! `--check`, `ferry status` exits as every command does: 0 when the daemon answered). Every fix
//! printed is a command that exists in this binary, or says plainly that none does.

use std::fmt::Write as _;

use crate::control::{
    human_bytes, render_table, render_verify, ReplicaStatus, StatusResult, VolumeStatus,
};

/// Journal fill from which a volume is reported (the alert rule's threshold too).
const JOURNAL_FULL_WARNING_PERCENT: f64 = 90.0;

/// How bad a finding is; ordered, the worst wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Health {
    Ok,
    Warning,
    Critical,
    /// The daemon cannot be reached or its answer is not understood.
    Unknown,
}

impl Health {
    /// The exit code of `ferry status` (Nagios plugin codes).
    pub fn exit_code(self) -> u8 {
        match self {
            Health::Ok => 0,
            Health::Warning => 1,
            Health::Critical => 2,
            Health::Unknown => 3,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Health::Ok => "OK",
            Health::Warning => "WARNING",
            Health::Critical => "CRITICAL",
            Health::Unknown => "UNKNOWN",
        }
    }
}

/// One thing that needs attention.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub health: Health,
    pub volume: String,
    /// The replica's peer, when the finding is about one replica.
    pub peer: Option<String>,
    /// What is wrong, in a sentence.
    pub problem: String,
    /// What fixes it: a command that exists, or what to do when no command does.
    pub fix: String,
}

/// Every finding of a status, worst first (volume order kept within a health).
pub fn assess(status: &StatusResult) -> Vec<Finding> {
    let mut findings = Vec::new();
    for volume in &status.volumes {
        assess_volume(&status.node, volume, &mut findings);
    }
    // Stable: the order of volumes and replicas is kept within one health.
    findings.sort_by_key(|finding| std::cmp::Reverse(finding.health));
    findings
}

/// The health of a status: the worst finding, OK without any.
pub fn health(findings: &[Finding]) -> Health {
    findings
        .iter()
        .map(|finding| finding.health)
        .max()
        .unwrap_or(Health::Ok)
}

fn assess_volume(node: &str, volume: &VolumeStatus, findings: &mut Vec<Finding>) {
    let name = volume.name.as_str();
    let mut add = |health, peer: Option<&str>, problem: String, fix: String| {
        findings.push(Finding {
            health,
            volume: name.to_string(),
            peer: peer.map(str::to_string),
            problem,
            fix,
        });
    };
    let primary = volume.role == "primary";
    if let Some(failure) = &volume.failure {
        add(
            Health::Critical,
            None,
            format!("failed, serving reads but no writes until restart: {failure}"),
            "repair the cause the log names (device, filesystem), then restart `ferry run` on \
             this node: the journal is replayed and writes resume"
                .to_string(),
        );
    }
    if primary && !volume.consistent {
        add(
            Health::Critical,
            None,
            "primary, but not consistent: a resync into this copy has not finished".to_string(),
            format!("`ferry demote {name}` here, then `ferry promote {name}` on a consistent copy"),
        );
    } else if !volume.consistent && volume.resolving_with.is_none() {
        add(
            Health::Warning,
            None,
            "being resynced: not consistent, it cannot be promoted until the resync ends"
                .to_string(),
            "none needed: the resync ends by itself".to_string(),
        );
    }
    if let Some(reason) = &volume.writes_held {
        if volume.failure.is_none() {
            let (health, fix) = held_fix(name, reason);
            add(health, None, format!("writes held: {reason}"), fix);
        }
    }
    if let Some(peer) = &volume.resolving_with {
        add(
            Health::Warning,
            None,
            format!("resolving a split brain: this copy's writes since the split are discarded and resynced from {peer}"),
            "none needed: the resync ends by itself".to_string(),
        );
    }
    let journal = &volume.journal;
    if journal.capacity_bytes > 0 {
        // Precision loss is irrelevant for a percentage.
        let percent = journal.used_bytes as f64 * 100.0 / journal.capacity_bytes as f64;
        if percent >= JOURNAL_FULL_WARNING_PERCENT {
            add(
                Health::Warning,
                None,
                format!(
                    "journal {percent:.0}% full: writes wait for the backing device when it fills"
                ),
                "no Ferry command: the backing device is slower than the writes; lower the load \
                 or move the device to faster storage"
                    .to_string(),
            );
        }
    }
    for replica in &volume.replicas {
        if let Some((health, problem, fix)) = replica_finding(node, volume, replica) {
            add(health, Some(&replica.peer), problem, fix);
        }
        if let Some((health, problem, fix)) = verify_finding(node, volume, replica) {
            add(health, Some(&replica.peer), problem, fix);
        }
    }
}

/// Held writes: fencing is critical and released by a promote; a demotion draining or a
/// resync handing over passes by itself.
fn held_fix(volume: &str, reason: &str) -> (Health, String) {
    if reason.starts_with("fenced") {
        return (
            Health::Critical,
            format!(
                "bring the peers back (the hold ends when they answer); if none of them was \
                 promoted meanwhile: `ferry promote {volume}` here"
            ),
        );
    }
    if reason.starts_with("a demotion") || reason.starts_with("a resync") {
        return (
            Health::Warning,
            "none needed: it passes by itself".to_string(),
        );
    }
    (
        Health::Critical,
        "see the reason; the daemon's log has the details".to_string(),
    )
}

fn replica_finding(
    node: &str,
    volume: &VolumeStatus,
    replica: &ReplicaStatus,
) -> Option<(Health, String, String)> {
    let name = volume.name.as_str();
    let peer = replica.peer.as_str();
    let because = replica
        .last_error
        .as_deref()
        .map(|error| format!(" ({error})"))
        .unwrap_or_default();
    let finding = match replica.state.as_str() {
        "in-sync" | "standby" => return None,
        "syncing" | "resyncing" => {
            let progress = match replica.catch_up.as_deref() {
                Some("staged") => format!(
                    "{}; staged: this copy stays at its last batch boundary (promotable) until it ends",
                    resync_progress(replica)
                ),
                Some("in-place") => format!(
                    "{}; in place: this copy is inconsistent (not promotable) until it ends",
                    resync_progress(replica)
                ),
                _ => resync_progress(replica),
            };
            if replica.resync_rate_bytes_per_second == Some(0.0) {
                (
                    Health::Warning,
                    format!("{}: {progress}, no progress for 10 s", replica.state),
                    format!("no Ferry command: check the link to {peer} and {peer}'s log and device"),
                )
            } else {
                (
                    Health::Warning,
                    format!("{}: {progress}", replica.state),
                    "none needed: the resync ends by itself".to_string(),
                )
            }
        }
        "split-brain" => (
            Health::Critical,
            format!("split brain: this copy and {peer}'s both took writes since they split{because}"),
            format!(
                "choose the copy whose writes are thrown away and run on it: here \
                 `ferry resolve {name} --discard-local --peer {peer}`, or on {peer} \
                 `ferry resolve {name} --discard-local --peer {node}`"
            ),
        ),
        "suspended" => (
            Health::Critical,
            format!("{peer} unreachable and on_disconnect = \"suspend\": client writes are held{because}"),
            format!(
                "no Ferry command: bring {peer} back (writes resume once it is in sync); to \
                 serve unprotected instead, set on_disconnect = \"degrade\" and restart `ferry run`"
            ),
        ),
        // Connected but taking nothing (the handshake's reason says why, and what to do).
        "degraded" if replica.last_error.as_deref().is_some_and(|e| e.starts_with("the peer")) => (
            Health::Warning,
            format!("{peer} takes nothing from this copy: writes are tracked for a delta resync{because}"),
            if replica.last_error.as_deref().is_some_and(|e| e.contains("ferry resolve")) {
                format!("`ferry resolve {name} --discard-local` on {peer}")
            } else {
                format!("no Ferry command: {peer} steps down, then the resync starts by itself")
            },
        ),
        "degraded" => (
            Health::Warning,
            format!("{peer} unreachable: writes are tracked for a delta resync{because}"),
            format!("no Ferry command: bring {peer}'s daemon and the link back; the resync starts by itself"),
        ),
        "lagging" => (
            Health::Warning,
            format!(
                "behind by {:.1} s, more than the interval ({} not yet at {peer})",
                replica.lag_seconds,
                human_bytes(replica.lag_bytes)
            ),
            "no Ferry command: the link is slower than the writes (check its bandwidth and \
             max_rate)"
                .to_string(),
        ),
        "paused" => (
            Health::Warning,
            "shipping paused by the operator (writes are tracked)".to_string(),
            format!("`ferry resume {name} --peer {peer}`"),
        ),
        "connecting" => {
            let fix = if volume.role == "primary" || !volume.consistent {
                format!("no Ferry command: start {peer}'s daemon, or fix the link or the certificate the error names")
            } else {
                format!(
                    "no Ferry command while {peer} is alive: start its daemon or fix the link; \
                     if {peer} was the primary and is gone for good: `ferry promote {name} --force` here"
                )
            };
            (
                Health::Warning,
                format!("not connected to {peer}{because}"),
                fix,
            )
        }
        other => (
            Health::Warning,
            format!("state `{other}`, which this ferry binary does not know"),
            "use a ferry binary of the daemon's version".to_string(),
        ),
    };
    Some(finding)
}

/// A verify that found differing copies and did not repair them.
fn verify_finding(
    node: &str,
    volume: &VolumeStatus,
    replica: &ReplicaStatus,
) -> Option<(Health, String, String)> {
    let verify = replica.verify.as_ref()?;
    if verify.running || verify.differing_bytes == 0 || verify.repaired {
        return None;
    }
    let name = volume.name.as_str();
    let peer = replica.peer.as_str();
    let fix = if volume.role == "primary" {
        format!(
            "`ferry verify {name} --peer {peer} --repair` here (copies this node's data to {peer})"
        )
    } else {
        format!("`ferry verify {name} --peer {node} --repair` on the primary {peer}")
    };
    Some((
        Health::Critical,
        format!(
            "the last verify found {} differing from {peer}'s copy",
            human_bytes(verify.differing_bytes)
        ),
        fix,
    ))
}

/// "42.0% of 64.0 MiB, 12.1 MiB/s, 3 s left"; what is known of a resync.
fn resync_progress(replica: &ReplicaStatus) -> String {
    let total = replica.resync_total_bytes;
    if total == 0 {
        return if replica.resync_remaining_bytes > 0 {
            format!("{} left", human_bytes(replica.resync_remaining_bytes))
        } else {
            "starting".to_string()
        };
    }
    let done = total.saturating_sub(replica.resync_remaining_bytes);
    // Precision loss is irrelevant for a percentage.
    let percent = done as f64 * 100.0 / total as f64;
    let mut text = format!("{percent:.1}% of {}", human_bytes(total));
    match replica.resync_rate_bytes_per_second {
        None => text.push_str(", measuring the rate"),
        Some(rate) if rate <= 0.0 => text.push_str(", STALLED"),
        Some(rate) => {
            let _ = write!(text, ", {}/s", human_rate(rate));
            if let Some(eta) = replica.resync_eta_seconds {
                let _ = write!(text, ", {} left", human_duration(eta));
            }
        }
    }
    text
}

/// A rate in bytes per second, in the units of [`human_bytes`]: "4.0 MiB", "512 B".
fn human_rate(bytes_per_second: f64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if !bytes_per_second.is_finite() || bytes_per_second < 1024.0 {
        return format!("{:.0} B", bytes_per_second.max(0.0));
    }
    let mut value = bytes_per_second / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// "45 s", "4 min 10 s", "2 h 5 min", "3 d 4 h".
pub fn human_duration(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return "?".to_string();
    }
    // Rounded up: "0 s left" would be a lie while bytes remain. The value is finite and not
    // negative (checked above), and `as` saturates the absurdly large ones.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let total = seconds.ceil() as u64;
    let (days, hours, minutes, secs) = (
        total / 86_400,
        total / 3600 % 24,
        total / 60 % 60,
        total % 60,
    );
    match (days, hours, minutes) {
        (0, 0, 0) => format!("{secs} s"),
        (0, 0, _) => format!("{minutes} min {secs} s"),
        (0, _, _) => format!("{hours} h {minutes} min"),
        _ => format!("{days} d {hours} h"),
    }
}

/// The view `ferry status` prints for people: a headline with the node's health, then per
/// volume one line, its replicas as a table, and what needs attention with its fix.
pub fn render(status: &StatusResult) -> String {
    let findings = assess(status);
    let health = health(&findings);
    let mut out = format!("node {}: {}", status.node, health.as_str());
    let critical = findings
        .iter()
        .filter(|f| f.health == Health::Critical)
        .count();
    let warnings = findings.len() - critical;
    match (critical, warnings) {
        (0, 0) => {}
        (0, w) => {
            let _ = write!(out, ", {w} warning{}", plural(w));
        }
        (c, 0) => {
            let _ = write!(out, ", {c} critical");
        }
        (c, w) => {
            let _ = write!(out, ", {c} critical, {w} warning{}", plural(w));
        }
    }
    out.push('\n');
    if status.volumes.is_empty() {
        out.push_str("no volumes\n");
        return out;
    }
    for volume in &status.volumes {
        out.push('\n');
        render_volume(volume, &mut out);
        for finding in findings.iter().filter(|f| f.volume == volume.name) {
            let subject = finding.peer.as_deref().unwrap_or(&volume.name);
            let _ = writeln!(
                out,
                "  {:<8} {subject}: {}\n           fix: {}",
                finding.health.as_str(),
                finding.problem,
                finding.fix
            );
        }
    }
    out
}

fn plural(count: usize) -> &'static str {
    if count == 1 {
        ""
    } else {
        "s"
    }
}

/// "pg-data  primary  generation 3  10.0 GiB  journal 25.0% of 1.0 GiB", then the
/// replica table, recovery and verify lines.
fn render_volume(volume: &VolumeStatus, out: &mut String) {
    let journal = &volume.journal;
    let fill = if journal.capacity_bytes == 0 {
        "-".to_string()
    } else {
        // Precision loss is irrelevant for a one-decimal percentage.
        let percent = journal.used_bytes as f64 * 100.0 / journal.capacity_bytes as f64;
        format!("{percent:.1}%")
    };
    let _ = writeln!(
        out,
        "{}  {}  generation {}  {} on {}  journal {fill} of {} (head LSN {}, applied {})",
        volume.name,
        volume.role,
        volume.generation,
        human_bytes(volume.size_bytes),
        volume.device,
        human_bytes(journal.capacity_bytes),
        journal.head_lsn,
        journal.applied_lsn,
    );
    if let Some(primary) = &volume.following {
        let _ = writeln!(out, "  following {primary}");
    }
    let recovery = &volume.recovery;
    if recovery.records_replayed > 0
        || recovery.torn_tail_bytes > 0
        || recovery.stopped_reason.is_some()
    {
        let _ = write!(
            out,
            "  at start: replayed {} records ({}), torn tail {}",
            recovery.records_replayed,
            human_bytes(recovery.bytes_replayed),
            human_bytes(recovery.torn_tail_bytes),
        );
        if let Some(reason) = &recovery.stopped_reason {
            let _ = write!(out, ", stopped: {reason}");
        }
        out.push('\n');
    }
    if volume.replicas.is_empty() {
        out.push_str("  no replicas\n");
        return;
    }
    let mut rows = vec![["  PEER", "MODE", "STATE", "LAG", "RESYNC"]
        .map(str::to_string)
        .to_vec()];
    for replica in &volume.replicas {
        let resync = match replica.state.as_str() {
            "syncing" | "resyncing" => resync_progress(replica),
            _ if replica.resynced_bytes > 0 => {
                format!("last {}", human_bytes(replica.resynced_bytes))
            }
            _ => "-".to_string(),
        };
        rows.push(vec![
            format!("  {}", replica.peer),
            replica.mode.clone(),
            replica.state.clone(),
            format!(
                "{}, {:.1} s",
                human_bytes(replica.lag_bytes),
                replica.lag_seconds
            ),
            resync,
        ]);
    }
    render_table(&rows, out);
    for replica in &volume.replicas {
        if let Some(verify) = &replica.verify {
            let _ = writeln!(out, "  {}", render_verify(verify));
        }
    }
}

/// The commands the fixes name, as the first word after `ferry`; checked against the CLI in
/// its tests so that no fix names a command that does not exist.
pub const FIX_COMMANDS: [&str; 6] = ["promote", "demote", "resolve", "resume", "run", "verify"];

/// The `ferry ...` commands quoted in a fix, in order.
pub fn quoted_commands(fix: &str) -> Vec<&str> {
    fix.split('`')
        .skip(1)
        .step_by(2)
        .filter(|quoted| quoted.starts_with("ferry "))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{JournalStatus, RecoveryStatus, VerifyReport, STATUS_SCHEMA_VERSION};

    fn replica(peer: &str, state: &str) -> ReplicaStatus {
        ReplicaStatus {
            peer: peer.to_string(),
            mode: "metro".to_string(),
            state: state.to_string(),
            acked_lsn: 1234,
            lag_bytes: 0,
            lag_seconds: 0.0,
            resync_remaining_bytes: 0,
            resync_total_bytes: 0,
            resync_rate_bytes_per_second: None,
            resync_eta_seconds: None,
            resynced_bytes: 0,
            last_error: None,
            dirty_bytes: 0,
            protecting: true,
            verify: None,
            catch_up: None,
        }
    }

    fn volume(name: &str, role: &str, replicas: Vec<ReplicaStatus>) -> VolumeStatus {
        VolumeStatus {
            name: name.to_string(),
            role: role.to_string(),
            size_bytes: 10 << 30,
            journal: JournalStatus {
                used_bytes: 256 << 20,
                capacity_bytes: 1 << 30,
                head_lsn: 1234,
                applied_lsn: 1200,
                unapplied_bytes: 4096,
                full_waits: 0,
            },
            generation: 3,
            consistent: true,
            writes_held: None,
            following: None,
            resolving_with: None,
            replicas,
            recovery: RecoveryStatus {
                records_replayed: 0,
                bytes_replayed: 0,
                torn_tail_bytes: 0,
                stopped_reason: None,
            },
            device: format!("/dev/vg0/{name}"),
            failure: None,
        }
    }

    fn node(volumes: Vec<VolumeStatus>) -> StatusResult {
        StatusResult {
            schema_version: STATUS_SCHEMA_VERSION,
            node: "site-a".to_string(),
            volumes,
        }
    }

    /// `check(status, health, wanted lines)`: the health (and so the exit code) and lines the
    /// view must contain.
    fn check(status: &StatusResult, expected: Health, wanted: &[&str]) {
        let findings = assess(status);
        let text = render(status);
        assert_eq!(health(&findings), expected, "{text}");
        for line in wanted {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
        for finding in &findings {
            for command in quoted_commands(&finding.fix) {
                let word = command.split_whitespace().nth(1).unwrap_or_default();
                assert!(FIX_COMMANDS.contains(&word), "{command} in {finding:?}");
            }
        }
    }

    #[test]
    fn healthy_node_is_ok_and_quiet() {
        let status = node(vec![volume(
            "pg-data",
            "primary",
            vec![replica("site-b", "in-sync")],
        )]);
        check(
            &status,
            Health::Ok,
            &[
                "node site-a: OK\n",
                "pg-data  primary  generation 3  10.0 GiB on /dev/vg0/pg-data  journal 25.0% of 1.0 GiB (head LSN 1234, applied 1200)",
                "  PEER    MODE   STATE    LAG         RESYNC",
                "  site-b  metro  in-sync  0 B, 0.0 s  -",
            ],
        );
        assert!(!render(&status).contains("fix:"));
        assert_eq!(Health::Ok.exit_code(), 0);
        let empty = node(Vec::new());
        check(&empty, Health::Ok, &["node site-a: OK\nno volumes\n"]);
    }

    #[test]
    fn a_resync_shows_progress_rate_and_time_left() {
        let mut resyncing = replica("site-b", "resyncing");
        resyncing.resync_total_bytes = 64 << 20;
        resyncing.resync_remaining_bytes = 48 << 20;
        resyncing.resync_rate_bytes_per_second = Some(f64::from(4u32 << 20));
        resyncing.resync_eta_seconds = Some(12.0);
        resyncing.lag_bytes = 48 << 20;
        resyncing.lag_seconds = 3.25;
        let status = node(vec![volume("pg-data", "primary", vec![resyncing.clone()])]);
        check(
            &status,
            Health::Warning,
            &[
                "node site-a: WARNING, 1 warning",
                "  site-b  metro  resyncing  48.0 MiB, 3.2 s  25.0% of 64.0 MiB, 4.0 MiB/s, 12 s left",
                "  WARNING  site-b: resyncing: 25.0% of 64.0 MiB, 4.0 MiB/s, 12 s left\n           fix: none needed: the resync ends by itself",
            ],
        );
        resyncing.resync_rate_bytes_per_second = Some(0.0);
        resyncing.resync_eta_seconds = None;
        let status = node(vec![volume("pg-data", "primary", vec![resyncing.clone()])]);
        check(
            &status,
            Health::Warning,
            &[
                "25.0% of 64.0 MiB, STALLED",
                "no progress for 10 s",
                "check the link to site-b",
            ],
        );
        resyncing.resync_rate_bytes_per_second = None;
        let status = node(vec![volume("pg-data", "primary", vec![resyncing.clone()])]);
        check(
            &status,
            Health::Warning,
            &["25.0% of 64.0 MiB, measuring the rate"],
        );
        // A regional secondary says whether it can be promoted meanwhile.
        resyncing.catch_up = Some("staged".into());
        let status = node(vec![volume(
            "pg-data",
            "secondary",
            vec![resyncing.clone()],
        )]);
        check(
            &status,
            Health::Warning,
            &["staged: this copy stays at its last batch boundary (promotable) until it ends"],
        );
        resyncing.catch_up = Some("in-place".into());
        let status = node(vec![volume("pg-data", "secondary", vec![resyncing])]);
        check(
            &status,
            Health::Warning,
            &["in place: this copy is inconsistent (not promotable) until it ends"],
        );
    }

    #[test]
    fn split_brain_is_critical_with_the_resolve_commands_of_both_sides() {
        let mut split = replica("site-b", "split-brain");
        split.last_error = Some("both copies wrote since generation 0x2".to_string());
        let status = node(vec![volume("pg-data", "primary", vec![split])]);
        check(
            &status,
            Health::Critical,
            &[
                "node site-a: CRITICAL, 1 critical",
                "  CRITICAL site-b: split brain: this copy and site-b's both took writes since they split (both copies wrote since generation 0x2)",
                "here `ferry resolve pg-data --discard-local --peer site-b`, or on site-b `ferry resolve pg-data --discard-local --peer site-a`",
            ],
        );
        assert_eq!(Health::Critical.exit_code(), 2);
    }

    #[test]
    fn every_abnormal_state_has_a_fix() {
        let mut fenced = volume("a", "primary", vec![replica("site-b", "connecting")]);
        fenced.writes_held = Some(
            "fenced after a restart: waiting to hear from site-b (a peer may have been promoted meanwhile); `ferry promote a` on this node overrides".to_string(),
        );
        let mut failed = volume("b", "primary", Vec::new());
        failed.failure = Some("journal write failed: EIO".to_string());
        failed.writes_held = Some("the volume failed: journal write failed: EIO".to_string());
        let mut inconsistent_primary = volume("c", "primary", Vec::new());
        inconsistent_primary.consistent = false;
        let mut suspended = replica("site-b", "suspended");
        suspended.last_error = Some("timed out".to_string());
        let mut verify = replica("site-c", "in-sync");
        verify.verify = Some(VerifyReport {
            volume: "d".into(),
            peer: "site-c".into(),
            running: false,
            repair: false,
            total_bytes: 10 << 30,
            checked_bytes: 10 << 30,
            differing_bytes: 8192,
            differing_ranges: vec![(4096, 8192)],
            busy_bytes: 0,
            repaired: false,
        });
        let mut lagging = replica("site-c", "lagging");
        lagging.mode = "regional".into();
        lagging.lag_seconds = 95.0;
        lagging.lag_bytes = 3 << 20;
        let mut secondary = volume(
            "e",
            "secondary",
            vec![replica("site-b", "connecting"), lagging],
        );
        secondary.consistent = false;
        let status = node(vec![
            fenced,
            failed,
            inconsistent_primary,
            volume(
                "d",
                "primary",
                vec![
                    suspended,
                    verify,
                    replica("site-d", "paused"),
                    replica("site-e", "degraded"),
                ],
            ),
            secondary,
        ]);
        check(
            &status,
            Health::Critical,
            &[
                "node site-a: CRITICAL, 5 critical, 6 warnings",
                "  CRITICAL a: writes held: fenced after a restart",
                "if none of them was promoted meanwhile: `ferry promote a` here",
                "  CRITICAL b: failed, serving reads but no writes until restart: journal write failed: EIO\n           fix: repair the cause the log names",
                "  CRITICAL c: primary, but not consistent",
                "`ferry demote c` here, then `ferry promote c` on a consistent copy",
                "  CRITICAL site-b: site-b unreachable and on_disconnect = \"suspend\": client writes are held (timed out)",
                "  CRITICAL site-c: the last verify found 8.0 KiB differing from site-c's copy\n           fix: `ferry verify d --peer site-c --repair` here",
                "  WARNING  site-d: shipping paused by the operator (writes are tracked)\n           fix: `ferry resume d --peer site-d`",
                "  WARNING  site-e: site-e unreachable: writes are tracked for a delta resync",
                "  WARNING  e: being resynced: not consistent",
                "  WARNING  site-c: behind by 95.0 s, more than the interval (3.0 MiB not yet at site-c)",
                "verify of d against site-c: 10.0 GiB of 10.0 GiB compared, 8.0 KiB DIFFER (bytes 4096+8192)",
            ],
        );
        // The failed volume is reported once, not again as held writes.
        let text = render(&status);
        assert!(!text.contains("b: writes held"), "{text}");
        // A consistent secondary that lost its primary may be promoted: the view says how.
        let mut orphan = volume("f", "secondary", vec![replica("site-b", "connecting")]);
        orphan.replicas[0].last_error = Some("timed out".into());
        check(
            &node(vec![orphan]),
            Health::Warning,
            &[
                "not connected to site-b (timed out)",
                "`ferry promote f --force` here",
            ],
        );
    }

    #[test]
    fn journal_nearly_full_and_transient_holds_warn() {
        let mut full = volume("pg-data", "primary", Vec::new());
        full.journal.used_bytes = full.journal.capacity_bytes / 100 * 95;
        full.writes_held = Some("a demotion is draining writes".to_string());
        check(
            &node(vec![full]),
            Health::Warning,
            &[
                "journal 95% full",
                "writes held: a demotion is draining writes",
                "no replicas",
            ],
        );
    }

    #[test]
    fn recovery_is_shown_only_when_something_was_replayed() {
        let mut volume = volume("pg-data", "primary", Vec::new());
        assert!(!render(&node(vec![volume.clone()])).contains("at start"));
        volume.recovery.records_replayed = 12;
        volume.recovery.bytes_replayed = 48 << 10;
        volume.recovery.torn_tail_bytes = 512;
        volume.recovery.stopped_reason = Some("checksum mismatch at lsn 1235".into());
        check(
            &node(vec![volume]),
            Health::Ok,
            &["  at start: replayed 12 records (48.0 KiB), torn tail 512 B, stopped: checksum mismatch at lsn 1235"],
        );
    }

    #[test]
    fn durations_read_like_people_write_them() {
        assert_eq!(human_duration(0.2), "1 s");
        assert_eq!(human_duration(45.0), "45 s");
        assert_eq!(human_duration(250.0), "4 min 10 s");
        assert_eq!(human_duration(7500.0), "2 h 5 min");
        assert_eq!(human_duration(3.0 * 86_400.0 + 4.0 * 3600.0), "3 d 4 h");
        assert_eq!(human_duration(f64::NAN), "?");
        assert_eq!(human_duration(-1.0), "?");
        assert_eq!(human_duration(f64::INFINITY), "?");
    }

    #[test]
    fn rates_use_binary_units() {
        assert_eq!(human_rate(0.0), "0 B");
        assert_eq!(human_rate(512.4), "512 B");
        assert_eq!(human_rate(f64::from(4u32 << 20)), "4.0 MiB");
        assert_eq!(human_rate(f64::NAN), "0 B");
    }

    #[test]
    fn quoted_commands_are_found() {
        assert_eq!(
            quoted_commands("here `ferry resolve v --discard-local`, or `x` and `ferry promote v`"),
            ["ferry resolve v --discard-local", "ferry promote v"]
        );
    }
}
