//! Source selection and the probe report: which source serves each energy domain of each
//! package (perf PMU, then powercap, then MSR, then the estimator), and for every source not used
//! the exact reason. `wattd probe` prints this report; `wattd run` uses the same selection.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::Serialize;

use crate::domain::{Domain, Meter, MeterKey, Quality, SourceKind};
use crate::error::HostError;
use crate::estimator::{EstimatorMeter, EstimatorModel};
use crate::hostfs::HostRoot;
use crate::hwmon::{self, HwmonMeter};
use crate::msr::{self, CpuId, MsrMeter};
use crate::perf_pmu::{self, PerfMeter};
use crate::powercap::{self, PowercapMeter, ZoneVerdict};
use crate::topology::Topology;

/// What the probe needs to know.
#[derive(Clone, Debug)]
pub struct ProbeOptions {
    pub root: HostRoot,
    pub estimator: EstimatorModel,
    /// How long a live counter is watched to see that it advances (perf and MSR counters in VMs
    /// can open fine and read 0 forever).
    pub liveness_window: Duration,
    /// GPUs measured through hwmon are billed (`[gpu] enabled`).
    pub gpus: bool,
    /// How hwmon sensors are read (`[gpu] read_timeout_ms`, `[gpu] max_watts`).
    pub hwmon: hwmon::MeterOptions,
    /// hwmon channels the operator declares the meaning of (`[hwmon] power`).
    pub hwmon_declared: Vec<hwmon::Declared>,
}

impl ProbeOptions {
    pub fn new(root: HostRoot) -> Self {
        ProbeOptions {
            root,
            estimator: EstimatorModel::default(),
            liveness_window: Duration::from_millis(100),
            gpus: true,
            hwmon: hwmon::MeterOptions::default(),
            hwmon_declared: Vec::new(),
        }
    }
}

/// One zone or counter a source offers.
#[derive(Clone, Debug, Serialize)]
pub struct ZoneReport {
    pub domain: Option<Domain>,
    pub package: Option<u32>,
    pub die: Option<u32>,
    /// Where it is read: a sysfs directory, a perf event, an MSR address.
    pub location: String,
    pub range_uj: Option<u64>,
    pub energy_uj: Option<u64>,
    /// `chosen`, `standby` (usable, a preferred source serves the domain), `informational`
    /// (a subset of its package, not billed separately), `duplicate`, `conflict`, `unusable`,
    /// `not_billed` (a hwmon sensor wattd cannot tell the meaning of).
    pub status: &'static str,
    pub detail: Option<String>,
}

/// One source and what became of it.
#[derive(Clone, Debug, Serialize)]
pub struct SourceReport {
    pub source: SourceKind,
    pub available: bool,
    /// Why the source is unavailable or partly usable; absent when it is fully usable.
    pub reason: Option<String>,
    pub zones: Vec<ZoneReport>,
}

impl SourceReport {
    /// A source not (yet) available, with no reason and no zones.
    fn unused(source: SourceKind) -> Self {
        SourceReport {
            source,
            available: false,
            reason: None,
            zones: Vec::new(),
        }
    }
}

/// The chosen source of one billed meter.
#[derive(Clone, Debug, Serialize)]
pub struct Choice {
    pub domain: Domain,
    pub package: Option<u32>,
    pub die: Option<u32>,
    pub source: SourceKind,
    pub quality: Quality,
}

/// Everything `wattd probe` reports.
#[derive(Clone, Debug, Serialize)]
pub struct ProbeReport {
    pub root: String,
    pub cpu: Option<CpuId>,
    pub virtualized: bool,
    pub cpus: usize,
    pub packages: Vec<u32>,
    pub chosen: Vec<Choice>,
    pub sources: Vec<SourceReport>,
    /// Problems that are not about one source (topology unreadable, ...).
    pub problems: Vec<String>,
    /// NVIDIA GPUs (NVML), when probed: `select` leaves it `None`; the agent probes NVML on a
    /// thread with a deadline and fills it in ([`ProbeReport::add_gpus`]).
    pub gpu: Option<crate::nvml::GpuReport>,
    /// AMD GPUs (AMD SMI), when probed ([`ProbeReport::add_amd_gpus`]).
    pub amd_gpu: Option<crate::nvml::GpuReport>,
}

