//! Per-CPU perf `task-clock` counters on one cgroup (PERF_FLAG_PID_CGROUP): which CPUs, hence
//! which packages, a run burned on, and how much CPU time it used after its cgroup was removed.
//! Counted in nanoseconds, user and kernel time alike, like `cpu.stat`'s `usage_usec` (the
//! cgroup and its descendants, as `usage_usec`), so their ratios split that usage. An open
//! counter holds a reference to the cgroup: it stays readable, with its final count, after the
//! directory is removed, when `cpu.stat` no longer is.

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::path::Path;

use perf_event::events::Software;
use perf_event::{Builder, ReadFormat};

/// One CPU's counter on a cgroup: its descriptor alone, 4 bytes (a `perf_event::Counter` keeps
/// its id and parse configuration beside it, 48 bytes with the CPU: at 10,000 runs on 2 CPUs,
/// about 1 MB of the agent's heap). Opened with no read format, so a read returns exactly the
/// count, one native-endian `u64`.
#[derive(Debug)]
pub struct TaskClock(OwnedFd);

impl TaskClock {
    /// Opens and enables a counter on each CPU of `cpus` for the cgroup directory `dir`, in
    /// that order. All or nothing: a run is split by perf on every CPU or on none.
    pub fn open_each(dir: &Path, cpus: &[u32]) -> io::Result<Vec<TaskClock>> {
        let cg = File::open(dir)?;
        let mut clocks = Vec::with_capacity(cpus.len());
        for &cpu in cpus {
            let mut c = Builder::new(Software::TASK_CLOCK)
                .observe_cgroup(&cg)
                .one_cpu(cpu as usize)
                // The builder's defaults exclude kernel time; usage_usec includes it.
                .exclude_kernel(false)
                .exclude_hv(false)
                // The count alone (the builder's default adds the times enabled and running,
                // which a software counter, never multiplexed, does not need).
                .read_format(ReadFormat::empty())
                .build()?;
            c.enable()?;
            // SAFETY: `into_raw_fd` gives up the counter's open descriptor, which nothing else
            // owns or closes; the `OwnedFd` takes that ownership and closes it once on drop.
            clocks.push(TaskClock(unsafe { OwnedFd::from_raw_fd(c.into_raw_fd()) }));
        }
        Ok(clocks)
    }

    /// The cumulative task-clock (ns) on its CPU.
    pub fn read(&self) -> io::Result<u64> {
        let mut buf = [0u8; 8];
        let n = rustix::io::read(&self.0, &mut buf)?;
        if n != buf.len() {
            return Err(io::Error::other(format!(
                "perf counter read gave {n} bytes, not 8"
            )));
        }
        Ok(u64::from_ne_bytes(buf))
    }
}
