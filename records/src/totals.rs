//! Running totals: every batch carries the node's measured energy per meter since its totals
//! began (`Batch.running_totals`, `totals_since_seq`), so that the energy of a batch that is
//! later lost (damaged in the spool, or no longer retained when a restored ledger asks for it)
//! is known exactly from the intact batches on either side of the hole:
//!
//! `lost(meter) = after.totals(meter) - measured_in(after)(meter) - before.totals(meter)`
//!
//! Pure: no IO. The agent's sealer keeps one [`RunningTotals`]; the ledger and `wattd verify`
//! use [`lost_between`].

use std::collections::BTreeMap;

use wattd_proto::v1::{Batch, Interval, MeterTotal, RunSummary};

/// A meter as the totals name it: domain, package, die.
pub type MeterId = (String, Option<u32>, Option<u32>);

/// Measured microjoules per meter.
pub type MeterEnergy = BTreeMap<MeterId, u64>;

/// The node's running totals, as of the last batch sealed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunningTotals {
    since_seq: u64,
    meters: MeterEnergy,
}

/// Adds every interval's measured energy to `into`, per meter. Saturates (a u64 of
/// microjoules is five million kWh; a saturated total is visibly wrong, never wrapped).
pub fn add_measured(into: &mut MeterEnergy, intervals: &[Interval]) {
    for i in intervals {
        for d in &i.domains {
            let e = into
                .entry((d.domain.clone(), d.package, d.die))
                .or_default();
            *e = e.saturating_add(d.measured_uj);
        }
    }
}

impl RunningTotals {
    /// Totals that start counting at batch `seq` (1 for a new chain).
    pub fn starting_at(seq: u64) -> Self {
        Self {
            since_seq: seq.max(1),
            meters: MeterEnergy::new(),
        }
    }

    /// The totals a batch carries, if it carries any.
    pub fn of_batch(b: &Batch) -> Option<Self> {
        if b.totals_since_seq == 0 {
            return None;
        }
        let mut meters = MeterEnergy::new();
        for t in &b.running_totals {
            meters.insert((t.domain.clone(), t.package, t.die), t.measured_uj);
        }
        Some(Self {
            since_seq: b.totals_since_seq,
            meters,
        })
    }

    pub fn since_seq(&self) -> u64 {
        self.since_seq
    }

    pub fn meters(&self) -> &MeterEnergy {
        &self.meters
    }

    /// The totals after a batch with these intervals.
    pub fn after(&self, intervals: &[Interval]) -> Self {
        let mut next = self.clone();
        add_measured(&mut next.meters, intervals);
        next
    }

    /// Into the batch's fields 12 and 13.
    pub fn write_into(&self, b: &mut Batch) {
        b.totals_since_seq = self.since_seq;
        b.running_totals = self
            .meters
            .iter()
            .map(|((domain, package, die), uj)| MeterTotal {
                domain: domain.clone(),
                package: *package,
                die: *die,
                measured_uj: *uj,
            })
            .collect();
    }

    /// The sum over every meter.
    pub fn total_uj(&self) -> u128 {
        self.meters.values().map(|v| u128::from(*v)).sum()
    }
}

/// Why the energy of a lost range cannot be computed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LostEnergyError {
    #[error("batch {seq} carries no running totals")]
    NoTotals { seq: u64 },
    #[error(
        "the totals restarted inside the range (batch {before} counts from seq {before_since}, \
         batch {after} from seq {after_since})"
    )]
    Restarted {
        before: u64,
        before_since: u64,
        after: u64,
        after_since: u64,
    },
    #[error("meter {meter}: batch {after}'s total is below batch {before}'s plus its own energy")]
    Inconsistent {
        meter: String,
        before: u64,
        after: u64,
    },
}

