//! Running totals: every batch carries the node's measured energy per meter since its totals
//! began, continued across restarts from the spool's last batch, so the energy of any batch
//! lost later is known exactly from its neighbours.

use std::collections::BTreeMap;
use std::time::Duration;

use wattd::sealer::{SealPolicy, Sealer};
use wattd::spool::decoded_batches;
use wattd_proto::v1::Batch;
use wattd_records::totals::{add_measured, lost_between, MeterEnergy, RunningTotals};

use super::common::{config, interval, TestResult};

fn open_with(dir: &std::path::Path, segment: u64) -> Result<Sealer, Box<dyn std::error::Error>> {
    let policy = SealPolicy::new(2, Duration::from_secs(10))?;
    Ok(Sealer::open(config(dir, segment), policy)?.0)
}

fn open(dir: &std::path::Path) -> Result<Sealer, Box<dyn std::error::Error>> {
    open_with(dir, 4096)
}

fn seal_n(s: &mut Sealer, index: &mut u64, n: usize) -> TestResult {
    for _ in 0..n {
        // Uneven content, so a wrong sum cannot pass by symmetry.
        s.push_interval(interval(*index, 1 + (*index % 3) as usize), *index)?;
        *index += 1;
        s.seal(0)?;
        s.commit()?;
    }
    Ok(())
}

fn batches(dir: &std::path::Path) -> Result<BTreeMap<u64, Batch>, Box<dyn std::error::Error>> {
    let (all, unreadable) = decoded_batches(dir)?;
    assert_eq!(unreadable, 0);
    Ok(all.into_iter().map(|b| (b.seq, b)).collect())
}

#[test]
fn running_totals_continue_across_restarts_and_price_any_lost_range() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut index = 0;
    let mut s = open(dir.path())?;
    seal_n(&mut s, &mut index, 5)?;
    drop(s);
    let mut s = open(dir.path())?;
    seal_n(&mut s, &mut index, 5)?;
    assert_eq!(s.totals().since_seq(), 1);
    let all = batches(dir.path())?;
    assert_eq!(all.len(), 10);
    // Each batch's totals are the sum of every batch up to and including it.
    let mut sum = MeterEnergy::new();
    for b in all.values() {
        add_measured(&mut sum, &b.intervals);
        let t = RunningTotals::of_batch(b).ok_or("a batch without totals")?;
        assert_eq!(t.since_seq(), 1, "seq {}", b.seq);
        assert_eq!(t.meters(), &sum, "seq {}", b.seq);
    }
    // Any range's energy from its neighbours equals what its batches measured.
    for first in 1..=9u64 {
        for last in first..=9 {
            let before = if first == 1 {
                None
            } else {
                all.get(&(first - 1))
            };
            let after = &all[&(last + 1)];
            let mut want = MeterEnergy::new();
            for seq in first..=last {
                add_measured(&mut want, &all[&seq].intervals);
            }
            want.retain(|_, v| *v != 0);
            assert_eq!(lost_between(before, after)?, want, "{first}..={last}");
        }
    }
    Ok(())
}

/// When the spool no longer holds its last batch (acknowledged and freed, the active segment
/// rolled), the new segment's header carries the running totals, so a restart continues them.
/// A spool written before headers carried them starts again at the next seq, and says so
/// (`totals_since_seq`), so a range across the restart is priced "unknown", never wrongly.
#[test]
fn totals_survive_a_spool_that_freed_every_batch_and_restart_only_when_unknown() -> TestResult {
    for old_header in [false, true] {
        let dir = tempfile::tempdir()?;
        let mut index = 0;
        // Segments of about one batch: acknowledging everything frees them all and rolls the
        // active one, so the spool holds no batch, only the chain's resume point.
        let mut s = open_with(dir.path(), 700)?;
        seal_n(&mut s, &mut index, 4)?;
        let last = s.spool().last_seq();
        let before = s.totals().clone();
        s.spool_mut().ack(last)?;
        drop(s);
        let (held, _) = decoded_batches(dir.path())?;
        assert!(
            held.is_empty(),
            "every batch freed: {:?}",
            held.iter().map(|b| b.seq).collect::<Vec<_>>()
        );
        if old_header {
            // Rewrite the header as a spool of an earlier version wrote it: without totals.
            let segs = wattd::spool::list_segments(dir.path())?;
            let (_, path) = segs.last().ok_or("a segment")?;
            let bytes = std::fs::read(path)?;
            let scan = wattd_records::segment::frame::scan_segment(bytes);
            let mut h = scan.header.map_err(|d| d.detail)?;
            assert_eq!(
                h.totals.as_ref(),
                Some(&before),
                "the header carries the totals"
            );
            h.totals = None;
            std::fs::write(path, h.encode())?;
        }
        let mut s = open_with(dir.path(), 700)?;
        assert_eq!(s.spool().last_seq(), last);
        seal_n(&mut s, &mut index, 2)?;
        let all = batches(dir.path())?;
        let first_new = &all[&(last + 1)];
        let t = RunningTotals::of_batch(first_new).ok_or("totals")?;
        if old_header {
            assert_eq!(t.since_seq(), last + 1);
            let second = &all[&(last + 2)];
            assert!(lost_between(Some(first_new), second)?.is_empty());
            assert!(matches!(
                lost_between(None, second),
                Err(wattd_records::totals::LostEnergyError::Restarted { .. })
            ));
        } else {
            assert_eq!(t.since_seq(), 1);
            assert_eq!(
                t,
                before.after(&first_new.intervals),
                "continued from the header"
            );
        }
    }
    Ok(())
}

/// Every 60th batch carries a per-run checkpoint, continued across a restart from the spool's
/// newest checkpoint and the batches after it: at 180, each run's total is every microjoule
/// the spool allocated to it since its first batch.
#[test]
fn run_checkpoints_continue_across_restarts() -> TestResult {
    use wattd_records::totals::{is_checkpoint_seq, run_energy, RUN_CHECKPOINT_EVERY};
    let dir = tempfile::tempdir()?;
    let mut index = 0;
    let mut s = open_with(dir.path(), 1 << 20)?;
    seal_n(&mut s, &mut index, 130)?;
    drop(s);
    let mut s = open_with(dir.path(), 1 << 20)?;
    seal_n(&mut s, &mut index, 3 * RUN_CHECKPOINT_EVERY as usize - 130)?;
    let all = batches(dir.path())?;
    assert_eq!(all.len(), 180);
    let mut want: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    let mut first: BTreeMap<String, u64> = BTreeMap::new();
    for b in all.values() {
        for (r, m) in run_energy(&b.intervals) {
            first.entry(r.clone()).or_insert(b.seq);
            for (k, v) in m {
                *want.entry(r.clone()).or_default().entry(k).or_default() += v;
            }
        }
        assert_eq!(
            b.has_run_checkpoint,
            is_checkpoint_seq(b.seq),
            "seq {}",
            b.seq
        );
    }
    let cp = &all[&180];
    let mut got: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for e in &cp.run_checkpoint {
        assert_eq!(Some(&e.since_seq), first.get(&e.run_id), "{e:?}");
        got.entry(e.run_id.clone())
            .or_default()
            .insert(e.meter.clone(), e.energy_uj);
    }
    assert_eq!(got, want);
    Ok(())
}
