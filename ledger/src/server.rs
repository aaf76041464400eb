//! `wattd-ledger serve`: mutual TLS (rustls on ring, TLS 1.2 minimum, ALPN h2, client
//! certificates required and verified against `--client-ca`), the accept loop with its limits
//! (connections, handshake time), the tonic server (message size, streams per connection, HTTP/2
//! keepalive), the metrics endpoint, enrolment reload, and a clean stop.
//!
//! **Invariant:** only this module and `service` know TLS and gRPC; `session` and `store` see
//! authenticated node ids and decoded messages.

use std::future::Future as _;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};
use wattd_proto::v1::ledger_server::LedgerServer;
use wattd_proto::v1::query_server::QueryServer;
use wattd_web::{HttpLimits, MetricsEndpoint, WebConfig};

use crate::crl::Revocations;
use crate::enrol::Enrolment;
use crate::metrics::Metrics;
use crate::query_api::QueryService;
use crate::readers::ReadersFile;
use crate::service::{LedgerService, ServiceLimits, Trust};
use crate::store::Store as _;
use crate::store::{AnyStore, OpenMode, StoreError, StoreUrl};

/// Everything `serve` needs.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
    /// PEM certificate revocation lists for the client certificates (`--crl`).
    pub crl: Option<PathBuf>,
    pub enrolled: PathBuf,
    pub store: StoreUrl,
    pub metrics_listen: Option<SocketAddr>,
    /// TLS and basic auth of the metrics endpoint (`--metrics-web-config`).
    pub metrics_web: Option<WebConfig>,
    pub limits: Limits,
    /// The read side (`--query-listen`), when configured.
    pub query: Option<QueryOptions>,
    /// Allocation rows of batches received longer ago than this (whole days) are pruned,
    /// hourly; None keeps them (`--detail-retention-days`; store/detail.rs).
    pub detail_retention: Option<Duration>,
}

/// The query API's listener and who may read (`--query-listen`, `--reader-ca`, `--readers`).
#[derive(Clone, Debug)]
pub struct QueryOptions {
    pub listen: SocketAddr,
    /// The CA that issues readers' client certificates (not the nodes' CA).
    pub reader_ca: PathBuf,
    /// The readers file: certificate CN -> `metering` or `account:<id>`.
    pub readers: PathBuf,
    /// The run label whose value names a run's account.
    pub account_label: String,
    /// Read-audit rows older than this are deleted (hourly).
    pub audit_retention: Duration,
}

/// Who may hold a connection past its TLS handshake. The node port: a certificate naming an
/// enrolled node (anything else is closed at once, so it holds no slot). The query port: any
/// certificate of the readers' CA; a reader the readers file does not name is refused per call
/// (PERMISSION_DENIED, audited), so it learns why and the audit shows who tried.
#[derive(Clone, Debug)]
enum Admit {
    Enrolled(Arc<RwLock<Arc<Enrolment>>>),
    Readers,
}

impl Admit {
    fn admits(&self, cn: &str) -> bool {
        match self {
            Admit::Enrolled(e) => e
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .node(cn)
                .is_some(),
            Admit::Readers => true,
        }
    }
}

/// The rustls configuration of the query port: the same server certificate, client
/// certificates required and issued by the readers' CA.
pub fn reader_tls_config(
    cert: &Path,
    key: &Path,
    reader_ca: &Path,
) -> Result<ServerConfig, Vec<String>> {
    let mut problems = Vec::new();
    let (certs, key, roots) =
        identity_and_roots(cert, key, reader_ca, "--reader-ca", &mut problems);
    let (Some(certs), Some(key)) = (certs, key) else {
        return Err(problems);
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| vec![format!("--reader-ca {}: {e}", reader_ca.display())])?;
    server_config(provider, verifier, certs, key)
}

/// The server's certificate chain and key, and the roots its clients' certificates must chain
/// to (`ca`, named `flag` in messages); every problem is pushed to `problems`.
fn identity_and_roots(
    cert: &Path,
    key: &Path,
    ca: &Path,
    flag: &str,
    problems: &mut Vec<String>,
) -> (
    Option<Vec<CertificateDer<'static>>>,
    Option<PrivateKeyDer<'static>>,
    RootCertStore,
) {
    let certs = wattd_web::tls::load_certs(cert, "--cert")
        .map_err(|e| problems.push(e))
        .ok();
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| problems.push(format!("--key {}: {e}", key.display())))
        .ok();
    let mut roots = RootCertStore::empty();
    if let Ok(cas) = wattd_web::tls::load_certs(ca, flag).map_err(|e| problems.push(e)) {
        for c in cas {
            if let Err(e) = roots.add(c) {
                problems.push(format!("{flag} {}: {e}", ca.display()));
            }
        }
    }
    (certs, key, roots)
}

/// TLS 1.3 and 1.2 on ring, ALPN h2, client certificates checked by `verifier`.
fn server_config(
    provider: Arc<rustls::crypto::CryptoProvider>,
    verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ServerConfig, Vec<String>> {
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| vec![format!("TLS versions: {e}")])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| vec![format!("--cert/--key: {e}")])?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The query port, bound.
struct QueryPort {
    listener: TcpListener,
    acceptor: Arc<RwLock<TlsAcceptor>>,
    readers: Arc<ReadersFile>,
    options: QueryOptions,
}

