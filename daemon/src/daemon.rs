//! `ferry run`: opens every configured volume, binds every listener the config names (and
//! nothing else), serves until SIGTERM or SIGINT, then shuts down cleanly: stop accepting,
//! drain in-flight I/O, apply and sync every journal, remove the sockets.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use thiserror::Error;
use tokio::sync::watch;

use crate::config::ReplicaMode;
use crate::config::{Config, ListenAddr, Role};
use crate::control::{
    self, ControlError, ControlHandler, JournalStatus, RecoveryStatus, StatusResult, VolumeStatus,
};
use crate::dirty::DirtyMap;
use crate::metrics::{self, Metrics};
use crate::nbd::{self, BoxFuture, Export, ExportLookup, Listener};
use crate::replica::VolumeReplication;
use crate::tls::{RefusedBy, TlsIdentity};
use crate::transport::{self, PeerOrAddr, Transport, TransportEvent};
use crate::volume::{Volume, VolumeError, VolumeOpenHook};

#[derive(Debug, Error)]
pub enum DaemonError {
    #[error("cannot start the runtime: {0}")]
    Runtime(io::Error),
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: io::Error },
    #[error("control socket: {0}")]
    Control(#[from] ControlError),
    #[error("metrics endpoint: {0}")]
    Metrics(#[from] metrics::MetricsError),
    #[error("volume {volume}: regional replicas are not available in this build yet; remove the [[volumes.replicas]] entry with mode = \"regional\" (metro replicas work)")]
    RegionalUnavailable { volume: String },
    #[error("[tls] is required when peers are configured")]
    NoTls,
    #[error("[node] listen is required when peers are configured")]
    NoListen,
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("replication transport: {0}")]
    Transport(#[from] crate::transport::TransportError),
    #[error("volume {volume}: dirty map: {source}")]
    DirtyMap { volume: String, source: io::Error },
    #[error("cannot install the signal handler: {0}")]
    Signal(io::Error),
    #[error(
        "data directory {path} is in use by another ferry daemon (or cannot be locked: {source})"
    )]
    DataDirLocked { path: PathBuf, source: io::Error },
}

/// Runs the daemon in the foreground until SIGTERM or SIGINT.
pub fn run(config: Config) -> Result<(), DaemonError> {
    for volume in &config.volumes {
        if volume
            .replicas
            .iter()
            .any(|r| matches!(r.mode, ReplicaMode::Regional { .. }))
        {
            return Err(DaemonError::RegionalUnavailable {
                volume: volume.name.clone(),
            });
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("ferry")
        .build()
        .map_err(DaemonError::Runtime)?;
    runtime.block_on(async {
        let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(DaemonError::Signal)?;
        let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            .map_err(DaemonError::Signal)?;
        let stop = async move {
            tokio::select! {
                _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
                _ = sigint.recv() => tracing::info!("SIGINT: shutting down"),
            }
        };
        serve(config, stop).await
    })
}

/// The node's volumes, as NBD exports and as the subject of control requests.
pub struct Node {
    name: String,
    volumes: Vec<Arc<Volume>>,
    /// One per volume, in the same order (empty replica lists for standalone volumes).
    replication: Vec<Arc<VolumeReplication>>,
}

impl Node {
    fn replication(&self, volume: &str) -> Result<&Arc<VolumeReplication>, ControlError> {
        self.volumes
            .iter()
            .position(|v| v.name() == volume)
            .map(|i| &self.replication[i])
            .ok_or_else(|| ControlError::UnknownVolume {
                volume: volume.to_string(),
            })
    }
}

impl ExportLookup for Node {
    fn export(&self, name: &str) -> Option<Arc<dyn Export>> {
        self.volumes
            .iter()
            .find(|v| v.name() == name)
            .map(|v| v.clone() as Arc<dyn Export>)
    }

    fn names(&self) -> Vec<String> {
        self.volumes.iter().map(|v| v.name().to_string()).collect()
    }
}

impl ControlHandler for Node {
    fn status(&self, volume: Option<&str>) -> Result<StatusResult, ControlError> {
        let selected: Vec<&Arc<Volume>> = match volume {
            None => self.volumes.iter().collect(),
            Some(name) => match self.volumes.iter().find(|v| v.name() == name) {
                Some(v) => vec![v],
                None => {
                    return Err(ControlError::UnknownVolume {
                        volume: name.to_string(),
                    })
                }
            },
        };
        Ok(StatusResult {
            node: self.name.clone(),
            volumes: selected
                .into_iter()
                .map(|v| {
                    let replication = self.replication(v.name()).ok();
                    volume_status(v, replication.map(|r| &**r))
                })
                .collect(),
        })
    }

    fn promote(&self, volume: &str, force: bool) -> BoxFuture<'_, Result<Value, ControlError>> {
        let volume = volume.to_string();
        Box::pin(async move {
            let replication = self.replication(&volume)?;
            let generation = replication
                .promote(force)
                .await
                .map_err(|(code, message)| ControlError::Remote {
                    code: code.to_string(),
                    message,
                })?;
            Ok(json!({"volume": volume, "role": "primary", "generation": generation}))
        })
    }

    fn demote(&self, volume: &str) -> BoxFuture<'_, Result<Value, ControlError>> {
        let volume = volume.to_string();
        Box::pin(async move {
            let replication = self.replication(&volume)?;
            replication
                .demote()
                .await
                .map_err(|(code, message)| ControlError::Remote {
                    code: code.to_string(),
                    message,
                })?;
            Ok(json!({"volume": volume, "role": "secondary"}))
        })
    }
}

