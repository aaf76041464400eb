//! The sampler: closes one interval per tick on the monotonic clock from the readings of every
//! meter (RAPL, hwmon and the estimator, read by [`Meters`], and NVML GPUs, read on their own
//! thread: the same [`Reading`] each), turns counter verdicts into measured energy or recorded
//! gaps, estimates idle power, and hands the interval to attribution. [`Sampler::close`] does no
//! IO. A late tick makes one longer interval, never a lost one; a wall-clock jump is recorded,
//! never used for durations.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;
use wattd_collectors::estimator::EstimatorModel;
use wattd_collectors::{
    CounterSample, Domain, DomainReading, Meter, MeterKey, Quality, SourceKind,
};

use crate::attribution::idle::IdleTracker;
use crate::attribution::{
    self, IdleEstimate, IdleSource, IntervalInput, Measured, MeterInput, MeterResult, Policy, Usage,
};
use crate::platform::{BmcEvent, PlatformMeter, PlatformTick};

/// A point in time on both clocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Stamp {
    /// CLOCK_MONOTONIC, nanoseconds: durations come from this clock only.
    pub mono_ns: u64,
    /// CLOCK_REALTIME, nanoseconds since the Unix epoch: labels only.
    pub unix_ns: i64,
}

fn clock_ns(clock: rustix::time::ClockId) -> i128 {
    let ts = rustix::time::clock_gettime(clock);
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

impl Stamp {
    pub fn now() -> Self {
        Stamp {
            mono_ns: clock_ns(rustix::time::ClockId::Monotonic).max(0) as u64,
            unix_ns: clock_ns(rustix::time::ClockId::Realtime) as i64,
        }
    }
}

/// Wall-clock jumps smaller than this are scheduling noise, not jumps.
pub const WALL_JUMP_THRESHOLD_NS: i64 = 50_000_000;

/// Why a meter's energy is unknown for a span.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GapCause {
    /// The counter went backwards implausibly (driver reload, hot-plug).
    CounterReset,
    /// The meter could not be read.
    SourceFailure,
    /// The agent was not running.
    AgentDown,
}

/// A span of one meter's energy that is unknown, with its cause.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GapRecord {
    /// `None` for a gap of every meter (agent down).
    pub key: Option<MeterKey>,
    pub start: Stamp,
    pub end: Stamp,
    pub cause: GapCause,
    pub detail: String,
}

/// One closed interval, attributed.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Interval {
    pub index: u64,
    pub start: Stamp,
    pub end: Stamp,
    /// (wall elapsed - monotonic elapsed), 0 when below the threshold.
    pub wall_jump_ns: i64,
    pub policy: Policy,
    pub results: Vec<MeterResult>,
    pub gaps: Vec<GapRecord>,
}

impl Interval {
    pub fn elapsed_us(&self) -> u64 {
        self.end.mono_ns.saturating_sub(self.start.mono_ns) / 1_000
    }
}

/// One meter's reading over an interval, with the device's identity where it has one (a GPU's
/// UUID), for the records.
#[derive(Debug)]
pub struct Reading {
    pub reading: DomainReading,
    pub device: Option<Arc<str>>,
}

/// The meters the loop reads itself at each tick (RAPL, hwmon, the estimator): the IO side of
/// the sampler.
#[derive(Debug)]
pub struct Meters {
    meters: Vec<Box<dyn Meter>>,
    /// The device identity of the meters that have one (hwmon GPUs).
    device_ids: BTreeMap<MeterKey, Arc<str>>,
    scratch: Vec<DomainReading>,
}

impl Meters {
    /// Takes the baseline reading of every meter: the first interval starts now.
    pub fn open(mut meters: Vec<Box<dyn Meter>>) -> Self {
        let mut scratch = Vec::new();
        for m in &mut meters {
            m.read(0, &mut scratch);
        }
        scratch.clear();
        let device_ids = meters
            .iter()
            .flat_map(|m| {
                m.keys()
                    .into_iter()
                    .filter_map(|k| m.device_id(k).map(|id| (k, id)))
            })
            .collect();
        Meters {
            meters,
            device_ids,
            scratch,
        }
    }

