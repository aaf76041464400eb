//! Reading host files safely: a root prefix for every path, bounded reads, strict integer
//! parsing, and kept-open descriptors read with pread.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{HostError, Shown, HINT_GENERIC};

/// The prefix under which every `/sys`, `/proc` and `/dev` path is read: `/` on a live host, a
/// fixture tree in tests, a simulated host's directory in end-to-end tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostRoot(PathBuf);

impl HostRoot {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        HostRoot(root.into())
    }

    /// The live host.
    pub fn live() -> Self {
        HostRoot(PathBuf::from("/"))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// True when this root is the running kernel's own `/` (perf events and MSRs are only
    /// meaningful there).
    pub fn is_live(&self) -> bool {
        self.0 == Path::new("/")
    }

    /// Joins a host-absolute path (`sys/class/powercap`, with or without a leading `/`).
    pub fn join(&self, host_path: impl AsRef<Path>) -> PathBuf {
        let p = host_path.as_ref();
        let rel = p.strip_prefix("/").unwrap_or(p);
        self.0.join(rel)
    }
}

/// Default bound for a sysfs attribute read.
pub const SMALL_FILE_MAX: usize = 64 * 1024;
/// Bound for /proc/stat and similar (a large host's interrupt line is long).
pub const LARGE_FILE_MAX: usize = 8 * 1024 * 1024;

/// Reads a whole file of at most `limit` bytes as UTF-8.
pub fn read_bounded(path: &Path, limit: usize, hint: &'static str) -> Result<String, HostError> {
    let file = File::open(path).map_err(|e| HostError::io(path, e, hint))?;
    let mut buf = Vec::new();
    file.take(limit as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| HostError::io(path, e, hint))?;
    if buf.len() > limit {
        return Err(HostError::TooBig {
            path: path.to_owned(),
            limit,
        });
    }
    String::from_utf8(buf).map_err(|_| HostError::malformed(path, "not valid UTF-8"))
}

/// Reads a small sysfs attribute, trimmed.
pub fn read_attr(path: &Path) -> Result<String, HostError> {
    let s = read_bounded(path, SMALL_FILE_MAX, HINT_GENERIC)?;
    Ok(s.trim().to_owned())
}

/// Reads a small attribute holding one unsigned integer.
pub fn read_u64(path: &Path, hint: &'static str) -> Result<u64, HostError> {
    let s = read_bounded(path, SMALL_FILE_MAX, hint)?;
    parse_u64(path, &s)
}

/// Parses one unsigned decimal integer, surrounded by optional whitespace, strictly: no sign, no
/// fraction, no more than 64 bits. Every failure names the path and shows the value.
pub fn parse_u64(path: &Path, raw: &str) -> Result<u64, HostError> {
    let s = raw.trim();
    if s.is_empty() {
        return Err(HostError::Empty {
            path: path.to_owned(),
        });
    }
    if let Some(rest) = s.strip_prefix('-') {
        if !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()) {
            return Err(HostError::Negative {
                path: path.to_owned(),
                value: Shown::new(s),
            });
        }
    }
    if !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HostError::NotNumeric {
            path: path.to_owned(),
            value: Shown::new(s),
        });
    }
    s.parse::<u64>().map_err(|_| HostError::TooLarge {
        path: path.to_owned(),
        value: Shown::new(s),
    })
}

