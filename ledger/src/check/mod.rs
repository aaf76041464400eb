//! Verification of what a node sends, before anything is stored: signatures, keys, node id
//! against the client certificate, rotations, conservation, and the bounds the stores need.
//!
//! The authenticity and conservation verdicts are those of the agent's own verifier
//! (`wattd_records::verify::Verifier`, what `wattd verify` runs), fed one batch at a time, so the ledger
//! and the node's tools can never disagree on whether a batch is authentic or conserves energy.
//! Sequence, chain links and key continuity are judged by the store, inside the transaction that
//! commits the batch, because only the store knows what is already durable.

use std::collections::BTreeMap;
use std::path::PathBuf;

use ed25519_dalek::{Signature, VerifyingKey};
use prost::Message as _;
use wattd_proto::v1::{Batch, Heartbeat, SignedBatch, SignedHeartbeat};
use wattd_records::batch::{chain_hash, decode_header, ChainHash, FORMAT_VERSION};
use wattd_records::durable::hex;
use wattd_records::identity::{key_id_of, KeyId, PublicIdentity};
use wattd_records::segment::Location;
use wattd_records::verify::{BreakKind, Verifier};

use crate::enrol::EnrolledKey;
use crate::plausible::{BatchFacts, DomainFacts, IntervalFacts};
use crate::Rejection;

mod keys;
mod rows;

pub use keys::{KeyOrigin, KnownKey, KnownKeys, LearnError, LearntKey};
use rows::domain_label;
pub(crate) use rows::{allocation_row, batch_rows};
pub use rows::{AllocationRow, RunFinalRow, RunLabelRow};

/// An authentic, conserving batch of the certificate's node, ready for the store.
#[derive(Clone, Debug)]
pub struct VerifiedBatch {
    pub node_id: String,
    pub seq: u64,
    pub key_epoch: u32,
    pub key_id: KeyId,
    pub prev_hash: ChainHash,
    /// SHA-256 of `bytes`: what the next batch's prev_hash must hold.
    pub hash: ChainHash,
    /// The canonical encoding of the SignedBatch (byte for byte what the node's spool holds).
    pub bytes: Vec<u8>,
    pub sealed_unix_ns: i64,
    pub intervals: u64,
    pub rotation: Option<LearntKey>,
    pub allocations: Vec<AllocationRow>,
    /// What the plausibility judge reads of the batch and each interval, in batch order.
    pub facts: BatchFacts,
    /// The run labels the batch carries (intervals' `run_labels` and summaries' `labels`).
    pub run_labels: Vec<RunLabelRow>,
    /// How each run summarised here obtained its last usage.
    pub run_finals: Vec<RunFinalRow>,
}

impl VerifiedBatch {
    /// Memory it takes while held above a hole: its bytes and its decoded allocation rows (the
    /// rows are several times the wire size, so counting bytes alone would let a node hold far
    /// more than `--max-held-bytes`).
    pub fn held_cost(&self) -> usize {
        self.bytes.len()
            + self
                .allocations
                .iter()
                .map(|a| std::mem::size_of::<AllocationRow>() + a.domain.len() + a.run_id.len())
                .sum::<usize>()
            + self
                .run_finals
                .iter()
                .map(|f| std::mem::size_of::<RunFinalRow>() + f.run_id.len() + f.final_usage.len())
                .sum::<usize>()
            + self
                .run_labels
                .iter()
                .map(|l| {
                    std::mem::size_of::<RunLabelRow>()
                        + l.run_id.len()
                        + l.key.len()
                        + l.value.len()
                })
                .sum::<usize>()
    }
}

/// What a verified heartbeat says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VerifiedHeartbeat {
    pub sent_unix_ns: i64,
    pub last_sealed_seq: u64,
    pub key_epoch: u32,
}

/// A value from the network as an error shows it: at most 64 characters (escaped by `{:?}`).
fn shown(v: &str) -> String {
    v.chars().take(64).collect()
}

