//! The vocabulary shared by every source: energy domains, where a meter sits, which source and
//! quality a reading has, and one reading as the sampler receives it.

use std::fmt;

use serde::Serialize;

use crate::counter::CounterSample;
use crate::error::HostError;

/// An energy domain. `Package`, `Dram`, `Psys` and `Gpu` are billed; `Core` and `Uncore` are
/// subsets of `Package` (reported, never added to it); `Psys` is platform-wide and includes the
/// packages, so it is a domain of its own and never summed with them. `Gpu` is one GPU, whole
/// (its index travels in `MeterKey::package`: NVIDIA GPUs 0, 1, ... through NVML, under MIG
/// still the whole GPU; Intel GPUs through hwmon from 1000). `Platform` is the rest of the node:
/// the BMC's wall energy minus every other billed meter over the same span (power supplies,
/// fans, NICs, disks, the board), one meter per node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Domain {
    Package,
    Core,
    Uncore,
    Dram,
    Psys,
    Gpu,
    Platform,
}

impl Domain {
    pub const ALL: [Domain; 7] = [
        Domain::Package,
        Domain::Core,
        Domain::Uncore,
        Domain::Dram,
        Domain::Psys,
        Domain::Gpu,
        Domain::Platform,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Domain::Package => "package",
            Domain::Core => "core",
            Domain::Uncore => "uncore",
            Domain::Dram => "dram",
            Domain::Psys => "psys",
            Domain::Gpu => "gpu",
            Domain::Platform => "platform",
        }
    }

    /// Domains whose energy is attributed to runs.
    pub fn is_billed(self) -> bool {
        matches!(
            self,
            Domain::Package | Domain::Dram | Domain::Psys | Domain::Gpu | Domain::Platform
        )
    }

    /// The default physical ceiling of one meter of this domain, in watts, used when the host
    /// does not declare a maximum power. Generous: it exists to catch garbage, not to clip.
    pub fn default_max_watts(self) -> u64 {
        match self {
            Domain::Package | Domain::Core | Domain::Uncore => 1_000,
            Domain::Dram => 500,
            Domain::Psys => 5_000,
            // The largest boards draw about 1.2 kW (GB200); NVML does not report a ceiling
            // wattd trusts more than this.
            Domain::Gpu => 2_000,
            // The wall of a whole node, less its measured parts.
            Domain::Platform => 20_000,
        }
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a meter sits: its domain, and its package and die (none for platform-wide `psys`). For
/// `Gpu`, `package` is the GPU's index (NVML's, or 1000 + n for hwmon GPUs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct MeterKey {
    pub domain: Domain,
    pub package: Option<u32>,
    pub die: Option<u32>,
}

impl fmt::Display for MeterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.domain)?;
        if let Some(p) = self.package {
            write!(f, "/package-{p}")?;
        }
        if let Some(d) = self.die {
            write!(f, "/die-{d}")?;
        }
        Ok(())
    }
}

/// Which mechanism produced a reading, in order of preference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    PerfPmu,
    Powercap,
    Msr,
    Estimator,
    /// NVML's total-energy counter (mJ since driver load, Volta and newer).
    Nvml,
    /// NVML power readings (mW) integrated over time, where the counter is not supported:
    /// always `Quality::Estimated`.
    NvmlPower,
    /// AMD SMI's energy accumulator times its resolution (AMD GPUs).
    AmdSmi,
    /// A hwmon `energy<N>_input` counter (uJ): Intel GPUs (`i915`, `xe`).
    Hwmon,
    /// A hwmon power reading (uW) integrated per tick: always `Quality::Estimated`.
    HwmonPower,
    /// The BMC's energy counter over Redfish (`EnvironmentMetrics.EnergykWh`), less the
    /// component meters: the platform meter.
    Redfish,
    /// The BMC's power readings over Redfish integrated between its samples, less the
    /// component meters: always `Quality::Estimated`.
    RedfishPower,
}

impl SourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::PerfPmu => "perf_pmu",
            SourceKind::Powercap => "powercap",
            SourceKind::Msr => "msr",
            SourceKind::Estimator => "estimator",
            SourceKind::Nvml => "nvml",
            SourceKind::NvmlPower => "nvml_power",
            SourceKind::AmdSmi => "amd_smi",
            SourceKind::Hwmon => "hwmon",
            SourceKind::HwmonPower => "hwmon_power",
            SourceKind::Redfish => "redfish",
            SourceKind::RedfishPower => "redfish_power",
        }
    }
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a number was measured by hardware or estimated from a model. Travels with every
/// reading, interval and record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Quality {
    Measured,
    Estimated,
}

/// One meter's reading for one tick.
#[derive(Debug)]
pub struct DomainReading {
    pub key: MeterKey,
    pub source: SourceKind,
    pub quality: Quality,
    /// The counter's verdict, or why the meter could not be read this tick (a source failure:
    /// the sampler records it as a gap for this domain).
    pub sample: Result<CounterSample, HostError>,
}

/// A set of open meters of one source, read once per tick.
pub trait Meter: Send + fmt::Debug {
    fn source(&self) -> SourceKind;
    fn keys(&self) -> Vec<MeterKey>;
    /// Reads every meter; `elapsed_us` is the monotonic time since the previous call.
    fn read(&mut self, elapsed_us: u64, out: &mut Vec<DomainReading>);
    /// A stable identity of the device behind a GPU meter (the records' `device_uuid`): NVML's
    /// UUID travels with its readings; a hwmon GPU's is its PCI address.
    fn device_id(&self, _key: MeterKey) -> Option<std::sync::Arc<str>> {
        None
    }
}
