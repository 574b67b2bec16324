//! The replication transport: one quinn endpoint on `[node] listen` (UDP), mutual TLS from
//! [`crate::replication::tls`], and exactly one live connection per peer node, carrying one bidirectional
//! stream per volume. The replication framing on those streams belongs to
//! `ferry_protocol::repl`; this module only carries bytes.
//!
//! Connection management. Both nodes dial each other (so either side can restore a lost
//! connection) and both accept. A connection is *offered* to the peer table once it is usable:
//! on the accepting side when the handshake (including the client certificate check) is done,
//! on the dialing side when the acceptor's one-byte welcome arrives — a QUIC client considers
//! the handshake complete before the server has checked the client certificate, so without the
//! welcome a refused client would briefly believe it was connected. When two connections to the
//! same peer meet, [`keep_new_connection`] decides, identically on both nodes, which survives:
//! the one initiated by the node with the lexicographically smaller name, unless the other one
//! is so much newer that it must come from a peer that lost (restarted) the old one.
//!
//! Events (connected, disconnected, refused) go to one bounded channel; state changes and their
//! events are serialised so the daemon sees them in the order they happened.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use quinn::{Connection, ConnectionError, Endpoint, RecvStream, SendStream, VarInt};
use rand::RngExt;
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::task::JoinHandle;

use crate::config::PeerConfig;
use crate::replication::tls::{self, AuthRefusal, RefusedBy, TlsError, TlsIdentity};

/// UDP socket buffers asked of the kernel. The default (rmem_default ≈ 208 KiB) drops packets
/// when a bulk resync fills a long fat pipe (1 Gbit/s × 40 ms ≈ 5 MB in flight).
pub const UDP_SOCKET_BUFFER_BYTES: usize = 4 * 1024 * 1024;
/// Per-stream receive window: one volume's writes in flight must never wait for window credit
/// on a metro link (DESIGN-NOTES "QUIC over a WAN").
pub const STREAM_RECEIVE_WINDOW_BYTES: u32 = 16 * 1024 * 1024;
/// Whole-connection receive (and send) window, shared by all volumes of a peer.
pub const CONNECTION_RECEIVE_WINDOW_BYTES: u32 = 64 * 1024 * 1024;
/// One bidirectional stream per volume; quinn's default of 100 would cap volumes per peer.
pub const VOLUME_STREAMS_MAX: u32 = 1024;
/// Longest volume name accepted in a stream preamble.
pub const VOLUME_NAME_LENGTH_MAX: usize = 255;
/// How long `accept_volume_stream` waits for the preamble after the stream appears.
pub const PREAMBLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest UDP payload MTU discovery tries: a 9000-byte jumbo frame minus IPv6 and UDP headers.
pub const MTU_DISCOVERY_UPPER_BOUND: u16 = 8952;
/// Ack-eliciting packets a peer may receive before it must send a QUIC ACK (the ACK
/// frequency extension, which every quinn endpoint supports); quinn's default is 1, an ACK for
/// every other packet. Each ACK-only datagram is a send on one side and a wake-up on the other,
/// which on a small virtual machine cost more than the data. With 4 (and [`ACK_DELAY_MAX`]), a
/// regional primary shipping 6.25 MB/s took 8.4 instead of 10.4 context switches and 253
/// instead of 301 µs of CPU per client write (standalone: 6.6 and 134). 10 saved a little more
/// (7.6 and 242) but made batches over a lossy WAN slower: at 0.5 % loss, 5.1–5.3 s instead of
/// 4.7–4.9 s at the median, where 4 stayed at 4.8–4.9 s (benches/README.md, "Fewer QUIC ACKs").
/// A reordered packet is still acknowledged at once (quinn's reordering threshold).
pub const ACK_ELICITING_THRESHOLD: u32 = 4;
/// Longest a peer may hold an ACK back when fewer than [`ACK_ELICITING_THRESHOLD`] packets
/// arrived (quinn's default is the peer's `max_ack_delay`, 25 ms): the tail of a small flight
/// is not left waiting, and the sender's probe timeout, which adds this bound, stays short.
pub const ACK_DELAY_MAX: Duration = Duration::from_millis(5);
/// Longest wait at shutdown for the peers to acknowledge the close.
const SHUTDOWN_WAIT_MAX: Duration = Duration::from_millis(500);
/// How often a pending dial checks whether the peer's own dial got through first.
const DIAL_SUPERSEDED_CHECK: Duration = Duration::from_millis(50);
/// Smallest `peer_timeout` accepted: keep-alives go out every third of it.
pub const PEER_TIMEOUT_MIN: Duration = Duration::from_millis(30);

/// Application close code: the connection lost the duplicate resolution.
pub const CLOSE_DUPLICATE: u32 = 1;
/// Application close code: this node is shutting down.
pub const CLOSE_SHUTDOWN: u32 = 0;

/// The byte the accepting side sends on a fresh unidirectional stream once it keeps a
/// connection (see the module docs).
const WELCOME: u8 = 1;
/// Bound on handshakes in progress, so a flood of Initial packets cannot grow tasks without
/// limit; beyond it new connection attempts are refused (the peer retries).
const HANDSHAKES_IN_FLIGHT_MAX: usize = 64;
/// Events not yet taken by the daemon; connection events wait for room, refusals are dropped
/// when it is full (they are still counted and logged).
const EVENT_QUEUE_CAPACITY: usize = 256;
/// Two connections established within this interval of each other are a simultaneous dial;
/// a later one from the peer means the peer lost the old one.
const DUPLICATE_RACE_WINDOW: Duration = Duration::from_secs(2);
const DIAL_BACKOFF_MIN: Duration = Duration::from_millis(100);
const DIAL_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Refusals are logged at most once per source per this interval.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// Sources remembered for the refusal log rate limit.
const REFUSAL_LOG_SOURCES_MAX: usize = 1024;
/// Counter label for refusals from addresses that are not a configured peer's.
pub const UNKNOWN_PEER_LABEL: &str = "unknown";

