//! `wattd explain RUN_ID`: the audit trail of one run from the spool. Every interval the run
//! appears in, per domain: what the meter measured, the policy and idle estimate, the run's usage
//! against everyone's, its share, what it was allocated, and the batch that carries it. The
//! totals at the end are computed from the same records as `wattd runs`, to the microjoule.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use serde::Serialize;
use wattd::spool;

use crate::runs_cmd::Format;
use wattd::energy_table::wh_text;

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// The run to explain.
    pub run_id: String,
    /// The data dir holding the spool [default: /var/lib/wattd as root, ./wattd-data
    /// otherwise].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
}

/// One domain of one interval, as it concerns the run.
#[derive(Debug, Serialize)]
struct Row {
    batch_seq: u64,
    interval: u64,
    start_unix_ns: i64,
    end_unix_ns: i64,
    coarsened: bool,
    /// `package:0`, `dram:1`, `psys`: the same labels as `wattd runs`.
    domain: String,
    source: String,
    estimated: bool,
    measured_uj: u64,
    policy: String,
    policy_version: u32,
    idle_source: String,
    idle_power_uw: u64,
    /// The run's usage and everyone's (runs + host) on this meter's packages: the basis of the
    /// split of the active part (and of the idle part under `proportional`).
    run_usage: u64,
    total_usage: u64,
    /// run_usage / total_usage, for people; the allocation is computed in integers.
    share: f64,
    active_uj: u64,
    idle_uj: u64,
}

#[derive(Debug, Serialize)]
struct Total {
    domain: String,
    energy_uj: u64,
    energy_wh: String,
}

/// What the run's summary says of its end (absent while it runs, or if its summary is not in
/// the spool).
#[derive(Debug, Serialize)]
struct Finished {
    started_unix_ns: i64,
    finished_unix_ns: i64,
    /// `read`, `traced`, `perf_counted`, `reconciled`, `reconciled_shared` or `lost` (empty in records
    /// older than it).
    final_usage: String,
    /// CPU microseconds of the run recovered from its parent over its life.
    reconciled_usage_us: u64,
    batch_seq: u64,
}

#[derive(Debug, Serialize)]
struct Explanation {
    run_id: String,
    intervals: usize,
    rows: Vec<Row>,
    totals: Vec<Total>,
    energy_uj: u64,
    energy_wh: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    finished: Option<Finished>,
}

pub fn run(args: &ExplainArgs) -> anyhow::Result<()> {
    let dir = args
        .data_dir
        .clone()
        .unwrap_or_else(spool::default_data_dir);
    anyhow::ensure!(dir.is_dir(), "{}: no such data dir", dir.display());
    let mut rows = Vec::new();
    let mut finished = None;
    let (batches, _unreadable) = spool::decoded_batches(&dir)?;
    for batch in &batches {
        if let Some(f) = batch.run_summaries.iter().find(|f| f.run_id == args.run_id) {
            finished = Some(Finished {
                started_unix_ns: f.started_unix_ns,
                finished_unix_ns: f.finished_unix_ns,
                final_usage: f.final_usage.clone(),
                reconciled_usage_us: f.reconciled_usage_us,
                batch_seq: batch.seq,
            });
        }
        for i in &batch.intervals {
            for d in &i.domains {
                let Some(a) = d.allocations.iter().find(|a| a.run_id == args.run_id) else {
                    continue;
                };
                let total_usage: u64 = d
                    .allocations
                    .iter()
                    .map(|x| x.usage_us)
                    .fold(d.host_usage, u64::saturating_add);
                rows.push(Row {
                    batch_seq: batch.seq,
                    interval: i.index,
                    start_unix_ns: i.start_unix_ns,
                    end_unix_ns: i.end_unix_ns,
                    coarsened: i.coarsened,
                    domain: match d.package {
                        Some(p) => format!("{}:{p}", d.domain),
                        None => d.domain.clone(),
                    },
                    source: d.source.clone(),
                    estimated: d.quality == wattd_proto::v1::Quality::Estimated as i32,
                    measured_uj: d.measured_uj,
                    policy: i.policy.clone(),
                    policy_version: i.policy_version,
                    idle_source: d.idle_source.clone(),
                    idle_power_uw: d.idle_power_uw,
                    run_usage: a.usage_us,
                    total_usage,
                    share: if total_usage == 0 {
                        0.0
                    } else {
                        a.usage_us as f64 / total_usage as f64
                    },
                    active_uj: a.active_uj,
                    idle_uj: a.idle_uj,
                });
            }
        }
    }
    rows.sort_by(|a, b| (a.interval, &a.domain).cmp(&(b.interval, &b.domain)));
    let mut by_domain: BTreeMap<String, u64> = BTreeMap::new();
    for r in &rows {
        let e = by_domain.entry(r.domain.clone()).or_default();
        *e = e.saturating_add(r.active_uj).saturating_add(r.idle_uj);
    }
    let energy_uj = by_domain.values().fold(0u64, |a, &b| a.saturating_add(b));
    let ex = Explanation {
        run_id: args.run_id.clone(),
        intervals: rows
            .iter()
            .map(|r| r.interval)
            .collect::<BTreeSet<_>>()
            .len(),
        totals: by_domain
            .into_iter()
            .map(|(domain, energy_uj)| Total {
                domain,
                energy_uj,
                energy_wh: wh_text(u128::from(energy_uj)),
            })
            .collect(),
        rows,
        energy_uj,
        energy_wh: wh_text(u128::from(energy_uj)),
        finished,
    };
    // A finished run billed nothing (its cgroup went before any read, and its parent could not
    // tell) is still explained: its summary says how its last usage was obtained.
    anyhow::ensure!(
        !ex.rows.is_empty() || ex.finished.is_some(),
        "run {:?} appears in no interval and no summary of {}",
        args.run_id,
        dir.display()
    );
    let out = match args.format {
        Format::Json => {
            serde_json::to_string_pretty(&ex).context("encoding the explanation")? + "\n"
        }
        Format::Text => render_text(&ex),
    };
    std::io::stdout()
        .write_all(out.as_bytes())
        .context("writing to stdout")?;
    Ok(())
}

