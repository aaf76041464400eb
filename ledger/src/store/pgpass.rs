//! The PostgreSQL password file (`PGPASSFILE`, else `~/.pgpass`), as libpq reads it: one
//! `hostname:port:database:username:password` per line, `*` matching anything, `\:` and `\\`
//! escaping, `#` starting a comment. Ignored (with a warning) unless only its owner can read
//! it. tokio-postgres does not read it, and a password in the store URL would be on the
//! command line, where every local user can read it.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

/// Where the password file is: `PGPASSFILE`, else `$HOME/.pgpass`.
pub fn location() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PGPASSFILE").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("HOME").map(|h| Path::new(&h).join(".pgpass"))
}

/// Splits one line into its fields, undoing `\:` and `\\`.
fn fields(line: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    if let Some(f) = out.last_mut() {
                        f.push(n);
                    }
                }
            }
            ':' => out.push(String::new()),
            _ => {
                if let Some(f) = out.last_mut() {
                    f.push(c);
                }
            }
        }
    }
    out
}

/// The password for (host, port, database, user) in the file's text: the first line that
/// matches.
pub fn lookup(text: &str, host: &str, port: u16, database: &str, user: &str) -> Option<String> {
    let port = port.to_string();
    let want = [host, port.as_str(), database, user];
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .map(fields)
        .filter(|f| f.len() == 5)
        .find(|f| {
            f.iter()
                .zip(want.iter())
                .all(|(pattern, value)| pattern == "*" || pattern == value)
        })
        .and_then(|mut f| f.pop())
}

/// The password for (host, port, database, user) from the file at `path`, if it has one and
/// only its owner can read it.
pub fn password_for(
    path: &Path,
    host: &str,
    port: u16,
    database: &str,
    user: &str,
) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() {
        return None;
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        tracing::warn!(
            file = %path.display(),
            mode = format!("{mode:o}"),
            "password file ignored: group or others can read it (chmod 600)"
        );
        return None;
    }
    let text = std::fs::read_to_string(path).ok()?;
    lookup(&text, host, port, database, user)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_match_with_wildcards_escapes_and_comments() {
        let text = "# comment\n\
                    db.internal:5432:ledger:meter:first\n\
                    *:*:*:meter:second\n\
                    127.0.0.1:54329:*:odd:pa\\:ss\\\\word\n\
                    short:line\n";
        assert_eq!(
            lookup(text, "db.internal", 5432, "ledger", "meter").as_deref(),
            Some("first")
        );
        assert_eq!(
            lookup(text, "db.internal", 5433, "ledger", "meter").as_deref(),
            Some("second")
        );
        assert_eq!(
            lookup(text, "127.0.0.1", 54329, "x", "odd").as_deref(),
            Some("pa:ss\\word")
        );
        assert_eq!(lookup(text, "127.0.0.1", 54329, "x", "nobody"), None);
    }

    #[test]
    fn a_file_others_can_read_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pgpass");
        std::fs::write(&p, "*:*:*:u:secret\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(password_for(&p, "h", 1, "d", "u"), None);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            password_for(&p, "h", 1, "d", "u").as_deref(),
            Some("secret")
        );
    }
}
