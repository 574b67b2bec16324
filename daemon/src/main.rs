//! `ferry`: the daemon and its command-line client (SPEC §3).
//!
//! Exit codes: 0 success; 1 the operation was refused or failed; 2 usage or configuration
//! error (clap exits 2 on usage errors by itself). `ferry status --check` is a monitoring
//! check and exits like one (Nagios' codes, see `ferry::status`): 0 OK, 1 warning,
//! 2 critical, 3 unknown (daemon unreachable, an answer not understood, a usage error).

use std::io::{IsTerminal, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand, ValueEnum};
use ferry::config::{Config, DEFAULT_CONTROL_SOCKET};
use ferry::control::{self, ControlError, StatusResult};
use ferry::status::{self as health, Health};
use serde_json::{json, Value};

const EXIT_FAILED: u8 = 1;
const EXIT_USAGE: u8 = 2;
/// How long one status refresh of `--watch` waits for the daemon before it shows UNKNOWN and
/// tries again at the next refresh.
const WATCH_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How often `ferry verify` reports its progress on stderr: often on a terminal (one line
/// rewritten in place), rarely in a log (one line each time).
const VERIFY_PROGRESS_TERMINAL: Duration = Duration::from_secs(1);
const VERIFY_PROGRESS_LOG: Duration = Duration::from_secs(30);
/// How long one progress poll of `ferry verify` may take; a slow answer skips a report.
const VERIFY_PROGRESS_TIMEOUT: Duration = Duration::from_secs(5);

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// One line per event for people: time, level, message, fields.
    Text,
    /// One JSON object per line (timestamp, level, target, message and the event's fields at
    /// the top level), for log collectors.
    Json,
}

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
    /// How log lines on stderr are written.
    #[arg(
        long,
        global = true,
        env = "FERRY_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
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
    /// Roles, replica states, lag, resync progress and journal use, with the command that
    /// fixes each abnormal state. Exits 0 when the daemon answered, 1 when it could not be
    /// asked; with --check, like a monitoring check: 0 OK, 1 warning, 2 critical, 3 unknown.
    Status {
        /// Only this volume.
        volume: Option<String>,
        /// Exit with the health (Nagios plugin codes): 0 OK, 1 warning, 2 critical, 3 unknown
        /// (daemon unreachable, or a usage error of the check).
        #[arg(long)]
        check: bool,
        /// Print the JSON result (with its schema_version) instead of the view; with --watch,
        /// one JSON object per line.
        #[arg(long)]
        json: bool,
        /// Refresh every SECS seconds (default 2) until Ctrl-C, Ctrl-D on a terminal, or
        /// --count refreshes; exits with the last refresh's code.
        #[arg(
            long,
            value_name = "SECS",
            num_args = 0..=1,
            default_missing_value = "2",
            value_parser = clap::value_parser!(u64).range(1..=3600)
        )]
        watch: Option<u64>,
        /// With --watch: stop after N refreshes.
        #[arg(
            long,
            value_name = "N",
            requires = "watch",
            value_parser = clap::value_parser!(u64).range(1..)
        )]
        count: Option<u64>,
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
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => return usage_error(&error),
    };
    init_logging(cli.log_format);
    match cli.command {
        Command::Run { config } => run(&config),
        Command::Demo => match ferry::demo::run() {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => fail(&format!("demo failed: {error}")),
        },
        Command::Status {
            volume,
            json,
            check,
            watch: None,
            ..
        } => status(&cli.socket, volume, json, check),
        Command::Status {
            volume,
            json,
            check,
            watch: Some(seconds),
            count,
        } => watch_status(&cli.socket, volume, json, check, seconds, count),
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

/// A command line clap refused: help and version print and exit 0; a usage error exits 2,
/// except for `ferry status --check`, a monitoring check, where it is UNKNOWN (3) like every
/// answer the check cannot give (a check with a broken command line must not read as
/// CRITICAL).
fn usage_error(error: &clap::Error) -> ExitCode {
    let _ = error.print();
    if !error.use_stderr() {
        return ExitCode::SUCCESS;
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    if subcommand_of(&args) == Some("status") && args.iter().any(|arg| arg == "--check") {
        return ExitCode::from(Health::Unknown.exit_code());
    }
    ExitCode::from(EXIT_USAGE)
}

/// The subcommand word of a command line: its first argument that is neither an option nor
/// the value of a global option.
fn subcommand_of(args: &[String]) -> Option<&str> {
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if arg == "--socket" || arg == "--log-format" {
            args.next();
        } else if !arg.starts_with('-') {
            return Some(arg);
        }
    }
    None
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            // Colour codes only help a terminal; in a journal or log file they are noise.
            .with_ansi(std::io::stderr().is_terminal())
            .init(),
        // The event's fields at the top level, next to "message": what log collectors
        // index without a second parse.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
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
    client_runtime()?
        .block_on(control::request(socket, request))
        .map_err(|error| fail(&error.to_string()))
}

/// A client command needs no thread pool; a current-thread runtime starts fastest.
fn client_runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| fail(&format!("cannot start the async runtime: {error}")))
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
    let runtime = match client_runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let request = json!({ "op": "verify", "volume": volume, "peer": peer, "repair": repair });
    let reply = runtime.block_on(with_verify_progress(
        socket,
        volume,
        peer.as_deref(),
        control::request(socket, request),
    ));
    let result = match reply {
        Ok(result) => result,
        Err(error) => return fail(&error.to_string()),
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

/// Runs `request` (a verify, which may take hours) and meanwhile reports its progress on
/// stderr from the volume's status: on a terminal one line rewritten every second, otherwise
/// a line every 30 s (a log, a CI job). Stdout keeps only the final report.
async fn with_verify_progress(
    socket: &Path,
    volume: &str,
    peer: Option<&str>,
    request: impl std::future::Future<Output = Result<Value, ControlError>>,
) -> Result<Value, ControlError> {
    let terminal = std::io::stderr().is_terminal();
    let period = if terminal {
        VERIFY_PROGRESS_TERMINAL
    } else {
        VERIFY_PROGRESS_LOG
    };
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tokio::pin!(request);
    let mut shown = false;
    loop {
        tokio::select! {
            reply = &mut request => {
                if shown && terminal {
                    // Erase the progress line so the report starts on a clean line.
                    eprint!("\r\x1b[K");
                }
                return reply;
            }
            _ = ticks.tick() => {
                let reply = control::request_with_timeout(
                    socket,
                    status_request(Some(volume)),
                    VERIFY_PROGRESS_TIMEOUT,
                )
                .await;
                let Some(line) = reply.ok().and_then(|status| verify_progress(&status, peer)) else {
                    continue;
                };
                if terminal {
                    eprint!("\r{line}\x1b[K");
                } else {
                    eprintln!("{line}");
                }
                shown = true;
            }
        }
    }
}

/// The running verify's line from a status result, if one runs (against `peer` when named).
fn verify_progress(status: &Value, peer: Option<&str>) -> Option<String> {
    let status: StatusResult = serde_json::from_value(status.clone()).ok()?;
    let report = status
        .volumes
        .iter()
        .flat_map(|volume| &volume.replicas)
        .filter(|replica| peer.is_none_or(|peer| replica.peer == peer))
        .filter_map(|replica| replica.verify.as_ref())
        .find(|verify| verify.running)?;
    let percent = if report.total_bytes == 0 {
        0.0
    } else {
        // Precision loss is irrelevant for a percentage.
        (report.checked_bytes + report.busy_bytes) as f64 * 100.0 / report.total_bytes as f64
    };
    Some(format!(
        "{} ({percent:.0}%)",
        control::render_verify(report)
    ))
}

fn status_request(volume: Option<&str>) -> Value {
    let mut request = json!({ "op": "status" });
    if let Some(volume) = volume {
        request["volume"] = Value::String(volume.to_string());
    }
    request
}

/// What one status request gave: the text to print and the health it means.
struct Snapshot {
    text: String,
    health: Health,
}

/// Turns a status reply (or the reason there is none) into what `ferry status` prints.
fn snapshot(reply: Result<Value, ControlError>, json: bool, pretty: bool) -> Snapshot {
    let result = match reply {
        Ok(result) => result,
        Err(error) => {
            return Snapshot {
                text: format!("ferry: UNKNOWN: {error}\n"),
                health: Health::Unknown,
            }
        }
    };
    let parsed = serde_json::from_value::<StatusResult>(result.clone());
    let health = match &parsed {
        Ok(status) => health::health(&health::assess(status)),
        Err(_) => Health::Unknown,
    };
    if json {
        let text = if pretty {
            serde_json::to_string_pretty(&result)
        } else {
            serde_json::to_string(&result)
        };
        return Snapshot {
            // Serializing a Value cannot fail (its keys are strings).
            text: text.unwrap_or_default() + "\n",
            health,
        };
    }
    match parsed {
        Ok(status) => Snapshot {
            text: health::render(&status),
            health,
        },
        Err(error) => Snapshot {
            text: format!(
                "ferry: UNKNOWN: the daemon's status is not understood ({error}); are the ferry binary and daemon the same version? `--json` prints it raw\n"
            ),
            health,
        },
    }
}

/// Writes to stdout; false when stdout is gone (a closed pipe: `ferry status --watch | head`).
fn emit(text: &str) -> bool {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .is_ok()
}

/// The exit code of a status snapshot: with `--check` its health (Nagios codes); otherwise as
/// every command (SPEC §3): 0 when the daemon answered, whatever it reports, 1 when not.
fn status_exit(health: Health, check: bool) -> ExitCode {
    if check {
        ExitCode::from(health.exit_code())
    } else if health == Health::Unknown {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// `ferry status [VOLUME] [--json] [--check]`: one snapshot.
fn status(socket: &Path, volume: Option<String>, json: bool, check: bool) -> ExitCode {
    let runtime = match client_runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let reply = runtime.block_on(control::request(socket, status_request(volume.as_deref())));
    let snapshot = snapshot(reply, json, true);
    if snapshot.health == Health::Unknown && !json {
        eprint!("{}", snapshot.text);
    } else {
        emit(&snapshot.text);
    }
    status_exit(snapshot.health, check)
}

/// `ferry status --watch [SECS] [--count N]`: a snapshot every SECS seconds. On a terminal
/// each replaces the previous one; piped, each follows the last under a line with its time
/// (with --json: one object per line, nothing else). Stops on Ctrl-C or SIGTERM, on Ctrl-D
/// when stdin is a terminal, when stdout is closed, or after N refreshes; exits with the
/// last snapshot's code. An unreachable daemon is shown and asked again at the next refresh.
fn watch_status(
    socket: &Path,
    volume: Option<String>,
    json: bool,
    check: bool,
    seconds: u64,
    count: Option<u64>,
) -> ExitCode {
    let runtime = match client_runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let terminal = std::io::stdout().is_terminal();
    let interval = Duration::from_secs(seconds);
    let request = status_request(volume.as_deref());
    runtime.block_on(async move {
        let mut stop = match stop_signals() {
            Ok(stop) => stop,
            Err(error) => return fail(&format!("cannot watch for Ctrl-C: {error}")),
        };
        let mut last;
        let mut refresh: u64 = 0;
        loop {
            refresh += 1;
            let reply =
                control::request_with_timeout(socket, request.clone(), WATCH_REQUEST_TIMEOUT).await;
            let snapshot = snapshot(reply, json, false);
            last = snapshot.health;
            let frame = if json {
                snapshot.text
            } else {
                let heading = format!(
                    "{} every {seconds} s, refresh {refresh}{}",
                    utc_timestamp(SystemTime::now()),
                    if terminal { "; Ctrl-C stops" } else { "" }
                );
                if terminal {
                    // Home and clear, only on a terminal: a pipe or a file gets plain lines.
                    format!("\x1b[H\x1b[2J{heading}\n\n{}", snapshot.text)
                } else {
                    format!("--- {heading}\n{}\n", snapshot.text)
                }
            };
            if !emit(&frame) || count.is_some_and(|count| refresh >= count) {
                break;
            }
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = stop.wait() => break,
            }
        }
        status_exit(last, check)
    })
}

/// Ctrl-C, SIGTERM, and end of input when stdin is a terminal (Ctrl-D): what ends a watch.
struct StopSignals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    end_of_input: tokio::sync::oneshot::Receiver<()>,
}

impl StopSignals {
    async fn wait(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
            _ = &mut self.end_of_input => {}
        }
    }
}

