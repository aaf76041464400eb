//! A real fdatasync EIO: ext4 (no journal) on a loop device whose backing file is sparse and
//! sits on a small tmpfs. When the tmpfs is full, the loop device's writes fail, writeback
//! fails, and fdatasync returns an error (EIO, or ENOSPC as the loop device passes the backing
//! file's error up). The kernel then marks the pages clean and keeps them
//! cached, and a fresh descriptor's fdatasync returns 0 (the error went to the process that
//! died of it). The spool's open must trust the device, not the cache: batches whose
//! fdatasync failed are never taken for sealed after a restart unless the device holds them
//! (checked against a fresh mount of the same device). A rig whose device loses what it
//! acknowledged while healthy (ext4 without a journal can lose its own metadata to the failed
//! writes) cannot judge the spool: the scenario runs again on a fresh one, a few times.

use std::path::{Path, PathBuf};
use std::process::Command;

use wattd::spool::{Spool, SpoolConfig};

use crate::records::common::{interval, sealer, TestResult, NODE};

/// tmpfs -> sparse backing file -> loop device -> ext4, torn down in reverse on drop.
struct LoopExt4 {
    top: tempfile::TempDir,
    dev: Option<String>,
    mounted: bool,
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

impl LoopExt4 {
    fn new(test: &str) -> Option<LoopExt4> {
        if !wattd_testkit::is_root() {
            wattd_testkit::skip(test, "root (to mount a tmpfs, a loop device and ext4)");
            return None;
        }
        for tool in ["losetup", "mkfs.ext4", "mount"] {
            if wattd_testkit::need::which(tool).is_none() {
                wattd_testkit::skip(test, format!("{tool} (util-linux, e2fsprogs)"));
                return None;
            }
        }
        let top = tempfile::tempdir().ok()?;
        let mut fs = LoopExt4 {
            top,
            dev: None,
            mounted: false,
        };
        match fs.set_up() {
            Ok(()) => Some(fs),
            Err(e) => {
                wattd_testkit::skip(test, format!("a loop-device ext4 ({e})"));
                None
            }
        }
    }

    fn set_up(&mut self) -> Result<(), String> {
        let top = self.top.path();
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=8m", "wattd-eio"])
            .arg(top))?;
        let backing = top.join("backing");
        run(Command::new("truncate").args(["-s", "64M"]).arg(&backing))?;
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-O", "^has_journal", "-E", "nodiscard"])
            .arg(&backing))?;
        let dev = run(Command::new("losetup").args(["-f", "--show"]).arg(&backing))?;
        self.dev = Some(dev.clone());
        std::fs::create_dir(self.mnt()).map_err(|e| e.to_string())?;
        self.mount(&dev)?;
        self.mounted = true;
        Ok(())
    }

    /// Unmounts and mounts again: every cached page is dropped, what is read next comes
    /// from the device.
    fn remount(&self) -> Result<(), String> {
        let dev = self.dev.as_deref().ok_or("no loop device")?;
        run(Command::new("umount").arg(self.mnt()))?;
        self.mount(dev)
    }

    /// Mounts the loop device's ext4 on `mnt`.
    fn mount(&self, dev: &str) -> Result<(), String> {
        run(Command::new("mount")
            .args(["-o", "errors=continue"])
            .arg(dev)
            .arg(self.mnt()))
        .map(drop)
    }

    /// What a read-only e2fsck of the unmounted device says, for the message of a rig that
    /// lost data (its findings; the file system is mounted again after).
    fn check(&self) -> String {
        let Some(dev) = self.dev.as_deref() else {
            return "no loop device".into();
        };
        let _ = Command::new("umount").arg(self.mnt()).status();
        let said = match Command::new("e2fsck").args(["-fn", dev]).output() {
            Ok(out) => String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|line| !line.starts_with("Pass "))
                .take(8)
                .collect::<Vec<_>>()
                .join(" | "),
            Err(e) => format!("e2fsck: {e}"),
        };
        let _ = self.mount(dev);
        said
    }

    fn mnt(&self) -> PathBuf {
        self.top.path().join("mnt")
    }

    fn ballast(&self) -> PathBuf {
        self.top.path().join("ballast")
    }

    /// Fills the tmpfs under the backing file, so the loop device's next writes fail.
    fn fill(&self) {
        use std::io::Write as _;
        let Ok(mut f) = std::fs::File::create(self.ballast()) else {
            return;
        };
        let block = vec![0xA5u8; 64 << 10];
        while f.write_all(&block).is_ok() {}
    }

    fn unfill(&self) {
        let _ = std::fs::remove_file(self.ballast());
    }
}

