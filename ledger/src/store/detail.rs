//! Per-interval detail and its retention.
//!
//! A batch's allocations are kept twice: in its signed bytes (`batches.signed_batch`, the
//! evidence, kept for ever) and as rows (`allocations`, one per run, domain and interval, which
//! the queries that need per-interval detail read). The rows are the bulk of the store, so
//! `serve --detail-retention-days N` prunes the rows of batches the ledger received more than N
//! days ago; the hourly run totals (`run_totals_hourly`), the quarantined rows, the labels and
//! the batches stay. A query that needs the detail of a pruned batch (a time range that is not
//! whole hours, the change feed, a run's audit trail, a lost range's price) decodes it from
//! the signed bytes, less the allocations quarantined when it was stored. Every answer is the
//! same before and after pruning; only what it costs to compute changes.
//!
//! **Invariant:** a stored batch has its allocation rows iff its `received_unix_ns` is at or
//! after `detail_from_unix_ns` (`ledger_meta`; absent: every batch has them). Pruning deletes
//! rows (SQLite) or drops day partitions (PostgreSQL) and raises `detail_from_unix_ns` in the
//! same transaction; a reader reads `detail_from_unix_ns` and the rows in one snapshot
//! (PostgreSQL: its transaction takes ACCESS SHARE on `allocations` before its snapshot, so a
//! partition is dropped only between readers).

use std::collections::{BTreeMap, HashMap};

use super::{hour_of, to_u64, BatchEnergy, RunDomainTotal, StoreError, StoredAllocation};
use crate::check::{batch_rows, AllocationRow};

/// Nanoseconds in a day: PostgreSQL's partition of the rows, and the retention's unit.
pub(crate) const DAY_NS: i64 = 86_400_000_000_000;

/// Absent: no batch's rows were ever pruned.
pub(crate) const SQL_DETAIL_FROM: &str =
    "SELECT value FROM ledger_meta WHERE key = 'detail_from_unix_ns'";
/// Raises (never lowers) the point before which batches have no rows.
pub(crate) const SQL_RAISE_DETAIL_FROM: &str = "INSERT INTO ledger_meta (key, value) \
     VALUES ('detail_from_unix_ns', $1) ON CONFLICT (key) DO UPDATE SET value = excluded.value \
     WHERE ledger_meta.value < excluded.value";
/// What was quarantined of one batch, as [`QuarantinedRow`]s.
pub(crate) const SQL_QUARANTINED_OF: &str = "SELECT interval_index, domain, run_id, active_uj, \
     idle_uj, usage_us FROM quarantined WHERE node_id = $1 AND seq = $2";
/// Every quarantined allocation of a node, with its seq first (`audit`).
pub(crate) const SQL_QUARANTINED_OF_NODE: &str = "SELECT seq, interval_index, domain, run_id, \
     active_uj, idle_uj, usage_us FROM quarantined WHERE node_id = $1";
/// One run's label.
pub(crate) const SQL_LABEL_OF: &str =
    "SELECT value FROM run_labels WHERE node_id = $1 AND run_id = $2 AND key = $3";
/// A node's pruned batches in a seq range, in seq order.
pub(crate) const SQL_PRUNED_BETWEEN: &str = "SELECT seq, signed_batch FROM batches \
     WHERE node_id = $1 AND seq > $2 AND seq <= $3 AND received_unix_ns < $4 ORDER BY seq";
/// The batches `b` sealed in the hours `h` (a node and an hour of a run's totals). The hour is
/// integer division in both databases (towards zero), hence the range of two hours around it
/// for the index on (node, seal time) (open at the ends of the 64-bit range, where the product
/// would overflow), then the exact test.
macro_rules! join_batches_of_hours {
    () => {
        " JOIN batches b ON b.node_id = h.node_id \
         AND b.sealed_unix_ns >= CASE WHEN h.hour <= -2562046 \
         THEN -9223372036854775807 - 1 ELSE h.hour * 3600000000000 - 3600000000000 END \
         AND b.sealed_unix_ns <= CASE WHEN h.hour >= 2562046 THEN 9223372036854775807 \
         ELSE h.hour * 3600000000000 + 3600000000000 END \
         AND b.sealed_unix_ns / 3600000000000 = h.hour "
    };
}

