//! The node's Ed25519 signing identity: created atomically on first start in the data dir,
//! refused when its file is malformed or readable by others, rotated to a new key epoch by an
//! announcement signed with the old key.
//!
//! Files in the data dir:
//! - `node.key`: the current secret key (TOML, mode 0600). Never overwritten except by the
//!   rename that completes a rotation.
//! - `node.key.next`: the next key while a rotation is in flight (see [`prepare_rotation`]).
//! - `node.pub`: every public key this node has used, one TOML table per epoch, so a verifier
//!   can check batches of old epochs after their rotation batch has left the spool.

use std::fs;
use std::io::{self, Read as _};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use wattd_proto::v1::KeyRotation;

use crate::durable::{self, hex, unhex, AtomicWriteError};

pub const KEY_FILE: &str = "node.key";
pub const NEXT_KEY_FILE: &str = "node.key.next";
pub const PUBLIC_KEYS_FILE: &str = "node.pub";

/// Bytes of a key id: the first 16 bytes of SHA-256 of the 32-byte public key. 128 bits is
/// far beyond collision reach for the handful of keys a fleet holds, and keeps records short.
pub const KEY_ID_BYTES: usize = 16;
pub type KeyId = [u8; KEY_ID_BYTES];

/// A key file larger than this is not ours; refuse it before parsing.
const KEY_FILE_MAX_BYTES: u64 = 4096;

/// The key id of an Ed25519 public key.
pub fn key_id_of(public_key: &[u8; 32]) -> KeyId {
    let digest = Sha256::digest(public_key);
    let mut id = [0u8; KEY_ID_BYTES];
    id.copy_from_slice(&digest[..KEY_ID_BYTES]);
    id
}

/// Why a public identity's key cannot be used. It names the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PublicKeyError {
    #[error("unsupported algorithm {0:?}")]
    Algorithm(String),
    #[error("public_key is not 64 hex digits")]
    NotHex,
    #[error("public_key: {0}")]
    NotAKey(String),
    #[error("key_id does not match public_key")]
    KeyIdMismatch,
}

/// Everything that can go wrong with the node key. Each variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: no node key; `wattd identity --data-dir {}` creates one", path.display(), path.parent().map(Path::display).map(|d| d.to_string()).unwrap_or_default())]
    Missing { path: PathBuf },
    #[error("{}: key file is accessible by group or others (mode {mode:04o}); refusing to use it: \
             the key may have leaked. Fix with `chmod 600`, or rotate the key if it was exposed",
             path.display())]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{}: not a regular file", path.display())]
    NotAFile { path: PathBuf },
    #[error("{}: malformed key file: {detail}", path.display())]
    Malformed { path: PathBuf, detail: String },
    #[error("{}: key belongs to node {found:?} but this node is {expected:?}", path.display())]
    NodeMismatch {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("{}: a key rotation is already in flight", path.display())]
    RotationInFlight { path: PathBuf },
    #[error("the operating system's random number generator failed: {0}")]
    Random(getrandom::Error),
    /// Never expected (the files hold strings and integers), but never an empty file either.
    #[error("{}: could not encode: {detail}", path.display())]
    Encode { path: PathBuf, detail: String },
}

impl IdentityError {
    fn io(path: &Path, source: io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// On-disk form of `node.key`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    format: u32,
    node_id: String,
    key_epoch: u32,
    secret_key: String,
    public_key: String,
}

/// What the ledger enrols: the node id and its public key for one epoch. `wattd identity`
/// prints it as TOML; `node.pub` holds one per epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicIdentity {
    pub node_id: String,
    pub key_epoch: u32,
    /// Always "ed25519".
    pub algorithm: String,
    /// Hex of the 32-byte public key.
    pub public_key: String,
    /// Hex of the key id (first 16 bytes of SHA-256 of the public key).
    pub key_id: String,
}

impl PublicIdentity {
    /// The decoded public key, checked against its key id.
    pub fn verifying_key(&self) -> Result<VerifyingKey, PublicKeyError> {
        if self.algorithm != "ed25519" {
            return Err(PublicKeyError::Algorithm(self.algorithm.clone()));
        }
        let bytes: [u8; 32] = unhex(&self.public_key).ok_or(PublicKeyError::NotHex)?;
        let key =
            VerifyingKey::from_bytes(&bytes).map_err(|e| PublicKeyError::NotAKey(e.to_string()))?;
        if unhex::<KEY_ID_BYTES>(&self.key_id) != Some(key_id_of(&bytes)) {
            return Err(PublicKeyError::KeyIdMismatch);
        }
        Ok(key)
    }

