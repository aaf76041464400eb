//! The `Query` gRPC service (`wattd.ledger.v1.Query`, served on `--query-listen`): the read side
//! for the metering pipeline and each customer's account view. A reader is the CN of its client
//! certificate (from `--reader-ca`) and its role comes from the readers file
//! ([`crate::readers`]); every call, answered or refused, is one row of the read audit (and
//! one log line), and a call that cannot be audited is not answered.
//!
//! `Changes` follows the store per node: a node's batches commit in seq order on every process
//! sharing the store, so the cursor is each node's last seq sent ([`Cursor`]), and "every batch
//! of node N above seq S" is exactly what remains, however many `serve` processes commit.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message as _;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status};
use wattd_proto::v1::query_server::Query;
use wattd_proto::v1::{
    Change, ChangeCursor, ChangesRequest, ChangesResponse, CursorPosition, RunAllocation, RunBatch,
    RunIntervalsRequest, RunIntervalsResponse, RunTotal, RunTotalsRequest, RunTotalsResponse,
};
use wattd_records::energy_table::wh_text;

use crate::metrics::Metrics;
use crate::readers::{ReadersFile, Role};
use crate::server::{ConnRegistry, StreamActivity};
use crate::store::{BatchEnergy, ReadAudit, Store, StoreError, TotalsFilter};

mod feed;

use feed::Feed;
pub use feed::{batch_changes, change_id, ChangeTooLarge, Cursor, CursorError};

/// The largest cursor accepted: about 30,000 nodes with the longest node ids (255 bytes), or
/// 250,000 with 36-byte ones. The feed never emits a larger one: it ends the stream instead
/// (a fleet that large needs a compact cursor; not needed yet).
pub const CURSOR_MAX_BYTES: usize = 16 << 20;
/// Batches read from one node per round of the change feed (each read whole, signed bytes
/// included, for its window).
const PAGE: u32 = 16;
/// A following stream writes an audit checkpoint (rows sent so far) this often; if it cannot,
/// the stream ends: nothing is read unaudited for longer.
const AUDIT_EVERY: Duration = Duration::from_secs(60);
/// How often a following feed checks whether this process stored a batch (a counter, no
/// query), and how often it asks the store anyway (another process may have).
const POLL: Duration = Duration::from_millis(250);
const POLL_STORE: Duration = Duration::from_secs(2);
/// A consumer that takes no message for this long is dropped (its stream ends; counted and
/// audited), so a stopped reader holds nothing for ever.
pub const STALLED_CONSUMER: Duration = Duration::from_secs(60);
/// Messages buffered per Changes stream: the feed reads the store only as the consumer takes
/// them (backpressure), so a slow consumer costs nothing but its own stream.
const BUFFER: usize = 4;

/// Everything a Query call needs.
pub struct QueryService<S: Store> {
    store: Arc<S>,
    readers: Arc<ReadersFile>,
    account_label: String,
    metrics: Arc<Metrics>,
    registry: ConnRegistry,
    shutdown: watch::Receiver<bool>,
    /// Changes streams open per reader (at most [`STREAMS_PER_READER`]).
    streams: Arc<std::sync::Mutex<HashMap<String, usize>>>,
}

/// Changes streams one reader may have open at once on this process.
pub const STREAMS_PER_READER: usize = 4;

/// One reader's open Changes stream, counted while it lives.
struct StreamSlot {
    streams: Arc<std::sync::Mutex<HashMap<String, usize>>>,
    reader: String,
}

impl StreamSlot {
    fn take(
        streams: &Arc<std::sync::Mutex<HashMap<String, usize>>>,
        reader: &str,
    ) -> Option<StreamSlot> {
        let mut map = streams.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(reader.to_owned()).or_default();
        if *n >= STREAMS_PER_READER {
            return None;
        }
        *n += 1;
        Some(StreamSlot {
            streams: Arc::clone(streams),
            reader: reader.to_owned(),
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut map = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.reader) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.reader);
            }
        }
    }
}

// By hand: a derive would ask `S: Clone`; every field is a handle.
impl<S: Store> Clone for QueryService<S> {
    fn clone(&self) -> Self {
        Self {
            store: Arc::clone(&self.store),
            readers: Arc::clone(&self.readers),
            account_label: self.account_label.clone(),
            metrics: Arc::clone(&self.metrics),
            registry: Arc::clone(&self.registry),
            shutdown: self.shutdown.clone(),
            streams: Arc::clone(&self.streams),
        }
    }
}

