//! Per-CPU perf `task-clock` counters on one cgroup (PERF_FLAG_PID_CGROUP): which CPUs, hence
//! which packages, a run burned on, and how much CPU time it used after its cgroup was removed.
//! Counted in nanoseconds, user and kernel time alike, like `cpu.stat`'s `usage_usec` (the
//! cgroup and its descendants, as `usage_usec`), so their ratios split that usage. An open
//! counter holds a reference to the cgroup: it stays readable, with its final count, after the
//! directory is removed, when `cpu.stat` no longer is.

use std::fs::File;
use std::io;
use std::path::Path;

use perf_event::events::Software;
use perf_event::{Builder, Counter};

/// One counter per CPU, with the CPU id.
#[derive(Debug)]
pub struct CgroupTaskClock {
    counters: Vec<(u32, Counter)>,
}

impl CgroupTaskClock {
    /// Opens and enables a counter on each CPU of `cpus` for the cgroup directory `dir`.
    /// All or nothing: a run is split by perf on every CPU or on none.
    pub fn open(dir: &Path, cpus: &[u32]) -> io::Result<Self> {
        let cg = File::open(dir)?;
        let mut counters = Vec::with_capacity(cpus.len());
        for &cpu in cpus {
            let mut c = Builder::new(Software::TASK_CLOCK)
                .observe_cgroup(&cg)
                .one_cpu(cpu as usize)
                // The builder's defaults exclude kernel time; usage_usec includes it.
                .exclude_kernel(false)
                .exclude_hv(false)
                .build()?;
            c.enable()?;
            counters.push((cpu, c));
        }
        Ok(CgroupTaskClock { counters })
    }

    pub fn fd_count(&self) -> usize {
        self.counters.len()
    }

    /// The sum over every CPU of the cumulative task-clock (ns) into `scratch`'s values.
    pub fn read_total(&mut self, scratch: &mut Vec<(u32, u64)>) -> io::Result<u64> {
        self.read_into(scratch)?;
        Ok(scratch.iter().map(|&(_, v)| v).sum())
    }

    /// Reads every CPU's cumulative task-clock (ns) into `out`, in the order of `cpus` at open.
    pub fn read_into(&mut self, out: &mut Vec<(u32, u64)>) -> io::Result<()> {
        out.clear();
        for (cpu, c) in &mut self.counters {
            out.push((*cpu, c.read()?));
        }
        Ok(())
    }
}
