//! Node enrolment: which nodes may talk to the ledger and with which signing keys, read from a
//! directory of public identities (`wattd identity` output, or a node's `node.pub`).
//!
//! Every problem of every file is collected and reported at once (a bad enrolment directory is
//! a start-up error, exit 64), so an operator fixes them in one pass.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use wattd_records::identity::{key_id_of, KeyId, PublicIdentity, PublicKeysFile};

use crate::plausible::Declared;

/// A file bigger than this is not an identity file.
const FILE_MAX_BYTES: u64 = 64 * 1024;
/// At most this many identity files are read (a fleet, not an accident).
const FILES_MAX: usize = 100_000;
/// The longest node id accepted (also a certificate CN, which X.520 caps at 64 characters, but
/// node ids come from config or /etc/machine-id; 255 leaves room and still bounds labels).
pub const NODE_ID_MAX_BYTES: usize = 255;

/// One enrolled public key.
#[derive(Clone, Debug)]
pub struct EnrolledKey {
    pub identity: PublicIdentity,
    pub key_id: KeyId,
    /// The file it came from (first one, when several files enrol the same key).
    pub file: PathBuf,
}

/// The enrolled nodes and their keys, by node id then key epoch.
#[derive(Clone, Debug, Default)]
pub struct Enrolment {
    nodes: BTreeMap<String, BTreeMap<u32, EnrolledKey>>,
    /// What each node's enrolment declares of its hardware (the `[limits]` table), with the
    /// file it came from.
    declared: BTreeMap<String, (Declared, PathBuf)>,
    /// Key epochs revoked per node (`revoked_epochs` in any of its files).
    revoked: BTreeMap<String, std::collections::BTreeSet<u32>>,
}

/// What one enrolment file holds.
struct EnrolmentFile {
    identities: Vec<PublicIdentity>,
    declared: Option<Declared>,
    revoked_epochs: Vec<u32>,
}

/// Every problem found in an enrolment directory, one line each, naming the file.
#[derive(Debug, thiserror::Error)]
#[error("enrolment directory {}: {} problem(s):\n  {}", dir.display(), problems.len(), problems.join("\n  "))]
pub struct EnrolmentError {
    pub dir: PathBuf,
    pub problems: Vec<String>,
}

/// Parses one enrolment file's text: its identities, its optional `[limits]` table and its
/// optional `revoked_epochs` list.
fn parse_file(text: &str) -> Result<EnrolmentFile, String> {
    let plain = |identities| EnrolmentFile {
        identities,
        declared: None,
        revoked_epochs: Vec::new(),
    };
    let Ok(mut table) = text.parse::<toml::Table>() else {
        return parse_identities(text).map(plain);
    };
    let limits = table.remove("limits");
    let revoked = table.remove("revoked_epochs");
    if limits.is_none() && revoked.is_none() {
        return parse_identities(text).map(plain);
    }
    let declared = match limits {
        Some(l) => {
            let d: Declared = l
                .try_into()
                .map_err(|e: toml::de::Error| format!("[limits]: {}", e.message().trim()))?;
            let problems = d.problems();
            if !problems.is_empty() {
                return Err(problems.join("; "));
            }
            Some(d)
        }
        None => None,
    };
    let revoked_epochs: Vec<u32> = match revoked {
        Some(r) => r.try_into().map_err(|e: toml::de::Error| {
            format!(
                "revoked_epochs: {} (a list of key epochs)",
                e.message().trim()
            )
        })?,
        None => Vec::new(),
    };
    let rest = toml::to_string(&table).map_err(|e| e.to_string())?;
    Ok(EnrolmentFile {
        identities: parse_identities(&rest)?,
        declared,
        revoked_epochs,
    })
}

