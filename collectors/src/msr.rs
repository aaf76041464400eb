//! RAPL through model-specific registers (`/dev/cpu/N/msr`, CAP_SYS_RAWIO, the `msr` module):
//! Intel and AMD register addresses, energy-unit decoding, the fixed DRAM unit of Intel's server
//! parts, and the 32-bit wrap. Decoding is pure; reading is one pread per register.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde::Serialize;

use crate::counter::{EnergyCounter, EnergyUnit};
use crate::domain::{Domain, DomainReading, Meter, MeterKey, Quality, SourceKind};
use crate::error::{HostError, HINT_MSR};
use crate::hostfs::{read_bounded, HostRoot, KeptFile};
use crate::topology::Topology;

pub const INTEL_RAPL_POWER_UNIT: u32 = 0x606;
pub const INTEL_PKG_ENERGY_STATUS: u32 = 0x611;
pub const INTEL_DRAM_ENERGY_STATUS: u32 = 0x619;
pub const INTEL_PP0_ENERGY_STATUS: u32 = 0x639;
pub const INTEL_PP1_ENERGY_STATUS: u32 = 0x641;
pub const INTEL_PLATFORM_ENERGY_STATUS: u32 = 0x64D;
pub const AMD_RAPL_POWER_UNIT: u32 = 0xC001_0299;
pub const AMD_CORE_ENERGY_STATUS: u32 = 0xC001_029A;
pub const AMD_PKG_ENERGY_STATUS: u32 = 0xC001_029B;

/// Energy status registers are 32 bits wide: they count modulo 2^32 units.
pub const ENERGY_STATUS_MODULUS: u64 = 1 << 32;

/// The energy unit on Intel server parts whose DRAM domain ignores the unit register: 2^-16 J
/// (15.3 uJ), per Intel's datasheets for these parts and Linux's `rapl_defaults_hsw_server`.
pub const DRAM_FIXED_ESU: u8 = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Vendor {
    Intel,
    Amd,
    Hygon,
    Other,
}

/// What `/proc/cpuinfo` says about the first CPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CpuId {
    pub vendor: Vendor,
    pub family: u32,
    pub model: u32,
    pub model_name: String,
    /// The `hypervisor` flag: running in a virtual machine.
    pub virtualized: bool,
}

impl CpuId {
    pub fn read(root: &HostRoot) -> Result<Self, HostError> {
        let path = root.join("proc/cpuinfo");
        let s = read_bounded(
            &path,
            crate::hostfs::LARGE_FILE_MAX,
            crate::error::HINT_GENERIC,
        )?;
        Self::parse(&path, &s)
    }

    /// Parses `/proc/cpuinfo` (procfs-core's reader) and keeps what the first CPU says: RAPL
    /// layouts do not mix vendors on one host.
    pub fn parse(path: &std::path::Path, s: &str) -> Result<Self, HostError> {
        use procfs_core::FromBufRead as _;
        let info = procfs_core::CpuInfo::from_buf_read(s.as_bytes())
            .map_err(|e| HostError::malformed(path, e.to_string()))?;
        let field = |name: &str| info.get_field(0, name);
        let vendor = field("vendor_id").map(|v| match v {
            "GenuineIntel" => Vendor::Intel,
            "AuthenticAMD" => Vendor::Amd,
            "HygonGenuine" => Vendor::Hygon,
            _ => Vendor::Other,
        });
        let family = field("cpu family").and_then(|v| v.parse().ok());
        let model = field("model").and_then(|v| v.parse().ok());
        let model_name = field("model name")
            .map(|v| v.chars().take(128).collect())
            .unwrap_or_default();
        let virtualized =
            field("flags").is_some_and(|v| v.split_ascii_whitespace().any(|f| f == "hypervisor"));
        match (vendor, family, model) {
            (Some(vendor), Some(family), Some(model)) => Ok(CpuId {
                vendor,
                family,
                model,
                model_name,
                virtualized,
            }),
            _ => Err(HostError::malformed(
                path,
                "no vendor_id, cpu family and model",
            )),
        }
    }
}