fn volume_status(volume: &Volume, replication: Option<&VolumeReplication>) -> VolumeStatus {
    let journal = volume.journal_stats();
    let recovery = volume.recovery();
    VolumeStatus {
        name: volume.name().to_string(),
        role: match volume.role() {
            Role::Primary => "primary".into(),
            Role::Secondary => "secondary".into(),
        },
        size_bytes: volume.size_bytes(),
        journal: JournalStatus {
            used_bytes: journal.used_bytes,
            capacity_bytes: journal.capacity_bytes,
            head_lsn: journal.head_lsn,
            applied_lsn: journal.applied_lsn,
            unapplied_bytes: journal.unapplied_bytes,
            full_waits: journal.full_waits,
        },
        generation: volume.generation(),
        replicas: replication.map(|r| r.status()).unwrap_or_default(),
        recovery: RecoveryStatus {
            records_replayed: recovery.records_replayed,
            bytes_replayed: recovery.bytes_replayed,
            torn_tail_bytes: recovery.torn_tail_bytes,
            stopped_reason: recovery.stopped_reason.clone(),
        },
        device: volume.device_label().to_string(),
        failure: volume.failure(),
    }
}

/// Opens the volumes, binds the listeners and serves until `stop` resolves.
pub async fn serve(
    config: Config,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), DaemonError> {
    // One daemon per data directory: a second one must fail before it touches any journal.
    let _lock = lock_data_dir(&config.node.data_dir)?;
    // The control socket is bound first for the same reason: a live daemon answers on it.
    let control_listener = control::bind(&config.node.control_socket)?;
    let metrics = Metrics::new();
    let mut volumes = Vec::with_capacity(config.volumes.len());
    let mut replication = Vec::with_capacity(config.volumes.len());
    for volume in &config.volumes {
        let peers: Vec<String> = volume
            .replicas
            .iter()
            .filter(|r| matches!(r.mode, ReplicaMode::Metro { .. }))
            .map(|r| r.peer.clone())
            .collect();
        let maps: Arc<std::sync::Mutex<Vec<(String, DirtyMap)>>> = Arc::default();
        let hook: Option<VolumeOpenHook> = if peers.is_empty() {
            None
        } else {
            let maps = maps.clone();
            let dir = config.node.data_dir.clone();
            let name = volume.name.clone();
            Some(Box::new(move |size_bytes, role, ranges: &[(u64, u64)]| {
                let mut opened = Vec::new();
                for peer in &peers {
                    let path = dir.join(format!("{name}.{peer}.dirty"));
                    // A primary that has no map yet cannot know what its peer holds.
                    let mut map = DirtyMap::open(&path, size_bytes, role == Role::Primary)?;
                    for &(offset, len) in ranges {
                        map.mark(offset, len);
                    }
                    map.persist()?;
                    opened.push((peer.clone(), map));
                }
                *maps.lock().expect("maps lock") = opened;
                Ok(())
            }))
        };
        let opened = Volume::open(
            volume,
            &config.node.data_dir,
            &config.node.name,
            metrics.volume(&volume.name),
            hook,
        )
        .await?;
        tracing::info!(volume = %volume.name, size_bytes = opened.size_bytes(), role = ?opened.role(), "volume ready");
        let opened = Arc::new(opened);
        let maps = std::mem::take(&mut *maps.lock().expect("maps lock"));
        let repl = VolumeReplication::new(
            opened.clone(),
            volume,
            &config.node.name,
            maps,
            metrics.volume(&volume.name),
            |peer| metrics.replica(&volume.name, peer),
        );
        repl.arm_generation_at_start();
        volumes.push(opened);
        replication.push(repl);
    }
    let node = Arc::new(Node {
        name: config.node.name.clone(),
        volumes,
        replication,
    });

    // Replication: one QUIC endpoint on [node] listen, only when peers are configured.
    let transport = if config.peers.is_empty() {
        None
    } else {
        let tls = config.tls.as_ref().ok_or(DaemonError::NoTls)?;
        let listen = config.node.listen.ok_or(DaemonError::NoListen)?;
        let identity = TlsIdentity::load(tls, &config.node.name)?;
        let peer_timeout = config
            .volumes
            .iter()
            .flat_map(|v| v.replicas.iter())
            .filter_map(|r| match r.mode {
                ReplicaMode::Metro { peer_timeout, .. } => Some(peer_timeout),
                ReplicaMode::Regional { .. } => None,
            })
            .min()
            .unwrap_or(Duration::from_secs(5));
        let mut transport = Transport::bind(listen, &identity, config.peers.clone(), peer_timeout)?;
        let events = transport.events().expect("first call");
        tracing::info!(listen = %listen, peers = config.peers.len(), "replication endpoint ready");
        Some((transport, events))
    };
    for repl in &node.replication {
        repl.start();
    }
    let (transport, transport_task) = match transport {
        Some((transport, events)) => {
            let task = tokio::spawn(route_transport_events(
                events,
                node.clone(),
                metrics.clone(),
                config.peers.clone(),
            ));
            (Some(transport), Some(task))
        }
        None => (None, None),
    };

    // Bind everything before serving anything, so a bad address fails the start cleanly.
    let mut nbd_listeners = Vec::new();
    let mut unix_paths: Vec<PathBuf> = vec![config.node.control_socket.clone()];
    for addr in &config.nbd.listen {
        nbd_listeners.push(bind_nbd(addr).await?);
        if let ListenAddr::Unix(path) = addr {
            unix_paths.push(path.clone());
        }
    }
    let metrics_listener = match config.node.metrics_listen {
        Some(addr) => Some(metrics::bind_http(addr).await?),
        None => None,
    };

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let control_task = tokio::spawn(control::serve(
        control_listener,
        node.clone(),
        shutdown_rx.clone(),
    ));
    let metrics_task = metrics_listener
        .map(|l| tokio::spawn(metrics::serve_http(l, metrics.clone(), shutdown_rx.clone())));
    let mut nbd_task = tokio::spawn(nbd::serve(nbd_listeners, node.clone(), shutdown_rx.clone()));
    tracing::info!(node = %config.node.name, volumes = node.volumes.len(), "serving");

    tokio::select! {
        _ = stop => {}
        result = &mut nbd_task => {
            // The NBD server only returns early on a fatal listener error.
            tracing::error!(?result, "NBD server stopped unexpectedly");
        }
    }
    let _ = shutdown_tx.send(true);
    // In-flight requests finish (bounded inside the server) before the journals close.
    if !nbd_task.is_finished()
        && tokio::time::timeout(Duration::from_secs(30), &mut nbd_task)
            .await
            .is_err()
    {
        tracing::warn!("NBD connections did not drain within 30 s; closing anyway");
        nbd_task.abort();
    }
    for (volume, repl) in node.volumes.iter().zip(&node.replication) {
        repl.close().await;
        volume.close().await;
        tracing::info!(volume = %volume.name(), "journal applied and synced");
    }
    if let Some(task) = transport_task {
        task.abort();
    }
    if let Some(transport) = transport {
        transport.shutdown().await;
    }
    let _ = control_task.await;
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    for path in unix_paths {
        let _ = std::fs::remove_file(path);
    }
    tracing::info!("stopped cleanly");
    Ok(())
}

