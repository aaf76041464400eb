//! The GPU collector: opens every GPU NVML lists, reads its energy once per interval (the
//! total-energy counter through [`EnergyCounter`], or power readings integrated over time where
//! the counter is not supported), gathers between reads what the GPU says about who used it
//! (per-process SM samples, running compute processes, MIG instances), and remembers each pid's
//! cgroup from `/proc/<pid>/cgroup` while the process is alive, so that the samples of a process
//! that exited before the interval closed still name their cgroup.
//!
//! Time comes in as arguments (`now_us`, monotonic microseconds), so recorded sequences replay
//! exactly. Nothing here decides what a run pays.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::Serialize;

use super::pci::PciGpu;
use super::{ComputeProcess, GpuVendor, MigInstance, NvmlApi, NvmlError};
use crate::counter::{CounterSample, EnergyCounter, PowerIntegrator};
use crate::domain::{Domain, MeterKey, Quality, SourceKind};
use crate::error::{HostError, Shown, HINT_GENERIC};
use crate::hostfs::{read_bounded, HostRoot};
use crate::powercap::CEILING_SAFETY_FACTOR;

/// Most GPUs opened on one host.
pub const GPUS_MAX: u32 = 64;
/// Most utilisation samples kept per GPU per interval (the driver returns one per process per
/// sample period; this is far above any real interval).
pub const SAMPLES_MAX: usize = 65_536;
/// How far in the future (of NVML's clock at the poll) a sample may be stamped before it is
/// refused as garbage.
const FUTURE_SLACK_US: u64 = 1_000_000;
/// Most pids whose cgroup is remembered.
pub const PIDS_MAX: usize = 65_536;
/// Largest `/proc/<pid>/cgroup` read.
const PROC_CGROUP_MAX: usize = 16 * 1024;
/// A remembered pid's cgroup is forgotten after this many intervals without a sight of it.
const PID_TTL_CLOSES: u64 = 3;

/// What the collector needs.
#[derive(Clone, Debug)]
pub struct GpuOptions {
    pub root: HostRoot,
    /// The most one GPU can draw, watts, before the safety factor: deltas above it times the
    /// factor are quarantined.
    pub max_watts: u64,
}

impl GpuOptions {
    pub fn new(root: HostRoot) -> Self {
        GpuOptions {
            root,
            max_watts: Domain::Gpu.default_max_watts(),
        }
    }
}

/// One GPU as `wattd probe` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct GpuDeviceReport {
    pub index: u32,
    pub uuid: Option<String>,
    pub name: Option<String>,
    /// `chosen` (measured from now on) or `unusable` (`detail` says why).
    pub status: &'static str,
    /// `nvml` (the energy counter), `nvml_power` (power integrated, estimated) or `amd_smi`
    /// (AMD SMI's accumulator).
    pub source: Option<SourceKind>,
    pub quality: Option<Quality>,
    /// The counter at probe time, millijoules since the driver was loaded.
    pub energy_mj: Option<u64>,
    pub power_mw: Option<u32>,
    /// MIG mode: `None` where the GPU has no MIG.
    pub mig: Option<bool>,
    pub mig_instances: Option<usize>,
    /// How usage will be measured on this GPU, or why per-process samples are not available.
    pub usage: String,
    pub detail: Option<String>,
}

/// The GPU part of `wattd probe`.
#[derive(Clone, Debug, Serialize)]
pub struct GpuReport {
    /// At least one GPU is measured.
    pub available: bool,
    /// Why the GPU domain is disabled or partly usable.
    pub reason: Option<String>,
    pub devices: Vec<GpuDeviceReport>,
    /// The NVIDIA GPUs on the PCI bus (see [`check_present`](Self::check_present)).
    pub present: Vec<PciGpu>,
    /// Set when GPUs bound to the `nvidia` driver are present but fewer are measured: their
    /// energy is not billed. A warning at start and a metric; in `wattd probe` an error (exit
    /// 1) when `problem_is_error`, else a warning.
    pub problem: Option<String>,
    pub problem_is_error: bool,
}

impl GpuReport {
    pub fn disabled(reason: impl Into<String>) -> Self {
        GpuReport {
            available: false,
            reason: Some(reason.into()),
            devices: Vec::new(),
            present: Vec::new(),
            problem: None,
            problem_is_error: false,
        }
    }

    /// GPUs measured from now on.
    pub fn measured(&self) -> usize {
        self.devices.iter().filter(|d| d.status == "chosen").count()
    }

    /// GPUs bound to the `nvidia` driver that are not measured, as [`check_present`] found:
    /// it sets the problem exactly when there are some (0 when it was not asked: GPUs disabled
    /// by configuration, a captured tree).
    ///
    /// [`check_present`]: Self::check_present
    pub fn unmeasured(&self) -> usize {
        if self.problem.is_none() {
            return 0;
        }
        bound(&self.present).len().saturating_sub(self.measured())
    }

