//! `wattd calibrate`: measures the host's idle power and power per busy CPU, per package, by
//! running its own CPU burners (0, 1, ... N of them, in a cgroup of its own) for a few seconds
//! each, reading the package energy counters and the CPUs' busy time, and fitting
//! `power = idle + per_cpu x busy CPUs` by least squares. Prints the fit with R squared and the
//! configuration snippet. Refuses on a host with only the estimator (there is nothing to
//! measure) and on a host too busy to calibrate.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Args;
use serde::Serialize;
use wattd_collectors::probe::{self, ProbeOptions};
use wattd_collectors::procstat::{busy_us_signed, user_hz, ProcStat};
use wattd_collectors::topology::Topology;
use wattd_collectors::{CounterSample, Domain, HostRoot, SourceKind};

use crate::runs_cmd::Format;

#[derive(Debug, Args)]
pub struct CalibrateArgs {
    /// The configuration file (for host.root and host.cgroup_root).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Seconds measured at each load level.
    #[arg(long, default_value_t = 3.0, value_name = "S")]
    pub seconds_per_step: f64,
    /// Refuse when the host is busier than this many CPUs before any burner runs.
    #[arg(long, default_value_t = 0.25, value_name = "CPUS")]
    pub max_idle_busy: f64,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
}

/// One load level of one package.
#[derive(Debug, Serialize)]
struct Step {
    burners: usize,
    busy_cpus: f64,
    power_w: f64,
}

#[derive(Debug, Serialize)]
struct Fit {
    package: u32,
    idle_watts: f64,
    watts_per_busy_cpu: f64,
    r_squared: f64,
    steps: Vec<Step>,
}

/// The least-squares line through (x, y): (intercept, slope, R squared).
pub fn fit_line(points: &[(f64, f64)]) -> Option<(f64, f64, f64)> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let sxx: f64 = points.iter().map(|(x, _)| (x - mx) * (x - mx)).sum();
    let sxy: f64 = points.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    if sxx <= f64::EPSILON {
        return None;
    }
    let slope = sxy / sxx;
    let intercept = my - slope * mx;
    let ss_tot: f64 = points.iter().map(|(_, y)| (y - my) * (y - my)).sum();
    let ss_res: f64 = points
        .iter()
        .map(|(x, y)| (y - intercept - slope * x).powi(2))
        .sum();
    let r2 = if ss_tot <= f64::EPSILON {
        1.0
    } else {
        1.0 - ss_res / ss_tot
    };
    Some((intercept, slope, r2))
}

/// Burner processes in a cgroup of their own; killed, reaped and the cgroup removed on drop.
struct Burners {
    cgroup: Option<PathBuf>,
    children: Vec<Child>,
}

impl Burners {
    fn new(cgroup_root: Option<&Path>) -> Self {
        let cgroup = cgroup_root.and_then(|r| {
            let p = r.join(format!("wattd-calibrate-{}", std::process::id()));
            std::fs::create_dir(&p).ok().map(|_| p)
        });
        Burners {
            cgroup,
            children: Vec::new(),
        }
    }

