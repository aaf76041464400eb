//! Fault injection through the spool's filesystem seam: a failed fsync is fatal and poisons
//! the spool; ENOSPC and `max_bytes` are "full" and leave the spool usable; key rotation.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use wattd::sealer::{SealPolicy, Sealer};
use wattd::spool::{Spool, SpoolFs};
use wattd::verify::verify_spool;

use crate::records::common::{config, fill, interval, sealer, TestResult, NODE};

#[derive(Debug, Default)]
struct FaultFs {
    fail_sync: AtomicBool,
    enospc: AtomicBool,
}

impl SpoolFs for FaultFs {
    fn write_at(&self, file: &std::fs::File, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.enospc.load(Ordering::SeqCst) {
            // Like the kernel: part of the write may land before the space runs out.
            use std::os::unix::fs::FileExt as _;
            file.write_all_at(&buf[..buf.len() / 2], offset)?;
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        use std::os::unix::fs::FileExt as _;
        file.write_all_at(buf, offset)
    }

    fn sync_data(&self, file: &std::fs::File) -> io::Result<()> {
        if self.fail_sync.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        file.sync_data()
    }
}

#[test]
fn failed_fsync_is_fatal_and_poisons_the_spool() -> TestResult {
    let dir = tempfile::tempdir()?;
    let fs = Arc::new(FaultFs::default());
    let mut cfg = config(dir.path(), 1 << 20);
    cfg.fs = fs.clone();
    let mut s = sealer(cfg.clone(), 4)?;
    let mut index = 0;
    fill(&mut s, &mut index, 2, 1, 2)?;
    fs.fail_sync.store(true, Ordering::SeqCst);
    s.push_interval(interval(index, 2), 0)?;
    s.seal(0)?;
    let err = s
        .commit()
        .err()
        .ok_or("commit succeeded despite a failed fsync")?;
    assert!(err.is_fatal(), "{err}");
    assert!(err.to_string().contains("fsync failed"), "{err}");
    // Never retried: even with the disk healthy again, the spool refuses until reopened.
    fs.fail_sync.store(false, Ordering::SeqCst);
    let again = s.commit().err().ok_or("poisoned spool accepted a commit")?;
    assert!(again.is_fatal(), "{again}");
    assert_eq!(s.spool().sealed_seq(), 2);
    drop(s);
    // A restart rescans what is really on disk.
    let s = sealer(cfg, 4)?;
    assert!(s.spool().last_seq() >= 2);
    Ok(())
}

#[test]
fn enospc_and_max_bytes_are_full_and_recoverable() -> TestResult {
    let dir = tempfile::tempdir()?;
    let fs = Arc::new(FaultFs::default());
    let mut cfg = config(dir.path(), 1 << 20);
    cfg.fs = fs.clone();
    let mut s = sealer(cfg.clone(), 4)?;
    let mut index = 0;
    fill(&mut s, &mut index, 1, 1, 2)?;
    let (path, len_before) = s.spool().durable_tail();

    fs.enospc.store(true, Ordering::SeqCst);
    s.push_interval(interval(index, 2), 0)?;
    let err = s.seal(0).err().ok_or("append succeeded on ENOSPC")?;
    assert!(err.is_full() && !err.is_fatal(), "{err}");
    assert_eq!(
        std::fs::metadata(&path)?.len(),
        len_before,
        "partial write not taken back"
    );
    assert_eq!(
        s.pending().intervals.len(),
        1,
        "the interval must stay pending"
    );

    fs.enospc.store(false, Ordering::SeqCst);
    assert_eq!(s.seal(0)?, Some(2));
    s.commit()?;

    // max_bytes: a spool at its bound refuses with "full" until an ack frees a segment.
    drop(s);
    let mut small = config(dir.path(), 1 << 20);
    small.max_bytes = std::fs::metadata(&path)?.len() + 100;
    let mut s = sealer(small, 4)?;
    s.push_interval(interval(index + 1, 2), 0)?;
    let err = s.seal(0).err().ok_or("append beyond max_bytes")?;
    assert!(err.is_full(), "{err}");
    assert!(verify_spool(dir.path(), &[s.key().public()])?.is_ok());
    Ok(())
}

#[test]
fn ack_deletes_only_fully_acknowledged_segments_and_survives_reopen() -> TestResult {
    let dir = tempfile::tempdir()?;
    let cfg = config(dir.path(), 1500);
    let mut s = sealer(cfg.clone(), 4)?;
    let mut index = 0;
    fill(&mut s, &mut index, 12, 1, 2)?;
    let before = wattd::spool::list_segments(dir.path())?;
    assert!(before.len() >= 3);
    let second_first = before[1].0;
    // Acking all but the last batch of the first segment deletes nothing.
    s.spool_mut().ack(second_first - 2)?;
    assert_eq!(wattd::spool::list_segments(dir.path())?.len(), before.len());
    let deleted = s.spool_mut().ack(second_first - 1)?;
    assert_eq!(deleted, vec![before[0].1.clone()]);
    assert!(s.spool_mut().ack(1000).is_err(), "acked beyond sealed");
    drop(s);
    let s = sealer(cfg, 4)?;
    assert_eq!(s.spool().acked_seq(), second_first - 1);
    assert_eq!(s.spool().last_seq(), 12);
    let report = verify_spool(dir.path(), &[s.key().public()])?;
    assert!(report.is_ok(), "{:?}", report.breaks);
    assert_eq!(report.first_seq, Some(second_first));
    Ok(())
}

#[test]
fn group_commit_and_seal_policy() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (spool, _) = Spool::open(config(dir.path(), 1 << 20))?;
    let policy = SealPolicy::new(3, Duration::from_secs(5))?;
    let mut s = Sealer::with_parts(
        dir.path().into(),
        crate::records::common::test_key(),
        spool,
        policy,
    );
    assert!(SealPolicy::new(0, Duration::from_secs(5)).is_err());
    assert!(SealPolicy::new(3, Duration::from_secs(7200)).is_err());
    s.push_interval(interval(0, 1), 1_000_000_000)?;
    assert!(!s.seal_due(2_000_000_000));
    assert!(s.seal_due(6_000_000_000), "max age reached");
    s.push_interval(interval(1, 1), 2_000_000_000)?;
    s.push_interval(interval(2, 1), 2_000_000_000)?;
    assert!(s.seal_due(2_000_000_000), "max intervals reached");
    assert!(
        s.push_interval(interval(3, 1), 0).is_err(),
        "pending batch is bounded"
    );
    // Three batches, one fdatasync.
    s.seal(0)?;
    s.push_interval(interval(3, 1), 0)?;
    s.seal(0)?;
    s.push_gap(wattd_proto::v1::Gap::default(), 0);
    s.seal(0)?;
    assert_eq!(s.spool().sealed_seq(), 0);
    assert_eq!(s.commit()?, 3);
    assert_eq!(s.seal(0)?, None, "nothing pending, nothing sealed");
    Ok(())
}

