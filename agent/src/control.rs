//! The control socket: the platform's control plane tells wattd when runs start and finish,
//! over a local Unix socket, as newline-delimited JSON with one JSON reply per message.
//!
//! Nobody else may use it: the socket is mode 0660, each peer's uid/gid (SO_PEERCRED) must be
//! root or listed, and every resource a peer can make us spend is bounded (line length, message
//! rate, label count and size, connections, time). Validated events go to the daemon over a
//! bounded channel; the daemon answers each one (it owns the run tracker), so "unknown run"
//! reaches the peer as an error reply.

use std::collections::BTreeMap;
use std::fs;
use std::future::Future;
use std::io;
use std::num::NonZeroU32;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use governor::{Quota, RateLimiter};
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_stream::StreamExt as _;
use tokio_util::codec::{AnyDelimiterCodec, AnyDelimiterCodecError, FramedRead};
use wattd_collectors::cgroup::{validate_cgroup_rel, validate_run_id, RunTracker};

/// Bounds and access rules of the control socket.
#[derive(Clone, Debug)]
pub struct ControlConfig {
    pub path: PathBuf,
    /// Peers allowed besides root and the agent's own user, by uid or by primary gid.
    pub allowed_uids: Vec<u32>,
    pub allowed_gids: Vec<u32>,
    pub max_line_bytes: usize,
    pub max_connections: usize,
    /// Sustained messages per second per connection, and the burst above it.
    pub messages_per_sec: u32,
    pub burst: u32,
    /// Rate-limited messages a connection may send before it is closed.
    pub max_rate_violations: u32,
    pub max_labels: usize,
    pub max_label_key_bytes: usize,
    pub max_label_value_bytes: usize,
    /// Events waiting for the daemon.
    pub queue_depth: usize,
    /// How long a message may wait for the daemon's answer, and a reply for the peer to read.
    pub reply_timeout: Duration,
    /// A connection silent this long is closed, so idle peers cannot hold every slot.
    pub idle_timeout: Duration,
}

impl ControlConfig {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        ControlConfig {
            path: path.into(),
            allowed_uids: Vec::new(),
            allowed_gids: Vec::new(),
            max_line_bytes: 64 * 1024,
            max_connections: 64,
            messages_per_sec: 1000,
            burst: 1000,
            max_rate_violations: 100,
            max_labels: wattd_proto::names::LABELS_MAX,
            max_label_key_bytes: wattd_proto::names::LABEL_KEY_MAX_BYTES,
            max_label_value_bytes: wattd_proto::names::LABEL_VALUE_MAX_BYTES,
            queue_depth: 1024,
            reply_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(300),
        }
    }
}

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{}: exists and is not a socket; refusing to replace it", path.display())]
    NotASocket { path: PathBuf },
    #[error("{}: another process is listening on it", path.display())]
    InUse { path: PathBuf },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

/// A validated control-plane event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ControlEvent {
    RunStarted {
        run_id: String,
        cgroup: String,
        labels: BTreeMap<String, String>,
    },
    RunFinished {
        run_id: String,
    },
}

/// Who sent an event (from SO_PEERCRED).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

/// Why a control message was not applied. Its text is the reply's `error`
/// (`{"ok":false,"error":...}`), the wire contract: the variants name the case, not new text.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("too many connections")]
    TooManyConnections,
    #[error("peer uid {uid} gid {gid} is not allowed")]
    PeerNotAllowed { uid: u32, gid: u32 },
    #[error("line longer than {0} bytes; closing the connection")]
    LineTooLong(usize),
    #[error("rate limited")]
    RateLimited,
    #[error("rate limited; closing the connection")]
    RateLimitedClosing,
    #[error("bad message: {0}")]
    BadMessage(serde_json::Error),
    /// A run id or cgroup path the contract refuses, or what the tracker refused (a cgroup
    /// that is not there, a run id taken).
    #[error("{0}")]
    Run(wattd_collectors::HostError),
    #[error("more than {0} labels")]
    TooManyLabels(usize),
    #[error("label key {key:?} must be 1 to {max} bytes of A-Z a-z 0-9 _ - . /")]
    LabelKey { key: String, max: usize },
    #[error("label {key:?}: value must be at most {max} bytes, no control characters")]
    LabelValue { key: String, max: usize },
    #[error("label {key:?}: {what}")]
    Label { key: String, what: &'static str },
    #[error("daemon busy")]
    DaemonBusy,
    #[error("daemon stopping")]
    DaemonStopping,
    #[error("daemon dropped the request")]
    DaemonDropped,
    #[error("daemon did not answer in time")]
    DaemonTimeout,
}