    fn set(&mut self, n: usize) -> anyhow::Result<()> {
        while self.children.len() > n {
            if let Some(mut c) = self.children.pop() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        while self.children.len() < n {
            let exe = std::env::current_exe().context("locating the wattd binary")?;
            let child = Command::new(exe)
                .arg("burn-cpu-for-calibration")
                .spawn()
                .context("starting a burner")?;
            if let Some(cg) = &self.cgroup {
                let _ = std::fs::write(cg.join("cgroup.procs"), child.id().to_string());
            }
            self.children.push(child);
        }
        Ok(())
    }
}

impl Drop for Burners {
    fn drop(&mut self) {
        let _ = self.set(0);
        if let Some(cg) = &self.cgroup {
            for _ in 0..50 {
                if std::fs::remove_dir(cg).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// The hidden burner: spins until killed.
pub fn burn() -> ! {
    let mut x: u64 = 1;
    loop {
        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
    }
}

pub fn run(args: &CalibrateArgs) -> anyhow::Result<()> {
    let cfg = wattd::config::load(args.config.as_deref()).map_err(|e| anyhow::anyhow!("{e}"))?;
    anyhow::ensure!(
        args.seconds_per_step.is_finite() && (0.2..=600.0).contains(&args.seconds_per_step),
        "--seconds-per-step must be between 0.2 and 600"
    );
    let root = HostRoot::new(&cfg.host_root);
    let mut sel = probe::select(&ProbeOptions::new(root.clone()));
    let measured: Vec<_> = sel
        .report
        .chosen
        .iter()
        .filter(|c| c.domain == Domain::Package && c.source != SourceKind::Estimator)
        .collect();
    if measured.is_empty() {
        bail!("calibration needs a hardware energy counter for the CPU packages, and this host has only the estimator (`wattd probe` says why): there is nothing to measure");
    }
    let topo = Topology::read(&root).context("reading CPU topology")?;
    let cpus_by_pkg = topo.cpus_by_package();
    let ncpus = topo.cpus.len();
    // The burners run in a cgroup of their own (so runs' cgroups and the control plane see
    // them as what they are); without a writable cgroup2 mount they run where we are.
    let cgroup_root = match &cfg.cgroup_root {
        Some(p) => Some(root.join(p)),
        None => wattd_collectors::cgroup::find_cgroup2_mount(&root)
            .ok()
            .map(|m| root.join(m.mount_point)),
    };
    let mut burners = Burners::new(cgroup_root.as_deref());
    let hz = user_hz();
    // Baseline every meter, then measure each load level.
    let mut readings = Vec::new();
    for m in &mut sel.meters {
        m.read(0, &mut readings);
    }
    let mut steps: BTreeMap<u32, Vec<Step>> = BTreeMap::new();
    for n in 0..=ncpus {
        burners.set(n)?;
        std::thread::sleep(Duration::from_millis(300)); // let the load settle
        let mut skip = Vec::new();
        for m in &mut sel.meters {
            m.read(1, &mut skip); // new baseline at the start of the window
        }
        let stat0 = ProcStat::read(&root).context("reading /proc/stat")?;
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs_f64(args.seconds_per_step));
        let elapsed_us = t0.elapsed().as_micros() as u64;
        readings.clear();
        for m in &mut sel.meters {
            m.read(elapsed_us, &mut readings);
        }
        let stat1 = ProcStat::read(&root).context("reading /proc/stat")?;
        for r in &readings {
            let (Domain::Package, Some(pkg)) = (r.key.domain, r.key.package) else {
                continue;
            };
            let Ok(CounterSample::Energy { energy_uj, .. }) = r.sample else {
                bail!(
                    "{}: no clean reading at load {n} ({:?}); retry on a quiet host",
                    r.key,
                    r.sample
                );
            };
            let cpus = cpus_by_pkg.get(&pkg).cloned().unwrap_or_default();
            let busy_cpus = busy_us_signed(&stat0, &stat1, &cpus, hz, elapsed_us).max(0) as f64
                / elapsed_us as f64;
            if n == 0 && busy_cpus > args.max_idle_busy {
                bail!(
                    "the host is too busy to calibrate: package {pkg} was {busy_cpus:.2} CPUs busy with no burner running (at most {} allowed); retry when it is quiet",
                    args.max_idle_busy
                );
            }
            let power_w = energy_uj as f64 / elapsed_us as f64;
            steps.entry(pkg).or_default().push(Step {
                burners: n,
                busy_cpus,
                power_w,
            });
        }
    }
    drop(burners);
    let mut fits = Vec::new();
    for (pkg, st) in steps {
        let pts: Vec<(f64, f64)> = st.iter().map(|s| (s.busy_cpus, s.power_w)).collect();
        let Some((idle, per_cpu, r2)) = fit_line(&pts) else {
            bail!("package {pkg}: the load levels did not change its busy time; cannot fit");
        };
        fits.push(Fit {
            package: pkg,
            idle_watts: idle,
            watts_per_busy_cpu: per_cpu,
            r_squared: r2,
            steps: st,
        });
    }
    let out = match args.format {
        Format::Json => serde_json::to_string_pretty(&fits).context("encoding the fit")? + "\n",
        Format::Text => {
            let mut s = String::new();
            for f in &fits {
                s += &format!(
                    "package {}: idle {:.2} W + {:.2} W per busy CPU (R^2 {:.4}, {} load levels)\n",
                    f.package,
                    f.idle_watts,
                    f.watts_per_busy_cpu,
                    f.r_squared,
                    f.steps.len()
                );
            }
            let idle_mean =
                fits.iter().map(|f| f.idle_watts).sum::<f64>() / fits.len().max(1) as f64;
            s += &format!("\n# add to the configuration:\n[calibration]\nidle_watts_package = {idle_mean:.2}\n");
            s
        }
    };
    std::io::stdout()
        .write_all(out.as_bytes())
        .context("writing to stdout")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_squares_by_hand() {
        // y = 10 + 20 x exactly
        let (a, b, r2) = fit_line(&[(0.0, 10.0), (1.0, 30.0), (2.0, 50.0)]).unwrap();
        assert!((a - 10.0).abs() < 1e-9 && (b - 20.0).abs() < 1e-9 && (r2 - 1.0).abs() < 1e-12);
        // noisy: residuals 1, -2, 1 around y = 10 + 20 x
        let (a, b, r2) = fit_line(&[(0.0, 11.0), (1.0, 28.0), (2.0, 51.0)]).unwrap();
        assert!((b - 20.0).abs() < 1e-9, "{b}");
        assert!((a - 10.0).abs() < 1e-9, "{a}"); // mean y 30 - slope 20 x mean x 1
        assert!(r2 < 1.0 && r2 > 0.99, "{r2}");
        assert!(fit_line(&[(1.0, 2.0)]).is_none());
        assert!(fit_line(&[(1.0, 2.0), (1.0, 3.0)]).is_none());
    }
}