    /// Reads every meter over an interval of `elapsed_us` into `out`.
    pub fn read(&mut self, elapsed_us: u64, out: &mut Vec<Reading>) {
        for m in &mut self.meters {
            m.read(elapsed_us, &mut self.scratch);
        }
        out.extend(self.scratch.drain(..).map(|reading| Reading {
            device: self.device_ids.get(&reading.key).cloned(),
            reading,
        }));
    }
}

/// Closes intervals from the meters' readings and attributes them.
#[derive(Debug)]
pub struct Sampler {
    idle: IdleTracker,
    estimator: EstimatorModel,
    policy: Policy,
    last: Stamp,
    next_index: u64,
    /// The platform meter and the BMC answers waiting for the next tick, when a BMC is
    /// configured.
    platform: Option<PlatformMeter>,
    bmc_events: Vec<BmcEvent>,
    last_platform: Option<PlatformTick>,
}

/// The platform meter's key: one per node.
pub const PLATFORM_KEY: MeterKey = MeterKey {
    domain: Domain::Platform,
    package: None,
    die: None,
};

impl Sampler {
    /// The first interval starts at `now` (when the meters took their baseline).
    pub fn new(
        idle: IdleTracker,
        estimator: EstimatorModel,
        policy: Policy,
        next_index: u64,
        now: Stamp,
    ) -> Self {
        Sampler {
            idle,
            estimator,
            policy,
            last: now,
            next_index,
            platform: None,
            bmc_events: Vec::new(),
            last_platform: None,
        }
    }

    /// With a platform meter (the wall less the other meters), fed by [`Self::bmc_events`].
    pub fn with_platform(mut self, max_gap_ns: u64, max_watts: u32) -> Self {
        self.platform = Some(PlatformMeter::new(self.last.mono_ns, max_gap_ns, max_watts));
        self
    }

    /// The BMC's answers since the last tick, for the platform meter.
    pub fn bmc_events(&mut self, events: impl IntoIterator<Item = BmcEvent>) {
        self.bmc_events.extend(events);
    }

