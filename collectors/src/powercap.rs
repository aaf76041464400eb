//! RAPL through the powercap sysfs class (`/sys/class/powercap`): every control type
//! (`intel-rapl`, `intel-rapl-mmio`, `intel-rapl-tpmi`), zones identified by their `name` file
//! and never by the directory index (which is an allocation number, printed in hex), duplicates of
//! one package across control types read once, counters read through kept-open descriptors.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use crate::counter::{EnergyCounter, EnergyUnit};
use crate::domain::{Domain, DomainReading, Meter, MeterKey, Quality, SourceKind};
use crate::error::{HostError, HINT_ENERGY_UJ, HINT_GENERIC};
use crate::hostfs::{read_attr, read_u64, HostRoot, KeptFile};

/// The class directory, relative to the host root.
pub const POWERCAP_DIR: &str = "sys/class/powercap";

/// RAPL control types, most preferred first: when two report the same package, the first wins.
/// `intel-rapl` (MSR-backed) has every subzone; TPMI is its successor on new servers; MMIO
/// usually mirrors the package zone only.
pub const CONTROL_TYPES: [&str; 3] = ["intel-rapl", "intel-rapl-tpmi", "intel-rapl-mmio"];

/// The safety factor applied to a zone's maximum power to get its physical ceiling.
pub const CEILING_SAFETY_FACTOR: u64 = 3;

/// What became of one zone directory.
#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case", tag = "status", content = "detail")]
pub enum ZoneVerdict {
    /// Read once per tick.
    Usable,
    /// The same domain of the same package is read through a preferred control type.
    DuplicateOf(String),
    /// Another zone of the same control type claims the same name: both are refused, because
    /// which one is real cannot be known.
    NameConflict(String),
    /// Could not be used; the error names the file.
    Unusable(String),
}

/// One zone directory as found.
#[derive(Debug, Serialize)]
pub struct Zone {
    pub dir_name: String,
    #[serde(skip)]
    pub path: PathBuf,
    pub control_type: String,
    pub name: Option<String>,
    pub key: Option<MeterKey>,
    pub parent: Option<String>,
    pub max_energy_range_uj: Option<u64>,
    pub energy_uj: Option<u64>,
    pub max_power_uw: Option<u64>,
    pub verdict: ZoneVerdict,
    /// The typed error behind `Unusable`, for callers that branch on it.
    #[serde(skip)]
    pub error: Option<HostError>,
}

impl Zone {
    pub fn is_usable(&self) -> bool {
        matches!(self.verdict, ZoneVerdict::Usable)
    }
}

/// The result of scanning the powercap class.
#[derive(Debug, Serialize)]
pub struct PowercapScan {
    pub zones: Vec<Zone>,
}

impl PowercapScan {
    pub fn usable(&self) -> impl Iterator<Item = &Zone> {
        self.zones.iter().filter(|z| z.is_usable())
    }
}

/// Splits `intel-rapl:0:a` into (`intel-rapl`, [0, 10]). Indexes are hex.
fn parse_dir_name(name: &str) -> Option<(&str, Vec<u32>)> {
    let mut parts = name.split(':');
    let ctype = parts.next()?;
    let mut idx = Vec::new();
    for p in parts {
        if p.is_empty() || p.len() > 8 {
            return None;
        }
        idx.push(u32::from_str_radix(p, 16).ok()?);
    }
    if idx.is_empty() {
        return None;
    }
    Some((ctype, idx))
}

/// What a zone's `name` says about its domain and location.
#[derive(Debug, PartialEq, Eq)]
enum ZoneName {
    Package { package: u32, die: Option<u32> },
    Sub(Domain),
    Psys,
}

fn parse_zone_name(name: &str) -> Option<ZoneName> {
    match name {
        "core" => return Some(ZoneName::Sub(Domain::Core)),
        "uncore" => return Some(ZoneName::Sub(Domain::Uncore)),
        "dram" => return Some(ZoneName::Sub(Domain::Dram)),
        "psys" => return Some(ZoneName::Psys),
        _ => {}
    }
    let rest = name.strip_prefix("package-")?;
    let num = |s: &str| -> Option<u32> {
        if s.is_empty() || s.len() > 6 || !s.bytes().all(|b| b.is_ascii_digit()) {
            None
        } else {
            s.parse().ok()
        }
    };
    match rest.split_once("-die-") {
        Some((p, d)) => Some(ZoneName::Package {
            package: num(p)?,
            die: Some(num(d)?),
        }),
        None => Some(ZoneName::Package {
            package: num(rest)?,
            die: None,
        }),
    }
}

struct RawZone {
    dir_name: String,
    path: PathBuf,
    control_type: String,
    indexes: Vec<u32>,
    name: Option<String>,
    zone_name: Option<ZoneName>,
    range: Option<u64>,
    energy: Option<u64>,
    max_power_uw: Option<u64>,
    error: Option<HostError>,
}