/// Why the per-run energy of a lost range cannot be computed from the checkpoints around it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RunsLostError {
    #[error("batch {seq} carries no run checkpoint")]
    NoCheckpoint { seq: u64 },
    #[error(
        "the checkpoint(s) between {from} and {to} are in the range: runs that ended before \
         them cannot be seen"
    )]
    CheckpointInRange { from: u64, to: u64 },
    #[error(
        "the agent's per-run counts restarted at seq {at} (an agent start could not read the \
         last checkpoint back), after checkpoint {checkpoint}"
    )]
    CountsRestarted { at: u64, checkpoint: u64 },
    #[error("run {run:?} has energy before batch {seq} but is not in its checkpoint")]
    NotInCheckpoint { run: String, seq: u64 },
    #[error("run {run:?} {meter:?}: the count is saturated")]
    Saturated { run: String, meter: String },
    #[error(
        "run {run:?} {meter:?}: checkpoint {after} is below checkpoint {before} plus the stored \
         energy between"
    )]
    Below {
        run: String,
        meter: String,
        after: u64,
        before: u64,
    },
}

/// A meter as tables and errors name it: `domain:package[:dieN]`.
pub fn meter_label(m: &MeterId) -> String {
    let mut s = m.0.clone();
    if let Some(p) = m.1 {
        s.push_str(&format!(":{p}"));
    }
    if let Some(d) = m.2 {
        s.push_str(&format!(":die{d}"));
    }
    s
}

/// The measured energy per meter of the batches strictly between `before` (None: the range
/// starts at seq 1) and `after`, from their running totals.
pub fn lost_between(before: Option<&Batch>, after: &Batch) -> Result<MeterEnergy, LostEnergyError> {
    let a = RunningTotals::of_batch(after).ok_or(LostEnergyError::NoTotals { seq: after.seq })?;
    let (b, before_seq) = match before {
        None => (RunningTotals::starting_at(1), 0),
        Some(b) => (
            RunningTotals::of_batch(b).ok_or(LostEnergyError::NoTotals { seq: b.seq })?,
            b.seq,
        ),
    };
    // The range (before_seq, after.seq) must lie wholly inside what `after`'s totals count.
    let same_count = a.since_seq == b.since_seq || (before.is_none() && a.since_seq == 1);
    if !same_count || a.since_seq > before_seq + 1 {
        return Err(LostEnergyError::Restarted {
            before: before_seq,
            before_since: b.since_seq,
            after: after.seq,
            after_since: a.since_seq,
        });
    }
    let mut own = MeterEnergy::new();
    add_measured(&mut own, &after.intervals);
    let mut lost = MeterEnergy::new();
    let meters: std::collections::BTreeSet<&MeterId> =
        a.meters.keys().chain(b.meters.keys()).collect();
    for m in meters {
        let total = a.meters.get(m).copied().unwrap_or(0);
        let spent = own
            .get(m)
            .copied()
            .unwrap_or(0)
            .checked_add(b.meters.get(m).copied().unwrap_or(0));
        match spent.and_then(|s| total.checked_sub(s)) {
            Some(0) => {}
            Some(v) => {
                lost.insert(m.clone(), v);
            }
            None => {
                return Err(LostEnergyError::Inconsistent {
                    meter: meter_label(m),
                    before: before_seq,
                    after: after.seq,
                })
            }
        }
    }
    Ok(lost)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wattd_proto::v1::DomainEnergy;

    fn interval(pkg0: u64, dram: u64) -> Interval {
        Interval {
            domains: vec![
                DomainEnergy {
                    domain: "package".into(),
                    package: Some(0),
                    measured_uj: pkg0,
                    ..Default::default()
                },
                DomainEnergy {
                    domain: "dram".into(),
                    package: Some(0),
                    measured_uj: dram,
                    ..Default::default()
                },
            ],
            ..Default::default()
        }
    }

    /// A chain of batches as the sealer builds them, from `since`.
    fn chain(since: u64, contents: &[Vec<Interval>]) -> Vec<Batch> {
        let mut t = RunningTotals::starting_at(since);
        contents
            .iter()
            .enumerate()
            .map(|(i, iv)| {
                t = t.after(iv);
                let mut b = Batch {
                    seq: since + i as u64,
                    intervals: iv.clone(),
                    ..Default::default()
                };
                t.write_into(&mut b);
                b
            })
            .collect()
    }

    #[test]
    fn lost_energy_is_exactly_what_the_missing_batches_measured() {
        let contents: Vec<Vec<Interval>> = (0..8)
            .map(|k| vec![interval(1_000 + k, 7 * k), interval(3, 0)])
            .collect();
        let batches = chain(1, &contents);
        for first in 1..7usize {
            for last in first..7usize {
                // Batches first..=last (1-based seqs) are lost.
                let before = if first == 1 {
                    None
                } else {
                    Some(&batches[first - 2])
                };
                let after = &batches[last];
                let lost = lost_between(before, after).expect("computable");
                let mut want = MeterEnergy::new();
                for c in &contents[first - 1..last] {
                    add_measured(&mut want, c);
                }
                want.retain(|_, v| *v != 0);
                assert_eq!(lost, want, "lost {first}..={last}");
            }
        }
        // Nothing lost between neighbours.
        assert!(lost_between(Some(&batches[2]), &batches[3])
            .expect("ok")
            .is_empty());
    }

    #[test]
    fn totals_that_restarted_or_are_missing_or_contradict_are_refused() {
        let contents: Vec<Vec<Interval>> = (0..3).map(|_| vec![interval(10, 1)]).collect();
        let a = chain(1, &contents);
        let b = chain(5, &contents); // an agent start that could not read its totals back
        assert!(matches!(
            lost_between(Some(&a[1]), &b[1]),
            Err(LostEnergyError::Restarted { .. })
        ));
        assert!(matches!(
            lost_between(None, &b[0]),
            Err(LostEnergyError::Restarted { .. })
        ));
        let mut bare = a[2].clone();
        bare.totals_since_seq = 0;
        assert_eq!(
            lost_between(Some(&a[0]), &bare),
            Err(LostEnergyError::NoTotals { seq: 3 })
        );
        let mut low = a[2].clone();
        low.running_totals[0].measured_uj = 1;
        let e = lost_between(Some(&a[0]), &low).expect_err("contradiction");
        assert!(e.to_string().contains("dram:0"), "{e}");
    }
}

