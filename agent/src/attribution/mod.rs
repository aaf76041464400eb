//! The attribution engine: a pure function (no IO, no clock) from one interval's measured energy
//! and usage to each run's share, the host's share, and what could not be attributed, with
//! reasons. Energy is conserved exactly, per meter: the outputs sum to the measured delta to the
//! microjoule. Integer microjoules throughout; remainders of integer division go by largest
//! remainder, ties broken by run id so the result does not depend on the order runs are listed.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;

pub mod gpu;
pub mod host;
pub mod idle;
pub mod section;
pub mod totals;
use wattd_collectors::{Domain, MeterKey, PackageShares, Quality, SourceKind};

pub use gpu::{GpuBasis, GpuMeta, GpuRunUsage, GpuUsage};

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

/// How the platform meter's energy (the wall less the components) is divided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlatformPolicy {
    /// In proportion to each run's share of the component meters' energy in the interval (what
    /// each run was given of package, DRAM or psys, and the GPUs; the host's share and the
    /// unattributed energy weigh for the host).
    Proportional,
    /// All of it to the host: overhead billed to nobody.
    Host,
}

impl PlatformPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            PlatformPolicy::Proportional => "proportional",
            PlatformPolicy::Host => "host",
        }
    }

    /// The records' `usage_basis` of a platform meter under this policy.
    pub fn usage_basis(self) -> &'static str {
        match self {
            PlatformPolicy::Proportional => "component_energy",
            PlatformPolicy::Host => "host",
        }
    }
}

/// The policy an interval was attributed under.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Policy {
    pub idle: IdlePolicy,
    pub dram: DramPolicy,
    pub platform: PlatformPolicy,
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
    pub cpu_us: PackageShares,
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
    /// Per GPU index: who used it and how that was measured. A GPU meter without an entry has
    /// no usage data this interval.
    pub gpus: BTreeMap<u32, GpuUsage>,
    /// The host's busy CPU time could not be read this interval: the CPU meters' energy is
    /// unattributed (`NO_USAGE_DATA`: without it the runs would take the host's share), while
    /// GPU meters are still divided by their own usage.
    pub cpu_busy_unknown: bool,
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

/// The run ids a meter's shares point into (shared by every CPU meter of an interval: the
/// shares name a run by index, so dividing among 10,000 runs copies no id and touches no
/// reference count per share).
pub type RunIds = Arc<[Arc<str>]>;

/// One run's share of one meter. Its id is `MeterResult::run_id(share)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RunShare {
    /// Index into the meter's `run_ids`.
    pub run: u32,
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
    /// The ids `runs` index into.
    pub run_ids: RunIds,
    /// Every run that used this meter's packages or received energy from it; a run with no
    /// usage and no share is omitted.
    pub runs: Vec<RunShare>,
    pub host_active_uj: u64,
    pub host_idle_uj: u64,
    /// The host bucket's usage the shares were computed from (busy time not in any run, or
    /// memory not in any run under the memory policy).
    pub host_usage: u64,
    pub unattributed: Vec<(UnattributedReason, u64)>,
    /// For a GPU meter: its UUID (set by the sampler), how usage was measured and whether MIG
    /// was on. `None` for CPU meters.
    pub gpu: Option<GpuMeta>,
}

impl MeterResult {
    /// The id of the run a share belongs to.
    pub fn run_id(&self, share: &RunShare) -> &Arc<str> {
        &self.run_ids[share.run as usize]
    }