    /// The platform meter's last tick, when there is one.
    pub fn last_platform(&self) -> Option<&PlatformTick> {
        self.last_platform.as_ref()
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    pub fn set_policy(&mut self, policy: Policy) {
        self.policy = policy;
    }

    /// The interval ending at `now` would last this long (what the meters read over).
    pub fn elapsed_us(&self, now: Stamp) -> u64 {
        now.mono_ns.saturating_sub(self.last.mono_ns) / 1_000
    }

    /// Closes the interval ending at `now` with the usage measured over it (`None` if the usage
    /// reader failed) and every meter's reading over it, and attributes it.
    pub fn close(
        &mut self,
        now: Stamp,
        usage: Option<Usage>,
        readings: impl IntoIterator<Item = Reading>,
    ) -> Interval {
        let start = self.last;
        // Monotonic time never goes back; if a caller passes an older stamp, the interval is empty.
        let end = Stamp {
            mono_ns: now.mono_ns.max(start.mono_ns),
            unix_ns: now.unix_ns,
        };
        self.last = end;
        let elapsed_ns = end.mono_ns - start.mono_ns;
        let elapsed_us = elapsed_ns / 1_000;
        let wall_ns = end.unix_ns.saturating_sub(start.unix_ns);
        let jump = wall_ns.saturating_sub(elapsed_ns.min(i64::MAX as u64) as i64);
        let wall_jump_ns = if jump.abs() >= WALL_JUMP_THRESHOLD_NS {
            jump
        } else {
            0
        };

        let readings = readings.into_iter();
        let mut uuids: BTreeMap<MeterKey, Arc<str>> = BTreeMap::new();
        let mut gaps = Vec::new();
        let mut meters = Vec::with_capacity(readings.size_hint().0);
        for Reading { reading: r, device } in readings {
            if let Some(id) = device {
                uuids.insert(r.key, id);
            }
            let measured = match &r.sample {
                // Every meter took its baseline where the first interval starts (`Meters::open`,
                // the GPUs' rebaseline); a `First` now means the meter re-baselined after a
                // failed read (or its start-up read failed): this interval's energy is unknown,
                // and says so.
                Ok(CounterSample::First) => {
                    gaps.push(GapRecord {
                        key: Some(r.key),
                        start,
                        end,
                        cause: GapCause::SourceFailure,
                        detail: format!("{} {}: new baseline after a failed read", r.source, r.key),
                    });
                    Measured::Gap
                }
                Ok(CounterSample::Energy { energy_uj, .. }) => Measured::Energy {
                    energy_uj: *energy_uj,
                },
                Ok(CounterSample::Quarantined { energy_uj, .. }) => Measured::Quarantined {
                    energy_uj: *energy_uj,
                },
                Ok(CounterSample::Reset { previous_raw, raw }) => {
                    gaps.push(GapRecord {
                        key: Some(r.key),
                        start,
                        end,
                        cause: GapCause::CounterReset,
                        detail: format!(
                            "{} {}: counter went from {previous_raw} to {raw}",
                            r.source, r.key
                        ),
                    });
                    Measured::Gap
                }
                Err(e) => {
                    gaps.push(GapRecord {
                        key: Some(r.key),
                        start,
                        end,
                        cause: GapCause::SourceFailure,
                        detail: e.to_string(),
                    });
                    Measured::Gap
                }
            };
            let energy = match measured {
                Measured::Energy { energy_uj } => Some(energy_uj),
                _ => None,
            };
            let idle = if r.source == SourceKind::Estimator {
                // The estimator's idle part is declared, so it is known exactly.
                IdleEstimate {
                    power_uw: self.estimator.idle_uw_per_package,
                    source: IdleSource::Config,
                }
            } else {
                self.idle
                    .estimate(r.key, end.mono_ns / 1_000, energy, elapsed_us)
            };
            meters.push(MeterInput {
                key: r.key,
                source: r.source,
                quality: r.quality,
                measured,
                idle,
            });
        }
        // The platform meter's components, before `meters` moves into the input.
        let components = self.platform.as_ref().map(|_| {
            let has_psys = meters.iter().any(|m| m.key.domain == Domain::Psys);
            let mut parts = meters
                .iter()
                .filter(|m| attribution::is_platform_component(m.key, has_psys));
            let estimated = parts.clone().any(|m| m.quality == Quality::Estimated);
            let energy = parts.try_fold(0u64, |c, m| match m.measured {
                Measured::Energy { energy_uj } => Some(c.saturating_add(energy_uj)),
                _ => None,
            });
            (energy, estimated)
        });
        let input = IntervalInput {
            elapsed_us,
            meters,
            usage,
            policy: self.policy,
        };
        let mut results = attribution::attribute(&input);
        if let (Some(p), Some((components, estimated))) = (&mut self.platform, components) {
            // A span can reach back into intervals of runs that have finished since and have
            // their summary: their weight goes to the host, so that no run is billed after its
            // summary (the runs of this interval include those that finished in it).
            let live: std::collections::HashSet<&str> = input
                .usage
                .as_ref()
                .map(|u| u.runs.iter().map(|r| &*r.run_id).collect())
                .unwrap_or_default();
            let t = p.tick(
                start.mono_ns,
                end.mono_ns,
                components,
                attribution::ComponentShares::of(&results),
                estimated,
                std::mem::take(&mut self.bmc_events),
                |id| live.contains(id),
            );
            let at = |mono_ns: u64| Stamp {
                mono_ns,
                unix_ns:
                    end.unix_ns.saturating_sub(
                        end.mono_ns.saturating_sub(mono_ns).min(i64::MAX as u64) as i64,
                    ),
            };
            for l in &t.lost {
                gaps.push(GapRecord {
                    key: Some(PLATFORM_KEY),
                    start: at(l.start_ns),
                    end: at(l.end_ns),
                    cause: if l.reset {
                        GapCause::CounterReset
                    } else {
                        GapCause::SourceFailure
                    },
                    detail: format!("{} {PLATFORM_KEY}: {}", t.source, l.detail),
                });
            }
            let input = MeterInput {
                key: PLATFORM_KEY,
                source: t.source,
                quality: t.quality,
                measured: t.measured,
                idle: IdleEstimate {
                    power_uw: 0,
                    source: IdleSource::Config,
                },
            };
            results.push(attribution::attribute_platform(
                self.policy.platform,
                &input,
                &t.shares,
            ));
            self.last_platform = Some(t);
        }
        for r in &mut results {
            if let (Some(meta), Some(uuid)) = (&mut r.gpu, uuids.remove(&r.key)) {
                meta.uuid = Some(uuid);
            }
        }
        let index = self.next_index;
        self.next_index += 1;
        Interval {
            index,
            start,
            end,
            wall_jump_ns,
            policy: self.policy,
            results,
            gaps,
        }
    }
}

#[cfg(test)]
mod tests {
    use wattd_collectors::powercap::{self, PowercapMeter};
    use wattd_collectors::synth::{HostTree, ZoneSpec};
    use wattd_collectors::HostRoot;