fn stop_signals() -> std::io::Result<StopSignals> {
    use tokio::signal::unix::{signal, SignalKind};
    let interrupt = signal(SignalKind::interrupt())?;
    let terminate = signal(SignalKind::terminate())?;
    let (done, end_of_input) = tokio::sync::oneshot::channel();
    // Only a terminal's end of input means "stop": a watch run with stdin from /dev/null or a
    // service manager must keep going. The reader thread blocks in read(2) until then; it
    // does not keep the process alive when the watch ends.
    if std::io::stdin().is_terminal() {
        std::thread::spawn(move || {
            let mut buffer = [0u8; 256];
            let mut stdin = std::io::stdin();
            loop {
                match stdin.read(&mut buffer) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            let _ = done.send(());
        });
    } else {
        // Never sent: the receiver stays pending (its sender lives as long as the watch).
        std::mem::forget(done);
    }
    Ok(StopSignals {
        interrupt,
        terminate,
        end_of_input,
    })
}

/// "2024-05-01T12:34:56Z": the time of a watch refresh, in UTC, without a date library.
fn utc_timestamp(time: SystemTime) -> String {
    let seconds = time
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let days = seconds / 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        seconds / 3600 % 24,
        seconds / 60 % 60,
        seconds % 60
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, for days after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
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
    fn status_options_are_checked() {
        let cli = Cli::try_parse_from(["ferry", "status", "--watch"]).expect("parse");
        assert!(matches!(
            cli.command,
            Command::Status {
                watch: Some(2),
                count: None,
                ..
            }
        ));
        let cli = Cli::try_parse_from(["ferry", "status", "vol", "--watch", "5", "--count", "3"])
            .expect("parse");
        assert!(matches!(
            cli.command,
            Command::Status { watch: Some(5), count: Some(3), ref volume, .. } if volume.as_deref() == Some("vol")
        ));
        for bad in [
            &["ferry", "status", "--watch", "0"][..],
            &["ferry", "status", "--watch", "x"],
            &["ferry", "status", "--count", "3"],
            &["ferry", "status", "--watch", "1", "--count", "0"],
            &["ferry", "--log-format", "xml", "status"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
        let cli = Cli::try_parse_from(["ferry", "run", "--config", "f", "--log-format", "json"])
            .expect("parse");
        assert_eq!(cli.log_format, LogFormat::Json);
    }

    /// Every command a status fix names exists in this CLI.
    #[test]
    fn fixes_name_only_commands_that_exist() {
        use clap::CommandFactory;
        let cli = Cli::command();
        for word in health::FIX_COMMANDS {
            assert!(cli.find_subcommand(word).is_some(), "ferry {word}");
        }
    }

    #[test]
    fn the_subcommand_word_is_found_past_global_options() {
        let words = |args: &[&str]| args.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(
            subcommand_of(&words(&["--socket", "/s", "status", "--watch", "x"])),
            Some("status")
        );
        assert_eq!(
            subcommand_of(&words(&["--log-format=json", "--socket=/s", "status"])),
            Some("status")
        );
        assert_eq!(
            subcommand_of(&words(&["--log-format", "json", "promote"])),
            Some("promote")
        );
        assert_eq!(subcommand_of(&words(&["--socket", "status"])), None);
    }

    #[test]
    fn timestamps_are_utc_calendar_dates() {
        let at = |seconds: u64| utc_timestamp(UNIX_EPOCH + Duration::from_secs(seconds));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_709_251_199), "2024-02-29T23:59:59Z");
        assert_eq!(at(4_102_444_800), "2100-01-01T00:00:00Z");
    }

    #[test]
    fn verify_progress_names_the_running_verify() {
        let status: Value = serde_json::from_str(
            r#"{
            "schema_version": 1, "node": "a",
            "volumes": [{
                "name": "vol", "role": "primary", "size_bytes": 4294967296,
                "journal": {"used_bytes": 0, "capacity_bytes": 1, "head_lsn": 0, "applied_lsn": 0,
                    "unapplied_bytes": 0, "full_waits": 0},
                "generation": 1, "consistent": true, "writes_held": null, "following": null,
                "resolving_with": null, "device": "/d", "failure": null,
                "recovery": {"records_replayed": 0, "bytes_replayed": 0, "torn_tail_bytes": 0,
                    "stopped_reason": null},
                "replicas": [{
                    "peer": "b", "mode": "metro", "state": "in-sync", "acked_lsn": 0,
                    "lag_bytes": 0, "lag_seconds": 0.0, "resync_remaining_bytes": 0,
                    "resynced_bytes": 0, "last_error": null, "dirty_bytes": 0, "protecting": true,
                    "verify": {"volume": "vol", "peer": "b", "running": true, "repair": false,
                        "total_bytes": 4294967296, "checked_bytes": 1073741824,
                        "differing_bytes": 0, "differing_ranges": [], "busy_bytes": 0,
                        "repaired": false}
                }]
            }]
        }"#,
        )
        .expect("JSON");
        assert_eq!(
            verify_progress(&status, None).as_deref(),
            Some("verify of vol against b: 1.0 GiB of 4.0 GiB compared, running, no difference (25%)")
        );
        assert_eq!(verify_progress(&status, Some("c")), None);
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
