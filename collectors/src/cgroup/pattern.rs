//! Run patterns (`flowzart.slice/run-{run_id}.scope`) and the validation of everything that names
//! a run: run ids and cgroup paths, whether they come from cgroupfs or from the control plane.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::error::{HostError, Shown};

/// The placeholder a pattern's last component carries.
pub const RUN_ID_PLACEHOLDER: &str = "{run_id}";
/// Longest run id accepted: ids become labels and record keys, so they are bounded.
pub const RUN_ID_MAX_BYTES: usize = wattd_proto::names::RUN_ID_MAX_BYTES;
/// Longest cgroup path accepted, relative to the cgroup root. With the mount point in front it
/// stays under PATH_MAX (4096), so every path we build can be opened.
pub const CGROUP_REL_MAX_BYTES: usize = 3840;

/// A parsed pattern: literal parent components, then one component `prefix{run_id}suffix`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunPattern {
    raw: String,
    parent: PathBuf,
    prefix: String,
    suffix: String,
}

/// How a directory name relates to a pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NameMatch {
    /// The name is the pattern's, with this run id.
    Run(String),
    /// Unrelated name (a sibling cgroup): ignored.
    NoMatch,
    /// The name has the pattern's shape but a run id we refuse (counted, never tracked).
    Hostile(&'static str),
}

