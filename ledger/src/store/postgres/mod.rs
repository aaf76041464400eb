//! The PostgreSQL store: several `wattd-ledger` processes may serve one database. Races between
//! them are decided by the primary key `(node_id, seq)` of `batches` (see the module docs of
//! `store`): the loser of an insert race gets a unique violation, rolls back, re-reads, and
//! answers duplicate or fork. A batch and a lost range (different tables) are serialised per
//! node by a transaction-scoped advisory lock on the node id. The schema is created under a transaction-scoped advisory lock, so
//! processes starting together do not trip over each other's `CREATE TABLE IF NOT EXISTS`.
//!
//! Connections come from a small fixed pool, made by [`PgTarget`] (TLS with `verify-full`,
//! several hosts with `target_session_attrs=read-write`, the password file read at every new
//! connection). A connection that closed (the server went, a failover) is dropped, never handed
//! out again; the next one is made through the URL, so after a failover the pool refills from
//! the promoted server. Statements are prepared once per connection.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};
use wattd_records::batch::ChainHash;

use super::detail::{
    self, AuditBatch, DetailUpkeep, NodeTotals, RunTotals, DAY_NS, PRUNED_PAGE, SQL_AUDIT_BATCHES,
    SQL_DETAIL_FROM, SQL_LABEL_OF, SQL_NODE_ROLLUP, SQL_NODE_ROWS, SQL_PRUNED_BETWEEN,
    SQL_PRUNED_OF_RUN, SQL_QUARANTINED_OF_NODE, SQL_RAISE_DETAIL_FROM, SQL_ROLLUP_NODES,
};
use super::pgtarget::PgTarget;
use super::{
    assemble, hour_of, rollup, split_allocations, to_hash, to_i64, to_key_id, to_u64, totals_where,
    BatchEnergy, ClockColumns, Commit, ForkRecord, ForkRow, LossOutcome, LossRecord, LostRangeRow,
    NodeRow, OpenMode, Param, QuarantineRow, RawAllocation, RawBatch, ReadAudit, RunDomainTotal,
    Store, StoreError, Tip, TotalsFilter, SCHEMA_VERSION, SQL_ALLOCATIONS_BETWEEN,
    SQL_BACKFILL_ROLLUP, SQL_BATCHES_ABOVE, SQL_CLOCK, SQL_HEADS, SQL_INSERT_READ, SQL_PRUNE_READS,
    SQL_READS, SQL_RUN_ALLOCATIONS, SQL_RUN_BATCHES, SQL_UPGRADE_VERSION, SQL_UPSERT_CLOCK,
};
use crate::check::{LearntKey, VerifiedBatch};
use crate::plausible::{judge, NodeLimits};

mod read;
mod schema;
mod write;

use read::{detail_read, pg_quarantined_row, AUDIT_PAGE};
use schema::make_schema;
use write::{commit_once, record_loss_once};

/// Connections per process.
const POOL_SIZE: usize = 8;
/// Key of the advisory lock that serialises schema creation ("wattd" in ASCII).
const SCHEMA_LOCK_KEY: i64 = 0x0077_6174_7464;

const SQL_HASH_AT: &str = "SELECT hash FROM batches WHERE node_id = $1 AND seq = $2";
/// The chain tip: the highest stored batch or declared lost range.
const SQL_TIP: &str = "SELECT seq, hash FROM \
     (SELECT seq, hash FROM batches WHERE node_id = $1 ORDER BY seq DESC LIMIT 1) AS b \
     UNION ALL SELECT seq, hash FROM \
     (SELECT last_seq AS seq, last_hash AS hash FROM lost_ranges WHERE node_id = $1 \
      ORDER BY last_seq DESC LIMIT 1) AS l ORDER BY seq DESC LIMIT 1";

/// A short description of a PostgreSQL error: the server's message and SQLSTATE when there is
/// one, else the client error and its cause.
pub fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!(
            "{}: {} (SQLSTATE {})",
            db.severity(),
            db.message(),
            db.code().code()
        );
    }
    match std::error::Error::source(e) {
        Some(src) => format!("{e}: {src}"),
        None => e.to_string(),
    }
}