/// The files the TLS configuration is read from, again at every reload.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
    pub crl: Option<PathBuf>,
}

/// The CRLs' revoked certificates, swapped by a reload.
pub type SharedRevocations = Arc<RwLock<Arc<Revocations>>>;

/// Process-wide bounds.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest NodeMessage accepted (encoded bytes).
    pub max_message_bytes: usize,
    /// TLS connections open at once; more are closed at accept.
    pub max_connections: usize,
    /// Time allowed for a TLS handshake.
    pub handshake_timeout: Duration,
    /// HTTP/2 streams per connection.
    pub max_streams_per_connection: u32,
    /// TLS connections open at once from one source address; more are closed at accept, so
    /// one address cannot take every slot.
    pub max_connections_per_source: usize,
    /// Time allowed after the handshake for the client's HTTP/2 preface (24 bytes).
    pub preface_timeout: Duration,
    /// A connection with no open stream for this long is closed.
    pub idle_timeout: Duration,
    /// How many leading bits of an IPv6 source address `max_connections_per_source` counts by.
    pub source_prefix_v6: u8,
    pub service: ServiceLimits,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 17 * 1024 * 1024,
            max_connections: 1024,
            handshake_timeout: Duration::from_secs(10),
            max_streams_per_connection: 4,
            max_connections_per_source: 64,
            preface_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            source_prefix_v6: 128,
            service: ServiceLimits::default(),
        }
    }
}

/// Why `serve` could not start. `Config` problems are the operator's to fix (exit 64).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{}", .0.join("\n"))]
    Config(Vec<String>),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("server: {0}")]
    Server(String),
}

/// The rustls server configuration: TLS 1.3 and 1.2 on ring, client certificates required
/// (and, with `--crl`, not revoked), and the CRLs' revoked set.
pub fn tls_config(
    files: &TlsFiles,
    gate: &EnrolmentGate,
) -> Result<(ServerConfig, Revocations), Vec<String>> {
    let TlsFiles {
        cert,
        key,
        client_ca,
        crl,
    } = files;
    let mut problems = Vec::new();
    let crls = match crl {
        Some(path) => crate::crl::load(path).map_err(|e| problems.push(e)).ok(),
        None => Some((Vec::new(), Revocations::default())),
    };
    let (certs, key, roots) =
        identity_and_roots(cert, key, client_ca, "--client-ca", &mut problems);
    let (Some(certs), Some(key), Some((crls, revocations))) = (certs, key, crls) else {
        return Err(problems);
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut builder =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    if !crls.is_empty() {
        // Node certificates are checked against the CRLs; a CA with no CRL in the file (an
        // intermediate, a second CA) is not refused for it.
        builder = builder
            .with_crls(crls)
            .only_check_end_entity_revocation()
            .allow_unknown_revocation_status();
    }
    let verifier = builder
        .build()
        .map_err(|e| vec![format!("--client-ca {}: {e}", client_ca.display())])?;
    let verifier = Arc::new(EnrolledClientVerifier {
        inner: verifier,
        gate: gate.clone(),
    });
    Ok((server_config(provider, verifier, certs, key)?, revocations))
}

/// What the TLS handshake checks a client certificate's node against: the current enrolment
/// (shared with reloads), and the counter of certificates refused for naming nobody enrolled.
#[derive(Clone, Debug)]
pub struct EnrolmentGate {
    pub enrolment: Arc<RwLock<Arc<Enrolment>>>,
    pub metrics: Arc<Metrics>,
}

/// The CA's verdict (chain, validity, CRL), then the enrolment's: a certificate whose CN names
/// no enrolled node fails the handshake itself, so it never gets past the TLS layer (and a
/// slot is held only for the handshake).
#[derive(Debug)]
struct EnrolledClientVerifier {
    inner: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    gate: EnrolmentGate,
}

impl rustls::server::danger::ClientCertVerifier for EnrolledClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let enrolled = crate::service::cert_common_name(end_entity.as_ref())
            .ok()
            .is_some_and(|cn| {
                let e = self
                    .gate
                    .enrolment
                    .read()
                    .unwrap_or_else(|p| p.into_inner());
                e.node(&cn).is_some()
            });
        if !enrolled {
            self.gate
                .metrics
                .inc(&self.gate.metrics.connections_unenrolled);
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The HTTP/2 client preface: what a connection must send first.
const PREFACE_BYTES: usize = 24;

/// The streams open on one connection, and since when it has had none: the service counts
/// them (it finds a connection by its peer address), the connection closes itself once it has
/// been without a stream for `--idle-timeout-s`.
#[derive(Debug)]
pub struct ConnActivity {
    streams: std::sync::atomic::AtomicUsize,
    idle_since: std::sync::Mutex<std::time::Instant>,
}

impl ConnActivity {
    fn new() -> Self {
        Self {
            streams: std::sync::atomic::AtomicUsize::new(0),
            idle_since: std::sync::Mutex::new(std::time::Instant::now()),
        }
    }

    /// How long the connection has been without a stream (zero while it has one).
    fn idle_for(&self) -> Duration {
        if self.streams.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            return Duration::ZERO;
        }
        self.idle_since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
    }
}

/// The open connections' activity, by peer address.
pub type ConnRegistry =
    Arc<std::sync::Mutex<std::collections::HashMap<SocketAddr, Arc<ConnActivity>>>>;

/// One open stream on a connection; the connection's idle clock starts again when the last one
/// is dropped.
#[derive(Debug)]
pub struct StreamActivity(Arc<ConnActivity>);

impl StreamActivity {
    /// Counts a stream on the connection of `peer`, if it is one of ours.
    pub fn start(registry: &ConnRegistry, peer: Option<SocketAddr>) -> Option<Self> {
        let a = Arc::clone(
            registry
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&peer?)?,
        );
        a.streams.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Some(Self(a))
    }
}

