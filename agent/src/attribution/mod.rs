//! The attribution engine: a pure function (no IO, no clock) from one interval's measured energy
//! and usage to each run's share, the host's share, and what could not be attributed, with
//! reasons. Energy is conserved exactly, per meter: the outputs sum to the measured delta to the
//! microjoule. Integer microjoules throughout; remainders of integer division go by largest
//! remainder, ties broken by run id so the result does not depend on the order runs are listed.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;

pub mod idle;
pub mod totals;
use wattd_collectors::{Domain, MeterKey, Quality, SourceKind};

/// The version of the rules below. Bump it whenever a formula changes; every interval names it.
pub const POLICY_VERSION: u32 = 1;

/// What happens to idle energy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdlePolicy {
    /// Idle energy is divided like active energy, by usage share (runs and host).
    Proportional,
    /// Idle energy is divided by each run's reserved CPUs (`cpu.max` or cpuset); the unreserved
    /// rest is host overhead.
    Reserved,
    /// Idle energy is kept as host overhead, billed to nobody.
    Host,
}

impl IdlePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            IdlePolicy::Proportional => "proportional",
            IdlePolicy::Reserved => "reserved",
            IdlePolicy::Host => "host",
        }
    }
}

/// How DRAM energy is divided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DramPolicy {
    /// By CPU usage share, like the package (the default: memory traffic follows CPU work).
    Cpu,
    /// By resident memory share (`memory.current`).
    Memory,
}

/// The policy an interval was attributed under.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Policy {
    pub idle: IdlePolicy,
    pub dram: DramPolicy,
}

/// Where an idle-power figure came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IdleSource {
    Config,
    Calibration,
    /// The lowest power seen over a sliding window.
    Window,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct IdleEstimate {
    pub power_uw: u64,
    pub source: IdleSource,
}

/// Why some energy is attributed to nobody.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UnattributedReason {
    /// The usage reader failed this interval: nobody can be billed fairly.
    NoUsageData,
    /// The delta exceeded the domain's physical ceiling and was quarantined.
    Quarantined,
    /// The meter's package has no online CPU, so there is no usage to divide by.
    NoCpuInPackage,
}

/// What a meter measured this interval.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Measured {
    Energy {
        energy_uj: u64,
    },
    Quarantined {
        energy_uj: u64,
    },
    /// The energy is unknown (counter reset, read failure): the sampler records a gap.
    Gap,
}

/// One billed meter's input.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MeterInput {
    pub key: MeterKey,
    pub source: SourceKind,
    pub quality: Quality,
    pub measured: Measured,
    pub idle: IdleEstimate,
}

/// One run's usage in the interval.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RunUsage {
    /// Shared, so copying it into every meter's result costs no allocation.
    pub run_id: Arc<str>,
    /// CPU time per package, microseconds.
    pub cpu_us: BTreeMap<u32, u64>,
    pub memory_bytes: Option<u64>,
    /// Reserved CPUs in thousandths, per package: from the cpuset's CPUs on each package, or a
    /// `cpu.max` quota spread over packages by their size. Empty when nothing is reserved.
    pub reserved_millicpus: BTreeMap<u32, u64>,
}

/// Everything measured about usage in the interval.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub runs: Vec<RunUsage>,
    /// Per package: all busy CPU time measured on it (runs + host), microseconds.
    pub busy_us: BTreeMap<u32, u64>,
    /// Per package: number of online CPUs (capacity for the `reserved` policy).
    pub package_cpus: BTreeMap<u32, u32>,
    /// Memory in use on the host (for the DRAM memory policy); `None` if unknown.
    pub host_memory_bytes: Option<u64>,
}

/// One interval's input.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IntervalInput {
    pub elapsed_us: u64,
    pub meters: Vec<MeterInput>,
    /// `None` when the usage reader failed this interval.
    pub usage: Option<Usage>,
    pub policy: Policy,
}

/// One run's share of one meter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RunShare {
    pub run_id: Arc<str>,
    pub active_uj: u64,
    pub idle_uj: u64,
    /// The usage the share was computed from (CPU us, or memory bytes under the memory policy).
    pub usage: u64,
}

/// One meter's attribution.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MeterResult {
    pub key: MeterKey,
    pub source: SourceKind,
    pub quality: Quality,
    /// The measured delta; 0 for a gap.
    pub measured_uj: u64,
    pub gap: bool,
    pub idle: IdleEstimate,
    /// Energy below the idle power line this interval.
    pub idle_uj: u64,
    /// Every run that used this meter's packages or received energy from it; a run with no
    /// usage and no share is omitted.
    pub runs: Vec<RunShare>,
    pub host_active_uj: u64,
    pub host_idle_uj: u64,
    /// The host bucket's usage the shares were computed from (busy time not in any run, or
    /// memory not in any run under the memory policy).
    pub host_usage: u64,
    pub unattributed: Vec<(UnattributedReason, u64)>,
}

