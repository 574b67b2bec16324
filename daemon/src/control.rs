//! The control socket of SPEC §5: server, client and the status types.
//!
//! Only this module knows the wire format: one JSON object per line each way, a request
//! `{"op": ..., ...}` and a reply `{"ok": true, "result": ...}` or
//! `{"ok": false, "error": {"code": ..., "message": ...}}`. Error codes are stable kebab-case
//! strings; scripts match on them, so they never change once shipped.

use std::fmt::Write as _;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use ferry_protocol::replication::OpError;

use crate::accept::{serve_bounded, stop_requested};
use crate::nbd::BoxFuture;

/// Longest request line accepted; a status request is a few dozen bytes.
pub const REQUEST_LENGTH_MAX: usize = 64 * 1024;
/// Longest reply the client accepts: status of many volumes with many replicas fits easily.
const REPLY_LENGTH_MAX: usize = 16 << 20;
/// Concurrent control connections; more wait in the kernel's accept queue.
const CONNECTIONS_MAX: usize = 32;
/// A connection idle this long is closed so forgotten clients do not hold slots forever.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Bounds writing a reply to a client that stopped reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the client waits for the daemon's reply to `status` (and to ops not listed in
/// [`client_timeout`]) before giving up.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
/// Refusal code of `promote`: a peer is still primary and reachable (SPEC §3); the same as
/// the daemon's `OpError::PeerIsPrimary`.
pub const PEER_IS_PRIMARY: &str = "peer-is-primary";

/// How long the client waits for `promote`, `demote` and `resolve`: demote drains in-flight
/// I/O and promote may wait on the peer, so both can take far longer than a status snapshot.
const ROLE_CHANGE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the client waits for `verify`, which reads the whole volume at a capped rate.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);
/// `sun_path` is 108 bytes on Linux, including the terminating NUL.
pub(crate) const UNIX_SOCKET_PATH_LENGTH_MAX: usize = 107;

/// Errors of the control socket, on both sides. Each maps to one stable code ([`code`]).
///
/// [`code`]: ControlError::code
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The request names a volume this node does not have.
    #[error("unknown volume `{volume}`; `ferry status` lists this node's volumes")]
    UnknownVolume { volume: String },
    /// The request's op is not one this daemon knows.
    #[error(
        "unknown op `{op}`; this daemon knows: status, promote, demote, resolve, verify, pause, resume (is the ferry binary newer than the daemon?)"
    )]
    UnknownOp { op: String },
    /// The request is not a JSON object with a string "op", or a field has the wrong type.
    #[error("bad request: {reason}")]
    BadRequest { reason: String },
    /// The request line is longer than [`REQUEST_LENGTH_MAX`].
    #[error("request line longer than {REQUEST_LENGTH_MAX} bytes; send one JSON object per line")]
    RequestTooLarge,
    /// The daemon failed while handling a valid request.
    #[error("internal error: {message}; see the daemon's log")]
    Internal { message: String },
    /// An error reply whose code has no variant of its own (client side).
    #[error("{message}")]
    Remote { code: String, message: String },
    /// A role change, resolve or verify the replicator refused or could not finish (server
    /// side); its code is the refusal's.
    #[error(transparent)]
    Refused(#[from] OpError),
    /// Another daemon answers on the control socket path.
    #[error("another ferry daemon is running on {}; stop it first or give this one another control_socket", path.display())]
    SocketInUse { path: PathBuf },
    /// Something that is not a socket sits at the control socket path.
    #[error("{} exists and is not a socket; remove it or choose another control_socket", path.display())]
    NotASocket { path: PathBuf },
    /// Creating the socket failed.
    #[error("cannot create the control socket {}: {source}; check that its directory exists and is writable", path.display())]
    Bind { path: PathBuf, source: io::Error },
    /// The client could not reach the daemon.
    #[error("cannot connect to {}: {source}; is `ferry run` running? Use --socket or FERRY_SOCKET if it listens elsewhere", path.display())]
    Connect { path: PathBuf, source: io::Error },
    /// Reading or writing the socket failed mid-exchange.
    #[error("control socket I/O failed: {0}")]
    Io(#[from] io::Error),
    /// The daemon's reply is not what SPEC §5 says.
    #[error("the daemon sent a reply that is not understood ({reason}); are the ferry binary and daemon the same version?")]
    BadReply { reason: String },
    /// The daemon did not answer in time.
    #[error("the daemon did not answer within {seconds}s; check its log")]
    Timeout { seconds: u64 },
}

impl ControlError {
    /// The stable kebab-case code sent on the wire.
    pub fn code(&self) -> &str {
        match self {
            ControlError::UnknownVolume { .. } => "unknown-volume",
            ControlError::UnknownOp { .. } => "unknown-op",
            ControlError::BadRequest { .. } => "bad-request",
            ControlError::RequestTooLarge => "request-too-large",
            ControlError::Remote { code, .. } => code,
            ControlError::Refused(error) => error.code(),
            ControlError::Internal { .. }
            | ControlError::SocketInUse { .. }
            | ControlError::NotASocket { .. }
            | ControlError::Bind { .. }
            | ControlError::Connect { .. }
            | ControlError::Io(_)
            | ControlError::BadReply { .. }
            | ControlError::Timeout { .. } => "internal",
        }
    }
}

/// What the daemon answers to control requests. Implementations are called on the runtime's
/// threads: `status` takes a snapshot and must not block for long; the role changes are async
/// and may take as long as they need (the client waits up to 120 s for them).
///
/// A refusal is [`ControlError::Refused`] carrying the replicator's [`OpError`], whose stable
/// kebab-case code and message (which says what to do) go on the wire; `ferry` prints the
/// message and exits 1. An unknown volume is [`ControlError::UnknownVolume`].
pub trait ControlHandler: Send + Sync + 'static {
    /// Status of one volume, or of all when `volume` is None. An unknown volume is
    /// [`ControlError::UnknownVolume`].
    fn status(&self, volume: Option<&str>) -> Result<StatusResult, ControlError>;

    /// Makes this node's copy of `volume` primary (SPEC §3). Returns a JSON result object like
    /// `{"volume": "pg-data", "role": "primary", "generation": N}`; refusals carry codes like
    /// `peer-is-primary` and `not-consistent`. `force` overrides an unreachable peer at once,
    /// without waiting for `peer_timeout`.
    fn promote(&self, volume: &str, force: bool) -> BoxFuture<'_, Result<Value, ControlError>> {
        let _ = (volume, force);
        Box::pin(async move {
            Err(ControlError::UnknownOp {
                op: "promote".into(),
            })
        })
    }

    /// Stops accepting writes on `volume` (draining in-flight I/O) and makes this node's copy
    /// secondary (SPEC §3). Returns a JSON result object like
    /// `{"volume": "pg-data", "role": "secondary", "generation": N}`; refusals as for
    /// [`promote`](ControlHandler::promote).
    fn demote(&self, volume: &str) -> BoxFuture<'_, Result<Value, ControlError>> {
        let _ = volume;
        Box::pin(async move {
            Err(ControlError::UnknownOp {
                op: "demote".into(),
            })
        })
    }

    /// `ferry resolve VOLUME --discard-local [--peer NAME]`: this copy gives up its writes
    /// since a split brain and is resynced from `peer` (SPEC §3). Returns
    /// `{"volume": ..., "role": "secondary", "resolving_with": PEER}`.
    fn resolve(
        &self,
        volume: &str,
        peer: Option<&str>,
    ) -> BoxFuture<'_, Result<Value, ControlError>> {
        let _ = (volume, peer);
        Box::pin(async move {
            Err(ControlError::UnknownOp {
                op: "resolve".into(),
            })
        })
    }

    /// `ferry pause` / `ferry resume VOLUME [--peer NAME]` (SPEC §3): stops or restarts
    /// shipping to regional peers. Returns `{"volume": ..., "paused": bool, "peers": [...]}`.
    fn pause(
        &self,
        volume: &str,
        peer: Option<&str>,
        paused: bool,
    ) -> BoxFuture<'_, Result<Value, ControlError>> {
        let _ = (volume, peer, paused);
        Box::pin(async move {
            Err(ControlError::UnknownOp {
                op: if paused { "pause" } else { "resume" }.into(),
            })
        })
    }

    /// `ferry verify VOLUME [--peer NAME] [--repair]` (SPEC §3): returns a [`VerifyReport`]
    /// once the comparison (and the repair) is over.
    fn verify(
        &self,
        volume: &str,
        peer: Option<&str>,
        repair: bool,
    ) -> BoxFuture<'_, Result<Value, ControlError>> {
        let _ = (volume, peer, repair);
        Box::pin(async move {
            Err(ControlError::UnknownOp {
                op: "verify".into(),
            })
        })
    }
}

