//! The verifier: checks a sequence of signed batches (a spool dir or an export) for every
//! break of the record invariants and reports each one: damage, undecodable records, foreign
//! node, unknown key, bad signature, missing / replayed / conflicting / reordered batches,
//! chain breaks, and conservation in every DomainEnergy of every Interval. Never panics,
//! whatever the bytes.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use ed25519_dalek::{Signature, VerifyingKey};
use prost::Message as _;
use wattd_proto::v1::{Batch, DomainEnergy, SignedBatch};

use crate::batch::{chain_hash, ChainHash, GENESIS_HASH};
use crate::identity::{key_id_of, KeyId, PublicIdentity};
use crate::segment::{self as spool, Location, SpoolError, SpoolItem};

/// What is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BreakKind {
    /// Bytes that are not an intact record (bit flip, torn or zero-filled tail).
    Damaged {
        detail: String,
    },
    /// A segment header that is damaged or names another node.
    SegmentHeader {
        detail: String,
    },
    /// An intact frame whose content does not decode as a SignedBatch/Batch.
    Undecodable {
        detail: String,
    },
    ForeignNode {
        expected: String,
        found: String,
        claimed_seq: u64,
    },
    UnknownKeyEpoch {
        epoch: u32,
        claimed_seq: u64,
    },
    KeyIdMismatch {
        epoch: u32,
        claimed_seq: u64,
    },
    /// The signature does not verify: nothing in the batch, not even its seq, is trusted.
    BadSignature {
        claimed_seq: u64,
    },
    BadRotation {
        detail: String,
    },
    /// Batches `first..=last` are absent.
    Missing {
        first: u64,
        last: u64,
    },
    /// The same batch again (same bytes).
    Replayed,
    /// A different batch with a seq already seen: a fork or a forgery.
    Conflicting,
    /// Arrived after a higher seq.
    OutOfOrder {
        after: u64,
    },
    /// `prev_hash` is not the SHA-256 of the previous batch (or not zeros for seq 1).
    ChainBreak,
    Conservation {
        interval_index: u64,
        domain: String,
        package: Option<u32>,
        measured_uj: u64,
        accounted_uj: u128,
    },
}

/// One break: which batch (if known), where (if known), and what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Break {
    pub seq: Option<u64>,
    /// True when `seq` is inferred (damage at the end, whose batch must be the next seq).
    pub seq_inferred: bool,
    pub location: Option<Location>,
    pub kind: BreakKind,
}

impl fmt::Display for Break {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.seq, self.seq_inferred) {
            (Some(s), false) => write!(f, "seq {s}")?,
            (Some(s), true) => write!(f, "seq {s}?")?,
            (None, _) => f.write_str("seq ?")?,
        }
        if let Some(l) = &self.location {
            write!(f, " ({l})")?;
        }
        f.write_str(": ")?;
        match &self.kind {
            BreakKind::Damaged { detail } => write!(f, "damaged record: {detail}"),
            BreakKind::SegmentHeader { detail } => write!(f, "segment header: {detail}"),
            BreakKind::Undecodable { detail } => write!(f, "undecodable record: {detail}"),
            BreakKind::ForeignNode {
                expected,
                found,
                claimed_seq,
            } => write!(
                f,
                "batch of node {found:?} (claims seq {claimed_seq}), expected node {expected:?}"
            ),
            BreakKind::UnknownKeyEpoch { epoch, claimed_seq } => write!(
                f,
                "no public key for key epoch {epoch} (batch claims seq {claimed_seq})"
            ),
            BreakKind::KeyIdMismatch { epoch, claimed_seq } => write!(
                f,
                "key id does not match the key of epoch {epoch} (batch claims seq {claimed_seq})"
            ),
            BreakKind::BadSignature { claimed_seq } => write!(
                f,
                "signature does not verify (batch claims seq {claimed_seq})"
            ),
            BreakKind::BadRotation { detail } => write!(f, "bad key rotation: {detail}"),
            BreakKind::Missing { first, last } if first == last => {
                write!(f, "batch {first} is missing")
            }
            BreakKind::Missing { first, last } => write!(f, "batches {first}..={last} are missing"),
            BreakKind::Replayed => f.write_str("replayed batch (seen before)"),
            BreakKind::Conflicting => {
                f.write_str("a different batch with this seq was seen before")
            }
            BreakKind::OutOfOrder { after } => write!(f, "out of order (after seq {after})"),
            BreakKind::ChainBreak => {
                f.write_str("prev_hash does not match the SHA-256 of the previous batch")
            }
            BreakKind::Conservation {
                interval_index,
                domain,
                package,
                measured_uj,
                accounted_uj,
            } => write!(
                f,
                "interval {interval_index} domain {domain}{}: measured {measured_uj} uJ but \
                 allocated + host + unattributed = {accounted_uj} uJ",
                package.map(|p| format!(" package {p}")).unwrap_or_default()
            ),
        }
    }
}