    use super::*;
    use crate::attribution::{DramPolicy, IdlePolicy, RunUsage};

    /// A sampler with the meters it closes intervals from, read at each tick as the daemon does.
    struct Rig {
        s: Sampler,
        m: Meters,
    }

    impl Rig {
        fn tick(&mut self, now: Stamp, usage: Option<Usage>) -> Interval {
            let mut readings = Vec::new();
            self.m.read(self.s.elapsed_us(now), &mut readings);
            self.s.close(now, usage, readings)
        }

        fn with_platform(mut self, max_gap_ns: u64, max_watts: u32) -> Self {
            self.s = self.s.with_platform(max_gap_ns, max_watts);
            self
        }
    }

    impl std::ops::Deref for Rig {
        type Target = Sampler;
        fn deref(&self) -> &Sampler {
            &self.s
        }
    }

    impl std::ops::DerefMut for Rig {
        fn deref_mut(&mut self) -> &mut Sampler {
            &mut self.s
        }
    }

    fn setup(energy: &str) -> (tempfile::TempDir, HostTree, Rig) {
        let dir = tempfile::tempdir().unwrap();
        let t = HostTree::new(dir.path());
        t.zone(&ZoneSpec::new("intel-rapl:0", "package-0", energy))
            .unwrap();
        let scan = powercap::scan(&HostRoot::new(dir.path())).unwrap();
        let meters: Vec<Box<dyn Meter>> = vec![Box::new(PowercapMeter::open(&scan).unwrap())];
        let policy = Policy {
            idle: IdlePolicy::Host,
            dram: DramPolicy::Cpu,
            platform: crate::attribution::PlatformPolicy::Proportional,
        };
        let m = Meters::open(meters);
        let s = Sampler::new(
            IdleTracker::new(60_000_000, BTreeMap::new()),
            EstimatorModel::default(),
            policy,
            7,
            Stamp {
                mono_ns: 1_000_000_000,
                unix_ns: 1_000_000_000,
            },
        );
        (dir, t, Rig { s, m })
    }

