//! NVIDIA GPUs through NVML, and AMD GPUs through AMD SMI: a thin trait over exactly the calls
//! wattd makes ([`NvmlApi`]), its implementation on `nvml-wrapper` with libnvidia-ml loaded at
//! run time ([`real::RealNvml`]), on libamd_smi loaded at run time ([`amd::RealAmdSmi`]), ones
//! driven by recorded sequences for tests ([`recorded::RecordedNvml`], which also answers as
//! AMD SMI), and the collector that turns calls into per-interval observations
//! ([`GpuCollector`]).
//!
//! IO and no policy: the collector reports each GPU's energy (counter delta, or power integrated
//! and marked estimated), the utilisation samples, running processes, MIG instances and each
//! pid's cgroup. How that becomes a run's share is the agent's attribution.
//!
//! NVML can block (a GPU falling off the bus, a wedged driver): nothing here has a timeout of its
//! own. Callers run the collector on a thread of its own and wait for it with a deadline.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::counter::EnergyUnit;
use crate::domain::SourceKind;

pub mod amd;
pub mod collector;
pub mod pci;
pub mod real;
pub mod recorded;

pub use collector::{
    probe_gpus, Activity, GpuCollector, GpuDeviceReport, GpuObservation, GpuOptions, GpuProbe,
    GpuReport,
};
pub use pci::{amd_gpus, nvidia_gpus, PciGpu};

/// What an NVML call can fail with, as far as wattd distinguishes it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NvmlError {
    /// The GPU, its mode (MIG) or the driver does not offer the call.
    #[error("not supported on this GPU, mode or driver")]
    NotSupported,
    /// Nothing to return (no utilisation sample since the given time; an empty MIG slot).
    #[error("no data")]
    NotFound,
    #[error("no permission to talk to the NVIDIA driver")]
    NoPermission,
    /// The GPU fell off the bus, was removed, or needs a reset.
    #[error("GPU lost (fell off the bus, removed, or needs a reset)")]
    GpuLost,
    #[error("the NVIDIA driver is not loaded")]
    DriverNotLoaded,
    #[error("libnvidia-ml could not be loaded: {0}")]
    LibraryNotFound(String),
    #[error("the NVIDIA driver and libnvidia-ml versions do not match")]
    VersionMismatch,
    /// An index beyond the devices NVML knows.
    #[error("no such device")]
    InvalidArgument,
    #[error("NVML timed out")]
    Timeout,
    #[error("{0}")]
    Other(String),
}

impl NvmlError {
    /// Parses the names used in recorded sequences (`"NotSupported"`, `"GpuLost"`, ...).
    pub fn from_name(name: &str) -> Self {
        match name {
            "NotSupported" => NvmlError::NotSupported,
            "NotFound" => NvmlError::NotFound,
            "NoPermission" => NvmlError::NoPermission,
            "GpuLost" => NvmlError::GpuLost,
            "DriverNotLoaded" => NvmlError::DriverNotLoaded,
            "LibraryNotFound" => NvmlError::LibraryNotFound("recorded".into()),
            "VersionMismatch" => NvmlError::VersionMismatch,
            "InvalidArgument" => NvmlError::InvalidArgument,
            "Timeout" => NvmlError::Timeout,
            other => NvmlError::Other(other.to_owned()),
        }
    }
}

/// One `nvmlProcessUtilizationSample_t`, as far as wattd uses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct UtilSample {
    pub pid: u32,
    /// CPU timestamp of the sample, microseconds (NVML's clock, only compared with itself).
    pub timestamp_us: u64,
    /// SM (3D/compute) utilisation of the process over the sample period, percent.
    pub sm_util: u32,
}

/// One running compute process (`nvmlProcessInfo_t`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ComputeProcess {
    pub pid: u32,
    /// The GPU instance it runs in, under MIG.
    pub gpu_instance: Option<u32>,
}

/// One MIG device (a GPU instance as NVML enumerates it on its parent) and its processes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MigInstance {
    /// The MIG device index on its parent GPU.
    pub index: u32,
    /// GPU instance slices it holds (`gpuInstanceSliceCount`: of 7 on A100/H100).
    pub slices: u32,
    /// Streaming multiprocessors it holds.
    pub multiprocessors: u32,
    /// Compute processes running in it.
    pub pids: Vec<u32>,
}

/// The first meter index of AMD GPUs (`gpu` domain, package `2000 + n`): NVIDIA GPUs are
/// `0..64` and hwmon GPUs `1000 + n`, so the three never share a meter.
pub const AMD_INDEX_BASE: u32 = 2000;

