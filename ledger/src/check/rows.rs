//! What the stores keep of a verified batch: its allocation, label and run-summary rows, made in
//! one place (also for rows decoded again from a stored batch once they were pruned).

use super::*;

/// One allocation row as stored: a run's share of one domain in one interval.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllocationRow {
    pub interval_index: i64,
    /// The interval's position in its batch (what a plausibility verdict names).
    pub interval_pos: usize,
    /// `domain` or `domain:package`, as `wattd runs` labels it.
    pub domain: String,
    pub run_id: String,
    pub active_uj: i64,
    pub idle_uj: i64,
    /// active + idle.
    pub energy_uj: i64,
    pub usage_us: i64,
}

/// One label of one run, as the store keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunLabelRow {
    pub run_id: String,
    pub key: String,
    pub value: String,
}

/// A finished run's summary as the store keeps it: how its last usage was obtained.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunFinalRow {
    pub run_id: String,
    /// `read`, `traced`, `perf_counted`, `reconciled`, `reconciled_shared`, `lost` (or a later agent's
    /// word: 1-32 bytes of a-z and _); empty when the agent did not say.
    pub final_usage: String,
    pub reconciled_usage_us: i64,
}

pub(super) fn domain_label(domain: &str, package: Option<u32>) -> String {
    match package {
        Some(p) => format!("{domain}:{p}"),
        None => domain.to_owned(),
    }
}

/// One allocation as the stores keep it: the one place an allocation becomes a row, for the
/// rows stored with a batch and for those decoded again from it once they were pruned
/// ([`batch_rows`]). Err names the value a BIGINT cannot hold.
pub(crate) fn allocation_row(
    pos: usize,
    index: i64,
    domain: &str,
    a: &wattd_proto::v1::Allocation,
) -> Result<AllocationRow, (&'static str, u64)> {
    let int = |what: &'static str, v: u64| i64::try_from(v).map_err(|_| (what, v));
    Ok(AllocationRow {
        interval_index: index,
        interval_pos: pos,
        domain: domain.to_owned(),
        run_id: a.run_id.clone(),
        active_uj: int("active_uj", a.active_uj)?,
        idle_uj: int("idle_uj", a.idle_uj)?,
        energy_uj: int("active_uj + idle_uj", a.active_uj.saturating_add(a.idle_uj))?,
        usage_us: int("usage_us", a.usage_us)?,
    })
}

/// Every allocation row of a stored batch (billed and quarantined), decoded again from its
/// signed bytes: what [`verify_batch`] made of it when it was stored.
pub(crate) fn batch_rows(signed_batch: &[u8]) -> Result<Vec<AllocationRow>, String> {
    let signed = SignedBatch::decode(signed_batch).map_err(|e| format!("SignedBatch: {e}"))?;
    let batch = Batch::decode(signed.batch_bytes.as_slice()).map_err(|e| format!("Batch: {e}"))?;
    let mut rows = Vec::new();
    for (pos, interval) in batch.intervals.iter().enumerate() {
        let index = i64::try_from(interval.index)
            .map_err(|_| format!("interval index {} above 2^63-1", interval.index))?;
        for d in &interval.domains {
            let domain = domain_label(&d.domain, d.package);
            for a in &d.allocations {
                rows.push(
                    allocation_row(pos, index, &domain, a).map_err(|(what, v)| {
                        format!("interval {index}: {what} = {v} above 2^63-1")
                    })?,
                );
            }
        }
    }
    Ok(rows)
}