/// One energy status register and where it is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct EnergyRegister {
    pub domain: Domain,
    pub address: u32,
    /// The energy-status-unit exponent to use for this register, when fixed regardless of the
    /// unit register.
    pub fixed_esu: Option<u8>,
}

/// The RAPL register layout of a CPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Layout {
    pub unit_register: u32,
    pub registers: Vec<EnergyRegister>,
}

/// Intel server models whose DRAM energy unit is fixed at 2^-16 J.
pub fn intel_dram_unit_is_fixed(family: u32, model: u32) -> bool {
    family == 6
        && matches!(
            model,
            0x3F // Haswell-X
                | 0x4F // Broadwell-X
                | 0x56 // Broadwell-D
                | 0x55 // Skylake-X / Cascade Lake / Cooper Lake
                | 0x57 // Xeon Phi Knights Landing
                | 0x85 // Xeon Phi Knights Mill
                | 0x6A // Ice Lake-X
                | 0x6C // Ice Lake-D
                | 0x8F // Sapphire Rapids-X
                | 0xCF // Emerald Rapids-X
        )
}

/// The registers to read on this CPU, or `None` when its vendor has no RAPL MSRs we know.
pub fn layout(cpu: &CpuId) -> Option<Layout> {
    match cpu.vendor {
        Vendor::Intel if cpu.family == 6 => {
            let dram_esu =
                intel_dram_unit_is_fixed(cpu.family, cpu.model).then_some(DRAM_FIXED_ESU);
            let reg = |domain, address, fixed_esu| EnergyRegister {
                domain,
                address,
                fixed_esu,
            };
            Some(Layout {
                unit_register: INTEL_RAPL_POWER_UNIT,
                registers: vec![
                    reg(Domain::Package, INTEL_PKG_ENERGY_STATUS, None),
                    reg(Domain::Core, INTEL_PP0_ENERGY_STATUS, None),
                    reg(Domain::Uncore, INTEL_PP1_ENERGY_STATUS, None),
                    reg(Domain::Dram, INTEL_DRAM_ENERGY_STATUS, dram_esu),
                    reg(Domain::Psys, INTEL_PLATFORM_ENERGY_STATUS, None),
                ],
            })
        }
        // Zen and later (family 17h+), and Hygon's Zen derivative (18h).
        Vendor::Amd if cpu.family >= 0x17 => Some(amd_layout()),
        Vendor::Hygon if cpu.family == 0x18 => Some(amd_layout()),
        _ => None,
    }
}

fn amd_layout() -> Layout {
    Layout {
        unit_register: AMD_RAPL_POWER_UNIT,
        registers: vec![
            EnergyRegister {
                domain: Domain::Package,
                address: AMD_PKG_ENERGY_STATUS,
                fixed_esu: None,
            },
            EnergyRegister {
                domain: Domain::Core,
                address: AMD_CORE_ENERGY_STATUS,
                fixed_esu: None,
            },
        ],
    }
}

/// The energy status unit exponent (bits 12:8 of the unit register): one count is 2^-ESU J.
pub fn energy_status_unit(unit_register_value: u64) -> u8 {
    ((unit_register_value >> 8) & 0x1F) as u8
}

/// The raw count of an energy status register (bits 31:0; the upper bits are reserved).
pub fn energy_count(register_value: u64) -> u64 {
    register_value & 0xFFFF_FFFF
}

/// The MSR device of a CPU under the root.
pub fn msr_path(root: &HostRoot, cpu: u32) -> PathBuf {
    root.join(format!("dev/cpu/{cpu}/msr"))
}

/// A readable register: its meter key, the CPU it is read on, and its unit.
#[derive(Clone, Debug, Serialize)]
pub struct MsrZone {
    pub key: MeterKey,
    pub cpu: u32,
    pub address: u32,
    pub unit: EnergyUnit,
    pub raw: u64,
}

/// Readable zones, and the registers that failed with their errors.
pub type MsrScan = (Vec<MsrZone>, Vec<(MeterKey, HostError)>);

