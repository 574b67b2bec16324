//! The NBD server: fixed newstyle handshake, then concurrent transmission.
//!
//! Wire formats and the decision of which errno a request gets live in
//! `ferry_protocol::nbd`; this module is the tokio glue. Each connection has one reader (this
//! task), a task per request (so replies go out in completion order), and one writer task
//! that gathers every reply ready at that moment into a single vectored write. In-flight work
//! is bounded per connection twice: by request count and by payload bytes, so a client can
//! neither queue unbounded tasks nor pin unbounded memory; and for the whole server by the
//! number of connections ([`ServerLimits`]) and by the payload bytes of all connections
//! together ([`NODE_IN_FLIGHT_PAYLOAD_BYTES`]).

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferry_protocol::nbd as proto;
use ferry_protocol::nbd::{Command, Rejection, Request};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::storage::{AlignedBuf, SharedBuf};

/// Bytes the request reader buffers per connection.
const READ_BUFFER_BYTES: usize = 128 * 1024;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why an export could not carry out a request. Converted to an NBD errno once, at the edge.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ExportError {
    #[error("I/O error: {0}")]
    Io(String),
    #[error("export is read-only")]
    ReadOnly,
    #[error("no space")]
    NoSpace,
    #[error("shutting down")]
    ShuttingDown,
    #[error("invalid request: {0}")]
    Invalid(String),
}

impl ExportError {
    /// The NBD error value sent to the client.
    pub fn errno(&self) -> u32 {
        match self {
            ExportError::Io(_) => proto::EIO,
            ExportError::ReadOnly => proto::EPERM,
            ExportError::NoSpace => proto::ENOSPC,
            ExportError::ShuttingDown => proto::ESHUTDOWN,
            ExportError::Invalid(_) => proto::EINVAL,
        }
    }
}

/// A block device the server exports. Requests reach it already validated: in range, aligned
/// to 512 bytes (whatever the backing device's logical block size: the export handles
/// smaller-than-block requests itself), within the 32 MiB maximum (except TRIM and
/// WRITE_ZEROES, which carry no payload), never zero-length, and never a write while
/// `read_only()` was true at validation time.
pub trait Export: Send + Sync + 'static {
    fn size_bytes(&self) -> u64;
    /// The preferred block size advertised in NBD_INFO_BLOCK_SIZE: a power of two between
    /// the minimum (512) and the maximum block size. Requests of this size and alignment are
    /// served without read-modify-write anywhere below.
    fn preferred_block_bytes(&self) -> u32 {
        proto::PREFERRED_BLOCK_BYTES
    }
    fn read_only(&self) -> bool;
    fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<Bytes, ExportError>>;
    /// `data` holds exactly the request's payload.
    fn write(
        &self,
        offset: u64,
        data: SharedBuf,
        fua: bool,
    ) -> BoxFuture<'_, Result<(), ExportError>>;
    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        no_hole: bool,
    ) -> BoxFuture<'_, Result<(), ExportError>>;
    fn trim(&self, offset: u64, len: u32, fua: bool) -> BoxFuture<'_, Result<(), ExportError>>;
    fn flush(&self) -> BoxFuture<'_, Result<(), ExportError>>;
    /// Counts a request by op ("read","write","flush","trim","write_zeroes","disc","cache","block_status","unknown") and whether it failed.
    fn observe(&self, op: &'static str, ok: bool);
}

/// Finds exports by name (the volume name).
pub trait ExportLookup: Send + Sync + 'static {
    fn export(&self, name: &str) -> Option<Arc<dyn Export>>;
    fn names(&self) -> Vec<String>;
}

pub enum Listener {
    Unix(tokio::net::UnixListener),
    Tcp(tokio::net::TcpListener),
}

/// Why a connection (or the server) ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("socket I/O: {0}")]
    Io(#[from] io::Error),
    #[error("protocol violation: {0}")]
    Protocol(#[from] proto::NbdError),
    #[error("NBD_OPT_EXPORT_NAME for unknown export {0:?} (the protocol requires a disconnect)")]
    UnknownExport(String),
    #[error("handshake not finished within {0} s")]
    HandshakeTimeout(u64),
    #[error("more than {0} options in one handshake")]
    TooManyOptions(u32),
    #[error("WRITE of {0} bytes is larger than any payload the server accepts")]
    PayloadTooLarge(u32),
    #[error("accept loop task failed: {0}")]
    Task(String),
}

/// Requests one connection may have in flight (executing or waiting for the writer).
pub const IN_FLIGHT_REQUESTS_MAX: u32 = 128;
/// READ and WRITE payload bytes one connection may hold in memory at once. At least the
/// maximum block size, so that one maximal request always fits.
pub const IN_FLIGHT_PAYLOAD_BYTES_MAX: u32 = 4 * proto::BLOCK_BYTES_MAX;
/// READ and WRITE payload bytes all connections together may hold in memory at once. A
/// request takes its connection's permits first, then these; at least
/// [`IN_FLIGHT_PAYLOAD_BYTES_MAX`], so that one connection can always make progress. With it,
/// the NBD layer holds at most 512 MiB of payload however many clients connect (before, each
/// of them could pin 128 MiB).
pub const NODE_IN_FLIGHT_PAYLOAD_BYTES: u32 = 4 * IN_FLIGHT_PAYLOAD_BYTES_MAX;
const _: () = assert!(NODE_IN_FLIGHT_PAYLOAD_BYTES >= IN_FLIGHT_PAYLOAD_BYTES_MAX);
/// Default of `[nbd] max_connections`.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 64;
/// A refused connection is logged at most this often.
const REFUSED_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// A client that has not reached transmission by then is dropped; it holds a socket.
pub const HANDSHAKE_TIMEOUT_S: u64 = 30;
/// Real clients send a handful of options; an endless stream is a denial of service.
pub const OPTIONS_PER_HANDSHAKE_MAX: u32 = 1024;
/// How long shutdown waits for connections to finish their in-flight requests.
pub const SHUTDOWN_DRAIN_TIMEOUT_S: u64 = 10;
/// Replies gathered into one write; keeps the iovec count far below IOV_MAX (1024).
const REPLIES_PER_WRITE_MAX: usize = 64;
/// Pause after a failed accept (for example EMFILE), so the loop does not spin.
const ACCEPT_ERROR_BACKOFF_MS: u64 = 100;

const HANDSHAKE_FLAGS: u16 = proto::HANDSHAKE_FLAG_FIXED_NEWSTYLE | proto::HANDSHAKE_FLAG_NO_ZEROES;

static NEXT_CONNECTION_ID: AtomicU64 = AtomicU64::new(1);

/// Serves NBD on every listener until `shutdown` becomes true (or its sender is dropped),
/// then stops accepting, lets connections finish their in-flight requests for at most
/// [`SHUTDOWN_DRAIN_TIMEOUT_S`], and returns.
pub async fn serve(
    listeners: Vec<Listener>,
    exports: Arc<dyn ExportLookup>,
    limits: ServerLimits,
    shutdown: watch::Receiver<bool>,
) -> Result<(), NbdError> {
    let shared = Arc::new(ServerShared {
        connections: Arc::new(Semaphore::new(crate::usize_from(u64::from(
            limits.max_connections.max(1),
        )))),
        max_connections: limits.max_connections.max(1),
        payload: Arc::new(Semaphore::new(crate::usize_from(u64::from(
            NODE_IN_FLIGHT_PAYLOAD_BYTES,
        )))),
        refused_logged_at: std::sync::Mutex::new(None),
    });
    let mut accept_loops = JoinSet::new();
    for listener in listeners {
        accept_loops.spawn(accept_loop(
            listener,
            Arc::clone(&exports),
            Arc::clone(&shared),
            shutdown.clone(),
        ));
    }
    let mut result = Ok(());
    while let Some(joined) = accept_loops.join_next().await {
        if let Err(error) = joined {
            tracing::error!(%error, "nbd accept loop failed");
            result = Err(NbdError::Task(error.to_string()));
        }
    }
    result
}

/// What the server bounds across all its listeners and connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerLimits {
    /// Connections open at once (handshaking or transmitting), over every listener; one more
    /// is accepted and closed at once, with a warning.
    pub max_connections: u32,
}