/// An event for the daemon, which must answer it with [`ControlRequest::respond`].
#[derive(Debug)]
pub struct ControlRequest {
    pub event: ControlEvent,
    pub peer: Peer,
    reply: oneshot::Sender<Result<(), Refusal>>,
}

impl ControlRequest {
    /// Answers the peer; a refusal is sent as `{"ok":false,"error":...}`.
    pub fn respond(self, result: Result<(), Refusal>) {
        // The peer may have gone; nothing to do then.
        let _ = self.reply.send(result);
    }
}

/// Applies an event to the tracker: the daemon's side of the request.
pub fn apply(tracker: &mut RunTracker, event: &ControlEvent) -> Result<(), Refusal> {
    match event {
        ControlEvent::RunStarted {
            run_id,
            cgroup,
            labels,
        } => tracker
            .run_started(run_id, cgroup, labels.clone())
            .map(|_| ())
            .map_err(Refusal::Run),
        ControlEvent::RunFinished { run_id } => tracker.run_finished(run_id).map_err(Refusal::Run),
    }
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum Wire {
    RunStarted {
        run_id: String,
        cgroup: String,
        #[serde(default)]
        labels: BTreeMap<String, String>,
    },
    RunFinished {
        run_id: String,
    },
}

/// The bound socket, ready to serve.
#[derive(Debug)]
pub struct ControlServer {
    listener: UnixListener,
    config: Arc<ControlConfig>,
    tx: mpsc::Sender<ControlRequest>,
}

impl ControlServer {
    /// Creates the socket (mode 0660), replacing a stale socket file but never a live socket or
    /// anything that is not a socket. Must run inside a tokio runtime. Returns the receiver of
    /// events the daemon must answer.
    pub fn bind(
        config: ControlConfig,
    ) -> Result<(ControlServer, mpsc::Receiver<ControlRequest>), ControlError> {
        let path = config.path.clone();
        let io_err = |source| ControlError::Io {
            path: path.clone(),
            source,
        };
        match fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_socket() => {
                if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                    return Err(ControlError::InUse { path });
                }
                fs::remove_file(&path).map_err(io_err)?;
            }
            Ok(_) => return Err(ControlError::NotASocket { path }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(e)),
        }
        let listener = UnixListener::bind(&path).map_err(io_err)?;
        // Set after bind: the umask decides the mode at creation, and changing the process-wide
        // umask from a library is not safe. A peer that connects in between is still checked by
        // its credentials.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o660)).map_err(io_err)?;
        let (tx, rx) = mpsc::channel(config.queue_depth.max(1));
        Ok((
            ControlServer {
                listener,
                config: Arc::new(config),
                tx,
            },
            rx,
        ))
    }

    pub fn path(&self) -> &Path {
        &self.config.path
    }

    /// Accepts connections until `shutdown` completes, then removes the socket file.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let slots = Arc::new(Semaphore::new(self.config.max_connections));
        tokio::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                _ = &mut shutdown => break,
                a = self.listener.accept() => a,
            };
            let stream = match accepted {
                Ok((s, _)) => s,
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning on accept.
                    tracing::warn!(%error, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let config = self.config.clone();
            let tx = self.tx.clone();
            match slots.clone().try_acquire_owned() {
                Ok(permit) => {
                    tokio::spawn(async move {
                        handle_connection(stream, &config, &tx).await;
                        drop(permit);
                    });
                }
                Err(_) => {
                    tokio::spawn(async move {
                        let mut s = stream;
                        let _ = reply(&mut s, &config, Err(Refusal::TooManyConnections)).await;
                    });
                }
            }
        }
        let _ = fs::remove_file(&self.config.path);
    }
}

/// Root, the agent's own user (a peer running as the agent can already do anything the agent
/// can: it is no new principal), and the configured uids and gids.
fn peer_allowed(config: &ControlConfig, peer: &Peer) -> bool {
    let own = rustix::process::geteuid().as_raw();
    peer.uid == 0
        || peer.uid == own
        || config.allowed_uids.contains(&peer.uid)
        || config.allowed_gids.contains(&peer.gid)
}

async fn reply<W: AsyncWriteExt + Unpin>(
    w: &mut W,
    config: &ControlConfig,
    result: Result<(), Refusal>,
) -> io::Result<()> {
    let mut out = match result {
        Ok(()) => serde_json::json!({ "ok": true }),
        Err(e) => serde_json::json!({ "ok": false, "error": e.to_string() }),
    }
    .to_string();
    out.push('\n');
    match tokio::time::timeout(config.reply_timeout, w.write_all(out.as_bytes())).await {
        Ok(r) => r,
        Err(_) => Err(io::ErrorKind::TimedOut.into()),
    }
}

