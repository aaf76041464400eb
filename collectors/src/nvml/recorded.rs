//! [`NvmlApi`] driven by a recorded sequence (a JSON file): what each NVML call answered at each
//! step, values or errors. Tests move from step to step with [`StepCursor::advance`]; every call
//! in between answers from the current step. Used by the collector's and the agent's tests, and
//! by anything that needs a GPU host where there is none.
//!
//! The format (every per-GPU field optional; see `collectors/testdata/nvml/SOURCES.md`):
//!
//! ```json
//! { "about": "...",
//!   "steps": [ { "label": "baseline",
//!                "device_count": 1,
//!                "proc_cgroups": { "4242": "0::/flowzart.slice/run-a.scope\n" },
//!                "gpus": [ { "uuid": "GPU-...", "name": "NVIDIA A100-SXM4-40GB",
//!                            "energy_mj": 123456, "power_mw": 61000,
//!                            "samples": [[4242, 1700000000166666, 87]],
//!                            "processes": [[4242, null]],
//!                            "mig": false,
//!                            "mig_instances": [ { "index": 0, "slices": 3, "sms": 42, "pids": [4242] } ] } ] } ] }
//! ```
//!
//! A recording with `"vendor": "amd"` answers as AMD SMI does (through the same trait): each GPU's
//! `energy_count` is `[accumulator, resolution_uj]` (`amdsmi_get_energy_count`) and `engine_ns`
//! the process list as `[[pid, gfx_ns], ...]` (absent: no process); `energy_mj`, `power_mw`,
//! `samples`, `processes` and MIG do not apply.
//!
//! A value may be replaced by `{"error": "NotSupported"}` (or `GpuLost`, `NotFound`, ...). Absent
//! fields answer as NVML does on a GPU without the feature: `energy_mj` and `power_mw`
//! NotSupported, `samples` NotFound, `processes` empty, `mig` NotSupported, `mig_instances`
//! NotSupported. `"lost": true` makes every call on that GPU answer GpuLost; a GPU beyond the
//! step's list answers InvalidArgument. `proc_cgroups` is not an NVML answer: it is the content of
//! `/proc/<pid>/cgroup` for the pids alive at that step, for tests to lay out under a host root.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::Deserialize;

use super::amd::unit_of_resolution;
use super::{ComputeProcess, EngineTime, GpuVendor, MigInstance, NvmlApi, NvmlError, UtilSample};
use crate::counter::EnergyUnit;

/// A value or the error NVML answered instead.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Answer<T> {
    Error { error: String },
    Value(T),
}

impl<T: Clone> Answer<T> {
    fn get(&self) -> Result<T, NvmlError> {
        match self {
            Answer::Error { error } => Err(NvmlError::from_name(error)),
            Answer::Value(v) => Ok(v.clone()),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordedInstance {
    pub index: u32,
    pub slices: u32,
    #[serde(default)]
    pub sms: u32,
    #[serde(default)]
    pub pids: Vec<u32>,
}

/// `[pid, gpu_instance or null]`, as recorded.
pub type RecordedProcess = (u32, Option<u32>);

/// One GPU's answers at one step.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordedGpu {
    pub uuid: Option<String>,
    pub name: Option<String>,
    #[serde(default)]
    pub lost: bool,
    pub energy_mj: Option<Answer<u64>>,
    pub power_mw: Option<Answer<u32>>,
    /// `[pid, timestamp_us, sm_util]`: the driver's buffer at this step.
    pub samples: Option<Answer<Vec<(u32, u64, u32)>>>,
    /// `[pid, gpu_instance or null]`.
    pub processes: Option<Answer<Vec<RecordedProcess>>>,
    pub mig: Option<Answer<bool>>,
    pub mig_instances: Option<Answer<Vec<RecordedInstance>>>,
    /// AMD SMI: `[accumulator, resolution in microjoules]`.
    pub energy_count: Option<Answer<(u64, f32)>>,
    /// AMD SMI: the process list, `[pid, cumulative gfx engine ns]`.
    pub engine_ns: Option<Answer<Vec<(u32, u64)>>>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordedStep {
    #[serde(default)]
    pub label: String,
    pub device_count: Option<Answer<u32>>,
    #[serde(default)]
    pub gpus: Vec<RecordedGpu>,
    /// pid -> the text of `/proc/<pid>/cgroup` while it is alive.
    #[serde(default)]
    pub proc_cgroups: BTreeMap<u32, String>,
    /// NVML's clock (wall-clock us) at this step; absent: the step's newest sample timestamp.
    pub clock_us: Option<u64>,
}

/// A whole recorded sequence.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recording {
    #[serde(default)]
    pub about: String,
    /// `"nvidia"` (default) or `"amd"`: which library the recording answers as.
    #[serde(default)]
    pub vendor: RecordedVendor,
    pub steps: Vec<RecordedStep>,
}

/// The library a recording answers as.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordedVendor {
    #[default]
    Nvidia,
    Amd,
}

/// Why a recording cannot be used; the file's errors name it.
#[derive(Debug, thiserror::Error)]
pub enum RecordingError {
    #[error("{}: {source}", path.display())]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// Not the schema above (serde names the line, column and field).
    #[error("{}{source}", in_file(path))]
    Json {
        path: Option<std::path::PathBuf>,
        source: serde_json::Error,
    },
    #[error("{}a recording needs at least one step", in_file(path))]
    NoSteps { path: Option<std::path::PathBuf> },
}

fn in_file(path: &Option<std::path::PathBuf>) -> String {
    path.as_ref()
        .map(|p| format!("{}: ", p.display()))
        .unwrap_or_default()
}

impl Recording {
    pub fn parse(text: &str) -> Result<Self, RecordingError> {
        Self::parse_from(text, None)
    }