    /// The enrolment file's text. An error rather than an empty text: an empty file written
    /// in its place would enrol nothing and say nothing.
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        toml::to_string(self)
    }
}

/// The node's current signing key. `Debug` shows the public half only.
pub struct NodeKey {
    node_id: String,
    epoch: u32,
    signing: SigningKey,
}

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeKey")
            .field("node_id", &self.node_id)
            .field("epoch", &self.epoch)
            .field("key_id", &hex(&self.key_id()))
            .finish_non_exhaustive()
    }
}

impl NodeKey {
    /// A key from a fixed seed: for tests and benchmarks (and nothing else).
    pub fn from_seed(node_id: &str, epoch: u32, seed: [u8; 32]) -> Self {
        Self {
            node_id: node_id.to_owned(),
            epoch,
            signing: SigningKey::from_bytes(&seed),
        }
    }

    /// A fresh key from the operating system's CSPRNG.
    pub fn generate(node_id: &str, epoch: u32) -> Result<Self, IdentityError> {
        let mut seed = [0u8; 32];
        getrandom::getrandom(&mut seed).map_err(IdentityError::Random)?;
        Ok(Self::from_seed(node_id, epoch, seed))
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    pub fn key_id(&self) -> KeyId {
        key_id_of(&self.public_key())
    }

    /// Ed25519 signature over `msg`.
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.signing.sign(msg).to_bytes()
    }

    pub fn public(&self) -> PublicIdentity {
        PublicIdentity {
            node_id: self.node_id.clone(),
            key_epoch: self.epoch,
            algorithm: "ed25519".into(),
            public_key: hex(&self.public_key()),
            key_id: hex(&self.key_id()),
        }
    }

    fn to_file_text(&self, path: &Path) -> Result<String, IdentityError> {
        let file = KeyFile {
            format: 1,
            node_id: self.node_id.clone(),
            key_epoch: self.epoch,
            secret_key: hex(&self.signing.to_bytes()),
            public_key: hex(&self.public_key()),
        };
        let body = toml::to_string(&file).map_err(|e| IdentityError::Encode {
            path: path.to_owned(),
            detail: e.to_string(),
        })?;
        Ok(format!(
            "# wattd node signing key. Secret: keep mode 0600, never copy it off this host.\n{body}"
        ))
    }

    /// Loads `dir/node.key`, refusing a file that is not a regular file, that group or others
    /// may access, or that does not parse or whose public key does not match its secret.
    pub fn load(dir: &Path) -> Result<Self, IdentityError> {
        Self::load_file(&dir.join(KEY_FILE))
    }

