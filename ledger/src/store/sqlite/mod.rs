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

mod file;
mod read;
mod write;

use file::open_blocking;
pub use file::{backup, BackupReport};
use read::{detail_from, quarantined_row, AUDIT_PAGE};
use write::{commit_group, hash_at, record_loss_blocking, tip_of};

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
        read::learnt_keys(self, node).await
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
        read::run_energy_between(self, node, after_seq, upto_seq).await
    }

    async fn run_totals(&self) -> Result<Vec<RunDomainTotal>, StoreError> {
        self.run_totals_where(TotalsFilter::default()).await
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
        read::upkeep_detail(self, now_unix_ns, retention).await
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
        read::reads(self, limit).await
    }

    async fn run_finals(&self) -> Result<Vec<(String, String, String, u64)>, StoreError> {
        read::run_finals(self).await
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
        read::nodes(self).await
    }
}

#[cfg(test)]
mod tests {
    use super::file::SCHEMA;
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