/// `[spool] seal_every_ms`: a batch per `every` of intervals, whatever the sampling rate; a
/// policy changed by a reload applies once the content gathered under the old one is sealed.
#[test]
fn seal_by_time_and_a_reloaded_policy() -> TestResult {
    let ms = Duration::from_millis;
    let p = SealPolicy::by_time(ms(1000), ms(1000))?;
    assert_eq!(
        p.max_intervals(),
        1,
        "1 Hz, the default: every interval its own batch"
    );
    assert_eq!(SealPolicy::by_time(ms(10), ms(1000))?.max_intervals(), 100);
    assert_eq!(SealPolicy::by_time(ms(300), ms(1000))?.max_intervals(), 3);
    assert_eq!(
        SealPolicy::by_time(ms(5000), ms(1000))?.max_intervals(),
        1,
        "an interval longer than the seal period is still a batch of its own"
    );
    assert_eq!(
        SealPolicy::by_time(ms(10), ms(60_000))?.max_intervals(),
        SealPolicy::MAX_INTERVALS_LIMIT,
        "bounded"
    );

    let dir = tempfile::tempdir()?;
    let (spool, _) = Spool::open(config(dir.path(), 1 << 20))?;
    let mut s = Sealer::with_parts(
        dir.path().into(),
        crate::records::common::test_key(),
        spool,
        SealPolicy::by_time(ms(100), ms(1000))?,
    );
    let t0 = 1_000_000_000u64;
    for i in 0..9u64 {
        s.push_interval(interval(i, 1), t0 + i * 100_000_000)?;
        assert!(!s.seal_due(t0 + i * 100_000_000), "{} intervals", i + 1);
    }
    // Late ticks: the batch is sealed once its first interval is a second old, short of 10.
    assert!(s.seal_due(t0 + 1_000_000_000), "max age");
    // A reload to 1 Hz while nine intervals are pending: they are not "full" under the new
    // bound (which would coarsen the next one), and the new policy applies after the seal.
    s.set_policy(SealPolicy::by_time(ms(1000), ms(1000))?);
    assert_eq!(s.policy().max_intervals(), 1);
    assert!(
        !s.push_or_coarsen(interval(9, 1), t0 + 950_000_000),
        "not coarsened"
    );
    assert_eq!(s.pending().intervals.len(), 10);
    assert_eq!(s.seal(0)?, Some(1));
    s.push_interval(interval(10, 1), t0 + 2_000_000_000)?;
    assert!(
        s.seal_due(t0 + 2_000_000_000),
        "the new policy: one interval a batch"
    );
    assert_eq!(s.seal(0)?, Some(2));
    assert_eq!(s.commit()?, 2);
    Ok(())
}