impl MeterResult {
    /// Everything this result hands out; equals `measured_uj` by construction.
    pub fn sum_uj(&self) -> u128 {
        self.runs
            .iter()
            .map(|r| r.active_uj as u128 + r.idle_uj as u128)
            .sum::<u128>()
            + self.host_active_uj as u128
            + self.host_idle_uj as u128
            + self
                .unattributed
                .iter()
                .map(|(_, e)| *e as u128)
                .sum::<u128>()
    }
}

/// Which of two equal remainders gets the spare microjoule first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ties {
    /// The smaller key first (active energy).
    SmallestKey,
    /// The larger key first (idle energy). Opposite orders for the two parts keep runs with equal
    /// usage within 1 uJ of each other in total, not 2.
    LargestKey,
}

/// Splits `total` in proportion to `weights`, exactly: each share is the floor of its quota and
/// the remainder goes one unit at a time to the largest fractional parts, equal ones in `ties`
/// order of their keys. A zero weight never receives anything. Returns zeros when every weight is
/// zero (the caller decides where `total` goes).
pub fn apportion<K: Ord>(total: u64, weights: &[(K, u64)], ties: Ties) -> Vec<u64> {
    let sum: u128 = weights.iter().map(|(_, w)| *w as u128).sum();
    if sum == 0 {
        return vec![0; weights.len()];
    }
    let n = weights.len();
    let mut shares = Vec::with_capacity(n);
    // (remainder, index); remainders are < sum.
    let mut rems: Vec<(u128, usize)> = Vec::with_capacity(n);
    let mut given: u128 = 0;
    let max_w = weights.iter().map(|(_, w)| *w).max().unwrap_or(0);
    if sum <= u64::MAX as u128 && total.checked_mul(max_w).is_some() {
        // The common case: every product fits in 64 bits, and 64-bit division is several times
        // cheaper than 128-bit.
        let sum64 = sum as u64;
        let mut rems64: Vec<(u64, usize)> = Vec::with_capacity(n);
        let mut given64: u64 = 0;
        for (i, (_, w)) in weights.iter().enumerate() {
            let q = total * *w;
            let share = q / sum64;
            given64 += share;
            shares.push(share);
            rems64.push((q - share * sum64, i));
        }
        let left = (total - given64) as usize;
        distribute(&mut shares, &mut rems64, left, weights, ties);
        return shares;
    }
    for (i, (_, w)) in weights.iter().enumerate() {
        let q = total as u128 * *w as u128;
        let share = q / sum;
        given += share;
        shares.push(share as u64);
        rems.push((q % sum, i));
    }
    let left = (total as u128 - given) as usize;
    distribute(&mut shares, &mut rems, left, weights, ties);
    shares
}

/// Gives one more unit to each of the `left` largest remainders (equal ones in `ties` order of
/// their keys). `left` is always smaller than the number of non-zero remainders, so a zero
/// weight (remainder 0) never receives one.
fn distribute<R: Ord + Copy, K: Ord>(
    shares: &mut [u64],
    rems: &mut [(R, usize)],
    left: usize,
    weights: &[(K, u64)],
    ties: Ties,
) {
    if left == 0 {
        return;
    }
    // The `left`-th largest remainder is the threshold: everything above it gets one more, and
    // of those equal to it, as many as are still owed, chosen by key in `ties` order (so list
    // order does not matter). Selecting on bare remainders keeps this linear and cheap.
    let mut values: Vec<R> = rems.iter().map(|(r, _)| *r).collect();
    let (_, threshold, _) = values.select_nth_unstable_by(left - 1, |a, b| b.cmp(a));
    let threshold = *threshold;
    let mut given = 0usize;
    let mut at_threshold: Vec<usize> = Vec::new();
    for &(r, i) in rems.iter() {
        if r > threshold {
            shares[i] += 1;
            given += 1;
        } else if r == threshold {
            at_threshold.push(i);
        }
    }
    let owed = left - given;
    at_threshold.sort_unstable_by(|a, b| {
        let by_key = weights[*a].0.cmp(&weights[*b].0);
        match ties {
            Ties::SmallestKey => by_key,
            Ties::LargestKey => by_key.reverse(),
        }
    });
    for &i in at_threshold.iter().take(owed) {
        shares[i] += 1;
    }
}

/// A bucket for apportioning: a run, or the host. The host sorts after every run id.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Bucket<'a> {
    Run(&'a str),
    Host,
}

/// Attributes one interval. Pure: the same input gives the same output, bit for bit.
pub fn attribute(input: &IntervalInput) -> Vec<MeterResult> {
    input
        .meters
        .iter()
        .map(|m| attribute_meter(input, m))
        .collect()
}

