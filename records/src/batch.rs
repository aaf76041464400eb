//! The stored form of a sealed batch: the exact `SignedBatch` bytes plus the few header fields
//! the spool needs (seq, chain hash) decoded without touching the bodies.

use prost::Message as _;
use sha2::{Digest as _, Sha256};
use wattd_proto::v1::{KeyRotation, SignedBatch};

/// SHA-256 of a signed batch's encoded bytes: what the next batch's `prev_hash` holds.
pub type ChainHash = [u8; 32];

/// `prev_hash` of a node's first batch (seq 1).
pub const GENESIS_HASH: ChainHash = [0u8; 32];

/// `Batch.format_version` this code writes.
pub const FORMAT_VERSION: u32 = 1;

pub fn chain_hash(signed_batch_bytes: &[u8]) -> ChainHash {
    Sha256::digest(signed_batch_bytes).into()
}

/// The header fields of `wattd.ledger.v1.Batch` (tags 1..=7 and 11). prost skips the other
/// fields, so decoding this from a batch costs a walk over its bytes and no allocation per
/// interval. `batch_header_matches_generated_batch` keeps the tags honest.
#[derive(Clone, PartialEq, prost::Message)]
pub struct BatchHeader {
    #[prost(string, tag = "1")]
    pub node_id: String,
    #[prost(bytes = "vec", tag = "2")]
    pub key_id: Vec<u8>,
    #[prost(uint32, tag = "3")]
    pub key_epoch: u32,
    #[prost(uint64, tag = "4")]
    pub seq: u64,
    #[prost(bytes = "vec", tag = "5")]
    pub prev_hash: Vec<u8>,
    #[prost(int64, tag = "6")]
    pub sealed_unix_ns: i64,
    #[prost(uint32, tag = "7")]
    pub format_version: u32,
    #[prost(message, optional, tag = "11")]
    pub key_rotation: Option<KeyRotation>,
}

/// A signed batch as the spool holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredBatch {
    pub seq: u64,
    pub prev_hash: ChainHash,
    /// SHA-256 of `bytes`.
    pub hash: ChainHash,
    /// The encoded `SignedBatch`, exactly as signed, stored and shipped.
    pub bytes: Vec<u8>,
}

/// Why a stored record's header cannot be decoded. It names the message and field; the caller
/// knows file and offset.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("SignedBatch: {0}")]
    SignedBatch(prost::DecodeError),
    #[error("Batch: {0}")]
    Batch(prost::DecodeError),
    #[error("Batch.prev_hash: {0} bytes, expected 32")]
    PrevHashLength(usize),
    #[error("Batch.seq: 0 (sequence numbers start at 1)")]
    SeqZero,
}

/// Decodes the parts of a stored record the spool needs.
pub fn decode_header(signed_batch_bytes: &[u8]) -> Result<(SignedBatch, BatchHeader), HeaderError> {
    let signed = SignedBatch::decode(signed_batch_bytes).map_err(HeaderError::SignedBatch)?;
    let header = BatchHeader::decode(signed.batch_bytes.as_slice()).map_err(HeaderError::Batch)?;
    if header.prev_hash.len() != 32 {
        return Err(HeaderError::PrevHashLength(header.prev_hash.len()));
    }
    if header.seq == 0 {
        return Err(HeaderError::SeqZero);
    }
    Ok((signed, header))
}

impl StoredBatch {
    pub fn from_bytes(bytes: Vec<u8>) -> Result<(Self, BatchHeader), HeaderError> {
        let (_, header) = decode_header(&bytes)?;
        let mut prev_hash = [0u8; 32];
        prev_hash.copy_from_slice(&header.prev_hash);
        Ok((
            Self {
                seq: header.seq,
                prev_hash,
                hash: chain_hash(&bytes),
                bytes,
            },
            header,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wattd_proto::v1::{Batch, Interval};

    #[test]
    fn batch_header_matches_generated_batch() -> Result<(), prost::DecodeError> {
        let batch = Batch {
            node_id: "n".into(),
            key_id: vec![1; 16],
            key_epoch: 3,
            seq: 42,
            prev_hash: vec![9; 32],
            sealed_unix_ns: -5,
            format_version: FORMAT_VERSION,
            intervals: vec![Interval {
                index: 7,
                ..Default::default()
            }],
            run_summaries: vec![],
            gaps: vec![],
            key_rotation: Some(KeyRotation {
                new_key_epoch: 4,
                ..Default::default()
            }),
            ..Default::default()
        };
        let h = BatchHeader::decode(batch.encode_to_vec().as_slice())?;
        let expected = BatchHeader {
            node_id: batch.node_id.clone(),
            key_id: batch.key_id.clone(),
            key_epoch: batch.key_epoch,
            seq: batch.seq,
            prev_hash: batch.prev_hash.clone(),
            sealed_unix_ns: batch.sealed_unix_ns,
            format_version: batch.format_version,
            key_rotation: batch.key_rotation.clone(),
        };
        assert_eq!(h, expected);
        Ok(())
    }

    /// A signed batch around `batch`, unsigned (the header does not look at the signature).
    fn wrapped(batch: &Batch) -> Vec<u8> {
        SignedBatch {
            batch_bytes: batch.encode_to_vec(),
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn a_header_that_cannot_be_used_says_which_field() {
        let good = Batch {
            seq: 1,
            prev_hash: vec![0; 32],
            ..Default::default()
        };
        assert!(decode_header(&wrapped(&good)).is_ok());
        let short = Batch {
            prev_hash: vec![0; 31],
            ..good.clone()
        };
        assert_eq!(
            decode_header(&wrapped(&short)).err(),
            Some(HeaderError::PrevHashLength(31))
        );
        let zero = Batch { seq: 0, ..good };
        let e = StoredBatch::from_bytes(wrapped(&zero)).err();
        assert_eq!(e, Some(HeaderError::SeqZero));
        assert_eq!(
            e.map(|e| e.to_string()).unwrap_or_default(),
            "Batch.seq: 0 (sequence numbers start at 1)"
        );
        // Not a SignedBatch at all (a truncated varint), and a SignedBatch whose batch is not one.
        assert!(matches!(
            decode_header(&[0x0a, 0xff]),
            Err(HeaderError::SignedBatch(_))
        ));
        let inner = SignedBatch {
            batch_bytes: vec![0x08, 0xff],
            ..Default::default()
        }
        .encode_to_vec();
        assert!(matches!(decode_header(&inner), Err(HeaderError::Batch(_))));
    }
}
