//! The `/metrics` endpoint of `wattd` and `wattd-ledger`, on hyper (HTTP/1.1), optionally over
//! TLS and behind basic auth as a [`WebConfig`] says. One request per connection, bounded: the
//! request head must fit in hyper's smallest read buffer (8 KiB) and arrive within
//! [`HttpLimits::head_timeout`], the whole exchange (TLS handshake included) must end within
//! [`HttpLimits::connection_timeout`], and at most [`HttpLimits::connections`] are served at
//! once (more are answered 503 without waiting). A scraper that holds its socket open holds one
//! slot for at most the connection timeout. Refusals are counted in [`EndpointStats`].

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{
    HeaderValue, ALLOW, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE,
};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::auth::{BasicAuth, Verdict};
use crate::config::WebConfig;

/// Bounds of the endpoint.
#[derive(Clone, Copy, Debug)]
pub struct HttpLimits {
    /// Time allowed to send the request head.
    pub head_timeout: Duration,
    /// Time allowed for the whole exchange (TLS handshake, request and response).
    pub connection_timeout: Duration,
    /// Connections served at once.
    pub connections: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            head_timeout: Duration::from_secs(5),
            connection_timeout: Duration::from_secs(15),
            connections: 16,
        }
    }
}

/// The smallest read buffer hyper accepts, and the bound on a request head.
const HEAD_BUF_BYTES: usize = 8 * 1024;

const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Requests the endpoint refused, by reason (each counter only grows).
#[derive(Debug, Default)]
pub struct EndpointStats {
    /// Connections answered 503 because every slot was taken.
    pub busy: AtomicU64,
    /// TLS handshakes that failed (no or an unverified client certificate, not TLS at all).
    pub tls_failed: AtomicU64,
    /// Requests without valid credentials (401).
    pub unauthenticated: AtomicU64,
    /// Requests refused because too many unverified credentials were tried (429).
    pub throttled: AtomicU64,
}

