//! Durable storage behind one trait, [`Store`], with two implementations: SQLite (the embedded
//! default; WAL, `synchronous = FULL`) and PostgreSQL (several ledger processes on one
//! database).
//!
//! **Invariant:** a node's stored chain is always exactly `1..=tip`, each seq either a stored
//! batch or inside a lost range the node declared in a signed statement (`lost_ranges`): a
//! batch (or a lost range) is inserted only in a transaction that finds its predecessor (a
//! stored batch, or a lost range ending just before it) with the hash its `prev_hash` names and
//! with the key the chain says comes next. So "stored" implies "every earlier seq stored or
//! declared lost", and `acked_seq` is just the node's chain tip.
//!
//! **Invariant:** the primary key `(node_id, seq)` decides every race. A batch's identity is
//! (node id, key epoch, seq), but the key epoch is a function of the seq along a node's one
//! chain (it changes only at the seq a stored rotation names), so a unique (node_id, seq) is a
//! unique (node_id, key_epoch, seq), and it also forbids two epochs claiming one seq. Two
//! processes inserting the same (node_id, seq): the second waits for the first and gets a
//! unique violation, rolls back, re-reads and answers duplicate (same hash) or fork.

pub mod detail;
pub mod pgpass;
pub mod pgtarget;
pub mod postgres;
pub mod sqlite;

use std::future::Future;
use std::sync::Arc;

use wattd_records::batch::{ChainHash, GENESIS_HASH};
use wattd_records::identity::KeyId;

pub use detail::{AuditBatch, DetailUpkeep, HourlyTotals, NodeTotals};

use crate::check::{LearntKey, VerifiedBatch};
use crate::plausible::{NodeClock, NodeLimits, Verdict};

/// What the store knows of a node's chain end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tip {
    /// Highest stored seq; 0 when nothing is stored.
    pub seq: u64,
    /// Hash of the batch at `seq` (GENESIS_HASH when none).
    pub hash: ChainHash,
}

impl Tip {
    pub fn genesis() -> Self {
        Tip {
            seq: 0,
            hash: GENESIS_HASH,
        }
    }
}

/// The outcome of [`Store::commit`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Commit {
    /// Committed now (durable when this returns), with the plausibility verdict: the
    /// allocations it names were stored as quarantined, not billed.
    Stored { verdict: Verdict },
    /// The same (node, seq) with the same bytes was already stored (perhaps by another process).
    Duplicate,
    /// A different batch is stored at this (node, seq).
    Fork { stored_hash: ChainHash },
    /// The predecessor is not stored yet: the caller must hold the batch. Carries the node's
    /// real tip, which another process may have moved.
    NotNext { tip: u64 },
    /// The predecessor is stored but its hash is not this batch's prev_hash.
    ChainBreak { predecessor_hash: ChainHash },
    /// The node declared this seq lost (a signed loss statement was recorded for it): the chain
    /// continues without it, and it is never stored.
    InLostRange { first_seq: u64, last_seq: u64 },
    /// The predecessor says the next batch is signed by another key (epoch, key id).
    KeyDiscontinuity {
        expected_epoch: u32,
        expected_key_id: KeyId,
    },
}

/// Where a fork was seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForkKind {
    /// A different batch is stored at this seq.
    Stored,
    /// A different batch with this seq is held on the same stream.
    Held,
    /// This batch's prev_hash is not the stored predecessor's hash: the node's chain forked
    /// at the predecessor.
    ChainLink,
}

impl ForkKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ForkKind::Stored => "stored",
            ForkKind::Held => "held",
            ForkKind::ChainLink => "chain_link",
        }
    }
}

/// Evidence of a fork, kept in the `forks` table (one row per distinct received batch).
#[derive(Clone, Debug)]
pub struct ForkRecord {
    pub node_id: String,
    pub seq: u64,
    pub kind: ForkKind,
    /// Hash of the batch the ledger holds (stored or held; for a chain link, the predecessor's).
    pub stored_hash: ChainHash,
    pub received_hash: ChainHash,
    pub received_bytes: Vec<u8>,
    pub detected_unix_ns: i64,
}

/// A verified loss statement to record: the node says `first_seq..=last_seq` will never be
/// sent (`first_seq` already cut to the store's tip + 1).
#[derive(Clone, Debug)]
pub struct LossRecord {
    pub node_id: String,
    pub first_seq: u64,
    pub last_seq: u64,
    /// The hash of batch `last_seq` (the next batch's prev_hash).
    pub last_hash: ChainHash,
    pub next_key_epoch: u32,
    pub next_key_id: KeyId,
    /// The epoch of the key that signed the statement.
    pub signer_epoch: u32,
    /// Rotations the statement showed (verified): stored with the range, as a stored
    /// announcing batch's would be.
    pub rotations: Vec<LearntKey>,
    /// `damaged` or `not_retained`.
    pub reason: String,
    pub detail: String,
    pub stated_unix_ns: i64,
    pub recorded_unix_ns: i64,
    /// The SignedLossStatement as received: the evidence.
    pub statement: Vec<u8>,
}

/// The outcome of [`Store::record_loss`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LossOutcome {
    Recorded,
    /// The store's tip is not `first_seq - 1` (another process moved it, or a hole lies
    /// before the range).
    NotNext {
        tip: u64,
    },
    /// The statement's key, or the key it names for the batch after the range, is older than
    /// the key the chain is at (a retired key cannot declare losses).
    StaleKey {
        expected_epoch: u32,
    },
}

