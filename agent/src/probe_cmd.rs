//! `wattd probe`: prints the collectors' probe report as text for people or JSON for scripts.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use wattd_collectors::probe::{self, ProbeOptions, ProbeReport};
use wattd_collectors::HostRoot;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// Read /sys, /proc and /dev under this directory instead of / (a captured host tree).
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub root: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
    /// The NVML library to load for the GPU probe (default: libnvidia-ml.so.1 from the dynamic
    /// loader's path, as `[gpu] library`).
    #[arg(long, value_name = "PATH")]
    pub nvml_library: Option<PathBuf>,
    /// The AMD SMI library to load for the GPU probe (default: libamd_smi.so from the dynamic
    /// loader's path, then /opt/rocm/lib/libamd_smi.so, as `[gpu] amd_smi_library`).
    #[arg(long, value_name = "PATH")]
    pub amd_smi_library: Option<PathBuf>,
    /// Do not probe GPUs, NVIDIA or AMD (as `[gpu] enabled = false`).
    #[arg(long)]
    pub no_gpu: bool,
    /// Also check the BMC this configuration's `[platform]` names (one Redfish read, with its
    /// timeout; a configured BMC that cannot be read is an error, exit status 1), and the hwmon
    /// channels its `[hwmon] power` declares.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// What `wattd probe` found of the platform meter's BMC.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PlatformProbe {
    /// `[platform] url`, or `None` when no BMC is configured.
    pub url: Option<String>,
    pub available: bool,
    /// The resource read (`/redfish/v1/Chassis/1U/EnvironmentMetrics`).
    pub resource: Option<String>,
    pub power_mw: Option<u64>,
    pub energy_uj: Option<u64>,
    /// `redfish` (the BMC's energy counter, measured) or `redfish_power` (integrated, estimated).
    pub source: Option<&'static str>,
    /// Why it is not used, or what to know.
    pub reason: String,
}

impl PlatformProbe {
    /// Not used, and why.
    fn unavailable(url: Option<String>, reason: String) -> Self {
        PlatformProbe {
            url,
            available: false,
            resource: None,
            power_mw: None,
            energy_uj: None,
            source: None,
            reason,
        }
    }
}

/// Probes the configured BMC (`None`: not configured).
pub fn probe_platform(cfg: Option<&wattd::config::PlatformConfig>) -> PlatformProbe {
    let Some(p) = cfg else {
        return PlatformProbe::unavailable(
            None,
            "no [platform] configured (wattd probe --config FILE checks the BMC a \
             configuration names)"
                .into(),
        );
    };
    match wattd::bmc::probe(&p.bmc) {
        Ok((resource, reading)) => PlatformProbe {
            url: Some(p.bmc.url.clone()),
            available: true,
            resource: Some(resource.path().to_owned()),
            power_mw: reading.power_mw,
            energy_uj: reading.energy_uj,
            source: Some(if reading.energy_uj.is_some() {
                "redfish"
            } else {
                "redfish_power"
            }),
            reason: if reading.energy_uj.is_some() {
                "the BMC's energy counter, less the other meters (measured)".into()
            } else {
                "the BMC's power readings integrated, less the other meters (estimated: this \
                 BMC has no energy counter)"
                    .into()
            },
        },
        Err(e) => PlatformProbe::unavailable(Some(p.bmc.url.clone()), e.to_string()),
    }
}

