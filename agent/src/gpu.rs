//! The GPUs, kept off the event loop: NVML runs on a thread of its own (`wattd-nvml`), which
//! polls who uses each GPU between ticks and closes an interval when the loop asks. The loop
//! waits for the answer with a deadline; an answer that does not come in time makes that
//! interval a SOURCE_FAILURE gap of every GPU, and the next answer re-baselines, so a stuck
//! driver costs gaps, never a hung loop or a double-counted interval.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use wattd_collectors::nvml::amd::RealAmdSmi;
use wattd_collectors::nvml::real::RealNvml;
use wattd_collectors::nvml::{
    amd_gpus, nvidia_gpus, probe_gpus, GpuCollector, GpuObservation, GpuOptions, GpuReport,
    GpuVendor, NvmlApi, NvmlError,
};
use wattd_collectors::{DomainReading, HostError, HostRoot, MeterKey, Quality, SourceKind};

use crate::attribution::gpu::{gpu_usage, RunCgroups};
use crate::attribution::GpuUsage;

use crate::sampler::Reading;

/// How often the thread asks NVML who is using each GPU between two ticks.
pub const POLL_PERIOD: Duration = Duration::from_millis(200);

/// Probes NVML on a thread, waiting at most `timeout` (NVML can hang at init on a wedged
/// driver). Returns the report and, when some GPU can be measured, its collector.
pub fn probe(
    cfg: &GpuConfig,
    root: &HostRoot,
    timeout: Duration,
) -> (GpuReport, Option<GpuCollector>) {
    // Listed either way (an operator's choice and a captured tree are not problems).
    let listed = |mut r: GpuReport| {
        r.present = nvidia_gpus(root);
        (r, None)
    };
    if !cfg.enabled {
        return listed(GpuReport::disabled(
            "disabled by configuration ([gpu] enabled = false)",
        ));
    }
    if !root.is_live() {
        return listed(GpuReport::disabled(format!(
            "not considered: host root is {}, and NVML talks to the running driver, not a tree",
            root.path().display()
        )));
    }
    let library = cfg.library.clone();
    let opts = GpuOptions {
        root: root.clone(),
        max_watts: cfg.max_watts,
    };
    probe_on_thread(
        move || {
            RealNvml::open(library.as_deref().map(OsStr::new))
                .map(|n| Box::new(n) as Box<dyn NvmlApi>)
        },
        opts,
        timeout,
    )
}

/// Probes AMD SMI as [`probe`] does NVML: on a thread, waiting at most `timeout`. `None` when
/// AMD GPUs are not to be probed (GPUs disabled, `amd_smi = false`, a captured tree).
pub fn probe_amd(
    cfg: &GpuConfig,
    root: &HostRoot,
    timeout: Duration,
) -> Option<(GpuReport, Option<GpuCollector>)> {
    if !cfg.enabled || !cfg.amd_smi || !root.is_live() {
        return None;
    }
    let library = cfg.amd_smi_library.clone();
    let opts = GpuOptions {
        root: root.clone(),
        max_watts: cfg.max_watts,
    };
    let present = amd_gpus(root);
    let (mut report, collector) = probe_vendor_on_thread(
        GpuVendor::Amd,
        move || {
            RealAmdSmi::open(library.as_deref().map(OsStr::new))
                .map(|n| Box::new(n) as Box<dyn NvmlApi>)
        },
        opts,
        timeout,
    );
    if report.measured() > 0 && !has_cap_sys_ptrace(&read_self_status()) {
        report.problem = Some(
            "AMD SMI lists another user's GPU processes only to a caller with CAP_SYS_PTRACE, \
             which wattd lacks: their energy goes to the host bucket, not their runs (on hosts \
             that bill AMD GPUs, install /usr/share/doc/wattd/examples/amd-gpu-processes.conf as a \
             drop-in: see it for the price)"
                .into(),
        );
    }
    report.check_present_amd(present);
    Some((report, collector))
}

fn read_self_status() -> String {
    std::fs::read_to_string("/proc/self/status").unwrap_or_default()
}

/// Whether `/proc/self/status` says CAP_SYS_PTRACE (bit 19) is in the effective set.
pub fn has_cap_sys_ptrace(status: &str) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 19) != 0)
}