    /// Records the GPUs on the PCI bus and sets [`problem`](Self::problem) when some that the
    /// `nvidia` driver holds are not measured, saying why in words an operator can act on. It
    /// is an error ([`problem_is_error`](Self::problem_is_error)) when NVML could not be used
    /// at all or was refused permission: the case a service's device policy causes. Fewer GPUs
    /// listed, or GPUs NVML lists but cannot read (a vGPU guest without power readings, a
    /// container given some of the host's GPUs), are a warning: the operator may mean it.
    pub fn check_present(&mut self, present: Vec<PciGpu>) {
        self.present = present;
        let bound = bound(&self.present);
        let missing = bound.len().saturating_sub(self.measured());
        if missing == 0 {
            self.problem = None;
            self.problem_is_error = false;
            return;
        }
        // NVML's own words: why it could not be used at all, else why a listed GPU is not.
        let why = if self.devices.is_empty() {
            self.reason.clone()
        } else {
            self.devices
                .iter()
                .filter(|d| d.status != "chosen")
                .find_map(|d| d.detail.clone())
        }
        .unwrap_or_else(|| {
            "NVML lists fewer GPUs than the PCI bus (a container given some of them?)".to_owned()
        });
        let permission = why.contains("no permission");
        self.problem_is_error = self.devices.is_empty() || permission;
        let hint = if permission {
            " Under systemd the unit must allow the NVIDIA devices \
             (DeviceAllow=char-nvidia-frontend rw, see systemd/wattd.service)."
        } else {
            ""
        };
        self.problem = Some(format!(
            "{} NVIDIA GPU(s) bound to the nvidia driver ({}), {} measured: the energy of {missing} \
             is not billed. {why}.{hint}",
            bound.len(),
            bound.join(", "),
            self.measured(),
        ));
    }
}

/// The addresses of the `present` GPUs bound to their vendor's driver (`nvidia`, `amdgpu`): the
/// ones the vendor's library should measure.
fn bound(present: &[PciGpu]) -> Vec<&str> {
    present
        .iter()
        .filter(|g| g.is_vendor_bound())
        .map(|g| g.address.as_str())
        .collect()
}

impl GpuReport {
    /// [`check_present`](Self::check_present) for AMD GPUs: fewer measured than `amdgpu`
    /// holds is always a warning (a workstation's integrated GPU is one, and ROCm is rarely on
    /// such hosts), with AMD SMI's own words. A problem already set (the probe's capability
    /// warning) is kept after it.
    pub fn check_present_amd(&mut self, present: Vec<PciGpu>) {
        self.present = present;
        let bound = bound(&self.present);
        let missing = bound.len().saturating_sub(self.measured());
        self.problem_is_error = false;
        if missing == 0 {
            return;
        }
        let why = self
            .reason
            .clone()
            .unwrap_or_else(|| "AMD SMI lists fewer GPUs than the PCI bus".to_owned());
        let caps = self
            .problem
            .take()
            .map(|p| format!(" {p}"))
            .unwrap_or_default();
        self.problem = Some(format!(
            "{} AMD GPU(s) bound to the amdgpu driver ({}), {} measured: the energy of {missing} \
             is not billed. {why}.{caps}",
            bound.len(),
            bound.join(", "),
            self.measured(),
        ));
    }
}

/// What the probe found: the report, and the collector when some GPU can be measured.
#[derive(Debug)]
pub struct GpuProbe {
    pub report: GpuReport,
    pub collector: Option<GpuCollector>,
}

/// Why NVML could not be used, in words for `wattd probe`.
pub fn disabled_reason(vendor: GpuVendor, e: &NvmlError) -> String {
    if vendor == GpuVendor::Amd {
        return match e {
            NvmlError::LibraryNotFound(why) => format!(
                "libamd_smi could not be loaded ({why}): no ROCm AMD SMI on this host; AMD GPUs \
                 not measured"
            ),
            other => format!("AMD SMI could not be used: {other}; AMD GPUs not measured"),
        };
    }
    match e {
        NvmlError::LibraryNotFound(why) => format!(
            "libnvidia-ml could not be loaded ({why}): no NVIDIA driver on this host; GPU domain disabled"
        ),
        NvmlError::DriverNotLoaded => {
            "the NVIDIA kernel driver is not loaded (modprobe nvidia); GPU domain disabled".into()
        }
        NvmlError::NoPermission => "no permission to talk to the NVIDIA driver (/dev/nvidiactl, \
             /dev/nvidia*: run as root or give the service access to them); GPU domain disabled"
            .into(),
        NvmlError::VersionMismatch => "the NVIDIA driver and libnvidia-ml versions differ (a \
             driver upgrade without a reboot?); GPU domain disabled"
            .into(),
        other => format!("NVML could not be initialised: {other}; GPU domain disabled"),
    }
}

