//! Mutual TLS between Ferry nodes: the node CA (`ferry cert init`), loading a node's identity
//! from the `[tls]` paths, and the quinn client/server configurations that admit only the
//! configured peers (SPEC §3, §4).
//!
//! Trust model: one private CA per cluster. A node accepts a peer only if the peer's certificate
//! chains to that CA *and* names (DNS SAN) a node listed under `[[peers]]`; the dialing side
//! additionally checks that the answering node names the peer it meant to reach. Names are
//! checked as DNS subject alternative names (webpki ignores the subject CN, as RFC 6125 asks);
//! `cert_init` writes the node name into both, so its certificates always match.
//!
//! Only the ring provider is used, and always passed explicitly: relying on the process-wide
//! default would panic at run time if another crate ever enabled a second provider.

use std::collections::HashSet;
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName as TlsDistinguishedName,
    RootCertStore, SignatureScheme,
};

use crate::config::TlsConfig;

/// The ALPN protocol both sides must offer. It doubles as the replication protocol's major
/// version: a node speaking `ferry/2` is refused at the handshake with a clear alert instead of
/// misparsing frames later.
pub const ALPN: &[u8] = b"ferry/1";

/// Subject CN of the CA made by `ferry cert init`. Reusing an existing CA rebuilds the issuer
/// name from this constant, so it must never change.
pub const CA_COMMON_NAME: &str = "ferry CA";

/// Validity of the CA and node certificates made by `ferry cert init`: ten years. This is a
/// quick-start tool for a private cluster CA; there is no renewal machinery, and a certificate
/// expiring under a running replication pair would be an outage, so the period is long.
/// Operators with a real PKI bring their own certificates.
pub const CERT_VALIDITY_DAYS: u64 = 3650;

/// How far back `not_before` is set, so that a peer whose clock is a little behind still
/// accepts a certificate made a moment ago.
const CLOCK_SKEW_ALLOWANCE_DAYS: u64 = 1;

const SECONDS_PER_DAY: u64 = 86_400;

/// TLS alert codes (RFC 8446 §6) as carried in QUIC CRYPTO_ERROR codes (0x100 + alert).
const ALERT_BAD_CERTIFICATE: u8 = 42;
const ALERT_CERTIFICATE_EXPIRED: u8 = 45;
const ALERT_UNKNOWN_CA: u8 = 48;
const ALERT_ACCESS_DENIED: u8 = 49;
const ALERT_DECRYPT_ERROR: u8 = 51;
const ALERT_CERTIFICATE_REQUIRED: u8 = 116;
const ALERT_NO_APPLICATION_PROTOCOL: u8 = 120;
const QUIC_CRYPTO_ERROR_FIRST: u64 = 0x100;
const QUIC_CRYPTO_ERROR_LAST: u64 = 0x1ff;