impl ProbeReport {
    /// Adds the GPU probe: its report, and a chosen entry per measured GPU.
    pub fn add_gpus(&mut self, gpu: crate::nvml::GpuReport) {
        self.choose_gpus(&gpu);
        self.gpu = Some(gpu);
    }

    /// Adds the AMD SMI probe, as [`add_gpus`](Self::add_gpus) does NVML's.
    pub fn add_amd_gpus(&mut self, gpu: crate::nvml::GpuReport) {
        self.choose_gpus(&gpu);
        self.amd_gpu = Some(gpu);
    }

    fn choose_gpus(&mut self, gpu: &crate::nvml::GpuReport) {
        for d in gpu.devices.iter().filter(|d| d.status == "chosen") {
            if let (Some(source), Some(quality)) = (d.source, d.quality) {
                self.chosen.push(Choice {
                    domain: Domain::Gpu,
                    package: Some(d.index),
                    die: None,
                    source,
                    quality,
                });
            }
        }
    }
}

/// The result of selection: the open meters and the report that explains them.
#[derive(Debug)]
pub struct Selection {
    pub meters: Vec<Box<dyn Meter>>,
    pub report: ProbeReport,
}

fn vm_note(virtualized: bool) -> &'static str {
    if virtualized {
        " (running in a VM: the hypervisor does not pass RAPL through)"
    } else {
        ""
    }
}

fn zone(
    key: Option<MeterKey>,
    location: String,
    status: &'static str,
    detail: Option<String>,
) -> ZoneReport {
    ZoneReport {
        domain: key.map(|k| k.domain),
        package: key.and_then(|k| k.package),
        die: key.and_then(|k| k.die),
        location,
        range_uj: None,
        energy_uj: None,
        status,
        detail,
    }
}

/// Probes every source, chooses one per billed meter, and opens the chosen meters.
pub fn select(opts: &ProbeOptions) -> Selection {
    let root = &opts.root;
    let mut problems = Vec::new();
    let cpu = match CpuId::read(root) {
        Ok(c) => Some(c),
        Err(e) => {
            problems.push(format!("CPU identity unknown: {e}"));
            None
        }
    };
    let virtualized = cpu.as_ref().is_some_and(|c| c.virtualized);
    let topo = match Topology::read(root) {
        Ok(t) => Some(t),
        Err(e) => {
            problems.push(format!("CPU topology unreadable: {e}"));
            None
        }
    };

    let mut chosen: BTreeMap<MeterKey, SourceKind> = BTreeMap::new();
    let mut meters: Vec<Box<dyn Meter>> = Vec::new();
    // In order of preference: each source claims the billed meters no earlier one serves; the
    // estimator covers packages with no measured package meter.
    let sources = vec![
        probe_perf(opts, topo.as_ref(), virtualized, &mut chosen, &mut meters),
        probe_powercap(root, virtualized, &mut chosen, &mut meters),
        probe_msr(
            opts,
            cpu.as_ref(),
            topo.as_ref(),
            virtualized,
            &mut chosen,
            &mut meters,
        ),
        probe_hwmon(opts, virtualized, &mut chosen, &mut meters, &mut problems),
        probe_estimator(opts, topo.as_ref(), &mut chosen, &mut meters),
    ];

    if let Some(t) = &topo {
        let pkgs = t.packages();
        // GPUs carry their own index in `package`, not a CPU package.
        for k in chosen.keys().filter(|k| k.domain != Domain::Gpu) {
            if let Some(p) = k.package.filter(|p| !pkgs.contains(p)) {
                problems.push(format!(
                    "{k} is measured but no online CPU belongs to package {p}: its energy cannot be \
                     split by usage and will be recorded as unattributed"
                ));
            }
        }
    }
    let chosen_list = chosen
        .iter()
        .map(|(k, s)| Choice {
            domain: k.domain,
            package: k.package,
            die: k.die,
            source: *s,
            quality: if matches!(*s, SourceKind::Estimator | SourceKind::HwmonPower) {
                Quality::Estimated
            } else {
                Quality::Measured
            },
        })
        .collect();
    let report = ProbeReport {
        root: root.path().display().to_string(),
        cpu,
        virtualized,
        cpus: topo.as_ref().map_or(0, |t| t.cpus.len()),
        packages: topo
            .as_ref()
            .map(|t| t.packages().into_iter().collect())
            .unwrap_or_default(),
        chosen: chosen_list,
        sources,
        problems,
        gpu: None,
        amd_gpu: None,
    };
    Selection { meters, report }
}

