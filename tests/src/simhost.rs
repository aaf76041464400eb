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
        tree.write("proc/stat", fs::read("/proc/stat")?)?;
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
                .spawn(move || drive(root, model, range_uj, period, packages, files, stop, truth))?
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
    root: PathBuf,
    model: PowerModel,
    range_uj: u64,
    period: Duration,
    packages: BTreeMap<u32, Vec<u32>>,
    files: BTreeMap<u32, File>,
    stop: Arc<AtomicBool>,
    truth: Arc<Mutex<Truth>>,
) {
    let hz = user_hz() as u128;
    let idle_uw = (model.idle_w * 1e6) as u128;
    let busy_uw = (model.busy_w_per_cpu * 1e6) as u128;
    let stat_path = root.join("proc/stat");
    let tmp_path = root.join("proc/.stat.tmp");
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
        let Ok(mut t) = truth.lock() else { return };
        for (&p, cpus) in &packages {
            let busy_ticks: u128 = match &last_stat {
                Some(prev) => cpus
                    .iter()
                    .filter_map(|c| {
                        Some(
                            stat.per_cpu
                                .get(c)?
                                .busy()
                                .saturating_sub(prev.per_cpu.get(c)?.busy())
                                as u128,
                        )
                    })
                    .sum(),
                None => 0,
            };
            let busy_us = (busy_ticks * 1_000_000 / hz).min(dt_us * cpus.len() as u128);
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
        drop(t);
        // proc/stat is re-read whole by the agent, so an atomic replace is right here.
        if fs::write(&tmp_path, &text).is_ok() {
            let _ = fs::rename(&tmp_path, &stat_path);
        }
        last_stat = Some(stat);
    }
}
