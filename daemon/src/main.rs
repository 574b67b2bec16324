//! `ferry`: the daemon and its command-line client (SPEC §3).
//!
//! Exit codes: 0 success; 1 the operation was refused or failed; 2 usage or configuration
//! error (clap exits 2 on usage errors by itself).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ferry::config::{Config, DEFAULT_CONTROL_SOCKET};
use ferry::control::{self, StatusResult};
use serde_json::{json, Value};

const EXIT_FAILED: u8 = 1;
const EXIT_USAGE: u8 = 2;

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Block replication daemon: journaled volumes over NBD"
)]
struct Cli {
    /// Control socket of the daemon, for the client commands.
    #[arg(long, global = true, env = "FERRY_SOCKET", default_value = DEFAULT_CONTROL_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon in the foreground; SIGTERM/SIGINT shut it down cleanly.
    Run {
        /// The TOML config file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Ferry on an embedded default: two local nodes with metro replication (generated
    /// certificates); writes through NBD, kill -9 of the primary mid-write, promote --force of
    /// the secondary, verification, rejoin and resync; prints latencies and timings.
    Demo,
    /// Roles, replica states, lag and journal use.
    Status {
        /// Only this volume.
        volume: Option<String>,
        /// Print the JSON result instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Make this node's copy of VOLUME primary; refuses (exit 1, with the reason) if a peer is
    /// still primary and reachable, or if this copy is not consistent.
    Promote {
        /// The volume, as named in the config.
        volume: String,
        /// Override an unreachable peer at once, without waiting for peer_timeout (you assert
        /// that the primary is gone).
        #[arg(long)]
        force: bool,
    },
    /// Stop accepting writes on VOLUME (drain in-flight I/O), become secondary.
    Demote {
        /// The volume, as named in the config.
        volume: String,
    },
    /// Resolve a split brain on the copy whose writes lose: throw away this node's writes
    /// since the split and resync, by the blocks either side changed, from the peer.
    Resolve {
        /// The volume, as named in the config.
        volume: String,
        /// Required: you confirm that this copy's divergent writes are discarded.
        #[arg(long, required = true)]
        discard_local: bool,
        /// The peer whose copy wins (needed when the split brain is with several peers).
        #[arg(long, value_name = "NAME")]
        peer: Option<String>,
    },
    /// Compare this copy with a peer's online, by hashes (only hashes cross the network);
    /// print the differing ranges; exit 1 when the copies differ (and were not repaired).
    Verify {
        /// The volume, as named in the config.
        volume: String,
        /// The peer to compare with (needed when the volume has several).
        #[arg(long, value_name = "NAME")]
        peer: Option<String>,
        /// Resync just the differing ranges.
        #[arg(long)]
        repair: bool,
    },
    /// Stop shipping to VOLUME's regional replicas (writes keep being tracked; a resume
    /// resyncs only what changed). Not kept across a restart of the daemon.
    Pause {
        /// The volume, as named in the config.
        volume: String,
        /// Only this regional peer (default: every regional peer of the volume).
        #[arg(long, value_name = "NAME")]
        peer: Option<String>,
    },
    /// Restart shipping to VOLUME's paused regional replicas.
    Resume {
        /// The volume, as named in the config.
        volume: String,
        /// Only this regional peer (default: every regional peer of the volume).
        #[arg(long, value_name = "NAME")]
        peer: Option<String>,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Certificates for mutual TLS between nodes.
    Cert {
        #[command(subcommand)]
        command: CertCommand,
    },
}

#[derive(Subcommand)]
enum CertCommand {
    /// Make a CA and one certificate per node (keys mode 0600); never overwrites. If DIR
    /// already holds ca.pem and ca.key, that CA issues the new nodes' certificates.
    Init {
        /// Directory for ca.pem, ca.key, NAME.pem and NAME.key.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// A node name, as in its [node] name; repeat for each node.
        #[arg(long = "node", value_name = "NAME", required = true)]
        nodes: Vec<String>,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a config; print every error with its line and column.
    Check {
        /// The TOML config file.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match cli.command {
        Command::Run { config } => run(&config),
        Command::Demo => match ferry::demo::run() {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => fail(&format!("demo failed: {error}")),
        },
        Command::Status { volume, json } => status(&cli.socket, volume, json),
        Command::Promote { volume, force } => role_change(
            &cli.socket,
            &volume,
            json!({ "op": "promote", "volume": volume, "force": force }),
        ),
        Command::Demote { volume } => role_change(
            &cli.socket,
            &volume,
            json!({ "op": "demote", "volume": volume }),
        ),
        Command::Resolve {
            volume,
            discard_local,
            peer,
        } => role_change(
            &cli.socket,
            &volume,
            json!({ "op": "resolve", "volume": volume, "discard_local": discard_local, "peer": peer }),
        ),
        Command::Verify {
            volume,
            peer,
            repair,
        } => verify(&cli.socket, &volume, peer, repair),
        Command::Pause { volume, peer } => pause(&cli.socket, "pause", &volume, peer),
        Command::Resume { volume, peer } => pause(&cli.socket, "resume", &volume, peer),
        Command::Config {
            command: ConfigCommand::Check { file },
        } => match Config::load(&file) {
            Ok(_) => {
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{errors}");
                ExitCode::from(EXIT_USAGE)
            }
        },
        Command::Cert {
            command: CertCommand::Init { dir, nodes },
        } => cert_init(&dir, &nodes),
    }
}

fn cert_init(dir: &Path, nodes: &[String]) -> ExitCode {
    match ferry::replication::tls::cert_init(dir, nodes) {
        Ok(report) => {
            if report.ca_reused {
                println!("reused the CA in {}", dir.display());
            }
            for path in &report.files_written {
                println!("wrote {}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(error) => fail(&error.to_string()),
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only help a terminal; in a journal or log file they are noise.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn fail(message: &str) -> ExitCode {
    eprintln!("ferry: {message}");
    ExitCode::from(EXIT_FAILED)
}

fn run(config_path: &Path) -> ExitCode {
    let config = match Config::load(config_path) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match ferry::daemon::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail(&error.to_string()),
    }
}

/// Sends one request to the daemon and returns its `result`; any error (unreachable daemon,
/// refusal, timeout) is printed and becomes exit status 1.
fn call(socket: &Path, request: Value) -> Result<Value, ExitCode> {
    // A client command needs no thread pool; a current-thread runtime starts fastest.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => return Err(fail(&format!("cannot start the async runtime: {error}"))),
    };
    runtime
        .block_on(control::request(socket, request))
        .map_err(|error| fail(&error.to_string()))
}

/// `ferry promote` and `ferry demote`: one line saying the new role.
fn role_change(socket: &Path, volume: &str, request: Value) -> ExitCode {
    match call(socket, request) {
        Ok(result) => {
            println!("{}", describe_role_change(volume, &result));
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// "pg-data: now primary (generation 0x2a00c3)"; the raw JSON if the daemon's result lacks the
/// role (a daemon of another version), so nothing it said is lost.
fn describe_role_change(volume: &str, result: &Value) -> String {
    let Some(role) = result.get("role").and_then(Value::as_str) else {
        return format!("{volume}: done: {result}");
    };
    let name = result
        .get("volume")
        .and_then(Value::as_str)
        .unwrap_or(volume);
    if let Some(peer) = result.get("resolving_with").and_then(Value::as_str) {
        return format!(
            "{name}: now {role}; this copy's writes since the split brain are discarded and resynced from {peer}"
        );
    }
    match result.get("generation").and_then(Value::as_u64) {
        Some(generation) => format!("{name}: now {role} (generation {generation:#x})"),
        None => format!("{name}: now {role}"),
    }
}

/// `ferry pause` / `ferry resume`: names the peers it applied to.
fn pause(socket: &Path, op: &str, volume: &str, peer: Option<String>) -> ExitCode {
    match call(socket, json!({ "op": op, "volume": volume, "peer": peer })) {
        Ok(result) => {
            let peers: Vec<&str> = result
                .get("peers")
                .and_then(Value::as_array)
                .map(|peers| peers.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let what = if op == "pause" {
                "paused (writes are tracked; `ferry resume` resyncs what changed)"
            } else {
                "resumed"
            };
            println!("{volume}: shipping to {} {what}", peers.join(", "));
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// `ferry verify`: the report on one line; exit 1 when the copies differ and were not
/// repaired, or when the verify could not compare everything.
fn verify(socket: &Path, volume: &str, peer: Option<String>, repair: bool) -> ExitCode {
    let result = match call(
        socket,
        json!({ "op": "verify", "volume": volume, "peer": peer, "repair": repair }),
    ) {
        Ok(result) => result,
        Err(code) => return code,
    };
    let report: control::VerifyReport = match serde_json::from_value(result) {
        Ok(report) => report,
        Err(error) => {
            return fail(&format!(
                "the daemon's verify report is not understood ({error})"
            ))
        }
    };
    println!("{}", control::render_verify(&report));
    if report.differing_bytes > 0 && !report.repaired {
        return ExitCode::from(EXIT_FAILED);
    }
    if report.checked_bytes + report.busy_bytes < report.total_bytes {
        return fail("the verify stopped before comparing everything (the link to the peer was lost, or a resync or a role change interrupted it); run it again");
    }
    ExitCode::SUCCESS
}

fn status(socket: &Path, volume: Option<String>, json: bool) -> ExitCode {
    let mut request = json!({ "op": "status" });
    if let Some(volume) = &volume {
        request["volume"] = Value::String(volume.clone());
    }
    let result = match call(socket, request) {
        Ok(result) => result,
        Err(code) => return code,
    };
    if json {
        match serde_json::to_string_pretty(&result) {
            Ok(text) => println!("{text}"),
            Err(error) => return fail(&format!("cannot print the result: {error}")),
        }
        return ExitCode::SUCCESS;
    }
    match serde_json::from_value::<StatusResult>(result) {
        Ok(status) => {
            print!("{}", control::render_status(&status));
            ExitCode::SUCCESS
        }
        Err(error) => fail(&format!(
            "the daemon's status is not understood ({error}); are the ferry binary and daemon the same version? `--json` prints it raw"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_change_lines() {
        let result = json!({"volume": "pg-data", "role": "primary", "generation": 0x2a00c3u64});
        assert_eq!(
            describe_role_change("pg-data", &result),
            "pg-data: now primary (generation 0x2a00c3)"
        );
        assert_eq!(
            describe_role_change("pg-data", &json!({"role": "secondary"})),
            "pg-data: now secondary"
        );
        assert_eq!(
            describe_role_change("pg-data", &json!({"generation": "x"})),
            "pg-data: done: {\"generation\":\"x\"}"
        );
    }

    #[test]
    fn cli_parses_role_changes() {
        let cli = Cli::try_parse_from(["ferry", "promote", "pg-data", "--force"]).expect("parse");
        assert!(matches!(
            cli.command,
            Command::Promote { ref volume, force: true } if volume == "pg-data"
        ));
        let cli = Cli::try_parse_from(["ferry", "demote", "pg-data", "--socket", "/tmp/s"])
            .expect("parse");
        assert!(matches!(cli.command, Command::Demote { ref volume } if volume == "pg-data"));
        assert_eq!(cli.socket, PathBuf::from("/tmp/s"));
        let cli =
            Cli::try_parse_from(["ferry", "resolve", "pg-data", "--discard-local"]).expect("parse");
        assert!(matches!(
            cli.command,
            Command::Resolve {
                discard_local: true,
                peer: None,
                ..
            }
        ));
        // Resolve without --discard-local is a usage error: it must be said out loud.
        assert!(Cli::try_parse_from(["ferry", "resolve", "pg-data"]).is_err());
        let cli = Cli::try_parse_from(["ferry", "verify", "pg-data", "--peer", "b", "--repair"])
            .expect("parse");
        assert!(
            matches!(cli.command, Command::Verify { repair: true, peer: Some(ref p), .. } if p == "b")
        );
        // A missing volume is a usage error (exit 2).
        let error = Cli::try_parse_from(["ferry", "promote"])
            .err()
            .expect("usage error");
        assert_eq!(error.exit_code(), 2);
    }
}
