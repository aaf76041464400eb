//! Builders for synthetic host trees (sysfs, procfs, MSR device files) in a directory, used by
//! tests, benchmarks and the simulated host. They write exactly the files a live host has, so the
//! collectors read them through the same code paths.

use std::fs;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A host tree rooted at a directory.
#[derive(Clone, Debug)]
pub struct HostTree {
    root: PathBuf,
}

/// A powercap zone to write.
#[derive(Clone, Debug)]
pub struct ZoneSpec<'a> {
    /// Directory name, e.g. `intel-rapl:0` or `intel-rapl:0:1`.
    pub dir: &'a str,
    /// Contents of `name`; `None` writes no `name` file.
    pub name: Option<&'a str>,
    pub energy_uj: &'a str,
    pub max_energy_range_uj: &'a str,
    pub max_power_uw: Option<u64>,
}

impl<'a> ZoneSpec<'a> {
    pub fn new(dir: &'a str, name: &'a str, energy_uj: &'a str) -> Self {
        ZoneSpec {
            dir,
            name: Some(name),
            energy_uj,
            max_energy_range_uj: "262143328850",
            max_power_uw: None,
        }
    }
}

impl HostTree {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        HostTree { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Writes `rel` (relative to the root), creating parents.
    pub fn write(&self, rel: impl AsRef<Path>, content: impl AsRef<[u8]>) -> io::Result<PathBuf> {
        let p = self.root.join(rel);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(&p, content)?;
        Ok(p)
    }

    /// A powercap zone directory with its files.
    pub fn zone(&self, z: &ZoneSpec<'_>) -> io::Result<PathBuf> {
        let dir = Path::new("sys/class/powercap").join(z.dir);
        if let Some(n) = z.name {
            self.write(dir.join("name"), format!("{n}\n"))?;
        }
        self.write(dir.join("energy_uj"), format!("{}\n", z.energy_uj))?;
        self.write(
            dir.join("max_energy_range_uj"),
            format!("{}\n", z.max_energy_range_uj),
        )?;
        self.write(dir.join("enabled"), "1\n")?;
        if let Some(w) = z.max_power_uw {
            self.write(dir.join("constraint_0_max_power_uw"), format!("{w}\n"))?;
        }
        Ok(self.root.join(dir))
    }

    /// `sys/devices/system/cpu` for `packages` x `per_package` CPUs (ids numbered package-major),
    /// with `dies` dies per package.
    pub fn cpus(&self, packages: u32, per_package: u32, dies: u32) -> io::Result<()> {
        let n = packages * per_package;
        self.write(
            "sys/devices/system/cpu/online",
            format!("0-{}\n", n.saturating_sub(1)),
        )?;
        for id in 0..n {
            let pkg = id / per_package;
            let die = (id % per_package) * dies.max(1) / per_package;
            let t = format!("sys/devices/system/cpu/cpu{id}/topology");
            self.write(format!("{t}/physical_package_id"), format!("{pkg}\n"))?;
            self.write(format!("{t}/die_id"), format!("{die}\n"))?;
        }
        Ok(())
    }

    /// A `/proc/cpuinfo` with one processor block.
    pub fn cpuinfo(
        &self,
        vendor: &str,
        family: u32,
        model: u32,
        hypervisor: bool,
    ) -> io::Result<()> {
        let flags = if hypervisor {
            "fpu msr hypervisor"
        } else {
            "fpu msr"
        };
        self.write(
            "proc/cpuinfo",
            format!("processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: {model}\nmodel name\t: synthetic\nflags\t\t: {flags}\n\n"),
        )?;
        Ok(())
    }

    /// What the run tracker needs to start on a synthetic tree: cgroup2 mounted at
    /// `/sys/fs/cgroup`, `packages` packages of `per_package` CPUs (one die each), and a
    /// `/proc/stat` of 100 busy and 100 idle ticks on every CPU.
    pub fn cgroup2_host(&self, packages: u32, per_package: u32) -> io::Result<()> {
        self.write(
            "proc/self/mountinfo",
            "22 1 0:20 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n",
        )?;
        self.cpus(packages, per_package, 1)?;
        let cpus = usize::try_from(packages * per_package).unwrap_or(0);
        self.proc_stat(&vec![(100, 100); cpus])
    }

    /// A `/proc/stat` with the given per-CPU (busy, idle) ticks.
    pub fn proc_stat(&self, per_cpu: &[(u64, u64)]) -> io::Result<()> {
        let (b, i): (u64, u64) = per_cpu.iter().fold((0, 0), |(b, i), (x, y)| (b + x, i + y));
        let mut s = format!("cpu  {b} 0 0 {i} 0 0 0 0 0 0\n");
        for (n, (busy, idle)) in per_cpu.iter().enumerate() {
            s.push_str(&format!("cpu{n} {busy} 0 0 {idle} 0 0 0 0 0 0\n"));
        }
        s.push_str("intr 0\nctxt 0\n");
        self.write("proc/stat", s)?;
        Ok(())
    }

    /// Sets 64-bit registers in a sparse `dev/cpu/N/msr` file, as the msr driver presents them:
    /// the register address is the file offset. Each register is an 8-byte window at its
    /// address, so adjacent addresses (AMD's 0xC001029A and 0xC001029B) overlap in a regular
    /// file, unlike the real device: write the register a test checks last.
    pub fn msr(&self, cpu: u32, regs: &[(u32, u64)]) -> io::Result<()> {
        let f = self.msr_file(cpu)?;
        for (addr, v) in regs {
            f.write_all_at(&v.to_le_bytes(), *addr as u64)?;
        }
        Ok(())
    }

    /// Writes raw bytes at a register address of `dev/cpu/N/msr` (for overlapping registers).
    pub fn msr_bytes(&self, cpu: u32, addr: u32, bytes: &[u8]) -> io::Result<()> {
        self.msr_file(cpu)?.write_all_at(bytes, addr as u64)
    }

    /// `dev/cpu/N/msr`, created sparse if missing, opened for writing in place.
    fn msr_file(&self, cpu: u32) -> io::Result<fs::File> {
        let p = self.root.join(format!("dev/cpu/{cpu}/msr"));
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&p)
    }
}
