//! The simulated host: a temp directory laid out like a host root (`sys/class/powercap`, CPU
//! topology, `proc/stat`, `proc/cpuinfo`) whose package energy counters a driver thread advances
//! from a declared power model, `idle W + W per busy CPU`, fed by this machine's real /proc/stat.
//! The counter range is small so it wraps during a test. The real `wattd run` binary reads the
//! tree through `host.root`, while runs are real cgroups with real processes.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use wattd_collectors::hostfs::HostRoot;
use wattd_collectors::procstat::{user_hz, ProcStat};
use wattd_collectors::synth::{HostTree, ZoneSpec};
use wattd_collectors::topology::Topology;

/// The declared power model of every package.
#[derive(Clone, Copy, Debug)]
pub struct PowerModel {
    pub idle_w: f64,
    pub busy_w_per_cpu: f64,
}

/// What the driver has put into the counters so far.
#[derive(Clone, Debug, Default)]
pub struct Truth {
    /// Per package: every microjoule the model produced since the driver started.
    pub energy_uj: BTreeMap<u32, u128>,
    /// Per package: how many times its counter wrapped.
    pub wraps: BTreeMap<u32, u32>,
    /// Per package: busy CPU microseconds the model saw.
    pub busy_us: BTreeMap<u32, u128>,
    /// Every counter update: (CLOCK_MONOTONIC ns just before the write, cumulative energy of
    /// all packages in uJ). The agent's readings at a time t see the last update before t.
    pub timeline: Vec<(u64, u128)>,
}

impl Truth {
    /// Cumulative energy the counters showed at monotonic time `t_ns`.
    pub fn energy_at(&self, t_ns: u64) -> u128 {
        let i = self.timeline.partition_point(|(t, _)| *t <= t_ns);
        if i == 0 {
            0
        } else {
            self.timeline[i - 1].1
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds, the clock of the agent's interval stamps.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A running simulated host. Dropping it stops the driver.
#[derive(Debug)]
pub struct SimHost {
    dir: tempfile::TempDir,
    stop: Arc<AtomicBool>,
    driver: Option<JoinHandle<()>>,
    truth: Arc<Mutex<Truth>>,
    pub model: PowerModel,
    pub range_uj: u64,
}

/// Width of the zero-padded counter text, so each update is one same-size pwrite in place (the
/// agent keeps the file open and preads it: a rename would leave it reading the old inode).
const WIDTH: usize = 20;

fn write_counter(f: &File, v: u64) -> io::Result<()> {
    f.write_all_at(format!("{v:0WIDTH$}\n").as_bytes(), 0)
}

impl SimHost {
    /// Lays out the tree mirroring this machine's CPUs and starts the driver, which updates the
    /// counters and `proc/stat` every `period`.
    pub fn start(model: PowerModel, range_uj: u64, period: Duration) -> io::Result<Self> {
        Self::start_with_runs(model, range_uj, period, None)
    }

    /// Like [`SimHost::start`], with the runs' exact CPU time taken from a cgroup's `cpu.stat`
    /// (the tests' parent of all run cgroups): the simulated hardware then draws `busy_w` per
    /// CPU-second the runs really used, and /proc/stat only decides the rest (the host). Without
    /// it, the model's busy time would come from /proc/stat alone, which on this VM disagrees
    /// with the exact per-cgroup times by a few percent, and no agent could match it.
    pub fn start_with_runs(
        model: PowerModel,
        range_uj: u64,
        period: Duration,
        runs_cgroup: Option<PathBuf>,
    ) -> io::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("wattd-simhost-")
            .tempdir()?;
        let tree = HostTree::new(dir.path());
        let live = Topology::read(&HostRoot::live()).map_err(io::Error::other)?;
        tree.write(
            "sys/devices/system/cpu/online",
            format!("0-{}\n", live.cpus.len().saturating_sub(1)),
        )?;
        for c in &live.cpus {
            let t = format!("sys/devices/system/cpu/cpu{}/topology", c.id);
            tree.write(
                format!("{t}/physical_package_id"),
                format!("{}\n", c.package),
            )?;
            tree.write(format!("{t}/die_id"), format!("{}\n", c.die))?;
        }
        tree.write("proc/cpuinfo", fs::read("/proc/cpuinfo")?)?;
        // The agent reads utilisation from the real /proc/stat, as on a live host: only the
        // energy counters are simulated.
        fs::create_dir_all(dir.path().join("proc"))?;
        std::os::unix::fs::symlink("/proc/stat", dir.path().join("proc/stat"))?;
        let packages = live.cpus_by_package();
        let mut files = BTreeMap::new();
        let range_s = range_uj.to_string();
        for &p in packages.keys() {
            let name = format!("package-{p}");
            let zdir = format!("intel-rapl:{p:x}");
            let mut z = ZoneSpec::new(&zdir, &name, "0");
            z.max_energy_range_uj = &range_s;
            z.max_power_uw = Some(200_000_000);
            let zpath = tree.zone(&z)?;
            let f = OpenOptions::new()
                .write(true)
                .open(zpath.join("energy_uj"))?;
            write_counter(&f, 0)?;
            files.insert(p, f);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let truth = Arc::new(Mutex::new(Truth::default()));
        let root = dir.path().to_owned();
        let driver = {
            let stop = stop.clone();
            let truth = truth.clone();
            std::thread::Builder::new()
                .name("simhost-driver".into())
                .spawn(move || {
                    drive(
                        root,
                        model,
                        range_uj,
                        period,
                        packages,
                        files,
                        stop,
                        truth,
                        runs_cgroup,
                    )
                })?
        };
        Ok(SimHost {
            dir,
            stop,
            driver: Some(driver),
            truth,
            model,
            range_uj,
        })
    }

    /// The host root to give `wattd` as `host.root`.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn truth(&self) -> Truth {
        self.truth.lock().map(|t| t.clone()).unwrap_or_default()
    }

    /// Writes a config file for `wattd run` into the tree's directory and returns its path.
    pub fn config(&self, body: &str) -> io::Result<PathBuf> {
        let p = self.dir.path().join("wattd.toml");
        fs::write(
            &p,
            format!(
                "[host]\nroot = {:?}\n{body}",
                self.dir.path().display().to_string()
            ),
        )?;
        Ok(p)
    }

    /// Makes the real cgroup2 mount visible inside the tree at the same host path (a symlink), so
    /// the agent, which reads every host path under `host.root`, measures real cgroups.
    pub fn link_cgroup_mount(&self, mount: &Path) -> io::Result<()> {
        let rel = mount.strip_prefix("/").unwrap_or(mount);
        let link = self.dir.path().join(rel);
        if let Some(parent) = link.parent() {
            fs::create_dir_all(parent)?;
        }
        std::os::unix::fs::symlink(mount, link)
    }

    /// Stops the driver; the counters keep their last value.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.driver.take() {
            let _ = h.join();
        }
    }
}

