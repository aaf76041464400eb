//! `/proc/stat` CPU times: per-CPU busy and idle jiffies, the host's own measure of utilisation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{HostError, HINT_GENERIC};
use crate::hostfs::{read_bounded, HostRoot, KeptFile, LARGE_FILE_MAX};

/// One CPU's cumulative times, in USER_HZ ticks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CpuTimes {
    pub user: u64,
    pub nice: u64,
    pub system: u64,
    pub idle: u64,
    pub iowait: u64,
    pub irq: u64,
    pub softirq: u64,
    pub steal: u64,
}

impl CpuTimes {
    /// A `cpuN` line's first eight numbers, in `/proc/stat`'s order (missing ones 0).
    fn from_fields(v: [u64; 8]) -> Self {
        let [user, nice, system, idle, iowait, irq, softirq, steal] = v;
        CpuTimes {
            user,
            nice,
            system,
            idle,
            iowait,
            irq,
            softirq,
            steal,
        }
    }

    /// Time the CPU spent running something on this host (guest time is already in `user`;
    /// `steal` is time the hypervisor gave to someone else, so it is not ours).
    pub fn busy(&self) -> u64 {
        self.user
            .saturating_add(self.nice)
            .saturating_add(self.system)
            .saturating_add(self.irq)
            .saturating_add(self.softirq)
    }

    /// Every tick the CPU was ours, busy or not.
    pub fn total(&self) -> u64 {
        self.busy()
            .saturating_add(self.idle)
            .saturating_add(self.iowait)
    }
}

/// Per-CPU times from one read of `/proc/stat`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ProcStat {
    pub per_cpu: BTreeMap<u32, CpuTimes>,
}

/// The path of `/proc/stat` under a root.
pub fn proc_stat_path(root: &HostRoot) -> PathBuf {
    root.join("proc/stat")
}

/// `/proc/stat` kept open and read with one pread into a reused buffer: the tracker reads it
/// every tick, and an open and a close per tick were a share of its fixed cost at 100 Hz.
#[derive(Debug)]
pub struct ProcStatFile {
    file: KeptFile,
    buf: Vec<u8>,
    /// [`ProcStat::parse_into`]'s scratch.
    seen: Vec<u32>,
}

impl ProcStatFile {
    pub fn open(root: &HostRoot) -> Result<Self, HostError> {
        let file = KeptFile::open(&proc_stat_path(root), HINT_GENERIC)?;
        Ok(Self {
            file,
            buf: vec![0; 8192],
            seen: Vec::new(),
        })
    }

    /// One read of the whole file, parsed.
    pub fn read(&mut self) -> Result<ProcStat, HostError> {
        let s = whole_text(&self.file, &mut self.buf)?;
        ProcStat::parse(self.file.path(), s)
    }

    /// One read of the whole file, parsed into `out` ([`ProcStat::parse_into`]: the tracker's
    /// read at every tick, which allocates nothing while the CPUs stay the same).
    pub fn read_into(&mut self, out: &mut ProcStat) -> Result<(), HostError> {
        let s = whole_text(&self.file, &mut self.buf)?;
        out.parse_into(self.file.path(), s, &mut self.seen)
    }
}

/// One pread of the whole file into `buf` (which doubles while a read fills it, up to
/// `LARGE_FILE_MAX`: a host with many CPUs), as text.
fn whole_text<'a>(file: &KeptFile, buf: &'a mut Vec<u8>) -> Result<&'a str, HostError> {
    loop {
        let n = file.pread(buf)?.len();
        if n < buf.len() {
            return std::str::from_utf8(&buf[..n])
                .map_err(|_| HostError::malformed(file.path(), "not UTF-8"));
        }
        if buf.len() >= LARGE_FILE_MAX {
            return Err(HostError::TooBig {
                path: file.path().to_owned(),
                limit: LARGE_FILE_MAX,
            });
        }
        let len = (buf.len() * 2).min(LARGE_FILE_MAX);
        buf.resize(len, 0);
    }
}

impl ProcStat {
    pub fn read(root: &HostRoot) -> Result<Self, HostError> {
        let path = proc_stat_path(root);
        let s = read_bounded(&path, LARGE_FILE_MAX, HINT_GENERIC)?;
        Self::parse(&path, &s)
    }

