//! Ingest: batches committed in groups (one transaction, each batch's savepoint, so one that
//! fails fails alone), the chain's tip and hashes, a node's clock, rotations and lost ranges.

use super::read::detail_from;
use super::*;

pub(super) fn tip_of(conn: &Connection, node: &str) -> Result<Tip, StoreError> {
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

pub(super) fn hash_at(
    conn: &Connection,
    node: &str,
    seq: i64,
) -> Result<Option<ChainHash>, StoreError> {
    let h: Option<Vec<u8>> = conn
        .prepare_cached("SELECT hash FROM batches WHERE node_id = ?1 AND seq = ?2")?
        .query_row(params![node, seq], |r| r.get(0))
        .optional()?;
    h.map(|h| to_hash(&h, "batches.hash")).transpose()
}

pub(super) fn clock_of(conn: &Connection, node: &str) -> Result<Option<NodeClock>, StoreError> {
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
pub(super) fn commit_group(conn: &mut Connection, pending: &Mutex<Vec<PendingCommit>>) {
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
pub(super) fn halves(hi: i64, lo: i64) -> Result<u128, StoreError> {
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

pub(super) fn record_loss_blocking(
    conn: &mut Connection,
    l: &LossRecord,
) -> Result<LossOutcome, StoreError> {
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