impl<S: Store> std::fmt::Debug for QueryService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryService")
            .field("account_label", &self.account_label)
            .finish_non_exhaustive()
    }
}

/// Who is calling, once known.
#[derive(Clone, Debug)]
struct Caller {
    reader: String,
    role: Option<Role>,
}

impl Caller {
    fn role_text(&self) -> String {
        self.role.as_ref().map_or_else(|| "none".into(), Role::text)
    }
}

fn status(code: Code, reason: &'static str, message: String) -> Status {
    let mut meta = tonic::metadata::MetadataMap::new();
    meta.insert(
        "wattd-reason",
        tonic::metadata::MetadataValue::from_static(reason),
    );
    Status::with_metadata(code, message, meta)
}

fn store_status(e: &StoreError) -> Status {
    status(
        Code::Unavailable,
        "store",
        format!("store unavailable: {e}"),
    )
}

impl<S: Store> QueryService<S> {
    pub fn new(
        store: Arc<S>,
        readers: Arc<ReadersFile>,
        account_label: String,
        metrics: Arc<Metrics>,
        registry: ConnRegistry,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            store,
            readers,
            account_label,
            metrics,
            registry,
            shutdown,
            streams: Arc::default(),
        }
    }

    /// The caller's CN and role; a caller with no role is refused (and audited).
    async fn caller<T>(
        &self,
        req: &Request<T>,
        call: &str,
        filters: &str,
    ) -> Result<Caller, Status> {
        let reader = crate::service::peer_node_id(req).map_err(|e| {
            status(
                Code::Unauthenticated,
                "no_reader_id",
                format!("reader certificate: {e}"),
            )
        });
        let reader = match reader {
            Ok(r) => r,
            Err(s) => {
                let c = Caller {
                    reader: String::new(),
                    role: None,
                };
                return Err(self.refused(&c, call, filters, s).await);
            }
        };
        let role = self.readers.current().role(&reader).cloned();
        let caller = Caller { reader, role };
        if caller.role.is_none() {
            let s = status(
                Code::PermissionDenied,
                "not_a_reader",
                format!(
                    "certificate {:?} is not in the readers file: it may not read the ledger",
                    caller.reader
                ),
            );
            return Err(self.refused(&caller, call, filters, s).await);
        }
        Ok(caller)
    }

    /// Audits a refusal and returns its status (or UNAVAILABLE if the audit cannot be written).
    async fn refused(&self, caller: &Caller, call: &str, filters: &str, s: Status) -> Status {
        self.metrics.inc(&self.metrics.reads_refused);
        let outcome = format!(
            "{:?}: {}",
            s.code(),
            s.metadata()
                .get("wattd-reason")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("refused")
        );
        match self.audit(caller, call, filters, 0, outcome).await {
            Ok(()) => s,
            Err(e) => e,
        }
    }

    /// One row of the read audit and one log line.
    async fn audit(
        &self,
        caller: &Caller,
        call: &str,
        filters: &str,
        rows: u64,
        outcome: String,
    ) -> Result<(), Status> {
        tracing::info!(
            target: "wattd_ledger::reads",
            reader = %caller.reader,
            role = %caller.role_text(),
            call,
            filters,
            rows,
            outcome = %outcome,
            "read"
        );
        let row = ReadAudit {
            at_unix_ns: crate::unix_now_ns(),
            reader: caller.reader.clone(),
            role: caller.role_text(),
            call: call.into(),
            filters: filters.into(),
            rows,
            outcome,
        };
        self.store.record_read(row).await.map_err(|e| {
            tracing::error!(error = %e, "the read audit cannot be written: the read is refused");
            status(
                Code::Unavailable,
                "audit",
                format!("the read cannot be audited, so it is not answered: {e}"),
            )
        })
    }

    /// (node, run) -> account, from the runs' labels.
    async fn accounts(&self) -> Result<HashMap<(String, String), String>, StoreError> {
        Ok(self
            .store
            .run_label(&self.account_label)
            .await?
            .into_iter()
            .map(|(n, r, v)| ((n, r), v))
            .collect())
    }
}