    /// Parses the `cpuN` lines; the aggregate `cpu` line and every other line are ignored.
    /// Fields beyond `steal` (guest, guest_nice) are optional; fewer than four fields is an error.
    pub fn parse(path: &Path, s: &str) -> Result<Self, HostError> {
        let mut per_cpu = BTreeMap::new();
        for line in cpu_lines(path, s) {
            let (id, t) = line?;
            if per_cpu.insert(id, t).is_some() {
                return Err(HostError::malformed(path, format!("cpu{id} listed twice")));
            }
        }
        if per_cpu.is_empty() {
            return Err(HostError::malformed(path, "no cpuN lines"));
        }
        Ok(ProcStat { per_cpu })
    }

    /// [`ProcStat::parse`] into `self`, reusing its map: a CPU it holds is updated in place, so
    /// a read of the same CPUs allocates nothing (a CPU that came is added, one that went is
    /// removed). `seen` is scratch space. `parse`'s error, the same text (found again by
    /// `parse`: this finds a text's problems in another order); after one, `self` holds a mix
    /// of the two reads and must not be used.
    pub fn parse_into(
        &mut self,
        path: &Path,
        s: &str,
        seen: &mut Vec<u32>,
    ) -> Result<(), HostError> {
        self.parse_into_unordered(path, s, seen)
            .map_err(|e| ProcStat::parse(path, s).err().unwrap_or(e))
    }

    /// [`ProcStat::parse_into`], its error whichever it finds first.
    fn parse_into_unordered(
        &mut self,
        path: &Path,
        s: &str,
        seen: &mut Vec<u32>,
    ) -> Result<(), HostError> {
        seen.clear();
        for line in cpu_lines(path, s) {
            let (id, t) = line?;
            match self.per_cpu.get_mut(&id) {
                Some(slot) => *slot = t,
                None => {
                    self.per_cpu.insert(id, t);
                }
            }
            seen.push(id);
        }
        if seen.is_empty() {
            return Err(HostError::malformed(path, "no cpuN lines"));
        }
        seen.sort_unstable();
        if let Some(w) = seen.windows(2).find(|w| w[0] == w[1]) {
            return Err(HostError::malformed(
                path,
                format!("cpu{} listed twice", w[0]),
            ));
        }
        if seen.len() != self.per_cpu.len() {
            self.per_cpu.retain(|id, _| seen.binary_search(id).is_ok());
        }
        Ok(())
    }
}

/// The `cpuN` lines of `/proc/stat` text, parsed, in order; the aggregate `cpu` line and every
/// other line skipped.
fn cpu_lines<'a>(
    path: &'a Path,
    s: &'a str,
) -> impl Iterator<Item = Result<(u32, CpuTimes), HostError>> + 'a {
    // The lines that start with `cpu`, found with `memchr`'s substring search rather than by
    // splitting every line: the kernel's `intr` line alone is hundreds of bytes to thousands.
    // Each is cut at `\n` and numbered as `str::lines` numbers it (counted only for a line the
    // canonical parse refuses); a `\r` before the `\n`, which `str::lines` drops, is whitespace
    // to the general parse and makes the canonical one refuse the line, so it changes nothing.
    let bytes = s.as_bytes();
    let first = bytes.starts_with(b"cpu").then_some(0);
    let rest = memchr::memmem::find_iter(bytes, b"\ncpu").map(|at| at + 1);
    first.into_iter().chain(rest).filter_map(move |start| {
        let line = match memchr::memchr(b'\n', &bytes[start..]) {
            Some(len) => &s[start..start + len],
            None => &s[start..],
        };
        let rest = &line["cpu".len()..];
        match canonical_cpu_line(rest.as_bytes()) {
            Some(parsed) => Some(Ok(parsed)),
            None => {
                let lineno = memchr::memchr_iter(b'\n', &bytes[..start]).count();
                general_cpu_line(path, lineno, rest)
            }
        }
    })
}

/// A line that starts with `cpu`, after it: `None` for the aggregate line ("cpu  ...") and one
/// with nothing after `cpu`, else [`cpu_line`]'s result.
fn general_cpu_line(
    path: &Path,
    lineno: usize,
    rest: &str,
) -> Option<Result<(u32, CpuTimes), HostError>> {
    let mut it = rest.split_ascii_whitespace();
    let id = it.next()?;
    if rest.starts_with(' ') {
        return None; // the aggregate line "cpu  ..."
    }
    Some(cpu_line(path, lineno, id, it))
}