    /// Each share with its run's id.
    pub fn shares(&self) -> impl Iterator<Item = (&Arc<str>, &RunShare)> {
        self.runs.iter().map(|s| (self.run_id(s), s))
    }

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

pub use wattd_collectors::shares::{apportion, Ties};
use wattd_collectors::shares::{largest_remainder, SplitScratch};

/// Working buffers of an interval's splits, reused across its meters: with 10,000 runs each is
/// tens of kilobytes, and fresh ones per split cost more in page faults than the arithmetic.
#[derive(Debug, Default)]
struct Scratch {
    split: SplitScratch,
    active: Vec<u64>,
    idle: Vec<u64>,
    weights: Vec<u64>,
}

/// Attributes one interval. Pure: the same input gives the same output, bit for bit.
pub fn attribute(input: &IntervalInput) -> Vec<MeterResult> {
    // Each run's usage per package, looked up once per interval rather than once per meter.
    let dense = input.usage.as_ref().map(Dense::new);
    let mut scratch = Scratch::default();
    // The run ids, once for every CPU meter of the interval.
    let ids: RunIds = input
        .usage
        .as_ref()
        .map_or_else(Vec::new, |u| {
            u.runs.iter().map(|r| r.run_id.clone()).collect()
        })
        .into();
    let mut results: Vec<MeterResult> = input
        .meters
        .iter()
        .filter(|m| m.key.domain != Domain::Platform)
        .map(|m| attribute_meter(input, dense.as_ref(), &ids, m, &mut scratch))
        .collect();
    // The platform meter last: it is divided by what the others gave each run (here over this
    // interval; the sampler passes the shares over the BMC's own spans instead).
    if input
        .meters
        .iter()
        .any(|m| m.key.domain == Domain::Platform)
    {
        let shares = ComponentShares::of(&results);
        for m in input
            .meters
            .iter()
            .filter(|m| m.key.domain == Domain::Platform)
        {
            results.push(attribute_platform(input.policy.platform, m, &shares));
        }
    }
    results
}

/// The meters whose energy the platform meter is the rest of: psys where the host has it (it
/// includes the packages and DRAM), else packages and DRAM; and the GPUs.
pub fn is_platform_component(key: MeterKey, has_psys: bool) -> bool {
    match key.domain {
        Domain::Psys | Domain::Gpu => true,
        Domain::Package | Domain::Dram => !has_psys,
        Domain::Core | Domain::Uncore | Domain::Platform => false,
    }
}

/// What the component meters gave each run (active + idle, microjoules), sorted by run id, and
/// the host (its shares and what was left unattributed): the platform meter's weights.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ComponentShares {
    pub runs: Vec<(Arc<str>, u64)>,
    pub host: u64,
}

impl ComponentShares {
    /// Of one interval's results (gaps and non-components left out).
    pub fn of(results: &[MeterResult]) -> Self {
        let has_psys = results.iter().any(|c| c.key.domain == Domain::Psys);
        let mut runs: BTreeMap<Arc<str>, u64> = BTreeMap::new();
        let mut host: u64 = 0;
        for c in results
            .iter()
            .filter(|c| !c.gap && is_platform_component(c.key, has_psys))
        {
            for (id, share) in c.shares() {
                let w = runs.entry(id.clone()).or_default();
                *w = w.saturating_add(share.active_uj.saturating_add(share.idle_uj));
            }
            let left = c
                .unattributed
                .iter()
                .map(|(_, e)| *e)
                .fold(0, u64::saturating_add);
            host = host
                .saturating_add(c.host_active_uj)
                .saturating_add(c.host_idle_uj)
                .saturating_add(left);
        }
        ComponentShares {
            runs: runs.into_iter().collect(),
            host,
        }
    }
}

/// The platform meter: its energy divided by `shares` (`PlatformPolicy::Proportional`: each
/// run's part of the component meters' energy), or kept by the host. Pure, exact.
pub fn attribute_platform(
    policy: PlatformPolicy,
    m: &MeterInput,
    shares: &ComponentShares,
) -> MeterResult {
    let (mut r, energy) = measured_result(m);
    let Some(energy) = energy else {
        return r;
    };
    if policy == PlatformPolicy::Host {
        r.host_active_uj = energy;
        return r;
    }
    let ids: RunIds = shares.runs.iter().map(|(id, _)| id.clone()).collect();
    let mut weights: Vec<u64> = shares.runs.iter().map(|(_, w)| *w).collect();
    weights.push(shares.host);
    divide(
        IdlePolicy::Host,
        (energy, 0),
        &weights,
        Vec::new,
        &ids,
        &mut r,
        &mut Scratch::default(),
    );
    r
}

/// Runs' CPU time and reserved CPUs as dense rows (run-major, one column per package).
struct Dense {
    packages: Vec<u32>,
    cpu_us: Vec<u64>,
    reserved: Vec<u64>,
}

impl Dense {
    fn new(usage: &Usage) -> Self {
        // Only the host's packages get a column: a meter of any other package has no CPU to
        // divide by (NO_CPU_IN_PACKAGE) and psys follows the busy packages, so a run's usage on
        // a package the host does not list is never read.
        let mut packages: Vec<u32> = usage
            .busy_us
            .keys()
            .chain(usage.package_cpus.keys())
            .copied()
            .collect();
        packages.sort_unstable();
        packages.dedup();
        let np = packages.len();
        let mut cpu_us = vec![0u64; usage.runs.len() * np];
        let mut reserved = vec![0u64; usage.runs.len() * np];
        for (i, run) in usage.runs.iter().enumerate() {
            for (p, v) in &run.cpu_us {
                if let Ok(c) = packages.binary_search(p) {
                    cpu_us[i * np + c] = *v;
                }
            }
            for (p, v) in &run.reserved_millicpus {
                if let Ok(c) = packages.binary_search(p) {
                    reserved[i * np + c] = *v;
                }
            }
        }
        Dense {
            packages,
            cpu_us,
            reserved,
        }
    }