/// A stored integer column is a signed 64-bit integer in both stores; bigger values are refused
/// here rather than wrapped there. (2^63 uJ is 2.5 TWh: no real interval comes near.)
fn db_int(node: &str, seq: u64, what: &str, v: u64) -> Result<i64, Rejection> {
    i64::try_from(v).map_err(|_| too_big(node, seq, what, v))
}

fn too_big(node: &str, seq: u64, what: &str, v: u64) -> Rejection {
    Rejection::Malformed {
        node: node.to_owned(),
        detail: format!(
            "batch seq {seq}: {what} = {v} is above 2^63-1, which the store cannot hold"
        ),
    }
}

/// A kernel boot id is a 36-character UUID; the ledger keeps the last one per node.
const BOOT_ID_MAX_BYTES: usize = 64;

fn short(h: &[u8]) -> String {
    hex(h.get(..8).unwrap_or(h))
}

/// Verifies one SignedBatch sent on a stream authenticated as `cert_node`.
pub fn verify_batch(
    cert_node: &str,
    keys: &KnownKeys,
    signed: &SignedBatch,
) -> Result<VerifiedBatch, Rejection> {
    let node = || cert_node.to_owned();
    // The canonical encoding: prost writes fields in order and omits empty ones, exactly as the
    // agent encoded the record it hashed into the next batch's prev_hash.
    let bytes = signed.encode_to_vec();
    let (_, header) = decode_header(&bytes).map_err(|e| Rejection::Malformed {
        node: node(),
        detail: e.to_string(),
    })?;
    let seq = header.seq;
    if header.node_id != cert_node {
        return Err(Rejection::NodeMismatch {
            cert_node: node(),
            claimed: header.node_id,
            what: format!("batch claiming seq {seq}"),
        });
    }
    if keys.is_revoked(header.key_epoch) {
        return Err(Rejection::Revoked {
            node: node(),
            detail: format!(
                "batch claiming seq {seq} is signed by key epoch {}, which the enrolment revokes",
                header.key_epoch
            ),
        });
    }
    let Some(key) = keys.epoch(header.key_epoch) else {
        return Err(Rejection::UnknownKey {
            node: node(),
            what: format!("batch claiming seq {seq}"),
            detail: format!(
                "key epoch {} (key id {}) is neither enrolled nor announced by a rotation in the \
                 node's stored chain",
                header.key_epoch,
                hex(&header.key_id)
            ),
        });
    };
    if header.key_id != key.key_id.as_slice() || signed.key_id != key.key_id.as_slice() {
        return Err(Rejection::UnknownKey {
            node: node(),
            what: format!("batch claiming seq {seq}"),
            detail: format!(
                "key id {} is not the key of epoch {} ({})",
                hex(&header.key_id),
                header.key_epoch,
                hex(&key.key_id)
            ),
        });
    }

    // The agent's verifier, on this one record: signature, key id, rotation, conservation,
    // genesis link. Sequence and chain against stored batches are the store's.
    let mut verifier = keys.verifier();
    let decoded = verifier.record_batch(
        Location {
            file: PathBuf::from(format!("stream of node {cert_node}")),
            offset: 0,
        },
        &bytes,
    );
    let report = verifier.finish();
    let more = report.breaks.len().saturating_sub(1);
    if let Some(b) = report.breaks.into_iter().next() {
        let and_more = if more > 0 {
            format!(" (and {more} more break(s))")
        } else {
            String::new()
        };
        return Err(match b.kind {
            BreakKind::BadSignature { claimed_seq } => Rejection::BadSignature {
                node: node(),
                what: format!("batch claiming seq {claimed_seq}"),
            },
            BreakKind::UnknownKeyEpoch { .. } | BreakKind::KeyIdMismatch { .. } => {
                Rejection::UnknownKey {
                    node: node(),
                    what: format!("batch claiming seq {seq}"),
                    detail: b.to_string(),
                }
            }
            BreakKind::BadRotation { detail } => Rejection::BadRotation {
                node: node(),
                seq,
                detail: format!("{detail}{and_more}"),
            },
            BreakKind::Conservation { .. } => Rejection::Conservation {
                node: node(),
                seq,
                detail: format!("{b}{and_more}"),
            },
            BreakKind::ChainBreak => Rejection::ChainBreak {
                node: node(),
                seq,
                detail: format!(
                    "seq 1 must chain to 32 zero bytes, its prev_hash is {}",
                    short(&header.prev_hash)
                ),
            },
            BreakKind::Undecodable { detail } => Rejection::Malformed {
                node: node(),
                detail: format!("batch claiming seq {seq}: {detail}"),
            },
            BreakKind::ForeignNode { found, .. } => Rejection::NodeMismatch {
                cert_node: node(),
                claimed: found,
                what: format!("batch claiming seq {seq}"),
            },
            other => Rejection::Internal(format!(
                "unexpected verdict on a single batch (seq {seq}): {other:?}"
            )),
        });
    }

    // Authentic and conserving: the body the verifier decoded, for the allocation rows.
    let Some(batch) = decoded else {
        return Err(Rejection::Internal(format!(
            "batch seq {seq}: no break and no decoded body"
        )));
    };
    if batch.format_version != FORMAT_VERSION {
        return Err(Rejection::UnsupportedFormat {
            node: node(),
            seq,
            version: batch.format_version,
        });
    }
    db_int(cert_node, seq, "seq", seq)?;
    let mut allocations = Vec::new();
    let mut facts = Vec::with_capacity(batch.intervals.len());
    for (pos, interval) in batch.intervals.iter().enumerate() {
        let index = db_int(cert_node, seq, "interval index", interval.index)?;
        if interval.boot_id.len() > BOOT_ID_MAX_BYTES {
            return Err(Rejection::Malformed {
                node: node(),
                detail: format!(
                    "batch seq {seq}: interval {}: boot_id is {} bytes, at most \
                     {BOOT_ID_MAX_BYTES}",
                    interval.index,
                    interval.boot_id.len()
                ),
            });
        }
        // Per meter label: (domain, allocated energy, CPU time per run when usage is CPU
        // time). Several entries with one label are one meter.
        type Meter<'a> = (&'a str, u128, Option<BTreeMap<&'a str, u128>>);
        let mut meters: BTreeMap<String, Meter> = BTreeMap::new();
        for d in &interval.domains {
            if let Some(what) = wattd_proto::names::domain_problem(&d.domain) {
                return Err(Rejection::Malformed {
                    node: node(),
                    detail: format!(
                        "batch seq {seq}: interval {}: domain {:?}: {what}",
                        interval.index,
                        shown(&d.domain)
                    ),
                });
            }
            let domain = domain_label(&d.domain, d.package);
            // Usage is CPU time in these domains (resident memory for DRAM under the memory
            // policy, busy time for a GPU).
            let cpu_time = matches!(d.domain.as_str(), "package" | "psys")
                || (d.domain == "dram" && interval.dram_policy != "memory");
            let meter = meters
                .entry(domain.clone())
                .or_insert_with(|| (d.domain.as_str(), 0, cpu_time.then(BTreeMap::new)));
            for a in &d.allocations {
                meter.1 += u128::from(a.active_uj) + u128::from(a.idle_uj);
                if let Some(per_run) = meter.2.as_mut() {
                    *per_run.entry(a.run_id.as_str()).or_default() += u128::from(a.usage_us);
                }
                if let Some(what) = wattd_proto::names::run_id_problem(&a.run_id) {
                    return Err(Rejection::Malformed {
                        node: node(),
                        detail: format!(
                            "batch seq {seq}: interval {}: run id {:?}: {what}",
                            interval.index,
                            shown(&a.run_id)
                        ),
                    });
                }
                allocations.push(
                    allocation_row(pos, index, &domain, a)
                        .map_err(|(what, v)| too_big(cert_node, seq, what, v))?,
                );
            }
        }
        facts.push(IntervalFacts {
            index: interval.index,
            boot_id: interval.boot_id.clone(),
            start_mono_ns: interval.start_monotonic_ns,
            end_mono_ns: interval.end_monotonic_ns,
            start_unix_ns: interval.start_unix_ns,
            end_unix_ns: interval.end_unix_ns,
            declares_gap: !interval.gaps.is_empty(),
            domains: meters
                .into_iter()
                .map(|(label, (domain, allocated, per_run))| DomainFacts {
                    label,
                    domain: domain.to_owned(),
                    allocated_uj: allocated,
                    max_run_cpu_us: per_run.map(|r| r.into_values().max().unwrap_or(0)),
                })
                .collect(),
        });
    }
    // The batch's own gaps (AGENT_DOWN: from the last sealed interval before a restart to the
    // first after it).
    let facts = BatchFacts {
        intervals: facts,
        declares_gap: !batch.gaps.is_empty(),
    };
    // Run labels (the account a run belongs to, among others): the contract's rule.
    let mut run_labels = Vec::new();
    let labelled = batch
        .intervals
        .iter()
        .flat_map(|i| i.run_labels.iter().map(|r| (r.run_id.as_str(), &r.labels)))
        .chain(
            batch
                .run_summaries
                .iter()
                .map(|r| (r.run_id.as_str(), &r.labels)),
        );
    for (run_id, labels) in labelled {
        if labels.is_empty() {
            continue;
        }
        let bad = |detail: String| Rejection::Malformed {
            node: node(),
            detail: format!(
                "batch seq {seq}: labels of run {:?}: {detail}",
                shown(run_id)
            ),
        };
        if let Some(what) = wattd_proto::names::run_id_problem(run_id) {
            return Err(bad(what.to_owned()));
        }
        if labels.len() > wattd_proto::names::LABELS_MAX {
            return Err(bad(format!(
                "{} labels, at most {}",
                labels.len(),
                wattd_proto::names::LABELS_MAX
            )));
        }
        for l in labels {
            if let Some(what) = wattd_proto::names::label_problem(&l.key, &l.value) {
                return Err(bad(format!("{:?}: {what}", shown(&l.key))));
            }
            run_labels.push(RunLabelRow {
                run_id: run_id.to_owned(),
                key: l.key.clone(),
                value: l.value.clone(),
            });
        }
    }
    // How each summarised run's last usage was obtained (words only: it reaches text output).
    let mut run_finals = Vec::with_capacity(batch.run_summaries.len());
    for r in &batch.run_summaries {
        let bad = |detail: String| Rejection::Malformed {
            node: node(),
            detail: format!(
                "batch seq {seq}: summary of run {:?}: {detail}",
                shown(&r.run_id)
            ),
        };
        if let Some(what) = wattd_proto::names::run_id_problem(&r.run_id) {
            return Err(bad(what.to_owned()));
        }
        if r.final_usage.len() > 32
            || !r
                .final_usage
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_')
        {
            return Err(bad(format!(
                "final_usage {:?} is not a word of a-z and _",
                shown(&r.final_usage)
            )));
        }
        run_finals.push(RunFinalRow {
            run_id: r.run_id.clone(),
            final_usage: r.final_usage.clone(),
            reconciled_usage_us: db_int(
                cert_node,
                seq,
                "reconciled_usage_us",
                r.reconciled_usage_us,
            )?,
        });
    }
    // Run checkpoints carry names too: the same rules (a meter is a domain label).
    for e in &batch.run_checkpoint {
        let meter_ok = match e.meter.split_once(':') {
            Some((d, p)) => {
                wattd_proto::names::domain_problem(d).is_none()
                    && !p.is_empty()
                    && p.bytes().all(|b| b.is_ascii_digit())
            }
            None => wattd_proto::names::domain_problem(&e.meter).is_none(),
        };
        if let Some(what) = wattd_proto::names::run_id_problem(&e.run_id) {
            return Err(Rejection::Malformed {
                node: node(),
                detail: format!(
                    "batch seq {seq}: run checkpoint: run id {:?}: {what}",
                    shown(&e.run_id)
                ),
            });
        }
        if !meter_ok {
            return Err(Rejection::Malformed {
                node: node(),
                detail: format!(
                    "batch seq {seq}: run checkpoint: meter {:?} is not a domain label",
                    shown(&e.meter)
                ),
            });
        }
    }
    let rotation = match &batch.key_rotation {
        // The verifier accepted it: 32-byte key, matching id, epoch + 1, effective seq + 1.
        Some(r) => {
            let public_key: [u8; 32] =
                r.new_public_key
                    .as_slice()
                    .try_into()
                    .map_err(|_| Rejection::BadRotation {
                        node: node(),
                        seq,
                        detail: "new_public_key is not 32 bytes".into(),
                    })?;
            Some(LearntKey {
                epoch: r.new_key_epoch,
                public_key,
                key_id: key_id_of(&public_key),
                effective_seq: r.effective_seq,
                announced_seq: seq,
            })
        }
        None => None,
    };
    let mut prev_hash = [0u8; 32];
    prev_hash.copy_from_slice(&header.prev_hash);
    Ok(VerifiedBatch {
        node_id: cert_node.to_owned(),
        seq,
        key_epoch: header.key_epoch,
        key_id: key.key_id,
        prev_hash,
        hash: chain_hash(&bytes),
        bytes,
        sealed_unix_ns: header.sealed_unix_ns,
        intervals: u64::try_from(batch.intervals.len()).unwrap_or(u64::MAX),
        rotation,
        allocations,
        facts,
        run_labels,
        run_finals,
    })
}

