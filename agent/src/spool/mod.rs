//! The crash-safe spool: signed batches in append-only segment files on local disk, kept until
//! the ledger acknowledges them.
//!
//! Layout of the data dir (the identity files live beside it, see `identity`):
//! - `seg-<first seq, 20 digits>.wseg`: segments. Each starts with a header frame (node id,
//!   first seq, chain hash before it) and holds record frames, one `SignedBatch` each, in seq
//!   order (framing in [`frame`]). Only the last segment is ever written.
//! - `ack`: the acknowledged cursor, replaced atomically.
//! - `seg-*.wseg.torn-<offset>`: bytes cut from a torn tail on open, kept as evidence.
//!
//! Contract for the daemon:
//! - [`Spool::append`] writes a batch (not yet durable); [`Spool::sync`] makes every appended
//!   batch durable with one fdatasync (group commit). A batch is *sealed* only once `sync`
//!   returned Ok; only sealed batches may be shipped ([`Spool::read_sealed`]).
//! - A [`SpoolError::is_fatal`] error (failed fsync, failed write, read-back mismatch) poisons
//!   the spool: the kernel may have dropped dirty pages, so retrying could report a lost batch
//!   as sealed. The daemon must exit non-zero and let the supervisor restart it; reopening
//!   rescans the disk and resumes from what is really there.
//! - [`SpoolError::is_full`] (at `max_bytes` or on ENOSPC/EDQUOT): nothing was written; the
//!   batch is still the caller's. The daemon keeps accumulating energy into one coarse open
//!   interval (marked `coarsened`, with a SPOOL_FULL gap) and tries again later.

pub mod fs;
mod open;
pub mod section;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use wattd_records::totals::RunningTotals;

use crate::batch::{ChainHash, StoredBatch, GENESIS_HASH};
use crate::durable::{self, AtomicWriteError};
use crate::identity::KeyId;
use frame::{encode_frame, scan_segment, Damage, ScanItem, SegmentHeader, RECORD_MAGIC};
pub use fs::{RealFs, SpoolFs};
// The read-only side lives in the records crate, shared with every reader and the ledger.
pub use wattd_records::segment::{
    data_dir_for, decoded_batches, default_data_dir, frame, list_segments, reader, segment_name,
    visit_export, visit_spool, Location, SpoolError, SpoolItem, SpoolReader, ACK_FILE,
};

fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

#[derive(Clone, Debug)]
pub struct SpoolConfig {
    pub dir: PathBuf,
    pub node_id: String,
    /// Bound on the bytes of all segments together (`spool.max_bytes`).
    pub max_bytes: u64,
    /// A segment is closed and a new one started once it would grow past this.
    pub max_segment_bytes: u64,
    /// Acknowledged batches are kept this long (`spool.retain_acked_s`), so that a ledger
    /// restored from a backup can be sent them again ...
    pub retain_acked: std::time::Duration,
    /// ... within this many bytes (`spool.retain_acked_share` of `max_bytes`). They are freed
    /// before anything unacknowledged is refused, and at once when the file system is full.
    pub retain_acked_bytes: u64,
    pub fs: Arc<dyn SpoolFs>,
}

impl SpoolConfig {
    pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;
    pub const DEFAULT_MAX_SEGMENT_BYTES: u64 = 64 << 20;
    /// The smallest `spool.max_bytes` that works: eight segments of the smallest size.
    pub const MIN_MAX_BYTES: u64 = 8 * Self::MIN_SEGMENT_BYTES;
    pub const MIN_SEGMENT_BYTES: u64 = 128 << 10;
    /// Segments per limit: acknowledged segments are freed whole, so a spool holds at most one
    /// segment's worth of acknowledged batches (the active one) beside the unacknowledged.
    pub const SEGMENTS_PER_LIMIT: u64 = 8;
    /// Default `spool.retain_acked_s`: a day.
    pub const DEFAULT_RETAIN_ACKED_S: u64 = 86_400;
    /// Default `spool.retain_acked_share`: a quarter of the limit.
    pub const DEFAULT_RETAIN_ACKED_SHARE: f64 = 0.25;