/// The version of the `status` result's layout, its `schema_version`. It grows when a field
/// changes meaning or disappears; fields are added without a new version, so scripts ignore
/// the fields they do not know.
pub const STATUS_SCHEMA_VERSION: u32 = 1;

/// The `result` of `status` (SPEC §5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusResult {
    /// [`STATUS_SCHEMA_VERSION`] of the daemon that answered (0: a daemon from before the
    /// field existed).
    #[serde(default)]
    pub schema_version: u32,
    pub node: String,
    pub volumes: Vec<VolumeStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub name: String,
    /// "primary" or "secondary".
    pub role: String,
    pub size_bytes: u64,
    pub journal: JournalStatus,
    pub generation: u64,
    /// False while a resync into this copy has not finished: it may not be promoted.
    pub consistent: bool,
    /// Why client writes are held (fencing after a restart, with the command that overrides
    /// it; a resync's hand-over), or None.
    pub writes_held: Option<String>,
    /// The peer this copy receives from, when it is a secondary following a primary.
    pub following: Option<String>,
    /// `ferry resolve --discard-local` named this peer; cleared when its resync completes.
    pub resolving_with: Option<String>,
    pub replicas: Vec<ReplicaStatus>,
    pub recovery: RecoveryStatus,
    /// The backing device path.
    pub device: String,
    /// Why the volume stopped serving writes (a failed journal or device I/O), or None.
    pub failure: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalStatus {
    pub used_bytes: u64,
    pub capacity_bytes: u64,
    pub head_lsn: u64,
    pub applied_lsn: u64,
    pub unapplied_bytes: u64,
    /// Writes that waited for journal space since start.
    pub full_waits: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    pub peer: String,
    /// "metro" or "regional".
    pub mode: String,
    /// One of the states of SPEC §5 ("connecting", "in-sync", ...).
    pub state: String,
    pub acked_lsn: u64,
    pub lag_bytes: u64,
    pub lag_seconds: f64,
    pub resync_remaining_bytes: u64,
    /// The running resync's size (bytes done plus `resync_remaining_bytes`); 0 when no
    /// resync is sent to the peer.
    #[serde(default)]
    pub resync_total_bytes: u64,
    /// How fast the running resync progressed over the last 10 s; None while there is no
    /// resync or it has run for less than a second.
    #[serde(default)]
    pub resync_rate_bytes_per_second: Option<f64>,
    /// `resync_remaining_bytes` at that rate; None without a rate or with a rate of 0 (a
    /// stalled resync).
    #[serde(default)]
    pub resync_eta_seconds: Option<f64>,
    /// Bytes sent by the last completed resync.
    pub resynced_bytes: u64,
    /// Why the replica is not in sync, or None.
    pub last_error: Option<String>,
    /// Bytes of the volume the dirty map kept for this peer marks.
    pub dirty_bytes: u64,
    /// The peer has been in sync with this copy (it may hold its data: fencing and
    /// `on_disconnect = "suspend"` wait for it).
    pub protecting: bool,
    /// The last `ferry verify` against this peer.
    pub verify: Option<VerifyReport>,
    /// A delta resync this copy receives from the peer: "staged" (stored whole first; this
    /// copy stays at its last batch boundary and can be promoted) or "in-place" (this copy
    /// is inconsistent until it ends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catch_up: Option<String>,
}