fn json(v: serde_json::Value) -> String {
    v.to_string()
}

#[tonic::async_trait]
impl<S: Store> Query for QueryService<S> {
    async fn run_totals(
        &self,
        req: Request<RunTotalsRequest>,
    ) -> Result<Response<RunTotalsResponse>, Status> {
        let _active = StreamActivity::start(&self.registry, req.remote_addr());
        let r = req.get_ref().clone();
        let filters = json(serde_json::json!({
            "run_id": r.run_id, "account": r.account, "node_id": r.node_id,
            "from_unix_ns": r.from_unix_ns, "to_unix_ns": r.to_unix_ns,
        }));
        let caller = self.caller(&req, "RunTotals", &filters).await?;
        let account = match (&caller.role, r.account.as_str()) {
            (Some(Role::Account(own)), "") => Some(own.clone()),
            (Some(Role::Account(own)), asked) if asked == own => Some(own.clone()),
            (Some(Role::Account(own)), asked) => {
                let s = status(
                    Code::PermissionDenied,
                    "other_account",
                    format!(
                        "reader {:?} reads account {own:?} only, not {asked:?}",
                        caller.reader
                    ),
                );
                return Err(self.refused(&caller, "RunTotals", &filters, s).await);
            }
            (_, "") => None,
            (_, asked) => Some(asked.to_owned()),
        };
        if r.from_unix_ns < 0 || r.to_unix_ns < 0 {
            let s = status(
                Code::InvalidArgument,
                "bad_filter",
                "from_unix_ns and to_unix_ns are Unix nanoseconds, not negative".into(),
            );
            return Err(self.refused(&caller, "RunTotals", &filters, s).await);
        }
        let nonempty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        let filter = TotalsFilter {
            run_id: nonempty(&r.run_id),
            node_id: nonempty(&r.node_id),
            from_unix_ns: (r.from_unix_ns != 0).then_some(r.from_unix_ns),
            to_unix_ns: (r.to_unix_ns != 0).then_some(r.to_unix_ns),
        };
        let answer = async {
            let rows = self.store.run_totals_where(filter).await?;
            let accounts = self.accounts().await?;
            Ok::<_, StoreError>((rows, accounts))
        }
        .await;
        let (rows, accounts) = match answer {
            Ok(a) => a,
            Err(e) => {
                return Err(self
                    .refused(&caller, "RunTotals", &filters, store_status(&e))
                    .await)
            }
        };
        let mut totals = Vec::new();
        for t in rows {
            let acct = accounts.get(&(t.node_id.clone(), t.run_id.clone()));
            if account.is_some() && acct != account.as_ref() {
                continue;
            }
            let Ok(energy_uj) = u64::try_from(t.energy_uj) else {
                let s = status(
                    Code::OutOfRange,
                    "total_above_u64",
                    format!(
                        "node {:?} run {:?} domain {}: {} uJ does not fit the response's 64 bits; \
                         narrow the time range",
                        t.node_id, t.run_id, t.domain, t.energy_uj
                    ),
                );
                return Err(self.refused(&caller, "RunTotals", &filters, s).await);
            };
            totals.push(RunTotal {
                energy_wh: wh_text(t.energy_uj),
                account: acct.cloned().unwrap_or_default(),
                node_id: t.node_id,
                run_id: t.run_id,
                domain: t.domain,
                energy_uj,
            });
        }
        self.audit(
            &caller,
            "RunTotals",
            &filters,
            totals.len() as u64,
            "ok".into(),
        )
        .await?;
        self.metrics.inc(&self.metrics.reads);
        Ok(Response::new(RunTotalsResponse { totals }))
    }

    type ChangesStream = ReceiverStream<Result<ChangesResponse, Status>>;

