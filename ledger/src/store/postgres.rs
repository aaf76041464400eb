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
    SQL_PRUNED_OF_RUN, SQL_QUARANTINED_OF, SQL_QUARANTINED_OF_NODE, SQL_RAISE_DETAIL_FROM,
    SQL_ROLLUP_NODES,
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

/// Connections per process.
const POOL_SIZE: usize = 8;
/// Key of the advisory lock that serialises schema creation ("wattd" in ASCII).
const SCHEMA_LOCK_KEY: i64 = 0x0077_6174_7464;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS ledger_meta (
    key TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    node_id TEXT NOT NULL,
    seq BIGINT NOT NULL CHECK (seq >= 1),
    key_epoch BIGINT NOT NULL,
    key_id BYTEA NOT NULL,
    prev_hash BYTEA NOT NULL,
    hash BYTEA NOT NULL,
    signed_batch BYTEA NOT NULL,
    sealed_unix_ns BIGINT NOT NULL,
    intervals BIGINT NOT NULL,
    rotation_epoch BIGINT,
    rotation_key_id BYTEA,
    received_unix_ns BIGINT NOT NULL,
    PRIMARY KEY (node_id, seq)
);
CREATE TABLE IF NOT EXISTS allocations (
    node_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    interval_index BIGINT NOT NULL,
    domain TEXT NOT NULL,
    run_id TEXT NOT NULL,
    active_uj BIGINT NOT NULL,
    idle_uj BIGINT NOT NULL,
    energy_uj BIGINT NOT NULL,
    usage_us BIGINT NOT NULL,
    -- The day the ledger received the batch (Unix ns / 86400e9): the partition, which the
    -- retention drops whole (detail.rs). Days without a partition go to allocations_default.
    received_day BIGINT NOT NULL,
    FOREIGN KEY (node_id, seq) REFERENCES batches (node_id, seq)
) PARTITION BY RANGE (received_day);
CREATE TABLE IF NOT EXISTS allocations_default PARTITION OF allocations DEFAULT;
-- (run_id) alone was an index until schema 6: (run_id, node_id, seq) serves every lookup it did.
DROP INDEX IF EXISTS allocations_by_run;
CREATE INDEX IF NOT EXISTS allocations_by_run_batch ON allocations (run_id, node_id, seq);
CREATE INDEX IF NOT EXISTS allocations_by_batch ON allocations (node_id, seq);
-- A node's batches by seal time (a pruned run's batches, found from its hourly totals).
CREATE INDEX IF NOT EXISTS batches_by_seal ON batches (node_id, sealed_unix_ns);
CREATE INDEX IF NOT EXISTS batches_by_received ON batches (received_unix_ns);
-- Run totals per node, run, domain and hour of sealing, maintained in the transaction that
-- stores each batch: totals are an index lookup, not a scan of the allocations.
CREATE TABLE IF NOT EXISTS run_totals_hourly (
    node_id TEXT NOT NULL,
    run_id TEXT NOT NULL,
    domain TEXT NOT NULL,
    hour BIGINT NOT NULL,
    -- The energy as the sums of its high and low 32-bit halves: exact however large the
    -- values a node signs (each sum fits for 2^31 allocations an hour).
    energy_hi BIGINT NOT NULL,
    energy_lo BIGINT NOT NULL,
    PRIMARY KEY (node_id, run_id, domain, hour)
);
CREATE INDEX IF NOT EXISTS run_totals_hourly_by_run ON run_totals_hourly (run_id);
CREATE TABLE IF NOT EXISTS rotations (
    node_id TEXT NOT NULL,
    new_key_epoch BIGINT NOT NULL,
    new_public_key BYTEA NOT NULL,
    new_key_id BYTEA NOT NULL,
    effective_seq BIGINT NOT NULL,
    announced_seq BIGINT NOT NULL,
    PRIMARY KEY (node_id, new_key_epoch)
);
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY,
    highest_seen_seq BIGINT NOT NULL DEFAULT 0,
    announced_sealed_seq BIGINT NOT NULL DEFAULT 0,
    last_heartbeat_sent_unix_ns BIGINT,
    last_heartbeat_received_unix_ns BIGINT
);
CREATE TABLE IF NOT EXISTS forks (
    node_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    kind TEXT NOT NULL,
    stored_hash BYTEA NOT NULL,
    received_hash BYTEA NOT NULL,
    received_signed_batch BYTEA NOT NULL,
    first_detected_unix_ns BIGINT NOT NULL,
    last_detected_unix_ns BIGINT NOT NULL,
    times_seen BIGINT NOT NULL,
    PRIMARY KEY (node_id, seq, received_hash)
);
CREATE TABLE IF NOT EXISTS lost_ranges (
    node_id TEXT NOT NULL,
    first_seq BIGINT NOT NULL CHECK (first_seq >= 1),
    last_seq BIGINT NOT NULL,
    last_hash BYTEA NOT NULL,
    next_key_epoch BIGINT NOT NULL,
    next_key_id BYTEA NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    stated_unix_ns BIGINT NOT NULL,
    recorded_unix_ns BIGINT NOT NULL,
    statement BYTEA NOT NULL,
    PRIMARY KEY (node_id, first_seq),
    CHECK (last_seq >= first_seq)
);
CREATE UNIQUE INDEX IF NOT EXISTS lost_ranges_by_last ON lost_ranges (node_id, last_seq);
CREATE TABLE IF NOT EXISTS node_clock (
    node_id TEXT PRIMARY KEY,
    first_seen_unix_ns BIGINT NOT NULL,
    measured_ns BIGINT NOT NULL,
    last_seq BIGINT NOT NULL,
    last_index BIGINT,
    last_boot TEXT NOT NULL,
    last_end_mono_ns BIGINT NOT NULL,
    last_end_unix_ns BIGINT NOT NULL,
    gap_pending BIGINT NOT NULL,
    undeclared_holes BIGINT NOT NULL,
    implausible BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS quarantined (
    node_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    interval_index BIGINT NOT NULL,
    domain TEXT NOT NULL,
    run_id TEXT NOT NULL,
    active_uj BIGINT NOT NULL,
    idle_uj BIGINT NOT NULL,
    energy_uj BIGINT NOT NULL,
    usage_us BIGINT NOT NULL,
    reason TEXT NOT NULL,
    FOREIGN KEY (node_id, seq) REFERENCES batches (node_id, seq)
);
CREATE INDEX IF NOT EXISTS quarantined_by_batch ON quarantined (node_id, seq);
CREATE TABLE IF NOT EXISTS run_labels (
    node_id TEXT NOT NULL,
    run_id TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    seq BIGINT NOT NULL,
    PRIMARY KEY (node_id, run_id, key)
);
CREATE TABLE IF NOT EXISTS run_finals (
    node_id TEXT NOT NULL,
    run_id TEXT NOT NULL,
    final_usage TEXT NOT NULL,
    reconciled_usage_us BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    PRIMARY KEY (node_id, run_id)
);
CREATE TABLE IF NOT EXISTS read_audit (
    id BIGSERIAL PRIMARY KEY,
    at_unix_ns BIGINT NOT NULL,
    reader TEXT NOT NULL,
    role TEXT NOT NULL,
    call TEXT NOT NULL,
    filters TEXT NOT NULL,
    rows_returned BIGINT NOT NULL,
    outcome TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS read_audit_by_time ON read_audit (at_unix_ns);
";

const SQL_HASH_AT: &str = "SELECT hash FROM batches WHERE node_id = $1 AND seq = $2";
/// The chain tip: the highest stored batch or declared lost range.
const SQL_TIP: &str = "SELECT seq, hash FROM \
     (SELECT seq, hash FROM batches WHERE node_id = $1 ORDER BY seq DESC LIMIT 1) AS b \
     UNION ALL SELECT seq, hash FROM \
     (SELECT last_seq AS seq, last_hash AS hash FROM lost_ranges WHERE node_id = $1 \
      ORDER BY last_seq DESC LIMIT 1) AS l ORDER BY seq DESC LIMIT 1";
/// A batch's predecessor: a stored batch, or a lost range ending just before it.
const SQL_PRED: &str = "SELECT hash, key_epoch, key_id, rotation_epoch, rotation_key_id \
     FROM batches WHERE node_id = $1 AND seq = $2 \
     UNION ALL SELECT last_hash, next_key_epoch, next_key_id, NULL, NULL \
     FROM lost_ranges WHERE node_id = $1 AND last_seq = $2 LIMIT 1";
/// Serialises the writers of one node's chain (a batch commit and a lost range could
/// otherwise both claim one seq: their primary keys are in different tables).
const SQL_NODE_LOCK: &str = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))";
const SQL_KEY_AT: &str = "SELECT key_epoch, rotation_epoch FROM batches \
     WHERE node_id = $1 AND seq = $2 \
     UNION ALL SELECT next_key_epoch, NULL FROM lost_ranges \
     WHERE node_id = $1 AND last_seq = $2 LIMIT 1";
