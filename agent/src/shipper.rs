//! The shipper: streams sealed batches from the spool to the ledger over gRPC with mutual TLS,
//! and reports the ledger's acknowledgements back to the daemon, which moves the spool's ack
//! cursor (and so deletes acknowledged segments).
//!
//! One task on the daemon's runtime. It never touches the [`Spool`](crate::spool::Spool): it
//! reads sealed batches from the segment files with its own [`SpoolReader`], up to the sealed
//! seq the daemon publishes after each fdatasync, and sends acknowledged seqs back on a watch
//! channel. So the sampling loop never waits on the network, and the network never sees a batch
//! that is not durable.
//!
//! Protocol (see `Ledger.Stream` in the proto):
//! - connect (TLS 1.2 minimum: rustls offers 1.2 and 1.3 only; client certificate and key, the
//!   ledger's CA; the files are read again at every connect, so renewed certificates are picked
//!   up without a restart);
//! - first message: a signed heartbeat, whose Ack says how far the ledger already is, so a
//!   reconnect resumes at `max(local ack, ledger ack) + 1` instead of re-sending;
//! - then batches in seq order, at most `window` unacknowledged at a time, paced by a governor
//!   rate limit (a whole fleet replaying a backlog after a ledger outage does not stampede it),
//!   and a signed heartbeat every `heartbeat` so the ledger can tell a quiet node from a lost
//!   tail;
//! - an Ack's `acked_seq` is cumulative and durable on the ledger's side; an Ack beyond what this
//!   node has sealed is refused (logged, counted, never forwarded to the spool);
//! - any error (connect, TLS, stream status, no Ack within `ack_timeout` while batches are in
//!   flight) ends the session; the next one starts after a capped exponential backoff with
//!   jitter, reset by a session that made progress.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use governor::clock::{Clock as _, DefaultClock};
use governor::{Quota, RateLimiter};
use prost::Message as _;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use wattd_proto::v1::ledger_client::LedgerClient;
use wattd_proto::v1::{node_message, Ack, Heartbeat, NodeMessage, SignedBatch, SignedHeartbeat};

use crate::identity::NodeKey;
use crate::spool::{list_segments, SpoolReader};

/// How the shipper talks to the ledger (`[ledger]` in the configuration).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShipperConfig {
    pub endpoint: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Batches sent and not yet acknowledged, at most.
    pub window: usize,
    /// Signed heartbeat period.
    pub heartbeat: Duration,
    /// Batches per second at most (the replay pace after an outage).
    pub max_batches_per_s: NonZeroU32,
    pub backoff_min: Duration,
    pub max_backoff: Duration,
    pub connect_timeout: Duration,
    /// With batches in flight, no Ack for this long ends the session.
    pub ack_timeout: Duration,
    /// Largest message accepted from or sent to the ledger.
    pub max_message_bytes: usize,
    /// On stop, how long the daemon waits for the ledger to acknowledge the last batches
    /// (what is not acknowledged by then is sent at the next start; nothing is lost).
    pub drain: Duration,
}