/// Everything that can go wrong making, loading or using node certificates.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// `cert init` was given no node.
    #[error("no node given: pass at least one `--node NAME` (the names used as [node] name)")]
    NoNodes,
    /// A node name that cannot be a certificate name or a file name.
    #[error("node name `{name}` cannot be used: {why}")]
    BadNodeName { name: String, why: &'static str },
    /// A file `cert init` would write is already there.
    #[error(
        "{path} already exists; `ferry cert init` never overwrites: remove it, or leave that \
         node out of the --node list"
    )]
    Exists { path: PathBuf },
    /// Only one of `ca.pem` / `ca.key` exists, so the CA can be neither reused nor made.
    #[error(
        "{present} exists but {missing} does not: the CA needs both to issue certificates; \
         restore {missing}, or remove {present} to make a new CA (and re-issue every node)"
    )]
    HalfCa { present: PathBuf, missing: PathBuf },
    /// Reading a file failed.
    #[error("cannot read {path}: {source}; check the path and its permissions")]
    Read { path: PathBuf, source: io::Error },
    /// Writing a file failed.
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    /// A file that should hold PEM certificates holds none.
    #[error(
        "{path} holds no PEM certificate (a `-----BEGIN CERTIFICATE-----` block){detail}; \
         point the setting at the certificate file (`ferry cert init` makes them)"
    )]
    NoCertificate { path: PathBuf, detail: String },
    /// A file that should hold a PEM private key holds none.
    #[error(
        "{path} holds no PEM private key (PKCS#8, SEC1 or PKCS#1){detail}; point [tls] key at \
         the node's key file"
    )]
    NoKey { path: PathBuf, detail: String },
    /// The private key cannot be used.
    #[error("{path}: the private key cannot be used: {detail}")]
    BadKey { path: PathBuf, detail: String },
    /// The key file and the certificate file do not belong together.
    #[error(
        "{key} is not the private key of the certificate in {cert}; point [tls] key and cert \
         at the pair made together for this node"
    )]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    /// The node certificate does not chain to the CA, does not name this node, or is expired.
    #[error("{cert} cannot be this node's certificate: {detail}")]
    NodeCertificate { cert: PathBuf, detail: String },
    /// The existing CA could not issue a certificate that verifies against it.
    #[error(
        "the existing CA in {ca} cannot be used to add a node: {detail}; issue the certificate \
         with the tool that made this CA, or make a new CA in an empty directory"
    )]
    CaUnusable { ca: PathBuf, detail: String },
    /// rcgen refused to make a key or certificate.
    #[error("cannot generate {what}: {source}")]
    Generate { what: String, source: rcgen::Error },
    /// rustls/quinn refused the configuration built from a loaded identity.
    #[error("cannot build the TLS configuration: {0}")]
    Config(String),
}

/// What `cert_init` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInitReport {
    /// True when `ca.pem`/`ca.key` already existed and issued the new node certificates.
    pub ca_reused: bool,
    /// Every file written, in the order written.
    pub files_written: Vec<PathBuf>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes (or reuses) the cluster CA in `dir` and one certificate per node, signed by it.
///
/// Writes `ca.pem`, `ca.key` (unless both already exist, in which case that CA issues the new
/// certificates, so a node can be added later) and `NAME.pem`, `NAME.key` per node. Keys are
/// created with mode 0600. Nothing is ever overwritten: every target is checked before anything
/// is written, and files are created with `O_EXCL`. Certificates are valid for
/// [`CERT_VALIDITY_DAYS`] (ten years).
pub fn cert_init(dir: &Path, nodes: &[String]) -> Result<CertInitReport, TlsError> {
    check_node_names(nodes)?;
    let ca_pem_path = dir.join("ca.pem");
    let ca_key_path = dir.join("ca.key");
    let ca_reused = match (ca_pem_path.exists(), ca_key_path.exists()) {
        (true, true) => true,
        (false, false) => false,
        (true, false) => {
            return Err(TlsError::HalfCa {
                present: ca_pem_path,
                missing: ca_key_path,
            })
        }
        (false, true) => {
            return Err(TlsError::HalfCa {
                present: ca_key_path,
                missing: ca_pem_path,
            })
        }
    };
    for name in nodes {
        for path in [
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        ] {
            if path.exists() {
                return Err(TlsError::Exists { path });
            }
        }
    }

    // Everything is generated in memory first, so a generation failure writes nothing.
    let validity = Validity::from_now()?;
    let ca_params = ca_params(&validity);
    let (ca_key, ca_cert_pem, new_ca) = if ca_reused {
        let key_pem = read_to_string(&ca_key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|error| TlsError::BadKey {
            path: ca_key_path.clone(),
            detail: error.to_string(),
        })?;
        let cert_pem = read_to_string(&ca_pem_path)?;
        (key, cert_pem, false)
    } else {
        let key = generate_key("the CA key")?;
        let cert = ca_params
            .self_signed(&key)
            .map_err(|source| TlsError::Generate {
                what: "the CA certificate".to_string(),
                source,
            })?;
        (key, cert.pem(), true)
    };
    let ca_roots = parse_certificates(&ca_pem_path, ca_cert_pem.as_bytes())?;
    let roots = root_store(&ca_pem_path, &ca_roots)?;
    let issuer = Issuer::new(ca_params, &ca_key);

    let mut issued = Vec::new();
    for name in nodes {
        let key = generate_key(&format!("the key of node `{name}`"))?;
        let cert = node_params(name, &validity)?
            .signed_by(&key, &issuer)
            .map_err(|source| TlsError::Generate {
                what: format!("the certificate of node `{name}`"),
                source,
            })?;
        // A reused CA is rebuilt from its key and the fixed name `ferry CA`; if it was made by
        // another tool (another subject) or its key and certificate do not match, the issued
        // certificate would not verify. Checking here turns that into an error now instead of
        // a refused handshake later.
        verify_chain(&roots, cert.der(), name).map_err(|detail| TlsError::CaUnusable {
            ca: ca_pem_path.clone(),
            detail,
        })?;
        issued.push((name, cert.pem(), key.serialize_pem()));
    }

    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| TlsError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
    let mut files_written = Vec::new();
    if new_ca {
        write_new_file(&ca_key_path, ca_key.serialize_pem().as_bytes(), 0o600)?;
        files_written.push(ca_key_path);
        write_new_file(&ca_pem_path, ca_cert_pem.as_bytes(), 0o644)?;
        files_written.push(ca_pem_path);
    }
    for (name, cert_pem, key_pem) in issued {
        let key_path = dir.join(format!("{name}.key"));
        write_new_file(&key_path, key_pem.as_bytes(), 0o600)?;
        files_written.push(key_path);
        let cert_path = dir.join(format!("{name}.pem"));
        write_new_file(&cert_path, cert_pem.as_bytes(), 0o644)?;
        files_written.push(cert_path);
    }
    Ok(CertInitReport {
        ca_reused,
        files_written,
    })
}