impl Drop for LoopExt4 {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(self.mnt()).status();
        }
        if let Some(dev) = &self.dev {
            let _ = Command::new("losetup").args(["-d", dev]).status();
        }
        let _ = Command::new("umount").arg(self.top.path()).status();
    }
}

fn spool_dir(fs: &LoopExt4) -> PathBuf {
    fs.mnt().join("spool")
}

fn cfg(dir: &Path) -> SpoolConfig {
    let mut c = SpoolConfig::new(dir, NODE).without_retention();
    c.max_segment_bytes = 4 << 20;
    c
}

/// What one run of the scenario on a fresh rig showed.
enum Attempt {
    /// The rig kept what it acknowledged while healthy, so the spool was judged (and passed).
    Judged,
    /// The rig lost batches fdatasync acknowledged before the backing store was filled: the
    /// file system on the device itself is damaged, and nothing can be said about the spool.
    RigLost(String),
}

/// Attempts on fresh rigs before a rig that never holds what it acknowledged is a failure.
const ATTEMPTS: usize = 4;

#[test]
fn after_an_fsync_eio_a_restart_trusts_the_device_not_the_page_cache() -> TestResult {
    let test = "after_an_fsync_eio_a_restart_trusts_the_device_not_the_page_cache";
    let mut lost = Vec::new();
    for _ in 0..ATTEMPTS {
        let Some(fs) = LoopExt4::new(test) else {
            return Ok(());
        };
        match attempt(&fs)? {
            Attempt::Judged => return Ok(()),
            Attempt::RigLost(why) => {
                eprintln!("rig lost acknowledged data, trying a fresh one: {why}");
                lost.push(why);
            }
        }
    }
    Err(format!(
        "in {ATTEMPTS} fresh loop-device rigs the device lost batches fdatasync acknowledged \
         before the fill, so the spool could never be judged: {lost:?}"
    )
    .into())
}

