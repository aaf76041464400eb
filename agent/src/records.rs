//! Conversion of the sampler's attributed intervals, gaps and run totals into the wire records
//! of `wattd.ledger.v1`. The only place that knows both vocabularies.

use wattd_collectors::Quality;
use wattd_proto::v1;

use crate::attribution::totals::RunTotal;
use crate::attribution::{IdleSource, MeterResult, UnattributedReason};
use crate::sampler::{GapCause, GapRecord, Interval};

fn quality(q: Quality) -> i32 {
    match q {
        Quality::Measured => v1::Quality::Measured as i32,
        Quality::Estimated => v1::Quality::Estimated as i32,
    }
}

fn idle_source(s: IdleSource) -> &'static str {
    match s {
        IdleSource::Config => "config",
        IdleSource::Calibration => "calibration",
        IdleSource::Window => "window",
    }
}

fn reason(r: UnattributedReason) -> i32 {
    match r {
        UnattributedReason::NoUsageData => v1::UnattributedReason::NoUsageData as i32,
        UnattributedReason::Quarantined => v1::UnattributedReason::Quarantined as i32,
        UnattributedReason::NoCpuInPackage => v1::UnattributedReason::NoCpuInPackage as i32,
    }
}

/// One meter's attribution as a `DomainEnergy`.
pub fn domain_energy(m: &MeterResult) -> v1::DomainEnergy {
    v1::DomainEnergy {
        domain: m.key.domain.as_str().to_owned(),
        package: m.key.package,
        die: m.key.die,
        source: m.source.as_str().to_owned(),
        quality: quality(m.quality),
        measured_uj: m.measured_uj,
        idle_source: idle_source(m.idle.source).to_owned(),
        idle_power_uw: m.idle.power_uw,
        allocations: m
            .shares()
            .map(|(id, s)| v1::Allocation {
                run_id: id.to_string(),
                active_uj: s.active_uj,
                idle_uj: s.idle_uj,
                usage_us: s.usage,
            })
            .collect(),
        host_active_uj: m.host_active_uj,
        host_idle_uj: m.host_idle_uj,
        unattributed: m
            .unattributed
            .iter()
            .map(|(r, e)| v1::Unattributed {
                reason: reason(*r),
                energy_uj: *e,
            })
            .collect(),
        gap: m.gap,
        host_usage: m.host_usage,
        usage_basis: m
            .gpu
            .as_ref()
            .and_then(|g| g.basis)
            .map(|b| b.as_str().to_owned())
            .unwrap_or_default(),
        mig: m.gpu.as_ref().and_then(|g| g.mig).unwrap_or(false),
        device_uuid: m
            .gpu
            .as_ref()
            .and_then(|g| g.uuid.as_deref())
            .unwrap_or_default()
            .to_owned(),
    }
}

pub fn gap(g: &GapRecord) -> v1::Gap {
    v1::Gap {
        domain: g
            .key
            .map(|k| k.domain.as_str().to_owned())
            .unwrap_or_default(),
        package: g.key.and_then(|k| k.package),
        start_monotonic_ns: g.start.mono_ns,
        end_monotonic_ns: g.end.mono_ns,
        start_unix_ns: g.start.unix_ns,
        end_unix_ns: g.end.unix_ns,
        cause: match g.cause {
            GapCause::CounterReset => v1::GapCause::CounterReset as i32,
            GapCause::SourceFailure => v1::GapCause::SourceFailure as i32,
            GapCause::AgentDown => v1::GapCause::AgentDown as i32,
        },
        detail: g.detail.clone(),
    }
}

/// The CLOCK_JUMP gap of an interval in which the wall clock stepped: no energy is missing
/// (durations come from CLOCK_MONOTONIC), but its wall-clock labels are not continuous with
/// the previous interval's, and a reader billing by wall-clock time must know.
fn clock_jump(i: &Interval) -> v1::Gap {
    v1::Gap {
        domain: String::new(),
        package: None,
        start_monotonic_ns: i.start.mono_ns,
        end_monotonic_ns: i.end.mono_ns,
        start_unix_ns: i.start.unix_ns,
        end_unix_ns: i.end.unix_ns,
        cause: v1::GapCause::ClockJump as i32,
        detail: format!(
            "the wall clock stepped by {} ns against CLOCK_MONOTONIC during this interval; its \
             energy is complete, its unix times are not continuous with the previous interval",
            i.wall_jump_ns
        ),
    }
}

