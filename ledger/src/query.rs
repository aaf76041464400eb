//! `wattd-ledger runs` and `wattd-ledger nodes`: what the store holds, as text or JSON. Energy is
//! summed in integers and shown in uJ and in Wh with 10 decimals (exact, rounded half up), the
//! same way `wattd runs` shows the spool, so the two can be compared line for line.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::store::{ForkRow, LostRangeRow, NodeRow, QuarantineRow, RunDomainTotal};

pub use wattd_records::energy_table::{wh_text, DomainRow, RunRow, UJ_PER_WH};

#[derive(Debug, Serialize)]
pub struct RunsReport {
    pub runs: Vec<RunRow>,
}

/// Rows per node and run: a run billed by several nodes is listed once per node, so energy a
/// node allocates to someone else's run shows as that node's.
pub fn runs_report(totals: Vec<RunDomainTotal>) -> RunsReport {
    let mut by_node: BTreeMap<String, BTreeMap<String, BTreeMap<String, u128>>> = BTreeMap::new();
    for t in totals {
        *by_node
            .entry(t.node_id)
            .or_default()
            .entry(t.run_id)
            .or_default()
            .entry(t.domain)
            .or_default() += t.energy_uj;
    }
    let mut runs = Vec::new();
    for (node, by_run) in by_node {
        for mut row in wattd_records::energy_table::run_rows(by_run) {
            row.node_id = Some(node.clone());
            runs.push(row);
        }
    }
    RunsReport { runs }
}

/// Sets how each finished run's last usage was obtained; a finished run billed nothing gets a
/// row too (as `wattd runs` lists it), so an SRE looking for it finds it and sees why.
pub fn with_finals(report: &mut RunsReport, finals: Vec<(String, String, String, u64)>) {
    let mut by: BTreeMap<(String, String), (String, u64)> = finals
        .into_iter()
        .map(|(node, run, how, us)| ((node, run), (how, us)))
        .collect();
    for row in &mut report.runs {
        let key = (row.node_id.clone().unwrap_or_default(), row.run_id.clone());
        if let Some((how, us)) = by.remove(&key) {
            row.final_usage = (!how.is_empty()).then_some(how);
            row.reconciled_usage_us = Some(us);
        }
    }
    for ((node, run), (how, us)) in by {
        report.runs.push(RunRow {
            node_id: Some(node),
            run_id: run,
            energy_uj: 0,
            energy_wh: wh_text(0),
            domains: Vec::new(),
            final_usage: (!how.is_empty()).then_some(how),
            reconciled_usage_us: Some(us),
            account: None,
        });
    }
    report
        .runs
        .sort_by(|a, b| (&a.node_id, &a.run_id).cmp(&(&b.node_id, &b.run_id)));
}

/// Sets each row's account from the (node, run, value) of the account label, and keeps only
/// `only`'s runs when given.
pub fn with_accounts(
    report: &mut RunsReport,
    accounts: Vec<(String, String, String)>,
    only: Option<&str>,
) {
    let by: BTreeMap<(String, String), String> = accounts
        .into_iter()
        .map(|(node, run, value)| ((node, run), value))
        .collect();
    for row in &mut report.runs {
        let key = (row.node_id.clone().unwrap_or_default(), row.run_id.clone());
        row.account = by.get(&key).cloned();
    }
    if let Some(only) = only {
        report.runs.retain(|r| r.account.as_deref() == Some(only));
    }
}

/// The same table `wattd runs` prints.
pub fn runs_text(r: &RunsReport) -> String {
    wattd_records::energy_table::table_text(&r.runs)
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
    /// What needs attention first: `fork` (two different batches for one seq), `stalled` (seqs
    /// the ledger knows exist and does not hold, and no batch stored for longer than the
    /// threshold), `gap` (such seqs, with batches still arriving), `quiet` (nothing received,
    /// not even a heartbeat, for longer than the threshold: a host down, or cut off), else
    /// `ok`.
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
    /// Batches the node announced and the ledger does not hold yet (announced minus last_seq).
    pub lag_batches: u64,
    pub gaps: Vec<GapRow>,
    pub forks: Vec<ForkRow>,
    /// Ranges the node declared lost, with their energy.
    pub lost: Vec<LostReport>,
    /// The sum of every lost range's energy that is known exactly.
    pub lost_uj: u128,
    /// Allocations of authentic but implausible intervals, by reason: stored as evidence,
    /// never billed, in no total.
    pub quarantined: Vec<QuarantineRow>,
    /// Their energy.
    pub quarantined_uj: u128,
    /// Intervals (or domains of one) judged implausible.
    pub implausible: u64,
    /// Holes in the node's clock with no gap or lost range declared (billed: a hole can only
    /// make a node bill less, but an honest agent declares every one).
    pub undeclared_holes: u64,
    /// The node's measured time so far (the sum of its accepted intervals), in seconds.
    pub measured_s: Option<u64>,
}

