//! The ledger's `/metrics` endpoint, on hyper (HTTP/1.1). One request per connection, bounded:
//! the request head must fit in hyper's smallest read buffer (8 KiB) and arrive within
//! [`HttpLimits::head_timeout`], the whole exchange must end within
//! [`HttpLimits::connection_timeout`], and at most [`HttpLimits::connections`] are served at
//! once (more are answered 503 without waiting). A scraper that holds its socket open holds one
//! slot for at most the connection timeout.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

/// Bounds of the endpoint.
#[derive(Clone, Copy, Debug)]
pub struct HttpLimits {
    /// Time allowed to send the request head.
    pub head_timeout: Duration,
    /// Time allowed for the whole exchange (request and response).
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

/// A bound `/metrics` endpoint serving the latest published exposition.
#[derive(Debug)]
pub struct MetricsEndpoint {
    listener: TcpListener,
    snapshot: watch::Receiver<Arc<String>>,
    limits: HttpLimits,
}

impl MetricsEndpoint {
    pub async fn bind(
        addr: SocketAddr,
        snapshot: watch::Receiver<Arc<String>>,
        limits: HttpLimits,
    ) -> io::Result<Self> {
        Ok(MetricsEndpoint {
            listener: TcpListener::bind(addr).await?,
            snapshot,
            limits,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
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
                // Over the limit: a best-effort 503 that never waits, then close.
                let _ = stream.try_write(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                continue;
            };
            let snapshot = self.snapshot.clone();
            let limits = self.limits;
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let body = Arc::clone(&snapshot.borrow());
                    async move { Ok::<_, Infallible>(respond(&req, &body)) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(limits.head_timeout)
                    .max_buf_size(HEAD_BUF_BYTES)
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(stream), service);
                match tokio::time::timeout(limits.connection_timeout, conn).await {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => tracing::debug!(%error, "metrics: connection"),
                    Err(_) => tracing::debug!("metrics: connection timed out"),
                }
                drop(permit);
            });
        }
    }
}

/// The answer to one request: the exposition for GET or HEAD `/metrics` (the query string is
/// ignored: Prometheus may add parameters), 404 elsewhere, 405 for other methods.
fn respond(req: &Request<Incoming>, body: &Arc<String>) -> Response<Full<Bytes>> {
    let status_only = |status: StatusCode| {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = status;
        r
    };
    if req.uri().path() != "/metrics" {
        return status_only(StatusCode::NOT_FOUND);
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
    let bytes = if head_only {
        Bytes::new()
    } else {
        Bytes::from(body.as_bytes().to_vec())
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
        let (_tx, rx) = watch::channel(Arc::new("wattd_ledger_up 1\n".to_owned()));
        let ep = MetricsEndpoint::bind("127.0.0.1:0".parse().unwrap(), rx, limits)
            .await
            .unwrap();
        let addr = ep.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(ep.serve(async move {
            let _ = stop_rx.await;
            drop(_tx);
        }));
        (addr, stop_tx)
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
        let (addr, _stop) = start(HttpLimits::default()).await;
        let mut req = b"GET /metrics HTTP/1.1\r\nX-Big: ".to_vec();
        req.extend(std::iter::repeat_n(b'a', 64 * 1024));
        req.extend_from_slice(b"\r\n\r\n");
        let mut s = TcpStream::connect(addr).await.unwrap();
        // The server may close before everything is written: that is a refusal too.
        let _ = s.write_all(&req).await;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        let out = String::from_utf8_lossy(&out);
        assert!(!out.starts_with("HTTP/1.1 200"), "{out}");
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

    async fn connect_idle(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(TcpStream::connect(addr).await.unwrap());
        }
        v
    }
}