/// The outcome of a verification.
#[derive(Clone, Debug, Default)]
pub struct VerifyReport {
    pub batches: u64,
    pub valid_batches: u64,
    pub intervals: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub breaks: Vec<Break>,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.breaks.is_empty()
    }

    /// Every seq some break names (explicitly, inferred, or as part of a missing range).
    pub fn named_seqs(&self) -> std::collections::BTreeSet<u64> {
        let mut out = std::collections::BTreeSet::new();
        for b in &self.breaks {
            if let BreakKind::Missing { first, last } = b.kind {
                out.extend(first..=last);
            } else if let Some(s) = b.seq {
                out.insert(s);
            }
        }
        out
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let range = match (self.first_seq, self.last_seq) {
            (Some(a), Some(b)) => format!("seq {a}..={b}"),
            _ => "no batches".into(),
        };
        write!(
            f,
            "{} batches ({range}), {} valid, {} intervals, {} breaks",
            self.batches,
            self.valid_batches,
            self.intervals,
            self.breaks.len()
        )
    }
}

/// An authentic batch, placed in the sequence.
#[derive(Debug)]
struct Entry {
    hash: ChainHash,
    prev_hash: ChainHash,
    location: Option<Location>,
}

/// A streaming verifier: feed it items in order, then [`Verifier::finish`].
#[derive(Debug)]
pub struct Verifier {
    keys: BTreeMap<u32, (VerifyingKey, KeyId)>,
    node_id: Option<String>,
    entries: BTreeMap<u64, Entry>,
    max_seq: Option<u64>,
    expected_first_seq: Option<u64>,
    breaks: Vec<Break>,
    /// Breaks for damage with no record after it (yet): their batch is the next seq.
    trailing_damage: Vec<usize>,
    batches: u64,
    valid_batches: u64,
    intervals: u64,
}

/// Sum of everything a DomainEnergy accounts for; u128 so no input can overflow it.
pub fn accounted_uj(d: &DomainEnergy) -> u128 {
    let allocated: u128 = d
        .allocations
        .iter()
        .map(|a| u128::from(a.active_uj) + u128::from(a.idle_uj))
        .sum();
    let unattributed: u128 = d.unattributed.iter().map(|u| u128::from(u.energy_uj)).sum();
    allocated + u128::from(d.host_active_uj) + u128::from(d.host_idle_uj) + unattributed
}

impl Verifier {
    /// A verifier trusting `keys` (one per epoch, all of one node). Rotations announced in
    /// valid batches add keys for later epochs.
    pub fn new(keys: &[PublicIdentity]) -> Result<Self, TrustError> {
        let mut map = BTreeMap::new();
        let mut node_id: Option<String> = None;
        for k in keys {
            let vk = k.verifying_key().map_err(|source| TrustError::Key {
                epoch: k.key_epoch,
                source,
            })?;
            match &node_id {
                Some(n) if *n != k.node_id => {
                    return Err(TrustError::TwoNodes {
                        first: n.clone(),
                        second: k.node_id.clone(),
                    })
                }
                _ => node_id = Some(k.node_id.clone()),
            }
            map.insert(k.key_epoch, (vk, key_id_of(&vk.to_bytes())));
        }
        Ok(Self::trusting(map, node_id))
    }