/// Pruned batches that may have billed a run: those sealed in an hour the run's totals name
/// (on the node when `$2` is not empty), after (`$4`, `$5`), in (node, seq) order. Each still
/// has to be decoded to know.
pub(crate) const SQL_PRUNED_OF_RUN: &str = concat!(
    "SELECT b.node_id, b.seq, b.hash, b.key_epoch, b.key_id, b.signed_batch \
     FROM (SELECT DISTINCT node_id, hour FROM run_totals_hourly \
     WHERE run_id = $1 AND ($2 = '' OR node_id = $2)) h",
    join_batches_of_hours!(),
    "WHERE b.received_unix_ns < $3 AND (b.node_id > $4 OR (b.node_id = $4 AND b.seq > $5)) \
     ORDER BY b.node_id, b.seq LIMIT $6",
);
/// Pruned batches sealed in [`$2`, `$3`] (of node `$4`, of an hour run `$5` has totals in,
/// when not empty), after (`$6`, `$7`), in (node, seq) order.
pub(crate) const SQL_PRUNED_IN_RANGE: &str = "SELECT b.node_id, b.seq, b.signed_batch \
     FROM batches b WHERE b.received_unix_ns < $1 AND b.sealed_unix_ns >= $2 \
     AND b.sealed_unix_ns <= $3 AND ($4 = '' OR b.node_id = $4) AND ($5 = '' OR EXISTS \
     (SELECT 1 FROM run_totals_hourly h WHERE h.run_id = $5 AND h.node_id = b.node_id \
     AND h.hour = b.sealed_unix_ns / 3600000000000)) \
     AND (b.node_id > $6 OR (b.node_id = $6 AND b.seq > $7)) ORDER BY b.node_id, b.seq LIMIT $8";
/// [`SQL_PRUNED_IN_RANGE`] for a run (`$5` not empty), driven from the hours its totals name
/// (as [`SQL_PRUNED_OF_RUN`]) instead of every batch of the range: what it reads grows with
/// the run, not with the store. Its parameters do not first appear in order: SQLite takes it
/// with `?N` placeholders.
pub(crate) const SQL_PRUNED_IN_RANGE_OF_RUN: &str = concat!(
    "SELECT b.node_id, b.seq, b.signed_batch \
     FROM (SELECT DISTINCT node_id, hour FROM run_totals_hourly \
     WHERE run_id = $5 AND ($4 = '' OR node_id = $4)) h",
    join_batches_of_hours!(),
    "WHERE b.received_unix_ns < $1 AND b.sealed_unix_ns >= $2 AND b.sealed_unix_ns <= $3 \
     AND (b.node_id > $6 OR (b.node_id = $6 AND b.seq > $7)) ORDER BY b.node_id, b.seq LIMIT $8",
);

/// The query for the pruned batches of a range: of a run's hours when `run` is not empty.
pub(crate) fn sql_pruned_in_range(run: &str) -> &'static str {
    if run.is_empty() {
        SQL_PRUNED_IN_RANGE
    } else {
        SQL_PRUNED_IN_RANGE_OF_RUN
    }
}
/// A node's stored batches for `audit`, in seq order, a page at a time.
pub(crate) const SQL_AUDIT_BATCHES: &str = "SELECT seq, signed_batch, sealed_unix_ns, \
     received_unix_ns FROM batches WHERE node_id = $1 AND seq > $2 ORDER BY seq LIMIT $3";
/// A node's maintained hourly run totals, as halves' sums.
pub(crate) const SQL_NODE_ROLLUP: &str = "SELECT run_id, domain, hour, energy_hi, energy_lo \
     FROM run_totals_hourly WHERE node_id = $1";
/// A node's allocation rows summed per (run, domain, hour of sealing), as halves' sums.
pub(crate) const SQL_NODE_ROWS: &str = "SELECT a.run_id, a.domain, \
     b.sealed_unix_ns / 3600000000000, CAST(SUM(a.energy_uj >> 32) AS BIGINT), \
     CAST(SUM(a.energy_uj & 4294967295) AS BIGINT) FROM allocations a JOIN batches b ON b.node_id = a.node_id AND b.seq = a.seq \
     WHERE a.node_id = $1 GROUP BY a.run_id, a.domain, b.sealed_unix_ns / 3600000000000";