    pub fn load(path: &Path) -> Result<Self, RecordingError> {
        let text = std::fs::read_to_string(path).map_err(|source| RecordingError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse_from(&text, Some(path))
    }

    /// `text`, read from `path` when there is one (its errors then name it).
    fn parse_from(text: &str, path: Option<&Path>) -> Result<Self, RecordingError> {
        let path = || path.map(Path::to_owned);
        let r: Recording = serde_json::from_str(text).map_err(|source| RecordingError::Json {
            path: path(),
            source,
        })?;
        if r.steps.is_empty() {
            return Err(RecordingError::NoSteps { path: path() });
        }
        Ok(r)
    }
}

/// The step the recording is at, shared between the [`RecordedNvml`] the collector owns and
/// the test that drives it.
#[derive(Clone, Debug)]
pub struct StepCursor {
    recording: Arc<Recording>,
    step: Arc<Mutex<usize>>,
}

impl StepCursor {
    /// The current step index.
    pub fn index(&self) -> usize {
        self.step.lock().map_or(0, |s| *s)
    }

    /// The current step.
    pub fn step(&self) -> &RecordedStep {
        let i = self.index().min(self.recording.steps.len() - 1);
        &self.recording.steps[i]
    }

    /// Moves to the next step; false (and stays) at the last one.
    pub fn advance(&self) -> bool {
        let Ok(mut s) = self.step.lock() else {
            return false;
        };
        if *s + 1 < self.recording.steps.len() {
            *s += 1;
            true
        } else {
            false
        }
    }

    /// Number of steps.
    pub fn len(&self) -> usize {
        self.recording.steps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.recording.steps.is_empty()
    }

    /// Lays out `<root>/proc/<pid>/cgroup` for the pids alive at this step, and removes the
    /// files of pids that are not (they exited).
    pub fn write_procs(&self, root: &Path) -> std::io::Result<()> {
        let proc_dir = root.join("proc");
        std::fs::create_dir_all(&proc_dir)?;
        let alive = &self.step().proc_cgroups;
        for entry in std::fs::read_dir(&proc_dir)? {
            let entry = entry?;
            let name = entry.file_name();
            if let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) {
                if !alive.contains_key(&pid) {
                    std::fs::remove_dir_all(entry.path())?;
                }
            }
        }
        for (pid, text) in alive {
            let d = proc_dir.join(pid.to_string());
            std::fs::create_dir_all(&d)?;
            std::fs::write(d.join("cgroup"), text)?;
        }
        Ok(())
    }
}

/// NVML answering from a recording.
#[derive(Debug)]
pub struct RecordedNvml {
    cursor: StepCursor,
    vendor: RecordedVendor,
    /// The recording's clock never goes back (a step without samples keeps it).
    clock: u64,
}

impl RecordedNvml {
    pub fn new(recording: Recording) -> (Self, StepCursor) {
        let vendor = recording.vendor;
        let cursor = StepCursor {
            recording: Arc::new(recording),
            step: Arc::new(Mutex::new(0)),
        };
        (
            RecordedNvml {
                cursor: cursor.clone(),
                vendor,
                clock: 0,
            },
            cursor,
        )
    }