    fn usage() -> Usage {
        Usage {
            runs: vec![RunUsage {
                run_id: "r".into(),
                cpu_us: [(0, 500_000)].into_iter().collect(),
                ..RunUsage::default()
            }],
            busy_us: [(0, 1_000_000)].into_iter().collect(),
            package_cpus: [(0, 2)].into_iter().collect(),
            host_memory_bytes: None,
            gpus: BTreeMap::new(),
            cpu_busy_unknown: false,
        }
    }

    #[test]
    fn intervals_are_contiguous_and_late_ticks_make_longer_intervals() {
        let (_d, t, mut s) = setup("1000");
        t.write("sys/class/powercap/intel-rapl:0/energy_uj", "2001000\n")
            .unwrap();
        let a = s.tick(
            Stamp {
                mono_ns: 2_000_000_000,
                unix_ns: 2_000_000_000,
            },
            Some(usage()),
        );
        assert_eq!((a.index, a.elapsed_us()), (7, 1_000_000));
        assert_eq!(a.results[0].measured_uj, 2_000_000);
        assert_eq!(a.results[0].sum_uj(), 2_000_000);
        // A tick 2.5 s late: one 3.5 s interval starting where the last ended.
        t.write("sys/class/powercap/intel-rapl:0/energy_uj", "9001000\n")
            .unwrap();
        let b = s.tick(
            Stamp {
                mono_ns: 5_500_000_000,
                unix_ns: 5_500_000_000,
            },
            Some(usage()),
        );
        assert_eq!((b.index, b.start, b.elapsed_us()), (8, a.end, 3_500_000));
        assert_eq!(b.results[0].measured_uj, 7_000_000);
        assert_eq!(b.wall_jump_ns, 0);
    }

    /// The platform meter: a span that reaches back into an interval of a run that has finished
    /// since gives that run nothing (it has its summary); its weight goes to the host.
    #[test]
    fn platform_energy_never_reaches_a_run_after_it_finished() {
        use crate::platform::BmcEvent;
        use wattd_collectors::redfish::WallReading;
        let (_d, t, s) = setup("1000");
        let mut s = s.with_platform(10_000_000_000, 20_000);
        // Idle divided like active energy: run r has a share of the package in its interval.
        let policy = Policy {
            idle: IdlePolicy::Proportional,
            ..s.policy()
        };
        s.set_policy(policy);
        let at = |mono_ns: u64, kwh_uj: u64| BmcEvent::Reading {
            mono_ns,
            reading: WallReading {
                power_mw: None,
                energy_uj: Some(kwh_uj),
            },
        };
        let stamp = |s: u64| Stamp {
            mono_ns: s * 1_000_000_000,
            unix_ns: s as i64 * 1_000_000_000,
        };
        t.write("sys/class/powercap/intel-rapl:0/energy_uj", "2001000\n")
            .unwrap();
        s.bmc_events([at(1_500_000_000, 10_000_000)]);
        let i = s.tick(stamp(2), Some(usage()));
        let p = i.results.iter().find(|r| r.key == PLATFORM_KEY).unwrap();
        assert_eq!(p.measured_uj, 0, "the first reading is the baseline");
        let pkg = &i.results[0];
        assert!(pkg
            .shares()
            .any(|(id, sh)| &**id == "r" && sh.active_uj + sh.idle_uj > 0));
        // Run r is gone in the next interval; the span 1.5 s ..= 2.5 s is half in its interval.
        t.write("sys/class/powercap/intel-rapl:0/energy_uj", "4001000\n")
            .unwrap();
        s.bmc_events([at(2_500_000_000, 15_000_000)]);
        let mut gone = usage();
        gone.runs.clear();
        let i = s.tick(stamp(3), Some(gone));
        let p = i.results.iter().find(|r| r.key == PLATFORM_KEY).unwrap();
        // Wall 5 J, components 2 J over the span: 3 J, all the host's.
        assert_eq!(p.measured_uj, 3_000_000);
        assert!(p.runs.is_empty(), "{:?}", p.runs);
        assert_eq!(p.host_active_uj, 3_000_000);
        assert_eq!(p.sum_uj(), 3_000_000);
    }