/// A `cpuN` line as the kernel prints it, after its `cpu`: the id's digits, then at least four
/// numbers, each after one or more spaces, and nothing else but trailing spaces up to the
/// eighth; the first eight are taken and what follows the eighth (after a space) is not looked
/// at, as by [`cpu_line`]. Parsed byte by byte: the tracker reads `/proc/stat` at every tick,
/// and the general parse (`split_ascii_whitespace`, `str::parse`) was two thirds of its own
/// instructions on an idle tick. `None` for anything else, which [`general_cpu_line`] then
/// parses or refuses: where this gives a value, that gives the same one.
fn canonical_cpu_line(rest: &[u8]) -> Option<(u32, CpuTimes)> {
    /// The digits at `b[*i..]` as a number, `*i` past them; `None` past `u64::MAX`.
    fn digits(b: &[u8], i: &mut usize) -> Option<u64> {
        let start = *i;
        let mut v = 0u64;
        while let Some(d) = b.get(*i).filter(|c| c.is_ascii_digit()) {
            v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
            *i += 1;
        }
        (*i > start).then_some(v)
    }
    let mut i = 0;
    let id = u32::try_from(digits(rest, &mut i)?).ok()?;
    let mut vals = [0u64; 8];
    let mut n = 0;
    while n < vals.len() {
        // Each number's digits were all taken: what follows is spaces, the end, or refused.
        while rest.get(i) == Some(&b' ') {
            i += 1;
        }
        if i == rest.len() {
            break;
        }
        vals[n] = digits(rest, &mut i)?;
        n += 1;
    }
    // The eighth number ends where `cpu_line`'s token does: at a space or the line's end.
    if n < 4 || rest.get(i).is_some_and(|c| *c != b' ') {
        return None;
    }
    Some((id, CpuTimes::from_fields(vals)))
}

/// One `cpuN` line's id and times (`lineno` counted from 0, named from 1).
fn cpu_line<'a>(
    path: &Path,
    lineno: usize,
    id: &str,
    mut fields: impl Iterator<Item = &'a str>,
) -> Result<(u32, CpuTimes), HostError> {
    let id: u32 = id
        .parse()
        .map_err(|_| HostError::malformed(path, format!("line {}: bad CPU id", lineno + 1)))?;
    let mut vals = [0u64; 8];
    let mut n = 0;
    for (slot, field) in vals.iter_mut().zip(fields.by_ref()) {
        *slot = field
            .parse()
            .map_err(|_| HostError::malformed(path, format!("line {}: bad number", lineno + 1)))?;
        n += 1;
    }
    if n < 4 {
        return Err(HostError::malformed(
            path,
            format!(
                "line {}: cpu{id} has {n} fields, need at least 4",
                lineno + 1
            ),
        ));
    }
    Ok((id, CpuTimes::from_fields(vals)))
}

/// Busy microseconds of `cpus` between two reads taken `elapsed_us` apart, measured as the time
/// they were *not* idle: `elapsed - (idle + iowait + steal)` per CPU, clamped to `0..=elapsed`.
///
/// Why not `user + system + ...`: those are sampled at scheduler ticks (HZ 250 here), so a task
/// that runs between ticks is charged to whoever holds the CPU at the tick, and a duty-cycled
/// run can be over- or under-counted by percents against its cgroup's exact `usage_usec`. Idle
/// time, on NOHZ kernels (almost all), is measured exactly from idle entry and exit, so the
/// complement is consistent with the exact per-cgroup times the runs are divided by.
pub fn busy_us_between(
    prev: &ProcStat,
    now: &ProcStat,
    cpus: &[u32],
    hz: u64,
    elapsed_us: u64,
) -> u64 {
    let cap = elapsed_us as i128 * cpus.len() as i128;
    busy_us_signed(prev, now, cpus, hz, elapsed_us).clamp(0, cap) as u64
}

