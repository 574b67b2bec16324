//! A userspace UDP relay between two peers on loopback: the network faults the tests own
//! (STYLE item 6), since this kernel has no netem. Per direction, changeable while traffic
//! flows: one-way delay, jitter (in order by default, reordering on request), random loss, a
//! rate cap with a bounded queue, and a cut (partition).
//!
//! Topology. `Relay::start(a, b, seed)` binds two UDP sockets on 127.0.0.1:0:
//!
//! ```text
//!   A (a) ──▶ addr_for_a ─[A→B: cut, loss, rate, delay, jitter]─ addr_for_b ──▶ B (b)
//!   A (a) ◀── addr_for_a ─[B→A: cut, loss, rate, delay, jitter]─ addr_for_b ◀── B (b)
//! ```
//!
//! A is configured with B's address = `addr_for_a`, B with A's address = `addr_for_b`. Whatever
//! arrives on `addr_for_a` leaves from `addr_for_b` towards the configured `b`, and the other way
//! round, so each peer always talks to the one address it was configured with and sees replies
//! from it: one stable 4-tuple per side, which is what a QUIC connection needs, whichever side
//! dials first. Datagrams are always sent to the *configured* address of the other side (not to
//! a learned one), so a peer that restarts on its configured port is reachable at once, and a
//! stray datagram cannot redirect the return path. The price: each peer must send from its
//! configured address (true for a quinn endpoint that both listens and dials). The last source
//! seen on each side socket is kept ([`Relay::last_source_a`]) so a test can assert that.
//!
//! Runtime. The relay owns one plain std thread (`ferry-relay`), not tokio: tokio's timer has
//! millisecond granularity, and a 1 ms RTT must be sub-millisecond precise. Held datagrams sit
//! in a binary heap of release instants; the thread waits in `ppoll(2)` on both sockets and an
//! eventfd with a nanosecond timeout to the earliest release (timer slack set to 1 ns), so a
//! datagram leaves within tens of microseconds of its instant and never waits behind another
//! one beyond what the rate cap imposes. The thread is joined on `Drop` (woken through the
//! eventfd); the sockets and the eventfd are closed with it, and held datagrams are discarded.
//!
//! Model of one direction, in order: cut (drop) → loss (drop with probability p) → rate cap (a
//! token bucket of `rate_burst` worth of tokens feeding a FIFO queue of at most
//! `queue_delay_max` of backlog; beyond that the datagram is dropped, like a router's tail
//! drop) → propagation delay → jitter (uniform in `[0, jitter_max]`) → cut again at release (a
//! cut models a DROP on the receiver's INPUT chain, so datagrams already on the wire are lost
//! too) → send. The rate counts UDP payload bytes. Randomness comes from one `StdRng` per
//! direction seeded from `seed`, so a direction's loss pattern depends only on the seed and on
//! the datagrams that entered it.
//!
//! Bounds: at most [`HELD_DATAGRAMS_MAX`] datagrams and [`HELD_BYTES_MAX`] bytes held per
//! direction (beyond: counted as a queue drop), at most [`RECEIVE_BATCH_MAX`] datagrams read per
//! socket per wake-up, and the thread's loop ends when the relay is dropped.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// The largest UDP payload; the receive buffer has this size so nothing is truncated.
const DATAGRAM_BYTES_MAX: usize = 65_535;
/// Datagrams read from one socket per wake-up, so that a flood cannot starve due releases.
pub const RECEIVE_BATCH_MAX: usize = 64;
/// Datagrams held (delayed or queued) per direction; beyond this a datagram is a queue drop.
pub const HELD_DATAGRAMS_MAX: u64 = 16_384;
/// Bytes held per direction; beyond this a datagram is a queue drop.
pub const HELD_BYTES_MAX: u64 = 64 << 20;
/// Socket buffers of the relay's sockets: the default 208 KiB drops bursts of a bulk transfer.
const SOCKET_BUFFER_BYTES: libc::c_int = 8 << 20;
/// The token bucket's depth when a rate is set, as time at that rate.
const RATE_BURST_DEFAULT: Duration = Duration::from_millis(10);
/// The rate queue's bound, as time of backlog at that rate (like tbf's `latency`).
const QUEUE_DELAY_MAX_DEFAULT: Duration = Duration::from_millis(100);

/// One direction through the relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    AToB,
    BToA,
}

impl Direction {
    const ALL: [Direction; 2] = [Direction::AToB, Direction::BToA];

    fn index(self) -> usize {
        match self {
            Direction::AToB => 0,
            Direction::BToA => 1,
        }
    }

    /// The direction of datagrams arriving on side socket `side` (0 = A's, 1 = B's).
    fn from_arrival_side(side: usize) -> Direction {
        Direction::ALL[side]
    }
}

/// The impairments of one direction. `Conditions::default()` is a perfect link.
#[derive(Clone, Debug, PartialEq)]
pub struct Conditions {
    /// Propagation delay added to every datagram.
    pub delay: Duration,
    /// Extra delay, uniform in `[0, jitter_max]`, drawn per datagram.
    pub jitter_max: Duration,
    /// `false`: datagrams leave in arrival order (jitter delays the ones behind, too).
    /// `true`: each datagram leaves at its own instant, so jitter reorders.
    pub reorder: bool,
    /// Probability in `[0, 1]` that a datagram is dropped.
    pub loss_probability: f64,
    /// `Some(rate)`: UDP payload bytes per second leaving this direction, at most.
    pub rate_bytes_per_second: Option<u64>,
    /// Depth of the token bucket, as time at the rate: how long an idle link may then burst.
    pub rate_burst: Duration,
    /// The queue behind the rate cap holds at most this much backlog; beyond, tail drop.
    pub queue_delay_max: Duration,
    /// Everything in this direction is dropped, including datagrams already held.
    pub cut: bool,
}