    /// A verifier trusting keys already parsed (epoch, key) of node `node_id`: what
    /// [`Verifier::new`] makes of identities, without decompressing each key again.
    pub fn with_keys(node_id: &str, keys: impl IntoIterator<Item = (u32, VerifyingKey)>) -> Self {
        let keys = keys
            .into_iter()
            .map(|(epoch, vk)| (epoch, (vk, key_id_of(&vk.to_bytes()))))
            .collect();
        Self::trusting(keys, Some(node_id.to_owned()))
    }

    /// A verifier that has seen nothing yet, trusting `keys` (epoch -> key and its id).
    fn trusting(keys: BTreeMap<u32, (VerifyingKey, KeyId)>, node_id: Option<String>) -> Self {
        Self {
            keys,
            node_id,
            entries: BTreeMap::new(),
            max_seq: None,
            expected_first_seq: None,
            breaks: Vec::new(),
            trailing_damage: Vec::new(),
            batches: 0,
            valid_batches: 0,
            intervals: 0,
        }
    }

    fn push(&mut self, seq: Option<u64>, location: Option<Location>, kind: BreakKind) {
        self.breaks.push(Break {
            seq,
            seq_inferred: false,
            location,
            kind,
        });
    }

    /// Feeds one item of a spool or export walk.
    pub fn item(&mut self, item: SpoolItem<'_>) {
        match item {
            SpoolItem::SegmentStart {
                path,
                name_seq,
                header,
            } => {
                if self.expected_first_seq.is_none() && self.entries.is_empty() {
                    self.expected_first_seq = Some(name_seq);
                }
                let location = Some(Location {
                    file: path.to_owned(),
                    offset: 0,
                });
                match header {
                    Ok(h) => {
                        if let Some(n) = self.node_id.as_ref().filter(|n| **n != h.node_id) {
                            let detail =
                                format!("segment of node {:?}, expected node {n:?}", h.node_id);
                            self.push(None, location, BreakKind::SegmentHeader { detail });
                        }
                    }
                    Err(d) => {
                        let detail = d.detail.clone();
                        self.push(None, location, BreakKind::SegmentHeader { detail });
                    }
                }
            }
            SpoolItem::Record { location, bytes } => self.record(location, bytes),
            SpoolItem::Damage { location, damage } => {
                let detail = damage.detail.clone();
                self.unplaced(Some(location), BreakKind::Damaged { detail });
            }
        }
    }

    /// Checks one encoded SignedBatch.
    ///
    /// A batch that is not authentic (foreign node, unknown key, bad signature) is reported
    /// like damage: its claimed seq is shown but not trusted, so it neither fills nor breaks
    /// the sequence; the seq it should have held shows up as missing (or, at the very end, is
    /// inferred as the next one).
    pub fn record(&mut self, location: Location, bytes: &[u8]) {
        self.record_batch(location, bytes);
    }

