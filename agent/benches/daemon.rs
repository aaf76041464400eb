//! What the real daemon costs the host: `wattd run` (this build, optimised) on the simulated host
//! with N run cgroups, each holding one sleeping process (as real runs do: an empty cgroup is
//! skipped and costs nothing), sampling at H Hz with its shipped defaults otherwise (metrics
//! endpoint on, sealing by time, perf counters per run). After a warm-up it reads the daemon's
//! CPU time from each of its threads' `/proc/PID/task/TID/schedstat` (nanoseconds on a CPU) over
//! the window, and its peak RSS (`VmHWM`) at the end. Prints the share of one core, the cost
//! per run per tick and per tick, and the peak RSS: the table in the README ("What the agent
//! costs"). The RSS is also split: anonymous (the heap and stacks, its peak sampled) and mapped
//! file pages (the binary and the libraries: clean page-cache pages, mapped 64 KiB around each
//! page touched when the page cache holds them, shared and reclaimable).
//!
//! `cargo bench -p wattd --bench daemon -- runs=1000 hz=1 secs=30` (defaults: 100 runs, 1 Hz,
//! 30 s after 5 s of warm-up; `perf=0` turns the per-run perf counters off, `trace=0` the cgroup
//! trace, `floor=0` the floor measured beside it: `tick_floor`). Needs root and a cgroup2 mount,
//! as the end-to-end tests do. The agent runs with the shipped unit's descriptor limit
//! (`LimitNOFILE=`), as installed, and, as under the unit, with systemd's notification socket (a
//! datagram socket the bench drains) and a 30 s watchdog.
//! `WATTD_BENCH_BIN=path` runs another build of the agent (to compare two commits side by side).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use wattd_tests::cgroups::{require_cgroups, TestCgroups};
use wattd_tests::simhost::{PowerModel, SimHost};

struct Opts {
    runs: usize,
    hz: u64,
    secs: u64,
    warmup: u64,
    /// `[runs] perf_counters` (per-run perf counters, on by default).
    perf: bool,
    /// `[runs] cgroup_trace` (the eBPF cgroup trace, on by default).
    trace: bool,
    /// The tick's floor measured beside the agent (`tick_floor`; on by default).
    floor: bool,
}

fn opts() -> Opts {
    let mut o = Opts {
        runs: 100,
        hz: 1,
        secs: 30,
        warmup: 5,
        perf: true,
        trace: true,
        floor: true,
    };
    for a in std::env::args().skip(1) {
        let Some((k, v)) = a.split_once('=') else {
            continue; // cargo bench passes --bench
        };
        let n = || {
            v.parse::<u64>()
                .unwrap_or_else(|_| panic!("{k}={v}: not a number"))
        };
        match k {
            "runs" => o.runs = usize::try_from(n()).expect("runs"),
            "hz" => o.hz = n().clamp(1, 100),
            "secs" => o.secs = n().max(1),
            "warmup" => o.warmup = n(),
            "perf" => o.perf = n() != 0,
            "trace" => o.trace = n() != 0,
            "floor" => o.floor = n() != 0,
            _ => panic!(
                "unknown option {k} (runs=, hz=, secs=, warmup=, perf=0|1, trace=0|1, floor=0|1)"
            ),
        }
    }
    o
}

/// Nanoseconds each of the process's threads has run on a CPU, by thread id (the first field of
/// `/proc/PID/task/TID/schedstat`; the process's own file counts its first thread alone).
fn on_cpu_ns(pid: u32) -> std::collections::BTreeMap<u32, u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the agent's threads");
    tasks
        .filter_map(|t| {
            let t = t.ok()?;
            let tid = t.file_name().to_str()?.parse().ok()?;
            let s = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
            let ns = s.split_whitespace().next()?.parse().ok()?;
            Some((tid, ns))
        })
        .collect()
}

/// The CPU time the threads alive at `after` ran since `before` (a thread made since, all of
/// its time; one gone since is not counted: the agent's threads live as long as it does).
fn on_cpu_since(
    before: &std::collections::BTreeMap<u32, u64>,
    after: &std::collections::BTreeMap<u32, u64>,
) -> u64 {
    after
        .iter()
        .map(|(tid, ns)| ns.saturating_sub(before.get(tid).copied().unwrap_or(0)))
        .sum()
}

/// A `/proc/PID/status` field in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

/// Resident KiB per mapped file (from `/proc/PID/smaps`), largest first.
fn file_rss_kib(pid: u32) -> Vec<(String, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut by_file = std::collections::BTreeMap::<String, u64>::new();
    let mut current: Option<String> = None;
    for line in s.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            // A mapping's header: range, perms, offset, device, inode, path.
            current = fields
                .nth(4)
                .filter(|p| p.starts_with('/'))
                .map(str::to_owned);
        } else if let (Some(path), "Rss:") = (&current, first) {
            let kib: u64 = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            *by_file.entry(path.clone()).or_default() += kib;
        }
    }
    let mut v: Vec<_> = by_file.into_iter().filter(|(_, k)| *k > 0).collect();
    v.sort_by_key(|m| std::cmp::Reverse(m.1));
    v
}

