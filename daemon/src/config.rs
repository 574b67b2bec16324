//! The TOML configuration of SPEC §4: parsing, validation and the typed result.
//!
//! Parsing happens in two passes. Serde turns the text into "raw" structs that keep every
//! semantically checked value as a `toml::Spanned` (so an error can point at it); syntax and type
//! errors stop this pass at the first one, because toml cannot continue past them. The second
//! pass checks meaning (units, names, cross references, paths) and collects *every* error, so an
//! operator fixes a config in one round instead of one error per run.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// Where `ferry` looks for its control socket when neither the config nor `--socket` says.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/ferry/ferry.sock";
/// Journal size when a volume does not set `journal_size`.
pub const DEFAULT_JOURNAL_SIZE_BYTES: u64 = 1 << 30;
/// Smallest journal accepted: below this a few large writes would already fill it.
pub const MIN_JOURNAL_SIZE_BYTES: u64 = 16 << 20;
/// Volume and journal sizes are multiples of this so every block is 4 KiB aligned.
pub const SIZE_ALIGNMENT_BYTES: u64 = 4096;
/// Metro default of SPEC §4.
pub const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(5);
/// Most replicas of one volume: what a copy's `VOLUME.meta` records of its peers.
pub const METRO_PEERS_MAX: usize = ferry_protocol::replication::meta::META_PEERS_MAX;
/// Regional default of SPEC §4.
pub const DEFAULT_REGIONAL_INTERVAL: Duration = Duration::from_secs(30);
/// Names end up in file names, export names and metric labels; this keeps them readable.
const NAME_LENGTH_MAX: usize = 128;
use crate::control::UNIX_SOCKET_PATH_LENGTH_MAX;

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub node: NodeConfig,
    pub nbd: NbdConfig,
    pub tls: Option<TlsConfig>,
    pub peers: Vec<PeerConfig>,
    pub volumes: Vec<VolumeConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    pub name: String,
    pub data_dir: PathBuf,
    pub control_socket: PathBuf,
    pub metrics_listen: Option<SocketAddr>,
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdConfig {
    pub listen: Vec<ListenAddr>,
    /// Connections open at once over all listeners (`max_connections`); each may hold up to
    /// 128 MiB of payload, and all together at most 512 MiB.
    pub max_connections: u32,
}

/// Largest `[nbd] max_connections`: each connection holds a socket and two tasks.
pub const NBD_CONNECTIONS_MAX: u32 = 65_536;

/// An NBD listen address: `"unix:/path"` or `"tcp:ip:port"`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ListenAddr {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
            ListenAddr::Tcp(addr) => write!(f, "tcp:{addr}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub name: String,
    pub address: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeConfig {
    pub name: String,
    pub device: PathBuf,
    /// Needed only to create a file-backed device that does not exist yet.
    pub size_bytes: Option<u64>,
    pub journal_size_bytes: u64,
    /// Used on first start only; afterwards the stored role wins.
    pub initial_role: Role,
    pub replicas: Vec<ReplicaConfig>,
}

/// A copy's role: one type across the config, the replicator and the control socket.
pub use ferry_protocol::generation::Role;
/// What a metro primary does when a peer is unreachable: one type for config and replicator.
pub use ferry_protocol::replication::OnDisconnect;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaConfig {
    pub peer: String,
    pub mode: ReplicaMode,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaMode {
    Metro {
        on_disconnect: OnDisconnect,
        peer_timeout: Duration,
        /// Cap on resync traffic to this peer (initial and delta), bytes per second.
        resync_max_rate_bytes_per_s: Option<u64>,
    },
    Regional {
        interval: Duration,
        max_rate_bytes_per_s: Option<u64>,
        compression: Compression,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Zstd,
    None,
}

/// 1-based line and column (in characters) of an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: PathBuf,
    /// None when the problem is about the whole file (it cannot be read).
    pub position: Option<Position>,
    /// What is wrong and what to do about it.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some(p) => write!(
                f,
                "{}:{}:{}: {}",
                self.path.display(),
                p.line,
                p.column,
                self.message
            ),
            None => write!(f, "{}: {}", self.path.display(), self.message),
        }
    }
}

/// Every problem found in a config file, in file order. Never empty.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors {
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, error) in self.errors.iter().enumerate() {
            if index > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl Config {
    /// Reads and validates a config file, including the filesystem checks `ferry run` does
    /// before touching a disk.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigErrors {
            errors: vec![ConfigError {
                path: path.to_path_buf(),
                position: None,
                message: format!("cannot read the config file: {error}; check the path"),
            }],
        })?;
        Config::parse(&text, path)
    }

    /// Validates config text; `path` is used in error messages and for nothing else.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigErrors> {
        parse_with(text, path, true)
    }

    /// Like [`Config::parse`] but without looking at the filesystem, for configs written for
    /// another machine (the examples in `config/`, tests).
    pub fn parse_unchecked(text: &str, path: &Path) -> Result<Config, ConfigErrors> {
        parse_with(text, path, false)
    }
}