    async fn changes(
        &self,
        req: Request<ChangesRequest>,
    ) -> Result<Response<Self::ChangesStream>, Status> {
        let activity = StreamActivity::start(&self.registry, req.remote_addr());
        let r = req.get_ref().clone();
        let shown_cursor: String = r.cursor.chars().take(96).collect();
        let filters = json(serde_json::json!({
            "cursor": shown_cursor, "cursor_bytes": r.cursor.len(), "follow": r.follow,
            "keepalive_s": r.keepalive_s,
        }));
        let caller = self.caller(&req, "Changes", &filters).await?;
        let cursor = match Cursor::parse(&r.cursor) {
            Ok(c) => c,
            Err(e) => {
                let s = status(Code::InvalidArgument, "bad_cursor", e.to_string());
                return Err(self.refused(&caller, "Changes", &filters, s).await);
            }
        };
        let keepalive = match r.keepalive_s {
            0 => Duration::from_secs(30),
            s @ 1..=300 => Duration::from_secs(u64::from(s)),
            s => {
                let s = status(
                    Code::InvalidArgument,
                    "bad_keepalive",
                    format!("keepalive_s {s}: 1 to 300 seconds, or 0 for 30"),
                );
                return Err(self.refused(&caller, "Changes", &filters, s).await);
            }
        };
        let heads = match self.store.heads().await {
            Ok(h) => h,
            Err(e) => {
                return Err(self
                    .refused(&caller, "Changes", &filters, store_status(&e))
                    .await)
            }
        };
        if let Some(why) = cursor.ahead_of(&heads) {
            // An account reader learns no other node's position from the refusal.
            let why = match caller.role {
                Some(Role::Metering) => why,
                _ => "cursor is ahead of what this ledger holds: a cursor of another ledger, or \
                      this one restored from an older backup"
                    .into(),
            };
            let s = status(Code::OutOfRange, "cursor_ahead", why);
            return Err(self.refused(&caller, "Changes", &filters, s).await);
        }
        let Some(role) = caller.role.clone() else {
            let s = status(Code::PermissionDenied, "not_a_reader", "no role".into());
            return Err(self.refused(&caller, "Changes", &filters, s).await);
        };
        let Some(slot) = StreamSlot::take(&self.streams, &caller.reader) else {
            let s = status(
                Code::ResourceExhausted,
                "streams_per_reader",
                format!(
                    "reader {:?} has {STREAMS_PER_READER} Changes streams open already",
                    caller.reader
                ),
            );
            return Err(self.refused(&caller, "Changes", &filters, s).await);
        };
        self.audit(&caller, "Changes", &filters, 0, "ok: stream opened".into())
            .await?;
        self.metrics.inc(&self.metrics.reads);
        let (tx, rx) = mpsc::channel(BUFFER);
        let feed = Feed {
            store: Arc::clone(&self.store),
            account_label: self.account_label.clone(),
            role,
            readers: Arc::clone(&self.readers),
            caller: caller.clone(),
            filters: filters.clone(),
            cursor,
            follow: r.follow,
            keepalive,
            tx,
            metrics: Arc::clone(&self.metrics),
            shutdown: self.shutdown.clone(),
            sent: 0,
            unaudited: 0,
        };
        let service = self.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let _activity = activity;
            service.metrics.inc(&service.metrics.changes_streams_open);
            let (sent, outcome) = feed.run().await;
            service.metrics.dec(&service.metrics.changes_streams_open);
            let _ = service
                .audit(
                    &caller,
                    "Changes",
                    &filters,
                    sent,
                    format!("closed: {outcome}"),
                )
                .await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn run_intervals(
        &self,
        req: Request<RunIntervalsRequest>,
    ) -> Result<Response<RunIntervalsResponse>, Status> {
        let _active = StreamActivity::start(&self.registry, req.remote_addr());
        let r = req.get_ref().clone();
        let filters = json(serde_json::json!({
            "run_id": r.run_id, "node_id": r.node_id, "after_node_id": r.after_node_id,
            "after_seq": r.after_seq, "limit": r.limit,
        }));
        let caller = self.caller(&req, "RunIntervals", &filters).await?;
        let limit = match r.limit {
            0 => 100,
            n @ 1..=1000 => n,
            n => {
                let s = status(
                    Code::InvalidArgument,
                    "bad_limit",
                    format!("limit {n}: 1 to 1000, or 0 for 100"),
                );
                return Err(self.refused(&caller, "RunIntervals", &filters, s).await);
            }
        };
        if r.run_id.is_empty() {
            let s = status(
                Code::InvalidArgument,
                "bad_filter",
                "run_id is required".into(),
            );
            return Err(self.refused(&caller, "RunIntervals", &filters, s).await);
        }
        let answer = async {
            let batches = self
                .store
                .run_batches(
                    &r.run_id,
                    &r.node_id,
                    (&r.after_node_id, r.after_seq),
                    limit + 1,
                    &self.account_label,
                )
                .await?;
            Ok::<_, StoreError>(batches)
        }
        .await;
        let mut batches = match answer {
            Ok(a) => a,
            Err(e) => {
                return Err(self
                    .refused(&caller, "RunIntervals", &filters, store_status(&e))
                    .await)
            }
        };
        if let Some(Role::Account(own)) = &caller.role {
            // An account reader asking for another account's run learns only that it may not.
            let foreign = batches
                .iter()
                .flat_map(|b| &b.allocations)
                .any(|a| a.account.as_ref() != Some(own));
            if foreign {
                let s = status(
                    Code::PermissionDenied,
                    "other_account",
                    format!(
                        "reader {:?} reads account {own:?} only; run {:?} is not in it",
                        caller.reader, r.run_id
                    ),
                );
                return Err(self.refused(&caller, "RunIntervals", &filters, s).await);
            }
        }
        let more = batches.len() > limit as usize;
        batches.truncate(limit as usize);
        // The signed bytes hold every run of the node's batch: other accounts' runs and labels.
        // Only the metering role gets them (to verify the signature); an account view gets the
        // batch's hash and key, which the metering pipeline can check against the chain.
        let signed_too = matches!(caller.role, Some(Role::Metering));
        let batches: Vec<RunBatch> = batches
            .into_iter()
            .map(|b| RunBatch {
                node_id: b.node_id,
                seq: b.seq,
                batch_hash: b.hash.to_vec(),
                key_epoch: b.key_epoch,
                key_id: b.key_id.to_vec(),
                signed_batch: if signed_too {
                    b.signed_batch
                } else {
                    Vec::new()
                },
                allocations: b
                    .allocations
                    .into_iter()
                    .map(|a| RunAllocation {
                        interval_index: a.interval_index,
                        domain: a.domain,
                        active_uj: a.active_uj,
                        idle_uj: a.idle_uj,
                        energy_uj: a.energy_uj,
                        usage_us: a.usage_us,
                    })
                    .collect(),
            })
            .collect();
        self.audit(
            &caller,
            "RunIntervals",
            &filters,
            batches.len() as u64,
            "ok".into(),
        )
        .await?;
        self.metrics.inc(&self.metrics.reads);
        Ok(Response::new(RunIntervalsResponse { batches, more }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_bad_ones_are_refused() {
        let mut c = Cursor::default();
        assert_eq!(Cursor::parse("").unwrap(), c);
        c.set("node-a", 7);
        c.set("node-b", 1);
        let t = c.text();
        assert!(t.starts_with("v1."));
        assert_eq!(Cursor::parse(&t).unwrap(), c);
        for bad in ["x", "v1.zz", "v1.0", "v2.00", "v1.0a01"] {
            assert!(Cursor::parse(bad).is_err(), "{bad:?}");
        }
        let huge = format!("v1.{}", "0".repeat(CURSOR_MAX_BYTES));
        assert!(matches!(
            Cursor::parse(&huge),
            Err(CursorError::TooLong { bytes }) if bytes == huge.len()
        ));
        let heads = vec![("node-a".to_string(), 9), ("node-b".to_string(), 1)];
        assert_eq!(c.ahead_of(&heads), None);
        let behind = vec![("node-a".to_string(), 6), ("node-b".to_string(), 1)];
        assert!(c.ahead_of(&behind).unwrap().contains("seq 7"));
        assert!(c.ahead_of(&heads[..1]).unwrap().contains("node-b"));
    }

    #[test]
    fn change_ids_are_deterministic_and_distinct() {
        let a = change_id("n", 1, "r", "package:0");
        assert_eq!(a, change_id("n", 1, "r", "package:0"));
        assert_eq!(a.len(), 64);
        assert_ne!(a, change_id("n", 11, "r", "package:0"));
        assert_ne!(a, change_id("n", 1, "r", "package:1"));
        // The separators keep ("n1", "") and ("n", "1") apart.
        assert_ne!(change_id("ab", 1, "c", "d"), change_id("a", 1, "bc", "d"));
    }
}