/// Everything that can go wrong binding the transport or using volume streams.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Binding the UDP socket failed.
    #[error(
        "cannot bind UDP {addr} ([node] listen): {source}; is another ferry running there, \
         or is the address not one of this host's?"
    )]
    Bind { addr: SocketAddr, source: io::Error },
    /// Setting a socket option failed.
    #[error("cannot set {option} on the UDP socket: {source}")]
    SocketOption {
        option: &'static str,
        source: io::Error,
    },
    /// `bind` was called outside a tokio runtime.
    #[error("the transport must be started inside a tokio runtime")]
    NoRuntime,
    /// `peer_timeout` cannot drive keep-alives and idle timeouts.
    #[error("peer_timeout {peer_timeout:?} is out of range: use at least 30ms (default 5s)")]
    PeerTimeout { peer_timeout: Duration },
    /// Two `[[peers]]` entries share a name.
    #[error("peer `{name}` is listed twice under [[peers]]; keep one")]
    DuplicatePeer { name: String },
    /// Building the TLS configuration failed.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Starting the quinn endpoint failed.
    #[error("cannot start the QUIC endpoint: {0}")]
    Endpoint(io::Error),
    /// A volume name that cannot go in a stream preamble.
    #[error("volume name {name:?} cannot be sent to a peer: {why}")]
    VolumeName { name: String, why: &'static str },
    /// The connection failed while opening or accepting a stream.
    #[error("peer connection lost: {0}")]
    Connection(#[from] ConnectionError),
    /// Writing the preamble failed.
    #[error("cannot write the volume stream preamble: {0}")]
    Write(#[from] quinn::WriteError),
    /// Reading the preamble failed.
    #[error("cannot read the volume stream preamble: {0}")]
    Read(#[from] quinn::ReadExactError),
    /// The peer opened a stream and sent no preamble in time.
    #[error("the peer opened a volume stream but sent no volume name within {0:?}")]
    PreambleTimeout(Duration),
}

/// Who a refusal concerns: a configured peer we dialed, or the address of an incoming attempt
/// (whose certificate we could not accept, so its name is not trusted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerOrAddr {
    Peer(String),
    Addr(SocketAddr),
}

impl fmt::Display for PeerOrAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerOrAddr::Peer(name) => write!(f, "peer `{name}`"),
            PeerOrAddr::Addr(addr) => write!(f, "{addr}"),
        }
    }
}

/// What the transport tells the daemon.
#[derive(Debug)]
pub enum TransportEvent {
    /// `connection` is now *the* connection to `peer`. A second `PeerConnected` for a peer
    /// without a `PeerDisconnected` in between replaces the earlier connection (it lost a
    /// duplicate resolution and is being closed).
    PeerConnected {
        peer: String,
        connection: Connection,
    },
    /// The connection to `peer` is gone (idle timeout after `peer_timeout`, closed, reset).
    /// The transport keeps redialing on its own.
    PeerDisconnected {
        peer: String,
        reason: ConnectionError,
    },
    /// A handshake was refused by us or by the peer.
    AuthRefused {
        peer_or_addr: PeerOrAddr,
        reason: AuthRefusal,
    },
}

/// The QUIC endpoint and its per-peer connections. Dropping it closes every connection
/// ([`CLOSE_SHUTDOWN`]) and stops its tasks; [`Transport::shutdown`] also waits until the
/// peers have been told.
pub struct Transport {
    shared: Arc<Shared>,
    events: Option<mpsc::Receiver<TransportEvent>>,
    tasks: Vec<JoinHandle<()>>,
}

struct Shared {
    node_name: String,
    endpoint: Endpoint,
    peers: Vec<PeerConfig>,
    peer_names: Vec<String>,
    peer_timeout: Duration,
    client_configs: HashMap<String, quinn::ClientConfig>,
    slots: Mutex<HashMap<String, PeerSlot>>,
    /// Held across "change the peer table, then send its event" so events keep that order.
    event_order: tokio::sync::Mutex<()>,
    events: mpsc::Sender<TransportEvent>,
    refusals: Mutex<RefusalBook>,
    handshakes: Arc<Semaphore>,
}

struct PeerSlot {
    current: Option<CurrentConnection>,
    /// Woken when `current` is cleared, so the dialer starts at once.
    lost: Arc<Notify>,
}

struct CurrentConnection {
    connection: Connection,
    initiated_by_us: bool,
    established_at: Instant,
}

#[derive(Default)]
struct RefusalBook {
    counts: BTreeMap<String, u64>,
    last_logged: HashMap<String, Instant>,
}

