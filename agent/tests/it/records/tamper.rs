//! Chain and signature: each kind of tampering with a stream of signed batches is detected and
//! names exactly the affected batch. Streams are built in memory and checked as export files.

use std::collections::BTreeSet;
use std::path::Path;

use prost::Message as _;
use wattd::batch::{StoredBatch, GENESIS_HASH};
use wattd::identity::NodeKey;
use wattd::sealer::{sign_batch, BatchContent};
use wattd::verify::{verify_export, BreakKind, VerifyReport};
use wattd_proto::v1::SignedBatch;

use crate::records::common::{interval, test_key, TestResult};

fn chain(key: &NodeKey, n: u64) -> Vec<StoredBatch> {
    let mut prev = GENESIS_HASH;
    (1..=n)
        .map(|seq| {
            let content = BatchContent {
                intervals: vec![interval(seq, 2)],
                ..BatchContent::default()
            };
            let b = sign_batch(key, seq, prev, 0, content);
            prev = b.hash;
            b
        })
        .collect()
}

fn export(batches: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for b in batches {
        let _ = prost::encode_length_delimiter(b.len(), &mut out);
        out.extend_from_slice(b);
    }
    out
}

fn check(batches: &[Vec<u8>]) -> Result<VerifyReport, Box<dyn std::error::Error>> {
    Ok(verify_export(
        Path::new("stream"),
        &export(batches),
        &[test_key().public()],
    )?)
}

fn bytes(c: &[StoredBatch]) -> Vec<Vec<u8>> {
    c.iter().map(|b| b.bytes.clone()).collect()
}

fn seqs(r: &VerifyReport) -> BTreeSet<u64> {
    r.named_seqs()
}

#[test]
fn intact_chain_verifies() -> TestResult {
    let r = check(&bytes(&chain(&test_key(), 5)))?;
    assert!(r.is_ok(), "{:?}", r.breaks);
    assert_eq!((r.batches, r.valid_batches, r.intervals), (5, 5, 5));
    Ok(())
}

#[test]
fn every_modified_byte_of_a_batch_is_detected() -> TestResult {
    let c = chain(&test_key(), 4);
    for i in 0..c[2].bytes.len() {
        let mut b = bytes(&c);
        b[2][i] ^= 0x01;
        let r = check(&b)?;
        assert_eq!(seqs(&r), BTreeSet::from([3]), "byte {i}: {:?}", r.breaks);
    }
    Ok(())
}

#[test]
fn missing_batch_is_named() -> TestResult {
    let mut b = bytes(&chain(&test_key(), 5));
    b.remove(2);
    let r = check(&b)?;
    assert_eq!(seqs(&r), BTreeSet::from([3]));
    assert!(matches!(
        r.breaks[0].kind,
        BreakKind::Missing { first: 3, last: 3 }
    ));
    Ok(())
}

#[test]
fn reordered_batches_are_named() -> TestResult {
    let mut b = bytes(&chain(&test_key(), 5));
    b.swap(2, 3);
    let r = check(&b)?;
    assert_eq!(seqs(&r), BTreeSet::from([3]));
    assert!(matches!(
        r.breaks[0].kind,
        BreakKind::OutOfOrder { after: 4 }
    ));
    Ok(())
}

#[test]
fn replayed_batch_is_named() -> TestResult {
    let mut b = bytes(&chain(&test_key(), 5));
    b.push(b[1].clone());
    let r = check(&b)?;
    assert_eq!(seqs(&r), BTreeSet::from([2]));
    assert!(matches!(r.breaks[0].kind, BreakKind::Replayed));
    Ok(())
}

#[test]
fn batch_signed_by_another_key_is_named() -> TestResult {
    let c = chain(&test_key(), 4);
    let intruder = NodeKey::from_seed(crate::records::common::NODE, 1, [9; 32]);
    let forged = sign_batch(&intruder, 3, c[1].hash, 0, BatchContent::default());
    let mut b = bytes(&c);
    b[2] = forged.bytes;
    let r = check(&b)?;
    assert_eq!(seqs(&r), BTreeSet::from([3]), "{:?}", r.breaks);
    Ok(())
}

#[test]
fn swapped_signature_is_named() -> TestResult {
    let c = chain(&test_key(), 4);
    let mut b = bytes(&c);
    let mut s = SignedBatch::decode(b[2].as_slice())?;
    s.signature = SignedBatch::decode(b[1].as_slice())?.signature;
    b[2] = s.encode_to_vec();
    let r = check(&b)?;
    assert_eq!(seqs(&r), BTreeSet::from([3]));
    assert!(matches!(
        r.breaks[0].kind,
        BreakKind::BadSignature { claimed_seq: 3 }
    ));
    Ok(())
}

#[test]
fn broken_link_is_named_even_when_signed() -> TestResult {
    let key = test_key();
    let mut c = chain(&key, 4);
    c[2] = sign_batch(&key, 3, [7; 32], 0, BatchContent::default());
    let r = check(&bytes(&c))?;
    // Batch 4 chains to the real batch 3's hash, which changed too: both links break.
    assert_eq!(seqs(&r), BTreeSet::from([3, 4]), "{:?}", r.breaks);
    assert!(r.breaks.iter().all(|b| b.kind == BreakKind::ChainBreak));
    Ok(())
}

#[test]
fn conservation_break_is_named_with_its_interval() -> TestResult {
    let key = test_key();
    let mut c = chain(&key, 3);
    let mut iv = interval(2, 2);
    iv.domains[0].measured_uj += 1;
    c[1] = sign_batch(
        &key,
        2,
        c[0].hash,
        0,
        BatchContent {
            intervals: vec![iv],
            ..Default::default()
        },
    );
    c[2] = sign_batch(&key, 3, c[1].hash, 0, BatchContent::default());
    let r = check(&bytes(&c))?;
    assert_eq!(seqs(&r), BTreeSet::from([2]));
    assert!(matches!(
        r.breaks[0].kind,
        BreakKind::Conservation {
            interval_index: 2,
            ..
        }
    ));
    assert!(
        r.breaks[0]
            .to_string()
            .contains("interval 2 domain package package 0"),
        "{}",
        r.breaks[0]
    );
    Ok(())
}

#[test]
fn garbage_and_truncated_exports_do_not_panic() -> TestResult {
    let good = export(&bytes(&chain(&test_key(), 3)));
    for cut in 0..good.len() {
        let r = verify_export(Path::new("x"), &good[..cut], &[test_key().public()])?;
        assert!(r.valid_batches <= 3);
    }
    for seed in 0u8..=255 {
        let junk: Vec<u8> = (0..300u32)
            .map(|i| (i as u8).wrapping_mul(seed).wrapping_add(seed))
            .collect();
        let _ = verify_export(Path::new("x"), &junk, &[test_key().public()])?;
    }
    Ok(())
}
