//! Shared helpers for the criterion benchmarks under `benches/`.

#![forbid(unsafe_code)]

use std::path::PathBuf;

use wattd_collectors::cgroup::find_cgroup2_mount;
use wattd_collectors::HostRoot;

/// Run cgroups under the live cgroup2 mount (`<root>/flowzart.slice/run-<id>.scope`, the
/// default pattern), each with a sleeping process when populated; the processes are killed and
/// the cgroups removed on drop.
#[derive(Debug)]
pub struct RunTree {
    pub root: PathBuf,
    sleepers: Vec<std::process::Child>,
}

impl RunTree {
    /// `runs` run cgroups named `run-<prefix><i>.scope`; with `populated`, each holds a
    /// sleeping process, so the tracker must read it every tick (an empty one is read once
    /// after it empties, then skipped). `None` without root, cgroup v2 or enough pids.
    pub fn new(prefix: &str, runs: usize, populated: bool) -> Option<RunTree> {
        let mount = find_cgroup2_mount(&HostRoot::live()).ok()?.mount_point;
        let root = mount.join(format!(
            "wattd-bench-{prefix}-{}-{runs}-{populated}",
            std::process::id()
        ));
        std::fs::create_dir(&root).ok()?;
        let mut tree = RunTree {
            root,
            sleepers: Vec::new(),
        };
        std::fs::create_dir(tree.root.join("flowzart.slice")).ok()?;
        for i in 0..runs {
            let dir = tree
                .root
                .join(format!("flowzart.slice/run-{prefix}{i}.scope"));
            std::fs::create_dir(&dir).ok()?;
            if populated {
                let child = std::process::Command::new("sleep")
                    .arg("900")
                    .spawn()
                    .ok()?;
                let pid = child.id();
                tree.sleepers.push(child);
                std::fs::write(dir.join("cgroup.procs"), pid.to_string()).ok()?;
            }
        }
        Some(tree)
    }
}

impl Drop for RunTree {
    fn drop(&mut self) {
        for c in &mut self.sleepers {
            let _ = c.kill();
            let _ = c.wait();
        }
        let slice = self.root.join("flowzart.slice");
        if let Ok(rd) = std::fs::read_dir(&slice) {
            for e in rd.flatten() {
                let _ = std::fs::remove_dir(e.path());
            }
        }
        let _ = std::fs::remove_dir(&slice);
        let _ = std::fs::remove_dir(&self.root);
    }
}
