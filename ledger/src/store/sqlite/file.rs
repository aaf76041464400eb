//! The database file: its schema, opening it (WAL, `synchronous = FULL`, created private and
//! refused when others can read it), and consistent backups of it while it serves.

use super::*;

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS ledger_meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    node_id TEXT NOT NULL,
    seq INTEGER NOT NULL CHECK (seq >= 1),
    key_epoch INTEGER NOT NULL,
    key_id BLOB NOT NULL,
    prev_hash BLOB NOT NULL,
    hash BLOB NOT NULL,
    signed_batch BLOB NOT NULL,
    sealed_unix_ns INTEGER NOT NULL,
    intervals INTEGER NOT NULL,
    rotation_epoch INTEGER,
    rotation_key_id BLOB,
    received_unix_ns INTEGER NOT NULL,
    PRIMARY KEY (node_id, seq)
);
CREATE TABLE IF NOT EXISTS allocations (
    node_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    interval_index INTEGER NOT NULL,
    domain TEXT NOT NULL,
    run_id TEXT NOT NULL,
    active_uj INTEGER NOT NULL,
    idle_uj INTEGER NOT NULL,
    energy_uj INTEGER NOT NULL,
    usage_us INTEGER NOT NULL,
    FOREIGN KEY (node_id, seq) REFERENCES batches (node_id, seq)
);
-- (run_id) alone was an index until schema 6: (run_id, node_id, seq) serves every lookup it did.
DROP INDEX IF EXISTS allocations_by_run;
CREATE INDEX IF NOT EXISTS allocations_by_run_batch ON allocations (run_id, node_id, seq);
CREATE INDEX IF NOT EXISTS allocations_by_batch ON allocations (node_id, seq);
-- Covers the join of allocations with their batches' seal time (totals over a time range):
-- without it each lookup read the batch row, whose seal time comes after the signed bytes, so
-- through their overflow pages (a run's totals over a range: 10.9 ms at 16 million
-- allocations without it, 5.5 ms with it; cargo bench -p wattd-ledger --bench growth).
CREATE INDEX IF NOT EXISTS batches_sealed ON batches (node_id, seq, sealed_unix_ns);
-- A node's batches by seal time (a pruned run's batches, found from its hourly totals) and
-- every batch by the time the ledger received it (pruning: detail.rs).
CREATE INDEX IF NOT EXISTS batches_by_seal ON batches (node_id, sealed_unix_ns);
CREATE INDEX IF NOT EXISTS batches_by_received ON batches (received_unix_ns);
-- Run totals per node, run, domain and hour of sealing, maintained in the transaction that
-- stores each batch: totals are an index lookup, not a scan of the allocations.
CREATE TABLE IF NOT EXISTS run_totals_hourly (
    node_id TEXT NOT NULL,
    run_id TEXT NOT NULL,
    domain TEXT NOT NULL,
    hour INTEGER NOT NULL,
    -- The energy as the sums of its high and low 32-bit halves: exact however large the
    -- values a node signs (each sum fits for 2^31 allocations an hour).
    energy_hi INTEGER NOT NULL,
    energy_lo INTEGER NOT NULL,
    PRIMARY KEY (node_id, run_id, domain, hour)
);
CREATE INDEX IF NOT EXISTS run_totals_hourly_by_run ON run_totals_hourly (run_id);
CREATE TABLE IF NOT EXISTS rotations (
    node_id TEXT NOT NULL,
    new_key_epoch INTEGER NOT NULL,
    new_public_key BLOB NOT NULL,
    new_key_id BLOB NOT NULL,
    effective_seq INTEGER NOT NULL,
    announced_seq INTEGER NOT NULL,
    PRIMARY KEY (node_id, new_key_epoch)
);
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY,
    highest_seen_seq INTEGER NOT NULL DEFAULT 0,
    announced_sealed_seq INTEGER NOT NULL DEFAULT 0,
    last_heartbeat_sent_unix_ns INTEGER,
    last_heartbeat_received_unix_ns INTEGER
);
CREATE TABLE IF NOT EXISTS forks (
    node_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    stored_hash BLOB NOT NULL,
    received_hash BLOB NOT NULL,
    received_signed_batch BLOB NOT NULL,
    first_detected_unix_ns INTEGER NOT NULL,
    last_detected_unix_ns INTEGER NOT NULL,
    times_seen INTEGER NOT NULL,
    PRIMARY KEY (node_id, seq, received_hash)
);
CREATE TABLE IF NOT EXISTS lost_ranges (
    node_id TEXT NOT NULL,
    first_seq INTEGER NOT NULL CHECK (first_seq >= 1),
    last_seq INTEGER NOT NULL,
    last_hash BLOB NOT NULL,
    next_key_epoch INTEGER NOT NULL,
    next_key_id BLOB NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL,
    stated_unix_ns INTEGER NOT NULL,
    recorded_unix_ns INTEGER NOT NULL,
    statement BLOB NOT NULL,
    PRIMARY KEY (node_id, first_seq),
    CHECK (last_seq >= first_seq)
);
CREATE UNIQUE INDEX IF NOT EXISTS lost_ranges_by_last ON lost_ranges (node_id, last_seq);
CREATE TABLE IF NOT EXISTS node_clock (
    node_id TEXT PRIMARY KEY,
    first_seen_unix_ns INTEGER NOT NULL,
    measured_ns INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    last_index INTEGER,
    last_boot TEXT NOT NULL,
    last_end_mono_ns INTEGER NOT NULL,
    last_end_unix_ns INTEGER NOT NULL,
    gap_pending INTEGER NOT NULL,
    undeclared_holes INTEGER NOT NULL,
    implausible INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS quarantined (
    node_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    interval_index INTEGER NOT NULL,
    domain TEXT NOT NULL,
    run_id TEXT NOT NULL,
    active_uj INTEGER NOT NULL,
    idle_uj INTEGER NOT NULL,
    energy_uj INTEGER NOT NULL,
    usage_us INTEGER NOT NULL,
    reason TEXT NOT NULL,
    FOREIGN KEY (node_id, seq) REFERENCES batches (node_id, seq)
);
CREATE INDEX IF NOT EXISTS quarantined_by_batch ON quarantined (node_id, seq);
CREATE TABLE IF NOT EXISTS run_labels (
    node_id TEXT NOT NULL,
    run_id TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (node_id, run_id, key)
);
CREATE TABLE IF NOT EXISTS run_finals (
    node_id TEXT NOT NULL,
    run_id TEXT NOT NULL,
    final_usage TEXT NOT NULL,
    reconciled_usage_us INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (node_id, run_id)
);
CREATE TABLE IF NOT EXISTS read_audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at_unix_ns INTEGER NOT NULL,
    reader TEXT NOT NULL,
    role TEXT NOT NULL,
    call TEXT NOT NULL,
    filters TEXT NOT NULL,
    rows_returned INTEGER NOT NULL,
    outcome TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS read_audit_by_time ON read_audit (at_unix_ns);
";

/// The ledger is billing data: its database, WAL and shared-memory files must be readable by
/// their owner only. A new database is created mode 600 (SQLite gives the `-wal` and `-shm`
/// files the database file's mode); serving one that group or others can read is refused,
/// naming the file and the fix; a query-only open warns.
fn check_private(path: &Path, mode: OpenMode) -> Result<(), StoreError> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    if mode == OpenMode::Serve && !path.exists() {
        // Created here, empty (a valid empty SQLite database), before SQLite creates it with
        // the umask's mode.
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(StoreError::Url(format!(
                    "sqlite:{}: cannot create: {e}",
                    path.display()
                )))
            }
        }
    }
    for suffix in ["", "-wal", "-shm"] {
        let file = PathBuf::from(format!("{}{suffix}", path.display()));
        let Ok(meta) = std::fs::metadata(&file) else {
            continue;
        };
        let bits = meta.permissions().mode() & 0o777;
        if bits & 0o077 != 0 {
            let problem = format!(
                "{}: mode {bits:o} lets group or others read the ledger (billing data): \
                 chmod 600 {}",
                file.display(),
                file.display()
            );
            match mode {
                OpenMode::Serve => return Err(StoreError::Url(problem)),
                OpenMode::Query => tracing::warn!("{problem}"),
            }
        }
    }
    Ok(())
}