fn render_text(ex: &Explanation) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "run {} in {} intervals", ex.run_id, ex.intervals);
    let _ = writeln!(
        s,
        "{:>6} {:>8} {:<10} {:<10} {:>12} {:<13} {:>10} {:>10} {:>10} {:>7} {:>12} {:>12}",
        "BATCH",
        "INTERVAL",
        "DOMAIN",
        "SOURCE",
        "MEASURED_UJ",
        "POLICY",
        "IDLE_W",
        "USAGE",
        "OF",
        "SHARE",
        "ACTIVE_UJ",
        "IDLE_UJ"
    );
    for r in &ex.rows {
        let _ = writeln!(
            s,
            "{:>6} {:>8} {:<10} {:<10} {:>12} {:<13} {:>10} {:>10} {:>10} {:>6.2}% {:>12} {:>12}{}",
            r.batch_seq,
            r.interval,
            r.domain,
            r.source,
            r.measured_uj,
            format!("{}/v{}", r.policy, r.policy_version),
            format!(
                "{:.3}{}",
                r.idle_power_uw as f64 / 1e6,
                if r.idle_source == "window" { "w" } else { "" }
            ),
            r.run_usage,
            r.total_usage,
            r.share * 100.0,
            r.active_uj,
            r.idle_uj,
            if r.coarsened { "  (coarsened)" } else { "" }
        );
    }
    let _ = writeln!(s, "\ntotals:");
    for t in &ex.totals {
        let _ = writeln!(
            s,
            "  {:<10} {:>16} uJ  {} Wh",
            t.domain, t.energy_uj, t.energy_wh
        );
    }
    let _ = writeln!(
        s,
        "  {:<10} {:>16} uJ  {} Wh",
        "all", ex.energy_uj, ex.energy_wh
    );
    match &ex.finished {
        Some(f) => {
            let how = match f.final_usage.as_str() {
                "read" => "read from its own cpu.stat",
                "traced" => {
                    "its cgroup was removed first (or before it was known): its CPU time as the \
                     kernel charged it from its creation, counted by the cgroup trace (eBPF)"
                }
                "perf_counted" => {
                    "its cgroup was removed first: the tail counted by its own perf \
                     task-clock counters (its parent could not tell, or was noisier)"
                }
                "reconciled" => "its cgroup was removed first: recovered exactly from its parent",
                "reconciled_shared" => {
                    "its cgroup was removed first: recovered from its parent, shared with the \
                     other children that went in the same stretch"
                }
                "lost" => "LOST: the parent could not tell; that tail is in the host bucket",
                "" => "not recorded (an older agent)",
                _ => "unknown to this version",
            };
            let _ = writeln!(
                s,
                "\nfinished (summary in batch {}): final usage {} ({how}); {} us of CPU \
                 recovered from its parent over its life",
                f.batch_seq,
                if f.final_usage.is_empty() {
                    "-"
                } else {
                    &f.final_usage
                },
                f.reconciled_usage_us
            );
        }
        None => {
            let _ = writeln!(s, "\nnot finished (no summary in the spool)");
        }
    }
    s
}
