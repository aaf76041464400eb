//! RAPL through the perf `power` PMU: 64-bit counters that never wrap, readable with
//! CAP_PERFMON. The PMU's type, cpumask, events and their `.scale`/`.unit` come from sysfs under
//! the host root; counters are opened on the running kernel, one per package CPU.

use std::collections::BTreeSet;
use std::path::Path;

use perf_event::events::Event;
use perf_event::Builder;
use serde::Serialize;

use crate::counter::{EnergyCounter, EnergyUnit};
use crate::domain::{Domain, DomainReading, Meter, MeterKey, Quality, SourceKind};
use crate::error::{HostError, Shown, HINT_GENERIC, HINT_PERF};
use crate::hostfs::{parse_cpu_list, read_attr, HostRoot};
use crate::topology::Topology;

/// The PMU's directory, relative to the host root.
pub const PMU_DIR: &str = "sys/bus/event_source/devices/power";

/// One `energy-*` event the PMU advertises.
#[derive(Clone, Debug, Serialize)]
pub struct PmuEvent {
    pub name: String,
    pub domain: Domain,
    pub config: u64,
    pub scale_joules: f64,
    pub unit: EnergyUnit,
}

/// What sysfs says about the power PMU.
#[derive(Clone, Debug, Serialize)]
pub struct PmuInfo {
    pub pmu_type: u32,
    pub cpumask: Vec<u32>,
    pub events: Vec<PmuEvent>,
    /// Events present but not usable, with the reason.
    pub skipped: Vec<String>,
}

fn event_domain(name: &str) -> Option<Domain> {
    match name {
        "energy-pkg" => Some(Domain::Package),
        "energy-cores" => Some(Domain::Core),
        "energy-gpu" => Some(Domain::Uncore),
        "energy-ram" => Some(Domain::Dram),
        "energy-psys" => Some(Domain::Psys),
        _ => None,
    }
}

/// Parses an event file such as `event=0x02` into its config value.
pub fn parse_event_config(path: &Path, s: &str) -> Result<u64, HostError> {
    for term in s.trim().split(',') {
        if let Some(v) = term.trim().strip_prefix("event=") {
            let v = v.trim();
            let parsed = match v.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => v.parse(),
            };
            return parsed.map_err(|_| {
                HostError::malformed(path, format!("bad event value {}", Shown::new(v)))
            });
        }
    }
    Err(HostError::malformed(
        path,
        format!("no event= term in {}", Shown::new(s)),
    ))
}

/// Reads the PMU description. `NotFound` means the PMU is absent (no `intel_rapl_perf`/`rapl`
/// support in this kernel or CPU).
pub fn describe(root: &HostRoot) -> Result<PmuInfo, HostError> {
    let dir = root.join(PMU_DIR);
    let type_path = dir.join("type");
    let pmu_type = u32::try_from(crate::hostfs::read_u64(&type_path, HINT_GENERIC)?)
        .map_err(|_| HostError::malformed(&type_path, "type does not fit 32 bits"))?;
    let cpumask_path = dir.join("cpumask");
    let cpumask = parse_cpu_list(&cpumask_path, &read_attr(&cpumask_path)?)?;
    let events_dir = dir.join("events");
    let rd =
        std::fs::read_dir(&events_dir).map_err(|e| HostError::io(&events_dir, e, HINT_GENERIC))?;
    let mut names: Vec<String> = rd
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|n| n.starts_with("energy-") && !n.contains('.'))
        .collect();
    names.sort();
    let mut events = Vec::new();
    let mut skipped = Vec::new();
    for name in names {
        let Some(domain) = event_domain(&name) else {
            skipped.push(format!("{name}: unknown energy event"));
            continue;
        };
        let parsed = (|| -> Result<PmuEvent, HostError> {
            let p = events_dir.join(&name);
            let config = parse_event_config(&p, &read_attr(&p)?)?;
            let sp = events_dir.join(format!("{name}.scale"));
            let scale_s = read_attr(&sp)?;
            let scale: f64 = scale_s
                .parse()
                .ok()
                .filter(|v: &f64| v.is_finite() && *v > 0.0 && *v < 1.0)
                .ok_or_else(|| {
                    HostError::malformed(&sp, format!("bad scale {}", Shown::new(&scale_s)))
                })?;
            let up = events_dir.join(format!("{name}.unit"));
            let unit_s = read_attr(&up)?;
            if unit_s != "Joules" {
                return Err(HostError::malformed(
                    &up,
                    format!("unit {} is not Joules", Shown::new(&unit_s)),
                ));
            }
            Ok(PmuEvent {
                name: name.clone(),
                domain,
                config,
                scale_joules: scale,
                unit: EnergyUnit::from_joule_scale(scale),
            })
        })();
        match parsed {
            Ok(ev) => events.push(ev),
            Err(e) => skipped.push(e.to_string()),
        }
    }
    Ok(PmuInfo {
        pmu_type,
        cpumask,
        events,
        skipped,
    })
}