pub fn run(args: &ProbeArgs) -> anyhow::Result<()> {
    let root = HostRoot::new(&args.root);
    let cfg = match &args.config {
        Some(path) => Some(wattd::config::load(Some(path)).map_err(|e| anyhow::anyhow!("{e}"))?),
        None => None,
    };
    let mut opts = ProbeOptions::new(root.clone());
    opts.gpus = !args.no_gpu;
    if let Some(c) = &cfg {
        opts.hwmon_declared = c.hwmon_power.clone();
    }
    let mut sel = probe::select(&opts);
    let gpu_cfg = wattd::config::GpuConfig {
        enabled: !args.no_gpu,
        library: args.nvml_library.clone(),
        amd_smi_library: args.amd_smi_library.clone(),
        ..Default::default()
    };
    let (gpu, _collector) = wattd::gpu::probe(&gpu_cfg, &root, Duration::from_secs(10));
    sel.report.add_gpus(gpu);
    if let Some((amd, _)) = wattd::gpu::probe_amd(&gpu_cfg, &root, Duration::from_secs(10)) {
        sel.report.add_amd_gpus(amd);
    }
    let platform = probe_platform(cfg.as_ref().and_then(|c| c.platform.as_ref()));
    let out = match args.format {
        Format::Json => {
            let mut v = serde_json::to_value(&sel.report).context("encoding the report")?;
            if let Some(o) = v.as_object_mut() {
                o.insert(
                    "platform".into(),
                    serde_json::to_value(&platform).context("encoding the report")?,
                );
            }
            serde_json::to_string_pretty(&v).context("encoding the report")? + "\n"
        }
        Format::Text => render_text(&sel.report) + &render_platform(&platform),
    };
    std::io::stdout()
        .write_all(out.as_bytes())
        .context("writing to stdout")?;
    verdict(&sel.report)?;
    if platform.url.is_some() && !platform.available {
        anyhow::bail!("the BMC cannot be read: {}", platform.reason);
    }
    Ok(())
}

/// The platform meter's section of the text report.
pub fn render_platform(p: &PlatformProbe) -> String {
    let mut s = String::new();
    let state = if p.available { "in use" } else { "not used" };
    let _ = write!(s, "\nplatform (bmc): {state}");
    if let Some(u) = &p.url {
        let _ = write!(s, " {u}");
    }
    let _ = writeln!(s, ": {}", p.reason);
    if let Some(r) = &p.resource {
        let _ = write!(s, "  {r}");
        if let Some(mw) = p.power_mw {
            let _ = write!(s, "  power {:.1} W", mw as f64 / 1e3);
        }
        if let Some(e) = p.energy_uj {
            let _ = write!(s, "  energy {:.3} kWh", e as f64 / 3.6e12);
        }
        let _ = writeln!(s);
    }
    s
}

