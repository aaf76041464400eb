//! `wattd-collectors`: everything wattd reads from the host. RAPL through the perf power PMU,
//! powercap sysfs and MSRs; an estimator where no counter exists; CPU topology and utilisation;
//! NVIDIA GPUs through NVML.
//! IO and no policy: what a reading means for a bill is decided by the agent's attribution.
//!
//! Every path is read under a [`HostRoot`], so the same code runs on a live host, on captured
//! fixture trees and on a simulated host.

pub mod cgroup;
pub mod counter;
pub mod domain;
pub mod error;
pub mod estimator;
pub mod hostfs;
pub mod hwmon;
pub mod msr;
pub mod nvml;
pub mod perf_pmu;
pub mod powercap;
pub mod probe;
pub mod procstat;
pub mod redfish;
pub mod shares;
pub mod synth;
pub mod topology;

pub use counter::{CounterSample, EnergyCounter, EnergyUnit};
pub use domain::{Domain, DomainReading, Meter, MeterKey, Quality, SourceKind};
pub use error::HostError;
pub use hostfs::HostRoot;
pub use shares::PackageShares;