impl Drop for SimHost {
    fn drop(&mut self) {
        self.stop();
    }
}

#[allow(clippy::too_many_arguments)]
fn drive(
    _root: PathBuf,
    model: PowerModel,
    range_uj: u64,
    period: Duration,
    packages: BTreeMap<u32, Vec<u32>>,
    files: BTreeMap<u32, File>,
    stop: Arc<AtomicBool>,
    truth: Arc<Mutex<Truth>>,
    runs_cgroup: Option<PathBuf>,
) {
    let runs_usage = || -> Option<u64> {
        let dir = runs_cgroup.as_ref()?;
        let s = fs::read_to_string(dir.join("cpu.stat")).ok()?;
        s.lines()
            .find_map(|l| l.strip_prefix("usage_usec ")?.trim().parse().ok())
    };
    let mut last_runs = runs_usage();
    // Busy time of /proc/stat not yet charged to the host (see the agent's tracker: the same
    // balance keeps quantisation errors from accumulating).
    let mut host_balance: i128 = 0;
    let hz = user_hz() as u128;
    let idle_uw = (model.idle_w * 1e6) as u128;
    let busy_uw = (model.busy_w_per_cpu * 1e6) as u128;
    let mut last_stat = ProcStat::read(&HostRoot::live()).ok();
    let mut last = Instant::now();
    // Per package: cumulative picojoules (uW x us) and the counter's raw value.
    let mut pj: BTreeMap<u32, u128> = packages.keys().map(|&p| (p, 0)).collect();
    let mut raw: BTreeMap<u32, u64> = packages.keys().map(|&p| (p, 0)).collect();
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(period);
        let now = Instant::now();
        let dt_us = now.duration_since(last).as_micros();
        last = now;
        let Ok(text) = fs::read_to_string("/proc/stat") else {
            continue;
        };
        let Ok(stat) = ProcStat::parse(Path::new("/proc/stat"), &text) else {
            continue;
        };
        let runs_now = runs_usage();
        let Ok(mut t) = truth.lock() else { return };
        let stamp = monotonic_ns();
        for (&p, cpus) in &packages {
            // Busy time as the agent measures it: elapsed minus the (exactly measured) idle time,
            // signed, because idle arrives in whole ticks and a 5 ms step can show 10 ms of it.
            let stat_busy_us: i128 = match &last_stat {
                Some(prev) => wattd_collectors::procstat::busy_us_signed(
                    prev,
                    &stat,
                    cpus,
                    hz as u64,
                    dt_us as u64,
                ),
                None => 0,
            };
            // With the runs' exact time known (one package hosts them in these tests), the
            // model draws for exactly that, plus the rest of /proc/stat's busy time for the host;
            // a balance carries the tick rounding so it cancels instead of accumulating.
            let runs = match (runs_now, last_runs) {
                (Some(now), Some(prev)) if packages.len() == 1 => now.saturating_sub(prev) as i128,
                _ => 0,
            };
            host_balance += stat_busy_us - runs;
            let host = host_balance.max(0);
            host_balance = (host_balance - host).max(-(cpus.len() as i128) * 20_000);
            let busy_us = (runs + host) as u128;
            let before_uj = pj[&p] / 1_000_000;
            let acc = pj.entry(p).or_default();
            *acc += idle_uw * dt_us + busy_uw * busy_us;
            let add_uj = (*acc / 1_000_000 - before_uj) as u64;
            let r = raw.entry(p).or_default();
            let next = *r as u128 + add_uj as u128;
            if next > range_uj as u128 {
                *t.wraps.entry(p).or_default() += 1;
            }
            // The counter holds values 0..=range and wraps to 0 after range.
            *r = (next % (range_uj as u128 + 1)) as u64;
            *t.energy_uj.entry(p).or_default() += add_uj as u128;
            *t.busy_us.entry(p).or_default() += busy_us;
            if let Some(f) = files.get(&p) {
                let _ = write_counter(f, *r);
            }
        }
        let total: u128 = t.energy_uj.values().sum();
        if t.timeline.len() < 10_000_000 {
            t.timeline.push((stamp, total));
        }
        drop(t);
        last_stat = Some(stat);
        last_runs = runs_now;
    }
}
