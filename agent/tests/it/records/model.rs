//! Model-based test of the spool: random sequences of append, seal (fdatasync), ack, crash
//! (unsynced bytes vanish, optionally a torn prefix of them survives) and clean reopen, checked
//! against a model that knows which batches are sealed. After every step: every sealed,
//! unacknowledged batch is readable, none twice, in contiguous seq order, with the same bytes.

use proptest::prelude::*;
use wattd::batch::ChainHash;
use wattd::sealer::Sealer;

use crate::records::common::{config, interval, sealer};

#[derive(Clone, Debug)]
enum Op {
    /// Seal a batch of this many intervals (appended, not yet durable).
    Append(usize),
    /// fdatasync: every appended batch becomes sealed.
    Seal,
    /// Acknowledge this fraction (per mille) of the sealed-but-unacked batches.
    Ack(u16),
    /// Power cut: unsynced bytes vanish except a prefix of this fraction (per mille).
    Crash(u16),
    /// Clean shutdown and reopen.
    Reopen,
    /// A ledger restored from a backup acknowledges only this fraction (per mille) of the
    /// cursor: the cursor moves back, never below what the spool still holds.
    Rewind(u16),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1usize..4).prop_map(Op::Append),
        2 => Just(Op::Seal),
        1 => (0u16..=1000).prop_map(Op::Ack),
        1 => (0u16..=1000).prop_map(Op::Crash),
        1 => Just(Op::Reopen),
        1 => (0u16..=1000).prop_map(Op::Rewind),
    ]
}

#[derive(Debug, Default)]
struct Model {
    /// (seq, chain hash) of every sealed batch, acknowledged or not.
    sealed: Vec<(u64, ChainHash)>,
    /// Appended, not yet synced.
    pending: Vec<(u64, ChainHash)>,
    acked: u64,
}

fn check(s: &Sealer, m: &Model) -> Result<(), TestCaseError> {
    let sp = s.spool();
    prop_assert_eq!(sp.acked_seq(), m.acked);
    let expected: Vec<(u64, ChainHash)> = m
        .sealed
        .iter()
        .copied()
        .filter(|(seq, _)| *seq > m.acked)
        .collect();
    let got: Vec<(u64, ChainHash)> = sp
        .read_sealed(m.acked + 1, usize::MAX)
        .map_err(|e| TestCaseError::fail(e.to_string()))?
        .iter()
        .map(|b| (b.seq, b.hash))
        .collect();
    prop_assert_eq!(got, expected);
    let last_sealed = m.sealed.last().map_or(0, |x| x.0);
    prop_assert_eq!(sp.sealed_seq(), last_sealed);
    Ok(())
}

/// `retain_bytes`: keep acknowledged segments within this many bytes (0: free them at once).
fn run(ops: Vec<Op>, retain_bytes: u64) -> Result<(), TestCaseError> {
    let fail = |e: &dyn std::fmt::Display| TestCaseError::fail(e.to_string());
    let dir = tempfile::tempdir().map_err(|e| fail(&e))?;
    // Small segments so that rolling and deletion of acknowledged segments happen often.
    let mut cfg = config(dir.path(), 2048);
    if retain_bytes > 0 {
        cfg.retain_acked = std::time::Duration::from_secs(3600);
        cfg.retain_acked_bytes = retain_bytes;
    }
    let mut s = sealer(cfg.clone(), 8).map_err(|e| fail(&*e))?;
    let mut m = Model::default();
    let mut index = 0u64;
    for op in ops {
        match op {
            Op::Append(n) => {
                for _ in 0..n {
                    s.push_interval(interval(index, 2), index)
                        .map_err(|e| fail(&e))?;
                    index += 1;
                }
                let seq = s
                    .seal(0)
                    .map_err(|e| fail(&e))?
                    .ok_or_else(|| fail(&"nothing sealed"))?;
                prop_assert_eq!(seq, m.sealed.len() as u64 + m.pending.len() as u64 + 1);
                m.pending.push((seq, s.spool().last_hash()));
                // Starting a new segment syncs the old one: the spool may seal earlier than
                // asked (never later).
                let sealed = s.spool().sealed_seq();
                let (now_sealed, still): (Vec<_>, Vec<_>) =
                    m.pending.iter().partition(|(q, _)| *q <= sealed);
                m.sealed.extend(now_sealed);
                m.pending = still;
            }
            Op::Seal => {
                s.commit().map_err(|e| fail(&e))?;
                m.sealed.append(&mut m.pending);
            }
            Op::Ack(frac) => {
                let unacked = m.sealed.iter().filter(|(q, _)| *q > m.acked).count() as u64;
                let n = unacked * u64::from(frac) / 1000;
                if n > 0 {
                    s.spool_mut().ack(m.acked + n).map_err(|e| fail(&e))?;
                    m.acked += n;
                }
            }
            Op::Crash(frac) => {
                let (path, durable_len) = s.spool().durable_tail();
                drop(s);
                let len = std::fs::metadata(&path).map_err(|e| fail(&e))?.len();
                let keep = durable_len + (len - durable_len) * u64::from(frac) / 1000;
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| fail(&e))?;
                f.set_len(keep).map_err(|e| fail(&e))?;
                drop(f);
                s = sealer(cfg.clone(), 8).map_err(|e| fail(&*e))?;
                // Pending batches that happened to reach the disk whole are durable now; the
                // rest are gone. Either way the sequence must continue right after them.
                let last = s.spool().last_seq();
                let sealed_last = m.sealed.last().map_or(0, |x| x.0);
                prop_assert!(
                    last >= sealed_last,
                    "sealed batch lost: {last} < {sealed_last}"
                );
                for p in std::mem::take(&mut m.pending) {
                    if p.0 <= last {
                        m.sealed.push(p);
                    }
                }
                prop_assert_eq!(m.sealed.last().map_or(0, |x| x.0), last);
                prop_assert_eq!(
                    s.spool().last_hash(),
                    m.sealed.last().map_or([0; 32], |x| x.1)
                );
            }
            Op::Rewind(frac) => {
                let target = m.acked * u64::from(frac) / 1000;
                let held = s.spool().first_held_seq();
                let to = s.spool_mut().rewind_ack(target).map_err(|e| fail(&e))?;
                prop_assert!(to <= m.acked, "rewind moved forward: {to} > {}", m.acked);
                prop_assert_eq!(to, target.max(held.saturating_sub(1)).min(m.acked));
                // check() below: every sealed batch after the new cursor is still readable.
                m.acked = to;
            }
            Op::Reopen => {
                s.commit().map_err(|e| fail(&e))?;
                m.sealed.append(&mut m.pending);
                drop(s);
                s = sealer(cfg.clone(), 8).map_err(|e| fail(&*e))?;
            }
        }
        check(&s, &m)?;
    }
    // Finally everything left must verify as one intact chain.
    s.commit().map_err(|e| fail(&e))?;
    let report =
        wattd::verify::verify_spool(dir.path(), &[s.key().public()]).map_err(|e| fail(&e))?;
    prop_assert!(report.is_ok(), "{:?}", report.breaks);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn spool_matches_model_across_crashes_and_torn_writes(ops in proptest::collection::vec(op(), 1..40)) {
        run(ops, 0)?;
    }

    /// With acknowledged segments retained (within 6 KiB: some kept, some freed), a rewind
    /// finds every batch it moves back over.
    #[test]
    fn retained_spool_rewinds_to_what_it_holds(ops in proptest::collection::vec(op(), 1..40)) {
        run(ops, 6 << 10)?;
    }
}
