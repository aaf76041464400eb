//! `wattd-ledger runs` and `wattd-ledger nodes`: what the store holds, as text or JSON. Energy is
//! summed in integers and shown in uJ and in Wh with 10 decimals (exact, rounded half up), the
//! same way `wattd runs` shows the spool, so the two can be compared line for line.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::store::{ForkRow, NodeRow, RunDomainTotal};

/// 1 Wh in microjoules.
pub const UJ_PER_WH: u128 = 3_600_000_000;

/// `energy_uj` in Wh with 10 decimals, rounded half up, in integers (as `wattd runs`).
pub fn wh_text(energy_uj: u128) -> String {
    let whole = energy_uj / UJ_PER_WH;
    let rem = energy_uj % UJ_PER_WH;
    let scale = 10_000_000_000u128;
    let frac = (rem * scale + UJ_PER_WH / 2) / UJ_PER_WH;
    let (whole, frac) = if frac >= scale {
        (whole + 1, frac - scale)
    } else {
        (whole, frac)
    };
    format!("{whole}.{frac:010}")
}

#[derive(Debug, Serialize)]
pub struct DomainRow {
    pub domain: String,
    pub energy_uj: u128,
    pub energy_wh: String,
}

#[derive(Debug, Serialize)]
pub struct RunRow {
    pub run_id: String,
    pub energy_uj: u128,
    pub energy_wh: String,
    pub domains: Vec<DomainRow>,
}

#[derive(Debug, Serialize)]
pub struct RunsReport {
    pub runs: Vec<RunRow>,
}

pub fn runs_report(totals: Vec<RunDomainTotal>) -> RunsReport {
    let mut by_run: BTreeMap<String, Vec<DomainRow>> = BTreeMap::new();
    for t in totals {
        by_run.entry(t.run_id).or_default().push(DomainRow {
            domain: t.domain,
            energy_uj: t.energy_uj,
            energy_wh: wh_text(t.energy_uj),
        });
    }
    RunsReport {
        runs: by_run
            .into_iter()
            .map(|(run_id, mut domains)| {
                domains.sort_by(|a, b| a.domain.cmp(&b.domain));
                let energy_uj = domains.iter().map(|d| d.energy_uj).sum();
                RunRow {
                    run_id,
                    energy_uj,
                    energy_wh: wh_text(energy_uj),
                    domains,
                }
            })
            .collect(),
    }
}

pub fn runs_text(r: &RunsReport) -> String {
    let mut s = String::new();
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

/// A range of seqs the ledger does not hold, and how it knows they exist.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct GapRow {
    pub first_seq: u64,
    pub last_seq: u64,
    /// `held_above_hole` (batches above it were received) or `announced_not_received` (a
    /// heartbeat said the node sealed them).
    pub reason: &'static str,
}

/// `wattd-ledger nodes --quiet-after-s` default.
pub const DEFAULT_QUIET_AFTER_S: u64 = 120;

/// Now, in nanoseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

#[derive(Debug, Serialize)]
pub struct NodeReport {
    pub node_id: String,
    /// What needs attention first: `fork` (two different batches for one seq), `gap` (seqs the
    /// ledger knows exist and does not hold), `quiet` (nothing received, not even a heartbeat,
    /// for longer than the threshold: a host down, or cut off), else `ok`.
    pub status: &'static str,
    /// Seconds since the last batch or heartbeat arrived (absent if none ever did).
    pub silent_s: Option<u64>,
    /// Every seq 1..=last_seq is stored.
    pub last_seq: u64,
    pub batches: u64,
    pub intervals: u64,
    pub key_epoch: Option<u32>,
    pub last_sealed_unix_ns: Option<i64>,
    pub last_received_unix_ns: Option<i64>,
    pub last_heartbeat_sent_unix_ns: Option<i64>,
    pub last_heartbeat_received_unix_ns: Option<i64>,
    pub announced_sealed_seq: u64,
    pub highest_seen_seq: u64,
    pub gaps: Vec<GapRow>,
    pub forks: Vec<ForkRow>,
}

#[derive(Debug, Serialize)]
pub struct NodesReport {
    pub nodes: Vec<NodeReport>,
}

pub fn node_gaps(n: &NodeRow) -> Vec<GapRow> {
    let mut gaps = Vec::new();
    let mut next = n.last_seq + 1;
    if n.highest_seen_seq > n.last_seq {
        // Batches up to highest_seen were received and verified; the hole is below them.
        gaps.push(GapRow {
            first_seq: next,
            last_seq: n.highest_seen_seq,
            reason: "held_above_hole",
        });
        next = n.highest_seen_seq + 1;
    }
    if n.announced_sealed_seq >= next {
        gaps.push(GapRow {
            first_seq: next,
            last_seq: n.announced_sealed_seq,
            reason: "announced_not_received",
        });
    }
    gaps
}

/// The report as of now, with the default quiet threshold.
pub fn nodes_report(rows: Vec<NodeRow>) -> NodesReport {
    nodes_report_at(
        rows,
        unix_now_ns(),
        DEFAULT_QUIET_AFTER_S.saturating_mul(1_000_000_000),
    )
}

