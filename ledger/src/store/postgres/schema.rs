//! The PostgreSQL schema: created or upgraded under an advisory lock, the received-day
//! partitions made ahead, and a legacy unpartitioned table attached as the first partition.

use super::write::SQL_LOCK_FOR_PARTITIONS;
use super::*;

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

/// Creates or upgrades the schema, in one transaction under an advisory lock (`serve`).
pub(super) async fn make_schema(client: &mut Client) -> Result<(), StoreError> {
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

/// The day up to which `allocations_legacy` holds rows (`i64::MIN`: no legacy partition).
pub(super) async fn legacy_until(
    c: &impl tokio_postgres::GenericClient,
) -> Result<i64, StoreError> {
    Ok(c.query_opt(
        "SELECT value FROM ledger_meta WHERE key = 'legacy_detail_until_day'",
        &[],
    )
    .await?
    .map_or(i64::MIN, |r| r.get(0)))
}

/// The day partitions around `now_unix_ns` (yesterday, for a clock that was behind, to two days
/// ahead) that do not exist yet.
pub(super) async fn partitions_wanted(
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
pub(super) async fn create_partitions(
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