impl Drop for StreamActivity {
    fn drop(&mut self) {
        // The idle clock is set before the count drops, so the connection never sees zero
        // streams with an old idle_since.
        *self.0.idle_since.lock().unwrap_or_else(|p| p.into_inner()) = std::time::Instant::now();
        self.0
            .streams
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A TLS connection that holds its connection slot (and its source's) until it closes, must
/// send its HTTP/2 preface within a deadline, and is closed once without a stream for
/// `idle_timeout`.
struct Conn {
    tls: TlsStream<TcpStream>,
    _permit: OwnedSemaphorePermit,
    _source: SourceSlot,
    metrics: Arc<Metrics>,
    /// Until the preface has been read: when it must have been.
    preface_deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    read_bytes: usize,
    peer: SocketAddr,
    registry: ConnRegistry,
    activity: Arc<ConnActivity>,
    idle_timeout: Duration,
    /// When to look at the activity next.
    idle_check: Pin<Box<tokio::time::Sleep>>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.metrics.dec(&self.metrics.connections_open);
        let mut r = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        if r.get(&self.peer)
            .is_some_and(|a| Arc::ptr_eq(a, &self.activity))
        {
            r.remove(&self.peer);
        }
    }
}

impl Conn {
    /// Ready with an error once the connection has been without a stream for the idle
    /// timeout; otherwise re-arms its check (and its waker).
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        while self.idle_check.as_mut().poll(cx).is_ready() {
            let idle = self.activity.idle_for();
            if idle >= self.idle_timeout {
                self.metrics.inc(&self.metrics.idle_timeouts);
                return Some(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no stream on the connection within the idle timeout",
                ));
            }
            let next = tokio::time::Instant::now() + (self.idle_timeout - idle);
            self.idle_check.as_mut().reset(next);
        }
        None
    }
}

/// What `--max-connections-per-source` counts by: an IPv4 address (an IPv4-mapped IPv6 one
/// too), or an IPv6 address cut to `v6_prefix` bits (`--source-prefix-v6`: 128 counts single
/// addresses; 64 counts a /64, for networks that give each host a whole /64, where one host
/// could otherwise take every slot from its many addresses).
pub fn source_key(ip: std::net::IpAddr, v6_prefix: u8) -> std::net::IpAddr {
    use std::net::{IpAddr, Ipv6Addr};
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u32::from(v6_prefix.min(128));
                let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
        },
    }
}

/// At most one log line per ten seconds for a repeated event, saying how many it stands for.
#[derive(Debug, Default)]
struct LogThrottle {
    last: Option<std::time::Instant>,
    count: u64,
}

impl LogThrottle {
    /// Counts one event; returns the count to log when a line is due.
    fn due(&mut self) -> Option<u64> {
        self.count += 1;
        let now = std::time::Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(10))
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.count))
    }
}

/// Counts a source address's open connections; released on drop.
struct SourceSlot {
    ip: std::net::IpAddr,
    open: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
}

impl SourceSlot {
    fn take(
        ip: std::net::IpAddr,
        open: &Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
        limit: usize,
    ) -> Option<Self> {
        let mut m = open.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(Self {
            ip,
            open: Arc::clone(open),
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut m = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

impl Connected for Conn {
    type ConnectInfo = TlsConnectInfo<TcpConnectInfo>;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.tls.connect_info()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.tls).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &polled {
            self.read_bytes += buf.filled().len() - before;
            if self.read_bytes >= PREFACE_BYTES {
                self.preface_deadline = None;
            }
        }
        if polled.is_pending() {
            if let Some(e) = self.poll_idle(cx) {
                return Poll::Ready(Err(e));
            }
            if let Some(d) = self.preface_deadline.as_mut() {
                if d.as_mut().poll(cx).is_ready() {
                    self.metrics.inc(&self.metrics.preface_timeouts);
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no HTTP/2 preface within the deadline",
                    )));
                }
            }
        }
        polled
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tls).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }
}

/// A bound, ready ledger: the listeners are open, the store is open and its schema in place.
pub struct Bound {
    listener: TcpListener,
    query: Option<QueryPort>,
    query_addr: Option<SocketAddr>,
    metrics_server: Option<MetricsEndpoint>,
    /// Swapped by a reload (SIGHUP) when the certificate, key or client CA files change.
    acceptor: Arc<RwLock<TlsAcceptor>>,
    /// Where the TLS files are, for a reload.
    tls_files: TlsFiles,
    /// The CRLs' revoked certificates: open streams re-check theirs at every reload.
    revocations: SharedRevocations,
    reload_serial: Arc<std::sync::Mutex<()>>,
    store: Arc<AnyStore>,
    enrolment: Arc<RwLock<Arc<Enrolment>>>,
    /// Bumped at every enrolment reload: open streams re-check their node.
    enrolment_changed: Arc<watch::Sender<u64>>,
    enrolled_dir: PathBuf,
    metrics: Arc<Metrics>,
    limits: Limits,
    detail_retention: Option<Duration>,
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
}