/// Scans `<root>/sys/class/powercap`. Fails only when the class directory itself cannot be
/// listed (module not loaded, not permitted); every per-zone problem is recorded on its zone.
pub fn scan(root: &HostRoot) -> Result<PowercapScan, HostError> {
    let class = root.join(POWERCAP_DIR);
    let rd = std::fs::read_dir(&class).map_err(|e| HostError::io(&class, e, HINT_GENERIC))?;
    let mut raws = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| HostError::io(&class, e, HINT_GENERIC))?;
        let Some(dir_name) = entry.file_name().to_str().map(str::to_owned) else {
            continue; // not UTF-8: no RAPL zone is named so
        };
        let Some((ctype, indexes)) = parse_dir_name(&dir_name) else {
            continue; // a control-type directory (`intel-rapl`) or something else
        };
        if !CONTROL_TYPES.contains(&ctype) {
            continue;
        }
        let control_type = ctype.to_owned();
        raws.push(read_zone(entry.path(), dir_name, control_type, indexes));
    }
    raws.sort_by(|a, b| (&a.control_type, &a.indexes).cmp(&(&b.control_type, &b.indexes)));
    Ok(PowercapScan {
        zones: resolve(raws),
    })
}

fn read_zone(path: PathBuf, dir_name: String, control_type: String, indexes: Vec<u32>) -> RawZone {
    let mut z = RawZone {
        dir_name,
        path,
        control_type,
        indexes,
        name: None,
        zone_name: None,
        range: None,
        energy: None,
        max_power_uw: None,
        error: None,
    };
    let name_path = z.path.join("name");
    match read_attr(&name_path) {
        Ok(n) => {
            z.zone_name = parse_zone_name(&n);
            if z.zone_name.is_none() {
                z.error = Some(HostError::malformed(
                    &name_path,
                    format!("unknown zone name {}", crate::error::Shown::new(&n)),
                ));
            }
            z.name = Some(n);
        }
        Err(e) => z.error = Some(e),
    }
    let range_path = z.path.join("max_energy_range_uj");
    match read_u64(&range_path, HINT_GENERIC) {
        Ok(0) => set_err(&mut z.error, HostError::ZeroRange { path: range_path }),
        Ok(r) => z.range = Some(r),
        Err(e) => set_err(&mut z.error, e),
    }
    let energy_path = z.path.join("energy_uj");
    match read_u64(&energy_path, HINT_ENERGY_UJ) {
        Ok(v) => {
            z.energy = Some(v);
            if let Some(r) = z.range {
                if v > r {
                    set_err(
                        &mut z.error,
                        HostError::AboveRange {
                            path: energy_path,
                            energy_uj: v,
                            range_uj: r,
                        },
                    );
                }
            }
        }
        Err(e) => set_err(&mut z.error, e),
    }
    // The largest declared maximum power over the zone's constraints; unreadable ones ignored.
    z.max_power_uw = (0..8)
        .filter_map(|i| {
            read_u64(
                &z.path.join(format!("constraint_{i}_max_power_uw")),
                HINT_GENERIC,
            )
            .ok()
        })
        .filter(|&w| w > 0)
        .max();
    z
}

fn set_err(slot: &mut Option<HostError>, e: HostError) {
    if slot.is_none() {
        *slot = Some(e);
    }
}

