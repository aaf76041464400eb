//! One run's cgroup files: `cpu.stat` (`usage_usec`), `memory.current`, `cgroup.events`, and the
//! reservation files `cpu.max` and `cpuset.cpus.effective`, read kept-open with pread where the
//! descriptor budget allows, else opened, read and closed each time.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{HostError, HINT_GENERIC};
use crate::hostfs::{parse_cpu_list, parse_u64, read_bounded, SMALL_FILE_MAX};

/// Buffer for one `cpu.stat` read: the file is a dozen short lines even with every controller
/// on, so a full buffer means something is wrong, not that we should read more.
const CPU_STAT_BUF: usize = 4096;

/// Where a cgroup's file is: the cgroup root (one for the tracker), the cgroup's path under it
/// (its run's or family's own) and the file's name, each shared rather than a path spelled out
/// per file. The path is put together only for an open and an error message: at 10,000 runs
/// a path kept beside every `cpu.stat` descriptor was a megabyte of the heap.
#[derive(Clone, Debug)]
pub struct CgroupFile {
    root: Arc<Path>,
    rel: Arc<str>,
    name: &'static str,
}

impl CgroupFile {
    pub fn new(root: &Arc<Path>, rel: &Arc<str>, name: &'static str) -> Self {
        CgroupFile {
            root: root.clone(),
            rel: rel.clone(),
            name,
        }
    }

    pub fn path(&self) -> PathBuf {
        let mut p = self.root.join(&*self.rel);
        p.push(self.name);
        p
    }
}

/// A cgroup file read either through a kept descriptor or open-read-close (above the
/// descriptor budget).
#[derive(Debug)]
pub struct Source {
    at: CgroupFile,
    kept: Option<File>,
}

impl Source {
    pub fn open(at: CgroupFile, keep: bool) -> Result<Self, HostError> {
        let path = at.path();
        // Opened even when not kept, so a missing file fails at discovery.
        let file = File::open(&path).map_err(|e| HostError::io(&path, e, HINT_GENERIC))?;
        Ok(Source {
            at,
            kept: keep.then_some(file),
        })
    }

    pub fn path(&self) -> PathBuf {
        self.at.path()
    }

    pub fn is_kept(&self) -> bool {
        self.kept.is_some()
    }

    /// Reads into `buf` and returns the filled prefix; a full buffer is an error.
    fn read<'b>(&self, buf: &'b mut [u8]) -> Result<&'b [u8], HostError> {
        let n = self.read_prefix(buf)?.len();
        if n == buf.len() {
            return Err(HostError::TooBig {
                path: self.path(),
                limit: buf.len() - 1,
            });
        }
        Ok(&buf[..n])
    }

    /// Whether the file's first bytes hold a digit: `cgroup.procs` lists a process.
    pub fn lists_a_number(&self) -> Result<bool, HostError> {
        let mut buf = [0u8; 64];
        Ok(self.read_prefix(&mut buf)?.iter().any(u8::is_ascii_digit))
    }

    /// Reads as much of the file as fits in `buf`, from its start.
    fn read_prefix<'b>(&self, buf: &'b mut [u8]) -> Result<&'b [u8], HostError> {
        let n = match &self.kept {
            Some(f) => f
                .read_at(buf, 0)
                .map_err(|e| HostError::io(&self.path(), e, HINT_GENERIC))?,
            None => {
                let p = &self.path();
                let f = File::open(p).map_err(|e| HostError::io(p, e, HINT_GENERIC))?;
                let mut n = 0;
                let mut f = f.take(buf.len() as u64);
                loop {
                    let got = f
                        .read(&mut buf[n..])
                        .map_err(|e| HostError::io(p, e, HINT_GENERIC))?;
                    if got == 0 {
                        break;
                    }
                    n += got;
                    if n == buf.len() {
                        break;
                    }
                }
                n
            }
        };
        Ok(&buf[..n])
    }

    /// `usage_usec` from a `cpu.stat`.
    pub fn read_cpu_usage_us(&self) -> Result<u64, HostError> {
        let mut buf = [0u8; CPU_STAT_BUF];
        let bytes = self.read(&mut buf)?;
        // The path is put together only when the content is not as the kernel writes it.
        match usage_on_first_line(bytes) {
            Some(v) => Ok(v),
            None => parse_cpu_stat_usage_us(&self.path(), bytes),
        }
    }

    /// A one-integer file such as `memory.current`.
    pub fn read_u64(&self) -> Result<u64, HostError> {
        let mut buf = [0u8; 64];
        let bytes = self.read(&mut buf)?;
        let s = std::str::from_utf8(bytes)
            .map_err(|_| HostError::malformed(&self.path(), "not valid UTF-8"))?;
        // The path is put together only when the content is not one plain number.
        let digits = s.trim_end_matches('\n');
        if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            if let Ok(v) = digits.parse() {
                return Ok(v);
            }
        }
        parse_u64(&self.path(), s)
    }
}

