//! Spool segments read-only: their names, their frames, the walk over a data dir or an export
//! stream, and the cursor that reads sealed batches in order. The agent's writer (`wattd`'s
//! `spool::Spool`) and every reader (`verify`, `export`, `runs`, the ledger's import) share it.

pub mod frame;
pub mod reader;

use std::io;
use std::path::{Path, PathBuf};

use frame::{scan_segment, Damage, ScanItem, SegmentHeader};
pub use reader::SpoolReader;

pub const ACK_FILE: &str = "ack";
const SEGMENT_PREFIX: &str = "seg-";
const SEGMENT_SUFFIX: &str = ".wseg";

pub fn segment_name(first_seq: u64) -> String {
    format!("{SEGMENT_PREFIX}{first_seq:020}{SEGMENT_SUFFIX}")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name
        .strip_prefix(SEGMENT_PREFIX)?
        .strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Sequence numbers start at 1.
    digits.parse().ok().filter(|&s| s > 0)
}

/// The segments of a data dir, ordered by first seq.
pub fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, SpoolError> {
    let entries = std::fs::read_dir(dir).map_err(|e| SpoolError::io(dir, e))?;
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| SpoolError::io(dir, e))?;
        if let Some(seq) = entry.file_name().to_str().and_then(parse_segment_name) {
            out.push((seq, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Everything that can go wrong in the spool; each variant names the file (and offset).
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// FATAL. fdatasync/fsync failed: what was written since the last good sync may be gone.
    #[error("{}: fsync failed: {source}; the spool is unusable until restart", path.display())]
    SyncFailed { path: PathBuf, source: io::Error },
    /// FATAL. A write failed for a reason other than lack of space.
    #[error("{} at offset {offset}: write failed: {source}", path.display())]
    WriteFailed {
        path: PathBuf,
        offset: u64,
        source: io::Error,
    },
    /// FATAL. A record read back right after writing differs from what was written.
    #[error("{} at offset {offset}: record read back differs from what was written", path.display())]
    ReadBackMismatch { path: PathBuf, offset: u64 },
    /// FATAL. An earlier fatal error poisoned this spool.
    #[error("spool {} is poisoned by an earlier fatal error", dir.display())]
    Poisoned { dir: PathBuf },
    /// FULL. Nothing was written; retry after space returns (coarsen meanwhile).
    #[error("spool {} is full: {used_bytes} bytes used, {needed_bytes} more needed, limit {max_bytes}{}", dir.display(), if *enospc { " (the file system is out of space)" } else { "" })]
    Full {
        dir: PathBuf,
        used_bytes: u64,
        needed_bytes: u64,
        max_bytes: u64,
        enospc: bool,
    },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: segment belongs to node {found:?}, this spool is node {expected:?}; move it away", path.display())]
    ForeignSegment {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("{}: {detail}", path.display())]
    Inconsistent { path: PathBuf, detail: String },
    /// A caller bug: batches must be appended in seq order, each chained to the previous one.
    #[error("append out of order: expected seq {expected_seq} chained to the last batch, got seq {got_seq}")]
    OutOfOrder { expected_seq: u64, got_seq: u64 },
    #[error("cannot acknowledge seq {acked_seq}: only up to seq {sealed_seq} is sealed")]
    AckBeyondSealed { acked_seq: u64, sealed_seq: u64 },
    #[error("record of {bytes} bytes is larger than the limit of {max_bytes}")]
    RecordTooLarge { bytes: usize, max_bytes: usize },
}

impl SpoolError {
    pub fn io(path: &Path, source: io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            source,
        }
    }

    /// The daemon must exit non-zero (and never retry) on these.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            Self::SyncFailed { .. }
                | Self::WriteFailed { .. }
                | Self::ReadBackMismatch { .. }
                | Self::Poisoned { .. }
        )
    }

    /// The daemon must coarsen and retry later on these.
    pub fn is_full(&self) -> bool {
        matches!(self, Self::Full { .. })
    }
}

/// Where a record (or damage) is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    pub offset: u64,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at offset {}", self.file.display(), self.offset)
    }
}

/// One thing found while reading a spool (or an export) read-only, in file order.
#[derive(Debug)]
pub enum SpoolItem<'a> {
    /// A segment begins; `name_seq` is the first seq its file name announces.
    SegmentStart {
        path: &'a Path,
        name_seq: u64,
        header: &'a Result<SegmentHeader, Damage>,
    },
    /// An intact frame holding (what should be) an encoded `SignedBatch`.
    Record { location: Location, bytes: &'a [u8] },
    /// Bytes that are not an intact frame.
    Damage {
        location: Location,
        damage: &'a Damage,
    },
}

