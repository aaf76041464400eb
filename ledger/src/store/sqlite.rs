//! The SQLite store: one connection in WAL mode with `synchronous = FULL` (a commit is on disk
//! when it returns), used from a blocking thread so an fsync never stalls the async runtime.
//! Writes take `BEGIN IMMEDIATE` and the connection waits up to 5 s for a lock, so two processes
//! on one file are safe too (if slow); PostgreSQL is the store for several processes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension as _};
use wattd_records::batch::ChainHash;

use super::detail::{
    self, AuditBatch, DetailUpkeep, NodeTotals, RunTotals, PRUNED_PAGE, SQL_AUDIT_BATCHES,
    SQL_DETAIL_FROM, SQL_LABEL_OF, SQL_NODE_ROLLUP, SQL_NODE_ROWS, SQL_PRUNED_BETWEEN,
    SQL_PRUNED_OF_RUN, SQL_QUARANTINED_OF, SQL_QUARANTINED_OF_NODE, SQL_RAISE_DETAIL_FROM,
    SQL_ROLLUP_NODES,
};
use super::{
    assemble, hour_of, rollup, split_allocations, to_hash, to_i64, to_key_id, to_u64,
    totals_halves, totals_where, BatchEnergy, ClockColumns, Commit, ForkRecord, ForkRow,
    LossOutcome, LossRecord, LostRangeRow, NodeRow, OpenMode, Param, QuarantineRow, RawAllocation,
    RawBatch, ReadAudit, RunDomainTotal, Store, StoreError, Tip, TotalsFilter, SCHEMA_VERSION,
    SQL_ALLOCATIONS_BETWEEN, SQL_BACKFILL_ROLLUP, SQL_BATCHES_ABOVE, SQL_CLOCK, SQL_HEADS,
    SQL_INSERT_READ, SQL_PRUNE_READS, SQL_READS, SQL_ROLLUP_UPSERT, SQL_RUN_ALLOCATIONS,
    SQL_RUN_BATCHES, SQL_UPGRADE_VERSION, SQL_UPSERT_CLOCK,
};
use crate::check::{LearntKey, VerifiedBatch};
use crate::plausible::{judge, NodeClock, NodeLimits};

const SCHEMA: &str = "
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

/// A SQLite ledger database: one connection that writes (commits, the read audit) and a
/// read-only one for the query API's reads, so that a long read (WAL: readers do not block the
/// writer) never holds the writer's lock.
#[derive(Clone, Debug)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    read: Arc<Mutex<Connection>>,
    path: PathBuf,
    /// Batches waiting to be committed (see [`SqliteStore::commit`]'s group commit).
    pending: Arc<Mutex<Vec<PendingCommit>>>,
}

/// One batch waiting for the group commit, and where its outcome goes.
struct PendingCommit {
    batch: Arc<VerifiedBatch>,
    limits: Arc<NodeLimits>,
    received_unix_ns: i64,
    done: tokio::sync::oneshot::Sender<Result<Commit, StoreError>>,
}

impl std::fmt::Debug for PendingCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingCommit")
            .field("node_id", &self.batch.node_id)
            .field("seq", &self.batch.seq)
            .finish()
    }
}

impl SqliteStore {
    pub async fn open(path: &Path, mode: OpenMode) -> Result<Self, StoreError> {
        let path = path.to_owned();
        let p = path.clone();
        let (conn, read) = tokio::task::spawn_blocking(move || {
            let conn = open_blocking(&p, mode)?;
            let read = Connection::open_with_flags(
                &p,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?;
            read.busy_timeout(std::time::Duration::from_secs(30))?;
            Ok::<_, StoreError>((conn, read))
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))??;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            read: Arc::new(Mutex::new(read)),
            path,
            pending: Arc::default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the writing connection in a blocking thread.
    async fn with<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        Self::on(Arc::clone(&self.conn), f).await
    }

    /// Runs `f` on the read-only connection (the query API's reads).
    async fn with_read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        Self::on(Arc::clone(&self.read), f).await
    }