/// Sealing by time at a high rate with many runs: the intervals of one period are sealed in
/// batches of bounded size (a minute of them at 100 Hz would outgrow a record), every one of
/// them, in order, and the spool verifies.
#[test]
fn many_intervals_of_one_period_are_sealed_in_bounded_batches() -> TestResult {
    use prost::Message as _;
    let dir = tempfile::tempdir()?;
    let (spool, _) = Spool::open(config(dir.path(), 256 << 10))?;
    let ms = Duration::from_millis;
    let mut s = Sealer::with_parts(
        dir.path().into(),
        crate::records::common::test_key(),
        spool,
        SealPolicy::by_time(ms(10), ms(60_000))?,
    );
    let one = interval(0, 300).encoded_len();
    let n = 3 * (128 << 10) / one + 1;
    for i in 0..n as u64 {
        s.push_interval(interval(i, 300), i)?;
    }
    assert!(!s.seal_due(0));
    let last = s.seal(0)?.ok_or("sealed")?;
    s.commit()?;
    assert!(last >= 3, "{n} intervals of {one} bytes in {last} batches");
    let mut indices = Vec::new();
    for b in s.spool().read_sealed(1, usize::MAX)? {
        // Half a segment (128 KiB), plus one interval: a chunk takes items while they fit.
        assert!(
            b.bytes.len() <= (128 << 10) + one + 1024,
            "{}",
            b.bytes.len()
        );
        let signed = wattd_proto::v1::SignedBatch::decode(b.bytes.as_slice())?;
        let batch = wattd_proto::v1::Batch::decode(signed.batch_bytes.as_slice())?;
        indices.extend(batch.intervals.iter().map(|i| i.index));
    }
    assert_eq!(indices, (0..n as u64).collect::<Vec<_>>());
    let report = verify_spool(dir.path(), &[s.key().public()])?;
    assert!(report.is_ok(), "{report:?}");
    Ok(())
}

/// A sealer of `max_intervals` over a spool in `dir` with six batches in it and room for no
/// more (`max_bytes` just above them); returns it and the next interval index.
fn full_spool(
    dir: &std::path::Path,
    max_intervals: usize,
) -> Result<(Sealer, u64), Box<dyn std::error::Error>> {
    let mut s = sealer(config(dir, 700), 1)?;
    let mut index = 0;
    fill(&mut s, &mut index, 6, 1, 3)?;
    let used = s.spool().used_bytes();
    drop(s);
    let mut cfg = config(dir, 700);
    cfg.max_bytes = used + 10;
    Ok((sealer(cfg, max_intervals)?, index))
}

/// Every microjoule an interval measured.
fn energy(i: &wattd_proto::v1::Interval) -> u64 {
    i.domains.iter().map(|d| d.measured_uj).sum()
}