    pub fn new(dir: impl Into<PathBuf>, node_id: impl Into<String>) -> Self {
        Self {
            dir: dir.into(),
            node_id: node_id.into(),
            max_bytes: Self::DEFAULT_MAX_BYTES,
            max_segment_bytes: Self::DEFAULT_MAX_SEGMENT_BYTES,
            retain_acked: std::time::Duration::from_secs(Self::DEFAULT_RETAIN_ACKED_S),
            retain_acked_bytes: Self::retain_bytes_for(
                Self::DEFAULT_MAX_BYTES,
                Self::DEFAULT_RETAIN_ACKED_SHARE,
            ),
            fs: Arc::new(RealFs),
        }
    }

    /// Bytes of acknowledged batches kept for a limit and a share of it.
    pub fn retain_bytes_for(max_bytes: u64, share: f64) -> u64 {
        (max_bytes as f64 * share.clamp(0.0, 1.0)) as u64
    }

    /// Keeps no acknowledged batch: segments are freed as soon as they are acknowledged.
    pub fn without_retention(mut self) -> Self {
        self.retain_acked = std::time::Duration::ZERO;
        self.retain_acked_bytes = 0;
        self
    }

    /// The segment size for a limit: an eighth of it, between 128 KiB and 64 MiB. (A fixed
    /// 64 MiB under a 1 MiB limit never rolled: the active segment is never freed, so the spool
    /// filled with acknowledged batches and every interval was coarsened.)
    pub fn segment_bytes_for(max_bytes: u64) -> u64 {
        (max_bytes / Self::SEGMENTS_PER_LIMIT)
            .clamp(Self::MIN_SEGMENT_BYTES, Self::DEFAULT_MAX_SEGMENT_BYTES)
    }

    /// Sets the limit and the segment size that follows from it.
    pub fn with_max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = max_bytes;
        self.max_segment_bytes = Self::segment_bytes_for(max_bytes);
        self.retain_acked_bytes =
            Self::retain_bytes_for(max_bytes, Self::DEFAULT_RETAIN_ACKED_SHARE);
        self
    }
}

/// The file kept beside the segments so that a full file system can still take the next
/// batch and a clean stop: released (deleted) when a write meets ENOSPC, made again when
/// acknowledged segments free space.
pub const RESERVE_FILE: &str = "reserve";

/// The reserve's size for a limit: a sixteenth of it, at most 1 MiB (a batch of thousands of
/// runs and a segment header).
pub fn reserve_bytes_for(max_bytes: u64) -> u64 {
    (max_bytes / 16).min(1 << 20)
}

/// A torn tail cut on open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TornTail {
    pub file: PathBuf,
    pub offset: u64,
    pub bytes: u64,
    /// Where the cut bytes were saved (evidence for an operator), if any were non-empty.
    pub saved_to: Option<PathBuf>,
}

/// What [`Spool::open`] found and did. The daemon logs every entry.
#[derive(Clone, Debug, Default)]
pub struct OpenReport {
    pub segments: usize,
    pub records: u64,
    /// Damage kept in place (not at the tail): intact records around it stay usable; the
    /// damaged batches are lost to this node and show as missing seqs to the ledger and verify.
    pub damage: Vec<(PathBuf, Damage)>,
    pub torn_tails: Vec<TornTail>,
    pub deleted_segments: Vec<PathBuf>,
    /// The ack file was unreadable or malformed and was treated as 0 (re-sending is safe).
    pub ack_warning: Option<String>,
    pub acked_seq: u64,
    pub last_seq: u64,
    /// Whether the reserve file is in place (see [`RESERVE_FILE`]); false when the file
    /// system had no room for it.
    pub reserve: bool,
}

#[derive(Debug)]
struct Segment {
    first_seq: u64,
    path: PathBuf,
    len: u64,
    /// When a record was last written to it (its mtime, after a restart).
    written: std::time::SystemTime,
}

