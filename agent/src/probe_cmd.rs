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
    /// Do not probe NVIDIA GPUs (as `[gpu] enabled = false`).
    #[arg(long)]
    pub no_gpu: bool,
}

pub fn run(args: &ProbeArgs) -> anyhow::Result<()> {
    let root = HostRoot::new(&args.root);
    let opts = ProbeOptions::new(root.clone());
    let mut sel = probe::select(&opts);
    let gpu_cfg = wattd::config::GpuConfig {
        enabled: !args.no_gpu,
        library: args.nvml_library.clone(),
        ..Default::default()
    };
    let (gpu, _collector) = wattd::gpu::probe(&gpu_cfg, &root, Duration::from_secs(10));
    sel.report.add_gpus(gpu);
    let out = match args.format {
        Format::Json => {
            serde_json::to_string_pretty(&sel.report).context("encoding the report")? + "\n"
        }
        Format::Text => render_text(&sel.report),
    };
    std::io::stdout()
        .write_all(out.as_bytes())
        .context("writing to stdout")?;
    Ok(())
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
    if let Some(g) = &r.gpu {
        let state = if g.available { "in use" } else { "not used" };
        let _ = write!(s, "\ngpu (nvml): {state}");
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
    }
    if !r.problems.is_empty() {
        let _ = writeln!(s, "\nproblems:");
        for p in &r.problems {
            let _ = writeln!(s, "  {p}");
        }
    }
    s
}