/// The spool refuses a batch of several intervals (full): they are merged into one coarse
/// interval at once, with every microjoule and one SPOOL_FULL gap, so what waits for space (and
/// what a stop must fit into the reserve's room) is no larger than a batch of one interval's.
#[test]
fn a_refused_batch_of_several_intervals_is_coarsened_at_once() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (mut s, index) = full_spool(dir.path(), 5)?;
    let mut expected = 0u64;
    for k in 0..4 {
        let iv = interval(index + k, 3);
        expected += energy(&iv);
        assert!(!s.push_or_coarsen(iv, k), "room for 5");
    }
    let err = s.seal(0).err().ok_or("the spool should be full")?;
    assert!(err.is_full(), "{err}");
    assert_eq!(s.pending().intervals.len(), 1, "merged at the refusal");
    assert_eq!(
        s.take_merged_at_refusal(),
        3,
        "reported for the coarsening count"
    );
    assert_eq!(s.take_merged_at_refusal(), 0);
    // Later intervals merge too, though the batch holds fewer than 5.
    let iv = interval(index + 4, 3);
    expected += energy(&iv);
    assert!(s.push_or_coarsen(iv, 4));
    let pending = &s.pending().intervals;
    assert_eq!(pending.len(), 1);
    assert!(pending[0].coarsened);
    assert_eq!(energy(&pending[0]), expected);
    let full = wattd_proto::v1::GapCause::SpoolFull as i32;
    assert_eq!(
        s.pending().gaps.iter().filter(|g| g.cause == full).count(),
        1
    );
    // Space returns: sealed, and intervals are batched again.
    let last = s.spool().last_seq();
    s.spool_mut().ack(last)?;
    assert!(s.seal(0)?.is_some());
    assert!(
        !s.push_or_coarsen(interval(index + 5, 3), 5),
        "not coarsened"
    );
    assert!(
        !s.push_or_coarsen(interval(index + 6, 3), 6),
        "not coarsened"
    );
    s.seal(0)?;
    s.commit()?;
    let report = verify_spool(dir.path(), &[s.key().public()])?;
    assert!(report.is_ok(), "{report:?}");
    Ok(())
}

#[test]
fn key_rotation_is_announced_with_the_old_key_and_verifies() -> TestResult {
    let dir = tempfile::tempdir()?;
    let policy = SealPolicy::new(4, Duration::from_secs(5))?;
    let (mut s, _) = Sealer::open(config(dir.path(), 1 << 20), policy)?;
    let first = s.key().public();
    let mut index = 0;
    fill(&mut s, &mut index, 2, 1, 1)?;
    // Intervals pending (sealing by time) are sealed before the announcement, which is a
    // batch of its own.
    s.push_interval(interval(index, 1), 0)?;
    index += 1;
    let seq = s.rotate_key(0)?;
    assert_eq!(seq, 4);
    assert!(s.pending().is_empty());
    assert_eq!(s.key().epoch(), 2);
    fill(&mut s, &mut index, 2, 1, 1)?;
    // Only the epoch-1 key is trusted: the rotation in batch 4 introduces epoch 2.
    let report = verify_spool(dir.path(), std::slice::from_ref(&first))?;
    assert!(report.is_ok(), "{:?}", report.breaks);
    assert_eq!(report.valid_batches, 6);
    // The data dir knows both keys; a restart signs with epoch 2.
    let keys = wattd::identity::known_public_keys(dir.path())?;
    assert_eq!(keys.len(), 2);
    drop(s);
    let (s, _) = Sealer::open(config(dir.path(), 1 << 20), policy)?;
    assert_eq!(s.key().epoch(), 2);
    assert_eq!(s.key().node_id(), NODE);
    Ok(())
}

/// At `spool.max_bytes` energy is still not lost: intervals merge into one pending, coarsened
/// interval until space returns, then it is sealed with every microjoule of its parts.
#[test]
fn full_spool_coarsens_intervals_without_losing_energy() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (mut s, index) = full_spool(dir.path(), 1)?;
    let mut expected = 0u64;
    let mut coarsened = 0;
    for k in 0..5 {
        let iv = interval(index + k, 3);
        expected += energy(&iv);
        if s.push_or_coarsen(iv, k) {
            coarsened += 1;
        }
        let err = s.seal(0).err().ok_or("the spool should be full")?;
        assert!(err.is_full(), "{err}");
    }
    assert_eq!(coarsened, 4);
    assert_eq!(s.pending().intervals.len(), 1);
    let pending = &s.pending().intervals[0];
    assert!(pending.coarsened);
    assert_eq!(energy(pending), expected);
    // One SPOOL_FULL gap spans the coarsened stretch.
    let full = wattd_proto::v1::GapCause::SpoolFull as i32;
    let gaps: Vec<_> = s
        .pending()
        .gaps
        .iter()
        .filter(|g| g.cause == full)
        .collect();
    assert_eq!(gaps.len(), 1, "{:?}", s.pending().gaps);
    assert_eq!(
        (gaps[0].start_monotonic_ns, gaps[0].end_monotonic_ns),
        (pending.start_monotonic_ns, pending.end_monotonic_ns)
    );
    // Space returns (the ledger acknowledged everything): the coarse interval is sealed and the
    // whole spool verifies, conservation included.
    let last = s.spool().last_seq();
    s.spool_mut().ack(last)?;
    assert!(s.seal(0)?.is_some());
    s.commit()?;
    let report = verify_spool(dir.path(), &[s.key().public()])?;
    assert!(report.is_ok(), "{report:?}");
    Ok(())
}

