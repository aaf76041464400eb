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

    /// Reads a whole segment as the device holds it, not as the page cache remembers it: the
    /// file is fdatasynced first (pages a crashed writer left dirty are legitimate and reach
    /// the device), then its cached pages are dropped (`POSIX_FADV_DONTNEED`) and it is read
    /// from the device. After a failed writeback the kernel marks the pages clean and keeps
    /// them cached, and a fresh fdatasync returns 0 (the error went to the process that died
    /// of it), so a plain read at restart would take batches that never reached the disk for
    /// sealed ones.
    fn read_from_device(&self, path: &Path) -> io::Result<Vec<u8>> {
        use std::io::Read as _;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        self.sync_data(&file)?;
        rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(bytes)
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
