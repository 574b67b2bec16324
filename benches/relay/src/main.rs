//! `ferry-relay`: the integration tests' userspace UDP relay (`testkit/src/relay.rs`, through the
//! `ferry-testkit` crate, not copied) as a process, so that `benches/nbd_bench.py` can put a precise delay and
//! a cut between two Ferry nodes (the kernel here has no netem).
//!
//! ```text
//! ferry-relay --a ADDR --b ADDR [--delay-us N] [--rate-mbit M] [--loss P] [--seed N] [--control-stdin]
//! ```
//! Starts `Relay::start(a, b, seed)` with `both().set_delay(N µs)` (N is the ONE-WAY delay: the
//! RTT it adds is 2N), a rate cap of M Mbit/s (10^6 bits of UDP payload per second) and a
//! random loss probability P (0 to 1) in each direction, prints one JSON line
//! `{"addr_for_a": ..., "addr_for_b": ...}` on stdout (configure A with B's address =
//! `addr_for_a`, B with A's = `addr_for_b`) and runs until killed. With `--control-stdin` it
//! reads one command per line from stdin and answers one line on stdout: `cut` / `restore`,
//! `delay US` (one way), `rate MBIT` / `rate off`, `loss P` (all of them both directions),
//! `stats` (a JSON line of counters); it exits when stdin closes, so a relay whose controller
//! died does not linger.
//!
//! ```text
//! ferry-relay --ping COUNT [--delay-us N] [--direct] [--payload BYTES]
//! ```
//! Measures UDP round trips between a loopback socket of this process and an echo in a child
//! process (`ferry-relay --echo`), through an in-process relay with the given one-way delay (or
//! directly with `--direct`), and prints one JSON line: `count`, `lost`, `min_us`, `p50_us`,
//! `p99_us`, `mean_us`, `max_us`. Both ends wait in `epoll_wait`, and the echo is a process of
//! its own, as two Ferry nodes are. On this VM the p50 is still bimodal from run to run: 4-5 µs
//! when the scheduler keeps both ends on one CPU (each wakes the other where it just went to
//! sleep), 50-70 µs when they sit on two (an idle vCPU is halted and must be woken).