/// Hands each peer connection to the volumes replicated with that peer, accepts the volume
/// streams the peer opens, and accounts for refused certificates.
async fn route_transport_events(
    mut events: tokio::sync::mpsc::Receiver<TransportEvent>,
    node: Arc<Node>,
    metrics: Arc<Metrics>,
    peers: Vec<crate::config::PeerConfig>,
) {
    while let Some(event) = events.recv().await {
        match event {
            TransportEvent::PeerConnected { peer, connection } => {
                tracing::info!(%peer, "peer connected");
                for repl in &node.replication {
                    for replica in repl.replicas().iter().filter(|r| r.peer() == peer) {
                        replica.set_connection(Some(connection.clone()));
                    }
                }
                tokio::spawn(accept_streams(node.clone(), peer, connection));
            }
            TransportEvent::PeerDisconnected { peer, reason } => {
                tracing::info!(%peer, %reason, "peer disconnected");
                for repl in &node.replication {
                    for replica in repl.replicas().iter().filter(|r| r.peer() == peer) {
                        replica.set_connection(None);
                    }
                }
            }
            TransportEvent::AuthRefused {
                peer_or_addr,
                reason,
            } => {
                let peer = match &peer_or_addr {
                    PeerOrAddr::Peer(name) => Some(name.clone()),
                    PeerOrAddr::Addr(addr) => peers
                        .iter()
                        .find(|p| p.address.ip() == addr.ip() && p.address.port() == addr.port())
                        .map(|p| p.name.clone()),
                };
                if reason.by == RefusedBy::Us {
                    metrics.peer_auth_failure(
                        peer.as_deref().unwrap_or(transport::UNKNOWN_PEER_LABEL),
                    );
                }
                let why = format!("TLS handshake with {peer_or_addr} refused: {reason}");
                if let Some(peer) = peer {
                    for repl in &node.replication {
                        for replica in repl.replicas().iter().filter(|r| r.peer() == peer) {
                            replica.auth_refused(why.clone());
                        }
                    }
                }
            }
        }
    }
}

