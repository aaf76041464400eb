//! Tests that need something a machine may lack (root, cgroup v2, `setpriv`, `protoc`,
//! `promtool`, Chromium, `tmux`, PostgreSQL, `lintian`, `rpm`, ...) call [`skip`] when it is
//! missing and return. It writes `SKIPPED <test>: needs <what>` to the process's stderr (past
//! the harness's capture, so `cargo test` always shows it), or panics under the strict switch,
//! so CI cannot pass by skipping.
//!
//! The switch is `WATTD_TEST_STRICT=1`; `WATTD_REQUIRE_CGROUPS` (its older name) is accepted as
//! an alias. Either set to anything but empty or `0` turns every skip into a failure.

/// The variable that turns skips into failures.
pub const STRICT_VAR: &str = "WATTD_TEST_STRICT";
/// Its older name, still honoured.
pub const STRICT_ALIAS: &str = "WATTD_REQUIRE_CGROUPS";

fn set(var: &str) -> bool {
    std::env::var_os(var).is_some_and(|v| !v.is_empty() && v != "0")
}

/// True when skipping is forbidden.
pub fn strict() -> bool {
    set(STRICT_VAR) || set(STRICT_ALIAS)
}

/// Says loudly that `test` cannot run here because it needs `what`; under the strict switch
/// this is a failure instead. Call it and return.
///
/// # Panics
/// When [`strict`] is true.
pub fn skip(test: &str, what: impl std::fmt::Display) {
    if strict() {
        panic!("{test}: needs {what}, and {STRICT_VAR} (or {STRICT_ALIAS}) forbids skipping");
    }
    // Straight to the process's stderr, not through `eprintln!`: the test harness captures the
    // print macros and shows them only for failed tests, and a skip must be seen.
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr().lock(),
        "SKIPPED {test}: needs {what} (set {STRICT_VAR}=1 to fail instead)"
    );
}

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// `program` on `PATH` (or `None`).
pub fn which(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|c| c.is_file())
}

/// The machine's cumulative steal time, all CPUs, in microseconds (`/proc/stat`, counted in
/// clock ticks of 10 ms), or `None` when it cannot be read. On a VM, time the hypervisor took
/// from a vCPU while a task ran is in perf's task-clock (the raw clock) and not in the cgroup's
/// `usage_usec`: a test comparing the two allows what was stolen meanwhile, plus a tick.
pub fn steal_us() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: u64 = line.split_whitespace().nth(8)?.parse().ok()?;
    Some(ticks.saturating_mul(10_000))
}

/// CPUs left idle on this machine, measured from `/proc/stat` over `over` (`None` when it
/// cannot be read). For tests whose premise is spare capacity, such as a calibration that must
/// change the host's busy time: on a saturated machine they cannot be valid, and say so.
pub fn idle_cpus(over: std::time::Duration) -> Option<f64> {
    fn idle_and_total() -> Option<(u64, u64)> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal (guest time is inside user).
        let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
        let total: u64 = v.iter().take(8).sum();
        Some((idle, total))
    }
    let ncpus = std::thread::available_parallelism().ok()?.get() as f64;
    let (i0, t0) = idle_and_total()?;
    std::thread::sleep(over);
    let (i1, t1) = idle_and_total()?;
    let dt = t1.checked_sub(t0).filter(|&d| d > 0)?;
    Some(ncpus * (i1.saturating_sub(i0)) as f64 / dt as f64)
}
