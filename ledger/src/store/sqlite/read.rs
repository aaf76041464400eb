//! Reads: run totals, a run's or a batch's energy, the audit's walk, upkeep of the detail rows,
//! and the node list, each in one read transaction where it reads more than one statement.

use super::*;

/// Batches read per query by `audit`.
pub(super) const AUDIT_PAGE: i64 = 500;

/// Batches received before this have no allocation rows ([`detail`]); `i64::MIN`: all have.
pub(super) fn detail_from(c: &Connection) -> Result<i64, StoreError> {
    Ok(c.prepare_cached(SQL_DETAIL_FROM)?
        .query_row([], |r| r.get(0))
        .optional()?
        .unwrap_or(i64::MIN))
}
use super::write::{clock_of, halves};

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
pub(super) fn quarantined_row(
    r: &rusqlite::Row<'_>,
    at: usize,
) -> rusqlite::Result<detail::QuarantinedRow> {
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

pub(super) async fn run_energy_between(
    store: &SqliteStore,
    node: &str,
    after_seq: u64,
    upto_seq: u64,
) -> Result<Vec<RunDomainTotal>, StoreError> {
    let node = node.to_owned();
    let (after, upto) = (to_i64(after_seq, "seq")?, to_i64(upto_seq, "seq")?);
    store
        .with_read(move |c| {
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

pub(super) async fn run_totals_where(
    store: &SqliteStore,
    filter: TotalsFilter,
) -> Result<Vec<RunDomainTotal>, StoreError> {
    store
        .with_read(move |c| {
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

pub(super) async fn upkeep_detail(
    store: &SqliteStore,
    now_unix_ns: i64,
    retention: Option<std::time::Duration>,
) -> Result<DetailUpkeep, StoreError> {
    let mut done = DetailUpkeep::default();
    let Some(retention) = retention else {
        let from = store.with(|c| detail_from(c)).await?;
        done.detail_from_unix_ns = (from > i64::MIN).then_some(from);
        return Ok(done);
    };
    let cutoff = detail::cutoff(now_unix_ns, retention);
    // An hour of receipts per transaction: the writer is held briefly, ingest goes on
    // between them, and a crash leaves rows and `detail_from_unix_ns` agreeing.
    loop {
        let step = store
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
                    cutoff.min(t.saturating_add(crate::store::HOUR_NS))
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
        let from = store.with(|c| detail_from(c)).await?;
        done.detail_from_unix_ns = (from > i64::MIN).then_some(from);
    }
    Ok(done)
}

pub(super) async fn batch_energy(
    store: &SqliteStore,
    node: &str,
    after_seq: u64,
    limit: u32,
    account_label: &str,
) -> Result<Vec<BatchEnergy>, StoreError> {
    let node = node.to_owned();
    let label = account_label.to_owned();
    let after = to_i64(after_seq, "seq")?;
    store
        .with_read(move |c| {
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

pub(super) async fn run_batches(
    store: &SqliteStore,
    run: &str,
    node: &str,
    after: (&str, u64),
    limit: u32,
    account_label: &str,
) -> Result<Vec<BatchEnergy>, StoreError> {
    let (run, node, after_node) = (run.to_owned(), node.to_owned(), after.0.to_owned());
    let label = account_label.to_owned();
    let after_seq = to_i64(after.1, "seq")?;
    store
        .with_read(move |c| {
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

pub(super) async fn nodes(store: &SqliteStore) -> Result<Vec<NodeRow>, StoreError> {
    store
        .with(|c| {
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

pub(super) async fn run_finals(
    store: &SqliteStore,
) -> Result<Vec<(String, String, String, u64)>, StoreError> {
    store
        .with(|c| {
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

pub(super) async fn learnt_keys(
    store: &SqliteStore,
    node: &str,
) -> Result<Vec<LearntKey>, StoreError> {
    let node = node.to_owned();
    store
        .with(move |c| {
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

pub(super) async fn reads(store: &SqliteStore, limit: u32) -> Result<Vec<ReadAudit>, StoreError> {
    store
        .with_read(move |c| {
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