/// An open spool. See the module doc for the contract.
#[derive(Debug)]
pub struct Spool {
    cfg: SpoolConfig,
    segments: Vec<Segment>,
    active: File,
    /// Bytes of the active segment known durable.
    durable_len: u64,
    last_seq: u64,
    last_hash: ChainHash,
    synced_seq: u64,
    acked_seq: u64,
    total_bytes: u64,
    last_rotation: Option<KeyId>,
    poisoned: bool,
    /// The file system said ENOSPC since the last successful write: acknowledged batches are
    /// not retained until it takes writes again.
    space_short: bool,
    /// Stopping: the last batches may take `max_bytes` plus the reserve's size (see
    /// [`Spool::allow_final_overrun`]).
    final_overrun: bool,
    /// The running totals of the last appended batch (the sealer says, see
    /// [`Spool::note_totals`]); a new segment's header carries them.
    last_totals: Option<RunningTotals>,
}

/// The cursor's text: always the same length (the seq zero-padded to 20 digits), so that it is
/// rewritten in place, within one sector, and never needs a new block: acknowledging (and so
/// freeing segments) works on a full file system. A torn write fails its CRC and reads as 0
/// (re-sending is safe: the ledger dedupes).
fn ack_text(seq: u64) -> String {
    let s = format!("{seq:020}");
    format!("{s} {:08x}\n", crc32c::crc32c(s.as_bytes()))
}

/// Writes the acknowledged cursor in place (made with its final length the first time).
fn write_ack(cfg: &SpoolConfig, seq: u64) -> Result<(), AtomicWriteError> {
    let text = ack_text(seq);
    let path = cfg.dir.join(ACK_FILE);
    let file = match OpenOptions::new().write(true).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return durable::write_atomic(&cfg.dir, ACK_FILE, text.as_bytes(), 0o644, true);
        }
        Err(e) => return Err(AtomicWriteError::Write(e)),
    };
    cfg.fs
        .write_at(&file, text.as_bytes(), 0)
        .map_err(AtomicWriteError::Write)?;
    // An older, shorter cursor: cut what is left of it (only ever once).
    let len = file.metadata().map_err(AtomicWriteError::Write)?.len();
    if len != text.len() as u64 {
        file.set_len(text.len() as u64)
            .map_err(AtomicWriteError::Write)?;
    }
    cfg.fs.sync_data(&file).map_err(AtomicWriteError::Sync)
}

/// Makes the reserve file (allocated, not sparse) if it is missing. False when there is no
/// room for it now.
fn make_reserve(cfg: &SpoolConfig) -> bool {
    let path = cfg.dir.join(RESERVE_FILE);
    if path.exists() {
        return true;
    }
    let bytes = reserve_bytes_for(cfg.max_bytes);
    let Ok(file) = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
    else {
        return false;
    };
    let len = libc::off_t::try_from(bytes).unwrap_or(libc::off_t::MAX);
    // SAFETY: a valid open descriptor; posix_fallocate has no other preconditions.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
    if rc != 0 {
        drop(file);
        let _ = std::fs::remove_file(&path);
        return false;
    }
    true
}

/// Deletes the reserve file; true if there was one.
fn release_reserve(cfg: &SpoolConfig) -> bool {
    std::fs::remove_file(cfg.dir.join(RESERVE_FILE)).is_ok()
}

fn open_rw(path: &Path) -> Result<File, SpoolError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| SpoolError::io(path, e))
}

impl Spool {
    pub fn dir(&self) -> &Path {
        &self.cfg.dir
    }

    pub fn node_id(&self) -> &str {
        &self.cfg.node_id
    }

    /// seq of the last appended batch (0 if none ever).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Chain hash of the last appended batch: the next batch's `prev_hash`.
    pub fn last_hash(&self) -> ChainHash {
        self.last_hash
    }

    /// Every batch up to this seq is durable (sealed).
    pub fn sealed_seq(&self) -> u64 {
        self.synced_seq
    }

    pub fn acked_seq(&self) -> u64 {
        self.acked_seq
    }

    /// Bytes of all segments.
    pub fn used_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Key id announced by the KeyRotation in the last batch, if it carried one.
    pub fn last_rotation(&self) -> Option<KeyId> {
        self.last_rotation
    }