/// Probes NVML (`api` is its opened handle or why it could not be opened) and opens every GPU
/// that can be measured. `now_us` is the monotonic time of the baseline readings.
pub fn probe_gpus(
    vendor: GpuVendor,
    api: Result<Box<dyn NvmlApi>, NvmlError>,
    opts: &GpuOptions,
    now_us: u64,
) -> GpuProbe {
    let api = match api {
        Ok(a) => a,
        Err(e) => {
            return GpuProbe {
                report: GpuReport::disabled(disabled_reason(vendor, &e)),
                collector: None,
            }
        }
    };
    let (collector, report) = GpuCollector::open(api, opts, now_us);
    GpuProbe {
        collector: collector.filter(|c| !c.devices.is_empty()),
        report,
    }
}

#[derive(Clone, Debug)]
enum EnergySource {
    Counter(EnergyCounter),
    Power(PowerIntegrator),
}

impl EnergySource {
    /// The source and quality of its readings: the library's counter, measured; power
    /// integrated (NVML only), estimated.
    fn kind(&self, vendor: GpuVendor) -> (SourceKind, Quality) {
        match self {
            EnergySource::Counter(_) => (vendor.counter_source(), Quality::Measured),
            EnergySource::Power(_) => (SourceKind::NvmlPower, Quality::Estimated),
        }
    }
}

/// What a GPU said between two closes.
#[derive(Debug, Default)]
struct Gathered {
    /// Per pid: SM-busy percent x microseconds, summed over the interval's polls.
    busy: BTreeMap<u32, u128>,
    samples_ok: bool,
    samples_err: Option<NvmlError>,
    procs: BTreeMap<u32, Option<u32>>,
    procs_ok: bool,
    procs_err: Option<NvmlError>,
    /// MIG instances by index, their processes merged over the interval's polls (a process
    /// that ended before the close still holds its instance for the interval).
    instances: Option<Result<BTreeMap<u32, MigInstance>, NvmlError>>,
    /// Samples refused as impossible: pid 0, SM above 100 %, or stamped in the future.
    rejected_samples: u32,
    dropped_samples: u32,
}

#[derive(Debug)]
struct Device {
    /// The library's device index (the meter's index is `key.package`).
    index: u32,
    uuid: Arc<str>,
    key: MeterKey,
    energy: EnergySource,
    /// Where the library counts engine time per process (AMD SMI): what the previous polls
    /// said. `None`: utilisation samples (NVML).
    engine: Option<EngineState>,
    mig: Option<bool>,
    last_close_us: u64,
    /// NVML's clock at the previous utilisation poll: the next poll asks for samples after it.
    last_poll_clock_us: u64,
    /// Monotonic time of the previous utilisation poll: a poll's samples cover the time since.
    last_poll_us: u64,
    gathered: Gathered,
}

/// A remembered pid: its cgroup (relative to the cgroup2 mount; `None` if unreadable) and the
/// close it was last seen at.
#[derive(Debug)]
struct PidEntry {
    cgroup: Option<Arc<str>>,
    seen: u64,
}

/// Who used the GPU in one interval, as NVML said it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Activity {
    /// MIG mode at the close; `None` where the GPU has no MIG (or the mode was unreadable).
    pub mig: Option<bool>,
    /// Per pid, SM-busy microseconds in the interval: each poll's SM percentage for the pid
    /// (the mean of its samples in that poll) times the monotonic time the poll covers, summed.
    /// `Err` when no poll could read samples (`NotSupported` under MIG). Under AMD SMI
    /// (`engine_time`), each pid's graphics-engine time in the interval instead.
    pub sm_busy_us: Result<BTreeMap<u32, u64>, NvmlError>,
    /// `sm_busy_us` is engine time from the library's process list (AMD SMI), not SM samples.
    pub engine_time: bool,
    /// Every compute process seen running in the interval (any poll).
    pub processes: Result<Vec<ComputeProcess>, NvmlError>,
    /// MIG instances and their processes (merged over the interval's polls), under MIG.
    pub mig_instances: Option<Result<Vec<MigInstance>, NvmlError>>,
    /// Each pid above -> its cgroup relative to the cgroup2 mount (`""` for the root cgroup),
    /// `None` when it could not be read (the process exited before it was ever seen running).
    pub cgroups: BTreeMap<u32, Option<Arc<str>>>,
    /// Samples refused as impossible (pid 0, SM above 100 %, stamped in the future).
    pub rejected_samples: u32,
    /// Samples beyond [`SAMPLES_MAX`] in the interval, not used.
    pub dropped_samples: u32,
}

/// One GPU's interval.
#[derive(Debug)]
pub struct GpuObservation {
    pub gpu: u32,
    pub uuid: Arc<str>,
    pub key: MeterKey,
    pub source: SourceKind,
    pub quality: Quality,
    /// The energy since the previous close, or why it is unknown.
    pub sample: Result<CounterSample, HostError>,
    /// Monotonic microseconds since the previous close.
    pub elapsed_us: u64,
    pub activity: Activity,
}

/// Every GPU that could be measured at start; the set is fixed for the collector's life (a GPU
/// that disappears is reported as failing, each interval, until it comes back).
#[derive(Debug)]
pub struct GpuCollector {
    api: Box<dyn NvmlApi>,
    vendor: GpuVendor,
    root: HostRoot,
    devices: Vec<Device>,
    pids: HashMap<u32, PidEntry>,
    closes: u64,
    pids_refused: u64,
}

