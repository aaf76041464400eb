//! GPU usage for attribution: from what NVML said about one GPU in one interval (the collector's
//! [`Activity`]) to each run's weight, the host's, and how it was measured. Pure: the pid ->
//! run mapping is passed in.
//!
//! The basis, in order of preference (recorded in every GPU `DomainEnergy` as `usage_basis`):
//!
//! - `sm_utilization`: per-process SM samples. Each poll (every 200 ms and at the close) asks
//!   NVML for the samples since the previous poll; a process's figure for the poll is the mean SM
//!   percentage of its samples in it, and covers the poll's monotonic span. Its usage is
//!   `sum(sm% x span us) / 100`, SM-busy microseconds (`Activity::sm_busy_us`, computed by the
//!   collector). Each process is weighted by its own samples whatever their timestamps, so a
//!   process sampled at another phase than its neighbour is neither under- nor over-weighted, and
//!   none of its samples is skipped. Samples with pid 0, SM above 100 % or a timestamp in the
//!   future of NVML's clock are refused and counted. Used whenever NVML gives samples, MIG or not.
//! - `mig_instance_size` (MIG, no samples: NVML does not give per-process utilisation under
//!   MIG): the GPU's time is divided among the GPU instances that have a running compute process,
//!   in proportion to their slices (a 3g instance weighs 3, a 1g 1), and within an instance
//!   evenly among its processes. Instances without a process get nothing of the active part.
//! - `mig_instance_even` (MIG, no samples, instance sizes unreadable): as above, each instance
//!   with a process weighing the same.
//! - `running_processes` (no MIG, no samples: GPUs or drivers without
//!   `nvmlDeviceGetProcessUtilization`): every running compute process weighs the same.
//!
//! Under the `reserved` idle policy, a GPU's idle energy goes to whoever holds it: under MIG,
//! each instance's slices are shared evenly by the owners (runs, or the host bucket) of the
//! processes in it, and instances without a process are the host's; without MIG, the GPU is
//! shared evenly by the owners of the processes on it, and is the host's when nobody runs there.
//!
//! A pid whose cgroup is in no run, or unknown (a process that exited before it was ever seen
//! running), is the host's.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;
use wattd_collectors::nvml::Activity;

/// How a GPU's usage was measured in an interval.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GpuBasis {
    SmUtilization,
    MigInstanceSize,
    MigInstanceEven,
    RunningProcesses,
    /// AMD SMI's per-process graphics-engine time.
    EngineTime,
}

impl GpuBasis {
    pub fn as_str(self) -> &'static str {
        match self {
            GpuBasis::SmUtilization => "sm_utilization",
            GpuBasis::MigInstanceSize => "mig_instance_size",
            GpuBasis::MigInstanceEven => "mig_instance_even",
            GpuBasis::RunningProcesses => "running_processes",
            GpuBasis::EngineTime => "engine_time",
        }
    }
}

/// What a GPU meter's result says about the GPU.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GpuMeta {
    pub uuid: Option<Arc<str>>,
    /// `None` when there was no usage data.
    pub basis: Option<GpuBasis>,
    pub mig: Option<bool>,
}

/// One run's use of one GPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GpuRunUsage {
    pub run_id: Arc<str>,
    /// The weight of the active part (SM-busy us, or the share of GPU time of the fallbacks).
    pub usage_us: u64,
    /// The weight of the idle part under the `reserved` policy.
    pub reserved: u64,
}

/// Who used one GPU in one interval.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GpuUsage {
    pub basis: GpuBasis,
    pub mig: bool,
    /// Sorted by run id; runs with neither usage nor reservation are left out.
    pub runs: Vec<GpuRunUsage>,
    pub host_usage: u64,
    pub host_reserved: u64,
    /// Pids whose cgroup was unknown (counted in the host bucket).
    pub unknown_cgroup_pids: u32,
}

/// Who a pid's share goes to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Owner {
    Run(Arc<str>),
    Host,
}

/// Each pid's weight (active) and, separately, who holds what (reserved).
struct PidWeights {
    basis: GpuBasis,
    usage: BTreeMap<u32, u128>,
    /// Groups of pids that share a capacity evenly among their owners: (capacity, pids).
    holdings: Vec<(u128, Vec<u32>)>,
    /// Capacity nobody holds (MIG instances without a process).
    unheld: u128,
}

const SCALE: u128 = 1_000;