/// Keys of `keys` that no earlier source claimed; claims them for `src`.
fn claim(
    chosen: &mut BTreeMap<MeterKey, SourceKind>,
    keys: impl IntoIterator<Item = MeterKey>,
    src: SourceKind,
) -> BTreeSet<MeterKey> {
    let mut won = BTreeSet::new();
    for k in keys {
        if k.domain.is_billed() && !chosen.contains_key(&k) {
            chosen.insert(k, src);
            won.insert(k);
        }
    }
    won
}

/// Installs the meter a source opened for the keys it won; if opening failed, gives the keys
/// back (a later source may serve them) and records why.
fn install<M: Meter + 'static>(
    opened: Result<M, HostError>,
    won: &BTreeSet<MeterKey>,
    rep: &mut SourceReport,
    chosen: &mut BTreeMap<MeterKey, SourceKind>,
    meters: &mut Vec<Box<dyn Meter>>,
) {
    match opened {
        Ok(m) => {
            rep.available = true;
            meters.push(Box::new(m));
        }
        Err(e) => {
            for k in won {
                chosen.remove(k);
            }
            rep.reason = Some(e.to_string());
        }
    }
}

/// hwmon sensors: Intel GPUs' energy is billed, everything else is listed with why not (see
/// [`crate::hwmon`]).
fn probe_hwmon(
    opts: &ProbeOptions,
    virtualized: bool,
    chosen: &mut BTreeMap<MeterKey, SourceKind>,
    meters: &mut Vec<Box<dyn Meter>>,
    problems: &mut Vec<String>,
) -> SourceReport {
    let mut rep = SourceReport::unused(SourceKind::Hwmon);
    let root = &opts.root;
    let devices = hwmon::scan(root);
    // A declaration that is not used is a problem (`wattd probe`, the start-up log), never
    // silently ignored: its meter is not measured from it (a typo, another kernel's label, a
    // label two channels share).
    problems.extend(hwmon::declaration_problems(&devices, &opts.hwmon_declared));
    if devices.is_empty() {
        rep.reason = Some(format!(
            "no hwmon energy or power sensor under /sys/class/hwmon{}",
            vm_note(virtualized)
        ));
        return rep;
    }
    let mut decisions = hwmon::decide_with(&devices, &opts.hwmon_declared);
    // A meter some earlier source serves is not claimed twice: RAPL's package beside a
    // declared CPU power sensor keeps RAPL, the declaration stands by, whether RAPL reports the
    // package whole or per die.
    for d in decisions.iter_mut().filter(|d| d.status == "chosen") {
        let gpu = d.key.is_some_and(|k| k.domain == Domain::Gpu);
        let served = d.key.and_then(|k| {
            chosen
                .iter()
                .find(|(c, _)| c.domain == k.domain && c.package == k.package)
        });
        if gpu && !opts.gpus {
            d.status = "unusable";
            d.detail = Some("GPUs disabled by configuration ([gpu] enabled = false)".into());
        } else if let Some((c, src)) = served {
            d.status = "standby";
            d.detail = Some(format!("{c} is served by {src}"));
        }
    }
    let (meter, failed) = HwmonMeter::open(root, &decisions, opts.hwmon);
    for d in &decisions {
        let mut z = zone(
            d.key,
            format!(
                "{} ({}{}{})",
                d.channel.file,
                d.name,
                d.channel
                    .label
                    .as_deref()
                    .map(|l| format!(" {l}"))
                    .unwrap_or_default(),
                d.device
                    .as_deref()
                    .map(|a| format!(", {a}"))
                    .unwrap_or_default()
            ),
            d.status,
            d.detail.clone(),
        );
        if let Some((_, e)) = failed
            .iter()
            .find(|(k, _)| d.status == "chosen" && Some(*k) == d.key)
        {
            z.status = "unusable";
            z.detail = Some(e.to_string());
        } else if d.status == "chosen" {
            if let Some(k) = d.key {
                let src = match d.channel.kind {
                    hwmon::ChannelKind::Energy => SourceKind::Hwmon,
                    hwmon::ChannelKind::Power => SourceKind::HwmonPower,
                };
                chosen.insert(k, src);
            }
        }
        if d.channel.kind == hwmon::ChannelKind::Energy {
            z.energy_uj = crate::hostfs::read_u64(&root.join(&d.channel.file), "hwmon sensor").ok();
        }
        rep.zones.push(z);
    }
    match meter {
        Some(m) => {
            rep.available = true;
            meters.push(Box::new(m));
        }
        None => {
            rep.reason = Some("no sensor wattd can bill (each one's detail says why)".into());
        }
    }
    rep
}

