//! Descriptor counts that see only what the code under test opened.
//!
//! Counting all of `/proc/self/fd` races with every other test of the same binary (a tokio
//! runtime's eventpoll and eventfd, a temp file, a socket of another harness). These count the
//! descriptors that point *into* a directory the test owns, and the Unix sockets bound to a path
//! it owns (a listener and every connection it accepted carry the listener's path).

use std::collections::HashSet;
use std::path::Path;

/// This process's descriptors whose target lies under `dir` (files and directories), listed
/// as `fd->target` for a readable failure message.
pub fn fds_under(dir: &Path) -> Vec<String> {
    own_fds(|target| target.starts_with(dir))
}

/// This process's descriptors whose target passes `keep`, as sorted `fd->target` lines.
fn own_fds(keep: impl Fn(&Path) -> bool) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    let mut v: Vec<String> = rd
        .flatten()
        .filter_map(|e| {
            let target = std::fs::read_link(e.path()).ok()?;
            keep(&target)
                .then(|| format!("{}->{}", e.file_name().to_string_lossy(), target.display()))
        })
        .collect();
    v.sort();
    v
}

/// This process's descriptors that are Unix sockets bound to `path`: the listener and every
/// connection it accepted and has not closed. A client's end has no path and is not counted.
pub fn unix_socket_fds(path: &Path) -> Vec<String> {
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return Vec::new();
    };
    let want = path.as_os_str().to_string_lossy();
    // Num RefCount Protocol Flags Type St Inode Path
    let inodes: HashSet<&str> = table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.len() >= 8 && cols[7] == want).then_some(cols[6])
        })
        .collect();
    own_fds(|target| {
        let t = target.to_string_lossy();
        t.strip_prefix("socket:[")
            .and_then(|t| t.strip_suffix(']'))
            .is_some_and(|inode| inodes.contains(inode))
    })
}
