//! Who may read the ledger: the readers file (`--readers`) names each reader by the CN of its
//! client certificate (issued by `--reader-ca`, not the nodes' CA) and gives it a role:
//!
//! ```toml
//! [readers]
//! "metering-pipeline" = "metering"        # every run of every account
//! "account-view-acme" = "account:acme"    # only runs whose account label is "acme"
//! ```
//!
//! The file is re-read when it changes (checked at every call), so a reader is added or removed
//! without a restart; a file that no longer parses keeps the last good one and says why.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// What a reader may see.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// Everything: the metering pipeline.
    Metering,
    /// The runs whose account label has this value: one customer's account view.
    Account(String),
}

/// Why a role is refused; each names the role as written.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RoleError {
    #[error("role {0:?} is neither \"metering\" nor \"account:<id>\"")]
    Unknown(String),
    #[error("role {0:?}: the account id is empty")]
    EmptyAccount(String),
    #[error("role {role:?}: {problem}")]
    BadAccount { role: String, problem: &'static str },
}

/// Why a readers file is refused; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum ReadersError {
    #[error("--readers {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Syntax { path: PathBuf, message: String },
    /// Every bad reader, one line each, naming the file and the reader.
    #[error("{}", problems.join("\n"))]
    Readers { problems: Vec<String> },
}

impl Role {
    /// `metering` or `account:<id>`, the id a run label value (at most 256 bytes, no control
    /// characters, not empty).
    pub fn parse(s: &str) -> Result<Role, RoleError> {
        if s == "metering" {
            return Ok(Role::Metering);
        }
        let Some(id) = s.strip_prefix("account:") else {
            return Err(RoleError::Unknown(s.to_owned()));
        };
        if id.is_empty() {
            return Err(RoleError::EmptyAccount(s.to_owned()));
        }
        if let Some(problem) = wattd_proto::names::label_problem("account", id) {
            return Err(RoleError::BadAccount {
                role: s.to_owned(),
                problem,
            });
        }
        Ok(Role::Account(id.to_owned()))
    }

    pub fn text(&self) -> String {
        match self {
            Role::Metering => "metering".into(),
            Role::Account(id) => format!("account:{id}"),
        }
    }