impl EndpointStats {
    /// `(reason, count)` for each counter, for an exposition.
    pub fn by_reason(&self) -> [(&'static str, u64); 4] {
        [
            ("busy", self.busy.load(Ordering::Relaxed)),
            ("tls_failed", self.tls_failed.load(Ordering::Relaxed)),
            (
                "unauthenticated",
                self.unauthenticated.load(Ordering::Relaxed),
            ),
            ("throttled", self.throttled.load(Ordering::Relaxed)),
        ]
    }
}

/// A bound `/metrics` endpoint serving the latest published exposition.
pub struct MetricsEndpoint {
    listener: TcpListener,
    snapshot: watch::Receiver<Arc<String>>,
    limits: HttpLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    auth: Option<Arc<BasicAuth>>,
    stats: Arc<EndpointStats>,
}

impl std::fmt::Debug for MetricsEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsEndpoint")
            .field("listener", &self.listener)
            .field("limits", &self.limits)
            .field("tls", &self.tls.is_some())
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

impl MetricsEndpoint {
    /// Binds `addr`; with `web`, serves as it configures (TLS, client certificates, basic auth).
    pub async fn bind(
        addr: SocketAddr,
        snapshot: watch::Receiver<Arc<String>>,
        limits: HttpLimits,
        web: Option<&WebConfig>,
    ) -> io::Result<Self> {
        Ok(MetricsEndpoint {
            listener: TcpListener::bind(addr).await?,
            snapshot,
            limits,
            tls: web
                .and_then(WebConfig::tls)
                .map(|c| tokio_rustls::TlsAcceptor::from(Arc::clone(c))),
            auth: web.and_then(WebConfig::basic_auth).cloned(),
            stats: Arc::default(),
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The refusal counters, shared with the running endpoint.
    pub fn stats(&self) -> Arc<EndpointStats> {
        Arc::clone(&self.stats)
    }

    /// Binds `addr` and serves on a thread of its own, with its own single-threaded runtime, until
    /// `shutdown` completes: TLS handshakes and bcrypt never run on the caller's threads (the
    /// agent's measuring loop). Returns once bound: the address and the refusal counters.
    pub fn spawn_thread(
        addr: SocketAddr,
        snapshot: watch::Receiver<Arc<String>>,
        limits: HttpLimits,
        web: Option<WebConfig>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> io::Result<(SocketAddr, Arc<EndpointStats>)> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("wattd-metrics".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .max_blocking_threads(2)
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                rt.block_on(async move {
                    match MetricsEndpoint::bind(addr, snapshot, limits, web.as_ref()).await {
                        Ok(ep) => {
                            let bound = ep.local_addr().map(|a| (a, ep.stats()));
                            let ok = bound.is_ok();
                            let _ = tx.send(bound);
                            if ok {
                                ep.serve(shutdown).await;
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                        }
                    }
                });
            })?;
        rx.recv()
            .map_err(|_| io::Error::other("the metrics thread ended before binding"))?
    }

    /// Serves until `shutdown` completes.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let slots = Arc::new(Semaphore::new(self.limits.connections));
        tokio::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                _ = &mut shutdown => return,
                a = self.listener.accept() => a,
            };
            let stream = match accepted {
                Ok((s, _)) => s,
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning on a listener that stays
                    // readable.
                    tracing::warn!(%error, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                // Over the limit: a best-effort 503 that never waits, then close (in plain text
                // even on a TLS port: the client sees a failed handshake, which is a refusal).
                self.stats.busy.fetch_add(1, Ordering::Relaxed);
                let _ = stream.try_write(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                continue;
            };
            let conn = Connection {
                snapshot: self.snapshot.clone(),
                limits: self.limits,
                auth: self.auth.clone(),
                stats: Arc::clone(&self.stats),
            };
            let tls = self.tls.clone();
            tokio::spawn(async move {
                let limits = conn.limits;
                let exchange = async {
                    match tls {
                        None => conn.serve(stream).await,
                        // The handshake is bounded like a request head: a peer that connects
                        // and says nothing holds its slot no longer.
                        Some(acceptor) => {
                            match tokio::time::timeout(limits.head_timeout, acceptor.accept(stream))
                                .await
                            {
                                Ok(Ok(s)) => conn.serve(s).await,
                                Ok(Err(error)) => {
                                    conn.stats.tls_failed.fetch_add(1, Ordering::Relaxed);
                                    tracing::debug!(%error, "metrics: TLS handshake failed");
                                }
                                Err(_) => {
                                    conn.stats.tls_failed.fetch_add(1, Ordering::Relaxed);
                                    tracing::debug!("metrics: TLS handshake timed out");
                                }
                            }
                        }
                    }
                };
                if tokio::time::timeout(limits.connection_timeout, exchange)
                    .await
                    .is_err()
                {
                    tracing::debug!("metrics: connection timed out");
                }
                drop(permit);
            });
        }
    }
}

/// What one connection needs to answer its request.
struct Connection {
    snapshot: watch::Receiver<Arc<String>>,
    limits: HttpLimits,
    auth: Option<Arc<BasicAuth>>,
    stats: Arc<EndpointStats>,
}

impl Connection {
    async fn serve<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(self, stream: S) {
        let Connection {
            snapshot,
            limits,
            auth,
            stats,
        } = self;
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let body = Arc::clone(&snapshot.borrow());
            let auth = auth.clone();
            let stats = Arc::clone(&stats);
            async move {
                if let Some(auth) = auth {
                    let header = req.headers().get(AUTHORIZATION).map(HeaderValue::as_bytes);
                    match auth.check(header).await {
                        Verdict::Granted => {}
                        Verdict::Missing | Verdict::Refused => {
                            stats.unauthenticated.fetch_add(1, Ordering::Relaxed);
                            return Ok::<_, Infallible>(unauthorized());
                        }
                        Verdict::Throttled => {
                            stats.throttled.fetch_add(1, Ordering::Relaxed);
                            let mut r = status_only(StatusCode::TOO_MANY_REQUESTS);
                            r.headers_mut()
                                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
                            return Ok(r);
                        }
                    }
                }
                Ok(respond(&req, &body))
            }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.head_timeout)
            .max_buf_size(HEAD_BUF_BYTES)
            .keep_alive(false)
            .serve_connection(TokioIo::new(stream), service);
        if let Err(error) = conn.await {
            tracing::debug!(%error, "metrics: connection");
        }
    }
}

fn status_only(status: StatusCode) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = status;
    r
}

fn unauthorized() -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(
        b"authentication required: basic auth with a user of the web configuration\n",
    )));
    *r.status_mut() = StatusCode::UNAUTHORIZED;
    r.headers_mut().insert(
        WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"wattd\", charset=\"UTF-8\""),
    );
    r
}

/// The exposition as a `Bytes` owner.
struct Shared(Arc<String>);

