//! One usage tick of the run tracker over 10, 1,000 and 10,000 real (empty) run cgroups under
//! the live cgroup2 mount: the per-tick cost the daemon pays, divided by runs in the report.

use std::path::PathBuf;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use wattd_collectors::cgroup::{find_cgroup2_mount, RunTracker, TrackerConfig};
use wattd_collectors::HostRoot;

/// A cgroup subtree removed on drop, deepest first, after killing the sleepers put in it.
struct Tree(PathBuf, Vec<std::process::Child>);

impl Drop for Tree {
    fn drop(&mut self) {
        for c in &mut self.1 {
            let _ = c.kill();
            let _ = c.wait();
        }
        let slice = self.0.join("flowzart.slice");
        if let Ok(rd) = std::fs::read_dir(&slice) {
            for e in rd.flatten() {
                let _ = std::fs::remove_dir(e.path());
            }
        }
        let _ = std::fs::remove_dir(&slice);
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// `runs` run cgroups; with `populated`, each holds a sleeping process, so the tracker must
/// read it every tick (an empty one is read once after it empties, then skipped).
fn make_tree(runs: usize, populated: bool) -> Option<Tree> {
    let mount = find_cgroup2_mount(&HostRoot::live()).ok()?.mount_point;
    let root = mount.join(format!(
        "wattd-bench-{}-{runs}-{populated}",
        std::process::id()
    ));
    std::fs::create_dir(&root).ok()?;
    let mut tree = Tree(root, Vec::new());
    std::fs::create_dir(tree.0.join("flowzart.slice")).ok()?;
    for i in 0..runs {
        let dir = tree.0.join(format!("flowzart.slice/run-b{i}.scope"));
        std::fs::create_dir(&dir).ok()?;
        if populated {
            let child = std::process::Command::new("sleep")
                .arg("600")
                .spawn()
                .ok()?;
            let pid = child.id();
            tree.1.push(child);
            std::fs::write(dir.join("cgroup.procs"), pid.to_string()).ok()?;
        }
    }
    Some(tree)
}

fn usage_tick(c: &mut Criterion) {
    let mut group = c.benchmark_group("usage_tick");
    group.sample_size(20);
    for (runs, populated) in [
        (10usize, false),
        (1_000, false),
        (10_000, false),
        (10, true),
        (1_000, true),
    ] {
        let name = if populated { "populated" } else { "empty" };
        let Some(tree) = make_tree(runs, populated) else {
            eprintln!(
                "SKIPPED: usage_tick/{runs}: cannot create cgroups (needs root and cgroup v2)"
            );
            return;
        };
        let mut config = TrackerConfig::new(HostRoot::live());
        config.cgroup_root = Some(tree.0.clone());
        config.rescan_every_ticks = 0;
        let mut tracker = match RunTracker::new(config) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("SKIPPED: usage_tick/{runs}: {e}");
                return;
            }
        };
        let s = tracker.tick(1_000_000);
        eprintln!(
            "usage_tick/{runs}: {} runs, counters {:?}, perf {:?}",
            s.runs.len(),
            s.counters,
            s.perf_disabled
        );
        group.throughput(Throughput::Elements(runs as u64));
        group.bench_with_input(BenchmarkId::new(name, runs), &runs, |b, _| {
            b.iter(|| tracker.tick(1_000_000))
        });
        drop(tracker);
        drop(tree);
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = usage_tick
}
criterion_main!(benches);