    /// Length of the active segment known durable, and its path: what survives a power cut
    /// right now. For crash simulation in tests.
    pub fn durable_tail(&self) -> (PathBuf, u64) {
        let path = self
            .segments
            .last()
            .map(|s| s.path.clone())
            .unwrap_or_default();
        (path, self.durable_len)
    }

    fn check_usable(&self) -> Result<(), SpoolError> {
        if self.poisoned {
            return Err(SpoolError::Poisoned {
                dir: self.cfg.dir.clone(),
            });
        }
        Ok(())
    }

    fn poison(&mut self, e: SpoolError) -> SpoolError {
        self.poisoned = true;
        e
    }

    fn full(&self, needed_bytes: u64, enospc: bool) -> SpoolError {
        SpoolError::Full {
            dir: self.cfg.dir.clone(),
            used_bytes: self.total_bytes,
            needed_bytes,
            max_bytes: self.cfg.max_bytes,
            enospc,
        }
    }

    /// The size at which the active segment rolls.
    pub fn max_segment_bytes(&self) -> u64 {
        self.cfg.max_segment_bytes
    }

    /// The running totals of the last batch: read back at open (from its record, or from the
    /// header of a segment made after it), then as the sealer notes them.
    pub fn last_totals(&self) -> Option<&RunningTotals> {
        self.last_totals.as_ref()
    }

    /// The running totals of the batch just appended: the next segment's header carries them,
    /// so a restart continues them even when every earlier batch was freed.
    pub fn note_totals(&mut self, totals: &RunningTotals) {
        self.last_totals = Some(totals.clone());
    }

    /// For a stop: from now on the spool may exceed `max_bytes` by the reserve's size
    /// ([`reserve_bytes_for`]), so the intervals a full spool made the daemon coarsen are sealed
    /// before it exits instead of being lost with the process. (On a full file system the
    /// reserve file itself makes that room.)
    pub fn allow_final_overrun(&mut self) {
        self.final_overrun = true;
    }

    /// Appends one signed batch. Not durable until [`Spool::sync`]. The batch must be the next
    /// in sequence and chained to the last one.
    pub fn append(&mut self, batch: &StoredBatch) -> Result<(), SpoolError> {
        self.check_usable()?;
        if batch.seq != self.last_seq + 1 || batch.prev_hash != self.last_hash {
            return Err(SpoolError::OutOfOrder {
                expected_seq: self.last_seq + 1,
                got_seq: batch.seq,
            });
        }
        if batch.bytes.len() > frame::RECORD_MAX_BYTES {
            return Err(SpoolError::RecordTooLarge {
                bytes: batch.bytes.len(),
                max_bytes: frame::RECORD_MAX_BYTES,
            });
        }
        let frame = encode_frame(RECORD_MAGIC, &batch.bytes);
        let frame_len = u64::try_from(frame.len()).unwrap_or(u64::MAX);
        let header_reserve = 512; // a new segment's header, bounded by its node id
        let limit = if self.final_overrun {
            self.cfg.max_bytes + reserve_bytes_for(self.cfg.max_bytes)
        } else {
            self.cfg.max_bytes
        };
        if self.total_bytes + frame_len + header_reserve > limit {
            // Retained acknowledged batches make room before anything new is refused.
            self.delete_acknowledged_with(true)?;
            if self.total_bytes + frame_len + header_reserve > limit {
                return Err(self.full(frame_len, false));
            }
        }
        let active_len = self.segments.last().map_or(0, |s| s.len);
        let has_records = self
            .segments
            .last()
            .is_some_and(|s| s.first_seq <= self.last_seq);
        if has_records && active_len + frame_len > self.cfg.max_segment_bytes {
            match self.roll(batch.seq) {
                // No room for the new segment: the reserve makes it.
                Err(e) if e.is_full() => {
                    self.space_short = true;
                    let freed = !self.delete_acknowledged_with(true)?.is_empty();
                    if !freed && !release_reserve(&self.cfg) {
                        return Err(e);
                    }
                    self.roll(batch.seq)?
                }
                r => r?,
            }
        }
        let (path, offset) = match self.segments.last() {
            Some(s) => (s.path.clone(), s.len),
            None => {
                return Err(SpoolError::Poisoned {
                    dir: self.cfg.dir.clone(),
                })
            }
        };
        if let Err(source) = self.cfg.fs.write_at(&self.active, &frame, offset) {
            // Take back whatever part landed, so the file ends at a record boundary again.
            if let Err(e) = self.active.set_len(offset) {
                return Err(self.poison(SpoolError::WriteFailed {
                    path,
                    offset,
                    source: e,
                }));
            }
            if is_no_space(&source) {
                self.space_short = true;
                // Retained acknowledged batches go first, then the reserve.
                if !self.delete_acknowledged_with(true)?.is_empty()
                    && self.cfg.fs.write_at(&self.active, &frame, offset).is_ok()
                {
                    return self.appended(batch, &frame, path, offset, frame_len);
                }
                // The file system is full: give up the reserve and try once more, so this
                // batch (the last one before a stop, perhaps) is not lost to the disk.
                if release_reserve(&self.cfg) {
                    tracing::warn!(
                        dir = %self.cfg.dir.display(),
                        "the file system is full: the spool's reserve is released for this batch"
                    );
                    if self.cfg.fs.write_at(&self.active, &frame, offset).is_ok() {
                        return self.appended(batch, &frame, path, offset, frame_len);
                    }
                    if let Err(e) = self.active.set_len(offset) {
                        return Err(self.poison(SpoolError::WriteFailed {
                            path,
                            offset,
                            source: e,
                        }));
                    }
                }
                return Err(self.full(frame_len, true));
            }
            return Err(self.poison(SpoolError::WriteFailed {
                path,
                offset,
                source,
            }));
        }
        self.appended(batch, &frame, path, offset, frame_len)
    }