fn probe_perf(
    opts: &ProbeOptions,
    topo: Option<&Topology>,
    virtualized: bool,
    chosen: &mut BTreeMap<MeterKey, SourceKind>,
    meters: &mut Vec<Box<dyn Meter>>,
) -> SourceReport {
    let mut rep = SourceReport::unused(SourceKind::PerfPmu);
    let info = match perf_pmu::describe(&opts.root) {
        Ok(i) => i,
        Err(e) => {
            rep.reason = Some(if e.is_not_found() {
                format!(
                    "no perf power PMU ({e}): this kernel or CPU has no RAPL perf events{}",
                    vm_note(virtualized)
                )
            } else {
                e.to_string()
            });
            return rep;
        }
    };
    if !opts.root.is_live() {
        rep.reason = Some(format!(
            "not considered: host root is {}, and perf events are opened on the running kernel, not on a tree",
            opts.root.path().display()
        ));
        return rep;
    }
    let Some(topo) = topo else {
        rep.reason =
            Some("CPU topology unreadable, so counters cannot be mapped to packages".into());
        return rep;
    };
    for s in &info.skipped {
        rep.zones.push(zone(
            None,
            "perf power PMU".into(),
            "unusable",
            Some(s.clone()),
        ));
    }
    // Open every counter once, wait, read again: a counter that does not advance is refused.
    let mut live = Vec::new();
    let mut opened = Vec::new();
    for ev in &info.events {
        for (key, cpu) in perf_pmu::meter_keys(&info, ev, topo) {
            let loc = format!("perf power/{}/ cpu {cpu}", ev.name);
            match perf_pmu::open_counter(info.pmu_type, ev.config, cpu) {
                Ok(mut c) => {
                    let first = c.read().unwrap_or(0);
                    opened.push((key, loc, c, first));
                }
                Err(e) => rep
                    .zones
                    .push(zone(Some(key), loc, "unusable", Some(e.to_string()))),
            }
        }
    }
    if !opened.is_empty() {
        std::thread::sleep(opts.liveness_window);
    }
    for (key, loc, mut c, first) in opened {
        let second = c.read().unwrap_or(first);
        if second == first {
            rep.zones.push(zone(
                Some(key),
                loc,
                "unusable",
                Some(format!(
                    "counter does not advance (reads {second} over {} ms): not supported by this CPU{}",
                    opts.liveness_window.as_millis(),
                    vm_note(virtualized)
                )),
            ));
        } else {
            live.push((key, loc));
        }
    }
    let won = claim(chosen, live.iter().map(|(k, _)| *k), SourceKind::PerfPmu);
    for (key, loc) in live {
        let status = if won.contains(&key) {
            "chosen"
        } else if key.domain.is_billed() {
            "standby"
        } else {
            "informational"
        };
        rep.zones.push(zone(Some(key), loc, status, None));
    }
    if !won.is_empty() {
        install(
            PerfMeter::open(&info, topo, &won),
            &won,
            &mut rep,
            chosen,
            meters,
        );
    } else if rep.reason.is_none() {
        rep.reason = Some(if rep.zones.is_empty() {
            format!(
                "the power PMU lists no energy events{}",
                vm_note(virtualized)
            )
        } else {
            "no usable counter; see zones".into()
        });
    }
    rep
}

