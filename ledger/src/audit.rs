//! `wattd-ledger audit`: checks, per node, that the ledger's energy adds up. It walks every
//! stored batch in seq order and compares three figures per meter:
//!
//! - what the stored batches measured (each batch's conservation was checked when stored),
//! - what the node declared lost (each lost range's energy, from the running totals of the
//!   batches on either side),
//! - what the node says it measured in all (the running totals of its newest stored batch).
//!
//! For the stretch the newest batch's totals count (`totals_since_seq`; 1 unless an agent start
//! could not read its previous totals back), stored + lost must equal the node's total, to the
//! microjoule. It also checks every stored batch's totals against its predecessor's plus its
//! own energy. Read-only; pages through the store, so memory stays bounded. Last, the run totals
//! the ledger maintains per hour (`run_totals_hourly`, what `runs` and `RunTotals` read) are
//! compared with the stored allocations: every difference is a problem of its node.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use prost::Message as _;
use serde::Serialize;
use wattd_records::totals::{add_measured, MeterEnergy, RunningTotals};

use crate::query::{lost_report, LostReport};
use crate::store::{Store, StoreError};

const PAGE: u32 = 500;

/// One meter's three figures.
#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct MeterAudit {
    pub stored_uj: u128,
    pub lost_uj: u128,
    /// The newest stored batch's running total (absent when it carries none).
    pub node_total_uj: Option<u128>,
}

#[derive(Debug, Serialize)]
pub struct NodeAudit {
    pub node_id: String,
    pub batches: u64,
    /// The seq the newest batch's totals count from (0: no totals).
    pub totals_since_seq: u64,
    /// Per meter (`domain:package[:dieN]`), over the stretch the totals count.
    pub meters: BTreeMap<String, MeterAudit>,
    /// Lost ranges whose energy is not known exactly (pending or unknown).
    pub lost_not_exact: Vec<LostReport>,
    /// Problems found: totals that do not follow, undecodable batches, a sum that differs.
    pub problems: Vec<String>,
    /// Stored + lost == the node's total for every meter, and no problem.
    pub conserved: bool,
}

#[derive(Debug, Serialize)]
pub struct AuditReport {
    pub nodes: Vec<NodeAudit>,
    /// Problems of no stored node: maintained run totals of a node without a stored batch.
    pub problems: Vec<String>,
}

impl AuditReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty() && self.nodes.iter().all(|n| n.conserved)
    }
}

fn difference_text(d: &crate::store::RollupDifference) -> String {
    format!(
        "run {} {} hour {}: maintained total {} uJ, allocations {} uJ",
        d.run_id,
        d.domain,
        d.hour,
        d.maintained_uj
            .map_or_else(|| "none".into(), |v| v.to_string()),
        d.allocations_uj
            .map_or_else(|| "none".into(), |v| v.to_string())
    )
}

fn label(m: &wattd_records::totals::MeterId) -> String {
    wattd_records::totals::meter_label(m)
}

fn decode(bytes: &[u8]) -> Result<wattd_proto::v1::Batch, String> {
    let s = wattd_proto::v1::SignedBatch::decode(bytes).map_err(|e| e.to_string())?;
    wattd_proto::v1::Batch::decode(s.batch_bytes.as_slice()).map_err(|e| e.to_string())
}