impl std::fmt::Debug for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bound")
            .field("local_addr", &self.local_addr)
            .field("metrics_addr", &self.metrics_addr)
            .finish_non_exhaustive()
    }
}

/// The metrics text the endpoint serves, kept current by [`Metrics::publish`].
type MetricsSnapshot = (watch::Sender<Arc<String>>, watch::Receiver<Arc<String>>);

/// Checks every input, opens the store and binds the listeners. Every configuration problem
/// (TLS files, enrolment directory) is reported at once.
pub async fn bind(opts: &ServeOptions) -> Result<(Bound, MetricsSnapshot), ServeError> {
    let mut problems = Vec::new();
    let tls_files = TlsFiles {
        cert: opts.cert.clone(),
        key: opts.key.clone(),
        client_ca: opts.client_ca.clone(),
        crl: opts.crl.clone(),
    };
    let enrolment = Enrolment::load(&opts.enrolled)
        .map_err(|e| problems.push(e.to_string()))
        .ok();
    let loaded = enrolment.is_some();
    let gate = EnrolmentGate {
        enrolment: Arc::new(RwLock::new(Arc::new(enrolment.unwrap_or_default()))),
        metrics: Metrics::new(),
    };
    let tls = tls_config(&tls_files, &gate)
        .map_err(|p| problems.extend(p))
        .ok();
    let query_parts = match &opts.query {
        None => Some(None),
        Some(q) => {
            let same_ca = match (std::fs::read(&q.reader_ca), std::fs::read(&opts.client_ca)) {
                (Ok(a), Ok(b)) => a == b,
                _ => false,
            };
            if same_ca {
                problems.push(format!(
                    "--reader-ca {} is the nodes' CA (--client-ca): readers need a CA of their \
                     own, or every node certificate could ask to read",
                    q.reader_ca.display()
                ));
            }
            let readers = ReadersFile::open(&q.readers)
                .map_err(|e| problems.push(e))
                .ok();
            let qtls = reader_tls_config(&opts.cert, &opts.key, &q.reader_ca)
                .map_err(|p| {
                    problems.extend(
                        p.into_iter()
                            .filter(|e| !e.starts_with("--cert") && !e.starts_with("--key")),
                    )
                })
                .ok();
            match (readers, qtls) {
                (Some(r), Some(t)) => Some(Some((r, t))),
                _ => None,
            }
        }
    };
    let (Some((tls, revocations)), true, Some(query_parts)) = (tls, loaded, query_parts) else {
        return Err(ServeError::Config(problems));
    };
    if !problems.is_empty() {
        return Err(ServeError::Config(problems));
    }
    let (node_count, key_count) = {
        let e = gate.enrolment.read().unwrap_or_else(|p| p.into_inner());
        (e.node_count(), e.key_count())
    };
    if node_count == 0 {
        tracing::warn!(dir = %opts.enrolled.display(), "no node is enrolled: every stream will be refused");
    }
    let store = AnyStore::open(&opts.store, OpenMode::Serve).await?;
    let listener = TcpListener::bind(opts.listen)
        .await
        .map_err(|source| ServeError::Io {
            what: format!("--listen {}", opts.listen),
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| ServeError::Io {
        what: "listener address".into(),
        source,
    })?;
    let query = match (query_parts, &opts.query) {
        (Some((readers, qtls)), Some(q)) => {
            let listener = TcpListener::bind(q.listen)
                .await
                .map_err(|source| ServeError::Io {
                    what: format!("--query-listen {}", q.listen),
                    source,
                })?;
            if readers.current().is_empty() {
                tracing::warn!(file = %q.readers.display(), "the readers file names no reader: every read will be refused");
            }
            Some(QueryPort {
                listener,
                acceptor: Arc::new(RwLock::new(TlsAcceptor::from(Arc::new(qtls)))),
                readers: Arc::new(readers),
                options: q.clone(),
            })
        }
        _ => None,
    };
    let query_addr = match &query {
        Some(q) => Some(q.listener.local_addr().map_err(|source| ServeError::Io {
            what: "query listener address".into(),
            source,
        })?),
        None => None,
    };
    let snapshot = watch::channel(Arc::new(String::new()));
    let metrics_server = match opts.metrics_listen {
        Some(addr) => Some(
            MetricsEndpoint::bind(
                addr,
                snapshot.1.clone(),
                HttpLimits::default(),
                opts.metrics_web.as_ref(),
            )
            .await
            .map_err(|source| ServeError::Io {
                what: format!("--metrics-listen {addr}"),
                source,
            })?,
        ),
        None => None,
    };
    let metrics_addr = match &metrics_server {
        Some(m) => Some(m.local_addr().map_err(|source| ServeError::Io {
            what: "metrics address".into(),
            source,
        })?),
        None => None,
    };
    tracing::info!(
        nodes = node_count,
        keys = key_count,
        store = store.kind(),
        "enrolment loaded, store open"
    );
    Ok((
        Bound {
            listener,
            query,
            query_addr,
            metrics_server,
            acceptor: Arc::new(RwLock::new(TlsAcceptor::from(Arc::new(tls)))),
            tls_files,
            revocations: Arc::new(RwLock::new(Arc::new(revocations))),
            reload_serial: Arc::default(),
            store: Arc::new(store),
            enrolment: Arc::clone(&gate.enrolment),
            enrolment_changed: Arc::new(watch::channel(0).0),
            enrolled_dir: opts.enrolled.clone(),
            metrics: Arc::clone(&gate.metrics),
            limits: opts.limits,
            detail_retention: opts.detail_retention,
            local_addr,
            metrics_addr,
        },
        snapshot,
    ))
}

impl Bound {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The query port's address, when `--query-listen` is set.
    pub fn query_addr(&self) -> Option<SocketAddr> {
        self.query_addr
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
    }

    /// Re-reads the enrolment directory; on any problem the current enrolment stays.
    pub fn reload_handle(&self) -> EnrolmentReload {
        EnrolmentReload {
            dir: self.enrolled_dir.clone(),
            enrolment: Arc::clone(&self.enrolment),
            changed: Arc::clone(&self.enrolment_changed),
            acceptor: Arc::clone(&self.acceptor),
            tls_files: self.tls_files.clone(),
            revocations: Arc::clone(&self.revocations),
            gate: EnrolmentGate {
                enrolment: Arc::clone(&self.enrolment),
                metrics: Arc::clone(&self.metrics),
            },
            serial: Arc::clone(&self.reload_serial),
            query: self
                .query
                .as_ref()
                .map(|q| (Arc::clone(&q.acceptor), q.options.reader_ca.clone())),
        }
    }

    /// Serves until `shutdown` completes, then stops accepting, ends every stream with
    /// UNAVAILABLE, and waits up to 5 s for connections to close. Nothing acknowledged is at
    /// risk at any point: acks follow commits.
    pub async fn run(
        self,
        snapshot_tx: watch::Sender<Arc<String>>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), ServeError> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let publisher = tokio::spawn(Arc::clone(&self.metrics).publish(snapshot_tx));
        let watcher = tokio::spawn(self.reload_handle().watch(stop_rx.clone()));
        let upkeep = tokio::spawn(upkeep_detail(
            Arc::clone(&self.store),
            Arc::clone(&self.metrics),
            self.detail_retention,
            stop_rx.clone(),
        ));
        let metrics_task = self.metrics_server.map(|m| {
            let mut stop = stop_rx.clone();
            tokio::spawn(m.serve(async move {
                let _ = stop.wait_for(|s| *s).await;
            }))
        });
        let registry = ConnRegistry::default();
        let service = LedgerService::new(
            Arc::clone(&self.store),
            Trust {
                enrolment: Arc::clone(&self.enrolment),
                enrolment_changed: self.enrolment_changed.subscribe(),
                revocations: Arc::clone(&self.revocations),
            },
            Arc::clone(&registry),
            Arc::clone(&self.metrics),
            self.limits.service,
            stop_rx.clone(),
        );
        let (conn_tx, conn_rx) = mpsc::channel::<Result<Conn, io::Error>>(64);
        let accept = tokio::spawn(accept_loop(
            self.listener,
            self.acceptor,
            Admit::Enrolled(Arc::clone(&self.enrolment)),
            Arc::clone(&self.metrics),
            self.limits,
            Arc::clone(&registry),
            conn_tx,
            stop_rx.clone(),
        ));
        let query_tasks = self.query.map(|q| {
            let query_registry = ConnRegistry::default();
            let service = QueryService::new(
                Arc::clone(&self.store),
                Arc::clone(&q.readers),
                q.options.account_label.clone(),
                Arc::clone(&self.metrics),
                Arc::clone(&query_registry),
                stop_rx.clone(),
            );
            let (conn_tx, conn_rx) = mpsc::channel::<Result<Conn, io::Error>>(16);
            let accept = tokio::spawn(accept_loop(
                q.listener,
                q.acceptor,
                Admit::Readers,
                Arc::clone(&self.metrics),
                self.limits,
                query_registry,
                conn_tx,
                stop_rx.clone(),
            ));
            let mut stop_serving = stop_rx.clone();
            let server = tonic::transport::Server::builder()
                .max_concurrent_streams(Some(self.limits.max_streams_per_connection))
                .http2_keepalive_interval(Some(Duration::from_secs(30)))
                .http2_keepalive_timeout(Some(Duration::from_secs(20)))
                .tcp_nodelay(true)
                .add_service(
                    QueryServer::new(service)
                        .max_decoding_message_size(2 << 20)
                        .max_encoding_message_size(64 << 20),
                )
                .serve_with_incoming_shutdown(ReceiverStream::new(conn_rx), async move {
                    let _ = stop_serving.wait_for(|s| *s).await;
                });
            let server = tokio::spawn(server);
            let pruner = tokio::spawn(prune_reads(
                Arc::clone(&self.store),
                q.options.audit_retention,
                stop_rx.clone(),
            ));
            (accept, server, pruner)
        });
        let mut stop_serving = stop_rx.clone();
        let server = tonic::transport::Server::builder()
            .max_concurrent_streams(Some(self.limits.max_streams_per_connection))
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .tcp_nodelay(true)
            .add_service(
                LedgerServer::new(service)
                    .max_decoding_message_size(self.limits.max_message_bytes)
                    .max_encoding_message_size(64 * 1024),
            )
            .serve_with_incoming_shutdown(ReceiverStream::new(conn_rx), async move {
                let _ = stop_serving.wait_for(|s| *s).await;
            });
        let mut server = tokio::spawn(server);
        tokio::select! {
            () = shutdown => {}
            r = &mut server => {
                let _ = stop_tx.send(true);
                return match r {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(ServeError::Server(e.to_string())),
                    Err(e) => Err(ServeError::Server(e.to_string())),
                };
            }
        }
        tracing::info!("stopping: no new connections; open streams end with UNAVAILABLE");
        let _ = stop_tx.send(true);
        let _ = accept.await;
        if tokio::time::timeout(Duration::from_secs(5), &mut server)
            .await
            .is_err()
        {
            tracing::warn!("connections still open after 5 s; closing them");
            server.abort();
        }
        if let Some((accept, mut server, pruner)) = query_tasks {
            let _ = accept.await;
            if tokio::time::timeout(Duration::from_secs(5), &mut server)
                .await
                .is_err()
            {
                tracing::warn!("query connections still open after 5 s; closing them");
                server.abort();
            }
            pruner.abort();
        }
        if let Some(t) = metrics_task {
            let _ = t.await;
        }
        publisher.abort();
        watcher.abort();
        upkeep.abort();
        Ok(())
    }
}