const SQL_IN_LOST: &str = "SELECT first_seq, last_seq FROM lost_ranges \
     WHERE node_id = $1 AND first_seq <= $2 AND last_seq >= $2";
const SQL_INSERT_BATCH: &str = "INSERT INTO batches (node_id, seq, key_epoch, key_id, prev_hash, \
     hash, signed_batch, sealed_unix_ns, intervals, rotation_epoch, rotation_key_id, \
     received_unix_ns) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)";
/// The hourly run totals of one batch's billed allocations, added in its transaction.
const SQL_ROLLUP_UPSERT_PG: &str = "INSERT INTO run_totals_hourly (node_id, hour, run_id, domain, \
     energy_hi, energy_lo) SELECT $1, $2, * FROM UNNEST($3::text[], $4::text[], $5::bigint[], \
     $6::bigint[]) ON CONFLICT (node_id, run_id, domain, hour) \
     DO UPDATE SET energy_hi = run_totals_hourly.energy_hi + EXCLUDED.energy_hi, \
     energy_lo = run_totals_hourly.energy_lo + EXCLUDED.energy_lo";
const SQL_INSERT_ALLOCATIONS: &str = "INSERT INTO allocations (node_id, seq, received_day, \
     interval_index, domain, run_id, active_uj, idle_uj, energy_uj, usage_us) \
     SELECT $1, $2, $3, * FROM UNNEST($4::bigint[], $5::text[], $6::text[], $7::bigint[], \
     $8::bigint[], $9::bigint[], $10::bigint[]) \
     WHERE $11::bigint >= COALESCE((SELECT value FROM ledger_meta \
     WHERE key = 'detail_from_unix_ns'), $11::bigint)";
/// Before a partition is created or dropped: `batches` first, as a commit takes it before
/// `allocations` (the partition's foreign key locks `batches` too), so neither waits on the
/// other in the opposite order.
const SQL_LOCK_FOR_PARTITIONS: &str = "LOCK TABLE batches IN SHARE ROW EXCLUSIVE MODE; \
     LOCK TABLE allocations IN ACCESS EXCLUSIVE MODE";
const SQL_INSERT_QUARANTINED: &str = "INSERT INTO quarantined (node_id, seq, interval_index, \
     domain, run_id, active_uj, idle_uj, energy_uj, usage_us, reason) \
     SELECT $1, $2, * FROM UNNEST($3::bigint[], $4::text[], $5::text[], $6::bigint[], \
     $7::bigint[], $8::bigint[], $9::bigint[], $10::text[])";
const SQL_INSERT_LABELS: &str = "INSERT INTO run_labels (node_id, seq, run_id, key, value) \
     SELECT $1, $2, * FROM UNNEST($3::text[], $4::text[], $5::text[]) \
     ON CONFLICT (node_id, run_id, key) DO NOTHING";
const SQL_INSERT_FINALS: &str = "INSERT INTO run_finals (node_id, seq, run_id, final_usage, \
     reconciled_usage_us) SELECT $1, $2, * FROM UNNEST($3::text[], $4::text[], $5::bigint[]) \
     ON CONFLICT (node_id, run_id) DO NOTHING";
const SQL_INSERT_ROTATION: &str = "INSERT INTO rotations (node_id, new_key_epoch, \
     new_public_key, new_key_id, effective_seq, announced_seq) VALUES ($1, $2, $3, $4, $5, $6) \
     ON CONFLICT (node_id, new_key_epoch) DO NOTHING";

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
    statements: HashMap<&'static str, Statement>,
}

