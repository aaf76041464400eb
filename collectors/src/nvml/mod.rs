//! NVIDIA GPUs through NVML: a thin trait over exactly the NVML calls wattd makes
//! ([`NvmlApi`]), its implementation on `nvml-wrapper` with libnvidia-ml loaded at run time
//! ([`real::RealNvml`]), one driven by recorded sequences for tests ([`recorded::RecordedNvml`]),
//! and the collector that turns calls into per-interval observations ([`GpuCollector`]).
//!
//! IO and no policy: the collector reports each GPU's energy (counter delta, or power integrated
//! and marked estimated), the utilisation samples, running processes, MIG instances and each
//! pid's cgroup. How that becomes a run's share is the agent's attribution.
//!
//! NVML can block (a GPU falling off the bus, a wedged driver): nothing here has a timeout of its
//! own. Callers run the collector on a thread of its own and wait for it with a deadline.

use std::fmt;

use serde::{Deserialize, Serialize};

pub mod collector;
pub mod pci;
pub mod real;
pub mod recorded;

pub use collector::{
    probe_gpus, Activity, GpuCollector, GpuDeviceReport, GpuObservation, GpuOptions, GpuProbe,
    GpuReport,
};
pub use pci::{nvidia_gpus, PciGpu};

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
    /// `nvmlDeviceGetTotalEnergyConsumption`: millijoules since the driver was last loaded.
    fn total_energy_mj(&mut self, gpu: u32) -> Result<u64, NvmlError>;
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
}