/// One pooled connection and its prepared statements.
struct PgConn {
    client: Client,
    /// Prepared on this connection, by their text: the commit's statements, and the reads that
    /// keep their plan (`read.rs` `plan_once`: a run's totals over rows, one per shape of filter;
    /// the change feed's rows; a run's batches).
    statements: HashMap<Box<str>, Statement>,
}

impl PgConn {
    async fn statement(&mut self, sql: &str) -> Result<Statement, StoreError> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql).await?;
        self.statements.insert(sql.into(), s.clone());
        Ok(s)
    }
}

struct Pooled {
    conn: Option<PgConn>,
    pool: Arc<PgInner>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            if !c.client.is_closed() {
                self.pool
                    .idle
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(c);
            }
        }
    }
}

impl Pooled {
    fn get(&mut self) -> Result<&mut PgConn, StoreError> {
        self.conn
            .as_mut()
            .ok_or_else(|| StoreError::Task("pooled connection already returned".into()))
    }
}

struct PgInner {
    target: PgTarget,
    idle: Mutex<Vec<PgConn>>,
    slots: Arc<Semaphore>,
    /// The query API's reads take at most half the pool: ingestion always has the other half.
    read_slots: Arc<Semaphore>,
}

/// A PostgreSQL ledger database.
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<PgInner>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password: never print it.
        f.debug_struct("PgStore").finish_non_exhaustive()
    }
}

async fn connect(target: &PgTarget) -> Result<Client, StoreError> {
    let client = target.connect().await?;
    // An Ack promises durability: commits must wait for the WAL flush whatever the server's or
    // role's default (`synchronous_commit = off` or `local` would acknowledge batches that a
    // PostgreSQL crash then loses; with `synchronous_standby_names` set on the primary, `on`
    // also waits for the synchronous standby, so a failover loses no acknowledged batch).
    // Statements are bounded too.
    client.batch_execute(SESSION_SETTINGS).await?;
    Ok(client)
}

/// Every connection's settings (see [`connect`]). The ledger's reads are index lookups of a few
/// thousand rows, which the planner's estimates make look larger than they are once partitions
/// are large or many: no parallel workers (at 16 million allocations a run's totals over a range
/// that is not whole hours took 8-13 ms with two, 1.6-1.8 ms without) and no JIT compilation
/// (with a year of day partitions the same query's estimate passed `jit_above_cost`, and
/// compiling it for every partition took 440 of its 460 ms; 3 ms without).
pub(super) const SESSION_SETTINGS: &str = "SET synchronous_commit = on; \
     SET statement_timeout = '30s'; SET max_parallel_workers_per_gather = 0; SET jit = off";