impl Transport {
    /// Binds `listen` (UDP), and starts accepting and dialing `peers`. Must run inside a
    /// tokio runtime.
    pub fn bind(
        listen: SocketAddr,
        identity: &TlsIdentity,
        peers: Vec<PeerConfig>,
        peer_timeout: Duration,
    ) -> Result<Transport, TransportError> {
        if peer_timeout < PEER_TIMEOUT_MIN {
            return Err(TransportError::PeerTimeout { peer_timeout });
        }
        let idle_timeout = quinn::IdleTimeout::try_from(peer_timeout)
            .map_err(|_| TransportError::PeerTimeout { peer_timeout })?;
        let mut peer_names: Vec<String> = Vec::new();
        for peer in &peers {
            if peer_names.contains(&peer.name) {
                return Err(TransportError::DuplicatePeer {
                    name: peer.name.clone(),
                });
            }
            peer_names.push(peer.name.clone());
        }
        let runtime = quinn::default_runtime().ok_or(TransportError::NoRuntime)?;

        let transport_config = Arc::new(transport_config(idle_timeout, peer_timeout));

        let mut server_config = tls::server_config(identity, peer_names.clone())?;
        server_config.transport_config(transport_config.clone());
        let mut client_configs = HashMap::new();
        for peer in &peers {
            let mut client_config = tls::client_config(identity, &peer.name)?;
            client_config.transport_config(transport_config.clone());
            client_configs.insert(peer.name.clone(), client_config);
        }

        let socket = bind_udp(listen)?;
        let endpoint = Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server_config),
            socket,
            runtime,
        )
        .map_err(TransportError::Endpoint)?;

        let (events_sender, events_receiver) = mpsc::channel(EVENT_QUEUE_CAPACITY);
        let slots = peers
            .iter()
            .map(|peer| {
                (
                    peer.name.clone(),
                    PeerSlot {
                        current: None,
                        lost: Arc::new(Notify::new()),
                    },
                )
            })
            .collect();
        let shared = Arc::new(Shared {
            node_name: identity.node_name().to_string(),
            endpoint,
            peers: peers.clone(),
            peer_names,
            peer_timeout,
            client_configs,
            slots: Mutex::new(slots),
            event_order: tokio::sync::Mutex::new(()),
            events: events_sender,
            refusals: Mutex::new(RefusalBook::default()),
            handshakes: Arc::new(Semaphore::new(HANDSHAKES_IN_FLIGHT_MAX)),
        });
        let mut tasks = vec![tokio::spawn(accept_loop(shared.clone()))];
        for peer in peers {
            tasks.push(tokio::spawn(dial_loop(shared.clone(), peer)));
        }
        Ok(Transport {
            shared,
            events: Some(events_receiver),
            tasks,
        })
    }

    /// The event stream; `None` after the first call (there is one consumer, the daemon).
    pub fn events(&mut self) -> Option<mpsc::Receiver<TransportEvent>> {
        self.events.take()
    }

    /// The live connection to `peer`, if any.
    pub fn connection(&self, peer: &str) -> Option<Connection> {
        self.shared.connection(peer)
    }

    /// The UDP address actually bound (useful with port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.shared.endpoint.local_addr()
    }

    /// Handshakes this node refused, by counter label: the configured peer name (dialed by
    /// name, or matched by source address) or [`UNKNOWN_PEER_LABEL`]. The label set is bounded
    /// by `[[peers]]`, as a Prometheus label must be. Feeds `ferry_peer_auth_failures_total`.
    pub fn auth_failures(&self) -> BTreeMap<String, u64> {
        lock(&self.shared.refusals).counts.clone()
    }

    /// Sum of [`Transport::auth_failures`].
    pub fn auth_failures_total(&self) -> u64 {
        lock(&self.shared.refusals).counts.values().sum()
    }

    /// Closes every connection with [`CLOSE_SHUTDOWN`] and waits (at most `peer_timeout`, and
    /// at most [`SHUTDOWN_WAIT_MAX`]) for the peers to be told.
    pub async fn shutdown(&self) {
        self.shared
            .endpoint
            .close(VarInt::from_u32(CLOSE_SHUTDOWN), b"node shutting down");
        // A dead peer never acknowledges the close: do not wait for it longer than this.
        let wait = self.shared.peer_timeout.min(SHUTDOWN_WAIT_MAX);
        let _ = tokio::time::timeout(wait, self.shared.endpoint.wait_idle()).await;
    }
}

impl Drop for Transport {
    fn drop(&mut self) {
        // Closing the endpoint ends every connection, which ends the per-connection tasks
        // (they hold the endpoint alive through `Shared`); the long-lived loops are aborted.
        self.shared
            .endpoint
            .close(VarInt::from_u32(CLOSE_SHUTDOWN), b"node shutting down");
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Opens the stream for `volume_name` on a peer connection and sends its preamble: one byte of
/// length, then the UTF-8 name.
pub async fn open_volume_stream(
    connection: &Connection,
    volume_name: &str,
) -> Result<(SendStream, RecvStream), TransportError> {
    check_volume_name(volume_name.as_bytes()).map_err(|why| TransportError::VolumeName {
        name: volume_name.to_string(),
        why,
    })?;
    let (mut send, recv) = connection.open_bi().await?;
    // Checked above: 1..=255 bytes, so the length fits the byte.
    let mut preamble = Vec::with_capacity(1 + volume_name.len());
    preamble.push(u8::try_from(volume_name.len()).expect("checked above: at most 255 bytes"));
    preamble.extend_from_slice(volume_name.as_bytes());
    send.write_all(&preamble).await?;
    Ok((send, recv))
}

/// Accepts the next volume stream the peer opens and reads its preamble (at most
/// [`PREAMBLE_TIMEOUT`]); returns the volume name, validated, and the two halves.
pub async fn accept_volume_stream(
    connection: &Connection,
) -> Result<(String, SendStream, RecvStream), TransportError> {
    let (send, mut recv) = connection.accept_bi().await?;
    let read_name = async {
        let mut length = [0u8; 1];
        recv.read_exact(&mut length).await?;
        let mut name = vec![0u8; usize::from(length[0])];
        recv.read_exact(&mut name).await?;
        Ok::<_, TransportError>(name)
    };
    let name = tokio::time::timeout(PREAMBLE_TIMEOUT, read_name)
        .await
        .map_err(|_| TransportError::PreambleTimeout(PREAMBLE_TIMEOUT))??;
    if let Err(why) = check_volume_name(&name) {
        let _ = recv.stop(VarInt::from_u32(0));
        return Err(TransportError::VolumeName {
            name: String::from_utf8_lossy(&name).into_owned(),
            why,
        });
    }
    // check_volume_name accepted it, so it is ASCII.
    let name = String::from_utf8_lossy(&name).into_owned();
    Ok((name, send, recv))
}

/// Same rule as config volume names: ASCII letters, digits, `.`, `_`, `-`; 1..=255 bytes.
fn check_volume_name(name: &[u8]) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("it is empty");
    }
    if name.len() > VOLUME_NAME_LENGTH_MAX {
        return Err("it is longer than 255 bytes");
    }
    if !name
        .iter()
        .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'))
    {
        return Err("only letters, digits, `.`, `_` and `-` are allowed");
    }
    Ok(())
}