/// Runs `open` and the GPU probe on a thread and waits at most `timeout` for it, then checks the
/// result against the NVIDIA GPUs on the PCI bus under `opts.root` (a GPU the `nvidia` driver
/// holds but NVML cannot measure is the report's `problem`).
pub fn probe_on_thread(
    open: impl FnOnce() -> Result<Box<dyn NvmlApi>, NvmlError> + Send + 'static,
    opts: GpuOptions,
    timeout: Duration,
) -> (GpuReport, Option<GpuCollector>) {
    let present = nvidia_gpus(&opts.root);
    let (mut report, collector) = probe_vendor_on_thread(GpuVendor::Nvidia, open, opts, timeout);
    report.check_present(present);
    (report, collector)
}

/// Runs `open` (`vendor`'s library) and the GPU probe on a thread and waits at most `timeout`.
pub fn probe_vendor_on_thread(
    vendor: GpuVendor,
    open: impl FnOnce() -> Result<Box<dyn NvmlApi>, NvmlError> + Send + 'static,
    opts: GpuOptions,
    timeout: Duration,
) -> (GpuReport, Option<GpuCollector>) {
    let lib = vendor.library();
    let (tx, rx) = mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name(match vendor {
            GpuVendor::Nvidia => "wattd-nvml-probe".into(),
            GpuVendor::Amd => "wattd-amd-probe".into(),
        })
        .spawn(move || {
            let p = probe_gpus(vendor, open(), &opts, mono_us());
            let _ = tx.send(p);
        });
    if let Err(e) = spawned {
        return (
            GpuReport::disabled(format!("cannot start the {lib} thread: {e}")),
            None,
        );
    }
    match rx.recv_timeout(timeout) {
        Ok(p) => (p.report, p.collector),
        // The thread is left to its stuck call; it holds nothing the agent needs.
        Err(_) => (
            GpuReport::disabled(format!(
                "{lib} did not answer within {} ms (a wedged driver?); {}",
                timeout.as_millis(),
                match vendor {
                    GpuVendor::Nvidia => "GPU domain disabled",
                    GpuVendor::Amd => "AMD GPUs not measured",
                }
            )),
            None,
        ),
    }
}

/// CLOCK_MONOTONIC in microseconds: the collector's clock.
pub fn mono_us() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (ts.tv_sec as u64).saturating_mul(1_000_000) + ts.tv_nsec as u64 / 1_000
}

struct Request {
    rebaseline: bool,
    reply: oneshot::Sender<Vec<GpuObservation>>,
}

/// The NVML thread as the event loop sees it.
#[derive(Debug)]
pub struct GpuSource {
    tx: mpsc::SyncSender<Request>,
    /// A request whose answer has not come yet.
    pending: Option<oneshot::Receiver<Vec<GpuObservation>>>,
    meters: Vec<(MeterKey, SourceKind, Quality, Arc<str>)>,
    timeout: Duration,
    /// The last answer was not used: the next close must start every counter over.
    rebaseline: bool,
    stuck_since: Option<Instant>,
    /// `pending` was sent by this interval's `request` (not left over from a stuck one).
    fresh: bool,
    pub timeouts: u64,
}

/// One interval of the GPUs, for the sampler and the attribution.
#[derive(Debug, Default)]
pub struct GpuInterval {
    pub readings: Vec<Reading>,
    /// The observations (absent when the thread did not answer).
    pub observations: Vec<GpuObservation>,
}