/// Parses a kernel CPU list such as `0-3,8,10-11`. Bounded: at most `max_cpu` is accepted.
pub fn parse_cpu_list(path: &Path, raw: &str) -> Result<Vec<u32>, HostError> {
    const CPU_MAX: u32 = 65_535;
    let mut out = Vec::new();
    let s = raw.trim();
    if s.is_empty() {
        return Ok(out);
    }
    for part in s.split(',') {
        let bad = || HostError::malformed(path, format!("bad CPU list item {}", Shown::new(part)));
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (
                a.trim().parse::<u32>().map_err(|_| bad())?,
                b.trim().parse::<u32>().map_err(|_| bad())?,
            ),
            None => {
                let v = part.trim().parse::<u32>().map_err(|_| bad())?;
                (v, v)
            }
        };
        if lo > hi || hi > CPU_MAX {
            return Err(bad());
        }
        out.extend(lo..=hi);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// A file kept open and re-read from offset 0 with pread on every sample: one syscall per read,
/// no path walk, and the same inode even if a path is swapped under us.
#[derive(Debug)]
pub struct KeptFile {
    path: PathBuf,
    file: File,
    hint: &'static str,
}

impl KeptFile {
    pub fn open(path: &Path, hint: &'static str) -> Result<Self, HostError> {
        let file = File::open(path).map_err(|e| HostError::io(path, e, hint))?;
        Ok(KeptFile {
            path: path.to_owned(),
            file,
            hint,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads up to `buf.len()` bytes from offset 0; returns the filled prefix.
    pub fn pread<'b>(&self, buf: &'b mut [u8]) -> Result<&'b [u8], HostError> {
        let n = self
            .file
            .read_at(buf, 0)
            .map_err(|e| HostError::io(&self.path, e, self.hint))?;
        Ok(&buf[..n])
    }

    /// Reads the whole (small) content as one unsigned integer.
    pub fn read_u64(&self) -> Result<u64, HostError> {
        let mut buf = [0u8; 64];
        let bytes = self.pread(&mut buf)?;
        if bytes.len() == 64 {
            return Err(HostError::TooBig {
                path: self.path.clone(),
                limit: 63,
            });
        }
        let s = std::str::from_utf8(bytes)
            .map_err(|_| HostError::malformed(&self.path, "not valid UTF-8"))?;
        parse_u64(&self.path, s)
    }

    /// Reads 8 bytes at `offset` (an MSR register) as a little-endian u64.
    pub fn read_u64_at(&self, offset: u64) -> Result<u64, HostError> {
        let mut buf = [0u8; 8];
        self.file
            .read_exact_at(&mut buf, offset)
            .map_err(|e| HostError::io(&self.path, e, self.hint))?;
        Ok(u64::from_le_bytes(buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_u64_table() {
        let p = Path::new("/x/energy_uj");
        let cases: &[(&str, Result<u64, &str>)] = &[
            ("123\n", Ok(123)),
            ("  0 ", Ok(0)),
            ("18446744073709551615", Ok(u64::MAX)),
            ("", Err("empty")),
            ("\n", Err("empty")),
            ("-5", Err("negative")),
            ("12a", Err("not a non-negative integer")),
            ("1.5", Err("not a non-negative integer")),
            ("+5", Err("not a non-negative integer")),
            (
                "1234567890123456789012345678901234567890",
                Err("does not fit in 64 bits"),
            ),
            ("18446744073709551616", Err("does not fit in 64 bits")),
        ];
        for (input, want) in cases {
            let got = parse_u64(p, input);
            match (want, got) {
                (Ok(w), Ok(g)) => assert_eq!(*w, g, "input {input:?}"),
                (Err(w), Err(e)) => {
                    let msg = e.to_string();
                    assert!(msg.contains(w), "input {input:?}: {msg}");
                    assert!(msg.contains("/x/energy_uj"), "names the path: {msg}");
                }
                (w, g) => panic!("input {input:?}: want {w:?}, got {g:?}"),
            }
        }
    }

    #[test]
    fn cpu_list_forms() {
        let p = Path::new("online");
        assert_eq!(
            parse_cpu_list(p, "0-3,8,10-11\n").unwrap(),
            vec![0, 1, 2, 3, 8, 10, 11]
        );
        assert_eq!(parse_cpu_list(p, "0").unwrap(), vec![0]);
        assert!(parse_cpu_list(p, "").unwrap().is_empty());
        assert!(parse_cpu_list(p, "3-1").is_err());
        assert!(parse_cpu_list(p, "x").is_err());
        assert!(parse_cpu_list(p, "0-4000000000").is_err());
    }

    #[test]
    fn shown_values_are_bounded_and_escaped() {
        let long = "7".repeat(10_000);
        let e = parse_u64(Path::new("f"), &format!("{long}x"))
            .unwrap_err()
            .to_string();
        assert!(e.len() < 200, "{e}");
        let e = parse_u64(Path::new("f"), "1\n2").unwrap_err().to_string();
        assert!(e.contains("\\n"), "{e}");
    }
}
