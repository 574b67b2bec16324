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

use ferry_protocol::replication::{Meta, OpOutcome, StartPeer};

use crate::config::ReplicaMode;
use crate::config::{Config, ListenAddr, VolumeConfig};
use crate::control::{
    self, ControlError, ControlHandler, JournalStatus, RecoveryStatus, StatusResult, VolumeStatus,
    STATUS_SCHEMA_VERSION,
};
use crate::datadir::{DataDir, DataDirError};
use crate::metrics::{self, Metrics};
use crate::nbd::{self, BoxFuture, Export, ExportLookup, Listener};
use crate::replication::catchup_file::CatchUpFile;
use crate::replication::stage_file::StageFile;
use crate::replication::tls::{RefusedBy, TlsIdentity};
use crate::replication::transport::{self, PeerOrAddr, Transport, TransportEvent};
use crate::replication::{
    self, DirtyFile, MetaError, MetaFile, Missing, Opened, VolumeReplication,
};
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
    #[error("volume {volume}: stage file: {source}")]
    Stage { volume: String, source: io::Error },
    #[error("[tls] is required when peers are configured")]
    NoTls,
    #[error("[node] listen is required when peers are configured")]
    NoListen,
    #[error("TLS: {0}")]
    Tls(#[from] crate::replication::tls::TlsError),
    #[error("replication transport: {0}")]
    Transport(#[from] crate::replication::transport::TransportError),
    #[error("volume {volume}: dirty map: {source}")]
    DirtyMap { volume: String, source: io::Error },
    #[error("volume {volume}: {source}")]
    Meta { volume: String, source: MetaError },
    #[error("cannot install the signal handler: {0}")]
    Signal(io::Error),
    #[error(transparent)]
    DataDir(#[from] DataDirError),
}

/// Runs the daemon in the foreground until SIGTERM or SIGINT.
pub fn run(config: Config) -> Result<(), DaemonError> {
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
    /// One per volume, in config order (standalone volumes have no peers).
    volumes: Vec<Arc<VolumeReplication>>,
}

impl Node {
    fn volume(&self, volume: &str) -> Result<&Arc<VolumeReplication>, ControlError> {
        self.volumes
            .iter()
            .find(|v| v.name() == volume)
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
            .map(|v| v.volume().clone() as Arc<dyn Export>)
    }

    fn names(&self) -> Vec<String> {
        self.volumes.iter().map(|v| v.name().to_string()).collect()
    }
}

impl ControlHandler for Node {
    fn status(&self, volume: Option<&str>) -> Result<StatusResult, ControlError> {
        let selected: Vec<&Arc<VolumeReplication>> = match volume {
            None => self.volumes.iter().collect(),
            Some(name) => vec![self.volume(name)?],
        };
        Ok(StatusResult {
            schema_version: STATUS_SCHEMA_VERSION,
            node: self.name.clone(),
            volumes: selected.into_iter().map(|v| volume_status(v)).collect(),
        })
    }

    fn promote(&self, volume: &str, force: bool) -> BoxFuture<'_, Result<Value, ControlError>> {
        let volume = volume.to_string();
        Box::pin(async move {
            let outcome = self.volume(&volume)?.promote(force).await?;
            Ok(outcome_json(&volume, &outcome))
        })
    }

    fn demote(&self, volume: &str) -> BoxFuture<'_, Result<Value, ControlError>> {
        let volume = volume.to_string();
        Box::pin(async move {
            let outcome = self.volume(&volume)?.demote().await?;
            Ok(outcome_json(&volume, &outcome))
        })
    }

    fn resolve(
        &self,
        volume: &str,
        peer: Option<&str>,
    ) -> BoxFuture<'_, Result<Value, ControlError>> {
        let volume = volume.to_string();
        let peer = peer.map(str::to_owned);
        Box::pin(async move {
            let outcome = self.volume(&volume)?.resolve(peer.as_deref()).await?;
            Ok(outcome_json(&volume, &outcome))
        })
    }

    fn pause(
        &self,
        volume: &str,
        peer: Option<&str>,
        paused: bool,
    ) -> BoxFuture<'_, Result<Value, ControlError>> {
        let volume = volume.to_string();
        let peer = peer.map(str::to_owned);
        Box::pin(async move {
            let peers = self.volume(&volume)?.set_paused(peer.as_deref(), paused)?;
            Ok(json!({ "volume": volume, "paused": paused, "peers": peers }))
        })
    }

    fn verify(
        &self,
        volume: &str,
        peer: Option<&str>,
        repair: bool,
    ) -> BoxFuture<'_, Result<Value, ControlError>> {
        let volume = volume.to_string();
        let peer = peer.map(str::to_owned);
        Box::pin(async move {
            let report = self
                .volume(&volume)?
                .verify(peer.as_deref(), repair)
                .await?;
            serde_json::to_value(report).map_err(|error| ControlError::Internal {
                message: format!("encoding the verify report: {error}"),
            })
        })
    }
}