fn attribute_meter(input: &IntervalInput, m: &MeterInput) -> MeterResult {
    let mut r = MeterResult {
        key: m.key,
        source: m.source,
        quality: m.quality,
        measured_uj: 0,
        gap: false,
        idle: m.idle,
        idle_uj: 0,
        runs: Vec::new(),
        host_active_uj: 0,
        host_idle_uj: 0,
        host_usage: 0,
        unattributed: Vec::new(),
    };
    let energy = match m.measured {
        Measured::Gap => {
            r.gap = true;
            return r;
        }
        Measured::Quarantined { energy_uj } => {
            r.measured_uj = energy_uj;
            r.unattributed
                .push((UnattributedReason::Quarantined, energy_uj));
            return r;
        }
        Measured::Energy { energy_uj } => energy_uj,
    };
    r.measured_uj = energy;
    let Some(usage) = &input.usage else {
        r.unattributed
            .push((UnattributedReason::NoUsageData, energy));
        return r;
    };
    // The packages whose usage this meter's energy follows: its own, or all (psys).
    let packages: Vec<u32> = match m.key.package {
        Some(p) => {
            if !usage.package_cpus.contains_key(&p) && !usage.busy_us.contains_key(&p) {
                r.unattributed
                    .push((UnattributedReason::NoCpuInPackage, energy));
                return r;
            }
            vec![p]
        }
        None => usage.busy_us.keys().copied().collect(),
    };

    let idle_cap = (m.idle.power_uw as u128 * input.elapsed_us as u128 / 1_000_000) as u64;
    let idle = idle_cap.min(energy);
    let active = energy - idle;
    r.idle_uj = idle;

    // Usage weights: per run and the host, over this meter's packages.
    let by_memory = m.key.domain == Domain::Dram && input.policy.dram == DramPolicy::Memory;
    let mut weights: Vec<(Bucket<'_>, u64)> = Vec::with_capacity(usage.runs.len() + 1);
    if by_memory {
        let mut runs_total: u64 = 0;
        for run in &usage.runs {
            let w = run.memory_bytes.unwrap_or(0);
            runs_total = runs_total.saturating_add(w);
            weights.push((Bucket::Run(&run.run_id), w));
        }
        let host = usage
            .host_memory_bytes
            .map_or(0, |h| h.saturating_sub(runs_total));
        weights.push((Bucket::Host, host));
    } else {
        let mut runs_total: u64 = 0;
        for run in &usage.runs {
            let w: u64 = packages
                .iter()
                .map(|p| run.cpu_us.get(p).copied().unwrap_or(0))
                .sum();
            runs_total = runs_total.saturating_add(w);
            weights.push((Bucket::Run(&run.run_id), w));
        }
        let busy: u64 = packages
            .iter()
            .map(|p| usage.busy_us.get(p).copied().unwrap_or(0))
            .sum();
        // Runs can exceed /proc/stat's tick-granular busy time by a tick; the host is never negative.
        weights.push((Bucket::Host, busy.saturating_sub(runs_total)));
    }
    let nruns = usage.runs.len();
    r.host_usage = weights[nruns].1;

    let active_shares = apportion(active, &weights, Ties::SmallestKey);
    if weights.iter().all(|(_, w)| *w == 0) {
        r.host_active_uj = active; // nothing ran: the energy above idle is the host's
    } else {
        r.host_active_uj = active_shares[nruns];
    }

    let idle_shares: Vec<u64> = match input.policy.idle {
        IdlePolicy::Host => {
            r.host_idle_uj = idle;
            vec![0; nruns]
        }
        IdlePolicy::Proportional => {
            let s = apportion(idle, &weights, Ties::LargestKey);
            if weights.iter().all(|(_, w)| *w == 0) {
                r.host_idle_uj = idle;
                vec![0; nruns]
            } else {
                r.host_idle_uj = s[nruns];
                s[..nruns].to_vec()
            }
        }
        IdlePolicy::Reserved => {
            let capacity: u64 = packages
                .iter()
                .map(|p| usage.package_cpus.get(p).copied().unwrap_or(0) as u64 * 1000)
                .sum();
            let mut rw: Vec<(Bucket<'_>, u64)> = usage
                .runs
                .iter()
                .map(|run| {
                    let w = packages
                        .iter()
                        .map(|p| run.reserved_millicpus.get(p).copied().unwrap_or(0))
                        .sum();
                    (Bucket::Run(&run.run_id), w)
                })
                .collect();
            let reserved: u64 = rw.iter().map(|(_, w)| *w).sum();
            rw.push((Bucket::Host, capacity.saturating_sub(reserved)));
            let s = apportion(idle, &rw, Ties::LargestKey);
            if rw.iter().all(|(_, w)| *w == 0) {
                r.host_idle_uj = idle;
                vec![0; nruns]
            } else {
                r.host_idle_uj = s[nruns];
                s[..nruns].to_vec()
            }
        }
    };

    // Runs that got nothing and used nothing are left out: a host with many idle runs would
    // otherwise write a zero line per run per meter per interval.
    let none_used = weights.iter().all(|(_, w)| *w == 0);
    r.runs = Vec::with_capacity(nruns);
    r.runs
        .extend(usage.runs.iter().enumerate().filter_map(|(i, run)| {
            let active_uj = if none_used { 0 } else { active_shares[i] };
            let share = RunShare {
                run_id: run.run_id.clone(),
                active_uj,
                idle_uj: idle_shares[i],
                usage: weights[i].1,
            };
            (share.active_uj != 0 || share.idle_uj != 0 || share.usage != 0).then_some(share)
        }));
    r
}

#[cfg(test)]
mod tests;
