//! What the daemon keeps resident of its own code.
//!
//! Start-up (configuration, probing, opening the spool, the TLS set-up) runs code that the ticks
//! never run again, and the kernel maps its executable's pages up to 64 KiB around every page
//! faulted (fault-around), so after start the daemon has most of its binary mapped: 6-6.5 MiB
//! of a 10 MB binary, where its ticks touch about half of that. Mapped executable pages are not
//! free: reclaim protects them (the kernel gives referenced executable file pages another turn
//! on the active list), and they count in the service's resident set. [`release_cold_code`]
//! drops this process's mappings of its own executable's read-only pages; what the ticks use
//! is faulted back in from the page cache at the next tick (a minor fault per 64 KiB), the rest
//! stays unmapped and is reclaimed first under pressure.
//!
//! Only the executable's own mappings: shared libraries (libc) are mapped by every process on
//! the host, and unmapping them from this one frees nothing. Only read-only mappings with no
//! anonymous page: the RELRO segment is read-only too but holds relocated (copied-on-write)
//! pages, which the file does not have; dropping them would lose the relocations.

use std::io;
use std::os::unix::fs::MetadataExt as _;

/// What [`release_cold_code`] dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Released {
    /// Mappings dropped.
    pub mappings: usize,
    /// Their resident bytes before they were dropped.
    pub bytes: u64,
}