fn outcome_json(volume: &str, outcome: &OpOutcome) -> Value {
    match outcome {
        OpOutcome::Promoted { generation } => {
            json!({"volume": volume, "role": "primary", "generation": generation})
        }
        OpOutcome::Demoted => json!({"volume": volume, "role": "secondary"}),
        OpOutcome::Resolving { peer } => {
            json!({"volume": volume, "role": "secondary", "resolving_with": peer})
        }
    }
}

fn volume_status(replication: &VolumeReplication) -> VolumeStatus {
    let (status, replicas) = replication.status();
    let volume = replication.volume();
    let journal = volume.journal_stats();
    let recovery = volume.recovery();
    VolumeStatus {
        name: volume.name().to_string(),
        role: status.role.as_str().into(),
        size_bytes: volume.size_bytes(),
        journal: JournalStatus {
            used_bytes: journal.used_bytes,
            capacity_bytes: journal.capacity_bytes,
            head_lsn: journal.head_lsn,
            applied_lsn: journal.applied_lsn,
            unapplied_bytes: journal.unapplied_bytes,
            full_waits: journal.full_waits,
        },
        generation: status.generation,
        consistent: status.consistent,
        writes_held: status.writes_held,
        following: status.following,
        resolving_with: status.resolving_with,
        replicas,
        recovery: RecoveryStatus {
            records_replayed: recovery.records_replayed,
            bytes_replayed: recovery.bytes_replayed,
            torn_tail_bytes: recovery.torn_tail_bytes,
            stopped_reason: recovery.stopped_reason.clone(),
        },
        device: volume.device_label().to_string(),
        failure: volume.failure().or(status.failed),
    }
}

