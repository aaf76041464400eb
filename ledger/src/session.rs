//! One node stream's state machine, independent of gRPC: each message in, one [`Ack`] out (or a
//! [`Rejection`] that ends the stream).
//!
//! - The next seq is committed (batch, allocations, rotation in one transaction) before its Ack.
//! - A seq already stored is compared with the stored bytes: same = duplicate (acknowledged
//!   again, counted, not stored again); different = fork (recorded, counted, rejected).
//! - A seq above a hole is held in memory (bounded by count and bytes) and committed when the
//!   hole fills; the Ack says `missing_from_seq`.
//! - A heartbeat records the node's announced sealed seq; a tail the ledger never received is
//!   counted and shown by `nodes`.
//!
//! **Invariant:** an Ack's `acked_seq` is never above a seq this session saw committed (or found
//! stored), and a stored seq implies every earlier seq is stored (see `store`), so every Ack is
//! a promise the database keeps.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use wattd_proto::v1::{node_message, Ack, NodeMessage, SignedBatch, SignedHeartbeat};
use wattd_records::durable::hex;

use crate::check::{
    verify_batch, verify_heartbeat, verify_loss, KeyOrigin, KnownKeys, VerifiedBatch,
};
use crate::enrol::EnrolledKey;
use crate::metrics::Metrics;
use crate::plausible::{Declared, NodeLimits, Verdict};
use crate::store::{Commit, ForkKind, ForkRecord, LossOutcome, LossRecord, Store, StoreError, Tip};
use crate::{unix_now_ns, Rejection};

/// Per-stream bounds.
#[derive(Clone, Copy, Debug)]
pub struct SessionLimits {
    /// Batches held above a hole.
    pub max_held_batches: usize,
    /// Bytes of batches held above a hole.
    pub max_held_bytes: usize,
    /// How far a node's measured time may run ahead of the ledger's clock since its first
    /// stored batch (`--max-ahead-s`), in ns.
    pub max_ahead_ns: i64,
}

/// The default `--max-ahead-s`: a week of backlog (a node measuring before its first
/// connection) and skew.
pub const DEFAULT_MAX_AHEAD_S: u64 = 7 * 86_400;

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            max_held_batches: 64,
            max_held_bytes: 64 * 1024 * 1024,
            max_ahead_ns: DEFAULT_MAX_AHEAD_S as i64 * 1_000_000_000,
        }
    }
}

/// The state of one authenticated node stream.
#[derive(Debug)]
pub struct Session<S: Store> {
    node_id: String,
    store: Arc<S>,
    metrics: Arc<Metrics>,
    limits: SessionLimits,
    /// What the node's batches are judged by ([`crate::plausible`]).
    plausible: Arc<NodeLimits>,
    keys: KnownKeys,
    tip: Tip,
    announced: u64,
    held: BTreeMap<u64, Arc<VerifiedBatch>>,
    held_bytes: usize,
    /// Messages seen on this stream. A heartbeat that opens a stream announces what the node
    /// has sealed before any of its backlog could be sent, so it never counts as a missing tail.
    messages_seen: u64,
    /// A verified loss statement waiting for the batch after its range: it is recorded only
    /// once that authentic batch chains to it (its prev_hash is the statement's last_hash, its
    /// key the statement's next key), so a statement can neither invent a chain nor cover seqs
    /// the node never sealed.
    pending_loss: Option<crate::check::VerifiedLoss>,
}

fn store_err(e: StoreError) -> Rejection {
    Rejection::Store(e.to_string())
}

fn short(h: &[u8]) -> String {
    hex(h.get(..8).unwrap_or(h))
}