/// Every batch whose seq is a multiple of this carries a per-run checkpoint
/// (`Batch.run_checkpoint`).
pub const RUN_CHECKPOINT_EVERY: u64 = 60;
/// A run with no energy for this many seqs is dropped from the checkpoints (a run whose end
/// the agent never saw must not stay forever).
pub const RUN_IDLE_DROP_SEQS: u64 = 3600;

/// Whether batch `seq` carries a per-run checkpoint.
pub fn is_checkpoint_seq(seq: u64) -> bool {
    seq > 0 && seq % RUN_CHECKPOINT_EVERY == 0
}

/// Per run, per meter label (`package:0`, `psys`), microjoules.
pub type RunEnergy = BTreeMap<String, BTreeMap<String, u64>>;

/// The energy table's meter label.
fn table_label(domain: &str, package: Option<u32>) -> String {
    crate::energy_table::domain_label(domain, package)
}

/// Each run's allocated energy (active + idle) in these intervals, by meter label.
pub fn run_energy(intervals: &[Interval]) -> RunEnergy {
    let mut out = RunEnergy::new();
    for i in intervals {
        for d in &i.domains {
            if d.allocations.is_empty() {
                continue;
            }
            let label = table_label(&d.domain, d.package);
            for a in &d.allocations {
                let e = out
                    .entry(a.run_id.clone())
                    .or_default()
                    .entry(label.clone())
                    .or_default();
                *e = e.saturating_add(a.active_uj.saturating_add(a.idle_uj));
            }
        }
    }
    out
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct RunCum {
    since_seq: u64,
    last_seq: u64,
    by_meter: BTreeMap<String, u64>,
    finished: bool,
}

/// The agent's per-run energy since each run's `since_seq`, for the checkpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunTotals {
    runs: BTreeMap<String, RunCum>,
    /// The first seq these counts cover without a break (`Batch.run_counts_since_seq`).
    counts_since_seq: u64,
}