/// Opens one volume: its meta, its device and journal (replaying the journal, and marking
/// what it replayed in every peer's dirty map before the journal forgets it), then its
/// replication.
pub(crate) async fn open_volume(
    config: &VolumeConfig,
    data_dir: &DataDir,
    node: &str,
    metrics: &Metrics,
) -> Result<Arc<VolumeReplication>, DaemonError> {
    let name = config.name.clone();
    let (meta_file, mut meta) = MetaFile::open_or_create(&data_dir.meta(&name), || {
        replication::first_meta(config.initial_role, node)
    })
    .await
    .map_err(|source| DaemonError::Meta {
        volume: name.clone(),
        source,
    })?;
    let peers: Vec<(String, std::path::PathBuf)> = replication::replica_peers(config)
        .into_iter()
        .map(|p| {
            let path = data_dir.dirty_map(&name, &p.name);
            (p.name, path)
        })
        .collect();
    // A peer without a map may lack anything this copy holds; a copy that holds nothing yet
    // owes nobody anything.
    let missing = if meta.lineage.is_empty() {
        Missing::Clean
    } else {
        Missing::AllDirty
    };
    let maps: Arc<std::sync::Mutex<Vec<(DirtyFile, StartPeer)>>> = Arc::default();
    let hook: VolumeOpenHook = {
        let maps = maps.clone();
        Box::new(move |size_bytes, ranges, head| {
            Box::pin(async move {
                let mut opened = Vec::new();
                for (_, path) in &peers {
                    let (file, mut bitmap, mut state) =
                        DirtyFile::open(path, size_bytes, missing).await?;
                    file.mark_replayed(&mut bitmap, &mut state, &ranges, head)
                        .await?;
                    opened.push((file, StartPeer { bitmap, state }));
                }
                *maps.lock().expect("maps lock") = opened;
                Ok(())
            })
        })
    };
    let volume = Volume::open(
        config,
        &data_dir.journal(&name),
        meta.role,
        metrics.volume(&name),
        Some(hook),
    )
    .await?;
    let mut maps = std::mem::take(&mut *maps.lock().expect("maps lock"));
    let catchup_file =
        open_catchup(config, data_dir, &volume, &meta_file, &mut meta, &mut maps).await?;
    let stage_file = open_stage(config, data_dir, &volume, &mut maps).await?;
    tracing::info!(volume = %name, size_bytes = volume.size_bytes(), role = %meta.role, generation = meta.lineage.current_generation(), "volume ready");
    Ok(VolumeReplication::new(
        Arc::new(volume),
        config,
        node,
        Opened {
            meta_file,
            meta,
            maps,
            stage_file,
            catchup_file,
        },
        metrics.volume(&name),
        |peer| metrics.replica(&name, peer),
    ))
}

/// A volume with a regional replica has a catch-up file. When the meta names a committed
/// catch-up, the node stopped between storing it whole and recording it applied: it is
/// applied again now (whole; applying is idempotent), before anything reads the volume, and
/// recorded, so the copy is as of the catch-up's end. A catch-up the meta does not name was
/// abandoned (nothing of it reached the device) and its file goes.
async fn open_catchup(
    config: &VolumeConfig,
    data_dir: &DataDir,
    volume: &Volume,
    meta_file: &MetaFile,
    meta: &mut Meta,
    maps: &mut [(DirtyFile, StartPeer)],
) -> Result<Option<CatchUpFile>, DaemonError> {
    let regional = config
        .replicas
        .iter()
        .any(|r| matches!(r.mode, ReplicaMode::Regional { .. }));
    let path = data_dir.catchup(&config.name);
    let stage_error = |source| DaemonError::Stage {
        volume: config.name.clone(),
        source,
    };
    let mut file = CatchUpFile::open(&path).map_err(stage_error)?;
    if let Some(lsn) = meta.catchup_lsn {
        let report = file
            .apply(volume, lsn, false)
            .await
            .map_err(|e| stage_error(io::Error::other(e)))?;
        // As at run time: this copy holds exactly the sender's volume as of `lsn`, every
        // block it received marked for every peer (durably, before it was stored).
        for (dirty, start) in maps.iter_mut() {
            start.state.marked_through_lsn = lsn;
            start.state.resync_only = false;
            dirty
                .persist(&start.bitmap.take_changes(), start.state)
                .await
                .map_err(|source| DaemonError::DirtyMap {
                    volume: config.name.clone(),
                    source,
                })?;
        }
        meta.catchup_lsn = None;
        meta_file.store(meta).await.map_err(stage_error)?;
        tracing::info!(volume = %config.name, lsn, records = report.records, device_bytes = report.device_bytes, seconds = report.check_seconds + report.write_seconds, "applied the stored catch-up again (the node stopped while applying it)");
    }
    file.remove();
    Ok(regional.then_some(file))
}