/// The nodes the hourly run totals name.
pub(crate) const SQL_ROLLUP_NODES: &str = "SELECT DISTINCT node_id FROM run_totals_hourly";

/// Candidate batches read per query while looking for pruned detail.
pub(crate) const PRUNED_PAGE: i64 = 256;

/// The first instant of the day `unix_ns` falls in (days start at multiples of [`DAY_NS`]).
pub(crate) fn day_start(unix_ns: i64) -> i64 {
    unix_ns.div_euclid(DAY_NS) * DAY_NS
}

/// `detail_from_unix_ns` when no batch has rows: a retention of zero (`serve
/// --detail-retention-days 0`), where every commit stores its batch and its hourly totals only
/// and every read of per-interval detail decodes the signed batches.
pub const NO_ROWS: i64 = i64::MAX;

/// Where a retention puts `detail_from_unix_ns` at `now_unix_ns`: the start of the day
/// `retention` before it, or [`NO_ROWS`] for a retention of zero.
pub(crate) fn cutoff(now_unix_ns: i64, retention: std::time::Duration) -> i64 {
    if retention.is_zero() {
        return NO_ROWS;
    }
    let keep = i64::try_from(retention.as_nanos()).unwrap_or(i64::MAX);
    day_start(now_unix_ns.saturating_sub(keep))
}

/// Rows are stored again (a retention other than zero, or none, after a retention of zero)
/// from the later of `now_unix_ns` and just after the last receipt: every batch already stored
/// was received before it, so the invariant holds as it is lowered. Taken under the lock that
/// excludes commits, so none reads the old value and then stores a receipt time after it.
pub(crate) fn rows_again_from(now_unix_ns: i64, last_received: Option<i64>) -> i64 {
    last_received.map_or(now_unix_ns, |t| now_unix_ns.max(t.saturating_add(1)))
}

/// Lowers `detail_from_unix_ns` to `$1` from `$2`, [`NO_ROWS`] (the only time it is lowered).
pub(crate) const SQL_ROWS_AGAIN_FROM: &str = "UPDATE ledger_meta SET value = $1 \
     WHERE key = 'detail_from_unix_ns' AND value = $2";
/// The last receipt time stored ([`rows_again_from`]).
pub(crate) const SQL_LAST_RECEIPT: &str = "SELECT MAX(received_unix_ns) FROM batches";

/// What one round of upkeep did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DetailUpkeep {
    /// Batches received before this have no allocation rows (None: none were pruned).
    pub detail_from_unix_ns: Option<i64>,
    /// Allocation rows deleted (SQLite; PostgreSQL counts the rows of the default partition).
    pub rows_deleted: u64,
    /// Day partitions dropped (PostgreSQL).
    pub partitions_dropped: u64,
    /// Day partitions created ahead (PostgreSQL).
    pub partitions_created: u64,
    /// The planner statistics of the partitioned `allocations` (PostgreSQL, where autovacuum
    /// never analyzes a partitioned table itself): `Some(true)` refreshed, `Some(false)` not
    /// (failed, or skipped for want of ownership; logged), `None` not due (taken less than 50
    /// minutes ago), no rows kept, or SQLite.
    pub statistics_refreshed: Option<bool>,
}

/// One stored batch as `audit` reads it, in the snapshot of its node's walk.
#[derive(Clone, Debug)]
pub struct AuditBatch {
    pub seq: u64,
    pub signed_batch: Vec<u8>,
    pub sealed_unix_ns: i64,
    /// Its allocation rows are stored (not pruned).
    pub has_rows: bool,
    /// The allocations quarantined when it was stored.
    pub quarantined: Vec<QuarantinedRow>,
}

/// (run, domain, hour) -> uJ.
pub type HourlyTotals = BTreeMap<(String, String, i64), u128>;

/// What a node's walk read besides its batches, in the same snapshot.
#[derive(Clone, Debug, Default)]
pub struct NodeTotals {
    /// The maintained hourly totals (`run_totals_hourly`).
    pub maintained: HourlyTotals,
    /// The stored allocation rows, summed the same way.
    pub rows: HourlyTotals,
}