impl ShipperConfig {
    pub const DEFAULT_WINDOW: usize = 64;
    pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);
    pub const DEFAULT_MAX_BATCHES_PER_S: u32 = 200;
    pub const DEFAULT_BACKOFF_MIN: Duration = Duration::from_millis(200);
    pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(30);

    pub fn new(endpoint: &str, ca: &Path, cert: &Path, key: &Path) -> Self {
        Self {
            endpoint: endpoint.to_owned(),
            ca: ca.to_owned(),
            cert: cert.to_owned(),
            key: key.to_owned(),
            window: Self::DEFAULT_WINDOW,
            heartbeat: Self::DEFAULT_HEARTBEAT,
            max_batches_per_s: NonZeroU32::new(Self::DEFAULT_MAX_BATCHES_PER_S)
                .unwrap_or(NonZeroU32::MIN),
            backoff_min: Self::DEFAULT_BACKOFF_MIN,
            max_backoff: Self::DEFAULT_MAX_BACKOFF,
            connect_timeout: Duration::from_secs(10),
            ack_timeout: Duration::from_secs(30),
            max_message_bytes: 32 << 20,
            drain: Duration::from_secs(3),
        }
    }

    /// `[ledger]` of the configuration: `endpoint`, `ca`, `cert` and `key` are required
    /// together; the tuning keys that are given, over the defaults of [`ShipperConfig::new`].
    /// `None` when any required key is missing or bad (each named).
    pub fn read(
        raw: &crate::schema::raw::Ledger,
        v: &mut crate::schema::Validator<'_>,
    ) -> Option<Self> {
        let endpoint = v.string(&raw.endpoint, "ledger.endpoint");
        let ca = v.string(&raw.ca, "ledger.ca");
        let cert = v.string(&raw.cert, "ledger.cert");
        let key = v.string(&raw.key, "ledger.key");
        let window = v.int(&raw.window, "ledger.window", 1, 4096);
        let heartbeat_s = v.int(&raw.heartbeat_s, "ledger.heartbeat_s", 1, 3600);
        let rate = v.int(
            &raw.max_batches_per_s,
            "ledger.max_batches_per_s",
            1,
            100_000,
        );
        let backoff_max_s = v.int(&raw.backoff_max_s, "ledger.backoff_max_s", 1, 3600);
        let ack_timeout_s = v.int(&raw.ack_timeout_s, "ledger.ack_timeout_s", 1, 3600);
        let drain_s = v.int(&raw.drain_s, "ledger.drain_s", 0, 60);
        if let Some(e) = &endpoint {
            if !e.starts_with("https://") {
                v.problem("ledger.endpoint", "must be an https:// URL");
            }
        }
        let (Some(endpoint), Some(ca), Some(cert), Some(key)) = (endpoint, ca, cert, key) else {
            v.problem("ledger", "needs all of endpoint, ca, cert and key");
            return None;
        };
        let mut l =
            ShipperConfig::new(&endpoint, Path::new(&ca), Path::new(&cert), Path::new(&key));
        if let Some(w) = window {
            l.window = usize::try_from(w).unwrap_or(Self::DEFAULT_WINDOW);
        }
        if let Some(s) = heartbeat_s {
            l.heartbeat = Duration::from_secs(s);
        }
        if let Some(r) = rate
            .and_then(|r| u32::try_from(r).ok())
            .and_then(NonZeroU32::new)
        {
            l.max_batches_per_s = r;
        }
        if let Some(s) = backoff_max_s {
            l.max_backoff = Duration::from_secs(s);
        }
        if let Some(s) = ack_timeout_s {
            l.ack_timeout = Duration::from_secs(s);
        }
        if let Some(s) = drain_s {
            l.drain = Duration::from_secs(s);
        }
        Some(l)
    }
}

/// Problems with the TLS files of `[ledger]`, each naming its key and file: unreadable, not PEM
/// of the expected kind, or a private key that group or others may read. Empty when usable.
/// (`wattd validate` refuses the configuration on any; the daemon logs them and keeps measuring,
/// since the spool holds the batches until the files are fixed.)
pub fn check_tls_files(cfg: &ShipperConfig) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut problems = Vec::new();
    for (key, path, want) in [
        ("ledger.ca", &cfg.ca, "CERTIFICATE"),
        ("ledger.cert", &cfg.cert, "CERTIFICATE"),
        ("ledger.key", &cfg.key, "PRIVATE KEY"),
    ] {
        match std::fs::read_to_string(path) {
            Err(e) => problems.push(format!("{key}: {}: {e}", path.display())),
            Ok(text) => {
                let pem = text.contains("-----BEGIN ") && text.contains(want);
                if !pem {
                    problems.push(format!(
                        "{key}: {}: no PEM block with {want:?} in it",
                        path.display()
                    ));
                }
            }
        }
    }
    if let Ok(meta) = std::fs::metadata(&cfg.key) {
        if meta.permissions().mode() & 0o077 != 0 {
            problems.push(format!(
                "ledger.key: {}: mode {:o} lets group or others read the private key (chmod 600)",
                cfg.key.display(),
                meta.permissions().mode() & 0o777
            ));
        }
    }
    problems
}

/// What the daemon publishes after every commit.
#[derive(Clone, Debug, Default)]
pub struct ShipState {
    /// Every batch up to here is durable in the spool.
    pub sealed_seq: u64,
    /// A heartbeat signed by the node's current key, saying `sealed_seq`.
    pub heartbeat: Option<SignedHeartbeat>,
    /// The node's current key: the shipper signs loss statements with it.
    pub signer: Option<Arc<NodeKey>>,
}