// ---------------------------------------------------------------------------------------------
// Raw (serde) layer.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node: RawNode,
    nbd: Option<RawNbd>,
    tls: Option<RawTls>,
    #[serde(default)]
    peers: Vec<RawPeer>,
    #[serde(default)]
    volumes: Vec<RawVolume>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: Spanned<String>,
    data_dir: Spanned<String>,
    control_socket: Option<Spanned<String>>,
    metrics_listen: Option<Spanned<String>>,
    listen: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNbd {
    listen: Spanned<Vec<Spanned<String>>>,
    max_connections: Option<Spanned<toml::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    ca: Spanned<String>,
    cert: Spanned<String>,
    key: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    name: Spanned<String>,
    address: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVolume {
    name: Spanned<String>,
    device: Spanned<String>,
    size: Option<Spanned<toml::Value>>,
    journal_size: Option<Spanned<toml::Value>>,
    initial_role: Option<Spanned<String>>,
    #[serde(default)]
    replicas: Vec<RawReplica>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReplica {
    peer: Spanned<String>,
    mode: Spanned<String>,
    on_disconnect: Option<Spanned<String>>,
    peer_timeout: Option<Spanned<toml::Value>>,
    interval: Option<Spanned<toml::Value>>,
    max_rate: Option<Spanned<toml::Value>>,
    compression: Option<Spanned<String>>,
    resync_max_rate: Option<Spanned<toml::Value>>,
}

// ---------------------------------------------------------------------------------------------
// Semantic layer.

fn parse_with(text: &str, path: &Path, check_filesystem: bool) -> Result<Config, ConfigErrors> {
    let mut checker = Checker {
        text,
        path,
        check_filesystem,
        errors: Vec::new(),
    };
    let raw: RawConfig = match toml::from_str(text) {
        Ok(raw) => raw,
        Err(error) => {
            let span = error.span().unwrap_or(0..0);
            let message = toml_message_with_hint(error.message());
            checker.error(span, message);
            return Err(checker.finish());
        }
    };
    let config = checker.config(raw);
    if checker.errors.is_empty() {
        Ok(config)
    } else {
        Err(checker.finish())
    }
}

/// toml's messages say what is wrong; add what to do for the common ones.
fn toml_message_with_hint(message: &str) -> String {
    let message = message.trim_end();
    if message.starts_with("unknown field") {
        format!("{message}; unknown keys are errors: remove it or fix its spelling")
    } else if message.starts_with("missing field") {
        format!("{message}; add it (see config/standalone.toml for an example)")
    } else if message.starts_with("invalid type") {
        format!("{message}; fix the value's type")
    } else {
        format!("{message}; fix the TOML syntax here")
    }
}

struct Checker<'a> {
    text: &'a str,
    path: &'a Path,
    check_filesystem: bool,
    errors: Vec<ConfigError>,
}

impl Checker<'_> {
    fn error(&mut self, span: Range<usize>, message: String) {
        let position = position_of(self.text, span.start);
        self.errors.push(ConfigError {
            path: self.path.to_path_buf(),
            position: Some(position),
            message,
        });
    }

    fn finish(mut self) -> ConfigErrors {
        // Stable sort: errors at the same place keep the order they were found in.
        self.errors.sort_by_key(|error| error.position);
        ConfigErrors {
            errors: self.errors,
        }
    }

    fn config(&mut self, raw: RawConfig) -> Config {
        let node = self.node(&raw.node);
        let nbd = self.nbd(raw.nbd.as_ref(), &node);
        let tls = raw.tls.as_ref().map(|tls| self.tls(tls));
        let peers = self.peers(&raw.peers, &node.name);
        if tls.is_none() {
            if let Some(first) = raw.peers.first() {
                self.error(
                    first.name.span(),
                    "peers are configured but [tls] is missing; add a [tls] section with ca, \
                     cert and key (`ferry cert init` makes them): peers never talk in plaintext"
                        .to_string(),
                );
            }
        }
        let volumes = self.volumes(&raw.volumes, &raw.peers);
        Config {
            node,
            nbd,
            tls,
            peers,
            volumes,
        }
    }

    fn node(&mut self, raw: &RawNode) -> NodeConfig {
        self.check_name(&raw.name, "node name");
        let data_dir = self.path_value(&raw.data_dir, "data_dir");
        if self.check_filesystem && !data_dir.as_os_str().is_empty() {
            self.check_data_dir(&raw.data_dir, &data_dir);
        }
        let control_socket = match &raw.control_socket {
            Some(value) => {
                let path = self.path_value(value, "control_socket");
                self.check_socket_path(value.span(), &path, "control_socket");
                path
            }
            None => PathBuf::from(DEFAULT_CONTROL_SOCKET),
        };
        let metrics_listen = raw
            .metrics_listen
            .as_ref()
            .and_then(|value| self.socket_addr(value, "metrics_listen", "127.0.0.1:9860"));
        let listen = raw
            .listen
            .as_ref()
            .and_then(|value| self.socket_addr(value, "listen", "0.0.0.0:7788"));
        NodeConfig {
            name: raw.name.get_ref().clone(),
            data_dir,
            control_socket,
            metrics_listen,
            listen,
        }
    }

    fn nbd(&mut self, raw: Option<&RawNbd>, node: &NodeConfig) -> NbdConfig {
        let Some(raw) = raw else {
            self.error(
                0..0,
                "no [nbd] section: add one with at least one listen address, like \
                 `listen = [\"unix:/run/ferry/nbd.sock\"]`"
                    .to_string(),
            );
            return NbdConfig {
                listen: Vec::new(),
                max_connections: crate::nbd::DEFAULT_MAX_CONNECTIONS,
            };
        };
        if raw.listen.get_ref().is_empty() {
            self.error(
                raw.listen.span(),
                "nbd.listen is empty: add at least one address, like \
                 \"unix:/run/ferry/nbd.sock\" or \"tcp:127.0.0.1:10809\""
                    .to_string(),
            );
        }
        let mut listen = Vec::new();
        let mut seen = HashSet::new();
        for value in raw.listen.get_ref() {
            let Some(addr) = self.listen_addr(value) else {
                continue;
            };
            if !seen.insert(addr.clone()) {
                self.error(
                    value.span(),
                    format!("nbd listen address `{addr}` is listed twice; remove one"),
                );
                continue;
            }
            if let ListenAddr::Unix(path) = &addr {
                if *path == node.control_socket {
                    self.error(
                        value.span(),
                        format!(
                            "nbd socket `{}` is also the control_socket; give them different paths",
                            path.display()
                        ),
                    );
                }
            }
            listen.push(addr);
        }
        let max_connections = match &raw.max_connections {
            None => crate::nbd::DEFAULT_MAX_CONNECTIONS,
            Some(value) => match value.get_ref() {
                toml::Value::Integer(n) if (1..=i64::from(NBD_CONNECTIONS_MAX)).contains(n) => {
                    u32::try_from(*n).unwrap_or(NBD_CONNECTIONS_MAX)
                }
                other => {
                    self.error(
                        value.span(),
                        format!(
                            "nbd.max_connections `{other}` is not a number of connections from 1 \
                             to {NBD_CONNECTIONS_MAX}; the default is {}",
                            crate::nbd::DEFAULT_MAX_CONNECTIONS
                        ),
                    );
                    crate::nbd::DEFAULT_MAX_CONNECTIONS
                }
            },
        };
        NbdConfig {
            listen,
            max_connections,
        }
    }

    fn listen_addr(&mut self, value: &Spanned<String>) -> Option<ListenAddr> {
        let text = value.get_ref().as_str();
        if let Some(rest) = text.strip_prefix("unix:") {
            if rest.is_empty() {
                self.error(
                    value.span(),
                    "nbd listen address `unix:` has no path; write it like \
                     \"unix:/run/ferry/nbd.sock\""
                        .to_string(),
                );
                return None;
            }
            let path = PathBuf::from(rest);
            self.check_socket_path(value.span(), &path, "nbd socket");
            Some(ListenAddr::Unix(path))
        } else if let Some(rest) = text.strip_prefix("tcp:") {
            match rest.parse::<SocketAddr>() {
                Ok(addr) => Some(ListenAddr::Tcp(addr)),
                Err(_) => {
                    self.error(
                        value.span(),
                        format!(
                            "nbd listen address `{text}`: `{rest}` is not an IP address and \
                             port; write it like \"tcp:127.0.0.1:10809\" or \"tcp:[::1]:10809\""
                        ),
                    );
                    None
                }
            }
        } else {
            self.error(
                value.span(),
                format!(
                    "nbd listen address `{text}` has no scheme; write \"unix:/path/to.sock\" \
                     or \"tcp:127.0.0.1:10809\""
                ),
            );
            None
        }
    }

    fn tls(&mut self, raw: &RawTls) -> TlsConfig {
        let ca = self.path_value(&raw.ca, "tls.ca");
        let cert = self.path_value(&raw.cert, "tls.cert");
        let key = self.path_value(&raw.key, "tls.key");
        if self.check_filesystem {
            for (value, path, what) in [
                (&raw.ca, &ca, "tls.ca"),
                (&raw.cert, &cert, "tls.cert"),
                (&raw.key, &key, "tls.key"),
            ] {
                if path.as_os_str().is_empty() {
                    continue;
                }
                match std::fs::metadata(path) {
                    Ok(meta) if meta.is_file() => {}
                    Ok(_) => self.error(
                        value.span(),
                        format!("{what} `{}` is not a regular file; point it at a PEM file", path.display()),
                    ),
                    Err(error) => self.error(
                        value.span(),
                        format!(
                            "{what} `{}` cannot be read ({error}); create it (`ferry cert init`) or fix the path",
                            path.display()
                        ),
                    ),
                }
            }
        }
        TlsConfig { ca, cert, key }
    }

    fn peers(&mut self, raw: &[RawPeer], node_name: &str) -> Vec<PeerConfig> {
        let mut peers = Vec::new();
        let mut seen = HashSet::new();
        for peer in raw {
            let name = peer.name.get_ref();
            self.check_name(&peer.name, "peer name");
            if !seen.insert(name.clone()) {
                self.error(
                    peer.name.span(),
                    format!("peer `{name}` is configured twice; peer names must be unique"),
                );
            }
            if name == node_name {
                self.error(
                    peer.name.span(),
                    format!(
                        "peer `{name}` has this node's own name; list only the other nodes under [[peers]]"
                    ),
                );
            }
            let address = self.socket_addr(&peer.address, "peer address", "10.0.0.2:7788");
            peers.push(PeerConfig {
                name: name.clone(),
                address: address.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))),
            });
        }
        peers
    }

    fn volumes(&mut self, raw: &[RawVolume], peers: &[RawPeer]) -> Vec<VolumeConfig> {
        let mut volumes = Vec::new();
        let mut names = HashSet::new();
        let mut devices = HashSet::new();
        for volume in raw {
            let name = volume.name.get_ref();
            self.check_name(&volume.name, "volume name");
            if !names.insert(name.clone()) {
                self.error(
                    volume.name.span(),
                    format!("volume `{name}` is configured twice; volume names must be unique"),
                );
            }
            let device = self.path_value(&volume.device, "device");
            if !device.as_os_str().is_empty() && !devices.insert(device.clone()) {
                self.error(
                    volume.device.span(),
                    format!(
                        "device `{}` is used by two volumes; each volume needs its own device",
                        device.display()
                    ),
                );
            }
            let size_bytes = volume.size.as_ref().and_then(|value| {
                let size = self.size(value, "size")?;
                self.check_aligned(value, size, "size");
                Some(size)
            });
            let journal_size_bytes = match &volume.journal_size {
                Some(value) => match self.size(value, "journal_size") {
                    Some(size) => {
                        self.check_aligned(value, size, "journal_size");
                        if size < MIN_JOURNAL_SIZE_BYTES {
                            self.error(
                                value.span(),
                                format!(
                                    "journal_size {size} bytes is below the minimum of 16MiB; \
                                     set journal_size = \"16MiB\" or more"
                                ),
                            );
                        }
                        size
                    }
                    None => DEFAULT_JOURNAL_SIZE_BYTES,
                },
                None => DEFAULT_JOURNAL_SIZE_BYTES,
            };
            if self.check_filesystem && !device.as_os_str().is_empty() {
                self.check_device(&volume.device, &device, size_bytes.is_some());
            }
            let initial_role = match &volume.initial_role {
                Some(value) => match value.get_ref().as_str() {
                    "primary" => Role::Primary,
                    "secondary" => Role::Secondary,
                    other => {
                        self.error(
                            value.span(),
                            format!(
                                "initial_role `{other}` is not a role; use \"primary\" or \"secondary\""
                            ),
                        );
                        Role::Primary
                    }
                },
                None => Role::Primary,
            };
            let replicas = self.replicas(&volume.replicas, peers);
            volumes.push(VolumeConfig {
                name: name.clone(),
                device,
                size_bytes,
                journal_size_bytes,
                initial_role,
                replicas,
            });
        }
        volumes
    }

    fn replicas(&mut self, raw: &[RawReplica], peers: &[RawPeer]) -> Vec<ReplicaConfig> {
        let mut replicas = Vec::new();
        let mut seen = HashSet::new();
        for replica in raw {
            let peer = replica.peer.get_ref();
            if !peers.iter().any(|known| known.name.get_ref() == peer) {
                let known: Vec<&str> = peers.iter().map(|p| p.name.get_ref().as_str()).collect();
                let known = if known.is_empty() {
                    "there are none".to_string()
                } else {
                    format!("known peers: {}", known.join(", "))
                };
                self.error(
                    replica.peer.span(),
                    format!(
                        "replica peer `{peer}` is not a [[peers]] entry ({known}); add it under \
                         [[peers]] or fix the name"
                    ),
                );
            }
            if !seen.insert(peer.clone()) {
                self.error(
                    replica.peer.span(),
                    format!("peer `{peer}` is a replica of this volume twice; keep one entry"),
                );
            }
            if seen.len() == METRO_PEERS_MAX + 1 {
                self.error(
                    replica.peer.span(),
                    format!(
                        "a volume has at most {METRO_PEERS_MAX} replicas (each copy keeps a dirty map and a link per peer, and its metadata records at most that many)"
                    ),
                );
            }
            let mode = match replica.mode.get_ref().as_str() {
                "metro" => self.metro_mode(replica),
                "regional" => self.regional_mode(replica),
                other => {
                    self.error(
                        replica.mode.span(),
                        format!(
                            "replica mode `{other}` is not known; use \"metro\" (synchronous) or \
                             \"regional\" (asynchronous)"
                        ),
                    );
                    continue;
                }
            };
            replicas.push(ReplicaConfig {
                peer: peer.clone(),
                mode,
            });
        }
        replicas
    }

    /// The options of a metro replica; regional-only keys are refused.
    fn metro_mode(&mut self, replica: &RawReplica) -> ReplicaMode {
        self.reject_key(&replica.interval, "interval", "metro", "regional");
        self.reject_key(&replica.max_rate, "max_rate", "metro", "regional");
        self.reject_key(&replica.compression, "compression", "metro", "regional");
        let on_disconnect = match &replica.on_disconnect {
            Some(value) => match value.get_ref().as_str() {
                "degrade" => OnDisconnect::Degrade,
                "suspend" => OnDisconnect::Suspend,
                other => {
                    self.error(
                        value.span(),
                        format!(
                            "on_disconnect `{other}` is not known; use \"degrade\" \
                             (keep serving, resync later) or \"suspend\" (hold I/O)"
                        ),
                    );
                    OnDisconnect::Degrade
                }
            },
            None => OnDisconnect::Degrade,
        };
        let peer_timeout = replica
            .peer_timeout
            .as_ref()
            .and_then(|value| self.duration(value, "peer_timeout"))
            .unwrap_or(DEFAULT_PEER_TIMEOUT);
        let resync_max_rate_bytes_per_s = replica
            .resync_max_rate
            .as_ref()
            .and_then(|value| self.rate(value, "resync_max_rate"));
        ReplicaMode::Metro {
            on_disconnect,
            peer_timeout,
            resync_max_rate_bytes_per_s,
        }
    }

    /// The options of a regional replica; metro-only keys are refused.
    fn regional_mode(&mut self, replica: &RawReplica) -> ReplicaMode {
        self.reject_key(&replica.on_disconnect, "on_disconnect", "regional", "metro");
        self.reject_key(&replica.peer_timeout, "peer_timeout", "regional", "metro");
        self.reject_key(
            &replica.resync_max_rate,
            "resync_max_rate",
            "regional",
            "metro",
        );
        let interval = replica
            .interval
            .as_ref()
            .and_then(|value| self.duration(value, "interval"))
            .unwrap_or(DEFAULT_REGIONAL_INTERVAL);
        let max_rate_bytes_per_s = replica
            .max_rate
            .as_ref()
            .and_then(|value| self.rate(value, "max_rate"));
        let compression = match &replica.compression {
            Some(value) => match value.get_ref().as_str() {
                "zstd" => Compression::Zstd,
                "none" => Compression::None,
                other => {
                    self.error(
                        value.span(),
                        format!("compression `{other}` is not known; use \"zstd\" or \"none\""),
                    );
                    Compression::Zstd
                }
            },
            None => Compression::Zstd,
        };
        ReplicaMode::Regional {
            interval,
            max_rate_bytes_per_s,
            compression,
        }
    }

    fn reject_key<T>(&mut self, value: &Option<Spanned<T>>, key: &str, mode: &str, other: &str) {
        if let Some(value) = value {
            self.error(
                value.span(),
                format!(
                    "`{key}` applies to {other} replicas only, and this one is {mode}; remove it \
                     or set mode = \"{other}\""
                ),
            );
        }
    }

    fn check_name(&mut self, value: &Spanned<String>, what: &str) {
        let name = value.get_ref();
        let problem = if name.is_empty() {
            Some("is empty".to_string())
        } else if name.len() > NAME_LENGTH_MAX {
            Some(format!("is longer than {NAME_LENGTH_MAX} bytes"))
        } else if name == "." || name == ".." {
            Some("is a path component".to_string())
        } else {
            name.chars()
                .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
                .map(|bad| format!("contains {bad:?}"))
        };
        if let Some(problem) = problem {
            self.error(
                value.span(),
                format!(
                    "{what} `{name}` {problem}; use 1 to {NAME_LENGTH_MAX} characters from \
                     A-Z a-z 0-9 . _ -"
                ),
            );
        }
    }

    fn path_value(&mut self, value: &Spanned<String>, what: &str) -> PathBuf {
        if value.get_ref().is_empty() {
            self.error(value.span(), format!("{what} is empty; give a path"));
        }
        PathBuf::from(value.get_ref())
    }

    fn socket_addr(
        &mut self,
        value: &Spanned<String>,
        what: &str,
        example: &str,
    ) -> Option<SocketAddr> {
        match value.get_ref().parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                self.error(
                    value.span(),
                    format!(
                        "{what} `{}` is not an IP address and port; write it like \"{example}\" \
                         (host names are not resolved)",
                        value.get_ref()
                    ),
                );
                None
            }
        }
    }

    fn size(&mut self, value: &Spanned<toml::Value>, what: &str) -> Option<u64> {
        match parse_size(value.get_ref()) {
            Ok(0) => {
                self.error(
                    value.span(),
                    format!("{what} is zero; give a positive size"),
                );
                None
            }
            Ok(size) => Some(size),
            Err(problem) => {
                self.error(value.span(), format!("{what}: {problem}"));
                None
            }
        }
    }

    fn check_aligned(&mut self, value: &Spanned<toml::Value>, size: u64, what: &str) {
        if !size.is_multiple_of(SIZE_ALIGNMENT_BYTES) {
            let rounded = size.div_ceil(SIZE_ALIGNMENT_BYTES) * SIZE_ALIGNMENT_BYTES;
            self.error(
                value.span(),
                format!(
                    "{what} {size} bytes is not a multiple of 4096; use a multiple such as {rounded}"
                ),
            );
        }
    }

    fn rate(&mut self, value: &Spanned<toml::Value>, what: &str) -> Option<u64> {
        let parsed = match value.get_ref() {
            toml::Value::String(text) => match text.trim().strip_suffix("/s") {
                Some(size) => parse_size_text(size),
                None => Err(format!(
                    "`{text}` has no \"/s\"; write a rate like \"100MiB/s\""
                )),
            },
            other => parse_size(other),
        };
        match parsed {
            Ok(0) => {
                self.error(
                    value.span(),
                    format!(
                        "{what} is zero, which would never ship anything; remove it for no cap \
                         or give a rate like \"100MiB/s\""
                    ),
                );
                None
            }
            Ok(rate) => Some(rate),
            Err(problem) => {
                self.error(value.span(), format!("{what}: {problem}"));
                None
            }
        }
    }

    fn duration(&mut self, value: &Spanned<toml::Value>, what: &str) -> Option<Duration> {
        match parse_duration(value.get_ref()) {
            Ok(duration) if duration.is_zero() => {
                self.error(
                    value.span(),
                    format!("{what} is zero; give a positive duration like \"5s\""),
                );
                None
            }
            Ok(duration) => Some(duration),
            Err(problem) => {
                self.error(value.span(), format!("{what}: {problem}"));
                None
            }
        }
    }

    fn check_socket_path(&mut self, span: Range<usize>, path: &Path, what: &str) {
        if path.as_os_str().len() > UNIX_SOCKET_PATH_LENGTH_MAX {
            self.error(
                span.clone(),
                format!(
                    "{what} path `{}` is longer than {UNIX_SOCKET_PATH_LENGTH_MAX} bytes, the \
                     limit for Unix sockets; use a shorter path",
                    path.display()
                ),
            );
        }
        if self.check_filesystem && !path.as_os_str().is_empty() {
            self.check_parent_dir(span, path, what);
        }
    }

    fn check_parent_dir(&mut self, span: Range<usize>, path: &Path, what: &str) -> bool {
        let parent = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        if parent.is_dir() {
            return true;
        }
        self.error(
            span,
            format!(
                "the directory of {what} `{}` does not exist: create `{}` or fix the path",
                path.display(),
                parent.display()
            ),
        );
        false
    }

    fn check_data_dir(&mut self, value: &Spanned<String>, data_dir: &Path) {
        match std::fs::metadata(data_dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => self.error(
                value.span(),
                format!(
                    "data_dir `{}` exists but is not a directory; point data_dir at a directory",
                    data_dir.display()
                ),
            ),
            // `ferry run` does not create data_dir: a typo in it would otherwise silently
            // start every volume with a fresh, empty journal.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => self.error(
                value.span(),
                format!(
                    "data_dir `{}` does not exist: create it (mkdir -p) or fix the path",
                    data_dir.display()
                ),
            ),
            Err(error) => self.error(
                value.span(),
                format!(
                    "data_dir `{}` cannot be inspected ({error}); check its permissions",
                    data_dir.display()
                ),
            ),
        }
    }

    fn check_device(&mut self, value: &Spanned<String>, device: &Path, has_size: bool) {
        match std::fs::metadata(device) {
            Ok(meta) => {
                let file_type = meta.file_type();
                if !(file_type.is_file() || file_type.is_block_device()) {
                    self.error(
                        value.span(),
                        format!(
                            "device `{}` is neither a block device nor a regular file; point \
                             it at one",
                            device.display()
                        ),
                    );
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                if self.check_parent_dir(value.span(), device, "device") && !has_size {
                    self.error(
                        value.span(),
                        format!(
                            "device `{}` does not exist and the volume has no `size`; set \
                             size = \"10GiB\" (for example) to create it as a file, or fix the path",
                            device.display()
                        ),
                    );
                }
            }
            Err(error) => self.error(
                value.span(),
                format!(
                    "device `{}` cannot be inspected ({error}); check its permissions",
                    device.display()
                ),
            ),
        }
    }
}