/// Verifies one SignedHeartbeat sent on a stream authenticated as `cert_node`.
pub fn verify_heartbeat(
    cert_node: &str,
    keys: &KnownKeys,
    signed: &SignedHeartbeat,
) -> Result<VerifiedHeartbeat, Rejection> {
    let node = || cert_node.to_owned();
    let hb =
        Heartbeat::decode(signed.heartbeat_bytes.as_slice()).map_err(|e| Rejection::Malformed {
            node: node(),
            detail: format!("heartbeat: Heartbeat: {e}"),
        })?;
    if hb.node_id != cert_node {
        return Err(Rejection::NodeMismatch {
            cert_node: node(),
            claimed: hb.node_id,
            what: "heartbeat".into(),
        });
    }
    if keys.is_revoked(hb.key_epoch) {
        return Err(Rejection::Revoked {
            node: node(),
            detail: format!(
                "heartbeat signed by key epoch {}, which the enrolment revokes",
                hb.key_epoch
            ),
        });
    }
    let Some(key) = keys.by_key_id(&signed.key_id) else {
        return Err(Rejection::UnknownKey {
            node: node(),
            what: "heartbeat".into(),
            detail: format!(
                "key id {} is neither enrolled nor announced by a rotation in the node's stored \
                 chain",
                hex(&signed.key_id)
            ),
        });
    };
    if key.identity.key_epoch != hb.key_epoch {
        return Err(Rejection::UnknownKey {
            node: node(),
            what: "heartbeat".into(),
            detail: format!(
                "key id {} is the key of epoch {}, the heartbeat claims epoch {}",
                hex(&signed.key_id),
                key.identity.key_epoch,
                hb.key_epoch
            ),
        });
    }
    let authentic = key.signed(&signed.heartbeat_bytes, &signed.signature);
    if !authentic {
        return Err(Rejection::BadSignature {
            node: node(),
            what: format!("heartbeat (last_sealed_seq {})", hb.last_sealed_seq),
        });
    }
    if i64::try_from(hb.last_sealed_seq).is_err() {
        return Err(Rejection::Malformed {
            node: node(),
            detail: format!(
                "heartbeat: last_sealed_seq {} is above 2^63-1",
                hb.last_sealed_seq
            ),
        });
    }
    Ok(VerifiedHeartbeat {
        sent_unix_ns: hb.sent_unix_ns,
        last_sealed_seq: hb.last_sealed_seq,
        key_epoch: hb.key_epoch,
    })
}

