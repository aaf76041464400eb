//! The scrape client of `wattd top` and of the BMC poller (and of the tests): GETs over hyper, in
//! plain HTTP or in TLS verified against a given CA (with a client certificate when one is
//! given), with basic-auth credentials when given. The connection is kept between GETs while the
//! server keeps it open (a BMC polled every second is not made to do a TLS handshake each time);
//! a closed, failed or timed-out one is dropped and the next GET connects anew. The response body
//! is bounded.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::header::{AUTHORIZATION, HOST};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

/// Largest response body read.
const BODY_MAX_BYTES: usize = 64 << 20;

/// How to reach an endpoint: all optional, plain HTTP without credentials by default.
#[derive(Clone, Debug, Default)]
pub struct ClientOptions {
    /// HTTPS, verifying the server against this CA (PEM).
    pub ca: Option<PathBuf>,
    /// A client certificate and its key (PEM), for endpoints that ask for one.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The name the server's certificate must carry (default: the address's IP).
    pub server_name: Option<String>,
    /// Basic-auth user and password.
    pub user: Option<String>,
    pub password: Option<String>,
    /// The `Host` header (default: the address): the name a server behind a name check (a BMC's
    /// host-header check, a reverse proxy) expects.
    pub host: Option<String>,
}

/// Why a scrape failed.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    #[error("{what}: {detail}")]
    Setup { what: String, detail: String },
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS with {addr}: {source}")]
    Tls {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP with {addr}: {detail}")]
    Http { addr: SocketAddr, detail: String },
    #[error("{addr} did not answer within {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
}

/// The HTTP/1.1 handshake on an open stream, its connection driven by a task of its own.
async fn handshake<S>(io: S, addr: SocketAddr) -> Result<Kept, ScrapeError>
where
    S: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| ScrapeError::Http {
            addr,
            detail: e.to_string(),
        })?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(Kept { sender, driver })
}