    /// After a write of `frame` at `offset`: reads it back and takes the batch as appended.
    fn appended(
        &mut self,
        batch: &StoredBatch,
        frame: &[u8],
        path: PathBuf,
        offset: u64,
        frame_len: u64,
    ) -> Result<(), SpoolError> {
        // Read the record back and compare: catches a misdirected or corrupted write before
        // the batch is reported as appended.
        let mut back = vec![0u8; frame.len()];
        if self.active.read_exact_at(&mut back, offset).is_err() || back != frame {
            return Err(self.poison(SpoolError::ReadBackMismatch { path, offset }));
        }
        if let Some(s) = self.segments.last_mut() {
            s.len += frame_len;
            s.written = std::time::SystemTime::now();
        }
        self.total_bytes += frame_len;
        self.space_short = false;
        self.last_seq = batch.seq;
        self.last_hash = batch.hash;
        self.last_rotation = None;
        Ok(())
    }

    /// Like [`Spool::append`], and remembers the key id the batch announces (rotation).
    pub fn append_rotation(
        &mut self,
        batch: &StoredBatch,
        announced: KeyId,
    ) -> Result<(), SpoolError> {
        self.append(batch)?;
        self.last_rotation = Some(announced);
        Ok(())
    }

    /// Closes the active segment (durably) and starts a new one for `first_seq`.
    fn roll(&mut self, first_seq: u64) -> Result<(), SpoolError> {
        self.sync()?;
        let (seg, file) = match create_segment(
            &self.cfg,
            first_seq,
            self.last_hash,
            self.last_totals.clone(),
        ) {
            Ok(x) => x,
            Err(e) if e.is_fatal() => return Err(self.poison(e)),
            // With this spool's own numbers.
            Err(SpoolError::Full { needed_bytes, .. }) => return Err(self.full(needed_bytes, true)),
            Err(e) => return Err(e),
        };
        self.total_bytes += seg.len;
        self.durable_len = seg.len;
        self.segments.push(seg);
        self.active = file;
        Ok(())
    }

    /// fdatasync: every appended batch becomes sealed. One call covers all batches appended
    /// since the last (group commit). Returns the sealed seq. A failure is fatal.
    pub fn sync(&mut self) -> Result<u64, SpoolError> {
        self.check_usable()?;
        let len = self.segments.last().map_or(0, |s| s.len);
        if self.durable_len < len {
            if let Err(source) = self.cfg.fs.sync_data(&self.active) {
                let path = self
                    .segments
                    .last()
                    .map(|s| s.path.clone())
                    .unwrap_or_default();
                return Err(self.poison(SpoolError::SyncFailed { path, source }));
            }
            self.durable_len = len;
        }
        self.synced_seq = self.last_seq;
        Ok(self.synced_seq)
    }

