//! `wattd runs`: per-run energy by domain, in uJ and Wh, summed over the intervals still in the
//! local spool (acknowledged batches already deleted are not included: the ledger has them).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use serde::Serialize;
use wattd::spool;

/// 1 Wh in microjoules.
pub const UJ_PER_WH: u64 = 3_600_000_000;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct RunsArgs {
    /// The data dir holding the spool [default: /var/lib/wattd as root, ./wattd-data
    /// otherwise].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
}

/// `energy_uj` in Wh with 10 decimals (0.36 uJ resolution, finer than 1 uJ), rounded half up,
/// computed in integers so the text is exact.
pub fn wh_text(energy_uj: u64) -> String {
    let whole = energy_uj / UJ_PER_WH;
    let rem = u128::from(energy_uj % UJ_PER_WH);
    let scale = 10_000_000_000u128;
    let frac = (rem * scale + u128::from(UJ_PER_WH) / 2) / u128::from(UJ_PER_WH);
    let (whole, frac) = if frac >= scale {
        (u128::from(whole) + 1, frac - scale)
    } else {
        (u128::from(whole), frac)
    };
    format!("{whole}.{frac:010}")
}

#[derive(Debug, Default, Serialize)]
struct DomainRow {
    domain: String,
    energy_uj: u64,
    energy_wh: String,
}

#[derive(Debug, Default, Serialize)]
struct RunRow {
    run_id: String,
    energy_uj: u64,
    energy_wh: String,
    domains: Vec<DomainRow>,
}

#[derive(Debug, Default, Serialize)]
struct RunsReport {
    batches: u64,
    intervals: u64,
    first_seq: Option<u64>,
    last_seq: Option<u64>,
    unreadable_records: u64,
    runs: Vec<RunRow>,
}

fn domain_label(domain: &str, package: Option<u32>) -> String {
    match package {
        Some(p) => format!("{domain}:{p}"),
        None => domain.to_owned(),
    }
}

pub fn run(args: &RunsArgs) -> anyhow::Result<()> {
    let dir = args
        .data_dir
        .clone()
        .unwrap_or_else(spool::default_data_dir);
    anyhow::ensure!(dir.is_dir(), "{}: no such data dir", dir.display());
    let mut totals: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    let mut report = RunsReport::default();
    let (batches, unreadable) = spool::decoded_batches(&dir)?;
    report.unreadable_records = unreadable;
    for batch in &batches {
        report.batches += 1;
        report.first_seq = Some(report.first_seq.map_or(batch.seq, |s| s.min(batch.seq)));
        report.last_seq = Some(report.last_seq.map_or(batch.seq, |s| s.max(batch.seq)));
        for interval in &batch.intervals {
            report.intervals += 1;
            for d in &interval.domains {
                let label = domain_label(&d.domain, d.package);
                for a in &d.allocations {
                    let e = totals
                        .entry(a.run_id.clone())
                        .or_default()
                        .entry(label.clone())
                        .or_default();
                    *e = e.saturating_add(a.active_uj).saturating_add(a.idle_uj);
                }
            }
        }
    }
    for (run_id, domains) in totals {
        let energy_uj = domains.values().fold(0u64, |a, &b| a.saturating_add(b));
        report.runs.push(RunRow {
            run_id,
            energy_uj,
            energy_wh: wh_text(energy_uj),
            domains: domains
                .into_iter()
                .map(|(domain, energy_uj)| DomainRow {
                    domain,
                    energy_uj,
                    energy_wh: wh_text(energy_uj),
                })
                .collect(),
        });
    }
    let out = match args.format {
        Format::Json => {
            serde_json::to_string_pretty(&report).context("encoding the report")? + "\n"
        }
        Format::Text => render_text(&report),
    };
    std::io::stdout()
        .write_all(out.as_bytes())
        .context("writing to stdout")?;
    if report.unreadable_records > 0 {
        eprintln!(
            "wattd: {} damaged or unreadable record(s) not counted; run `wattd verify`",
            report.unreadable_records
        );
    }
    Ok(())
}

fn render_text(r: &RunsReport) -> String {
    let mut s = String::new();
    let range = match (r.first_seq, r.last_seq) {
        (Some(a), Some(b)) => format!("seq {a}..={b}"),
        _ => "no batches".into(),
    };
    let _ = writeln!(
        s,
        "{} batches ({range}), {} intervals",
        r.batches, r.intervals
    );
    let _ = writeln!(
        s,
        "{:<36} {:<12} {:>20} {:>22}",
        "RUN", "DOMAIN", "ENERGY_UJ", "ENERGY_WH"
    );
    for run in &r.runs {
        for d in &run.domains {
            let _ = writeln!(
                s,
                "{:<36} {:<12} {:>20} {:>22}",
                run.run_id, d.domain, d.energy_uj, d.energy_wh
            );
        }
        let _ = writeln!(
            s,
            "{:<36} {:<12} {:>20} {:>22}",
            run.run_id, "total", run.energy_uj, run.energy_wh
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wh_text_is_exact_and_rounds_half_up() {
        assert_eq!(wh_text(0), "0.0000000000");
        assert_eq!(wh_text(UJ_PER_WH), "1.0000000000");
        assert_eq!(wh_text(1), "0.0000000003");
        assert_eq!(wh_text(UJ_PER_WH / 2), "0.5000000000");
        assert_eq!(wh_text(UJ_PER_WH - 1), "0.9999999997");
        assert_eq!(wh_text(u64::MAX), "5124095576.0304310042");
    }
}