/// The report as of `now_unix_ns`: a node silent for more than `quiet_after_ns` is `quiet`.
pub fn nodes_report_at(rows: Vec<NodeRow>, now_unix_ns: i64, quiet_after_ns: u64) -> NodesReport {
    NodesReport {
        nodes: rows
            .into_iter()
            .map(|n| {
                let gaps = node_gaps(&n);
                let last_heard = n
                    .last_received_unix_ns
                    .max(n.last_heartbeat_received_unix_ns);
                let silent_ns = last_heard.map(|t| now_unix_ns.saturating_sub(t).max(0) as u64);
                let status = if !n.forks.is_empty() {
                    "fork"
                } else if !gaps.is_empty() {
                    "gap"
                } else if silent_ns.map_or(true, |s| s > quiet_after_ns) {
                    "quiet"
                } else {
                    "ok"
                };
                (n, gaps, status, silent_ns.map(|s| s / 1_000_000_000))
            })
            .map(|(n, gaps, status, silent_s)| NodeReport {
                status,
                silent_s,
                gaps,
                node_id: n.node_id,
                last_seq: n.last_seq,
                batches: n.batches,
                intervals: n.intervals,
                key_epoch: n.key_epoch,
                last_sealed_unix_ns: n.last_sealed_unix_ns,
                last_received_unix_ns: n.last_received_unix_ns,
                last_heartbeat_sent_unix_ns: n.last_heartbeat_sent_unix_ns,
                last_heartbeat_received_unix_ns: n.last_heartbeat_received_unix_ns,
                announced_sealed_seq: n.announced_sealed_seq,
                highest_seen_seq: n.highest_seen_seq,
                forks: n.forks,
            })
            .collect(),
    }
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

pub fn nodes_text(r: &NodesReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<24} {:<6} {:>10} {:>6} {:>10} {:>21} {:>9} {:>6}  GAPS / FORKS",
        "NODE",
        "STATUS",
        "LAST_SEQ",
        "EPOCH",
        "ANNOUNCED",
        "LAST_HEARTBEAT_UNIX_NS",
        "SILENT_S",
        "FORKS"
    );
    for n in &r.nodes {
        let _ = writeln!(
            s,
            "{:<24} {:<6} {:>10} {:>6} {:>10} {:>21} {:>9} {:>6}",
            n.node_id,
            n.status,
            n.last_seq,
            opt(n.key_epoch),
            n.announced_sealed_seq,
            opt(n.last_heartbeat_received_unix_ns),
            opt(n.silent_s),
            n.forks.len()
        );
        for g in &n.gaps {
            let _ = writeln!(
                s,
                "  gap   seq {}..={} ({})",
                g.first_seq, g.last_seq, g.reason
            );
        }
        for f in &n.forks {
            let _ = writeln!(
                s,
                "  FORK  seq {} ({}): stored {} received {} seen {}x",
                f.seq, f.kind, f.stored_sha256, f.received_sha256, f.times_seen
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wh_matches_the_agent() {
        assert_eq!(wh_text(0), "0.0000000000");
        assert_eq!(wh_text(UJ_PER_WH), "1.0000000000");
        assert_eq!(wh_text(1), "0.0000000003");
        assert_eq!(wh_text(UJ_PER_WH - 1), "0.9999999997");
        assert_eq!(wh_text(u128::from(u64::MAX)), "5124095576.0304310042");
    }

    #[test]
    fn status_says_fork_then_gap_then_quiet() {
        let s = 1_000_000_000i64;
        let row = |last: u64, announced: u64, heard: Option<i64>| NodeRow {
            node_id: "n".into(),
            last_seq: last,
            announced_sealed_seq: announced,
            last_heartbeat_received_unix_ns: heard,
            ..NodeRow::default()
        };
        let status =
            |r: NodeRow, now: i64| nodes_report_at(vec![r], now, 120 * s as u64).nodes[0].status;
        assert_eq!(status(row(5, 5, Some(100 * s)), 200 * s), "ok");
        assert_eq!(status(row(5, 5, Some(100 * s)), 221 * s), "quiet");
        assert_eq!(status(row(5, 5, None), 221 * s), "quiet");
        assert_eq!(status(row(5, 7, Some(100 * s)), 101 * s), "gap");
        let report = nodes_report_at(vec![row(5, 5, Some(100 * s))], 130 * s, 120 * s as u64);
        assert_eq!(report.nodes[0].silent_s, Some(30));
    }

    #[test]
    fn gaps_from_holes_and_heartbeats() {
        let n = |last, seen, announced| NodeRow {
            last_seq: last,
            highest_seen_seq: seen,
            announced_sealed_seq: announced,
            ..NodeRow::default()
        };
        assert_eq!(node_gaps(&n(5, 0, 5)), vec![]);
        assert_eq!(
            node_gaps(&n(5, 8, 0)),
            vec![GapRow {
                first_seq: 6,
                last_seq: 8,
                reason: "held_above_hole"
            }]
        );
        assert_eq!(
            node_gaps(&n(5, 8, 10)),
            vec![
                GapRow {
                    first_seq: 6,
                    last_seq: 8,
                    reason: "held_above_hole"
                },
                GapRow {
                    first_seq: 9,
                    last_seq: 10,
                    reason: "announced_not_received"
                }
            ]
        );
        assert_eq!(
            node_gaps(&n(5, 3, 7)),
            vec![GapRow {
                first_seq: 6,
                last_seq: 7,
                reason: "announced_not_received"
            }]
        );
    }
}