fn probe_powercap(
    root: &HostRoot,
    virtualized: bool,
    chosen: &mut BTreeMap<MeterKey, SourceKind>,
    meters: &mut Vec<Box<dyn Meter>>,
) -> SourceReport {
    let mut rep = SourceReport::unused(SourceKind::Powercap);
    let scan = match powercap::scan(root) {
        Ok(s) => s,
        Err(e) => {
            rep.reason = Some(if e.is_not_found() {
                format!(
                    "{e}: the intel_rapl_msr / intel_rapl_common modules are not loaded or the CPU has no RAPL{}",
                    vm_note(virtualized)
                )
            } else {
                e.to_string()
            });
            return rep;
        }
    };
    let usable_keys: Vec<MeterKey> = scan.usable().filter_map(|z| z.key).collect();
    let won = claim(chosen, usable_keys, SourceKind::Powercap);
    for z in &scan.zones {
        let (status, detail) = match &z.verdict {
            ZoneVerdict::Usable => match z.key {
                Some(k) if won.contains(&k) => ("chosen", None),
                Some(k) if k.domain.is_billed() => (
                    "standby",
                    Some(format!(
                        "{} preferred",
                        chosen.get(&k).map_or("another source", |s| s.as_str())
                    )),
                ),
                _ => (
                    "informational",
                    Some("subset of its package; not billed separately".into()),
                ),
            },
            ZoneVerdict::DuplicateOf(of) => (
                "duplicate",
                Some(format!("same domain as {of}; read once, never summed")),
            ),
            ZoneVerdict::NameConflict(d) => ("conflict", Some(d.clone())),
            ZoneVerdict::Unusable(d) => ("unusable", Some(d.clone())),
        };
        let mut zr = zone(z.key, z.path.display().to_string(), status, detail);
        zr.range_uj = z.max_energy_range_uj;
        zr.energy_uj = z.energy_uj;
        rep.zones.push(zr);
    }
    if won.is_empty() {
        rep.reason = Some(if scan.zones.is_empty() {
            format!(
                "no RAPL zones under {}{}",
                root.join(powercap::POWERCAP_DIR).display(),
                vm_note(virtualized)
            )
        } else if scan.usable().next().is_none() {
            "no usable zone; see zones".into()
        } else {
            "every domain it offers is served by a preferred source".into()
        });
        return rep;
    }
    // Open only what was won: the meter filters by key.
    let filtered = powercap::PowercapScan {
        zones: scan
            .zones
            .into_iter()
            .filter(|z| z.key.is_some_and(|k| won.contains(&k)) && z.is_usable())
            .collect(),
    };
    install(
        PowercapMeter::open(&filtered),
        &won,
        &mut rep,
        chosen,
        meters,
    );
    rep
}