fn nvml_err(call: &'static str, gpu: u32, error: NvmlError) -> HostError {
    HostError::Nvml { call, gpu, error }
}

/// Parses `/proc/<pid>/cgroup`: the cgroup v2 line `0::/path`, relative to the mount (leading
/// `/` removed; `""` for the root cgroup). `None` for anything else or anything hostile.
pub fn parse_proc_cgroup(text: &str) -> Option<Arc<str>> {
    let line = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    let path = line.strip_suffix(" (deleted)").unwrap_or(line);
    let rel = path.strip_prefix('/')?;
    if rel.len() > 4096 || rel.chars().any(char::is_control) {
        return None;
    }
    if !rel.is_empty()
        && rel
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return None;
    }
    Some(Arc::from(rel))
}

/// A pid absent from this many consecutive process lists is forgotten (about 2 s at the 200 ms
/// poll): one missed by a single list (a race with its fds, a truncated answer) keeps its count.
const ENGINE_ABSENT_POLLS: u32 = 10;

/// Engine time per process as the previous polls left it.
#[derive(Debug, Default)]
struct EngineState {
    /// The first successful list only sets the baseline (time from before it is not billed).
    baselined: bool,
    /// pid -> (its cumulative ns at its last listing, consecutive lists it was absent from).
    last: HashMap<u32, (u64, u32)>,
}

/// Folds one poll of per-process engine time into the interval: each listed pid's time since
/// its previous listing becomes busy time (in the samples' unit, percent x microseconds) and the
/// pid a running process. The count is a sum over the pid's DRM clients, so it can go back
/// while the process lives (one of its fds closed) or under a reused pid: either way nothing is
/// billed for that poll and the new count is the baseline. A pid never seen before is billed
/// at most the poll's `window_us` (it opened the GPU since the previous poll, or was missed
/// by it): a count from long before never lands on one interval. A pid absent from a list keeps
/// its count for [`ENGINE_ABSENT_POLLS`] lists. A failed poll changes nothing: the next one's
/// differences cover its time.
fn fold_engine_time(
    got: Result<Vec<super::EngineTime>, NvmlError>,
    st: &mut EngineState,
    window_us: u64,
    g: &mut Gathered,
    new_pids: &mut Vec<(u32, bool)>,
) {
    let list = match got {
        Ok(v) => v,
        Err(e) => {
            g.samples_err = Some(e.clone());
            g.procs_err = Some(e);
            return;
        }
    };
    g.samples_ok = true;
    g.procs_ok = true;
    let mut seen: HashMap<u32, u64> = HashMap::with_capacity(list.len());
    for e in list {
        if e.pid == 0 {
            g.rejected_samples += 1;
            continue;
        }
        if seen.len() >= SAMPLES_MAX && !seen.contains_key(&e.pid) {
            g.dropped_samples += 1;
            continue;
        }
        // A pid listed twice (one entry per DRM client, in libraries that do not sum them)
        // is summed.
        let total = seen.entry(e.pid).or_default();
        *total = total.saturating_add(e.gfx_ns);
    }
    let baselined = std::mem::replace(&mut st.baselined, true);
    for (&pid, &total) in &seen {
        let delta = match st.last.get(&pid) {
            _ if !baselined => 0,
            Some(&(before, _)) => total.saturating_sub(before),
            None => total.min(window_us.saturating_mul(1_000)),
        };
        if delta > 0 {
            *g.busy.entry(pid).or_default() += u128::from(delta) / 10;
        }
        g.procs.insert(pid, None);
        new_pids.push((pid, true));
    }
    st.last.retain(|pid, (_, absent)| {
        *absent += 1;
        seen.contains_key(pid) || *absent <= ENGINE_ABSENT_POLLS
    });
    for (pid, total) in seen {
        st.last.insert(pid, (total, 0));
    }
}