fn check_node_names(nodes: &[String]) -> Result<(), TlsError> {
    if nodes.is_empty() {
        return Err(TlsError::NoNodes);
    }
    let mut seen = HashSet::new();
    for name in nodes {
        let bad = |why| TlsError::BadNodeName {
            name: name.clone(),
            why,
        };
        if !seen.insert(name.as_str()) {
            return Err(bad("it is given twice"));
        }
        if name.eq_ignore_ascii_case("ca") {
            return Err(bad("`ca` is the CA's own file name (ca.pem, ca.key)"));
        }
        // The name becomes a DNS SAN and a file name; a DNS name has no `/` and does not
        // start with `.`, so it is also a safe file name inside DIR.
        match ServerName::try_from(name.as_str()) {
            Ok(ServerName::DnsName(_)) => {}
            Ok(_) => return Err(bad("it is an IP address; use a node name like `site-a`")),
            Err(_) => {
                return Err(bad(
                    "it is not a valid DNS name (letters, digits, `-` and `.`, like `site-a`)",
                ))
            }
        }
    }
    Ok(())
}

/// Certificate validity window, computed once so all certificates of a run agree.
struct Validity {
    not_before_unix_s: u64,
    not_after_unix_s: u64,
}

impl Validity {
    fn from_now() -> Result<Validity, TlsError> {
        let now_unix_s = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|_| TlsError::Config("the system clock is before 1970".to_string()))?
            .as_secs();
        Ok(Validity {
            not_before_unix_s: now_unix_s
                .saturating_sub(CLOCK_SKEW_ALLOWANCE_DAYS * SECONDS_PER_DAY),
            not_after_unix_s: now_unix_s + CERT_VALIDITY_DAYS * SECONDS_PER_DAY,
        })
    }

    fn apply(&self, params: &mut CertificateParams) {
        // rcgen takes `time::OffsetDateTime`; adding a std Duration to the epoch avoids a direct
        // dependency on the `time` crate.
        let epoch = rcgen::date_time_ymd(1970, 1, 1);
        params.not_before = epoch + Duration::from_secs(self.not_before_unix_s);
        params.not_after = epoch + Duration::from_secs(self.not_after_unix_s);
    }
}

fn ca_params(validity: &Validity) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, CA_COMMON_NAME);
    params.distinguished_name = name;
    // Path length 0: this CA signs node certificates only, never another CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity.apply(&mut params);
    params
}

fn node_params(name: &str, validity: &Validity) -> Result<CertificateParams, TlsError> {
    let mut params =
        CertificateParams::new(vec![name.to_string()]).map_err(|source| TlsError::Generate {
            what: format!("the certificate of node `{name}`"),
            source,
        })?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Every node both dials (client) and accepts (server) peer connections.
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    validity.apply(&mut params);
    Ok(params)
}