/// A signed heartbeat announcing `sealed_seq`.
pub fn signed_heartbeat(key: &NodeKey, sealed_seq: u64, now_unix_ns: i64) -> SignedHeartbeat {
    let hb = Heartbeat {
        node_id: key.node_id().to_owned(),
        sent_unix_ns: now_unix_ns,
        last_sealed_seq: sealed_seq,
        key_epoch: key.epoch(),
    };
    let bytes = hb.encode_to_vec();
    SignedHeartbeat {
        signature: key.sign(&bytes).to_vec(),
        key_id: key.key_id().to_vec(),
        heartbeat_bytes: bytes,
    }
}

/// The shipper's counters, shared with the metrics endpoint (read once per tick).
#[derive(Debug, Default)]
pub struct ShipperStats {
    pub connected: AtomicBool,
    pub sessions_total: AtomicU64,
    pub batches_sent_total: AtomicU64,
    pub heartbeats_sent_total: AtomicU64,
    pub acks_total: AtomicU64,
    pub acked_seq: AtomicU64,
    /// Acks beyond the sealed seq, refused.
    pub bad_acks_total: AtomicU64,
    /// The ledger's last reported hole (first missing seq), 0 if none.
    pub ledger_missing_from: AtomicU64,
    /// Sessions that opened with the ledger acknowledging less than before (a restore).
    pub rewinds_total: AtomicU64,
    /// Batches such a ledger lacks that the spool no longer held (so could not re-send).
    pub rewind_unheld_batches_total: AtomicU64,
    /// Loss statements sent, by reason (a statement the ledger did not take is sent again).
    pub loss_statements_damaged_total: AtomicU64,
    pub loss_statements_not_retained_total: AtomicU64,
    /// Batches declared lost, by reason: distinct seqs, each counted once.
    pub lost_batches_damaged_total: AtomicU64,
    pub lost_batches_not_retained_total: AtomicU64,
    /// Ended sessions by reason (`connect`, `tls_files`, `status_<code>`, `ack_timeout`, ...).
    pub session_errors: Mutex<std::collections::BTreeMap<String, u64>>,
}

impl ShipperStats {
    fn error(&self, reason: &str) {
        if let Ok(mut m) = self.session_errors.lock() {
            *m.entry(reason.to_owned()).or_default() += 1;
        }
    }

    pub fn session_errors(&self) -> Vec<(String, u64)> {
        self.session_errors
            .lock()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), *v)).collect())
            .unwrap_or_default()
    }
}

/// Why a session ended.
#[derive(Debug)]
struct SessionEnd {
    reason: String,
    error: anyhow::Error,
    progressed: bool,
    /// Ended to pick up a renewed client certificate: reconnect at once.
    renew: bool,
}

fn end(reason: impl Into<String>, progressed: bool, error: anyhow::Error) -> SessionEnd {
    SessionEnd {
        reason: reason.into(),
        error,
        progressed,
        renew: false,
    }
}

/// A delay for attempt `n` (0-based): `min * 2^n` capped at `max`, then jittered uniformly
/// into its upper half, so a fleet that lost the ledger at once does not come back at once.
pub fn backoff_delay(min: Duration, max: Duration, attempt: u32, random: u64) -> Duration {
    let base = min
        .saturating_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX))
        .min(max);
    let half = base / 2;
    let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
    let jitter = if nanos == 0 { 0 } else { random % (nanos + 1) };
    half + Duration::from_nanos(jitter)
}

fn unix_now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // Jitter only: without the OS generator, the fixed value still backs off, just in step.
    let _ = getrandom::getrandom(&mut b);
    u64::from_le_bytes(b)
}

/// When a session on a client certificate valid from `not_before` to `not_after` (Unix seconds)
/// should end so the next connect reads a renewed one: a fifth of its lifetime before it
/// expires, at least a second and at most five minutes before.
pub fn renew_at(not_before: i64, not_after: i64) -> i64 {
    let lifetime = not_after.saturating_sub(not_before).max(0);
    not_after - (lifetime / 5).clamp(1, 300)
}