/// Parses one identity file's text: a flat `PublicIdentity` or a `[[key]]` list.
fn parse_identities(text: &str) -> Result<Vec<PublicIdentity>, String> {
    match toml::from_str::<PublicIdentity>(text) {
        Ok(one) => Ok(vec![one]),
        Err(flat) => match toml::from_str::<PublicKeysFile>(text) {
            // An empty list; a text with no key at all (say an empty file) gets the flat form's
            // error, which names what is missing.
            Ok(f) if f.key.is_empty() && text.contains("key") => Err("no [[key]] entries".into()),
            Ok(f) if f.key.is_empty() => Err(flat.message().trim().to_owned()),
            Ok(f) => Ok(f.key),
            // Report the flat form's error unless the file clearly tries the list form.
            Err(list) if text.contains("[[key]]") => Err(list.message().trim().to_owned()),
            Err(_) => Err(flat.message().trim().to_owned()),
        },
    }
}

fn read_bounded(path: &Path) -> Result<String, String> {
    let f = fs::File::open(path).map_err(|e| e.to_string())?;
    let meta = f.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.len() > FILE_MAX_BYTES {
        return Err(format!(
            "{} bytes, more than an identity file's {FILE_MAX_BYTES}",
            meta.len()
        ));
    }
    let mut text = String::new();
    f.take(FILE_MAX_BYTES)
        .read_to_string(&mut text)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidData => "not UTF-8".to_owned(),
            _ => e.to_string(),
        })?;
    Ok(text)
}

/// Checks a node id taken from a file or a certificate: non-empty, bounded, printable.
pub fn check_node_id(id: &str) -> Result<(), NodeIdError> {
    if id.is_empty() {
        return Err(NodeIdError::Empty);
    }
    if id.len() > NODE_ID_MAX_BYTES {
        return Err(NodeIdError::TooLong { bytes: id.len() });
    }
    if id.chars().any(char::is_control) {
        return Err(NodeIdError::ControlCharacters(id.to_owned()));
    }
    Ok(())
}

/// Why a node id (a certificate's CN, an enrolment's `node_id`) is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NodeIdError {
    #[error("node_id is empty")]
    Empty,
    #[error("node_id is {bytes} bytes, more than {NODE_ID_MAX_BYTES}")]
    TooLong { bytes: usize },
    #[error("node_id {0:?} holds control characters")]
    ControlCharacters(String),
}