fn probe_msr(
    opts: &ProbeOptions,
    cpu: Option<&CpuId>,
    topo: Option<&Topology>,
    virtualized: bool,
    chosen: &mut BTreeMap<MeterKey, SourceKind>,
    meters: &mut Vec<Box<dyn Meter>>,
) -> SourceReport {
    let mut rep = SourceReport::unused(SourceKind::Msr);
    let (Some(cpu), Some(topo)) = (cpu, topo) else {
        rep.reason = Some("CPU identity or topology unknown".into());
        return rep;
    };
    let Some(layout) = msr::layout(cpu) else {
        rep.reason = Some(format!(
            "not supported by this CPU ({:?} family {:#x} model {:#x} has no RAPL MSRs wattd knows)",
            cpu.vendor, cpu.family, cpu.model
        ));
        return rep;
    };
    let (zones, failed) = match msr::scan(&opts.root, topo, &layout) {
        Ok(z) => z,
        Err(e) => {
            rep.reason = Some(match &e {
                HostError::NotFound { .. } => format!(
                    "{e}: the msr module is not loaded (modprobe msr){}",
                    vm_note(virtualized)
                ),
                HostError::Io { source, .. } if source.raw_os_error() == Some(libc::EIO) => {
                    format!(
                        "{e}: the CPU refuses the RAPL unit register, not supported{}",
                        vm_note(virtualized)
                    )
                }
                _ => e.to_string(),
            });
            return rep;
        }
    };
    for (key, e) in failed {
        rep.zones.push(zone(
            Some(key),
            "msr".into(),
            "unusable",
            Some(format!("{e} (EIO: register not supported by this CPU)")),
        ));
    }
    // Liveness: a register that reads the same twice across the window is refused (only on the
    // live host; a tree's MSR files are static by construction).
    let mut live = Vec::new();
    if opts.root.is_live() && !zones.is_empty() {
        std::thread::sleep(opts.liveness_window);
        let again = msr::scan(&opts.root, topo, &layout)
            .map(|(z, _)| z)
            .unwrap_or_default();
        for z in zones {
            let moved = again.iter().any(|a| a.key == z.key && a.raw != z.raw);
            if moved {
                live.push(z);
            } else {
                rep.zones.push(zone(
                    Some(z.key),
                    format!("msr {:#x} cpu {}", z.address, z.cpu),
                    "unusable",
                    Some(format!(
                        "register does not advance over {} ms{}",
                        opts.liveness_window.as_millis(),
                        vm_note(virtualized)
                    )),
                ));
            }
        }
    } else {
        live = zones;
    }
    let won = claim(chosen, live.iter().map(|z| z.key), SourceKind::Msr);
    for z in &live {
        let status = if won.contains(&z.key) {
            "chosen"
        } else if z.key.domain.is_billed() {
            "standby"
        } else {
            "informational"
        };
        let mut zr = zone(
            Some(z.key),
            format!("msr {:#x} cpu {}", z.address, z.cpu),
            status,
            None,
        );
        zr.range_uj = Some(z.unit.total_uj(msr::ENERGY_STATUS_MODULUS as u128) as u64);
        zr.energy_uj = Some(z.unit.total_uj(z.raw as u128) as u64);
        rep.zones.push(zr);
    }
    if won.is_empty() {
        rep.reason = Some(if live.is_empty() {
            format!("no usable register{}", vm_note(virtualized))
        } else {
            "every domain it offers is served by a preferred source".into()
        });
        return rep;
    }
    install(
        MsrMeter::open(&opts.root, &live, &won),
        &won,
        &mut rep,
        chosen,
        meters,
    );
    rep
}

fn probe_estimator(
    opts: &ProbeOptions,
    topo: Option<&Topology>,
    chosen: &mut BTreeMap<MeterKey, SourceKind>,
    meters: &mut Vec<Box<dyn Meter>>,
) -> SourceReport {
    let mut rep = SourceReport::unused(SourceKind::Estimator);
    let Some(topo) = topo else {
        rep.reason = Some("CPU topology unreadable".into());
        return rep;
    };
    if let Err(e) = crate::procstat::ProcStat::read(&opts.root) {
        rep.reason = Some(format!("cannot measure utilisation: {e}"));
        return rep;
    }
    let measured_pkgs: BTreeSet<u32> = chosen
        .keys()
        .filter(|k| k.domain == Domain::Package)
        .filter_map(|k| k.package)
        .collect();
    let missing: Vec<u32> = topo
        .packages()
        .into_iter()
        .filter(|p| !measured_pkgs.contains(p))
        .collect();
    let detail = format!(
        "{} W idle per package + {} W per busy CPU x utilisation from /proc/stat",
        opts.estimator.idle_uw_per_package as f64 / 1e6,
        opts.estimator.busy_uw_per_cpu as f64 / 1e6
    );
    if missing.is_empty() {
        rep.reason = Some("every package has a hardware counter".into());
        return rep;
    }
    if !measured_pkgs.is_empty() {
        // Mixing estimated and measured packages on one host would hide a broken counter.
        rep.reason = Some(format!("packages {missing:?} have no hardware counter while others do: refused, fix the counter"));
        return rep;
    }
    let keys: Vec<MeterKey> = missing
        .iter()
        .map(|&p| MeterKey {
            domain: Domain::Package,
            package: Some(p),
            die: None,
        })
        .collect();
    claim(chosen, keys.iter().copied(), SourceKind::Estimator);
    for k in keys {
        rep.zones.push(zone(
            Some(k),
            "estimator".into(),
            "chosen",
            Some(detail.clone()),
        ));
    }
    rep.available = true;
    meters.push(Box::new(EstimatorMeter::new(
        opts.root.clone(),
        topo,
        opts.estimator,
    )));
    rep
}