/// The validity (not before, not after; Unix seconds) of the first certificate in a PEM file.
pub fn cert_validity(pem: &[u8]) -> Option<(i64, i64)> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem).ok()?;
    let cert = pem.parse_x509().ok()?;
    let v = cert.validity();
    Some((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// A connected client, and when its session should end for a renewed client certificate
/// (None: no renewal due, or none possible before the certificate expires).
async fn connect(
    cfg: &ShipperConfig,
) -> Result<
    (
        LedgerClient<tonic::transport::Channel>,
        Option<tokio::time::Instant>,
    ),
    SessionEnd,
> {
    let read = |p: &Path, what: &str| {
        std::fs::read(p).with_context(|| format!("reading the ledger {what} {}", p.display()))
    };
    let files = (|| -> anyhow::Result<_> {
        Ok((
            read(&cfg.ca, "CA certificate (ledger.ca)")?,
            read(&cfg.cert, "client certificate (ledger.cert)")?,
            read(&cfg.key, "client key (ledger.key)")?,
        ))
    })();
    let (ca, cert, key) = files.map_err(|e| end("tls_files", false, e))?;
    let renew = cert_validity(&cert).and_then(|(from, until)| {
        let now = unix_now_ns() / 1_000_000_000;
        let at = renew_at(from, until);
        if at <= now {
            tracing::warn!(
                cert = %cfg.cert.display(),
                expires_unix_s = until,
                "the client certificate on disk expires soon (or has expired) and no renewed \
                 one is there: renew it (the ledger refuses an expired certificate)"
            );
            return None;
        }
        let wait = Duration::from_secs(u64::try_from(at - now).unwrap_or(0));
        Some(tokio::time::Instant::now() + wait)
    });
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key));
    let endpoint = Endpoint::from_shared(cfg.endpoint.clone())
        .and_then(|e| e.tls_config(tls))
        .with_context(|| format!("ledger.endpoint {}", cfg.endpoint))
        .map_err(|e| end("endpoint", false, e))?
        .connect_timeout(cfg.connect_timeout)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    let channel = endpoint.connect().await.map_err(|e| {
        end(
            "connect",
            false,
            anyhow::Error::new(e).context(format!("connecting to {}", cfg.endpoint)),
        )
    })?;
    Ok((
        LedgerClient::new(channel)
            .max_decoding_message_size(cfg.max_message_bytes)
            .max_encoding_message_size(cfg.max_message_bytes),
        renew,
    ))
}

/// The shipper task. Ends when `shutdown` turns true.
#[derive(Debug)]
pub struct Shipper {
    cfg: ShipperConfig,
    dir: PathBuf,
    state: watch::Receiver<ShipState>,
    acks: watch::Sender<u64>,
    stats: Arc<ShipperStats>,
    /// Highest seq the ledger acknowledged (or the spool's cursor at start).
    acked: u64,
    /// Ranges already declared lost (bounded), so the counters count each once.
    declared: std::collections::BTreeSet<(u64, u64)>,
}

