//! `wattd runs`: per-run energy by domain, in uJ and Wh, summed over the intervals still in the
//! local spool (acknowledged batches already deleted are not included: the ledger has them).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use serde::Serialize;
use wattd::energy_table::{domain_label, run_rows, table_text, RunRow};
use wattd::spool;

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

#[derive(Debug, Default, Serialize)]
struct RunsReport {
    batches: u64,
    intervals: u64,
    first_seq: Option<u64>,
    last_seq: Option<u64>,
    unreadable_records: u64,
    runs: Vec<RunRow>,
}

pub fn run(args: &RunsArgs) -> anyhow::Result<()> {
    let dir = args
        .data_dir
        .clone()
        .unwrap_or_else(spool::default_data_dir);
    anyhow::ensure!(dir.is_dir(), "{}: no such data dir", dir.display());
    let mut totals: BTreeMap<String, BTreeMap<String, u128>> = BTreeMap::new();
    let mut report = RunsReport::default();
    let (batches, unreadable) = spool::decoded_batches(&dir)?;
    report.unreadable_records = unreadable;
    let mut finals: BTreeMap<String, (String, u64)> = BTreeMap::new();
    for batch in &batches {
        report.batches += 1;
        report.first_seq = Some(report.first_seq.map_or(batch.seq, |s| s.min(batch.seq)));
        report.last_seq = Some(report.last_seq.map_or(batch.seq, |s| s.max(batch.seq)));
        for summary in &batch.run_summaries {
            if !summary.final_usage.is_empty() {
                finals.insert(
                    summary.run_id.clone(),
                    (summary.final_usage.clone(), summary.reconciled_usage_us),
                );
            }
        }
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
                    *e += u128::from(a.active_uj) + u128::from(a.idle_uj);
                }
            }
        }
    }
    report.runs = run_rows(totals);
    for row in &mut report.runs {
        if let Some((how, us)) = finals.remove(&row.run_id) {
            row.final_usage = Some(how);
            row.reconciled_usage_us = Some(us);
        }
    }
    // A finished run billed nothing is listed too (with no energy): an SRE looking for it must
    // find it, and see how its last usage was obtained.
    for (run_id, (how, us)) in finals {
        report.runs.push(RunRow {
            node_id: None,
            run_id,
            energy_uj: 0,
            energy_wh: wattd::energy_table::wh_text(0),
            domains: Vec::new(),
            final_usage: Some(how),
            reconciled_usage_us: Some(us),
            account: None,
        });
    }
    report.runs.sort_by(|a, b| a.run_id.cmp(&b.run_id));
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
    s += &table_text(&r.runs);
    // How finished runs' last usage was obtained; a lost tail is named run by run.
    let mut hows: BTreeMap<&str, usize> = BTreeMap::new();
    for row in &r.runs {
        if let Some(how) = &row.final_usage {
            *hows.entry(how.as_str()).or_default() += 1;
        }
    }
    if !hows.is_empty() {
        let parts: Vec<String> = hows.iter().map(|(h, n)| format!("{n} {h}")).collect();
        let _ = writeln!(s, "final usage of finished runs: {}", parts.join(", "));
    }
    for row in r
        .runs
        .iter()
        .filter(|x| x.final_usage.as_deref() == Some("lost"))
    {
        let _ = writeln!(
            s,
            "  {}: cgroup removed before its final read and not reconcilable: its last \
             stretch is in the host bucket",
            row.run_id
        );
    }
    s
}
