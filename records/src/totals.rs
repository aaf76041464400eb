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

use wattd_proto::v1::{Batch, Interval, MeterTotal};

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

fn meter_name(m: &MeterId) -> String {
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
                    meter: meter_name(m),
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
