//! A minimal non-blocking inotify wrapper over libc: cgroupfs emits `IN_CREATE`/`IN_DELETE` on
//! a parent when a cgroup is made or removed, and `IN_MODIFY` on `cgroup.events` when it
//! empties, which is how runs are noticed without scanning.

use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

/// One event as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub wd: i32,
    pub mask: u32,
    pub name: Option<OsString>,
}

#[derive(Debug)]
pub struct Inotify {
    fd: OwnedFd,
}

const HEADER: usize = std::mem::size_of::<libc::inotify_event>();

impl Inotify {
    pub fn new() -> io::Result<Self> {
        // SAFETY: inotify_init1 has no memory preconditions; a non-negative result is an fd we
        // now own.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by the kernel and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Inotify { fd })
    }

    pub fn add_watch(&self, path: &Path, mask: u32) -> io::Result<i32> {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path has a NUL byte"))?;
        // SAFETY: c is a valid NUL-terminated string that outlives the call.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), mask) };
        if wd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(wd)
    }

    /// Removes a watch; an already removed one (its inode went away) is fine.
    pub fn rm_watch(&self, wd: i32) {
        // SAFETY: plain syscall on our own fd; EINVAL for a stale wd is harmless.
        unsafe {
            libc::inotify_rm_watch(self.fd.as_raw_fd(), wd);
        }
    }

    /// Reads every pending event without blocking.
    pub fn read_events(&self, out: &mut Vec<Event>) -> io::Result<()> {
        let mut buf = [0u8; 16 * 1024];
        loop {
            // SAFETY: buf is valid for writes of buf.len() bytes.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast::<libc::c_void>(),
                    buf.len(),
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock => Ok(()),
                    io::ErrorKind::Interrupted => continue,
                    _ => Err(e),
                };
            }
            if n == 0 {
                return Ok(());
            }
            parse_events(&buf[..n as usize], out);
        }
    }

    /// Blocks until an event is pending or `timeout_ms` passes; true if one is pending.
    pub fn wait(&self, timeout_ms: i32) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: pfd is one valid pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            return Ok(r > 0);
        }
    }
}

impl AsFd for Inotify {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Parses a buffer of kernel `inotify_event` records; a truncated tail is dropped (the kernel
/// never splits an event across reads, so it cannot happen short of a kernel bug).
fn parse_events(mut b: &[u8], out: &mut Vec<Event>) {
    while b.len() >= HEADER {
        // SAFETY: at least HEADER bytes are readable; read_unaligned copes with alignment.
        let ev: libc::inotify_event =
            unsafe { std::ptr::read_unaligned(b.as_ptr().cast::<libc::inotify_event>()) };
        let len = ev.len as usize;
        let Some(name_bytes) = b.get(HEADER..HEADER + len) else {
            return;
        };
        let end = name_bytes.iter().position(|&c| c == 0).unwrap_or(len);
        let name = (end > 0).then(|| OsString::from_vec(name_bytes[..end].to_vec()));
        out.push(Event {
            wd: ev.wd,
            mask: ev.mask,
            name,
        });
        b = &b[HEADER + len..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sees_create_and_delete_in_a_temp_dir() {
        let dir = tempfile::tempdir().unwrap();
        let ino = Inotify::new().unwrap();
        let wd = ino
            .add_watch(dir.path(), libc::IN_CREATE | libc::IN_DELETE)
            .unwrap();
        std::fs::create_dir(dir.path().join("a b\u{e9}")).unwrap();
        std::fs::remove_dir(dir.path().join("a b\u{e9}")).unwrap();
        assert!(ino.wait(1000).unwrap());
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
        assert!(!ino.wait(0).unwrap());
    }
}