impl Default for ServerLimits {
    fn default() -> ServerLimits {
        ServerLimits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// State every listener and connection of one server shares.
struct ServerShared {
    /// One permit per open connection.
    connections: Arc<Semaphore>,
    max_connections: u32,
    /// [`NODE_IN_FLIGHT_PAYLOAD_BYTES`] permits, one per payload byte held.
    payload: Arc<Semaphore>,
    /// When a refused connection was last logged.
    refused_logged_at: std::sync::Mutex<Option<std::time::Instant>>,
}

impl ServerShared {
    /// Logs a refused connection, at most once per [`REFUSED_LOG_INTERVAL`].
    fn log_refused(&self, peer: &str) {
        let now = std::time::Instant::now();
        let mut logged_at = self
            .refused_logged_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if logged_at.is_none_or(|at| now.duration_since(at) >= REFUSED_LOG_INTERVAL) {
            *logged_at = Some(now);
            tracing::warn!(
                %peer,
                max_connections = self.max_connections,
                "nbd connection refused: the server has max_connections open ([nbd] max_connections)"
            );
        }
    }
}

async fn accept_loop(
    listener: Listener,
    exports: Arc<dyn ExportLookup>,
    shared: Arc<ServerShared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    // Handed to each connection; `shutdown` itself is borrowed by the select below.
    let for_connections = shutdown.clone();
    loop {
        tokio::select! {
            _ = stopped(&mut shutdown) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = accept(&listener) => match accepted {
                Ok((stream, peer)) => {
                    // Over the limit: closed at once (the client sees the connection end
                    // before the greeting), never queued.
                    let Ok(permit) = Arc::clone(&shared.connections).try_acquire_owned() else {
                        shared.log_refused(&peer);
                        drop(stream);
                        continue;
                    };
                    let connection = Connection {
                        peer,
                        exports: Arc::clone(&exports),
                        payload: Arc::clone(&shared.payload),
                        shutdown: for_connections.clone(),
                        _permit: permit,
                    };
                    match stream {
                        Stream::Unix(stream) => connections.spawn(run_connection(stream, connection)),
                        Stream::Tcp(stream) => connections.spawn(run_connection(stream, connection)),
                    };
                }
                Err(error) => {
                    tracing::warn!(%error, "nbd accept failed");
                    tokio::time::sleep(Duration::from_millis(ACCEPT_ERROR_BACKOFF_MS)).await;
                }
            },
        }
    }
    let drain = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(SHUTDOWN_DRAIN_TIMEOUT_S), drain)
        .await
        .is_err()
    {
        tracing::warn!(
            connections = connections.len(),
            "nbd connections still busy after {SHUTDOWN_DRAIN_TIMEOUT_S} s of shutdown; closing them"
        );
        connections.abort_all();
    }
}

/// Resolves once shutdown is requested, or once nobody can request it any more (the sender
/// is gone, which only happens when the daemon is going away). Drops the watch guard before
/// returning, so callers' futures stay `Send`.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

enum Stream {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

async fn accept(listener: &Listener) -> io::Result<(Stream, String)> {
    match listener {
        Listener::Unix(listener) => {
            let (stream, _) = listener.accept().await?;
            Ok((Stream::Unix(stream), "unix".to_owned()))
        }
        Listener::Tcp(listener) => {
            let (stream, address) = listener.accept().await?;
            // Replies are small and latency-bound; Nagle would hold them back (the protocol
            // document recommends TCP_NODELAY on both sides).
            stream.set_nodelay(true)?;
            Ok((Stream::Tcp(stream), address.to_string()))
        }
    }
}

/// A stream that splits into halves owned by separate tasks without a lock between them
/// (`tokio::io::split` takes a mutex on every read and write, which showed up as futex
/// contention between the request reader and the reply writer under load).
pub trait IntoHalves: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    type Read: AsyncRead + Unpin + Send + 'static;
    type Write: AsyncWrite + Unpin + Send + 'static;
    fn into_halves(self) -> (Self::Read, Self::Write);
}

impl IntoHalves for tokio::net::UnixStream {
    type Read = tokio::net::unix::OwnedReadHalf;
    type Write = tokio::net::unix::OwnedWriteHalf;
    fn into_halves(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
}

impl IntoHalves for tokio::net::TcpStream {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;
    fn into_halves(self) -> (Self::Read, Self::Write) {
        // Replies are small and latency-bound: never let Nagle hold one back.
        let _ = self.set_nodelay(true);
        self.into_split()
    }
}

/// What one accepted connection carries besides its socket.
struct Connection {
    peer: String,
    exports: Arc<dyn ExportLookup>,
    /// The server-wide payload permits ([`NODE_IN_FLIGHT_PAYLOAD_BYTES`]).
    payload: Arc<Semaphore>,
    shutdown: watch::Receiver<bool>,
    /// Its slot among `max_connections`, released when the connection ends.
    _permit: OwnedSemaphorePermit,
}

async fn run_connection<S>(mut stream: S, accepted: Connection)
where
    S: IntoHalves,
{
    let Connection {
        peer,
        exports,
        payload,
        shutdown,
        _permit,
    } = accepted;
    let connection = NEXT_CONNECTION_ID.fetch_add(1, Ordering::Relaxed);
    tracing::info!(connection, %peer, "nbd connection opened");
    let handshake = tokio::time::timeout(
        Duration::from_secs(HANDSHAKE_TIMEOUT_S),
        handshake(&mut stream, exports.as_ref(), shutdown.clone()),
    )
    .await
    .unwrap_or(Err(NbdError::HandshakeTimeout(HANDSHAKE_TIMEOUT_S)));
    let settled = match handshake {
        Ok(Some(settled)) => settled,
        Ok(None) => {
            tracing::info!(connection, %peer, "nbd connection closed during handshake");
            return;
        }
        Err(error) => {
            tracing::warn!(connection, %peer, %error, "nbd connection dropped during handshake");
            return;
        }
    };
    tracing::info!(connection, %peer, export = %settled.name, structured = settled.structured, "nbd transmission started");
    let name = settled.name.clone();
    match transmission(stream, settled, payload, shutdown).await {
        Ok(end) => {
            tracing::info!(connection, %peer, export = %name, "nbd connection closed: {end}")
        }
        Err(error) => {
            tracing::warn!(connection, %peer, export = %name, %error, "nbd connection dropped")
        }
    }
}

/// What the handshake settled.
struct Transmission {
    name: String,
    export: Arc<dyn Export>,
    structured: bool,
}

fn transmission_flags(export: &dyn Export, structured: bool) -> u16 {
    let mut flags = proto::FLAG_HAS_FLAGS
        | proto::FLAG_SEND_FLUSH
        | proto::FLAG_SEND_FUA
        | proto::FLAG_SEND_TRIM
        | proto::FLAG_SEND_WRITE_ZEROES
        | proto::FLAG_SEND_FAST_ZERO
        // Every connection reaches the same journal, so a FLUSH or FUA on one covers writes
        // completed on any other.
        | proto::FLAG_CAN_MULTI_CONN;
    if export.read_only() {
        flags |= proto::FLAG_READ_ONLY;
    }
    if structured {
        // A READ is always answered with a single data chunk, so "don't fragment" holds.
        flags |= proto::FLAG_SEND_DF;
    }
    flags
}

/// The empty name means the default export, which exists only when there is exactly one.
fn resolve(exports: &dyn ExportLookup, name: &str) -> Option<(String, Arc<dyn Export>)> {
    if !name.is_empty() {
        return exports.export(name).map(|export| (name.to_owned(), export));
    }
    let mut names = exports.names();
    if names.len() != 1 {
        return None;
    }
    let only = names.pop()?;
    exports.export(&only).map(|export| (only, export))
}

async fn read_array<const N: usize, R: AsyncRead + Unpin>(reader: &mut R) -> io::Result<[u8; N]> {
    let mut bytes = [0u8; N];
    reader.read_exact(&mut bytes).await?;
    Ok(bytes)
}

async fn discard<R: AsyncRead + Unpin>(reader: &mut R, length_bytes: u64) -> io::Result<()> {
    let copied = tokio::io::copy(&mut reader.take(length_bytes), &mut tokio::io::sink()).await?;
    if copied != length_bytes {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Runs option haggling. `Ok(None)` means the client ended it (ABORT, or closed the socket
/// between options) or the server is shutting down.
async fn handshake<S>(
    stream: &mut S,
    exports: &dyn ExportLookup,
    mut shutdown: watch::Receiver<bool>,
) -> Result<Option<Transmission>, NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = Vec::with_capacity(256);
    proto::encode_server_greeting(&mut out, HANDSHAKE_FLAGS);
    stream.write_all(&out).await?;
    let client_flags = u32::from_be_bytes(read_array::<4, _>(stream).await?);
    proto::check_client_flags(client_flags, HANDSHAKE_FLAGS)?;
    let no_zeroes = client_flags & proto::CLIENT_FLAG_NO_ZEROES != 0;
    let mut structured = false;

    for _ in 0..OPTIONS_PER_HANDSHAKE_MAX {
        let Some((option, data)) = read_option(stream, &mut shutdown, &mut out).await? else {
            return Ok(None);
        };
        let Some(data) = data else {
            continue;
        };
        out.clear();

        if *shutdown.borrow() && option != proto::OPT_ABORT {
            proto::encode_rep_error(
                &mut out,
                option,
                proto::REP_ERR_SHUTDOWN,
                "server is shutting down",
            );
            stream.write_all(&out).await?;
            continue;
        }
        match option {
            proto::OPT_EXPORT_NAME => {
                // This option cannot be answered with an error: an unusable name leaves only
                // a disconnect.
                let name = proto::parse_string(&data)?;
                let Some((name, export)) = resolve(exports, name) else {
                    return Err(NbdError::UnknownExport(name.to_owned()));
                };
                let flags = transmission_flags(export.as_ref(), structured);
                proto::encode_export_name_reply(&mut out, export.size_bytes(), flags, no_zeroes);
                stream.write_all(&out).await?;
                return Ok(Some(Transmission {
                    name,
                    export,
                    structured,
                }));
            }
            proto::OPT_ABORT => {
                proto::encode_rep_ack(&mut out, option);
                // The client may already have closed; the reply is a courtesy.
                let _ = stream.write_all(&out).await;
                return Ok(None);
            }
            proto::OPT_LIST => {
                if data.is_empty() {
                    for name in exports.names() {
                        proto::encode_rep_server(&mut out, &name);
                    }
                    proto::encode_rep_ack(&mut out, option);
                } else {
                    proto::encode_rep_error(
                        &mut out,
                        option,
                        proto::REP_ERR_INVALID,
                        "NBD_OPT_LIST takes no data",
                    );
                }
            }
            proto::OPT_STRUCTURED_REPLY => {
                if data.is_empty() {
                    structured = true;
                    proto::encode_rep_ack(&mut out, option);
                } else {
                    proto::encode_rep_error(
                        &mut out,
                        option,
                        proto::REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    );
                }
            }
            proto::OPT_INFO | proto::OPT_GO => {
                if let Some(settled) = answer_info(&mut out, option, &data, exports, structured) {
                    stream.write_all(&out).await?;
                    return Ok(Some(settled));
                }
            }
            _ => proto::encode_rep_error(
                &mut out,
                option,
                proto::REP_ERR_UNSUP,
                "option not supported",
            ),
        }
        stream.write_all(&out).await?;
    }
    Err(NbdError::TooManyOptions(OPTIONS_PER_HANDSHAKE_MAX))
}

/// Reads one option. `Ok(None)`: the client closed the socket between options, or the server
/// is shutting down. `Some((option, None))`: the option's data was too large, skipped and
/// answered with an error already.
async fn read_option<S>(
    stream: &mut S,
    shutdown: &mut watch::Receiver<bool>,
    out: &mut Vec<u8>,
) -> Result<Option<(u32, Option<Vec<u8>>)>, NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let header = tokio::select! {
        header = read_array::<{ proto::OPTION_HEADER_BYTES }, _>(stream) => match header {
            Ok(header) => header,
            // Closing the socket between options is how some clients say goodbye.
            Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(error) => return Err(error.into()),
        },
        _ = stopped(shutdown) => return Ok(None),
    };
    let (option, length_bytes) = match proto::decode_option_header(&header) {
        Ok(Some((header, _))) => (header.option, header.length_bytes),
        // Impossible with all 16 bytes in hand; treated as the violation it would be.
        Ok(None) => return Err(proto::NbdError::MalformedOption("short option header").into()),
        Err(proto::NbdError::OptionTooLarge {
            option,
            length_bytes,
        }) => {
            // The stream stays in step if the data is skipped, so an error reply is
            // possible and the protocol then forbids a disconnect.
            discard(stream, u64::from(length_bytes)).await?;
            out.clear();
            proto::encode_rep_error(out, option, proto::REP_ERR_TOO_BIG, "option data too large");
            stream.write_all(out).await?;
            return Ok(Some((option, None)));
        }
        Err(error) => return Err(error.into()),
    };
    // length_bytes <= OPTION_DATA_BYTES_MAX (64 KiB), checked by the decoder.
    let mut data = vec![0u8; crate::usize_from(u64::from(length_bytes))];
    stream.read_exact(&mut data).await?;
    Ok(Some((option, Some(data))))
}

/// Answers NBD_OPT_INFO or NBD_OPT_GO into `out`; a GO for a known export ends the handshake
/// with what it settled (the caller sends `out` first).
fn answer_info(
    out: &mut Vec<u8>,
    option: u32,
    data: &[u8],
    exports: &dyn ExportLookup,
    structured: bool,
) -> Option<Transmission> {
    match proto::parse_info_request(data) {
        Err(error) => {
            proto::encode_rep_error(out, option, proto::REP_ERR_INVALID, &error.to_string())
        }
        Ok(request) => match resolve(exports, &request.export_name) {
            None => {
                let message = if request.export_name.is_empty() {
                    "no default export: name one of the exports".to_owned()
                } else {
                    format!("no export named {:?}", request.export_name)
                };
                proto::encode_rep_error(out, option, proto::REP_ERR_UNKNOWN, &message);
            }
            Some((name, export)) => {
                let flags = transmission_flags(export.as_ref(), structured);
                proto::encode_rep_info_export(out, option, export.size_bytes(), flags);
                // Sent whether asked for or not: the server enforces these sizes.
                let sizes = proto::BlockSizes {
                    preferred_bytes: export
                        .preferred_block_bytes()
                        .clamp(proto::MIN_BLOCK_BYTES, proto::BLOCK_BYTES_MAX),
                    ..proto::BlockSizes::default()
                };
                proto::encode_rep_info_block_size(out, option, sizes);
                if request.info_types.contains(&proto::INFO_NAME) {
                    proto::encode_rep_info_name(out, option, &name);
                }
                proto::encode_rep_ack(out, option);
                if option == proto::OPT_GO {
                    return Some(Transmission {
                        name,
                        export,
                        structured,
                    });
                }
            }
        },
    }
    None
}

/// Slots a request holds until its reply has been written to the socket.
struct Permits {
    _request: OwnedSemaphorePermit,
    /// Its payload bytes: the connection's permits and the server's.
    _payload: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
}

/// One reply, ready for the writer: encoded header bytes, then (for READ) the data.
struct Reply {
    header: Vec<u8>,
    data: Option<Bytes>,
    _permits: Permits,
}

/// How a connection ended without a protocol violation.
enum End {
    Disconnect,
    ClientClosed,
    Shutdown,
    WriterClosed,
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            End::Disconnect => "client sent NBD_CMD_DISC",
            End::ClientClosed => "client closed the socket",
            End::Shutdown => "server shutting down",
            End::WriterClosed => "socket no longer writable",
        })
    }
}

