//! `wattd-ledger events`: the change feed as CloudEvents 1.0 (JSON), for metering backends.
//!
//! One event per node, run, domain and stored batch, with the change feed's deterministic id
//! (SHA-256 of node, seq, run and domain), so a backend's de-duplication on `source` and `id`
//! (OpenMeter), or an idempotency key (Stripe, Lago, Orb), makes a repeated event harmless.
//! Written to stdout (structured mode: one event per line; or with `--batch`, one
//! `application/cloudevents-batch+json` array per stored batch), or POSTed to an HTTP endpoint
//! with retries (a 409 is a receiver that has the id already: delivered). A run's account is
//! its label as stored when the batch is read. The position is the change feed's cursor, saved
//! (atomically) after each batch is written or acknowledged, so a resumed export repeats at most
//! the batch in flight.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use wattd_proto::v1::Change;

use crate::query_api::{batch_changes, Cursor};
use crate::readers::Role;
use crate::store::{Store, StoreError};

/// The CloudEvents `type` of one change.
pub const EVENT_TYPE: &str = "dev.wattd.run.energy.v1";
/// Batches read from one node per round.
const PAGE: u32 = 16;

/// Where the events go.
#[derive(Clone, Debug)]
pub enum Sink {
    Stdout,
    Post(Post),
}

/// An HTTP(S) endpoint that takes events.
#[derive(Clone, Debug)]
pub struct Post {
    pub url: String,
    /// CA certificates (PEM) for an https endpoint.
    pub ca: Option<PathBuf>,
    /// Gives up on a batch after this long of failed attempts (0: never).
    pub give_up_after: Duration,
}

#[derive(Clone, Debug)]
pub struct ExportOptions {
    pub account_label: String,
    /// One `application/cloudevents-batch+json` array per stored batch, instead of one
    /// `application/cloudevents+json` event per line or request.
    pub batch: bool,
    pub cursor_file: Option<PathBuf>,
    /// Stop after this many events (0: at the present).
    pub max_events: u64,
}