/// What a `ferry verify` found (the `verify` reply, and `verify` in a replica's status).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifyReport {
    pub volume: String,
    pub peer: String,
    pub running: bool,
    pub repair: bool,
    pub total_bytes: u64,
    /// Bytes compared to a verdict (equal or different). With `busy_bytes` it makes
    /// `total_bytes` once the verify ran to its end; less means it stopped early.
    pub checked_bytes: u64,
    pub differing_bytes: u64,
    /// The first differing ranges, `[offset, length]` in bytes.
    pub differing_ranges: Vec<(u64, u64)>,
    /// Bytes not compared because writes kept changing them.
    pub busy_bytes: u64,
    /// `--repair` resynced the differing ranges.
    pub repaired: bool,
}

/// What the last start's journal replay did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecoveryStatus {
    pub records_replayed: u64,
    pub bytes_replayed: u64,
    pub torn_tail_bytes: u64,
    /// Why replay stopped before the end of the written journal (a torn or corrupt record).
    pub stopped_reason: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Server.

/// Creates the control socket at `path` with mode 0600. A stale socket (nothing answers on it)
/// is replaced; a live one is refused. Must be called inside a tokio runtime.
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let bind_error = |source| ControlError::Bind {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            if !meta.file_type().is_socket() {
                return Err(ControlError::NotASocket {
                    path: path.to_path_buf(),
                });
            }
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => {
                    return Err(ControlError::SocketInUse {
                        path: path.to_path_buf(),
                    })
                }
                // Nobody listens: left behind by a daemon that did not exit cleanly.
                Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => {}
                Err(error) => return Err(bind_error(error)),
            }
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(bind_error(error)),
    }
    let listener = bind_private(path).map_err(bind_error)?;
    listener.set_nonblocking(true).map_err(bind_error)?;
    UnixListener::from_std(listener).map_err(bind_error)
}

/// Binds so that the socket is never reachable with looser permissions than 0600: it is
/// created inside a fresh 0700 directory, chmodded, then renamed into place (which also
/// replaces a stale socket atomically).
fn bind_private(path: &Path) -> io::Result<std::os::unix::net::UnixListener> {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let staging = tempfile::Builder::new().prefix(".f").tempdir_in(parent)?;
    let staged = staging.path().join("s");
    if staged.as_os_str().len() > UNIX_SOCKET_PATH_LENGTH_MAX {
        // The staging path does not fit in sun_path; bind in place. The window until chmod
        // is still closed by the default umask, which denies connect (write) to others.
        let _ = std::fs::remove_file(path);
        let listener = std::os::unix::net::UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        return Ok(listener);
    }
    let listener = std::os::unix::net::UnixListener::bind(&staged)?;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&staged, path)?;
    Ok(listener)
}

/// Serves control requests until `shutdown` becomes true (or its sender is dropped).
pub async fn serve(
    listener: UnixListener,
    handler: Arc<dyn ControlHandler>,
    shutdown: watch::Receiver<bool>,
) {
    serve_bounded(
        listener,
        CONNECTIONS_MAX,
        "control socket",
        shutdown,
        |stream, shutdown| {
            let handler = Arc::clone(&handler);
            async move { serve_connection(stream, handler.as_ref(), shutdown).await }
        },
    )
    .await;
}

enum LineRead {
    Line,
    TooLong,
    Eof,
}

/// Reads one line (without its newline) of at most `max` bytes into `line`.
async fn read_line_capped<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    line: &mut Vec<u8>,
    max: usize,
) -> io::Result<LineRead> {
    line.clear();
    // `max + 1` bytes: room for the newline of a line of exactly `max` bytes.
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    let read = reader.take(limit).read_until(b'\n', line).await?;
    if read == 0 {
        return Ok(LineRead::Eof);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
        return Ok(LineRead::Line);
    }
    // No newline: either the cap was hit, or the peer closed after an unterminated last line.
    Ok(if line.len() > max {
        LineRead::TooLong
    } else {
        LineRead::Line
    })
}