/// Audits every node the store knows.
pub async fn audit<S: Store>(store: &S) -> Result<AuditReport, StoreError> {
    let mut nodes = Vec::new();
    let differences = store.rollup_differences().await?;
    for row in store.nodes().await? {
        let lost: Vec<LostReport> = row.lost.iter().cloned().map(lost_report).collect();
        // Stored energy per meter, summed by the `since` of each batch's totals (0: none):
        // bounded by the node's restarts, not its batches.
        let mut by_since: BTreeMap<u64, BTreeMap<String, u128>> = BTreeMap::new();
        let mut problems = Vec::new();
        let mut prev: Option<(u64, RunningTotals)> = None;
        let mut newest: Option<RunningTotals> = None;
        let mut after = 0u64;
        loop {
            let page = store.batches_after(&row.node_id, after, PAGE).await?;
            let Some((last, _)) = page.last() else { break };
            after = *last;
            for (seq, bytes) in page {
                let b = match decode(&bytes) {
                    Ok(b) => b,
                    Err(e) => {
                        problems.push(format!("seq {seq}: undecodable: {e}"));
                        continue;
                    }
                };
                let mut mine = MeterEnergy::new();
                add_measured(&mut mine, &b.intervals);
                let totals = RunningTotals::of_batch(&b);
                if let (Some(t), Some((pseq, p))) = (&totals, &prev) {
                    if *pseq + 1 == seq && p.since_seq() == t.since_seq() {
                        let want = p.after(&b.intervals);
                        if want.meters() != t.meters() {
                            problems.push(format!(
                                "seq {seq}: running totals are not seq {pseq}'s plus its own energy"
                            ));
                        }
                    }
                }
                let sums = by_since
                    .entry(totals.as_ref().map_or(0, |t| t.since_seq()))
                    .or_default();
                for (m, uj) in &mine {
                    *sums.entry(label(m)).or_default() += u128::from(*uj);
                }
                if let Some(t) = totals {
                    prev = Some((seq, t.clone()));
                    newest = Some(t);
                } else {
                    prev = None;
                    newest = None;
                }
            }
        }
        let since = newest.as_ref().map_or(0, |t| t.since_seq());
        let mut meters: BTreeMap<String, MeterAudit> = BTreeMap::new();
        // Every batch from `since` on counts from `since` (a restart that lost the totals
        // starts a new count at the seq it seals next).
        for (m, uj) in by_since.get(&since).into_iter().flatten() {
            meters.entry(m.clone()).or_default().stored_uj += uj;
        }
        let mut lost_not_exact = Vec::new();
        for l in lost {
            if l.first_seq < since {
                continue;
            }
            if l.energy == "exact" {
                for (m, uj) in &l.energy_by_meter {
                    meters.entry(m.clone()).or_default().lost_uj += u128::from(*uj);
                }
            } else {
                lost_not_exact.push(l);
            }
        }
        if let Some(t) = &newest {
            for (m, uj) in t.meters() {
                meters.entry(label(m)).or_default().node_total_uj = Some(u128::from(*uj));
            }
        } else {
            problems.push("the newest stored batch carries no running totals".into());
        }
        for (m, a) in &meters {
            let total = a.node_total_uj.unwrap_or(0);
            if a.stored_uj + a.lost_uj != total {
                problems.push(format!(
                    "{m}: stored {} + lost {} uJ != the node's total {total} uJ",
                    a.stored_uj, a.lost_uj
                ));
            }
        }
        if !lost_not_exact.is_empty() {
            problems.push(format!(
                "{} lost range(s) without an exact energy",
                lost_not_exact.len()
            ));
        }
        for d in differences.iter().filter(|d| d.node_id == row.node_id) {
            problems.push(difference_text(d));
        }
        nodes.push(NodeAudit {
            node_id: row.node_id,
            batches: row.batches,
            totals_since_seq: since,
            conserved: problems.is_empty(),
            meters,
            lost_not_exact,
            problems,
        });
    }
    let known: std::collections::BTreeSet<&str> =
        nodes.iter().map(|n| n.node_id.as_str()).collect();
    let problems = differences
        .iter()
        .filter(|d| !known.contains(d.node_id.as_str()))
        .map(|d| {
            format!(
                "node {} (no stored batch): {}",
                d.node_id,
                difference_text(d)
            )
        })
        .collect();
    Ok(AuditReport { nodes, problems })
}

pub fn audit_text(r: &AuditReport) -> String {
    let mut s = String::new();
    for p in &r.problems {
        let _ = writeln!(s, "FAIL {p}");
    }
    for n in &r.nodes {
        let _ = writeln!(
            s,
            "{} {}: {} batches, totals since seq {}",
            if n.conserved { "OK  " } else { "FAIL" },
            n.node_id,
            n.batches,
            n.totals_since_seq
        );
        for (m, a) in &n.meters {
            let _ = writeln!(
                s,
                "  {m:<16} stored {:>20} uJ + lost {:>16} uJ = node total {} uJ",
                a.stored_uj,
                a.lost_uj,
                a.node_total_uj
                    .map_or_else(|| "-".into(), |t| t.to_string())
            );
        }
        for p in &n.problems {
            let _ = writeln!(s, "  problem: {p}");
        }
    }
    s
}