/// Like [`busy_us_between`] but unclamped, summed over `cpus`: idle time arrives in whole
/// USER_HZ ticks, so over a short interval an idle CPU can show more idle time than elapsed
/// time. Clamping each CPU at zero would turn that rounding into phantom busy time (about a third
/// of a tick per idle CPU per interval); callers that carry a balance over intervals take the
/// signed value and let the rounding cancel.
pub fn busy_us_signed(
    prev: &ProcStat,
    now: &ProcStat,
    cpus: &[u32],
    hz: u64,
    elapsed_us: u64,
) -> i128 {
    let hz = hz.max(1) as i128;
    cpus.iter()
        .filter_map(|c| {
            let (a, b) = (prev.per_cpu.get(c)?, now.per_cpu.get(c)?);
            let idle = |t: &CpuTimes| t.idle as i128 + t.iowait as i128 + t.steal as i128;
            let idle_us = (idle(b) - idle(a)).max(0) * 1_000_000 / hz;
            Some(elapsed_us as i128 - idle_us)
        })
        .sum()
}

/// USER_HZ, the unit of /proc/stat.
pub fn user_hz() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if v > 0 {
        v as u64
    } else {
        100
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(rel: &str) -> PathBuf {
        wattd_testkit::host_fixture(rel)
    }

    #[test]
    fn two_socket_xeon_proc_stat() {
        let p = fixture("scaphandre/xeon-bisocket-proc-stat.txt");
        let s = std::fs::read_to_string(&p).unwrap();
        let st = ProcStat::parse(&p, &s).unwrap();
        assert_eq!(st.per_cpu.len(), 24);
        let c0 = st.per_cpu[&0];
        assert_eq!(c0.user, 11704766);
        assert_eq!(c0.busy(), 11704766 + 481 + 8062705 + 4194812);
    }

    /// Kept open: each read sees the file as it is now (a pread from offset 0), however large
    /// (a host with many CPUs outgrows the first buffer), and a file past the bound is refused.
    #[test]
    fn kept_open_reads_the_current_content_of_any_size() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("proc")).unwrap();
        let stat = dir.path().join("proc/stat");
        let text = |cpus: u32, user: u64| -> String {
            let mut t = String::from("cpu  1 2 3 4 5 6 7 8 0 0\n");
            for c in 0..cpus {
                t.push_str(&format!("cpu{c} {user} 0 0 1000 0 0 0 0 0 0\n"));
            }
            t.push_str("intr 1 2 3\n");
            t
        };
        std::fs::write(&stat, text(2, 5)).unwrap();
        let mut f = ProcStatFile::open(&HostRoot::new(dir.path())).unwrap();
        assert_eq!(f.read().unwrap().per_cpu[&1].user, 5);
        // 640 CPUs: about 24 KiB, three times the first buffer; rewritten in place.
        std::fs::write(&stat, text(640, 7)).unwrap();
        let st = f.read().unwrap();
        assert_eq!(st.per_cpu.len(), 640);
        assert_eq!(st.per_cpu[&639].user, 7);
        std::fs::write(&stat, text(2, 9)).unwrap();
        assert_eq!(f.read().unwrap().per_cpu.len(), 2, "a shorter file");
        std::fs::write(&stat, "x".repeat(LARGE_FILE_MAX + 1)).unwrap();
        let e = f.read().unwrap_err().to_string();
        assert!(e.contains("stat"), "{e}");
    }

    #[test]
    fn busy_is_the_complement_of_idle() {
        let p = Path::new("stat");
        // cpu0: 60 idle ticks of 100 in 1 s -> 0.4 s busy, whatever user/system say.
        let a = ProcStat::parse(p, "cpu0 0 0 0 1000 0 0 0 0\ncpu1 0 0 0 1000 0 0 0 0\n").unwrap();
        let b = ProcStat::parse(p, "cpu0 99 0 0 1060 0 0 0 0\ncpu1 0 0 0 1100 0 0 0 0\n").unwrap();
        assert_eq!(busy_us_between(&a, &b, &[0], 100, 1_000_000), 400_000);
        // cpu1 idle all the time; idle beyond elapsed (tick rounding) clamps at 0, and the
        // signed form keeps the -0.5 s for a caller's balance.
        assert_eq!(busy_us_between(&a, &b, &[1], 100, 1_000_000), 0);
        assert_eq!(busy_us_between(&a, &b, &[1], 100, 500_000), 0);
        assert_eq!(busy_us_signed(&a, &b, &[1], 100, 500_000), -500_000);
        // Per-CPU rounding cancels inside a package: 0.4 s busy + (-0.5 s) on an idle one.
        assert_eq!(busy_us_between(&a, &b, &[0, 1], 100, 500_000), 0);
        assert_eq!(busy_us_signed(&a, &b, &[0, 1], 100, 1_000_000), 400_000);
        // iowait and steal are not busy either.
        let c = ProcStat::parse(p, "cpu0 0 0 0 1000 50 0 0 25\n").unwrap();
        assert_eq!(busy_us_between(&a, &c, &[0], 100, 1_000_000), 250_000);
    }

    #[test]
    fn bad_lines_are_errors_with_path() {
        let p = Path::new("/h/proc/stat");
        for bad in [
            "cpu0 1 2\n",
            "cpuX 1 2 3 4\n",
            "cpu0 1 2 x 4\n",
            "intr 5\n",
            "cpu0 1 2 3 4\ncpu0 1 2 3 4\n",
        ] {
            let e = ProcStat::parse(p, bad).unwrap_err().to_string();
            assert!(e.contains("/h/proc/stat"), "{bad:?}: {e}");
        }
        let ok = ProcStat::parse(p, "cpu  1 2 3 4\ncpu0 1 2 3 4\n").unwrap();
        assert_eq!(ok.per_cpu[&0].idle, 4);
    }

    /// Where the byte-by-byte parse of a kernel-shaped `cpuN` line gives a value, the general
    /// parse gives the same one: lines of an id and numbers, with the pieces that matter mixed
    /// in (a tab, two spaces or none between numbers, a sign, a letter, a carriage return, an
    /// empty number, numbers past `u64::MAX`, fewer than four or more than eight numbers).
    #[test]
    fn the_canonical_parse_agrees_with_the_general_one() {
        use proptest::prelude::*;
        let number = || {
            prop_oneof![
                12 => "[0-9]{1,7}",
                1 => "[0-9]{19,21}",
                1 => Just("+1".to_owned()),
                1 => Just("1x".to_owned()),
                1 => Just("\r".to_owned()),
                1 => Just(String::new()),
            ]
        };
        let sep = prop_oneof![
            12 => Just(" ".to_owned()),
            2 => Just("  ".to_owned()),
            1 => Just("\t".to_owned()),
            1 => Just(String::new()),
        ];
        let tail = prop_oneof![
            6 => Just(String::new()),
            1 => Just(" ".to_owned()),
            1 => Just("\r".to_owned()),
            1 => Just(" x".to_owned()),
        ];
        let line = (
            number(),
            proptest::collection::vec((sep, number()), 0..12),
            tail,
        );
        let p = Path::new("/h/proc/stat");
        let canonical = std::cell::Cell::new(0u32);
        proptest!(ProptestConfig::with_cases(4000), |((id, fields, tail) in line)| {
            let mut rest = id;
            for (sep, n) in fields {
                rest.push_str(&sep);
                rest.push_str(&n);
            }
            rest.push_str(&tail);
            let general = general_cpu_line(p, 0, &rest);
            if let Some(fast) = canonical_cpu_line(rest.as_bytes()) {
                canonical.set(canonical.get() + 1);
                match general {
                    Some(Ok(g)) => prop_assert_eq!(g, fast, "{:?}", rest),
                    other => prop_assert!(
                        false,
                        "{:?}: canonical {:?}, general {:?}",
                        rest,
                        fast,
                        other
                    ),
                }
            }
        });
        let canonical = canonical.get();
        assert!(
            canonical > 100,
            "few lines took the canonical path: {canonical}"
        );
        // The kernel's own lines take it, with guest times after the eighth number.
        let k = b"0 4705 150 1120 1640280 2230 0 38 0 0 0";
        assert_eq!(
            canonical_cpu_line(k).map(|(id, t)| (id, t.idle, t.steal)),
            Some((0, 1640280, 0))
        );
    }

    /// The `cpuN` lines found by substring search are the ones `str::lines` gives, cut and
    /// numbered as it does: texts of kernel-shaped and malformed lines, the aggregate line,
    /// `cpu` inside a line, empty lines, `\r\n` and a bare `\r`, with or without a final newline.
    #[test]
    fn cpu_lines_are_found_as_str_lines_finds_them() {
        use proptest::prelude::*;
        let p = Path::new("/h/proc/stat");
        let reference = |s: &str| -> Vec<Result<(u32, CpuTimes), String>> {
            s.lines()
                .enumerate()
                .filter_map(|(n, l)| general_cpu_line(p, n, l.strip_prefix("cpu")?))
                .map(|r| r.map_err(|e| e.to_string()))
                .collect()
        };
        let line = prop_oneof![
            Just("cpu0 10 0 5 900 1 0 0 0 0 0"),
            Just("cpu1 11 0 6 901 2 0 0 0"),
            Just("cpu  21 0 11 1801 3 0 0 0"),
            Just("cpu2 1 2"),
            Just("cpu3\t1 2 3 4"),
            Just("cpux 1 2 3 4"),
            Just("cpu"),
            Just("intr 12 0 3 cpu0 1 2 3 4"),
            Just("xcpu0 1 2 3 4"),
            Just(""),
            Just("softirq 1 2 3"),
        ];
        let end = prop_oneof![Just("\n"), Just("\r\n"), Just("\r"), Just("")];
        let text = proptest::collection::vec((line, end), 0..10);
        proptest!(ProptestConfig::with_cases(2000), |(parts in text)| {
            let s: String = parts.iter().flat_map(|(l, e)| [*l, *e]).collect();
            let found: Vec<_> = cpu_lines(p, &s).map(|r| r.map_err(|e| e.to_string())).collect();
            prop_assert_eq!(found, reference(&s), "{:?}", s);
        });
    }

    /// Parsed into the storage of an earlier read, the result is what a fresh parse gives:
    /// CPUs updated, added (one came online) and removed (one went offline), whatever that
    /// storage held, a failed read's leftovers included; the same errors, with the path.
    #[test]
    fn parsed_into_an_earlier_read_is_a_fresh_parse() {
        let p = Path::new("/h/proc/stat");
        let line = |c: u32, v: u64| format!("cpu{c} {v} 1 2 {} 0 0 0 {}\n", v * 3, v + c as u64);
        let text = |cpus: &[u32], v: u64| -> String {
            let mut t = String::from("cpu  9 9 9 9\n");
            for &c in cpus {
                t.push_str(&line(c, v));
            }
            t.push_str("intr 1 2 3\ncpu7 nonsense after the cpu lines is a cpu line\n");
            t
        };
        // The trailing "cpu7 nonsense" line makes every text malformed; cut it for the good ones.
        let good = |cpus: &[u32], v: u64| {
            let t = text(cpus, v);
            t[..t.find("cpu7 nonsense").unwrap()].to_owned()
        };
        let mut seen = Vec::new();
        let mut st = ProcStat::default();
        let reads: [(&[u32], u64); 6] = [
            (&[0, 1, 2, 3], 10),
            (&[0, 1, 2, 3], 11),
            (&[0, 1, 3], 12),
            (&[0, 1, 3, 2, 64], 13),
            (&[5], 14),
            (&[0, 1, 2, 3], 15),
        ];
        for (cpus, v) in reads {
            let t = good(cpus, v);
            st.parse_into(p, &t, &mut seen).unwrap();
            assert_eq!(st, ProcStat::parse(p, &t).unwrap(), "{t}");
            // A failed read in between leaves a mix; the next good one is whole again.
            let e = st
                .parse_into(p, &text(cpus, v + 100), &mut seen)
                .unwrap_err();
            assert!(e.to_string().contains("/h/proc/stat"), "{e}");
            st.parse_into(p, &t, &mut seen).unwrap();
            assert_eq!(st, ProcStat::parse(p, &t).unwrap(), "{t}");
        }
        for bad in [
            "cpu0 1 2\n",
            "cpu0 1 2 3 4\ncpu1 1 2 3 4\ncpu0 1 2 3 4\n",
            "intr 5\n",
            // Two problems: `parse` names the one it meets first.
            "cpu1 1 2 3 4\ncpu1 1 2 3 4\ncpu0 1 2 x 4\n",
            "cpu3 1 2 3 4\ncpu3 1 2 3 4\ncpu2 1 2 3 4\ncpu2 1 2 3 4\n",
        ] {
            let fresh = ProcStat::parse(p, bad).unwrap_err().to_string();
            let into = st.parse_into(p, bad, &mut seen).unwrap_err().to_string();
            assert_eq!(into, fresh, "{bad:?}");
        }
    }
}