    /// [`Verifier::record`], handing back the decoded `Batch` when it is authentic (its
    /// breaks, if any, are in the report like any other's), so that a caller that needs the
    /// body decodes it once.
    pub fn record_batch(&mut self, location: Location, bytes: &[u8]) -> Option<Batch> {
        self.batches += 1;
        let loc = Some(location);
        let decoded = SignedBatch::decode(bytes)
            .map_err(|e| format!("SignedBatch: {e}"))
            .and_then(|s| {
                let b =
                    Batch::decode(s.batch_bytes.as_slice()).map_err(|e| format!("Batch: {e}"))?;
                Ok((s, b))
            });
        let (signed, batch) = match decoded {
            Ok(x) if x.1.seq > 0 => x,
            Ok(_) => {
                self.unplaced(
                    loc,
                    BreakKind::Undecodable {
                        detail: "Batch.seq is 0".into(),
                    },
                );
                return None;
            }
            Err(detail) => {
                self.unplaced(loc, BreakKind::Undecodable { detail });
                return None;
            }
        };
        let claimed_seq = batch.seq;

        if let Some(n) = self.node_id.as_ref().filter(|n| **n != batch.node_id) {
            let kind = BreakKind::ForeignNode {
                expected: n.clone(),
                found: batch.node_id.clone(),
                claimed_seq,
            };
            self.unplaced(loc, kind);
            return None;
        }
        let epoch = batch.key_epoch;
        let Some((vk, kid)) = self.keys.get(&epoch) else {
            self.unplaced(loc, BreakKind::UnknownKeyEpoch { epoch, claimed_seq });
            return None;
        };
        if batch.key_id != kid.as_slice() || signed.key_id != kid.as_slice() {
            self.unplaced(loc, BreakKind::KeyIdMismatch { epoch, claimed_seq });
            return None;
        }
        let authentic = Signature::from_slice(&signed.signature)
            .is_ok_and(|sig| vk.verify_strict(&signed.batch_bytes, &sig).is_ok());
        if !authentic {
            self.unplaced(loc, BreakKind::BadSignature { claimed_seq });
            return None;
        }
        if self.node_id.is_none() {
            self.node_id = Some(batch.node_id.clone());
        }

        // From here on the batch is authentic: its seq is what the node signed.
        self.trailing_damage.clear();
        let seq = Some(batch.seq);
        let hash = chain_hash(bytes);
        if let Some(r) = &batch.key_rotation {
            if let Err(detail) = self.learn_rotation(&batch, r) {
                self.push(seq, loc.clone(), BreakKind::BadRotation { detail });
            }
        }
        for interval in &batch.intervals {
            for d in &interval.domains {
                let accounted = accounted_uj(d);
                if accounted != u128::from(d.measured_uj) {
                    let kind = BreakKind::Conservation {
                        interval_index: interval.index,
                        domain: d.domain.clone(),
                        package: d.package,
                        measured_uj: d.measured_uj,
                        accounted_uj: accounted,
                    };
                    self.push(seq, loc.clone(), kind);
                }
            }
        }
        let Ok(prev_hash) = ChainHash::try_from(batch.prev_hash.as_slice()) else {
            self.push(seq, loc, BreakKind::ChainBreak);
            return Some(batch);
        };
        if let Some(e) = self.entries.get(&batch.seq) {
            let kind = if e.hash == hash {
                BreakKind::Replayed
            } else {
                BreakKind::Conflicting
            };
            self.push(seq, loc, kind);
            return Some(batch);
        }
        if let Some(m) = self.max_seq.filter(|&m| batch.seq < m) {
            self.push(seq, loc.clone(), BreakKind::OutOfOrder { after: m });
        }
        self.max_seq = Some(self.max_seq.map_or(batch.seq, |m| m.max(batch.seq)));
        self.intervals += u64::try_from(batch.intervals.len()).unwrap_or(u64::MAX);
        self.valid_batches += 1;
        self.entries.insert(
            batch.seq,
            Entry {
                hash,
                prev_hash,
                location: loc,
            },
        );
        Some(batch)
    }

    /// A break whose batch cannot be placed in the sequence (damaged, undecodable, not
    /// authentic). If nothing authentic follows it, [`Verifier::finish`] names it as the seq
    /// after the last one.
    fn unplaced(&mut self, location: Option<Location>, kind: BreakKind) {
        self.trailing_damage.push(self.breaks.len());
        self.push(None, location, kind);
    }

    fn learn_rotation(
        &mut self,
        batch: &Batch,
        r: &wattd_proto::v1::KeyRotation,
    ) -> Result<(), String> {
        let public: [u8; 32] = r
            .new_public_key
            .as_slice()
            .try_into()
            .map_err(|_| format!("public key of {} bytes", r.new_public_key.len()))?;
        let vk = VerifyingKey::from_bytes(&public).map_err(|e| format!("public key: {e}"))?;
        let kid = key_id_of(&public);
        if r.new_key_id != kid.as_slice() {
            return Err("new_key_id is not the id of new_public_key".into());
        }
        if Some(r.new_key_epoch) != batch.key_epoch.checked_add(1) {
            return Err(format!(
                "announces epoch {} from epoch {}",
                r.new_key_epoch, batch.key_epoch
            ));
        }
        if r.effective_seq != batch.seq + 1 {
            return Err(format!(
                "effective from seq {} but announced in seq {}",
                r.effective_seq, batch.seq
            ));
        }
        match self.keys.get(&r.new_key_epoch) {
            Some((known, _)) if *known != vk => Err(format!(
                "epoch {} already has a different key",
                r.new_key_epoch
            )),
            _ => {
                self.keys.insert(r.new_key_epoch, (vk, kid));
                Ok(())
            }
        }
    }