impl GpuCollector {
    /// Enumerates the GPUs, takes each one's baseline, and says what became of each.
    pub fn open(
        mut api: Box<dyn NvmlApi>,
        opts: &GpuOptions,
        now_us: u64,
    ) -> (Option<Self>, GpuReport) {
        let vendor = api.vendor();
        let lib = vendor.library();
        let base = vendor.index_base();
        let count = match api.device_count() {
            Ok(n) => n,
            Err(e) => return (None, GpuReport::disabled(disabled_reason(vendor, &e))),
        };
        if count == 0 {
            return (
                None,
                GpuReport::disabled(match vendor {
                    GpuVendor::Nvidia => {
                        "NVML is loaded but lists no GPU; GPU domain disabled".to_owned()
                    }
                    GpuVendor::Amd => "AMD SMI is loaded but lists no GPU; not used".to_owned(),
                }),
            );
        }
        let mut reports = Vec::new();
        let mut devices = Vec::new();
        let mut problems = Vec::new();
        if count > GPUS_MAX {
            problems.push(format!(
                "{lib} lists {count} GPUs; only the first {GPUS_MAX} are measured"
            ));
        }
        let ceiling_uw = opts
            .max_watts
            .saturating_mul(1_000_000)
            .saturating_mul(CEILING_SAFETY_FACTOR);
        for index in 0..count.min(GPUS_MAX) {
            let mut rep = GpuDeviceReport {
                index: base + index,
                uuid: None,
                name: None,
                status: "unusable",
                source: None,
                quality: None,
                energy_mj: None,
                power_mw: None,
                mig: None,
                mig_instances: None,
                usage: String::new(),
                detail: None,
            };
            let uuid = match api.uuid(index) {
                Ok(u) => u,
                Err(e) => {
                    rep.detail = Some(format!("cannot identify it: {e}"));
                    rep.usage = "-".into();
                    reports.push(rep);
                    continue;
                }
            };
            rep.uuid = Some(uuid.clone());
            rep.name = api.name(index).ok();
            rep.mig = api.mig_enabled(index).ok();
            let energy = match api.energy_count(index) {
                Ok((raw, u)) => {
                    rep.energy_mj = Some(
                        u64::try_from(u.total_uj(u128::from(raw)) / 1_000).unwrap_or(u64::MAX),
                    );
                    let mut c = EnergyCounter::new(None, u, ceiling_uw);
                    let _ = c.update(raw, 0);
                    Some((
                        EnergySource::Counter(c),
                        vendor.counter_source(),
                        Quality::Measured,
                    ))
                }
                // Power readings integrated: NVML only (AMD SMI's power structure changed
                // layout across releases; its energy counter is on every GPU it supports).
                Err(counter_err) if vendor != GpuVendor::Nvidia => {
                    rep.detail = Some(format!("energy counter: {counter_err}"));
                    None
                }
                Err(counter_err) => match api.power_mw(index) {
                    Ok(mw) => {
                        rep.power_mw = Some(mw);
                        rep.detail = Some(format!(
                            "total-energy counter: {counter_err}; power readings integrated over \
                             time instead (estimated)"
                        ));
                        let mut p = PowerIntegrator::new(ceiling_uw);
                        p.add_mw(now_us, mw);
                        let _ = p.close(0);
                        Some((
                            EnergySource::Power(p),
                            SourceKind::NvmlPower,
                            Quality::Estimated,
                        ))
                    }
                    Err(power_err) => {
                        rep.detail = Some(format!(
                            "total-energy counter: {counter_err}; power usage: {power_err}"
                        ));
                        None
                    }
                },
            };
            let clock = api.clock_us();
            // AMD SMI: engine time per process, baselined by the first list that answers (an
            // error now is retried at every poll; until a list answers, no usage).
            let engine = (vendor == GpuVendor::Amd).then(|| {
                let mut st = EngineState::default();
                match api.engine_time_ns(index) {
                    Ok(v) => {
                        let mut g = Gathered::default();
                        fold_engine_time(Ok(v), &mut st, 0, &mut g, &mut Vec::new());
                    }
                    Err(e) => {
                        rep.detail = Some(format!("per-process engine time at start: {e}"));
                    }
                }
                st
            });
            let baseline = if engine.is_some() {
                Ok(Vec::new())
            } else {
                api.process_utilization(index, 0)
            };
            let mig_instances = if rep.mig == Some(true) {
                api.mig_instances(index).ok().map(|i| i.len())
            } else {
                None
            };
            rep.mig_instances = mig_instances;
            rep.usage = match (&baseline, rep.mig) {
                _ if engine.is_some() => {
                    "per-process engine time (the AMD SMI process list)".into()
                }
                (Ok(_), _) | (Err(NvmlError::NotFound), _) => {
                    "per-process SM utilisation samples".into()
                }
                (Err(e), Some(true)) => format!(
                    "per-process samples: {e}; MIG: energy divided among GPU instances by their \
                     size (slices), among processes evenly"
                ),
                (Err(e), _) => format!(
                    "per-process samples: {e}; energy divided evenly among running compute processes"
                ),
            };
            let Some((energy, source, quality)) = energy else {
                reports.push(rep);
                continue;
            };
            rep.status = "chosen";
            let mig = rep.mig;
            rep.source = Some(source);
            rep.quality = Some(quality);
            reports.push(rep);
            devices.push(Device {
                index,
                uuid: Arc::from(uuid),
                key: MeterKey {
                    domain: Domain::Gpu,
                    package: Some(base + index),
                    die: None,
                },
                energy,
                engine,
                mig,
                last_close_us: now_us,
                last_poll_clock_us: clock,
                last_poll_us: now_us,
                gathered: Gathered::default(),
            });
        }
        let available = !devices.is_empty();
        let unusable = reports.iter().filter(|r| r.status != "chosen").count();
        if unusable > 0 {
            problems.push(format!("{unusable} GPU(s) cannot be measured; see devices"));
        }
        let report = GpuReport {
            available,
            reason: (!problems.is_empty()).then(|| problems.join("; ")),
            devices: reports,
            present: Vec::new(),
            problem: None,
            problem_is_error: false,
        };
        let collector = GpuCollector {
            api,
            vendor,
            root: opts.root.clone(),
            devices,
            pids: HashMap::new(),
            closes: 0,
            pids_refused: 0,
        };
        (Some(collector), report)
    }