    /// Column indexes of `pkgs`.
    fn columns(&self, pkgs: &[u32]) -> Vec<usize> {
        pkgs.iter()
            .filter_map(|p| self.packages.binary_search(p).ok())
            .collect()
    }

    fn row_sum(values: &[u64], np: usize, run: usize, cols: &[usize]) -> u64 {
        let row = &values[run * np..run * np + np];
        match cols {
            [c] => row[*c],
            _ => cols
                .iter()
                .map(|c| row[*c])
                .fold(0u64, |a, v| a.saturating_add(v)),
        }
    }
}

/// A meter's result before any division, with its measured energy to divide; `None` when the
/// result is already complete (a gap, a quarantined delta).
fn measured_result(m: &MeterInput) -> (MeterResult, Option<u64>) {
    let mut r = MeterResult {
        key: m.key,
        source: m.source,
        quality: m.quality,
        measured_uj: 0,
        gap: false,
        idle: m.idle,
        idle_uj: 0,
        run_ids: Arc::from([]),
        runs: Vec::new(),
        host_active_uj: 0,
        host_idle_uj: 0,
        host_usage: 0,
        unattributed: Vec::new(),
        gpu: (m.key.domain == Domain::Gpu).then(GpuMeta::default),
    };
    match m.measured {
        Measured::Gap => {
            r.gap = true;
            (r, None)
        }
        Measured::Quarantined { energy_uj } => {
            r.measured_uj = energy_uj;
            r.unattributed
                .push((UnattributedReason::Quarantined, energy_uj));
            (r, None)
        }
        Measured::Energy { energy_uj } => {
            r.measured_uj = energy_uj;
            (r, Some(energy_uj))
        }
    }
}

fn attribute_meter(
    input: &IntervalInput,
    dense: Option<&Dense>,
    ids: &RunIds,
    m: &MeterInput,
    scratch: &mut Scratch,
) -> MeterResult {
    let (mut r, energy) = measured_result(m);
    let Some(energy) = energy else {
        return r;
    };
    let (Some(usage), Some(dense)) = (&input.usage, dense) else {
        r.unattributed
            .push((UnattributedReason::NoUsageData, energy));
        return r;
    };
    if m.key.domain == Domain::Gpu {
        attribute_gpu(input, usage, m, energy, &mut r, scratch);
        return r;
    }
    if usage.cpu_busy_unknown {
        r.unattributed
            .push((UnattributedReason::NoUsageData, energy));
        return r;
    }
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

    let (idle, active) = idle_part(input, m, energy);
    r.idle_uj = idle;

    // Usage weights: each run's, then the host's, over this meter's packages.
    let by_memory = m.key.domain == Domain::Dram && input.policy.dram == DramPolicy::Memory;
    let nruns = usage.runs.len();
    let mut weights = std::mem::take(&mut scratch.weights);
    weights.clear();
    let mut runs_total: u64 = 0;
    if by_memory {
        weights.extend(usage.runs.iter().map(|run| run.memory_bytes.unwrap_or(0)));
        runs_total = weights.iter().fold(0u64, |a, w| a.saturating_add(*w));
        weights.push(
            usage
                .host_memory_bytes
                .map_or(0, |h| h.saturating_sub(runs_total)),
        );
    } else {
        let cols = dense.columns(&packages);
        let np = dense.packages.len();
        for i in 0..nruns {
            let w = Dense::row_sum(&dense.cpu_us, np, i, &cols);
            runs_total = runs_total.saturating_add(w);
            weights.push(w);
        }
        let busy: u64 = packages
            .iter()
            .map(|p| usage.busy_us.get(p).copied().unwrap_or(0))
            .sum();
        // Runs can out-measure the host's busy time; the host is never negative.
        weights.push(busy.saturating_sub(runs_total));
    }
    let reserved = || {
        let capacity: u64 = packages
            .iter()
            .map(|p| usage.package_cpus.get(p).copied().unwrap_or(0) as u64 * 1000)
            .sum();
        let cols = dense.columns(&packages);
        let np = dense.packages.len();
        let mut rw: Vec<u64> = (0..nruns)
            .map(|i| Dense::row_sum(&dense.reserved, np, i, &cols))
            .collect();
        let reserved: u64 = rw.iter().sum();
        rw.push(capacity.saturating_sub(reserved));
        rw
    };
    divide(
        input.policy.idle,
        (active, idle),
        &weights,
        reserved,
        ids,
        &mut r,
        scratch,
    );
    scratch.weights = weights;
    r
}

