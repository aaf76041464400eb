//! Loss statements: a node's signed declaration that a range of its batches will never be sent
//! (damaged in its spool, or no longer retained when a restored ledger asks for them). Pure: the
//! shipper builds and signs one; the ledger verifies it (`wattd-ledger`'s `check`) and keeps
//! it as the evidence of a lost range, whose energy the running totals of the batches on either
//! side give exactly (`crate::totals::lost_between`).

use prost::Message as _;
use wattd_proto::v1::{LossReason, LossStatement, SignedLossStatement};

use crate::batch::ChainHash;
use crate::identity::NodeKey;

/// The most text a statement's `detail` carries.
pub const DETAIL_MAX_BYTES: usize = 1024;

/// What a node declares lost.
#[derive(Clone, Debug, PartialEq)]
pub struct Loss {
    pub first_seq: u64,
    pub last_seq: u64,
    /// The hash of batch `last_seq`: the next intact batch's prev_hash.
    pub last_hash: ChainHash,
    pub reason: LossReason,
    /// The key of batch `last_seq + 1`.
    pub next_key_epoch: u32,
    pub next_key_id: Vec<u8>,
    pub detail: String,
    /// The node's rotations announced at or after `first_seq`, each signed by the key it
    /// retired (`crate::identity::rotation_certs`).
    pub rotations: Vec<wattd_proto::v1::SignedKeyRotation>,
}

fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// Encodes and signs a statement with the node's current key.
pub fn sign_loss(key: &NodeKey, loss: &Loss, now_unix_ns: i64) -> SignedLossStatement {
    let st = LossStatement {
        node_id: key.node_id().to_owned(),
        first_seq: loss.first_seq,
        last_seq: loss.last_seq,
        last_hash: loss.last_hash.to_vec(),
        reason: loss.reason as i32,
        next_key_epoch: loss.next_key_epoch,
        next_key_id: loss.next_key_id.clone(),
        stated_unix_ns: now_unix_ns,
        detail: cut(&loss.detail, DETAIL_MAX_BYTES),
        key_epoch: key.epoch(),
        rotations: loss.rotations.clone(),
    };
    let bytes = st.encode_to_vec();
    SignedLossStatement {
        signature: key.sign(&bytes).to_vec(),
        key_id: key.key_id().to_vec(),
        statement_bytes: bytes,
    }
}

/// The reason as `wattd-ledger nodes` and the metrics name it.
pub fn reason_name(r: i32) -> &'static str {
    match LossReason::try_from(r) {
        Ok(LossReason::Damaged) => "damaged",
        Ok(LossReason::NotRetained) => "not_retained",
        _ => "unspecified",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_statement_is_signed_over_its_exact_bytes_and_its_detail_is_bounded() {
        let key = NodeKey::from_seed("n1", 2, [5; 32]);
        let loss = Loss {
            first_seq: 7,
            last_seq: 9,
            last_hash: [3; 32],
            reason: LossReason::Damaged,
            next_key_epoch: 2,
            next_key_id: key.key_id().to_vec(),
            detail: "é".repeat(2000),
            rotations: Vec::new(),
        };
        let s = sign_loss(&key, &loss, 11);
        let st = LossStatement::decode(s.statement_bytes.as_slice()).expect("decodes");
        assert_eq!((st.first_seq, st.last_seq, st.key_epoch), (7, 9, 2));
        assert!(st.detail.len() <= DETAIL_MAX_BYTES && st.detail.len() >= DETAIL_MAX_BYTES - 1);
        let sig = ed25519_dalek::Signature::from_slice(&s.signature).expect("64 bytes");
        use ed25519_dalek::Verifier as _;
        assert!(key.verifying_key().verify(&s.statement_bytes, &sig).is_ok());
        assert_eq!(reason_name(st.reason), "damaged");
        assert_eq!(reason_name(99), "unspecified");
    }
}