impl RunTotals {
    /// Counts that begin at batch `seq` (1 for a new chain; a later seq when an agent start
    /// could not read the last checkpoint back).
    pub fn starting_at(seq: u64) -> Self {
        Self {
            runs: BTreeMap::new(),
            counts_since_seq: seq.max(1),
        }
    }

    /// See [`RunTotals::starting_at`].
    pub fn counts_since_seq(&self) -> u64 {
        self.counts_since_seq.max(1)
    }

    /// The checkpoint batch `seq` carries, given what it adds (`add`): every run with energy
    /// since the previous checkpoint, this batch included. Pure.
    pub fn checkpoint(&self, seq: u64, add: &RunEnergy) -> Vec<wattd_proto::v1::RunCheckpoint> {
        let previous = seq.saturating_sub(RUN_CHECKPOINT_EVERY);
        let mut out = Vec::new();
        let names: std::collections::BTreeSet<&String> = self
            .runs
            .iter()
            .filter(|(_, c)| c.last_seq > previous)
            .map(|(r, _)| r)
            .chain(add.keys())
            .collect();
        for run in names {
            let cum = self.runs.get(run);
            let since = cum.map_or(seq, |c| c.since_seq);
            let mut meters: BTreeMap<&str, u64> = BTreeMap::new();
            if let Some(c) = cum {
                for (m, v) in &c.by_meter {
                    meters.insert(m, *v);
                }
            }
            for (m, v) in add.get(run).into_iter().flatten() {
                let e = meters.entry(m).or_default();
                *e = e.saturating_add(*v);
            }
            for (m, v) in meters {
                out.push(wattd_proto::v1::RunCheckpoint {
                    run_id: run.clone(),
                    meter: m.to_owned(),
                    energy_uj: v,
                    since_seq: since,
                });
            }
        }
        out
    }

    /// After batch `seq` with these intervals and run summaries was sealed. Adds in place
    /// (it runs on every tick: a run id is copied only the first time it is seen). At a
    /// checkpoint, finished runs (all in it) and long-idle ones are dropped.
    pub fn apply(&mut self, seq: u64, intervals: &[Interval], summaries: &[RunSummary]) {
        for i in intervals {
            for d in &i.domains {
                if d.allocations.is_empty() {
                    continue;
                }
                let label = table_label(&d.domain, d.package);
                for a in &d.allocations {
                    let c = match self.runs.get_mut(a.run_id.as_str()) {
                        Some(c) => c,
                        None => self.runs.entry(a.run_id.clone()).or_insert(RunCum {
                            since_seq: seq,
                            ..RunCum::default()
                        }),
                    };
                    c.last_seq = seq;
                    let v = a.active_uj.saturating_add(a.idle_uj);
                    match c.by_meter.get_mut(label.as_str()) {
                        Some(e) => *e = e.saturating_add(v),
                        None => {
                            c.by_meter.insert(label.clone(), v);
                        }
                    }
                }
            }
        }
        for s in summaries {
            if let Some(c) = self.runs.get_mut(s.run_id.as_str()) {
                c.finished = true;
            }
        }
        if is_checkpoint_seq(seq) {
            self.runs
                .retain(|_, c| !c.finished && seq.saturating_sub(c.last_seq) <= RUN_IDLE_DROP_SEQS);
        }
    }