/// The simulated host's RAPL counters (`sys/class/powercap/*/energy_uj`), which the agent reads
/// at every tick.
fn energy_files(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let dir = root.join("sys/class/powercap");
    let mut v: Vec<_> = std::fs::read_dir(&dir)
        .expect("the simulated host's powercap directory")
        .filter_map(|e| Some(e.ok()?.path().join("energy_uj")))
        .filter(|p| p.exists())
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no energy_uj under {}", dir.display());
    v
}

/// What no agent reading these sources at this rate can avoid, measured beside it: for `secs` x
/// `hz` periods of the agent's own length (`1000 / hz` ms), a blocking read of a periodic
/// `timerfd` (the wake-up), then `/proc/stat` read whole as the agent reads it (one `pread`
/// into a buffer grown until the file fits) and every `energy_uj` read with `pread`, on kept
/// descriptors, nothing parsed. A late wake-up covers the periods it missed with one round of
/// reads, as the agent's late tick does. Returns this thread's CPU time (ns) and the periods.
/// It runs while the agent is measured, so a VM's slow minutes fall on both.
fn tick_floor(hz: u64, secs: u64, zones: &[std::path::PathBuf]) -> (u64, u64) {
    use rustix::time::{
        clock_gettime, timerfd_create, timerfd_settime, ClockId, Itimerspec, TimerfdClockId,
        TimerfdFlags, TimerfdTimerFlags,
    };
    use std::os::unix::fs::FileExt as _;
    let period: rustix::time::Timespec =
        Duration::from_millis(1000 / hz).try_into().expect("period");
    let fd = timerfd_create(TimerfdClockId::Monotonic, TimerfdFlags::CLOEXEC).expect("timerfd");
    let spec = Itimerspec {
        it_interval: period,
        it_value: period,
    };
    timerfd_settime(&fd, TimerfdTimerFlags::empty(), &spec).expect("arm the timerfd");
    let stat = std::fs::File::open("/proc/stat").expect("/proc/stat");
    let zones: Vec<std::fs::File> = zones
        .iter()
        .map(|p| std::fs::File::open(p).expect("energy_uj"))
        .collect();
    let mut buf = vec![0u8; 4096];
    let cpu = || {
        let t = clock_gettime(ClockId::ThreadCPUTime);
        t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
    };
    let periods = hz * secs;
    let mut elapsed = 0;
    let t0 = cpu();
    while elapsed < periods {
        let mut n = [0u8; 8];
        rustix::io::read(&fd, &mut n).expect("timerfd read");
        elapsed += u64::from_ne_bytes(n);
        while stat.read_at(&mut buf, 0).expect("/proc/stat") == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        for z in &zones {
            let _ = z.read_at(&mut buf, 0).expect("energy_uj");
        }
    }
    (cpu() - t0, elapsed)
}

/// `LimitNOFILE=` of the shipped unit.
fn unit_limit_nofile() -> u64 {
    let unit = include_str!("../../systemd/wattd.service");
    unit.lines()
        .find_map(|l| l.strip_prefix("LimitNOFILE="))
        .and_then(|v| v.trim().parse().ok())
        .expect("LimitNOFILE= in systemd/wattd.service")
}