/// A recorded lost range, for `nodes`, with the stored batches on either side (their running
/// totals give the range's energy).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LostRangeRow {
    pub first_seq: u64,
    pub last_seq: u64,
    pub reason: String,
    pub detail: String,
    pub stated_unix_ns: i64,
    pub recorded_unix_ns: i64,
    /// SHA-256 of the stored statement.
    pub statement_sha256: String,
    /// The SignedBatch bytes of `first_seq - 1` and `last_seq + 1`, when stored.
    pub before: Option<Vec<u8>>,
    pub after: Option<Vec<u8>>,
}

/// A per-node, per-run, per-domain total.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunDomainTotal {
    /// The node whose batches allocated it: a run billed by several nodes is several rows,
    /// so a node that bills someone else's run is visible as itself.
    pub node_id: String,
    pub run_id: String,
    pub domain: String,
    pub energy_uj: u128,
}

/// A stored fork, for `nodes`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ForkRow {
    pub seq: u64,
    pub kind: String,
    pub stored_sha256: String,
    pub received_sha256: String,
    pub first_detected_unix_ns: i64,
    pub last_detected_unix_ns: i64,
    pub times_seen: u64,
}

/// What the store knows of one node, for `nodes`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeRow {
    pub node_id: String,
    pub last_seq: u64,
    pub batches: u64,
    pub intervals: u64,
    pub key_epoch: Option<u32>,
    pub last_sealed_unix_ns: Option<i64>,
    pub last_received_unix_ns: Option<i64>,
    pub highest_seen_seq: u64,
    pub announced_sealed_seq: u64,
    pub last_heartbeat_sent_unix_ns: Option<i64>,
    pub last_heartbeat_received_unix_ns: Option<i64>,
    pub forks: Vec<ForkRow>,
    /// Ranges the node declared lost, in seq order.
    pub lost: Vec<LostRangeRow>,
    /// Quarantined allocations by reason (authentic but implausible; never billed).
    pub quarantined: Vec<QuarantineRow>,
    /// The plausibility judge's state of the node (none before its first judged batch).
    pub clock: Option<NodeClock>,
}

/// Quarantined allocations of one node with one reason.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct QuarantineRow {
    pub reason: String,
    pub allocations: u64,
    pub energy_uj: u128,
    pub first_seq: u64,
    pub last_seq: u64,
}

/// One billed allocation as stored (quarantined ones are never here).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredAllocation {
    pub interval_index: u64,
    pub run_id: String,
    pub domain: String,
    pub active_uj: u64,
    pub idle_uj: u64,
    pub energy_uj: u64,
    pub usage_us: u64,
    /// The run's account label as stored when this was read (None: no such label yet).
    pub account: Option<String>,
}

/// A stored batch with (some of) its billed allocations: for the change feed (all of them) and
/// a run's audit trail (that run's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchEnergy {
    pub node_id: String,
    pub seq: u64,
    pub hash: ChainHash,
    pub key_epoch: u32,
    pub key_id: KeyId,
    /// The SignedBatch exactly as received.
    pub signed_batch: Vec<u8>,
    /// In (run, domain, interval) order.
    pub allocations: Vec<StoredAllocation>,
}

/// Which allocations [`Store::run_totals_where`] sums; `None` is no filter.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TotalsFilter {
    pub run_id: Option<String>,
    pub node_id: Option<String>,
    /// Batches sealed at or after this (Unix ns).
    pub from_unix_ns: Option<i64>,
    /// Batches sealed before this (Unix ns).
    pub to_unix_ns: Option<i64>,
}

/// One audited read of the query API.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ReadAudit {
    pub at_unix_ns: i64,
    /// The reader's certificate CN.
    pub reader: String,
    /// `metering`, `account:<id>`, or `none` (refused before a role was found).
    pub role: String,
    /// `RunTotals`, `Changes`, `RunIntervals`.
    pub call: String,
    /// The request's filters, as JSON.
    pub filters: String,
    /// Rows returned (totals, changes, batches).
    pub rows: u64,
    /// `ok`, or the gRPC code and reason of the refusal or failure.
    pub outcome: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Url(String),
    #[error("{0}")]
    PgUrl(#[from] pgtarget::PgUrlError),
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("postgres: {}", postgres::describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// The stored data contradicts itself (or was written by something else).
    #[error("store is inconsistent: {0}")]
    Corrupt(String),
    #[error("store task failed: {0}")]
    Task(String),
}

/// `sqlite:PATH`, `sqlite://PATH` or `postgres://...` / `postgresql://...`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    Sqlite(std::path::PathBuf),
    Postgres(String),
}

/// Why a `--store` value is not a store URL.
#[derive(Debug, thiserror::Error)]
pub enum StoreUrlError {
    #[error("{0:?}: no file path after sqlite:")]
    NoPath(String),
    #[error("{0:?}: a store URL is sqlite:PATH, sqlite://PATH or postgres://USER@HOST:PORT/DB")]
    Scheme(String),
    /// A PostgreSQL URL checked now (TLS settings, no password, loopback unless TLS).
    #[error(transparent)]
    Postgres(#[from] pgtarget::PgUrlError),
}

impl std::str::FromStr for StoreUrl {
    type Err = StoreUrlError;

