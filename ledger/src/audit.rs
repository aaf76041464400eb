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
//! own energy. Read-only; pages through the store, so memory stays bounded. Last, from each
//! batch's billed allocations (decoded from its signed bytes, less what was quarantined when it
//! was stored) it sums the energy per run, domain and hour and compares it with the run totals
//! the ledger maintains (`run_totals_hourly`, what `runs` and `RunTotals` read) and with the
//! stored allocation rows of the batches whose rows were not pruned: every difference is a
//! problem of its node. A node's batches and both sums are read in one snapshot, so a ledger
//! storing batches meanwhile is audited as of that snapshot.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use prost::Message as _;
use serde::Serialize;
use wattd_records::totals::{add_measured, MeterEnergy, RunningTotals};

use crate::query::{lost_report, LostReport};
use crate::store::{detail, AuditBatch, HourlyTotals, Store, StoreError};

/// Differences between hourly sums named per node, at most.
const DIFFERENCES_MAX: usize = 1000;

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

/// Where two hourly sums differ, as problems (at most [`DIFFERENCES_MAX`], then a count).
fn differences(
    problems: &mut Vec<String>,
    what: &str,
    theirs: &HourlyTotals,
    batches: &HourlyTotals,
) {
    let keys: std::collections::BTreeSet<_> = theirs.keys().chain(batches.keys()).collect();
    let shown = |v: Option<&u128>| v.map_or_else(|| "none".into(), |v| format!("{v} uJ"));
    let mut n = 0usize;
    for k in keys {
        let (a, b) = (theirs.get(k), batches.get(k));
        if a.copied().unwrap_or(0) == b.copied().unwrap_or(0) && a.is_some() == b.is_some() {
            continue;
        }
        n += 1;
        if n <= DIFFERENCES_MAX {
            problems.push(format!(
                "run {} {} hour {}: {what} {}, batches {}",
                k.0,
                k.1,
                k.2,
                shown(a),
                shown(b)
            ));
        }
    }
    if n > DIFFERENCES_MAX {
        problems.push(format!(
            "{} more hours where the {what} differ from the batches",
            n - DIFFERENCES_MAX
        ));
    }
}

fn label(m: &wattd_records::totals::MeterId) -> String {
    wattd_records::totals::meter_label(m)
}

fn decode(bytes: &[u8]) -> Result<wattd_proto::v1::Batch, String> {
    let s = wattd_proto::v1::SignedBatch::decode(bytes).map_err(|e| e.to_string())?;
    wattd_proto::v1::Batch::decode(s.batch_bytes.as_slice()).map_err(|e| e.to_string())
}

/// One node's walk through its stored batches, in seq order.
#[derive(Default)]
struct Walk {
    node: String,
    /// Stored energy per meter, summed by the `since` of each batch's totals (0: none):
    /// bounded by the node's restarts, not its batches.
    by_since: BTreeMap<u64, BTreeMap<String, u128>>,
    problems: Vec<String>,
    prev: Option<(u64, RunningTotals)>,
    newest: Option<RunningTotals>,
    /// Billed energy per (run, domain, hour) of every batch, and of those with rows.
    billed: HourlyTotals,
    billed_with_rows: HourlyTotals,
}

impl Walk {
    fn batch(&mut self, a: AuditBatch) {
        let seq = a.seq;
        let b = match decode(&a.signed_batch) {
            Ok(b) => b,
            Err(e) => {
                self.problems.push(format!("seq {seq}: undecodable: {e}"));
                return;
            }
        };
        let mut mine = MeterEnergy::new();
        add_measured(&mut mine, &b.intervals);
        let totals = RunningTotals::of_batch(&b);
        if let (Some(t), Some((pseq, p))) = (&totals, &self.prev) {
            if *pseq + 1 == seq && p.since_seq() == t.since_seq() {
                let want = p.after(&b.intervals);
                if want.meters() != t.meters() {
                    self.problems.push(format!(
                        "seq {seq}: running totals are not seq {pseq}'s plus its own energy"
                    ));
                }
            }
        }
        let sums = self
            .by_since
            .entry(totals.as_ref().map_or(0, |t| t.since_seq()))
            .or_default();
        for (m, uj) in &mine {
            *sums.entry(label(m)).or_default() += u128::from(*uj);
        }
        if let Some(t) = totals {
            self.prev = Some((seq, t.clone()));
            self.newest = Some(t);
        } else {
            self.prev = None;
            self.newest = None;
        }
        match detail::billed_of(&self.node, seq, &a.signed_batch, &a.quarantined) {
            Ok(billed) => {
                detail::add_hourly(&mut self.billed, a.sealed_unix_ns, &billed);
                if a.has_rows {
                    detail::add_hourly(&mut self.billed_with_rows, a.sealed_unix_ns, &billed);
                }
            }
            Err(e) => self.problems.push(format!("seq {seq}: {e}")),
        }
    }
}

/// Audits every node the store knows.
pub async fn audit<S: Store>(store: &S) -> Result<AuditReport, StoreError> {
    let mut nodes = Vec::new();
    for row in store.nodes().await? {
        let lost: Vec<LostReport> = row.lost.iter().cloned().map(lost_report).collect();
        let walk = Arc::new(Mutex::new(Walk {
            node: row.node_id.clone(),
            ..Walk::default()
        }));
        let feed = Arc::clone(&walk);
        let totals = store
            .audit_node(&row.node_id, move |b| {
                feed.lock().unwrap_or_else(|p| p.into_inner()).batch(b);
            })
            .await?;
        let Walk {
            by_since,
            mut problems,
            newest,
            billed,
            billed_with_rows,
            ..
        } = std::mem::take(&mut *walk.lock().unwrap_or_else(|p| p.into_inner()));
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
        differences(
            &mut problems,
            "maintained totals",
            &totals.maintained,
            &billed,
        );
        differences(
            &mut problems,
            "allocation rows",
            &totals.rows,
            &billed_with_rows,
        );
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
    // A maintained total of a node that stored nothing is billed too: a failure.
    let mut problems = Vec::new();
    for n in store.rollup_nodes().await? {
        if known.contains(n.as_str()) {
            continue;
        }
        let seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let count = Arc::clone(&seen);
        let totals = store
            .audit_node(&n, move |_| {
                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            })
            .await?;
        if seen.load(std::sync::atomic::Ordering::Relaxed) > 0 {
            // Its first batch was stored while this audit ran: the next audit walks it.
            continue;
        }
        let mut found = Vec::new();
        differences(
            &mut found,
            "maintained totals",
            &totals.maintained,
            &HourlyTotals::new(),
        );
        problems.extend(
            found
                .into_iter()
                .map(|p| format!("node {n} (no stored batch): {p}")),
        );
    }
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