/// 1-based line and column of a byte offset; columns count characters, as editors do.
fn position_of(text: &str, offset: usize) -> Position {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |index| index + 1);
    Position {
        line: before.matches('\n').count() + 1,
        column: before[line_start..].chars().count() + 1,
    }
}

/// A size: an integer number of bytes, or a string like "512MiB".
pub fn parse_size(value: &toml::Value) -> Result<u64, String> {
    match value {
        toml::Value::Integer(bytes) => u64::try_from(*bytes)
            .map_err(|_| format!("{bytes} is negative; give a size like \"10GiB\"")),
        toml::Value::String(text) => parse_size_text(text),
        other => Err(format!(
            "expected a size like \"10GiB\" or an integer number of bytes, found a {}",
            other.type_str()
        )),
    }
}

/// Parses "4096", "512MiB", "10 GiB". Units are binary (KiB/MiB/GiB/TiB).
pub fn parse_size_text(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(digits_end);
    let unit = unit.trim();
    if digits.is_empty() {
        return Err(format!(
            "`{text}` does not start with a number; write a size like \"10GiB\""
        ));
    }
    let multiplier: u64 = match unit {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        _ => {
            return Err(format!(
                "`{text}` has unit `{unit}`; use one of B, KiB, MiB, GiB, TiB (binary units)"
            ))
        }
    };
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is too large; sizes must fit in 64 bits"))?;
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("`{text}` is too large; sizes must fit in 64 bits"))
}