    fn from_str(s: &str) -> Result<Self, StoreUrlError> {
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            // Checked now, so a bad URL is a usage error; the store parses it again when it
            // opens.
            pgtarget::PgTarget::parse(s)?;
            return Ok(StoreUrl::Postgres(s.to_owned()));
        }
        if let Some(rest) = s.strip_prefix("sqlite:") {
            // sqlite:///abs, sqlite://rel and sqlite:path all name a file path.
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if path.is_empty() {
                return Err(StoreUrlError::NoPath(s.to_owned()));
            }
            return Ok(StoreUrl::Sqlite(path.into()));
        }
        Err(StoreUrlError::Scheme(s.to_owned()))
    }
}

/// Open the store for serving (creates the schema) or for queries only (refuses a missing one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    Serve,
    Query,
}

/// Fork evidence kept per node, in rows and in bytes of received batches.
pub const FORK_ROWS_PER_NODE: i64 = 64;
pub const FORK_BYTES_PER_NODE: i64 = 64 << 20;

/// Current schema version, kept in `ledger_meta`. Version 2 added `lost_ranges`, version 3
/// `node_clock`, `quarantined`, `run_labels` and `run_finals`, version 4 `read_audit`; an older
/// database is upgraded in place when opened to serve
/// (the changes only add tables). A node with batches stored before version 3 is judged from
/// its first batch after the upgrade.
/// Version 6 added two indexes on `batches` (by seal time per node, by receipt time) and, on
/// PostgreSQL, partitioned `allocations` by the day the ledger received the batch
/// ([`detail`]).
pub const SCHEMA_VERSION: i64 = 6;

/// The SQL that moves an older schema version to [`SCHEMA_VERSION`] (after the tables are
/// created), in both stores.
pub(crate) const SQL_UPGRADE_VERSION: &str =
    "UPDATE ledger_meta SET value = 6 WHERE key = 'schema_version' AND value IN (1, 2, 3, 4, 5)";

/// Nanoseconds in an hour: the rollup's unit of time.
pub(crate) const HOUR_NS: i64 = 3_600_000_000_000;

/// The hour (since the Unix epoch) a batch sealed at `sealed_unix_ns` is counted in; integer
/// division, as both databases divide.
pub(crate) fn hour_of(sealed_unix_ns: i64) -> i64 {
    sealed_unix_ns / HOUR_NS
}

/// A total from its halves' sums (`None` when both are absent).
pub(crate) fn from_halves(hi: Option<i64>, lo: Option<i64>) -> Option<u128> {
    match (hi, lo) {
        (None, None) => None,
        (hi, lo) => {
            let part = |v: Option<i64>| u128::from(v.unwrap_or(0).max(0).unsigned_abs());
            Some((part(hi) << 32) + part(lo))
        }
    }
}

/// Fills `run_totals_hourly` from the stored allocations when the schema is older than 5 (run
/// before [`SQL_UPGRADE_VERSION`], in the schema transaction; on a new or current database the
/// condition is false and nothing is read).
pub(crate) const SQL_BACKFILL_ROLLUP: &str = "INSERT INTO run_totals_hourly (node_id, run_id, \
     domain, hour, energy_hi, energy_lo) SELECT a.node_id, a.run_id, a.domain, b.sealed_unix_ns / \
     3600000000000, SUM(a.energy_uj >> 32), SUM(a.energy_uj & 4294967295) FROM allocations a JOIN batches b ON b.node_id = a.node_id \
     AND b.seq = a.seq WHERE (SELECT value FROM ledger_meta WHERE key = 'schema_version') < 5 \
     GROUP BY a.node_id, a.run_id, a.domain, b.sealed_unix_ns / 3600000000000";

/// SQLite's add of one (node, run, domain, hour) sum to the rollup.
pub(crate) const SQL_ROLLUP_UPSERT: &str = "INSERT INTO run_totals_hourly (node_id, run_id, \
     domain, hour, energy_hi, energy_lo) VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (node_id, \
     run_id, domain, hour) DO UPDATE SET energy_hi = energy_hi + excluded.energy_hi, \
     energy_lo = energy_lo + excluded.energy_lo";

/// (run, domain) -> (sum of the high 32-bit halves, sum of the low halves) of energy, uJ; the
/// keys borrowed from the batch's rows (no copy per row).
pub(crate) type RollupSums<'a> = std::collections::BTreeMap<(&'a str, &'a str), (i64, i64)>;

/// One batch's billed allocations summed per (run, domain) as (sum of high 32-bit halves, sum
/// of low halves), for the hourly rollup. Exact for any values (allocations are never negative:
/// the checks refuse them; a batch holds far fewer than 2^31 of them).
pub(crate) fn rollup<'a>(
    billed: &[&'a crate::check::AllocationRow],
) -> Result<RollupSums<'a>, StoreError> {
    let mut sums = RollupSums::new();
    for a in billed {
        let s = sums
            .entry((a.run_id.as_str(), a.domain.as_str()))
            .or_insert((0, 0));
        let add = |x: i64, y: i64| {
            x.checked_add(y).ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "run {} domain {}: energy sum overflows",
                    a.run_id, a.domain
                ))
            })
        };
        s.0 = add(s.0, a.energy_uj >> 32)?;
        s.1 = add(s.1, a.energy_uj & 0xffff_ffff)?;
    }
    Ok(sums)
}

/// The query API's SQL, the same text for both stores (SQLite numbers `$N` parameters in order
/// of first appearance, and each appears first in order here).
///
/// A node's stored batches above a seq, oldest first (the change feed pages through them).
pub(crate) const SQL_BATCHES_ABOVE: &str = "SELECT node_id, seq, hash, key_epoch, key_id, \
     signed_batch FROM batches WHERE node_id = $1 AND seq > $2 ORDER BY seq LIMIT $3";
