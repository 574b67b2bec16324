//! The test fixture: one `ferry run` process in its own temporary directory, plus helpers to
//! run third-party tools with a timeout.
//!
//! Everything here is bounded: every wait has a deadline, every child process is killed and
//! reaped on drop (also when the test panics), and the daemon's stderr is kept in a file and
//! printed when a test fails, because that log is usually the first thing one needs.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The daemon binary built by cargo for this test crate.
pub const FERRY_BIN: &str = env!("CARGO_BIN_EXE_ferry");

/// How long `ferry run` may take to answer `status` after it was spawned.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a clean shutdown (SIGTERM) may take.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Default timeout of a short helper command (status, nbdinfo, ...).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// The daemon's fault switches. `ferry run` gets them only when a test asks, never from the
/// environment the tests run in.
pub const FAULT_ENV_VARS: [&str; 3] = [
    "FERRY_FAULT_POWER_LOSS",
    "FERRY_FAULT_DEVICE_WRITE_DELAY_US",
    "FERRY_FAULT_CORRUPT_FRAME",
];

/// Unix socket paths are limited to 108 bytes (sun_path); keep well below it.
const SOCKET_PATH_LEN_MAX: usize = 90;

/// The shape of the single volume a test daemon exports.
#[derive(Clone, Debug)]
pub struct VolumeOptions {
    pub name: String,
    pub size: String,
    pub journal_size: String,
}

impl Default for VolumeOptions {
    fn default() -> Self {
        VolumeOptions {
            name: "vol0".to_string(),
            size: "256MiB".to_string(),
            journal_size: "64MiB".to_string(),
        }
    }
}

/// Parses `"256MiB"`-style sizes used in [`VolumeOptions`] (the subset the tests write).
pub fn parse_size_bytes(text: &str) -> u64 {
    let units: [(&str, u64); 4] = [
        ("KiB", 1 << 10),
        ("MiB", 1 << 20),
        ("GiB", 1 << 30),
        ("TiB", 1 << 40),
    ];
    for (suffix, multiplier) in units {
        if let Some(number) = text.strip_suffix(suffix) {
            return number.trim().parse::<u64>().expect("size number") * multiplier;
        }
    }
    text.trim().parse::<u64>().expect("size in bytes")
}

/// A directory for test files on a real disk filesystem (under the cargo target dir), so that
/// O_DIRECT and fdatasync behave as in production, unlike tmpfs.
pub fn test_tempdir(prefix: &str) -> tempfile::TempDir {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let use_target = base.as_os_str().len() + 40 < SOCKET_PATH_LEN_MAX;
    let builder_dir = if use_target {
        base
    } else {
        std::env::temp_dir()
    };
    fs::create_dir_all(&builder_dir).expect("create temp base dir");
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(&builder_dir)
        .expect("create temp dir")
}

/// Picks a free TCP port on loopback by binding port 0. Another process may grab it before the
/// daemon binds; that race is rare enough on a test machine and shows up as a clear bind error
/// in the daemon's log.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// One `ferry run` process with its own directory, config, sockets and ports.
pub struct Daemon {
    /// Owns the directory; removed on drop unless `FERRY_KEEP=1`.
    tempdir: Option<tempfile::TempDir>,
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub control_socket: PathBuf,
    pub nbd_socket: PathBuf,
    pub nbd_port: u16,
    pub metrics_port: u16,
    pub volume: VolumeOptions,
    pub device_path: PathBuf,
    stderr_path: PathBuf,
    /// Extra environment of every `ferry run` (fault switches).
    env: Vec<(String, String)>,
    child: Option<Child>,
    /// How many times `ferry run` was spawned; printed in the log to tell runs apart.
    spawn_count: u32,
}

impl Daemon {
    /// A daemon with the default volume (`vol0`, 256 MiB, journal 64 MiB), started and ready.
    pub fn start() -> Daemon {
        Daemon::start_with(VolumeOptions::default())
    }