    fn load_file(path: &Path) -> Result<Self, IdentityError> {
        // O_NOFOLLOW: a symlink planted in the data dir must not redirect us to another key.
        let mut f = match fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(IdentityError::Missing {
                    path: path.to_owned(),
                })
            }
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(IdentityError::NotAFile {
                    path: path.to_owned(),
                })
            }
            Err(e) => return Err(IdentityError::io(path, e)),
        };
        // Check the mode of the file we opened, not of the path (no race with a swap).
        let meta = f.metadata().map_err(|e| IdentityError::io(path, e))?;
        if !meta.is_file() {
            return Err(IdentityError::NotAFile {
                path: path.to_owned(),
            });
        }
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(IdentityError::Permissions {
                path: path.to_owned(),
                mode,
            });
        }
        let malformed = |detail: String| IdentityError::Malformed {
            path: path.to_owned(),
            detail,
        };
        if meta.len() > KEY_FILE_MAX_BYTES {
            return Err(malformed(format!(
                "{} bytes, more than a key file's {KEY_FILE_MAX_BYTES}",
                meta.len()
            )));
        }
        let mut text = String::new();
        (&mut f)
            .take(KEY_FILE_MAX_BYTES)
            .read_to_string(&mut text)
            .map_err(|e| match e.kind() {
                io::ErrorKind::InvalidData => malformed("not UTF-8".into()),
                _ => IdentityError::io(path, e),
            })?;
        let file: KeyFile = toml::from_str(&text).map_err(|e| malformed(e.to_string()))?;
        if file.format != 1 {
            return Err(malformed(format!("unknown format {}", file.format)));
        }
        if file.key_epoch == 0 {
            return Err(malformed("key_epoch must be 1 or more".into()));
        }
        let seed: [u8; 32] = unhex(&file.secret_key)
            .ok_or_else(|| malformed("secret_key is not 64 hex digits".into()))?;
        let key = Self::from_seed(&file.node_id, file.key_epoch, seed);
        if unhex::<32>(&file.public_key) != Some(key.public_key()) {
            return Err(malformed("public_key does not match secret_key".into()));
        }
        Ok(key)
    }

    /// Loads the node key, creating it (epoch 1) if there is none. Creation is atomic and never
    /// replaces an existing key: if two processes race, one wins and the other loads its key.
    /// Returns the key and whether it was created now.
    pub fn load_or_create(dir: &Path, node_id: &str) -> Result<(Self, bool), IdentityError> {
        let path = dir.join(KEY_FILE);
        let (key, created) = match Self::load(dir) {
            Ok(k) => (k, false),
            Err(IdentityError::Missing { .. }) => {
                create_data_dir(dir)?;
                let key = Self::generate(node_id, 1)?;
                let text = key.to_file_text(&dir.join(KEY_FILE))?;
                match durable::write_atomic(dir, KEY_FILE, text.as_bytes(), 0o600, false) {
                    Ok(()) => (key, true),
                    Err(AtomicWriteError::Rename(e))
                        if e.kind() == io::ErrorKind::AlreadyExists =>
                    {
                        (Self::load(dir)?, false)
                    }
                    Err(e) => return Err(IdentityError::io(&path, e.into_io())),
                }
            }
            Err(e) => return Err(e),
        };
        if key.node_id != node_id {
            return Err(IdentityError::NodeMismatch {
                path,
                found: key.node_id,
                expected: node_id.to_owned(),
            });
        }
        record_public_key(dir, &key.public())?;
        Ok((key, created))
    }
}

/// Creates the data dir (mode 0700: it holds the secret key) if it does not exist.
pub fn create_data_dir(dir: &Path) -> Result<(), IdentityError> {
    use std::os::unix::fs::DirBuilderExt as _;
    match fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => Ok(()),
        Err(e) => Err(IdentityError::io(dir, e)),
    }
}

/// The layout of `node.pub`: one `[[key]]` table per epoch. The ledger reads the same files to
/// enrol a node.
#[derive(Debug, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PublicKeysFile {
    #[serde(default)]
    pub key: Vec<PublicIdentity>,
}

/// Every public key recorded in `dir/node.pub` (oldest epoch first), plus the current key's if
/// the file lacks it. Does not need (or read) any secret beyond `node.key`'s public half.
pub fn known_public_keys(dir: &Path) -> Result<Vec<PublicIdentity>, IdentityError> {
    let mut keys = read_public_keys_file(dir)?;
    match NodeKey::load(dir) {
        Ok(k) => {
            let p = k.public();
            if !keys.contains(&p) {
                keys.push(p);
            }
        }
        Err(IdentityError::Missing { .. }) if !keys.is_empty() => {}
        Err(e) => return Err(e),
    }
    keys.sort_by_key(|k| k.key_epoch);
    Ok(keys)
}

fn read_public_keys_file(dir: &Path) -> Result<Vec<PublicIdentity>, IdentityError> {
    let path = dir.join(PUBLIC_KEYS_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(IdentityError::io(&path, e)),
    };
    let file: PublicKeysFile = toml::from_str(&text).map_err(|e| IdentityError::Malformed {
        path: path.clone(),
        detail: e.to_string(),
    })?;
    for k in &file.key {
        k.verifying_key()
            .map_err(|detail| IdentityError::Malformed {
                path: path.clone(),
                detail: format!("epoch {}: {detail}", k.key_epoch),
            })?;
    }
    Ok(file.key)
}

