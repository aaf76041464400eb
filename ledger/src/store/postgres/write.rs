//! Ingest: one batch committed with its rows and run totals in one transaction (the chain
//! checked under the node's advisory lock), and a node's lost ranges recorded.

use super::*;

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
pub(super) const SQL_LOCK_FOR_PARTITIONS: &str = "LOCK TABLE batches IN SHARE ROW EXCLUSIVE MODE; \
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

pub(super) async fn commit_once(
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

pub(super) fn clock_columns(r: &tokio_postgres::Row) -> ClockColumns {
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

pub(super) async fn record_loss_once(
    c: &mut PgConn,
    l: &LossRecord,
) -> Result<LossOutcome, StoreError> {
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