impl RunPattern {
    /// Parses a pattern. `{run_id}` must appear once, in the last component, because inotify
    /// then only has to watch one directory per pattern; components are literal otherwise.
    pub fn parse(raw: &str) -> Result<Self, HostError> {
        let bad = |what| HostError::BadRunRef {
            field: "runs.patterns",
            value: Shown::new(raw),
            what,
        };
        if raw.matches(RUN_ID_PLACEHOLDER).count() != 1 {
            return Err(bad("must contain {run_id} exactly once"));
        }
        let rel = Path::new(raw);
        if rel.is_absolute() {
            return Err(bad("must be relative to the cgroup root"));
        }
        validate_cgroup_rel(raw).map_err(|_| bad("not a clean relative path"))?;
        let (parent, last) = raw.rsplit_once('/').unwrap_or(("", raw));
        let Some((prefix, suffix)) = last.split_once(RUN_ID_PLACEHOLDER) else {
            return Err(bad("{run_id} must be in the last component"));
        };
        let special = |s: &str| s.contains(['{', '}', '*', '?', '[']);
        if special(parent) || special(prefix) || special(suffix) {
            return Err(bad("only {run_id} is special; globs are not supported"));
        }
        Ok(RunPattern {
            raw: raw.to_owned(),
            parent: PathBuf::from(parent),
            prefix: prefix.to_owned(),
            suffix: suffix.to_owned(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// The directory (relative to the cgroup root) whose children are candidate runs.
    pub fn parent(&self) -> &Path {
        &self.parent
    }

    /// The run's cgroup path relative to the cgroup root.
    pub fn cgroup_rel(&self, run_dir_name: &str) -> String {
        if self.parent.as_os_str().is_empty() {
            run_dir_name.to_owned()
        } else {
            format!("{}/{run_dir_name}", self.parent.display())
        }
    }

    /// Matches one directory name from cgroupfs (raw bytes: it may not be UTF-8).
    pub fn match_name(&self, name: &OsStr) -> NameMatch {
        let b = name.as_bytes();
        let (p, s) = (self.prefix.as_bytes(), self.suffix.as_bytes());
        if b.len() < p.len() + s.len() || !b.starts_with(p) || !b.ends_with(s) {
            return NameMatch::NoMatch;
        }
        let mid = &b[p.len()..b.len() - s.len()];
        let Ok(id) = std::str::from_utf8(mid) else {
            return NameMatch::Hostile("run id is not UTF-8");
        };
        match run_id_problem(id) {
            None => NameMatch::Run(id.to_owned()),
            Some(why) => NameMatch::Hostile(why),
        }
    }
}

/// The contract's rule (`wattd_proto::names`), shared with the ledger.
fn run_id_problem(id: &str) -> Option<&'static str> {
    wattd_proto::names::run_id_problem(id)
}

/// Checks a run id: 1 to 128 bytes of `A-Z a-z 0-9 - _ . : @`, not `.` or `..`.
pub fn validate_run_id(id: &str) -> Result<(), HostError> {
    match run_id_problem(id) {
        None => Ok(()),
        Some(what) => Err(HostError::BadRunRef {
            field: "run_id",
            value: Shown::new(id),
            what,
        }),
    }
}

/// Checks a cgroup path relative to the cgroup root: non-empty components, no `.` or `..`, no
/// leading `/`, no control characters (a newline would forge lines in logs and text output),
/// at most [`CGROUP_REL_MAX_BYTES`]. Spaces and other printable characters are the kernel's
/// business and are allowed.
pub fn validate_cgroup_rel(rel: &str) -> Result<(), HostError> {
    let bad = |what| HostError::BadRunRef {
        field: "cgroup",
        value: Shown::new(rel),
        what,
    };
    if rel.is_empty() {
        return Err(bad("empty"));
    }
    if rel.len() > CGROUP_REL_MAX_BYTES {
        return Err(bad("longer than 3840 bytes"));
    }
    if rel.starts_with('/') {
        return Err(bad("must be relative to the cgroup root"));
    }
    if rel.chars().any(char::is_control) {
        return Err(bad("contains a control character"));
    }
    for comp in rel.split('/') {
        if comp.is_empty() || comp == "." || comp == ".." {
            return Err(bad("has an empty, . or .. component"));
        }
        if comp.len() > 255 {
            return Err(bad("has a component longer than 255 bytes"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn pattern_parse_table() {
        let ok = RunPattern::parse("flowzart.slice/run-{run_id}.scope").unwrap();
        assert_eq!(ok.parent(), Path::new("flowzart.slice"));
        assert_eq!(ok.cgroup_rel("run-a.scope"), "flowzart.slice/run-a.scope");
        let top = RunPattern::parse("{run_id}").unwrap();
        assert_eq!(top.parent(), Path::new(""));
        assert_eq!(top.cgroup_rel("x"), "x");
        for bad in [
            "",
            "flowzart.slice/run.scope",
            "/abs/{run_id}",
            "a/{run_id}/b",
            "{run_id}/{run_id}",
            "a/../{run_id}",
            "a//{run_id}",
            "a/*/{run_id}",
            "a/{run_id}*",
            "a\n/{run_id}",
        ] {
            let e = RunPattern::parse(bad).unwrap_err();
            assert!(e.to_string().contains("runs.patterns"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn name_match_table() {
        let p = RunPattern::parse("s/run-{run_id}.scope").unwrap();
        let long = format!("run-{}.scope", "a".repeat(200));
        let cases: Vec<(&[u8], NameMatch)> = vec![
            (b"run-abc.scope", NameMatch::Run("abc".into())),
            (
                b"run-a:b@c_d-1.2.scope",
                NameMatch::Run("a:b@c_d-1.2".into()),
            ),
            (b"other.scope", NameMatch::NoMatch),
            (b"run-.scope", NameMatch::Hostile("run id is empty")),
            (b"run-...scope", NameMatch::Hostile("run id is . or ..")),
            (
                b"run-a b.scope",
                NameMatch::Hostile("run id may hold only A-Z a-z 0-9 - _ . : @"),
            ),
            (
                b"run-a\nb.scope",
                NameMatch::Hostile("run id may hold only A-Z a-z 0-9 - _ . : @"),
            ),
            (
                b"run-\xff\xfe.scope",
                NameMatch::Hostile("run id is not UTF-8"),
            ),
            (
                long.as_bytes(),
                NameMatch::Hostile("run id is longer than 128 bytes"),
            ),
            (b"run-.scop", NameMatch::NoMatch),
        ];
        for (name, want) in cases {
            assert_eq!(p.match_name(OsStr::from_bytes(name)), want, "{name:?}");
        }
    }

    #[test]
    fn cgroup_rel_table() {
        for ok in ["a", "a/b c/d", "x.slice/run-1.scope"] {
            validate_cgroup_rel(ok).unwrap();
        }
        let long_comp = "a".repeat(256);
        let long_path = ["b"; 2000].join("/");
        for bad in [
            "",
            "/a",
            "a/../b",
            "..",
            "a/./b",
            "a//b",
            "a/",
            "a\nb",
            "a\0b",
            long_comp.as_str(),
            long_path.as_str(),
        ] {
            let e = validate_cgroup_rel(bad).unwrap_err();
            assert!(e.to_string().starts_with("cgroup "), "{bad:?}: {e}");
        }
    }
}