/// Adds `public` to `node.pub` unless it is there (idempotent; atomic replace).
fn record_public_key(dir: &Path, public: &PublicIdentity) -> Result<(), IdentityError> {
    let mut keys = read_public_keys_file(dir)?;
    if keys.contains(public) {
        return Ok(());
    }
    keys.push(public.clone());
    keys.sort_by_key(|k| k.key_epoch);
    let path = dir.join(PUBLIC_KEYS_FILE);
    let body =
        toml::to_string(&PublicKeysFile { key: keys }).map_err(|e| IdentityError::Encode {
            path: path.clone(),
            detail: e.to_string(),
        })?;
    let text =
        format!("# wattd: every public key this node has signed with, one per key epoch.\n{body}");
    durable::write_atomic(dir, PUBLIC_KEYS_FILE, text.as_bytes(), 0o644, true)
        .map_err(|e| IdentityError::io(&dir.join(PUBLIC_KEYS_FILE), e.into_io()))
}

/// Step 1 of a rotation: creates the next key (epoch + 1) in `node.key.next` and returns it with
/// the [`KeyRotation`] record to seal into a batch signed by `current`. Nothing changes for
/// readers until [`commit_rotation`].
///
/// Protocol (crash-safe at every step): prepare -> seal a batch carrying the record and sync
/// it -> commit. On start, [`recover_rotation`] finishes or abandons a rotation a crash cut short,
/// by asking whether the spool's last batch announced the pending key.
pub fn prepare_rotation(
    dir: &Path,
    current: &NodeKey,
    effective_seq: u64,
    now_unix_ns: i64,
) -> Result<(NodeKey, KeyRotation), IdentityError> {
    let next_epoch = current
        .epoch
        .checked_add(1)
        .ok_or_else(|| IdentityError::Malformed {
            path: dir.join(KEY_FILE),
            detail: "key epoch exhausted".into(),
        })?;
    let next = NodeKey::generate(&current.node_id, next_epoch)?;
    let text = next.to_file_text(&dir.join(NEXT_KEY_FILE))?;
    match durable::write_atomic(dir, NEXT_KEY_FILE, text.as_bytes(), 0o600, false) {
        Ok(()) => {}
        Err(AtomicWriteError::Rename(e)) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(IdentityError::RotationInFlight {
                path: dir.join(NEXT_KEY_FILE),
            })
        }
        Err(e) => return Err(IdentityError::io(&dir.join(NEXT_KEY_FILE), e.into_io())),
    }
    let rotation = KeyRotation {
        new_key_epoch: next_epoch,
        new_public_key: next.public_key().to_vec(),
        new_key_id: next.key_id().to_vec(),
        effective_seq,
        rotated_unix_ns: now_unix_ns,
    };
    save_rotation_cert(dir, current, &rotation)?;
    Ok((next, rotation))
}

/// Files of signed rotations: `rotation-<epoch>-<new key id>.pb`.
const ROTATION_CERT_PREFIX: &str = "rotation-";
const ROTATION_CERT_SUFFIX: &str = ".pb";
/// At most this many are read (a node rotating daily for 11 years), each at most 1 KiB.
const ROTATION_CERTS_MAX: usize = 4096;

/// Keeps `rotation` signed on its own by `current`, the key it retires, durably in `dir`, so
/// that a loss statement can show it again if the batch announcing it is lost. Public data.
pub fn save_rotation_cert(
    dir: &Path,
    current: &NodeKey,
    rotation: &KeyRotation,
) -> Result<(), IdentityError> {
    use prost::Message as _;
    let bytes = rotation.encode_to_vec();
    let cert = wattd_proto::v1::SignedKeyRotation {
        signature: current.sign(&bytes).to_vec(),
        key_id: current.key_id().to_vec(),
        rotation_bytes: bytes,
    };
    let name = format!(
        "{ROTATION_CERT_PREFIX}{}-{}{ROTATION_CERT_SUFFIX}",
        rotation.new_key_epoch,
        hex(&rotation.new_key_id)
    );
    durable::write_atomic(dir, &name, &cert.encode_to_vec(), 0o644, true)
        .map_err(|e| IdentityError::io(&dir.join(&name), e.into_io()))
}

