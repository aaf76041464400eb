//! A minimal non-blocking inotify wrapper (rustix's system calls): cgroupfs emits
//! `IN_CREATE`/`IN_DELETE` on a parent when a cgroup is made or removed, and `IN_MODIFY` on
//! `cgroup.events` when it empties, which is how runs are noticed without scanning.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::inotify;
use rustix::io::Errno;

/// One event as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub wd: i32,
    pub mask: u32,
    pub name: Option<OsString>,
}

/// Bytes read from the descriptor at a time: a few hundred events.
const READ_BUF_BYTES: usize = 16 * 1024;

#[derive(Debug)]
pub struct Inotify {
    fd: OwnedFd,
    /// Read into as it is (never zeroed): the daemon reads it at every tick.
    buf: Vec<u8>,
}

impl Inotify {
    pub fn new() -> io::Result<Self> {
        let fd = inotify::init(inotify::CreateFlags::NONBLOCK | inotify::CreateFlags::CLOEXEC)?;
        Ok(Inotify {
            fd,
            buf: Vec::with_capacity(READ_BUF_BYTES),
        })
    }

    pub fn add_watch(&self, path: &Path, mask: u32) -> io::Result<i32> {
        let wd = inotify::add_watch(&self.fd, path, inotify::WatchFlags::from_bits_retain(mask))?;
        Ok(wd)
    }

    /// Removes a watch; an already removed one (its inode went away) is fine.
    pub fn rm_watch(&self, wd: i32) {
        let _ = inotify::remove_watch(&self.fd, wd);
    }

    /// Reads every pending event without blocking.
    pub fn read_events(&mut self, out: &mut Vec<Event>) -> io::Result<()> {
        let mut reader = inotify::Reader::new(&self.fd, self.buf.spare_capacity_mut());
        loop {
            match reader.next() {
                Ok(ev) => out.push(Event {
                    wd: ev.wd(),
                    mask: ev.events().bits(),
                    name: ev
                        .file_name()
                        .map(|n| n.to_bytes())
                        .filter(|n| !n.is_empty())
                        .map(|n| std::ffi::OsStr::from_bytes(n).to_owned()),
                }),
                Err(Errno::AGAIN) => return Ok(()),
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Whether an event waits to be read (true when that cannot be told). The kernel queues a
    /// watched directory's `IN_CREATE` before `mkdir` returns, so with none pending no child
    /// has been made there since the queue was last read.
    pub fn pending(&self) -> bool {
        rustix::io::ioctl_fionread(&self.fd).map_or(true, |n| n > 0)
    }

    /// Blocks until an event is pending or `timeout` passes; true if one is pending.
    pub fn wait(&self, timeout: std::time::Duration) -> io::Result<bool> {
        // Beyond what a timespec holds: no bound.
        let timeout = rustix::time::Timespec::try_from(timeout).ok();
        loop {
            let mut fds = [rustix::event::PollFd::new(
                &self.fd,
                rustix::event::PollFlags::IN,
            )];
            match rustix::event::poll(&mut fds, timeout.as_ref()) {
                Ok(n) => return Ok(n > 0),
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl AsFd for Inotify {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sees_create_and_delete_in_a_temp_dir() {
        let dir = tempfile::tempdir().unwrap();
        let mut ino = Inotify::new().unwrap();
        let wd = ino
            .add_watch(dir.path(), libc::IN_CREATE | libc::IN_DELETE)
            .unwrap();
        std::fs::create_dir(dir.path().join("a b\u{e9}")).unwrap();
        std::fs::remove_dir(dir.path().join("a b\u{e9}")).unwrap();
        assert!(ino.wait(std::time::Duration::from_secs(1)).unwrap());
        let mut evs = Vec::new();
        ino.read_events(&mut evs).unwrap();
        let kinds: Vec<(i32, bool, Option<&std::ffi::OsStr>)> = evs
            .iter()
            .map(|e| (e.wd, e.mask & libc::IN_CREATE != 0, e.name.as_deref()))
            .collect();
        let n = Some(std::ffi::OsStr::new("a b\u{e9}"));
        assert_eq!(kinds, vec![(wd, true, n), (wd, false, n)]);
        evs.clear();
        ino.read_events(&mut evs).unwrap();
        assert!(evs.is_empty());
        assert!(!ino.wait(std::time::Duration::ZERO).unwrap());
    }
}
