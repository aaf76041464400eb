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

mod conn;
mod tls;

use conn::{accept_loop, Admit, Conn};
pub use conn::{source_key, ConnActivity, ConnRegistry, StreamActivity};
pub use tls::{
    reader_tls_config, tls_config, EnrolmentGate, EnrolmentReload, ReloadError, SharedRevocations,
    TlsFiles, WATCH_QUIET,
};

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

/// The query port, bound.
struct QueryPort {
    listener: TcpListener,
    acceptor: Arc<RwLock<TlsAcceptor>>,
    readers: Arc<ReadersFile>,
    options: QueryOptions,
}

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
                .map_err(|e| problems.push(e.to_string()))
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
