//! The tonic `Ledger` service: authenticates a stream by its client certificate, applies the
//! per-node limits (open streams, batch rate), and runs a [`Session`] over the stream, one Ack
//! per message; a [`Rejection`] ends the stream with its status.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use governor::{Quota, RateLimiter};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use wattd_proto::v1::ledger_server::Ledger;
use wattd_proto::v1::{Ack, NodeMessage};

use crate::enrol::{check_node_id, Enrolment};
use crate::metrics::Metrics;
use crate::server::{ConnRegistry, SharedRevocations, StreamActivity};
use crate::session::{Session, SessionLimits};
use crate::store::Store;
use crate::Rejection;

/// Per-node limits applied by the service.
#[derive(Clone, Copy, Debug)]
pub struct ServiceLimits {
    pub session: SessionLimits,
    /// Streams one node may have open on this process at once.
    pub streams_per_node: usize,
    /// Sustained messages (batches and heartbeats) per second per node, bursts of the same
    /// size; excess is delayed, not refused. None = unlimited.
    pub node_batches_per_s: Option<NonZeroU32>,
}

impl Default for ServiceLimits {
    fn default() -> Self {
        Self {
            session: SessionLimits::default(),
            streams_per_node: 2,
            node_batches_per_s: NonZeroU32::new(1000),
        }
    }
}

type NodeRateLimiter = RateLimiter<
    String,
    governor::state::keyed::HashMapStateStore<String>,
    governor::clock::DefaultClock,
>;

/// What decides who may stream, shared with the reloads that change it: the enrolment, a
/// counter bumped at every reload (open streams re-check themselves), and the CRLs' revoked
/// certificates.
#[derive(Debug)]
pub struct Trust {
    pub enrolment: Arc<RwLock<Arc<Enrolment>>>,
    pub enrolment_changed: watch::Receiver<u64>,
    pub revocations: SharedRevocations,
}

/// The service state shared by every stream.
pub struct LedgerService<S: Store> {
    store: Arc<S>,
    enrolment: Arc<RwLock<Arc<Enrolment>>>,
    enrolment_changed: watch::Receiver<u64>,
    revocations: SharedRevocations,
    connections: ConnRegistry,
    metrics: Arc<Metrics>,
    limits: ServiceLimits,
    open_streams: Arc<Mutex<HashMap<String, usize>>>,
    rate: Option<Arc<NodeRateLimiter>>,
    shutdown: watch::Receiver<bool>,
}

impl<S: Store> std::fmt::Debug for LedgerService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerService")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl<S: Store> LedgerService<S> {
    pub fn new(
        store: Arc<S>,
        trust: Trust,
        connections: ConnRegistry,
        metrics: Arc<Metrics>,
        limits: ServiceLimits,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let Trust {
            enrolment,
            enrolment_changed,
            revocations,
        } = trust;
        let rate = limits
            .node_batches_per_s
            .map(|n| Arc::new(RateLimiter::hashmap(Quota::per_second(n))));
        Self {
            store,
            enrolment,
            enrolment_changed,
            revocations,
            connections,
            metrics,
            limits,
            open_streams: Arc::new(Mutex::new(HashMap::new())),
            rate,
            shutdown,
        }
    }

    fn reject(&self, r: &Rejection) -> Status {
        self.metrics.reject(r.reason());
        tracing::warn!(reason = r.reason().as_str(), error = %r, "refused");
        r.to_status()
    }
}

/// The node id of the peer: the subject CommonName of its (verified) client certificate.
pub fn peer_node_id<T>(req: &Request<T>) -> Result<String, Rejection> {
    let certs = req
        .peer_certs()
        .ok_or_else(|| Rejection::NoNodeId("no client certificate on the connection".into()))?;
    let leaf = certs
        .first()
        .ok_or_else(|| Rejection::NoNodeId("empty client certificate chain".into()))?;
    cert_common_name(leaf.as_ref())
}

/// The single subject CN of a DER certificate.
pub fn cert_common_name(der: &[u8]) -> Result<String, Rejection> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| Rejection::NoNodeId(format!("certificate does not parse: {e}")))?;
    let mut cns = cert.subject().iter_common_name();
    let cn = cns
        .next()
        .ok_or_else(|| Rejection::NoNodeId("certificate subject has no CN".into()))?;
    if cns.next().is_some() {
        return Err(Rejection::NoNodeId(
            "certificate subject has several CNs".into(),
        ));
    }
    let cn = cn
        .as_str()
        .map_err(|e| Rejection::NoNodeId(format!("certificate CN is not a string: {e}")))?;
    check_node_id(cn).map_err(|e| Rejection::NoNodeId(e.to_string()))?;
    Ok(cn.to_owned())
}

/// Releases a node's stream slot when the stream ends, however it ends.
struct StreamSlot {
    node: String,
    open: Arc<Mutex<HashMap<String, usize>>>,
    metrics: Arc<Metrics>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.node) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.node);
            }
        }
        self.metrics.dec(&self.metrics.streams_open);
    }
}