fn pid_weights(a: &Activity, elapsed_us: u64) -> Option<PidWeights> {
    let mig = a.mig == Some(true);
    let elapsed = elapsed_us.max(1) as u128;
    let running: Vec<u32> = match &a.processes {
        Ok(p) => p.iter().map(|p| p.pid).collect(),
        Err(_) => Vec::new(),
    };
    match &a.sm_busy_us {
        // AMD SMI's engine time is the graphics engine's only: work on KFD compute queues (HIP)
        // does not show in it, so a listed process (one holding a context on the GPU) at zero
        // may be the one computing. Shares by engine time would give it nothing and the
        // others everything: where any listed process shows no engine time in the interval,
        // every listed process weighs alike.
        Ok(busy)
            if a.engine_time
                && !running.is_empty()
                && running
                    .iter()
                    .any(|p| busy.get(p).map_or(true, |us| *us == 0)) =>
        {
            let usage = running.iter().map(|p| (*p, elapsed)).collect();
            Some(PidWeights {
                basis: GpuBasis::RunningProcesses,
                usage,
                holdings: vec![(SCALE, running)],
                unheld: 0,
            })
        }
        Ok(busy) if !busy.is_empty() || !mig => {
            let usage: BTreeMap<u32, u128> =
                busy.iter().map(|(p, us)| (*p, u128::from(*us))).collect();
            let mut holders: Vec<u32> = running.clone();
            holders.extend(usage.keys().copied());
            if mig {
                if let Some(Ok(inst)) = &a.mig_instances {
                    let (holdings, unheld) = instance_holdings(
                        inst.iter()
                            .map(|i| (i.slices.max(1) as u128 * SCALE, i.pids.clone())),
                    );
                    return Some(PidWeights {
                        basis: GpuBasis::SmUtilization,
                        usage,
                        holdings,
                        unheld,
                    });
                }
            }
            Some(PidWeights {
                basis: if a.engine_time {
                    GpuBasis::EngineTime
                } else {
                    GpuBasis::SmUtilization
                },
                usage,
                holdings: vec![(SCALE, holders)],
                unheld: 0,
            })
        }
        _ if mig => {
            if let Some(Ok(inst)) = &a.mig_instances {
                let total: u128 = inst.iter().map(|i| i.slices.max(1) as u128).sum();
                let mut usage = BTreeMap::new();
                for i in inst.iter().filter(|i| !i.pids.is_empty()) {
                    let share = elapsed * i.slices.max(1) as u128 / total.max(1);
                    let per = share / i.pids.len() as u128;
                    for p in &i.pids {
                        *usage.entry(*p).or_default() += per;
                    }
                }
                let (holdings, unheld) = instance_holdings(
                    inst.iter()
                        .map(|i| (i.slices.max(1) as u128 * SCALE, i.pids.clone())),
                );
                return Some(PidWeights {
                    basis: GpuBasis::MigInstanceSize,
                    usage,
                    holdings,
                    unheld,
                });
            }
            // Instance sizes unknown: group the parent's processes by GPU instance id.
            let procs = a.processes.as_ref().ok()?;
            let mut by_instance: BTreeMap<Option<u32>, Vec<u32>> = BTreeMap::new();
            for p in procs {
                by_instance.entry(p.gpu_instance).or_default().push(p.pid);
            }
            let n = by_instance.len().max(1) as u128;
            let mut usage = BTreeMap::new();
            for pids in by_instance.values() {
                let per = elapsed / n / pids.len() as u128;
                for p in pids {
                    *usage.entry(*p).or_default() += per;
                }
            }
            let holdings = by_instance.into_values().map(|p| (SCALE, p)).collect();
            Some(PidWeights {
                basis: GpuBasis::MigInstanceEven,
                usage,
                holdings,
                unheld: 0,
            })
        }
        _ => {
            let procs = a.processes.as_ref().ok()?;
            let usage = procs.iter().map(|p| (p.pid, elapsed)).collect();
            Some(PidWeights {
                basis: GpuBasis::RunningProcesses,
                usage,
                holdings: vec![(SCALE, running)],
                unheld: 0,
            })
        }
    }
}

fn instance_holdings(
    inst: impl Iterator<Item = (u128, Vec<u32>)>,
) -> (Vec<(u128, Vec<u32>)>, u128) {
    let mut holdings = Vec::new();
    let mut unheld = 0u128;
    for (cap, pids) in inst {
        if pids.is_empty() {
            unheld += cap;
        } else {
            holdings.push((cap, pids));
        }
    }
    (holdings, unheld)
}