    /// From the checkpoint batch `cp` and the batches after it, in seq order.
    pub fn from_checkpoint<'a>(
        cp: &Batch,
        after: impl IntoIterator<Item = &'a Batch>,
    ) -> Option<Self> {
        if !cp.has_run_checkpoint {
            return None;
        }
        let mut t = RunTotals::starting_at(cp.run_counts_since_seq);
        for e in &cp.run_checkpoint {
            let c = t.runs.entry(e.run_id.clone()).or_insert_with(|| RunCum {
                since_seq: e.since_seq,
                last_seq: cp.seq,
                ..RunCum::default()
            });
            c.by_meter.insert(e.meter.clone(), e.energy_uj);
        }
        for b in after {
            t.apply(b.seq, &b.intervals, &b.run_summaries);
        }
        Some(t)
    }
}

/// The per-run energy of the lost seqs between the checkpoints `c1` (None: before seq 1) and
/// `c2`, given `stored`: the per-run energy of every stored batch after `c1` up to and
/// including `c2`. Returns the runs' lost energy, and the runs whose share cannot be known
/// (they existed before `c1` but are not in it: an agent start lost their count).
pub fn runs_lost_between(
    c1: Option<&Batch>,
    c2: &Batch,
    stored: &RunEnergy,
) -> Result<(RunEnergy, Vec<String>), RunsLostError> {
    if !c2.has_run_checkpoint {
        return Err(RunsLostError::NoCheckpoint { seq: c2.seq });
    }
    let c1_seq = c1.map_or(0, |b| b.seq);
    if c1.is_some_and(|b| !b.has_run_checkpoint) {
        return Err(RunsLostError::NoCheckpoint { seq: c1_seq });
    }
    // A checkpoint inside the range was lost: runs that ended before it were dropped there
    // and appear in no stored checkpoint.
    if c2.seq - c1_seq > RUN_CHECKPOINT_EVERY {
        return Err(RunsLostError::CheckpointInRange {
            from: c1_seq,
            to: c2.seq,
        });
    }
    // The agent's counts restarted between the checkpoints: a run's count before the restart
    // is lost, and a run that "began" after c1 may only have been counted again.
    if c2.run_counts_since_seq > c1_seq + 1 {
        return Err(RunsLostError::CountsRestarted {
            at: c2.run_counts_since_seq,
            checkpoint: c1_seq,
        });
    }
    let index = |b: &Batch| {
        let mut m: BTreeMap<String, (u64, BTreeMap<String, u64>)> = BTreeMap::new();
        for e in &b.run_checkpoint {
            let r = m
                .entry(e.run_id.clone())
                .or_insert((e.since_seq, BTreeMap::new()));
            r.1.insert(e.meter.clone(), e.energy_uj);
        }
        m
    };
    let before = c1.map(index).unwrap_or_default();
    let after = index(c2);
    for run in stored.keys() {
        if !after.contains_key(run) {
            return Err(RunsLostError::NotInCheckpoint {
                run: run.clone(),
                seq: c2.seq,
            });
        }
    }
    let mut lost = RunEnergy::new();
    let mut unknown = Vec::new();
    for (run, (since, cum2)) in &after {
        let cum1 = match before.get(run) {
            Some((s, m)) if s == since => m.clone(),
            _ if *since > c1_seq => BTreeMap::new(),
            _ => {
                unknown.push(run.clone());
                continue;
            }
        };
        for (m, v2) in cum2 {
            let spent = stored
                .get(run)
                .and_then(|s| s.get(m))
                .copied()
                .unwrap_or(0)
                .checked_add(cum1.get(m).copied().unwrap_or(0));
            if *v2 == u64::MAX {
                return Err(RunsLostError::Saturated {
                    run: run.clone(),
                    meter: m.clone(),
                });
            }
            match spent.and_then(|s| v2.checked_sub(s)) {
                Some(0) => {}
                Some(v) => {
                    lost.entry(run.clone()).or_default().insert(m.clone(), v);
                }
                None => {
                    return Err(RunsLostError::Below {
                        run: run.clone(),
                        meter: m.clone(),
                        after: c2.seq,
                        before: c1_seq,
                    })
                }
            }
        }
    }
    Ok((lost, unknown))
}