/// The decoded batches of a spool for the read-only tools (`runs`, `explain`, `report`): each
/// seq once (a replayed record must not count twice), in spool order, and the number of records
/// that could not be decoded (damage, garbage: they bill nothing; `wattd verify` names them).
pub fn decoded_batches(dir: &Path) -> Result<(Vec<wattd_proto::v1::Batch>, u64), SpoolError> {
    use prost::Message as _;
    let mut seen = std::collections::BTreeSet::new();
    let mut batches = Vec::new();
    let mut unreadable = 0u64;
    visit_spool(dir, |item| match item {
        SpoolItem::Record { bytes, .. } => {
            let decoded = wattd_proto::v1::SignedBatch::decode(bytes)
                .ok()
                .and_then(|s| wattd_proto::v1::Batch::decode(s.batch_bytes.as_slice()).ok());
            match decoded {
                Some(b) if seen.insert(b.seq) => batches.push(b),
                Some(_) => {}
                None => unreadable += 1,
            }
        }
        SpoolItem::Damage { .. } => unreadable += 1,
        SpoolItem::SegmentStart { .. } => {}
    })?;
    Ok((batches, unreadable))
}

/// Reads every segment of `dir` without changing anything (no truncation, no deletion) and
/// hands each item to `visit`, one segment in memory at a time. For `export`, `verify`, `runs`.
pub fn visit_spool(dir: &Path, mut visit: impl FnMut(SpoolItem<'_>)) -> Result<usize, SpoolError> {
    let segments = list_segments(dir)?;
    for (name_seq, path) in &segments {
        let bytes = std::fs::read(path).map_err(|e| SpoolError::io(path, e))?;
        let scan = scan_segment(bytes);
        visit(SpoolItem::SegmentStart {
            path,
            name_seq: *name_seq,
            header: &scan.header,
        });
        for item in &scan.items {
            match item {
                ScanItem::Record { offset, payload } => visit(SpoolItem::Record {
                    location: Location {
                        file: path.clone(),
                        offset: *offset,
                    },
                    bytes: &scan.bytes[payload.clone()],
                }),
                ScanItem::Damage(d) => visit(SpoolItem::Damage {
                    location: Location {
                        file: path.clone(),
                        offset: d.offset,
                    },
                    damage: d,
                }),
            }
        }
    }
    Ok(segments.len())
}

/// Reads an export stream (length-delimited `SignedBatch`es, as `wattd export` writes) and
/// hands each record to `visit`. Garbage ends the walk with one Damage item: the format has no
/// resynchronisation point.
pub fn visit_export(file: &Path, bytes: &[u8], mut visit: impl FnMut(SpoolItem<'_>)) {
    let mut pos = 0usize;
    while pos < bytes.len() {
        let rest = &bytes[pos..];
        let location = Location {
            file: file.to_owned(),
            offset: u64::try_from(pos).unwrap_or(u64::MAX),
        };
        let problem = match prost::decode_length_delimiter(rest) {
            Ok(len) if len == 0 || len > frame::RECORD_MAX_BYTES => {
                Some(format!("impossible record length {len}"))
            }
            Ok(len) => {
                let start = prost::length_delimiter_len(len);
                match rest.get(start..start + len) {
                    Some(record) => {
                        visit(SpoolItem::Record {
                            location,
                            bytes: record,
                        });
                        pos += start + len;
                        continue;
                    }
                    None => Some(format!(
                        "truncated record ({} of {len} bytes)",
                        rest.len() - start
                    )),
                }
            }
            Err(e) => Some(format!("bad length prefix: {e}")),
        };
        if let Some(detail) = problem {
            let damage = Damage {
                offset: location.offset,
                len: u64::try_from(rest.len()).unwrap_or(u64::MAX),
                reaches_end: true,
                detail,
            };
            visit(SpoolItem::Damage {
                location,
                damage: &damage,
            });
            return;
        }
    }
}

/// The data dir when none is given (the CLI contract, and the daemon's default spool): systemd's
/// state directory when run by wattd's unit (`StateDirectory=wattd` sets `STATE_DIRECTORY`; the
/// unit runs as user `wattd`, for whom a relative `./wattd-data` would land under a read-only
/// `/`), else `/var/lib/wattd` for root, else `./wattd-data`.
pub fn default_data_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    data_dir_for(root, std::env::var_os("STATE_DIRECTORY"))
}

/// [`default_data_dir`] for a given user and `STATE_DIRECTORY`. Only a state directory of
/// wattd's own (named `wattd`) is taken: one inherited from another service that started wattd
/// (a CI runner, a supervisor) is not wattd's spool.
pub fn data_dir_for(root: bool, state_directory: Option<std::ffi::OsString>) -> PathBuf {
    // STATE_DIRECTORY lists one path per StateDirectory= entry, colon-separated.
    let state = state_directory.and_then(|v| {
        v.to_str()?
            .split(':')
            .map(Path::new)
            .find(|p| p.is_absolute() && p.file_name().is_some_and(|n| n == "wattd"))
            .map(Path::to_path_buf)
    });
    match state {
        Some(dir) => dir,
        None if root => PathBuf::from("/var/lib/wattd"),
        None => PathBuf::from("./wattd-data"),
    }
}