    /// The meters this collector serves: key, source, quality, UUID.
    pub fn meters(&self) -> Vec<(MeterKey, SourceKind, Quality, Arc<str>)> {
        self.devices
            .iter()
            .map(|d| {
                let (s, q) = d.energy.kind(self.vendor);
                (d.key, s, q, d.uuid.clone())
            })
            .collect()
    }

    /// Pids whose cgroup could not be remembered because the table was full (a bound, counted).
    pub fn pids_refused(&self) -> u64 {
        self.pids_refused
    }

    fn remember_pid(&mut self, pid: u32, refresh: bool) {
        let seen = self.closes;
        if let Some(e) = self.pids.get_mut(&pid) {
            e.seen = seen;
            if !refresh {
                return;
            }
        } else if self.pids.len() >= PIDS_MAX {
            self.pids_refused += 1;
            return;
        }
        let path = self.root.join(format!("proc/{pid}/cgroup"));
        let read = read_bounded(&path, PROC_CGROUP_MAX, HINT_GENERIC)
            .ok()
            .and_then(|t| parse_proc_cgroup(&t));
        match (read, self.pids.get_mut(&pid)) {
            // A pid seen before keeps its cgroup when it can no longer be read (it exited).
            (None, Some(_)) => {}
            (Some(c), Some(e)) => e.cgroup = Some(c),
            (c, None) => {
                self.pids.insert(pid, PidEntry { cgroup: c, seen });
            }
        }
    }

    /// Reads what each GPU says about its users now and keeps it for the interval's close; with
    /// power integration, takes a power reading. Cheap; called between closes.
    pub fn poll(&mut self, now_us: u64) {
        for i in 0..self.devices.len() {
            self.poll_device(i, now_us);
        }
    }

    fn poll_device(&mut self, i: usize, now_us: u64) {
        let gpu = self.devices[i].index;
        let clock = self.api.clock_us();
        let window_us = now_us.saturating_sub(self.devices[i].last_poll_us);
        // Samples since the previous poll, on NVML's clock. If that clock stepped back, ask for
        // the poll's own span instead of nothing (a wall-clock step must not hide usage).
        let prev = self.devices[i].last_poll_clock_us;
        let since = if clock >= prev {
            prev
        } else {
            clock.saturating_sub(window_us)
        };
        let engine = self.devices[i]
            .engine
            .is_some()
            .then(|| self.api.engine_time_ns(gpu));
        // Engine time per process replaces both the samples and the process list.
        let (samples, procs) = if engine.is_some() {
            (None, None)
        } else {
            (
                Some(self.api.process_utilization(gpu, since)),
                Some(self.api.compute_processes(gpu)),
            )
        };
        let mig = self.devices[i].mig == Some(true);
        let instances = mig.then(|| self.api.mig_instances(gpu));
        let power = match self.devices[i].energy {
            EnergySource::Power(_) => Some(self.api.power_mw(gpu)),
            EnergySource::Counter(_) => None,
        };
        let mut new_pids: Vec<(u32, bool)> = Vec::new();
        {
            let d = &mut self.devices[i];
            let g = &mut d.gathered;
            d.last_poll_clock_us = clock;
            d.last_poll_us = now_us;
            if let (Some(got), Some(st)) = (engine, &mut d.engine) {
                fold_engine_time(got, st, window_us, g, &mut new_pids);
            }
            match samples {
                None => {}
                Some(Ok(v)) => {
                    g.samples_ok = true;
                    // One figure per pid for this poll: the mean of its samples in it, over the
                    // poll's span up to its newest sample (a process that exited, or went idle,
                    // mid-poll is not extended to the poll's end). Each pid is weighted by its
                    // own samples, whatever the phase of its neighbours'. Impossible samples are
                    // refused and counted.
                    let mut per_pid: BTreeMap<u32, (u64, u64, u64)> = BTreeMap::new();
                    for s in v {
                        if s.timestamp_us <= since {
                            continue;
                        }
                        if s.pid == 0
                            || s.sm_util > 100
                            || s.timestamp_us > clock.saturating_add(FUTURE_SLACK_US)
                        {
                            g.rejected_samples += 1;
                            continue;
                        }
                        let e = per_pid.entry(s.pid).or_default();
                        e.0 += u64::from(s.sm_util);
                        e.1 += 1;
                        e.2 = e.2.max(s.timestamp_us);
                    }
                    for (pid, (sum, n, newest)) in per_pid {
                        if g.busy.len() >= SAMPLES_MAX && !g.busy.contains_key(&pid) {
                            g.dropped_samples += 1;
                            continue;
                        }
                        // mean percent x covered span, kept exact: sum x span / n.
                        let span = window_us.min(newest.saturating_sub(since));
                        let add = u128::from(sum) * u128::from(span) / u128::from(n.max(1));
                        *g.busy.entry(pid).or_default() += add;
                        new_pids.push((pid, false));
                    }
                }
                Some(Err(NvmlError::NotFound)) => g.samples_ok = true,
                Some(Err(e)) => g.samples_err = Some(e),
            }
            match procs {
                None => {}
                Some(Ok(v)) => {
                    g.procs_ok = true;
                    for p in v {
                        g.procs.insert(p.pid, p.gpu_instance);
                        new_pids.push((p.pid, true));
                    }
                }
                Some(Err(NvmlError::NotFound)) => g.procs_ok = true,
                Some(Err(e)) => g.procs_err = Some(e),
            }
            if let Some(inst) = instances {
                match inst {
                    Ok(v) => {
                        if !matches!(g.instances, Some(Ok(_))) {
                            g.instances = Some(Ok(BTreeMap::new()));
                        }
                        if let Some(Ok(merged)) = &mut g.instances {
                            for x in v {
                                new_pids.extend(x.pids.iter().map(|p| (*p, true)));
                                let e = merged.entry(x.index).or_insert_with(|| MigInstance {
                                    pids: Vec::new(),
                                    ..x.clone()
                                });
                                e.slices = x.slices;
                                e.multiprocessors = x.multiprocessors;
                                for p in x.pids {
                                    if !e.pids.contains(&p) {
                                        e.pids.push(p);
                                    }
                                }
                            }
                        }
                    }
                    Err(e) => {
                        if !matches!(g.instances, Some(Ok(_))) {
                            g.instances = Some(Err(e));
                        }
                    }
                }
            }
            if let (Some(Ok(mw)), EnergySource::Power(p)) = (power, &mut d.energy) {
                p.add_mw(now_us, mw);
            }
        }
        // Running processes are looked up every poll (a pid can be reused); a pid seen only in
        // samples is looked up once, at first sight.
        for (pid, refresh) in new_pids {
            self.remember_pid(pid, refresh);
        }
    }