impl Enrolment {
    /// Reads every `*.toml` and `*.pub` file of `dir` (not recursive; dot files skipped).
    pub fn load(dir: &Path) -> Result<Self, EnrolmentError> {
        let fail = |problems: Vec<String>| EnrolmentError {
            dir: dir.to_owned(),
            problems,
        };
        let entries = fs::read_dir(dir).map_err(|e| fail(vec![e.to_string()]))?;
        let mut files = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| fail(vec![e.to_string()]))?;
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') {
                continue;
            }
            if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("toml" | "pub")
            ) {
                files.push(path);
            }
            if files.len() > FILES_MAX {
                return Err(fail(vec![format!("more than {FILES_MAX} identity files")]));
            }
        }
        files.sort();
        let mut enrolment = Enrolment::default();
        let mut problems = Vec::new();
        let mut owner_of_key: BTreeMap<KeyId, (String, PathBuf)> = BTreeMap::new();
        for path in &files {
            let shown = path.display();
            let EnrolmentFile {
                identities,
                declared,
                revoked_epochs,
            } = match read_bounded(path).and_then(|t| parse_file(&t)) {
                Ok(i) => i,
                Err(e) => {
                    problems.push(format!("{shown}: {e}"));
                    continue;
                }
            };
            if !revoked_epochs.is_empty() {
                for identity in &identities {
                    enrolment
                        .revoked
                        .entry(identity.node_id.clone())
                        .or_default()
                        .extend(revoked_epochs.iter().copied());
                }
            }
            if let Some(declared) = declared {
                // One node's files must not disagree about its hardware.
                let nodes: std::collections::BTreeSet<&str> =
                    identities.iter().map(|i| i.node_id.as_str()).collect();
                for node in nodes {
                    match enrolment.declared.get(node) {
                        Some((other, file)) if *other != declared => problems.push(format!(
                            "{shown}: node {node:?}: [limits] differ from those in {}",
                            file.display()
                        )),
                        Some(_) => {}
                        None => {
                            enrolment
                                .declared
                                .insert(node.to_owned(), (declared.clone(), path.clone()));
                        }
                    }
                }
            }
            for identity in identities {
                let epoch = identity.key_epoch;
                let node = identity.node_id.clone();
                if let Err(e) = check_node_id(&node) {
                    problems.push(format!("{shown}: {e}"));
                    continue;
                }
                if epoch == 0 {
                    problems.push(format!(
                        "{shown}: node {node:?}: key_epoch 0 (epochs start at 1)"
                    ));
                    continue;
                }
                let vk = match identity.verifying_key() {
                    Ok(vk) => vk,
                    Err(e) => {
                        problems.push(format!("{shown}: node {node:?} epoch {epoch}: {e}"));
                        continue;
                    }
                };
                let key_id = key_id_of(&vk.to_bytes());
                if let Some((other, other_file)) = owner_of_key.get(&key_id) {
                    if *other != node {
                        problems.push(format!(
                            "{shown}: node {node:?} epoch {epoch}: the same public key is enrolled \
                             for node {other:?} in {}",
                            other_file.display()
                        ));
                        continue;
                    }
                }
                owner_of_key.insert(key_id, (node.clone(), path.clone()));
                let keys = enrolment.nodes.entry(node.clone()).or_default();
                match keys.get(&epoch) {
                    Some(k) if k.key_id == key_id => {}
                    Some(k) => problems.push(format!(
                        "{shown}: node {node:?} epoch {epoch}: a different key for this epoch is \
                         enrolled in {}",
                        k.file.display()
                    )),
                    None => {
                        keys.insert(
                            epoch,
                            EnrolledKey {
                                identity,
                                key_id,
                                file: path.clone(),
                            },
                        );
                    }
                }
            }
        }
        if problems.is_empty() {
            Ok(enrolment)
        } else {
            Err(fail(problems))
        }
    }

    /// The enrolled keys of `node_id`, by epoch; `None` if the node is not enrolled.
    pub fn node(&self, node_id: &str) -> Option<&BTreeMap<u32, EnrolledKey>> {
        self.nodes.get(node_id)
    }

    /// The key epochs of `node_id` its enrolment revokes.
    pub fn revoked_epochs(&self, node_id: &str) -> std::collections::BTreeSet<u32> {
        self.revoked.get(node_id).cloned().unwrap_or_default()
    }

    /// What `node_id`'s enrolment declares of its hardware (defaults when nothing).
    pub fn declared(&self, node_id: &str) -> Declared {
        self.declared
            .get(node_id)
            .map(|(d, _)| d.clone())
            .unwrap_or_default()
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    pub fn key_count(&self) -> usize {
        self.nodes.values().map(BTreeMap::len).sum()
    }

    /// The enrolled node ids, sorted.
    pub fn node_ids(&self) -> impl Iterator<Item = &str> {
        self.nodes.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wattd_records::identity::NodeKey;

    #[test]
    fn flat_and_list_files_are_read_and_bad_ones_all_named() {
        let dir = tempfile::tempdir().unwrap();
        let a1 = NodeKey::from_seed("a", 1, [1; 32]);
        let a2 = NodeKey::from_seed("a", 2, [2; 32]);
        let b1 = NodeKey::from_seed("b", 1, [3; 32]);
        fs::write(dir.path().join("a.toml"), a1.public().to_toml().unwrap()).unwrap();
        let list = format!(
            "[[key]]\n{}\n[[key]]\n{}",
            a1.public().to_toml().unwrap(),
            a2.public().to_toml().unwrap()
        );
        fs::write(dir.path().join("a.pub"), list).unwrap();
        fs::write(dir.path().join("b.toml"), b1.public().to_toml().unwrap()).unwrap();
        fs::write(dir.path().join("README"), "ignored").unwrap();
        let e = Enrolment::load(dir.path()).unwrap();
        assert_eq!(e.node_ids().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(e.key_count(), 3);

        // Garbage, a mismatched key id, a conflicting epoch and a stolen key: all reported.
        fs::write(dir.path().join("garbage.toml"), "node_id = 3").unwrap();
        let mut bad = b1.public();
        bad.key_id = "00".repeat(16);
        fs::write(dir.path().join("badid.toml"), bad.to_toml().unwrap()).unwrap();
        let other = NodeKey::from_seed("a", 1, [9; 32]);
        fs::write(
            dir.path().join("conflict.toml"),
            other.public().to_toml().unwrap(),
        )
        .unwrap();
        let mut stolen = a2.public();
        stolen.node_id = "c".into();
        fs::write(dir.path().join("stolen.toml"), stolen.to_toml().unwrap()).unwrap();
        let err = Enrolment::load(dir.path()).unwrap_err();
        assert_eq!(err.problems.len(), 4, "{err}");
        let text = err.to_string();
        for f in ["garbage.toml", "badid.toml", "conflict.toml", "stolen.toml"] {
            assert!(text.contains(f), "{f} not named in {text}");
        }
    }

    #[test]
    fn limits_are_read_with_the_keys_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let a1 = NodeKey::from_seed("a", 1, [1; 32]);
        let a2 = NodeKey::from_seed("a", 2, [2; 32]);
        let limits = "\n[limits]\ncpus = 64\nmax_watts = { package = 350, dram = 60 }\n";
        fs::write(
            dir.path().join("a.toml"),
            format!("{}{limits}", a1.public().to_toml().unwrap()),
        )
        .unwrap();
        fs::write(
            dir.path().join("a2.pub"),
            format!("{limits}[[key]]\n{}", a2.public().to_toml().unwrap()),
        )
        .unwrap();
        let e = Enrolment::load(dir.path()).unwrap();
        assert_eq!(e.key_count(), 2);
        let d = e.declared("a");
        assert_eq!(d.cpus, Some(64));
        assert_eq!(d.max_watts.get("package"), Some(&350));
        assert_eq!(e.declared("b"), Declared::default());

        // Disagreeing, misspelt and out-of-range limits are each named with their file.
        fs::write(
            dir.path().join("a2.pub"),
            format!(
                "[limits]\ncpus = 8\n[[key]]\n{}",
                a2.public().to_toml().unwrap()
            ),
        )
        .unwrap();
        let b1 = NodeKey::from_seed("b", 1, [3; 32]);
        fs::write(
            dir.path().join("b.toml"),
            format!("{}\n[limits]\ncpu = 4\n", b1.public().to_toml().unwrap()),
        )
        .unwrap();
        let c1 = NodeKey::from_seed("c", 1, [4; 32]);
        fs::write(
            dir.path().join("c.toml"),
            format!(
                "{}\n[limits]\nmax_watts = {{ gpu = 0 }}\n",
                c1.public().to_toml().unwrap()
            ),
        )
        .unwrap();
        let err = Enrolment::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("a2.pub") && err.contains("differ"), "{err}");
        assert!(err.contains("b.toml") && err.contains("cpu"), "{err}");
        assert!(
            err.contains("c.toml") && err.contains("max_watts.gpu = 0"),
            "{err}"
        );
    }

    #[test]
    fn node_ids_are_bounded_and_printable() {
        assert!(check_node_id("worker-17").is_ok());
        assert_eq!(check_node_id(""), Err(NodeIdError::Empty));
        assert_eq!(
            check_node_id("a\nb").map_err(|e| e.to_string()),
            Err(r#"node_id "a\nb" holds control characters"#.to_owned())
        );
        assert!(check_node_id(&"x".repeat(255)).is_ok());
        assert_eq!(
            check_node_id(&"x".repeat(256)).map_err(|e| e.to_string()),
            Err("node_id is 256 bytes, more than 255".to_owned())
        );
    }
}