    fn gpu(&self, gpu: u32) -> Result<RecordedGpu, NvmlError> {
        let step = self.cursor.step();
        let g = step
            .gpus
            .get(gpu as usize)
            .ok_or(NvmlError::InvalidArgument)?;
        if g.lost {
            return Err(NvmlError::GpuLost);
        }
        Ok(g.clone())
    }
}

/// A recorded list, empty where the recording has none.
fn or_empty<T: Clone>(a: &Option<Answer<Vec<T>>>) -> Result<Vec<T>, NvmlError> {
    a.as_ref().map_or(Ok(Vec::new()), Answer::get)
}

fn or<T: Clone>(a: &Option<Answer<T>>, absent: NvmlError) -> Result<T, NvmlError> {
    match a {
        Some(a) => a.get(),
        None => Err(absent),
    }
}

impl NvmlApi for RecordedNvml {
    /// The recording's clock: the step's `clock_us`, else the newest sample timestamp on any GPU
    /// so far.
    fn clock_us(&mut self) -> u64 {
        let step = self.cursor.step();
        if let Some(c) = step.clock_us {
            self.clock = c;
            return c;
        }
        let newest = step
            .gpus
            .iter()
            .filter_map(|g| match &g.samples {
                Some(Answer::Value(v)) => v.iter().map(|(_, ts, _)| *ts).max(),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        self.clock = self.clock.max(newest);
        self.clock
    }

    fn device_count(&mut self) -> Result<u32, NvmlError> {
        let step = self.cursor.step();
        match &step.device_count {
            Some(a) => a.get(),
            None => Ok(step.gpus.len() as u32),
        }
    }

    fn uuid(&mut self, gpu: u32) -> Result<String, NvmlError> {
        Ok(self
            .gpu(gpu)?
            .uuid
            .unwrap_or_else(|| format!("GPU-recorded-{gpu}")))
    }

    fn name(&mut self, gpu: u32) -> Result<String, NvmlError> {
        Ok(self.gpu(gpu)?.name.unwrap_or_else(|| "recorded GPU".into()))
    }

    fn power_mw(&mut self, gpu: u32) -> Result<u32, NvmlError> {
        or(&self.gpu(gpu)?.power_mw, NvmlError::NotSupported)
    }

    fn process_utilization(
        &mut self,
        gpu: u32,
        since_us: u64,
    ) -> Result<Vec<UtilSample>, NvmlError> {
        let all = or(&self.gpu(gpu)?.samples, NvmlError::NotFound)?;
        let out: Vec<UtilSample> = all
            .into_iter()
            .filter(|(_, ts, _)| *ts > since_us)
            .map(|(pid, timestamp_us, sm_util)| UtilSample {
                pid,
                timestamp_us,
                sm_util,
            })
            .collect();
        // As NVML: no sample newer than the given time is NOT_FOUND, not an empty list.
        if out.is_empty() {
            return Err(NvmlError::NotFound);
        }
        Ok(out)
    }

    fn compute_processes(&mut self, gpu: u32) -> Result<Vec<ComputeProcess>, NvmlError> {
        Ok(or_empty(&self.gpu(gpu)?.processes)?
            .into_iter()
            .map(|(pid, gpu_instance)| ComputeProcess { pid, gpu_instance })
            .collect())
    }

    fn mig_enabled(&mut self, gpu: u32) -> Result<bool, NvmlError> {
        or(&self.gpu(gpu)?.mig, NvmlError::NotSupported)
    }

    fn vendor(&self) -> GpuVendor {
        match self.vendor {
            RecordedVendor::Nvidia => GpuVendor::Nvidia,
            RecordedVendor::Amd => GpuVendor::Amd,
        }
    }

    fn energy_count(&mut self, gpu: u32) -> Result<(u64, EnergyUnit), NvmlError> {
        match self.vendor {
            RecordedVendor::Nvidia => {
                let mj = or(&self.gpu(gpu)?.energy_mj, NvmlError::NotSupported)?;
                Ok((mj, EnergyUnit::MilliJoule))
            }
            RecordedVendor::Amd => {
                let (acc, res) = or(&self.gpu(gpu)?.energy_count, NvmlError::NotSupported)?;
                Ok((acc, unit_of_resolution(res)?))
            }
        }
    }

    fn engine_time_ns(&mut self, gpu: u32) -> Result<Vec<EngineTime>, NvmlError> {
        if self.vendor != RecordedVendor::Amd {
            return Err(NvmlError::NotSupported);
        }
        Ok(or_empty(&self.gpu(gpu)?.engine_ns)?
            .into_iter()
            .map(|(pid, gfx_ns)| EngineTime { pid, gfx_ns })
            .collect())
    }

    fn mig_instances(&mut self, gpu: u32) -> Result<Vec<MigInstance>, NvmlError> {
        let inst = or(&self.gpu(gpu)?.mig_instances, NvmlError::NotSupported)?;
        Ok(inst
            .into_iter()
            .map(|i| MigInstance {
                index: i.index,
                slices: i.slices,
                multiprocessors: i.sms,
                pids: i.pids,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_recording_is_refused_naming_its_file_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rec.json");
        std::fs::write(&path, r#"{"steps": []}"#).unwrap();
        let e = Recording::load(&path).unwrap_err();
        assert!(matches!(e, RecordingError::NoSteps { .. }), "{e:?}");
        assert!(
            e.to_string().starts_with(&format!("{}: ", path.display())),
            "{e}"
        );
        std::fs::write(&path, r#"{"steps": [{"gpus": [{"energy": 1}]}]}"#).unwrap();
        let e = Recording::load(&path).unwrap_err().to_string();
        assert!(e.contains("rec.json") && e.contains("energy"), "{e}");
        let e = Recording::load(&dir.path().join("absent.json")).unwrap_err();
        assert!(matches!(e, RecordingError::Read { .. }), "{e:?}");
        assert!(Recording::parse(r#"{"steps": [{}]}"#).is_ok());
    }
}