impl Shipper {
    /// `acked_seq`: the spool's acknowledged cursor; `acks` receives every higher Ack.
    pub fn new(
        cfg: ShipperConfig,
        spool_dir: &Path,
        acked_seq: u64,
        state: watch::Receiver<ShipState>,
        acks: watch::Sender<u64>,
        stats: Arc<ShipperStats>,
    ) -> Self {
        stats.acked_seq.store(acked_seq, Ordering::Relaxed);
        Self {
            cfg,
            dir: spool_dir.to_owned(),
            state,
            acks,
            stats,
            acked: acked_seq,
            declared: std::collections::BTreeSet::new(),
        }
    }

    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        // Nothing to say before the daemon sealed its first batch (or signed a heartbeat).
        tokio::select! {
            _ = self.state.wait_for(|s| s.heartbeat.is_some()) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let limiter = RateLimiter::direct(
            Quota::per_second(self.cfg.max_batches_per_s).allow_burst(
                NonZeroU32::new(u32::try_from(self.cfg.window).unwrap_or(u32::MAX))
                    .unwrap_or(NonZeroU32::MIN),
            ),
        );
        let mut attempt: u32 = 0;
        loop {
            self.stats.sessions_total.fetch_add(1, Ordering::Relaxed);
            let result = tokio::select! {
                r = self.session(&limiter) => r,
                _ = shutdown.wait_for(|s| *s) => {
                    self.stats.connected.store(false, Ordering::Relaxed);
                    return;
                }
            };
            self.stats.connected.store(false, Ordering::Relaxed);
            let e = match result {
                Ok(()) => return,
                Err(e) => e,
            };
            self.stats.error(&e.reason);
            if e.renew {
                tracing::info!(acked_seq = self.acked, "reconnecting with the client certificate on disk before the current one expires");
                attempt = 0;
                continue;
            }
            if e.progressed {
                attempt = 0;
            }
            let delay = backoff_delay(
                self.cfg.backoff_min,
                self.cfg.max_backoff,
                attempt,
                random_u64(),
            );
            attempt = attempt.saturating_add(1);
            tracing::warn!(reason = %e.reason, error = format!("{:#}", e.error), retry_in_ms = delay.as_millis() as u64,
                acked_seq = self.acked, "ledger session ended");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }

    fn heartbeat(&self) -> Option<NodeMessage> {
        self.state.borrow().heartbeat.clone().map(|h| NodeMessage {
            kind: Some(node_message::Kind::SignedHeartbeat(h)),
        })
    }

    /// Takes an Ack: cumulative, never backwards, never beyond what is sealed.
    fn take_ack(&mut self, ack: &Ack) -> Result<(), anyhow::Error> {
        self.stats.acks_total.fetch_add(1, Ordering::Relaxed);
        self.stats
            .ledger_missing_from
            .store(ack.missing_from_seq, Ordering::Relaxed);
        let sealed = self.state.borrow().sealed_seq;
        if ack.acked_seq > sealed {
            self.stats.bad_acks_total.fetch_add(1, Ordering::Relaxed);
            anyhow::bail!(
                "the ledger acknowledged seq {} but this node has sealed only up to {sealed}; ignoring it",
                ack.acked_seq
            );
        }
        if ack.acked_seq > self.acked {
            self.acked = ack.acked_seq;
            self.stats.acked_seq.store(self.acked, Ordering::Relaxed);
            self.acks.send_replace(self.acked);
        }
        Ok(())
    }

    /// The ledger acknowledges less than it did (restored from a backup): resume right after
    /// what it holds, as far back as the spool still holds batches (the daemon moves the
    /// spool's cursor back to the same place). What the spool no longer holds cannot be sent:
    /// counted and logged, and the ledger keeps waiting above that hole.
    fn rewind(&mut self, ledger_acked: u64) {
        let held_from = list_segments(&self.dir)
            .ok()
            .and_then(|segs| segs.first().map(|(first, _)| *first))
            .unwrap_or(self.acked + 1);
        let resume = (ledger_acked + 1).max(held_from.min(self.acked + 1));
        self.stats.rewinds_total.fetch_add(1, Ordering::Relaxed);
        if resume > ledger_acked + 1 {
            let lost = resume - (ledger_acked + 1);
            self.stats
                .rewind_unheld_batches_total
                .fetch_add(lost, Ordering::Relaxed);
            tracing::error!(
                ledger_acked,
                node_acked = self.acked,
                first_held = held_from,
                "the ledger was restored to before what this spool still holds: seqs {} to {} \
                 cannot be sent again",
                ledger_acked + 1,
                resume - 1
            );
        } else {
            tracing::warn!(
                ledger_acked,
                node_acked = self.acked,
                "the ledger holds less than it acknowledged (restored from a backup?): re-sending \
                 from seq {resume}",
            );
        }
        // The cursor follows the ledger; the reader starts right after what it holds, and the
        // range the spool no longer holds is declared in a signed loss statement when the
        // reader steps over it.
        self.acked = ledger_acked;
        self.stats.acked_seq.store(self.acked, Ordering::Relaxed);
        self.acks.send_replace(self.acked);
    }

    /// A signed statement that `first..=batch.seq - 1` will never be sent: the reader stepped
    /// over them (damaged records, or a spool that no longer holds them).
    fn loss_statement(
        &mut self,
        first: u64,
        next: &crate::batch::StoredBatch,
    ) -> Result<NodeMessage, anyhow::Error> {
        use wattd_proto::v1::LossReason;
        let (_, header) = crate::batch::decode_header(&next.bytes)
            .map_err(|e| anyhow::anyhow!("batch {}: {e}", next.seq))?;
        let signer = self
            .state
            .borrow()
            .signer
            .clone()
            .ok_or_else(|| anyhow::anyhow!("no node key to sign a loss statement with"))?;
        let first_held = list_segments(&self.dir)
            .ok()
            .and_then(|segs| segs.first().map(|(f, _)| *f))
            .unwrap_or(first);
        let last = next.seq - 1;
        let (reason, detail) = if first < first_held {
            (
                LossReason::NotRetained,
                format!(
                    "the ledger asked from seq {first}; this spool retains batches from seq {first_held} on (acknowledged batches are kept for [spool] retain_acked_s)"
                ),
            )
        } else {
            (
                LossReason::Damaged,
                format!(
                    "sealed record(s) {first}..={last} damaged in the spool (checksum or decoding failed); the next intact batch {} chains to {}",
                    next.seq,
                    crate::durable::hex(&next.prev_hash)
                ),
            )
        };
        // Every rotation announced at or after `first`: a ledger that never saw the announcing
        // batch (lost in the range, or not delivered yet) learns the keys from these.
        let rotations = crate::identity::rotation_certs(&self.dir)
            .into_iter()
            .filter(|(r, _)| r.effective_seq > first)
            .map(|(_, cert)| cert)
            .collect();
        let loss = wattd_records::loss::Loss {
            first_seq: first,
            last_seq: last,
            last_hash: next.prev_hash,
            reason,
            next_key_epoch: header.key_epoch,
            next_key_id: header.key_id,
            detail,
            rotations,
        };
        let n = last - first + 1;
        // Each distinct range is counted once, however often it is sent again.
        let fresh = self.declared.insert((first, last));
        if self.declared.len() > 1024 {
            self.declared.pop_first();
        }
        let (statements, batches) = match reason {
            LossReason::NotRetained => (
                &self.stats.loss_statements_not_retained_total,
                &self.stats.lost_batches_not_retained_total,
            ),
            _ => (
                &self.stats.loss_statements_damaged_total,
                &self.stats.lost_batches_damaged_total,
            ),
        };
        statements.fetch_add(1, Ordering::Relaxed);
        if fresh {
            batches.fetch_add(n, Ordering::Relaxed);
        }
        tracing::error!(first, last, reason = wattd_records::loss::reason_name(reason as i32), "declaring batches lost to the ledger (signed statement); their energy is known from the running totals around them");
        Ok(NodeMessage {
            kind: Some(node_message::Kind::Loss(wattd_records::loss::sign_loss(
                &signer,
                &loss,
                unix_now_ns(),
            ))),
        })
    }

    async fn session(
        &mut self,
        limiter: &RateLimiter<
            governor::state::NotKeyed,
            governor::state::InMemoryState,
            DefaultClock,
        >,
    ) -> Result<(), SessionEnd> {
        let (mut client, renew) = connect(&self.cfg).await?;
        let (tx, rx) = mpsc::channel::<NodeMessage>(self.cfg.window + 4);
        // The heartbeat goes first: its Ack says where the ledger stands.
        if let Some(hb) = self.heartbeat() {
            let _ = tx.try_send(hb);
            self.stats
                .heartbeats_sent_total
                .fetch_add(1, Ordering::Relaxed);
        }
        let response = client
            .stream(ReceiverStream::new(rx))
            .await
            .map_err(|s| status_end(&s, false))?;
        let mut inbound = response.into_inner();
        self.stats.connected.store(true, Ordering::Relaxed);
        let first = tokio::time::timeout(self.cfg.ack_timeout, inbound.message())
            .await
            .map_err(|_| {
                end(
                    "ack_timeout",
                    false,
                    anyhow::anyhow!(
                        "no Ack to the opening heartbeat within {:?}",
                        self.cfg.ack_timeout
                    ),
                )
            })?
            .map_err(|s| status_end(&s, false))?
            .ok_or_else(|| {
                end(
                    "closed",
                    false,
                    anyhow::anyhow!("the ledger closed the stream before acknowledging"),
                )
            })?;
        if let Err(e) = self.take_ack(&first) {
            tracing::error!(error = %e, "ledger acknowledgement refused");
        }
        if first.acked_seq < self.acked {
            self.rewind(first.acked_seq);
        }
        tracing::info!(endpoint = %self.cfg.endpoint, ledger_acked = first.acked_seq, resume_at = self.acked + 1, "ledger session open");
        // Progress (which resets the reconnect backoff) is the ledger storing something new: a
        // ledger that accepts the opening heartbeat and then refuses every batch must not be
        // hammered with a reconnect every few hundred milliseconds.
        let acked_at_open = self.acked;
        let mut reader = SpoolReader::new(&self.dir, self.acked + 1);
        // Since when batches have been waiting for an Ack (None: nothing in flight).
        let mut waiting_since: Option<tokio::time::Instant> = None;
        let mut heartbeat = tokio::time::interval(self.cfg.heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        heartbeat.tick().await; // the first tick is immediate; the opening heartbeat was sent
        let mut rewound_for: u64 = 0;
        let mut pace: Option<tokio::time::Instant> = None;
        loop {
            // Send what the window, the pace and the spool allow.
            let sealed = self.state.borrow().sealed_seq;
            while pace.is_none()
                && reader.next_seq() <= sealed
                && reader.next_seq().saturating_sub(self.acked + 1) < self.cfg.window as u64
            {
                if let Err(not_until) = limiter.check() {
                    let wait = not_until.wait_time_from(DefaultClock::default().now());
                    pace = Some(tokio::time::Instant::now() + wait);
                    break;
                }
                let expected = reader.next_seq();
                let batch = match reader.next(sealed) {
                    Ok(Some(b)) => b,
                    Ok(None) => break,
                    Err(e) => {
                        return Err(end(
                            "spool_read",
                            self.acked > acked_at_open,
                            anyhow::Error::new(e).context("reading the spool to ship"),
                        ))
                    }
                };
                if batch.seq > expected {
                    let statement = self
                        .loss_statement(expected, &batch)
                        .map_err(|e| end("loss_statement", self.acked > acked_at_open, e))?;
                    if tx.send(statement).await.is_err() {
                        return Err(end(
                            "closed",
                            self.acked > acked_at_open,
                            anyhow::anyhow!("the request stream closed"),
                        ));
                    }
                }
                let signed = match SignedBatch::decode(batch.bytes.as_slice()) {
                    Ok(s) => s,
                    // The reader already decoded it; cannot happen short of memory corruption.
                    Err(e) => {
                        return Err(end(
                            "spool_read",
                            self.acked > acked_at_open,
                            anyhow::Error::new(e),
                        ))
                    }
                };
                if tx
                    .send(NodeMessage {
                        kind: Some(node_message::Kind::Batch(signed)),
                    })
                    .await
                    .is_err()
                {
                    return Err(end(
                        "closed",
                        self.acked > acked_at_open,
                        anyhow::anyhow!("the request stream closed"),
                    ));
                }
                self.stats
                    .batches_sent_total
                    .fetch_add(1, Ordering::Relaxed);
            }
            let in_flight = reader.next_seq().saturating_sub(self.acked + 1);
            if in_flight == 0 {
                waiting_since = None;
            } else if waiting_since.is_none() {
                waiting_since = Some(tokio::time::Instant::now());
            }
            let ack_deadline = waiting_since.map(|t| t + self.cfg.ack_timeout);
            tokio::select! {
                msg = inbound.message() => {
                    let ack = msg
                        .map_err(|s| status_end(&s, self.acked > acked_at_open))?
                        .ok_or_else(|| end("closed", self.acked > acked_at_open, anyhow::anyhow!("the ledger closed the stream")))?;
                    waiting_since = None;
                    if let Err(e) = self.take_ack(&ack) {
                        tracing::error!(error = %e, "ledger acknowledgement refused");
                    }
                    // A hole the ledger is waiting for: send it again, once per hole (a seq the
                    // spool lost to damage cannot be sent; the ledger keeps reporting it).
                    let missing = ack.missing_from_seq;
                    if missing > self.acked && missing < reader.next_seq() && missing != rewound_for {
                        rewound_for = missing;
                        tracing::warn!(missing, "the ledger reports a hole; re-sending from it");
                        reader.rewind(missing);
                    }
                }
                _ = self.state.changed() => {}
                _ = heartbeat.tick() => {
                    // Only once every batch it announces has been sent: a heartbeat ahead of the
                    // batches would look like a lost tail to the ledger. (While a backlog is
                    // replayed, the batches themselves say the node is alive.) Never waits: a
                    // full queue means the ledger is not reading, and the ack deadline must
                    // still run.
                    let announces = self.state.borrow().sealed_seq;
                    if reader.next_seq() > announces {
                        if let Some(hb) = self.heartbeat() {
                            match tx.try_send(hb) {
                                Ok(()) => {
                                    self.stats.heartbeats_sent_total.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(mpsc::error::TrySendError::Full(_)) => {}
                                Err(mpsc::error::TrySendError::Closed(_)) => {
                                    return Err(end("closed", self.acked > acked_at_open, anyhow::anyhow!("the request stream closed")));
                                }
                            }
                        }
                    }
                }
                _ = async { match pace { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {
                    pace = None;
                }
                _ = async { match renew { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {
                    // Reconnect before the client certificate expires: the next connect reads
                    // the certificate and key on disk again (renewed by an outside tool).
                    return Err(SessionEnd {
                        reason: "certificate_renewal".into(),
                        error: anyhow::anyhow!("the client certificate is due for renewal"),
                        progressed: true,
                        renew: true,
                    });
                }
                _ = async { match ack_deadline { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {
                    return Err(end("ack_timeout", self.acked > acked_at_open, anyhow::anyhow!(
                        "{in_flight} batch(es) unacknowledged for {:?}", self.cfg.ack_timeout)));
                }
            }
        }
    }
}

fn status_end(s: &tonic::Status, progressed: bool) -> SessionEnd {
    let code = format!("{:?}", s.code()).to_lowercase();
    end(
        format!("status_{code}"),
        progressed,
        anyhow::anyhow!("ledger status {:?}: {}", s.code(), s.message()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_file_problems_name_the_key_and_file() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca.pem");
        let cert = dir.path().join("node.pem");
        let key = dir.path().join("node.key");
        std::fs::write(
            &ca,
            "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n",
        )
        .expect("w");
        std::fs::write(&cert, "not pem").expect("w");
        std::fs::write(
            &key,
            "-----BEGIN PRIVATE KEY-----\nx\n-----END PRIVATE KEY-----\n",
        )
        .expect("w");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let cfg = ShipperConfig::new("https://l:1", &ca, &cert, &key);
        let p = check_tls_files(&cfg);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(
            p[0].starts_with("ledger.cert: ") && p[0].contains("node.pem"),
            "{p:?}"
        );
        assert!(
            p[1].starts_with("ledger.key: ") && p[1].contains("644"),
            "{p:?}"
        );
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        std::fs::write(
            &cert,
            "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n",
        )
        .expect("w");
        assert!(check_tls_files(&cfg).is_empty());
        std::fs::remove_file(&ca).expect("rm");
        let p = check_tls_files(&cfg);
        assert!(p.len() == 1 && p[0].starts_with("ledger.ca: "), "{p:?}");
    }

    #[test]
    fn renewal_is_a_fifth_of_the_lifetime_before_expiry_within_bounds() {
        assert_eq!(
            renew_at(0, 600),
            480,
            "10-minute certificate: 2 minutes before"
        );
        assert_eq!(
            renew_at(0, 86_400),
            86_100,
            "a day: at most 5 minutes before"
        );
        assert_eq!(renew_at(0, 3), 2, "at least a second before");
        assert_eq!(
            renew_at(10, 5),
            4,
            "a certificate that ends before it starts"
        );
        let dir = tempfile::tempdir().unwrap();
        let ca = wattd_tests::tls::TestCa::new(dir.path(), "t");
        let c = ca.client("n");
        let (from, until) = cert_validity(&std::fs::read(&c.cert).unwrap()).unwrap();
        assert!(until > from, "{from} {until}");
        assert_eq!(cert_validity(b"not a certificate"), None);
    }

    #[test]
    fn backoff_doubles_caps_and_jitters_into_the_upper_half() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        for attempt in 0..40 {
            let base = (min * 2u32.saturating_pow(attempt.min(20))).min(max);
            for r in [0, 1, u64::MAX / 3, u64::MAX] {
                let d = backoff_delay(min, max, attempt, r);
                assert!(
                    d >= base / 2 && d <= base,
                    "attempt {attempt}: {d:?} vs {base:?}"
                );
            }
        }
        assert_eq!(backoff_delay(min, max, 0, 0), Duration::from_millis(50));
        assert_eq!(backoff_delay(min, max, 30, 0), Duration::from_millis(2500));
    }

    #[test]
    fn heartbeat_is_signed_over_its_exact_bytes() {
        let key = NodeKey::from_seed("n1", 3, [7; 32]);
        let hb = signed_heartbeat(&key, 42, 1_000);
        let decoded = Heartbeat::decode(hb.heartbeat_bytes.as_slice()).expect("decodes");
        assert_eq!(decoded.last_sealed_seq, 42);
        assert_eq!(decoded.key_epoch, 3);
        assert_eq!(decoded.node_id, "n1");
        assert_eq!(hb.key_id, key.key_id().to_vec());
        let sig = ed25519_dalek::Signature::from_slice(&hb.signature).expect("64 bytes");
        use ed25519_dalek::Verifier as _;
        assert!(key
            .verifying_key()
            .verify(&hb.heartbeat_bytes, &sig)
            .is_ok());
        let mut forged = hb.heartbeat_bytes.clone();
        let last = forged.len() - 1;
        forged[last] ^= 1;
        assert!(key.verifying_key().verify(&forged, &sig).is_err());
    }
}