/// An attributed interval as the record that is sealed.
pub fn interval(i: &Interval, boot_id: &str, coarsened: bool) -> v1::Interval {
    v1::Interval {
        index: i.index,
        start_monotonic_ns: i.start.mono_ns,
        end_monotonic_ns: i.end.mono_ns,
        start_unix_ns: i.start.unix_ns,
        end_unix_ns: i.end.unix_ns,
        wall_clock_jump_ns: i.wall_jump_ns,
        policy: i.policy.idle.as_str().to_owned(),
        policy_version: crate::attribution::POLICY_VERSION,
        dram_policy: match i.policy.dram {
            crate::attribution::DramPolicy::Cpu => "cpu".to_owned(),
            crate::attribution::DramPolicy::Memory => "memory".to_owned(),
        },
        domains: i
            .results
            .iter()
            .map(|m| {
                let mut d = domain_energy(m);
                // What the platform meter was divided by, under the interval's policy.
                if m.key.domain == wattd_collectors::Domain::Platform && !m.gap {
                    d.usage_basis = i.policy.platform.usage_basis().to_owned();
                }
                d
            })
            .collect(),
        gaps: i
            .gaps
            .iter()
            .map(gap)
            .chain((i.wall_jump_ns != 0).then(|| clock_jump(i)))
            .collect(),
        coarsened,
        boot_id: boot_id.to_owned(),
        run_labels: Vec::new(),
    }
}

/// A run's labels as records carry them (sorted by key: a BTreeMap's order).
pub fn labels(labels: &std::collections::BTreeMap<String, String>) -> Vec<v1::Label> {
    labels
        .iter()
        .map(|(k, v)| v1::Label {
            key: k.clone(),
            value: v.clone(),
        })
        .collect()
}

/// How a finished run's last usage was obtained, and how much of its usage came from its
/// parent (see `wattd_collectors::cgroup::family`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FinalUsageRecord {
    pub how: Option<wattd_collectors::cgroup::FinalUsage>,
    pub reconciled_usage_us: u64,
}

/// A finished run's totals.
pub fn run_summary(
    t: &RunTotal,
    started_unix_ns: i64,
    finished_unix_ns: i64,
    final_usage: FinalUsageRecord,
    run_labels: &std::collections::BTreeMap<String, String>,
) -> v1::RunSummary {
    v1::RunSummary {
        run_id: t.run_id.clone(),
        totals: t
            .energy_uj
            .iter()
            .map(|(d, e)| v1::DomainTotal {
                domain: d.as_str().to_owned(),
                package: None,
                energy_uj: *e,
            })
            .collect(),
        first_interval_index: t.first_interval,
        last_interval_index: t.last_interval,
        estimated: t.estimated,
        started_unix_ns,
        finished_unix_ns,
        final_usage: final_usage
            .how
            .map(|h| h.as_str().to_owned())
            .unwrap_or_default(),
        reconciled_usage_us: final_usage.reconciled_usage_us,
        labels: labels(run_labels),
    }
}