/// The node's signed rotations whose new key was committed (it is in `node.pub`: a rotation a
/// crash abandoned is left out), in epoch order. Unreadable or foreign files are skipped.
pub fn rotation_certs(dir: &Path) -> Vec<(KeyRotation, wattd_proto::v1::SignedKeyRotation)> {
    use prost::Message as _;
    let committed: std::collections::BTreeSet<String> = known_public_keys(dir)
        .map(|keys| keys.into_iter().map(|k| k.key_id).collect())
        .unwrap_or_default();
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten().take(ROTATION_CERTS_MAX * 4) {
        let name = e.file_name().to_string_lossy().into_owned();
        if !(name.starts_with(ROTATION_CERT_PREFIX) && name.ends_with(ROTATION_CERT_SUFFIX)) {
            continue;
        }
        let Ok(meta) = e.metadata() else { continue };
        if !meta.is_file() || meta.len() > 1024 {
            continue;
        }
        let Ok(bytes) = fs::read(e.path()) else {
            continue;
        };
        let Ok(cert) = wattd_proto::v1::SignedKeyRotation::decode(bytes.as_slice()) else {
            continue;
        };
        let Ok(rotation) = KeyRotation::decode(cert.rotation_bytes.as_slice()) else {
            continue;
        };
        if committed.contains(&hex(&rotation.new_key_id)) {
            out.push((rotation, cert));
        }
        if out.len() >= ROTATION_CERTS_MAX {
            break;
        }
    }
    out.sort_by_key(|(r, _)| r.new_key_epoch);
    out
}

/// Step 3 of a rotation, after the announcing batch is durable: records the new public key in
/// `node.pub`, then renames `node.key.next` over `node.key`. Idempotent.
pub fn commit_rotation(dir: &Path, next: &NodeKey) -> Result<(), IdentityError> {
    record_public_key(dir, &next.public())?;
    let from = dir.join(NEXT_KEY_FILE);
    let to = dir.join(KEY_FILE);
    fs::rename(&from, &to).map_err(|e| IdentityError::io(&from, e))?;
    durable::sync_dir(dir).map_err(|e| IdentityError::io(dir, e))
}

/// Finishes or abandons a rotation a crash interrupted. `announced` is the key id carried by
/// the KeyRotation of the spool's last batch, if any. Returns the key to sign with.
pub fn recover_rotation(
    dir: &Path,
    current: NodeKey,
    announced: Option<KeyId>,
) -> Result<NodeKey, IdentityError> {
    let next_path = dir.join(NEXT_KEY_FILE);
    let next = match NodeKey::load_file(&next_path) {
        Ok(k) => k,
        Err(IdentityError::Missing { .. }) => return Ok(current),
        Err(e) => return Err(e),
    };
    if announced == Some(next.key_id()) {
        commit_rotation(dir, &next)?;
        Ok(next)
    } else {
        abandon_rotation(dir)?;
        Ok(current)
    }
}

