//! Idle power per meter: from configuration, from a calibration, or the lowest power seen over a
//! sliding window of recent intervals. Stateful but free of IO and clocks: times are passed in.

use std::collections::{BTreeMap, VecDeque};

use wattd_collectors::{Domain, MeterKey};

use super::{IdleEstimate, IdleSource};

/// Bound on remembered intervals per meter, whatever the window and interval.
const WINDOW_ENTRIES_MAX: usize = 65_536;

/// Tracks idle power for every meter.
#[derive(Debug, Clone)]
pub struct IdleTracker {
    window_us: u64,
    /// Declared idle power per domain (per package meter for package/dram; whole platform for
    /// psys), with where it came from.
    declared: BTreeMap<Domain, IdleEstimate>,
    /// Per meter: a monotonic deque of (end time, power) whose front is the window's minimum.
    windows: BTreeMap<MeterKey, VecDeque<(u64, u64)>>,
}

impl IdleTracker {
    pub fn new(window_us: u64, declared: BTreeMap<Domain, IdleEstimate>) -> Self {
        IdleTracker {
            window_us: window_us.max(1),
            declared,
            windows: BTreeMap::new(),
        }
    }

    /// The idle estimate for `key` for an interval ending at `end_us` (monotonic) in which it
    /// consumed `energy_uj` over `elapsed_us`. Declared values win; otherwise the window minimum,
    /// which includes this interval, so idle never exceeds the current power.
    pub fn estimate(
        &mut self,
        key: MeterKey,
        end_us: u64,
        energy_uj: Option<u64>,
        elapsed_us: u64,
    ) -> IdleEstimate {
        if let Some(d) = self.declared.get(&key.domain) {
            return *d;
        }
        let q = self.windows.entry(key).or_default();
        if let (Some(e), true) = (energy_uj, elapsed_us > 0) {
            let power_uw =
                (e as u128 * 1_000_000 / elapsed_us as u128).min(u64::MAX as u128) as u64;
            while q.back().is_some_and(|&(_, p)| p >= power_uw) {
                q.pop_back();
            }
            q.push_back((end_us, power_uw));
            if q.len() > WINDOW_ENTRIES_MAX {
                q.pop_front();
            }
        }
        let horizon = end_us.saturating_sub(self.window_us);
        while q.len() > 1 && q.front().is_some_and(|&(t, _)| t <= horizon) {
            q.pop_front();
        }
        IdleEstimate {
            power_uw: q.front().map_or(0, |&(_, p)| p),
            source: IdleSource::Window,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> MeterKey {
        MeterKey {
            domain: Domain::Package,
            package: Some(0),
            die: None,
        }
    }

    #[test]
    fn window_minimum_slides() {
        let mut t = IdleTracker::new(3_000_000, BTreeMap::new());
        let s = 1_000_000;
        // powers 50, 30, 40, 60, 70 W over 1 s intervals; window 3 s
        let powers = [50u64, 30, 40, 60, 70];
        let mut got = Vec::new();
        for (i, p) in powers.iter().enumerate() {
            got.push(
                t.estimate(key(), (i as u64 + 1) * s, Some(p * 1_000_000), s)
                    .power_uw
                    / 1_000_000,
            );
        }
        assert_eq!(got, vec![50, 30, 30, 30, 40]);
    }

    #[test]
    fn declared_wins() {
        let mut d = BTreeMap::new();
        d.insert(
            Domain::Package,
            IdleEstimate {
                power_uw: 7,
                source: IdleSource::Calibration,
            },
        );
        let mut t = IdleTracker::new(1, d);
        assert_eq!(
            t.estimate(key(), 1, Some(1), 1),
            IdleEstimate {
                power_uw: 7,
                source: IdleSource::Calibration
            }
        );
    }
}
