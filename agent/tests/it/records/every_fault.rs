//! Every write and every fdatasync of a scripted run, failed in turn: ENOSPC at the n-th write
//! (a record, a new segment's header, the ack cursor) and EIO at the n-th fdatasync (a commit,
//! the cursor, a segment), each followed by what the daemon does (keep the content pending on
//! "full", exit on "fatal") and a restart. After each: nothing that was durable is lost, the
//! spool verifies as one chain, and the running totals after the restart still count every
//! microjoule of every batch the spool holds. (The cold cache after a real EIO is
//! `eio.rs`'s test; here the file system is honest.)

use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use wattd::sealer::{SealPolicy, Sealer};
use wattd::spool::{SpoolConfig, SpoolFs};
use wattd::verify::verify_spool;

use crate::records::common::{config, interval, TestResult};

/// Fails the n-th `write_at` with ENOSPC (half of it landing first) and the n-th `sync_data`
/// with EIO; counts both.
#[derive(Debug, Default)]
struct NthFs {
    writes: AtomicU64,
    syncs: AtomicU64,
    fail_write: AtomicU64,
    fail_sync: AtomicU64,
}

impl SpoolFs for NthFs {
    fn write_at(&self, file: &std::fs::File, buf: &[u8], offset: u64) -> io::Result<()> {
        let n = self.writes.fetch_add(1, Ordering::SeqCst) + 1;
        if n == self.fail_write.load(Ordering::SeqCst) {
            file.write_all_at(&buf[..buf.len() / 2], offset)?;
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        file.write_all_at(buf, offset)
    }

    fn sync_data(&self, file: &std::fs::File) -> io::Result<()> {
        let n = self.syncs.fetch_add(1, Ordering::SeqCst) + 1;
        if n == self.fail_sync.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        file.sync_data()
    }
}

fn cfg(dir: &Path, fs: Arc<NthFs>) -> SpoolConfig {
    let mut c = config(dir, 2048);
    c.fs = fs;
    c
}

fn policy() -> SealPolicy {
    SealPolicy::new(1, Duration::from_secs(10)).unwrap_or_default()
}

fn energy(i: &wattd_proto::v1::Interval) -> u64 {
    i.domains.iter().map(|d| d.measured_uj).sum()
}

/// What one scripted run ended with.
struct Outcome {
    /// Highest seq whose commit returned Ok.
    durable: u64,
}

/// 40 ticks: one interval each, sealed and committed, every fourth tick acknowledged. Like the
/// daemon: "full" keeps the content pending (coarsened), "fatal" ends the run.
fn script(dir: &Path, fs: Arc<NthFs>) -> Result<Outcome, Box<dyn std::error::Error>> {
    let mut out = Outcome { durable: 0 };
    let mut s = match Sealer::open(cfg(dir, fs), policy()) {
        Ok((s, _)) => s,
        // The daemon exits when its spool cannot open.
        Err(e) if e.is_fatal() || e.is_full() => return Ok(out),
        Err(e) => return Err(e.into()),
    };
    for tick in 0..40u64 {
        s.push_or_coarsen(interval(tick, 2 + (tick % 3) as usize), tick);
        match s.seal(0) {
            Ok(_) => {}
            Err(e) if e.is_fatal() => return Ok(out),
            Err(e) if e.is_full() => {}
            Err(e) => return Err(e.into()),
        }
        match s.commit() {
            Ok(seq) => out.durable = seq,
            Err(e) if e.is_fatal() => return Ok(out),
            Err(e) => return Err(e.into()),
        }
        if tick % 4 == 3 {
            match s.spool_mut().ack(out.durable) {
                Ok(_) => {}
                Err(e) if e.is_fatal() => return Ok(out),
                Err(_) => {} // "full" or IO: the cursor stays; the next ack moves it
            }
        }
    }
    Ok(out)
}

/// After a run and a restart on an honest file system: every durable batch is there, the
/// spool verifies, and a new batch's running totals are the held batches' energy plus its own
/// (or start again, marked, when the spool no longer holds its last batch).
fn after(dir: &Path, out: &Outcome, what: &str) -> TestResult {
    let (mut s, _) = Sealer::open(cfg(dir, Arc::new(NthFs::default())), policy())?;
    let last = s.spool().last_seq();
    assert!(
        last >= out.durable,
        "{what}: durable seq {} lost (spool ends at {last})",
        out.durable
    );
    let report = verify_spool(dir, &[s.key().public()])?;
    assert!(report.is_ok(), "{what}: {:?}", report.breaks);
    let iv = interval(1000, 1);
    let own = energy(&iv);
    s.push_interval(iv, 0)?;
    let seq = s.seal(0)?.ok_or("sealed")?;
    s.commit()?;
    let t = s.totals();
    let (held, _) = wattd::spool::decoded_batches(dir)?;
    if t.since_seq() == 1 {
        // Every batch ever sealed is held here (acked ones are freed, so count from the
        // totals of the oldest held batch instead).
        let oldest = held.iter().min_by_key(|b| b.seq).ok_or("a batch")?;
        let base = wattd_records::totals::RunningTotals::of_batch(oldest)
            .ok_or("totals")?
            .total_uj()
            - oldest.intervals.iter().map(energy).sum::<u64>() as u128;
        let sum: u128 = held
            .iter()
            .filter(|b| b.seq >= oldest.seq && b.seq < seq)
            .flat_map(|b| b.intervals.iter())
            .map(|i| u128::from(energy(i)))
            .sum();
        assert_eq!(t.total_uj(), base + sum + u128::from(own), "{what}: totals");
    } else {
        assert_eq!(
            t.since_seq(),
            last + 1,
            "{what}: totals restart only at the next seq"
        );
        assert_eq!(t.total_uj(), u128::from(own), "{what}");
    }
    Ok(())
}

#[test]
fn enospc_at_every_write_and_eio_at_every_fsync_lose_nothing_durable() -> TestResult {
    // The reference run: how many writes and fdatasyncs it makes.
    let reference = Arc::new(NthFs::default());
    let dir = tempfile::tempdir()?;
    let out = script(dir.path(), reference.clone())?;
    after(dir.path(), &out, "no fault")?;
    let writes = reference.writes.load(Ordering::SeqCst);
    let syncs = reference.syncs.load(Ordering::SeqCst);
    assert!(
        writes >= 40 && syncs >= 40,
        "{writes} writes, {syncs} syncs"
    );
    for n in 1..=writes {
        let fs = Arc::new(NthFs::default());
        fs.fail_write.store(n, Ordering::SeqCst);
        let dir = tempfile::tempdir()?;
        let out = script(dir.path(), fs)?;
        after(dir.path(), &out, &format!("ENOSPC at write {n}"))?;
    }
    for n in 1..=syncs {
        let fs = Arc::new(NthFs::default());
        fs.fail_sync.store(n, Ordering::SeqCst);
        let dir = tempfile::tempdir()?;
        let out = script(dir.path(), fs)?;
        after(dir.path(), &out, &format!("EIO at fdatasync {n}"))?;
    }
    eprintln!("{writes} writes and {syncs} fdatasyncs each failed in turn");
    Ok(())
}