    /// Closes the interval ending at `now_us` on every GPU. With `rebaseline`, the previous
    /// interval's result was not used (the caller timed out): every counter starts over, so the
    /// energy of that interval, recorded as a gap by the caller, is not counted again.
    pub fn close(&mut self, now_us: u64, rebaseline: bool) -> Vec<GpuObservation> {
        self.closes += 1;
        let mut out = Vec::with_capacity(self.devices.len());
        for i in 0..self.devices.len() {
            self.poll_device(i, now_us);
            // The library's index for calls; the meter's index for everything said.
            let index = self.devices[i].index;
            let gpu = self.devices[i].key.package.unwrap_or(index);
            let identity = match self.api.uuid(index) {
                Ok(u) if *u == *self.devices[i].uuid => Ok(()),
                Ok(u) => Err(HostError::GpuReplaced {
                    gpu,
                    was: Shown::new(&self.devices[i].uuid),
                    now: Shown::new(&u),
                }),
                Err(e) => Err(nvml_err("uuid", gpu, e)),
            };
            let reading = match self.devices[i].energy {
                EnergySource::Counter(_) => Some(
                    self.api
                        .energy_count(index)
                        .map_err(|e| ("total_energy", e)),
                ),
                EnergySource::Power(_) => None,
            };
            let power = match self.devices[i].energy {
                EnergySource::Power(_) => Some(self.api.power_mw(index)),
                EnergySource::Counter(_) => None,
            };
            let mig = self.api.mig_enabled(index).ok();
            let d = &mut self.devices[i];
            let elapsed_us = now_us.saturating_sub(d.last_close_us);
            d.last_close_us = now_us;
            if rebaseline {
                match &mut d.energy {
                    EnergySource::Counter(c) => c.invalidate(),
                    EnergySource::Power(p) => p.invalidate(),
                }
            }
            let (source, quality) = d.energy.kind(self.vendor);
            let sample = match (&mut d.energy, identity) {
                (EnergySource::Counter(c), Err(e)) => {
                    c.invalidate();
                    Err(e)
                }
                (EnergySource::Power(p), Err(e)) => {
                    p.invalidate();
                    Err(e)
                }
                (EnergySource::Counter(c), Ok(())) => match reading {
                    // A counter whose unit changed cannot be differenced across the change:
                    // this interval is a gap and the counter starts over in the new unit.
                    Some(Ok((raw, unit))) if unit != c.unit() => {
                        let was = c.unit();
                        c.restart_in(unit);
                        let _ = c.update(raw, 0);
                        Err(nvml_err(
                            "total_energy",
                            gpu,
                            NvmlError::Other(format!(
                                "the counter's unit changed from {was:?} to {unit:?}; counted \
                                 again from here"
                            )),
                        ))
                    }
                    Some(Ok((raw, _))) => c.update(raw, elapsed_us).map_err(|e| {
                        c.invalidate();
                        nvml_err("total_energy", gpu, NvmlError::Other(e.to_string()))
                    }),
                    Some(Err((call, e))) => {
                        c.invalidate();
                        Err(nvml_err(call, gpu, e))
                    }
                    None => Err(nvml_err("total_energy", gpu, NvmlError::NotSupported)),
                },
                (EnergySource::Power(p), Ok(())) => match power {
                    Some(Ok(mw)) => {
                        if p.last.is_none() {
                            // After a failure the integration restarts here.
                            p.add_mw(now_us, mw);
                            p.based = false;
                        } else {
                            p.add_mw(now_us, mw);
                        }
                        Ok(p.close(elapsed_us))
                    }
                    Some(Err(e)) => {
                        p.invalidate();
                        Err(nvml_err("power_usage", gpu, e))
                    }
                    None => Err(nvml_err("power_usage", gpu, NvmlError::NotSupported)),
                },
            };
            d.mig = mig;
            let g = std::mem::take(&mut d.gathered);
            let sm_busy_us: Result<BTreeMap<u32, u64>, NvmlError> = if g.samples_ok {
                Ok(g.busy
                    .iter()
                    .map(|(&pid, &pct_us)| (pid, u64::try_from(pct_us / 100).unwrap_or(u64::MAX)))
                    .collect())
            } else {
                Err(g.samples_err.unwrap_or(NvmlError::NotSupported))
            };
            let processes: Result<Vec<ComputeProcess>, NvmlError> = if g.procs_ok {
                Ok(g.procs
                    .iter()
                    .map(|(&pid, &gpu_instance)| ComputeProcess { pid, gpu_instance })
                    .collect())
            } else {
                Err(g.procs_err.unwrap_or(NvmlError::NotSupported))
            };
            let mut pids: Vec<u32> = g.busy.keys().copied().collect();
            pids.extend(g.procs.keys().copied());
            if let Some(Ok(inst)) = &g.instances {
                pids.extend(inst.values().flat_map(|i| i.pids.iter().copied()));
            }
            pids.sort_unstable();
            pids.dedup();
            let key = d.key;
            let d_engine = d.engine.is_some();
            let uuid = d.uuid.clone();
            let cgroups = pids
                .into_iter()
                .map(|p| (p, self.pids.get(&p).and_then(|e| e.cgroup.clone())))
                .collect();
            out.push(GpuObservation {
                gpu,
                uuid,
                key,
                source,
                quality,
                sample,
                elapsed_us,
                activity: Activity {
                    mig,
                    sm_busy_us,
                    engine_time: d_engine,
                    processes,
                    mig_instances: g.instances.map(|r| r.map(|m| m.into_values().collect())),
                    cgroups,
                    rejected_samples: g.rejected_samples,
                    dropped_samples: g.dropped_samples,
                },
            });
        }
        // Forget pids not seen for a while (their samples have been handed out).
        let closes = self.closes;
        self.pids.retain(|_, e| e.seen + PID_TTL_CLOSES >= closes);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_cgroup_is_parsed_strictly() {
        let ok = |t: &str| parse_proc_cgroup(t).map(|s| s.to_string());
        assert_eq!(ok("0::/a/b.scope\n").as_deref(), Some("a/b.scope"));
        assert_eq!(ok("12:cpu:/x\n0::/a\n").as_deref(), Some("a"));
        assert_eq!(ok("0::/\n").as_deref(), Some(""));
        assert_eq!(ok("0::/a/b (deleted)\n").as_deref(), Some("a/b"));
        for bad in [
            "",
            "1:name=systemd:/a\n",
            "0::a\n",
            "0::/a/../b\n",
            "0::/a//b\n",
            "0::/a\u{7}b\n",
        ] {
            assert_eq!(ok(bad), None, "{bad:?}");
        }
        assert_eq!(ok(&format!("0::/{}\n", "x".repeat(5000))), None);
    }

    #[test]
    fn power_integration_is_exact_and_carries_remainders() {
        let mut p = PowerIntegrator::new(6_000_000_000);
        p.add_mw(0, 100_000);
        assert_eq!(p.close(0), CounterSample::First);
        // 100 W to 200 W over 1 s: 150 J by trapezoid.
        p.add_mw(1_000_000, 200_000);
        assert_eq!(
            p.close(1_000_000),
            CounterSample::Energy {
                energy_uj: 150_000_000,
                wrapped: false
            }
        );
        // 1 mW for 1 us is 1 nJ: 1,500 such intervals are 1.5 uJ, handed out as one whole
        // microjoule with the half carried, never rounded away per interval.
        let mut t = 1_000_000;
        let mut sum = 0;
        p.last = Some((t, 1_000));
        for _ in 0..1_500 {
            t += 1;
            p.add_mw(t, 1);
            if let CounterSample::Energy { energy_uj, .. } = p.close(1) {
                sum += energy_uj;
            }
        }
        assert_eq!(sum, 1);
        assert_eq!(p.acc_half_pj, 1_000_000);
        // Rising to 20 kW (10 kJ over 1 s) is above a 2 kW x 3 ceiling: quarantined.
        p.add_mw(t + 1_000_000, 20_000_000);
        assert!(matches!(
            p.close(1_000_000),
            CounterSample::Quarantined { .. }
        ));
    }
}