/// A quarantined allocation as the store keeps it: (interval index, domain, run, active uJ,
/// idle uJ, usage us).
pub type QuarantinedRow = (i64, String, String, i64, i64, i64);

/// A pruned batch's billed allocations: its decoded rows less those quarantined when it was
/// stored, each taken out once (a multiset: two intervals of one batch may share an index, one
/// billed and one quarantined; equal rows are interchangeable). A quarantined row the batch
/// does not hold is an inconsistent store.
pub(crate) fn billed_of(
    node: &str,
    seq: u64,
    signed_batch: &[u8],
    quarantined: &[QuarantinedRow],
) -> Result<Vec<AllocationRow>, StoreError> {
    let rows = rows_of(node, seq, signed_batch)?;
    if quarantined.is_empty() {
        return Ok(rows);
    }
    let mut left: HashMap<&QuarantinedRow, usize> = HashMap::new();
    for q in quarantined {
        *left.entry(q).or_default() += 1;
    }
    let mut billed = Vec::with_capacity(rows.len());
    for row in rows {
        let key: QuarantinedRow = (
            row.interval_index,
            row.domain.clone(),
            row.run_id.clone(),
            row.active_uj,
            row.idle_uj,
            row.usage_us,
        );
        match left.get_mut(&key) {
            Some(n) if *n > 0 => *n -= 1,
            _ => billed.push(row),
        }
    }
    if let Some(((i, d, r, ..), _)) = left.iter().find(|(_, n)| **n > 0) {
        return Err(StoreError::Corrupt(format!(
            "node {node:?} seq {seq}: quarantined allocation (interval {i}, {d}, run {r}) is not \
             in the stored batch"
        )));
    }
    Ok(billed)
}

/// Every allocation of a stored batch (billed and quarantined), decoded from its bytes.
fn rows_of(node: &str, seq: u64, signed_batch: &[u8]) -> Result<Vec<AllocationRow>, StoreError> {
    batch_rows(signed_batch).map_err(|e| {
        StoreError::Corrupt(format!(
            "stored batch of node {node:?} seq {seq} does not decode: {e}"
        ))
    })
}

/// A decoded row as the read side returns it (its account filled in later).
pub(crate) fn stored_allocation(r: AllocationRow) -> Result<StoredAllocation, StoreError> {
    Ok(StoredAllocation {
        interval_index: to_u64(r.interval_index, "interval_index")?,
        run_id: r.run_id,
        domain: r.domain,
        active_uj: to_u64(r.active_uj, "active_uj")?,
        idle_uj: to_u64(r.idle_uj, "idle_uj")?,
        energy_uj: to_u64(r.energy_uj, "energy_uj")?,
        usage_us: to_u64(r.usage_us, "usage_us")?,
        account: None,
    })
}

/// Sorts a batch's allocations as the stores return them: (run, domain, interval).
pub(crate) fn sort_allocations(a: &mut [StoredAllocation]) {
    a.sort_by(|x, y| {
        (&x.run_id, &x.domain, x.interval_index).cmp(&(&y.run_id, &y.domain, y.interval_index))
    });
}

/// (node, run, domain) -> uJ.
pub(crate) type RunTotals = BTreeMap<(String, String, String), u128>;

/// Adds rows to per-(node, run, domain) totals (of `run` only, when given).
pub(crate) fn add_rows(into: &mut RunTotals, node: &str, rows: &[AllocationRow], run: &str) {
    for r in rows.iter().filter(|r| run.is_empty() || r.run_id == run) {
        *into
            .entry((node.to_owned(), r.run_id.clone(), r.domain.clone()))
            .or_default() += u128::from(r.energy_uj.unsigned_abs());
    }
}

/// The rows' totals and the decoded ones, as one list in (node, run, domain) order.
pub(crate) fn merge_totals(rows: Vec<RunDomainTotal>, mut extra: RunTotals) -> Vec<RunDomainTotal> {
    for t in rows {
        *extra.entry((t.node_id, t.run_id, t.domain)).or_default() += t.energy_uj;
    }
    extra
        .into_iter()
        .map(|((node_id, run_id, domain), energy_uj)| RunDomainTotal {
            node_id,
            run_id,
            domain,
            energy_uj,
        })
        .collect()
}

