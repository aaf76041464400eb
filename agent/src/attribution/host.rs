//! The host bucket's CPU time: per package, the busy time `/proc/stat` measured that no run
//! used. A policy, so it lives here and not in the tracker, which only measures.
//!
//! `/proc/stat`'s idle time comes in 10 ms units, so one interval's busy time is off by up to a
//! unit per CPU either way, while the runs' times are exact. Clamping each interval's host share
//! at zero would keep every downward error and drop every upward one, biasing the host up and
//! the runs down. Instead the host is paid from a running balance of busy minus runs: over time
//! it receives exactly what the counters say, and it is never negative.

use std::collections::BTreeMap;

use wattd_collectors::cgroup::PackageUsage;

/// How far a balance may go negative per CPU: a run can out-measure `/proc/stat` by a quantum
/// per CPU per interval, not more; beyond that the counters disagree and the past should not be
/// charged against the future.
const FLOOR_PER_CPU_US: i128 = 20_000;

/// Per package, busy time not yet given to the host bucket (negative: runs out-measured
/// `/proc/stat`'s quantised busy time, to be made up from later intervals).
#[derive(Clone, Debug)]
pub struct HostBalance {
    balance_us: BTreeMap<u32, i128>,
    floor_us: i128,
}

impl HostBalance {
    /// For a host of `cpus` CPUs (all packages).
    pub fn new(cpus: u32) -> Self {
        HostBalance {
            balance_us: BTreeMap::new(),
            floor_us: -(i128::from(cpus) * FLOOR_PER_CPU_US),
        }
    }

    /// The host's CPU time on package `pkg` this interval, from the tracker's measure of it.
    pub fn host_us(&mut self, pkg: u32, p: &PackageUsage) -> u64 {
        let balance = self.balance_us.entry(pkg).or_insert(0);
        *balance = balance.saturating_add(p.busy_signed_us - i128::from(p.runs_us));
        let host_us = u64::try_from((*balance).max(0)).unwrap_or(u64::MAX);
        *balance -= i128::from(host_us);
        *balance = (*balance).max(self.floor_us);
        host_us
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkg(busy_signed_us: i128, runs_us: u64) -> PackageUsage {
        PackageUsage {
            busy_signed_us,
            runs_us,
        }
    }

    #[test]
    fn what_runs_out_measure_is_taken_back_from_the_next_host_share() {
        let mut h = HostBalance::new(2);
        assert_eq!(h.host_us(0, &pkg(500_000, 400_000)), 100_000);
        // Runs used 30 ms more than /proc/stat measured: the host gets nothing now ...
        assert_eq!(h.host_us(0, &pkg(470_000, 500_000)), 0);
        // ... and 30 ms less next time; over both, exactly busy - runs.
        assert_eq!(h.host_us(0, &pkg(500_000, 400_000)), 70_000);
        // Packages keep their own balance.
        assert_eq!(h.host_us(1, &pkg(500_000, 400_000)), 100_000);
    }

    #[test]
    fn a_balance_goes_only_a_quantum_per_cpu_negative() {
        let mut h = HostBalance::new(2);
        // Runs out-measure busy time by a whole second: only 2 x 20 ms is carried.
        assert_eq!(h.host_us(0, &pkg(0, 1_000_000)), 0);
        assert_eq!(h.host_us(0, &pkg(500_000, 400_000)), 60_000);
        // A negative busy time (tick rounding over a short interval) is carried too.
        assert_eq!(h.host_us(0, &pkg(-5_000, 0)), 0);
        assert_eq!(h.host_us(0, &pkg(10_000, 0)), 5_000);
    }
}