impl Default for Conditions {
    fn default() -> Self {
        Conditions {
            delay: Duration::ZERO,
            jitter_max: Duration::ZERO,
            reorder: false,
            loss_probability: 0.0,
            rate_bytes_per_second: None,
            rate_burst: RATE_BURST_DEFAULT,
            queue_delay_max: QUEUE_DELAY_MAX_DEFAULT,
            cut: false,
        }
    }
}

/// Counters of one direction. Every received datagram is eventually counted exactly once as
/// forwarded or as one kind of drop; until then it is `held`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub received_datagrams: u64,
    pub received_bytes: u64,
    pub forwarded_datagrams: u64,
    pub forwarded_bytes: u64,
    pub dropped_loss_datagrams: u64,
    pub dropped_cut_datagrams: u64,
    /// Tail drops of the rate queue, and drops at the held-datagram bounds.
    pub dropped_queue_datagrams: u64,
    /// `sendto` failed (e.g. the receiver's socket buffer was full: EAGAIN).
    pub dropped_send_error_datagrams: u64,
    /// Currently delayed or queued in the relay.
    pub held_datagrams: u64,
    pub held_bytes: u64,
}

impl LinkStats {
    /// Datagrams that were received and have reached their fate.
    pub fn settled_datagrams(&self) -> u64 {
        self.forwarded_datagrams
            + self.dropped_loss_datagrams
            + self.dropped_cut_datagrams
            + self.dropped_queue_datagrams
            + self.dropped_send_error_datagrams
    }

    fn add(&mut self, other: &LinkStats) {
        self.received_datagrams += other.received_datagrams;
        self.received_bytes += other.received_bytes;
        self.forwarded_datagrams += other.forwarded_datagrams;
        self.forwarded_bytes += other.forwarded_bytes;
        self.dropped_loss_datagrams += other.dropped_loss_datagrams;
        self.dropped_cut_datagrams += other.dropped_cut_datagrams;
        self.dropped_queue_datagrams += other.dropped_queue_datagrams;
        self.dropped_send_error_datagrams += other.dropped_send_error_datagrams;
        self.held_datagrams += other.held_datagrams;
        self.held_bytes += other.held_bytes;
    }
}

/// What the test and the relay thread share, per direction.
#[derive(Default)]
struct LinkState {
    conditions: Conditions,
    stats: LinkStats,
    /// The last source address seen on the socket this direction receives on.
    last_source: Option<SocketAddr>,
}

#[derive(Default)]
struct Shared {
    links: Mutex<[LinkState; 2]>,
}

impl Shared {
    /// The lock is held only for short, panic-free sections; a poisoned lock (a test thread
    /// panicked elsewhere) still holds consistent data, so it is used as is.
    fn lock(&self) -> MutexGuard<'_, [LinkState; 2]> {
        self.links
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A control handle on one direction or on both; cheap to clone and `Send`, so another thread
/// (a fault schedule) can hold one. Setters return `&Self` to chain.
#[derive(Clone)]
pub struct Link {
    shared: Arc<Shared>,
    directions: &'static [Direction],
}

impl Link {
    fn update(&self, change: impl Fn(&mut Conditions)) -> &Self {
        let mut links = self.shared.lock();
        for direction in self.directions {
            change(&mut links[direction.index()].conditions);
        }
        self
    }

    /// Replaces all conditions at once.
    pub fn set(&self, conditions: Conditions) -> &Self {
        let loss_probability = conditions.loss_probability;
        assert!(
            (0.0..=1.0).contains(&loss_probability),
            "loss probability {loss_probability} is not in [0, 1]"
        );
        assert_ne!(
            conditions.rate_bytes_per_second,
            Some(0),
            "a zero rate is a cut; use cut()"
        );
        self.update(|current| *current = conditions.clone())
    }

    /// The conditions of the first direction of this handle.
    pub fn conditions(&self) -> Conditions {
        self.shared.lock()[self.directions[0].index()]
            .conditions
            .clone()
    }

    pub fn set_delay(&self, one_way: Duration) -> &Self {
        self.update(|conditions| conditions.delay = one_way)
    }

    pub fn set_jitter(&self, max: Duration) -> &Self {
        self.update(|conditions| conditions.jitter_max = max)
    }

    pub fn set_reorder(&self, reorder: bool) -> &Self {
        self.update(|conditions| conditions.reorder = reorder)
    }

    pub fn set_loss(&self, probability: f64) -> &Self {
        assert!(
            (0.0..=1.0).contains(&probability),
            "loss probability {probability} is not in [0, 1]"
        );
        self.update(|conditions| conditions.loss_probability = probability)
    }

    /// `None` removes the cap. A zero rate is refused: use [`Link::cut`] for that.
    pub fn set_rate(&self, bytes_per_second: Option<u64>) -> &Self {
        assert_ne!(bytes_per_second, Some(0), "a zero rate is a cut; use cut()");
        self.update(|conditions| conditions.rate_bytes_per_second = bytes_per_second)
    }

    pub fn set_rate_burst(&self, burst: Duration) -> &Self {
        self.update(|conditions| conditions.rate_burst = burst)
    }

    pub fn set_queue_delay_max(&self, queue_delay_max: Duration) -> &Self {
        self.update(|conditions| conditions.queue_delay_max = queue_delay_max)
    }

    /// Partition: drop everything in this direction, held datagrams included.
    pub fn cut(&self) -> &Self {
        self.update(|conditions| conditions.cut = true)
    }

    pub fn restore(&self) -> &Self {
        self.update(|conditions| conditions.cut = false)
    }

    /// Back to a perfect link.
    pub fn clear(&self) -> &Self {
        self.update(|conditions| *conditions = Conditions::default())
    }

