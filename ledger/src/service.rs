//! The tonic `Ledger` service: authenticates a stream by its client certificate, applies the
//! per-node limits (open streams, batch rate), and runs a [`Session`] over the stream, one Ack
//! per message; a [`Rejection`] ends the stream with its status.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, RwLock};

use governor::{Quota, RateLimiter};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use wattd_proto::v1::ledger_server::Ledger;
use wattd_proto::v1::{Ack, NodeMessage};

use crate::enrol::{check_node_id, Enrolment};
use crate::metrics::Metrics;
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

/// The service state shared by every stream.
pub struct LedgerService<S: Store> {
    store: Arc<S>,
    enrolment: Arc<RwLock<Arc<Enrolment>>>,
    enrolment_changed: watch::Receiver<u64>,
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
        enrolment: Arc<RwLock<Arc<Enrolment>>>,
        enrolment_changed: watch::Receiver<u64>,
        metrics: Arc<Metrics>,
        limits: ServiceLimits,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let rate = limits
            .node_batches_per_s
            .map(|n| Arc::new(RateLimiter::hashmap(Quota::per_second(n))));
        Self {
            store,
            enrolment,
            enrolment_changed,
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
    check_node_id(cn).map_err(Rejection::NoNodeId)?;
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
        let node = peer_node_id(&request).map_err(|r| self.reject(&r))?;
        // Seen before the enrolment is read: a reload from here on is checked by the worker.
        let mut enrolment_changed = self.enrolment_changed.clone();
        enrolment_changed.mark_unchanged();
        let (enrolled, declared) = {
            let e = self.enrolment.read().unwrap_or_else(|p| p.into_inner());
            (e.node(&node).cloned(), e.declared(&node))
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
            Arc::clone(&self.store),
            Arc::clone(&self.metrics),
            self.limits.session,
        )
        .await
        .map_err(|r| self.reject(&r))?;
        tracing::info!(node = %node, acked = session.acked_seq(), "stream opened");
        let (tx, rx) = mpsc::channel(16);
        let inbound = request.into_inner();
        let worker = StreamWorker {
            session,
            enrolled_keys: enrolled_keys(&enrolled),
            enrolment: Arc::clone(&self.enrolment),
            enrolment_changed,
            metrics: Arc::clone(&self.metrics),
            rate: self.rate.clone(),
            shutdown: self.shutdown.clone(),
            _slot: slot,
        };
        tokio::spawn(worker.run(inbound, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// A node's enrolled keys as a stream compares them: (epoch, key id).
fn enrolled_keys(
    keys: &std::collections::BTreeMap<u32, crate::enrol::EnrolledKey>,
) -> Vec<(u32, wattd_records::identity::KeyId)> {
    keys.iter().map(|(e, k)| (*e, k.key_id)).collect()
}

struct StreamWorker<S: Store> {
    session: Session<S>,
    /// The node's enrolled keys when the stream opened.
    enrolled_keys: Vec<(u32, wattd_records::identity::KeyId)>,
    enrolment: Arc<RwLock<Arc<Enrolment>>>,
    enrolment_changed: watch::Receiver<u64>,
    metrics: Arc<Metrics>,
    rate: Option<Arc<NodeRateLimiter>>,
    shutdown: watch::Receiver<bool>,
    _slot: StreamSlot,
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
        loop {
            let next = tokio::select! {
                m = inbound.message() => m,
                () = async { let _ = shutdown.wait_for(|s| *s).await; } => {
                    let _ = tx.send(Err(Rejection::ShuttingDown.to_status())).await;
                    break;
                }
                Ok(()) = self.enrolment_changed.changed() => {
                    // Revocation bites at once: a node removed from the enrolment, or whose
                    // keys changed, loses its open streams (it may reconnect if still enrolled).
                    let now = {
                        let e = self.enrolment.read().unwrap_or_else(|p| p.into_inner());
                        e.node(&node).map(enrolled_keys)
                    };
                    if now.as_ref() == Some(&self.enrolled_keys) {
                        continue;
                    }
                    let r = Rejection::Revoked {
                        node: node.clone(),
                        detail: if now.is_none() {
                            "no longer enrolled".into()
                        } else {
                            "its enrolled keys changed; reconnect".into()
                        },
                    };
                    let _ = tx.send(Err(self.reject(&r))).await;
                    break;
                }
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
