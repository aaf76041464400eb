//! One run's cgroup files: `cpu.stat` (`usage_usec`), `memory.current`, `cgroup.events`, and the
//! reservation files `cpu.max` and `cpuset.cpus.effective`, read kept-open with pread where the
//! descriptor budget allows, else opened, read and closed each time.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{HostError, HINT_GENERIC};
use crate::hostfs::{parse_cpu_list, parse_u64, read_bounded, KeptFile, SMALL_FILE_MAX};

/// Buffer for one `cpu.stat` read: the file is a dozen short lines even with every controller
/// on, so a full buffer means something is wrong, not that we should read more.
const CPU_STAT_BUF: usize = 4096;

/// A file read either through a kept descriptor or by path.
#[derive(Debug)]
pub enum Source {
    Kept(KeptFile),
    /// Open-read-close: used above the descriptor budget.
    Path(PathBuf),
}

impl Source {
    pub fn open(path: PathBuf, keep: bool) -> Result<Self, HostError> {
        if keep {
            Ok(Source::Kept(KeptFile::open(&path, HINT_GENERIC)?))
        } else {
            // Still check it can be read now, so a missing file fails at discovery.
            File::open(&path).map_err(|e| HostError::io(&path, e, HINT_GENERIC))?;
            Ok(Source::Path(path))
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            Source::Kept(k) => k.path(),
            Source::Path(p) => p,
        }
    }

    pub fn is_kept(&self) -> bool {
        matches!(self, Source::Kept(_))
    }

    /// Reads into `buf` and returns the filled prefix; a full buffer is an error.
    fn read<'b>(&self, buf: &'b mut [u8]) -> Result<&'b [u8], HostError> {
        let n = self.read_prefix(buf)?.len();
        if n == buf.len() {
            return Err(HostError::TooBig {
                path: self.path().to_owned(),
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
        let n = match self {
            Source::Kept(k) => k.pread(buf)?.len(),
            Source::Path(p) => {
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
        parse_cpu_stat_usage_us(self.path(), bytes)
    }

    /// A one-integer file such as `memory.current`.
    pub fn read_u64(&self) -> Result<u64, HostError> {
        let mut buf = [0u8; 64];
        let bytes = self.read(&mut buf)?;
        let s = std::str::from_utf8(bytes)
            .map_err(|_| HostError::malformed(self.path(), "not valid UTF-8"))?;
        parse_u64(self.path(), s)
    }
}

/// Finds `usage_usec` in `cpu.stat` content. Unknown keys are ignored (kernels add them); a
/// missing or repeated `usage_usec` is an error, because billing a guess is worse than a gap.
pub fn parse_cpu_stat_usage_us(path: &Path, bytes: &[u8]) -> Result<u64, HostError> {
    let text =
        std::str::from_utf8(bytes).map_err(|_| HostError::malformed(path, "not valid UTF-8"))?;
    // The kernel writes `usage_usec N` first: read it straight, and the rest only to make sure
    // it does not name `usage_usec` again (every line that could is a line that contains it).
    if let Some((first, rest)) = text.split_once('\n') {
        if let Some(digits) = first.strip_prefix("usage_usec ") {
            if !digits.is_empty()
                && digits.bytes().all(|b| b.is_ascii_digit())
                && !rest.contains("usage_usec")
            {
                return parse_u64(path, digits);
            }
        }
    }
    usage_by_lines(path, text)
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