/// What a verified loss statement declares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedLoss {
    pub first_seq: u64,
    pub last_seq: u64,
    pub last_hash: ChainHash,
    pub next_key_epoch: u32,
    pub next_key_id: KeyId,
    /// `damaged` or `not_retained`.
    pub reason: &'static str,
    pub detail: String,
    pub stated_unix_ns: i64,
    pub key_epoch: u32,
    /// The SignedLossStatement as received.
    pub bytes: Vec<u8>,
    /// Keys learnt from the statement's signed rotations (each verified with the key it
    /// retired, starting from a key this ledger knew).
    pub rotations: Vec<LearntKey>,
}

/// Verifies a statement's signed rotations in epoch order, each with the key it retires (one
/// the ledger knows, or one learnt from an earlier rotation in the list), and adds the new keys
/// to `keys`. Returns them.
fn learn_rotations(
    cert_node: &str,
    keys: &mut KnownKeys,
    certs: &[wattd_proto::v1::SignedKeyRotation],
) -> Result<Vec<LearntKey>, Rejection> {
    use wattd_proto::v1::KeyRotation;
    let node = || cert_node.to_owned();
    let mut decoded: Vec<(KeyRotation, &wattd_proto::v1::SignedKeyRotation)> = Vec::new();
    for c in certs.iter().take(4096) {
        let r =
            KeyRotation::decode(c.rotation_bytes.as_slice()).map_err(|e| Rejection::Malformed {
                node: node(),
                detail: format!("loss statement: KeyRotation: {e}"),
            })?;
        decoded.push((r, c));
    }
    decoded.sort_by_key(|(r, _)| r.new_key_epoch);
    let mut learnt = Vec::new();
    for (r, c) in decoded {
        let what = format!("loss statement: rotation to key epoch {}", r.new_key_epoch);
        let Some(old) = keys.by_key_id(&c.key_id) else {
            return Err(Rejection::UnknownKey {
                node: node(),
                what,
                detail: format!(
                    "signed by key id {}, which this ledger does not know",
                    hex(&c.key_id)
                ),
            });
        };
        let authentic = old.signed(&c.rotation_bytes, &c.signature);
        if !authentic {
            return Err(Rejection::BadSignature { node: node(), what });
        }
        let public: [u8; 32] =
            r.new_public_key
                .as_slice()
                .try_into()
                .map_err(|_| Rejection::Malformed {
                    node: node(),
                    detail: format!("{what}: the public key is not 32 bytes"),
                })?;
        let key_id = key_id_of(&public);
        if Some(r.new_key_epoch) != old.identity.key_epoch.checked_add(1)
            || r.new_key_id.as_slice() != key_id.as_slice()
            || r.effective_seq < 2
        {
            return Err(Rejection::Malformed {
                node: node(),
                detail: format!(
                    "{what}: not the next epoch of its signing key ({}), a key id that is not its \
                     key's, or an effective seq below 2",
                    old.identity.key_epoch
                ),
            });
        }
        let k = LearntKey {
            epoch: r.new_key_epoch,
            public_key: public,
            key_id,
            effective_seq: r.effective_seq,
            announced_seq: r.effective_seq - 1,
        };
        keys.learn(&k).map_err(|detail| Rejection::Malformed {
            node: node(),
            detail: format!("{what}: {detail}"),
        })?;
        learnt.push(k);
    }
    Ok(learnt)
}