fn main() {
    let o = opts();
    let Some(mount) = require_cgroups("daemon bench") else {
        eprintln!("daemon bench: needs root and a writable cgroup2 mount; nothing measured");
        return;
    };
    let mut cg = TestCgroups::new(&mount, "cost").expect("test cgroup");
    let mut sim = SimHost::start(
        PowerModel {
            idle_w: 10.0,
            busy_w_per_cpu: 20.0,
        },
        1 << 40,
        Duration::from_millis(50),
    )
    .expect("simulated host");
    sim.link_cgroup_mount(&mount)
        .expect("link the cgroup mount");
    let work = tempfile::tempdir().expect("tempdir");
    let t = Instant::now();
    for i in 0..o.runs {
        cg.spawn_in(
            &format!("run-r{i:05}.scope"),
            Command::new("sleep")
                .arg("86400")
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .expect("a sleeping run");
    }
    eprintln!(
        "{} runs with a sleeping process each, made in {:.1} s",
        o.runs,
        t.elapsed().as_secs_f64()
    );
    let pattern = format!("{}/run-{{run_id}}.scope", cg.rel().display());
    let config = sim
        .config(&format!(
            "cgroup_root = {:?}\n[sampling]\ninterval_ms = {}\n[runs]\npatterns = [{pattern:?}]\n\
             perf_counters = {}\ncgroup_trace = {}\ncontrol_socket = {:?}\n[spool]\ndir = {:?}\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
            mount.display().to_string(),
            1000 / o.hz,
            o.perf,
            o.trace,
            work.path().join("control.sock").display().to_string(),
            work.path().join("spool").display().to_string(),
        ))
        .expect("config");
    // The descriptor limit the shipped unit gives it (`LimitNOFILE=` in systemd/wattd.service),
    // inherited by the agent: under a shell's smaller hard limit a large host's runs would be
    // read open-read-close beyond the agent's descriptor budget, which no installed agent does.
    // Raising the hard limit needs CAP_SYS_RESOURCE, which a container's root may lack: then
    // the figures are for the limit there is, and say so.
    let unit_nofile = unit_limit_nofile();
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let unit = Rlimit {
        current: Some(unit_nofile),
        maximum: Some(unit_nofile),
    };
    if let Err(e) = setrlimit(Resource::Nofile, unit) {
        let hard = getrlimit(Resource::Nofile).maximum;
        eprintln!(
            "WARNING: RLIMIT_NOFILE cannot be raised to the unit's {unit_nofile} here ({e}); the \
             agent runs under the hard limit {hard:?}, its descriptor budget three quarters of it: \
             runs beyond it are read open-read-close (or without perf counters), which an \
             installed agent's are not; `perf=0` needs one descriptor per run"
        );
    }
    let log = std::fs::File::create(work.path().join("wattd.log")).expect("log");
    // As under the unit (`Type=notify`, `WatchdogSec=30s`): systemd's notification socket, here
    // a datagram socket drained by a thread, and the watchdog's period; WATCHDOG_PID is the
    // main process's own, the shell's that execs the agent.
    let notify_path = work.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).expect("notify socket");
    let notified = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    {
        let notified = notified.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while notify.recv(&mut buf).is_ok() {
                notified.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
    }
    let mut agent = Command::new("sh")
        .args(["-c", "WATCHDOG_PID=$$ exec \"$0\" \"$@\""])
        .arg(
            std::env::var_os("WATTD_BENCH_BIN")
                .unwrap_or_else(|| env!("CARGO_BIN_EXE_wattd").into()),
        )
        .args(["run", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "30000000")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start wattd");
    let pid = agent.id();
    // The kernel keeps no peak of the anonymous part alone: sampled (every 50 ms, reads
    // outside the measured CPU time of the agent).
    let mut anon_peak = 0;
    let mut watch = |d: Duration| {
        let until = Instant::now() + d;
        while Instant::now() < until {
            anon_peak = anon_peak.max(status_kib(pid, "RssAnon:"));
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    watch(Duration::from_secs(o.warmup.max(1)));
    let floor = o.floor.then(|| {
        let zones = energy_files(sim.root());
        let (hz, secs) = (o.hz, o.secs);
        std::thread::spawn(move || tick_floor(hz, secs, &zones))
    });
    let (cpu0, t0) = (on_cpu_ns(pid), Instant::now());
    watch(Duration::from_secs(o.secs));
    let (cpu1, wall) = (on_cpu_ns(pid), t0.elapsed());
    let floor = floor.map(|h| h.join().expect("the floor's thread"));
    let (hwm, rss) = (status_kib(pid, "VmHWM:"), status_kib(pid, "VmRSS:"));
    let (anon, file) = (status_kib(pid, "RssAnon:"), status_kib(pid, "RssFile:"));
    let files = file_rss_kib(pid);
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let status = agent.wait().expect("wait for wattd");
    sim.stop();
    let logtext = std::fs::read_to_string(work.path().join("wattd.log")).unwrap_or_default();
    drop(cg);
    assert!(status.success(), "wattd exited {status:?}\n{logtext}");
    let cpu_ns = on_cpu_since(&cpu0, &cpu1);
    let share = cpu_ns as f64 / wall.as_nanos() as f64;
    let ticks = wall.as_secs_f64() * o.hz as f64;
    let per_tick_us = cpu_ns as f64 / 1e3 / ticks;
    println!(
        "{:>6} runs at {:>3} Hz: {:>6.3}% of one core, {:>8.1} us per tick = {:>6.2} us per run \
         per tick; peak RSS {:.1} MiB (now {:.1} MiB: {:.1} anonymous, peak {:.1} sampled; {:.1} \
         mapped file pages)",
        o.runs,
        o.hz,
        share * 100.0,
        per_tick_us,
        per_tick_us / o.runs.max(1) as f64,
        hwm as f64 / 1024.0,
        rss as f64 / 1024.0,
        anon as f64 / 1024.0,
        anon_peak as f64 / 1024.0,
        file as f64 / 1024.0,
    );
    if let Some((ns, ticks)) = floor {
        let us = ns as f64 / 1e3 / ticks.max(1) as f64;
        let runs_in_it = if o.runs > 0 {
            ", the runs' reads in it"
        } else {
            ""
        };
        println!(
            "  the floor, in the same window: {us:.1} us per tick ({ticks} ticks: a periodic \
             timerfd's wake-up and read, `/proc/stat` and every `energy_uj` read; the agent's \
             own part above it {:.1} us per tick{runs_in_it})",
            per_tick_us - us
        );
    }
    for (path, kib) in files.iter().take(6) {
        println!("  mapped: {:.1} MiB {path}", *kib as f64 / 1024.0);
    }
    println!(
        "  systemd notifications received: {} (READY, keep-alives, STOPPING)",
        notified.load(std::sync::atomic::Ordering::Relaxed)
    );
    if logtext.lines().any(|l| l.contains("ERROR")) {
        eprintln!("the daemon logged errors:\n{logtext}");
    }
}