/// The idle part of a meter's energy (`min(E, P_idle x t)`) and the active rest.
fn idle_part(input: &IntervalInput, m: &MeterInput, energy: u64) -> (u64, u64) {
    let idle_cap = m.idle.power_uw as u128 * input.elapsed_us as u128 / 1_000_000;
    let idle = idle_cap.min(energy as u128) as u64;
    (idle, energy - idle)
}

/// A GPU meter: the same division as a CPU meter, over the GPU's own usage (see `gpu.rs`).
fn attribute_gpu(
    input: &IntervalInput,
    usage: &Usage,
    m: &MeterInput,
    energy: u64,
    r: &mut MeterResult,
    scratch: &mut Scratch,
) {
    let Some(g) = m.key.package.and_then(|i| usage.gpus.get(&i)) else {
        r.unattributed
            .push((UnattributedReason::NoUsageData, energy));
        return;
    };
    if let Some(meta) = &mut r.gpu {
        meta.basis = Some(g.basis);
        meta.mig = Some(g.mig);
    }
    let (idle, active) = idle_part(input, m, energy);
    r.idle_uj = idle;
    let mut weights: Vec<u64> = g.runs.iter().map(|x| x.usage_us).collect();
    weights.push(g.host_usage);
    let reserved = || {
        let mut rw: Vec<u64> = g.runs.iter().map(|x| x.reserved).collect();
        rw.push(g.host_reserved);
        rw
    };
    let ids: RunIds = g.runs.iter().map(|x| x.run_id.clone()).collect();
    divide(
        input.policy.idle,
        (active, idle),
        &weights,
        reserved,
        &ids,
        r,
        scratch,
    );
}

/// Divides `active` by `weights` (one per run, then the host's) and `idle` by the idle policy,
/// exactly, into `r`. Runs with no usage and no share are left out of `r.runs`.
fn divide(
    idle_policy: IdlePolicy,
    (active, idle): (u64, u64),
    weights: &[u64],
    reserved: impl FnOnce() -> Vec<u64>,
    ids: &RunIds,
    r: &mut MeterResult,
    scratch: &mut Scratch,
) {
    let nruns = weights.len() - 1;
    r.host_usage = weights[nruns];
    r.run_ids = ids.clone();
    // Tie-break order: runs by id, the host after every run.
    let key_cmp = |a: usize, b: usize| match (a < nruns, b < nruns) {
        (true, true) => ids[a].cmp(&ids[b]),
        (true, false) => std::cmp::Ordering::Less,
        (false, true) => std::cmp::Ordering::Greater,
        (false, false) => std::cmp::Ordering::Equal,
    };
    let none_used = weights.iter().all(|w| *w == 0);

    let mut active_shares = std::mem::take(&mut scratch.active);
    let mut idle_shares = std::mem::take(&mut scratch.idle);
    idle_shares.clear();
    largest_remainder(
        active,
        weights,
        key_cmp,
        Ties::SmallestKey,
        &mut active_shares,
        &mut scratch.split,
    );
    r.host_active_uj = if none_used {
        active
    } else {
        active_shares[nruns]
    };

    match idle_policy {
        IdlePolicy::Host => r.host_idle_uj = idle,
        IdlePolicy::Proportional => {
            if none_used {
                r.host_idle_uj = idle;
            } else {
                largest_remainder(
                    idle,
                    weights,
                    key_cmp,
                    Ties::LargestKey,
                    &mut idle_shares,
                    &mut scratch.split,
                );
                r.host_idle_uj = idle_shares[nruns];
            }
        }
        IdlePolicy::Reserved => {
            let rw = reserved();
            if rw.iter().all(|w| *w == 0) {
                r.host_idle_uj = idle;
            } else {
                largest_remainder(
                    idle,
                    &rw,
                    key_cmp,
                    Ties::LargestKey,
                    &mut idle_shares,
                    &mut scratch.split,
                );
                r.host_idle_uj = idle_shares[nruns];
            }
        }
    }

    // Runs that got nothing and used nothing are left out: a host with many idle runs would
    // otherwise write a zero line per run per meter per interval.
    r.runs = Vec::with_capacity(nruns);
    for (i, &w) in weights.iter().enumerate().take(nruns) {
        let active_uj = if none_used { 0 } else { active_shares[i] };
        let idle_uj = idle_shares.get(i).copied().unwrap_or(0);
        if active_uj != 0 || idle_uj != 0 || w != 0 {
            r.runs.push(RunShare {
                // A run count above u32::MAX is far beyond any host (and the tracker's cap).
                run: i as u32,
                active_uj,
                idle_uj,
                usage: w,
            });
        }
    }
    scratch.active = active_shares;
    scratch.idle = idle_shares;
}

#[cfg(test)]
mod tests;