    pub fn start_with(volume: VolumeOptions) -> Daemon {
        Daemon::start_with_env(volume, &[])
    }

    /// Like [`Daemon::start_with`], with extra environment variables for every `ferry run`
    /// of this fixture (restarts included).
    pub fn start_with_env(volume: VolumeOptions, env: &[(&str, &str)]) -> Daemon {
        let mut daemon = Daemon::configure(volume);
        daemon.env = env
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect();
        daemon.spawn_and_wait_ready();
        daemon
    }

    /// Writes the directory layout and config, without starting anything.
    pub fn configure(volume: VolumeOptions) -> Daemon {
        let tempdir = test_tempdir("ferry-it-");
        let dir = tempdir.path().to_path_buf();
        fs::create_dir_all(dir.join("data")).expect("create data dir");
        let nbd_port = free_port();
        let mut metrics_port = free_port();
        while metrics_port == nbd_port {
            metrics_port = free_port();
        }
        let device_path = dir.join(format!("{}.img", volume.name));
        let daemon = Daemon {
            config_path: dir.join("ferry.toml"),
            control_socket: dir.join("ctl.sock"),
            nbd_socket: dir.join("nbd.sock"),
            stderr_path: dir.join("ferry.stderr.log"),
            tempdir: Some(tempdir),
            dir,
            nbd_port,
            metrics_port,
            volume,
            device_path,
            env: Vec::new(),
            child: None,
            spawn_count: 0,
        };
        fs::write(&daemon.config_path, daemon.config_text()).expect("write config");
        daemon
    }

    /// The standalone config this fixture runs with (SPEC §4).
    pub fn config_text(&self) -> String {
        let dir = self.dir.display();
        format!(
            r#"[node]
name = "t"
data_dir = "{dir}/data"
control_socket = "{dir}/ctl.sock"
metrics_listen = "127.0.0.1:{metrics_port}"

[nbd]
listen = ["unix:{dir}/nbd.sock", "tcp:127.0.0.1:{nbd_port}"]

[[volumes]]
name = "{name}"
device = "{device}"
size = "{size}"
journal_size = "{journal_size}"
"#,
            metrics_port = self.metrics_port,
            nbd_port = self.nbd_port,
            name = self.volume.name,
            device = self.device_path.display(),
            size = self.volume.size,
            journal_size = self.volume.journal_size,
        )
    }

    pub fn volume_size_bytes(&self) -> u64 {
        parse_size_bytes(&self.volume.size)
    }

    pub fn unix_uri(&self) -> String {
        format!(
            "nbd+unix:///{}?socket={}",
            self.volume.name,
            self.nbd_socket.display()
        )
    }

    pub fn tcp_uri(&self) -> String {
        format!("nbd://127.0.0.1:{}/{}", self.nbd_port, self.volume.name)
    }

    pub fn tcp_addr(&self) -> String {
        format!("127.0.0.1:{}", self.nbd_port)
    }