impl PgConn {
    async fn statement(&mut self, sql: &'static str) -> Result<Statement, StoreError> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql).await?;
        self.statements.insert(sql, s.clone());
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
    client
        .batch_execute("SET synchronous_commit = on; SET statement_timeout = '30s'")
        .await?;
    Ok(client)
}

impl PgStore {
    pub async fn open(url: &str, mode: OpenMode) -> Result<Self, StoreError> {
        let target = PgTarget::parse(url).map_err(StoreError::Url)?;
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

async fn commit_once(
    c: &mut PgConn,
    b: &VerifiedBatch,
    limits: &NodeLimits,
    received_unix_ns: i64,
) -> Result<Commit, StoreError> {
    let seq = to_i64(b.seq, "seq")?;
    let st_hash = c.statement(SQL_HASH_AT).await?;
    let st_pred = c.statement(SQL_PRED).await?;
    let st_tip = c.statement(SQL_TIP).await?;
    let st_batch = c.statement(SQL_INSERT_BATCH).await?;
    let st_alloc = c.statement(SQL_INSERT_ALLOCATIONS).await?;
    let st_rot = c.statement(SQL_INSERT_ROTATION).await?;
    let st_lost = c.statement(SQL_IN_LOST).await?;
    let st_lock = c.statement(SQL_NODE_LOCK).await?;
    let st_clock = c.statement(SQL_CLOCK).await?;
    let st_quarantined = c.statement(SQL_INSERT_QUARANTINED).await?;
    let st_upsert = c.statement(SQL_UPSERT_CLOCK).await?;
    let st_labels = c.statement(SQL_INSERT_LABELS).await?;
    let st_finals = c.statement(SQL_INSERT_FINALS).await?;
    let st_rollup = c.statement(SQL_ROLLUP_UPSERT_PG).await?;
    let tx = c.client.transaction().await?;
    tx.execute(&st_lock, &[&b.node_id]).await?;
    if let Some(h) = hash_row(tx.query_opt(&st_hash, &[&b.node_id, &seq]).await?)? {
        return Ok(if h == b.hash {
            Commit::Duplicate
        } else {
            Commit::Fork { stored_hash: h }
        });
    }
    if let Some(r) = tx.query_opt(&st_lost, &[&b.node_id, &seq]).await? {
        return Ok(Commit::InLostRange {
            first_seq: to_u64(r.get(0), "lost_ranges.first_seq")?,
            last_seq: to_u64(r.get(1), "lost_ranges.last_seq")?,
        });
    }
    if b.seq > 1 {
        let Some(pred) = tx.query_opt(&st_pred, &[&b.node_id, &(seq - 1)]).await? else {
            let tip = match tx.query_opt(&st_tip, &[&b.node_id]).await? {
                Some(r) => to_u64(r.get(0), "batches.seq")?,
                None => 0,
            };
            return Ok(Commit::NotNext { tip });
        };
        let hash = to_hash(pred.get::<_, &[u8]>(0), "batches.hash")?;
        if hash != b.prev_hash {
            return Ok(Commit::ChainBreak {
                predecessor_hash: hash,
            });
        }
        let rot_epoch: Option<i64> = pred.get(3);
        let rot_key: Option<&[u8]> = pred.get(4);
        let (e, k) = match (rot_epoch, rot_key) {
            (Some(e), Some(k)) => (e, k),
            _ => (pred.get::<_, i64>(1), pred.get::<_, &[u8]>(2)),
        };
        let expected_epoch = u32::try_from(e)
            .map_err(|_| StoreError::Corrupt(format!("key epoch {e} out of range")))?;
        let expected_key_id = to_key_id(k, "batches.key_id")?;
        if expected_epoch != b.key_epoch || expected_key_id != b.key_id {
            return Ok(Commit::KeyDiscontinuity {
                expected_epoch,
                expected_key_id,
            });
        }
    }
    let rotation_epoch = b.rotation.as_ref().map(|r| i64::from(r.epoch));
    let rotation_key = b.rotation.as_ref().map(|r| r.key_id.to_vec());
    let params: [&(dyn ToSql + Sync); 12] = [
        &b.node_id,
        &seq,
        &i64::from(b.key_epoch),
        &b.key_id.as_slice(),
        &b.prev_hash.as_slice(),
        &b.hash.as_slice(),
        &b.bytes,
        &b.sealed_unix_ns,
        &to_i64(b.intervals, "intervals")?,
        &rotation_epoch,
        &rotation_key,
        &received_unix_ns,
    ];
    match tx.execute(&st_batch, &params).await {
        Ok(_) => {}
        // Another process inserted (node, seq) since the check above: it won the race.
        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
            drop(tx);
            let h = hash_row(c.client.query_opt(&st_hash, &[&b.node_id, &seq]).await?)?;
            return match h {
                Some(h) if h == b.hash => Ok(Commit::Duplicate),
                Some(h) => Ok(Commit::Fork { stored_hash: h }),
                None => Err(StoreError::Corrupt(format!(
                    "unique violation on node {:?} seq {seq} but no row there",
                    b.node_id
                ))),
            };
        }
        Err(e) => return Err(e.into()),
    }
    let clock = tx
        .query_opt(&st_clock, &[&b.node_id])
        .await?
        .map(|r| clock_columns(&r).into_clock());
    let (verdict, clock) = judge(limits, clock, b.seq, &b.facts, received_unix_ns);
    let (billed, quarantined) = split_allocations(b, &verdict);
    if !quarantined.is_empty() {
        let q = &quarantined;
        let index: Vec<i64> = q.iter().map(|(x, _)| x.interval_index).collect();
        let domain: Vec<&str> = q.iter().map(|(x, _)| x.domain.as_str()).collect();
        let run: Vec<&str> = q.iter().map(|(x, _)| x.run_id.as_str()).collect();
        let active: Vec<i64> = q.iter().map(|(x, _)| x.active_uj).collect();
        let idle: Vec<i64> = q.iter().map(|(x, _)| x.idle_uj).collect();
        let energy: Vec<i64> = q.iter().map(|(x, _)| x.energy_uj).collect();
        let usage: Vec<i64> = q.iter().map(|(x, _)| x.usage_us).collect();
        let reason: Vec<&str> = q.iter().map(|(_, r)| *r).collect();
        tx.execute(
            &st_quarantined,
            &[
                &b.node_id, &seq, &index, &domain, &run, &active, &idle, &energy, &usage, &reason,
            ],
        )
        .await?;
    }
    if !b.run_labels.is_empty() {
        // The first value recorded for a run's label stays (a run's labels do not change).
        let run: Vec<&str> = b.run_labels.iter().map(|l| l.run_id.as_str()).collect();
        let key: Vec<&str> = b.run_labels.iter().map(|l| l.key.as_str()).collect();
        let value: Vec<&str> = b.run_labels.iter().map(|l| l.value.as_str()).collect();
        tx.execute(&st_labels, &[&b.node_id, &seq, &run, &key, &value])
            .await?;
    }
    if !b.run_finals.is_empty() {
        // A run finishes once: its first summary stays.
        let run: Vec<&str> = b.run_finals.iter().map(|f| f.run_id.as_str()).collect();
        let how: Vec<&str> = b
            .run_finals
            .iter()
            .map(|f| f.final_usage.as_str())
            .collect();
        let us: Vec<i64> = b.run_finals.iter().map(|f| f.reconciled_usage_us).collect();
        tx.execute(&st_finals, &[&b.node_id, &seq, &run, &how, &us])
            .await?;
    }
    let cc = ClockColumns::from_clock(&clock);
    tx.execute(
        &st_upsert,
        &[
            &b.node_id,
            &cc.first_seen_unix_ns,
            &cc.measured_ns,
            &cc.last_seq,
            &cc.last_index,
            &cc.last_boot,
            &cc.last_end_mono_ns,
            &cc.last_end_unix_ns,
            &cc.gap_pending,
            &cc.undeclared_holes,
            &cc.implausible,
        ],
    )
    .await?;
    if !billed.is_empty() {
        let a = &billed;
        let index: Vec<i64> = a.iter().map(|x| x.interval_index).collect();
        let domain: Vec<&str> = a.iter().map(|x| x.domain.as_str()).collect();
        let run: Vec<&str> = a.iter().map(|x| x.run_id.as_str()).collect();
        let active: Vec<i64> = a.iter().map(|x| x.active_uj).collect();
        let idle: Vec<i64> = a.iter().map(|x| x.idle_uj).collect();
        let energy: Vec<i64> = a.iter().map(|x| x.energy_uj).collect();
        let usage: Vec<i64> = a.iter().map(|x| x.usage_us).collect();
        tx.execute(
            &st_alloc,
            &[
                &b.node_id,
                &seq,
                &received_unix_ns.div_euclid(DAY_NS),
                &index,
                &domain,
                &run,
                &active,
                &idle,
                &energy,
                &usage,
                // A batch received before `detail_from_unix_ns` (a clock stepped back past the
                // retention) is one whose rows are pruned: reads decode it. The INSERT waits
                // for a pruning under way, and then sees its `detail_from_unix_ns`.
                &received_unix_ns,
            ],
        )
        .await?;
        let sums = rollup(&billed)?;
        let run: Vec<&str> = sums.keys().map(|(r, _)| *r).collect();
        let domain: Vec<&str> = sums.keys().map(|(_, d)| *d).collect();
        let hi: Vec<i64> = sums.values().map(|(h, _)| *h).collect();
        let lo: Vec<i64> = sums.values().map(|(_, l)| *l).collect();
        tx.execute(
            &st_rollup,
            &[
                &b.node_id,
                &hour_of(b.sealed_unix_ns),
                &run,
                &domain,
                &hi,
                &lo,
            ],
        )
        .await?;
    }
    if let Some(r) = &b.rotation {
        tx.execute(
            &st_rot,
            &[
                &b.node_id,
                &i64::from(r.epoch),
                &r.public_key.as_slice(),
                &r.key_id.as_slice(),
                &to_i64(r.effective_seq, "effective_seq")?,
                &seq,
            ],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(Commit::Stored { verdict })
}

fn clock_columns(r: &tokio_postgres::Row) -> ClockColumns {
    ClockColumns {
        first_seen_unix_ns: r.get(0),
        measured_ns: r.get(1),
        last_seq: r.get(2),
        last_index: r.get(3),
        last_boot: r.get(4),
        last_end_mono_ns: r.get(5),
        last_end_unix_ns: r.get(6),
        gap_pending: r.get(7),
        undeclared_holes: r.get(8),
        implausible: r.get(9),
    }
}

async fn record_loss_once(c: &mut PgConn, l: &LossRecord) -> Result<LossOutcome, StoreError> {
    let st_tip = c.statement(SQL_TIP).await?;
    let st_lock = c.statement(SQL_NODE_LOCK).await?;
    let st_key = c.statement(SQL_KEY_AT).await?;
    let st_rot = c.statement(SQL_INSERT_ROTATION).await?;
    let tx = c.client.transaction().await?;
    tx.execute(&st_lock, &[&l.node_id]).await?;
    let tip = match tx.query_opt(&st_tip, &[&l.node_id]).await? {
        Some(r) => to_u64(r.get(0), "tip")?,
        None => 0,
    };
    if tip + 1 != l.first_seq {
        return Ok(LossOutcome::NotNext { tip });
    }
    if let Some(r) = tx
        .query_opt(&st_key, &[&l.node_id, &to_i64(tip, "seq")?])
        .await?
    {
        let expected: i64 = r.get::<_, Option<i64>>(1).unwrap_or(r.get(0));
        if i64::from(l.signer_epoch) < expected || i64::from(l.next_key_epoch) < expected {
            return Ok(LossOutcome::StaleKey {
                expected_epoch: u32::try_from(expected).unwrap_or(u32::MAX),
            });
        }
    }
    let params: [&(dyn ToSql + Sync); 11] = [
        &l.node_id,
        &to_i64(l.first_seq, "first_seq")?,
        &to_i64(l.last_seq, "last_seq")?,
        &l.last_hash.as_slice(),
        &i64::from(l.next_key_epoch),
        &l.next_key_id.as_slice(),
        &l.reason,
        &l.detail,
        &l.stated_unix_ns,
        &l.recorded_unix_ns,
        &l.statement,
    ];
    let inserted = tx
        .execute(
            "INSERT INTO lost_ranges (node_id, first_seq, last_seq, last_hash, next_key_epoch, \
             next_key_id, reason, detail, stated_unix_ns, recorded_unix_ns, statement) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            &params,
        )
        .await;
    match inserted {
        Ok(_) => {}
        // Another process recorded a range there first: its tip moved.
        Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
            drop(tx);
            let tip = match c.client.query_opt(&st_tip, &[&l.node_id]).await? {
                Some(r) => to_u64(r.get(0), "tip")?,
                None => 0,
            };
            return Ok(LossOutcome::NotNext { tip });
        }
        Err(e) => return Err(e.into()),
    }
    if !l.rotations.is_empty() {
        for r in &l.rotations {
            tx.execute(
                &st_rot,
                &[
                    &l.node_id,
                    &i64::from(r.epoch),
                    &r.public_key.as_slice(),
                    &r.key_id.as_slice(),
                    &to_i64(r.effective_seq, "effective_seq")?,
                    &to_i64(r.announced_seq, "announced_seq")?,
                ],
            )
            .await?;
        }
    }
    tx.commit().await?;
    Ok(LossOutcome::Recorded)
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
        let mut p = self.conn().await?;
        let c = p.get()?;
        let rows = c
            .client
            .query(
                "SELECT new_key_epoch, new_public_key, new_key_id, effective_seq, announced_seq \
                 FROM rotations WHERE node_id = $1 ORDER BY new_key_epoch",
                &[&node],
            )
            .await?;
        let mut out = Vec::new();
        for r in rows {
            let epoch: i64 = r.get(0);
            out.push(LearntKey {
                epoch: u32::try_from(epoch)
                    .map_err(|_| StoreError::Corrupt(format!("epoch {epoch}")))?,
                public_key: r.get::<_, &[u8]>(1).try_into().map_err(|_| {
                    StoreError::Corrupt("rotations.new_public_key not 32 bytes".into())
                })?,
                key_id: to_key_id(r.get::<_, &[u8]>(2), "rotations.new_key_id")?,
                effective_seq: to_u64(r.get(3), "rotations.effective_seq")?,
                announced_seq: to_u64(r.get(4), "rotations.announced_seq")?,
            });
        }
        Ok(out)
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
        let (after, upto) = (to_i64(after_seq, "seq")?, to_i64(upto_seq, "seq")?);
        let mut p = self.conn().await?;
        let c = p.get()?;
        let (tx, from) = detail_read(&mut c.client, true).await?;
        let mut decoded = RunTotals::new();
        if from > i64::MIN {
            for r in tx
                .query(SQL_PRUNED_BETWEEN, &[&node, &after, &upto, &from])
                .await?
            {
                // The billed ones: the quarantined rows are kept, and read below.
                let seq: i64 = r.get(0);
                let q = quarantined_of(&tx, node, seq).await?;
                let billed = detail::billed_of(node, to_u64(seq, "batches.seq")?, r.get(1), &q)?;
                detail::add_rows(&mut decoded, node, &billed, "");
            }
        }
        let rows = tx
            .query(
                // Quarantined rows too: the node's checkpoints count them, so a lost range's
                // price must not take them for lost energy.
                "SELECT run_id, domain, SUM(energy_uj)::text FROM \
                 (SELECT run_id, domain, energy_uj FROM allocations \
                  WHERE node_id = $1 AND seq > $2 AND seq <= $3 \
                  UNION ALL SELECT run_id, domain, energy_uj FROM quarantined \
                  WHERE node_id = $1 AND seq > $2 AND seq <= $3) AS a GROUP BY run_id, domain",
                &[&node, &after, &upto],
            )
            .await?;
        tx.commit().await?;
        let out = rows
            .into_iter()
            .map(|r| {
                let total: &str = r.get(2);
                Ok(RunDomainTotal {
                    node_id: node.to_owned(),
                    run_id: r.get(0),
                    domain: r.get(1),
                    energy_uj: total
                        .parse()
                        .map_err(|_| StoreError::Corrupt(format!("energy sum {total:?}")))?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(detail::merge_totals(out, decoded))
    }

    async fn run_totals(&self) -> Result<Vec<RunDomainTotal>, StoreError> {
        self.run_totals_where(TotalsFilter::default()).await
    }

    async fn run_finals(&self) -> Result<Vec<(String, String, String, u64)>, StoreError> {
        let mut p = self.conn().await?;
        let c = p.get()?;
        let rows = c
            .client
            .query(
                "SELECT node_id, run_id, final_usage, reconciled_usage_us FROM run_finals \
                 ORDER BY node_id, run_id",
                &[],
            )
            .await?;
        rows.into_iter()
            .map(|r| {
                Ok((
                    r.get(0),
                    r.get(1),
                    r.get(2),
                    to_u64(r.get(3), "run_finals.reconciled_usage_us")?,
                ))
            })
            .collect()
    }

    async fn run_totals_where(
        &self,
        filter: TotalsFilter,
    ) -> Result<Vec<RunDomainTotal>, StoreError> {
        let (clause, params, from_rollup) = totals_where(&filter);
        let params: Vec<Box<dyn ToSql + Sync + Send>> = params
            .into_iter()
            .map(|p| -> Box<dyn ToSql + Sync + Send> {
                match p {
                    Param::Text(t) => Box::new(t),
                    Param::Int(i) => Box::new(i),
                }
            })
            .collect();
        let refs: Vec<&(dyn ToSql + Sync)> = params
            .iter()
            .map(|p| p.as_ref() as &(dyn ToSql + Sync))
            .collect();
        let (_read, mut p) = self.read_conn().await?;
        let c = p.get()?;
        // Rows and pruned detail in one snapshot (the rollup needs neither).
        let (tx, from) = detail_read(&mut c.client, !from_rollup).await?;
        // SUM(bigint) is numeric in PostgreSQL: exact, never overflows; read it as text.
        let total = if from_rollup {
            "(SUM(a.energy_hi) * 4294967296 + SUM(a.energy_lo))::text"
        } else {
            "SUM(a.energy_uj)::text"
        };
        let rows = tx
            .query(
                &format!(
                    "SELECT a.node_id, a.run_id, a.domain, {total}{clause} \
                     GROUP BY a.node_id, a.run_id, a.domain \
                     ORDER BY a.node_id, a.run_id, a.domain"
                ),
                &refs,
            )
            .await?;
        let out = rows
            .into_iter()
            .map(|r| {
                let total: &str = r.get(3);
                Ok(RunDomainTotal {
                    node_id: r.get(0),
                    run_id: r.get(1),
                    domain: r.get(2),
                    energy_uj: total
                        .parse()
                        .map_err(|_| StoreError::Corrupt(format!("energy sum {total:?}")))?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        if from_rollup || from == i64::MIN {
            tx.commit().await?;
            return Ok(out);
        }
        // Batches in the range whose rows were pruned: decoded.
        let run = filter.run_id.clone().unwrap_or_default();
        let node = filter.node_id.clone().unwrap_or_default();
        let lo = filter.from_unix_ns.unwrap_or(i64::MIN);
        // The end is exclusive; the query's inclusive.
        let hi = match filter.to_unix_ns {
            None => i64::MAX,
            Some(i64::MIN) => {
                tx.commit().await?;
                return Ok(out);
            }
            Some(t) => t - 1,
        };
        let mut decoded = RunTotals::new();
        let mut after = (String::new(), 0i64);
        loop {
            let page = tx
                .query(
                    detail::sql_pruned_in_range(&run),
                    &[
                        &from,
                        &lo,
                        &hi,
                        &node,
                        &run,
                        &after.0,
                        &after.1,
                        &PRUNED_PAGE,
                    ],
                )
                .await?;
            let full = page.len() as i64 == PRUNED_PAGE;
            for r in &page {
                let (n, seq): (&str, i64) = (r.get(0), r.get(1));
                let q = quarantined_of(&tx, n, seq).await?;
                let billed = detail::billed_of(n, to_u64(seq, "batches.seq")?, r.get(2), &q)?;
                detail::add_rows(&mut decoded, n, &billed, &run);
            }
            match page.last() {
                Some(r) if full => after = (r.get(0), r.get(1)),
                _ => break,
            }
        }
        tx.commit().await?;
        Ok(detail::merge_totals(out, decoded))
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
        let mut done = DetailUpkeep::default();
        let mut p = self.conn().await?;
        let c = p.get()?;
        let rows_off = retention == Some(std::time::Duration::ZERO);
        // No partitions ahead where no rows will go (a retention of zero).
        let wanted = if rows_off {
            Vec::new()
        } else {
            partitions_wanted(&c.client, now_unix_ns).await?
        };
        if !wanted.is_empty() {
            // The parent is locked first, as every commit locks it before its partition: a
            // partition created under a commit waits for it instead of deadlocking with it.
            let tx = c.client.transaction().await?;
            tx.batch_execute("SET LOCAL lock_timeout = '5s'").await?;
            tx.batch_execute(SQL_LOCK_FOR_PARTITIONS).await?;
            done.partitions_created = create_partitions(&tx, now_unix_ns).await?;
            tx.commit().await?;
        }
        let legacy_until = legacy_until(&c.client).await?;
        let mut from = c
            .client
            .query_opt(SQL_DETAIL_FROM, &[])
            .await?
            .map_or(i64::MIN, |r| r.get(0));
        // Rows off, yet day partitions there (made by a start's schema, or by another process
        // with another retention): they go too.
        let strays = rows_off
            && from == detail::NO_ROWS
            && c.client
                .query_one(
                    "SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
                     WHERE i.inhparent = 'allocations'::regclass \
                     AND (c.relname::text LIKE 'allocations\\_day\\_%' \
                     OR c.relname::text = 'allocations_legacy')",
                    &[],
                )
                .await?
                .get::<_, i64>(0)
                > 0;
        if let Some(retention) = retention {
            let cutoff = detail::cutoff(now_unix_ns, retention);
            // Every partition and row goes for a retention of zero.
            let cutoff_day = if cutoff == detail::NO_ROWS {
                i64::MAX
            } else {
                cutoff.div_euclid(DAY_NS)
            };
            if from < cutoff || strays {
                let tx = c.client.transaction().await?;
                // Readers of rows and pruned detail hold ACCESS SHARE from before their
                // snapshot: the partitions go between readers, never under one. Give up after
                // 5 s rather than queue every reader and writer behind a long read.
                tx.batch_execute("SET LOCAL lock_timeout = '5s'").await?;
                tx.batch_execute(SQL_LOCK_FOR_PARTITIONS).await?;
                let parts = tx
                    .query(
                        "SELECT c.relname::text FROM pg_inherits i \
                         JOIN pg_class c ON c.oid = i.inhrelid \
                         WHERE i.inhparent = 'allocations'::regclass",
                        &[],
                    )
                    .await?;
                for r in parts {
                    let name: String = r.get(0);
                    let drop = match name.strip_prefix("allocations_day_") {
                        Some(d) => d
                            .parse::<i64>()
                            .ok()
                            .filter(|d| *d < cutoff_day)
                            .map(|d| format!("allocations_day_{d}")),
                        None if name == "allocations_legacy" && legacy_until <= cutoff_day => {
                            Some(name)
                        }
                        None => None,
                    };
                    if let Some(table) = drop {
                        tx.batch_execute(&format!("DROP TABLE {table}")).await?;
                        done.partitions_dropped += 1;
                    }
                }
                done.rows_deleted = tx
                    .execute(
                        "DELETE FROM allocations_default WHERE received_day < $1",
                        &[&cutoff_day],
                    )
                    .await?;
                // The legacy partition holds every day up to the upgrade, so until the
                // retention passes that day it loses the rows of the batches it passes.
                if legacy_until > cutoff_day {
                    done.rows_deleted += tx
                        .execute(
                            "DELETE FROM allocations_legacy a USING batches b \
                             WHERE b.node_id = a.node_id AND b.seq = a.seq \
                             AND b.received_unix_ns < $1",
                            &[&cutoff],
                        )
                        .await?;
                }
                tx.execute(SQL_RAISE_DETAIL_FROM, &[&cutoff]).await?;
                tx.commit().await?;
                from = cutoff;
            }
        }
        done.detail_from_unix_ns = (from > i64::MIN).then_some(from);
        Ok(done)
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
        let after = to_i64(after_seq, "seq")?;
        let (_read, mut p) = self.read_conn().await?;
        let c = p.get()?;
        // One snapshot: the allocations read are those of the batches read.
        let (tx, from) = detail_read(&mut c.client, true).await?;
        let batches: Vec<RawBatch> = tx
            .query(SQL_BATCHES_ABOVE, &[&node, &after, &i64::from(limit)])
            .await?
            .iter()
            .map(pg_raw_batch)
            .collect();
        let Some(last) = batches.last().map(|b| b.1) else {
            return Ok(Vec::new());
        };
        let allocations: Vec<RawAllocation> = tx
            .query(
                SQL_ALLOCATIONS_BETWEEN,
                &[&node, &after, &last, &account_label],
            )
            .await?
            .iter()
            .map(pg_raw_allocation)
            .collect();
        let mut out = assemble(batches, allocations)?;
        if from > i64::MIN {
            let pruned: std::collections::HashSet<i64> = tx
                .query(SQL_PRUNED_BETWEEN, &[&node, &after, &last, &from])
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            for b in &mut out {
                if pruned.contains(&to_i64(b.seq, "seq")?) {
                    fill_pruned(&tx, b, "", account_label).await?;
                }
            }
        }
        tx.commit().await?;
        Ok(out)
    }

    async fn run_batches(
        &self,
        run: &str,
        node: &str,
        after: (&str, u64),
        limit: u32,
        account_label: &str,
    ) -> Result<Vec<BatchEnergy>, StoreError> {
        let after_seq = to_i64(after.1, "seq")?;
        let limit = i64::from(limit);
        let (_read, mut p) = self.read_conn().await?;
        let c = p.get()?;
        let (tx, from) = detail_read(&mut c.client, true).await?;
        let params: [&(dyn ToSql + Sync); 5] = [&run, &node, &after.0, &after_seq, &limit];
        let batches: Vec<RawBatch> = tx
            .query(SQL_RUN_BATCHES, &params)
            .await?
            .iter()
            .map(pg_raw_batch)
            .collect();
        let with_label: [&(dyn ToSql + Sync); 6] =
            [&run, &node, &after.0, &after_seq, &limit, &account_label];
        let allocations: Vec<RawAllocation> = tx
            .query(SQL_RUN_ALLOCATIONS, &with_label)
            .await?
            .iter()
            .map(pg_raw_allocation)
            .collect();
        let stored = assemble(batches, allocations)?;
        if from == i64::MIN {
            tx.commit().await?;
            return Ok(stored);
        }
        // Pruned batches of the hours the run has totals in, decoded: those that billed it.
        let want = usize::try_from(limit).unwrap_or(usize::MAX);
        let mut pruned = Vec::new();
        let mut at = (after.0.to_owned(), after_seq);
        while pruned.len() < want {
            let page: Vec<RawBatch> = tx
                .query(
                    SQL_PRUNED_OF_RUN,
                    &[&run, &node, &from, &at.0, &at.1, &PRUNED_PAGE],
                )
                .await?
                .iter()
                .map(pg_raw_batch)
                .collect();
            let full = page.len() as i64 == PRUNED_PAGE;
            if let Some(last) = page.last() {
                at = (last.0.clone(), last.1);
            }
            for mut b in assemble(page, Vec::new())? {
                fill_pruned(&tx, &mut b, run, account_label).await?;
                if !b.allocations.is_empty() && pruned.len() < want {
                    pruned.push(b);
                }
            }
            if !full {
                break;
            }
        }
        // The first `want` of both in the database's order of node ids (its collation, which
        // the cursor's `node_id > $3` follows), not Rust's.
        let mut all: HashMap<(String, u64), BatchEnergy> = stored
            .into_iter()
            .chain(pruned)
            .map(|b| ((b.node_id.clone(), b.seq), b))
            .collect();
        let mut nodes = Vec::with_capacity(all.len());
        let mut seqs = Vec::with_capacity(all.len());
        for (n, s) in all.keys() {
            nodes.push(n.clone());
            seqs.push(to_i64(*s, "seq")?);
        }
        let order = tx
            .query(
                "SELECT n, s FROM UNNEST($1::text[], $2::bigint[]) AS t(n, s) \
                 ORDER BY n, s LIMIT $3",
                &[&nodes, &seqs, &limit],
            )
            .await?;
        tx.commit().await?;
        let mut out = Vec::with_capacity(order.len());
        for r in order {
            let key = (r.get::<_, String>(0), to_u64(r.get(1), "seq")?);
            if let Some(b) = all.remove(&key) {
                out.push(b);
            }
        }
        Ok(out)
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
        let mut p = self.conn().await?;
        let c = p.get()?;
        let mut nodes: BTreeMap<String, NodeRow> = BTreeMap::new();
        for r in c
            .client
            .query(
                "SELECT b.node_id, b.seq, b.key_epoch, b.sealed_unix_ns, b.received_unix_ns, \
                 s.n, s.iv::bigint FROM batches b JOIN \
                 (SELECT node_id, MAX(seq) AS m, COUNT(*) AS n, SUM(intervals) AS iv \
                  FROM batches GROUP BY node_id) s \
                 ON b.node_id = s.node_id AND b.seq = s.m",
                &[],
            )
            .await?
        {
            let node_id: String = r.get(0);
            let row = nodes.entry(node_id.clone()).or_default();
            row.node_id = node_id;
            row.last_seq = to_u64(r.get(1), "seq")?;
            row.key_epoch = u32::try_from(r.get::<_, i64>(2)).ok();
            row.last_sealed_unix_ns = Some(r.get(3));
            row.last_received_unix_ns = Some(r.get(4));
            row.batches = to_u64(r.get(5), "count")?;
            row.intervals = to_u64(r.get(6), "intervals")?;
        }
        for r in c
            .client
            .query(
                "SELECT node_id, highest_seen_seq, announced_sealed_seq, \
                 last_heartbeat_sent_unix_ns, last_heartbeat_received_unix_ns FROM nodes",
                &[],
            )
            .await?
        {
            let node_id: String = r.get(0);
            let row = nodes.entry(node_id.clone()).or_default();
            row.node_id = node_id;
            row.highest_seen_seq = to_u64(r.get(1), "highest_seen_seq")?;
            row.announced_sealed_seq = to_u64(r.get(2), "announced_sealed_seq")?;
            row.last_heartbeat_sent_unix_ns = r.get(3);
            row.last_heartbeat_received_unix_ns = r.get(4);
        }
        for r in c
            .client
            .query(
                "SELECT node_id, seq, kind, stored_hash, received_hash, first_detected_unix_ns, \
                 last_detected_unix_ns, times_seen FROM forks ORDER BY node_id, seq, \
                 first_detected_unix_ns",
                &[],
            )
            .await?
        {
            let node_id: String = r.get(0);
            let row = nodes.entry(node_id.clone()).or_default();
            row.node_id = node_id;
            row.forks.push(ForkRow {
                seq: to_u64(r.get(1), "forks.seq")?,
                kind: r.get(2),
                stored_sha256: wattd_records::durable::hex(r.get::<_, &[u8]>(3)),
                received_sha256: wattd_records::durable::hex(r.get::<_, &[u8]>(4)),
                first_detected_unix_ns: r.get(5),
                last_detected_unix_ns: r.get(6),
                times_seen: to_u64(r.get(7), "forks.times_seen")?,
            });
        }
        for r in c
            .client
            .query(
                "SELECT l.node_id, l.first_seq, l.last_seq, l.reason, l.detail, \
                 l.stated_unix_ns, l.recorded_unix_ns, l.statement, \
                 (SELECT signed_batch FROM batches b WHERE b.node_id = l.node_id \
                  AND b.seq = l.first_seq - 1), \
                 (SELECT signed_batch FROM batches b WHERE b.node_id = l.node_id \
                  AND b.seq = l.last_seq + 1) \
                 FROM lost_ranges l ORDER BY l.node_id, l.first_seq",
                &[],
            )
            .await?
        {
            let node_id: String = r.get(0);
            let row = nodes.entry(node_id.clone()).or_default();
            row.node_id = node_id;
            let lost = LostRangeRow {
                first_seq: to_u64(r.get(1), "lost_ranges.first_seq")?,
                last_seq: to_u64(r.get(2), "lost_ranges.last_seq")?,
                reason: r.get(3),
                detail: r.get(4),
                stated_unix_ns: r.get(5),
                recorded_unix_ns: r.get(6),
                statement_sha256: wattd_records::durable::hex(&wattd_records::batch::chain_hash(
                    r.get::<_, &[u8]>(7),
                )),
                before: r.get(8),
                after: r.get(9),
            };
            row.last_seq = row.last_seq.max(lost.last_seq);
            row.lost.push(lost);
        }
        for r in c
            .client
            .query(
                "SELECT node_id, reason, COUNT(*), SUM(energy_uj)::text, MIN(seq), MAX(seq) \
                 FROM quarantined GROUP BY node_id, reason ORDER BY node_id, reason",
                &[],
            )
            .await?
        {
            let node_id: String = r.get(0);
            let total: &str = r.get(3);
            let row = nodes.entry(node_id.clone()).or_default();
            row.node_id = node_id;
            row.quarantined.push(QuarantineRow {
                reason: r.get(1),
                allocations: to_u64(r.get(2), "quarantined count")?,
                energy_uj: total
                    .parse()
                    .map_err(|_| StoreError::Corrupt(format!("energy sum {total:?}")))?,
                first_seq: to_u64(r.get(4), "quarantined.seq")?,
                last_seq: to_u64(r.get(5), "quarantined.seq")?,
            });
        }
        let st_clock = c.statement(SQL_CLOCK).await?;
        for (id, row) in &mut nodes {
            row.clock = c
                .client
                .query_opt(&st_clock, &[id])
                .await?
                .map(|r| clock_columns(&r).into_clock());
        }
        Ok(nodes.into_values().collect())
    }
}

/// Creates or upgrades the schema, in one transaction under an advisory lock (`serve`).
async fn make_schema(client: &mut Client) -> Result<(), StoreError> {
    let tx = client.transaction().await?;
    // The schema transaction may wait for another process's and, upgrading, fill the
    // rollup from every allocation: not bounded by the 30 s of ordinary statements.
    tx.batch_execute("SET LOCAL statement_timeout = 0").await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK_KEY])
        .await?;
    // Another process's commits take `batches`, then `allocations`: so does this
    // transaction, before any DDL touches either (an index made "if not exists" still
    // locks its table), so neither waits on the other in the opposite order. Every lock
    // after the advisory one within 10 s (the caller tries again): the commits of other
    // processes wait behind this transaction, so it must not wait long itself.
    let existing: bool = tx
        .query_one("SELECT to_regclass('batches') IS NOT NULL", &[])
        .await?
        .get(0);
    tx.batch_execute("SET LOCAL lock_timeout = '10s'").await?;
    if existing {
        tx.batch_execute(SQL_LOCK_FOR_PARTITIONS).await?;
    }
    let legacy = unpartition_legacy(&tx).await?;
    tx.batch_execute(SCHEMA).await?;
    if legacy {
        attach_legacy(&tx, crate::unix_now_ns()).await?;
    }
    // Today's partitions before the first batch goes in (the tables are locked above,
    // or were made by this transaction).
    create_partitions(&tx, crate::unix_now_ns()).await?;
    // A process of an older version still storing batches would add allocations the
    // backfill does not see: they wait for this transaction (stop them all before an
    // upgrade; `audit` names any hour that still differs).
    tx.batch_execute("LOCK TABLE allocations IN SHARE MODE")
        .await?;
    tx.execute(
        "INSERT INTO ledger_meta (key, value) VALUES ('schema_version', $1) \
         ON CONFLICT (key) DO NOTHING",
        &[&SCHEMA_VERSION],
    )
    .await?;
    // 1 -> 2 -> 3 -> 4 only added tables (created above); 4 -> 5 fills the hourly
    // run totals from the stored allocations, once.
    tx.execute(SQL_BACKFILL_ROLLUP, &[]).await?;
    tx.execute(SQL_UPGRADE_VERSION, &[]).await?;
    tx.commit().await?;
    Ok(())
}

/// Batches `audit` reads per query.
const AUDIT_PAGE: i64 = 500;

/// A read-only snapshot for a read that may combine allocation rows with pruned detail, and
/// the point before which batches have no rows (`i64::MIN`: all have). With `lock`, ACCESS
/// SHARE on `allocations` is taken before the snapshot, so no partition is dropped under it.
async fn detail_read(
    client: &mut Client,
    lock: bool,
) -> Result<(tokio_postgres::Transaction<'_>, i64), StoreError> {
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    if !lock {
        return Ok((tx, i64::MIN));
    }
    tx.batch_execute("LOCK TABLE allocations IN ACCESS SHARE MODE")
        .await?;
    let from = tx
        .query_opt(SQL_DETAIL_FROM, &[])
        .await?
        .map_or(i64::MIN, |r| r.get(0));
    Ok((tx, from))
}

/// What was quarantined of a stored batch: (interval index, domain).
async fn quarantined_of(
    tx: &tokio_postgres::Transaction<'_>,
    node: &str,
    seq: i64,
) -> Result<Vec<detail::QuarantinedRow>, StoreError> {
    Ok(tx
        .query(SQL_QUARANTINED_OF, &[&node, &seq])
        .await?
        .iter()
        .map(|r| pg_quarantined_row(r, 0))
        .collect())
}

/// A quarantined allocation from a row's columns `at..at + 6`, in
/// [`detail::QuarantinedRow`]'s order.
fn pg_quarantined_row(r: &tokio_postgres::Row, at: usize) -> detail::QuarantinedRow {
    (
        r.get(at),
        r.get(at + 1),
        r.get(at + 2),
        r.get(at + 3),
        r.get(at + 4),
        r.get(at + 5),
    )
}

/// A pruned batch's billed allocations (of `run`, when not empty), decoded from its bytes,
/// each with its run's `label`.
async fn fill_pruned(
    tx: &tokio_postgres::Transaction<'_>,
    b: &mut BatchEnergy,
    run: &str,
    label: &str,
) -> Result<(), StoreError> {
    let q = quarantined_of(tx, &b.node_id, to_i64(b.seq, "seq")?).await?;
    let mut accounts: BTreeMap<String, Option<String>> = BTreeMap::new();
    let mut out = Vec::new();
    for r in detail::billed_of(&b.node_id, b.seq, &b.signed_batch, &q)? {
        if !run.is_empty() && r.run_id != run {
            continue;
        }
        let mut a = detail::stored_allocation(r)?;
        if !accounts.contains_key(&a.run_id) {
            let v = tx
                .query_opt(SQL_LABEL_OF, &[&b.node_id, &a.run_id, &label])
                .await?
                .map(|r| r.get::<_, String>(0));
            accounts.insert(a.run_id.clone(), v);
        }
        a.account = accounts.get(&a.run_id).cloned().flatten();
        out.push(a);
    }
    detail::sort_allocations(&mut out);
    b.allocations = out;
    Ok(())
}

/// The day up to which `allocations_legacy` holds rows (`i64::MIN`: no legacy partition).
async fn legacy_until(c: &impl tokio_postgres::GenericClient) -> Result<i64, StoreError> {
    Ok(c.query_opt(
        "SELECT value FROM ledger_meta WHERE key = 'legacy_detail_until_day'",
        &[],
    )
    .await?
    .map_or(i64::MIN, |r| r.get(0)))
}

/// The day partitions around `now_unix_ns` (yesterday, for a clock that was behind, to two days
/// ahead) that do not exist yet.
async fn partitions_wanted(
    c: &impl tokio_postgres::GenericClient,
    now_unix_ns: i64,
) -> Result<Vec<i64>, StoreError> {
    let legacy_until = legacy_until(c).await?;
    let today = now_unix_ns.div_euclid(DAY_NS);
    let mut wanted = Vec::new();
    for day in (today - 1..=today + 2).filter(|d| *d >= legacy_until.max(0)) {
        let exists = c
            .query_one(
                "SELECT to_regclass($1) IS NOT NULL",
                &[&format!("allocations_day_{day}")],
            )
            .await?
            .get::<_, bool>(0);
        if !exists {
            wanted.push(day);
        }
    }
    Ok(wanted)
}

/// Creates the [`partitions_wanted`]; returns how many. A day whose rows are already in the
/// default partition (none existed when they came) cannot have one: they stay there, and the
/// retention deletes them in time. Each creation is its own savepoint.
async fn create_partitions(
    tx: &tokio_postgres::Transaction<'_>,
    now_unix_ns: i64,
) -> Result<u64, StoreError> {
    let mut created = 0;
    for day in partitions_wanted(tx, now_unix_ns).await? {
        let name = format!("allocations_day_{day}");
        let next = day + 1;
        let r = tx
            .batch_execute(&format!(
                "SAVEPOINT partition; CREATE TABLE IF NOT EXISTS {name} PARTITION OF allocations \
                 FOR VALUES FROM ({day}) TO ({next}); RELEASE SAVEPOINT partition"
            ))
            .await;
        match r {
            Ok(()) => created += 1,
            Err(e) => {
                tx.batch_execute("ROLLBACK TO SAVEPOINT partition").await?;
                tracing::warn!(
                    partition = %name,
                    error = %describe(&e),
                    "allocation partition not created; that day's rows stay in allocations_default"
                );
            }
        }
    }
    Ok(created)
}

/// A version-5 database's `allocations` is an ordinary table: it is renamed, with its indexes,
/// to `allocations_legacy` and given the partition column, so that the schema creates the
/// partitioned table; [`attach_legacy`] then makes it the partition of every day up to today.
/// True when it did.
async fn unpartition_legacy(tx: &tokio_postgres::Transaction<'_>) -> Result<bool, StoreError> {
    let kind: Option<i8> = tx
        .query_opt(
            "SELECT relkind FROM pg_class WHERE oid = to_regclass('allocations')",
            &[],
        )
        .await?
        .map(|r| r.get(0));
    if kind != Some(b'r' as i8) {
        return Ok(false);
    }
    tx.batch_execute(
        "ALTER TABLE allocations RENAME TO allocations_legacy; \
         DROP INDEX IF EXISTS allocations_by_run; \
         ALTER INDEX IF EXISTS allocations_by_run_batch \
         RENAME TO allocations_legacy_by_run_batch; \
         ALTER INDEX IF EXISTS allocations_by_batch RENAME TO allocations_legacy_by_batch; \
         ALTER TABLE allocations_legacy ADD COLUMN received_day BIGINT NOT NULL DEFAULT 0",
    )
    .await?;
    Ok(true)
}

/// The legacy rows (received up to now) become the partition of every day up to today; the
/// retention drops it once today is past.
async fn attach_legacy(
    tx: &tokio_postgres::Transaction<'_>,
    now_unix_ns: i64,
) -> Result<(), StoreError> {
    let until = now_unix_ns.div_euclid(DAY_NS) + 1;
    tx.batch_execute(&format!(
        "ALTER TABLE allocations ATTACH PARTITION allocations_legacy \
         FOR VALUES FROM (MINVALUE) TO ({until}); \
         INSERT INTO ledger_meta (key, value) VALUES ('legacy_detail_until_day', {until}) \
         ON CONFLICT (key) DO NOTHING"
    ))
    .await?;
    Ok(())
}

fn pg_raw_batch(r: &tokio_postgres::Row) -> RawBatch {
    (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5))
}

fn pg_raw_allocation(r: &tokio_postgres::Row) -> RawAllocation {
    (
        r.get(0),
        r.get(1),
        r.get(2),
        r.get(3),
        r.get(4),
        r.get(5),
        r.get(6),
        r.get(7),
        r.get(8),
        r.get(9),
    )
}
