//! Pricing a lost range per run. Every batch whose seq is a multiple of
//! `RUN_CHECKPOINT_EVERY` carries each run's energy since its `since_seq`; between the
//! checkpoints `c1` at or before the range and `c2` after it, a run's lost energy is its `c2`
//! total minus its `c1` total minus what the stored batches between them allocated to it
//! (`wattd_records::totals::runs_lost_between`). Read-only.

use prost::Message as _;
use wattd_records::totals::{runs_lost_between, RunEnergy, RUN_CHECKPOINT_EVERY};

use crate::query::NodesReport;
use crate::store::{Store, StoreError};

/// A stored batch, decoded, if that seq is stored.
async fn batch_at<S: Store>(
    store: &S,
    node: &str,
    seq: u64,
) -> Result<Option<wattd_proto::v1::Batch>, StoreError> {
    let page = store.batches_after(node, seq - 1, 1).await?;
    Ok(page
        .into_iter()
        .find(|(s, _)| *s == seq)
        .and_then(|(_, bytes)| {
            let signed = wattd_proto::v1::SignedBatch::decode(bytes.as_slice()).ok()?;
            wattd_proto::v1::Batch::decode(signed.batch_bytes.as_slice()).ok()
        }))
}

/// Fills each lost range's per-run pricing in `report` (`runs`, `energy_by_run`,
/// `runs_unknown`, `runs_error`).
pub async fn price_runs<S: Store>(store: &S, report: &mut NodesReport) -> Result<(), StoreError> {
    for n in &mut report.nodes {
        let ranges: Vec<(u64, u64)> = n.lost.iter().map(|l| (l.first_seq, l.last_seq)).collect();
        let tip = n.last_seq;
        for l in &mut n.lost {
            let k = RUN_CHECKPOINT_EVERY;
            let c1 = (l.first_seq - 1) / k * k;
            let c2 = (l.last_seq + 1).div_ceil(k) * k;
            let fail = |l: &mut crate::query::LostReport, what: &'static str, why: String| {
                l.runs = what;
                l.runs_error = Some(why);
            };
            if ranges
                .iter()
                .any(|&(f, t)| (f, t) != (l.first_seq, l.last_seq) && t > c1 && f <= c2)
            {
                fail(
                    l,
                    "unknown",
                    format!("another lost range lies between the checkpoints {c1} and {c2}"),
                );
                continue;
            }
            if c2 > tip {
                fail(
                    l,
                    "pending",
                    format!("checkpoint batch {c2} not stored yet"),
                );
                continue;
            }
            let Some(after) = batch_at(store, &n.node_id, c2).await? else {
                fail(l, "unknown", format!("checkpoint batch {c2} is not stored"));
                continue;
            };
            let before = if c1 == 0 {
                None
            } else {
                match batch_at(store, &n.node_id, c1).await? {
                    Some(b) => Some(b),
                    None => {
                        fail(l, "unknown", format!("checkpoint batch {c1} is not stored"));
                        continue;
                    }
                }
            };
            let mut stored = RunEnergy::new();
            for t in store.run_energy_between(&n.node_id, c1, c2).await? {
                let v = u64::try_from(t.energy_uj).unwrap_or(u64::MAX);
                stored.entry(t.run_id).or_default().insert(t.domain, v);
            }
            match runs_lost_between(before.as_ref(), &after, &stored) {
                Ok((lost, unknown)) => {
                    l.runs = "exact";
                    l.energy_by_run = lost;
                    l.runs_unknown = unknown;
                }
                Err(e) => fail(l, "unknown", e.to_string()),
            }
        }
    }
    Ok(())
}