    async fn on<T, F>(conn: Arc<Mutex<Connection>>, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        tokio::task::spawn_blocking(move || {
            // A panic while holding the lock would poison it; the connection is still sound
            // (rusqlite rolls back an unfinished transaction on drop), so keep using it.
            let mut guard = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut guard)
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }
}

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

fn open_blocking(path: &Path, mode: OpenMode) -> Result<Connection, StoreError> {
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

fn tip_of(conn: &Connection, node: &str) -> Result<Tip, StoreError> {
    let row: Option<(i64, Vec<u8>)> = conn
        .prepare_cached(
            "SELECT seq, hash FROM \
             (SELECT seq, hash FROM batches WHERE node_id = ?1 ORDER BY seq DESC LIMIT 1) \
             UNION ALL SELECT seq, hash FROM \
             (SELECT last_seq AS seq, last_hash AS hash FROM lost_ranges WHERE node_id = ?1 \
              ORDER BY last_seq DESC LIMIT 1) \
             ORDER BY seq DESC LIMIT 1",
        )?
        .query_row(params![node], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    match row {
        None => Ok(Tip::genesis()),
        Some((seq, hash)) => Ok(Tip {
            seq: to_u64(seq, "batches.seq")?,
            hash: to_hash(&hash, "batches.hash")?,
        }),
    }
}

fn hash_at(conn: &Connection, node: &str, seq: i64) -> Result<Option<ChainHash>, StoreError> {
    let h: Option<Vec<u8>> = conn
        .prepare_cached("SELECT hash FROM batches WHERE node_id = ?1 AND seq = ?2")?
        .query_row(params![node, seq], |r| r.get(0))
        .optional()?;
    h.map(|h| to_hash(&h, "batches.hash")).transpose()
}

fn clock_of(conn: &Connection, node: &str) -> Result<Option<NodeClock>, StoreError> {
    Ok(conn
        .prepare_cached(SQL_CLOCK)?
        .query_row(params![node], |r| {
            Ok(ClockColumns {
                first_seen_unix_ns: r.get(0)?,
                measured_ns: r.get(1)?,
                last_seq: r.get(2)?,
                last_index: r.get(3)?,
                last_boot: r.get(4)?,
                last_end_mono_ns: r.get(5)?,
                last_end_unix_ns: r.get(6)?,
                gap_pending: r.get(7)?,
                undeclared_holes: r.get(8)?,
                implausible: r.get(9)?,
            })
        })
        .optional()?
        .map(ClockColumns::into_clock))
}

/// Commits every batch waiting in `pending` in one transaction (group commit): each in a
/// savepoint of its own, so one that fails (a store error) is rolled back alone and told so;
/// the others are told their outcome only after the transaction committed. One fsync for the
/// group instead of one per batch: the writer's lock is held for the commit's fsync, and
/// batches of other nodes that arrive meanwhile are the next group.
fn commit_group(conn: &mut Connection, pending: &Mutex<Vec<PendingCommit>>) {
    let jobs = std::mem::take(&mut *pending.lock().unwrap_or_else(|p| p.into_inner()));
    if jobs.is_empty() {
        // Taken (and answered) by an earlier group.
        return;
    }
    // IMMEDIATE: take the write lock now, so the checks see what the inserts will follow.
    let mut tx = match rusqlite::Transaction::new(conn, rusqlite::TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            for j in jobs {
                let _ = j.done.send(Err(StoreError::Task(format!("begin: {e}"))));
            }
            return;
        }
    };
    let mut outcomes = Vec::with_capacity(jobs.len());
    for j in &jobs {
        let r = tx.savepoint().map_err(StoreError::from).and_then(|sp| {
            let r = commit_in(&sp, &j.batch, &j.limits, j.received_unix_ns)?;
            sp.commit()?;
            Ok(r)
        });
        if let Err(e) = &r {
            // Some errors (a full disk, I/O, out of memory) make SQLite roll back the whole
            // transaction, not the savepoint: nothing of the group is stored, and the jobs
            // after it must not run outside the transaction.
            if tx.is_autocommit() {
                let why = format!("the group's transaction was rolled back: {e}");
                drop(tx);
                for j in jobs {
                    let _ = j.done.send(Err(StoreError::Task(why.clone())));
                }
                return;
            }
        }
        outcomes.push(r);
    }
    let committed = tx.commit();
    for (j, r) in jobs.into_iter().zip(outcomes) {
        let r = match (&committed, r) {
            (Ok(()), r) => r,
            (Err(e), Ok(_)) => Err(StoreError::Task(format!("commit: {e}"))),
            (Err(_), Err(e)) => Err(e),
        };
        let _ = j.done.send(r);
    }
}

/// Stores one verified batch inside the caller's transaction (a savepoint of the group).
fn commit_in(
    tx: &Connection,
    b: &VerifiedBatch,
    limits: &NodeLimits,
    received_unix_ns: i64,
) -> Result<Commit, StoreError> {
    let seq = to_i64(b.seq, "seq")?;
    if let Some(h) = hash_at(tx, &b.node_id, seq)? {
        return Ok(if h == b.hash {
            Commit::Duplicate
        } else {
            Commit::Fork { stored_hash: h }
        });
    }
    let lost: Option<(i64, i64)> = tx
        .prepare_cached(
            "SELECT first_seq, last_seq FROM lost_ranges \
             WHERE node_id = ?1 AND first_seq <= ?2 AND last_seq >= ?2",
        )?
        .query_row(params![b.node_id, seq], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    if let Some((first, last)) = lost {
        return Ok(Commit::InLostRange {
            first_seq: to_u64(first, "lost_ranges.first_seq")?,
            last_seq: to_u64(last, "lost_ranges.last_seq")?,
        });
    }
    if b.seq > 1 {
        type Pred = (Vec<u8>, i64, Vec<u8>, Option<i64>, Option<Vec<u8>>);
        // The predecessor is a stored batch or a lost range ending just before this seq.
        let pred: Option<Pred> = tx
            .prepare_cached(
                "SELECT hash, key_epoch, key_id, rotation_epoch, rotation_key_id FROM batches \
                 WHERE node_id = ?1 AND seq = ?2 \
                 UNION ALL SELECT last_hash, next_key_epoch, next_key_id, NULL, NULL \
                 FROM lost_ranges WHERE node_id = ?1 AND last_seq = ?2 LIMIT 1",
            )?
            .query_row(params![b.node_id, seq - 1], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .optional()?;
        let Some((hash, epoch, key_id, rot_epoch, rot_key_id)) = pred else {
            let tip = tip_of(tx, &b.node_id)?;
            return Ok(Commit::NotNext { tip: tip.seq });
        };
        let hash = to_hash(&hash, "batches.hash")?;
        if hash != b.prev_hash {
            return Ok(Commit::ChainBreak {
                predecessor_hash: hash,
            });
        }
        let (e, k) = match (rot_epoch, rot_key_id) {
            (Some(e), Some(k)) => (e, k),
            _ => (epoch, key_id),
        };
        let expected_epoch = u32::try_from(e)
            .map_err(|_| StoreError::Corrupt(format!("key epoch {e} out of range")))?;
        let expected_key_id = to_key_id(&k, "batches.key_id")?;
        if expected_epoch != b.key_epoch || expected_key_id != b.key_id {
            return Ok(Commit::KeyDiscontinuity {
                expected_epoch,
                expected_key_id,
            });
        }
    }
    tx.prepare_cached(
        "INSERT INTO batches (node_id, seq, key_epoch, key_id, prev_hash, hash, signed_batch, \
         sealed_unix_ns, intervals, rotation_epoch, rotation_key_id, received_unix_ns) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    )?
    .execute(params![
        b.node_id,
        seq,
        i64::from(b.key_epoch),
        b.key_id.as_slice(),
        b.prev_hash.as_slice(),
        b.hash.as_slice(),
        b.bytes,
        b.sealed_unix_ns,
        to_i64(b.intervals, "intervals")?,
        b.rotation.as_ref().map(|r| i64::from(r.epoch)),
        b.rotation.as_ref().map(|r| r.key_id.to_vec()),
        received_unix_ns,
    ])?;
    let clock = clock_of(tx, &b.node_id)?;
    let (verdict, clock) = judge(limits, clock, b.seq, &b.facts, received_unix_ns);
    let (billed, quarantined) = split_allocations(b, &verdict);
    // A batch received before `detail_from_unix_ns` (a clock stepped back past the retention)
    // is one whose rows are pruned: reads decode it.
    let with_rows = received_unix_ns >= detail_from(tx)?;
    {
        let mut ins = tx.prepare_cached(
            "INSERT INTO allocations (node_id, seq, interval_index, domain, run_id, active_uj, \
             idle_uj, energy_uj, usage_us) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )?;
        for a in billed.iter().filter(|_| with_rows) {
            ins.execute(params![
                b.node_id,
                seq,
                a.interval_index,
                a.domain,
                a.run_id,
                a.active_uj,
                a.idle_uj,
                a.energy_uj,
                a.usage_us
            ])?;
        }
        let mut up = tx.prepare_cached(SQL_ROLLUP_UPSERT)?;
        for ((run, domain), (hi, lo)) in rollup(&billed)? {
            up.execute(params![
                b.node_id,
                run,
                domain,
                hour_of(b.sealed_unix_ns),
                hi,
                lo
            ])?;
        }
        let mut ins = tx.prepare_cached(
            "INSERT INTO quarantined (node_id, seq, interval_index, domain, run_id, active_uj, \
             idle_uj, energy_uj, usage_us, reason) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )?;
        for (a, reason) in quarantined {
            ins.execute(params![
                b.node_id,
                seq,
                a.interval_index,
                a.domain,
                a.run_id,
                a.active_uj,
                a.idle_uj,
                a.energy_uj,
                a.usage_us,
                reason
            ])?;
        }
    }
    {
        // The first value recorded for a run's label stays (a run's labels do not change).
        let mut ins = tx.prepare_cached(
            "INSERT INTO run_labels (node_id, run_id, key, value, seq) VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT (node_id, run_id, key) DO NOTHING",
        )?;
        for l in &b.run_labels {
            ins.execute(params![b.node_id, l.run_id, l.key, l.value, seq])?;
        }
        // A run finishes once: its first summary stays.
        let mut ins = tx.prepare_cached(
            "INSERT INTO run_finals (node_id, run_id, final_usage, reconciled_usage_us, seq) \
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (node_id, run_id) DO NOTHING",
        )?;
        for f in &b.run_finals {
            ins.execute(params![
                b.node_id,
                f.run_id,
                f.final_usage,
                f.reconciled_usage_us,
                seq
            ])?;
        }
    }
    let c = ClockColumns::from_clock(&clock);
    tx.prepare_cached(SQL_UPSERT_CLOCK)?.execute(params![
        b.node_id,
        c.first_seen_unix_ns,
        c.measured_ns,
        c.last_seq,
        c.last_index,
        c.last_boot,
        c.last_end_mono_ns,
        c.last_end_unix_ns,
        c.gap_pending,
        c.undeclared_holes,
        c.implausible
    ])?;
    if let Some(r) = &b.rotation {
        insert_rotation(tx, &b.node_id, r)?;
    }
    Ok(Commit::Stored { verdict })
}

/// An energy sum from its two 32-bit halves (`SUM(e >> 32)`, `SUM(e & 0xffffffff)`): SQLite's
/// SUM is a 64-bit integer that fails on overflow, for every query; the halves cannot overflow
/// below 2^31 rows per group, and the total is exact in 128 bits.
fn halves(hi: i64, lo: i64) -> Result<u128, StoreError> {
    let hi = u128::from(to_u64(hi, "energy sum (high half)")?);
    let lo = u128::from(to_u64(lo, "energy sum (low half)")?);
    Ok((hi << 32) + lo)
}

/// A key the chain announced (in a stored batch, or in a recorded loss statement).
fn insert_rotation(tx: &Connection, node: &str, r: &LearntKey) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO rotations (node_id, new_key_epoch, new_public_key, new_key_id, \
         effective_seq, announced_seq) VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
         ON CONFLICT (node_id, new_key_epoch) DO NOTHING",
    )?
    .execute(params![
        node,
        i64::from(r.epoch),
        r.public_key.as_slice(),
        r.key_id.as_slice(),
        to_i64(r.effective_seq, "effective_seq")?,
        to_i64(r.announced_seq, "announced_seq")?
    ])?;
    Ok(())
}

fn record_loss_blocking(conn: &mut Connection, l: &LossRecord) -> Result<LossOutcome, StoreError> {
    let tx = rusqlite::Transaction::new(conn, rusqlite::TransactionBehavior::Immediate)?;
    let tip = tip_of(&tx, &l.node_id)?;
    if tip.seq + 1 != l.first_seq {
        return Ok(LossOutcome::NotNext { tip: tip.seq });
    }
    // The key the chain is at: the tip batch's (or the one its rotation announced), or the
    // one a lost range ending at the tip named.
    let at: Option<(i64, Option<i64>)> = tx
        .prepare_cached(
            "SELECT key_epoch, rotation_epoch FROM batches WHERE node_id = ?1 AND seq = ?2 \
             UNION ALL SELECT next_key_epoch, NULL FROM lost_ranges \
             WHERE node_id = ?1 AND last_seq = ?2 LIMIT 1",
        )?
        .query_row(params![l.node_id, to_i64(tip.seq, "seq")?], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    if let Some((epoch, rotation)) = at {
        let expected = rotation.unwrap_or(epoch);
        if i64::from(l.signer_epoch) < expected || i64::from(l.next_key_epoch) < expected {
            return Ok(LossOutcome::StaleKey {
                expected_epoch: u32::try_from(expected).unwrap_or(u32::MAX),
            });
        }
    }
    tx.prepare_cached(
        "INSERT INTO lost_ranges (node_id, first_seq, last_seq, last_hash, next_key_epoch, \
         next_key_id, reason, detail, stated_unix_ns, recorded_unix_ns, statement) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?
    .execute(params![
        l.node_id,
        to_i64(l.first_seq, "first_seq")?,
        to_i64(l.last_seq, "last_seq")?,
        l.last_hash.as_slice(),
        i64::from(l.next_key_epoch),
        l.next_key_id.as_slice(),
        l.reason,
        l.detail,
        l.stated_unix_ns,
        l.recorded_unix_ns,
        l.statement,
    ])?;
    for r in &l.rotations {
        insert_rotation(&tx, &l.node_id, r)?;
    }
    tx.commit()?;
    Ok(LossOutcome::Recorded)
}

impl Store for SqliteStore {
    async fn record_loss(&self, loss: LossRecord) -> Result<LossOutcome, StoreError> {
        self.with(move |c| record_loss_blocking(c, &loss)).await
    }

    async fn tip(&self, node: &str) -> Result<Tip, StoreError> {
        let node = node.to_owned();
        self.with(move |c| tip_of(c, &node)).await
    }

    async fn batch_hash(&self, node: &str, seq: u64) -> Result<Option<ChainHash>, StoreError> {
        let node = node.to_owned();
        let seq = to_i64(seq, "seq")?;
        self.with(move |c| hash_at(c, &node, seq)).await
    }

    async fn commit(
        &self,
        batch: Arc<VerifiedBatch>,
        limits: Arc<NodeLimits>,
        received_unix_ns: i64,
    ) -> Result<Commit, StoreError> {
        // Queued, then the writer's lock: whoever holds it next commits every queued batch in
        // one transaction (this one's, or a later caller's group has taken it already).
        let (done, outcome) = tokio::sync::oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(PendingCommit {
                batch,
                limits,
                received_unix_ns,
                done,
            });
        // Not awaited: this batch's answer comes from whichever group takes it, and a caller
        // answered by an earlier group must not wait for a later group's fsync.
        let (pending, conn) = (Arc::clone(&self.pending), Arc::clone(&self.conn));
        drop(tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().unwrap_or_else(|p| p.into_inner());
            commit_group(&mut guard, &pending);
        }));
        outcome
            .await
            .map_err(|_| StoreError::Task("the group commit dropped this batch".into()))?
    }

    async fn learnt_keys(&self, node: &str) -> Result<Vec<LearntKey>, StoreError> {
        let node = node.to_owned();
        self.with(move |c| {
            let mut st = c.prepare_cached(
                "SELECT new_key_epoch, new_public_key, new_key_id, effective_seq, announced_seq \
                 FROM rotations WHERE node_id = ?1 ORDER BY new_key_epoch",
            )?;
            let rows = st.query_map(params![node], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (epoch, public, key_id, effective, announced) = row?;
                out.push(LearntKey {
                    epoch: u32::try_from(epoch)
                        .map_err(|_| StoreError::Corrupt(format!("epoch {epoch}")))?,
                    public_key: public.as_slice().try_into().map_err(|_| {
                        StoreError::Corrupt("rotations.new_public_key not 32 bytes".into())
                    })?,
                    key_id: to_key_id(&key_id, "rotations.new_key_id")?,
                    effective_seq: to_u64(effective, "rotations.effective_seq")?,
                    announced_seq: to_u64(announced, "rotations.announced_seq")?,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn note_seen(&self, node: &str, seq: u64) -> Result<(), StoreError> {
        let node = node.to_owned();
        let seq = to_i64(seq, "seq")?;
        self.with(move |c| {
            c.prepare_cached(
                "INSERT INTO nodes (node_id, highest_seen_seq) VALUES (?1, ?2) \
                 ON CONFLICT (node_id) DO UPDATE SET \
                 highest_seen_seq = max(highest_seen_seq, excluded.highest_seen_seq)",
            )?
            .execute(params![node, seq])?;
            Ok(())
        })
        .await
    }

    async fn heartbeat(
        &self,
        node: &str,
        sent_unix_ns: i64,
        received_unix_ns: i64,
        last_sealed_seq: u64,
    ) -> Result<u64, StoreError> {
        let node = node.to_owned();
        let sealed = to_i64(last_sealed_seq, "last_sealed_seq")?;
        self.with(move |c| {
            let v: i64 = c
                .prepare_cached(
                    "INSERT INTO nodes (node_id, announced_sealed_seq, last_heartbeat_sent_unix_ns, \
                     last_heartbeat_received_unix_ns) VALUES (?1, ?2, ?3, ?4) \
                     ON CONFLICT (node_id) DO UPDATE SET \
                     announced_sealed_seq = max(announced_sealed_seq, excluded.announced_sealed_seq), \
                     last_heartbeat_sent_unix_ns = excluded.last_heartbeat_sent_unix_ns, \
                     last_heartbeat_received_unix_ns = excluded.last_heartbeat_received_unix_ns \
                     RETURNING announced_sealed_seq",
                )?
                .query_row(params![node, sealed, sent_unix_ns, received_unix_ns], |r| {
                    r.get(0)
                })?;
            to_u64(v, "nodes.announced_sealed_seq")
        })
        .await
    }

    async fn announced(&self, node: &str) -> Result<u64, StoreError> {
        let node = node.to_owned();
        self.with(move |c| {
            let v: Option<i64> = c
                .prepare_cached("SELECT announced_sealed_seq FROM nodes WHERE node_id = ?1")?
                .query_row(params![node], |r| r.get(0))
                .optional()?;
            to_u64(v.unwrap_or(0), "nodes.announced_sealed_seq")
        })
        .await
    }

    async fn record_fork(&self, f: ForkRecord) -> Result<bool, StoreError> {
        self.with(move |c| {
            let changed = c
                .prepare_cached(
                    "INSERT INTO forks (node_id, seq, kind, stored_hash, received_hash, \
                     received_signed_batch, first_detected_unix_ns, last_detected_unix_ns, \
                     times_seen) SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, 1 \
                     WHERE EXISTS (SELECT 1 FROM forks WHERE node_id = ?1 AND seq = ?2 \
                       AND received_hash = ?5) \
                     OR ((SELECT COUNT(*) FROM forks WHERE node_id = ?1) < ?8 \
                       AND (SELECT COALESCE(SUM(LENGTH(received_signed_batch)), 0) FROM forks \
                            WHERE node_id = ?1) + LENGTH(?6) <= ?9) \
                     ON CONFLICT (node_id, seq, received_hash) DO UPDATE SET \
                     times_seen = times_seen + 1, \
                     last_detected_unix_ns = excluded.last_detected_unix_ns",
                )?
                .execute(params![
                    f.node_id,
                    to_i64(f.seq, "seq")?,
                    f.kind.as_str(),
                    f.stored_hash.as_slice(),
                    f.received_hash.as_slice(),
                    f.received_bytes,
                    f.detected_unix_ns,
                    super::FORK_ROWS_PER_NODE,
                    super::FORK_BYTES_PER_NODE
                ])?;
            Ok(changed > 0)
        })
        .await
    }

    async fn batches_after(
        &self,
        node: &str,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let node = node.to_owned();
        let after = to_i64(after_seq, "seq")?;
        self.with(move |c| {
            let mut st = c.prepare_cached(
                "SELECT seq, signed_batch FROM batches WHERE node_id = ?1 AND seq > ?2 \
                 ORDER BY seq LIMIT ?3",
            )?;
            let rows = st.query_map(params![node, after, i64::from(limit)], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (seq, bytes) = row?;
                out.push((to_u64(seq, "batches.seq")?, bytes));
            }
            Ok(out)
        })
        .await
    }

    async fn run_energy_between(
        &self,
        node: &str,
        after_seq: u64,
        upto_seq: u64,
    ) -> Result<Vec<RunDomainTotal>, StoreError> {
        let node = node.to_owned();
        let (after, upto) = (to_i64(after_seq, "seq")?, to_i64(upto_seq, "seq")?);
        self.with_read(move |c| {
            // One snapshot: the pruned batches decoded are exactly those without rows.
            let tx = c.transaction()?;
            let from = detail_from(&tx)?;
            let mut decoded = RunTotals::new();
            if from > i64::MIN {
                let mut st = tx.prepare_cached(SQL_PRUNED_BETWEEN)?;
                let rows = st.query_map(params![node, after, upto, from], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
                })?;
                for row in rows {
                    let (seq, bytes) = row?;
                    // The billed ones: the quarantined rows are kept, and read below.
                    let q = quarantined_of(&tx, &node, seq)?;
                    let billed = detail::billed_of(&node, to_u64(seq, "batches.seq")?, &bytes, &q)?;
                    detail::add_rows(&mut decoded, &node, &billed, "");
                }
            }
            let mut st = tx.prepare_cached(
                // Quarantined rows too: the node's checkpoints count them, so a lost range's
                // price must not take them for lost energy.
                "SELECT run_id, domain, SUM(energy_uj >> 32), SUM(energy_uj & 4294967295) \
                 FROM (SELECT run_id, domain, energy_uj FROM allocations \
                       WHERE node_id = ?1 AND seq > ?2 AND seq <= ?3 \
                       UNION ALL SELECT run_id, domain, energy_uj FROM quarantined \
                       WHERE node_id = ?1 AND seq > ?2 AND seq <= ?3) \
                 GROUP BY run_id, domain",
            )?;
            let rows = st.query_map(params![node, after, upto], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (run_id, domain, hi, lo) = row?;
                out.push(RunDomainTotal {
                    node_id: node.clone(),
                    run_id,
                    domain,
                    energy_uj: halves(hi, lo)?,
                });
            }
            Ok(detail::merge_totals(out, decoded))
        })
        .await
    }

    async fn run_totals(&self) -> Result<Vec<RunDomainTotal>, StoreError> {
        self.run_totals_where(TotalsFilter::default()).await
    }

    async fn run_totals_where(
        &self,
        filter: TotalsFilter,
    ) -> Result<Vec<RunDomainTotal>, StoreError> {
        self.with_read(move |c| {
            let tx = c.transaction()?;
            let c = &tx;
            let (clause, params, from_rollup) = totals_where(&filter);
            // SQLite's SUM is a 64-bit integer that fails on overflow (for every query, so one
            // node's huge values would break everyone's). Summed as high and low 32-bit halves,
            // each sum fits up to 2^31 rows per group, and the total is exact in 128 bits.
            let halves_sql = totals_halves(from_rollup);
            let mut st = c.prepare(&format!(
                "SELECT a.node_id, a.run_id, a.domain, {halves_sql}{clause} \
                 GROUP BY a.node_id, a.run_id, a.domain ORDER BY a.node_id, a.run_id, a.domain"
            ))?;
            let params = params.iter().map(|p| match p {
                Param::Text(t) => rusqlite::types::Value::Text(t.clone()),
                Param::Int(i) => rusqlite::types::Value::Integer(*i),
            });
            let rows = st.query_map(rusqlite::params_from_iter(params), |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (node_id, run_id, domain, hi, lo) = row?;
                out.push(RunDomainTotal {
                    node_id,
                    run_id,
                    domain,
                    energy_uj: halves(hi, lo)?,
                });
            }
            let from = detail_from(c)?;
            if from_rollup || from == i64::MIN {
                return Ok(out);
            }
            // Batches in the range whose rows were pruned: decoded.
            let run = filter.run_id.clone().unwrap_or_default();
            let node = filter.node_id.clone().unwrap_or_default();
            let lo_t = filter.from_unix_ns.unwrap_or(i64::MIN);
            // The end is exclusive; the query's inclusive.
            let hi_t = match filter.to_unix_ns {
                None => i64::MAX,
                Some(i64::MIN) => return Ok(out),
                Some(t) => t - 1,
            };
            let mut decoded = RunTotals::new();
            let mut after = (String::new(), 0i64);
            loop {
                let page = {
                    // `?N`, not `$N`: SQLite numbers `$N` parameters in the order they first
                    // appear, and the run's query names `$5` first.
                    let sql = detail::sql_pruned_in_range(&run).replace('$', "?");
                    let mut st = c.prepare_cached(&sql)?;
                    let p = params![from, lo_t, hi_t, node, run, after.0, after.1, PRUNED_PAGE];
                    let rows = st.query_map(p, |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, i64>(1)?,
                            r.get::<_, Vec<u8>>(2)?,
                        ))
                    })?;
                    rows.collect::<Result<Vec<_>, _>>()?
                };
                let full = page.len() as i64 == PRUNED_PAGE;
                for (n, seq, bytes) in &page {
                    let q = quarantined_of(c, n, *seq)?;
                    let billed = detail::billed_of(n, to_u64(*seq, "batches.seq")?, bytes, &q)?;
                    detail::add_rows(&mut decoded, n, &billed, &run);
                }
                match page.into_iter().last() {
                    Some((n, seq, _)) if full => after = (n, seq),
                    _ => break,
                }
            }
            Ok(detail::merge_totals(out, decoded))
        })
        .await
    }

    async fn audit_node<F>(&self, node: &str, mut f: F) -> Result<NodeTotals, StoreError>
    where
        F: FnMut(AuditBatch) + Send + 'static,
    {
        let node = node.to_owned();
        self.with_read(move |c| {
            // One read transaction: one WAL snapshot for the batches and both sums.
            let tx = c.transaction()?;
            let from = detail_from(&tx)?;
            let mut quarantined: BTreeMap<i64, Vec<detail::QuarantinedRow>> = BTreeMap::new();
            {
                let mut st = tx.prepare(SQL_QUARANTINED_OF_NODE)?;
                let rows = st.query_map(params![node], |r| {
                    Ok((r.get::<_, i64>(0)?, quarantined_row(r, 1)?))
                })?;
                for row in rows {
                    let (seq, q) = row?;
                    quarantined.entry(seq).or_default().push(q);
                }
            }
            let mut after = 0i64;
            loop {
                let page = {
                    let mut st = tx.prepare_cached(SQL_AUDIT_BATCHES)?;
                    let rows = st.query_map(params![node, after, AUDIT_PAGE], |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            r.get::<_, Vec<u8>>(1)?,
                            r.get::<_, i64>(2)?,
                            r.get::<_, i64>(3)?,
                        ))
                    })?;
                    rows.collect::<Result<Vec<_>, _>>()?
                };
                let full = page.len() as i64 == AUDIT_PAGE;
                for (seq, signed_batch, sealed_unix_ns, received) in page {
                    after = seq;
                    f(AuditBatch {
                        seq: to_u64(seq, "batches.seq")?,
                        signed_batch,
                        sealed_unix_ns,
                        has_rows: received >= from,
                        quarantined: quarantined.remove(&seq).unwrap_or_default(),
                    });
                }
                if !full {
                    break;
                }
            }
            let hourly = |sql: &str| -> Result<detail::HourlyTotals, StoreError> {
                let mut st = tx.prepare(sql)?;
                let rows = st.query_map(params![node], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })?;
                Ok(detail::hourly_from(rows.collect::<Result<Vec<_>, _>>()?))
            };
            let totals = NodeTotals {
                maintained: hourly(SQL_NODE_ROLLUP)?,
                rows: hourly(SQL_NODE_ROWS)?,
            };
            tx.finish()?;
            Ok(totals)
        })
        .await
    }

    async fn rollup_nodes(&self) -> Result<Vec<String>, StoreError> {
        self.with_read(|c| {
            let mut st = c.prepare(SQL_ROLLUP_NODES)?;
            let rows = st.query_map([], |r| r.get(0))?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn upkeep_detail(
        &self,
        now_unix_ns: i64,
        retention: Option<std::time::Duration>,
    ) -> Result<DetailUpkeep, StoreError> {
        let mut done = DetailUpkeep::default();
        let Some(retention) = retention else {
            let from = self.with(|c| detail_from(c)).await?;
            done.detail_from_unix_ns = (from > i64::MIN).then_some(from);
            return Ok(done);
        };
        let cutoff = detail::cutoff(now_unix_ns, retention);
        // An hour of receipts per transaction: the writer is held briefly, ingest goes on
        // between them, and a crash leaves rows and `detail_from_unix_ns` agreeing.
        loop {
            let step = self
                .with(move |c| {
                    let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                    let from = detail_from(&tx)?;
                    if from >= cutoff {
                        return Ok(None);
                    }
                    let first: Option<i64> = tx.query_row(
                        "SELECT MIN(received_unix_ns) FROM batches WHERE received_unix_ns >= ?1",
                        params![from],
                        |r| r.get(0),
                    )?;
                    let end = first.map_or(cutoff, |t| {
                        cutoff.min(t.saturating_add(super::HOUR_NS))
                    });
                    let deleted = tx.execute(
                        "DELETE FROM allocations WHERE rowid IN (SELECT a.rowid FROM batches b                          JOIN allocations a ON a.node_id = b.node_id AND a.seq = b.seq                          WHERE b.received_unix_ns >= ?1 AND b.received_unix_ns < ?2)",
                        params![from, end],
                    )?;
                    tx.execute(SQL_RAISE_DETAIL_FROM, params![end])?;
                    tx.commit()?;
                    Ok(Some((end, deleted as u64)))
                })
                .await?;
            match step {
                Some((end, deleted)) => {
                    done.rows_deleted += deleted;
                    done.detail_from_unix_ns = Some(end);
                }
                None => break,
            }
        }
        if done.detail_from_unix_ns.is_none() {
            let from = self.with(|c| detail_from(c)).await?;
            done.detail_from_unix_ns = (from > i64::MIN).then_some(from);
        }
        Ok(done)
    }

    async fn store_rows_again(&self, now_unix_ns: i64) -> Result<Option<i64>, StoreError> {
        self.with(move |c| {
            // The writer's lock: no commit runs between the last receipt read and the change.
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            if detail_from(&tx)? != detail::NO_ROWS {
                return Ok(None);
            }
            let last: Option<i64> = tx.query_row(detail::SQL_LAST_RECEIPT, [], |r| r.get(0))?;
            let from = detail::rows_again_from(now_unix_ns, last);
            tx.execute(detail::SQL_ROWS_AGAIN_FROM, params![from, detail::NO_ROWS])?;
            tx.commit()?;
            Ok(Some(from))
        })
        .await
    }

    async fn heads(&self) -> Result<Vec<(String, u64)>, StoreError> {
        self.with_read(|c| {
            let mut st = c.prepare(SQL_HEADS)?;
            let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            let mut out = Vec::new();
            for row in rows {
                let (node, seq) = row?;
                out.push((node, to_u64(seq, "batches.seq")?));
            }
            Ok(out)
        })
        .await
    }

    async fn batch_energy(
        &self,
        node: &str,
        after_seq: u64,
        limit: u32,
        account_label: &str,
    ) -> Result<Vec<BatchEnergy>, StoreError> {
        let node = node.to_owned();
        let label = account_label.to_owned();
        let after = to_i64(after_seq, "seq")?;
        self.with_read(move |c| {
            // One transaction: the allocations read are those of the batches read.
            let tx = c.transaction()?;
            let batches = {
                let mut st = tx.prepare(SQL_BATCHES_ABOVE)?;
                let rows = st.query_map(params![node, after, i64::from(limit)], raw_batch)?;
                rows.collect::<Result<Vec<_>, _>>()?
            };
            let Some(last) = batches.last().map(|b| b.1) else {
                return Ok(Vec::new());
            };
            let allocations = {
                let mut st = tx.prepare(SQL_ALLOCATIONS_BETWEEN)?;
                let rows = st.query_map(params![node, after, last, label], raw_allocation)?;
                rows.collect::<Result<Vec<_>, _>>()?
            };
            let mut out = assemble(batches, allocations)?;
            let from = detail_from(&tx)?;
            if from > i64::MIN {
                let pruned: std::collections::HashSet<i64> = {
                    let mut st = tx.prepare_cached(SQL_PRUNED_BETWEEN)?;
                    let rows = st.query_map(params![node, after, last, from], |r| r.get(0))?;
                    rows.collect::<Result<_, _>>()?
                };
                for b in &mut out {
                    if pruned.contains(&to_i64(b.seq, "seq")?) {
                        fill_pruned(&tx, b, "", &label)?;
                    }
                }
            }
            tx.finish()?;
            Ok(out)
        })
        .await
    }

    async fn run_batches(
        &self,
        run: &str,
        node: &str,
        after: (&str, u64),
        limit: u32,
        account_label: &str,
    ) -> Result<Vec<BatchEnergy>, StoreError> {
        let (run, node, after_node) = (run.to_owned(), node.to_owned(), after.0.to_owned());
        let label = account_label.to_owned();
        let after_seq = to_i64(after.1, "seq")?;
        self.with_read(move |c| {
            let tx = c.transaction()?;
            let p = params![run, node, after_node, after_seq, i64::from(limit)];
            let batches = {
                let mut st = tx.prepare(SQL_RUN_BATCHES)?;
                let rows = st.query_map(p, raw_batch)?;
                rows.collect::<Result<Vec<_>, _>>()?
            };
            let allocations = {
                let mut st = tx.prepare(SQL_RUN_ALLOCATIONS)?;
                let p = params![run, node, after_node, after_seq, i64::from(limit), label];
                let rows = st.query_map(p, raw_allocation)?;
                rows.collect::<Result<Vec<_>, _>>()?
            };
            let stored = assemble(batches, allocations)?;
            let from = detail_from(&tx)?;
            if from == i64::MIN {
                return Ok(stored);
            }
            // Pruned batches of the hours the run has totals in, decoded: those that billed it.
            let mut pruned = Vec::new();
            let mut at = (after_node.clone(), after_seq);
            while pruned.len() < limit as usize {
                let page = {
                    let mut st = tx.prepare_cached(SQL_PRUNED_OF_RUN)?;
                    let p = params![run, node, from, at.0, at.1, PRUNED_PAGE];
                    let rows = st.query_map(p, raw_batch)?;
                    rows.collect::<Result<Vec<_>, _>>()?
                };
                let full = page.len() as i64 == PRUNED_PAGE;
                if let Some(last) = page.last() {
                    at = (last.0.clone(), last.1);
                }
                for mut b in assemble(page, Vec::new())? {
                    fill_pruned(&tx, &mut b, &run, &label)?;
                    if !b.allocations.is_empty() && pruned.len() < limit as usize {
                        pruned.push(b);
                    }
                }
                if !full {
                    break;
                }
            }
            tx.finish()?;
            Ok(detail::merge_batches(stored, pruned, limit as usize))
        })
        .await
    }

    async fn record_read(&self, read: ReadAudit) -> Result<(), StoreError> {
        self.with(move |c| {
            c.execute(
                SQL_INSERT_READ,
                params![
                    read.at_unix_ns,
                    read.reader,
                    read.role,
                    read.call,
                    read.filters,
                    to_i64(read.rows, "rows")?,
                    read.outcome
                ],
            )?;
            Ok(())
        })
        .await
    }

    async fn prune_reads(&self, before_unix_ns: i64) -> Result<u64, StoreError> {
        self.with(move |c| Ok(c.execute(SQL_PRUNE_READS, params![before_unix_ns])? as u64))
            .await
    }

    async fn reads(&self, limit: u32) -> Result<Vec<ReadAudit>, StoreError> {
        self.with_read(move |c| {
            let mut st = c.prepare(SQL_READS)?;
            let rows = st.query_map(params![i64::from(limit)], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, String>(6)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (at_unix_ns, reader, role, call, filters, n, outcome) = row?;
                out.push(ReadAudit {
                    at_unix_ns,
                    reader,
                    role,
                    call,
                    filters,
                    rows: to_u64(n, "read_audit.rows_returned")?,
                    outcome,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn run_finals(&self) -> Result<Vec<(String, String, String, u64)>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT node_id, run_id, final_usage, reconciled_usage_us FROM run_finals \
                 ORDER BY node_id, run_id",
            )?;
            let rows = st.query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get::<_, i64>(3)?))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (n, r, f, us) = row?;
                out.push((n, r, f, to_u64(us, "run_finals.reconciled_usage_us")?));
            }
            Ok(out)
        })
        .await
    }

    async fn run_label(&self, key: &str) -> Result<Vec<(String, String, String)>, StoreError> {
        let key = key.to_owned();
        self.with(move |c| {
            let mut st = c.prepare(
                "SELECT node_id, run_id, value FROM run_labels WHERE key = ?1 \
                 ORDER BY node_id, run_id",
            )?;
            let rows = st.query_map(params![key], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    async fn nodes(&self) -> Result<Vec<NodeRow>, StoreError> {
        self.with(|c| {
            let mut nodes: BTreeMap<String, NodeRow> = BTreeMap::new();
            let mut st = c.prepare(
                "SELECT b.node_id, b.seq, b.key_epoch, b.sealed_unix_ns, b.received_unix_ns, \
                 s.n, s.iv FROM batches b JOIN \
                 (SELECT node_id, MAX(seq) AS m, COUNT(*) AS n, SUM(intervals) AS iv \
                  FROM batches GROUP BY node_id) s \
                 ON b.node_id = s.node_id AND b.seq = s.m",
            )?;
            let mut rows = st.query([])?;
            while let Some(r) = rows.next()? {
                let node_id: String = r.get(0)?;
                let row = nodes.entry(node_id.clone()).or_default();
                row.node_id = node_id;
                row.last_seq = to_u64(r.get(1)?, "seq")?;
                row.key_epoch = u32::try_from(r.get::<_, i64>(2)?).ok();
                row.last_sealed_unix_ns = Some(r.get(3)?);
                row.last_received_unix_ns = Some(r.get(4)?);
                row.batches = to_u64(r.get(5)?, "count")?;
                row.intervals = to_u64(r.get(6)?, "intervals")?;
            }
            let mut st = c.prepare(
                "SELECT node_id, highest_seen_seq, announced_sealed_seq, \
                 last_heartbeat_sent_unix_ns, last_heartbeat_received_unix_ns FROM nodes",
            )?;
            let mut rows = st.query([])?;
            while let Some(r) = rows.next()? {
                let node_id: String = r.get(0)?;
                let row = nodes.entry(node_id.clone()).or_default();
                row.node_id = node_id;
                row.highest_seen_seq = to_u64(r.get(1)?, "highest_seen_seq")?;
                row.announced_sealed_seq = to_u64(r.get(2)?, "announced_sealed_seq")?;
                row.last_heartbeat_sent_unix_ns = r.get(3)?;
                row.last_heartbeat_received_unix_ns = r.get(4)?;
            }
            let mut st = c.prepare(
                "SELECT node_id, seq, kind, stored_hash, received_hash, first_detected_unix_ns, \
                 last_detected_unix_ns, times_seen FROM forks ORDER BY node_id, seq, \
                 first_detected_unix_ns",
            )?;
            let mut rows = st.query([])?;
            while let Some(r) = rows.next()? {
                let node_id: String = r.get(0)?;
                let row = nodes.entry(node_id.clone()).or_default();
                row.node_id = node_id;
                row.forks.push(ForkRow {
                    seq: to_u64(r.get(1)?, "forks.seq")?,
                    kind: r.get(2)?,
                    stored_sha256: wattd_records::durable::hex(&r.get::<_, Vec<u8>>(3)?),
                    received_sha256: wattd_records::durable::hex(&r.get::<_, Vec<u8>>(4)?),
                    first_detected_unix_ns: r.get(5)?,
                    last_detected_unix_ns: r.get(6)?,
                    times_seen: to_u64(r.get(7)?, "forks.times_seen")?,
                });
            }
            let mut st = c.prepare(
                "SELECT l.node_id, l.first_seq, l.last_seq, l.reason, l.detail, l.stated_unix_ns, \
                 l.recorded_unix_ns, l.statement, \
                 (SELECT signed_batch FROM batches b WHERE b.node_id = l.node_id \
                  AND b.seq = l.first_seq - 1), \
                 (SELECT signed_batch FROM batches b WHERE b.node_id = l.node_id \
                  AND b.seq = l.last_seq + 1) \
                 FROM lost_ranges l ORDER BY l.node_id, l.first_seq",
            )?;
            let mut rows = st.query([])?;
            while let Some(r) = rows.next()? {
                let node_id: String = r.get(0)?;
                let row = nodes.entry(node_id.clone()).or_default();
                row.node_id = node_id;
                let lost = LostRangeRow {
                    first_seq: to_u64(r.get(1)?, "lost_ranges.first_seq")?,
                    last_seq: to_u64(r.get(2)?, "lost_ranges.last_seq")?,
                    reason: r.get(3)?,
                    detail: r.get(4)?,
                    stated_unix_ns: r.get(5)?,
                    recorded_unix_ns: r.get(6)?,
                    statement_sha256: wattd_records::durable::hex(
                        &wattd_records::batch::chain_hash(&r.get::<_, Vec<u8>>(7)?),
                    ),
                    before: r.get(8)?,
                    after: r.get(9)?,
                };
                row.last_seq = row.last_seq.max(lost.last_seq);
                row.lost.push(lost);
            }
            let mut st = c.prepare(
                "SELECT node_id, reason, COUNT(*), SUM(energy_uj >> 32), \
                 SUM(energy_uj & 4294967295), MIN(seq), MAX(seq) FROM quarantined \
                 GROUP BY node_id, reason ORDER BY node_id, reason",
            )?;
            let mut rows = st.query([])?;
            while let Some(r) = rows.next()? {
                let node_id: String = r.get(0)?;
                let row = nodes.entry(node_id.clone()).or_default();
                row.node_id = node_id;
                row.quarantined.push(QuarantineRow {
                    reason: r.get(1)?,
                    allocations: to_u64(r.get(2)?, "quarantined count")?,
                    energy_uj: halves(r.get(3)?, r.get(4)?)?,
                    first_seq: to_u64(r.get(5)?, "quarantined.seq")?,
                    last_seq: to_u64(r.get(6)?, "quarantined.seq")?,
                });
            }
            let ids: Vec<String> = nodes.keys().cloned().collect();
            for id in ids {
                let clock = clock_of(c, &id)?;
                if let Some(row) = nodes.get_mut(&id) {
                    row.clock = clock;
                }
            }
            Ok(nodes.into_values().collect())
        })
        .await
    }
}

/// Batches read per query by `audit`.
const AUDIT_PAGE: i64 = 500;

/// Batches received before this have no allocation rows ([`detail`]); `i64::MIN`: all have.
fn detail_from(c: &Connection) -> Result<i64, StoreError> {
    Ok(c.prepare_cached(SQL_DETAIL_FROM)?
        .query_row([], |r| r.get(0))
        .optional()?
        .unwrap_or(i64::MIN))
}

/// What was quarantined of a stored batch: (interval index, domain).
fn quarantined_of(
    c: &Connection,
    node: &str,
    seq: i64,
) -> Result<Vec<detail::QuarantinedRow>, StoreError> {
    let mut st = c.prepare_cached(SQL_QUARANTINED_OF)?;
    let rows = st.query_map(params![node, seq], |r| quarantined_row(r, 0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// A quarantined allocation from a row's columns `at..at + 6`, in
/// [`detail::QuarantinedRow`]'s order.
fn quarantined_row(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<detail::QuarantinedRow> {
    Ok((
        r.get(at)?,
        r.get(at + 1)?,
        r.get(at + 2)?,
        r.get(at + 3)?,
        r.get(at + 4)?,
        r.get(at + 5)?,
    ))
}

/// A pruned batch's billed allocations (of `run`, when not empty), decoded from its bytes,
/// each with its run's `label`.
fn fill_pruned(
    c: &Connection,
    b: &mut BatchEnergy,
    run: &str,
    label: &str,
) -> Result<(), StoreError> {
    let q = quarantined_of(c, &b.node_id, to_i64(b.seq, "seq")?)?;
    let mut accounts: BTreeMap<String, Option<String>> = BTreeMap::new();
    let mut out = Vec::new();
    for r in detail::billed_of(&b.node_id, b.seq, &b.signed_batch, &q)? {
        if !run.is_empty() && r.run_id != run {
            continue;
        }
        let mut a = detail::stored_allocation(r)?;
        if !accounts.contains_key(&a.run_id) {
            let v = c
                .prepare_cached(SQL_LABEL_OF)?
                .query_row(params![b.node_id, a.run_id, label], |r| r.get(0))
                .optional()?;
            accounts.insert(a.run_id.clone(), v);
        }
        a.account = accounts.get(&a.run_id).cloned().flatten();
        out.push(a);
    }
    detail::sort_allocations(&mut out);
    b.allocations = out;
    Ok(())
}

fn raw_batch(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawBatch> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
    ))
}

fn raw_allocation(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawAllocation> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
        r.get(9)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The database is created mode 600, and its WAL and shared-memory files follow; one that
    /// others can read is refused for serving, naming the file and the fix.
    #[tokio::test]
    async fn the_database_is_private_to_its_owner() -> Result<(), StoreError> {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().map_err(|e| StoreError::Url(e.to_string()))?;
        let path = dir.path().join("ledger.db");
        let store = SqliteStore::open(&path, OpenMode::Serve).await?;
        let mode = |p: &str| {
            std::fs::metadata(dir.path().join(p))
                .map(|m| m.permissions().mode() & 0o777)
                .ok()
        };
        assert_eq!(mode("ledger.db"), Some(0o600));
        assert_eq!(mode("ledger.db-wal"), Some(0o600));
        assert_eq!(mode("ledger.db-shm"), Some(0o600));
        drop(store);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| StoreError::Url(e.to_string()))?;
        let err = SqliteStore::open(&path, OpenMode::Serve)
            .await
            .expect_err("readable by others");
        let text = err.to_string();
        assert!(
            text.contains("mode 644") && text.contains("chmod 600"),
            "{text}"
        );
        // Queries still read it (and warn).
        SqliteStore::open(&path, OpenMode::Query).await?;
        Ok(())
    }

    /// A group of three batches in which the middle one fails half way (after its batch row,
    /// at its allocations): that one is rolled back alone and told so, the others are stored
    /// and told so; a failure that rolls back the whole transaction fails the whole group,
    /// and nothing of it is stored.
    #[tokio::test]
    async fn a_failing_batch_of_a_group_commit_fails_alone() -> Result<(), StoreError> {
        use crate::check::{verify_batch, KnownKeys};
        use crate::enrol::EnrolledKey;
        use crate::plausible::NodeLimits;
        use wattd_proto::v1::{Allocation, DomainEnergy, Interval};
        use wattd_records::batch::GENESIS_HASH;
        use wattd_records::identity::NodeKey;
        use wattd_records::seal::{sign_batch, BatchContent};
        let dir = tempfile::tempdir().map_err(|e| StoreError::Url(e.to_string()))?;
        let store = SqliteStore::open(&dir.path().join("ledger.db"), OpenMode::Serve).await?;
        let verified = |node: &str, seed: u8| -> Arc<VerifiedBatch> {
            let key = NodeKey::from_seed(node, 1, [seed; 32]);
            let interval = Interval {
                index: 1,
                start_monotonic_ns: 1_000_000_000,
                end_monotonic_ns: 2_000_000_000,
                boot_id: "boot".into(),
                policy: "proportional".into(),
                policy_version: 1,
                domains: vec![DomainEnergy {
                    domain: "package".into(),
                    package: Some(0),
                    source: "powercap".into(),
                    quality: 1,
                    measured_uj: 1500,
                    allocations: vec![Allocation {
                        run_id: "r1".into(),
                        active_uj: 1000,
                        idle_uj: 500,
                        usage_us: 10_000,
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            };
            let b = sign_batch(
                &key,
                1,
                GENESIS_HASH,
                1,
                BatchContent {
                    intervals: vec![interval],
                    ..Default::default()
                },
            );
            let mut enrolled = std::collections::BTreeMap::new();
            enrolled.insert(
                1,
                EnrolledKey {
                    identity: key.public(),
                    key_id: key.key_id(),
                    file: "test".into(),
                },
            );
            let signed = prost::Message::decode(b.bytes.as_slice()).expect("own batch");
            Arc::new(verify_batch(node, &KnownKeys::new(node, &enrolled), &signed).expect("valid"))
        };
        let limits = Arc::new(NodeLimits::new(&Default::default(), i64::MAX));
        let run_group = |nodes: &[(&str, u8)]| {
            let mut answers = Vec::new();
            for &(node, seed) in nodes {
                let (done, answer) = tokio::sync::oneshot::channel();
                store.pending.lock().expect("lock").push(PendingCommit {
                    batch: verified(node, seed),
                    limits: limits.clone(),
                    received_unix_ns: 1,
                    done,
                });
                answers.push(answer);
            }
            commit_group(&mut store.conn.lock().expect("lock"), &store.pending);
            answers
                .into_iter()
                .map(|mut a| match a.try_recv() {
                    Ok(Ok(Commit::Stored { .. })) => "stored".to_owned(),
                    Ok(Ok(other)) => format!("{other:?}"),
                    Ok(Err(e)) => format!("error: {e}"),
                    Err(e) => format!("unanswered: {e}"),
                })
                .collect::<Vec<_>>()
        };
        let stored = |node: &str| -> i64 {
            store
                .conn
                .lock()
                .expect("lock")
                .query_row(
                    "SELECT (SELECT count(*) FROM batches WHERE node_id = ?1) + \
                     (SELECT count(*) FROM allocations WHERE node_id = ?1)",
                    params![node],
                    |r| r.get(0),
                )
                .expect("count")
        };
        store.conn.lock().expect("lock").execute_batch(
            "CREATE TEMP TRIGGER fail_b BEFORE INSERT ON allocations WHEN NEW.node_id = 'b' \
             BEGIN SELECT RAISE(ABORT, 'b fails'); END; \
             CREATE TEMP TRIGGER roll_z BEFORE INSERT ON allocations WHEN NEW.node_id = 'z' \
             BEGIN SELECT RAISE(ROLLBACK, 'z rolls back'); END;",
        )?;
        let got = run_group(&[("a", 1), ("b", 2), ("c", 3)]);
        assert_eq!(got[0], "stored");
        assert!(got[1].contains("b fails"), "{got:?}");
        assert_eq!(got[2], "stored");
        // a and c: the batch row and its allocation; b: nothing, not even its batch row.
        assert_eq!((stored("a"), stored("b"), stored("c")), (2, 0, 2));
        let got = run_group(&[("x", 4), ("z", 5), ("y", 6)]);
        assert!(got.iter().all(|g| g.contains("rolled back")), "{got:?}");
        assert_eq!((stored("x"), stored("z"), stored("y")), (0, 0, 0));
        Ok(())
    }

    /// A backup taken while the store is open to serve is a private, checked copy; an
    /// existing target is refused and left alone; a damaged copy would be removed.
    #[tokio::test]
    async fn a_backup_is_a_private_checked_copy_and_never_overwrites() -> Result<(), StoreError> {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().map_err(|e| StoreError::Url(e.to_string()))?;
        let path = dir.path().join("ledger.db");
        let store = SqliteStore::open(&path, OpenMode::Serve).await?;
        let to = dir.path().join("copy.db");
        let r = backup(&path, &to)?;
        assert_eq!((r.batches, r.nodes), (0, 0));
        assert!(r.bytes > 0);
        let mode = std::fs::metadata(&to)
            .map(|m| m.permissions().mode() & 0o777)
            .map_err(|e| StoreError::Url(e.to_string()))?;
        assert_eq!(mode, 0o600);
        // The copy opens as a ledger.
        drop(SqliteStore::open(&to, OpenMode::Query).await?);
        std::fs::write(&to, b"keep me").map_err(|e| StoreError::Url(e.to_string()))?;
        let err = backup(&path, &to).expect_err("the target exists");
        assert!(err.to_string().contains("must not exist"), "{err}");
        assert_eq!(std::fs::read(&to).ok().as_deref(), Some(&b"keep me"[..]));
        drop(store);
        Ok(())
    }

    /// A database written by a version-1 ledger (no `lost_ranges`) is upgraded in place when a
    /// ledger opens it to serve; a query-only open of it is refused and names both versions.
    #[tokio::test]
    async fn a_version_1_database_is_upgraded_when_served() -> Result<(), StoreError> {
        let dir = tempfile::tempdir().map_err(|e| StoreError::Task(e.to_string()))?;
        let path = dir.path().join("v1.db");
        {
            let c = Connection::open(&path)?;
            let v1 = SCHEMA
                .split("CREATE TABLE IF NOT EXISTS lost_ranges")
                .next()
                .unwrap_or_default();
            c.execute_batch(v1)?;
            c.execute(
                "INSERT INTO ledger_meta (key, value) VALUES ('schema_version', 1)",
                [],
            )?;
        }
        // Made with the umask's mode, as older ledgers made theirs: the upgrade's chmod.
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| StoreError::Task(e.to_string()))?;
        }
        let err = SqliteStore::open(&path, OpenMode::Query)
            .await
            .expect_err("v1 is not v2");
        assert!(err.to_string().contains("schema version Some(1)"), "{err}");
        let s = SqliteStore::open(&path, OpenMode::Serve).await?;
        assert_eq!(s.tip("n").await?, Tip::genesis());
        assert!(s.nodes().await?.is_empty());
        drop(s);
        SqliteStore::open(&path, OpenMode::Query).await?;
        Ok(())
    }
}