/// Verifies a loss statement: decodable, this certificate's node, signed by one of its known
/// keys (the epoch the statement names), a sane range, and a next key the ledger knows (the
/// batch after the range must be verifiable; a range that hides a key rotation the ledger never
/// saw is refused until that key is enrolled).
pub fn verify_loss(
    cert_node: &str,
    keys: &KnownKeys,
    signed: &wattd_proto::v1::SignedLossStatement,
) -> Result<VerifiedLoss, Rejection> {
    use wattd_proto::v1::LossStatement;
    let node = || cert_node.to_owned();
    let malformed = |detail: String| Rejection::Malformed {
        node: node(),
        detail: format!("loss statement: {detail}"),
    };
    let st = LossStatement::decode(signed.statement_bytes.as_slice())
        .map_err(|e| malformed(format!("LossStatement: {e}")))?;
    if st.node_id != cert_node {
        return Err(Rejection::NodeMismatch {
            cert_node: node(),
            claimed: st.node_id,
            what: "loss statement".into(),
        });
    }
    // Keys the statement's own rotations announce (verified from a key the ledger knows) may
    // sign it and the batch after the range; they are kept only if the statement is recorded.
    let mut keys = keys.clone();
    let rotations = learn_rotations(cert_node, &mut keys, &st.rotations)?;
    let keys = &keys;
    let what = format!("loss statement (seqs {} to {})", st.first_seq, st.last_seq);
    if keys.is_revoked(st.key_epoch) || keys.is_revoked(st.next_key_epoch) {
        return Err(Rejection::Revoked {
            node: node(),
            detail: format!(
                "{what} signed by key epoch {} naming key epoch {} next: the enrolment revokes \
                 one of them",
                st.key_epoch, st.next_key_epoch
            ),
        });
    }
    let Some(key) = keys.by_key_id(&signed.key_id) else {
        return Err(Rejection::UnknownKey {
            node: node(),
            what,
            detail: format!(
                "key id {} is neither enrolled nor announced by a rotation in the node's stored \
                 chain",
                hex(&signed.key_id)
            ),
        });
    };
    if key.identity.key_epoch != st.key_epoch {
        return Err(Rejection::UnknownKey {
            node: node(),
            what,
            detail: format!(
                "key id {} is the key of epoch {}, the statement claims epoch {}",
                hex(&signed.key_id),
                key.identity.key_epoch,
                st.key_epoch
            ),
        });
    }
    let authentic = key.signed(&signed.statement_bytes, &signed.signature);
    if !authentic {
        return Err(Rejection::BadSignature { node: node(), what });
    }
    if st.first_seq == 0 || st.last_seq < st.first_seq || i64::try_from(st.last_seq).is_err() {
        return Err(malformed(format!(
            "range {} to {} is empty or outside 1..=2^63-2",
            st.first_seq, st.last_seq
        )));
    }
    if st.last_seq == i64::MAX as u64 {
        return Err(malformed("last_seq leaves no room for a next batch".into()));
    }
    let last_hash: ChainHash = st
        .last_hash
        .as_slice()
        .try_into()
        .map_err(|_| malformed(format!("last_hash is {} bytes, not 32", st.last_hash.len())))?;
    let next_key_id: KeyId = st.next_key_id.as_slice().try_into().map_err(|_| {
        malformed(format!(
            "next_key_id is {} bytes, not 16",
            st.next_key_id.len()
        ))
    })?;
    match keys.by_key_id(&next_key_id) {
        Some(k) if k.identity.key_epoch == st.next_key_epoch => {}
        _ => {
            return Err(Rejection::UnknownKey {
                node: node(),
                what,
                detail: format!(
                    "the batch after the range is signed by key epoch {} ({}), which this \
                     ledger does not know: the range hides its rotation; enrol that key (wattd \
                     identity on the node prints it)",
                    st.next_key_epoch,
                    hex(&next_key_id)
                ),
            })
        }
    }
    let reason = match wattd_proto::v1::LossReason::try_from(st.reason) {
        Ok(
            r @ (wattd_proto::v1::LossReason::Damaged | wattd_proto::v1::LossReason::NotRetained),
        ) => wattd_records::loss::reason_name(r as i32),
        _ => {
            return Err(malformed(format!(
                "reason {} is not a known loss reason",
                st.reason
            )))
        }
    };
    if st.detail.len() > wattd_records::loss::DETAIL_MAX_BYTES {
        return Err(malformed(format!(
            "detail is {} bytes, at most {}",
            st.detail.len(),
            wattd_records::loss::DETAIL_MAX_BYTES
        )));
    }
    Ok(VerifiedLoss {
        first_seq: st.first_seq,
        last_seq: st.last_seq,
        last_hash,
        next_key_epoch: st.next_key_epoch,
        next_key_id,
        reason,
        detail: st.detail,
        stated_unix_ns: st.stated_unix_ns,
        key_epoch: st.key_epoch,
        bytes: signed.encode_to_vec(),
        rotations,
    })
}