async fn serve_connection(
    stream: UnixStream,
    handler: &dyn ControlHandler,
    mut shutdown: watch::Receiver<bool>,
) {
    let (read_half, mut write_half) = stream.into_split();
    let mut reader = BufReader::new(read_half);
    let mut line = Vec::new();
    loop {
        let read = tokio::select! {
            read = tokio::time::timeout(
                IDLE_TIMEOUT,
                read_line_capped(&mut reader, &mut line, REQUEST_LENGTH_MAX),
            ) => read,
            _ = stop_requested(&mut shutdown) => return,
        };
        let (reply, keep_open) = match read {
            Err(_) | Ok(Err(_)) | Ok(Ok(LineRead::Eof)) => return,
            // The rest of the oversized line is still unread, so the stream cannot be
            // resynchronized: answer and close.
            Ok(Ok(LineRead::TooLong)) => (error_reply(&ControlError::RequestTooLarge), false),
            Ok(Ok(LineRead::Line)) => {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                (handle_line(&line, handler).await, true)
            }
        };
        let mut bytes = reply.to_string().into_bytes();
        bytes.push(b'\n');
        match tokio::time::timeout(WRITE_TIMEOUT, write_half.write_all(&bytes)).await {
            Ok(Ok(())) if keep_open => {}
            _ => return,
        }
    }
}

async fn handle_line(line: &[u8], handler: &dyn ControlHandler) -> Value {
    match dispatch(line, handler).await {
        Ok(result) => json!({ "ok": true, "result": result }),
        Err(error) => {
            if matches!(error, ControlError::Internal { .. }) {
                tracing::error!(%error, "control request failed");
            }
            error_reply(&error)
        }
    }
}

fn error_reply(error: &ControlError) -> Value {
    json!({ "ok": false, "error": { "code": error.code(), "message": error.to_string() } })
}

async fn dispatch(line: &[u8], handler: &dyn ControlHandler) -> Result<Value, ControlError> {
    let request: Value =
        serde_json::from_slice(line).map_err(|error| ControlError::BadRequest {
            reason: format!(
                "not JSON ({error}); send one object per line like {{\"op\":\"status\"}}"
            ),
        })?;
    let Value::Object(fields) = request else {
        return Err(ControlError::BadRequest {
            reason: "a request is a JSON object like {\"op\":\"status\"}".to_string(),
        });
    };
    let Some(op) = fields.get("op").and_then(Value::as_str) else {
        return Err(ControlError::BadRequest {
            reason: "the request has no string \"op\"; send e.g. {\"op\":\"status\"}".to_string(),
        });
    };
    match op {
        "status" => {
            let volume = match fields.get("volume") {
                None | Some(Value::Null) => None,
                Some(Value::String(volume)) => Some(volume.as_str()),
                Some(_) => {
                    return Err(ControlError::BadRequest {
                        reason: "\"volume\" must be a string".to_string(),
                    })
                }
            };
            let status = handler.status(volume)?;
            serde_json::to_value(status).map_err(|error| ControlError::Internal {
                message: format!("encoding status: {error}"),
            })
        }
        "promote" => {
            let volume = required_volume(&fields, op)?;
            let force = optional_bool(&fields, "force")?;
            handler.promote(volume, force).await
        }
        "demote" => {
            let volume = required_volume(&fields, op)?;
            handler.demote(volume).await
        }
        "resolve" => {
            let volume = required_volume(&fields, op)?;
            let peer = optional_string(&fields, "peer")?;
            match fields.get("discard_local") {
                Some(Value::Bool(true)) => {}
                _ => {
                    return Err(ControlError::BadRequest {
                        reason: "\"resolve\" needs \"discard_local\": true: it throws away this copy's writes since the split brain".to_string(),
                    })
                }
            }
            handler.resolve(volume, peer).await
        }
        "pause" | "resume" => {
            let volume = required_volume(&fields, op)?;
            let peer = optional_string(&fields, "peer")?;
            handler.pause(volume, peer, op == "pause").await
        }
        "verify" => {
            let volume = required_volume(&fields, op)?;
            let peer = optional_string(&fields, "peer")?;
            let repair = optional_bool(&fields, "repair")?;
            handler.verify(volume, peer, repair).await
        }
        other => Err(ControlError::UnknownOp {
            op: other.to_string(),
        }),
    }
}

/// An optional boolean field (absent or null: false).
fn optional_bool(
    fields: &serde_json::Map<String, Value>,
    name: &str,
) -> Result<bool, ControlError> {
    match fields.get(name) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(value)) => Ok(*value),
        Some(_) => Err(ControlError::BadRequest {
            reason: format!("\"{name}\" must be true or false"),
        }),
    }
}

/// An optional string field (absent or null: None).
fn optional_string<'a>(
    fields: &'a serde_json::Map<String, Value>,
    name: &str,
) -> Result<Option<&'a str>, ControlError> {
    match fields.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(value)) => Ok(Some(value)),
        Some(_) => Err(ControlError::BadRequest {
            reason: format!("\"{name}\" must be a string"),
        }),
    }
}