async fn transmission<S>(
    stream: S,
    settled: Transmission,
    node_payload_slots: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<End, NbdError>
where
    S: IntoHalves,
{
    let (reader, writer) = stream.into_halves();
    // Buffered: under a deep queue one read(2) brings in many requests. Payloads as large as
    // the buffer bypass it and land straight in their aligned buffers.
    let mut reader = tokio::io::BufReader::with_capacity(READ_BUFFER_BYTES, reader);
    let (reply_tx, reply_rx) = mpsc::channel::<Reply>(IN_FLIGHT_REQUESTS_MAX as usize);
    let writer_task = tokio::spawn(write_replies(writer, reply_rx));
    let request_slots = Arc::new(Semaphore::new(IN_FLIGHT_REQUESTS_MAX as usize));
    let payload_slots = Arc::new(Semaphore::new(IN_FLIGHT_PAYLOAD_BYTES_MAX as usize));
    let export = settled.export;
    let structured = settled.structured;

    let result = loop {
        let header = tokio::select! {
            header = read_array::<{ proto::REQUEST_BYTES }, _>(&mut reader) => match header {
                Ok(header) => header,
                Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => break Ok(End::ClientClosed),
                Err(error) => break Err(error.into()),
            },
            _ = stopped(&mut shutdown) => break Ok(End::Shutdown),
            _ = reply_tx.closed() => break Ok(End::WriterClosed),
        };
        let request = match proto::decode_request(&header) {
            Ok(Some((request, _))) => request,
            Ok(None) => continue, // impossible: the header has all 28 bytes
            Err(error) => break Err(error.into()),
        };
        let op = request.kind.op_name();
        let limits = proto::RequestLimits {
            size_bytes: export.size_bytes(),
            read_only: export.read_only(),
            min_block_bytes: proto::MIN_BLOCK_BYTES,
            max_block_bytes: proto::BLOCK_BYTES_MAX,
            structured_replies: structured,
        };
        let verdict = proto::validate_request(&request, &limits);
        if request.kind == Command::Disc && verdict.is_ok() {
            export.observe(op, true);
            break Ok(End::Disconnect);
        }
        let Ok(request_permit) = Arc::clone(&request_slots).acquire_owned().await else {
            break Ok(End::WriterClosed); // the semaphore is never closed
        };
        match verdict {
            Err(Rejection::Disconnect) => {
                export.observe(op, false);
                break Err(NbdError::PayloadTooLarge(request.length_bytes));
            }
            Err(Rejection::Errno(errno)) => {
                if request.kind == Command::Write {
                    // The payload must be consumed to stay in step; it is never written.
                    if let Err(error) = discard(&mut reader, u64::from(request.length_bytes)).await
                    {
                        break Err(error.into());
                    }
                }
                export.observe(op, false);
                let permits = Permits {
                    _request: request_permit,
                    _payload: None,
                };
                let reply = error_reply(&request, structured, errno, "request rejected", permits);
                if reply_tx.send(reply).await.is_err() {
                    break Ok(End::WriterClosed);
                }
            }
            Ok(()) => {
                let payload_permit = match request.kind {
                    Command::Read | Command::Write if request.length_bytes > 0 => {
                        // length_bytes <= BLOCK_BYTES_MAX <= IN_FLIGHT_PAYLOAD_BYTES_MAX <=
                        // NODE_IN_FLIGHT_PAYLOAD_BYTES (validated), so both always become
                        // satisfiable. The connection's permits first: a connection waits
                        // for the server's pool with at most its own share taken.
                        // The semaphores are never closed.
                        let Ok(connection) = Arc::clone(&payload_slots)
                            .acquire_many_owned(request.length_bytes)
                            .await
                        else {
                            break Ok(End::WriterClosed);
                        };
                        let Ok(node) = Arc::clone(&node_payload_slots)
                            .acquire_many_owned(request.length_bytes)
                            .await
                        else {
                            break Ok(End::WriterClosed);
                        };
                        Some((connection, node))
                    }
                    _ => None,
                };
                let payload = if request.kind == Command::Write {
                    // Read straight into the aligned buffer the journal will write from.
                    match AlignedBuf::read_exact_from(&mut reader, request.length_bytes as usize)
                        .await
                    {
                        Ok(buf) => Some(buf.freeze()),
                        Err(error) => break Err(error.into()),
                    }
                } else {
                    None
                };
                let permits = Permits {
                    _request: request_permit,
                    _payload: payload_permit,
                };
                tokio::spawn(execute(
                    Arc::clone(&export),
                    request,
                    payload,
                    structured,
                    permits,
                    reply_tx.clone(),
                ));
            }
        }
    };

    // Every request accepted so far finishes and its reply is sent before the socket closes
    // (DISC requires it; for the other endings it keeps completed writes acknowledged when
    // the client is still listening). Holding all request slots means none is in flight.
    let _all = request_slots.acquire_many(IN_FLIGHT_REQUESTS_MAX).await;
    drop(reply_tx);
    match writer_task.await {
        Ok(Ok(())) => {}
        // The client is gone; there is nobody left to tell.
        Ok(Err(error)) => tracing::debug!(%error, "nbd reply writer stopped"),
        Err(error) => tracing::error!(%error, "nbd reply writer task failed"),
    }
    result
}

/// Executes one validated request and queues its reply.
async fn execute(
    export: Arc<dyn Export>,
    request: Request,
    payload: Option<SharedBuf>,
    structured: bool,
    permits: Permits,
    reply_tx: mpsc::Sender<Reply>,
) {
    let fua = request.flags & proto::CMD_FLAG_FUA != 0;
    let len = request.length_bytes;
    let empty = len == 0;
    let outcome: Result<Option<Bytes>, ExportError> = match request.kind {
        // Zero-length requests are valid no-ops; the export never sees them.
        Command::Read if empty => Ok(Some(Bytes::new())),
        Command::Read => match export.read(request.offset, len).await {
            Ok(data) if data.len() == len as usize => Ok(Some(data)),
            Ok(data) => Err(ExportError::Io(format!(
                "export returned {} bytes for a {len}-byte read",
                data.len()
            ))),
            Err(error) => Err(error),
        },
        Command::Write if empty => Ok(None),
        Command::Write => match payload {
            Some(data) => export.write(request.offset, data, fua).await.map(|()| None),
            None => Err(ExportError::Invalid("write without payload".to_owned())),
        },
        Command::Flush => export.flush().await.map(|()| None),
        Command::Trim if empty => Ok(None),
        Command::Trim => export.trim(request.offset, len, fua).await.map(|()| None),
        Command::WriteZeroes if empty => Ok(None),
        Command::WriteZeroes => {
            // FAST_ZERO needs nothing special: zeroing is a journal record, always faster
            // than writing the zeroes. Any length the protocol carries (up to 4 GiB) is one
            // record without a payload.
            let no_hole = request.flags & proto::CMD_FLAG_NO_HOLE != 0;
            export
                .write_zeroes(request.offset, len, fua, no_hole)
                .await
                .map(|()| None)
        }
        // A hint with no semantics; nothing to prefetch into.
        Command::Cache => Ok(None),
        Command::Disc | Command::BlockStatus | Command::Resize | Command::Unknown(_) => {
            Err(ExportError::Invalid("command not executable".to_owned()))
        }
    };
    export.observe(request.kind.op_name(), outcome.is_ok());
    let reply = match outcome {
        Ok(data) => success_reply(&request, structured, data, permits),
        Err(error) => error_reply(
            &request,
            structured,
            error.errno(),
            &error.to_string(),
            permits,
        ),
    };
    // A send error means the connection is gone; the reply has nowhere to go.
    let _ = reply_tx.send(reply).await;
}

fn success_reply(
    request: &Request,
    structured: bool,
    data: Option<Bytes>,
    permits: Permits,
) -> Reply {
    let mut header = Vec::with_capacity(proto::CHUNK_HEADER_BYTES + 8);
    let is_read = request.kind == Command::Read;
    match data {
        Some(data) if is_read && structured && data.is_empty() => {
            proto::encode_chunk_none(&mut header, request.cookie);
            Reply {
                header,
                data: None,
                _permits: permits,
            }
        }
        Some(data) if is_read && structured => {
            // data.len() <= BLOCK_BYTES_MAX, far below the chunk limit of 2^32 - 8.
            match proto::encode_chunk_offset_data_prefix(
                &mut header,
                request.cookie,
                request.offset,
                data.len(),
                true,
            ) {
                Ok(()) => Reply {
                    header,
                    data: Some(data),
                    _permits: permits,
                },
                Err(error) => {
                    error_reply(request, structured, proto::EIO, &error.to_string(), permits)
                }
            }
        }
        data => {
            proto::encode_simple_reply(&mut header, 0, request.cookie);
            Reply {
                header,
                data: data.filter(|_| is_read),
                _permits: permits,
            }
        }
    }
}

fn error_reply(
    request: &Request,
    structured: bool,
    errno: u32,
    message: &str,
    permits: Permits,
) -> Reply {
    let mut header = Vec::with_capacity(proto::CHUNK_HEADER_BYTES + 6 + message.len());
    if structured {
        proto::encode_chunk_error(&mut header, request.cookie, errno, message);
    } else {
        proto::encode_simple_reply(&mut header, errno, request.cookie);
    }
    Reply {
        header,
        data: None,
        _permits: permits,
    }
}

/// The connection's only writer: takes whatever replies are ready and sends them with one
/// vectored write. A reply's permits are released only once it is on the wire.
async fn write_replies<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut replies: mpsc::Receiver<Reply>,
) -> io::Result<()> {
    let mut batch: Vec<Reply> = Vec::with_capacity(REPLIES_PER_WRITE_MAX);
    while let Some(first) = replies.recv().await {
        batch.push(first);
        while batch.len() < REPLIES_PER_WRITE_MAX {
            match replies.try_recv() {
                Ok(reply) => batch.push(reply),
                Err(_) => break,
            }
        }
        {
            let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(batch.len() * 2);
            for reply in &batch {
                slices.push(IoSlice::new(&reply.header));
                if let Some(data) = reply.data.as_ref().filter(|data| !data.is_empty()) {
                    slices.push(IoSlice::new(data));
                }
            }
            write_all_vectored(&mut writer, &mut slices).await?;
        }
        batch.clear();
    }
    writer.flush().await?;
    writer.shutdown().await
}