fn attempt(fs: &LoopExt4) -> Result<Attempt, Box<dyn std::error::Error>> {
    let dir = spool_dir(fs);
    let mut s = sealer(cfg(&dir), 1)?;
    let mut index = 0u64;
    // Durable batches first, while the backing store has room.
    let mut synced = 0;
    for _ in 0..20 {
        s.push_interval(interval(index, 20), index)?;
        index += 1;
        s.seal(0)?;
        synced = s.commit()?;
    }
    let healthy = synced;
    fs.fill();
    // Now writeback fails: seal until an fdatasync reports it.
    let mut appended = synced;
    let failure = loop {
        s.push_interval(interval(index, 20), index)?;
        index += 1;
        match s.seal(0) {
            Ok(Some(seq)) => appended = seq,
            Ok(None) => {}
            Err(e) => break e.to_string(),
        }
        match s.commit() {
            Ok(seq) => synced = seq,
            Err(e) => break e.to_string(),
        }
        if index > 5_000 {
            return Err("fdatasync never failed on the full backing store".into());
        }
    };
    eprintln!("fdatasync failed after seq {synced} (appended up to {appended}): {failure}");
    assert!(
        appended > synced,
        "a batch was appended and not made durable"
    );
    // The process dies; the cache keeps the pages that never reached the device.
    drop(s);
    fs.unfill();
    let (spool, report) = Spool::open(cfg(&dir))?;
    eprintln!(
        "reopened: last seq {}, torn tails {:?}, damage {:?}",
        spool.last_seq(),
        report.torn_tails,
        report.damage
    );
    // What the device holds is what a fresh mount reads: the page cache is gone with the
    // unmount. On this rig the device may hold more than the last successful fdatasync (the
    // fresh-clone CI showed it: a block the backing store already had takes the write while
    // another block fails), and less (here a successful fdatasync was followed by a torn
    // tail: the loop device reports a failed write late). The restart must never have seen
    // more than the device holds.
    let seen = spool.last_seq();
    drop(spool);
    fs.remount()?;
    // Read-only, no fdatasync: on this rig an fsync after the remount can still report the
    // earlier EIO (the fresh-clone CI saw it once), and the oracle must not depend on that.
    // And a block whose write failed can read back as EIO from the device itself (the
    // fresh-clone CI saw that too): the device holds nothing there. The oracle reads a copy in
    // which such blocks are zeros, so what it decodes is what the device can give back.
    let readable = tempfile::tempdir()?;
    let eio_blocks = copy_readable(&dir, readable.path())?;
    let (batches, unreadable) = wattd_records::segment::decoded_batches(readable.path())?;
    let mut seqs: Vec<u64> = batches.iter().map(|b| b.seq).collect();
    seqs.sort_unstable();
    let device_last = seqs.last().copied().unwrap_or(0);
    eprintln!(
        "after a remount the device holds up to seq {device_last} ({unreadable} unreadable \
         records, {eio_blocks} blocks that read as EIO; the restart saw {seen}, {synced} was \
         acknowledged by fdatasync)"
    );
    // The project's CI once read every block of the segment back as EIO after the remount,
    // the batches written and acknowledged while the store had room among them: ext4 without
    // a journal had lost its own metadata to the failed writes. Such a device cannot judge
    // the spool; a fresh rig can. Only that: the restart saw the healthy prefix (a spool that
    // cut into it on open is judged, and fails), and the device itself answered EIO.
    let kept = seqs.iter().filter(|&&seq| seq <= healthy).count();
    if kept < usize::try_from(healthy)? && seen >= healthy && eio_blocks > 0 {
        return Ok(Attempt::RigLost(format!(
            "seqs 1..={healthy} were acknowledged while the store had room, the device gives \
             back {kept} of them ({eio_blocks} blocks read as EIO); e2fsck: {}",
            fs.check()
        )));
    }
    assert!(
        seen <= device_last,
        "seq {seen} was taken for sealed but the device holds only up to {device_last}: the \
         restart read the page cache, not the device"
    );
    // What was durable is all there and intact: 1..=device_last, each once.
    assert_eq!(seqs, (1..=device_last).collect::<Vec<_>>());
    assert!(
        device_last >= healthy,
        "the batches acknowledged while the store had room (up to {healthy}) survived"
    );
    Ok(Attempt::Judged)
}

/// Copies every file of `from` to `to`, 4 KiB at a time, a block that reads as EIO written as
/// zeros (as `dd conv=noerror,sync` would); returns how many blocks did.
fn copy_readable(from: &Path, to: &Path) -> std::io::Result<u64> {
    use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
    let mut eio = 0;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        if !entry.file_type()?.is_file() {
            continue;
        }
        let mut src = std::fs::File::open(entry.path())?;
        let len = src.metadata()?.len();
        let mut dst = std::fs::File::create(to.join(entry.file_name()))?;
        let mut buf = vec![0u8; 4096];
        let mut at = 0u64;
        while at < len {
            let n = usize::try_from((len - at).min(4096)).unwrap_or(4096);
            src.seek(SeekFrom::Start(at))?;
            match src.read_exact(&mut buf[..n]) {
                Ok(()) => dst.write_all(&buf[..n])?,
                Err(e) if e.raw_os_error() == Some(libc::EIO) => {
                    eio += 1;
                    dst.write_all(&vec![0u8; n])?;
                }
                Err(e) => return Err(e),
            }
            at += n as u64;
        }
    }
    Ok(eio)
}