/// What [`backup`] wrote.
#[derive(Debug, serde::Serialize)]
pub struct BackupReport {
    pub to: std::path::PathBuf,
    pub bytes: u64,
    /// Stored batches in the copy, and nodes.
    pub batches: i64,
    pub nodes: i64,
}

/// A consistent copy of the ledger at `path`, taken while it serves (a read transaction: the
/// writer is not stopped), into `to`, which must not exist: created mode 600 (billing data),
/// written by SQLite's `VACUUM INTO`, fsynced with its directory, then opened again and checked
/// (`PRAGMA integrity_check`) before it is reported. A copy that fails the check is removed.
pub fn backup(path: &Path, to: &Path) -> Result<BackupReport, StoreError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let named = |what: &str, e: &dyn std::fmt::Display| {
        StoreError::Url(format!("backup to {}: {what}: {e}", to.display()))
    };
    let conn = open_blocking(path, OpenMode::Query)?;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)
        .map_err(|e| named("cannot create it (it must not exist)", &e))?;
    let copied = (|| -> Result<BackupReport, StoreError> {
        let target = to
            .to_str()
            .ok_or_else(|| StoreError::Url(format!("{}: not UTF-8", to.display())))?;
        conn.execute("VACUUM INTO ?1", params![target])?;
        drop(conn);
        let f = std::fs::File::open(to).map_err(|e| named("reopen", &e))?;
        f.sync_all().map_err(|e| named("fsync", &e))?;
        let bytes = f.metadata().map_err(|e| named("stat", &e))?.len();
        let dir = to
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| named("fsync of its directory", &e))?;
        let copy = Connection::open_with_flags(to, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        let check: String = copy.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
        if check != "ok" {
            return Err(named("integrity check of the copy", &check));
        }
        let batches = copy.query_row("SELECT count(*) FROM batches", [], |r| r.get(0))?;
        let nodes = copy.query_row("SELECT count(DISTINCT node_id) FROM batches", [], |r| {
            r.get(0)
        })?;
        Ok(BackupReport {
            to: to.to_path_buf(),
            bytes,
            batches,
            nodes,
        })
    })();
    if copied.is_err() {
        let _ = std::fs::remove_file(to);
    }
    copied
}