/// `usage_usec` of the `cpu.stat` at `path`, opened, read and closed: a cgroup read once.
pub fn read_cpu_stat_once(path: &Path) -> Result<u64, HostError> {
    let text = read_bounded(path, CPU_STAT_BUF, HINT_GENERIC)?;
    parse_cpu_stat_usage_us(path, text.as_bytes())
}

/// Finds `usage_usec` in `cpu.stat` content. Unknown keys are ignored (kernels add them); a
/// missing or repeated `usage_usec` is an error, because billing a guess is worse than a gap.
pub fn parse_cpu_stat_usage_us(path: &Path, bytes: &[u8]) -> Result<u64, HostError> {
    if let Some(v) = usage_on_first_line(bytes) {
        return Ok(v);
    }
    let text =
        std::str::from_utf8(bytes).map_err(|_| HostError::malformed(path, "not valid UTF-8"))?;
    usage_by_lines(path, text)
}

/// `usage_usec` where the kernel writes it, first, and named nowhere else (every line that
/// could name it again is a line that contains it); `None` for anything else, which
/// [`usage_by_lines`] reads or refuses.
fn usage_on_first_line(bytes: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(bytes).ok()?;
    let (first, rest) = text.split_once('\n')?;
    let digits = first.strip_prefix("usage_usec ")?;
    if digits.is_empty()
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || rest.contains("usage_usec")
    {
        return None;
    }
    digits.parse().ok()
}

/// [`parse_cpu_stat_usage_us`] line by line: any layout.
fn usage_by_lines(path: &Path, text: &str) -> Result<u64, HostError> {
    let mut usage = None;
    for line in text.lines() {
        let mut it = line.split_ascii_whitespace();
        if it.next() != Some("usage_usec") {
            continue;
        }
        let v = parse_u64(path, it.next().unwrap_or(""))?;
        if it.next().is_some() {
            return Err(HostError::malformed(
                path,
                "usage_usec line has extra fields",
            ));
        }
        if usage.replace(v).is_some() {
            return Err(HostError::malformed(path, "usage_usec listed twice"));
        }
    }
    usage.ok_or_else(|| HostError::malformed(path, "no usage_usec line"))
}

/// `populated` from `cgroup.events`: false once the cgroup and its descendants hold no process.
pub fn read_populated(path: &Path) -> Result<bool, HostError> {
    let text = read_bounded(path, SMALL_FILE_MAX, HINT_GENERIC)?;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("populated ") {
            return match v.trim() {
                "0" => Ok(false),
                "1" => Ok(true),
                other => Err(HostError::malformed(
                    path,
                    format!(
                        "populated is {:?}, not 0 or 1",
                        crate::error::Shown::new(other)
                    ),
                )),
            };
        }
    }
    Err(HostError::malformed(path, "no populated line"))
}

/// Reserved CPU capacity in millicpus from `cpu.max` and `cpuset.cpus.effective`, the smaller
/// of the two. Files that do not exist (controller not enabled, or bound to cgroup v1 as on
/// hybrid hosts) mean "no reservation known": `Ok(None)`, not an error.
pub fn read_reserved_millicpus(dir: &Path) -> Result<Option<u64>, HostError> {
    let quota = optional_text(&dir.join("cpu.max"))?
        .map(|(p, t)| parse_cpu_max_millicpus(&p, &t))
        .transpose()?
        .flatten();
    let cpuset = optional_text(&dir.join("cpuset.cpus.effective"))?
        .map(|(p, t)| parse_cpu_list(&p, &t))
        .transpose()?
        .and_then(|cpus| (!cpus.is_empty()).then(|| cpus.len() as u64 * 1000));
    Ok(match (quota, cpuset) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    })
}