/// Unix nanoseconds as RFC 3339 UTC with nanoseconds (`2026-12-02T08:15:57.123456789Z`).
pub fn rfc3339(unix_ns: i64) -> String {
    let secs = unix_ns.div_euclid(1_000_000_000);
    let nanos = unix_ns.rem_euclid(1_000_000_000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// One change as a CloudEvent (structured mode, JSON).
pub fn event(c: &Change) -> Value {
    let subject = if c.account.is_empty() {
        format!("run/{}", c.run_id)
    } else {
        format!("account/{}/run/{}", c.account, c.run_id)
    };
    json!({
        "specversion": "1.0",
        "id": c.id,
        "source": format!("wattd:node:{}", c.node_id),
        "type": EVENT_TYPE,
        "subject": subject,
        "time": rfc3339(c.window_end_unix_ns),
        "datacontenttype": "application/json",
        "data": {
            "node_id": c.node_id,
            "run_id": c.run_id,
            "account": c.account,
            "domain": c.domain,
            "energy_uj": c.energy_uj,
            "energy_wh": c.energy_wh,
            "window_start": rfc3339(c.window_start_unix_ns),
            "window_end": rfc3339(c.window_end_unix_ns),
            "batch_seq": c.seq,
            "batch_hash": wattd_records::durable::hex(&c.batch_hash),
            "key_epoch": c.key_epoch,
            "key_id": wattd_records::durable::hex(&c.key_id),
        },
    })
}

/// What an export did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Exported {
    pub batches: u64,
    pub events: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Cursor(String),
    #[error("{0}")]
    Io(String),
    #[error("{0}")]
    Post(String),
}

/// Exports every change after the saved cursor, up to the present (or `max_events`).
pub async fn export<S: Store>(
    store: &S,
    opts: &ExportOptions,
    sink: &Sink,
    out: &mut dyn std::io::Write,
) -> Result<Exported, ExportError> {
    let mut cursor = match &opts.cursor_file {
        Some(p) => match std::fs::read_to_string(p) {
            Ok(text) => Cursor::parse(text.trim())
                .map_err(|e| ExportError::Cursor(format!("--cursor-file {}: {e}", p.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Cursor::default(),
            Err(e) => {
                return Err(ExportError::Io(format!(
                    "--cursor-file {}: {e}",
                    p.display()
                )))
            }
        },
        None => Cursor::default(),
    };
    let heads = store.heads().await?;
    if let Some(why) = cursor.ahead_of(&heads) {
        return Err(ExportError::Cursor(why));
    }
    let client = match sink {
        Sink::Post(p) => Some(http::Client::new(p)?),
        Sink::Stdout => None,
    };
    let mut done = Exported::default();
    loop {
        let mut progressed = false;
        for (node, head) in store.heads().await? {
            let from = cursor.get(&node);
            if head <= from {
                continue;
            }
            for b in store
                .batch_energy(&node, from, PAGE, &opts.account_label)
                .await?
            {
                let changes = batch_changes(&b, &Role::Metering)
                    .map_err(|e| ExportError::Post(e.to_string()))?;
                let events: Vec<Value> = changes.iter().map(event).collect();
                if !events.is_empty() {
                    match &client {
                        None => write_events(out, &events, opts.batch)?,
                        Some(c) => c.deliver(&events, opts.batch).await?,
                    }
                }
                cursor.set(&node, b.seq);
                if let Some(p) = &opts.cursor_file {
                    save_cursor(p, &cursor)?;
                }
                done.batches += 1;
                done.events += events.len() as u64;
                progressed = true;
                if opts.max_events != 0 && done.events >= opts.max_events {
                    return Ok(done);
                }
            }
        }
        if !progressed {
            return Ok(done);
        }
    }
}

fn write_events(
    out: &mut dyn std::io::Write,
    events: &[Value],
    batch: bool,
) -> Result<(), ExportError> {
    let io = |e: std::io::Error| ExportError::Io(format!("stdout: {e}"));
    if batch {
        writeln!(out, "{}", Value::Array(events.to_vec())).map_err(io)?;
    } else {
        for e in events {
            writeln!(out, "{e}").map_err(io)?;
        }
    }
    out.flush().map_err(io)
}

fn save_cursor(path: &Path, cursor: &Cursor) -> Result<(), ExportError> {
    let fail = |e: &dyn std::fmt::Display| {
        ExportError::Io(format!("--cursor-file {}: {e}", path.display()))
    };
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| fail(&"not a file name"))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    wattd_records::durable::write_atomic(dir, name, cursor.text().as_bytes(), 0o600, true)
        .map_err(|e| fail(&e.into_io()))
}

/// A small HTTP/1.1 client for the POSTs (hyper's connection API; plain TCP or rustls).
mod http {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use http_body_util::{BodyExt as _, Full};
    use hyper::Request;
    use hyper_util::rt::TokioIo;
    use serde_json::Value;

    use super::{ExportError, Post};

    pub struct Client {
        post: Post,
        scheme_https: bool,
        host: String,
        port: u16,
        authority: String,
        /// The request target (origin form: path and query).
        target: String,
        tls: Option<tokio_rustls::TlsConnector>,
    }

    impl Client {
        pub fn new(post: &Post) -> Result<Client, ExportError> {
            let uri: hyper::Uri = post
                .url
                .parse()
                .map_err(|e| ExportError::Post(format!("--post {:?}: {e}", post.url)))?;
            let https = match uri.scheme_str() {
                Some("http") => false,
                Some("https") => true,
                _ => {
                    return Err(ExportError::Post(format!(
                        "--post {:?}: an http:// or https:// URL",
                        post.url
                    )))
                }
            };
            let host = uri
                .host()
                .ok_or_else(|| ExportError::Post(format!("--post {:?}: no host", post.url)))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
            let tls = if https {
                let Some(ca) = &post.ca else {
                    return Err(ExportError::Post(
                        "--post https://...: --post-ca names the CA to trust".into(),
                    ));
                };
                use rustls::pki_types::pem::PemObject as _;
                let mut roots = rustls::RootCertStore::empty();
                for c in rustls::pki_types::CertificateDer::pem_file_iter(ca)
                    .map_err(|e| ExportError::Post(format!("--post-ca {}: {e}", ca.display())))?
                {
                    let c = c.map_err(|e| {
                        ExportError::Post(format!("--post-ca {}: {e}", ca.display()))
                    })?;
                    roots.add(c).map_err(|e| {
                        ExportError::Post(format!("--post-ca {}: {e}", ca.display()))
                    })?;
                }
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let config = rustls::ClientConfig::builder_with_provider(provider)
                    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
                    .map_err(|e| ExportError::Post(format!("TLS: {e}")))?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
            } else {
                None
            };
            if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
                return Err(ExportError::Post(
                    "--post: credentials in the URL would be sent in the Host header and logged; \
                     the endpoint must not need them there"
                        .into(),
                ));
            }
            Ok(Client {
                target: uri
                    .path_and_query()
                    .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
                authority: uri
                    .authority()
                    .map_or_else(|| host.clone(), |a| a.as_str().to_owned()),
                post: post.clone(),
                scheme_https: https,
                host,
                port,
                tls,
            })
        }

        /// POSTs the events (one request per event, or one batch), retrying with backoff
        /// until accepted (2xx). A 4xx other than 408 and 429 is the receiver refusing them:
        /// an error, nothing skipped.
        pub async fn deliver(&self, events: &[Value], batch: bool) -> Result<(), ExportError> {
            if batch {
                let body = Value::Array(events.to_vec()).to_string();
                self.post_retrying(body, "application/cloudevents-batch+json")
                    .await
            } else {
                for e in events {
                    self.post_retrying(e.to_string(), "application/cloudevents+json")
                        .await?;
                }
                Ok(())
            }
        }

        async fn post_retrying(&self, body: String, content_type: &str) -> Result<(), ExportError> {
            let started = Instant::now();
            let mut wait = Duration::from_millis(200);
            loop {
                match self.post_once(body.clone(), content_type).await {
                    Ok(()) => return Ok(()),
                    Err(Attempt::Refused(msg)) => return Err(ExportError::Post(msg)),
                    Err(Attempt::Retry(msg)) => {
                        let give_up = self.post.give_up_after;
                        if !give_up.is_zero() && started.elapsed() >= give_up {
                            return Err(ExportError::Post(format!(
                                "{} still failing after {} s: {msg}",
                                self.post.url,
                                give_up.as_secs()
                            )));
                        }
                        tracing::warn!(url = %self.post.url, error = %msg, retry_in_ms = wait.as_millis() as u64, "POST failed; retrying");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(30));
                    }
                }
            }
        }

        async fn post_once(&self, body: String, content_type: &str) -> Result<(), Attempt> {
            let retry = |e: &dyn std::fmt::Display| Attempt::Retry(e.to_string());
            let tcp = tokio::time::timeout(
                Duration::from_secs(10),
                tokio::net::TcpStream::connect((self.host.as_str(), self.port)),
            )
            .await
            .map_err(|_| Attempt::Retry("connect timed out".into()))?
            .map_err(|e| retry(&e))?;
            let req = Request::post(self.target.as_str())
                .header(hyper::header::HOST, self.authority.as_str())
                .header(hyper::header::CONTENT_TYPE, content_type)
                .body(Full::new(Bytes::from(body)))
                .map_err(|e| Attempt::Refused(e.to_string()))?;
            let exchange = async {
                let resp = if let (true, Some(tls)) = (self.scheme_https, &self.tls) {
                    let name = rustls::pki_types::ServerName::try_from(self.host.clone())
                        .map_err(|e| Attempt::Refused(format!("server name: {e}")))?;
                    let stream = tls.connect(name, tcp).await.map_err(|e| retry(&e))?;
                    send(TokioIo::new(stream), req).await?
                } else {
                    send(TokioIo::new(tcp), req).await?
                };
                Ok::<_, Attempt>(resp)
            };
            let (status, text) = tokio::time::timeout(Duration::from_secs(30), exchange)
                .await
                .map_err(|_| Attempt::Retry("no answer within 30 s".into()))??;
            // 409: the receiver has this id already (a replay after a crash): delivered.
            if status.is_success() || status == hyper::StatusCode::CONFLICT {
                Ok(())
            } else if status.is_server_error()
                || status == hyper::StatusCode::TOO_MANY_REQUESTS
                || status == hyper::StatusCode::REQUEST_TIMEOUT
            {
                Err(Attempt::Retry(format!("{status}: {text}")))
            } else {
                Err(Attempt::Refused(format!(
                    "{} refused the events: {status}: {text}",
                    self.post.url
                )))
            }
        }
    }

    enum Attempt {
        Retry(String),
        Refused(String),
    }

    async fn send<T>(
        io: TokioIo<T>,
        req: Request<Full<Bytes>>,
    ) -> Result<(hyper::StatusCode, String), Attempt>
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| Attempt::Retry(e.to_string()))?;
        let driver = tokio::spawn(conn);
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| Attempt::Retry(e.to_string()))?;
        let status = resp.status();
        // The answer is read for the log only: at most 64 KiB of it.
        let body = http_body_util::Limited::new(resp.into_body(), 64 << 10)
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        driver.abort();
        let text: String = String::from_utf8_lossy(&body).chars().take(512).collect();
        Ok((status, text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_matches_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            rfc3339(951_782_400_000_000_000),
            "2000-02-29T00:00:00.000000000Z"
        );
        assert_eq!(
            rfc3339(1_796_197_952_123_456_789),
            "2026-12-02T07:52:32.123456789Z"
        );
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59.999999999Z");
        assert_eq!(
            rfc3339(4_102_444_799_000_000_000),
            "2099-12-31T23:59:59.000000000Z"
        );
    }

    #[test]
    fn an_event_carries_the_change_and_a_deterministic_id() {
        let c = Change {
            id: crate::query_api::change_id("n1", 3, "run-a", "package:0"),
            node_id: "n1".into(),
            seq: 3,
            run_id: "run-a".into(),
            account: "acme".into(),
            domain: "package:0".into(),
            energy_uj: 3_600_000_000,
            energy_wh: "1.0000000000".into(),
            window_start_unix_ns: 0,
            window_end_unix_ns: 10_000_000_000,
            batch_hash: vec![0xab; 32],
            key_epoch: 1,
            key_id: vec![1; 16],
        };
        let e = event(&c);
        assert_eq!(e["specversion"], "1.0");
        assert_eq!(e["type"], EVENT_TYPE);
        assert_eq!(e["source"], "wattd:node:n1");
        assert_eq!(e["subject"], "account/acme/run/run-a");
        assert_eq!(e["time"], "1970-01-01T00:00:10.000000000Z");
        assert_eq!(e["data"]["energy_uj"], 3_600_000_000u64);
        assert_eq!(e["data"]["energy_wh"], "1.0000000000");
        assert_eq!(e["id"], event(&c)["id"]);
    }
}