/// A recorded lost range and its energy, from the running totals of the stored batches on
/// either side.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct LostReport {
    pub first_seq: u64,
    pub last_seq: u64,
    pub reason: String,
    pub detail: String,
    pub stated_unix_ns: i64,
    pub recorded_unix_ns: i64,
    pub statement_sha256: String,
    /// `exact`, `pending` (the batch after the range has not arrived yet), or `unknown`.
    pub energy: &'static str,
    /// Why the energy is unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub energy_error: Option<String>,
    pub energy_uj: Option<u64>,
    /// Per meter (`domain:package[:dieN]`), when exact.
    pub energy_by_meter: BTreeMap<String, u64>,
    /// Per run: `exact` (from the run checkpoints around the range; `lost::price_runs`),
    /// `pending` (the checkpoint after it is not stored yet), `unknown` (why in `runs_error`),
    /// or `not_priced` (nobody asked).
    pub runs: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runs_error: Option<String>,
    /// Run -> meter label -> uJ lost.
    pub energy_by_run: BTreeMap<String, BTreeMap<String, u64>>,
    /// Runs in the range whose share cannot be known (an agent start lost their count).
    pub runs_unknown: Vec<String>,
}

fn decode_batch(signed: &[u8]) -> Result<wattd_proto::v1::Batch, String> {
    use prost::Message as _;
    let s =
        wattd_proto::v1::SignedBatch::decode(signed).map_err(|e| format!("SignedBatch: {e}"))?;
    wattd_proto::v1::Batch::decode(s.batch_bytes.as_slice()).map_err(|e| format!("Batch: {e}"))
}

fn meter_label(m: &wattd_records::totals::MeterId) -> String {
    wattd_records::totals::meter_label(m)
}

