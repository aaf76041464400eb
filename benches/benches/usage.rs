//! One usage tick of the run tracker over 10, 1,000 and 10,000 real (empty) run cgroups under
//! the live cgroup2 mount: the per-tick cost the daemon pays, divided by runs in the report.
//! And the floor under it (`cpu_stat_floor`): a positioned read of each of 1,000 live cgroups'
//! `cpu.stat` on kept descriptors, nothing parsed, which is what the kernel alone costs.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use wattd_benches::RunTree;
use wattd_collectors::cgroup::{RunTracker, TrackerConfig};
use wattd_collectors::HostRoot;

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
        let Some(tree) = RunTree::new("b", runs, populated) else {
            eprintln!(
                "SKIPPED: usage_tick/{runs}: cannot create cgroups (needs root and cgroup v2)"
            );
            return;
        };
        let mut config = TrackerConfig::new(HostRoot::live());
        config.cgroup_root = Some(tree.root.clone());
        config.rescan_every = None;
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

fn cpu_stat_floor(c: &mut Criterion) {
    use std::os::unix::fs::FileExt as _;
    let runs = 1_000usize;
    let Some(tree) = RunTree::new("f", runs, true) else {
        eprintln!("SKIPPED: cpu_stat_floor: cannot create cgroups (needs root and cgroup v2)");
        return;
    };
    let files: Vec<std::fs::File> = (0..runs)
        .filter_map(|i| {
            let p = tree
                .root
                .join(format!("flowzart.slice/run-f{i}.scope/cpu.stat"));
            std::fs::File::open(p).ok()
        })
        .collect();
    assert_eq!(files.len(), runs, "every cgroup's cpu.stat opens");
    let mut buf = [0u8; 4096];
    let mut group = c.benchmark_group("cpu_stat_floor");
    group.sample_size(20);
    group.throughput(Throughput::Elements(runs as u64));
    group.bench_function(BenchmarkId::new("populated", runs), |b| {
        b.iter(|| {
            let mut bytes = 0;
            for f in &files {
                bytes += f.read_at(&mut buf, 0).unwrap_or(0);
            }
            bytes
        })
    });
    group.finish();
    drop(files);
    drop(tree);
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = usage_tick, cpu_stat_floor
}
criterion_main!(benches);
