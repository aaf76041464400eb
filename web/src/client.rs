//! The scrape client of `wattd top` (and of the tests): one GET over hyper, in plain HTTP or in
//! TLS verified against a given CA (with a client certificate when one is given), with basic-auth
//! credentials when given. The response body is bounded.

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
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// Largest response body read.
const MAX_BODY_BYTES: usize = 64 << 20;

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

/// A configured client of one endpoint.
#[derive(Clone)]
pub struct ScrapeClient {
    addr: SocketAddr,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    authorization: Option<String>,
    timeout: Duration,
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
                    .map_err(|e| setup("TLS".into(), e))?;
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
            timeout: Duration::from_secs(5),
        })
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

    /// GET `path`: the status and the body (lossily UTF-8).
    pub async fn get(&self, path: &str) -> Result<(StatusCode, String), ScrapeError> {
        let addr = self.addr;
        let exchange = async {
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(|source| ScrapeError::Connect { addr, source })?;
            match &self.tls {
                None => self.exchange(tcp, path).await,
                Some((connector, name)) => {
                    let tls = connector
                        .connect(name.clone(), tcp)
                        .await
                        .map_err(|source| ScrapeError::Tls { addr, source })?;
                    self.exchange(tls, path).await
                }
            }
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ScrapeError::Timeout {
                addr,
                timeout: self.timeout,
            })?
    }

    async fn exchange<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
        &self,
        stream: S,
        path: &str,
    ) -> Result<(StatusCode, String), ScrapeError> {
        let addr = self.addr;
        let http = |e: &dyn std::fmt::Display| ScrapeError::Http {
            addr,
            detail: e.to_string(),
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| http(&e))?;
        let driver = tokio::spawn(conn);
        let mut req = Request::get(path).header(HOST, addr.to_string());
        if let Some(a) = &self.authorization {
            req = req.header(AUTHORIZATION, a);
        }
        let req = req.body(Empty::<Bytes>::new()).map_err(|e| http(&e))?;
        let resp = sender.send_request(req).await.map_err(|e| http(&e))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
            .map_err(|e| http(&e))?
            .to_bytes();
        driver.abort();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}