fn clamp(v: u128) -> u64 {
    u64::try_from(v).unwrap_or(u64::MAX)
}

/// The GPU's usage by run and host, or `None` when NVML said nothing usable about who used it
/// (the meter's energy is then unattributed, `NO_USAGE_DATA`). `run_of` maps a cgroup path
/// (relative to the cgroup2 mount) to the run it belongs to.
pub fn gpu_usage(
    a: &Activity,
    elapsed_us: u64,
    run_of: impl Fn(&str) -> Option<Arc<str>>,
) -> Option<GpuUsage> {
    let w = pid_weights(a, elapsed_us)?;
    let mut unknown = 0u32;
    let mut owners: BTreeMap<u32, Owner> = BTreeMap::new();
    let mut owner_of = |pid: u32| -> Owner {
        owners
            .entry(pid)
            .or_insert_with(|| match a.cgroups.get(&pid).cloned().flatten() {
                Some(c) => run_of(&c).map_or(Owner::Host, Owner::Run),
                None => {
                    unknown += 1;
                    Owner::Host
                }
            })
            .clone()
    };
    let mut usage: BTreeMap<Owner, (u128, u128)> = BTreeMap::new();
    for (&pid, &u) in &w.usage {
        usage.entry(owner_of(pid)).or_default().0 += u;
    }
    for (cap, pids) in &w.holdings {
        let mut holders: Vec<Owner> = pids.iter().map(|p| owner_of(*p)).collect();
        holders.sort();
        holders.dedup();
        if holders.is_empty() {
            usage.entry(Owner::Host).or_default().1 += cap;
            continue;
        }
        let per = cap / holders.len() as u128;
        for h in holders {
            usage.entry(h).or_default().1 += per;
        }
    }
    usage.entry(Owner::Host).or_default().1 += w.unheld;
    let mut out = GpuUsage {
        basis: w.basis,
        mig: a.mig == Some(true),
        runs: Vec::new(),
        host_usage: 0,
        host_reserved: 0,
        unknown_cgroup_pids: unknown,
    };
    for (owner, (u, r)) in usage {
        match owner {
            Owner::Host => {
                out.host_usage = clamp(u);
                out.host_reserved = clamp(r);
            }
            Owner::Run(run_id) => {
                if u > 0 || r > 0 {
                    out.runs.push(GpuRunUsage {
                        run_id,
                        usage_us: clamp(u),
                        reserved: clamp(r),
                    });
                }
            }
        }
    }
    Some(out)
}

/// Maps cgroup paths to runs: a pid's cgroup belongs to the run whose cgroup is it or one of its
/// ancestors (runs are never nested, so there is at most one).
#[derive(Debug, Default)]
pub struct RunCgroups {
    by_cgroup: std::collections::HashMap<Arc<str>, Arc<str>>,
}