use std::io::{BufRead, Write};
use std::net::{SocketAddr, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use ferry_testkit::relay::{LinkStats, Relay};

const USAGE: &str = "usage:
  ferry-relay --a ADDR --b ADDR [--delay-us N] [--rate-mbit M] [--loss P] [--seed N] [--control-stdin]
  ferry-relay --ping COUNT [--delay-us N] [--direct] [--payload BYTES]
  ferry-relay --echo      (the ping's other end: prints its address, answers until stdin closes)";

/// Pings answered later than this are counted as lost.
const PING_TIMEOUT: Duration = Duration::from_secs(1);
/// Round trips before the measured ones (thread wake-up paths, caches).
const PING_WARMUP: usize = 50;

struct Args {
    a: Option<SocketAddr>,
    b: Option<SocketAddr>,
    delay: Duration,
    rate: Option<u64>,
    loss: f64,
    seed: u64,
    control_stdin: bool,
    ping: Option<usize>,
    echo: bool,
    direct: bool,
    payload: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        a: None,
        b: None,
        delay: Duration::ZERO,
        rate: None,
        loss: 0.0,
        seed: 1,
        control_stdin: false,
        ping: None,
        echo: false,
        direct: false,
        payload: 64,
    };
    let mut iter = std::env::args().skip(1);
    while let Some(flag) = iter.next() {
        let mut value = |name: &str| {
            iter.next()
                .ok_or_else(|| format!("{name} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--a" => args.a = Some(parse(&value("--a")?, "--a")?),
            "--b" => args.b = Some(parse(&value("--b")?, "--b")?),
            "--delay-us" => {
                args.delay = Duration::from_micros(parse(&value("--delay-us")?, "--delay-us")?)
            }
            "--rate-mbit" => args.rate = parse_rate(&value("--rate-mbit")?)?,
            "--loss" => args.loss = parse_loss(&value("--loss")?)?,
            "--seed" => args.seed = parse(&value("--seed")?, "--seed")?,
            "--control-stdin" => args.control_stdin = true,
            "--ping" => args.ping = Some(parse(&value("--ping")?, "--ping")?),
            "--echo" => args.echo = true,
            "--direct" => args.direct = true,
            "--payload" => args.payload = parse(&value("--payload")?, "--payload")?,
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(args)
}

fn parse<T: std::str::FromStr>(text: &str, name: &str) -> Result<T, String> {
    text.parse()
        .map_err(|_| format!("{name}: cannot parse {text:?}"))
}

/// A rate in Mbit/s (10^6 bits per second, a float) as bytes per second; `off` is no cap.
fn parse_rate(text: &str) -> Result<Option<u64>, String> {
    if text == "off" {
        return Ok(None);
    }
    let mbit: f64 = parse(text, "rate")?;
    let bytes_per_second = (mbit * 1e6 / 8.0).round();
    // The relay takes a zero rate as a cut; refuse it here rather than panic there.
    if !(1.0..=u64::MAX as f64).contains(&bytes_per_second) {
        return Err(format!(
            "rate: {text:?} Mbit/s is not a positive rate (use cut for none)"
        ));
    }
    Ok(Some(bytes_per_second as u64))
}

/// A loss probability in [0, 1].
fn parse_loss(text: &str) -> Result<f64, String> {
    let probability: f64 = parse(text, "loss")?;
    if !(0.0..=1.0).contains(&probability) {
        return Err(format!("loss: {text:?} is not a probability in [0, 1]"));
    }
    Ok(probability)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    if args.echo {
        return match echo() {
            Ok(()) => ExitCode::SUCCESS,
            Err(message) => {
                eprintln!("ferry-relay --echo: {message}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(count) = args.ping {
        return match ping(count, args.delay, args.direct, args.payload, args.seed) {
            Ok(line) => {
                println!("{line}");
                ExitCode::SUCCESS
            }
            Err(message) => {
                eprintln!("ferry-relay: {message}");
                ExitCode::FAILURE
            }
        };
    }
    let (Some(a), Some(b)) = (args.a, args.b) else {
        eprintln!("--a and --b are required\n{USAGE}");
        return ExitCode::from(2);
    };
    if a == b {
        eprintln!("--a and --b must differ");
        return ExitCode::from(2);
    }
    let relay = Relay::start(a, b, args.seed);
    relay
        .both()
        .set_delay(args.delay)
        .set_rate(args.rate)
        .set_loss(args.loss);
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(
        stdout,
        "{{\"addr_for_a\": \"{}\", \"addr_for_b\": \"{}\", \"delay_us\": {}, \"rate_bytes_per_second\": {}, \"loss\": {}}}",
        relay.addr_for_a(),
        relay.addr_for_b(),
        args.delay.as_micros(),
        args.rate.map_or("null".to_string(), |rate| rate.to_string()),
        args.loss
    );
    let _ = stdout.flush();
    if !args.control_stdin {
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let Ok(line) = line else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        let reply = match words.as_slice() {
            [] => continue,
            ["cut"] => {
                relay.both().cut();
                "ok".to_string()
            }
            ["restore"] => {
                relay.both().restore();
                "ok".to_string()
            }
            ["delay", micros] => match micros.parse::<u64>() {
                Ok(micros) => {
                    relay.both().set_delay(Duration::from_micros(micros));
                    "ok".to_string()
                }
                Err(_) => format!("error: cannot parse {micros:?}"),
            },
            ["rate", mbit] => match parse_rate(mbit) {
                Ok(rate) => {
                    relay.both().set_rate(rate);
                    "ok".to_string()
                }
                Err(message) => format!("error: {message}"),
            },
            ["loss", probability] => match parse_loss(probability) {
                Ok(probability) => {
                    relay.both().set_loss(probability);
                    "ok".to_string()
                }
                Err(message) => format!("error: {message}"),
            },
            ["stats"] => format!(
                "{{\"a_to_b\": {}, \"b_to_a\": {}, \"kernel_receive_drops\": {}}}",
                stats_json(&relay.a_to_b().stats()),
                stats_json(&relay.b_to_a().stats()),
                relay.kernel_receive_drops()
            ),
            _ => format!("error: unknown command {line:?} (cut, restore, delay US, rate MBIT|off, loss P, stats)"),
        };
        if writeln!(stdout, "{reply}")
            .and_then(|_| stdout.flush())
            .is_err()
        {
            break;
        }
    }
    // stdin closed: the controller is gone. Dropping the relay joins its thread.
    drop(relay);
    ExitCode::SUCCESS
}

fn stats_json(stats: &LinkStats) -> String {
    format!(
        "{{\"received_datagrams\": {}, \"forwarded_datagrams\": {}, \"forwarded_bytes\": {}, \
         \"dropped_loss_datagrams\": {}, \"dropped_cut_datagrams\": {}, \"dropped_queue_datagrams\": {}, \
         \"dropped_send_error_datagrams\": {}, \"held_datagrams\": {}}}",
        stats.received_datagrams,
        stats.forwarded_datagrams,
        stats.forwarded_bytes,
        stats.dropped_loss_datagrams,
        stats.dropped_cut_datagrams,
        stats.dropped_queue_datagrams,
        stats.dropped_send_error_datagrams,
        stats.held_datagrams
    )
}

/// Waits for a socket to be readable the way an event loop (tokio, so Ferry) does: in
/// `epoll_wait`, not in a blocking `recv`.
struct Readable {
    epoll: std::os::fd::OwnedFd,
}

impl Readable {
    fn new(socket: &UdpSocket) -> Result<Self, String> {
        use std::os::fd::{AsRawFd, FromRawFd};
        // SAFETY: epoll_create1 takes no pointers; a non-negative result is a new fd we own.
        let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if raw < 0 {
            return Err(format!(
                "epoll_create1: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: `raw` is a fresh, valid fd owned by nothing else.
        let epoll = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        let mut event = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: 0,
        };
        // SAFETY: both fds are open; `event` is a valid epoll_event for the call's duration.
        let added = unsafe {
            libc::epoll_ctl(
                epoll.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                socket.as_raw_fd(),
                &mut event,
            )
        };
        if added < 0 {
            return Err(format!("epoll_ctl: {}", std::io::Error::last_os_error()));
        }
        Ok(Readable { epoll })
    }

    /// Whether the socket became readable within `timeout` (`None`: no limit).
    fn wait(&self, timeout: Option<Duration>) -> bool {
        use std::os::fd::AsRawFd;
        // Rounded up: a wait of less than a millisecond must not become no wait.
        let millis = timeout.map_or(-1, |t| {
            i32::try_from(t.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
        });
        let mut event = libc::epoll_event { events: 0, u64: 0 };
        loop {
            // SAFETY: room for exactly one event, as maxevents says.
            let ready = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), &mut event, 1, millis) };
            if ready >= 0 {
                return ready > 0;
            }
            if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                return false;
            }
        }
    }
}

/// The ping's other end, in a process of its own: binds a loopback socket, prints its address
/// on stdout, answers every datagram to where it came from, and exits when stdin closes (the
/// pinging process is done, or gone).
fn echo() -> Result<(), String> {
    let socket = UdpSocket::bind("127.0.0.1:0").map_err(|error| format!("bind: {error}"))?;
    let addr = socket.local_addr().map_err(|error| error.to_string())?;
    println!("{addr}");
    std::io::stdout()
        .flush()
        .map_err(|error| error.to_string())?;
    std::thread::spawn(|| {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        std::process::exit(0);
    });
    let readable = Readable::new(&socket)?;
    let mut buffer = vec![0u8; 65_535];
    loop {
        readable.wait(None);
        let (length, from) = socket
            .recv_from(&mut buffer)
            .map_err(|error| format!("recv: {error}"))?;
        let _ = socket.send_to(&buffer[..length], from);
    }
}

/// UDP ping-pong: A (this process) sends, the echo in a child process answers.
fn ping(
    count: usize,
    delay: Duration,
    direct: bool,
    payload: usize,
    seed: u64,
) -> Result<String, String> {
    let a = UdpSocket::bind("127.0.0.1:0").map_err(|error| format!("bind: {error}"))?;
    let a_addr = a.local_addr().map_err(|error| error.to_string())?;
    let exe = std::env::current_exe().map_err(|error| error.to_string())?;
    let mut child = std::process::Command::new(exe)
        .arg("--echo")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|error| format!("starting the echo process: {error}"))?;
    // Dropped (stdin closed, the echo exits, then reaped) on every path out of here.
    struct Echo(std::process::Child);
    impl Drop for Echo {
        fn drop(&mut self) {
            drop(self.0.stdin.take());
            let _ = self.0.wait();
        }
    }
    let stdout = child.stdout.take();
    let mut echo = Echo(child);
    let stdout = stdout.ok_or("the echo's stdout")?;
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(|error| format!("reading the echo's address: {error}"))?;
    let b_addr: SocketAddr = parse(line.trim(), "the echo's address")?;
    let relay = (!direct).then(|| {
        let relay = Relay::start(a_addr, b_addr, seed);
        relay.both().set_delay(delay);
        relay
    });
    // Where A sends to reach B (the echo answers to where each datagram came from).
    let a_target = match &relay {
        Some(relay) => relay.addr_for_a(),
        None => b_addr,
    };
    let payload = payload.max(8);
    let readable = Readable::new(&a)?;
    a.set_read_timeout(Some(PING_TIMEOUT))
        .map_err(|error| error.to_string())?;
    let mut buffer = vec![0u8; 65_535];
    let mut message = vec![0u8; payload];
    let mut rtts = Vec::with_capacity(count);
    let mut lost = 0usize;
    for sequence in 0..(PING_WARMUP + count) as u64 {
        message[..8].copy_from_slice(&sequence.to_le_bytes());
        let sent_at = Instant::now();
        a.send_to(&message, a_target)
            .map_err(|error| format!("send: {error}"))?;
        // Skip stale answers (of pings that timed out) until ours arrives or time runs out.
        let answered = loop {
            if !readable.wait(Some(PING_TIMEOUT.saturating_sub(sent_at.elapsed()))) {
                break false;
            }
            match a.recv_from(&mut buffer) {
                Ok((length, _)) if length >= 8 => {
                    let got = u64::from_le_bytes(buffer[..8].try_into().expect("8 bytes"));
                    if got == sequence {
                        break true;
                    }
                }
                Ok(_) => {}
                Err(_) => break false,
            }
            if sent_at.elapsed() >= PING_TIMEOUT {
                break false;
            }
        };
        let rtt = sent_at.elapsed();
        if !answered {
            // An echo that died would make every later ping wait out its timeout.
            if let Ok(Some(status)) = echo.0.try_wait() {
                return Err(format!("the echo process exited ({status})"));
            }
        }
        if sequence as usize >= PING_WARMUP {
            if answered {
                rtts.push(rtt);
            } else {
                lost += 1;
            }
        }
    }
    drop(echo);
    drop(relay);
    if rtts.is_empty() {
        return Err(format!("all {count} pings lost"));
    }
    rtts.sort();
    let micros = |duration: Duration| duration.as_secs_f64() * 1e6;
    let n = rtts.len();
    let mean = rtts.iter().map(|rtt| micros(*rtt)).sum::<f64>() / n as f64;
    Ok(format!(
        "{{\"count\": {n}, \"lost\": {lost}, \"direct\": {direct}, \"delay_us\": {}, \
         \"min_us\": {:.1}, \"p50_us\": {:.1}, \"p99_us\": {:.1}, \"mean_us\": {mean:.1}, \
         \"max_us\": {:.1}}}",
        delay.as_micros(),
        micros(rtts[0]),
        micros(rtts[n / 2]),
        micros(rtts[(n * 99 / 100).min(n - 1)]),
        micros(rtts[n - 1]),
    ))
}