/// A raw event of a dynamic PMU: type and config.
#[derive(Clone, Copy, Debug)]
struct PowerEvent {
    pmu_type: u32,
    config: u64,
}

impl Event for PowerEvent {
    fn update_attrs(self, attr: &mut perf_event_open_sys::bindings::perf_event_attr) {
        attr.type_ = self.pmu_type;
        attr.config = self.config;
    }
}

/// The meters one PMU event gives: one per package (the cpumask lists one CPU per package), or
/// one for the platform (`psys`).
pub fn meter_keys(info: &PmuInfo, ev: &PmuEvent, topo: &Topology) -> Vec<(MeterKey, u32)> {
    if ev.domain == Domain::Psys {
        return info
            .cpumask
            .first()
            .map(|&cpu| {
                vec![(
                    MeterKey {
                        domain: Domain::Psys,
                        package: None,
                        die: None,
                    },
                    cpu,
                )]
            })
            .unwrap_or_default();
    }
    let mut seen = BTreeSet::new();
    info.cpumask
        .iter()
        .filter_map(|&cpu| {
            let pkg = topo.package_of(cpu)?;
            seen.insert(pkg).then_some((
                MeterKey {
                    domain: ev.domain,
                    package: Some(pkg),
                    die: None,
                },
                cpu,
            ))
        })
        .collect()
}

#[derive(Debug)]
struct OpenCounter {
    key: MeterKey,
    counter: perf_event::Counter,
    energy: EnergyCounter,
    what: String,
}

/// Open perf counters for the chosen keys.
#[derive(Debug)]
pub struct PerfMeter {
    counters: Vec<OpenCounter>,
}

/// Opens one counter on `cpu`.
pub fn open_counter(
    pmu_type: u32,
    config: u64,
    cpu: u32,
) -> Result<perf_event::Counter, HostError> {
    let what = format!("perf_event_open(power type {pmu_type} config {config:#x} cpu {cpu})");
    let mut c = Builder::new(PowerEvent { pmu_type, config })
        .one_cpu(cpu as usize)
        .any_pid()
        .include_kernel()
        .include_hv()
        .exclude_idle(false)
        .build()
        .map_err(|e| HostError::io(Path::new(&what), e, HINT_PERF))?;
    c.enable()
        .map_err(|e| HostError::io(Path::new(&what), e, HINT_PERF))?;
    Ok(c)
}

impl PerfMeter {
    /// Opens a counter for every event whose meter key is in `wanted`.
    pub fn open(
        info: &PmuInfo,
        topo: &Topology,
        wanted: &BTreeSet<MeterKey>,
    ) -> Result<Self, HostError> {
        let mut counters = Vec::new();
        for ev in &info.events {
            for (key, cpu) in meter_keys(info, ev, topo) {
                if !wanted.contains(&key) {
                    continue;
                }
                let counter = open_counter(info.pmu_type, ev.config, cpu)?;
                counters.push(OpenCounter {
                    key,
                    counter,
                    energy: EnergyCounter::new(
                        None,
                        ev.unit,
                        key.domain.default_max_watts()
                            * 1_000_000
                            * crate::powercap::CEILING_SAFETY_FACTOR,
                    ),
                    what: format!("perf {} cpu {cpu}", ev.name),
                });
            }
        }
        Ok(PerfMeter { counters })
    }
}

impl Meter for PerfMeter {
    fn source(&self) -> SourceKind {
        SourceKind::PerfPmu
    }

    fn keys(&self) -> Vec<MeterKey> {
        self.counters.iter().map(|c| c.key).collect()
    }

    fn read(&mut self, elapsed_us: u64, out: &mut Vec<DomainReading>) {
        for c in &mut self.counters {
            let sample = c
                .counter
                .read()
                .map_err(|e| HostError::io(Path::new(&c.what), e, HINT_PERF))
                .and_then(|raw| {
                    c.energy
                        .update(raw, elapsed_us)
                        .map_err(|e| HostError::malformed(Path::new(&c.what), e.to_string()))
                });
            if sample.is_err() {
                c.energy.invalidate();
            }
            out.push(DomainReading {
                key: c.key,
                source: SourceKind::PerfPmu,
                quality: Quality::Measured,
                sample,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_config_forms() {
        let p = Path::new("events/energy-pkg");
        assert_eq!(parse_event_config(p, "event=0x02\n").unwrap(), 2);
        assert_eq!(parse_event_config(p, "event=5").unwrap(), 5);
        assert!(parse_event_config(p, "umask=0x1").is_err());
        assert!(parse_event_config(p, "event=0xzz").is_err());
    }
}
