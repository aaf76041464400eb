//! Per-CPU perf `task-clock` counters on one cgroup (PERF_FLAG_PID_CGROUP): which CPUs, hence
//! which packages, a run burned on. Counted in nanoseconds, user and kernel time alike, like
//! `cpu.stat`'s `usage_usec`, so their ratios split that usage.

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

    /// Reads every CPU's cumulative task-clock (ns) into `out`, in the order of `cpus` at open.
    pub fn read_into(&mut self, out: &mut Vec<(u32, u64)>) -> io::Result<()> {
        out.clear();
        for (cpu, c) in &mut self.counters {
            out.push((*cpu, c.read()?));
        }
        Ok(())
    }
}
