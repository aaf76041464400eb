//! Benchmarks of the collectors' hot path: one tick's read of N powercap zones (pread on
//! kept-open descriptors, parse, counter update).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use wattd_collectors::powercap::{self, PowercapMeter};
use wattd_collectors::synth::{HostTree, ZoneSpec};
use wattd_collectors::{HostRoot, Meter};

fn read_zones(c: &mut Criterion) {
    let mut g = c.benchmark_group("powercap_read");
    for n in [1usize, 8, 64] {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = HostTree::new(dir.path());
        let names: Vec<(String, String)> = (0..n)
            .map(|i| (format!("intel-rapl:{i:x}"), format!("package-{i}")))
            .collect();
        for (d, name) in &names {
            t.zone(&ZoneSpec::new(d, name, "123456789")).expect("zone");
        }
        let scan = powercap::scan(&HostRoot::new(dir.path())).expect("scan");
        let mut meter = PowercapMeter::open(&scan).expect("open");
        let mut out = Vec::with_capacity(n);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                out.clear();
                meter.read(1_000_000, &mut out);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, read_zones);
criterion_main!(benches);