/// Their billed allocations, each with its run's account label (`$4` the label's key), read in
/// the same snapshot.
pub(crate) const SQL_ALLOCATIONS_BETWEEN: &str = "WITH a AS (SELECT node_id, seq, \
     interval_index, run_id, domain, active_uj, idle_uj, energy_uj, usage_us FROM allocations \
     WHERE node_id = $1 AND seq > $2 AND seq <= $3) \
     SELECT a.node_id, a.seq, a.interval_index, a.run_id, a.domain, a.active_uj, a.idle_uj, \
     a.energy_uj, a.usage_us, l.value FROM a LEFT JOIN run_labels l ON l.node_id = a.node_id \
     AND l.run_id = a.run_id AND l.key = $4";
/// The batches that billed a run, after a (node, seq), in (node, seq) order.
pub(crate) const SQL_RUN_BATCHES: &str = "WITH picked AS (SELECT DISTINCT node_id, seq FROM \
     allocations WHERE run_id = $1 AND ($2 = '' OR node_id = $2) AND (node_id > $3 OR \
     (node_id = $3 AND seq > $4)) ORDER BY node_id, seq LIMIT $5) \
     SELECT b.node_id, b.seq, b.hash, b.key_epoch, b.key_id, b.signed_batch FROM batches b \
     JOIN picked p ON b.node_id = p.node_id AND b.seq = p.seq ORDER BY b.node_id, b.seq";
/// The run's allocations in those batches, with its account label (`$6` the label's key).
pub(crate) const SQL_RUN_ALLOCATIONS: &str = "WITH picked AS (SELECT DISTINCT node_id, seq FROM \
     allocations WHERE run_id = $1 AND ($2 = '' OR node_id = $2) AND (node_id > $3 OR \
     (node_id = $3 AND seq > $4)) ORDER BY node_id, seq LIMIT $5) \
     SELECT a.node_id, a.seq, a.interval_index, a.run_id, a.domain, a.active_uj, a.idle_uj, \
     a.energy_uj, a.usage_us, l.value FROM allocations a JOIN picked p ON a.node_id = p.node_id \
     AND a.seq = p.seq LEFT JOIN run_labels l ON l.node_id = a.node_id AND l.run_id = a.run_id \
     AND l.key = $6 WHERE a.run_id = $1";
/// Each node's highest stored batch: a skip scan over the primary key (node_id, seq), one index
/// probe per node, not a scan of every batch (a following change feed asks often).
pub(crate) const SQL_HEADS: &str = "WITH RECURSIVE n(id) AS (SELECT MIN(node_id) FROM batches \
     UNION ALL SELECT (SELECT MIN(node_id) FROM batches WHERE node_id > n.id) FROM n \
     WHERE n.id IS NOT NULL) \
     SELECT id, (SELECT MAX(seq) FROM batches WHERE node_id = n.id) FROM n \
     WHERE id IS NOT NULL ORDER BY id";
pub(crate) const SQL_INSERT_READ: &str = "INSERT INTO read_audit (at_unix_ns, reader, role, \
     call, filters, rows_returned, outcome) VALUES ($1, $2, $3, $4, $5, $6, $7)";
pub(crate) const SQL_PRUNE_READS: &str = "DELETE FROM read_audit WHERE at_unix_ns < $1";
pub(crate) const SQL_READS: &str = "SELECT at_unix_ns, reader, role, call, filters, \
     rows_returned, outcome FROM read_audit ORDER BY at_unix_ns DESC, id DESC LIMIT $1";

/// A parameter of a query built at run time.
#[derive(Clone, Debug)]
pub(crate) enum Param {
    Text(String),
    Int(i64),
}

/// The FROM and WHERE of [`Store::run_totals_where`], with its parameters numbered `$1..` in
/// order; only the filters that are set, so the run and node indexes serve them. The rows are
/// `a.node_id, a.run_id, a.domain, a.energy_uj`: from the hourly rollup when the time bounds are
/// whole hours (or absent), else from `allocations a JOIN batches b`, to the nanosecond.
pub(crate) fn totals_where(filter: &TotalsFilter) -> (String, Vec<Param>, bool) {
    let whole = |t: Option<i64>| t.map_or(true, |t| t >= 0 && t % HOUR_NS == 0);
    let rollup = whole(filter.from_unix_ns) && whole(filter.to_unix_ns);
    // The time column and the value compared with it, per source.
    let (time, at): (&str, fn(i64) -> i64) = if rollup {
        ("a.hour", hour_of)
    } else {
        ("b.sealed_unix_ns", |t| t)
    };
    let mut clauses = Vec::new();
    let mut params = Vec::new();
    let mut add = |clause: String, p: Param| {
        params.push(p);
        clauses.push(clause.replace('?', &format!("${}", params.len())));
    };
    if let Some(r) = &filter.run_id {
        add("a.run_id = ?".into(), Param::Text(r.clone()));
    }
    if let Some(n) = &filter.node_id {
        add("a.node_id = ?".into(), Param::Text(n.clone()));
    }
    if let Some(t) = filter.from_unix_ns {
        add(format!("{time} >= ?"), Param::Int(at(t)));
    }
    if let Some(t) = filter.to_unix_ns {
        add(format!("{time} < ?"), Param::Int(at(t)));
    }
    let clause = if clauses.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", clauses.join(" AND "))
    };
    let from = if rollup {
        " FROM run_totals_hourly a"
    } else {
        " FROM allocations a JOIN batches b ON b.node_id = a.node_id AND b.seq = a.seq"
    };
    (format!("{from}{clause}"), params, rollup)
}