async fn write_all_vectored<W: AsyncWrite + Unpin>(
    writer: &mut W,
    mut slices: &mut [IoSlice<'_>],
) -> io::Result<()> {
    while !slices.is_empty() {
        let written = writer.write_vectored(slices).await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, written);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::client::{NbdClient, NbdClientError};
    use std::collections::HashMap;
    use std::path::PathBuf;
    use std::sync::Mutex;
    use tokio::net::UnixStream;

    const SIZE_BYTES: u64 = 1 << 20;

    /// An export in memory. Reads at `gated_offset` wait until the test opens the gate, so a
    /// test can force replies out of order.
    struct MemExport {
        data: Mutex<Vec<u8>>,
        read_only: bool,
        writes: Mutex<Vec<(u64, usize, bool)>>,
        observed: Mutex<HashMap<(&'static str, bool), u64>>,
        gated_offset: Option<u64>,
        gate: Arc<Semaphore>,
    }

    impl MemExport {
        fn new(read_only: bool, gated_offset: Option<u64>) -> Arc<MemExport> {
            Arc::new(MemExport {
                data: Mutex::new(vec![0; SIZE_BYTES as usize]),
                read_only,
                writes: Mutex::new(Vec::new()),
                observed: Mutex::new(HashMap::new()),
                gated_offset,
                gate: Arc::new(Semaphore::new(0)),
            })
        }

        fn count(&self, op: &'static str, ok: bool) -> u64 {
            self.observed
                .lock()
                .unwrap()
                .get(&(op, ok))
                .copied()
                .unwrap_or(0)
        }

        fn fill(&self, offset: u64, bytes: &[u8]) {
            let offset = offset as usize;
            self.data.lock().unwrap()[offset..offset + bytes.len()].copy_from_slice(bytes);
        }
    }

    impl Export for MemExport {
        fn size_bytes(&self) -> u64 {
            SIZE_BYTES
        }
        fn read_only(&self) -> bool {
            self.read_only
        }
        fn read(&self, offset: u64, len: u32) -> BoxFuture<'_, Result<Bytes, ExportError>> {
            Box::pin(async move {
                if Some(offset) == self.gated_offset {
                    let _open = self
                        .gate
                        .acquire()
                        .await
                        .map_err(|_| ExportError::ShuttingDown)?;
                }
                let data = self.data.lock().unwrap();
                Ok(Bytes::copy_from_slice(
                    &data[offset as usize..offset as usize + len as usize],
                ))
            })
        }
        fn write(
            &self,
            offset: u64,
            data: SharedBuf,
            fua: bool,
        ) -> BoxFuture<'_, Result<(), ExportError>> {
            Box::pin(async move {
                self.fill(offset, &data);
                self.writes.lock().unwrap().push((offset, data.len(), fua));
                Ok(())
            })
        }
        fn write_zeroes(
            &self,
            offset: u64,
            len: u32,
            _fua: bool,
            _no_hole: bool,
        ) -> BoxFuture<'_, Result<(), ExportError>> {
            Box::pin(async move {
                self.fill(offset, &vec![0; len as usize]);
                Ok(())
            })
        }
        fn trim(
            &self,
            offset: u64,
            len: u32,
            _fua: bool,
        ) -> BoxFuture<'_, Result<(), ExportError>> {
            // Ferry's TRIM reads back as zeros (SPEC §2).
            self.write_zeroes(offset, len, false, false)
        }
        fn flush(&self) -> BoxFuture<'_, Result<(), ExportError>> {
            Box::pin(async { Ok(()) })
        }
        fn observe(&self, op: &'static str, ok: bool) {
            *self.observed.lock().unwrap().entry((op, ok)).or_default() += 1;
        }
    }

    struct Exports(Vec<(String, Arc<MemExport>)>);

    impl ExportLookup for Exports {
        fn export(&self, name: &str) -> Option<Arc<dyn Export>> {
            self.0
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, e)| Arc::clone(e) as Arc<dyn Export>)
        }
        fn names(&self) -> Vec<String> {
            self.0.iter().map(|(n, _)| n.clone()).collect()
        }
    }

    struct Server {
        path: PathBuf,
        shutdown: watch::Sender<bool>,
        task: tokio::task::JoinHandle<Result<(), NbdError>>,
        _dir: tempfile::TempDir,
    }

    impl Server {
        async fn stop(self) {
            self.shutdown.send(true).expect("server listening");
            self.task.await.expect("serve task").expect("serve");
        }
    }

    fn start(exports: Vec<(&str, Arc<MemExport>)>) -> Server {
        start_with(exports, ServerLimits::default())
    }

    fn start_with(exports: Vec<(&str, Arc<MemExport>)>, limits: ServerLimits) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nbd.sock");
        let listener = tokio::net::UnixListener::bind(&path).expect("bind");
        let (shutdown, shutdown_rx) = watch::channel(false);
        let lookup = Arc::new(Exports(
            exports
                .into_iter()
                .map(|(n, e)| (n.to_owned(), e))
                .collect(),
        ));
        let task = tokio::spawn(serve(
            vec![Listener::Unix(listener)],
            lookup,
            limits,
            shutdown_rx,
        ));
        Server {
            path,
            shutdown,
            task,
            _dir: dir,
        }
    }

    /// A raw client for malformed traffic: connects and completes the greeting.
    async fn raw(path: &PathBuf, client_flags: u32) -> UnixStream {
        let mut stream = UnixStream::connect(path).await.expect("connect");
        let greeting = read_array::<18, _>(&mut stream).await.expect("greeting");
        assert_eq!(
            proto::decode_server_greeting(&greeting),
            Ok(Some((HANDSHAKE_FLAGS, 18)))
        );
        stream
            .write_all(&client_flags.to_be_bytes())
            .await
            .expect("flags");
        stream
    }

    async fn read_option_reply(stream: &mut UnixStream) -> proto::OptionReply {
        let header = read_array::<20, _>(stream).await.expect("reply header");
        let length = u32::from_be_bytes(header[16..20].try_into().unwrap()) as usize;
        let mut bytes = header.to_vec();
        bytes.resize(20 + length, 0);
        stream
            .read_exact(&mut bytes[20..])
            .await
            .expect("reply data");
        proto::decode_option_reply(&bytes)
            .expect("valid")
            .expect("whole")
            .0
    }

    async fn raw_go(stream: &mut UnixStream, name: &str, structured: bool) {
        let mut out = Vec::new();
        if structured {
            proto::encode_option(&mut out, proto::OPT_STRUCTURED_REPLY, &[]);
            stream.write_all(&out).await.unwrap();
            assert_eq!(read_option_reply(stream).await.reply_type, proto::REP_ACK);
            out.clear();
        }
        let mut data = Vec::new();
        proto::encode_info_request(&mut data, name, &[]);
        proto::encode_option(&mut out, proto::OPT_GO, &data);
        stream.write_all(&out).await.unwrap();
        loop {
            let reply = read_option_reply(stream).await;
            if reply.reply_type == proto::REP_ACK {
                return;
            }
            assert_eq!(reply.reply_type, proto::REP_INFO);
        }
    }

    async fn expect_closed(stream: &mut UnixStream) {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte))
            .await
            .expect("closed in time");
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "connection still open: {read:?}"
        );
    }

    /// Waits (boundedly) for something the server does after the client stops listening.
    async fn eventually(condition: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !condition() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "condition not reached in 5 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn errno_of<T: std::fmt::Debug>(result: Result<T, NbdClientError>) -> Option<u32> {
        result.expect_err("request should fail").errno()
    }

    #[tokio::test]
    async fn round_trips_through_every_command() {
        let export = MemExport::new(false, None);
        let server = start(vec![("vol", Arc::clone(&export))]);
        let mut client = NbdClient::connect_unix(&server.path, "vol")
            .await
            .expect("connect");
        assert_eq!(client.size_bytes(), SIZE_BYTES);
        let pattern: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        client.write(4096, &pattern, false).await.expect("write");
        assert_eq!(client.read(4096, 8192).await.expect("read"), pattern);
        client.flush().await.expect("flush");
        client.trim(4096, 4096, false).await.expect("trim");
        client.write_zeroes(8192, 512, false).await.expect("zeroes");
        let read = client.read(4096, 8192).await.expect("read");
        assert!(read[..4096 + 512].iter().all(|&b| b == 0));
        assert_eq!(&read[4096 + 512..], &pattern[4096 + 512..]);
        client.disconnect().await.expect("disconnect");
        assert_eq!(export.count("write", true), 1);
        assert_eq!(export.count("read", true), 2);
        eventually(|| export.count("disc", true) == 1).await;
        server.stop().await;
    }

    #[tokio::test]
    async fn fua_reaches_the_export() {
        let export = MemExport::new(false, None);
        let server = start(vec![("vol", Arc::clone(&export))]);
        let mut client = NbdClient::connect_unix(&server.path, "vol")
            .await
            .expect("connect");
        client.write(0, &[1; 512], true).await.expect("write");
        client.write(512, &[2; 512], false).await.expect("write");
        assert_eq!(
            *export.writes.lock().unwrap(),
            vec![(0, 512, true), (512, 512, false)]
        );
        server.stop().await;
    }

    #[tokio::test]
    async fn default_export_and_unknown_names() {
        let export = MemExport::new(false, None);
        let server = start(vec![("vol", Arc::clone(&export))]);
        NbdClient::connect_unix(&server.path, "")
            .await
            .expect("the only export is the default");
        let refused = NbdClient::connect_unix(&server.path, "nope")
            .await
            .expect_err("unknown export");
        assert!(
            matches!(
                refused,
                NbdClientError::OptionRefused {
                    reply_type: proto::REP_ERR_UNKNOWN,
                    ..
                }
            ),
            "{refused:?}"
        );
        server.stop().await;

        let two = start(vec![
            ("a", MemExport::new(false, None)),
            ("b", MemExport::new(false, None)),
        ]);
        let refused = NbdClient::connect_unix(&two.path, "")
            .await
            .expect_err("no default with two exports");
        assert!(matches!(
            refused,
            NbdClientError::OptionRefused {
                reply_type: proto::REP_ERR_UNKNOWN,
                ..
            }
        ));
        two.stop().await;
    }

    #[tokio::test]
    async fn unknown_option_then_go_on_the_same_connection() {
        let server = start(vec![("vol", MemExport::new(false, None))]);
        let mut stream = raw(&server.path, proto::CLIENT_FLAG_FIXED_NEWSTYLE).await;
        let mut out = Vec::new();
        proto::encode_option(&mut out, 4242, b"whatever");
        proto::encode_option(&mut out, proto::OPT_STARTTLS, &[]);
        proto::encode_option(&mut out, proto::OPT_LIST, &[]);
        stream.write_all(&out).await.unwrap();
        assert_eq!(
            read_option_reply(&mut stream).await.reply_type,
            proto::REP_ERR_UNSUP
        );
        assert_eq!(
            read_option_reply(&mut stream).await.reply_type,
            proto::REP_ERR_UNSUP
        );
        let server_reply = read_option_reply(&mut stream).await;
        assert_eq!(server_reply.reply_type, proto::REP_SERVER);
        assert_eq!(
            proto::parse_rep_server(&server_reply.data),
            Ok("vol".to_owned())
        );
        assert_eq!(
            read_option_reply(&mut stream).await.reply_type,
            proto::REP_ACK
        );
        // An option with too much data is skipped and refused, and the connection goes on.
        out.clear();
        out.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&proto::OPT_GO.to_be_bytes());
        out.extend_from_slice(&(proto::OPTION_DATA_BYTES_MAX + 1).to_be_bytes());
        out.resize(out.len() + proto::OPTION_DATA_BYTES_MAX as usize + 1, 0);
        stream.write_all(&out).await.unwrap();
        assert_eq!(
            read_option_reply(&mut stream).await.reply_type,
            proto::REP_ERR_TOO_BIG
        );
        // A malformed GO payload is invalid, not fatal.
        out.clear();
        proto::encode_option(&mut out, proto::OPT_GO, &[0, 0, 0, 9, 0]);
        stream.write_all(&out).await.unwrap();
        assert_eq!(
            read_option_reply(&mut stream).await.reply_type,
            proto::REP_ERR_INVALID
        );
        raw_go(&mut stream, "vol", false).await;
        // Transmission works: a FLUSH gets a simple reply.
        out.clear();
        proto::encode_request(
            &mut out,
            &Request {
                flags: 0,
                kind: Command::Flush,
                cookie: 9,
                offset: 0,
                length_bytes: 0,
            },
        );
        stream.write_all(&out).await.unwrap();
        let reply = read_array::<16, _>(&mut stream).await.unwrap();
        assert_eq!(
            proto::decode_simple_reply(&reply),
            Ok(Some((
                proto::SimpleReply {
                    error: 0,
                    cookie: 9
                },
                16
            )))
        );
        server.stop().await;
    }

    #[tokio::test]
    async fn malformed_handshakes_are_dropped() {
        let server = start(vec![("vol", MemExport::new(false, None))]);
        // Unknown client flags: the protocol requires closing.
        let mut stream = raw(&server.path, 0x80).await;
        expect_closed(&mut stream).await;
        // Bad option magic.
        let mut stream = raw(&server.path, 1).await;
        stream.write_all(&[0x55; 16]).await.unwrap();
        expect_closed(&mut stream).await;
        // EXPORT_NAME of an unknown export cannot be refused any other way.
        let mut stream = raw(&server.path, 1).await;
        let mut out = Vec::new();
        proto::encode_option(&mut out, proto::OPT_EXPORT_NAME, b"nope");
        stream.write_all(&out).await.unwrap();
        expect_closed(&mut stream).await;
        // ABORT gets its ACK, then the server closes.
        let mut stream = raw(&server.path, 1).await;
        out.clear();
        proto::encode_option(&mut out, proto::OPT_ABORT, &[]);
        stream.write_all(&out).await.unwrap();
        assert_eq!(
            read_option_reply(&mut stream).await.reply_type,
            proto::REP_ACK
        );
        expect_closed(&mut stream).await;
        // EXPORT_NAME of a known export, with NO_ZEROES: 10 bytes, then transmission.
        let mut stream = raw(&server.path, 3).await;
        out.clear();
        proto::encode_option(&mut out, proto::OPT_EXPORT_NAME, b"vol");
        stream.write_all(&out).await.unwrap();
        let reply = read_array::<10, _>(&mut stream).await.unwrap();
        let (size, flags) = proto::decode_export_name_reply(&reply, true)
            .unwrap()
            .unwrap()
            .0;
        assert_eq!(size, SIZE_BYTES);
        assert_eq!(flags & proto::FLAG_READ_ONLY, 0);
        assert_ne!(flags & proto::FLAG_CAN_MULTI_CONN, 0);
        server.stop().await;
    }

    /// Past `max_connections` a connection is closed before the greeting; once one closes, a
    /// new one is served again.
    #[tokio::test]
    async fn connections_past_the_limit_are_closed_at_once() {
        let export = MemExport::new(false, None);
        let server = start_with(
            vec![("vol", Arc::clone(&export))],
            ServerLimits { max_connections: 2 },
        );
        let first = NbdClient::connect_unix(&server.path, "vol")
            .await
            .expect("first");
        let mut second = NbdClient::connect_unix(&server.path, "vol")
            .await
            .expect("second");
        let mut third = UnixStream::connect(&server.path).await.expect("connect");
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), third.read(&mut byte))
            .await
            .expect("closed at once, not left waiting");
        assert!(matches!(read, Ok(0) | Err(_)), "the third got a greeting");
        second
            .write(0, &[1; 512], false)
            .await
            .expect("second still served");
        first.disconnect().await.expect("disconnect");
        // Bounded: the slot is freed when the server sees the first connection end.
        let mut served = false;
        for _ in 0..100 {
            if let Ok(client) = NbdClient::connect_unix(&server.path, "vol").await {
                client.disconnect().await.expect("disconnect");
                served = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(served, "a freed slot is never reused");
        second.disconnect().await.expect("disconnect");
        server.stop().await;
    }

    #[tokio::test]
    async fn invalid_requests_get_the_prescribed_errors_and_write_nothing() {
        let export = MemExport::new(false, None);
        let server = start(vec![("vol", Arc::clone(&export))]);
        let mut client = NbdClient::connect_unix(&server.path, "vol")
            .await
            .expect("connect");
        // Past the end.
        assert_eq!(
            errno_of(client.read(SIZE_BYTES - 512, 1024).await),
            Some(proto::EINVAL)
        );
        assert_eq!(
            errno_of(client.write(SIZE_BYTES, &[7; 512], false).await),
            Some(proto::ENOSPC)
        );
        assert_eq!(
            errno_of(client.write_zeroes(SIZE_BYTES, 512, false).await),
            Some(proto::ENOSPC)
        );
        assert_eq!(
            errno_of(client.trim(SIZE_BYTES, 512, false).await),
            Some(proto::EINVAL)
        );
        // Misaligned.
        assert_eq!(errno_of(client.read(1, 512).await), Some(proto::EINVAL));
        assert_eq!(
            errno_of(client.write(0, &[7; 100], false).await),
            Some(proto::EINVAL)
        );
        // Oversized read.
        assert_eq!(
            errno_of(client.read(0, proto::BLOCK_BYTES_MAX + 512).await),
            Some(proto::EINVAL)
        );
        // Unknown command and flags.
        let cookie = client
            .send_request(
                Request {
                    flags: 0,
                    kind: Command::Unknown(77),
                    cookie: 0,
                    offset: 0,
                    length_bytes: 0,
                },
                &[],
            )
            .await
            .unwrap();
        let (got, result) = client.recv_reply().await.unwrap();
        assert_eq!(got, cookie);
        assert_eq!(errno_of(result), Some(proto::EINVAL));
        let cookie = client
            .send_request(
                Request {
                    flags: 1 << 9,
                    kind: Command::Write,
                    cookie: 0,
                    offset: 0,
                    length_bytes: 512,
                },
                &[9; 512],
            )
            .await
            .unwrap();
        let (got, result) = client.recv_reply().await.unwrap();
        assert_eq!(got, cookie);
        assert_eq!(errno_of(result), Some(proto::EINVAL));
        // Nothing reached the export, and the connection still works.
        assert!(export.writes.lock().unwrap().is_empty());
        assert!(client.read(0, 4096).await.unwrap().iter().all(|&b| b == 0));
        assert_eq!(export.count("write", false), 3);
        server.stop().await;
    }

    #[tokio::test]
    async fn read_only_exports_refuse_writes() {
        let export = MemExport::new(true, None);
        let server = start(vec![("vol", Arc::clone(&export))]);
        let mut client = NbdClient::connect_unix(&server.path, "vol")
            .await
            .expect("connect");
        assert_ne!(client.transmission_flags() & proto::FLAG_READ_ONLY, 0);
        assert_eq!(
            errno_of(client.write(0, &[1; 512], false).await),
            Some(proto::EPERM)
        );
        assert_eq!(
            errno_of(client.trim(0, 512, false).await),
            Some(proto::EPERM)
        );
        assert_eq!(
            errno_of(client.write_zeroes(0, 512, false).await),
            Some(proto::EPERM)
        );
        client.read(0, 512).await.expect("reads still work");
        assert!(export.writes.lock().unwrap().is_empty());
        server.stop().await;
    }

    #[tokio::test]
    async fn oversized_write_drops_only_that_connection() {
        let server = start(vec![("vol", MemExport::new(false, None))]);
        let mut good = NbdClient::connect_unix(&server.path, "vol")
            .await
            .expect("connect");
        let mut stream = raw(&server.path, 1).await;
        raw_go(&mut stream, "vol", false).await;
        let mut out = Vec::new();
        let huge = proto::BLOCK_BYTES_MAX + 512;
        proto::encode_request(
            &mut out,
            &Request {
                flags: 0,
                kind: Command::Write,
                cookie: 1,
                offset: 0,
                length_bytes: huge,
            },
        );
        stream.write_all(&out).await.unwrap();
        expect_closed(&mut stream).await;
        good.write(0, &[3; 512], false)
            .await
            .expect("other connection unaffected");
        server.stop().await;
    }

    #[tokio::test]
    async fn garbage_mid_stream_drops_that_connection_while_another_keeps_working() {
        let server = start(vec![("vol", MemExport::new(false, None))]);
        let mut good = NbdClient::connect_unix(&server.path, "vol")
            .await
            .expect("connect");
        let mut bad = raw(&server.path, 1).await;
        raw_go(&mut bad, "vol", true).await;
        let mut out = Vec::new();
        proto::encode_request(
            &mut out,
            &Request {
                flags: 0,
                kind: Command::Read,
                cookie: 1,
                offset: 0,
                length_bytes: 512,
            },
        );
        bad.write_all(&out).await.unwrap();
        // A structured read reply: one OFFSET_DATA chunk with DONE.
        let header = read_array::<20, _>(&mut bad).await.unwrap();
        let (chunk, _) = proto::decode_chunk_header(&header).unwrap().unwrap();
        assert_eq!(
            (chunk.kind, chunk.flags, chunk.cookie, chunk.length_bytes),
            (
                proto::REPLY_TYPE_OFFSET_DATA,
                proto::REPLY_FLAG_DONE,
                1,
                520
            )
        );
        let mut payload = vec![0; 520];
        bad.read_exact(&mut payload).await.unwrap();
        // A structured error chunk for a bad request.
        out.clear();
        proto::encode_request(
            &mut out,
            &Request {
                flags: 0,
                kind: Command::Read,
                cookie: 2,
                offset: 3,
                length_bytes: 512,
            },
        );
        bad.write_all(&out).await.unwrap();
        let header = read_array::<20, _>(&mut bad).await.unwrap();
        let (chunk, _) = proto::decode_chunk_header(&header).unwrap().unwrap();
        let mut payload = vec![0; chunk.length_bytes as usize];
        bad.read_exact(&mut payload).await.unwrap();
        assert!(matches!(
            proto::parse_chunk_payload(chunk.kind, &payload),
            Ok(proto::ChunkPayload::Error {
                error: proto::EINVAL,
                ..
            })
        ));
        bad.write_all(b"this is not an NBD request header.")
            .await
            .unwrap();
        expect_closed(&mut bad).await;
        let data = vec![0x5a; 4096];
        good.write(0, &data, false).await.expect("write");
        assert_eq!(good.read(0, 4096).await.expect("read"), data);
        server.stop().await;
    }

    #[tokio::test]
    async fn replies_come_back_out_of_order() {
        let export = MemExport::new(false, Some(0));
        export.fill(4096, &[4; 512]);
        let server = start(vec![("vol", Arc::clone(&export))]);
        let mut client = NbdClient::connect_unix(&server.path, "vol")
            .await
            .expect("connect");
        let slow = client.send_read(0, 512).await.unwrap();
        let fast = client.send_read(4096, 512).await.unwrap();
        let (first, data) = client.recv_reply().await.unwrap();
        assert_eq!(first, fast, "the ungated read overtakes the gated one");
        assert_eq!(data.unwrap(), vec![4; 512]);
        export.gate.add_permits(1);
        let (second, data) = client.recv_reply().await.unwrap();
        assert_eq!(second, slow);
        assert_eq!(data.unwrap(), vec![0; 512]);
        server.stop().await;
    }

    #[tokio::test]
    async fn pipelined_writes_all_complete_and_disc_waits_for_them() {
        let export = MemExport::new(false, None);
        let server = start(vec![("vol", Arc::clone(&export))]);
        let mut client = NbdClient::connect_unix(&server.path, "vol")
            .await
            .expect("connect");
        let mut cookies = Vec::new();
        for i in 0..64u64 {
            cookies.push(
                client
                    .send_write(i * 4096, &[i as u8; 4096], false)
                    .await
                    .unwrap(),
            );
        }
        let mut seen = Vec::new();
        for _ in 0..64 {
            let (cookie, result) = client.recv_reply().await.unwrap();
            result.expect("write ok");
            seen.push(cookie);
        }
        seen.sort_unstable();
        cookies.sort_unstable();
        assert_eq!(seen, cookies);
        // Send writes and DISC at once: every write must still be applied.
        for i in 0..32u64 {
            client
                .send_write(i * 4096, &[0xee; 4096], true)
                .await
                .unwrap();
        }
        client.disconnect().await.unwrap();
        eventually(|| export.count("write", true) == 96).await;
        server.stop().await;
    }

    #[tokio::test]
    async fn client_vanishing_mid_request_harms_nobody() {
        let export = MemExport::new(false, None);
        let server = start(vec![("vol", Arc::clone(&export))]);
        let mut stream = raw(&server.path, 1).await;
        raw_go(&mut stream, "vol", false).await;
        let mut out = Vec::new();
        proto::encode_request(
            &mut out,
            &Request {
                flags: 0,
                kind: Command::Write,
                cookie: 1,
                offset: 0,
                length_bytes: 4096,
            },
        );
        out.extend_from_slice(&[1; 100]); // only part of the payload
        stream.write_all(&out).await.unwrap();
        drop(stream);
        let mut client = NbdClient::connect_unix(&server.path, "vol")
            .await
            .expect("server still accepts");
        assert!(
            client.read(0, 4096).await.unwrap().iter().all(|&b| b == 0),
            "the torn write was not applied"
        );
        server.stop().await;
    }

    #[tokio::test]
    async fn shutdown_closes_idle_connections() {
        let server = start(vec![("vol", MemExport::new(false, None))]);
        let mut client = NbdClient::connect_unix(&server.path, "vol")
            .await
            .expect("connect");
        client.write(0, &[1; 512], false).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), server.stop())
            .await
            .expect("shutdown is prompt");
        assert!(client.read(0, 512).await.is_err());
    }

    /// Real clients, when installed (see shared/TOOLS.md); switched on by FERRY_NBD_INTEROP=1
    /// because it needs nbdinfo and qemu-io on the machine.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn third_party_clients_interoperate() {
        if std::env::var_os("FERRY_NBD_INTEROP").is_none() {
            return;
        }
        let export = MemExport::new(false, None);
        let server = start(vec![("vol", Arc::clone(&export))]);
        let uri = format!("nbd+unix:///vol?socket={}", server.path.display());
        let run = |program: &'static str, args: Vec<String>| {
            tokio::task::spawn_blocking(move || {
                let output = std::process::Command::new(program)
                    .args(&args)
                    .output()
                    .expect("tool installed");
                let text = format!(
                    "{}{}",
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                );
                assert!(output.status.success(), "{program} failed: {text}");
                text
            })
        };
        let info = run("nbdinfo", vec![uri.clone()]).await.unwrap();
        assert!(info.contains("block_size_minimum: 512"), "{info}");
        assert!(info.contains("can_multi_conn: true"), "{info}");
        let mut args = vec!["-f".to_owned(), "raw".to_owned(), uri.clone()];
        for command in [
            "write -P 0xab 0 64k",
            "read -P 0xab 0 64k",
            "write -f -P 0xcd 64k 4k",
            "read -P 0xcd 64k 4k",
            "write -z 0 4k",
            "read -P 0 0 4k",
            "discard 4k 4k",
            "read -P 0 4k 4k",
            "flush",
        ] {
            args.push("-c".to_owned());
            args.push(command.to_owned());
        }
        let io = run("qemu-io", args).await.unwrap();
        assert!(!io.contains("fail"), "{io}");
        assert!(
            export
                .writes
                .lock()
                .unwrap()
                .iter()
                .any(|&(offset, _, fua)| offset == 65536 && fua),
            "FUA reached the export"
        );
        server.stop().await;
    }
}
