//! A tail reader of the spool for the shipper: it reads sealed batches in seq order from the
//! segment files with positioned reads, remembering where it stopped, so shipping one new
//! batch costs one small read instead of a scan of a 64 MiB segment.
//!
//! It only reads; the daemon's [`Spool`](super::Spool) stays the one writer. The daemon tells
//! the shipper how far the spool is sealed (durable); the reader never reads past that, so it
//! never meets a half-written frame of a seq it needs. Segments deleted behind it (all their
//! batches acknowledged) stay readable through its open descriptor. A damaged record (CRC
//! mismatch, undecodable) is skipped exactly as [`Spool::read_sealed`](super::Spool::read_sealed)
//! skips it: the ledger then sees that seq missing and reports the hole.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use super::frame::{
    parse_frame, scan_segment, FrameError, ScanItem, FRAME_HEADER_BYTES, RECORD_MAGIC,
    RECORD_MAX_BYTES, SEGMENT_MAGIC,
};
use super::{list_segments, SpoolError};
use crate::batch::StoredBatch;

#[derive(Debug)]
struct Position {
    first_seq: u64,
    path: PathBuf,
    file: File,
    offset: u64,
}

/// Reads sealed batches from `dir` in seq order, from a starting seq on.
#[derive(Debug)]
pub struct SpoolReader {
    dir: PathBuf,
    /// The next seq to hand out.
    next_seq: u64,
    pos: Option<Position>,
}

fn read_at(file: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let n = file.read_at(&mut buf[done..], offset + done as u64)?;
        if n == 0 {
            break;
        }
        done += n;
    }
    buf.truncate(done);
    Ok(buf)
}

impl SpoolReader {
    /// A reader whose first batch will be `from_seq` (or the first intact one after it).
    pub fn new(dir: &Path, from_seq: u64) -> Self {
        Self {
            dir: dir.to_path_buf(),
            next_seq: from_seq.max(1),
            pos: None,
        }
    }

    /// The seq the next call to [`next`](Self::next) looks for.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Starts over at `seq` (after a reconnect, or when the ledger reports a hole).
    pub fn rewind(&mut self, seq: u64) {
        self.next_seq = seq.max(1);
        self.pos = None;
    }

    fn open_segment_for(&mut self, seq: u64) -> Result<bool, SpoolError> {
        let segments = list_segments(&self.dir)?;
        // The last segment that starts at or before `seq`; else the first one after it (the
        // batches before it are gone: acknowledged and deleted, or lost to damage).
        let pick = segments
            .iter()
            .rev()
            .find(|(first, _)| *first <= seq)
            .or_else(|| segments.first());
        let Some((first_seq, path)) = pick.cloned() else {
            return Ok(false);
        };
        self.open_at(first_seq, path)
    }

    fn open_at(&mut self, first_seq: u64, path: PathBuf) -> Result<bool, SpoolError> {
        let file = match File::open(&path) {
            Ok(f) => f,
            // Deleted between listing and opening: acknowledged meanwhile.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(SpoolError::io(&path, e)),
        };
        let head = read_at(&file, 0, FRAME_HEADER_BYTES).map_err(|e| SpoolError::io(&path, e))?;
        let offset = match parse_frame(&head, 0, SEGMENT_MAGIC) {
            // The header's own length says where the records start.
            Err(FrameError::Truncated { need, .. }) if head.len() == FRAME_HEADER_BYTES => {
                need as u64
            }
            // A damaged header: the records are found by scanning (see `skip_damage`).
            _ => 0,
        };
        self.pos = Some(Position {
            first_seq,
            path,
            file,
            offset,
        });
        Ok(true)
    }

    /// Moves to the segment after the current one, if there is one.
    fn advance_segment(&mut self) -> Result<bool, SpoolError> {
        let current = self.pos.as_ref().map_or(0, |p| p.first_seq);
        let next = list_segments(&self.dir)?
            .into_iter()
            .find(|(first, _)| *first > current);
        match next {
            Some((first_seq, path)) => self.open_at(first_seq, path),
            None => Ok(false),
        }
    }

    /// After damage at the current offset: the offset of the next intact record of the
    /// segment, found by a full scan (rare: only a damaged spool pays it).
    fn skip_damage(&mut self) -> Result<Option<u64>, SpoolError> {
        let Some(pos) = &self.pos else {
            return Ok(None);
        };
        let bytes = std::fs::read(&pos.path).map_err(|e| SpoolError::io(&pos.path, e))?;
        let scan = scan_segment(bytes);
        Ok(scan.items.iter().find_map(|item| match item {
            ScanItem::Record { offset, .. } if *offset > pos.offset => Some(*offset),
            _ => None,
        }))
    }

    /// The next sealed batch with seq in `next_seq ..= sealed_seq`, or `None` when there is
    /// none yet.
    pub fn next(&mut self, sealed_seq: u64) -> Result<Option<StoredBatch>, SpoolError> {
        // Each pass either returns, or moves forward by a record or a segment; the bound only
        // guards against a spool that changes under us in a way the daemon never does.
        for _ in 0..1_000_000 {
            if self.next_seq > sealed_seq {
                return Ok(None);
            }
            if self.pos.is_none() && !self.open_segment_for(self.next_seq)? {
                return Ok(None);
            }
            let Some(pos) = self.pos.as_mut() else {
                return Ok(None);
            };
            let head = read_at(&pos.file, pos.offset, FRAME_HEADER_BYTES)
                .map_err(|e| SpoolError::io(&pos.path, e))?;
            if head.is_empty() {
                // End of this segment: on to the next, if the writer has started one.
                if !self.advance_segment()? {
                    return Ok(None);
                }
                continue;
            }
            let len = match parse_frame(&head, 0, RECORD_MAGIC) {
                Err(FrameError::Truncated { have, need }) if have == FRAME_HEADER_BYTES => need,
                Err(FrameError::Truncated { .. }) => {
                    // A partial frame header at the end: bytes not yet sealed.
                    return Ok(None);
                }
                Ok(_) | Err(_) => 0,
            };
            let frame = if (FRAME_HEADER_BYTES + 1..=FRAME_HEADER_BYTES + RECORD_MAX_BYTES)
                .contains(&len)
            {
                read_at(&pos.file, pos.offset, len).map_err(|e| SpoolError::io(&pos.path, e))?
            } else {
                Vec::new()
            };
            match parse_frame(&frame, 0, RECORD_MAGIC) {
                Ok((payload, total)) => {
                    pos.offset += total as u64;
                    let Ok((batch, _)) = StoredBatch::from_bytes(frame[payload].to_vec()) else {
                        continue; // intact frame, undecodable batch: skipped like damage
                    };
                    if batch.seq < self.next_seq {
                        continue;
                    }
                    if batch.seq > sealed_seq {
                        // Not ours to read yet: come back to this frame later.
                        pos.offset -= total as u64;
                        return Ok(None);
                    }
                    self.next_seq = batch.seq + 1;
                    return Ok(Some(batch));
                }
                Err(FrameError::Truncated { .. }) if frame.len() < len => return Ok(None),
                Err(_) => match self.skip_damage()? {
                    Some(offset) => {
                        if let Some(p) = self.pos.as_mut() {
                            p.offset = offset;
                        }
                    }
                    None => {
                        // Nothing intact after the damage in this segment.
                        if !self.advance_segment()? {
                            return Ok(None);
                        }
                    }
                },
            }
        }
        Ok(None)
    }
}