/// Decides, the same way on both nodes, whether a newly established connection to `peer`
/// replaces the current one.
///
/// `current` is `(initiated_by_us, age)` of the live connection, if any. The connection
/// initiated by the node with the smaller name is preferred; a non-preferred one only wins
/// against nothing, against another non-preferred one, or against a preferred one older than
/// the race window (the peer dialed again, so it has lost that old connection — typically it
/// restarted, and we would otherwise hold a dead connection until the idle timeout).
pub fn keep_new_connection(
    node_name: &str,
    peer: &str,
    current: Option<(bool, Duration)>,
    new_initiated_by_us: bool,
) -> bool {
    let we_are_preferred_initiator = node_name < peer;
    let Some((current_initiated_by_us, current_age)) = current else {
        return true;
    };
    if new_initiated_by_us == we_are_preferred_initiator {
        return true;
    }
    let current_is_preferred = current_initiated_by_us == we_are_preferred_initiator;
    !(current_is_preferred && current_age < DUPLICATE_RACE_WINDOW)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind (no invariant spans
    // the critical sections), so a poisoned lock is still safe to use.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A UDP socket on `listen` with the buffers a long fat pipe needs (public for the congestion
/// benchmark).
pub fn bind_udp(listen: SocketAddr) -> Result<UdpSocket, TransportError> {
    let socket = UdpSocket::bind(listen).map_err(|source| TransportError::Bind {
        addr: listen,
        source,
    })?;
    for (option, force, plain) in [
        ("SO_RCVBUF", libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        ("SO_SNDBUF", libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        // The FORCE variant ignores net.core.[rw]mem_max but needs CAP_NET_ADMIN; without it,
        // the plain option is capped by the sysctl, which we report below.
        if set_socket_option(&socket, force, UDP_SOCKET_BUFFER_BYTES).is_err() {
            set_socket_option(&socket, plain, UDP_SOCKET_BUFFER_BYTES)
                .map_err(|source| TransportError::SocketOption { option, source })?;
        }
        // Linux reports twice the requested size (it counts its bookkeeping).
        match get_socket_option(&socket, plain) {
            Ok(actual) if actual < UDP_SOCKET_BUFFER_BYTES => tracing::warn!(
                "UDP {option} is {actual} bytes, less than the {UDP_SOCKET_BUFFER_BYTES} asked \
                 for; raise net.core.rmem_max and net.core.wmem_max so bulk resync does not \
                 drop packets"
            ),
            _ => {}
        }
    }
    socket
        .set_nonblocking(true)
        .map_err(|source| TransportError::SocketOption {
            option: "O_NONBLOCK",
            source,
        })?;
    Ok(socket)
}

fn set_socket_option(socket: &UdpSocket, option: libc::c_int, bytes: usize) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: the fd is a live socket owned by `socket`; `value` outlives the call and the
    // length passed is exactly its size.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&value as *const libc::c_int).cast(),
            SOCKLEN_C_INT,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The length of a `c_int` socket option, as setsockopt(2) takes it.
#[allow(clippy::cast_possible_truncation)] // 4 bytes
const SOCKLEN_C_INT: libc::socklen_t = std::mem::size_of::<libc::c_int>() as libc::socklen_t;

fn get_socket_option(socket: &UdpSocket, option: libc::c_int) -> io::Result<usize> {
    let mut value: libc::c_int = 0;
    let mut length = SOCKLEN_C_INT;
    // SAFETY: the fd is a live socket; `value` and `length` are valid for writes and `length`
    // holds the size of `value`.
    let result = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&mut value as *mut libc::c_int).cast(),
            &mut length,
        )
    };
    if result == 0 {
        Ok(usize::try_from(value).unwrap_or(0))
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Shared {
    fn connection(&self, peer: &str) -> Option<Connection> {
        let slots = lock(&self.slots);
        let current = slots.get(peer)?.current.as_ref()?;
        current
            .connection
            .close_reason()
            .is_none()
            .then(|| current.connection.clone())
    }

    fn lost_notify(&self, peer: &str) -> Option<Arc<Notify>> {
        lock(&self.slots).get(peer).map(|slot| slot.lost.clone())
    }

    /// Offers an established connection to the peer table. On keep, tells the daemon
    /// (`PeerConnected`) and returns true; the caller then runs [`Shared::watch`]. On lose,
    /// closes the connection as a duplicate.
    async fn install(&self, peer: &str, connection: &Connection, initiated_by_us: bool) -> bool {
        let order = self.event_order.lock().await;
        let kept = {
            let mut slots = lock(&self.slots);
            let Some(slot) = slots.get_mut(peer) else {
                return false;
            };
            let current = slot
                .current
                .as_ref()
                .filter(|current| current.connection.close_reason().is_none())
                .map(|current| (current.initiated_by_us, current.established_at.elapsed()));
            if keep_new_connection(&self.node_name, peer, current, initiated_by_us) {
                let replaced = slot.current.replace(CurrentConnection {
                    connection: connection.clone(),
                    initiated_by_us,
                    established_at: Instant::now(),
                });
                if let Some(replaced) = replaced {
                    replaced.connection.close(
                        VarInt::from_u32(CLOSE_DUPLICATE),
                        b"replaced by a newer connection",
                    );
                }
                true
            } else {
                false
            }
        };
        if !kept {
            drop(order);
            tracing::debug!(peer, "closing a duplicate connection");
            connection.close(VarInt::from_u32(CLOSE_DUPLICATE), b"duplicate connection");
            return false;
        }
        tracing::info!(peer, remote = %connection.remote_address(), "peer connected");
        let _ = self
            .events
            .send(TransportEvent::PeerConnected {
                peer: peer.to_string(),
                connection: connection.clone(),
            })
            .await;
        drop(order);
        true
    }

    /// Waits for an installed connection to close; if it was still the peer's connection,
    /// clears it, wakes the dialer and tells the daemon (`PeerDisconnected`).
    async fn watch(&self, peer: String, connection: Connection) {
        let reason = connection.closed().await;
        let order = self.event_order.lock().await;
        let was_current = {
            let mut slots = lock(&self.slots);
            match slots.get_mut(&peer) {
                Some(slot)
                    if slot.current.as_ref().map(|c| c.connection.stable_id())
                        == Some(connection.stable_id()) =>
                {
                    slot.current = None;
                    slot.lost.notify_waiters();
                    true
                }
                _ => false,
            }
        };
        if was_current {
            tracing::info!(peer, %reason, "peer disconnected");
            let _ = self
                .events
                .send(TransportEvent::PeerDisconnected { peer, reason })
                .await;
        }
        drop(order);
    }

    /// Counts (when we refused), logs (rate-limited per source) and reports a refusal.
    fn refused(&self, who: PeerOrAddr, refusal: AuthRefusal) {
        let (label, log_key) = match &who {
            PeerOrAddr::Peer(name) => (name.clone(), name.clone()),
            PeerOrAddr::Addr(addr) => (
                self.peer_for_address(*addr)
                    .unwrap_or(UNKNOWN_PEER_LABEL)
                    .to_string(),
                addr.ip().to_string(),
            ),
        };
        let should_log = {
            let mut book = lock(&self.refusals);
            if refusal.by == RefusedBy::Us {
                *book.counts.entry(label).or_insert(0) += 1;
            }
            let now = Instant::now();
            if book.last_logged.len() >= REFUSAL_LOG_SOURCES_MAX {
                book.last_logged
                    .retain(|_, at| now.duration_since(*at) < REFUSAL_LOG_INTERVAL);
            }
            match book.last_logged.get(&log_key) {
                Some(at) if now.duration_since(*at) < REFUSAL_LOG_INTERVAL => false,
                // Still full after pruning: thousands of sources a minute; skip the log line,
                // the counter still moves.
                None if book.last_logged.len() >= REFUSAL_LOG_SOURCES_MAX => false,
                _ => {
                    book.last_logged.insert(log_key, now);
                    true
                }
            }
        };
        if should_log {
            tracing::warn!("TLS handshake with {who} refused: {refusal} (logged once a minute)");
        }
        // A full queue drops the event, not the count: refusals may come in floods.
        let _ = self.events.try_send(TransportEvent::AuthRefused {
            peer_or_addr: who,
            reason: refusal,
        });
    }

    /// The configured peer whose `address` is exactly `addr`, for counter labels only (an
    /// address is not an identity). Peers dial from their listen socket, so without NAT the
    /// source address of their attempts is their configured address. Matching by IP alone
    /// would misattribute when several nodes share a host (the demo, tests).
    fn peer_for_address(&self, addr: SocketAddr) -> Option<&str> {
        let canonical = |addr: SocketAddr| (addr.ip().to_canonical(), addr.port());
        self.peers
            .iter()
            .find(|peer| canonical(peer.address) == canonical(addr))
            .map(|peer| peer.name.as_str())
    }
}

async fn accept_loop(shared: Arc<Shared>) {
    while let Some(incoming) = shared.endpoint.accept().await {
        let Ok(permit) = shared.handshakes.clone().try_acquire_owned() else {
            incoming.refuse();
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let connection = match incoming.accept() {
                Ok(connecting) => connecting.await,
                Err(error) => Err(error),
            };
            drop(permit);
            let connection = match connection {
                Ok(connection) => connection,
                Err(error) => {
                    match AuthRefusal::from_connection_error(&error) {
                        Some(refusal) => shared.refused(PeerOrAddr::Addr(remote), refusal),
                        None => tracing::debug!(%remote, %error, "incoming handshake failed"),
                    }
                    return;
                }
            };
            let Some(peer) = tls::authenticated_peer(&connection, &shared.peer_names) else {
                // The verifier admits only configured peers, so this is unreachable unless the
                // certificate changed meaning between the two checks; refuse rather than guess.
                connection.close(VarInt::from_u32(CLOSE_DUPLICATE), b"unknown peer");
                return;
            };
            if !shared.install(&peer, &connection, false).await {
                return;
            }
            // The welcome tells the dialer that its certificate was accepted and that we kept
            // the connection. If it cannot be sent the connection is closing; watch sees that.
            if let Ok(mut stream) = connection.open_uni().await {
                if stream.write_all(&[WELCOME]).await.is_ok() {
                    let _ = stream.finish();
                }
            }
            shared.watch(peer, connection).await;
        });
    }
}

async fn dial_loop(shared: Arc<Shared>, peer: PeerConfig) {
    let Some(lost) = shared.lost_notify(&peer.name) else {
        return;
    };
    let mut backoff = DIAL_BACKOFF_MIN;
    loop {
        // Wait until there is no live connection; the Notified future is created before the
        // check so a loss between the check and the wait is not missed.
        loop {
            let notified = lost.notified();
            if shared.connection(&peer.name).is_none() {
                break;
            }
            notified.await;
        }
        // A connection the peer dialed may be installed while this dial is still pending
        // (typically: this node dialed before the peer was up, and QUIC retries its first
        // packet a second later). Finishing the dial then would replace a working
        // connection moments after it started carrying replication; give it up instead.
        let peer_dialed_us = async {
            loop {
                tokio::time::sleep(DIAL_SUPERSEDED_CHECK).await;
                if shared.connection(&peer.name).is_some() {
                    return;
                }
            }
        };
        let result = tokio::select! {
            result = dial(&shared, &peer) => result,
            () = peer_dialed_us => continue,
        };
        match result {
            Ok(connection) => {
                backoff = DIAL_BACKOFF_MIN;
                if shared.install(&peer.name, &connection, true).await {
                    let shared = shared.clone();
                    let name = peer.name.clone();
                    tokio::spawn(async move { shared.watch(name, connection).await });
                }
                continue;
            }
            Err(error) => {
                if let Some(refusal) = AuthRefusal::from_connection_error(&error) {
                    shared.refused(PeerOrAddr::Peer(peer.name.clone()), refusal);
                } else {
                    tracing::debug!(peer = peer.name, %error, "dial failed");
                }
            }
        }
        // Exponential, capped, with full jitter so two nodes that lost each other at the same
        // moment do not keep dialing in lockstep.
        let delay = rand::rng().random_range(DIAL_BACKOFF_MIN..=backoff);
        tokio::time::sleep(delay).await;
        backoff =
            (backoff * 2).min(DIAL_BACKOFF_MAX.min(shared.peer_timeout.max(DIAL_BACKOFF_MIN)));
    }
}

/// Dials `peer` and waits for its welcome; the error is the connection's own (so TLS
/// refusals can be classified).
async fn dial(shared: &Shared, peer: &PeerConfig) -> Result<Connection, ConnectionError> {
    let Some(config) = shared.client_configs.get(&peer.name) else {
        return Err(ConnectionError::LocallyClosed);
    };
    let connecting = shared
        .endpoint
        .connect_with(config.clone(), peer.address, &peer.name)
        .map_err(|error| {
            tracing::debug!(peer = peer.name, %error, "cannot start a connection");
            ConnectionError::LocallyClosed
        })?;
    let connection = connecting.await?;
    let welcome = async {
        let mut stream = connection.accept_uni().await?;
        let mut byte = [0u8; 1];
        match stream.read_exact(&mut byte).await {
            Ok(()) if byte[0] == WELCOME => Ok(()),
            // A stream that ends early or carries another byte: not a ferry/1 acceptor.
            _ => Err(connection
                .close_reason()
                .unwrap_or(ConnectionError::LocallyClosed)),
        }
    };
    match tokio::time::timeout(shared.peer_timeout, welcome).await {
        Ok(Ok(())) => Ok(connection),
        Ok(Err(error)) => {
            connection.close(VarInt::from_u32(CLOSE_DUPLICATE), b"no welcome");
            Err(error)
        }
        Err(_) => {
            connection.close(VarInt::from_u32(CLOSE_DUPLICATE), b"no welcome");
            Err(ConnectionError::TimedOut)
        }
    }
}

/// The QUIC transport settings of every peer connection: windows, keep-alives, MTU discovery,
/// ACK frequency ([`ACK_ELICITING_THRESHOLD`]), and quinn's default congestion control, Cubic,
/// on metro and regional links alike. quinn's BBR (marked experimental) kept 86–91 % of a
/// 40 ms, 100 Mbit/s link under 0.1–0.5 % random loss in one run where Cubic keeps 5–10 %, but it does not back off from a full bottleneck
/// queue: behind a 100 Mbit/s cap with a 100 ms queue it had 16–47 % of its datagrams dropped
/// where Cubic had under 5 %, in the regional overload benchmark half of them for 30 s, and
/// its receivers closed the connection (quinn's "too many gaps in stream buffer"; at 0.1 % and
/// 0.5 % loss in another run), which sent the replica into `degraded` nine times in one
/// overload run (benches/README.md, "Congestion control";
/// `cargo bench -p ferry --bench congestion`). A replication link that floods the WAN it
/// shares and drops its own connection is worse than a slow one. Public for that benchmark,
/// which measures exactly these settings.
pub fn transport_config(
    idle_timeout: quinn::IdleTimeout,
    peer_timeout: Duration,
) -> quinn::TransportConfig {
    let mut transport_config = quinn::TransportConfig::default();
    // Three keep-alives per idle period: losing two in a row still does not time out.
    transport_config.keep_alive_interval(Some(peer_timeout / 3));
    transport_config.max_idle_timeout(Some(idle_timeout));
    transport_config.stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW_BYTES));
    transport_config.receive_window(VarInt::from_u32(CONNECTION_RECEIVE_WINDOW_BYTES));
    transport_config.send_window(u64::from(CONNECTION_RECEIVE_WINDOW_BYTES));
    transport_config.max_concurrent_bidi_streams(VarInt::from_u32(VOLUME_STREAMS_MAX));
    // GSO stays on (quinn's default): turning it off cuts loopback throughput fourfold.
    transport_config.enable_segmentation_offload(true);
    // Storage networks between metro sites often run jumbo frames: let MTU discovery find
    // them (quinn probes upwards from 1200 and settles on what the path carries, so a
    // 1500-byte path costs nothing). Fewer, larger packets are most of the per-byte cost.
    let mut mtu_discovery = quinn::MtuDiscoveryConfig::default();
    mtu_discovery.upper_bound(MTU_DISCOVERY_UPPER_BOUND);
    transport_config.mtu_discovery_config(Some(mtu_discovery));
    let mut ack_frequency = quinn::AckFrequencyConfig::default();
    ack_frequency.ack_eliciting_threshold(VarInt::from_u32(ACK_ELICITING_THRESHOLD));
    ack_frequency.max_ack_delay(Some(ACK_DELAY_MAX));
    transport_config.ack_frequency_config(Some(ack_frequency));
    transport_config
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::tls::{cert_init, AuthRefusalKind};
    use std::path::Path;
    use tokio::io::AsyncWriteExt;

    const WAIT: Duration = Duration::from_secs(10);

    fn free_addr() -> SocketAddr {
        // Bind and release: the port is very likely still free a moment later, which is all a
        // test needs to give each node its peers' addresses up front.
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.local_addr().unwrap()
    }

    fn identity(dir: &Path, name: &str) -> TlsIdentity {
        TlsIdentity::load_from_cert_dir(dir, name).unwrap()
    }

    struct Node {
        transport: Transport,
        events: mpsc::Receiver<TransportEvent>,
    }

    fn start(
        dir: &Path,
        name: &str,
        listen: SocketAddr,
        peers: &[(&str, SocketAddr)],
        peer_timeout: Duration,
    ) -> Node {
        let peers = peers
            .iter()
            .map(|(name, address)| PeerConfig {
                name: name.to_string(),
                address: *address,
            })
            .collect();
        let mut transport =
            Transport::bind(listen, &identity(dir, name), peers, peer_timeout).unwrap();
        let events = transport.events().unwrap();
        Node { transport, events }
    }

    async fn wait_for(
        events: &mut mpsc::Receiver<TransportEvent>,
        mut wanted: impl FnMut(&TransportEvent) -> bool,
    ) -> TransportEvent {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let event = tokio::time::timeout_at(deadline, events.recv())
                .await
                .expect("timed out waiting for a transport event")
                .expect("event channel closed");
            if wanted(&event) {
                return event;
            }
        }
    }

    async fn connected(node: &mut Node, peer: &str) -> Connection {
        let event = wait_for(
            &mut node.events,
            |event| matches!(event, TransportEvent::PeerConnected { peer: p, .. } if p == peer),
        )
        .await;
        match event {
            TransportEvent::PeerConnected { connection, .. } => connection,
            _ => unreachable!(),
        }
    }

    /// Waits until both nodes have settled on a connection to each other.
    async fn settled(a: &Node, b: &Node, a_name: &str, b_name: &str) -> (Connection, Connection) {
        let deadline = Instant::now() + WAIT;
        loop {
            if let (Some(ab), Some(ba)) = (
                a.transport.connection(b_name),
                b.transport.connection(a_name),
            ) {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let (Some(ab2), Some(ba2)) = (
                    a.transport.connection(b_name),
                    b.transport.connection(a_name),
                ) else {
                    continue;
                };
                if ab2.stable_id() == ab.stable_id() && ba2.stable_id() == ba.stable_id() {
                    return (ab, ba);
                }
            }
            assert!(
                Instant::now() < deadline,
                "nodes never settled on one connection"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// One round trip on a fresh volume stream opened by `opener`.
    async fn exchange(opener: &Connection, acceptor: &Connection, volume: &str) {
        let (mut send, mut recv) = open_volume_stream(opener, volume).await.unwrap();
        send.write_all(b"ping").await.unwrap();
        let (name, mut their_send, mut their_recv) =
            tokio::time::timeout(WAIT, accept_volume_stream(acceptor))
                .await
                .expect("the stream never arrived on the other connection")
                .unwrap();
        assert_eq!(name, volume);
        let mut ping = [0u8; 4];
        their_recv.read_exact(&mut ping).await.unwrap();
        assert_eq!(&ping, b"ping");
        their_send.write_all(b"pong").await.unwrap();
        their_send.flush().await.unwrap();
        let mut pong = [0u8; 4];
        recv.read_exact(&mut pong).await.unwrap();
        assert_eq!(&pong, b"pong");
    }

    fn cluster(names: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let names: Vec<String> = names.iter().map(|name| name.to_string()).collect();
        cert_init(dir.path(), &names).unwrap();
        dir
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_nodes_connect_and_carry_volume_streams_both_ways() {
        let dir = cluster(&["site-a", "site-b"]);
        let (addr_a, addr_b) = (free_addr(), free_addr());
        let timeout = Duration::from_secs(5);
        let mut a = start(dir.path(), "site-a", addr_a, &[("site-b", addr_b)], timeout);
        let mut b = start(dir.path(), "site-b", addr_b, &[("site-a", addr_a)], timeout);
        connected(&mut a, "site-b").await;
        connected(&mut b, "site-a").await;
        let (ab, ba) = settled(&a, &b, "site-a", "site-b").await;
        exchange(&ab, &ba, "pg-data").await;
        exchange(&ba, &ab, "other.volume_2").await;
        assert_eq!(a.transport.auth_failures_total(), 0);
        assert_eq!(b.transport.auth_failures_total(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_certificate_from_another_ca_is_refused_and_counted() {
        let dir = cluster(&["site-a", "site-b"]);
        // An impostor: its certificate says site-b, but another CA signed it.
        let other = cluster(&["site-b"]);
        let (addr_a, addr_impostor) = (free_addr(), free_addr());
        let timeout = Duration::from_secs(5);
        let mut a = start(
            dir.path(),
            "site-a",
            addr_a,
            &[("site-b", addr_impostor)],
            timeout,
        );
        let mut impostor = start(
            other.path(),
            "site-b",
            addr_impostor,
            &[("site-a", addr_a)],
            timeout,
        );
        let event = wait_for(&mut a.events, |event| {
            matches!(event, TransportEvent::AuthRefused { reason, .. } if reason.by == RefusedBy::Us)
        })
        .await;
        let TransportEvent::AuthRefused { reason, .. } = event else {
            unreachable!()
        };
        assert_eq!(reason.kind, AuthRefusalKind::UnknownCa, "{reason}");
        assert!(a.transport.auth_failures_total() >= 1);
        assert!(
            a.transport
                .auth_failures()
                .get("site-b")
                .copied()
                .unwrap_or(0)
                >= 1
        );
        let event = wait_for(&mut impostor.events, |event| {
            matches!(event, TransportEvent::AuthRefused { .. })
        })
        .await;
        let TransportEvent::AuthRefused { reason, .. } = event else {
            unreachable!()
        };
        assert_eq!(reason.kind, AuthRefusalKind::UnknownCa, "{reason}");
        assert!(a.transport.connection("site-b").is_none());
        assert!(impostor.transport.connection("site-a").is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_valid_certificate_of_a_node_not_in_peers_is_refused() {
        let dir = cluster(&["site-a", "site-b", "site-c"]);
        let (addr_a, addr_b, addr_c) = (free_addr(), free_addr(), free_addr());
        let timeout = Duration::from_secs(5);
        let mut a = start(dir.path(), "site-a", addr_a, &[("site-b", addr_b)], timeout);
        let mut c = start(dir.path(), "site-c", addr_c, &[("site-a", addr_a)], timeout);
        let event = wait_for(&mut a.events, |event| {
            matches!(event, TransportEvent::AuthRefused { .. })
        })
        .await;
        let TransportEvent::AuthRefused {
            peer_or_addr,
            reason,
        } = event
        else {
            unreachable!()
        };
        assert_eq!(peer_or_addr, PeerOrAddr::Addr(addr_c));
        assert_eq!(reason.kind, AuthRefusalKind::NotAPeer, "{reason}");
        assert_eq!(reason.by, RefusedBy::Us);
        assert_eq!(
            a.transport.auth_failures().get(UNKNOWN_PEER_LABEL),
            Some(&1)
        );
        // The dialer learns why, so its replica's last_error can say so.
        let event = wait_for(&mut c.events, |event| {
            matches!(event, TransportEvent::AuthRefused { .. })
        })
        .await;
        let TransportEvent::AuthRefused { reason, .. } = event else {
            unreachable!()
        };
        assert_eq!(reason.kind, AuthRefusalKind::NotAPeer, "{reason}");
        assert_eq!(reason.by, RefusedBy::Peer);
        assert!(c.transport.connection("site-a").is_none());
        // And it never saw a PeerConnected: the welcome did not come.
        while let Ok(event) = c.events.try_recv() {
            assert!(!matches!(event, TransportEvent::PeerConnected { .. }));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn simultaneous_dials_leave_exactly_one_connection() {
        for round in 0..3 {
            let dir = cluster(&["site-a", "site-b"]);
            let (addr_a, addr_b) = (free_addr(), free_addr());
            let timeout = Duration::from_secs(5);
            // Started back to back, both dial at once and each also accepts the other's dial.
            let a = start(dir.path(), "site-a", addr_a, &[("site-b", addr_b)], timeout);
            let b = start(dir.path(), "site-b", addr_b, &[("site-a", addr_a)], timeout);
            let (ab, ba) = settled(&a, &b, "site-a", "site-b").await;
            // The same connection on both sides: a stream opened on one arrives on the other.
            exchange(&ab, &ba, "pg-data").await;
            exchange(&ba, &ab, "pg-data").await;
            // Duplicates close within a few PTOs; then each endpoint holds exactly one.
            let deadline = Instant::now() + WAIT;
            while a.transport.shared.endpoint.open_connections() != 1
                || b.transport.shared.endpoint.open_connections() != 1
            {
                assert!(
                    Instant::now() < deadline,
                    "round {round}: duplicates never closed"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    #[test]
    fn duplicate_resolution_agrees_on_both_nodes() {
        let fresh = Duration::from_millis(10);
        let old = DUPLICATE_RACE_WINDOW * 2;
        // site-a < site-b, so connections initiated by site-a are preferred. From site-a's
        // side "initiated by us" means by site-a; from site-b's side it means by site-b.
        for (current_by_a, age, new_by_a, keep) in [
            (true, fresh, false, false), // simultaneous: keep a's
            (false, fresh, true, true),  // a's arrives second: still wins
            (true, old, false, true),    // b dialed long after: b lost the old one
            (false, fresh, false, true), // b redialed: newer wins
            (true, fresh, true, true),   // a redialed: newer wins
        ] {
            let from_a =
                keep_new_connection("site-a", "site-b", Some((current_by_a, age)), new_by_a);
            let from_b =
                keep_new_connection("site-b", "site-a", Some((!current_by_a, age)), !new_by_a);
            assert_eq!(from_a, keep, "{current_by_a} {age:?} {new_by_a}");
            assert_eq!(from_b, keep, "{current_by_a} {age:?} {new_by_a}");
        }
        assert!(keep_new_connection("site-b", "site-a", None, true));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn garbage_datagrams_do_not_disturb_a_connection() {
        let dir = cluster(&["site-a", "site-b"]);
        let (addr_a, addr_b) = (free_addr(), free_addr());
        let timeout = Duration::from_secs(5);
        let mut a = start(dir.path(), "site-a", addr_a, &[("site-b", addr_b)], timeout);
        let b = start(dir.path(), "site-b", addr_b, &[("site-a", addr_a)], timeout);
        let (ab, ba) = settled(&a, &b, "site-a", "site-b").await;
        while a.events.try_recv().is_ok() {}

        let seed: u64 = rand::random();
        println!("garbage seed {seed}");
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
        let garbage = UdpSocket::bind("127.0.0.1:0").unwrap();
        for index in 0..500 {
            let length = rng.random_range(1..=1500);
            let mut datagram: Vec<u8> = (0..length).map(|_| rng.random()).collect();
            // Every other datagram looks like a QUIC v1 long header, to reach deeper parsing.
            if index % 2 == 0 && length >= 6 {
                datagram[0] = 0xc0 | (datagram[0] & 0x3f);
                datagram[1..5].copy_from_slice(&1u32.to_be_bytes());
            }
            garbage.send_to(&datagram, addr_a).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;

        let still = a.transport.connection("site-b").expect("connection lost");
        assert_eq!(still.stable_id(), ab.stable_id());
        assert!(a.events.try_recv().is_err(), "garbage produced an event");
        exchange(&ab, &ba, "pg-data").await;
        exchange(&ba, &ab, "pg-data").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_timeout_reports_a_vanished_peer_after_peer_timeout() {
        let dir = cluster(&["site-a", "site-b"]);
        let (addr_a, addr_b) = (free_addr(), free_addr());
        let peer_timeout = Duration::from_secs(1);
        let mut a = start(
            dir.path(),
            "site-a",
            addr_a,
            &[("site-b", addr_b)],
            peer_timeout,
        );
        // site-b lives on its own runtime, so it can vanish like a killed process: shutting
        // the runtime down stops its tasks without sending anything.
        let runtime_b = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let b = {
            let _guard = runtime_b.enter();
            start(
                dir.path(),
                "site-b",
                addr_b,
                &[("site-a", addr_a)],
                peer_timeout,
            )
        };
        let deadline = Instant::now() + WAIT;
        while a.transport.connection("site-b").is_none()
            || b.transport.connection("site-a").is_none()
        {
            assert!(Instant::now() < deadline, "never connected");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        while a.events.try_recv().is_ok() {}

        let gone_at = Instant::now();
        runtime_b.shutdown_background();
        // Dropping the transport would send CONNECTION_CLOSE from a live runtime; a killed
        // process sends nothing, so leak it.
        std::mem::forget(b);
        let event = wait_for(&mut a.events, |event| {
            matches!(event, TransportEvent::PeerDisconnected { .. })
        })
        .await;
        let elapsed = gone_at.elapsed();
        let TransportEvent::PeerDisconnected { peer, reason } = event else {
            unreachable!()
        };
        assert_eq!(peer, "site-b");
        assert_eq!(reason, ConnectionError::TimedOut);
        assert!(
            elapsed >= peer_timeout.mul_f32(0.6) && elapsed <= peer_timeout * 3,
            "disconnect after {elapsed:?}"
        );
    }

    #[test]
    fn volume_names_are_validated() {
        assert!(check_volume_name(b"pg-data").is_ok());
        assert!(check_volume_name(b"").is_err());
        assert!(check_volume_name(&[b'a'; 256]).is_err());
        assert!(check_volume_name(b"a/b").is_err());
        assert!(check_volume_name(&[0xff]).is_err());
    }
}