impl AsRef<[u8]> for Shared {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

/// The answer to one request: the exposition for GET or HEAD `/metrics` (the query string is
/// ignored: Prometheus may add parameters), 404 elsewhere, 405 for other methods.
fn respond(req: &Request<Incoming>, body: &Arc<String>) -> Response<Full<Bytes>> {
    if req.uri().path() != "/metrics" {
        let mut r = Response::new(Full::new(Bytes::from_static(
            b"not found; metrics are at /metrics\n",
        )));
        *r.status_mut() = StatusCode::NOT_FOUND;
        return r;
    }
    let head_only = match *req.method() {
        Method::GET => false,
        Method::HEAD => true,
        _ => {
            let mut r = status_only(StatusCode::METHOD_NOT_ALLOWED);
            r.headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            return r;
        }
    };
    // HEAD: the length GET would send, no body.
    let len = HeaderValue::from(body.len());
    // The rendered text is shared with the response, not copied.
    let bytes = if head_only {
        Bytes::new()
    } else {
        Bytes::from_owner(Shared(Arc::clone(body)))
    };
    let mut r = Response::new(Full::new(bytes));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(TEXT_FORMAT));
    r.headers_mut().insert(CONTENT_LENGTH, len);
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpStream;

    async fn start(limits: HttpLimits) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let (addr, stop, _) = start_with(limits, None).await;
        (addr, stop)
    }

    async fn start_with(
        limits: HttpLimits,
        web: Option<&WebConfig>,
    ) -> (
        SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        Arc<EndpointStats>,
    ) {
        let (_tx, rx) = watch::channel(Arc::new("wattd_ledger_up 1\n".to_owned()));
        let ep = MetricsEndpoint::bind("127.0.0.1:0".parse().unwrap(), rx, limits, web)
            .await
            .unwrap();
        let stats = ep.stats();
        let addr = ep.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(ep.serve(async move {
            let _ = stop_rx.await;
            drop(_tx);
        }));
        (addr, stop_tx, stats)
    }

    /// TLS with client certificates required and basic auth: each refusal is the right one and
    /// counted; the full credentials get the exposition.
    #[tokio::test]
    async fn tls_client_certificates_and_basic_auth_are_all_enforced() {
        use crate::client::{ClientOptions, ScrapeClient, ScrapeError};
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let server_ca = wattd_tests::tls::TestCa::new(dir.path(), "server");
        let server = server_ca.server("server");
        std::fs::set_permissions(&server.key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let client_ca = wattd_tests::tls::TestCa::new(dir.path(), "scrapers");
        let scraper = client_ca.client("prometheus");
        let stranger = server_ca.client("stranger");
        let web_yml = dir.path().join("web.yml");
        std::fs::write(
            &web_yml,
            format!(
                "tls_server_config:\n  cert_file: {}\n  key_file: {}\n  client_auth_type: \
                 RequireAndVerifyClientCert\n  client_ca_file: {}\nbasic_auth_users:\n  \
                 prometheus: {}\n",
                server.cert.display(),
                server.key.display(),
                client_ca.ca_pem.display(),
                bcrypt::hash("s3cret", 4).unwrap()
            ),
        )
        .unwrap();
        let web = WebConfig::load(&web_yml).unwrap();
        let (addr, _stop, stats) = start_with(HttpLimits::default(), Some(&web)).await;
        let client = |cert: Option<&wattd_tests::tls::CertFiles>, user: Option<&str>| {
            ScrapeClient::new(
                addr,
                &ClientOptions {
                    ca: Some(server_ca.ca_pem.clone()),
                    cert: cert.map(|c| c.cert.clone()),
                    key: cert.map(|c| c.key.clone()),
                    server_name: Some("localhost".into()),
                    user: user.map(|_| "prometheus".to_owned()),
                    password: user.map(str::to_owned),
                    host: None,
                },
            )
            .unwrap()
        };
        // Plain HTTP to the TLS port: no answer.
        let plain = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: l\r\n\r\n").await;
        assert!(!plain.contains("wattd_ledger_up"), "{plain}");
        // TLS without a client certificate, or with one the scrapers' CA did not issue.
        for cert in [None, Some(&stranger)] {
            let e = client(cert, Some("s3cret"))
                .get("/metrics")
                .await
                .unwrap_err();
            assert!(
                matches!(e, ScrapeError::Tls { .. } | ScrapeError::Http { .. }),
                "{e}"
            );
        }
        // The right certificate without credentials, or with the wrong password.
        let (status, body) = client(Some(&scraper), None).get("/metrics").await.unwrap();
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        let (status, _) = client(Some(&scraper), Some("wrong"))
            .get("/metrics")
            .await
            .unwrap();
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        // Everything right.
        let (status, body) = client(Some(&scraper), Some("s3cret"))
            .get("/metrics")
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, "wattd_ledger_up 1\n");
        let counts: std::collections::BTreeMap<_, _> = stats.by_reason().into_iter().collect();
        assert_eq!(counts["unauthenticated"], 2, "{counts:?}");
        assert!(counts["tls_failed"] >= 3, "{counts:?}");
        assert_eq!(counts["busy"], 0, "{counts:?}");
    }

    async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn serves_metrics_and_refuses_the_rest() {
        let (addr, _stop) = start(HttpLimits::default()).await;
        let get = exchange(addr, b"GET /metrics?x=1 HTTP/1.1\r\nHost: l\r\n\r\n").await;
        assert!(get.starts_with("HTTP/1.1 200"), "{get}");
        assert!(get.contains("text/plain; version=0.0.4"), "{get}");
        assert!(get.ends_with("wattd_ledger_up 1\n"), "{get}");
        let head = exchange(addr, b"HEAD /metrics HTTP/1.1\r\nHost: l\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            head.to_ascii_lowercase().contains("content-length: 18"),
            "{head}"
        );
        assert!(!head.contains("wattd_ledger_up"), "{head}");
        let other = exchange(addr, b"GET /other HTTP/1.1\r\nHost: l\r\n\r\n").await;
        assert!(other.starts_with("HTTP/1.1 404"), "{other}");
        let post = exchange(addr, b"POST /metrics HTTP/1.1\r\nHost: l\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        assert!(
            post.to_ascii_lowercase().contains("allow: get, head"),
            "{post}"
        );
        let junk = exchange(addr, b"\x00\x01 garbage\r\n\r\n").await;
        assert!(
            junk.is_empty() || junk.starts_with("HTTP/1.1 400"),
            "{junk}"
        );
    }

    #[tokio::test]
    async fn an_oversized_head_is_refused() {
        // Timeouts far beyond the read's own bound below: the refusal must come from the size
        // bound, not from waiting the client out.
        let (addr, _stop) = start(HttpLimits {
            head_timeout: Duration::from_secs(60),
            connection_timeout: Duration::from_secs(120),
            connections: 4,
        })
        .await;
        let mut req = b"GET /metrics HTTP/1.1\r\nX-Big: ".to_vec();
        req.extend(std::iter::repeat_n(b'a', 64 * 1024));
        req.extend_from_slice(b"\r\n\r\n");
        let mut s = TcpStream::connect(addr).await.unwrap();
        // The server may close before everything is written: that is a refusal too.
        let _ = s.write_all(&req).await;
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out)).await;
        assert!(read.is_ok(), "the connection was held open, not refused");
        let out = String::from_utf8_lossy(&out);
        assert!(out.is_empty() || out.starts_with("HTTP/1.1 431"), "{out}");
    }

    #[tokio::test]
    async fn held_sockets_take_a_slot_for_the_timeout_only() {
        let limits = HttpLimits {
            head_timeout: Duration::from_millis(200),
            connection_timeout: Duration::from_millis(400),
            connections: 2,
        };
        let (addr, _stop) = start(limits).await;
        // Two peers that connect and send nothing hold both slots.
        let held: Vec<TcpStream> = connect_idle(addr, 2).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let third = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: l\r\n\r\n").await;
        assert!(third.starts_with("HTTP/1.1 503"), "{third}");
        // Their time runs out; the endpoint serves again.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let again = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: l\r\n\r\n").await;
        assert!(again.starts_with("HTTP/1.1 200"), "{again}");
        drop(held);
    }

    /// On a TLS port, peers that connect and never start the handshake hold their slots for the
    /// head timeout, not the (much longer) connection timeout.
    #[tokio::test]
    async fn a_stalled_tls_handshake_takes_a_slot_for_the_head_timeout_only() {
        use crate::client::{ClientOptions, ScrapeClient};
        let dir = tempfile::tempdir().unwrap();
        let ca = wattd_tests::tls::TestCa::new(dir.path(), "server");
        let web_yml = ca.web_config(&dir.path().join("web.yml"), "server", &[], None);
        let web = WebConfig::load(&web_yml).unwrap();
        let limits = HttpLimits {
            head_timeout: Duration::from_millis(300),
            connection_timeout: Duration::from_secs(60),
            connections: 2,
        };
        let (addr, _stop, stats) = start_with(limits, Some(&web)).await;
        let held: Vec<TcpStream> = connect_idle(addr, 2).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let third = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: l\r\n\r\n").await;
        assert!(third.starts_with("HTTP/1.1 503"), "{third}");
        tokio::time::sleep(Duration::from_millis(600)).await;
        let client = ScrapeClient::new(
            addr,
            &ClientOptions {
                ca: Some(ca.ca_pem.clone()),
                server_name: Some("localhost".into()),
                ..Default::default()
            },
        )
        .unwrap();
        let (status, body) = client.get("/metrics").await.unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
        let counts: std::collections::BTreeMap<_, _> = stats.by_reason().into_iter().collect();
        assert_eq!(counts["tls_failed"], 2, "{counts:?}");
        assert_eq!(counts["busy"], 1, "{counts:?}");
        drop(held);
    }

    async fn connect_idle(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(TcpStream::connect(addr).await.unwrap());
        }
        v
    }
}