    /// Whether this role may see a run of `account` (None: the run carried no account label,
    /// which only the metering role sees).
    pub fn sees(&self, account: Option<&str>) -> bool {
        match self {
            Role::Metering => true,
            Role::Account(id) => account == Some(id.as_str()),
        }
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileShape {
    readers: BTreeMap<String, String>,
}

/// The readers and their roles.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Readers {
    roles: BTreeMap<String, Role>,
}

impl Readers {
    /// Parses a readers file; every problem is listed, each naming the file and the reader.
    pub fn parse(path: &Path, text: &str) -> Result<Readers, ReadersError> {
        let shape: FileShape = toml::from_str(text).map_err(|e| ReadersError::Syntax {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let mut problems = Vec::new();
        let mut roles = BTreeMap::new();
        for (cn, role) in shape.readers {
            if cn.is_empty() || cn.len() > 256 || cn.chars().any(char::is_control) {
                problems.push(format!(
                    "{}: reader {:?}: a certificate CN of 1 to 256 bytes without control \
                     characters",
                    path.display(),
                    cn.escape_debug().to_string()
                ));
                continue;
            }
            match Role::parse(&role) {
                Ok(r) => {
                    roles.insert(cn, r);
                }
                Err(e) => problems.push(format!("{}: reader {cn:?}: {e}", path.display())),
            }
        }
        if problems.is_empty() {
            Ok(Readers { roles })
        } else {
            Err(ReadersError::Readers { problems })
        }
    }

    pub fn load(path: &Path) -> Result<Readers, ReadersError> {
        let text = std::fs::read_to_string(path).map_err(|source| ReadersError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    pub fn role(&self, cn: &str) -> Option<&Role> {
        self.roles.get(cn)
    }

    pub fn len(&self) -> usize {
        self.roles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.roles.is_empty()
    }
}

/// A file's modification time and size, to notice a change without reading it.
type Stamp = Option<(SystemTime, u64)>;

/// The readers file, re-read when its modification time or size changes.
#[derive(Debug)]
pub struct ReadersFile {
    path: PathBuf,
    current: Mutex<(Stamp, Arc<Readers>)>,
}

impl ReadersFile {
    /// Loads the file now; a problem here is a configuration error.
    pub fn open(path: &Path) -> Result<Self, ReadersError> {
        let stamp = stamp(path);
        let readers = Readers::load(path)?;
        Ok(ReadersFile {
            path: path.to_owned(),
            current: Mutex::new((stamp, Arc::new(readers))),
        })
    }

    /// The readers as the file says now: the last good version if it no longer parses, none
    /// if it is gone (removing the file revokes every reader).
    pub fn current(&self) -> Arc<Readers> {
        let now = stamp(&self.path);
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if now.is_none() && cur.0.is_some() {
            tracing::error!(file = %self.path.display(), "the readers file is gone: no reader may read");
            *cur = (None, Arc::new(Readers::default()));
        }
        if now.is_some() && now != cur.0 {
            match Readers::load(&self.path) {
                Ok(r) => {
                    tracing::info!(file = %self.path.display(), readers = r.len(), "readers file reloaded");
                    *cur = (now, Arc::new(r));
                }
                Err(error) => {
                    tracing::error!(%error, "readers file not reloaded; the previous one stays");
                    cur.0 = now;
                }
            }
        }
        Arc::clone(&cur.1)
    }
}

fn stamp(path: &Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_parse_and_bad_ones_are_named() {
        assert_eq!(Role::parse("metering"), Ok(Role::Metering));
        assert_eq!(
            Role::parse("account:acme"),
            Ok(Role::Account("acme".into()))
        );
        for bad in ["", "admin", "account:", "account:a\u{7}b", "Metering"] {
            assert!(Role::parse(bad).is_err(), "{bad:?}");
        }
        // What an operator reads at `serve`: the role as written, and why.
        let said = |s: &str| {
            Role::parse(s)
                .map(|_| String::new())
                .unwrap_or_else(|e| e.to_string())
        };
        assert_eq!(
            said("admin"),
            r#"role "admin" is neither "metering" nor "account:<id>""#
        );
        assert_eq!(
            said("account:"),
            r#"role "account:": the account id is empty"#
        );
        assert!(said("account:a\u{7}b").starts_with(r#"role "account:a\u{7}b": "#));
        let missing = Readers::load(Path::new("/nonexistent/readers.toml")).unwrap_err();
        assert!(
            missing
                .to_string()
                .starts_with("--readers /nonexistent/readers.toml: "),
            "{missing}"
        );
        assert!(matches!(missing, ReadersError::Read { .. }));
        let p = Path::new("readers.toml");
        let r = Readers::parse(
            p,
            "[readers]\nmetering-pipeline = \"metering\"\n\"view-acme\" = \"account:acme\"\n",
        )
        .unwrap();
        assert_eq!(r.role("metering-pipeline"), Some(&Role::Metering));
        assert_eq!(r.role("view-acme"), Some(&Role::Account("acme".into())));
        assert_eq!(r.role("node-1"), None);
        let e = Readers::parse(p, "[readers]\nx = \"root\"\ny = \"account:\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("reader \"x\"") && e.contains("reader \"y\""),
            "{e}"
        );
        assert!(Readers::parse(p, "[readers]\n[extra]\n").is_err());
        assert!(Readers::parse(p, "readers = 1").is_err());
        assert!(Role::Account("a".into()).sees(Some("a")));
        assert!(!Role::Account("a".into()).sees(Some("b")));
        assert!(!Role::Account("a".into()).sees(None));
        assert!(Role::Metering.sees(None));
    }

    #[test]
    fn the_file_is_reread_when_it_changes_and_a_bad_one_keeps_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("readers.toml");
        std::fs::write(&path, "[readers]\na = \"metering\"\n").unwrap();
        let f = ReadersFile::open(&path).unwrap();
        assert_eq!(f.current().len(), 1);
        std::fs::write(&path, "[readers]\na = \"metering\"\nbb = \"account:x\"\n").unwrap();
        assert_eq!(f.current().role("bb"), Some(&Role::Account("x".into())));
        std::fs::write(&path, "[readers]\na = \"nonsense-role\"\n").unwrap();
        assert_eq!(f.current().len(), 2, "a bad file keeps the last good one");
        std::fs::remove_file(&path).unwrap();
        assert!(
            f.current().is_empty(),
            "a removed file revokes every reader"
        );
    }
}