fn generate_key(what: &str) -> Result<KeyPair, TlsError> {
    // rcgen's default: ECDSA P-256, fast to verify at every handshake and supported by ring.
    KeyPair::generate().map_err(|source| TlsError::Generate {
        what: what.to_string(),
        source,
    })
}

/// Creates `path` with `mode` from the start (no window where a key is world-readable), fails
/// if it exists, and syncs it so a crash right after `cert init` does not leave an empty key.
fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    let write_error = |source| TlsError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| {
            if source.kind() == io::ErrorKind::AlreadyExists {
                TlsError::Exists {
                    path: path.to_path_buf(),
                }
            } else {
                write_error(source)
            }
        })?;
    file.write_all(contents).map_err(write_error)?;
    file.sync_all().map_err(write_error)
}

fn read_to_string(path: &Path) -> Result<String, TlsError> {
    fs::read_to_string(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_bytes(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn parse_certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsError::NoCertificate {
            path: path.to_path_buf(),
            detail: format!(" (malformed PEM: {error})"),
        })?;
    if certificates.is_empty() {
        let detail = if looks_like_pem(pem) {
            String::new()
        } else {
            " (it is not PEM at all)".to_string()
        };
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
            detail,
        });
    }
    Ok(certificates)
}

fn looks_like_pem(bytes: &[u8]) -> bool {
    bytes.windows(11).any(|window| window == b"-----BEGIN ")
}

fn root_store(path: &Path, roots: &[CertificateDer<'static>]) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for root in roots {
        store
            .add(root.clone())
            .map_err(|error| TlsError::NoCertificate {
                path: path.to_path_buf(),
                detail: format!(" usable as a CA ({error})"),
            })?;
    }
    Ok(store)
}

/// Checks that `end_entity` chains to `roots` and names `name`; the error is a sentence.
fn verify_chain(
    roots: &RootCertStore,
    end_entity: &CertificateDer<'_>,
    name: &str,
) -> Result<(), String> {
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots.clone()), provider())
        .build()
        .map_err(|error| error.to_string())?;
    let server_name = ServerName::try_from(name.to_string())
        .map_err(|_| format!("`{name}` is not a valid DNS name"))?;
    verifier
        .verify_server_cert(end_entity, &[], &server_name, &[], UnixTime::now())
        .map(|_| ())
        .map_err(|error| match error {
            // A same-named CA of another cluster shows up as a bad signature (see
            // `AuthRefusal::from_connection_error`).
            #[allow(deprecated)]
            rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer | CertificateError::BadSignature,
            ) => "it is not signed by this CA".to_string(),
            rustls::Error::InvalidCertificate(CertificateError::NotValidForName)
            | rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
                ..
            }) => format!("it does not name `{name}`"),
            other => other.to_string(),
        })
}