/// A duration: a string like "500ms", "5s", "2m", "1h".
pub fn parse_duration(value: &toml::Value) -> Result<Duration, String> {
    match value {
        toml::Value::String(text) => parse_duration_text(text),
        toml::Value::Integer(number) => Err(format!(
            "{number} has no unit; write a duration like \"{number}s\" (units: ms, s, m, h)"
        )),
        other => Err(format!(
            "expected a duration like \"5s\", found a {}",
            other.type_str()
        )),
    }
}

pub fn parse_duration_text(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(digits_end);
    let unit = unit.trim();
    if digits.is_empty() {
        return Err(format!(
            "`{text}` does not start with a whole number; write a duration like \"5s\" or \"500ms\""
        ));
    }
    let too_large = || format!("`{text}` is too large");
    let number: u64 = digits.parse().map_err(|_| too_large())?;
    let seconds_per_unit: u64 = match unit {
        "ms" => return Ok(Duration::from_millis(number)),
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "" => {
            return Err(format!(
                "`{text}` has no unit; write it like \"{number}s\" (units: ms, s, m, h)"
            ))
        }
        _ => {
            return Err(format!(
                "`{text}` has unit `{unit}`; use one of ms, s, m, h"
            ))
        }
    };
    number
        .checked_mul(seconds_per_unit)
        .map(Duration::from_secs)
        .ok_or_else(too_large)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATH: &str = "test.toml";

    /// The shipped examples parse (paths on this machine are not checked), and the metro pair
    /// mirrors itself.
    #[test]
    fn example_configs_parse() {
        for (name, text) in [
            (
                "standalone.toml",
                include_str!("../../config/standalone.toml"),
            ),
            (
                "metro-site-a.toml",
                include_str!("../../config/metro-site-a.toml"),
            ),
            (
                "metro-site-b.toml",
                include_str!("../../config/metro-site-b.toml"),
            ),
            (
                "three-site-a.toml",
                include_str!("../../config/three-site-a.toml"),
            ),
            (
                "three-site-b.toml",
                include_str!("../../config/three-site-b.toml"),
            ),
            (
                "three-site-c.toml",
                include_str!("../../config/three-site-c.toml"),
            ),
        ] {
            let config = Config::parse_unchecked(text, Path::new(name))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            for volume in &config.volumes {
                for replica in &volume.replicas {
                    assert!(
                        config.peers.iter().any(|p| p.name == replica.peer),
                        "{name}: replica peer {} is not a [[peers]] entry",
                        replica.peer
                    );
                }
            }
        }
    }

    /// The smallest valid config; tests append to it or replace parts of it.
    const MINIMAL: &str = r#"[node]
name = "a"
data_dir = "/var/lib/ferry"

[nbd]
listen = ["unix:/run/ferry/nbd.sock"]
"#;

    /// Asserts that `text` fails and that one error line contains `expected`, which starts with
    /// "LINE:COL: " so every test pins the position too.
    #[track_caller]
    fn check(text: &str, expected: &str) {
        match Config::parse_unchecked(text, Path::new(PATH)) {
            Ok(config) => panic!("expected an error containing {expected:?}, got {config:#?}"),
            Err(errors) => {
                let shown = errors.to_string();
                let wanted = format!("{PATH}:{expected}");
                assert!(
                    shown.lines().any(|line| line.contains(&wanted)),
                    "expected a line containing {wanted:?}, got:\n{shown}"
                );
            }
        }
    }

    fn parse_ok(text: &str) -> Config {
        match Config::parse_unchecked(text, Path::new(PATH)) {
            Ok(config) => config,
            Err(errors) => panic!("unexpected errors:\n{errors}"),
        }
    }

    fn with_volume(volume: &str) -> String {
        format!("{MINIMAL}\n[[volumes]]\n{volume}")
    }

    #[test]
    fn good_config_gives_the_typed_result() {
        let text = r#"
[node]
name = "site-a"
data_dir = "/var/lib/ferry"
metrics_listen = "127.0.0.1:9860"
listen = "0.0.0.0:7788"

[nbd]
listen = ["unix:/run/ferry/nbd.sock", "tcp:127.0.0.1:10809", "tcp:[::1]:10809"]

[tls]
ca = "/etc/ferry/ca.pem"
cert = "/etc/ferry/site-a.pem"
key = "/etc/ferry/site-a.key"

[[peers]]
name = "site-b"
address = "10.0.0.2:7788"

[[peers]]
name = "site-c"
address = "10.0.1.2:7788"

[[volumes]]
name = "pg-data"
device = "/dev/vg0/pg-data"
size = "10GiB"
journal_size = 67108864
initial_role = "secondary"

[[volumes.replicas]]
peer = "site-b"
mode = "metro"
on_disconnect = "suspend"
peer_timeout = "500ms"
resync_max_rate = "200MiB/s"

[[volumes.replicas]]
peer = "site-c"
mode = "regional"
interval = "2m"
max_rate = "100MiB/s"
compression = "none"

[[volumes]]
name = "logs"
device = "/srv/logs.img"

[[volumes.replicas]]
peer = "site-c"
mode = "regional"
"#;
        let expected = Config {
            node: NodeConfig {
                name: "site-a".into(),
                data_dir: "/var/lib/ferry".into(),
                control_socket: DEFAULT_CONTROL_SOCKET.into(),
                metrics_listen: Some("127.0.0.1:9860".parse().unwrap()),
                listen: Some("0.0.0.0:7788".parse().unwrap()),
            },
            nbd: NbdConfig {
                listen: vec![
                    ListenAddr::Unix("/run/ferry/nbd.sock".into()),
                    ListenAddr::Tcp("127.0.0.1:10809".parse().unwrap()),
                    ListenAddr::Tcp("[::1]:10809".parse().unwrap()),
                ],
                max_connections: crate::nbd::DEFAULT_MAX_CONNECTIONS,
            },
            tls: Some(TlsConfig {
                ca: "/etc/ferry/ca.pem".into(),
                cert: "/etc/ferry/site-a.pem".into(),
                key: "/etc/ferry/site-a.key".into(),
            }),
            peers: vec![
                PeerConfig {
                    name: "site-b".into(),
                    address: "10.0.0.2:7788".parse().unwrap(),
                },
                PeerConfig {
                    name: "site-c".into(),
                    address: "10.0.1.2:7788".parse().unwrap(),
                },
            ],
            volumes: vec![
                VolumeConfig {
                    name: "pg-data".into(),
                    device: "/dev/vg0/pg-data".into(),
                    size_bytes: Some(10 << 30),
                    journal_size_bytes: 64 << 20,
                    initial_role: Role::Secondary,
                    replicas: vec![
                        ReplicaConfig {
                            peer: "site-b".into(),
                            mode: ReplicaMode::Metro {
                                on_disconnect: OnDisconnect::Suspend,
                                peer_timeout: Duration::from_millis(500),
                                resync_max_rate_bytes_per_s: Some(200 << 20),
                            },
                        },
                        ReplicaConfig {
                            peer: "site-c".into(),
                            mode: ReplicaMode::Regional {
                                interval: Duration::from_secs(120),
                                max_rate_bytes_per_s: Some(100 << 20),
                                compression: Compression::None,
                            },
                        },
                    ],
                },
                VolumeConfig {
                    name: "logs".into(),
                    device: "/srv/logs.img".into(),
                    size_bytes: None,
                    journal_size_bytes: DEFAULT_JOURNAL_SIZE_BYTES,
                    initial_role: Role::Primary,
                    replicas: vec![ReplicaConfig {
                        peer: "site-c".into(),
                        mode: ReplicaMode::Regional {
                            interval: DEFAULT_REGIONAL_INTERVAL,
                            max_rate_bytes_per_s: None,
                            compression: Compression::Zstd,
                        },
                    }],
                },
            ],
        };
        assert_eq!(parse_ok(text), expected);
    }

    #[test]
    fn metro_defaults() {
        let text = format!(
            "{}\n[tls]\nca = \"c\"\ncert = \"c\"\nkey = \"k\"\n[[peers]]\nname = \"b\"\naddress = \"10.0.0.2:7788\"\n\
             [[volumes]]\nname = \"v\"\ndevice = \"/d\"\n[[volumes.replicas]]\npeer = \"b\"\nmode = \"metro\"\n",
            MINIMAL
        );
        let config = parse_ok(&text);
        assert_eq!(
            config.volumes[0].replicas[0].mode,
            ReplicaMode::Metro {
                on_disconnect: OnDisconnect::Degrade,
                peer_timeout: DEFAULT_PEER_TIMEOUT,
                resync_max_rate_bytes_per_s: None,
            }
        );
    }

    #[test]
    fn every_example_in_config_dir_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
        let mut count = 0;
        for entry in std::fs::read_dir(&dir).expect("config/ exists") {
            let path = entry.expect("readable dir entry").path();
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("readable example");
            if let Err(errors) = Config::parse_unchecked(&text, &path) {
                panic!("{errors}");
            }
            count += 1;
        }
        assert!(
            count >= 2,
            "expected the shipped examples in {}",
            dir.display()
        );
    }

    #[test]
    fn syntax_and_type_errors_point_at_the_value() {
        check("[node\nname = \"a\"\n", "1:6: ");
        check(
            "[node]\nname = 5\ndata_dir = \"/x\"\n",
            "2:8: invalid type: integer `5`, expected a string",
        );
        check(
            "[node]\nname = \"a\"\n", // no data_dir
            "1:1: missing field `data_dir`",
        );
    }

    #[test]
    fn unknown_keys_are_errors() {
        check(
            &MINIMAL.replace("data_dir", "colour = 1\ndata_dir"),
            "3:1: unknown field `colour`",
        );
        check(
            &with_volume("name = \"v\"\ndevice = \"/d\"\nsise = \"1GiB\"\n"),
            "11:1: unknown field `sise`",
        );
    }

    #[test]
    fn names_are_checked() {
        check(
            &MINIMAL.replace("\"a\"", "\"\""),
            "2:8: node name `` is empty",
        );
        check(
            &MINIMAL.replace("\"a\"", "\"a b\""),
            "2:8: node name `a b` contains ' '",
        );
        check(
            &with_volume("name = \"..\"\ndevice = \"/d\"\n"),
            "9:8: volume name `..` is a path component",
        );
    }

    #[test]
    fn duplicate_volume_names_and_devices() {
        let text = format!(
            "{MINIMAL}\n[[volumes]]\nname = \"v\"\ndevice = \"/d1\"\n\n[[volumes]]\nname = \"v\"\ndevice = \"/d1\"\n"
        );
        check(&text, "13:8: volume `v` is configured twice");
        check(&text, "14:10: device `/d1` is used by two volumes");
    }

    #[test]
    fn sizes_are_checked() {
        let volume =
            |size: &str| with_volume(&format!("name = \"v\"\ndevice = \"/d\"\nsize = {size}\n"));
        check(
            &volume("\"10GB\""),
            "11:8: size: `10GB` has unit `GB`; use one of B, KiB",
        );
        check(
            &volume("4097"),
            "11:8: size 4097 bytes is not a multiple of 4096",
        );
        check(&volume("\"0\""), "11:8: size is zero");
        check(&volume("-1"), "11:8: size: -1 is negative");
        check(
            &volume("\"99999999TiB\""),
            "11:8: size: `99999999TiB` is too large",
        );
        check(&volume("1.5"), "11:8: size: expected a size like");
        let journal = |size: &str| {
            with_volume(&format!(
                "name = \"v\"\ndevice = \"/d\"\njournal_size = {size}\n"
            ))
        };
        check(
            &journal("\"8MiB\""),
            "11:16: journal_size 8388608 bytes is below the minimum of 16MiB",
        );
        check(
            &journal("\"17000000\""),
            "11:16: journal_size 17000000 bytes is not a multiple of 4096",
        );
        assert_eq!(parse_size_text("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size_text("2 TiB"), Ok(2 << 40));
        assert_eq!(parse_size_text("4096"), Ok(4096));
    }

    #[test]
    fn durations_and_enums_are_checked() {
        let peers = "[tls]\nca = \"c\"\ncert = \"c\"\nkey = \"k\"\n[[peers]]\nname = \"b\"\naddress = \"10.0.0.2:7788\"\n";
        let replica = |body: &str| {
            format!(
                "{MINIMAL}{peers}[[volumes]]\nname = \"v\"\ndevice = \"/d\"\n[[volumes.replicas]]\npeer = \"b\"\n{body}"
            )
        };
        // Line 19 is the first line of `body`.
        check(
            &replica("mode = \"sync\"\n"),
            "19:8: replica mode `sync` is not known",
        );
        check(
            &replica("mode = \"metro\"\npeer_timeout = 5\n"),
            "20:16: peer_timeout: 5 has no unit",
        );
        check(
            &replica("mode = \"metro\"\npeer_timeout = \"5d\"\n"),
            "20:16: peer_timeout: `5d` has unit `d`",
        );
        check(
            &replica("mode = \"metro\"\npeer_timeout = \"0s\"\n"),
            "20:16: peer_timeout is zero",
        );
        check(
            &replica("mode = \"metro\"\non_disconnect = \"panic\"\n"),
            "20:17: on_disconnect `panic` is not known",
        );
        check(
            &replica("mode = \"regional\"\ncompression = \"lz4\"\n"),
            "20:15: compression `lz4` is not known",
        );
        check(
            &replica("mode = \"regional\"\nmax_rate = \"100MiB\"\n"),
            "20:12: max_rate: `100MiB` has no \"/s\"",
        );
        check(
            &replica("mode = \"regional\"\ninterval = \"soon\"\n"),
            "20:12: interval: `soon` does not start",
        );
        check(
            &MINIMAL.replace("data_dir", "initial_role = 1\ndata_dir"),
            "3:1: unknown field `initial_role`",
        );
        check(
            &with_volume("name = \"v\"\ndevice = \"/d\"\ninitial_role = \"boss\"\n"),
            "11:16: initial_role `boss` is not a role",
        );
    }

    #[test]
    fn mode_specific_keys_are_errors_on_the_other_mode() {
        let peers = "[tls]\nca = \"c\"\ncert = \"c\"\nkey = \"k\"\n[[peers]]\nname = \"b\"\naddress = \"10.0.0.2:7788\"\n";
        let replica = |body: &str| {
            format!(
                "{MINIMAL}{peers}[[volumes]]\nname = \"v\"\ndevice = \"/d\"\n[[volumes.replicas]]\npeer = \"b\"\n{body}"
            )
        };
        check(
            &replica("mode = \"metro\"\ninterval = \"30s\"\n"),
            "20:12: `interval` applies to regional replicas only",
        );
        check(
            &replica("mode = \"metro\"\ncompression = \"zstd\"\n"),
            "20:15: `compression` applies to regional",
        );
        check(
            &replica("mode = \"regional\"\npeer_timeout = \"5s\"\n"),
            "20:16: `peer_timeout` applies to metro replicas only",
        );
        check(
            &replica("mode = \"regional\"\non_disconnect = \"degrade\"\n"),
            "20:17: `on_disconnect` applies to metro",
        );
    }

    #[test]
    fn peers_and_references_are_checked() {
        let tls = "[tls]\nca = \"c\"\ncert = \"c\"\nkey = \"k\"\n";
        // Line 7 is the first line after MINIMAL.
        let text = format!("{MINIMAL}[[peers]]\nname = \"b\"\naddress = \"10.0.0.2:7788\"\n");
        check(&text, "8:8: peers are configured but [tls] is missing");
        let text = format!(
            "{MINIMAL}{tls}[[peers]]\nname = \"b\"\naddress = \"10.0.0.2\"\n[[peers]]\nname = \"b\"\naddress = \"10.0.0.3:1\"\n"
        );
        check(
            &text,
            "13:11: peer address `10.0.0.2` is not an IP address and port",
        );
        check(&text, "15:8: peer `b` is configured twice");
        let text = format!("{MINIMAL}{tls}[[peers]]\nname = \"a\"\naddress = \"10.0.0.2:1\"\n");
        check(&text, "12:8: peer `a` has this node's own name");
        let text = format!(
            "{MINIMAL}{tls}[[peers]]\nname = \"b\"\naddress = \"10.0.0.2:1\"\n[[volumes]]\nname = \"v\"\ndevice = \"/d\"\n\
             [[volumes.replicas]]\npeer = \"c\"\nmode = \"metro\"\n[[volumes.replicas]]\npeer = \"b\"\nmode = \"metro\"\n\
             [[volumes.replicas]]\npeer = \"b\"\nmode = \"regional\"\n"
        );
        check(
            &text,
            "18:8: replica peer `c` is not a [[peers]] entry (known peers: b)",
        );
        check(&text, "24:8: peer `b` is a replica of this volume twice");
    }

    #[test]
    fn nbd_max_connections_is_checked() {
        let with = |value: &str| {
            MINIMAL.replace(
                "[nbd]\nlisten = [\"unix:/run/ferry/nbd.sock\"]\n",
                &format!(
                    "[nbd]\nlisten = [\"unix:/run/ferry/nbd.sock\"]\nmax_connections = {value}\n"
                ),
            )
        };
        assert_eq!(parse_ok(&with("8")).nbd.max_connections, 8);
        assert_eq!(
            parse_ok(MINIMAL).nbd.max_connections,
            crate::nbd::DEFAULT_MAX_CONNECTIONS
        );
        check(&with("0"), "7:19: nbd.max_connections `0` is not a number");
        check(
            &with("\"many\""),
            "7:19: nbd.max_connections `\"many\"` is not",
        );
        check(&with("100000"), "7:19: nbd.max_connections `100000` is not");
    }

    #[test]
    fn nbd_listen_is_checked() {
        check(
            &MINIMAL.replace("[nbd]\nlisten = [\"unix:/run/ferry/nbd.sock\"]\n", ""),
            "1:1: no [nbd] section",
        );
        check(
            &MINIMAL.replace("[\"unix:/run/ferry/nbd.sock\"]", "[]"),
            "6:10: nbd.listen is empty",
        );
        check(
            &MINIMAL.replace("unix:/run/ferry/nbd.sock", "/run/nbd.sock"),
            "6:11: nbd listen address `/run/nbd.sock` has no scheme",
        );
        check(
            &MINIMAL.replace("unix:/run/ferry/nbd.sock", "tcp:localhost:10809"),
            "6:11: nbd listen address `tcp:localhost:10809`: `localhost:10809` is not an IP",
        );
        check(
            &MINIMAL.replace(
                "\"unix:/run/ferry/nbd.sock\"",
                "\"tcp:127.0.0.1:1\", \"tcp:127.0.0.1:1\"",
            ),
            "6:30: nbd listen address `tcp:127.0.0.1:1` is listed twice",
        );
        let long = format!("unix:/{}", "x".repeat(120));
        check(
            &MINIMAL.replace("unix:/run/ferry/nbd.sock", &long),
            "6:11: nbd socket path",
        );
        check(
            &MINIMAL.replace("data_dir", "metrics_listen = \"9860\"\ndata_dir"),
            "3:18: metrics_listen `9860` is not an IP address and port",
        );
    }

    #[test]
    fn all_semantic_errors_are_reported_in_file_order() {
        let text =
            with_volume("name = \"\"\ndevice = \"/d\"\nsize = \"1KB\"\njournal_size = \"1MiB\"\n");
        let errors = Config::parse_unchecked(&text, Path::new(PATH)).unwrap_err();
        let positions: Vec<_> = errors.errors.iter().map(|e| e.position.unwrap()).collect();
        assert_eq!(errors.errors.len(), 3, "{errors}");
        let mut sorted = positions.clone();
        sorted.sort();
        assert_eq!(positions, sorted);
    }

    #[test]
    fn filesystem_checks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().display().to_string();
        let existing = dir.path().join("existing.img");
        std::fs::write(&existing, b"").expect("write");
        let text = format!(
            "[node]\nname = \"a\"\ndata_dir = \"{root}/missing/deeper\"\ncontrol_socket = \"{root}/nodir/ferry.sock\"\n\
             [nbd]\nlisten = [\"unix:{root}/nodir/nbd.sock\"]\n\
             [[volumes]]\nname = \"v1\"\ndevice = \"{root}/new.img\"\n\
             [[volumes]]\nname = \"v2\"\ndevice = \"{root}/nodir/new.img\"\nsize = \"1GiB\"\n\
             [[volumes]]\nname = \"v3\"\ndevice = \"{root}\"\n\
             [[volumes]]\nname = \"v4\"\ndevice = \"{}\"\n",
            existing.display()
        );
        let errors = Config::parse(&text, Path::new(PATH))
            .unwrap_err()
            .to_string();
        let expect = [
            "3:12: data_dir",
            "4:18: the directory of control_socket",
            "6:11: the directory of nbd socket",
            "9:10: device",
            "does not exist and the volume has no `size`",
            "12:10: the directory of device",
            "16:10: device",
            "is neither a block device nor a regular file",
        ];
        for wanted in expect {
            assert!(errors.contains(wanted), "missing {wanted:?} in:\n{errors}");
        }
        assert_eq!(errors.lines().count(), 6, "{errors}");
        // The same file without filesystem checks is fine.
        Config::parse_unchecked(&text, Path::new(PATH)).unwrap();
        // And a config whose directories exist passes the checked parse.
        std::fs::create_dir(dir.path().join("data")).expect("mkdir");
        let good = format!(
            "[node]\nname = \"a\"\ndata_dir = \"{root}/data\"\ncontrol_socket = \"{root}/ferry.sock\"\n\
             [nbd]\nlisten = [\"unix:{root}/nbd.sock\"]\n[[volumes]]\nname = \"v\"\ndevice = \"{root}/v.img\"\nsize = \"16MiB\"\n"
        );
        Config::parse(&good, Path::new(PATH)).unwrap();
    }

    #[test]
    fn load_reports_unreadable_files() {
        let errors = Config::load(Path::new("/nonexistent/ferry.toml")).unwrap_err();
        assert!(errors
            .to_string()
            .starts_with("/nonexistent/ferry.toml: cannot read the config file"));
    }
}