/// A lost range's energy from its stored neighbours.
pub fn lost_report(l: LostRangeRow) -> LostReport {
    let mut r = LostReport {
        first_seq: l.first_seq,
        last_seq: l.last_seq,
        reason: l.reason,
        detail: l.detail,
        stated_unix_ns: l.stated_unix_ns,
        recorded_unix_ns: l.recorded_unix_ns,
        statement_sha256: l.statement_sha256,
        energy: "pending",
        energy_error: None,
        energy_uj: None,
        energy_by_meter: BTreeMap::new(),
        runs: "not_priced",
        runs_error: None,
        energy_by_run: BTreeMap::new(),
        runs_unknown: Vec::new(),
    };
    let Some(after) = l.after else {
        return r;
    };
    let computed = (|| {
        let after = decode_batch(&after)?;
        let before = match (l.first_seq, l.before) {
            (1, _) => None,
            (_, Some(b)) => Some(decode_batch(&b)?),
            (first, None) => {
                return Err(format!(
                    "batch {} before the range is not stored (another lost range?)",
                    first - 1
                ))
            }
        };
        wattd_records::totals::lost_between(before.as_ref(), &after).map_err(|e| e.to_string())
    })();
    match computed {
        Ok(by_meter) => {
            r.energy = "exact";
            r.energy_uj = Some(by_meter.values().fold(0u64, |a, v| a.saturating_add(*v)));
            r.energy_by_meter = by_meter.iter().map(|(m, v)| (meter_label(m), *v)).collect();
        }
        Err(e) => {
            r.energy = "unknown";
            r.energy_error = Some(e);
        }
    }
    r
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
                // Since the newest stored batch arrived (heartbeats do not count).
                let no_progress_ns = n
                    .last_received_unix_ns
                    .map(|t| now_unix_ns.saturating_sub(t).max(0) as u64);
                let implausible = n.clock.as_ref().map_or(0, |c| c.implausible);
                let status = if !n.forks.is_empty() {
                    "fork"
                } else if !gaps.is_empty() && no_progress_ns.map_or(true, |s| s > quiet_after_ns) {
                    // Batches are owed and none has been stored for the threshold, whether the
                    // node is silent or still sending heartbeats.
                    "stalled"
                } else if !gaps.is_empty() {
                    "gap"
                } else if silent_ns.map_or(true, |s| s > quiet_after_ns) {
                    "quiet"
                } else if implausible > 0 || !n.quarantined.is_empty() {
                    // Authentic batches that could not be true: a node to look at (after the
                    // states that need action now: a node that stopped delivering).
                    "implausible"
                } else {
                    "ok"
                };
                (n, gaps, status, silent_ns.map(|s| s / 1_000_000_000))
            })
            .map(|(n, gaps, status, silent_s)| {
                let lost: Vec<LostReport> = n.lost.into_iter().map(lost_report).collect();
                let lost_uj = lost
                    .iter()
                    .filter_map(|l| l.energy_uj)
                    .map(u128::from)
                    .sum();
                NodeReport {
                    quarantined_uj: n.quarantined.iter().map(|q| q.energy_uj).sum(),
                    implausible: n.clock.as_ref().map_or(0, |c| c.implausible),
                    undeclared_holes: n.clock.as_ref().map_or(0, |c| c.undeclared_holes),
                    measured_s: n.clock.as_ref().map(|c| c.measured_ns / 1_000_000_000),
                    quarantined: n.quarantined,
                    lag_batches: n.announced_sealed_seq.saturating_sub(n.last_seq),
                    lost,
                    lost_uj,
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
                }
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
        for q in &n.quarantined {
            let _ = writeln!(
                s,
                "  QUARANTINED {}: {} allocation(s), {} uJ ({} Wh) in seqs {}..={}, not billed",
                q.reason,
                q.allocations,
                q.energy_uj,
                wh_text(q.energy_uj),
                q.first_seq,
                q.last_seq
            );
        }
        if n.implausible > 0 && n.quarantined.is_empty() {
            let _ = writeln!(
                s,
                "  implausible intervals: {} (none had allocations to quarantine)",
                n.implausible
            );
        }
        if n.undeclared_holes > 0 {
            let _ = writeln!(
                s,
                "  holes {} in the node's clock with no gap declared",
                n.undeclared_holes
            );
        }
        if n.lag_batches > 0 {
            let _ = writeln!(
                s,
                "  lag   {} batch(es) announced, not yet stored",
                n.lag_batches
            );
        }
        for l in &n.lost {
            let energy = match (l.energy, l.energy_uj, &l.energy_error) {
                ("exact", Some(uj), _) => format!("{uj} uJ ({} Wh)", wh_text(u128::from(uj))),
                (_, _, Some(e)) => format!("energy unknown: {e}"),
                (what, _, _) => format!("energy {what}"),
            };
            let _ = writeln!(
                s,
                "  LOST  seq {}..={} ({}): {energy}; {}",
                l.first_seq, l.last_seq, l.reason, l.detail
            );
            for (run, meters) in &l.energy_by_run {
                for (m, uj) in meters {
                    let _ = writeln!(
                        s,
                        "        run {} {}: {uj} uJ",
                        wattd_records::energy_table::cell(run),
                        wattd_records::energy_table::cell(m)
                    );
                }
            }
            if l.runs != "exact" && l.runs != "not_priced" {
                let _ = writeln!(
                    s,
                    "        per run: {} {}",
                    l.runs,
                    l.runs_error.as_deref().unwrap_or("")
                );
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

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
        // Owed batches while heartbeats still come: a gap while batches were stored lately,
        // stalled once none has been for the threshold.
        let owing = |received: i64| NodeRow {
            last_received_unix_ns: Some(received),
            ..row(5, 7, Some(100 * s))
        };
        assert_eq!(status(owing(90 * s), 101 * s), "gap");
        assert_eq!(status(owing(90 * s), 211 * s), "stalled");
        assert_eq!(status(row(5, 7, Some(100 * s)), 101 * s), "stalled");
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