/// How long changes to the enrolment directory must be quiet before the watch reloads it.
pub const WATCH_QUIET: Duration = Duration::from_millis(200);

/// Handle to re-read the enrolment directory (SIGHUP).
#[derive(Clone)]
pub struct EnrolmentReload {
    dir: PathBuf,
    enrolment: Arc<RwLock<Arc<Enrolment>>>,
    changed: Arc<watch::Sender<u64>>,
    acceptor: Arc<RwLock<TlsAcceptor>>,
    tls_files: TlsFiles,
    revocations: SharedRevocations,
    gate: EnrolmentGate,
    /// Held across a reload's read and swap: SIGHUP and the directory watch never interleave
    /// (an older read swapped in last would bring a removed node back).
    serial: Arc<std::sync::Mutex<()>>,
    /// The query port's acceptor and reader CA, re-read with the certificate and key.
    query: Option<(Arc<RwLock<TlsAcceptor>>, PathBuf)>,
}

impl std::fmt::Debug for EnrolmentReload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrolmentReload")
            .field("dir", &self.dir)
            .field("tls_files", &self.tls_files)
            .finish_non_exhaustive()
    }
}

impl EnrolmentReload {
    /// Re-reads the directory. New streams see the new enrolment; an open stream whose node
    /// was removed, or whose keys changed, is ended at once (PERMISSION_DENIED, `revoked`).
    /// Re-reads `--cert`, `--key`, `--client-ca` and `--crl` (renewed certificates, a rotated
    /// CA, a new CRL): new connections use them; an open stream whose client certificate the
    /// new CRL revokes is ended at once (`revoked`). On any problem the current ones stay.
    /// Returns how many certificates the CRLs revoke.
    pub fn reload_tls(&self) -> Result<usize, String> {
        let _serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        let (tls, revocations) =
            tls_config(&self.tls_files, &self.gate).map_err(|p| p.join("; "))?;
        let query_tls = match &self.query {
            Some((_, reader_ca)) => Some(
                reader_tls_config(&self.tls_files.cert, &self.tls_files.key, reader_ca)
                    .map_err(|p| p.join("; "))?,
            ),
            None => None,
        };
        if let (Some((acceptor, _)), Some(t)) = (&self.query, query_tls) {
            *acceptor.write().unwrap_or_else(|p| p.into_inner()) = TlsAcceptor::from(Arc::new(t));
        }
        let revoked = revocations.len();
        *self.acceptor.write().unwrap_or_else(|p| p.into_inner()) =
            TlsAcceptor::from(Arc::new(tls));
        *self.revocations.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(revocations);
        self.changed.send_modify(|g| *g += 1);
        Ok(revoked)
    }