/// Accepts the volume streams a peer opens on `connection`, for as long as it lives.
async fn accept_streams(node: Arc<Node>, peer: String, connection: quinn::Connection) {
    loop {
        match transport::accept_volume_stream(&connection).await {
            Ok((volume, send, recv)) => {
                let replica = node
                    .volumes
                    .iter()
                    .position(|v| v.name() == volume)
                    .and_then(|i| {
                        node.replication[i]
                            .replicas()
                            .iter()
                            .find(|r| r.peer() == peer)
                            .cloned()
                    });
                match replica {
                    Some(replica) => replica.accept_stream(send, recv),
                    None => {
                        tracing::warn!(%peer, %volume, "the peer opened a stream for a volume not replicated with it here; refused");
                        drop((send, recv));
                    }
                }
            }
            Err(transport::TransportError::Connection(_)) => return,
            Err(error) => {
                tracing::warn!(%peer, %error, "a volume stream from the peer was refused");
            }
        }
    }
}

async fn bind_nbd(addr: &ListenAddr) -> Result<Listener, DaemonError> {
    let listen_error = |source| DaemonError::Listen {
        addr: format!("{addr:?}"),
        source,
    };
    match addr {
        ListenAddr::Tcp(socket_addr) => Ok(Listener::Tcp(
            tokio::net::TcpListener::bind(socket_addr)
                .await
                .map_err(listen_error)?,
        )),
        ListenAddr::Unix(path) => {
            remove_stale_socket(path).map_err(listen_error)?;
            Ok(Listener::Unix(
                tokio::net::UnixListener::bind(path).map_err(listen_error)?,
            ))
        }
    }
}

/// Removes a socket file left by a daemon that died, but never one a live daemon answers on.
fn remove_stale_socket(path: &std::path::Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another process is serving on this socket",
                ));
            }
            std::fs::remove_file(path)
        }
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "path exists and is not a socket",
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Takes an exclusive `flock` on `DATA_DIR/ferry.lock` for the daemon's lifetime (the kernel
/// drops it when the process dies, even by SIGKILL, so there is no stale lock to clean up).
fn lock_data_dir(data_dir: &std::path::Path) -> Result<std::fs::File, DaemonError> {
    use std::os::fd::AsRawFd;
    let path = data_dir.join("ferry.lock");
    let locked = |source| DaemonError::DataDirLocked {
        path: path.clone(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(locked)?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(locked(io::Error::last_os_error()));
    }
    Ok(file)
}