#[cfg(test)]
mod run_tests {
    use super::*;
    use wattd_proto::v1::{Allocation, DomainEnergy, RunSummary};

    fn iv(runs: &[(&str, u64)]) -> Interval {
        Interval {
            domains: vec![DomainEnergy {
                domain: "package".into(),
                package: Some(0),
                measured_uj: runs.iter().map(|r| r.1).sum(),
                allocations: runs
                    .iter()
                    .map(|(r, e)| Allocation {
                        run_id: (*r).into(),
                        active_uj: *e,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// A chain of `n` batches as the sealer builds them: `content(seq)` gives each batch's
    /// runs and the runs finishing in it.
    fn chain(
        n: u64,
        content: impl Fn(u64) -> (Vec<(&'static str, u64)>, Vec<&'static str>),
    ) -> Vec<Batch> {
        let mut t = RunTotals::starting_at(1);
        (1..=n)
            .map(|seq| {
                let (runs, finished) = content(seq);
                let intervals = vec![iv(&runs)];
                let add = run_energy(&intervals);
                let mut b = Batch {
                    seq,
                    intervals,
                    run_summaries: finished
                        .iter()
                        .map(|r| RunSummary {
                            run_id: (*r).into(),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                };
                if is_checkpoint_seq(seq) {
                    b.run_checkpoint = t.checkpoint(seq, &add);
                    b.has_run_checkpoint = true;
                    b.run_counts_since_seq = t.counts_since_seq();
                }
                t.apply(seq, &b.intervals, &b.run_summaries);
                b
            })
            .collect()
    }

    #[test]
    fn per_run_energy_of_any_lost_range_between_checkpoints_is_exact() {
        // Run a all along; b from 30 to 75 (finishes at 75); c only from 100 to 103.
        let content = |seq: u64| {
            let mut runs = vec![("a", 10 + seq % 7)];
            if (30..=75).contains(&seq) {
                runs.push(("b", 3 * seq));
            }
            if (100..=103).contains(&seq) {
                runs.push(("c", 1000));
            }
            let finished = match seq {
                75 => vec!["b"],
                103 => vec!["c"],
                _ => vec![],
            };
            (runs, finished)
        };
        let all = chain(180, content);
        let by_seq = |s: u64| &all[usize::try_from(s - 1).unwrap_or(0)];
        for (first, last) in [
            (1u64, 1u64),
            (20, 40),
            (61, 61),
            (70, 110),
            (101, 102),
            (121, 179),
        ] {
            let c1 = (first - 1) / RUN_CHECKPOINT_EVERY * RUN_CHECKPOINT_EVERY;
            let c2 = (last + 1).div_ceil(RUN_CHECKPOINT_EVERY) * RUN_CHECKPOINT_EVERY;
            let mut stored = RunEnergy::new();
            let mut want = RunEnergy::new();
            for seq in c1 + 1..=c2 {
                let target = if (first..=last).contains(&seq) {
                    &mut want
                } else {
                    &mut stored
                };
                for (r, m) in run_energy(&by_seq(seq).intervals) {
                    for (k, v) in m {
                        *target.entry(r.clone()).or_default().entry(k).or_default() += v;
                    }
                }
            }
            let c1b = (c1 > 0).then(|| by_seq(c1));
            let (lost, unknown) = runs_lost_between(c1b, by_seq(c2), &stored).expect("prices");
            assert!(unknown.is_empty(), "{first}..={last}: {unknown:?}");
            assert_eq!(lost, want, "{first}..={last}");
        }
        // A range with a checkpoint in it (60 in 59..=62, or 120 in 119..=121): runs that
        // ended before that checkpoint (b ends at 75, c at 103) would be invisible, so the
        // per-run split is refused, never wrong.
        for (c1, c2) in [(0u64, 120u64), (60, 180)] {
            let c1b = (c1 > 0).then(|| by_seq(c1));
            let e = runs_lost_between(c1b, by_seq(c2), &RunEnergy::new()).expect_err("refused");
            assert_eq!(e, RunsLostError::CheckpointInRange { from: c1, to: c2 });
            assert!(e.to_string().contains("in the range"), "{e}");
        }
    }

    #[test]
    fn counts_that_restarted_between_the_checkpoints_are_refused() {
        let all = chain(120, |_| (vec![("a", 5)], vec![]));
        let mut c2 = all[119].clone();
        c2.run_counts_since_seq = 90;
        let e = runs_lost_between(Some(&all[59]), &c2, &RunEnergy::new()).expect_err("refused");
        assert!(e.to_string().contains("restarted at seq 90"), "{e}");
        assert_eq!(
            e,
            RunsLostError::CountsRestarted {
                at: 90,
                checkpoint: 60
            }
        );
    }

    #[test]
    fn a_restart_that_lost_the_count_is_named_and_the_checkpoints_restore() {
        let all = chain(125, |_| (vec![("a", 5)], vec![]));
        // From the checkpoint at 60 and the batches after it, the totals are those the sealer
        // had at 125.
        let t = RunTotals::from_checkpoint(&all[59], &all[60..]).expect("a checkpoint");
        let cp = t.checkpoint(180, &RunEnergy::new());
        assert_eq!(cp.len(), 1);
        assert_eq!((cp[0].energy_uj, cp[0].since_seq), (125 * 5, 1));
        // A run whose count restarted after c1: its share is unknown, named.
        let mut c2 = all[119].clone();
        for e in &mut c2.run_checkpoint {
            e.since_seq = 30;
        }
        let mut c1 = all[59].clone();
        for e in &mut c1.run_checkpoint {
            e.since_seq = 1;
        }
        let stored = RunEnergy::new();
        let (_, unknown) = runs_lost_between(Some(&c1), &c2, &stored).expect("named");
        assert_eq!(unknown, vec!["a".to_owned()]);
        // A checkpoint missing a run that has stored energy is refused.
        let mut bare = all[119].clone();
        bare.run_checkpoint.clear();
        let stored = run_energy(&all[100].intervals);
        assert!(runs_lost_between(Some(&all[59]), &bare, &stored).is_err());
    }
}

/// What sealing one batch adds to the node's counts, computed before the batch is appended
/// (pure), and applied once it is: the sealer and every test chain seal the same way.
#[derive(Debug)]
pub struct Stamp {
    totals: RunningTotals,
}

/// Fills `content`'s running totals and, at a checkpoint seq, its run checkpoint (either only
/// if not set already) for batch `seq`, from the counts as of the batch before.
pub fn stamp(
    seq: u64,
    content: &mut crate::seal::BatchContent,
    totals: &RunningTotals,
    runs: &RunTotals,
) -> Stamp {
    let next = totals.after(&content.intervals);
    if content.totals.is_none() {
        content.totals = Some(next.clone());
    }
    if is_checkpoint_seq(seq) && content.run_checkpoint.is_none() {
        content.run_checkpoint = Some(runs.checkpoint(seq, &run_energy(&content.intervals)));
        content.run_counts_since_seq = runs.counts_since_seq();
    }
    Stamp { totals: next }
}

impl Stamp {
    /// The running totals after the batch.
    pub fn totals(&self) -> &RunningTotals {
        &self.totals
    }

    /// Batch `seq`, with these intervals and run summaries, was appended: the counts move on.
    pub fn apply(
        self,
        seq: u64,
        intervals: &[Interval],
        summaries: &[RunSummary],
        totals: &mut RunningTotals,
        runs: &mut RunTotals,
    ) {
        runs.apply(seq, intervals, summaries);
        *totals = self.totals;
    }
}