/// Drops a pending next key that was never announced: no batch was signed with it and none
/// names it, so removing it loses nothing.
pub fn abandon_rotation(dir: &Path) -> Result<(), IdentityError> {
    let next_path = dir.join(NEXT_KEY_FILE);
    match fs::remove_file(&next_path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(IdentityError::io(&next_path, e)),
    }
    durable::sync_dir(dir).map_err(|e| IdentityError::io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    #[test]
    fn created_once_with_mode_0600_and_reloaded() -> TestResult {
        let dir = tempfile::tempdir()?;
        let (k1, created) = NodeKey::load_or_create(dir.path(), "n1")?;
        assert!(created);
        let mode = fs::metadata(dir.path().join(KEY_FILE))?
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let (k2, created) = NodeKey::load_or_create(dir.path(), "n1")?;
        assert!(!created);
        assert_eq!(k1.public_key(), k2.public_key());
        assert_eq!(known_public_keys(dir.path())?, vec![k1.public()]);
        Ok(())
    }

    #[test]
    fn a_public_identity_that_cannot_be_used_says_why() {
        let good = NodeKey::from_seed("n1", 1, [3; 32]).public();
        assert!(good.verifying_key().is_ok());
        let other = NodeKey::from_seed("n1", 1, [4; 32]).public();
        let swapped = PublicIdentity {
            key_id: other.key_id.clone(),
            ..good.clone()
        };
        assert_eq!(
            swapped.verifying_key().err(),
            Some(PublicKeyError::KeyIdMismatch)
        );
        let rsa = PublicIdentity {
            algorithm: "rsa".into(),
            ..good.clone()
        };
        assert_eq!(
            rsa.verifying_key().err(),
            Some(PublicKeyError::Algorithm("rsa".into()))
        );
        let short = PublicIdentity {
            public_key: good.public_key[..62].to_owned(),
            ..good
        };
        assert_eq!(short.verifying_key().err(), Some(PublicKeyError::NotHex));
    }

    #[test]
    fn group_readable_key_is_refused_with_its_path() -> TestResult {
        let dir = tempfile::tempdir()?;
        NodeKey::load_or_create(dir.path(), "n1")?;
        let path = dir.path().join(KEY_FILE);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640))?;
        let err = NodeKey::load(dir.path()).err().ok_or("loaded a 0640 key")?;
        assert!(
            matches!(err, IdentityError::Permissions { mode: 0o640, .. }),
            "{err}"
        );
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn malformed_and_missing_keys_are_refused() -> TestResult {
        let dir = tempfile::tempdir()?;
        let err = NodeKey::load(dir.path()).err().ok_or("loaded nothing")?;
        assert!(matches!(err, IdentityError::Missing { .. }), "{err}");
        for bad in [
            "garbage",
            "format = 1\nnode_id = \"n\"\nkey_epoch = 1\nsecret_key = \"00\"\npublic_key = \"00\"\n",
            "\u{0}\u{1}",
        ] {
            let path = dir.path().join(KEY_FILE);
            fs::write(&path, bad)?;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
            let err = NodeKey::load(dir.path()).err().ok_or("loaded garbage")?;
            assert!(matches!(err, IdentityError::Malformed { .. }), "{err}");
        }
        // A tampered public half is caught.
        let k = NodeKey::from_seed("n", 1, [7; 32]);
        let other = NodeKey::from_seed("n", 1, [8; 32]);
        let text = k
            .to_file_text(&dir.path().join(KEY_FILE))?
            .replace(&hex(&k.public_key()), &hex(&other.public_key()));
        fs::write(dir.path().join(KEY_FILE), text)?;
        let err = NodeKey::load(dir.path())
            .err()
            .ok_or("loaded a mismatched key")?;
        assert!(err.to_string().contains("does not match"), "{err}");
        Ok(())
    }

    #[test]
    fn key_of_another_node_is_refused() -> TestResult {
        let dir = tempfile::tempdir()?;
        NodeKey::load_or_create(dir.path(), "n1")?;
        let err = NodeKey::load_or_create(dir.path(), "n2")
            .err()
            .ok_or("wrong node")?;
        assert!(matches!(err, IdentityError::NodeMismatch { .. }), "{err}");
        Ok(())
    }

    #[test]
    fn rotation_commits_only_when_announced() -> TestResult {
        let dir = tempfile::tempdir()?;
        let (k1, _) = NodeKey::load_or_create(dir.path(), "n1")?;
        let k1_pub = k1.public_key();
        // Crash before the announcement was sealed: the pending key is dropped.
        let (next, _) = prepare_rotation(dir.path(), &k1, 5, 0)?;
        assert!(matches!(
            prepare_rotation(dir.path(), &k1, 5, 0),
            Err(IdentityError::RotationInFlight { .. })
        ));
        let k = recover_rotation(dir.path(), k1, None)?;
        assert_eq!(k.public_key(), k1_pub);
        assert!(!dir.path().join(NEXT_KEY_FILE).exists());
        drop(next);
        // Crash after the announcement was sealed: the rotation completes.
        let (next, rot) = prepare_rotation(dir.path(), &k, 5, 0)?;
        assert_eq!(rot.new_key_epoch, 2);
        assert_eq!(rot.new_key_id, next.key_id().to_vec());
        let k2 = recover_rotation(dir.path(), k, Some(next.key_id()))?;
        assert_eq!(k2.epoch(), 2);
        assert_eq!(NodeKey::load(dir.path())?.public_key(), next.public_key());
        let epochs: Vec<u32> = known_public_keys(dir.path())?
            .iter()
            .map(|k| k.key_epoch)
            .collect();
        assert_eq!(epochs, vec![1, 2]);
        // The signed rotations kept for loss statements: the committed one only (the
        // abandoned first key for epoch 2 is left out), signed by the retired key.
        let certs = rotation_certs(dir.path());
        assert_eq!(certs.len(), 1);
        let (r, cert) = &certs[0];
        assert_eq!(
            (r.new_key_epoch, r.new_key_id.clone()),
            (2, next.key_id().to_vec())
        );
        assert_eq!(cert.key_id, key_id_of(&k1_pub).to_vec());
        let sig = ed25519_dalek::Signature::from_slice(&cert.signature)?;
        use ed25519_dalek::Verifier as _;
        VerifyingKey::from_bytes(&k1_pub)?.verify(&cert.rotation_bytes, &sig)?;
        Ok(())
    }
}