/// A volume with a regional replica has a stage file. A batch stored there above the
/// journal's head was acknowledged but maybe not applied whole when the node stopped: it is
/// applied again now, before anything reads the volume (its blocks marked for every peer
/// first, as at run time), so the copy is as of a batch boundary.
async fn open_stage(
    config: &VolumeConfig,
    data_dir: &DataDir,
    volume: &Volume,
    maps: &mut [(DirtyFile, StartPeer)],
) -> Result<Option<StageFile>, DaemonError> {
    if !config
        .replicas
        .iter()
        .any(|r| matches!(r.mode, ReplicaMode::Regional { .. }))
    {
        return Ok(None);
    }
    let stage_error = |source| DaemonError::Stage {
        volume: config.name.clone(),
        source,
    };
    let file = StageFile::open_or_create(&data_dir.stage(&config.name)).map_err(stage_error)?;
    let Some((lsn, records)) = file.load().await.map_err(stage_error)? else {
        return Ok(Some(file));
    };
    let head = volume.journal_stats().head_lsn;
    if lsn > head {
        for (dirty, start) in maps.iter_mut() {
            for record in &records {
                start
                    .bitmap
                    .mark(record.offset_bytes, u64::from(record.len_bytes));
            }
            start.state.marked(lsn);
            dirty
                .persist(&start.bitmap.take_changes(), start.state)
                .await
                .map_err(|source| DaemonError::DirtyMap {
                    volume: config.name.clone(),
                    source,
                })?;
        }
        volume
            .apply_batch(lsn, &records)
            .await
            .map_err(|e| stage_error(io::Error::other(e)))?;
        tracing::info!(volume = %config.name, lsn, records = records.len(), "applied the stored batch again (the node stopped while applying it)");
    }
    file.clear().await.map_err(stage_error)?;
    Ok(Some(file))
}

/// Opens the volumes, binds the listeners and serves until `stop` resolves.
pub async fn serve(
    config: Config,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), DaemonError> {
    // One daemon per data directory: a second one must fail before it touches any journal.
    let data_dir = DataDir::lock(&config.node.data_dir)?;
    // The control socket is bound first for the same reason: a live daemon answers on it.
    let control_listener = control::bind(&config.node.control_socket)?;
    let metrics = Metrics::new();
    for peer in &config.peers {
        metrics.peer(&peer.name);
    }
    let node = open_volumes(&config, &data_dir, &metrics).await?;
    let replication = start_replication(&config, &node, &metrics)?;
    let listeners = bind_listeners(&config).await?;
    let mut serving = start_serving(&config, control_listener, listeners, &node, &metrics);
    tokio::select! {
        _ = stop => {}
        result = &mut serving.nbd_task => {
            // The NBD server only returns early on a fatal listener error.
            tracing::error!(?result, "NBD server stopped unexpectedly");
        }
    }
    shut_down(serving, &node, replication).await;
    tracing::info!("stopped cleanly");
    Ok(())
}

/// Opens every configured volume, in config order (see [`open_volume`]).
async fn open_volumes(
    config: &Config,
    data_dir: &DataDir,
    metrics: &Metrics,
) -> Result<Arc<Node>, DaemonError> {
    let mut volumes = Vec::with_capacity(config.volumes.len());
    for volume in &config.volumes {
        volumes.push(open_volume(volume, data_dir, &config.node.name, metrics).await?);
    }
    Ok(Arc::new(Node {
        name: config.node.name.clone(),
        volumes,
    }))
}

/// The replication endpoint of a node with peers: the QUIC transport and the task that hands
/// its connections to the volumes.
struct ReplicationEndpoint {
    transport: Transport,
    router: tokio::task::JoinHandle<()>,
}

/// Binds the QUIC endpoint on `[node] listen` (only when peers are configured), starts every
/// volume's replication, then routes the endpoint's connections to the volumes.
fn start_replication(
    config: &Config,
    node: &Arc<Node>,
    metrics: &Arc<Metrics>,
) -> Result<Option<ReplicationEndpoint>, DaemonError> {
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
    for volume in &node.volumes {
        volume.start();
    }
    Ok(transport.map(|(transport, events)| ReplicationEndpoint {
        transport,
        router: tokio::spawn(route_transport_events(
            events,
            node.clone(),
            metrics.clone(),
            config.peers.clone(),
        )),
    }))
}