async fn handle_connection(
    stream: UnixStream,
    config: &ControlConfig,
    tx: &mpsc::Sender<ControlRequest>,
) {
    let peer = match stream.peer_cred() {
        Ok(c) => Peer {
            uid: c.uid(),
            gid: c.gid(),
            pid: c.pid(),
        },
        Err(error) => {
            tracing::warn!(%error, "control socket: no peer credentials");
            return;
        }
    };
    let (rd, mut wr) = stream.into_split();
    if !peer_allowed(config, &peer) {
        tracing::warn!(
            uid = peer.uid,
            gid = peer.gid,
            "control socket: peer refused"
        );
        let refusal = Refusal::PeerNotAllowed {
            uid: peer.uid,
            gid: peer.gid,
        };
        let _ = reply(&mut wr, config, Err(refusal)).await;
        return;
    }
    let rate = NonZeroU32::new(config.messages_per_sec).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(config.burst).unwrap_or(rate);
    let limiter = RateLimiter::direct(Quota::per_second(rate).allow_burst(burst));
    // Lines without their newline, at most `max_line_bytes` each (the codec buffers at most
    // that plus one read); a last message without its newline still counts.
    let codec =
        AnyDelimiterCodec::new_with_max_length(b"\n".to_vec(), Vec::new(), config.max_line_bytes);
    let mut lines = FramedRead::with_capacity(rd, codec, 16 * 1024);
    let mut violations = 0u32;
    loop {
        let line = match tokio::time::timeout(config.idle_timeout, lines.next()).await {
            Ok(Some(Ok(line))) => line,
            Ok(Some(Err(AnyDelimiterCodecError::MaxChunkLengthExceeded))) => {
                let refusal = Refusal::LineTooLong(config.max_line_bytes);
                let _ = reply(&mut wr, config, Err(refusal)).await;
                return;
            }
            // End of stream, a read error, or idle too long.
            Ok(Some(Err(AnyDelimiterCodecError::Io(_)))) | Ok(None) | Err(_) => return,
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if limiter.check().is_err() {
            violations += 1;
            let closing = violations > config.max_rate_violations;
            let refusal = if closing {
                Refusal::RateLimitedClosing
            } else {
                Refusal::RateLimited
            };
            if reply(&mut wr, config, Err(refusal)).await.is_err() || closing {
                tracing::warn!(uid = peer.uid, "control socket: peer over its rate, closed");
                return;
            }
            continue;
        }
        let result = match parse_event(config, &line) {
            Ok(event) => ask_daemon(config, tx, event, peer).await,
            Err(e) => Err(e),
        };
        if reply(&mut wr, config, result).await.is_err() {
            return;
        }
    }
}

async fn ask_daemon(
    config: &ControlConfig,
    tx: &mpsc::Sender<ControlRequest>,
    event: ControlEvent,
    peer: Peer,
) -> Result<(), Refusal> {
    let (reply_tx, reply_rx) = oneshot::channel();
    let req = ControlRequest {
        event,
        peer,
        reply: reply_tx,
    };
    match tx.send_timeout(req, config.reply_timeout).await {
        Ok(()) => {}
        Err(mpsc::error::SendTimeoutError::Timeout(_)) => return Err(Refusal::DaemonBusy),
        Err(mpsc::error::SendTimeoutError::Closed(_)) => return Err(Refusal::DaemonStopping),
    }
    match tokio::time::timeout(config.reply_timeout, reply_rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err(Refusal::DaemonDropped),
        Err(_) => Err(Refusal::DaemonTimeout),
    }
}

/// Parses and validates one message; the error is the reply text.
fn parse_event(config: &ControlConfig, line: &[u8]) -> Result<ControlEvent, Refusal> {
    let wire: Wire = serde_json::from_slice(line).map_err(Refusal::BadMessage)?;
    let event = match wire {
        Wire::RunStarted {
            run_id,
            cgroup,
            labels,
        } => {
            validate_run_id(&run_id).map_err(Refusal::Run)?;
            validate_cgroup_rel(&cgroup).map_err(Refusal::Run)?;
            check_labels(config, &labels)?;
            ControlEvent::RunStarted {
                run_id,
                cgroup,
                labels,
            }
        }
        Wire::RunFinished { run_id } => {
            validate_run_id(&run_id).map_err(Refusal::Run)?;
            ControlEvent::RunFinished { run_id }
        }
    };
    Ok(event)
}

fn check_labels(config: &ControlConfig, labels: &BTreeMap<String, String>) -> Result<(), Refusal> {
    if labels.len() > config.max_labels {
        return Err(Refusal::TooManyLabels(config.max_labels));
    }
    for (k, v) in labels {
        let key_ok = !k.is_empty()
            && k.len() <= config.max_label_key_bytes
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'/'));
        if !key_ok {
            return Err(Refusal::LabelKey {
                key: k.chars().take(64).collect(),
                max: config.max_label_key_bytes,
            });
        }
        if v.len() > config.max_label_value_bytes || v.chars().any(char::is_control) {
            return Err(Refusal::LabelValue {
                key: k.clone(),
                max: config.max_label_value_bytes,
            });
        }
        // The contract's own rule, which the records and the ledger apply too.
        if let Some(what) = wattd_proto::names::label_problem(k, v) {
            return Err(Refusal::Label {
                key: k.clone(),
                what,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_the_agents_own_user_and_the_configured_ones_are_allowed() {
        let own = rustix::process::geteuid().as_raw();
        let mut cfg = ControlConfig::new("/nonexistent/control.sock");
        let peer = |uid, gid| Peer {
            uid,
            gid,
            pid: None,
        };
        assert!(peer_allowed(&cfg, &peer(0, 0)));
        assert!(peer_allowed(&cfg, &peer(own, 4242)));
        // Neither root nor the agent (the agent may be root: pick a uid that is neither).
        let stranger = if own == 54_321 { 54_322 } else { 54_321 };
        assert!(!peer_allowed(&cfg, &peer(stranger, 54_321)));
        cfg.allowed_uids = vec![stranger];
        assert!(peer_allowed(&cfg, &peer(stranger, 1)));
        cfg.allowed_uids.clear();
        cfg.allowed_gids = vec![777];
        assert!(peer_allowed(&cfg, &peer(stranger, 777)));
    }

    #[test]
    fn parse_table() {
        let c = ControlConfig::new("/x");
        let ok = parse_event(
            &c,
            br#"{"type":"run_started","run_id":"r1","cgroup":"a/b","labels":{"team":"x y"}}"#,
        )
        .unwrap();
        assert_eq!(
            ok,
            ControlEvent::RunStarted {
                run_id: "r1".into(),
                cgroup: "a/b".into(),
                labels: [("team".to_owned(), "x y".to_owned())].into(),
            }
        );
        assert_eq!(
            parse_event(&c, br#"{"type":"run_finished","run_id":"r1"}"#).unwrap(),
            ControlEvent::RunFinished {
                run_id: "r1".into()
            }
        );
        let many: String = (0..33)
            .map(|i| format!("\"k{i}\":\"v\""))
            .collect::<Vec<_>>()
            .join(",");
        let many =
            format!(r#"{{"type":"run_started","run_id":"r","cgroup":"a","labels":{{{many}}}}}"#);
        let long_value = format!(
            r#"{{"type":"run_started","run_id":"r","cgroup":"a","labels":{{"k":"{}"}}}}"#,
            "v".repeat(257)
        );
        for (bad, want) in [
            (&b"garbage"[..], "bad message"),
            (b"{}", "bad message"),
            (br#"{"type":"run_exploded","run_id":"r"}"#, "bad message"),
            (br#"{"type":"run_finished"}"#, "bad message"),
            (
                br#"{"type":"run_finished","run_id":"r","extra":1}"#,
                "bad message",
            ),
            (br#"{"type":"run_finished","run_id":".."}"#, "run_id"),
            (br#"{"type":"run_finished","run_id":"a\nb"}"#, "run_id"),
            (
                br#"{"type":"run_started","run_id":"r","cgroup":"../etc"}"#,
                "cgroup",
            ),
            (
                br#"{"type":"run_started","run_id":"r","cgroup":"/abs"}"#,
                "cgroup",
            ),
            (
                br#"{"type":"run_started","run_id":"r","cgroup":"a","labels":{"bad key":"v"}}"#,
                "label key",
            ),
            (
                br#"{"type":"run_started","run_id":"r","cgroup":"a","labels":{"k":"a\u0000"}}"#,
                "label",
            ),
            (many.as_bytes(), "more than 32 labels"),
            (long_value.as_bytes(), "at most 256 bytes"),
            (b"\xff\xfe", "bad message"),
        ] {
            // The reply's text is the wire contract.
            let e = parse_event(&c, bad).unwrap_err().to_string();
            assert!(e.contains(want), "{:?}: {e}", String::from_utf8_lossy(bad));
        }
        // And the variant names the case for the daemon's own use.
        assert!(matches!(
            parse_event(&c, b"garbage"),
            Err(Refusal::BadMessage(_))
        ));
        assert!(matches!(
            parse_event(&c, many.as_bytes()),
            Err(Refusal::TooManyLabels(32))
        ));
        assert!(matches!(
            parse_event(&c, br#"{"type":"run_finished","run_id":".."}"#),
            Err(Refusal::Run(_))
        ));
    }
}
