//! Bad input on disk: a flipped bit, a truncated record, a zero-filled tail, a segment from
//! another node, a missing key, a key with wrong permissions. Each gives a clear message naming
//! the file (and the offset where there is one); what is intact stays usable; nothing panics.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use wattd::identity::{IdentityError, NodeKey};
use wattd::sealer::{SealPolicy, Sealer};
use wattd::spool::{list_segments, Spool, SpoolError};
use wattd::verify::verify_spool;

use crate::records::common::{config, fill, sealer, TestResult};

fn spool_with(
    batches: usize,
) -> Result<(tempfile::TempDir, wattd::identity::PublicIdentity), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let mut s = sealer(config(dir.path(), 1 << 20), 4)?;
    let mut index = 0;
    fill(&mut s, &mut index, batches, 1, 2)?;
    Ok((dir, s.key().public()))
}

fn only_segment(dir: &std::path::Path) -> Result<std::path::PathBuf, Box<dyn std::error::Error>> {
    Ok(list_segments(dir)?.pop().ok_or("no segment")?.1)
}

#[test]
fn flipped_bit_mid_spool_is_reported_with_file_and_offset_and_the_rest_stays_usable() -> TestResult
{
    let (dir, key) = spool_with(4)?;
    let seg = only_segment(dir.path())?;
    let mut bytes = fs::read(&seg)?;
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    fs::write(&seg, &bytes)?;
    let report = verify_spool(dir.path(), std::slice::from_ref(&key))?;
    assert_eq!(report.named_seqs().len(), 1, "{:?}", report.breaks);
    let text: Vec<String> = report.breaks.iter().map(ToString::to_string).collect();
    assert!(
        text.iter()
            .any(|t| t.contains(&seg.display().to_string()) && t.contains("offset")),
        "{text:?}"
    );
    assert_eq!(report.valid_batches, 3);
    // The daemon still opens it: damage reported, not cut, sequence resumes after the last.
    let (spool, open) = Spool::open(config(dir.path(), 1 << 20))?;
    assert_eq!(open.damage.len(), 1);
    assert!(open.torn_tails.is_empty());
    assert_eq!(spool.last_seq(), 4);
    Ok(())
}

#[test]
fn truncated_record_is_cut_on_open_and_saved() -> TestResult {
    let (dir, key) = spool_with(3)?;
    let seg = only_segment(dir.path())?;
    let len = fs::metadata(&seg)?.len();
    let f = fs::OpenOptions::new().write(true).open(&seg)?;
    f.set_len(len - 20)?;
    drop(f);
    let report = verify_spool(dir.path(), std::slice::from_ref(&key))?;
    assert_eq!(report.named_seqs(), [3].into(), "{:?}", report.breaks);
    let (spool, open) = Spool::open(config(dir.path(), 1 << 20))?;
    assert_eq!(spool.last_seq(), 2);
    let torn = open.torn_tails.first().ok_or("no torn tail reported")?;
    assert_eq!(torn.file, seg);
    let saved = torn.saved_to.as_ref().ok_or("torn bytes not saved")?;
    assert_eq!(fs::metadata(saved)?.len(), torn.bytes);
    drop(spool);
    assert!(verify_spool(dir.path(), &[key])?.is_ok());
    Ok(())
}

#[test]
fn zero_filled_tail_is_named_then_cut() -> TestResult {
    let (dir, key) = spool_with(2)?;
    let seg = only_segment(dir.path())?;
    let mut bytes = fs::read(&seg)?;
    bytes.extend([0u8; 4096]);
    fs::write(&seg, &bytes)?;
    let report = verify_spool(dir.path(), std::slice::from_ref(&key))?;
    assert!(
        report
            .breaks
            .iter()
            .any(|b| b.to_string().contains("4096 zero bytes")),
        "{:?}",
        report.breaks
    );
    let (_, open) = Spool::open(config(dir.path(), 1 << 20))?;
    assert_eq!(open.torn_tails.len(), 1);
    assert_eq!(
        open.torn_tails[0].saved_to, None,
        "zeros are not worth keeping"
    );
    assert!(verify_spool(dir.path(), &[key])?.is_ok());
    Ok(())
}

#[test]
fn segment_from_another_node_is_refused_by_open_and_named_by_verify() -> TestResult {
    let (dir, key) = spool_with(2)?;
    let other = tempfile::tempdir()?;
    let mut cfg = config(other.path(), 1 << 20);
    cfg.node_id = "node-b".into();
    let (spool, _) = Spool::open(cfg)?;
    let policy = SealPolicy::new(4, Duration::from_secs(5))?;
    let mut s = Sealer::with_parts(
        other.path().into(),
        NodeKey::from_seed("node-b", 1, [1; 32]),
        spool,
        policy,
    );
    let mut index = 0;
    fill(&mut s, &mut index, 1, 1, 1)?;
    drop(s);
    let (_, foreign) = list_segments(other.path())?.pop().ok_or("no segment")?;
    let planted = dir.path().join(wattd::spool::segment_name(100));
    fs::copy(&foreign, &planted)?;
    let err = Spool::open(config(dir.path(), 1 << 20))
        .err()
        .ok_or("opened a foreign segment")?;
    assert!(matches!(err, SpoolError::ForeignSegment { .. }), "{err}");
    assert!(
        err.to_string().contains(&planted.display().to_string()),
        "{err}"
    );
    let report = verify_spool(dir.path(), &[key])?;
    assert!(
        report
            .breaks
            .iter()
            .any(|b| b.to_string().contains("node-b")),
        "{:?}",
        report.breaks
    );
    Ok(())
}

#[test]
fn missing_and_exposed_keys_are_refused_naming_the_file() -> TestResult {
    let dir = tempfile::tempdir()?;
    let err = NodeKey::load(dir.path())
        .err()
        .ok_or("loaded a missing key")?;
    assert!(matches!(err, IdentityError::Missing { .. }));
    assert!(err.to_string().contains("node.key"), "{err}");

    let policy = SealPolicy::new(4, Duration::from_secs(5))?;
    let (s, _) = Sealer::open(config(dir.path(), 1 << 20), policy)?;
    drop(s);
    let key = dir.path().join("node.key");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644))?;
    let err = Sealer::open(config(dir.path(), 1 << 20), policy)
        .err()
        .ok_or("opened with a 0644 key")?;
    assert!(
        err.to_string().contains(&key.display().to_string()),
        "{err}"
    );
    assert!(err.to_string().contains("0644"), "{err}");
    Ok(())
}
