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
//! Only the executable's own mappings (the file of the mapping that holds this function's
//! code, by device and inode as `/proc/self/maps` names them: `stat` of `/proc/self/exe` gives
//! another device on overlayfs and btrfs subvolumes): shared libraries (libc) are mapped by
//! every process on the host, and unmapping them from this one frees nothing. Only read-only
//! private mappings that never were writable (no `ac` flag) and hold no anonymous page, in
//! memory or swapped out: the RELRO segment is read-only too but holds relocated
//! (copied-on-write) pages, which the file does not have; dropping them would lose the
//! relocations.

use std::io;

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
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let Some(file) = file_at(&smaps, release_cold_code as *const () as usize) else {
        return Ok(Released::default());
    };
    let mut released = Released::default();
    for m in own_clean_mappings(&smaps, file) {
        // SAFETY: the range is a whole private mapping of this process's executable file that
        // is read-only, never was writable (no `ac`: not the RELRO segment) and holds no
        // anonymous (copied-on-write) page, resident or swapped: every page it holds is the
        // file's content, read back from the page cache at the next access, so MADV_DONTNEED
        // loses nothing. The executable's mappings live as long as the process (never
        // unmapped, so the range cannot have been reused by another mapping since smaps was
        // read).
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

/// A mapped file as `/proc/PID/maps` names it: device major, minor, inode.
type FileId = (u32, u32, u64);

/// The file mapped at `addr`, from `smaps`' headers.
fn file_at(smaps: &str, addr: usize) -> Option<FileId> {
    smaps
        .lines()
        .filter_map(parse_header)
        .flatten()
        .find(|(start, end, _, _)| (*start..*end).contains(&addr))
        .map(|(_, _, _, file)| file)
}

/// The mappings in `smaps` (the text of `/proc/PID/smaps`) of `want` that are private, not
/// writable, never were (no `ac` in `VmFlags`) and hold no anonymous page: each must say
/// `Anonymous: 0 kB` and `Swap: 0 kB`; one that does not say is kept.
fn own_clean_mappings(smaps: &str, want: FileId) -> Vec<Mapping> {
    let mut out = Vec::new();
    // The mapping being read: a candidate, with its Rss once seen and how many of the two
    // zero counts (anonymous, swapped) it showed.
    let mut current: Option<(Mapping, u8)> = None;
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
                    0,
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
            (Some("Anonymous:" | "Swap:"), Some(0)) => {
                if let Some((_, zeros)) = current.as_mut() {
                    *zeros += 1;
                }
            }
            (Some("Anonymous:" | "Swap:"), _) => current = None,
            (Some("VmFlags:"), _) => {
                let accounted = line.split_ascii_whitespace().any(|f| f == "ac");
                if let Some((m, 2)) = current.take() {
                    if m.len > 0 && !accounted {
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
fn parse_header(line: &str) -> Option<Option<(usize, usize, &str, FileId)>> {
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
Swap:                  0 kB
VmFlags: rd mr mw me
55d0a022d000-55d0a09a0000 r-xp 0022c000 fd:01 1234 /usr/bin/wattd (deleted)
Size:               7628 kB
Rss:                4200 kB
Anonymous:             0 kB
Swap:                  0 kB
VmFlags: rd ex mr mw me
55d0a09a0000-55d0a09e9000 r--p 0099e000 fd:01 1234 /usr/bin/wattd (deleted)
Size:                292 kB
Rss:                 292 kB
Anonymous:           292 kB
Swap:                  0 kB
VmFlags: rd mr mw me ac
55d0a09e9000-55d0a09ed000 rw-p 009e6000 fd:01 1234 /usr/bin/wattd (deleted)
Size:                 16 kB
Rss:                  16 kB
Anonymous:             4 kB
Swap:                  0 kB
VmFlags: rd wr mr mw me ac
55d0a09f0000-55d0a09f1000 r--p 00000000 fd:01 1235 /usr/bin/other
Size:                  4 kB
Rss:                   4 kB
Anonymous:             0 kB
Swap:                  0 kB
VmFlags: rd mr mw me
7f0000000000-7f0000200000 r-xp 00000000 fd:02 1234 /usr/lib/libc.so.6
Size:               2048 kB
Rss:                1300 kB
Anonymous:             0 kB
Swap:                  0 kB
VmFlags: rd ex mr mw me
7f0000300000-7f0000301000 r--s 00000000 fd:01 1234 /usr/bin/wattd
Size:                  4 kB
Rss:                   4 kB
Anonymous:             0 kB
Swap:                  0 kB
VmFlags: rd sh mr mw me
7f0000400000-7f0000401000 r--p 00000000 fd:01 1234 /usr/bin/wattd
Size:                  4 kB
Rss:                   4 kB
Swap:                  0 kB
VmFlags: rd mr mw me
7f0000500000-7f0000501000 r--p 00000000 fd:01 1234 /usr/bin/wattd
Size:                  4 kB
Rss:                   0 kB
Anonymous:             0 kB
Swap:                  4 kB
VmFlags: rd mr mw me
7f0000600000-7f0000601000 r--p 00000000 fd:01 1234 /usr/bin/wattd
Size:                  4 kB
Rss:                   4 kB
Anonymous:             0 kB
Swap:                  0 kB
VmFlags: rd mr mw me ac
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0 [stack]
Rss:                  12 kB
Anonymous:            12 kB
VmFlags: rd wr mr mw me gd ac
";

    const WATTD: FileId = (0xfd, 0x01, 1234);

    #[test]
    fn only_the_executables_clean_read_only_private_mappings_are_taken() {
        assert_eq!(file_at(SMAPS, 0x55d0a0300000), Some(WATTD));
        assert_eq!(file_at(SMAPS, 0x7f0000000010), Some((0xfd, 0x02, 1234)));
        assert_eq!(file_at(SMAPS, 0x7ffc00000010), None);
        assert_eq!(file_at(SMAPS, 0x10), None);
        let got = own_clean_mappings(SMAPS, WATTD);
        // The rodata and the text (the path's " (deleted)", after an upgrade, does not
        // matter: the inode does); not the RELRO segment (anonymous pages, and `ac`: it was
        // mapped writable), the data, another file, another device's inode 1234, a shared
        // mapping, one that does not say how much of it is anonymous, one whose copied pages
        // are swapped out (`Anonymous` counts only those in memory), one that once was
        // writable with every page swapped in from the file.
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
        assert!(own_clean_mappings(SMAPS, (0xfd, 0x01, 999)).is_empty());
        assert!(own_clean_mappings("garbage\n1-2 r--p\n\n", WATTD).is_empty());
    }

    /// Resident KiB of this process's mappings of its executable.
    fn exe_rss_kib() -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        let exe =
            file_at(&smaps, release_cold_code as *const () as usize).expect("this code's mapping");
        let mut ours = false;
        let mut kib = 0;
        for line in smaps.lines() {
            if let Some(h) = parse_header(line) {
                ours = h.is_some_and(|(_, _, _, file)| file == exe);
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
