//! Conversion of the sampler's attributed intervals, gaps and run totals into the wire records
//! of `wattd.ledger.v1`. The only place that knows both vocabularies.

use wattd_collectors::{Domain, Quality};
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
            .runs
            .iter()
            .map(|s| v1::Allocation {
                run_id: s.run_id.to_string(),
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
        domains: i.results.iter().map(domain_energy).collect(),
        gaps: i.gaps.iter().map(gap).collect(),
        coarsened,
        boot_id: boot_id.to_owned(),
    }
}

/// A finished run's totals.
pub fn run_summary(t: &RunTotal, started_unix_ns: i64, finished_unix_ns: i64) -> v1::RunSummary {
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
    }
}

/// Parses a domain name from a record.
pub fn parse_domain(s: &str) -> Option<Domain> {
    Domain::ALL.into_iter().find(|d| d.as_str() == s)
}
