//! What the cgroup trace costs the host: its program runs at every scheduler update of every
//! task. Two threads of this process hand a byte back and forth over a socket pair (each round
//! trip is two context switches, each with a scheduler update of the task going to sleep), with
//! no trace, with the trace loaded (this process's cgroup not traced: the lookup misses, as for
//! every task outside a run), and with this process inside a traced cgroup (the lookup hits and
//! adds). Root (CAP_BPF) and cgroup v2; says SKIPPED otherwise.

use std::io::{Read as _, Write as _};
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use wattd_collectors::cgroup::find_cgroup2_mount;
use wattd_collectors::cgroup::trace::CgroupTrace;
use wattd_collectors::HostRoot;

const ROUND_TRIPS: u64 = 1_000;

/// A thread that echoes each byte it reads back, until the socket closes.
struct Echo {
    here: Option<UnixStream>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Echo {
    fn start() -> Echo {
        let (here, mut there) = UnixStream::pair().expect("socketpair");
        let thread = std::thread::spawn(move || {
            let mut byte = [0u8; 1];
            while there.read_exact(&mut byte).is_ok() {
                if there.write_all(&byte).is_err() {
                    break;
                }
            }
        });
        Echo {
            here: Some(here),
            thread: Some(thread),
        }
    }

    fn round_trips(&mut self, n: u64) {
        let mut byte = [7u8; 1];
        let Some(s) = self.here.as_mut() else {
            return;
        };
        for _ in 0..n {
            s.write_all(&byte).expect("write");
            s.read_exact(&mut byte).expect("read");
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        // Closing our end ends the echo thread's read.
        self.here = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// This process's cgroup2 directory, from /proc/self/cgroup.
fn own_cgroup(mount: &std::path::Path) -> Option<PathBuf> {
    let s = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = s.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(mount.join(rel.trim_start_matches('/')))
}

fn trace_cost(c: &mut Criterion) {
    let mut group = c.benchmark_group("trace_cost");
    group.throughput(Throughput::Elements(ROUND_TRIPS));
    group.measurement_time(Duration::from_secs(5));
    let mut echo = Echo::start();
    group.bench_function("no_trace", |b| b.iter(|| echo.round_trips(ROUND_TRIPS)));
    let trace = match CgroupTrace::load() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("SKIPPED: trace_cost with the trace: {e}");
            return;
        }
    };
    group.bench_function("traced_elsewhere", |b| {
        b.iter(|| echo.round_trips(ROUND_TRIPS))
    });
    drop(echo);
    // Inside a traced cgroup: the whole process moves there, and back.
    let Ok(mount) = find_cgroup2_mount(&HostRoot::live()).map(|m| m.mount_point) else {
        eprintln!("SKIPPED: trace_cost/traced_here: no cgroup2 mount");
        return;
    };
    let (Some(home), parent) = (
        own_cgroup(&mount),
        mount.join(format!("wattd-bench-trace-{}", std::process::id())),
    ) else {
        eprintln!("SKIPPED: trace_cost/traced_here: own cgroup unknown");
        return;
    };
    if std::fs::create_dir(&parent).is_err() {
        eprintln!("SKIPPED: trace_cost/traced_here: cannot create cgroups");
        return;
    }
    let ino = std::fs::metadata(&parent).map(|m| m.ino()).unwrap_or(0);
    let here = parent.join("run-bench");
    let moved = trace.watch_parent(ino).is_ok()
        && std::fs::create_dir(&here).is_ok()
        && std::fs::write(here.join("cgroup.procs"), std::process::id().to_string()).is_ok();
    if moved {
        let mut echo = Echo::start();
        group.bench_function("traced_here", |b| b.iter(|| echo.round_trips(ROUND_TRIPS)));
        drop(echo);
        let id = std::fs::metadata(&here).map(|m| m.ino()).unwrap_or(0);
        let counted = trace.usage(id).ok().flatten();
        eprintln!("trace_cost/traced_here: the bench's cgroup counted {counted:?}");
    } else {
        eprintln!("SKIPPED: trace_cost/traced_here: could not move into a traced cgroup");
    }
    let _ = std::fs::write(home.join("cgroup.procs"), std::process::id().to_string());
    let _ = std::fs::remove_dir(&here);
    let _ = std::fs::remove_dir(&parent);
    group.finish();
}

criterion_group!(benches, trace_cost);
criterion_main!(benches);
