//! Reads: run totals, a run's or a batch's energy, the audit's walk, upkeep of the detail rows,
//! and the node list, each in a read-only transaction where it reads more than one statement.

use super::schema::{create_partitions, legacy_until, partitions_wanted};
use super::write::{clock_columns, SQL_LOCK_FOR_PARTITIONS};
use super::*;

/// Batches `audit` reads per query.
pub(super) const AUDIT_PAGE: i64 = 500;

/// A read-only snapshot for a read that may combine allocation rows with pruned detail, and
/// the point before which batches have no rows (`i64::MIN`: all have). With `lock`, ACCESS
/// SHARE on `allocations` is taken before the snapshot, so no partition is dropped under it.
pub(super) async fn detail_read(
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

/// Within `tx`, statements keep one plan made without their parameters' values instead of
/// being planned at every call. For the reads whose rows an index finds whatever the values (a
/// run's, a node's between two seqs) but which may be in any day partition (a batch is received
/// any time after its seal), so every partition is in their plan: planning it anew cost 20 ms a
/// call with a year of partitions, the kept plan 1-1.5 ms (`--bench growth -- days=365`).
async fn plan_once(tx: &tokio_postgres::Transaction<'_>) -> Result<(), StoreError> {
    Ok(tx
        .batch_execute("SET LOCAL plan_cache_mode = force_generic_plan")
        .await?)
}

/// Back to the session's `plan_cache_mode` (after [`plan_once`]; PostgreSQL's `auto`), for reads
/// whose best plan depends on how wide a time range is: they are unnamed statements, so `auto`
/// plans them at every call with their values.
async fn plan_each(tx: &tokio_postgres::Transaction<'_>) -> Result<(), StoreError> {
    Ok(tx
        .batch_execute("SET LOCAL plan_cache_mode TO DEFAULT")
        .await?)
}

/// The quarantined allocations of many stored batches, by (node, seq), in one query: a page of
/// pruned batches decoded one lookup each cost a round trip per batch (about a third of a run's
/// range read past the retention, the growth bench). Batches with none are absent.
async fn quarantined_of_batches(
    tx: &tokio_postgres::Transaction<'_>,
    keys: &[(&str, i64)],
) -> Result<HashMap<(String, i64), Vec<detail::QuarantinedRow>>, StoreError> {
    let mut out: HashMap<(String, i64), Vec<detail::QuarantinedRow>> = HashMap::new();
    if keys.is_empty() {
        return Ok(out);
    }
    let nodes: Vec<&str> = keys.iter().map(|k| k.0).collect();
    let seqs: Vec<i64> = keys.iter().map(|k| k.1).collect();
    for r in tx
        .query(SQL_QUARANTINED_OF_BATCHES, &[&nodes, &seqs])
        .await?
    {
        out.entry((r.get(0), r.get(1)))
            .or_default()
            .push(pg_quarantined_row(&r, 2));
    }
    Ok(out)
}

/// [`quarantined_of_batches`]' query: the pairs unnested side by side, each looked up by the
/// (node, seq) index.
const SQL_QUARANTINED_OF_BATCHES: &str = "SELECT q.node_id, q.seq, q.interval_index, q.domain, \
     q.run_id, q.active_uj, q.idle_uj, q.usage_us FROM quarantined q \
     JOIN unnest($1::text[], $2::bigint[]) AS k(node_id, seq) \
     ON q.node_id = k.node_id AND q.seq = k.seq";

/// A quarantined allocation from a row's columns `at..at + 6`, in
/// [`detail::QuarantinedRow`]'s order.
pub(super) fn pg_quarantined_row(r: &tokio_postgres::Row, at: usize) -> detail::QuarantinedRow {
    (
        r.get(at),
        r.get(at + 1),
        r.get(at + 2),
        r.get(at + 3),
        r.get(at + 4),
        r.get(at + 5),
    )
}

/// A pruned batch's billed allocations (of `run`, when not empty), decoded from its bytes less
/// its quarantined rows `q` (from [`quarantined_of_batches`]), each with its run's `label`.
async fn fill_pruned(
    tx: &tokio_postgres::Transaction<'_>,
    b: &mut BatchEnergy,
    q: &[detail::QuarantinedRow],
    run: &str,
    label: &str,
) -> Result<(), StoreError> {
    let mut accounts: BTreeMap<String, Option<String>> = BTreeMap::new();
    let mut out = Vec::new();
    for r in detail::billed_of(&b.node_id, b.seq, &b.signed_batch, q)? {
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

pub(super) async fn run_energy_between(
    store: &PgStore,
    node: &str,
    after_seq: u64,
    upto_seq: u64,
) -> Result<Vec<RunDomainTotal>, StoreError> {
    let (after, upto) = (to_i64(after_seq, "seq")?, to_i64(upto_seq, "seq")?);
    let mut p = store.conn().await?;
    let c = p.get()?;
    let (tx, from) = detail_read(&mut c.client, true).await?;
    let mut decoded = RunTotals::new();
    if from > i64::MIN {
        let pruned = tx
            .query(SQL_PRUNED_BETWEEN, &[&node, &after, &upto, &from])
            .await?;
        let keys: Vec<(&str, i64)> = pruned.iter().map(|r| (node, r.get(0))).collect();
        let mut quarantined = quarantined_of_batches(&tx, &keys).await?;
        for r in &pruned {
            // The billed ones: the quarantined rows are kept, and read below.
            let seq: i64 = r.get(0);
            let q = quarantined
                .remove(&(node.to_owned(), seq))
                .unwrap_or_default();
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

pub(super) async fn run_totals_where(
    store: &PgStore,
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
    let (_read, mut p) = store.read_conn().await?;
    let c = p.get()?;
    // SUM(bigint) is numeric in PostgreSQL: exact, never overflows; read it as text.
    let total = if from_rollup {
        "(SUM(a.energy_hi) * 4294967296 + SUM(a.energy_lo))::text"
    } else {
        "SUM(a.energy_uj)::text"
    };
    let sql = format!(
        "SELECT a.node_id, a.run_id, a.domain, {total}{clause} \
         GROUP BY a.node_id, a.run_id, a.domain \
         ORDER BY a.node_id, a.run_id, a.domain"
    );
    // One run's rows are a few thousand whatever the other filters: prepared once per
    // connection and shape of filter, its plan kept (`plan_once`). Not the other shapes, whose
    // best plan depends on how wide the range or how busy the node is: a statement kept on the
    // connection would be given a plan blind to the values after five calls (PostgreSQL's
    // `auto`), so they are planned at every call, with their values, as unnamed statements.
    let kept_plan = !from_rollup && filter.run_id.is_some();
    let st = if kept_plan {
        Some(c.statement(&sql).await?)
    } else {
        None
    };
    // Rows and pruned detail in one snapshot (the rollup needs neither).
    let (tx, from) = detail_read(&mut c.client, !from_rollup).await?;
    let rows = match &st {
        Some(st) => {
            plan_once(&tx).await?;
            tx.query(st, &refs).await?
        }
        None => tx.query(&sql, &refs).await?,
    };
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
    if kept_plan {
        plan_each(&tx).await?;
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
        let keys: Vec<(&str, i64)> = page.iter().map(|r| (r.get(0), r.get(1))).collect();
        let mut quarantined = quarantined_of_batches(&tx, &keys).await?;
        for r in &page {
            let (n, seq): (&str, i64) = (r.get(0), r.get(1));
            let q = quarantined.remove(&(n.to_owned(), seq)).unwrap_or_default();
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

pub(super) async fn upkeep_detail(
    store: &PgStore,
    now_unix_ns: i64,
    retention: Option<std::time::Duration>,
) -> Result<DetailUpkeep, StoreError> {
    let mut done = DetailUpkeep::default();
    let mut p = store.conn().await?;
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
    if !rows_off {
        done.statistics_refreshed = refresh_statistics(&mut c.client, now_unix_ns).await;
    }
    Ok(done)
}

/// `ANALYZE allocations` when its statistics are older than 50 minutes at `now_unix_ns` (taken
/// by this process or another sharing the database). Autovacuum analyzes each partition as it changes but never
/// the partitioned table itself (PostgreSQL's "Routine Vacuuming"), so without this the join of
/// a run's allocation rows with their batches is planned on default estimates. Measured (the
/// growth bench, 1 million rows): a run over a time range read in 1.5 ms with the parent
/// analyzed, 28 ms once autovacuum had analyzed the partitions and not it (the planner then
/// walked every batch of the range).
///
/// Run outside a transaction block, so PostgreSQL analyzes and commits the partitioned table
/// first, then each partition in a transaction of its own (its cost grows with the days kept:
/// a fixed sample per table), never holding every partition's lock for the whole run; under a
/// 5 s lock timeout (behind another process's ANALYZE or VACUUM: the next hour) and a 30
/// minute statement limit instead of the connection's 30 s, both restored after. `None`: not
/// due; `Some(false)`: failed, or PostgreSQL skipped the table (the role is not its owner: it
/// only warns), logged; the old statistics stay and the next upkeep tries again.
async fn refresh_statistics(client: &mut tokio_postgres::Client, now_unix_ns: i64) -> Option<bool> {
    let warn = |why: &str| {
        tracing::warn!(
            reason = why,
            "planner statistics of allocations not refreshed; queries of allocation rows may \
             be planned on stale estimates until a later upkeep"
        );
        Some(false)
    };
    let before = match last_analyzed(client).await {
        Ok(v) => v,
        Err(e) => return warn(&describe(&e)),
    };
    if before > 0.0 && now_unix_ns as f64 / 1e9 - before < 3000.0 {
        return None;
    }
    let mut r = client
        .batch_execute("SET lock_timeout = '5s'; SET statement_timeout = '30min'")
        .await;
    if r.is_ok() {
        // Alone: a batch of statements would be one implicit transaction.
        r = client.batch_execute("ANALYZE allocations").await;
    }
    let restored = client
        .batch_execute(&format!("RESET lock_timeout; {SESSION_SETTINGS}"))
        .await;
    if let Err(e) = restored {
        tracing::warn!(
            error = %describe(&e),
            "the connection's settings not restored after ANALYZE"
        );
    }
    if let Err(e) = r {
        return warn(&describe(&e));
    }
    match last_analyzed(client).await {
        Ok(after) if after > before => Some(true),
        Ok(_) => warn(
            "PostgreSQL skipped it: the ledger's database role is not the owner of allocations",
        ),
        Err(e) => warn(&describe(&e)),
    }
}

/// When `allocations` was last analyzed (seconds since 1970; 0 if never), from the statistics
/// each statement reads afresh outside a transaction block.
async fn last_analyzed(client: &tokio_postgres::Client) -> Result<f64, tokio_postgres::Error> {
    let r = client
        .query_one(
            "SELECT COALESCE((SELECT EXTRACT(EPOCH FROM last_analyze)::float8 \
             FROM pg_stat_user_tables WHERE relid = 'allocations'::regclass), 0)",
            &[],
        )
        .await?;
    Ok(r.get(0))
}

pub(super) async fn batch_energy(
    store: &PgStore,
    node: &str,
    after_seq: u64,
    limit: u32,
    account_label: &str,
) -> Result<Vec<BatchEnergy>, StoreError> {
    let after = to_i64(after_seq, "seq")?;
    let (_read, mut p) = store.read_conn().await?;
    let c = p.get()?;
    let st_allocations = c.statement(SQL_ALLOCATIONS_BETWEEN).await?;
    // One snapshot: the allocations read are those of the batches read.
    let (tx, from) = detail_read(&mut c.client, true).await?;
    // A node's rows between two seqs (and pruned ones, by seq too): index lookups whatever the
    // values, so the prepared read of its rows keeps its plan; the unnamed statements here are
    // planned once per call either way.
    plan_once(&tx).await?;
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
        .query(&st_allocations, &[&node, &after, &last, &account_label])
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
        let keys: Vec<(&str, i64)> = pruned.iter().map(|&seq| (node, seq)).collect();
        let mut quarantined = quarantined_of_batches(&tx, &keys).await?;
        for b in &mut out {
            let seq = to_i64(b.seq, "seq")?;
            if pruned.contains(&seq) {
                let q = quarantined
                    .remove(&(node.to_owned(), seq))
                    .unwrap_or_default();
                fill_pruned(&tx, b, &q, "", account_label).await?;
            }
        }
    }
    tx.commit().await?;
    Ok(out)
}

pub(super) async fn run_batches(
    store: &PgStore,
    run: &str,
    node: &str,
    after: (&str, u64),
    limit: u32,
    account_label: &str,
) -> Result<Vec<BatchEnergy>, StoreError> {
    let after_seq = to_i64(after.1, "seq")?;
    let limit = i64::from(limit);
    let (_read, mut p) = store.read_conn().await?;
    let c = p.get()?;
    let st_batches = c.statement(SQL_RUN_BATCHES).await?;
    let st_allocations = c.statement(SQL_RUN_ALLOCATIONS).await?;
    let (tx, from) = detail_read(&mut c.client, true).await?;
    // A run's rows: their plans kept (see `plan_once`); the pruned hours' are planned each call.
    plan_once(&tx).await?;
    let params: [&(dyn ToSql + Sync); 5] = [&run, &node, &after.0, &after_seq, &limit];
    let batches: Vec<RawBatch> = tx
        .query(&st_batches, &params)
        .await?
        .iter()
        .map(pg_raw_batch)
        .collect();
    let with_label: [&(dyn ToSql + Sync); 6] =
        [&run, &node, &after.0, &after_seq, &limit, &account_label];
    let allocations: Vec<RawAllocation> = tx
        .query(&st_allocations, &with_label)
        .await?
        .iter()
        .map(pg_raw_allocation)
        .collect();
    let stored = assemble(batches, allocations)?;
    if from == i64::MIN {
        tx.commit().await?;
        return Ok(stored);
    }
    plan_each(&tx).await?;
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
        let keys: Vec<(&str, i64)> = page.iter().map(|b| (b.0.as_str(), b.1)).collect();
        let mut quarantined = quarantined_of_batches(&tx, &keys).await?;
        for mut b in assemble(page, Vec::new())? {
            let q = quarantined
                .remove(&(b.node_id.clone(), to_i64(b.seq, "seq")?))
                .unwrap_or_default();
            fill_pruned(&tx, &mut b, &q, run, account_label).await?;
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

pub(super) async fn nodes(store: &PgStore) -> Result<Vec<NodeRow>, StoreError> {
    let mut p = store.conn().await?;
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

pub(super) async fn run_finals(
    store: &PgStore,
) -> Result<Vec<(String, String, String, u64)>, StoreError> {
    let mut p = store.conn().await?;
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

pub(super) async fn learnt_keys(store: &PgStore, node: &str) -> Result<Vec<LearntKey>, StoreError> {
    let mut p = store.conn().await?;
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
            public_key: r
                .get::<_, &[u8]>(1)
                .try_into()
                .map_err(|_| StoreError::Corrupt("rotations.new_public_key not 32 bytes".into()))?,
            key_id: to_key_id(r.get::<_, &[u8]>(2), "rotations.new_key_id")?,
            effective_seq: to_u64(r.get(3), "rotations.effective_seq")?,
            announced_seq: to_u64(r.get(4), "rotations.announced_seq")?,
        });
    }
    Ok(out)
}