    #[allow(dead_code)]
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon is running").id()
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            None => false,
            Some(child) => matches!(child.try_wait(), Ok(None)),
        }
    }

    fn spawn_and_wait_ready(&mut self) {
        assert!(self.child.is_none(), "daemon already running");
        self.spawn_count += 1;
        let mut log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr_path)
            .expect("open stderr log");
        writeln!(log, "===== ferry run #{} =====", self.spawn_count).expect("write log marker");
        let mut command = Command::new(FERRY_BIN);
        for key in FAULT_ENV_VARS {
            command.env_remove(key);
        }
        command
            .arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .env("RUST_BACKTRACE", "1")
            .envs(self.env.iter().map(|(key, value)| (key, value)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log fd"))
            .stderr(log);
        set_daemon_log_filter(&mut command);
        let child = command
            .spawn()
            .unwrap_or_else(|error| panic!("spawn {FERRY_BIN} run: {error}"));
        self.child = Some(child);
        self.wait_ready();
    }

    /// Polls `ferry status --json` until it answers, the process exits, or READY_TIMEOUT.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last_error = String::new();
        while Instant::now() < deadline {
            if let Some(status) = self
                .child
                .as_mut()
                .expect("child")
                .try_wait()
                .expect("try_wait")
            {
                self.child = None;
                panic!(
                    "ferry run exited during startup with {status}\n--- daemon stderr ---\n{}",
                    self.stderr_log()
                );
            }
            let output = run_with_timeout(
                Command::new(FERRY_BIN)
                    .arg("--socket")
                    .arg(&self.control_socket)
                    .args(["status", "--json"]),
                Duration::from_secs(5),
            );
            if status_answered(&output)
                && serde_json::from_str::<serde_json::Value>(&output.stdout).is_ok()
            {
                return;
            }
            last_error = format!("exit {}: {}{}", output.status, output.stdout, output.stderr);
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "ferry run not ready after {READY_TIMEOUT:?}; last status attempt: {last_error}\n--- daemon stderr ---\n{}",
            self.stderr_log()
        );
    }

    /// Everything the daemon printed so far, over all its runs.
    pub fn stderr_log(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_else(|error| format!("(no log: {error})"))
    }

    /// kill -9: the process dies at once; the operating system (page cache) survives.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("daemon is running");
        // Ignore the result: the process may have died on its own, which the caller finds out
        // when it reads the data back.
        let _ = child.kill();
        let _ = child.wait();
    }

    /// SIGTERM, then wait; a clean shutdown must exit 0 (SPEC §3).
    pub fn stop(&mut self) {
        let mut child = self.child.take().expect("daemon is running");
        let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) with a pid of a child we spawned and have not reaped yet, so the pid
        // cannot have been reused by another process.
        let result = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(result, 0, "kill(SIGTERM) failed");
        let status = wait_child_with_timeout(&mut child, STOP_TIMEOUT);
        match status {
            Some(status) => assert!(
                status.code() == Some(0),
                "ferry run exited with {status} on SIGTERM, expected 0\n--- daemon stderr ---\n{}",
                self.stderr_log()
            ),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "ferry run did not exit within {STOP_TIMEOUT:?} of SIGTERM\n--- daemon stderr ---\n{}",
                    self.stderr_log()
                );
            }
        }
    }

    /// Starts `ferry run` again on the same directory and config (after stop or kill9).
    pub fn restart(&mut self) {
        self.spawn_and_wait_ready();
    }

    /// `ferry --socket S ARGS...` with a timeout.
    pub fn ctl(&self, args: &[&str]) -> Output {
        run_with_timeout(
            Command::new(FERRY_BIN)
                .arg("--socket")
                .arg(&self.control_socket)
                .args(args),
            COMMAND_TIMEOUT,
        )
    }

    /// The `result` object of `status` (SPEC §5).
    pub fn status_json(&self) -> serde_json::Value {
        let output = self.ctl(&["status", "--json"]);
        assert!(
            status_answered(&output),
            "ferry status --json failed: {output}"
        );
        serde_json::from_str(&output.stdout).unwrap_or_else(|error| {
            panic!(
                "ferry status --json is not JSON ({error}): {}",
                output.stdout
            )
        })
    }

    /// The status object of this fixture's volume.
    pub fn volume_status(&self) -> serde_json::Value {
        let status = self.status_json();
        let volumes = status["volumes"]
            .as_array()
            .unwrap_or_else(|| panic!("no volumes array: {status}"));
        volumes
            .iter()
            .find(|volume| volume["name"] == self.volume.name.as_str())
            .unwrap_or_else(|| panic!("volume {} not in status: {status}", self.volume.name))
            .clone()
    }

    /// The body of `GET /metrics`.
    pub fn metrics_text(&self) -> String {
        http_get(&format!("127.0.0.1:{}", self.metrics_port), "/metrics")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let keep = std::env::var("FERRY_KEEP").as_deref() == Ok("1");
        if std::thread::panicking() {
            eprintln!(
                "--- ferry daemon stderr ({}) ---\n{}",
                self.stderr_path.display(),
                self.stderr_log()
            );
        }
        if let Some(tempdir) = self.tempdir.take() {
            if keep
                || std::thread::panicking()
                    && std::env::var("FERRY_KEEP_ON_FAILURE").as_deref() == Ok("1")
            {
                let path = tempdir.keep();
                eprintln!("kept test directory {}", path.display());
            }
        }
    }
}