/// A long stretch of a full spool on a host whose runs come and go: the coarsened interval
/// grows with every new run id, so it stops at `COARSE_INTERVAL_MAX_BYTES` and the next one
/// starts; when space returns the content is sealed in several batches, none near the record
/// limit, with every microjoule; and a stop may overrun `max_bytes` by the reserve's size.
#[test]
fn coarsened_content_stays_within_record_bounds_and_a_stop_seals_it() -> TestResult {
    use prost::Message as _;
    let dir = tempfile::tempdir()?;
    let mut s = sealer(config(dir.path(), 1 << 20), 1)?;
    let mut index = 0;
    fill(&mut s, &mut index, 2, 1, 3)?;
    let used = s.spool().used_bytes();
    drop(s);
    let mut cfg = config(dir.path(), 1 << 20);
    cfg.max_bytes = used + 4096;
    let mut s = sealer(cfg, 1)?;
    let energy =
        |i: &wattd_proto::v1::Interval| -> u64 { i.domains.iter().map(|d| d.measured_uj).sum() };
    let mut expected = 0u64;
    for k in 0..120u64 {
        let mut iv = interval(index + k, 2000);
        for a in &mut iv.domains[0].allocations {
            a.run_id = format!("r{k}-{}", a.run_id);
        }
        expected += energy(&iv);
        s.push_or_coarsen(iv, k);
        assert!(s.seal(0).is_err(), "the spool is full");
    }
    let pending = &s.pending().intervals;
    assert!(pending.len() >= 3, "{} coarse intervals", pending.len());
    for iv in pending {
        assert!(
            iv.encoded_len() < Sealer::COARSE_INTERVAL_MAX_BYTES + (200 << 10),
            "{}",
            iv.encoded_len()
        );
    }
    assert_eq!(pending.iter().map(energy).sum::<u64>(), expected);
    // The stop: max_bytes may be overrun by the reserve's size, not more.
    s.spool_mut().allow_final_overrun();
    assert!(s.seal(0).is_err(), "5 MiB do not fit a 64 KiB overrun");
    // Space returns: sealed in several bounded batches.
    let last = s.spool().last_seq();
    s.spool_mut().ack(last)?;
    let mut cfg2 = config(dir.path(), 1 << 20);
    cfg2.max_bytes = 1 << 30;
    let before = s.spool().last_seq();
    let pending = s.pending().clone();
    drop(s);
    let mut s = sealer(cfg2, 1)?;
    for iv in pending.intervals {
        s.push_or_coarsen(iv, 0);
    }
    // (push_or_coarsen of already-coarse intervals beyond max_intervals merges them again
    // only up to the bound.)
    let sealed_to = s.seal(0)?.ok_or("sealed")?;
    s.commit()?;
    assert!(
        sealed_to >= before + 2,
        "several batches: {before} -> {sealed_to}"
    );
    let batches = s.spool().read_sealed(before + 1, usize::MAX)?;
    let mut got = 0u64;
    for b in &batches {
        assert!(
            b.bytes.len() < (6 << 20),
            "batch {} is {} bytes",
            b.seq,
            b.bytes.len()
        );
        let signed = wattd_proto::v1::SignedBatch::decode(b.bytes.as_slice())?;
        let batch = wattd_proto::v1::Batch::decode(signed.batch_bytes.as_slice())?;
        got += batch.intervals.iter().map(energy).sum::<u64>();
    }
    assert_eq!(got, expected);
    let report = verify_spool(dir.path(), &[s.key().public()])?;
    assert!(report.is_ok(), "{report:?}");
    Ok(())
}