/// Probes every register of the layout on the first CPU of each package. Returns the readable
/// zones and, per register that failed, the error (EIO means "not supported by this CPU").
pub fn scan(root: &HostRoot, topo: &Topology, layout: &Layout) -> Result<MsrScan, HostError> {
    let mut zones = Vec::new();
    let mut failed = Vec::new();
    for (pkg, cpus) in topo.cpus_by_package() {
        let Some(&cpu) = cpus.first() else { continue };
        let dev = KeptFile::open(&msr_path(root, cpu), HINT_MSR)?;
        let esu = energy_status_unit(dev.read_u64_at(layout.unit_register as u64)?);
        for reg in &layout.registers {
            let is_psys = reg.domain == Domain::Psys;
            if is_psys && pkg != topo.packages().first().copied().unwrap_or(pkg) {
                continue; // platform-wide: read once
            }
            let key = MeterKey {
                domain: reg.domain,
                package: (!is_psys).then_some(pkg),
                die: None,
            };
            match dev.read_u64_at(reg.address as u64) {
                Ok(v) => zones.push(MsrZone {
                    key,
                    cpu,
                    address: reg.address,
                    unit: EnergyUnit::PowTwoJoule(reg.fixed_esu.unwrap_or(esu)),
                    raw: energy_count(v),
                }),
                Err(e) => failed.push((key, e)),
            }
        }
    }
    Ok((zones, failed))
}

#[derive(Debug)]
struct OpenReg {
    key: MeterKey,
    dev: KeptFile,
    address: u32,
    counter: EnergyCounter,
}

/// Open MSR devices for the chosen keys.
#[derive(Debug)]
pub struct MsrMeter {
    regs: Vec<OpenReg>,
}

impl MsrMeter {
    pub fn open(
        root: &HostRoot,
        zones: &[MsrZone],
        wanted: &BTreeSet<MeterKey>,
    ) -> Result<Self, HostError> {
        let mut devs: BTreeMap<u32, PathBuf> = BTreeMap::new();
        let mut regs = Vec::new();
        for z in zones.iter().filter(|z| wanted.contains(&z.key)) {
            let path = devs
                .entry(z.cpu)
                .or_insert_with(|| msr_path(root, z.cpu))
                .clone();
            regs.push(OpenReg {
                key: z.key,
                dev: KeptFile::open(&path, HINT_MSR)?,
                address: z.address,
                counter: EnergyCounter::new(
                    Some(ENERGY_STATUS_MODULUS),
                    z.unit,
                    z.key.domain.default_max_watts()
                        * 1_000_000
                        * crate::powercap::CEILING_SAFETY_FACTOR,
                ),
            });
        }
        Ok(MsrMeter { regs })
    }
}

impl Meter for MsrMeter {
    fn source(&self) -> SourceKind {
        SourceKind::Msr
    }

    fn keys(&self) -> Vec<MeterKey> {
        self.regs.iter().map(|r| r.key).collect()
    }