pub(super) fn open_blocking(path: &Path, mode: OpenMode) -> Result<Connection, StoreError> {
    check_private(path, mode)?;
    let flags = match mode {
        OpenMode::Serve => OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
        OpenMode::Query => OpenFlags::SQLITE_OPEN_READ_ONLY,
    } | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut conn = Connection::open_with_flags(path, flags)
        .map_err(|e| StoreError::Url(format!("sqlite:{}: cannot open: {e}", path.display())))?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    if mode == OpenMode::Serve {
        // WAL: readers (`runs`, `nodes`) never block the writer. FULL: the WAL is fsynced at
        // every commit, so an acknowledged batch survives power loss, not just a crash.
        let journal: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !journal.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Url(format!(
                "sqlite:{}: cannot use WAL (journal_mode is {journal})",
                path.display()
            )));
        }
    }
    conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")?;
    match mode {
        OpenMode::Serve => {
            // IMMEDIATE: the write lock first (waiting up to the busy timeout for another
            // writer). A deferred transaction would read first and then fail at once, with no
            // wait, when another connection committed in between (seen: a restart while the
            // previous server's last audit row was being written).
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            tx.execute_batch(SCHEMA)?;
            tx.execute(
                "INSERT INTO ledger_meta (key, value) VALUES ('schema_version', ?1) \
                 ON CONFLICT (key) DO NOTHING",
                params![SCHEMA_VERSION],
            )?;
            // 1 -> 2 -> 3 -> 4 only added tables (created above); 4 -> 5 fills the hourly
            // run totals from the stored allocations, once.
            tx.execute(SQL_BACKFILL_ROLLUP, [])?;
            tx.execute(SQL_UPGRADE_VERSION, [])?;
            tx.commit()?;
        }
        OpenMode::Query => {}
    }
    let version: Option<i64> = conn
        .query_row(
            "SELECT value FROM ledger_meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(|e| {
            StoreError::Url(format!(
                "sqlite:{}: not a wattd-ledger database: {e}",
                path.display()
            ))
        })?;
    if version != Some(SCHEMA_VERSION) {
        return Err(StoreError::Corrupt(format!(
            "sqlite:{}: schema version {version:?}, this ledger uses {SCHEMA_VERSION}",
            path.display()
        )));
    }
    Ok(conn)
}
