//! Building, encoding and signing one batch: pure, no IO. The agent's sealer calls it on every
//! interval it closes; the ledger's tests and tools build batches the same way.

use prost::Message as _;
use wattd_proto::v1::{Batch, Gap, Interval, KeyRotation, RunSummary, SignedBatch};

use crate::batch::{chain_hash, ChainHash, StoredBatch, FORMAT_VERSION};
use crate::identity::NodeKey;
use crate::totals::RunningTotals;

/// What goes into one batch besides its header.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BatchContent {
    pub intervals: Vec<Interval>,
    pub run_summaries: Vec<RunSummary>,
    pub gaps: Vec<Gap>,
    pub key_rotation: Option<KeyRotation>,
    /// The running totals after this batch (fields 12 and 13); none from writers that keep
    /// no totals.
    pub totals: Option<RunningTotals>,
    /// The per-run checkpoint (fields 14 and 15), in batches whose seq is a multiple of
    /// `totals::RUN_CHECKPOINT_EVERY`.
    pub run_checkpoint: Option<Vec<wattd_proto::v1::RunCheckpoint>>,
    /// With a checkpoint: the first seq the per-run counts cover without a break (field 16).
    pub run_counts_since_seq: u64,
}

impl BatchContent {
    pub fn is_empty(&self) -> bool {
        self.intervals.is_empty()
            && self.run_summaries.is_empty()
            && self.gaps.is_empty()
            && self.key_rotation.is_none()
    }
}

/// Builds, encodes and signs batch `seq` chained to `prev_hash`. Pure: no IO.
pub fn sign_batch(
    key: &NodeKey,
    seq: u64,
    prev_hash: ChainHash,
    sealed_unix_ns: i64,
    content: BatchContent,
) -> StoredBatch {
    sign_batch_keeping(key, seq, prev_hash, sealed_unix_ns, content).0
}

/// [`sign_batch`], handing the content back (moved, not copied): a sealer whose append fails
/// keeps it pending without having cloned every interval for that case.
pub fn sign_batch_keeping(
    key: &NodeKey,
    seq: u64,
    prev_hash: ChainHash,
    sealed_unix_ns: i64,
    content: BatchContent,
) -> (StoredBatch, BatchContent) {
    let mut batch = Batch {
        node_id: key.node_id().to_owned(),
        key_id: key.key_id().to_vec(),
        key_epoch: key.epoch(),
        seq,
        prev_hash: prev_hash.to_vec(),
        sealed_unix_ns,
        format_version: FORMAT_VERSION,
        intervals: content.intervals,
        run_summaries: content.run_summaries,
        gaps: content.gaps,
        key_rotation: content.key_rotation,
        running_totals: Vec::new(),
        totals_since_seq: 0,
        run_checkpoint: Vec::new(),
        has_run_checkpoint: false,
        run_counts_since_seq: 0,
    };
    if let Some(cp) = content.run_checkpoint {
        batch.run_checkpoint = cp;
        batch.has_run_checkpoint = true;
        batch.run_counts_since_seq = content.run_counts_since_seq;
    }
    if let Some(t) = &content.totals {
        t.write_into(&mut batch);
    }
    let batch_bytes = batch.encode_to_vec();
    let signature = key.sign(&batch_bytes).to_vec();
    let bytes = SignedBatch {
        batch_bytes,
        signature,
        key_id: key.key_id().to_vec(),
    }
    .encode_to_vec();
    let stored = StoredBatch {
        seq,
        prev_hash,
        hash: chain_hash(&bytes),
        bytes,
    };
    let back = BatchContent {
        intervals: batch.intervals,
        run_summaries: batch.run_summaries,
        gaps: batch.gaps,
        key_rotation: batch.key_rotation,
        totals: content.totals,
        run_checkpoint: batch.has_run_checkpoint.then_some(batch.run_checkpoint),
        run_counts_since_seq: batch.run_counts_since_seq,
    };
    (stored, back)
}