impl PgStore {
    pub async fn open(url: &str, mode: OpenMode) -> Result<Self, StoreError> {
        let target = PgTarget::parse(url)?;
        let mut client = connect(&target).await?;
        if mode == OpenMode::Serve {
            // A lock not had within the schema transaction's timeout (behind a long reader, a
            // vacuum, a session idle in a transaction): given up, so that no commit waits
            // behind it long, and tried again a little later.
            let mut attempt = 1;
            loop {
                match make_schema(&mut client).await {
                    Ok(()) => break,
                    Err(StoreError::Postgres(e))
                        if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) && attempt < 6 =>
                    {
                        tracing::warn!(
                            attempt,
                            error = %describe(&e),
                            "schema transaction could not lock a table in 10 s; trying again"
                        );
                        attempt += 1;
                        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        let version: Option<i64> = client
            .query_opt(
                "SELECT value FROM ledger_meta WHERE key = 'schema_version'",
                &[],
            )
            .await
            .map_err(|e| StoreError::Url(format!("not a wattd-ledger database: {}", describe(&e))))?
            .map(|r| r.get(0));
        if version != Some(SCHEMA_VERSION) {
            return Err(StoreError::Corrupt(format!(
                "schema version {version:?}, this ledger uses {SCHEMA_VERSION}"
            )));
        }
        let inner = Arc::new(PgInner {
            target,
            idle: Mutex::new(vec![PgConn {
                client,
                statements: HashMap::new(),
            }]),
            slots: Arc::new(Semaphore::new(POOL_SIZE)),
            read_slots: Arc::new(Semaphore::new(POOL_SIZE / 2)),
        });
        Ok(Self { inner })
    }

    /// A connection for the query API's reads (see `read_slots`); the permit goes with it.
    async fn read_conn(&self) -> Result<(OwnedSemaphorePermit, Pooled), StoreError> {
        let permit = Arc::clone(&self.inner.read_slots)
            .acquire_owned()
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?;
        Ok((permit, self.conn().await?))
    }

    async fn conn(&self) -> Result<Pooled, StoreError> {
        let permit = Arc::clone(&self.inner.slots)
            .acquire_owned()
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?;
        // Idle connections whose server went (a restart, a failover) are dropped here.
        let idle = {
            let mut idle = self.inner.idle.lock().unwrap_or_else(|p| p.into_inner());
            std::iter::from_fn(|| idle.pop()).find(|c| !c.client.is_closed())
        };
        let conn = match idle {
            Some(c) => c,
            None => PgConn {
                client: connect(&self.inner.target).await?,
                statements: HashMap::new(),
            },
        };
        Ok(Pooled {
            conn: Some(conn),
            pool: Arc::clone(&self.inner),
            _permit: permit,
        })
    }
}

fn hash_row(row: Option<tokio_postgres::Row>) -> Result<Option<ChainHash>, StoreError> {
    row.map(|r| to_hash(r.get::<_, &[u8]>(0), "batches.hash"))
        .transpose()
}

impl Store for PgStore {
    async fn record_loss(&self, loss: LossRecord) -> Result<LossOutcome, StoreError> {
        let mut p = self.conn().await?;
        record_loss_once(p.get()?, &loss).await
    }

    async fn tip(&self, node: &str) -> Result<Tip, StoreError> {
        let mut p = self.conn().await?;
        let c = p.get()?;
        let st = c.statement(SQL_TIP).await?;
        match c.client.query_opt(&st, &[&node]).await? {
            None => Ok(Tip::genesis()),
            Some(r) => Ok(Tip {
                seq: to_u64(r.get(0), "batches.seq")?,
                hash: to_hash(r.get::<_, &[u8]>(1), "batches.hash")?,
            }),
        }
    }

    async fn batch_hash(&self, node: &str, seq: u64) -> Result<Option<ChainHash>, StoreError> {
        let seq = to_i64(seq, "seq")?;
        let mut p = self.conn().await?;
        let c = p.get()?;
        let st = c.statement(SQL_HASH_AT).await?;
        hash_row(c.client.query_opt(&st, &[&node, &seq]).await?)
    }

    async fn commit(
        &self,
        batch: Arc<VerifiedBatch>,
        limits: Arc<NodeLimits>,
        received_unix_ns: i64,
    ) -> Result<Commit, StoreError> {
        let mut p = self.conn().await?;
        commit_once(p.get()?, &batch, &limits, received_unix_ns).await
    }

    async fn learnt_keys(&self, node: &str) -> Result<Vec<LearntKey>, StoreError> {
        read::learnt_keys(self, node).await
    }

    async fn note_seen(&self, node: &str, seq: u64) -> Result<(), StoreError> {
        let seq = to_i64(seq, "seq")?;
        let mut p = self.conn().await?;
        let c = p.get()?;
        c.client
            .execute(
                "INSERT INTO nodes (node_id, highest_seen_seq) VALUES ($1, $2) \
                 ON CONFLICT (node_id) DO UPDATE SET \
                 highest_seen_seq = GREATEST(nodes.highest_seen_seq, excluded.highest_seen_seq)",
                &[&node, &seq],
            )
            .await?;
        Ok(())
    }

    async fn heartbeat(
        &self,
        node: &str,
        sent_unix_ns: i64,
        received_unix_ns: i64,
        last_sealed_seq: u64,
    ) -> Result<u64, StoreError> {
        let sealed = to_i64(last_sealed_seq, "last_sealed_seq")?;
        let mut p = self.conn().await?;
        let c = p.get()?;
        let row = c
            .client
            .query_one(
                "INSERT INTO nodes (node_id, announced_sealed_seq, last_heartbeat_sent_unix_ns, \
                 last_heartbeat_received_unix_ns) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (node_id) DO UPDATE SET \
                 announced_sealed_seq = GREATEST(nodes.announced_sealed_seq, \
                 excluded.announced_sealed_seq), \
                 last_heartbeat_sent_unix_ns = excluded.last_heartbeat_sent_unix_ns, \
                 last_heartbeat_received_unix_ns = excluded.last_heartbeat_received_unix_ns \
                 RETURNING announced_sealed_seq",
                &[&node, &sealed, &sent_unix_ns, &received_unix_ns],
            )
            .await?;
        to_u64(row.get(0), "nodes.announced_sealed_seq")
    }

    async fn announced(&self, node: &str) -> Result<u64, StoreError> {
        let mut p = self.conn().await?;
        let c = p.get()?;
        let row = c
            .client
            .query_opt(
                "SELECT announced_sealed_seq FROM nodes WHERE node_id = $1",
                &[&node],
            )
            .await?;
        to_u64(row.map_or(0, |r| r.get(0)), "nodes.announced_sealed_seq")
    }

    async fn record_fork(&self, f: ForkRecord) -> Result<bool, StoreError> {
        let mut p = self.conn().await?;
        let c = p.get()?;
        let changed = c
            .client
            .execute(
                "INSERT INTO forks (node_id, seq, kind, stored_hash, received_hash, \
                 received_signed_batch, first_detected_unix_ns, last_detected_unix_ns, \
                 times_seen) SELECT $1::text, $2::bigint, $3::text, $4::bytea, $5::bytea, \
                 $6::bytea, $7::bigint, $7::bigint, 1 \
                 WHERE EXISTS (SELECT 1 FROM forks WHERE node_id = $1::text AND seq = $2::bigint \
                   AND received_hash = $5::bytea) \
                 OR ((SELECT COUNT(*) FROM forks WHERE node_id = $1::text) < $8::bigint \
                   AND (SELECT COALESCE(SUM(octet_length(received_signed_batch)), 0) FROM forks \
                        WHERE node_id = $1::text) + octet_length($6::bytea) <= $9::bigint) \
                 ON CONFLICT (node_id, seq, received_hash) DO UPDATE SET \
                 times_seen = forks.times_seen + 1, \
                 last_detected_unix_ns = excluded.last_detected_unix_ns",
                &[
                    &f.node_id,
                    &to_i64(f.seq, "seq")?,
                    &f.kind.as_str(),
                    &f.stored_hash.as_slice(),
                    &f.received_hash.as_slice(),
                    &f.received_bytes,
                    &f.detected_unix_ns,
                    &super::FORK_ROWS_PER_NODE,
                    &super::FORK_BYTES_PER_NODE,
                ],
            )
            .await?;
        Ok(changed > 0)
    }

    async fn batches_after(
        &self,
        node: &str,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let after = to_i64(after_seq, "seq")?;
        let mut p = self.conn().await?;
        let c = p.get()?;
        let rows = c
            .client
            .query(
                "SELECT seq, signed_batch FROM batches WHERE node_id = $1 AND seq > $2 \
                 ORDER BY seq LIMIT $3",
                &[&node, &after, &i64::from(limit)],
            )
            .await?;
        rows.iter()
            .map(|r| Ok((to_u64(r.get(0), "batches.seq")?, r.get::<_, Vec<u8>>(1))))
            .collect()
    }

    async fn run_energy_between(
        &self,
        node: &str,
        after_seq: u64,
        upto_seq: u64,
    ) -> Result<Vec<RunDomainTotal>, StoreError> {
        read::run_energy_between(self, node, after_seq, upto_seq).await
    }

    async fn run_totals(&self) -> Result<Vec<RunDomainTotal>, StoreError> {
        self.run_totals_where(TotalsFilter::default()).await
    }

    async fn run_finals(&self) -> Result<Vec<(String, String, String, u64)>, StoreError> {
        read::run_finals(self).await
    }

    async fn run_totals_where(
        &self,
        filter: TotalsFilter,
    ) -> Result<Vec<RunDomainTotal>, StoreError> {
        read::run_totals_where(self, filter).await
    }

    async fn audit_node<F>(&self, node: &str, mut f: F) -> Result<NodeTotals, StoreError>
    where
        F: FnMut(AuditBatch) + Send + 'static,
    {
        let (_read, mut p) = self.read_conn().await?;
        let c = p.get()?;
        // One snapshot for the batches and both sums.
        let (tx, from) = detail_read(&mut c.client, true).await?;
        let mut quarantined: BTreeMap<i64, Vec<detail::QuarantinedRow>> = BTreeMap::new();
        for r in tx.query(SQL_QUARANTINED_OF_NODE, &[&node]).await? {
            quarantined
                .entry(r.get(0))
                .or_default()
                .push(pg_quarantined_row(&r, 1));
        }
        let mut after = 0i64;
        loop {
            let page = tx
                .query(SQL_AUDIT_BATCHES, &[&node, &after, &AUDIT_PAGE])
                .await?;
            let full = page.len() as i64 == AUDIT_PAGE;
            for r in page {
                let seq: i64 = r.get(0);
                after = seq;
                let received: i64 = r.get(3);
                f(AuditBatch {
                    seq: to_u64(seq, "batches.seq")?,
                    signed_batch: r.get(1),
                    sealed_unix_ns: r.get(2),
                    has_rows: received >= from,
                    quarantined: quarantined.remove(&seq).unwrap_or_default(),
                });
            }
            if !full {
                break;
            }
        }
        let mut totals = NodeTotals::default();
        for (sql, into) in [
            (SQL_NODE_ROLLUP, &mut totals.maintained),
            (SQL_NODE_ROWS, &mut totals.rows),
        ] {
            let rows = tx.query(sql, &[&node]).await?;
            *into = detail::hourly_from(
                rows.iter()
                    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))),
            );
        }
        tx.commit().await?;
        Ok(totals)
    }