impl GpuSource {
    /// Starts the thread with the probed collectors (NVML's, AMD SMI's: one thread reads
    /// both, so a wedged library makes every GPU's interval a gap). `poll` is the period of the
    /// usage polls between closes.
    pub fn start(
        mut collectors: Vec<GpuCollector>,
        timeout: Duration,
        poll: Duration,
    ) -> std::io::Result<Self> {
        let meters = collectors.iter().flat_map(GpuCollector::meters).collect();
        let (tx, rx) = mpsc::sync_channel::<Request>(1);
        std::thread::Builder::new()
            .name("wattd-nvml".into())
            .spawn(move || loop {
                match rx.recv_timeout(poll) {
                    Ok(req) => {
                        let now = mono_us();
                        let obs = collectors
                            .iter_mut()
                            .flat_map(|c| c.close(now, req.rebaseline))
                            .collect();
                        let _ = req.reply.send(obs);
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        let now = mono_us();
                        collectors.iter_mut().for_each(|c| c.poll(now));
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            })?;
        Ok(GpuSource {
            tx,
            pending: None,
            meters,
            timeout,
            rebaseline: false,
            stuck_since: None,
            fresh: false,
            timeouts: 0,
        })
    }

    /// Starts every GPU's counter and usage over now: what came before (the probe, the rest of
    /// the start-up) belongs to no interval of this run, and must not be billed to the first.
    pub async fn rebaseline(&mut self) {
        self.rebaseline = true;
        self.request();
        let _ = self.collect().await;
    }

    /// Asks the thread to close the interval now, unless it is still busy with an earlier
    /// request (then this interval will be a gap).
    pub fn request(&mut self) {
        self.fresh = false;
        if let Some(rx) = &mut self.pending {
            match rx.try_recv() {
                // A late answer: its interval was already recorded as a gap; drop it.
                Ok(_) | Err(oneshot::error::TryRecvError::Closed) => self.pending = None,
                Err(oneshot::error::TryRecvError::Empty) => return,
            }
        }
        let (reply, rx) = oneshot::channel();
        let req = Request {
            rebaseline: self.rebaseline,
            reply,
        };
        if self.tx.try_send(req).is_ok() {
            self.rebaseline = false;
            self.pending = Some(rx);
            self.fresh = true;
        }
    }

    /// The interval's GPU readings: the thread's answer within the deadline, or a gap of every
    /// GPU saying why not.
    pub async fn collect(&mut self) -> GpuInterval {
        // A request still unanswered from an earlier interval is not waited for again: the
        // thread is stuck in NVML, and waiting a full deadline every tick would stretch every
        // interval (and hold up the control socket) for as long as it stays stuck.
        let pending = if self.fresh {
            self.pending.as_mut()
        } else {
            None
        };
        let outcome = match pending {
            None => Err(format!(
                "an earlier GPU library call (NVML, AMD SMI) has not returned for {} ms",
                self.stuck_since.map_or(0, |t| t.elapsed().as_millis())
            )),
            Some(rx) => match tokio::time::timeout(self.timeout, rx).await {
                Ok(Ok(obs)) => Ok(obs),
                Ok(Err(_)) => Err("the GPU thread is gone".to_owned()),
                Err(_) => Err(format!(
                    "the GPU thread (NVML, AMD SMI) did not answer within {} ms",
                    self.timeout.as_millis()
                )),
            },
        };
        match outcome {
            Ok(obs) => {
                self.pending = None;
                self.stuck_since = None;
                GpuInterval {
                    readings: readings(&obs),
                    observations: obs,
                }
            }
            Err(why) => {
                self.timeouts += 1;
                self.rebaseline = true;
                self.stuck_since.get_or_insert_with(Instant::now);
                tracing::warn!(reason = %why, "GPU interval recorded as a gap");
                GpuInterval {
                    readings: self
                        .meters
                        .iter()
                        .map(|(key, source, quality, uuid)| Reading {
                            reading: DomainReading {
                                key: *key,
                                source: *source,
                                quality: *quality,
                                sample: Err(HostError::Nvml {
                                    call: "read",
                                    gpu: key.package.unwrap_or(0),
                                    error: NvmlError::Other(why.clone()),
                                }),
                            },
                            device: Some(uuid.clone()),
                        })
                        .collect(),
                    observations: Vec::new(),
                }
            }
        }
    }
}

/// The sampler's view of the GPUs' observations: each GPU's reading and its UUID.
pub fn readings(obs: &[GpuObservation]) -> Vec<Reading> {
    obs.iter()
        .map(|o| Reading {
            reading: DomainReading {
                key: o.key,
                source: o.source,
                quality: o.quality,
                sample: match &o.sample {
                    Ok(s) => Ok(*s),
                    Err(e) => Err(copy_error(e, o.gpu)),
                },
            },
            device: Some(o.uuid.clone()),
        })
        .collect()
}

/// `HostError` is not `Clone` (it may hold an io::Error); the GPU errors are rebuilt.
fn copy_error(e: &HostError, gpu: u32) -> HostError {
    match e {
        HostError::Nvml { call, gpu, error } => HostError::Nvml {
            call,
            gpu: *gpu,
            error: error.clone(),
        },
        other => HostError::Nvml {
            call: "read",
            gpu,
            error: NvmlError::Other(other.to_string()),
        },
    }
}

/// Each GPU's usage by run, from the interval's observations and the runs the tracker reported
/// for the same interval (finished ones included, so a run's last samples still find it).
pub fn usage(observations: &[GpuObservation], runs: &RunCgroups) -> BTreeMap<u32, GpuUsage> {
    observations
        .iter()
        .filter_map(|o| {
            gpu_usage(&o.activity, o.elapsed_us, |c| runs.run_of(c)).map(|u| (o.gpu, u))
        })
        .collect()
}

/// `[gpu]` of the configuration: whether and how NVIDIA GPUs are measured. The defaults here are
/// the only ones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuConfig {
    /// `enabled` (default true): probe NVML at start; without libnvidia-ml, the driver or
    /// permission the GPU domain is disabled with the reason, never fatal.
    pub enabled: bool,
    /// `library`: libnvidia-ml to load; default `libnvidia-ml.so.1` from the loader's path.
    pub library: Option<std::path::PathBuf>,
    /// `amd_smi` (default true): probe AMD GPUs through AMD SMI too (with `enabled`).
    pub amd_smi: bool,
    /// `amd_smi_library`: libamd_smi to load; default `libamd_smi.so` from the loader's path,
    /// then `/opt/rocm/lib/libamd_smi.so`.
    pub amd_smi_library: Option<std::path::PathBuf>,
    /// `read_timeout_ms`: the most one interval waits for NVML; a read that takes longer is a
    /// SOURCE_FAILURE gap of every GPU, and the loop goes on.
    pub read_timeout_ms: u64,
    /// `max_watts`: the most one GPU can draw; deltas above 3x this over an interval are
    /// quarantined.
    pub max_watts: u64,
}

impl Default for GpuConfig {
    fn default() -> Self {
        GpuConfig {
            enabled: true,
            library: None,
            amd_smi: true,
            amd_smi_library: None,
            read_timeout_ms: 1_000,
            max_watts: wattd_collectors::Domain::Gpu.default_max_watts(),
        }
    }
}

impl GpuConfig {
    /// The keys of `[gpu]` that are given, over the defaults.
    pub fn read(raw: &crate::schema::raw::Gpu, v: &mut crate::schema::Validator<'_>) -> Self {
        let mut g = GpuConfig::default();
        if let Some(b) = v.bool(&raw.enabled, "gpu.enabled") {
            g.enabled = b;
        }
        if let Some(p) = v.string(&raw.library, "gpu.library") {
            g.library = Some(p.into());
        }
        if let Some(b) = v.bool(&raw.amd_smi, "gpu.amd_smi") {
            g.amd_smi = b;
        }
        if let Some(p) = v.string(&raw.amd_smi_library, "gpu.amd_smi_library") {
            g.amd_smi_library = Some(p.into());
        }
        if let Some(ms) = v.int(&raw.read_timeout_ms, "gpu.read_timeout_ms", 10, 60_000) {
            g.read_timeout_ms = ms;
        }
        if let Some(w) = v.int(&raw.max_watts, "gpu.max_watts", 1, 20_000) {
            g.max_watts = w;
        }
        g
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_sys_ptrace_is_read_from_the_effective_set() {
        let status = |eff: &str| {
            format!("Name:\twattd\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\nCapEff:\t{eff}\n")
        };
        assert!(has_cap_sys_ptrace(&status("000001ffffffffff")));
        assert!(has_cap_sys_ptrace(&status("0000000000080000")));
        // CAP_DAC_READ_SEARCH, CAP_PERFMON, CAP_BPF: the unit without the drop-in.
        assert!(!has_cap_sys_ptrace(&status("000000c000000004")));
        assert!(!has_cap_sys_ptrace(&status("zz")));
        assert!(!has_cap_sys_ptrace(""));
    }
}
