//! CPU topology from sysfs: online CPUs and the package and die each belongs to.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::Serialize;

use crate::error::HostError;
use crate::hostfs::{parse_cpu_list, read_attr, read_u64, HostRoot};

/// One online CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Cpu {
    pub id: u32,
    pub package: u32,
    pub die: u32,
}

/// Online CPUs, sorted by id.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Topology {
    pub cpus: Vec<Cpu>,
}

const CPU_DIR: &str = "sys/devices/system/cpu";

impl Topology {
    /// Reads `<root>/sys/devices/system/cpu`. The `online` list is used when present; otherwise
    /// every `cpuN` directory with a `topology` folder is taken. `die_id` is optional (older
    /// kernels): a missing one means die 0.
    pub fn read(root: &HostRoot) -> Result<Self, HostError> {
        let base = root.join(CPU_DIR);
        let online_path = base.join("online");
        let ids: Vec<u32> = match read_attr(&online_path) {
            Ok(s) => parse_cpu_list(&online_path, &s)?,
            Err(e) if e.is_not_found() => list_cpu_dirs(&base)?,
            Err(e) => return Err(e),
        };
        let mut cpus = Vec::with_capacity(ids.len());
        for id in ids {
            let topo = base.join(format!("cpu{id}/topology"));
            let package = read_id(&topo.join("physical_package_id"))?;
            let die = match read_id(&topo.join("die_id")) {
                Ok(d) => d,
                Err(e) if e.is_not_found() => 0,
                Err(e) => return Err(e),
            };
            cpus.push(Cpu { id, package, die });
        }
        if cpus.is_empty() {
            return Err(HostError::malformed(&base, "no online CPU found"));
        }
        Ok(Topology { cpus })
    }

    pub fn packages(&self) -> BTreeSet<u32> {
        self.cpus.iter().map(|c| c.package).collect()
    }

    pub fn package_of(&self, cpu: u32) -> Option<u32> {
        self.cpus.iter().find(|c| c.id == cpu).map(|c| c.package)
    }

    /// CPUs of each package.
    pub fn cpus_by_package(&self) -> BTreeMap<u32, Vec<u32>> {
        let mut m: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for c in &self.cpus {
            m.entry(c.package).or_default().push(c.id);
        }
        m
    }
}

fn read_id(path: &Path) -> Result<u32, HostError> {
    let v = read_u64(path, crate::error::HINT_GENERIC)?;
    u32::try_from(v).map_err(|_| HostError::malformed(path, format!("id {v} out of range")))
}

fn list_cpu_dirs(base: &Path) -> Result<Vec<u32>, HostError> {
    let rd =
        std::fs::read_dir(base).map_err(|e| HostError::io(base, e, crate::error::HINT_GENERIC))?;
    let mut ids = Vec::new();
    for entry in rd.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(num) = name.strip_prefix("cpu") else {
            continue;
        };
        if num.is_empty() || num.len() > 6 || !num.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if entry.path().join("topology").is_dir() {
            if let Ok(id) = num.parse() {
                ids.push(id);
            }
        }
    }
    ids.sort_unstable();
    Ok(ids)
}
