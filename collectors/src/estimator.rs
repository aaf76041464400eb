//! The estimator for hosts with no hardware energy counter (most VMs): per package, a declared
//! idle power plus a declared power per busy CPU, times the utilisation /proc/stat measured.
//! Every reading it makes is marked `Quality::Estimated`, and that mark travels with it.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::counter::CounterSample;
use crate::domain::{Domain, DomainReading, Meter, MeterKey, Quality, SourceKind};
use crate::hostfs::HostRoot;
use crate::procstat::{busy_us_between, user_hz, ProcStat};
use crate::topology::Topology;

/// The declared model (config `[estimator]`), in microwatts to keep the arithmetic integral.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct EstimatorModel {
    pub idle_uw_per_package: u64,
    pub busy_uw_per_cpu: u64,
}

impl EstimatorModel {
    /// From watts as configured; negative or non-finite values are the config's to reject.
    pub fn from_watts(idle_watts_per_package: f64, busy_watts_per_cpu: f64) -> Self {
        let uw = |w: f64| (w.max(0.0) * 1e6).round() as u64;
        EstimatorModel {
            idle_uw_per_package: uw(idle_watts_per_package),
            busy_uw_per_cpu: uw(busy_watts_per_cpu),
        }
    }
}

impl Default for EstimatorModel {
    /// The BRIEF's defaults: 20 W idle per package, 4 W per busy CPU.
    fn default() -> Self {
        EstimatorModel::from_watts(20.0, 4.0)
    }
}

/// Estimated package energy, one meter per package.
#[derive(Debug)]
pub struct EstimatorMeter {
    root: HostRoot,
    model: EstimatorModel,
    cpus_by_package: BTreeMap<u32, Vec<u32>>,
    hz: u64,
    last: Option<ProcStat>,
    /// Per package: cumulative estimated energy in picojoules (uW x us), and microjoules emitted.
    acc: BTreeMap<u32, (u128, u128)>,
}

impl EstimatorMeter {
    pub fn new(root: HostRoot, topo: &Topology, model: EstimatorModel) -> Self {
        let cpus_by_package = topo.cpus_by_package();
        let acc = cpus_by_package.keys().map(|&p| (p, (0, 0))).collect();
        EstimatorMeter {
            root,
            model,
            cpus_by_package,
            hz: user_hz(),
            last: None,
            acc,
        }
    }

    fn key(pkg: u32) -> MeterKey {
        MeterKey {
            domain: Domain::Package,
            package: Some(pkg),
            die: None,
        }
    }
}

impl Meter for EstimatorMeter {
    fn source(&self) -> SourceKind {
        SourceKind::Estimator
    }

    fn keys(&self) -> Vec<MeterKey> {
        self.cpus_by_package.keys().map(|&p| Self::key(p)).collect()
    }

    fn read(&mut self, elapsed_us: u64, out: &mut Vec<DomainReading>) {
        let now = ProcStat::read(&self.root);
        let push = |out: &mut Vec<DomainReading>, pkg, sample| {
            out.push(DomainReading {
                key: Self::key(pkg),
                source: SourceKind::Estimator,
                quality: Quality::Estimated,
                sample,
            })
        };
        let now = match now {
            Ok(n) => n,
            Err(e) => {
                // One error, reported for each package; the next good read restarts the baseline.
                self.last = None;
                let msg = e.to_string();
                for &pkg in self.cpus_by_package.keys() {
                    let err = crate::error::HostError::malformed(
                        std::path::Path::new("/proc/stat"),
                        msg.clone(),
                    );
                    push(out, pkg, Err(err));
                }
                return;
            }
        };
        let Some(prev) = self.last.replace(now) else {
            for &pkg in self.cpus_by_package.keys() {
                push(out, pkg, Ok(CounterSample::First));
            }
            return;
        };
        let Some(now) = self.last.as_ref() else {
            return;
        };
        for (&pkg, cpus) in &self.cpus_by_package {
            let busy = busy_us_between(&prev, now, cpus, self.hz, elapsed_us);
            let pj = self.model.idle_uw_per_package as u128 * elapsed_us as u128
                + self.model.busy_uw_per_cpu as u128 * busy as u128;
            let (acc_pj, emitted_uj) = self.acc.entry(pkg).or_insert((0, 0));
            *acc_pj += pj;
            let total_uj = *acc_pj / 1_000_000;
            let energy_uj = u64::try_from(total_uj - *emitted_uj).unwrap_or(u64::MAX);
            *emitted_uj = total_uj;
            push(
                out,
                pkg,
                Ok(CounterSample::Energy {
                    energy_uj,
                    wrapped: false,
                }),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn busy_time_is_bounded_and_per_package() {
        let p = Path::new("stat");
        let a = ProcStat::parse(p, "cpu0 100 0 0 900\ncpu1 0 0 0 1000\n").unwrap();
        let b = ProcStat::parse(p, "cpu0 150 0 0 950\ncpu1 1000 0 0 1000\n").unwrap();
        // cpu0: 50 idle ticks at 100 Hz in 1 s = 0.5 s busy
        assert_eq!(busy_us_between(&a, &b, &[0], 100, 1_000_000), 500_000);
        // cpu1: no idle at all in 1 s: 1 s busy, however many user ticks
        assert_eq!(busy_us_between(&a, &b, &[1], 100, 1_000_000), 1_000_000);
    }

    #[test]
    fn model_in_microwatts() {
        let m = EstimatorModel::from_watts(20.0, 4.5);
        assert_eq!(
            (m.idle_uw_per_package, m.busy_uw_per_cpu),
            (20_000_000, 4_500_000)
        );
        assert_eq!(
            EstimatorModel::from_watts(-1.0, f64::NAN).idle_uw_per_package,
            0
        );
    }
}