/// Merges `next` (the interval right after `into`) into `into`: the span grows, every domain's
/// figures add up (allocations by run, unattributed by reason), gaps are kept, and the result is
/// marked `coarsened`. Conservation holds for the sum because it holds for each part.
pub fn merge_interval(into: &mut v1::Interval, next: v1::Interval) {
    // The merged interval carries the last index it covers, so the indices after it (and an
    // agent restarted after it) never reuse one of the merged ones.
    into.index = next.index.max(into.index);
    into.end_monotonic_ns = next.end_monotonic_ns.max(into.end_monotonic_ns);
    into.end_unix_ns = next.end_unix_ns;
    into.wall_clock_jump_ns = into
        .wall_clock_jump_ns
        .saturating_add(next.wall_clock_jump_ns);
    into.coarsened = true;
    into.run_labels.extend(next.run_labels);
    // A meter that keeps failing while the spool is full would add a gap per interval: a gap
    // that continues the previous one of the same meter and cause extends it instead, so the
    // pending batch stays bounded.
    for g in next.gaps {
        let continues = into.gaps.iter_mut().rev().find(|p| {
            p.domain == g.domain
                && p.package == g.package
                && p.cause == g.cause
                && p.end_monotonic_ns == g.start_monotonic_ns
        });
        match continues {
            Some(p) => {
                p.end_monotonic_ns = g.end_monotonic_ns;
                p.end_unix_ns = g.end_unix_ns;
            }
            None => into.gaps.push(g),
        }
    }
    for d in next.domains {
        let same = |e: &&mut v1::DomainEnergy| {
            e.domain == d.domain && e.package == d.package && e.die == d.die && e.source == d.source
        };
        let Some(e) = into.domains.iter_mut().find(|e| same(e)) else {
            into.domains.push(d);
            continue;
        };
        e.measured_uj = e.measured_uj.saturating_add(d.measured_uj);
        e.host_active_uj = e.host_active_uj.saturating_add(d.host_active_uj);
        e.host_idle_uj = e.host_idle_uj.saturating_add(d.host_idle_uj);
        e.host_usage = e.host_usage.saturating_add(d.host_usage);
        e.gap |= d.gap;
        // The idle figure of a coarsened interval is the latest one; the split already used it.
        e.idle_power_uw = d.idle_power_uw;
        e.idle_source = d.idle_source;
        // A GPU's usage basis can change between merged intervals (MIG switched, samples lost):
        // then the merged record says "mixed" rather than naming one.
        if !d.usage_basis.is_empty() && e.usage_basis != d.usage_basis {
            e.usage_basis = if e.usage_basis.is_empty() {
                d.usage_basis
            } else {
                "mixed".to_owned()
            };
        }
        e.mig |= d.mig;
        if e.device_uuid.is_empty() {
            e.device_uuid = d.device_uuid;
        }
        // By run id through an index: a coarsened interval of 10,000 runs merges the next one
        // in linear time (a scan per allocation was quadratic, seconds per tick).
        let mut at: std::collections::HashMap<String, usize> = e
            .allocations
            .iter()
            .enumerate()
            .map(|(i, x)| (x.run_id.clone(), i))
            .collect();
        for a in d.allocations {
            match at.get(&a.run_id) {
                Some(&i) => {
                    let x = &mut e.allocations[i];
                    x.active_uj = x.active_uj.saturating_add(a.active_uj);
                    x.idle_uj = x.idle_uj.saturating_add(a.idle_uj);
                    x.usage_us = x.usage_us.saturating_add(a.usage_us);
                }
                None => {
                    at.insert(a.run_id.clone(), e.allocations.len());
                    e.allocations.push(a);
                }
            }
        }
        for u in d.unattributed {
            match e.unattributed.iter_mut().find(|x| x.reason == u.reason) {
                Some(x) => x.energy_uj = x.energy_uj.saturating_add(u.energy_uj),
                None => e.unattributed.push(u),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn de(domain: &str, measured: u64, allocs: &[(&str, u64, u64)], host: u64) -> v1::DomainEnergy {
        v1::DomainEnergy {
            domain: domain.into(),
            package: Some(0),
            source: "powercap".into(),
            measured_uj: measured,
            allocations: allocs
                .iter()
                .map(|(r, a, i)| v1::Allocation {
                    run_id: (*r).into(),
                    active_uj: *a,
                    idle_uj: *i,
                    usage_us: 1,
                })
                .collect(),
            host_active_uj: host,
            ..Default::default()
        }
    }

    fn conserved(d: &v1::DomainEnergy) -> bool {
        let sum: u128 = d
            .allocations
            .iter()
            .map(|a| a.active_uj as u128 + a.idle_uj as u128)
            .sum::<u128>()
            + d.host_active_uj as u128
            + d.host_idle_uj as u128
            + d.unattributed
                .iter()
                .map(|u| u.energy_uj as u128)
                .sum::<u128>();
        sum == d.measured_uj as u128
    }

    #[test]
    fn merged_intervals_keep_every_microjoule() {
        let mut a = v1::Interval {
            index: 5,
            end_monotonic_ns: 10,
            domains: vec![de("package", 100, &[("x", 60, 10)], 30)],
            ..Default::default()
        };
        let b = v1::Interval {
            index: 6,
            end_monotonic_ns: 20,
            domains: vec![
                de("package", 50, &[("x", 10, 5), ("y", 20, 0)], 15),
                de("dram", 7, &[("y", 7, 0)], 0),
            ],
            gaps: vec![v1::Gap {
                detail: "reset".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        merge_interval(&mut a, b);
        assert!(a.coarsened);
        assert_eq!((a.index, a.end_monotonic_ns, a.gaps.len()), (6, 20, 1));
        // A gap that continues the last one extends it.
        let c = v1::Interval {
            index: 7,
            end_monotonic_ns: 30,
            gaps: vec![v1::Gap {
                detail: "reset".into(),
                start_monotonic_ns: 0,
                end_monotonic_ns: 30,
                ..Default::default()
            }],
            ..Default::default()
        };
        merge_interval(&mut a, c);
        assert_eq!(
            (a.index, a.gaps.len(), a.gaps[0].end_monotonic_ns),
            (7, 1, 30)
        );
        assert_eq!(a.domains.len(), 2);
        let p = &a.domains[0];
        assert_eq!(p.measured_uj, 150);
        assert_eq!(
            p.allocations
                .iter()
                .find(|x| x.run_id == "x")
                .map(|x| (x.active_uj, x.idle_uj)),
            Some((70, 15))
        );
        assert!(a.domains.iter().all(conserved));
    }
}