/// This node's TLS identity: the CA it trusts, its certificate chain and private key.
#[derive(Debug)]
pub struct TlsIdentity {
    node_name: String,
    roots: Arc<RootCertStore>,
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Clone for TlsIdentity {
    fn clone(&self) -> Self {
        TlsIdentity {
            node_name: self.node_name.clone(),
            roots: self.roots.clone(),
            cert_chain: self.cert_chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl TlsIdentity {
    /// Loads the `[tls]` files of node `node_name` and checks them together: the key belongs
    /// to the certificate, the certificate chains to the CA, names `node_name` and is in its
    /// validity period.
    pub fn load(config: &TlsConfig, node_name: &str) -> Result<TlsIdentity, TlsError> {
        Self::load_files(&config.ca, &config.cert, &config.key, node_name)
    }

    /// The identity of `node_name` that [`cert_init`] wrote into `dir`: `ca.pem`,
    /// `NODE.pem`, `NODE.key` (tests and benchmarks; a daemon names its files in its config).
    pub fn load_from_cert_dir(dir: &Path, node_name: &str) -> Result<TlsIdentity, TlsError> {
        Self::load_files(
            &dir.join("ca.pem"),
            &dir.join(format!("{node_name}.pem")),
            &dir.join(format!("{node_name}.key")),
            node_name,
        )
    }

    /// [`TlsIdentity::load`] with the three paths given separately.
    pub fn load_files(
        ca: &Path,
        cert: &Path,
        key: &Path,
        node_name: &str,
    ) -> Result<TlsIdentity, TlsError> {
        let ca_certificates = parse_certificates(ca, &read_bytes(ca)?)?;
        let roots = root_store(ca, &ca_certificates)?;
        let cert_chain = parse_certificates(cert, &read_bytes(cert)?)?;
        let key_bytes = read_bytes(key)?;
        let private_key = match PrivateKeyDer::from_pem_slice(&key_bytes) {
            Ok(private_key) => private_key,
            Err(rustls::pki_types::pem::Error::NoItemsFound) => {
                let detail = if looks_like_pem(&key_bytes) {
                    String::new()
                } else {
                    " (it is not PEM at all)".to_string()
                };
                return Err(TlsError::NoKey {
                    path: key.to_path_buf(),
                    detail,
                });
            }
            Err(error) => {
                return Err(TlsError::NoKey {
                    path: key.to_path_buf(),
                    detail: format!(" (malformed PEM: {error})"),
                })
            }
        };
        match rustls::sign::CertifiedKey::from_der(
            cert_chain.clone(),
            private_key.clone_key(),
            &provider(),
        ) {
            Ok(_) => {}
            Err(rustls::Error::InconsistentKeys(_)) => {
                return Err(TlsError::KeyMismatch {
                    cert: cert.to_path_buf(),
                    key: key.to_path_buf(),
                })
            }
            Err(error) => {
                return Err(TlsError::BadKey {
                    path: key.to_path_buf(),
                    detail: error.to_string(),
                })
            }
        }
        verify_chain(&roots, &cert_chain[0], node_name).map_err(|detail| {
            TlsError::NodeCertificate {
                cert: cert.to_path_buf(),
                detail: format!(
                    "{detail} (checked against CA {} and [node] name `{node_name}`)",
                    ca.display()
                ),
            }
        })?;
        Ok(TlsIdentity {
            node_name: node_name.to_string(),
            roots: Arc::new(roots),
            cert_chain,
            key: private_key,
        })
    }

    /// The node name the certificate was checked against.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }
}

fn dns_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name.to_string()).map_err(|_| {
        TlsError::Config(format!(
            "peer name `{name}` is not a valid DNS name, so no certificate can name it; \
             use names like `site-b`"
        ))
    })
}

/// Server side of a peer connection: requires a client certificate from the node CA that
/// names one of `allowed_peers`; offers only ALPN `ferry/1` and TLS 1.3 (QUIC needs it).
pub fn server_config(
    identity: &TlsIdentity,
    allowed_peers: Vec<String>,
) -> Result<quinn::ServerConfig, TlsError> {
    let provider = provider();
    let allowed = allowed_peers
        .iter()
        .map(|name| dns_name(name))
        .collect::<Result<Vec<_>, _>>()?;
    let inner =
        WebPkiClientVerifier::builder_with_provider(identity.roots.clone(), provider.clone())
            .build()
            .map_err(|error| TlsError::Config(error.to_string()))?;
    let verifier = Arc::new(PeerClientVerifier { inner, allowed });
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|error| TlsError::Config(error.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.cert_chain.clone(), identity.key.clone_key())
        .map_err(|error| TlsError::Config(error.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|error| TlsError::Config(error.to_string()))?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(quic)))
}

/// Client side of a connection to `expected_peer`: presents this node's certificate and
/// accepts the server only if its certificate chains to the node CA and names
/// `expected_peer` — whatever server name the connect call passes.
pub fn client_config(
    identity: &TlsIdentity,
    expected_peer: &str,
) -> Result<quinn::ClientConfig, TlsError> {
    let provider = provider();
    let expected = dns_name(expected_peer)?;
    let inner =
        WebPkiServerVerifier::builder_with_provider(identity.roots.clone(), provider.clone())
            .build()
            .map_err(|error| TlsError::Config(error.to_string()))?;
    let verifier = Arc::new(PeerServerVerifier { inner, expected });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|error| TlsError::Config(error.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(identity.cert_chain.clone(), identity.key.clone_key())
        .map_err(|error| TlsError::Config(error.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|error| TlsError::Config(error.to_string()))?;
    Ok(quinn::ClientConfig::new(Arc::new(quic)))
}

/// The peer name (one of `allowed_peers`) that an authenticated connection's certificate
/// names, or `None`. Call it on a connection accepted with [`server_config`]; the verifier has
/// already checked the chain, this only tells which peer it is.
pub fn authenticated_peer(
    connection: &quinn::Connection,
    allowed_peers: &[String],
) -> Option<String> {
    let identity = connection.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    let end_entity = ParsedCertificate::try_from(chain.first()?).ok()?;
    allowed_peers
        .iter()
        .find(|name| {
            ServerName::try_from(name.as_str())
                .map(|server_name| {
                    rustls::client::verify_server_name(&end_entity, &server_name).is_ok()
                })
                .unwrap_or(false)
        })
        .cloned()
}

/// Checks a client certificate with webpki against the node CA, then requires that it names
/// one of the configured peers: a valid certificate of a node that is not our peer is refused
/// with `access_denied`, which the other side reports as [`AuthRefusalKind::NotAPeer`].
#[derive(Debug)]
struct PeerClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    allowed: Vec<ServerName<'static>>,
}

impl ClientCertVerifier for PeerClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[TlsDistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let parsed = ParsedCertificate::try_from(end_entity)?;
        let names_a_peer = self
            .allowed
            .iter()
            .any(|name| rustls::client::verify_server_name(&parsed, name).is_ok());
        if names_a_peer {
            Ok(ClientCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Checks the server certificate with webpki against the node CA and the *configured* peer
/// name, ignoring the name the connect call passed: the identity we require comes from
/// `[[peers]]`, not from whoever builds the connection.
#[derive(Debug)]
struct PeerServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    expected: ServerName<'static>,
}

impl ServerCertVerifier for PeerServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner.verify_server_cert(
            end_entity,
            intermediates,
            &self.expected,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Why a handshake was refused, as far as the TLS alert tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthRefusalKind {
    /// The certificate is not signed by the node CA.
    UnknownCa,
    /// The server's certificate does not name the peer we dialed (or cannot be parsed).
    WrongName,
    /// The client's certificate is valid but names a node that is not under `[[peers]]`.
    NotAPeer,
    /// The client presented no certificate.
    NoClientCert,
    /// The other side does not speak `ferry/1`.
    AlpnMismatch,
    /// The certificate is expired or not yet valid.
    Expired,
    /// Another TLS alert (its code).
    OtherAlert(u8),
}

/// Which side refused the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusedBy {
    /// This node refused the peer's certificate (counts in `ferry_peer_auth_failures_total`).
    Us,
    /// The peer refused ours.
    Peer,
}

/// A refused handshake: what, who refused, and the TLS library's own words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthRefusal {
    pub kind: AuthRefusalKind,
    pub by: RefusedBy,
    /// The rustls error text (local refusal) or the close reason the peer sent.
    pub detail: String,
}

impl AuthRefusal {
    /// Recognises a TLS refusal in a quinn connection error; `None` for anything else
    /// (timeouts, resets, application closes).
    pub fn from_connection_error(error: &quinn::ConnectionError) -> Option<AuthRefusal> {
        let (code, by, detail) = match error {
            quinn::ConnectionError::TransportError(error) => {
                (u64::from(error.code), RefusedBy::Us, error.reason.clone())
            }
            quinn::ConnectionError::ConnectionClosed(close) => (
                u64::from(close.error_code),
                RefusedBy::Peer,
                String::from_utf8_lossy(&close.reason).into_owned(),
            ),
            _ => return None,
        };
        if !(QUIC_CRYPTO_ERROR_FIRST..=QUIC_CRYPTO_ERROR_LAST).contains(&code) {
            return None;
        }
        // In range, so the difference fits in a u8.
        let alert = u8::try_from(code - QUIC_CRYPTO_ERROR_FIRST).unwrap_or(u8::MAX);
        let kind = match alert {
            // Every CA made by `cert init` is called `ferry CA`, so a certificate from another
            // cluster's CA finds an issuer of the right name whose signature does not match:
            // webpki reports a bad signature (decrypt_error), not an unknown issuer.
            ALERT_UNKNOWN_CA | ALERT_DECRYPT_ERROR => AuthRefusalKind::UnknownCa,
            ALERT_BAD_CERTIFICATE => AuthRefusalKind::WrongName,
            ALERT_ACCESS_DENIED => AuthRefusalKind::NotAPeer,
            ALERT_CERTIFICATE_REQUIRED => AuthRefusalKind::NoClientCert,
            ALERT_NO_APPLICATION_PROTOCOL => AuthRefusalKind::AlpnMismatch,
            ALERT_CERTIFICATE_EXPIRED => AuthRefusalKind::Expired,
            other => AuthRefusalKind::OtherAlert(other),
        };
        Some(AuthRefusal { kind, by, detail })
    }
}

impl fmt::Display for AuthRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (whose, what) = match self.by {
            RefusedBy::Us => ("we refused the peer's certificate", "its"),
            RefusedBy::Peer => ("the peer refused our certificate", "our"),
        };
        let why = match self.kind {
            AuthRefusalKind::UnknownCa => format!(
                "{what} certificate is not signed by the node CA; give both nodes the same \
                 [tls] ca and certificates it issued"
            ),
            AuthRefusalKind::WrongName => format!(
                "{what} certificate does not name the node that was dialed; check [[peers]] \
                 name/address against the certificate (`ferry cert init --node NAME`)"
            ),
            AuthRefusalKind::NotAPeer => format!(
                "{what} certificate names a node that is not under [[peers]] on the accepting \
                 side; add it there or fix [node] name"
            ),
            AuthRefusalKind::NoClientCert => {
                "no client certificate was presented; set [tls] cert and key".to_string()
            }
            AuthRefusalKind::AlpnMismatch => format!(
                "the nodes speak different protocol versions (ALPN {}); run the same ferry \
                 version on both",
                String::from_utf8_lossy(ALPN)
            ),
            AuthRefusalKind::Expired => format!(
                "{what} certificate is expired or not yet valid; check the clocks or re-issue it"
            ),
            AuthRefusalKind::OtherAlert(alert) => format!("TLS alert {alert}"),
        };
        write!(f, "{whose}: {why}")?;
        if !self.detail.is_empty() {
            write!(f, " ({})", self.detail)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|name| name.to_string()).collect()
    }

    fn identity(dir: &Path, name: &str) -> Result<TlsIdentity, TlsError> {
        TlsIdentity::load_from_cert_dir(dir, name)
    }

    #[test]
    fn cert_init_writes_ca_and_nodes_with_private_keys() {
        let dir = tempfile::tempdir().unwrap();
        let report = cert_init(dir.path(), &names(&["site-a", "site-b"])).unwrap();
        assert!(!report.ca_reused);
        let written: Vec<String> = report
            .files_written
            .iter()
            .map(|path| path.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            written,
            [
                "ca.key",
                "ca.pem",
                "site-a.key",
                "site-a.pem",
                "site-b.key",
                "site-b.pem"
            ]
        );
        for key in ["ca.key", "site-a.key", "site-b.key"] {
            let mode = fs::metadata(dir.path().join(key))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
        identity(dir.path(), "site-a").unwrap();
        identity(dir.path(), "site-b").unwrap();
    }

    #[test]
    fn cert_init_refuses_to_overwrite_and_reuses_the_ca_for_new_nodes() {
        let dir = tempfile::tempdir().unwrap();
        cert_init(dir.path(), &names(&["site-a"])).unwrap();
        let ca_before = fs::read(dir.path().join("ca.pem")).unwrap();

        let error = cert_init(dir.path(), &names(&["site-c", "site-a"])).unwrap_err();
        assert!(matches!(&error, TlsError::Exists { path } if path.ends_with("site-a.pem")));
        assert!(error.to_string().contains("site-a.pem"), "{error}");
        assert!(
            !dir.path().join("site-c.pem").exists(),
            "nothing written on refusal"
        );

        let report = cert_init(dir.path(), &names(&["site-c"])).unwrap();
        assert!(report.ca_reused);
        assert_eq!(report.files_written.len(), 2);
        assert_eq!(fs::read(dir.path().join("ca.pem")).unwrap(), ca_before);
        identity(dir.path(), "site-c").unwrap();
    }

    #[test]
    fn cert_init_rejects_bad_names_and_half_a_ca() {
        let dir = tempfile::tempdir().unwrap();
        for bad in [&[][..], &["ca"], &["a/b"], &["10.0.0.1"], &["x", "x"]] {
            let error = cert_init(dir.path(), &names(bad)).unwrap_err();
            assert!(
                matches!(error, TlsError::NoNodes | TlsError::BadNodeName { .. }),
                "{bad:?}: {error}"
            );
        }
        fs::write(dir.path().join("ca.pem"), "x").unwrap();
        let error = cert_init(dir.path(), &names(&["site-a"])).unwrap_err();
        assert!(matches!(error, TlsError::HalfCa { .. }), "{error}");
    }

    #[test]
    fn identity_load_explains_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        cert_init(dir.path(), &names(&["site-a", "site-b"])).unwrap();
        let other = tempfile::tempdir().unwrap();
        cert_init(other.path(), &names(&["site-a"])).unwrap();
        let path = |name: &str| dir.path().join(name);

        let missing = TlsIdentity::load_files(
            &path("nope.pem"),
            &path("site-a.pem"),
            &path("site-a.key"),
            "site-a",
        );
        assert!(matches!(missing, Err(TlsError::Read { .. })));

        let not_pem = TlsIdentity::load_files(
            &path("site-a.key"),
            &path("site-a.pem"),
            &path("site-a.key"),
            "site-a",
        );
        assert!(
            matches!(not_pem, Err(TlsError::NoCertificate { .. })),
            "{not_pem:?}"
        );

        let no_key = TlsIdentity::load_files(
            &path("ca.pem"),
            &path("site-a.pem"),
            &path("site-a.pem"),
            "site-a",
        );
        assert!(matches!(no_key, Err(TlsError::NoKey { .. })), "{no_key:?}");

        let mismatch = TlsIdentity::load_files(
            &path("ca.pem"),
            &path("site-a.pem"),
            &path("site-b.key"),
            "site-a",
        );
        assert!(
            matches!(mismatch, Err(TlsError::KeyMismatch { .. })),
            "{mismatch:?}"
        );

        let wrong_node = TlsIdentity::load_files(
            &path("ca.pem"),
            &path("site-a.pem"),
            &path("site-a.key"),
            "site-b",
        );
        let error = wrong_node.unwrap_err();
        assert!(
            error.to_string().contains("does not name `site-b`"),
            "{error}"
        );

        let wrong_ca = TlsIdentity::load_files(
            &other.path().join("ca.pem"),
            &path("site-a.pem"),
            &path("site-a.key"),
            "site-a",
        );
        let error = wrong_ca.unwrap_err();
        assert!(
            error.to_string().contains("not signed by this CA"),
            "{error}"
        );
    }

    #[test]
    fn refusals_are_classified_from_crypto_error_codes() {
        // A refusal by the peer arrives as a CONNECTION_CLOSE carrying 0x100 + the TLS alert;
        // local refusals use the same codes (exercised by the transport tests).
        let by_peer = quinn::ConnectionError::ConnectionClosed(quinn::ConnectionClose {
            error_code: quinn::TransportErrorCode::crypto(ALERT_UNKNOWN_CA),
            frame_type: None,
            reason: bytes::Bytes::from_static(b"invalid peer certificate: UnknownIssuer"),
        });
        let refusal = AuthRefusal::from_connection_error(&by_peer).unwrap();
        assert_eq!(refusal.kind, AuthRefusalKind::UnknownCa);
        assert_eq!(refusal.by, RefusedBy::Peer);
        assert!(refusal.to_string().contains("not signed by the node CA"));
        assert_eq!(
            AuthRefusal::from_connection_error(&quinn::ConnectionError::TimedOut),
            None
        );
    }
}