    /// Counters, summed over the directions of this handle.
    pub fn stats(&self) -> LinkStats {
        let links = self.shared.lock();
        let mut total = LinkStats::default();
        for direction in self.directions {
            total.add(&links[direction.index()].stats);
        }
        total
    }
}

/// The relay; see the module documentation. Stops and joins its thread on drop.
pub struct Relay {
    addr_for_a: SocketAddr,
    addr_for_b: SocketAddr,
    seed: u64,
    shared: Arc<Shared>,
    /// An eventfd; writing to it stops the thread.
    stop: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    /// Starts a relay between the real addresses `a` and `b` (loopback). Panics if the sockets
    /// or the thread cannot be created: this is a test fixture.
    pub fn start(a: SocketAddr, b: SocketAddr, seed: u64) -> Relay {
        assert_ne!(a, b, "the two sides of a relay must differ");
        let sockets = [bind_side_socket(), bind_side_socket()];
        let addr_for_a = sockets[0].local_addr().expect("relay local addr");
        let addr_for_b = sockets[1].local_addr().expect("relay local addr");
        // SAFETY: eventfd takes no pointers; the result is checked before use.
        let stop_fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(stop_fd >= 0, "eventfd: {}", io::Error::last_os_error());
        // SAFETY: stop_fd is a fresh descriptor that nothing else owns.
        let stop = Arc::new(unsafe { OwnedFd::from_raw_fd(stop_fd) });
        let shared = Arc::new(Shared::default());
        let worker = Worker {
            sockets,
            destinations: [a, b],
            shared: Arc::clone(&shared),
            stop: Arc::clone(&stop),
            rngs: [
                StdRng::seed_from_u64(seed),
                StdRng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15),
            ],
            held: BinaryHeap::new(),
            sequence: 0,
            link_free_at: [None, None],
            last_release_at: [None, None],
        };
        let (ready_sender, ready) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("ferry-relay".to_string())
            .spawn(move || worker.run(ready_sender))
            .expect("spawn relay thread");
        // Wait until the thread runs: a datagram is stamped when the thread reads it, and a
        // thread that takes milliseconds to get scheduled would add them to the first delays.
        ready
            .recv_timeout(Duration::from_secs(10))
            .expect("the relay thread started");
        Relay {
            addr_for_a,
            addr_for_b,
            seed,
            shared,
            stop,
            thread: Some(thread),
        }
    }

    /// The address A must use to reach B.
    pub fn addr_for_a(&self) -> SocketAddr {
        self.addr_for_a
    }

    /// The address B must use to reach A.
    pub fn addr_for_b(&self) -> SocketAddr {
        self.addr_for_b
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    pub fn a_to_b(&self) -> Link {
        self.link(&[Direction::AToB])
    }

    pub fn b_to_a(&self) -> Link {
        self.link(&[Direction::BToA])
    }

    /// Both directions at once (setters apply to both; `stats` sums them).
    pub fn both(&self) -> Link {
        self.link(&Direction::ALL)
    }

    pub fn direction(&self, direction: Direction) -> Link {
        match direction {
            Direction::AToB => self.a_to_b(),
            Direction::BToA => self.b_to_a(),
        }
    }

    fn link(&self, directions: &'static [Direction]) -> Link {
        Link {
            shared: Arc::clone(&self.shared),
            directions,
        }
    }

    /// Datagrams the kernel dropped because a relay socket's receive buffer was full: traffic
    /// offered faster than the relay forwards (about 190k datagrams/s on the project's VM).
    /// These never reach the relay's counters, so a test that counts losses checks this is 0.
    pub fn kernel_receive_drops(&self) -> u64 {
        let table = std::fs::read_to_string("/proc/net/udp").expect("read /proc/net/udp");
        [self.addr_for_a, self.addr_for_b]
            .iter()
            .map(|address| udp_socket_drops(&table, address.port()))
            .sum()
    }

    /// The last source address seen on `addr_for_a` (that is, A's sending address).
    pub fn last_source_a(&self) -> Option<SocketAddr> {
        self.shared.lock()[Direction::AToB.index()].last_source
    }

    /// The last source address seen on `addr_for_b`.
    pub fn last_source_b(&self) -> Option<SocketAddr> {
        self.shared.lock()[Direction::BToA.index()].last_source
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd this relay owns.
        let written = unsafe {
            libc::write(
                self.stop.as_raw_fd(),
                (&one as *const u64).cast::<libc::c_void>(),
                std::mem::size_of::<u64>(),
            )
        };
        // The only failure of an eventfd write of 1 is a counter overflow, impossible here.
        assert_eq!(written, 8, "eventfd write: {}", io::Error::last_os_error());
        if let Some(thread) = self.thread.take() {
            if let Err(panic) = thread.join() {
                // A relay bug must fail the test, unless the test is already failing.
                if !std::thread::panicking() {
                    std::panic::resume_unwind(panic);
                }
            }
        }
    }
}

fn bind_side_socket() -> UdpSocket {
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind relay socket");
    socket
        .set_nonblocking(true)
        .expect("relay socket nonblocking");
    set_socket_buffers(&socket, SOCKET_BUFFER_BYTES);
    socket
}

/// Raises a socket's receive and send buffers. As root, the `*FORCE` options pass the
/// `rmem_max`/`wmem_max` limits; otherwise the plain options apply, capped by those limits.
pub fn set_socket_buffers(socket: &UdpSocket, bytes: libc::c_int) {
    let options = [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ];
    for (forced, plain) in options {
        if setsockopt_int(socket.as_raw_fd(), forced, bytes).is_err() {
            // Not fatal: the default buffers work, they only drop more under bursts.
            let _ = setsockopt_int(socket.as_raw_fd(), plain, bytes);
        }
    }
}

fn setsockopt_int(fd: RawFd, option: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: passes a pointer to a live c_int and its exact size; fd is an open socket.
    let result = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&value as *const libc::c_int).cast::<libc::c_void>(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The `drops` column of the loopback socket bound to `port` in `/proc/net/udp` (local
/// addresses there are hex, `0100007F:PORT` for 127.0.0.1 on little-endian hosts).
fn udp_socket_drops(table: &str, port: u16) -> u64 {
    let local = format!("{:08X}:{port:04X}", u32::from_ne_bytes([127, 0, 0, 1]));
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.get(1) == Some(&local.as_str()))
                .then(|| fields.last().and_then(|drops| drops.parse::<u64>().ok()))
                .flatten()
        })
        .sum()
}