#[tonic::async_trait]
impl<S: Store> Ledger for LedgerService<S> {
    type StreamStream = ReceiverStream<Result<Ack, Status>>;

    async fn stream(
        &self,
        request: Request<Streaming<NodeMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let peer = request.remote_addr();
        let node = peer_node_id(&request).map_err(|r| self.reject(&r))?;
        // Seen before the enrolment is read: a reload from here on is checked by the worker.
        let mut enrolment_changed = self.enrolment_changed.clone();
        enrolment_changed.mark_unchanged();
        let leaf = request
            .peer_certs()
            .and_then(|c| c.first().map(|c| c.as_ref().to_vec()))
            .unwrap_or_default();
        // The handshake checked the CRLs and the validity of its time; a CRL reloaded since
        // may revoke the certificate, and it may have expired on a connection kept open.
        if let Some(r) = revoked_cert(&self.revocations, &node, &leaf) {
            return Err(self.reject(&r));
        }
        let not_after = cert_not_after(&leaf);
        if let Some(not_after) = not_after {
            if not_after <= crate::query::unix_now_ns() / 1_000_000_000 {
                return Err(self.reject(&Rejection::CertificateExpired { node, not_after }));
            }
        }
        let (enrolled, declared, trust) = {
            let e = self.enrolment.read().unwrap_or_else(|p| p.into_inner());
            (
                e.node(&node).cloned(),
                e.declared(&node),
                node_trust(&e, &node),
            )
        };
        let Some(enrolled) = enrolled else {
            return Err(self.reject(&Rejection::Unenrolled { node }));
        };
        let slot = {
            let mut open = self.open_streams.lock().unwrap_or_else(|p| p.into_inner());
            let n = open.entry(node.clone()).or_insert(0);
            if *n >= self.limits.streams_per_node {
                let limit = self.limits.streams_per_node;
                drop(open);
                return Err(self.reject(&Rejection::StreamsLimit { node, limit }));
            }
            *n += 1;
            self.metrics.inc(&self.metrics.streams);
            self.metrics.inc(&self.metrics.streams_open);
            StreamSlot {
                node: node.clone(),
                open: Arc::clone(&self.open_streams),
                metrics: Arc::clone(&self.metrics),
            }
        };
        let session = Session::open(
            &node,
            &enrolled,
            &declared,
            &trust
                .as_ref()
                .map(|t| t.revoked.clone())
                .unwrap_or_default(),
            Arc::clone(&self.store),
            Arc::clone(&self.metrics),
            self.limits.session,
        )
        .await
        .map_err(|r| self.reject(&r))?;
        tracing::info!(node = %node, acked = session.acked_seq(), "stream opened");
        // The connection is not idle while this accepted stream lives (a refused one does not
        // count: it must not keep a connection open).
        let activity = StreamActivity::start(&self.connections, peer);
        let (tx, rx) = mpsc::channel(16);
        let inbound = request.into_inner();
        let worker = StreamWorker {
            session,
            leaf,
            not_after,
            revocations: Arc::clone(&self.revocations),
            trust,
            enrolment: Arc::clone(&self.enrolment),
            enrolment_changed,
            metrics: Arc::clone(&self.metrics),
            rate: self.rate.clone(),
            shutdown: self.shutdown.clone(),
            _slot: slot,
            _activity: activity,
        };
        tokio::spawn(worker.run(inbound, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// What a node's enrolment says of its keys, as an open stream compares it at a reload: its
/// enrolled keys (epoch, key id) and its revoked epochs. `None`: not enrolled.
#[derive(Clone, Debug, PartialEq, Eq)]
struct NodeTrust {
    keys: Vec<(u32, wattd_records::identity::KeyId)>,
    revoked: std::collections::BTreeSet<u32>,
    /// Its declared limits: a stream judged by old limits ends, and the node reconnects
    /// under the new ones.
    declared: crate::plausible::Declared,
}

fn node_trust(e: &Enrolment, node: &str) -> Option<NodeTrust> {
    e.node(node).map(|keys| NodeTrust {
        keys: keys.iter().map(|(e, k)| (*e, k.key_id)).collect(),
        revoked: e.revoked_epochs(node),
        declared: e.declared(node),
    })
}

/// A DER certificate's notAfter, in Unix seconds.
fn cert_not_after(der: &[u8]) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// `Revoked` if a loaded CRL revokes the client certificate `leaf` of `node`.
fn revoked_cert(revocations: &SharedRevocations, node: &str, leaf: &[u8]) -> Option<Rejection> {
    let r = Arc::clone(&revocations.read().unwrap_or_else(|p| p.into_inner()));
    r.revokes(leaf).map(|serial| Rejection::Revoked {
        node: node.to_owned(),
        detail: format!("its client certificate (serial {serial}) is revoked by the CRL"),
    })
}

struct StreamWorker<S: Store> {
    session: Session<S>,
    /// The stream's client certificate (DER), checked against the CRLs at every reload.
    leaf: Vec<u8>,
    /// Its notAfter (Unix seconds): the stream ends then.
    not_after: Option<i64>,
    revocations: SharedRevocations,
    /// The node's enrolled keys when the stream opened.
    /// The node's enrolled keys and revoked epochs when the stream opened.
    trust: Option<NodeTrust>,
    enrolment: Arc<RwLock<Arc<Enrolment>>>,
    enrolment_changed: watch::Receiver<u64>,
    metrics: Arc<Metrics>,
    rate: Option<Arc<NodeRateLimiter>>,
    shutdown: watch::Receiver<bool>,
    _slot: StreamSlot,
    _activity: Option<StreamActivity>,
}

impl<S: Store> StreamWorker<S> {
    fn reject(&self, r: &Rejection) -> Status {
        self.metrics.reject(r.reason());
        tracing::warn!(node = %self.session.node_id(), reason = r.reason().as_str(), error = %r, "refused");
        r.to_status()
    }

    async fn run(
        mut self,
        mut inbound: Streaming<NodeMessage>,
        tx: mpsc::Sender<Result<Ack, Status>>,
    ) {
        let node = self.session.node_id().to_owned();
        let mut shutdown = self.shutdown.clone();
        // A credential is short-lived only if it stops working: the stream ends when its client
        // certificate expires (the handshake checked it once; the node reconnects with a
        // renewed one, which it does before expiry on its own).
        let not_after = self.not_after;
        let expires = not_after.map(|t| {
            let left = t.saturating_sub(crate::query::unix_now_ns() / 1_000_000_000);
            tokio::time::Instant::now() + Duration::from_secs(u64::try_from(left).unwrap_or(0))
        });
        loop {
            let next = tokio::select! {
                // Expiry, shutdown and revocation before the next message: nothing more is
                // processed once one of them holds.
                biased;
                () = async { match expires { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {
                    let r = Rejection::CertificateExpired {
                        node: node.clone(),
                        not_after: not_after.unwrap_or(0),
                    };
                    let _ = tx.send(Err(self.reject(&r))).await;
                    break;
                }
                () = async { let _ = shutdown.wait_for(|s| *s).await; } => {
                    let _ = tx.send(Err(Rejection::ShuttingDown.to_status())).await;
                    break;
                }
                Ok(()) = self.enrolment_changed.changed() => {
                    // Revocation bites at once: a node removed from the enrolment, or whose
                    // keys changed, or whose certificate a new CRL revokes, loses its open
                    // streams (it may reconnect if still enrolled, with a valid certificate).
                    if let Some(r) = revoked_cert(&self.revocations, &node, &self.leaf) {
                        let _ = tx.send(Err(self.reject(&r))).await;
                        break;
                    }
                    let now = {
                        let e = self.enrolment.read().unwrap_or_else(|p| p.into_inner());
                        node_trust(&e, &node)
                    };
                    if now == self.trust {
                        continue;
                    }
                    let r = Rejection::Revoked {
                        node: node.clone(),
                        detail: if now.is_none() {
                            "no longer enrolled".into()
                        } else {
                            "its enrolled keys, revoked epochs or limits changed; reconnect".into()
                        },
                    };
                    let _ = tx.send(Err(self.reject(&r))).await;
                    break;
                }
                m = inbound.message() => m,
                // The node went away: nothing left to answer.
                () = tx.closed() => break,
            };
            let msg = match next {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(status) => {
                    // What tonic refuses while decoding: oversized frames, bad protobuf.
                    let r = match status.code() {
                        tonic::Code::OutOfRange | tonic::Code::ResourceExhausted => {
                            Rejection::Oversized(status.message().to_owned())
                        }
                        tonic::Code::Internal => Rejection::Malformed {
                            node: node.clone(),
                            detail: status.message().to_owned(),
                        },
                        // Cancelled / reset by the peer: not a rejection.
                        _ => {
                            tracing::debug!(node = %node, %status, "stream ended by the peer");
                            break;
                        }
                    };
                    let _ = tx.send(Err(self.reject(&r))).await;
                    break;
                }
            };
            // Heartbeats are writes too: every message counts against the node's rate.
            if let Some(rate) = &self.rate {
                if rate.check_key(&node).is_err() {
                    self.metrics.inc(&self.metrics.rate_limited);
                    rate.until_key_ready(&node).await;
                }
            }
            match self.session.handle(msg).await {
                Ok(ack) => {
                    if tx.send(Ok(ack)).await.is_err() {
                        break;
                    }
                    self.metrics.inc(&self.metrics.acks);
                }
                Err(r) => {
                    let _ = tx.send(Err(self.reject(&r))).await;
                    break;
                }
            }
        }
        tracing::info!(node = %node, acked = self.session.acked_seq(), "stream closed");
    }
}