impl<S: Store> Session<S> {
    /// Opens the session of `node_id` (already checked against enrolment), reading its tip,
    /// learnt keys and announced seq from the store.
    pub async fn open(
        node_id: &str,
        enrolled: &BTreeMap<u32, EnrolledKey>,
        declared: &Declared,
        revoked_epochs: &std::collections::BTreeSet<u32>,
        store: Arc<S>,
        metrics: Arc<Metrics>,
        limits: SessionLimits,
    ) -> Result<Self, Rejection> {
        let mut keys = KnownKeys::new(node_id, enrolled).without(revoked_epochs);
        for k in store.learnt_keys(node_id).await.map_err(store_err)? {
            if let Err(e) = keys.learn(&k) {
                tracing::warn!(node = node_id, epoch = k.epoch, error = %e, "stored rotation not used: it conflicts with the enrolment, or its epoch is revoked");
            }
        }
        let tip = store.tip(node_id).await.map_err(store_err)?;
        let announced = store.announced(node_id).await.map_err(store_err)?;
        Ok(Self {
            node_id: node_id.to_owned(),
            store,
            metrics,
            plausible: Arc::new(NodeLimits::new(declared, limits.max_ahead_ns)),
            limits,
            keys,
            tip,
            announced,
            held: BTreeMap::new(),
            held_bytes: 0,
            messages_seen: 0,
            pending_loss: None,
        })
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Highest seq known stored.
    pub fn acked_seq(&self) -> u64 {
        self.tip.seq
    }

    fn ack(&self) -> Ack {
        Ack {
            node_id: self.node_id.clone(),
            acked_seq: self.tip.seq,
            missing_from_seq: if self.held.is_empty() {
                0
            } else {
                self.tip.seq + 1
            },
            announced_sealed_seq: self.announced,
        }
    }

    /// Handles one message; the Ack is sent only after everything it reports is committed.
    pub async fn handle(&mut self, msg: NodeMessage) -> Result<Ack, Rejection> {
        self.messages_seen += 1;
        match msg.kind {
            Some(node_message::Kind::Batch(b)) => self.batch(&b).await,
            Some(node_message::Kind::SignedHeartbeat(h)) => self.heartbeat(&h).await,
            Some(node_message::Kind::Loss(l)) => self.loss(&l).await,
            None => Err(Rejection::Malformed {
                node: self.node_id.clone(),
                detail: "NodeMessage with no batch, heartbeat or loss statement".into(),
            }),
        }
    }

    /// Verifies with the known keys; on an unknown key, re-reads rotations from the store
    /// (another process may have stored the announcing batch) and from the held batches.
    async fn verify(&mut self, signed: &SignedBatch) -> Result<VerifiedBatch, Rejection> {
        match verify_batch(&self.node_id, &self.keys, signed) {
            Err(Rejection::UnknownKey { .. }) => {
                self.refresh_keys().await?;
                verify_batch(&self.node_id, &self.keys, signed)
            }
            other => other,
        }
    }

    /// A heartbeat signed by a key epoch above every key this ledger knows: the node rotated
    /// its key in batches the ledger has not received yet (a backlog after an outage or a
    /// restart; the opening heartbeat is always signed with the node's current key). Refusing
    /// it would end every stream before the backlog that announces the key could be sent, for
    /// ever. So it is answered, and nothing it says is believed or recorded until its key is
    /// learnt from the chain. A heartbeat claiming an epoch the ledger knows with another key
    /// is refused (`refused`).
    fn heartbeat_from_ahead(
        &mut self,
        signed: &SignedHeartbeat,
        refused: Rejection,
    ) -> Result<Ack, Rejection> {
        use prost::Message as _;
        let Ok(hb) = wattd_proto::v1::Heartbeat::decode(signed.heartbeat_bytes.as_slice()) else {
            return Err(refused);
        };
        if hb.node_id != self.node_id || self.keys.max_epoch().is_some_and(|m| hb.key_epoch <= m) {
            return Err(refused);
        }
        self.metrics.inc(&self.metrics.heartbeats_unverified);
        tracing::info!(node = %self.node_id, epoch = hb.key_epoch, acked = self.tip.seq, "heartbeat signed by a key the chain has not announced to this ledger yet: answered, not recorded");
        Ok(self.ack())
    }

    async fn refresh_keys(&mut self) -> Result<(), Rejection> {
        for k in self
            .store
            .learnt_keys(&self.node_id)
            .await
            .map_err(store_err)?
        {
            let _ = self.keys.learn(&k);
        }
        // A held (authentic) batch may announce the key of the batches after it.
        let held: Vec<_> = self
            .held
            .values()
            .filter_map(|b| b.rotation.clone())
            .collect();
        for k in held {
            let _ = self.keys.learn(&k);
        }
        Ok(())
    }

    async fn batch(&mut self, signed: &SignedBatch) -> Result<Ack, Rejection> {
        let vb = self.verify(signed).await?;
        // A key announced by a rotation signs only from its effective seq on.
        if let Some(k) = self.keys.epoch(vb.key_epoch) {
            if let KeyOrigin::Rotation { announced_seq } = k.origin {
                if vb.seq <= announced_seq {
                    return Err(Rejection::StaleKey {
                        node: self.node_id.clone(),
                        seq: vb.seq,
                        detail: format!(
                            "key epoch {} was announced at seq {announced_seq} and signs only \
                             later batches",
                            vb.key_epoch
                        ),
                    });
                }
            }
        }
        if self
            .pending_loss
            .as_ref()
            .is_some_and(|l| vb.seq == l.last_seq + 1)
        {
            self.settle_loss(&vb).await?;
        }
        let vb = Arc::new(vb);
        if vb.seq > self.tip.seq + 1 && !self.held.contains_key(&vb.seq) {
            // Another process may have stored the hole meanwhile.
            self.tip = self.store.tip(&self.node_id).await.map_err(store_err)?;
        }
        if vb.seq <= self.tip.seq {
            self.stored_again(&vb).await?;
        } else if let Some(h) = self.held.get(&vb.seq) {
            if h.hash == vb.hash {
                self.metrics.inc(&self.metrics.batches_duplicate);
            } else {
                let stored = h.hash;
                return Err(self.fork(&vb, ForkKind::Held, stored).await);
            }
        } else if vb.seq == self.tip.seq + 1 {
            self.commit(vb).await?;
        } else {
            self.hold(vb).await?;
        }
        self.drain().await?;
        Ok(self.ack())
    }

    /// A batch at or below the tip: duplicate or fork.
    async fn stored_again(&mut self, vb: &VerifiedBatch) -> Result<(), Rejection> {
        match self
            .store
            .batch_hash(&self.node_id, vb.seq)
            .await
            .map_err(store_err)?
        {
            Some(h) if h == vb.hash => {
                self.metrics.inc(&self.metrics.batches_duplicate);
                tracing::debug!(node = %self.node_id, seq = vb.seq, "duplicate batch");
                Ok(())
            }
            Some(h) => Err(self.fork(vb, ForkKind::Stored, h).await),
            // Declared lost (or a store that contradicts itself): commit says which.
            None => match self
                .store
                .commit(
                    Arc::new(vb.clone()),
                    Arc::clone(&self.plausible),
                    unix_now_ns(),
                )
                .await
                .map_err(store_err)?
            {
                Commit::InLostRange {
                    first_seq,
                    last_seq,
                } => {
                    self.in_lost_range(vb.seq, first_seq, last_seq);
                    Ok(())
                }
                _ => Err(Rejection::Internal(format!(
                    "node {:?}: seq {} is at or below the stored tip {} but not stored",
                    self.node_id, vb.seq, self.tip.seq
                ))),
            },
        }
    }

    fn in_lost_range(&self, seq: u64, first_seq: u64, last_seq: u64) {
        self.metrics.inc(&self.metrics.batches_in_lost_range);
        tracing::warn!(node = %self.node_id, seq, first_seq, last_seq, "authentic batch for a seq the node declared lost: not stored (the chain continues past it)");
    }

    /// A loss statement: the node will never send `first_seq..=last_seq`. Kept until the batch
    /// after the range arrives and chains to it, then recorded (see `settle_loss`); the part at
    /// or below the tip is already stored. One starting above the tip is not kept: the Ack names
    /// the hole, and the node sends it again after the batches before it.
    async fn loss(
        &mut self,
        signed: &wattd_proto::v1::SignedLossStatement,
    ) -> Result<Ack, Rejection> {
        let v = match verify_loss(&self.node_id, &self.keys, signed) {
            Err(Rejection::UnknownKey { .. }) => {
                self.refresh_keys().await?;
                verify_loss(&self.node_id, &self.keys, signed)?
            }
            other => other?,
        };
        if v.first_seq > self.tip.seq + 1 || v.last_seq > self.tip.seq {
            self.tip = self.store.tip(&self.node_id).await.map_err(store_err)?;
        }
        if v.last_seq <= self.tip.seq {
            tracing::debug!(node = %self.node_id, first = v.first_seq, last = v.last_seq, "loss statement for seqs already in the chain");
            return Ok(self.ack());
        }
        if v.first_seq > self.tip.seq + 1 {
            tracing::info!(node = %self.node_id, first = v.first_seq, missing_from = self.tip.seq + 1, "loss statement above a hole: not kept");
            let mut ack = self.ack();
            ack.missing_from_seq = self.tip.seq + 1;
            return Ok(ack);
        }
        let anchor_seq = v.last_seq + 1;
        // Its rotations are authentic (each verified with the key it retires): the batch after
        // the range may be signed by one of them. (Stored with the range when it is recorded.)
        for k in &v.rotations {
            if let Err(e) = self.keys.learn(k) {
                tracing::warn!(node = %self.node_id, epoch = k.epoch, error = %e, "rotation from a loss statement conflicts with a known key");
            }
        }
        self.pending_loss = Some(v);
        // The batch after the range may be held already (it came first).
        if let Some(anchor) = self.held.get(&anchor_seq).cloned() {
            self.settle_loss(&anchor).await?;
            self.drain().await?;
        }
        Ok(self.ack())
    }

    /// Records the pending loss statement now that `anchor`, the authentic batch after its
    /// range, arrived: it must chain to the statement. In one transaction the store checks
    /// that the range starts right after the tip and that neither the statement's key nor the
    /// key it names for the batch after it is older than the key the chain is at.
    async fn settle_loss(&mut self, anchor: &VerifiedBatch) -> Result<(), Rejection> {
        let Some(l) = self.pending_loss.take() else {
            return Ok(());
        };
        if anchor.prev_hash != l.last_hash
            || anchor.key_epoch != l.next_key_epoch
            || anchor.key_id != l.next_key_id
        {
            return Err(Rejection::ChainBreak {
                node: self.node_id.clone(),
                seq: anchor.seq,
                detail: format!(
                    "the batch after the declared lost range {}..={} does not chain to the \
                     statement (prev_hash {}..., key epoch {}; the statement says {}..., epoch {})",
                    l.first_seq,
                    l.last_seq,
                    short(&anchor.prev_hash),
                    anchor.key_epoch,
                    short(&l.last_hash),
                    l.next_key_epoch
                ),
            });
        }
        if l.first_seq > self.tip.seq + 1 || l.last_seq > self.tip.seq {
            self.tip = self.store.tip(&self.node_id).await.map_err(store_err)?;
        }
        if l.last_seq <= self.tip.seq || l.first_seq > self.tip.seq + 1 {
            return Ok(());
        }
        let first_seq = self.tip.seq + 1;
        let record = LossRecord {
            node_id: self.node_id.clone(),
            first_seq,
            last_seq: l.last_seq,
            last_hash: l.last_hash,
            next_key_epoch: l.next_key_epoch,
            next_key_id: l.next_key_id,
            signer_epoch: l.key_epoch,
            rotations: l.rotations.clone(),
            reason: l.reason.to_owned(),
            detail: l.detail.clone(),
            stated_unix_ns: l.stated_unix_ns,
            recorded_unix_ns: unix_now_ns(),
            statement: l.bytes.clone(),
        };
        match self.store.record_loss(record).await.map_err(store_err)? {
            LossOutcome::Recorded => {
                self.metrics.inc(&self.metrics.lost_ranges);
                self.metrics
                    .add(&self.metrics.lost_batches, l.last_seq - first_seq + 1);
                tracing::warn!(node = %self.node_id, first_seq, last_seq = l.last_seq, reason = l.reason, detail = %l.detail, "LOST RANGE recorded: the node declared these batches lost; the chain continues after them");
                self.advance(l.last_seq, l.last_hash);
                // Held batches inside the range can never be stored.
                let inside: Vec<u64> = self.held.range(..=l.last_seq).map(|(s, _)| *s).collect();
                for seq in inside {
                    if let Some(b) = self.held.remove(&seq) {
                        self.held_bytes = self.held_bytes.saturating_sub(b.held_cost());
                        self.in_lost_range(seq, first_seq, l.last_seq);
                    }
                }
                Ok(())
            }
            LossOutcome::StaleKey { expected_epoch } => Err(Rejection::StaleKey {
                node: self.node_id.clone(),
                seq: first_seq,
                detail: format!(
                    "loss statement {first_seq}..={} signed by key epoch {} naming epoch {} \
                     next, but the chain is at epoch {expected_epoch}",
                    l.last_seq, l.key_epoch, l.next_key_epoch
                ),
            }),
            LossOutcome::NotNext { tip } => {
                tracing::info!(node = %self.node_id, tip, first_seq, "loss statement raced another process; the tip moved");
                self.tip = self.store.tip(&self.node_id).await.map_err(store_err)?;
                Ok(())
            }
        }
    }

    async fn fork(&self, vb: &VerifiedBatch, kind: ForkKind, stored_hash: [u8; 32]) -> Rejection {
        let (seq, where_) = match kind {
            ForkKind::Stored => (vb.seq, "already stored"),
            ForkKind::Held => (vb.seq, "held on this stream"),
            ForkKind::ChainLink => (vb.seq - 1, "stored (this batch chains to another one)"),
        };
        tracing::error!(node = %self.node_id, seq, kind = kind.as_str(), stored = %hex(&stored_hash), received = %hex(&vb.hash), "FORK: two different batches for one seq");
        let record = ForkRecord {
            node_id: self.node_id.clone(),
            seq: vb.seq,
            kind,
            stored_hash,
            received_hash: vb.hash,
            received_bytes: vb.bytes.clone(),
            detected_unix_ns: unix_now_ns(),
        };
        match self.store.record_fork(record).await {
            Ok(true) => {}
            Ok(false) => {
                self.metrics.inc(&self.metrics.forks_not_kept);
                tracing::warn!(node = %self.node_id, seq, "fork evidence not kept: the node's fork rows or bytes are at their bound (counted only)");
            }
            Err(e) => {
                tracing::error!(node = %self.node_id, seq, error = %e, "could not record the fork")
            }
        }
        match kind {
            ForkKind::ChainLink => Rejection::ChainBreak {
                node: self.node_id.clone(),
                seq: vb.seq,
                detail: format!(
                    "prev_hash {}... is not the hash of stored seq {seq} ({}...): the node's \
                     chain forked at seq {seq}; recorded",
                    short(&vb.prev_hash),
                    short(&stored_hash)
                ),
            },
            _ => Rejection::Fork {
                node: self.node_id.clone(),
                seq,
                where_,
                stored: short(&stored_hash),
                received: short(&vb.hash),
            },
        }
    }

    /// Counts and logs what a stored batch had quarantined: it is stored and chained, and the
    /// stream goes on, but none of those allocations is billed.
    fn quarantined(&self, vb: &VerifiedBatch, verdict: &Verdict) {
        let mut allocations = 0u64;
        let mut energy = 0u128;
        for a in &vb.allocations {
            if verdict.reason(a.interval_pos, &a.domain).is_some() {
                allocations += 1;
                energy += u128::from(a.energy_uj.unsigned_abs());
            }
        }
        for r in verdict.all() {
            self.metrics.implausible(r);
        }
        self.metrics
            .add(&self.metrics.allocations_quarantined, allocations);
        let reasons: Vec<&str> = verdict.all().map(|r| r.as_str()).collect();
        tracing::warn!(
            node = %self.node_id,
            seq = vb.seq,
            ?reasons,
            allocations,
            energy_uj = %energy,
            "authentic but implausible intervals: stored as evidence and chained, their \
             allocations quarantined (not billed)"
        );
    }

    async fn commit(&mut self, vb: Arc<VerifiedBatch>) -> Result<(), Rejection> {
        let started = Instant::now();
        let outcome = self
            .store
            .commit(Arc::clone(&vb), Arc::clone(&self.plausible), unix_now_ns())
            .await
            .map_err(store_err)?;
        match outcome {
            Commit::Stored { verdict } => {
                self.metrics.observe_commit(started.elapsed());
                if !verdict.is_empty() {
                    self.quarantined(&vb, &verdict);
                }
                self.metrics.inc(&self.metrics.batches_stored);
                self.metrics
                    .add(&self.metrics.intervals_stored, vb.intervals);
                self.metrics.add(
                    &self.metrics.allocations_stored,
                    u64::try_from(vb.allocations.len()).unwrap_or(u64::MAX),
                );
                if let Some(k) = &vb.rotation {
                    let _ = self.keys.learn(k);
                }
                self.advance(vb.seq, vb.hash);
                Ok(())
            }
            Commit::Duplicate => {
                // Another process stored it first.
                self.metrics.inc(&self.metrics.batches_duplicate);
                self.advance(vb.seq, vb.hash);
                Ok(())
            }
            Commit::Fork { stored_hash } => {
                Err(self.fork(&vb, ForkKind::Stored, stored_hash).await)
            }
            Commit::ChainBreak { predecessor_hash } => {
                Err(self.fork(&vb, ForkKind::ChainLink, predecessor_hash).await)
            }
            Commit::KeyDiscontinuity {
                expected_epoch,
                expected_key_id,
            } => Err(Rejection::StaleKey {
                node: self.node_id.clone(),
                seq: vb.seq,
                detail: format!(
                    "signed with key epoch {} ({}), but the stored chain says seq {} is signed \
                     with epoch {expected_epoch} ({})",
                    vb.key_epoch,
                    hex(&vb.key_id),
                    vb.seq,
                    hex(&expected_key_id)
                ),
            }),
            Commit::InLostRange {
                first_seq,
                last_seq,
            } => {
                self.in_lost_range(vb.seq, first_seq, last_seq);
                Ok(())
            }
            Commit::NotNext { tip } => Err(Rejection::Internal(format!(
                "node {:?}: seq {} was the next one after stored seq {} but the store's tip is \
                 {tip}",
                self.node_id, vb.seq, self.tip.seq
            ))),
        }
    }

    fn advance(&mut self, seq: u64, hash: [u8; 32]) {
        if seq > self.tip.seq {
            self.tip = Tip { seq, hash };
        }
    }

    async fn hold(&mut self, vb: Arc<VerifiedBatch>) -> Result<(), Rejection> {
        let bytes = vb.held_cost();
        if self.held.len() >= self.limits.max_held_batches
            || self.held_bytes.saturating_add(bytes) > self.limits.max_held_bytes
        {
            return Err(Rejection::HeldLimit {
                node: self.node_id.clone(),
                missing_from: self.tip.seq + 1,
                held: self.held.len(),
                held_bytes: self.held_bytes,
                limit: self.limits.max_held_batches,
            });
        }
        tracing::info!(node = %self.node_id, seq = vb.seq, missing_from = self.tip.seq + 1, "batch above a hole: held");
        self.metrics.inc(&self.metrics.batches_held);
        self.store
            .note_seen(&self.node_id, vb.seq)
            .await
            .map_err(store_err)?;
        self.held_bytes += bytes;
        self.held.insert(vb.seq, vb);
        Ok(())
    }

    /// Commits held batches that became next (and drops ones another process stored).
    async fn drain(&mut self) -> Result<(), Rejection> {
        while let Some(entry) = self.held.first_entry() {
            let seq = *entry.key();
            if seq > self.tip.seq + 1 {
                break;
            }
            let vb = entry.remove();
            self.held_bytes = self.held_bytes.saturating_sub(vb.held_cost());
            if seq <= self.tip.seq {
                self.stored_again(&vb).await?;
            } else {
                self.commit(vb).await?;
            }
        }
        Ok(())
    }

    async fn heartbeat(&mut self, signed: &SignedHeartbeat) -> Result<Ack, Rejection> {
        let hb = match verify_heartbeat(&self.node_id, &self.keys, signed) {
            Err(Rejection::UnknownKey { .. }) => {
                self.refresh_keys().await?;
                match verify_heartbeat(&self.node_id, &self.keys, signed) {
                    Err(r @ Rejection::UnknownKey { .. }) => {
                        return self.heartbeat_from_ahead(signed, r);
                    }
                    other => other?,
                }
            }
            other => other?,
        };
        self.announced = self
            .store
            .heartbeat(
                &self.node_id,
                hb.sent_unix_ns,
                unix_now_ns(),
                hb.last_sealed_seq,
            )
            .await
            .map_err(store_err)?;
        self.metrics.inc(&self.metrics.heartbeats);
        let highest_received = self
            .held
            .keys()
            .next_back()
            .copied()
            .unwrap_or(0)
            .max(self.tip.seq);
        if hb.last_sealed_seq > highest_received {
            // Maybe another process received them: ask the store before raising it.
            self.tip = self.store.tip(&self.node_id).await.map_err(store_err)?;
            // Held batches the refreshed tip caught up with are stored (or dropped) now, so the
            // Ack's missing_from_seq is true.
            self.drain().await?;
            if self.messages_seen > 1 && hb.last_sealed_seq > self.tip.seq.max(highest_received) {
                self.metrics.inc(&self.metrics.tail_missing);
                tracing::warn!(node = %self.node_id, announced = hb.last_sealed_seq, stored = self.tip.seq, "heartbeat announces batches the ledger has not received (tail missing)");
            }
        } else if hb.last_sealed_seq < self.tip.seq {
            self.metrics.inc(&self.metrics.heartbeat_regressed);
            tracing::warn!(node = %self.node_id, announced = hb.last_sealed_seq, stored = self.tip.seq, "heartbeat announces less than the ledger stores (spool rolled back?)");
        }
        Ok(self.ack())
    }
}