    /// Records that the ledger durably stored every batch up to `seq`, then deletes the
    /// segments that hold only acknowledged batches and are not retained (see
    /// [`SpoolConfig::retain_acked`]). Idempotent; never moves backwards ([`Spool::rewind_ack`]
    /// does, for a restored ledger).
    pub fn ack(&mut self, seq: u64) -> Result<Vec<PathBuf>, SpoolError> {
        self.check_usable()?;
        if seq <= self.acked_seq {
            return Ok(Vec::new());
        }
        if seq > self.synced_seq {
            return Err(SpoolError::AckBeyondSealed {
                acked_seq: seq,
                sealed_seq: self.synced_seq,
            });
        }
        let path = self.cfg.dir.join(ACK_FILE);
        match write_ack(&self.cfg, seq) {
            Ok(()) => {}
            Err(AtomicWriteError::Sync(source)) => {
                return Err(self.poison(SpoolError::SyncFailed { path, source }))
            }
            Err(e) => {
                let e = e.into_io();
                if is_no_space(&e) {
                    return Err(self.full(0, true));
                }
                return Err(SpoolError::io(&path, e));
            }
        }
        self.acked_seq = seq;
        // Everything is acknowledged and the active segment is half full: start a new one so
        // that this one can be freed now, not when it fills.
        let active_len = self.segments.last().map_or(0, |s| s.len);
        let active_has_records = self
            .segments
            .last()
            .is_some_and(|s| s.first_seq <= self.last_seq);
        if self.acked_seq == self.last_seq
            && self.synced_seq == self.last_seq
            && active_has_records
            && active_len >= self.cfg.max_segment_bytes / 2
        {
            match self.roll(self.last_seq + 1) {
                Ok(()) => {}
                // No room for a new segment's header now: the next append rolls.
                Err(e) if e.is_full() || matches!(e, SpoolError::Io { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let deleted = self.delete_acknowledged()?;
        if !deleted.is_empty() {
            make_reserve(&self.cfg);
        }
        Ok(deleted)
    }

    /// Deletes every segment, except the active one, whose batches are all acknowledged.
    /// Deletes the oldest segments that hold only acknowledged batches and are not retained:
    /// older than `retain_acked`, beyond `retain_acked_bytes`, or all of them when `force` (a
    /// batch needs the room) or the file system is full. Never the active segment.
    fn delete_acknowledged_with(&mut self, force: bool) -> Result<Vec<PathBuf>, SpoolError> {
        let now = std::time::SystemTime::now();
        let mut deleted = Vec::new();
        while self.segments.len() > 1 && self.segments[1].first_seq - 1 <= self.acked_seq {
            // Bytes of the acknowledged segments that could be freed (the active one aside).
            let retained: u64 = (0..self.segments.len() - 1)
                .take_while(|&i| self.segments[i + 1].first_seq - 1 <= self.acked_seq)
                .map(|i| self.segments[i].len)
                .sum();
            let age = now
                .duration_since(self.segments[0].written)
                .unwrap_or_default();
            let free = force
                || self.space_short
                || retained > self.cfg.retain_acked_bytes
                || age >= self.cfg.retain_acked;
            if !free {
                break;
            }
            let seg = self.segments.remove(0);
            std::fs::remove_file(&seg.path).map_err(|e| SpoolError::io(&seg.path, e))?;
            self.total_bytes -= seg.len;
            deleted.push(seg.path);
        }
        if !deleted.is_empty() {
            // A removal lost to a crash only means re-sending acknowledged batches: not fatal.
            self.cfg
                .fs
                .sync_dir(&self.cfg.dir)
                .map_err(|e| SpoolError::io(&self.cfg.dir, e))?;
        }
        Ok(deleted)
    }

    fn delete_acknowledged(&mut self) -> Result<Vec<PathBuf>, SpoolError> {
        self.delete_acknowledged_with(false)
    }

    /// The first seq the spool still holds (retained acknowledged batches included); the last
    /// seq + 1 when it holds none.
    pub fn first_held_seq(&self) -> u64 {
        self.segments
            .first()
            .map_or(self.last_seq + 1, |s| s.first_seq)
    }

    /// The ledger holds less than it acknowledged before (restored from a backup): moves the
    /// acknowledged cursor back to `seq`, but never below what the spool still holds (the
    /// batches before that are gone from this node). Returns the cursor. Never moves forward.
    pub fn rewind_ack(&mut self, seq: u64) -> Result<u64, SpoolError> {
        self.check_usable()?;
        let to = seq.max(self.first_held_seq().saturating_sub(1));
        if to >= self.acked_seq {
            return Ok(self.acked_seq);
        }
        let path = self.cfg.dir.join(ACK_FILE);
        match write_ack(&self.cfg, to) {
            Ok(()) => {}
            Err(AtomicWriteError::Sync(source)) => {
                return Err(self.poison(SpoolError::SyncFailed { path, source }))
            }
            Err(e) => return Err(SpoolError::io(&path, e.into_io())),
        }
        self.acked_seq = to;
        Ok(to)
    }

    /// Sealed batches with seq >= `from_seq`, at most `max` of them, in seq order (what the
    /// shipper sends). Damaged records are skipped (the ledger sees their seqs missing).
    pub fn read_sealed(&self, from_seq: u64, max: usize) -> Result<Vec<StoredBatch>, SpoolError> {
        let mut out = Vec::new();
        for (i, seg) in self.segments.iter().enumerate() {
            let next_first = self.segments.get(i + 1).map(|s| s.first_seq);
            if next_first.is_some_and(|n| n <= from_seq) {
                continue;
            }
            let bytes = std::fs::read(&seg.path).map_err(|e| SpoolError::io(&seg.path, e))?;
            let scan = scan_segment(bytes);
            for item in &scan.items {
                if let ScanItem::Record { payload, .. } = item {
                    let Ok((b, _)) = StoredBatch::from_bytes(scan.bytes[payload.clone()].to_vec())
                    else {
                        continue;
                    };
                    if b.seq > self.synced_seq || out.len() >= max {
                        return Ok(out);
                    }
                    if b.seq >= from_seq {
                        out.push(b);
                    }
                }
            }
        }
        Ok(out)
    }
}

fn sync_dir(cfg: &SpoolConfig, dir: &Path) -> Result<(), SpoolError> {
    cfg.fs
        .sync_dir(dir)
        .map_err(|source| SpoolError::SyncFailed {
            path: dir.to_owned(),
            source,
        })
}

/// Creates a segment durably: header written and synced, directory entry synced.
fn create_segment(
    cfg: &SpoolConfig,
    first_seq: u64,
    prev_hash: ChainHash,
    totals: Option<RunningTotals>,
) -> Result<(Segment, File), SpoolError> {
    let path = cfg.dir.join(segment_name(first_seq));
    let header = SegmentHeader {
        node_id: cfg.node_id.clone(),
        first_seq,
        prev_hash,
        totals,
    }
    .encode();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o640)
        .open(&path)
        .map_err(|e| SpoolError::io(&path, e))?;
    if let Err(source) = cfg.fs.write_at(&file, &header, 0) {
        let _ = std::fs::remove_file(&path);
        if is_no_space(&source) {
            return Err(SpoolError::Full {
                dir: cfg.dir.clone(),
                used_bytes: 0,
                needed_bytes: u64::try_from(header.len()).unwrap_or(0),
                max_bytes: cfg.max_bytes,
                enospc: true,
            });
        }
        return Err(SpoolError::WriteFailed {
            path,
            offset: 0,
            source,
        });
    }
    cfg.fs
        .sync_data(&file)
        .map_err(|source| SpoolError::SyncFailed {
            path: path.clone(),
            source,
        })?;
    sync_dir(cfg, &cfg.dir)?;
    let len = u64::try_from(header.len()).unwrap_or(u64::MAX);
    Ok((
        Segment {
            first_seq,
            path,
            len,
            written: std::time::SystemTime::now(),
        },
        file,
    ))
}