    #[test]
    fn wall_clock_jump_is_recorded_not_used() {
        let (_d, _t, mut s) = setup("1000");
        // Wall clock stepped back an hour; monotonic advanced 1 s.
        let i = s.tick(
            Stamp {
                mono_ns: 2_000_000_000,
                unix_ns: 1_000_000_000 - 3_600_000_000_000,
            },
            Some(usage()),
        );
        assert_eq!(i.elapsed_us(), 1_000_000);
        assert_eq!(i.wall_jump_ns, -3_601_000_000_000);
        // The record carries it, and a CLOCK_JUMP gap says so; an interval without a step
        // has none.
        let rec = crate::records::interval(&i, "boot", false);
        assert_eq!(rec.wall_clock_jump_ns, -3_601_000_000_000);
        let jump = wattd_proto::v1::GapCause::ClockJump as i32;
        let gaps: Vec<_> = rec.gaps.iter().filter(|g| g.cause == jump).collect();
        assert_eq!(gaps.len(), 1, "{:?}", rec.gaps);
        assert!(
            gaps[0].detail.contains("-3601000000000 ns"),
            "{}",
            gaps[0].detail
        );
        let next = s.tick(
            Stamp {
                mono_ns: 3_000_000_000,
                unix_ns: 2_000_000_000 - 3_600_000_000_000,
            },
            Some(usage()),
        );
        assert_eq!(next.wall_jump_ns, 0);
        let rec = crate::records::interval(&next, "boot", false);
        assert!(rec.gaps.iter().all(|g| g.cause != jump), "{:?}", rec.gaps);
    }

    #[test]
    fn reset_and_read_failure_become_gaps() {
        // From 200 kJ to 5 uJ in 1 s: as a wrap of the 262 kJ range that would be 62 kJ, far
        // above the 3 kW ceiling, so it is a reset.
        let (_d, t, mut s) = setup("200000000000");
        t.write("sys/class/powercap/intel-rapl:0/energy_uj", "5\n")
            .unwrap();
        let i = s.tick(
            Stamp {
                mono_ns: 2_000_000_000,
                unix_ns: 2_000_000_000,
            },
            Some(usage()),
        );
        assert!(i.results[0].gap);
        assert_eq!(i.gaps.len(), 1);
        assert_eq!(i.gaps[0].cause, GapCause::CounterReset);
        t.write("sys/class/powercap/intel-rapl:0/energy_uj", "garbage\n")
            .unwrap();
        let i = s.tick(
            Stamp {
                mono_ns: 3_000_000_000,
                unix_ns: 3_000_000_000,
            },
            Some(usage()),
        );
        assert_eq!(i.gaps[0].cause, GapCause::SourceFailure);
        assert!(
            i.gaps[0].detail.contains("energy_uj"),
            "{}",
            i.gaps[0].detail
        );
        // Regression: after a failed read the next good reading is a new baseline recorded as a
        // gap, not the failed interval's energy folded into this one.
        t.write(
            "sys/class/powercap/intel-rapl:0/energy_uj",
            "250000000000\n",
        )
        .unwrap();
        let i = s.tick(
            Stamp {
                mono_ns: 4_000_000_000,
                unix_ns: 4_000_000_000,
            },
            Some(usage()),
        );
        assert!(i.results[0].gap && i.results[0].measured_uj == 0);
        assert_eq!(i.gaps[0].cause, GapCause::SourceFailure);
        t.write(
            "sys/class/powercap/intel-rapl:0/energy_uj",
            "250000500000\n",
        )
        .unwrap();
        let i = s.tick(
            Stamp {
                mono_ns: 5_000_000_000,
                unix_ns: 5_000_000_000,
            },
            Some(usage()),
        );
        assert_eq!(i.results[0].measured_uj, 500_000);
        assert!(i.gaps.is_empty());
    }
}