fn resolve(raws: Vec<RawZone>) -> Vec<Zone> {
    // Keys of top-level zones, for their subzones.
    let mut parent_key: BTreeMap<String, Option<(u32, Option<u32>)>> = BTreeMap::new();
    for r in &raws {
        if let (1, Some(ZoneName::Package { package, die })) = (r.indexes.len(), &r.zone_name) {
            parent_key.insert(r.dir_name.clone(), Some((*package, *die)));
        }
    }
    let mut zones: Vec<Zone> = raws
        .into_iter()
        .map(|r| {
            let parent = (r.indexes.len() > 1)
                .then(|| r.dir_name.rsplit_once(':').map(|(p, _)| p.to_owned()))
                .flatten();
            let mut error = r.error;
            let key = match (&r.zone_name, &parent) {
                (Some(ZoneName::Package { package, die }), None) => Some(MeterKey {
                    domain: Domain::Package,
                    package: Some(*package),
                    die: *die,
                }),
                (Some(ZoneName::Psys), None) => Some(MeterKey {
                    domain: Domain::Psys,
                    package: None,
                    die: None,
                }),
                (Some(ZoneName::Sub(d)), Some(p)) => match parent_key.get(p) {
                    Some(Some((package, die))) => Some(MeterKey {
                        domain: *d,
                        package: Some(*package),
                        die: *die,
                    }),
                    _ => {
                        set_err(
                            &mut error,
                            HostError::malformed(
                                &r.path,
                                format!("parent zone {p} is missing or not a package"),
                            ),
                        );
                        None
                    }
                },
                (Some(_), _) if error.is_none() => {
                    set_err(
                        &mut error,
                        HostError::malformed(
                            &r.path.join("name"),
                            "zone name does not fit its place in the hierarchy",
                        ),
                    );
                    None
                }
                _ => None,
            };
            let verdict = match &error {
                Some(e) => ZoneVerdict::Unusable(e.to_string()),
                None => ZoneVerdict::Usable,
            };
            Zone {
                dir_name: r.dir_name,
                path: r.path,
                control_type: r.control_type,
                name: r.name,
                key,
                parent,
                max_energy_range_uj: r.range,
                energy_uj: r.energy,
                max_power_uw: r.max_power_uw,
                verdict,
                error,
            }
        })
        .collect();

    // Two usable zones of one control type with one key: refuse both.
    let mut by_type_key: BTreeMap<(String, MeterKey), Vec<usize>> = BTreeMap::new();
    for (i, z) in zones.iter().enumerate() {
        if let (true, Some(k)) = (z.is_usable(), z.key) {
            by_type_key
                .entry((z.control_type.clone(), k))
                .or_default()
                .push(i);
        }
    }
    for idxs in by_type_key.values().filter(|v| v.len() > 1) {
        let names: Vec<String> = idxs.iter().map(|&i| zones[i].dir_name.clone()).collect();
        for &i in idxs {
            let others: Vec<&str> = names
                .iter()
                .filter(|n| **n != zones[i].dir_name)
                .map(String::as_str)
                .collect();
            zones[i].verdict = ZoneVerdict::NameConflict(format!(
                "{} claims the same name {:?} as {}",
                zones[i].dir_name,
                zones[i].name.as_deref().unwrap_or(""),
                others.join(", ")
            ));
        }
    }

    // Across control types: keep the most preferred, mark the rest as duplicates.
    let mut by_key: BTreeMap<MeterKey, Vec<usize>> = BTreeMap::new();
    for (i, z) in zones.iter().enumerate() {
        if let (true, Some(k)) = (z.is_usable(), z.key) {
            by_key.entry(k).or_default().push(i);
        }
    }
    for idxs in by_key.values().filter(|v| v.len() > 1) {
        let rank = |i: &usize| {
            CONTROL_TYPES
                .iter()
                .position(|t| *t == zones[*i].control_type)
                .unwrap_or(usize::MAX)
        };
        let Some(&keep) = idxs.iter().min_by_key(|i| rank(i)) else {
            continue;
        };
        let keep_name = zones[keep].dir_name.clone();
        for &i in idxs.iter().filter(|&&i| i != keep) {
            zones[i].verdict = ZoneVerdict::DuplicateOf(keep_name.clone());
        }
    }
    zones
}

#[derive(Debug)]
struct OpenZone {
    key: MeterKey,
    file: KeptFile,
    range_uj: u64,
    counter: EnergyCounter,
}

/// The usable billed zones of a scan, kept open and read once per tick.
#[derive(Debug)]
pub struct PowercapMeter {
    zones: Vec<OpenZone>,
}

impl PowercapMeter {
    /// Opens every usable zone of a billed domain (package, dram, psys). Core and uncore are
    /// subsets of their package and are not read per tick.
    pub fn open(scan: &PowercapScan) -> Result<Self, HostError> {
        let mut zones = Vec::new();
        for z in scan.usable() {
            let (Some(key), Some(range_uj)) = (z.key, z.max_energy_range_uj) else {
                continue;
            };
            if !key.domain.is_billed() {
                continue;
            }
            let file = KeptFile::open(&z.path.join("energy_uj"), HINT_ENERGY_UJ)?;
            let max_uw = z
                .max_power_uw
                .unwrap_or(key.domain.default_max_watts() * 1_000_000);
            let counter = EnergyCounter::new(
                Some(range_uj.saturating_add(1)),
                EnergyUnit::MicroJoule,
                max_uw.saturating_mul(CEILING_SAFETY_FACTOR),
            );
            zones.push(OpenZone {
                key,
                file,
                range_uj,
                counter,
            });
        }
        Ok(PowercapMeter { zones })
    }

    pub fn len(&self) -> usize {
        self.zones.len()
    }

    pub fn is_empty(&self) -> bool {
        self.zones.is_empty()
    }
}

impl Meter for PowercapMeter {
    fn source(&self) -> SourceKind {
        SourceKind::Powercap
    }

    fn keys(&self) -> Vec<MeterKey> {
        self.zones.iter().map(|z| z.key).collect()
    }

    fn read(&mut self, elapsed_us: u64, out: &mut Vec<DomainReading>) {
        for z in &mut self.zones {
            let sample = read_one(z, elapsed_us);
            if sample.is_err() {
                z.counter.invalidate();
            }
            out.push(DomainReading {
                key: z.key,
                source: SourceKind::Powercap,
                quality: Quality::Measured,
                sample,
            });
        }
    }
}

fn read_one(z: &mut OpenZone, elapsed_us: u64) -> Result<crate::counter::CounterSample, HostError> {
    let raw = z.file.read_u64()?;
    if raw > z.range_uj {
        return Err(HostError::AboveRange {
            path: z.file.path().to_owned(),
            energy_uj: raw,
            range_uj: z.range_uj,
        });
    }
    z.counter
        .update(raw, elapsed_us)
        .map_err(|e| HostError::malformed(z.file.path(), e.to_string()))
}
