//! Finding the cgroup2 mount in `<root>/proc/self/mountinfo`: `/sys/fs/cgroup` on pure-v2 hosts,
//! `/sys/fs/cgroup/unified` on hybrid ones.

use std::path::{Path, PathBuf};

use crate::error::{HostError, HINT_GENERIC};
use crate::hostfs::{read_bounded, HostRoot, LARGE_FILE_MAX};

/// A cgroup2 mount as mountinfo lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroup2Mount {
    /// Where it is mounted, host-absolute (not yet joined under a [`HostRoot`]).
    pub mount_point: PathBuf,
    /// The subtree of the hierarchy the mount shows (`/` unless in a cgroup namespace).
    pub hierarchy_root: PathBuf,
}

/// Reads `<root>/proc/self/mountinfo` and returns the cgroup2 mount.
pub fn find_cgroup2_mount(root: &HostRoot) -> Result<Cgroup2Mount, HostError> {
    let path = root.join("proc/self/mountinfo");
    let text = read_bounded(&path, LARGE_FILE_MAX, HINT_GENERIC)?;
    parse_mountinfo(&path, &text)
}

/// Picks the cgroup2 mount from mountinfo text. When several are listed (a container that also
/// sees its host's), the canonical places win, then the first listed, so the choice does not
/// depend on mount order at the canonical paths.
pub fn parse_mountinfo(path: &Path, text: &str) -> Result<Cgroup2Mount, HostError> {
    let mut found: Vec<Cgroup2Mount> = Vec::new();
    for line in text.lines() {
        // Fields: id parent maj:min root mount_point options [optional...] - fstype source opts.
        // Malformed lines are skipped: mountinfo is written by the kernel, and a line we cannot
        // read is not a cgroup2 line we could use anyway.
        let fields: Vec<&str> = line.split_ascii_whitespace().collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if sep < 6 || fields.get(sep + 1) != Some(&"cgroup2") {
            continue;
        }
        let (Some(root), Some(mp)) = (unescape(fields[3]), unescape(fields[4])) else {
            continue;
        };
        found.push(Cgroup2Mount {
            mount_point: PathBuf::from(mp),
            hierarchy_root: PathBuf::from(root),
        });
    }
    for preferred in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        if let Some(m) = found.iter().find(|m| m.mount_point == Path::new(preferred)) {
            return Ok(m.clone());
        }
    }
    found
        .into_iter()
        .next()
        .ok_or_else(|| HostError::NoCgroup2Mount {
            path: path.to_owned(),
        })
}

/// Undoes mountinfo's octal escapes (`\040` space, `\011` tab, `\012` newline, `\134`
/// backslash). `None` for a bad escape or a result that is not UTF-8.
fn unescape(field: &str) -> Option<String> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            let oct = b.get(i + 1..i + 4)?;
            if !oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                return None;
            }
            let v = oct
                .iter()
                .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
            out.push(u8::try_from(v).ok()?);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn mountinfo_table() {
        let p = Path::new("/h/proc/self/mountinfo");
        let cases: &[(&str, Option<(&str, &str)>)] = &[
            (HYBRID, Some(("/sys/fs/cgroup/unified", "/"))),
            (
                "29 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n",
                Some(("/sys/fs/cgroup", "/")),
            ),
            // Optional fields of any number before the separator.
            (
                "29 23 0:26 /a /mnt/c\\040g rw shared:4 master:1 - cgroup2 none rw\n",
                Some(("/mnt/c g", "/a")),
            ),
            (
                "1 0 0:1 / /x\\012y rw - cgroup2 none rw\n",
                Some(("/x\ny", "/")),
            ),
            // The canonical place wins over an earlier odd one.
            (
                "1 0 0:1 / /odd rw - cgroup2 none rw\n2 0 0:1 / /sys/fs/cgroup rw - cgroup2 none rw\n",
                Some(("/sys/fs/cgroup", "/")),
            ),
            // Bad escape, truncated line, no separator: skipped.
            ("1 0 0:1 / /x\\9 rw - cgroup2 none rw\n", None),
            ("1 0 0:1 / - cgroup2\n", None),
            ("1 0 0:1 / /y rw cgroup2 none rw\n", None),
            ("", None),
            // A cgroup v1 mount is not cgroup2.
            (
                "32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n",
                None,
            ),
        ];
        for (text, want) in cases {
            match (parse_mountinfo(p, text), want) {
                (Ok(m), Some((mp, root))) => {
                    assert_eq!(m.mount_point, Path::new(mp), "{text:?}");
                    assert_eq!(m.hierarchy_root, Path::new(root), "{text:?}");
                }
                (Err(e), None) => {
                    assert!(matches!(e, HostError::NoCgroup2Mount { .. }), "{e}");
                    assert!(e.to_string().contains("/h/proc/self/mountinfo"), "{e}");
                }
                (got, want) => panic!("{text:?}: want {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn prometheus_fixture_has_no_cgroup2() {
        let fixture = wattd_testkit::host_fixture("prometheus-procfs/proc/26231/mountinfo");
        let text = std::fs::read_to_string(&fixture).unwrap();
        let e = parse_mountinfo(&fixture, &text).unwrap_err();
        assert!(matches!(e, HostError::NoCgroup2Mount { .. }), "{e}");
    }

    #[test]
    fn unescape_forms() {
        assert_eq!(unescape("a\\040b").as_deref(), Some("a b"));
        assert_eq!(unescape("a\\134b").as_deref(), Some("a\\b"));
        assert_eq!(unescape("a\\04").as_deref(), None);
        assert_eq!(unescape("a\\400").as_deref(), None);
        assert_eq!(unescape("\\377").as_deref(), None);
    }
}