fn optional_text(path: &Path) -> Result<Option<(PathBuf, String)>, HostError> {
    match read_bounded(path, SMALL_FILE_MAX, HINT_GENERIC) {
        Ok(t) => Ok(Some((path.to_owned(), t))),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// `cpu.max` is `$MAX $PERIOD` with `$MAX` possibly `max` (no limit: `None`).
pub fn parse_cpu_max_millicpus(path: &Path, text: &str) -> Result<Option<u64>, HostError> {
    let mut it = text.split_ascii_whitespace();
    let (Some(max), Some(period), None) = (it.next(), it.next(), it.next()) else {
        return Err(HostError::malformed(path, "expected \"$MAX $PERIOD\""));
    };
    if max == "max" {
        return Ok(None);
    }
    let max_us = parse_u64(path, max)?;
    let period_us = parse_u64(path, period)?;
    if period_us == 0 {
        return Err(HostError::malformed(path, "period is 0"));
    }
    let milli = u128::from(max_us) * 1000 / u128::from(period_us);
    Ok(Some(u64::try_from(milli).unwrap_or(u64::MAX)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_kept_or_not_reads_and_names_its_whole_path_in_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root: Arc<Path> = Arc::from(dir.path());
        let rel: Arc<str> = Arc::from("parent/run-1");
        let cg = dir.path().join("parent/run-1");
        std::fs::create_dir_all(&cg).expect("mkdir");
        std::fs::write(cg.join("cpu.stat"), "usage_usec 42\nuser_usec 40\n").expect("write");
        std::fs::write(cg.join("memory.current"), "4096\n").expect("write");
        for keep in [true, false] {
            let cpu = Source::open(CgroupFile::new(&root, &rel, "cpu.stat"), keep).expect("open");
            let mem =
                Source::open(CgroupFile::new(&root, &rel, "memory.current"), keep).expect("open");
            assert_eq!(cpu.is_kept(), keep);
            assert_eq!(cpu.path(), cg.join("cpu.stat"));
            assert_eq!(cpu.read_cpu_usage_us().expect("cpu.stat"), 42);
            assert_eq!(mem.read_u64().expect("memory.current"), 4096);
            // Content the kernel would not write: refused, naming the file.
            std::fs::write(cg.join("cpu.stat"), "user_usec 40\n").expect("write");
            std::fs::write(cg.join("memory.current"), "-1\n").expect("write");
            for e in [
                cpu.read_cpu_usage_us().expect_err("no usage_usec"),
                mem.read_u64().expect_err("negative"),
            ] {
                let shown = e.to_string();
                assert!(shown.contains(&*cg.to_string_lossy()), "{shown}");
            }
            std::fs::write(cg.join("cpu.stat"), "usage_usec 42\nuser_usec 40\n").expect("write");
            std::fs::write(cg.join("memory.current"), "4096\n").expect("write");
        }
        let missing = Source::open(CgroupFile::new(&root, &rel, "cpu.pressure"), true)
            .expect_err("no such file");
        assert!(
            missing.to_string().contains("parent/run-1/cpu.pressure"),
            "{missing}"
        );
    }

    #[test]
    fn cpu_stat_table() {
        let p = Path::new("/cg/run/cpu.stat");
        let cases: &[(&[u8], Result<u64, &str>)] = &[
            (b"usage_usec 5\nuser_usec 3\nsystem_usec 2\n", Ok(5)),
            (b"future_key 9 9 9\nusage_usec 7\n", Ok(7)),
            (b"usage_usec 0", Ok(0)),
            (b"user_usec 3\nsystem_usec 2\n", Err("no usage_usec")),
            (b"", Err("no usage_usec")),
            (b"usage_usec\n", Err("empty")),
            (b"usage_usec -4\n", Err("negative")),
            (b"usage_usec 1 2\n", Err("extra fields")),
            (b"usage_usec 1\nusage_usec 1\n", Err("twice")),
            (b"usage_usec 99999999999999999999\n", Err("64 bits")),
            (b"usage_usec \xff\n", Err("UTF-8")),
            (b"usage_usec 1\nuser_usec 3\n\tusage_usec 1\n", Err("twice")),
            (b"usage_usec 1\nuser_usec \xff\n", Err("UTF-8")),
            (b"usage_usec 12\n", Ok(12)),
        ];
        for (input, want) in cases {
            match (parse_cpu_stat_usage_us(p, input), want) {
                (Ok(g), Ok(w)) => assert_eq!(g, *w),
                (Err(e), Err(w)) => {
                    let m = e.to_string();
                    assert!(m.contains(w) && m.contains("/cg/run/cpu.stat"), "{m}");
                }
                (g, w) => panic!("{input:?}: want {w:?} got {g:?}"),
            }
        }
    }

    proptest::proptest! {
        /// The straight read of the first line answers as the line-by-line one does, whatever
        /// the lines, their order, their whitespace and repeats.
        #[test]
        fn the_first_line_shortcut_agrees_with_every_line(
            lines in proptest::collection::vec(
                proptest::sample::select(vec![
                    "usage_usec 5", "usage_usec 0", "usage_usec 18446744073709551615",
                    "usage_usec 18446744073709551616", "usage_usec", "usage_usec 7 8",
                    " usage_usec 9", "usage_usec\t9", "usage_usec -1", "usage_usecs 3",
                    "user_usec 3", "system_usec 2", "nr_periods 0", "", "x usage_usec 4",
                ]),
                0..6,
            ),
            trailing_newline in proptest::bool::ANY,
        ) {
            let mut text = lines.join("\n");
            if trailing_newline {
                text.push('\n');
            }
            let p = Path::new("cpu.stat");
            let fast = parse_cpu_stat_usage_us(p, text.as_bytes()).map_err(|e| e.to_string());
            let slow = usage_by_lines(p, &text).map_err(|e| e.to_string());
            proptest::prop_assert_eq!(fast, slow, "{:?}", text);
        }
    }

    #[test]
    fn cpu_max_table() {
        let p = Path::new("cpu.max");
        assert_eq!(parse_cpu_max_millicpus(p, "max 100000\n").unwrap(), None);
        assert_eq!(
            parse_cpu_max_millicpus(p, "50000 100000\n").unwrap(),
            Some(500)
        );
        assert_eq!(
            parse_cpu_max_millicpus(p, "200000 100000").unwrap(),
            Some(2000)
        );
        for bad in ["", "max", "1 0", "x 100", "1 2 3"] {
            assert!(parse_cpu_max_millicpus(p, bad).is_err(), "{bad:?}");
        }
    }
}