/// The string "volume" of an op that needs one.
fn required_volume<'a>(
    fields: &'a serde_json::Map<String, Value>,
    op: &str,
) -> Result<&'a str, ControlError> {
    match fields.get("volume") {
        Some(Value::String(volume)) => Ok(volume),
        None | Some(Value::Null) => Err(ControlError::BadRequest {
            reason: format!(
                "\"{op}\" needs a string \"volume\", like {{\"op\":\"{op}\",\"volume\":\"pg-data\"}}"
            ),
        }),
        Some(_) => Err(ControlError::BadRequest {
            reason: "\"volume\" must be a string".to_string(),
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// Client.

/// Sends one request to the daemon at `socket` and returns the `result` of its reply; an error
/// reply becomes the matching [`ControlError`]. Waits at most [`client_timeout`] of the
/// request's op.
pub async fn request(socket: &Path, req: Value) -> Result<Value, ControlError> {
    let timeout = client_timeout(req.get("op").and_then(Value::as_str).unwrap_or_default());
    request_with_timeout(socket, req, timeout).await
}

/// [`request`] with an explicit bound on the whole exchange (connect, send, reply).
pub async fn request_with_timeout(
    socket: &Path,
    req: Value,
    timeout: Duration,
) -> Result<Value, ControlError> {
    tokio::time::timeout(timeout, exchange(socket, &req))
        .await
        .map_err(|_| ControlError::Timeout {
            seconds: timeout.as_secs(),
        })?
}

/// How long the client waits for the reply to `op`: 120 s for `promote`, `demote` and
/// `resolve` (they drain I/O and may wait on the peer), a week for `verify` (it reads the
/// whole volume), 60 s for everything else.
pub fn client_timeout(op: &str) -> Duration {
    match op {
        "promote" | "demote" | "resolve" => ROLE_CHANGE_TIMEOUT,
        "verify" => VERIFY_TIMEOUT,
        _ => CLIENT_TIMEOUT,
    }
}

async fn exchange(socket: &Path, req: &Value) -> Result<Value, ControlError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| ControlError::Connect {
            path: socket.to_path_buf(),
            source,
        })?;
    let (read_half, mut write_half) = stream.into_split();
    let mut bytes = req.to_string().into_bytes();
    bytes.push(b'\n');
    write_half.write_all(&bytes).await?;
    let mut reader = BufReader::new(read_half);
    let mut line = Vec::new();
    match read_line_capped(&mut reader, &mut line, REPLY_LENGTH_MAX).await? {
        LineRead::Line => {}
        LineRead::TooLong => {
            return Err(ControlError::BadReply {
                reason: format!("longer than {REPLY_LENGTH_MAX} bytes"),
            })
        }
        LineRead::Eof => {
            return Err(ControlError::BadReply {
                reason: "the connection closed without a reply".to_string(),
            })
        }
    }
    let reply: Value = serde_json::from_slice(&line).map_err(|error| ControlError::BadReply {
        reason: format!("not JSON: {error}"),
    })?;
    match reply.get("ok").and_then(Value::as_bool) {
        Some(true) => reply
            .get("result")
            .cloned()
            .ok_or_else(|| ControlError::BadReply {
                reason: "\"ok\": true without \"result\"".to_string(),
            }),
        Some(false) => Err(remote_error(req, &reply)),
        None => Err(ControlError::BadReply {
            reason: "no boolean \"ok\"".to_string(),
        }),
    }
}

fn remote_error(req: &Value, reply: &Value) -> ControlError {
    let error = reply.get("error");
    let field = |name: &str| {
        error
            .and_then(|e| e.get(name))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let (code, message) = (field("code"), field("message"));
    let request_field = |name: &str| req.get(name).and_then(Value::as_str).map(str::to_string);
    match code.as_str() {
        "unknown-volume" => ControlError::UnknownVolume {
            volume: request_field("volume").unwrap_or(message),
        },
        "unknown-op" => ControlError::UnknownOp {
            op: request_field("op").unwrap_or(message),
        },
        "bad-request" => ControlError::BadRequest { reason: message },
        "request-too-large" => ControlError::RequestTooLarge,
        "" => ControlError::BadReply {
            reason: "an error reply without a code".to_string(),
        },
        _ => ControlError::Remote { code, message },
    }
}

// ---------------------------------------------------------------------------------------------
// Human output.

/// "10.0 GiB", "512 B": binary units, like the config.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    // f64 loses precision above 2^53 bytes, irrelevant for one decimal place.
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Renders rows as left-aligned columns separated by two spaces.
pub fn render_table(rows: &[Vec<String>], out: &mut String) {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|column| {
            rows.iter()
                .filter_map(|row| row.get(column))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let mut line = String::new();
        for (column, cell) in row.iter().enumerate() {
            if column + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<width$}  ", width = widths[column]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

/// One line about a verify, for `ferry status` and `ferry verify`.
pub fn render_verify(v: &VerifyReport) -> String {
    let mut line = format!(
        "verify of {} against {}: {} of {} compared",
        v.volume,
        v.peer,
        human_bytes(v.checked_bytes),
        human_bytes(v.total_bytes)
    );
    // Stopped before every byte had a verdict (the link lost, a resync started): what was
    // not compared may differ, so it never reads as "no difference".
    let stopped_early = !v.running && v.checked_bytes + v.busy_bytes < v.total_bytes;
    if v.running {
        line.push_str(", running");
    } else if stopped_early {
        let _ = write!(
            line,
            ", STOPPED EARLY ({} not compared: run it again)",
            human_bytes(v.total_bytes - v.checked_bytes - v.busy_bytes)
        );
    }
    if v.differing_bytes == 0 {
        if !stopped_early {
            line.push_str(", no difference");
        }
    } else {
        let ranges: Vec<String> = v
            .differing_ranges
            .iter()
            .take(8)
            .map(|(offset, len)| format!("{offset}+{len}"))
            .collect();
        let _ = write!(
            line,
            ", {} DIFFER (bytes {}{})",
            human_bytes(v.differing_bytes),
            ranges.join(", "),
            if v.differing_ranges.len() > 8 {
                ", ..."
            } else {
                ""
            }
        );
        if v.repaired {
            line.push_str(", repaired");
        }
    }
    if v.busy_bytes > 0 {
        let _ = write!(
            line,
            ", {} not compared (written throughout)",
            human_bytes(v.busy_bytes)
        );
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    struct FixedStatus(StatusResult);

    impl ControlHandler for FixedStatus {
        fn status(&self, volume: Option<&str>) -> Result<StatusResult, ControlError> {
            let mut status = self.0.clone();
            if let Some(name) = volume {
                status.volumes.retain(|v| v.name == name);
                if status.volumes.is_empty() {
                    return Err(ControlError::UnknownVolume {
                        volume: name.to_string(),
                    });
                }
            }
            Ok(status)
        }
    }

    fn volume(name: &str) -> VolumeStatus {
        VolumeStatus {
            name: name.to_string(),
            role: "primary".to_string(),
            size_bytes: 10 << 30,
            journal: JournalStatus {
                used_bytes: 256 << 20,
                capacity_bytes: 1 << 30,
                head_lsn: 1234,
                applied_lsn: 1200,
                unapplied_bytes: 4096,
                full_waits: 2,
            },
            generation: 3,
            consistent: true,
            writes_held: None,
            following: None,
            resolving_with: None,
            replicas: Vec::new(),
            recovery: RecoveryStatus {
                records_replayed: 12,
                bytes_replayed: 48 << 10,
                torn_tail_bytes: 512,
                stopped_reason: Some("checksum mismatch at lsn 1235".to_string()),
            },
            device: format!("/dev/vg0/{name}"),
            failure: None,
        }
    }

    /// A node whose `logs` has a peer that is still primary, and whose `slow` demote waits
    /// for `release` (an in-flight drain). Records each role change it is asked for.
    struct Roles {
        calls: std::sync::Mutex<Vec<String>>,
        release: tokio::sync::Notify,
    }

    impl Roles {
        fn new() -> Arc<Roles> {
            Arc::new(Roles {
                calls: std::sync::Mutex::new(Vec::new()),
                release: tokio::sync::Notify::new(),
            })
        }

        fn calls(&self) -> Vec<String> {
            self.calls.lock().expect("not poisoned").clone()
        }

        fn record(&self, call: String) {
            self.calls.lock().expect("not poisoned").push(call);
        }
    }

    impl ControlHandler for Roles {
        fn status(&self, volume: Option<&str>) -> Result<StatusResult, ControlError> {
            FixedStatus(sample()).status(volume)
        }

        fn promote(&self, volume: &str, force: bool) -> BoxFuture<'_, Result<Value, ControlError>> {
            self.record(format!("promote {volume} force={force}"));
            let volume = volume.to_string();
            Box::pin(async move {
                // Really asynchronous: the reply is produced after a yield.
                tokio::task::yield_now().await;
                match volume.as_str() {
                    "logs" if !force => Err(ControlError::Remote {
                        code: PEER_IS_PRIMARY.to_string(),
                        message: "site-b is still primary for logs and reachable; run `ferry demote logs` there first".to_string(),
                    }),
                    "pg-data" | "logs" => {
                        Ok(json!({"volume": volume, "role": "primary", "generation": 0x2a_00c3u64}))
                    }
                    _ => Err(ControlError::UnknownVolume { volume }),
                }
            })
        }

        fn demote(&self, volume: &str) -> BoxFuture<'_, Result<Value, ControlError>> {
            self.record(format!("demote {volume}"));
            let volume = volume.to_string();
            Box::pin(async move {
                if volume == "slow" {
                    self.release.notified().await;
                }
                Ok(json!({"volume": volume, "role": "secondary", "generation": 3}))
            })
        }
    }

    fn sample() -> StatusResult {
        StatusResult {
            schema_version: STATUS_SCHEMA_VERSION,
            node: "site-a".to_string(),
            volumes: vec![volume("pg-data"), volume("logs")],
        }
    }

    struct Server {
        _dir: tempfile::TempDir,
        socket: PathBuf,
        stop: watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
    }

    async fn start() -> Server {
        start_with(Arc::new(FixedStatus(sample()))).await
    }

    async fn start_with(handler: Arc<dyn ControlHandler>) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("ferry.sock");
        let listener = bind(&socket).expect("bind");
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(serve(listener, handler, stopped));
        Server {
            _dir: dir,
            socket,
            stop,
            task,
        }
    }

    impl Server {
        async fn stop(self) {
            self.stop.send(true).expect("server alive");
            tokio::time::timeout(Duration::from_secs(5), self.task)
                .await
                .expect("server stops")
                .expect("server task ok");
        }
    }

    /// Sends raw lines on one connection and returns one parsed reply per line.
    /// The error code of each reply, "ok" for a success.
    fn error_codes(replies: &[Value]) -> Vec<&str> {
        replies
            .iter()
            .map(|r| r["error"]["code"].as_str().unwrap_or("ok"))
            .collect()
    }

    async fn raw_exchange(socket: &Path, lines: &[&[u8]]) -> Vec<Value> {
        let stream = UnixStream::connect(socket).await.expect("connect");
        let (read_half, mut write_half) = stream.into_split();
        let mut reader = BufReader::new(read_half);
        let mut replies = Vec::new();
        for line in lines {
            write_half.write_all(line).await.expect("write");
            write_half.write_all(b"\n").await.expect("write");
            let mut reply = String::new();
            reader.read_line(&mut reply).await.expect("read");
            replies.push(serde_json::from_str(&reply).expect("reply is JSON"));
        }
        replies
    }

    #[tokio::test]
    async fn status_over_a_real_socket() {
        let server = start().await;
        let result = request(&server.socket, json!({"op": "status"}))
            .await
            .expect("status");
        let status: StatusResult = serde_json::from_value(result.clone()).expect("typed");
        assert_eq!(status, sample());
        // The SPEC §5 field names are on the wire.
        assert_eq!(result["volumes"][0]["journal"]["head_lsn"], 1234);
        assert_eq!(result["volumes"][0]["size_bytes"], 10u64 << 30);

        let one = request(&server.socket, json!({"op": "status", "volume": "logs"}))
            .await
            .expect("status of one volume");
        assert_eq!(one["volumes"].as_array().map(Vec::len), Some(1));

        let error = request(&server.socket, json!({"op": "status", "volume": "nope"}))
            .await
            .unwrap_err();
        assert!(
            matches!(&error, ControlError::UnknownVolume { volume } if volume == "nope"),
            "{error:?}"
        );
        server.stop().await;
    }

    #[tokio::test]
    async fn errors_keep_the_connection_open() {
        let server = start().await;
        let replies = raw_exchange(
            &server.socket,
            &[
                b"{\"op\":\"frobnicate\"}",
                b"{not json",
                b"[1,2]",
                b"{\"op\":\"status\",\"volume\":7}",
                b"{\"op\":\"status\",\"volume\":\"nope\"}",
                b"{\"op\":\"status\"}",
            ],
        )
        .await;
        let codes = error_codes(&replies);
        assert_eq!(
            codes,
            [
                "unknown-op",
                "bad-request",
                "bad-request",
                "bad-request",
                "unknown-volume",
                "ok"
            ]
        );
        for reply in &replies[..5] {
            assert_eq!(reply["ok"], false);
            assert!(reply["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()));
        }
        assert_eq!(replies[5]["ok"], true);
        assert_eq!(replies[5]["result"]["node"], "site-a");

        let error = request(&server.socket, json!({"op": "frobnicate"}))
            .await
            .unwrap_err();
        assert_eq!(error.code(), "unknown-op");
        server.stop().await;
    }

    #[tokio::test]
    async fn oversized_request_is_refused() {
        let server = start().await;
        let huge = vec![b'x'; REQUEST_LENGTH_MAX + 1];
        let replies = raw_exchange(&server.socket, &[&huge]).await;
        assert_eq!(replies[0]["error"]["code"], "request-too-large");
        // The server is still there for the next client.
        request(&server.socket, json!({"op": "status"}))
            .await
            .expect("status after oversize");
        server.stop().await;
    }

    #[tokio::test]
    async fn socket_is_private_and_stale_sockets_are_replaced() {
        let server = start().await;
        let mode = std::fs::metadata(&server.socket)
            .expect("socket exists")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // A live daemon is not displaced.
        let error = bind(&server.socket).unwrap_err();
        assert!(matches!(error, ControlError::SocketInUse { .. }), "{error}");
        // Stop serving and drop the listener: the socket file stays behind, stale.
        let Server {
            _dir: dir,
            socket,
            stop,
            task,
        } = server;
        stop.send(true).expect("alive");
        task.await.expect("stopped");
        assert!(socket.exists());
        drop(bind(&socket).expect("stale socket is replaced"));
        // Something that is not a socket is never removed.
        let file = dir.path().join("not-a-socket");
        std::fs::write(&file, b"data").expect("write");
        assert!(matches!(
            bind(&file).unwrap_err(),
            ControlError::NotASocket { .. }
        ));
        assert_eq!(std::fs::read(&file).expect("still there"), b"data");
    }

    #[tokio::test]
    async fn client_reports_a_missing_daemon() {
        let dir = tempfile::tempdir().expect("tempdir");
        let error = request(&dir.path().join("none.sock"), json!({"op": "status"}))
            .await
            .unwrap_err();
        assert!(matches!(error, ControlError::Connect { .. }), "{error}");
        assert!(error.to_string().contains("is `ferry run` running?"));
    }

    #[test]
    fn human_bytes_uses_binary_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(10 << 30), "10.0 GiB");
    }

    #[test]
    fn a_verify_stopped_early_never_reads_as_no_difference() {
        let mut report = VerifyReport {
            volume: "pg-data".into(),
            peer: "site-b".into(),
            running: false,
            repair: false,
            total_bytes: 64 << 20,
            checked_bytes: 63 << 20,
            differing_bytes: 0,
            differing_ranges: Vec::new(),
            busy_bytes: 0,
            repaired: false,
        };
        let line = render_verify(&report);
        assert!(
            line.contains("STOPPED EARLY (1.0 MiB not compared"),
            "{line}"
        );
        assert!(!line.contains("no difference"), "{line}");
        report.busy_bytes = 1 << 20;
        let line = render_verify(&report);
        assert!(line.contains("no difference"), "{line}");
        assert!(
            line.contains("1.0 MiB not compared (written throughout)"),
            "{line}"
        );
        assert!(!line.contains("STOPPED"), "{line}");
        report.running = true;
        report.busy_bytes = 0;
        let line = render_verify(&report);
        assert!(line.contains(", running"), "{line}");
        assert!(!line.contains("STOPPED"), "{line}");
    }

    #[tokio::test]
    async fn promote_and_demote_over_a_real_socket() {
        let roles = Roles::new();
        let server = start_with(roles.clone()).await;

        let result = request(
            &server.socket,
            json!({"op": "promote", "volume": "pg-data", "force": false}),
        )
        .await
        .expect("promote");
        assert_eq!(
            result,
            json!({"volume": "pg-data", "role": "primary", "generation": 0x2a_00c3u64})
        );

        // A refusal reaches the client with its code and message intact.
        let error = request(&server.socket, json!({"op": "promote", "volume": "logs"}))
            .await
            .unwrap_err();
        match &error {
            ControlError::Remote { code, message } => {
                assert_eq!(code, PEER_IS_PRIMARY);
                assert!(message.contains("ferry demote logs"), "{message}");
            }
            other => panic!("expected a remote refusal, got {other:?}"),
        }
        assert_eq!(error.code(), "peer-is-primary");

        let result = request(
            &server.socket,
            json!({"op": "promote", "volume": "logs", "force": true}),
        )
        .await
        .expect("forced promote");
        assert_eq!(result["role"], "primary");

        let error = request(&server.socket, json!({"op": "promote", "volume": "nope"}))
            .await
            .unwrap_err();
        assert!(
            matches!(&error, ControlError::UnknownVolume { volume } if volume == "nope"),
            "{error:?}"
        );

        let result = request(&server.socket, json!({"op": "demote", "volume": "pg-data"}))
            .await
            .expect("demote");
        assert_eq!(
            result,
            json!({"volume": "pg-data", "role": "secondary", "generation": 3})
        );

        assert_eq!(
            roles.calls(),
            [
                "promote pg-data force=false",
                "promote logs force=false",
                "promote logs force=true",
                "promote nope force=false",
                "demote pg-data",
            ]
        );
        server.stop().await;
    }

    #[tokio::test]
    async fn role_change_requests_are_validated() {
        let roles = Roles::new();
        let server = start_with(roles.clone()).await;
        let replies = raw_exchange(
            &server.socket,
            &[
                b"{\"op\":\"promote\"}",
                b"{\"op\":\"promote\",\"volume\":7}",
                b"{\"op\":\"promote\",\"volume\":null}",
                b"{\"op\":\"promote\",\"volume\":\"pg-data\",\"force\":\"yes\"}",
                b"{\"op\":\"promote\",\"volume\":\"pg-data\",\"force\":1}",
                b"{\"op\":\"demote\"}",
                b"{\"op\":\"demote\",\"volume\":[\"pg-data\"]}",
                b"{\"op\":\"promote\",\"volume\":\"pg-data\",\"force\":null}",
                b"{\"op\":\"promote\",\"volume\":\"pg-data\",\"force\":true}",
                b"{\"op\":\"promote\",\"volume\":\"pg-data\"}",
            ],
        )
        .await;
        let codes = error_codes(&replies);
        assert_eq!(
            codes,
            [
                "bad-request",
                "bad-request",
                "bad-request",
                "bad-request",
                "bad-request",
                "bad-request",
                "bad-request",
                "ok",
                "ok",
                "ok"
            ]
        );
        assert!(replies[0]["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("needs a string \"volume\"")));
        assert!(replies[3]["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("\"force\" must be true or false")));
        // Only the valid requests reached the handler; absent and null force mean false.
        assert_eq!(
            roles.calls(),
            [
                "promote pg-data force=false",
                "promote pg-data force=true",
                "promote pg-data force=false",
            ]
        );
        server.stop().await;
    }

    #[tokio::test]
    async fn default_role_changes_are_unknown_ops() {
        // FixedStatus implements only status, like a daemon without role changes.
        let server = start().await;
        for (op, req) in [
            (
                "promote",
                json!({"op": "promote", "volume": "pg-data", "force": true}),
            ),
            ("demote", json!({"op": "demote", "volume": "pg-data"})),
        ] {
            let error = request(&server.socket, req).await.unwrap_err();
            assert!(
                matches!(&error, ControlError::UnknownOp { op: got } if got == op),
                "{error:?}"
            );
            assert_eq!(error.code(), "unknown-op");
            assert!(
                error.to_string().contains("status, promote, demote"),
                "{error}"
            );
        }
        server.stop().await;
    }

    #[tokio::test]
    async fn a_long_role_change_blocks_neither_status_nor_the_client_timeout() {
        assert_eq!(client_timeout("status"), CLIENT_TIMEOUT);
        assert_eq!(client_timeout("promote"), Duration::from_secs(120));
        assert_eq!(client_timeout("demote"), Duration::from_secs(120));

        let roles = Roles::new();
        let server = start_with(roles.clone()).await;
        let socket = server.socket.clone();
        let demote = tokio::spawn(async move {
            request(&socket, json!({"op": "demote", "volume": "slow"})).await
        });
        // Wait until the demote is in the handler, draining.
        while roles.calls().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Other connections are served meanwhile.
        request(&server.socket, json!({"op": "status"}))
            .await
            .expect("status during a demote");
        assert!(!demote.is_finished());
        roles.release.notify_one();
        let result = tokio::time::timeout(Duration::from_secs(5), demote)
            .await
            .expect("demote finishes")
            .expect("task ok")
            .expect("demote ok");
        assert_eq!(result["role"], "secondary");

        // A client that gives up reports a timeout naming its bound.
        let error = request_with_timeout(
            &server.socket,
            json!({"op": "demote", "volume": "slow"}),
            Duration::from_millis(100),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(error, ControlError::Timeout { seconds: 0 }),
            "{error:?}"
        );
        roles.release.notify_one();
        server.stop().await;
    }
}