/// The first `limit` of two lists of batches in (node, seq) order, in that order, node ids
/// compared as bytes (SQLite's BINARY collation, which its cursors follow; PostgreSQL orders
/// them in the database, by its collation).
pub(crate) fn merge_batches(
    mut a: Vec<BatchEnergy>,
    b: Vec<BatchEnergy>,
    limit: usize,
) -> Vec<BatchEnergy> {
    a.extend(b);
    a.sort_by(|x, y| (&x.node_id, x.seq).cmp(&(&y.node_id, y.seq)));
    a.truncate(limit);
    a
}

/// Adds a batch's billed rows to hourly totals (`audit`).
pub(crate) fn add_hourly(into: &mut HourlyTotals, sealed_unix_ns: i64, rows: &[AllocationRow]) {
    let hour = hour_of(sealed_unix_ns);
    for r in rows {
        *into
            .entry((r.run_id.clone(), r.domain.clone(), hour))
            .or_default() += u128::from(r.energy_uj.unsigned_abs());
    }
}

/// Hourly totals from (run, domain, hour, hi, lo) rows.
pub(crate) fn hourly_from(
    rows: impl IntoIterator<Item = (String, String, i64, Option<i64>, Option<i64>)>,
) -> HourlyTotals {
    rows.into_iter()
        .map(|(run, domain, hour, hi, lo)| {
            ((run, domain, hour), super::from_halves(hi, lo).unwrap_or(0))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The run's range query finds exactly the batches the range scan did, at the edges of
    /// the hour arithmetic (negative times, either side of zero, the ends of the 64-bit range)
    /// and with a node filter, a page at a time (SQLite, as that store sends it: `?N`).
    #[test]
    fn a_runs_range_through_its_hours_finds_what_the_range_scan_found() {
        use super::super::{hour_of, HOUR_NS};
        let c = rusqlite::Connection::open_in_memory().expect("sqlite");
        c.execute_batch(
            "CREATE TABLE batches (node_id TEXT, seq INTEGER, received_unix_ns INTEGER, \
             sealed_unix_ns INTEGER, signed_batch BLOB); \
             CREATE TABLE run_totals_hourly (node_id TEXT, run_id TEXT, domain TEXT, \
             hour INTEGER);",
        )
        .expect("schema");
        let h = HOUR_NS;
        let sealed = [
            i64::MIN,
            i64::MIN + 1,
            -5 * h - 7,
            -h - 1,
            -h,
            -h + 1,
            -1,
            0,
            1,
            h - 1,
            h,
            h + 1,
            5 * h + 7,
            i64::MAX - 1,
            i64::MAX,
        ];
        let mut seq = 0i64;
        for node in ["a", "b"] {
            for (i, &t) in sealed.iter().enumerate() {
                seq += 1;
                c.execute(
                    "INSERT INTO batches VALUES (?1, ?2, 0, ?3, x'00')",
                    rusqlite::params![node, seq, t],
                )
                .expect("batch");
                // The run has totals in every other batch's hour (of each node).
                if i % 2 == 0 {
                    c.execute(
                        "INSERT INTO run_totals_hourly VALUES (?1, 'r', 'package:0', ?2)",
                        rusqlite::params![node, hour_of(t)],
                    )
                    .expect("totals");
                }
            }
        }
        let query = |sql: &str, lo: i64, hi: i64, node: &str, limit: i64| {
            let mut out = Vec::new();
            let mut after = (String::new(), 0i64);
            loop {
                let mut st = c.prepare(&sql.replace('$', "?")).expect("prepare");
                let page: Vec<(String, i64)> = st
                    .query_map(
                        rusqlite::params![1i64, lo, hi, node, "r", after.0, after.1, limit],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .expect("query")
                    .collect::<Result<_, _>>()
                    .expect("rows");
                let full = page.len() as i64 == limit;
                if let Some(last) = page.last() {
                    after = last.clone();
                }
                out.extend(page);
                if !full {
                    return out;
                }
            }
        };
        let mut compared = 0;
        for (lo, hi) in [
            (i64::MIN, i64::MAX),
            (-h, h),
            (0, 0),
            (-1, 1),
            (-6 * h, -h - 1),
        ] {
            for node in ["", "a"] {
                for limit in [2, 100] {
                    let scan = query(SQL_PRUNED_IN_RANGE, lo, hi, node, limit);
                    let hours = query(SQL_PRUNED_IN_RANGE_OF_RUN, lo, hi, node, limit);
                    assert_eq!(hours, scan, "[{lo}, {hi}] node {node:?} limit {limit}");
                    compared += scan.len();
                }
            }
        }
        assert!(compared > 40, "{compared} batches compared");
        // No `$` the `?N` rewrite could reach inside a literal.
        assert!(!SQL_PRUNED_IN_RANGE_OF_RUN.contains("'$"));
    }

    #[test]
    fn rows_come_back_after_every_stored_receipt() {
        let now = 1_000 * DAY_NS;
        assert_eq!(rows_again_from(now, None), now);
        assert_eq!(rows_again_from(now, Some(now - 5)), now);
        // A receipt ahead of this clock (another process's, or a clock stepped back): that
        // batch has no rows, so the rows start just after it.
        assert_eq!(rows_again_from(now, Some(now + 7)), now + 8);
        assert_eq!(rows_again_from(now, Some(i64::MAX - 1)), i64::MAX);
        assert_eq!(cutoff(now, std::time::Duration::ZERO), NO_ROWS);
        assert_eq!(
            cutoff(now + 5, std::time::Duration::from_secs(86_400)),
            now - DAY_NS
        );
    }

    #[test]
    fn days_start_at_multiples_of_a_day_on_both_sides_of_the_epoch() {
        assert_eq!(day_start(0), 0);
        assert_eq!(day_start(DAY_NS - 1), 0);
        assert_eq!(day_start(DAY_NS), DAY_NS);
        assert_eq!(day_start(-1), -DAY_NS);
    }

    /// Two intervals of one batch with one index (the judge quarantines the second): taking out
    /// the quarantined one leaves the billed one, not both gone.
    #[test]
    fn a_quarantined_interval_sharing_an_index_leaves_the_billed_one() {
        use prost::Message as _;
        use wattd_proto::v1::{Allocation, Batch, DomainEnergy, Interval, SignedBatch};
        let interval = |active: u64| Interval {
            index: 7,
            domains: vec![DomainEnergy {
                domain: "package".into(),
                package: Some(0),
                allocations: vec![Allocation {
                    run_id: "r".into(),
                    active_uj: active,
                    idle_uj: 1,
                    usage_us: 5,
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let signed = |intervals: Vec<Interval>| {
            SignedBatch {
                batch_bytes: Batch {
                    intervals,
                    ..Default::default()
                }
                .encode_to_vec(),
                ..Default::default()
            }
            .encode_to_vec()
        };
        let q = |active: i64| (7, "package:0".to_owned(), "r".to_owned(), active, 1, 5);
        let bytes = signed(vec![interval(10), interval(99)]);
        let billed = billed_of("n", 1, &bytes, &[q(99)]).expect("billed");
        assert_eq!(billed.len(), 1);
        assert_eq!((billed[0].interval_pos, billed[0].energy_uj), (0, 11));
        // Equal rows: one taken out, one billed.
        let bytes = signed(vec![interval(10), interval(10)]);
        assert_eq!(
            billed_of("n", 1, &bytes, &[q(10)]).expect("billed").len(),
            1
        );
        // A quarantined row the batch does not hold.
        let err = billed_of("n", 1, &bytes, &[q(12)]).expect_err("not in the batch");
        assert!(err.to_string().contains("not in the stored batch"), "{err}");
    }

    #[test]
    fn decoded_totals_merge_with_the_rows_totals_in_order() {
        let t = |n: &str, r: &str, d: &str, e: u128| RunDomainTotal {
            node_id: n.into(),
            run_id: r.into(),
            domain: d.into(),
            energy_uj: e,
        };
        let mut extra = RunTotals::new();
        extra.insert(("a".into(), "r".into(), "package:0".into()), 5);
        extra.insert(("0".into(), "r".into(), "dram:0".into()), 7);
        let merged = merge_totals(
            vec![t("a", "r", "package:0", 10), t("b", "x", "gpu", 1)],
            extra,
        );
        assert_eq!(
            merged,
            vec![
                t("0", "r", "dram:0", 7),
                t("a", "r", "package:0", 15),
                t("b", "x", "gpu", 1)
            ]
        );
    }
}