    /// Structural checks over everything seen (contiguity, chain), then the report.
    pub fn finish(mut self) -> VerifyReport {
        let first = self.entries.keys().next().copied();
        let last = self.entries.keys().next_back().copied();
        // Damage after the last intact record: its batch is the one after it.
        let next = last.map(|l| l + 1).or(self.expected_first_seq);
        for &i in &self.trailing_damage {
            if let Some(b) = self.breaks.get_mut(i) {
                b.seq = next;
                b.seq_inferred = true;
            }
        }
        let mut expected = self.expected_first_seq.or(first);
        let mut prev: Option<(u64, &Entry)> = None;
        let mut structural = Vec::new();
        for (&seq, e) in &self.entries {
            if let Some(x) = expected.filter(|&x| seq > x) {
                structural.push(Break {
                    seq: Some(x),
                    seq_inferred: false,
                    location: e.location.clone(),
                    kind: BreakKind::Missing {
                        first: x,
                        last: seq - 1,
                    },
                });
            }
            expected = Some(seq + 1);
            let link_ok = match prev {
                // seq 1 chains to the genesis hash.
                _ if seq == 1 => e.prev_hash == GENESIS_HASH,
                // Both ends authentic and adjacent: the link must hold.
                Some((ps, pe)) if ps + 1 == seq => e.prev_hash == pe.hash,
                // Predecessor missing: the link cannot be judged; the gap is reported.
                _ => true,
            };
            if !link_ok {
                structural.push(Break {
                    seq: Some(seq),
                    seq_inferred: false,
                    location: e.location.clone(),
                    kind: BreakKind::ChainBreak,
                });
            }
            prev = Some((seq, e));
        }
        self.breaks.extend(structural);
        VerifyReport {
            batches: self.batches,
            valid_batches: self.valid_batches,
            intervals: self.intervals,
            first_seq: first,
            last_seq: last,
            breaks: self.breaks,
        }
    }
}

/// Verifies the spool in `dir` read-only against `keys`.
pub fn verify_spool(dir: &Path, keys: &[PublicIdentity]) -> Result<VerifyReport, VerifyError> {
    let mut v = Verifier::new(keys).map_err(VerifyError::Keys)?;
    spool::visit_spool(dir, |item| v.item(item))?;
    Ok(v.finish())
}

/// Verifies an export stream against `keys`.
pub fn verify_export(
    file: &Path,
    bytes: &[u8],
    keys: &[PublicIdentity],
) -> Result<VerifyReport, VerifyError> {
    let mut v = Verifier::new(keys).map_err(VerifyError::Keys)?;
    spool::visit_export(file, bytes, |item| v.item(item));
    Ok(v.finish())
}

/// Why a set of trusted keys cannot make a verifier.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TrustError {
    #[error("key epoch {epoch}: {source}")]
    Key {
        epoch: u32,
        source: crate::identity::PublicKeyError,
    },
    #[error("keys of two nodes: {first:?} and {second:?}")]
    TwoNodes { first: String, second: String },
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("trusted keys: {0}")]
    Keys(#[from] TrustError),
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{NodeKey, PublicKeyError};

    #[test]
    fn trusted_keys_that_cannot_make_a_verifier_say_which_and_why() {
        let a1 = NodeKey::from_seed("a", 1, [1; 32]).public();
        let a2 = NodeKey::from_seed("a", 2, [2; 32]).public();
        assert!(Verifier::new(&[a1.clone(), a2.clone()]).is_ok());
        let b = NodeKey::from_seed("b", 3, [3; 32]).public();
        assert_eq!(
            Verifier::new(&[a1.clone(), b]).err(),
            Some(TrustError::TwoNodes {
                first: "a".into(),
                second: "b".into()
            })
        );
        let broken = PublicIdentity {
            key_id: a1.key_id.clone(),
            ..a2
        };
        let e = Verifier::new(&[a1, broken]).err();
        assert_eq!(
            e,
            Some(TrustError::Key {
                epoch: 2,
                source: PublicKeyError::KeyIdMismatch
            })
        );
        assert_eq!(
            e.map(|e| VerifyError::from(e).to_string())
                .unwrap_or_default(),
            "trusted keys: key epoch 2: key_id does not match public_key"
        );
    }
}