/// A GPU the host has and wattd cannot measure is energy nobody is billed for: an error (exit
/// status 1 after the report), so that an installation check (`wattd probe && ...`) stops on it.
fn verdict(r: &ProbeReport) -> anyhow::Result<()> {
    match r.gpu.as_ref() {
        Some(g) if g.problem_is_error => {
            anyhow::bail!("{}", g.problem.as_deref().unwrap_or("GPU not measured"))
        }
        _ => Ok(()),
    }
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// The human-readable report.
pub fn render_text(r: &ProbeReport) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "root: {}", r.root);
    match &r.cpu {
        Some(c) => {
            let _ = writeln!(
                s,
                "cpu: {} ({:?} family {:#x} model {:#x}){}",
                c.model_name,
                c.vendor,
                c.family,
                c.model,
                if c.virtualized { ", virtualized" } else { "" }
            );
        }
        None => {
            let _ = writeln!(s, "cpu: unknown");
        }
    }
    let _ = writeln!(s, "topology: {} CPUs in packages {:?}", r.cpus, r.packages);
    let _ = writeln!(s, "\nchosen:");
    if r.chosen.is_empty() {
        let _ = writeln!(s, "  (none: no domain can be measured or estimated)");
    }
    for c in &r.chosen {
        let _ = writeln!(
            s,
            "  {:<8} package {:<3} die {:<3} {:<10} {:?}",
            c.domain.as_str(),
            opt(c.package),
            opt(c.die),
            c.source.as_str(),
            c.quality
        );
    }
    let _ = writeln!(s, "\nsources:");
    for src in &r.sources {
        let state = if src.available { "in use" } else { "not used" };
        let _ = write!(s, "  {:<10} {state}", src.source.as_str());
        if let Some(reason) = &src.reason {
            let _ = write!(s, ": {reason}");
        }
        let _ = writeln!(s);
        for z in &src.zones {
            let _ = write!(
                s,
                "    {:<13} {:<7} pkg {:<3} die {:<3} {}",
                z.status,
                z.domain.map_or("?", |d| d.as_str()),
                opt(z.package),
                opt(z.die),
                z.location
            );
            if let (Some(e), Some(rg)) = (z.energy_uj, z.range_uj) {
                let _ = write!(s, "  energy {e} uJ of range {rg}");
            }
            if let Some(d) = &z.detail {
                let _ = write!(s, "  ({d})");
            }
            let _ = writeln!(s);
        }
    }
    let gpus = [("nvml", &r.gpu), ("amd smi", &r.amd_gpu)];
    for (lib, g) in gpus.iter().filter_map(|(l, g)| g.as_ref().map(|g| (l, g))) {
        let state = if g.available { "in use" } else { "not used" };
        let _ = write!(s, "\ngpu ({lib}): {state}");
        if let Some(reason) = &g.reason {
            let _ = write!(s, ": {reason}");
        }
        let _ = writeln!(s);
        for d in &g.devices {
            let _ = write!(
                s,
                "  {:<9} gpu {:<3} {} {}",
                d.status,
                d.index,
                d.uuid.as_deref().unwrap_or("?"),
                d.name.as_deref().unwrap_or("?"),
            );
            if let Some(src) = d.source {
                let _ = write!(s, "  {src}");
            }
            if let Some(e) = d.energy_mj {
                let _ = write!(s, "  energy {e} mJ since driver load");
            }
            if let Some(p) = d.power_mw {
                let _ = write!(s, "  power {p} mW");
            }
            match (d.mig, d.mig_instances) {
                (Some(true), Some(n)) => {
                    let _ = write!(s, "  MIG on, {n} instance(s)");
                }
                (Some(true), None) => {
                    let _ = write!(s, "  MIG on");
                }
                _ => {}
            }
            let _ = writeln!(s);
            let _ = writeln!(s, "            usage: {}", d.usage);
            if let Some(detail) = &d.detail {
                let _ = writeln!(s, "            {detail}");
            }
        }
        if !g.present.is_empty() {
            let _ = writeln!(s, "  on the PCI bus:");
            for p in &g.present {
                let _ = writeln!(
                    s,
                    "    {} driver {}",
                    p.address,
                    p.driver.as_deref().unwrap_or("(none)")
                );
            }
        }
    }
    let gpu_problems: Vec<(&str, bool)> = [&r.gpu, &r.amd_gpu]
        .into_iter()
        .flatten()
        .filter_map(|g| g.problem.as_deref().map(|p| (p, g.problem_is_error)))
        .collect();
    if !r.problems.is_empty() || !gpu_problems.is_empty() {
        let _ = writeln!(s, "\nproblems:");
        for (p, is_error) in gpu_problems {
            let severity = if is_error { "error" } else { "warning" };
            let _ = writeln!(s, "  {severity}: {p}");
        }
        for p in &r.problems {
            let _ = writeln!(s, "  {p}");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unmeasured_gpu_is_an_error_in_the_text_and_the_exit_status() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("sys/bus/pci/devices/0000:17:00.0");
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::write(dev.join("vendor"), "0x10de\n").unwrap();
        std::fs::write(dev.join("class"), "0x030200\n").unwrap();
        std::fs::create_dir_all(dir.path().join("sys/bus/pci/drivers/nvidia")).unwrap();
        std::os::unix::fs::symlink("../../../bus/pci/drivers/nvidia", dev.join("driver")).unwrap();
        let root = HostRoot::new(dir.path());
        let mut sel = probe::select(&ProbeOptions::new(root.clone()));
        let clean = verdict(&sel.report);
        assert!(clean.is_ok(), "{clean:?}");
        let (gpu, _) = wattd::gpu::probe_on_thread(
            || Err(wattd_collectors::nvml::NvmlError::DriverNotLoaded),
            wattd_collectors::nvml::GpuOptions::new(root),
            Duration::from_secs(5),
        );
        sel.report.add_gpus(gpu);
        let text = render_text(&sel.report);
        assert!(text.contains("0000:17:00.0 driver nvidia"), "{text}");
        assert!(
            text.contains(
                "error: 1 NVIDIA GPU(s) bound to the nvidia driver (0000:17:00.0), 0 measured"
            ),
            "{text}"
        );
        assert!(text.contains("kernel driver is not loaded"), "{text}");
        let err = verdict(&sel.report).unwrap_err().to_string();
        assert!(err.contains("0000:17:00.0"), "{err}");
    }
}
