//! Small spools and full file systems: the segment size follows the limit, a fully
//! acknowledged spool frees its space, acknowledging needs no new space, and the reserve takes
//! the batch that meets a full disk.

use std::path::{Path, PathBuf};
use std::process::Command;

use wattd::spool::{SpoolConfig, ACK_FILE, RESERVE_FILE};
use wattd::verify::verify_spool;

use crate::records::common::{interval, sealer, TestResult, NODE};

/// Bytes of every file in `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn segment_size_follows_the_limit() {
    assert_eq!(SpoolConfig::segment_bytes_for(1 << 20), 128 << 10);
    assert_eq!(SpoolConfig::segment_bytes_for(64 << 20), 8 << 20);
    assert_eq!(SpoolConfig::segment_bytes_for(1 << 30), 64 << 20);
    assert_eq!(SpoolConfig::segment_bytes_for(1 << 40), 64 << 20);
    // Never below the smallest segment, whatever the limit.
    assert_eq!(SpoolConfig::segment_bytes_for(1), 128 << 10);
    assert_eq!(SpoolConfig::MIN_MAX_BYTES, 1 << 20);
}

/// The smallest accepted limit, many times over: with acknowledgements flowing the spool never
/// fills (before, with 64 MiB segments under a 1 MiB limit, it filled after ~3,000 batches and
/// every interval after that was coarsened).
#[test]
fn the_smallest_spool_turns_over_many_times_without_filling() -> TestResult {
    let dir = tempfile::tempdir()?;
    let cfg = SpoolConfig::new(dir.path(), NODE).with_max_bytes(SpoolConfig::MIN_MAX_BYTES);
    let mut s = sealer(cfg, 1)?;
    let mut peak = 0u64;
    for index in 0..6_000u64 {
        s.push_interval(interval(index, 8), index)?;
        s.seal(0)?;
        let seq = s.commit()?;
        s.spool_mut().ack(seq)?;
        peak = peak.max(dir_bytes(dir.path()));
    }
    let used = s.spool().used_bytes();
    eprintln!(
        "6000 batches through a 1 MiB spool: peak {peak} bytes on disk, {used} in segments now"
    );
    // Segments (and the reserve, the key and the cursor) stay within the limit.
    assert!(
        peak <= SpoolConfig::MIN_MAX_BYTES + (64 << 10) + 4096,
        "peak {peak}"
    );
    // The records written are several times the limit: it turned over.
    assert_eq!(s.spool().acked_seq(), 6_000);
    let report = verify_spool(dir.path(), &[s.key().public()])?;
    assert!(report.breaks.is_empty(), "{:?}", report.breaks);
    Ok(())
}

/// The cursor is rewritten in place: the same inode, the same length, whatever the seq.
#[test]
fn the_cursor_is_rewritten_in_place() -> TestResult {
    use std::os::unix::fs::MetadataExt as _;
    let dir = tempfile::tempdir()?;
    let cfg = SpoolConfig::new(dir.path(), NODE).with_max_bytes(SpoolConfig::MIN_MAX_BYTES);
    let mut s = sealer(cfg.clone(), 1)?;
    let mut inode = None;
    for index in 0..50u64 {
        s.push_interval(interval(index, 1), index)?;
        s.seal(0)?;
        let seq = s.commit()?;
        s.spool_mut().ack(seq)?;
        let m = std::fs::metadata(dir.path().join(ACK_FILE))?;
        assert_eq!(m.len(), 30, "cursor length at seq {seq}");
        assert_eq!(
            *inode.get_or_insert(m.ino()),
            m.ino(),
            "a new file at seq {seq}"
        );
    }
    drop(s);
    // Read back on open.
    let (spool, report) = wattd::spool::Spool::open(cfg)?;
    assert_eq!(report.acked_seq, 50);
    assert_eq!(spool.acked_seq(), 50);
    assert!(report.reserve, "the reserve is in place");
    assert!(dir.path().join(RESERVE_FILE).exists());
    Ok(())
}

/// A tmpfs of `bytes` mounted on a fresh temp dir, unmounted on drop.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(test: &str, bytes: u64) -> Option<SmallFs> {
        if !wattd_testkit::is_root() {
            wattd_testkit::skip(test, "root (to mount a small tmpfs that really fills)");
            return None;
        }
        let dir = tempfile::tempdir().ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "wattd-test"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            wattd_testkit::skip(
                test,
                "mount(8) of a tmpfs (a private mount namespace may forbid it)",
            );
            return None;
        }
        Some(SmallFs { dir })
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("spool")
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// A real full file system (a 2 MiB tmpfs under a spool limit of 1 GiB): the batch that meets
/// ENOSPC goes into the reserve's room, later ones are "full" (coarsened by the daemon), and an
/// acknowledgement, which needs no new space, frees segments so appends work again.
#[test]
fn a_full_file_system_still_acknowledges_and_frees() -> TestResult {
    let Some(fs) = SmallFs::mount("a_full_file_system_still_acknowledges_and_frees", 2 << 20)
    else {
        return Ok(());
    };
    let mut cfg = SpoolConfig::new(fs.path(), NODE).with_max_bytes(1 << 30);
    // Small segments, so that acknowledged ones can be freed while the disk is full.
    cfg.max_segment_bytes = 128 << 10;
    let mut s = sealer(cfg, 1)?;
    assert!(
        fs.path().join(RESERVE_FILE).exists(),
        "reserve made at open"
    );
    let mut index = 0u64;
    let mut sealed = 0u64;
    let full = loop {
        s.push_interval(interval(index, 40), index)?;
        index += 1;
        match s.seal(0) {
            Ok(_) => sealed = s.commit()?,
            Err(e) if e.is_full() => break e,
            Err(e) => return Err(e.into()),
        }
        assert!(index < 100_000, "the 2 MiB file system never filled");
    };
    eprintln!("full after {sealed} batches: {full}");
    assert!(full.to_string().contains("out of space"), "{full}");
    assert!(
        !fs.path().join(RESERVE_FILE).exists(),
        "the reserve was released for the batch that met ENOSPC"
    );
    // The cursor is written in place: acknowledging works on the full disk, and frees.
    let deleted = s.spool_mut().ack(sealed)?;
    assert!(!deleted.is_empty(), "acknowledging freed no segment");
    // The pending content (kept on the failed seal) goes in now.
    s.seal(0)?;
    let after = s.commit()?;
    assert!(
        after > sealed,
        "appending after the ack: {after} <= {sealed}"
    );
    let report = verify_spool(&fs.path(), &[s.key().public()])?;
    assert!(report.breaks.is_empty(), "{:?}", report.breaks);
    Ok(())
}
