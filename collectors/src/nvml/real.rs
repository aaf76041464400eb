//! [`NvmlApi`] on libnvidia-ml through `nvml-wrapper`. The library is opened at run time
//! (libloading), so a host without it, without the driver, or without permission still starts:
//! [`RealNvml::open`] says which, and the GPU domain is disabled with that reason.

use std::ffi::OsStr;

use nvml_wrapper::error::NvmlError as WrapperError;
use nvml_wrapper::Nvml;

use super::{ComputeProcess, MigInstance, NvmlApi, NvmlError, UtilSample};
use crate::counter::EnergyUnit;

/// The library name tried when none is configured (the versioned name the driver package
/// installs; the unversioned `.so` comes only with development packages).
pub const DEFAULT_LIBRARY: &str = "libnvidia-ml.so.1";

/// Most MIG devices looked at on one GPU (A100/H100 have at most 7 instances).
const MIG_DEVICES_MAX: u32 = 64;

/// NVML, initialised. Device handles are looked up by index on every call: they are cheap, and
/// a handle kept across a GPU's removal would be worse than a failed lookup.
pub struct RealNvml {
    nvml: Nvml,
}

impl std::fmt::Debug for RealNvml {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RealNvml")
    }
}

fn map(e: WrapperError) -> NvmlError {
    match e {
        WrapperError::NotSupported => NvmlError::NotSupported,
        // An old driver whose library lacks the function: the GPU does not offer it either.
        WrapperError::FailedToLoadSymbol(_) | WrapperError::FunctionNotFound => {
            NvmlError::NotSupported
        }
        WrapperError::NotFound => NvmlError::NotFound,
        WrapperError::NoPermission => NvmlError::NoPermission,
        WrapperError::GpuLost | WrapperError::ResetRequired => NvmlError::GpuLost,
        WrapperError::DriverNotLoaded => NvmlError::DriverNotLoaded,
        WrapperError::LibloadingError(e) => NvmlError::LibraryNotFound(e.to_string()),
        WrapperError::LibraryNotFound => NvmlError::LibraryNotFound("not found".into()),
        WrapperError::LibRmVersionMismatch => NvmlError::VersionMismatch,
        WrapperError::InvalidArg => NvmlError::InvalidArgument,
        WrapperError::Timeout => NvmlError::Timeout,
        other => NvmlError::Other(other.to_string()),
    }
}

impl RealNvml {
    /// Loads `library` (default [`DEFAULT_LIBRARY`]) and initialises NVML.
    pub fn open(library: Option<&OsStr>) -> Result<Self, NvmlError> {
        let lib = library.unwrap_or(OsStr::new(DEFAULT_LIBRARY));
        let nvml = Nvml::builder().lib_path(lib).init().map_err(map)?;
        Ok(RealNvml { nvml })
    }

    fn device(&self, gpu: u32) -> Result<nvml_wrapper::Device<'_>, NvmlError> {
        self.nvml.device_by_index(gpu).map_err(map)
    }
}

impl NvmlApi for RealNvml {
    fn clock_us(&mut self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
    }

    fn device_count(&mut self) -> Result<u32, NvmlError> {
        self.nvml.device_count().map_err(map)
    }

    fn uuid(&mut self, gpu: u32) -> Result<String, NvmlError> {
        self.device(gpu)?.uuid().map_err(map)
    }

    fn name(&mut self, gpu: u32) -> Result<String, NvmlError> {
        self.device(gpu)?.name().map_err(map)
    }

    fn energy_count(&mut self, gpu: u32) -> Result<(u64, EnergyUnit), NvmlError> {
        let mj = self.device(gpu)?.total_energy_consumption().map_err(map)?;
        Ok((mj, EnergyUnit::MilliJoule))
    }

    fn power_mw(&mut self, gpu: u32) -> Result<u32, NvmlError> {
        self.device(gpu)?.power_usage().map_err(map)
    }

    fn process_utilization(
        &mut self,
        gpu: u32,
        since_us: u64,
    ) -> Result<Vec<UtilSample>, NvmlError> {
        let samples = self
            .device(gpu)?
            .process_utilization_stats(since_us)
            .map_err(map)?;
        Ok(samples
            .into_iter()
            .map(|s| UtilSample {
                pid: s.pid,
                timestamp_us: s.timestamp,
                sm_util: s.sm_util,
            })
            .collect())
    }

    fn compute_processes(&mut self, gpu: u32) -> Result<Vec<ComputeProcess>, NvmlError> {
        let procs = self.device(gpu)?.running_compute_processes().map_err(map)?;
        Ok(procs
            .into_iter()
            .map(|p| ComputeProcess {
                pid: p.pid,
                gpu_instance: p.gpu_instance_id,
            })
            .collect())
    }

    fn mig_enabled(&mut self, gpu: u32) -> Result<bool, NvmlError> {
        let mode = self.device(gpu)?.mig_mode().map_err(map)?;
        // NVML_DEVICE_MIG_ENABLE is 1.
        Ok(mode.current == 1)
    }

    fn mig_instances(&mut self, gpu: u32) -> Result<Vec<MigInstance>, NvmlError> {
        let parent = self.device(gpu)?;
        let max = parent.mig_device_count().map_err(map)?.min(MIG_DEVICES_MAX);
        let mut out = Vec::new();
        for index in 0..max {
            let mig = match parent.mig_device_by_index(index) {
                Ok(d) => d,
                // Slots without an instance.
                Err(WrapperError::NotFound) | Err(WrapperError::InvalidArg) => continue,
                Err(e) => return Err(map(e)),
            };
            let attrs = mig.attributes().map_err(map)?;
            let pids = match mig.running_compute_processes() {
                Ok(p) => p.into_iter().map(|p| p.pid).collect(),
                Err(WrapperError::NotFound) => Vec::new(),
                Err(e) => return Err(map(e)),
            };
            out.push(MigInstance {
                index,
                slices: attrs.gpu_instance_slice_count,
                multiprocessors: attrs.multiprocessor_count,
                pids,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a host without libnvidia-ml (this crate's CI) opening fails with a reason, never a
    /// panic; on a GPU host it succeeds. Either way the answer is typed.
    #[test]
    fn missing_library_is_a_typed_reason() {
        match RealNvml::open(Some(OsStr::new("/nonexistent/libnvidia-ml.so.1"))) {
            Err(NvmlError::LibraryNotFound(why)) => assert!(!why.is_empty()),
            other => panic!("expected LibraryNotFound, got {other:?}"),
        }
    }
}
