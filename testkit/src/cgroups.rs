//! Real cgroup v2 directories for tests: found from /proc/self/mountinfo, created under a unique
//! parent, populated with real processes, and always removed (processes killed and reaped first).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};

/// The cgroup2 mount point of this machine, from /proc/self/mountinfo.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let s = fs::read_to_string("/proc/self/mountinfo").ok()?;
    for line in s.lines() {
        let (pre, post) = line.split_once(" - ")?;
        if post.split_whitespace().next() == Some("cgroup2") {
            return pre.split_whitespace().nth(4).map(PathBuf::from);
        }
    }
    None
}

/// Returns the cgroup2 mount if this process can create cgroups there. Otherwise prints a loud
/// SKIPPED line and returns `None`, or panics under the strict switch (see [`crate::need`]).
pub fn require_cgroups(test: &str) -> Option<PathBuf> {
    let why = match cgroup2_mount() {
        None => "no cgroup2 mount in /proc/self/mountinfo".to_owned(),
        Some(m) => {
            // Unique per call: tests of one process probe concurrently.
            let probe = m.join(format!(
                "wattd-probe-{}-{}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            ));
            match fs::create_dir(&probe) {
                Ok(()) => {
                    let _ = fs::remove_dir(&probe);
                    return Some(m);
                }
                Err(e) => format!("cannot create a cgroup under {}: {e}", m.display()),
            }
        }
    };
    crate::need::skip(test, format!("root and cgroup v2 ({why})"));
    None
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A parent cgroup owned by one test, removed with everything in it on drop.
#[derive(Debug)]
pub struct TestCgroups {
    mount: PathBuf,
    /// Relative to the mount.
    rel: PathBuf,
    /// Started processes, with the cgroup (relative to this tree) each was moved into.
    children: Vec<(String, Child)>,
}

impl TestCgroups {
    /// Creates `<mount>/wattd-test-<pid>-<n>-<name>`.
    pub fn new(mount: &Path, name: &str) -> io::Result<Self> {
        let rel = PathBuf::from(format!(
            "wattd-test-{}-{}-{name}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir(mount.join(&rel))?;
        Ok(TestCgroups {
            mount: mount.to_owned(),
            rel,
            children: Vec::new(),
        })
    }

    pub fn mount(&self) -> &Path {
        &self.mount
    }

    /// The parent's path relative to the mount (for run patterns).
    pub fn rel(&self) -> &Path {
        &self.rel
    }

    pub fn path(&self, sub: &str) -> PathBuf {
        self.mount.join(&self.rel).join(sub)
    }

    /// Creates a child cgroup (and its parents inside this test's tree).
    pub fn create(&self, sub: &str) -> io::Result<PathBuf> {
        let p = self.path(sub);
        fs::create_dir_all(&p)?;
        Ok(p)
    }

    /// Starts `cmd` and moves it into cgroup `sub` at once. The microseconds it runs before the
    /// move are counted in the parent's cgroup, which is why tests compare against the kernel's
    /// own count for the run's cgroup, not against the burner's duty cycle.
    pub fn spawn_in(&mut self, sub: &str, cmd: &mut Command) -> io::Result<u32> {
        let dir = self.create(sub)?;
        let child = cmd.spawn()?;
        let pid = child.id();
        fs::write(dir.join("cgroup.procs"), pid.to_string())?;
        self.children.push((sub.to_owned(), child));
        Ok(pid)
    }

    /// Starts the shell `script` in cgroup `sub`, the shell joining it itself before the script
    /// runs: all of the script's CPU time is the cgroup's, however late this thread gets to run
    /// (a process moved by [`Self::spawn_in`] may have finished before the move, on a busy
    /// machine).
    pub fn spawn_joining(&mut self, sub: &str, script: &str) -> io::Result<u32> {
        let dir = self.create(sub)?;
        let procs = dir.join("cgroup.procs");
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > '{}' || exit 97\n{script}",
                procs.display()
            ))
            .spawn()?;
        let pid = child.id();
        self.children.push((sub.to_owned(), child));
        Ok(pid)
    }

    /// Waits for every started process to exit.
    pub fn wait_all(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.wait();
        }
        self.children.clear();
    }

    /// Waits for every started process and, the moment each is reaped, reads its cgroup's
    /// `usage_usec` and removes the cgroup, as systemd does with a transient scope. Returns
    /// each cgroup's usage as read right before its removal.
    pub fn wait_all_removing_each(&mut self) -> io::Result<Vec<(String, u64)>> {
        let waiters: Vec<_> = self
            .children
            .drain(..)
            .map(|(sub, mut child)| {
                let dir = self.mount.join(&self.rel).join(&sub);
                std::thread::spawn(move || -> io::Result<(String, u64)> {
                    child.wait()?;
                    let usage = usage_usec_of(&dir)?;
                    fs::remove_dir(&dir)?;
                    Ok((sub, usage))
                })
            })
            .collect();
        waiters
            .into_iter()
            .map(|w| w.join().map_err(|_| io::Error::other("waiter panicked"))?)
            .collect()
    }

    /// `usage_usec` of a cgroup, as the kernel counts it.
    pub fn usage_usec(&self, sub: &str) -> io::Result<u64> {
        usage_usec_of(&self.path(sub))
    }
}

/// `usage_usec` of the cgroup directory `dir`, as the kernel counts it.
pub fn usage_usec_of(dir: &Path) -> io::Result<u64> {
    let s = fs::read_to_string(dir.join("cpu.stat"))?;
    s.lines()
        .find_map(|l| {
            l.strip_prefix("usage_usec ")
                .and_then(|v| v.trim().parse().ok())
        })
        .ok_or_else(|| io::Error::other("no usage_usec"))
}

impl Drop for TestCgroups {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Remove depth-first: a cgroup can be removed only when it has no children.
        fn rm(p: &Path) {
            if let Ok(rd) = fs::read_dir(p) {
                for e in rd.flatten() {
                    if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                        rm(&e.path());
                    }
                }
            }
            for _ in 0..50 {
                match fs::remove_dir(p) {
                    Ok(()) => return,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
                }
            }
            eprintln!("warning: could not remove test cgroup {}", p.display());
        }
        rm(&self.mount.join(&self.rel));
    }
}