/// A datagram waiting for its release instant.
struct Held {
    release_at: Instant,
    /// Arrival order across the relay: equal instants leave first-in first-out.
    sequence: u64,
    direction: Direction,
    payload: Vec<u8>,
}

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Held {}

impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Held {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.release_at, self.sequence).cmp(&(other.release_at, other.sequence))
    }
}

/// The relay thread's state. Side index 0 is A's socket (`addr_for_a`), 1 is B's; direction
/// A→B arrives on side 0 and leaves from side 1 towards `destinations[1]`.
struct Worker {
    sockets: [UdpSocket; 2],
    destinations: [SocketAddr; 2],
    shared: Arc<Shared>,
    stop: Arc<OwnedFd>,
    rngs: [StdRng; 2],
    /// Min-heap of held datagrams by release instant.
    held: BinaryHeap<Reverse<Held>>,
    sequence: u64,
    /// Per direction: when the rate-limited link finishes sending what is queued. It may lie in
    /// the past by up to `rate_burst`, which is the token bucket's saved-up credit.
    link_free_at: [Option<Instant>; 2],
    /// Per direction: the latest release instant given, to keep order when `reorder` is off.
    last_release_at: [Option<Instant>; 2],
}

impl Worker {
    fn run(mut self, ready: std::sync::mpsc::SyncSender<()>) {
        set_timer_slack_minimal();
        ready.send(()).expect("Relay::start waits for this");
        let mut buffer = vec![0u8; DATAGRAM_BYTES_MAX];
        loop {
            self.release_due(Instant::now());
            let timeout = self
                .held
                .peek()
                .map(|Reverse(first)| first.release_at.saturating_duration_since(Instant::now()));
            let ready = self.wait(timeout);
            if ready[2] {
                return; // The relay was dropped.
            }
            let [ready_a, ready_b, _] = ready;
            if ready_a {
                self.receive_batch(0, &mut buffer);
            }
            if ready_b {
                self.receive_batch(1, &mut buffer);
            }
        }
    }

    /// Waits until a socket is readable, the stop eventfd is signalled or `timeout` passes.
    /// Returns readiness of [side A socket, side B socket, stop].
    fn wait(&self, timeout: Option<Duration>) -> [bool; 3] {
        let mut fds = [
            self.sockets[0].as_raw_fd(),
            self.sockets[1].as_raw_fd(),
            self.stop.as_raw_fd(),
        ]
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
        let timespec = timeout.map(|timeout| libc::timespec {
            // A release instant is at most a test's delay away; it fits in time_t.
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        });
        let timespec_pointer = timespec.as_ref().map_or(std::ptr::null(), |timespec| {
            timespec as *const libc::timespec
        });
        // SAFETY: fds is a live array of 3 pollfd; timespec_pointer is null or points to a
        // live timespec; a null signal mask leaves the mask unchanged.
        let result = unsafe {
            libc::ppoll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                timespec_pointer,
                std::ptr::null(),
            )
        };
        if result < 0 {
            let error = io::Error::last_os_error();
            assert_eq!(error.kind(), io::ErrorKind::Interrupted, "ppoll: {error}");
            return [false; 3];
        }
        // POLLERR/POLLHUP also mean "read to learn more"; a read clears a pending UDP error.
        fds.map(|fd| fd.revents != 0)
    }

    fn receive_batch(&mut self, side: usize, buffer: &mut [u8]) {
        let direction = Direction::from_arrival_side(side);
        for _ in 0..RECEIVE_BATCH_MAX {
            match self.sockets[side].recv_from(buffer) {
                Ok((length, source)) => {
                    self.arrive(direction, source, &buffer[..length], Instant::now());
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return,
                // ICMP errors reported on an unconnected socket and the like: nothing arrived,
                // read on.
                Err(_) => {}
            }
        }
    }

    fn arrive(&mut self, direction: Direction, source: SocketAddr, payload: &[u8], now: Instant) {
        let index = direction.index();
        let shared = Arc::clone(&self.shared);
        let mut links = shared.lock();
        let link = &mut links[index];
        let length = payload.len() as u64;
        link.stats.received_datagrams += 1;
        link.stats.received_bytes += length;
        link.last_source = Some(source);
        let conditions = &link.conditions;

        if conditions.cut {
            link.stats.dropped_cut_datagrams += 1;
            return;
        }
        // Draw only when loss is on, so the loss pattern depends only on the datagrams sent
        // while it was on.
        if conditions.loss_probability > 0.0
            && self.rngs[index].random_bool(conditions.loss_probability)
        {
            link.stats.dropped_loss_datagrams += 1;
            return;
        }
        if link.stats.held_datagrams >= HELD_DATAGRAMS_MAX
            || link.stats.held_bytes + length > HELD_BYTES_MAX
        {
            link.stats.dropped_queue_datagrams += 1;
            return;
        }

        let mut release_at = now;
        if let Some(rate_bytes_per_second) = conditions.rate_bytes_per_second {
            // Cannot overflow: length <= 65_535 and the product is at most 6.6e13 < 2^64.
            let transmit_nanos = (length * 1_000_000_000) / rate_bytes_per_second.max(1);
            let credit_start = now.checked_sub(conditions.rate_burst).unwrap_or(now);
            let start = match self.link_free_at[index] {
                Some(free_at) => free_at.max(credit_start),
                None => credit_start,
            };
            let done_at = start + Duration::from_nanos(transmit_nanos);
            let departure_at = done_at.max(now);
            if departure_at - now > conditions.queue_delay_max {
                link.stats.dropped_queue_datagrams += 1;
                return;
            }
            self.link_free_at[index] = Some(done_at);
            release_at = departure_at;
        }
        release_at += conditions.delay;
        if !conditions.jitter_max.is_zero() {
            let jitter_nanos_max = conditions.jitter_max.as_nanos().min(u64::MAX as u128) as u64;
            release_at += Duration::from_nanos(self.rngs[index].random_range(0..=jitter_nanos_max));
        }
        let last = &mut self.last_release_at[index];
        if let Some(last_release_at) = *last {
            if !conditions.reorder {
                release_at = release_at.max(last_release_at);
            }
            *last = Some(last_release_at.max(release_at));
        } else {
            *last = Some(release_at);
        }

        link.stats.held_datagrams += 1;
        link.stats.held_bytes += length;
        self.sequence += 1;
        self.held.push(Reverse(Held {
            release_at,
            sequence: self.sequence,
            direction,
            payload: payload.to_vec(),
        }));
    }

    /// Sends every held datagram whose instant has come, in instant order.
    fn release_due(&mut self, now: Instant) {
        if self
            .held
            .peek()
            .is_none_or(|Reverse(first)| first.release_at > now)
        {
            return;
        }
        let shared = Arc::clone(&self.shared);
        let mut links = shared.lock();
        while self
            .held
            .peek()
            .is_some_and(|Reverse(first)| first.release_at <= now)
        {
            let Reverse(datagram) = self.held.pop().expect("peeked");
            let index = datagram.direction.index();
            let link = &mut links[index];
            let length = datagram.payload.len() as u64;
            assert!(link.stats.held_datagrams >= 1);
            assert!(link.stats.held_bytes >= length);
            link.stats.held_datagrams -= 1;
            link.stats.held_bytes -= length;
            if link.conditions.cut {
                link.stats.dropped_cut_datagrams += 1;
                continue;
            }
            // A→B (index 0) leaves from B's side socket towards B, and the other way round.
            let to_side = 1 - index;
            match self.sockets[to_side].send_to(&datagram.payload, self.destinations[to_side]) {
                Ok(_) => {
                    link.stats.forwarded_datagrams += 1;
                    link.stats.forwarded_bytes += length;
                }
                Err(_) => link.stats.dropped_send_error_datagrams += 1,
            }
        }
    }
}

