//! The spool's filesystem seam: the few calls whose failure the spool must survive or report
//! (writes that hit ENOSPC, fsyncs that fail). Production uses [`RealFs`]; tests wrap it to
//! inject faults. Everything else (listing, reading, renaming) goes straight to `std::fs`.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt as _;
use std::path::Path;

pub trait SpoolFs: std::fmt::Debug + Send + Sync {
    /// Writes all of `buf` at `offset`.
    fn write_at(&self, file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
        file.write_all_at(buf, offset)
    }

    /// fdatasync: after it returns Ok, the bytes written so far survive a power cut.
    fn sync_data(&self, file: &File) -> io::Result<()> {
        file.sync_data()
    }

    /// fsync of a directory: makes creations, renames and removals in it durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        crate::durable::sync_dir(dir)
    }
}

/// The real file system.
#[derive(Clone, Copy, Debug, Default)]
pub struct RealFs;

impl SpoolFs for RealFs {}
