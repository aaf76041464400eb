//! Small durability helpers shared by the identity and the spool: atomic file replacement
//! (temp file, fsync, rename, fsync dir), directory fsync, and hex for keys and hashes.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

/// fsync a directory so that a rename, creation or removal in it survives a power cut.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Where a step of [`write_atomic`] failed: the caller decides whether that is fatal.
#[derive(Debug, thiserror::Error)]
pub enum AtomicWriteError {
    /// Creating or writing the temp file failed; nothing visible changed.
    #[error("writing the new file: {0}")]
    Write(io::Error),
    /// An fsync failed: the kernel may have dropped the pages, the state on disk is unknown.
    #[error("syncing the new file or its directory: {0}")]
    Sync(io::Error),
    /// The rename (or no-replace link) failed.
    #[error("putting the new file in place: {0}")]
    Rename(io::Error),
}

impl AtomicWriteError {
    pub fn into_io(self) -> io::Error {
        match self {
            Self::Write(e) | Self::Sync(e) | Self::Rename(e) => e,
        }
    }
}

/// Writes `bytes` to `dir/name` atomically: a reader (or a crash) sees the old content or the
/// new, never a mix. The file gets `mode` from its creation on, so a secret is never readable
/// by others, not even for a moment. With `replace == false` an existing `dir/name` is left
/// alone and the call fails with `AlreadyExists` (hard link instead of rename: atomic and
/// no-clobber on every Unix file system).
pub fn write_atomic(
    dir: &Path,
    name: &str,
    bytes: &[u8],
    mode: u32,
    replace: bool,
) -> Result<(), AtomicWriteError> {
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    // A temp file left by a crashed predecessor with our pid is garbage; remove it first.
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(AtomicWriteError::Write)?;
        f.write_all(bytes).map_err(AtomicWriteError::Write)?;
        f.sync_all().map_err(AtomicWriteError::Sync)?;
        let dest = dir.join(name);
        if replace {
            fs::rename(&tmp, &dest).map_err(AtomicWriteError::Rename)?;
        } else {
            fs::hard_link(&tmp, &dest).map_err(AtomicWriteError::Rename)?;
            fs::remove_file(&tmp).map_err(AtomicWriteError::Rename)?;
        }
        sync_dir(dir).map_err(AtomicWriteError::Sync)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

/// Parses hex into exactly `N` bytes; `None` on a wrong length or a non-hex digit.
pub fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let s = s.as_bytes();
    if s.len() != N * 2 {
        return None;
    }
    let digit = |c: u8| {
        char::from(c)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    };
    let mut out = [0u8; N];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_rejects_garbage() {
        let b = [0u8, 1, 0xab, 0xff];
        assert_eq!(hex(&b), "0001abff");
        assert_eq!(unhex::<4>("0001abff"), Some(b));
        assert_eq!(unhex::<4>("0001ABFF"), Some(b));
        assert_eq!(unhex::<4>("0001abf"), None);
        assert_eq!(unhex::<4>("0001abfg"), None);
        assert_eq!(unhex::<2>("+1+1"), None);
    }

    #[test]
    fn write_atomic_without_replace_keeps_the_existing_file() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        write_atomic(dir.path(), "f", b"one", 0o600, false).map_err(AtomicWriteError::into_io)?;
        let again = write_atomic(dir.path(), "f", b"two", 0o600, false);
        assert!(
            matches!(again, Err(AtomicWriteError::Rename(ref e)) if e.kind() == io::ErrorKind::AlreadyExists)
        );
        assert_eq!(fs::read(dir.path().join("f"))?, b"one");
        write_atomic(dir.path(), "f", b"three", 0o600, true).map_err(AtomicWriteError::into_io)?;
        assert_eq!(fs::read(dir.path().join("f"))?, b"three");
        // No temp file is left behind.
        assert_eq!(fs::read_dir(dir.path())?.count(), 1);
        Ok(())
    }
}