/// Linux lets a sleeping thread wake up to 50 µs late by default (timer slack); the relay's
/// precision is its point, so its thread asks for 1 ns.
fn set_timer_slack_minimal() {
    // SAFETY: PR_SET_TIMERSLACK takes integer arguments only and affects this thread only.
    let result = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
    // Not fatal: precision is then up to 50 µs worse.
    let _ = result;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seed;

    /// How long a test waits for something that should take milliseconds.
    const WAIT_MAX: Duration = Duration::from_secs(5);

    /// A plain UDP endpoint standing in for a peer.
    struct Peer {
        socket: UdpSocket,
    }

    impl Peer {
        fn bind() -> Peer {
            let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind peer");
            set_socket_buffers(&socket, SOCKET_BUFFER_BYTES);
            Peer { socket }
        }

        fn addr(&self) -> SocketAddr {
            self.socket.local_addr().expect("peer addr")
        }

        fn send(&self, to: SocketAddr, payload: &[u8]) {
            let sent = self.socket.send_to(payload, to).expect("send");
            assert_eq!(sent, payload.len());
        }

        /// The next datagram within `timeout`, or `None`.
        fn receive(&self, timeout: Duration) -> Option<(Vec<u8>, SocketAddr)> {
            self.socket
                .set_read_timeout(Some(timeout))
                .expect("read timeout");
            // Test datagrams are small; a 64 KiB buffer per call would slow the debug build.
            let mut buffer = [0u8; 2048];
            match self.socket.recv_from(&mut buffer) {
                Ok((length, source)) => Some((buffer[..length].to_vec(), source)),
                Err(error)
                    if matches!(
                        error.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    None
                }
                Err(error) => panic!("recv: {error}"),
            }
        }

        /// Receives until `quiet` passes without a datagram; returns the payloads, checking that
        /// each came from `from`.
        fn receive_all(&self, from: SocketAddr, quiet: Duration) -> Vec<Vec<u8>> {
            let mut payloads = Vec::new();
            let deadline = Instant::now() + WAIT_MAX;
            while let Some((payload, source)) = self.receive(quiet) {
                assert_eq!(source, from, "datagram from an unexpected address");
                payloads.push(payload);
                assert!(Instant::now() < deadline, "datagrams kept coming");
            }
            payloads
        }
    }

    /// Two peers and a relay between them.
    fn setup(seed: u64) -> (Peer, Peer, Relay) {
        let a = Peer::bind();
        let b = Peer::bind();
        let relay = Relay::start(a.addr(), b.addr(), seed);
        (a, b, relay)
    }

    fn sequence_payload(sequence: u64, length: usize) -> Vec<u8> {
        let mut payload = vec![0u8; length.max(8)];
        payload[..8].copy_from_slice(&sequence.to_le_bytes());
        payload
    }

    fn sequence_of(payload: &[u8]) -> u64 {
        u64::from_le_bytes(payload[..8].try_into().expect("8 bytes"))
    }

    /// Waits until every datagram the direction received has reached its fate, and checks the
    /// accounting: received = forwarded + drops.
    fn settled_stats(link: &Link, received_datagrams: u64) -> LinkStats {
        let deadline = Instant::now() + WAIT_MAX;
        loop {
            let stats = link.stats();
            if stats.received_datagrams == received_datagrams
                && stats.settled_datagrams() == received_datagrams
            {
                assert_eq!(stats.held_datagrams, 0, "{stats:?}");
                assert_eq!(stats.held_bytes, 0, "{stats:?}");
                return stats;
            }
            assert!(
                stats.settled_datagrams() + stats.held_datagrams <= stats.received_datagrams,
                "{stats:?}"
            );
            assert!(
                Instant::now() < deadline,
                "relay did not settle {received_datagrams} datagrams: {stats:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Round trips A → B → A through the relay; B echoes. Returns each RTT.
    fn ping_pong(a: &Peer, b: &Peer, relay: &Relay, count: u64) -> Vec<Duration> {
        let mut rtts = Vec::new();
        for sequence in 0..count {
            let payload = sequence_payload(sequence, 64);
            let sent_at = Instant::now();
            a.send(relay.addr_for_a(), &payload);
            let (echo, source) = b.receive(WAIT_MAX).expect("B receives the ping");
            assert_eq!(source, relay.addr_for_b());
            b.send(relay.addr_for_b(), &echo);
            let (reply, source) = a.receive(WAIT_MAX).expect("A receives the echo");
            rtts.push(sent_at.elapsed());
            assert_eq!(source, relay.addr_for_a());
            assert_eq!(reply, payload);
        }
        rtts
    }

    fn median(durations: Vec<Duration>) -> Duration {
        quantile(&durations, 2)
    }

    /// The value below which one `n`-th of `durations` lies (2: the median, 4: the lower
    /// quartile).
    fn quantile(durations: &[Duration], n: usize) -> Duration {
        let mut sorted = durations.to_vec();
        sorted.sort();
        sorted[sorted.len() / n]
    }

    #[test]
    fn relay_forwards_both_ways_unimpaired_whichever_side_sends_first() {
        let (a, b, relay) = setup(seed::test_seed("relay_forwards_both_ways"));
        // B sends first, as if B dialed: it reaches A from addr_for_a, A's reply reaches B.
        for round in 0..2u64 {
            let (first, second, first_addr, second_addr) = if round == 0 {
                (&b, &a, relay.addr_for_b(), relay.addr_for_a())
            } else {
                (&a, &b, relay.addr_for_a(), relay.addr_for_b())
            };
            for sequence in 0..20 {
                let payload = sequence_payload(sequence, 1200);
                first.send(first_addr, &payload);
                let (received, source) = second.receive(WAIT_MAX).expect("forwarded");
                assert_eq!(source, second_addr);
                assert_eq!(received, payload);
                second.send(second_addr, &received);
                let (echo, source) = first.receive(WAIT_MAX).expect("echoed");
                assert_eq!(source, first_addr);
                assert_eq!(echo, payload);
            }
        }
        assert_eq!(relay.kernel_receive_drops(), 0);
        assert_eq!(relay.last_source_a(), Some(a.addr()));
        assert_eq!(relay.last_source_b(), Some(b.addr()));
        for link in [relay.a_to_b(), relay.b_to_a()] {
            let stats = settled_stats(&link, 40);
            assert_eq!(stats.forwarded_datagrams, 40);
            assert_eq!(stats.forwarded_bytes, 40 * 1200);
        }
    }

    #[test]
    fn relay_delay_2ms_one_way_gives_4ms_rtt() {
        let (a, b, relay) = setup(seed::test_seed("relay_delay_2ms"));
        relay.both().set_delay(Duration::from_millis(2));
        let rtts = ping_pong(&a, &b, &relay, 100);
        let minimum = *rtts.iter().min().expect("rtts");
        let median_rtt = median(rtts);
        eprintln!("2 ms one way: RTT min {minimum:?}, median {median_rtt:?}");
        assert!(minimum >= Duration::from_millis(4), "min RTT {minimum:?}");
        assert!(
            median_rtt < Duration::from_millis(6),
            "median RTT {median_rtt:?}"
        );
    }

    #[test]
    fn relay_sub_millisecond_delay_is_precise() {
        let (a, b, relay) = setup(seed::test_seed("relay_sub_millisecond_delay"));
        // A 1 ms RTT, as in the metro benchmark.
        let one_way = Duration::from_micros(500);
        let asked_rtt = one_way * 2;
        // On a shared, loaded machine every round trip also pays scheduling delays, hundreds
        // of microseconds when other tests keep both cores busy, so what the relay adds is
        // measured against round trips through the same relay without delay, interleaved
        // with the delayed ones so that both see the same load.
        let mut direct = Vec::new();
        let mut delayed = Vec::new();
        for _ in 0..5 {
            relay.both().set_delay(Duration::ZERO);
            direct.extend(ping_pong(&a, &b, &relay, 40));
            relay.both().set_delay(one_way);
            delayed.extend(ping_pong(&a, &b, &relay, 40));
        }
        let minimum = *delayed.iter().min().expect("rtts");
        let (direct_quartile, direct_median) = (quantile(&direct, 4), quantile(&direct, 2));
        let (delayed_quartile, delayed_median) = (quantile(&delayed, 4), quantile(&delayed, 2));
        let added = delayed_quartile.saturating_sub(direct_quartile);
        eprintln!(
            "0.5 ms one way: RTT min {minimum:?}, lower quartile {delayed_quartile:?}, median \
             {delayed_median:?}; without delay: lower quartile {direct_quartile:?}, median \
             {direct_median:?}; added at the lower quartile {added:?}"
        );
        // Never early, whatever the load: every datagram waits at least its delay.
        assert!(minimum >= asked_rtt, "min RTT {minimum:?}");
        // Precise: the relay adds what was asked, not a timer tick. A millisecond-granular
        // timer (tokio's) rounds each 0.5 ms up to 1 ms or more and adds at least 2 ms per
        // round trip. The margin is for the two timer wake-ups per delayed round trip, which
        // the direct path does not have; the lower quartile keeps the load's spikes out.
        let margin = Duration::from_micros(500);
        assert!(
            added < asked_rtt + margin,
            "the relay added {added:?} to the lower quartile of the RTT for a {asked_rtt:?} \
             delay (delayed {delayed_quartile:?}, direct {direct_quartile:?})"
        );
    }

    /// Sends `count` numbered datagrams A → B through a relay with `loss`; returns the sequence
    /// numbers B received.
    fn lossy_run(seed: u64, loss: f64, count: u64) -> Vec<u64> {
        let (a, b, relay) = setup(seed);
        relay.a_to_b().set_loss(loss);
        for sequence in 0..count {
            a.send(relay.addr_for_a(), &sequence_payload(sequence, 100));
            if sequence % 50 == 49 {
                // Pace, so that no socket buffer overflows and every drop is the relay's.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let stats = settled_stats(&relay.a_to_b(), count);
        let received: Vec<u64> = b
            .receive_all(relay.addr_for_b(), Duration::from_millis(200))
            .iter()
            .map(|payload| sequence_of(payload))
            .collect();
        assert_eq!(
            stats.forwarded_datagrams,
            received.len() as u64,
            "{stats:?}"
        );
        assert_eq!(
            stats.dropped_loss_datagrams + stats.forwarded_datagrams,
            count
        );
        received
    }

    #[test]
    fn relay_loss_half_drops_about_half_reproducibly() {
        let seed = seed::test_seed("relay_loss_half");
        let count = 1000;
        let received = lossy_run(seed, 0.5, count);
        eprintln!("loss 0.5: {} of {count} delivered", received.len());
        // Binomial(1000, 0.5) has a standard deviation of 15.8: ±100 is 6.3 of them.
        assert!(
            (400..=600).contains(&received.len()),
            "{} of {count} delivered (seed {seed})",
            received.len()
        );
        assert!(received.windows(2).all(|pair| pair[0] < pair[1]));
        // The same seed drops the same datagrams.
        assert_eq!(lossy_run(seed, 0.5, count), received, "seed {seed}");
    }

    #[test]
    fn relay_cut_a_to_b_keeps_b_to_a_and_restore_resumes() {
        let (a, b, relay) = setup(seed::test_seed("relay_cut"));
        let quiet = Duration::from_millis(100);
        relay.a_to_b().cut();
        for sequence in 0..10 {
            a.send(relay.addr_for_a(), &sequence_payload(sequence, 100));
            b.send(relay.addr_for_b(), &sequence_payload(sequence, 100));
        }
        assert_eq!(b.receive_all(relay.addr_for_b(), quiet).len(), 0);
        assert_eq!(a.receive_all(relay.addr_for_a(), quiet).len(), 10);
        assert_eq!(settled_stats(&relay.a_to_b(), 10).dropped_cut_datagrams, 10);
        assert_eq!(settled_stats(&relay.b_to_a(), 10).forwarded_datagrams, 10);

        relay.a_to_b().restore();
        for sequence in 0..10 {
            a.send(relay.addr_for_a(), &sequence_payload(sequence, 100));
        }
        assert_eq!(b.receive_all(relay.addr_for_b(), quiet).len(), 10);
        assert_eq!(settled_stats(&relay.a_to_b(), 20).forwarded_datagrams, 10);

        // A cut also loses what is already on the wire (held by the delay).
        relay.both().set_delay(Duration::from_millis(200));
        for sequence in 0..5 {
            a.send(relay.addr_for_a(), &sequence_payload(sequence, 100));
            b.send(relay.addr_for_b(), &sequence_payload(sequence, 100));
        }
        let held_deadline = Instant::now() + WAIT_MAX;
        while relay.both().stats().held_datagrams < 10 {
            assert!(Instant::now() < held_deadline, "{:?}", relay.both().stats());
            std::thread::sleep(Duration::from_millis(1));
        }
        relay.both().cut();
        assert_eq!(
            b.receive_all(relay.addr_for_b(), Duration::from_millis(400))
                .len(),
            0
        );
        assert_eq!(a.receive_all(relay.addr_for_a(), quiet).len(), 0);
        assert_eq!(settled_stats(&relay.a_to_b(), 25).dropped_cut_datagrams, 15);
        assert_eq!(settled_stats(&relay.b_to_a(), 15).dropped_cut_datagrams, 5);

        relay.both().restore().set_delay(Duration::ZERO);
        b.send(relay.addr_for_b(), b"after");
        assert_eq!(
            a.receive_all(relay.addr_for_a(), quiet),
            vec![b"after".to_vec()]
        );
    }

    #[test]
    fn relay_rate_cap_1mb_per_s_limits_throughput() {
        let (a, b, relay) = setup(seed::test_seed("relay_rate_cap"));
        let rate_bytes_per_second = 1_000_000u64;
        relay
            .a_to_b()
            .set_rate(Some(rate_bytes_per_second))
            .set_rate_burst(Duration::from_millis(10))
            .set_queue_delay_max(Duration::from_millis(100));
        let datagram_bytes = 1000usize;
        let send_duration = Duration::from_millis(1500);
        let target = relay.addr_for_a();
        let sender_socket = a.socket.try_clone().expect("clone socket");
        // Offer twice the cap: 20 datagrams every 10 ms.
        let sender = std::thread::spawn(move || {
            let started_at = Instant::now();
            let mut sent = 0u64;
            let mut tick = 0u32;
            while started_at.elapsed() < send_duration {
                for _ in 0..20 {
                    sender_socket
                        .send_to(&sequence_payload(sent, datagram_bytes), target)
                        .expect("send");
                    sent += 1;
                }
                tick += 1;
                let next = started_at + Duration::from_millis(10) * tick;
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            sent
        });
        let mut arrivals = Vec::new();
        let deadline = Instant::now() + WAIT_MAX;
        while let Some((payload, _)) = b.receive(Duration::from_millis(300)) {
            arrivals.push((Instant::now(), payload.len() as u64));
            assert!(Instant::now() < deadline);
        }
        let sent = sender.join().expect("sender");
        let stats = settled_stats(&relay.a_to_b(), sent);
        let first_at = arrivals.first().expect("something arrived").0;
        let window = Duration::from_secs(1);
        let window_bytes: u64 = arrivals
            .iter()
            .filter(|(at, _)| *at < first_at + window)
            .map(|(_, bytes)| bytes)
            .sum();
        eprintln!("rate cap 1 MB/s: {window_bytes} bytes in the first second; {stats:?}");
        let low = rate_bytes_per_second * 8 / 10;
        let high = rate_bytes_per_second * 12 / 10;
        assert!(
            (low..=high).contains(&window_bytes),
            "{window_bytes} bytes/s is not within ±20% of {rate_bytes_per_second}"
        );
        assert!(
            stats.dropped_queue_datagrams > 0,
            "twice the cap overflows the queue"
        );
        assert_eq!(stats.forwarded_datagrams, arrivals.len() as u64);
    }

    #[test]
    fn relay_jitter_reorders_only_when_allowed() {
        let (a, b, relay) = setup(seed::test_seed("relay_jitter"));
        let quiet = Duration::from_millis(100);
        relay
            .a_to_b()
            .set_delay(Duration::from_millis(1))
            .set_jitter(Duration::from_millis(3));
        for reorder in [false, true] {
            relay.a_to_b().set_reorder(reorder);
            let mut sent_at = Vec::new();
            for sequence in 0..200 {
                sent_at.push(Instant::now());
                a.send(relay.addr_for_a(), &sequence_payload(sequence, 100));
                std::thread::sleep(Duration::from_micros(100));
            }
            let mut received = Vec::new();
            let deadline = Instant::now() + WAIT_MAX;
            while let Some((payload, _)) = b.receive(quiet) {
                let sequence = sequence_of(&payload);
                let one_way = sent_at[sequence as usize].elapsed();
                assert!(one_way >= Duration::from_millis(1), "{one_way:?}");
                received.push(sequence);
                assert!(Instant::now() < deadline);
            }
            assert_eq!(received.len(), 200);
            let in_order = received.windows(2).all(|pair| pair[0] < pair[1]);
            // 200 datagrams 0.1 ms apart with 3 ms of jitter: staying in order by chance is
            // astronomically unlikely.
            assert_eq!(in_order, !reorder, "reorder {reorder}: {received:?}");
        }
    }

    #[test]
    fn relay_drop_stops_its_thread_promptly_and_frees_its_sockets() {
        let (a, _b, relay) = setup(seed::test_seed("relay_drop"));
        // Datagrams held for a long time must not delay the stop.
        relay.a_to_b().set_delay(Duration::from_secs(60));
        for sequence in 0..100 {
            a.send(relay.addr_for_a(), &sequence_payload(sequence, 1000));
        }
        let deadline = Instant::now() + WAIT_MAX;
        while relay.a_to_b().stats().held_datagrams < 100 {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(1));
        }
        let addresses = [relay.addr_for_a(), relay.addr_for_b()];
        let started_at = Instant::now();
        drop(relay);
        let stop_duration = started_at.elapsed();
        assert!(
            stop_duration < Duration::from_millis(100),
            "drop took {stop_duration:?}"
        );
        // The thread owned the sockets: once joined, their ports are free again.
        for address in addresses {
            UdpSocket::bind(address).expect("the relay's port is free after drop");
        }
    }

    #[test]
    fn relay_delay_does_not_serialize_a_burst() {
        let (a, b, relay) = setup(seed::test_seed("relay_delay_burst"));
        let delay = Duration::from_millis(5);
        relay.a_to_b().set_delay(delay);
        let count = 500u64;
        let mut sent_at = Vec::new();
        for sequence in 0..count {
            sent_at.push(Instant::now());
            a.send(relay.addr_for_a(), &sequence_payload(sequence, 1200));
        }
        let mut one_way = Vec::new();
        for expected in 0..count {
            let (payload, _) = b.receive(WAIT_MAX).expect("forwarded");
            one_way.push(sent_at[expected as usize].elapsed());
            assert_eq!(sequence_of(&payload), expected, "a burst stays in order");
        }
        let minimum = *one_way.iter().min().expect("one way");
        let maximum = *one_way.iter().max().expect("one way");
        let median_one_way = median(one_way);
        eprintln!(
            "burst of {count} at 5 ms: one way min {minimum:?}, median {median_one_way:?}, \
             max {maximum:?}"
        );
        assert!(minimum >= delay, "min {minimum:?}");
        // Each datagram waits its own 5 ms: the burst arrives spread over about as long as it
        // took to send (plus a few microseconds per datagram for the relay to send it, plus
        // scheduling noise when other tests load the CPUs). Serializing each datagram's delay
        // behind the one before would spread it over 500 × 5 ms = 2.5 s.
        let spread = maximum - minimum;
        assert!(spread < Duration::from_millis(25), "spread {spread:?}");
        assert!(
            maximum < delay + Duration::from_millis(100),
            "max {maximum:?}"
        );
        assert_eq!(
            settled_stats(&relay.a_to_b(), count).forwarded_datagrams,
            count
        );
    }

    #[test]
    fn relay_link_handles_set_read_and_clear_conditions() {
        let seed = seed::test_seed("relay_link_handles");
        let (_a, _b, relay) = setup(seed);
        assert_eq!(relay.seed(), seed);
        let impaired = Conditions {
            delay: Duration::from_millis(3),
            jitter_max: Duration::from_millis(1),
            reorder: true,
            loss_probability: 0.25,
            rate_bytes_per_second: Some(10_000_000),
            rate_burst: Duration::from_millis(2),
            queue_delay_max: Duration::from_millis(20),
            cut: true,
        };
        relay.direction(Direction::BToA).set(impaired.clone());
        assert_eq!(relay.b_to_a().conditions(), impaired);
        assert_eq!(relay.a_to_b().conditions(), Conditions::default());
        relay.both().set_loss(0.5);
        assert_eq!(relay.a_to_b().conditions().loss_probability, 0.5);
        assert_eq!(relay.b_to_a().conditions().delay, Duration::from_millis(3));
        relay.both().clear();
        for direction in [Direction::AToB, Direction::BToA] {
            assert_eq!(
                relay.direction(direction).conditions(),
                Conditions::default()
            );
        }
    }
}