    /// Watches the enrolment directory (inotify) and reloads it, as SIGHUP does, once changes
    /// to it have been quiet for [`WATCH_QUIET`]: a removed or changed file revokes without a
    /// signal. Runs until `stop`; if the directory cannot be watched it says so and leaves
    /// reloads to SIGHUP.
    pub async fn watch(self, mut stop: watch::Receiver<bool>) {
        use inotify::{EventMask, Inotify, WatchMask};
        use tokio_stream::StreamExt as _;
        let mut warned = false;
        loop {
            let watched = Inotify::init().and_then(|i| {
                i.watches().add(
                    &self.dir,
                    WatchMask::CREATE
                        | WatchMask::DELETE
                        | WatchMask::CLOSE_WRITE
                        | WatchMask::MOVED_TO
                        | WatchMask::MOVED_FROM
                        | WatchMask::ATTRIB
                        | WatchMask::DELETE_SELF
                        | WatchMask::MOVE_SELF,
                )?;
                i.into_event_stream([0u8; 4096])
            });
            let mut events = match watched {
                Ok(e) => {
                    if warned {
                        tracing::info!(dir = %self.dir.display(), "watching the enrolment directory again");
                        // It may have changed while it could not be watched.
                        self.reload_logged("enrolment directory back");
                        warned = false;
                    }
                    e
                }
                Err(error) => {
                    if !warned {
                        tracing::warn!(dir = %self.dir.display(), %error, "cannot watch the enrolment directory: retrying every 5 s; SIGHUP reloads it meanwhile");
                        warned = true;
                    }
                    tokio::select! {
                        _ = stop.wait_for(|s| *s) => return,
                        () = tokio::time::sleep(Duration::from_secs(5)) => continue,
                    }
                }
            };
            // Events until the directory itself goes (deleted, moved, replaced).
            let mut gone = false;
            while !gone {
                let first = tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    e = events.next() => e,
                };
                let mut note = |e: &inotify::EventOwned| {
                    gone |= e.mask.intersects(
                        EventMask::DELETE_SELF | EventMask::MOVE_SELF | EventMask::IGNORED,
                    );
                };
                match first {
                    Some(Ok(e)) => note(&e),
                    Some(Err(error)) => {
                        tracing::warn!(%error, "enrolment directory watch failed: watching it again");
                        break;
                    }
                    None => break,
                }
                // Let a burst (an editor's write and rename, several files) settle first.
                while let Ok(Some(Ok(e))) = tokio::time::timeout(WATCH_QUIET, events.next()).await {
                    note(&e);
                }
                self.reload_logged("enrolment directory changed");
            }
            if gone {
                tracing::warn!(dir = %self.dir.display(), "the enrolment directory was moved or deleted: watching the path again");
            }
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    fn reload_logged(&self, why: &str) {
        match self.reload() {
            Ok((nodes, keys)) => tracing::info!(nodes, keys, "{why}: reloaded"),
            Err(error) => {
                tracing::error!(%error, "{why} but does not load: the previous enrolment stays");
            }
        }
    }

    /// Re-reads the enrolment directory. A directory that would enrol no node at all is
    /// refused (a copy in progress, or one swapped in empty, would otherwise revoke every
    /// node): to unenrol the last node, restart the ledger.
    pub fn reload(&self) -> Result<(usize, usize), String> {
        let _serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        let e = Enrolment::load(&self.dir).map_err(|e| e.to_string())?;
        if e.node_count() == 0 {
            return Err(format!(
                "{}: no node would be enrolled; the current enrolment stays",
                self.dir.display()
            ));
        }
        let counts = (e.node_count(), e.key_count());
        *self.enrolment.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(e);
        self.changed.send_modify(|g| *g += 1);
        Ok(counts)
    }
}

#[allow(clippy::too_many_arguments)]
async fn accept_loop(
    listener: TcpListener,
    acceptor: Arc<RwLock<TlsAcceptor>>,
    admit: Admit,
    metrics: Arc<Metrics>,
    limits: Limits,
    registry: ConnRegistry,
    conns: mpsc::Sender<Result<Conn, io::Error>>,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut refused_source_log = LogThrottle::default();
    let mut refused_log = LogThrottle::default();
    // Shared by the handshake tasks: a flood of bad handshakes must not flood the log either.
    let handshake_log = Arc::new(std::sync::Mutex::new(LogThrottle::default()));
    let sources = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            a = listener.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(error) => {
                // EMFILE and friends: back off rather than spin on a readable listener.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(source) = SourceSlot::take(
            source_key(peer.ip(), limits.source_prefix_v6),
            &sources,
            limits.max_connections_per_source,
        ) else {
            metrics.inc(&metrics.connections_refused_source);
            // A flood must not flood the log too: one line per ten seconds, with the count.
            if let Some(n) = refused_source_log.due() {
                tracing::warn!(%peer, limit = limits.max_connections_per_source, refused = n, "connections refused: --max-connections-per-source reached");
            }
            drop(tcp);
            continue;
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            metrics.inc(&metrics.connections_refused);
            if let Some(n) = refused_log.due() {
                tracing::warn!(%peer, limit = limits.max_connections, refused = n, "connections refused: --max-connections reached");
            }
            drop(tcp);
            continue;
        };
        metrics.inc(&metrics.connections);
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.read().unwrap_or_else(|p| p.into_inner()).clone();
        let metrics = Arc::clone(&metrics);
        let conns = conns.clone();
        let admit = admit.clone();
        let registry = Arc::clone(&registry);
        let handshake_log = Arc::clone(&handshake_log);
        tokio::spawn(async move {
            let log_due = || {
                handshake_log
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .due()
            };
            match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    // A certificate of the right CA for a name nobody enrolled never holds a
                    // slot past its handshake.
                    let admitted = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(|leaf| crate::service::cert_common_name(leaf.as_ref()).ok())
                        .is_some_and(|cn| admit.admits(&cn));
                    if !admitted {
                        match admit {
                            Admit::Enrolled(_) => {
                                metrics.inc(&metrics.connections_unenrolled);
                                if let Some(n) = log_due() {
                                    tracing::warn!(%peer, failed_or_refused = n, "connection closed after the handshake: the certificate names no enrolled node");
                                }
                            }
                            Admit::Readers => {
                                metrics.inc(&metrics.reads_refused);
                                if let Some(n) = log_due() {
                                    tracing::warn!(%peer, failed_or_refused = n, "query connection closed after the handshake: the certificate has no CN");
                                }
                            }
                        }
                        return;
                    }
                    metrics.inc(&metrics.connections_open);
                    let activity = Arc::new(ConnActivity::new());
                    registry
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(peer, Arc::clone(&activity));
                    let conn = Conn {
                        tls,
                        _permit: permit,
                        _source: source,
                        metrics: Arc::clone(&metrics),
                        preface_deadline: Some(Box::pin(tokio::time::sleep(
                            limits.preface_timeout,
                        ))),
                        read_bytes: 0,
                        peer,
                        registry,
                        activity,
                        idle_timeout: limits.idle_timeout,
                        idle_check: Box::pin(tokio::time::sleep(limits.idle_timeout)),
                    };
                    let _ = conns.send(Ok(conn)).await;
                }
                Ok(Err(error)) => {
                    metrics.inc(&metrics.tls_handshake_failures);
                    if let Some(n) = log_due() {
                        tracing::warn!(%peer, %error, failed_or_refused = n, "TLS handshake failed (one line per 10 s; the count since the last)");
                    }
                }
                Err(_) => {
                    metrics.inc(&metrics.tls_handshake_failures);
                    if let Some(n) = log_due() {
                        tracing::warn!(%peer, failed_or_refused = n, "TLS handshake timed out (one line per 10 s; the count since the last)");
                    }
                }
            }
        });
    }
}