/// Which vendor's library answers an [`NvmlApi`]: names the meters' source and index range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GpuVendor {
    /// NVML (libnvidia-ml).
    Nvidia,
    /// AMD SMI (libamd_smi), see [`amd`].
    Amd,
}

impl GpuVendor {
    /// The meter index of the library's GPU 0.
    pub fn index_base(self) -> u32 {
        match self {
            GpuVendor::Nvidia => 0,
            GpuVendor::Amd => AMD_INDEX_BASE,
        }
    }

    /// The vendor whose GPUs hold this meter index.
    pub fn of_index(gpu: u32) -> Self {
        if gpu >= AMD_INDEX_BASE {
            GpuVendor::Amd
        } else {
            GpuVendor::Nvidia
        }
    }

    /// The source of readings from the library's energy counter.
    pub fn counter_source(self) -> SourceKind {
        match self {
            GpuVendor::Nvidia => SourceKind::Nvml,
            GpuVendor::Amd => SourceKind::AmdSmi,
        }
    }

    /// The library's name, as messages give it.
    pub fn library(self) -> &'static str {
        match self {
            GpuVendor::Nvidia => "NVML",
            GpuVendor::Amd => "AMD SMI",
        }
    }
}

/// One process's cumulative time on a GPU's graphics/compute engine, as AMD SMI's process list
/// gives it (`engine_usage.gfx`, nanoseconds since the process opened the GPU).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct EngineTime {
    pub pid: u32,
    pub gfx_ns: u64,
}

/// The NVML calls wattd makes, and nothing else. `gpu` is the NVML device index.
///
/// Implementations: [`real::RealNvml`] (libnvidia-ml through `nvml-wrapper`) and
/// [`recorded::RecordedNvml`] (recorded sequences, for tests). Every call may block for as long
/// as the driver likes; callers bound it from outside.
pub trait NvmlApi: Send + fmt::Debug {
    /// `nvmlDeviceGetCount_v2`.
    fn device_count(&mut self) -> Result<u32, NvmlError>;
    /// `nvmlDeviceGetUUID`: stable across reboots and re-enumeration, unlike the index.
    fn uuid(&mut self, gpu: u32) -> Result<String, NvmlError>;
    /// `nvmlDeviceGetName`.
    fn name(&mut self, gpu: u32) -> Result<String, NvmlError>;
    /// The energy counter in its own unit. NVML: `nvmlDeviceGetTotalEnergyConsumption`,
    /// millijoules since the driver was last loaded. AMD SMI: `amdsmi_get_energy_count`'s
    /// accumulator and the unit its resolution names.
    fn energy_count(&mut self, gpu: u32) -> Result<(u64, EnergyUnit), NvmlError>;
    /// `nvmlDeviceGetPowerUsage`: milliwatts, the board's current draw.
    fn power_mw(&mut self, gpu: u32) -> Result<u32, NvmlError>;
    /// Now, on the clock NVML stamps its utilisation samples with (the wall clock, microseconds
    /// since the Unix epoch): what the next `process_utilization` call passes as `since_us`.
    fn clock_us(&mut self) -> u64;
    /// `nvmlDeviceGetProcessUtilization`: samples newer than `since_us` (0: all buffered).
    /// `NotFound` when there is none; `NotSupported` under MIG on current drivers.
    fn process_utilization(
        &mut self,
        gpu: u32,
        since_us: u64,
    ) -> Result<Vec<UtilSample>, NvmlError>;
    /// `nvmlDeviceGetComputeRunningProcesses`.
    fn compute_processes(&mut self, gpu: u32) -> Result<Vec<ComputeProcess>, NvmlError>;
    /// `nvmlDeviceGetMigMode` (current mode): `NotSupported` on GPUs without MIG.
    fn mig_enabled(&mut self, gpu: u32) -> Result<bool, NvmlError>;
    /// `nvmlDeviceGetMaxMigDeviceCount`, `nvmlDeviceGetMigDeviceHandleByIndex`,
    /// `nvmlDeviceGetAttributes_v2` and `nvmlDeviceGetComputeRunningProcesses` on each MIG
    /// device: the instances that exist (empty slots are skipped).
    fn mig_instances(&mut self, gpu: u32) -> Result<Vec<MigInstance>, NvmlError>;
    /// The library behind the calls (NVML unless said otherwise).
    fn vendor(&self) -> GpuVendor {
        GpuVendor::Nvidia
    }
    /// Every process using the GPU and its cumulative engine time, where the library counts
    /// it per process (AMD SMI); `NotSupported` where it samples utilisation instead (NVML).
    fn engine_time_ns(&mut self, _gpu: u32) -> Result<Vec<EngineTime>, NvmlError> {
        Err(NvmlError::NotSupported)
    }
}