/// Every listener the config names besides the control socket and the QUIC endpoint.
struct Listeners {
    nbd: Vec<Listener>,
    metrics: Option<tokio::net::TcpListener>,
    /// Socket files to remove at shutdown, the control socket's first.
    unix_paths: Vec<PathBuf>,
}

/// Binds everything before serving anything, so a bad address fails the start cleanly.
async fn bind_listeners(config: &Config) -> Result<Listeners, DaemonError> {
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
    Ok(Listeners {
        nbd: nbd_listeners,
        metrics: metrics_listener,
        unix_paths,
    })
}

/// The servers of a running node, and what stops them.
struct Serving {
    shutdown_tx: watch::Sender<bool>,
    control_task: tokio::task::JoinHandle<()>,
    metrics_task: Option<tokio::task::JoinHandle<()>>,
    nbd_task: tokio::task::JoinHandle<Result<(), nbd::NbdError>>,
    unix_paths: Vec<PathBuf>,
}

/// Starts the control, metrics and NBD servers on their listeners.
fn start_serving(
    config: &Config,
    control_listener: tokio::net::UnixListener,
    listeners: Listeners,
    node: &Arc<Node>,
    metrics: &Arc<Metrics>,
) -> Serving {
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let control_task = tokio::spawn(control::serve(
        control_listener,
        node.clone(),
        shutdown_rx.clone(),
    ));
    let metrics_task = listeners
        .metrics
        .map(|l| tokio::spawn(metrics::serve_http(l, metrics.clone(), shutdown_rx.clone())));
    let nbd_limits = nbd::ServerLimits {
        max_connections: config.nbd.max_connections,
    };
    let nbd_task = tokio::spawn(nbd::serve(
        listeners.nbd,
        node.clone(),
        nbd_limits,
        shutdown_rx.clone(),
    ));
    tracing::info!(node = %config.node.name, volumes = node.volumes.len(), "serving");
    Serving {
        shutdown_tx,
        control_task,
        metrics_task,
        nbd_task,
        unix_paths: listeners.unix_paths,
    }
}

/// Shuts down cleanly: stop accepting, drain in-flight I/O, apply and sync every journal,
/// close the replication endpoint, remove the sockets.
async fn shut_down(serving: Serving, node: &Node, replication: Option<ReplicationEndpoint>) {
    let Serving {
        shutdown_tx,
        control_task,
        metrics_task,
        mut nbd_task,
        unix_paths,
    } = serving;
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
    for volume in &node.volumes {
        volume.close().await;
        volume.volume().close().await;
        tracing::info!(volume = %volume.name(), "journal applied and synced");
    }
    if let Some(ReplicationEndpoint { transport, router }) = replication {
        router.abort();
        transport.shutdown().await;
    }
    let _ = control_task.await;
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    for path in unix_paths {
        let _ = std::fs::remove_file(path);
    }
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
            // The transport logs connections and their loss, once each.
            TransportEvent::PeerConnected { peer, connection } => {
                for volume in &node.volumes {
                    volume.set_connection(&peer, Some(connection.clone()));
                }
                tokio::spawn(accept_streams(node.clone(), peer, connection));
            }
            TransportEvent::PeerDisconnected { peer, .. } => {
                for volume in &node.volumes {
                    volume.set_connection(&peer, None);
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
                    for volume in &node.volumes {
                        volume.auth_refused(&peer, why.clone());
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
                match node
                    .volumes
                    .iter()
                    .find(|v| v.name() == volume && v.peer_names().any(|p| p == peer))
                {
                    Some(replication) => replication.accept_stream(&peer, send, recv),
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