    async fn rollup_nodes(&self) -> Result<Vec<String>, StoreError> {
        let (_read, mut p) = self.read_conn().await?;
        let c = p.get()?;
        let rows = c.client.query(SQL_ROLLUP_NODES, &[]).await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn upkeep_detail(
        &self,
        now_unix_ns: i64,
        retention: Option<std::time::Duration>,
    ) -> Result<DetailUpkeep, StoreError> {
        read::upkeep_detail(self, now_unix_ns, retention).await
    }

    async fn store_rows_again(&self, now_unix_ns: i64) -> Result<Option<i64>, StoreError> {
        let mut p = self.conn().await?;
        let c = p.get()?;
        if c.client
            .query_opt(SQL_DETAIL_FROM, &[])
            .await?
            .map_or(true, |r| r.get::<_, i64>(0) != detail::NO_ROWS)
        {
            return Ok(None);
        }
        // `batches` alone: it waits for the commits under way and holds the next ones until
        // it commits, so no receipt lands between the last one read and the change. Readers
        // are not excluded: one that read NO_ROWS decodes every batch of its snapshot, and
        // every one of those has no rows.
        let tx = c.client.transaction().await?;
        tx.batch_execute("SET LOCAL lock_timeout = '5s'").await?;
        tx.batch_execute("LOCK TABLE batches IN SHARE ROW EXCLUSIVE MODE")
            .await?;
        let last: Option<i64> = tx.query_one(detail::SQL_LAST_RECEIPT, &[]).await?.get(0);
        let from = detail::rows_again_from(now_unix_ns, last);
        let changed = tx
            .execute(detail::SQL_ROWS_AGAIN_FROM, &[&from, &detail::NO_ROWS])
            .await?;
        tx.commit().await?;
        Ok((changed == 1).then_some(from))
    }

    async fn heads(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let (_read, mut p) = self.read_conn().await?;
        let c = p.get()?;
        let rows = c.client.query(SQL_HEADS, &[]).await?;
        rows.iter()
            .map(|r| Ok((r.get(0), to_u64(r.get(1), "batches.seq")?)))
            .collect()
    }

    async fn batch_energy(
        &self,
        node: &str,
        after_seq: u64,
        limit: u32,
        account_label: &str,
    ) -> Result<Vec<BatchEnergy>, StoreError> {
        read::batch_energy(self, node, after_seq, limit, account_label).await
    }

    async fn run_batches(
        &self,
        run: &str,
        node: &str,
        after: (&str, u64),
        limit: u32,
        account_label: &str,
    ) -> Result<Vec<BatchEnergy>, StoreError> {
        read::run_batches(self, run, node, after, limit, account_label).await
    }

    async fn record_read(&self, read: ReadAudit) -> Result<(), StoreError> {
        let rows = to_i64(read.rows, "rows")?;
        let mut p = self.conn().await?;
        let c = p.get()?;
        c.client
            .execute(
                SQL_INSERT_READ,
                &[
                    &read.at_unix_ns,
                    &read.reader,
                    &read.role,
                    &read.call,
                    &read.filters,
                    &rows,
                    &read.outcome,
                ],
            )
            .await?;
        Ok(())
    }

    async fn prune_reads(&self, before_unix_ns: i64) -> Result<u64, StoreError> {
        let mut p = self.conn().await?;
        let c = p.get()?;
        Ok(c.client
            .execute(SQL_PRUNE_READS, &[&before_unix_ns])
            .await?)
    }

    async fn reads(&self, limit: u32) -> Result<Vec<ReadAudit>, StoreError> {
        let (_read, mut p) = self.read_conn().await?;
        let c = p.get()?;
        let rows = c.client.query(SQL_READS, &[&i64::from(limit)]).await?;
        rows.iter()
            .map(|r| {
                Ok(ReadAudit {
                    at_unix_ns: r.get(0),
                    reader: r.get(1),
                    role: r.get(2),
                    call: r.get(3),
                    filters: r.get(4),
                    rows: to_u64(r.get(5), "read_audit.rows_returned")?,
                    outcome: r.get(6),
                })
            })
            .collect()
    }

    async fn run_label(&self, key: &str) -> Result<Vec<(String, String, String)>, StoreError> {
        let mut p = self.conn().await?;
        let c = p.get()?;
        let rows = c
            .client
            .query(
                "SELECT node_id, run_id, value FROM run_labels WHERE key = $1 \
                 ORDER BY node_id, run_id",
                &[&key],
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    async fn nodes(&self) -> Result<Vec<NodeRow>, StoreError> {
        read::nodes(self).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every connection the store makes carries the session settings: durable commits (an Ack
    /// promises it), bounded statements, neither parallel workers nor JIT for its small reads.
    #[tokio::test]
    async fn a_connection_carries_the_session_settings() {
        let url = match std::env::var("WATTD_TEST_POSTGRES") {
            Ok(u) if !u.is_empty() => u,
            _ => {
                return wattd_testkit::skip(
                    "a_connection_carries_the_session_settings",
                    "PostgreSQL: `export WATTD_TEST_POSTGRES=$(.ci/start-postgres)` to run it",
                )
            }
        };
        let target = PgTarget::parse(&url).expect("the test server's URL");
        let client = connect(&target).await.expect("connect");
        for (name, want) in [
            ("synchronous_commit", "on"),
            ("statement_timeout", "30s"),
            ("max_parallel_workers_per_gather", "0"),
            ("jit", "off"),
        ] {
            let got: String = client
                .query_one(&format!("SHOW {name}"), &[])
                .await
                .expect("SHOW")
                .get(0);
            assert_eq!(got, want, "{name}");
        }
    }
}
