//! One usage tick of the run tracker over 10, 1,000 and 10,000 real (empty) run cgroups under
//! the live cgroup2 mount: the per-tick cost the daemon pays, divided by runs in the report.

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