/// An open HTTP/1.1 connection: the request half and the task driving it, stopped on drop.
struct Kept {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for Kept {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// A configured client of one endpoint. Clones share its kept connection, and their GETs take
/// turns (each within its own deadline).
#[derive(Clone)]
pub struct ScrapeClient {
    addr: SocketAddr,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    authorization: Option<String>,
    host: String,
    timeout: Duration,
    /// The connection kept from the last GET, if the server left it open.
    kept: Arc<tokio::sync::Mutex<Option<Kept>>>,
    /// Connections opened (TCP, TLS and HTTP handshakes), for tests and diagnostics.
    connects: Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for ScrapeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScrapeClient")
            .field("addr", &self.addr)
            .field("tls", &self.tls.is_some())
            .field("basic_auth", &self.authorization.is_some())
            .finish()
    }
}

impl ScrapeClient {
    pub fn new(addr: SocketAddr, opts: &ClientOptions) -> Result<ScrapeClient, ScrapeError> {
        let setup = |what: String, detail: String| ScrapeError::Setup { what, detail };
        let tls = match &opts.ca {
            None => {
                if opts.cert.is_some() || opts.server_name.is_some() {
                    return Err(setup(
                        "TLS options".into(),
                        "a client certificate or server name needs the server's CA too".into(),
                    ));
                }
                None
            }
            Some(ca) => {
                let cert_key = match (&opts.cert, &opts.key) {
                    (None, None) => None,
                    (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
                    _ => {
                        return Err(setup(
                            "client certificate".into(),
                            "give both the certificate and its key".into(),
                        ))
                    }
                };
                let config = crate::tls::client_config(ca, "CA", cert_key)
                    .map_err(|e| setup("TLS".into(), e.to_string()))?;
                let name = match &opts.server_name {
                    Some(n) => ServerName::try_from(n.clone())
                        .map_err(|e| setup(format!("server name {n:?}"), e.to_string()))?,
                    None => ServerName::IpAddress(addr.ip().into()),
                };
                Some((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
            }
        };
        let authorization = match (&opts.user, &opts.password) {
            (None, None) => None,
            (Some(u), Some(p)) => Some(crate::auth::header_value(u, p)),
            _ => {
                return Err(setup(
                    "basic auth".into(),
                    "give both the user and the password".into(),
                ))
            }
        };
        Ok(ScrapeClient {
            addr,
            tls,
            authorization,
            host: opts.host.clone().unwrap_or_else(|| addr.to_string()),
            timeout: Duration::from_secs(5),
            kept: Arc::default(),
            connects: Arc::default(),
        })
    }

    /// Connections this client has opened so far.
    pub fn connects(&self) -> u64 {
        self.connects.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The same client with another deadline for a whole exchange (5 s by default).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Whether this client speaks HTTPS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// GET `path`: the status and the body (lossily UTF-8). The whole exchange, connecting
    /// included, is bounded by the client's timeout.
    pub async fn get(&self, path: &str) -> Result<(StatusCode, String), ScrapeError> {
        let addr = self.addr;
        let timeout = self.timeout;
        tokio::time::timeout(timeout, self.exchange(path))
            .await
            .map_err(|_| ScrapeError::Timeout { addr, timeout })?
    }

    /// A new connection: TCP, TLS when configured, the HTTP/1.1 handshake.
    async fn connect(&self) -> Result<Kept, ScrapeError> {
        let addr = self.addr;
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| ScrapeError::Connect { addr, source })?;
        let kept = match &self.tls {
            None => handshake(TokioIo::new(tcp), addr).await?,
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|source| ScrapeError::Tls { addr, source })?;
                handshake(TokioIo::new(tls), addr).await?
            }
        };
        self.connects
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(kept)
    }

    async fn exchange(&self, path: &str) -> Result<(StatusCode, String), ScrapeError> {
        let addr = self.addr;
        let http = |e: &dyn std::fmt::Display| ScrapeError::Http {
            addr,
            detail: e.to_string(),
        };
        // One exchange at a time per client; a kept connection is taken out while in use, so a
        // timeout (which drops this future) drops it too.
        let mut slot = self.kept.lock().await;
        let reusable = match slot.take() {
            Some(mut k) => (!k.sender.is_closed() && k.sender.ready().await.is_ok()).then_some(k),
            None => None,
        };
        let request = || {
            let mut req = Request::get(path).header(HOST, self.host.as_str());
            if let Some(a) = &self.authorization {
                req = req.header(AUTHORIZATION, a);
            }
            req.body(Empty::<Bytes>::new()).map_err(|e| http(&e))
        };
        let (conn, resp) = match reusable {
            // A kept connection the server closed while it was idle gives the request back
            // unsent: it is sent once on a new connection. One that was sent and failed is an
            // error, as on a new connection.
            Some(mut k) => match k.sender.try_send_request(request()?).await {
                Ok(resp) => (k, resp),
                Err(mut e) => match e.take_message() {
                    Some(unsent) => {
                        let mut k = self.connect().await?;
                        let resp = k.sender.send_request(unsent).await.map_err(|e| http(&e))?;
                        (k, resp)
                    }
                    None => return Err(http(e.error())),
                },
            },
            None => {
                let mut k = self.connect().await?;
                let resp = k
                    .sender
                    .send_request(request()?)
                    .await
                    .map_err(|e| http(&e))?;
                (k, resp)
            }
        };
        let status = resp.status();
        let body = Limited::new(resp.into_body(), BODY_MAX_BYTES)
            .collect()
            .await
            .map_err(|e| http(&e))?
            .to_bytes();
        // Kept for the next GET unless the server said it closes it.
        if !conn.sender.is_closed() {
            *slot = Some(conn);
        }
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
    use tokio::net::TcpListener;

    use super::*;

    /// A server that answers every request on a connection with "ok" and keeps it open, except
    /// that it closes a connection after its second answer. Counts accepted connections and
    /// records each request's Host header.
    async fn server() -> (
        SocketAddr,
        Arc<AtomicU64>,
        Arc<std::sync::Mutex<Vec<String>>>,
    ) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let hosts = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (a, h) = (accepted.clone(), hosts.clone());
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                a.fetch_add(1, Ordering::Relaxed);
                let h = h.clone();
                tokio::spawn(async move {
                    let (r, mut w) = s.into_split();
                    let mut lines = BufReader::new(r).lines();
                    let mut answered = 0;
                    while let Ok(Some(line)) = lines.next_line().await {
                        if let Some(v) = line.strip_prefix("host: ").or(line.strip_prefix("Host: "))
                        {
                            h.lock().unwrap().push(v.to_owned());
                        }
                        if line.is_empty() {
                            let _ = w
                                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                                .await;
                            answered += 1;
                            if answered == 2 {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, accepted, hosts)
    }

    #[tokio::test]
    async fn the_connection_is_kept_between_gets_and_renewed_when_closed() {
        let (addr, accepted, hosts) = server().await;
        let client = ScrapeClient::new(
            addr,
            &ClientOptions {
                host: Some("bmc.example:443".into()),
                ..ClientOptions::default()
            },
        )
        .unwrap();
        for _ in 0..2 {
            let (status, body) = client.get("/redfish/v1").await.unwrap();
            assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));
        }
        assert_eq!(
            accepted.load(Ordering::Relaxed),
            1,
            "two GETs, one connection"
        );
        // The server closed that connection after its second answer: the next GET still
        // succeeds, on a new one.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (status, _) = client.get("/redfish/v1").await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(accepted.load(Ordering::Relaxed), 2);
        assert_eq!(client.connects(), 2);
        assert!(
            hosts.lock().unwrap().iter().all(|h| h == "bmc.example:443"),
            "{hosts:?}"
        );
    }
}