/// Drops this process's resident pages of its own executable's read-only, file-backed
/// mappings (the pages come back from the page cache when next touched). Fails only where
/// `/proc/self` cannot be read or `madvise` refuses; the process is unharmed either way.
pub fn release_cold_code() -> io::Result<Released> {
    let exe = std::fs::metadata("/proc/self/exe")?;
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut released = Released::default();
    for m in own_clean_mappings(&smaps, exe.dev(), exe.ino()) {
        // SAFETY: the range is a whole private, read-only mapping of this process's executable
        // file, with no anonymous (copied-on-write) page: every page it holds is the file's
        // content, read back from the page cache at the next access, so MADV_DONTNEED loses
        // nothing. The executable's mappings live as long as the process (never unmapped, so
        // the range cannot have been reused by another mapping since smaps was read).
        let rc = unsafe { libc::madvise(m.start as *mut libc::c_void, m.len, libc::MADV_DONTNEED) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        released.mappings += 1;
        released.bytes += m.rss_kib * 1024;
    }
    Ok(released)
}

/// One mapping that may be dropped.
#[derive(Debug, PartialEq, Eq)]
struct Mapping {
    start: usize,
    len: usize,
    rss_kib: u64,
}

/// The mappings in `smaps` (the text of `/proc/PID/smaps`) of the file `dev`/`ino` that are
/// private, not writable and hold no anonymous page (each must say `Anonymous: 0 kB`; one that
/// does not say is kept).
fn own_clean_mappings(smaps: &str, dev: u64, ino: u64) -> Vec<Mapping> {
    let want = (rustix::fs::major(dev), rustix::fs::minor(dev), ino);
    let mut out = Vec::new();
    // The mapping being read: a candidate, with its Rss once seen.
    let mut current: Option<(Mapping, bool)> = None;
    for line in smaps.lines() {
        if let Some(header) = parse_header(line) {
            current = None;
            let Some((start, end, perms, file)) = header else {
                continue;
            };
            let perms = perms.as_bytes();
            if file == want && perms.get(1) == Some(&b'-') && perms.get(3) == Some(&b'p') {
                let len = end.saturating_sub(start);
                current = Some((
                    Mapping {
                        start,
                        len,
                        rss_kib: 0,
                    },
                    false,
                ));
            }
            continue;
        }
        let Some((m, _)) = current.as_mut() else {
            continue;
        };
        let mut fields = line.split_ascii_whitespace();
        let key = fields.next();
        let kib = fields.next().and_then(|v| v.parse::<u64>().ok());
        match (key, kib) {
            (Some("Rss:"), Some(kib)) => m.rss_kib = kib,
            (Some("Anonymous:"), Some(0)) => {
                if let Some((_, clean)) = current.as_mut() {
                    *clean = true;
                }
            }
            (Some("Anonymous:"), _) => current = None,
            (Some("VmFlags:"), _) => {
                if let Some((m, true)) = current.take() {
                    if m.len > 0 {
                        out.push(m);
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// The mapping fields of an smaps header line: `None` when the line is not a header,
/// `Some(None)` for a header of no file or one that does not parse. A header is
/// `start-end perms offset major:minor inode [path]`.
#[allow(clippy::type_complexity)]
fn parse_header(line: &str) -> Option<Option<(usize, usize, &str, (u32, u32, u64))>> {
    let mut f = line.split_ascii_whitespace();
    let range = f.next()?;
    let (a, b) = range.split_once('-')?;
    let start = usize::from_str_radix(a, 16).ok()?;
    let end = usize::from_str_radix(b, 16).ok()?;
    // A header from here on, whatever else it holds.
    let parsed = (|| {
        let perms = f.next()?;
        let _offset = f.next()?;
        let (major, minor) = f.next()?.split_once(':')?;
        let major = u32::from_str_radix(major, 16).ok()?;
        let minor = u32::from_str_radix(minor, 16).ok()?;
        let ino = f.next()?.parse::<u64>().ok()?;
        (ino != 0).then_some((start, end, perms, (major, minor, ino)))
    })();
    Some(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0a0000000-55d0a022d000 r--p 00000000 fd:01 1234 /usr/bin/wattd (deleted)
Size:               2228 kB
Rss:                1800 kB
Anonymous:             0 kB
VmFlags: rd mr mw me
55d0a022d000-55d0a09a0000 r-xp 0022c000 fd:01 1234 /usr/bin/wattd (deleted)
Size:               7628 kB
Rss:                4200 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me
55d0a09a0000-55d0a09e9000 r--p 0099e000 fd:01 1234 /usr/bin/wattd (deleted)
Size:                292 kB
Rss:                 292 kB
Anonymous:           292 kB
VmFlags: rd mr mw me ac
55d0a09e9000-55d0a09ed000 rw-p 009e6000 fd:01 1234 /usr/bin/wattd (deleted)
Size:                 16 kB
Rss:                  16 kB
Anonymous:             4 kB
VmFlags: rd wr mr mw me ac
55d0a09f0000-55d0a09f1000 r--p 00000000 fd:01 1235 /usr/bin/other
Size:                  4 kB
Rss:                   4 kB
Anonymous:             0 kB
VmFlags: rd mr mw me
7f0000000000-7f0000200000 r-xp 00000000 fd:02 1234 /usr/lib/libc.so.6
Size:               2048 kB
Rss:                1300 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me
7f0000300000-7f0000301000 r--s 00000000 fd:01 1234 /usr/bin/wattd
Size:                  4 kB
Rss:                   4 kB
Anonymous:             0 kB
VmFlags: rd sh mr mw me
7f0000400000-7f0000401000 r--p 00000000 fd:01 1234 /usr/bin/wattd
Size:                  4 kB
Rss:                   4 kB
VmFlags: rd mr mw me
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0 [stack]
Rss:                  12 kB
Anonymous:            12 kB
VmFlags: rd wr mr mw me gd ac
";

    #[test]
    fn only_the_executables_clean_read_only_private_mappings_are_taken() {
        let dev = rustix::fs::makedev(0xfd, 0x01);
        let got = own_clean_mappings(SMAPS, dev, 1234);
        // The rodata and the text (the path's " (deleted)", after an upgrade, does not
        // matter: the inode does); not the RELRO segment (anonymous pages), the data, another
        // file, another device's inode 1234, a shared mapping, nor one that does not say how
        // much of it is anonymous.
        assert_eq!(
            got,
            vec![
                Mapping {
                    start: 0x55d0a0000000,
                    len: 0x22d000,
                    rss_kib: 1800
                },
                Mapping {
                    start: 0x55d0a022d000,
                    len: 0x773000,
                    rss_kib: 4200
                },
            ]
        );
        assert!(own_clean_mappings(SMAPS, dev, 999).is_empty());
        assert!(own_clean_mappings("garbage\n1-2 r--p\n\n", dev, 1234).is_empty());
    }

    /// Resident KiB of this process's mappings of its executable.
    fn exe_rss_kib() -> u64 {
        let exe = std::fs::metadata("/proc/self/exe").expect("/proc/self/exe");
        let dev = (rustix::fs::major(exe.dev()), rustix::fs::minor(exe.dev()));
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        let mut ours = false;
        let mut kib = 0;
        for line in smaps.lines() {
            if let Some(h) = parse_header(line) {
                ours =
                    h.is_some_and(|(_, _, _, (ma, mi, ino))| (ma, mi) == dev && ino == exe.ino());
            } else if ours {
                if let Some(v) = line.strip_prefix("Rss:") {
                    kib += v
                        .trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .unwrap_or(0);
                }
            }
        }
        kib
    }

    #[test]
    fn released_code_runs_again_and_is_no_longer_resident() {
        let before = exe_rss_kib();
        let r = release_cold_code().expect("release");
        let after = exe_rss_kib();
        assert!(r.mappings >= 2, "{r:?}");
        assert!(r.bytes > 0, "{r:?}");
        // Code, read-only data and relocated pointers (a trait object's vtable, a formatted
        // string) still work: the RELRO segment was left alone.
        let shown: Box<dyn std::fmt::Display> = Box::new(after);
        assert_eq!(format!("{shown}"), after.to_string());
        assert!(
            after < before,
            "the executable's resident pages went from {before} to {after} KiB"
        );
    }
}