/// The sums of the high and low 32-bit halves of the energy of [`totals_where`]'s rows.
pub(crate) fn totals_halves(rollup: bool) -> &'static str {
    if rollup {
        "SUM(a.energy_hi), SUM(a.energy_lo)"
    } else {
        "SUM(a.energy_uj >> 32), SUM(a.energy_uj & 4294967295)"
    }
}

/// A stored batch row as both stores read it, in [`SQL_BATCHES_ABOVE`]'s column order.
pub(crate) type RawBatch = (String, i64, Vec<u8>, i64, Vec<u8>, Vec<u8>);
/// A stored allocation row, in [`SQL_ALLOCATIONS_BETWEEN`]'s column order.
pub(crate) type RawAllocation = (
    String,
    i64,
    i64,
    String,
    String,
    i64,
    i64,
    i64,
    i64,
    Option<String>,
);

/// Joins batch rows and allocation rows into [`BatchEnergy`], checking every stored number.
pub(crate) fn assemble(
    batches: Vec<RawBatch>,
    allocations: Vec<RawAllocation>,
) -> Result<Vec<BatchEnergy>, StoreError> {
    let mut out = Vec::with_capacity(batches.len());
    let mut index = std::collections::HashMap::new();
    for (node_id, seq, hash, epoch, key_id, signed_batch) in batches {
        let seq = to_u64(seq, "batches.seq")?;
        index.insert((node_id.clone(), seq), out.len());
        out.push(BatchEnergy {
            node_id,
            seq,
            hash: to_hash(&hash, "batches.hash")?,
            key_epoch: u32::try_from(epoch)
                .map_err(|_| StoreError::Corrupt(format!("batches.key_epoch {epoch}")))?,
            key_id: to_key_id(&key_id, "batches.key_id")?,
            signed_batch,
            allocations: Vec::new(),
        });
    }
    for (node_id, seq, interval, run_id, domain, active, idle, energy, usage, account) in
        allocations
    {
        let seq = to_u64(seq, "allocations.seq")?;
        let Some(&i) = index.get(&(node_id.clone(), seq)) else {
            // Both reads share one snapshot: an allocation of a batch not read is a bug.
            return Err(StoreError::Corrupt(format!(
                "allocation of node {node_id:?} seq {seq} outside the batches read with it"
            )));
        };
        out[i].allocations.push(StoredAllocation {
            interval_index: to_u64(interval, "allocations.interval_index")?,
            run_id,
            domain,
            active_uj: to_u64(active, "allocations.active_uj")?,
            idle_uj: to_u64(idle, "allocations.idle_uj")?,
            energy_uj: to_u64(energy, "allocations.energy_uj")?,
            usage_us: to_u64(usage, "allocations.usage_us")?,
            account,
        });
    }
    for b in &mut out {
        detail::sort_allocations(&mut b.allocations);
    }
    Ok(out)
}

/// A node's clock, in both stores (SQLite numbers `$N` parameters in order of appearance, so
/// the same text serves both).
pub(crate) const SQL_CLOCK: &str = "SELECT first_seen_unix_ns, measured_ns, last_seq, last_index, \
     last_boot, last_end_mono_ns, last_end_unix_ns, gap_pending, undeclared_holes, implausible \
     FROM node_clock WHERE node_id = $1";
pub(crate) const SQL_UPSERT_CLOCK: &str = "INSERT INTO node_clock (node_id, first_seen_unix_ns, \
     measured_ns, last_seq, last_index, last_boot, last_end_mono_ns, last_end_unix_ns, \
     gap_pending, undeclared_holes, implausible) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT (node_id) DO UPDATE \
     SET measured_ns = $3, last_seq = $4, last_index = $5, last_boot = $6, \
     last_end_mono_ns = $7, last_end_unix_ns = $8, gap_pending = $9, undeclared_holes = $10, \
     implausible = $11";

/// A node clock as stored: every u64 in a BIGINT column, bit for bit (monotonic times and
/// indices come from the node and may use the full range). In [`SQL_CLOCK`]'s order.
pub(crate) struct ClockColumns {
    pub first_seen_unix_ns: i64,
    pub measured_ns: i64,
    pub last_seq: i64,
    pub last_index: Option<i64>,
    pub last_boot: String,
    pub last_end_mono_ns: i64,
    pub last_end_unix_ns: i64,
    pub gap_pending: i64,
    pub undeclared_holes: i64,
    pub implausible: i64,
}

#[allow(clippy::cast_possible_wrap, clippy::cast_sign_loss)]
impl ClockColumns {
    pub fn from_clock(c: &NodeClock) -> Self {
        Self {
            first_seen_unix_ns: c.first_seen_unix_ns,
            measured_ns: c.measured_ns as i64,
            last_seq: c.last_seq as i64,
            last_index: c.last_index.map(|i| i as i64),
            last_boot: c.last_boot.clone(),
            last_end_mono_ns: c.last_end_mono_ns as i64,
            last_end_unix_ns: c.last_end_unix_ns,
            gap_pending: i64::from(c.gap_pending),
            undeclared_holes: c.undeclared_holes as i64,
            implausible: c.implausible as i64,
        }
    }