    fn read(&mut self, elapsed_us: u64, out: &mut Vec<DomainReading>) {
        for r in &mut self.regs {
            let sample = r.dev.read_u64_at(r.address as u64).and_then(|v| {
                r.counter
                    .update(energy_count(v), elapsed_us)
                    .map_err(|e| HostError::malformed(r.dev.path(), e.to_string()))
            });
            if sample.is_err() {
                r.counter.invalidate();
            }
            out.push(DomainReading {
                key: r.key,
                source: SourceKind::Msr,
                quality: Quality::Measured,
                sample,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values worked out by hand from the vendors' register definitions.
    #[test]
    fn unit_decoding_by_hand() {
        // Intel SDM vol. 4, MSR_RAPL_POWER_UNIT: power units 3:0, energy 12:8, time 19:16.
        // 0x000A0E03: power 1/8 W, energy 2^-14 J (0x0E = 14), time 2^-10 s.
        assert_eq!(energy_status_unit(0x000A_0E03), 14);
        // One count at ESU 14 is 61.03515625 uJ: 16384 counts are exactly one joule.
        assert_eq!(EnergyUnit::PowTwoJoule(14).total_uj(16_384), 1_000_000);
        // AMD PPR, Core::X86::Msr::RAPL_PWR_UNIT 0x000A1003: energy 2^-16 J (0x10 = 16).
        assert_eq!(energy_status_unit(0x000A_1003), 16);
        assert_eq!(EnergyUnit::PowTwoJoule(16).total_uj(65_536), 1_000_000);
        // 15.2587890625 uJ per count: 1000 counts = 15258 uJ rounded down.
        assert_eq!(EnergyUnit::PowTwoJoule(16).total_uj(1000), 15_258);
        // Reserved bits above 12:8 are ignored.
        assert_eq!(energy_status_unit(0xFFFF_E0FF), 0);
        assert_eq!(energy_status_unit(0x1F00), 31);
        // Only bits 31:0 of an energy status register count.
        assert_eq!(energy_count(0xDEAD_0000_0000_0001), 1);
    }

    #[test]
    fn wrap_of_a_32_bit_register() {
        let mut c = EnergyCounter::new(
            Some(ENERGY_STATUS_MODULUS),
            EnergyUnit::PowTwoJoule(14),
            1_000_000_000,
        );
        c.update(0xFFFF_FF00, 1_000_000).unwrap();
        // 0x100 counts to the wrap, then 0x200 more: 0x300 = 768 counts = 46875 uJ.
        assert_eq!(
            c.update(0x200, 1_000_000),
            Ok(crate::counter::CounterSample::Energy {
                energy_uj: 46_875,
                wrapped: true
            })
        );
    }

    #[test]
    fn layouts() {
        let intel = |model| CpuId {
            vendor: Vendor::Intel,
            family: 6,
            model,
            model_name: String::new(),
            virtualized: false,
        };
        let l = layout(&intel(0x55)).unwrap();
        let dram = l
            .registers
            .iter()
            .find(|r| r.domain == Domain::Dram)
            .unwrap();
        assert_eq!((dram.address, dram.fixed_esu), (0x619, Some(16)));
        let l = layout(&intel(0x8E)).unwrap(); // Kaby Lake client: DRAM unit from the register
        let dram = l
            .registers
            .iter()
            .find(|r| r.domain == Domain::Dram)
            .unwrap();
        assert_eq!(dram.fixed_esu, None);
        assert_eq!(l.unit_register, 0x606);
        let amd = CpuId {
            vendor: Vendor::Amd,
            family: 0x19,
            model: 1,
            model_name: String::new(),
            virtualized: false,
        };
        let l = layout(&amd).unwrap();
        assert_eq!(l.unit_register, 0xC001_0299);
        let addrs: Vec<u32> = l.registers.iter().map(|r| r.address).collect();
        assert_eq!(addrs, vec![0xC001_029B, 0xC001_029A]);
        let old_amd = CpuId {
            family: 0x15,
            ..amd
        };
        assert!(layout(&old_amd).is_none());
    }

    #[test]
    fn cpuinfo_parsing() {
        let p = std::path::Path::new("cpuinfo");
        let s = "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 142\nmodel name\t: Intel(R) Core(TM) i7-8650U\nflags\t\t: fpu hypervisor msr\n\nprocessor\t: 1\n";
        let c = CpuId::parse(p, s).unwrap();
        assert_eq!(
            (c.vendor, c.family, c.model, c.virtualized),
            (Vendor::Intel, 6, 142, true)
        );
        assert!(CpuId::parse(p, "garbage\n").is_err());
        // Fields shared by every CPU and fields that differ are both the first CPU's.
        let two = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\nflags\t\t: fpu\n\nprocessor\t: 1\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\nflags\t\t: fpu hypervisor\n";
        let c = CpuId::parse(p, two).unwrap();
        assert_eq!(
            (c.vendor, c.family, c.model, c.virtualized),
            (Vendor::Amd, 25, 1, false)
        );
        assert!(CpuId::parse(p, "").is_err());
    }
}