/// The per-interval detail's upkeep (store/detail.rs), at start and then hourly: PostgreSQL's
/// day partitions created ahead; with a retention, the rows of older batches pruned. With a
/// retention other than zero, once (retried hourly until it succeeds): rows stored again if
/// an earlier start had a retention of zero. Only once per process, so processes sharing a
/// database with different retentions do not undo each other every hour.
async fn upkeep_detail(
    store: Arc<AnyStore>,
    metrics: Arc<Metrics>,
    retention: Option<Duration>,
    mut stop: watch::Receiver<bool>,
) {
    let mut rows_again = retention != Some(Duration::ZERO);
    loop {
        if rows_again {
            match store.store_rows_again(crate::unix_now_ns()).await {
                Ok(lowered) => {
                    rows_again = false;
                    if let Some(from) = lowered {
                        tracing::info!(
                            detail_from_unix_ns = from,
                            "allocation rows are stored again (an earlier start kept none): \
                             for the batches received from now on"
                        );
                    }
                }
                Err(error) => {
                    metrics.inc(&metrics.detail_upkeep_failures);
                    tracing::warn!(
                        %error,
                        "allocation rows not turned back on; next try in a minute"
                    );
                }
            }
        }
        match store.upkeep_detail(crate::unix_now_ns(), retention).await {
            Ok(done) => {
                metrics.note_detail_upkeep(&done);
                if done.rows_deleted > 0 || done.partitions_dropped > 0 {
                    tracing::info!(
                        rows_deleted = done.rows_deleted,
                        partitions_dropped = done.partitions_dropped,
                        detail_from_unix_ns = done.detail_from_unix_ns,
                        "allocation rows past the retention pruned (the signed batches and the \
                         hourly totals stay)"
                    );
                }
            }
            Err(error) => {
                metrics.inc(&metrics.detail_upkeep_failures);
                tracing::warn!(%error, "detail upkeep failed; next try in an hour");
            }
        }
        // Rows not yet turned back on: a minute, not an hour, with them off.
        let next = Duration::from_secs(if rows_again { 60 } else { 3600 });
        tokio::select! {
            () = tokio::time::sleep(next) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Deletes read-audit rows older than `retention`, at start and then hourly.
async fn prune_reads(store: Arc<AnyStore>, retention: Duration, mut stop: watch::Receiver<bool>) {
    loop {
        let keep_ns = i64::try_from(retention.as_nanos()).unwrap_or(i64::MAX);
        let before = crate::unix_now_ns().saturating_sub(keep_ns);
        match store.prune_reads(before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                deleted = n,
                retention_days = retention.as_secs() / 86_400,
                "read audit pruned"
            ),
            Err(error) => tracing::warn!(%error, "read audit not pruned; next try in an hour"),
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(3600)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_counted_by_ipv4_address_or_ipv6_prefix() {
        let k = |a: &str, p| source_key(a.parse().unwrap(), p);
        assert_eq!(k("127.0.0.2", 64), k("127.0.0.2", 64));
        assert_ne!(k("127.0.0.1", 64), k("127.0.0.2", 64));
        assert_eq!(k("2001:db8:1:2::1", 64), k("2001:db8:1:2:ffff::9", 64));
        assert_ne!(k("2001:db8:1:2::1", 64), k("2001:db8:1:3::1", 64));
        assert_ne!(k("2001:db8:1:2::1", 128), k("2001:db8:1:2::2", 128));
        assert_eq!(k("2001:db8:1:2::1", 0), k("fe80::1", 0));
        assert_eq!(k("::ffff:10.0.0.1", 64), k("10.0.0.1", 64));
    }

    #[test]
    fn a_repeated_log_line_is_throttled_with_its_count() {
        let mut t = LogThrottle::default();
        assert_eq!(t.due(), Some(1));
        assert_eq!(t.due(), None);
        assert_eq!(t.due(), None);
        t.last = Some(std::time::Instant::now() - Duration::from_secs(11));
        assert_eq!(t.due(), Some(3));
    }
}