    pub fn into_clock(self) -> NodeClock {
        NodeClock {
            first_seen_unix_ns: self.first_seen_unix_ns,
            measured_ns: self.measured_ns as u64,
            last_seq: self.last_seq as u64,
            last_index: self.last_index.map(|i| i as u64),
            last_boot: self.last_boot,
            last_end_mono_ns: self.last_end_mono_ns as u64,
            last_end_unix_ns: self.last_end_unix_ns,
            gap_pending: self.gap_pending != 0,
            undeclared_holes: self.undeclared_holes as u64,
            implausible: self.implausible as u64,
        }
    }
}

/// Splits a batch's allocations into the billed and the quarantined (with their reason).
pub(crate) fn split_allocations<'a>(
    b: &'a VerifiedBatch,
    verdict: &Verdict,
) -> (
    Vec<&'a crate::check::AllocationRow>,
    Vec<(&'a crate::check::AllocationRow, &'static str)>,
) {
    let mut billed = Vec::with_capacity(b.allocations.len());
    let mut quarantined = Vec::new();
    for a in &b.allocations {
        match verdict.reason(a.interval_pos, &a.domain) {
            Some(r) => quarantined.push((a, r.as_str())),
            None => billed.push(a),
        }
    }
    (billed, quarantined)
}

/// Everything the ledger asks of a store. Every method is one transaction (or one statement).
pub trait Store: Send + Sync + 'static {
    /// The node's highest stored seq and its hash.
    fn tip(&self, node: &str) -> impl Future<Output = Result<Tip, StoreError>> + Send;
    /// The hash of the stored batch (node, seq), if any.
    fn batch_hash(
        &self,
        node: &str,
        seq: u64,
    ) -> impl Future<Output = Result<Option<ChainHash>, StoreError>> + Send;
    /// Stores the batch, its allocations and its rotation in one transaction, if its predecessor
    /// is stored, links and has the right key; see [`Commit`]. In the same transaction its
    /// intervals are judged against the node's clock and `limits` ([`crate::plausible`]): the
    /// allocations of implausible ones go to `quarantined` instead of `allocations`.
    fn commit(
        &self,
        batch: Arc<VerifiedBatch>,
        limits: Arc<NodeLimits>,
        received_unix_ns: i64,
    ) -> impl Future<Output = Result<Commit, StoreError>> + Send;
    /// Records a lost range in one transaction, if the node's tip is `first_seq - 1`; the
    /// chain then continues at `last_seq + 1` from the range's hash and key.
    fn record_loss(
        &self,
        loss: LossRecord,
    ) -> impl Future<Output = Result<LossOutcome, StoreError>> + Send;
    /// Keys announced by rotations in the node's stored chain.
    fn learnt_keys(
        &self,
        node: &str,
    ) -> impl Future<Output = Result<Vec<LearntKey>, StoreError>> + Send;
    /// Remembers that an authentic batch `seq` was received (held above a hole).
    fn note_seen(
        &self,
        node: &str,
        seq: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Records a verified heartbeat; returns the node's highest announced sealed seq.
    fn heartbeat(
        &self,
        node: &str,
        sent_unix_ns: i64,
        received_unix_ns: i64,
        last_sealed_seq: u64,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// The node's highest announced sealed seq (0 if none).
    fn announced(&self, node: &str) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// Keeps the evidence of a fork (idempotent per received batch), within
    /// [`FORK_ROWS_PER_NODE`] rows and [`FORK_BYTES_PER_NODE`] bytes per node: beyond that a
    /// new fork is not kept (returns false; the caller counts it), so a compromised node cannot
    /// fill the ledger's disk with distinct authentic batches.
    fn record_fork(
        &self,
        fork: ForkRecord,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Up to `limit` stored batches of `node` with seq above `after_seq`, in seq order: (seq,
    /// SignedBatch bytes). For `audit`.
    fn batches_after(
        &self,
        node: &str,
        after_seq: u64,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<(u64, Vec<u8>)>, StoreError>> + Send;
    /// Per-run totals by domain of `node`'s stored allocations with seq in
    /// `after_seq + 1 ..= upto_seq` (to price a lost range per run).
    fn run_energy_between(
        &self,
        node: &str,
        after_seq: u64,
        upto_seq: u64,
    ) -> impl Future<Output = Result<Vec<RunDomainTotal>, StoreError>> + Send;
    /// Per-node, per-run totals by domain over every stored allocation (exact: never an
    /// overflow error).
    fn run_totals(&self) -> impl Future<Output = Result<Vec<RunDomainTotal>, StoreError>> + Send;
    /// Walks one node's stored batches in seq order for `audit`, calling `f` with each, and
    /// reads its maintained hourly run totals and its allocation rows summed per hour, all in
    /// one snapshot (ingest may go on meanwhile).
    fn audit_node<F>(
        &self,
        node: &str,
        f: F,
    ) -> impl Future<Output = Result<NodeTotals, StoreError>> + Send
    where
        F: FnMut(AuditBatch) + Send + 'static;
    /// The nodes the maintained hourly run totals name (`audit`: none without a stored batch).
    fn rollup_nodes(&self) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;
    /// Upkeep of the per-interval detail ([`detail`]): on PostgreSQL, creates the day
    /// partitions around `now_unix_ns`; with a retention, prunes the allocation rows of the
    /// batches received before the start of the day `retention` before `now_unix_ns`.
    fn upkeep_detail(
        &self,
        now_unix_ns: i64,
        retention: Option<std::time::Duration>,
    ) -> impl Future<Output = Result<DetailUpkeep, StoreError>> + Send;
    /// After a retention of zero ([`detail::NO_ROWS`]), stores rows again for the batches
    /// received from now on: lowers `detail_from_unix_ns` to just after the last receipt, under
    /// the lock that excludes commits. `Some(from)` when this call lowered it; `None` when rows
    /// were not off (or another process lowered it first). `serve` calls it once, at start,
    /// when its retention is not zero.
    fn store_rows_again(
        &self,
        now_unix_ns: i64,
    ) -> impl Future<Output = Result<Option<i64>, StoreError>> + Send;
    /// Per-node state for `nodes`.
    fn nodes(&self) -> impl Future<Output = Result<Vec<NodeRow>, StoreError>> + Send;
    /// How every finished run's last usage was obtained: (node, run, final usage, CPU us
    /// recovered from its parent).
    fn run_finals(
        &self,
    ) -> impl Future<Output = Result<Vec<(String, String, String, u64)>, StoreError>> + Send;
    /// The value of label `key` of every (node, run) whose records carried it: the account
    /// each run belongs to, when `key` is the account label.
    fn run_label(
        &self,
        key: &str,
    ) -> impl Future<Output = Result<Vec<(String, String, String)>, StoreError>> + Send;
    /// Per-node, per-run totals by domain of the allocations `filter` selects (exact).
    fn run_totals_where(
        &self,
        filter: TotalsFilter,
    ) -> impl Future<Output = Result<Vec<RunDomainTotal>, StoreError>> + Send;
    /// Each node with a stored batch, and its highest stored seq.
    fn heads(&self) -> impl Future<Output = Result<Vec<(String, u64)>, StoreError>> + Send;
    /// Up to `limit` stored batches of `node` above `after_seq`, in seq order, each with all of
    /// its billed allocations (the change feed).
    fn batch_energy(
        &self,
        node: &str,
        after_seq: u64,
        limit: u32,
        account_label: &str,
    ) -> impl Future<Output = Result<Vec<BatchEnergy>, StoreError>> + Send;
    /// Up to `limit` stored batches that billed `run` (of `node` when not empty), after
    /// (`after_node`, `after_seq`) in (node, seq) order, each with that run's allocations.
    fn run_batches(
        &self,
        run: &str,
        node: &str,
        after: (&str, u64),
        limit: u32,
        account_label: &str,
    ) -> impl Future<Output = Result<Vec<BatchEnergy>, StoreError>> + Send;
    /// Appends one row to the read audit.
    fn record_read(&self, read: ReadAudit) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Deletes audit rows older than `before_unix_ns`; returns how many.
    fn prune_reads(
        &self,
        before_unix_ns: i64,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// The latest `limit` audit rows, newest first.
    fn reads(&self, limit: u32) -> impl Future<Output = Result<Vec<ReadAudit>, StoreError>> + Send;
}

/// Either store, chosen at run time from the URL.
#[derive(Clone, Debug)]
pub enum AnyStore {
    Sqlite(sqlite::SqliteStore),
    Postgres(postgres::PgStore),
}

impl AnyStore {
    pub async fn open(url: &StoreUrl, mode: OpenMode) -> Result<Self, StoreError> {
        Ok(match url {
            StoreUrl::Sqlite(p) => AnyStore::Sqlite(sqlite::SqliteStore::open(p, mode).await?),
            StoreUrl::Postgres(u) => AnyStore::Postgres(postgres::PgStore::open(u, mode).await?),
        })
    }

    pub fn kind(&self) -> &'static str {
        match self {
            AnyStore::Sqlite(_) => "sqlite",
            AnyStore::Postgres(_) => "postgres",
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            AnyStore::Sqlite($s) => $e.await,
            AnyStore::Postgres($s) => $e.await,
        }
    };
}

impl Store for AnyStore {
    async fn tip(&self, node: &str) -> Result<Tip, StoreError> {
        delegate!(self, s => s.tip(node))
    }
    async fn batch_hash(&self, node: &str, seq: u64) -> Result<Option<ChainHash>, StoreError> {
        delegate!(self, s => s.batch_hash(node, seq))
    }
    async fn commit(
        &self,
        batch: Arc<VerifiedBatch>,
        limits: Arc<NodeLimits>,
        received_unix_ns: i64,
    ) -> Result<Commit, StoreError> {
        delegate!(self, s => s.commit(batch, limits, received_unix_ns))
    }
    async fn record_loss(&self, loss: LossRecord) -> Result<LossOutcome, StoreError> {
        delegate!(self, s => s.record_loss(loss))
    }
    async fn learnt_keys(&self, node: &str) -> Result<Vec<LearntKey>, StoreError> {
        delegate!(self, s => s.learnt_keys(node))
    }
    async fn note_seen(&self, node: &str, seq: u64) -> Result<(), StoreError> {
        delegate!(self, s => s.note_seen(node, seq))
    }
    async fn heartbeat(
        &self,
        node: &str,
        sent_unix_ns: i64,
        received_unix_ns: i64,
        last_sealed_seq: u64,
    ) -> Result<u64, StoreError> {
        delegate!(self, s => s.heartbeat(node, sent_unix_ns, received_unix_ns, last_sealed_seq))
    }
    async fn announced(&self, node: &str) -> Result<u64, StoreError> {
        delegate!(self, s => s.announced(node))
    }
    async fn record_fork(&self, fork: ForkRecord) -> Result<bool, StoreError> {
        delegate!(self, s => s.record_fork(fork))
    }
    async fn batches_after(
        &self,
        node: &str,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        delegate!(self, s => s.batches_after(node, after_seq, limit))
    }
    async fn run_energy_between(
        &self,
        node: &str,
        after_seq: u64,
        upto_seq: u64,
    ) -> Result<Vec<RunDomainTotal>, StoreError> {
        delegate!(self, s => s.run_energy_between(node, after_seq, upto_seq))
    }
    async fn run_totals(&self) -> Result<Vec<RunDomainTotal>, StoreError> {
        delegate!(self, s => s.run_totals())
    }
    async fn audit_node<F>(&self, node: &str, f: F) -> Result<NodeTotals, StoreError>
    where
        F: FnMut(AuditBatch) + Send + 'static,
    {
        delegate!(self, s => s.audit_node(node, f))
    }
    async fn rollup_nodes(&self) -> Result<Vec<String>, StoreError> {
        delegate!(self, s => s.rollup_nodes())
    }
    async fn upkeep_detail(
        &self,
        now_unix_ns: i64,
        retention: Option<std::time::Duration>,
    ) -> Result<DetailUpkeep, StoreError> {
        delegate!(self, s => s.upkeep_detail(now_unix_ns, retention))
    }
    async fn store_rows_again(&self, now_unix_ns: i64) -> Result<Option<i64>, StoreError> {
        delegate!(self, s => s.store_rows_again(now_unix_ns))
    }
    async fn nodes(&self) -> Result<Vec<NodeRow>, StoreError> {
        delegate!(self, s => s.nodes())
    }
    async fn run_label(&self, key: &str) -> Result<Vec<(String, String, String)>, StoreError> {
        delegate!(self, s => s.run_label(key))
    }
    async fn run_finals(&self) -> Result<Vec<(String, String, String, u64)>, StoreError> {
        delegate!(self, s => s.run_finals())
    }
    async fn run_totals_where(
        &self,
        filter: TotalsFilter,
    ) -> Result<Vec<RunDomainTotal>, StoreError> {
        delegate!(self, s => s.run_totals_where(filter))
    }
    async fn heads(&self) -> Result<Vec<(String, u64)>, StoreError> {
        delegate!(self, s => s.heads())
    }
    async fn batch_energy(
        &self,
        node: &str,
        after_seq: u64,
        limit: u32,
        account_label: &str,
    ) -> Result<Vec<BatchEnergy>, StoreError> {
        delegate!(self, s => s.batch_energy(node, after_seq, limit, account_label))
    }
    async fn run_batches(
        &self,
        run: &str,
        node: &str,
        after: (&str, u64),
        limit: u32,
        account_label: &str,
    ) -> Result<Vec<BatchEnergy>, StoreError> {
        delegate!(self, s => s.run_batches(run, node, after, limit, account_label))
    }
    async fn record_read(&self, read: ReadAudit) -> Result<(), StoreError> {
        delegate!(self, s => s.record_read(read))
    }
    async fn prune_reads(&self, before_unix_ns: i64) -> Result<u64, StoreError> {
        delegate!(self, s => s.prune_reads(before_unix_ns))
    }
    async fn reads(&self, limit: u32) -> Result<Vec<ReadAudit>, StoreError> {
        delegate!(self, s => s.reads(limit))
    }
}

/// Converts a stored BIGINT that must be non-negative.
pub(crate) fn to_u64(v: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} is negative ({v})")))
}

/// Converts a u64 the checks bounded to a BIGINT.
pub(crate) fn to_i64(v: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} {v} above 2^63-1")))
}

pub(crate) fn to_hash(v: &[u8], what: &str) -> Result<ChainHash, StoreError> {
    v.try_into()
        .map_err(|_| StoreError::Corrupt(format!("{what} is {} bytes, not 32", v.len())))
}

pub(crate) fn to_key_id(v: &[u8], what: &str) -> Result<KeyId, StoreError> {
    v.try_into()
        .map_err(|_| StoreError::Corrupt(format!("{what} is {} bytes, not 16", v.len())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls() {
        let p = |s: &str| s.parse::<StoreUrl>().map_err(|e| e.to_string());
        assert_eq!(p("sqlite:/a/b.db"), Ok(StoreUrl::Sqlite("/a/b.db".into())));
        assert_eq!(
            p("sqlite:///a/b.db"),
            Ok(StoreUrl::Sqlite("/a/b.db".into()))
        );
        assert_eq!(p("sqlite://b.db"), Ok(StoreUrl::Sqlite("b.db".into())));
        assert!(matches!(
            "sqlite:".parse::<StoreUrl>(),
            Err(StoreUrlError::NoPath(_))
        ));
        assert!(matches!(
            "postgres://u@h/db".parse::<StoreUrl>(),
            Err(StoreUrlError::Postgres(_))
        ));
        assert!(matches!(
            p("postgres://u@127.0.0.1/db"),
            Ok(StoreUrl::Postgres(_))
        ));
        // Another host only over TLS (pgtarget.rs has the rest).
        assert!(p("postgres://u@h/db").unwrap_err().contains("verify-full"));
        let secret = p("postgres://u:hunter2@h/db").unwrap_err();
        assert!(secret.contains("password file"), "{secret}");
        assert!(
            !secret.contains("hunter2"),
            "the error prints the password: {secret}"
        );
        assert!(p("postgres://u@h/db?password=x").is_err());
        assert!(matches!(
            p("postgresql://u@localhost/db"),
            Ok(StoreUrl::Postgres(_))
        ));
        assert!(p("sqlite:").is_err());
        assert!(p("/a/b.db").is_err());
        assert!(p("mysql://x").is_err());
    }
}