impl RunCgroups {
    pub fn new<'a>(runs: impl IntoIterator<Item = (&'a Arc<str>, &'a Arc<str>)>) -> Self {
        RunCgroups {
            by_cgroup: runs
                .into_iter()
                .map(|(cgroup, run)| (cgroup.clone(), run.clone()))
                .collect(),
        }
    }

    pub fn run_of(&self, cgroup: &str) -> Option<Arc<str>> {
        let mut path = cgroup.trim_matches('/');
        loop {
            if path.is_empty() {
                return None;
            }
            if let Some(r) = self.by_cgroup.get(path) {
                return Some(r.clone());
            }
            path = match path.rfind('/') {
                Some(i) => &path[..i],
                None => "",
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;
    use wattd_collectors::nvml::{ComputeProcess, MigInstance, NvmlError};
    use wattd_collectors::{Domain, MeterKey, Quality, SourceKind};

    use super::*;
    use crate::attribution::{
        attribute, DramPolicy, IdleEstimate, IdlePolicy, IdleSource, IntervalInput, Measured,
        MeterInput, Policy, Usage,
    };

    fn activity() -> impl Strategy<Value = (Activity, u64)> {
        let pids = proptest::collection::vec(1u32..8, 0..6);
        (
            proptest::option::of(any::<bool>()),
            proptest::collection::btree_map(1u32..8, 0u64..20_000_000, 0..8),
            any::<bool>(),
            pids.clone(),
            proptest::option::of(proptest::collection::vec((0u32..8, pids), 0..5)),
            proptest::collection::btree_map(1u32..8, 0u8..4, 0..8),
            1u64..10_000_000,
            // AMD SMI's engine time (its rule for a listed process at zero) or NVML's samples.
            any::<bool>(),
        )
            .prop_map(
                |(mig, busy, samples_ok, procs, inst, cg, elapsed, engine_time)| {
                    let cgroups = cg
                        .into_iter()
                        .map(|(pid, k)| {
                            let c: Option<Arc<str>> = match k {
                                0 => None,
                                1 => Some("flowzart.slice/run-a.scope".into()),
                                2 => Some("flowzart.slice/run-b.scope/child".into()),
                                _ => Some("system.slice/x.service".into()),
                            };
                            (pid, c)
                        })
                        .collect();
                    let a = Activity {
                        mig,
                        sm_busy_us: if samples_ok {
                            Ok(busy)
                        } else {
                            Err(NvmlError::NotSupported)
                        },
                        engine_time,
                        processes: Ok(procs
                            .iter()
                            .map(|&pid| ComputeProcess {
                                pid,
                                gpu_instance: Some(pid % 3),
                            })
                            .collect()),
                        mig_instances: inst.map(|v| {
                            Ok(v.into_iter()
                                .enumerate()
                                .map(|(i, (slices, pids))| MigInstance {
                                    index: i as u32,
                                    slices,
                                    multiprocessors: 0,
                                    pids,
                                })
                                .collect())
                        }),
                        cgroups,
                        rejected_samples: 0,
                        dropped_samples: 0,
                    };
                    (a, elapsed)
                },
            )
    }

    fn runs() -> RunCgroups {
        let a: (Arc<str>, Arc<str>) = ("flowzart.slice/run-a.scope".into(), "a".into());
        let b: (Arc<str>, Arc<str>) = ("flowzart.slice/run-b.scope".into(), "b".into());
        let v = [a, b];
        RunCgroups::new(v.iter().map(|(c, r)| (c, r)))
    }

    #[test]
    fn run_of_walks_up_to_the_run() {
        let r = runs();
        assert_eq!(
            r.run_of("flowzart.slice/run-b.scope/child/x").as_deref(),
            Some("b")
        );
        assert_eq!(r.run_of("flowzart.slice/run-a.scope").as_deref(), Some("a"));
        assert_eq!(r.run_of("flowzart.slice/run-a.scopex"), None);
        assert_eq!(r.run_of(""), None);
        assert_eq!(r.run_of("flowzart.slice"), None);
    }

    proptest! {
        /// Whatever NVML says, every GPU interval conserves energy exactly under every policy,
        /// and only runs that own a pid on the GPU get any of it.
        #[test]
        fn gpu_attribution_conserves_energy(
            (a, elapsed) in activity(),
            energy in 0u64..10_000_000_000,
            idle_w in 0u64..2_000,
            policy in 0usize..3,
        ) {
            let r = runs();
            let gpus: BTreeMap<u32, GpuUsage> = gpu_usage(&a, elapsed, |c| r.run_of(c))
                .map(|u| (0, u))
                .into_iter()
                .collect();
            let input = IntervalInput {
                elapsed_us: elapsed,
                meters: vec![MeterInput {
                    key: MeterKey { domain: Domain::Gpu, package: Some(0), die: None },
                    source: SourceKind::Nvml,
                    quality: Quality::Measured,
                    measured: Measured::Energy { energy_uj: energy },
                    idle: IdleEstimate { power_uw: idle_w * 1_000_000, source: IdleSource::Window },
                }],
                usage: Some(Usage { gpus, ..Usage::default() }),
                policy: Policy {
                    idle: [IdlePolicy::Proportional, IdlePolicy::Reserved, IdlePolicy::Host][policy],
                    dram: DramPolicy::Cpu, platform: crate::attribution::PlatformPolicy::Proportional,
                },
            };
            let out = attribute(&input);
            prop_assert_eq!(out[0].sum_uj(), energy as u128);
            let owners: Vec<Arc<str>> = a
                .cgroups
                .values()
                .filter_map(|c| c.as_deref().and_then(|c| r.run_of(c)))
                .collect();
            for (id, _) in out[0].shares() {
                prop_assert!(owners.contains(id), "{} got energy", id);
            }
        }
    }
}