/// Makes a daemon log at info unless the test run sets a filter of its own. The log is the
/// first thing a failed test needs, and an empty `RUST_LOG` (which some environments export)
/// is a valid filter that keeps errors only.
pub fn set_daemon_log_filter(command: &mut Command) {
    let run_has_filter = std::env::var("RUST_LOG").is_ok_and(|filter| !filter.trim().is_empty());
    if !run_has_filter {
        command.env("RUST_LOG", "info");
    }
}

/// Whether `ferry status` (without `--check`) got an answer from the daemon: it exits 0
/// whatever the state it reports, 1 when the daemon does not answer.
pub fn status_answered(output: &Output) -> bool {
    output.status.code() == Some(0)
}

/// Waits for a child to exit, polling, at most `timeout`.
pub fn wait_child_with_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A finished command: status and both streams (lossy UTF-8).
pub struct Output {
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` exited with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command, self.status, self.stdout, self.stderr
        )
    }
}

fn describe(command: &Command) -> String {
    let mut text = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

/// Lets the run helpers take either a `Command` or the `&mut Command` a builder chain returns.
pub trait AsCommand {
    fn as_command(&mut self) -> &mut Command;
}

impl AsCommand for Command {
    fn as_command(&mut self) -> &mut Command {
        self
    }
}

impl AsCommand for &mut Command {
    fn as_command(&mut self) -> &mut Command {
        self
    }
}

/// Runs a command to completion, killing it after `timeout` (then panicking with its output).
pub fn run_with_timeout(mut command: impl AsCommand, timeout: Duration) -> Output {
    let command = command.as_command();
    let description = describe(command);
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("spawn `{description}`: {error}"));
    // Read both pipes on their own threads so a chatty child cannot block on a full pipe.
    let mut stdout_pipe = child.stdout.take().expect("stdout pipe");
    let mut stderr_pipe = child.stderr.take().expect("stderr pipe");
    let stdout_thread = std::thread::spawn(move || {
        let mut buffer = Vec::new();
        let _ = stdout_pipe.read_to_end(&mut buffer);
        buffer
    });
    let stderr_thread = std::thread::spawn(move || {
        let mut buffer = Vec::new();
        let _ = stderr_pipe.read_to_end(&mut buffer);
        buffer
    });
    let status = wait_child_with_timeout(&mut child, timeout);
    let timed_out = status.is_none();
    let status = match status {
        Some(status) => status,
        None => {
            let _ = child.kill();
            child.wait().expect("wait after kill")
        }
    };
    let output = Output {
        command: description,
        status,
        stdout: String::from_utf8_lossy(&stdout_thread.join().expect("stdout thread")).into_owned(),
        stderr: String::from_utf8_lossy(&stderr_thread.join().expect("stderr thread")).into_owned(),
    };
    assert!(!timed_out, "timed out after {timeout:?}: {output}");
    output
}

/// Runs a command and panics (with its output) unless it exits 0.
pub fn run(command: impl AsCommand) -> Output {
    run_timeout(command, COMMAND_TIMEOUT)
}

/// Like [`run`] with an explicit timeout.
pub fn run_timeout(command: impl AsCommand, timeout: Duration) -> Output {
    let output = run_with_timeout(command, timeout);
    assert!(output.status.success(), "command failed: {output}");
    output
}

/// Shorthand for `Command::new(program).args(args)`.
pub fn cmd<S: AsRef<std::ffi::OsStr>>(program: &str, args: &[S]) -> Command {
    let mut command = Command::new(program);
    command.args(args);
    command
}

/// The first executable file `name` on PATH (or in the system binary directories).
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from);
    std::env::split_paths(&path)
        .chain(extra)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// True if interop tests were switched off explicitly with `FERRY_SKIP_INTEROP=1`.
pub fn interop_skipped(test: &str) -> bool {
    if std::env::var("FERRY_SKIP_INTEROP").as_deref() == Ok("1") {
        eprintln!("SKIPPED {test}: FERRY_SKIP_INTEROP=1");
        return true;
    }
    false
}

/// Panics if a third-party tool is missing: interop tests fail rather than skip silently.
pub fn require_tool(name: &str, apt_package: &str) {
    if find_in_path(name).is_none() {
        panic!("missing tool {name}: apt-get install {apt_package}");
    }
}

/// Returns false (after printing that the test was skipped) when `FERRY_SKIP_INTEROP=1`,
/// panics if a tool is missing, true otherwise.
pub fn require_tools(test: &str, tools: &[(&str, &str)]) -> bool {
    if interop_skipped(test) {
        return false;
    }
    for (name, apt_package) in tools {
        require_tool(name, apt_package);
    }
    true
}

/// A minimal HTTP/1.0 GET; returns the body, de-chunked if needed.
pub fn http_get(addr: &str, path: &str) -> String {
    let mut stream =
        TcpStream::connect(addr).unwrap_or_else(|error| panic!("connect {addr}: {error}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("set timeout");
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send request");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("read response");
    let response = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP header end in: {response}"));
    assert!(
        head.starts_with("HTTP/1.") && head[9..].starts_with("200"),
        "GET {path}: {head}"
    );
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    // Bounded: each iteration consumes at least the size line.
    while let Some((size_line, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size_line.trim(), 16).unwrap_or(0);
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// Writes `len` bytes of seeded random data to `path`.
pub fn write_random_file(path: &Path, len: u64, seed: u64) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut file = fs::File::create(path).expect("create random file");
    let mut buffer = vec![0u8; 1 << 20];
    let mut remaining = len;
    while remaining > 0 {
        let chunk = remaining.min(buffer.len() as u64) as usize;
        rng.fill_bytes(&mut buffer[..chunk]);
        file.write_all(&buffer[..chunk]).expect("write random file");
        remaining -= chunk as u64;
    }
    file.sync_all().expect("sync random file");
}

/// Compares two files chunk by chunk; panics at the first difference with its offset.
pub fn assert_files_equal(left: &Path, right: &Path) {
    let mut left_file = fs::File::open(left).expect("open left");
    let mut right_file = fs::File::open(right).expect("open right");
    let left_len = left_file.metadata().expect("stat").len();
    let right_len = right_file.metadata().expect("stat").len();
    assert_eq!(
        left_len,
        right_len,
        "{} and {} differ in size",
        left.display(),
        right.display()
    );
    let mut left_buffer = vec![0u8; 1 << 20];
    let mut right_buffer = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    while offset < left_len {
        let chunk = (left_len - offset).min(left_buffer.len() as u64) as usize;
        left_file
            .read_exact(&mut left_buffer[..chunk])
            .expect("read left");
        right_file
            .read_exact(&mut right_buffer[..chunk])
            .expect("read right");
        if left_buffer[..chunk] != right_buffer[..chunk] {
            let index = (0..chunk)
                .find(|&i| left_buffer[i] != right_buffer[i])
                .expect("a difference");
            panic!(
                "{} and {} differ at byte {}",
                left.display(),
                right.display(),
                offset + index as u64
            );
        }
        offset += chunk as u64;
    }
}

pub use ferry_testkit::seed::test_seed;

/// `FERRY_LONG=1` switches slow variants on.
pub fn long_mode() -> bool {
    std::env::var("FERRY_LONG").as_deref() == Ok("1")
}
