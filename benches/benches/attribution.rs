//! Benchmark of the attribution engine: one interval of 10,000 runs over two packages, with a
//! package and a DRAM meter each and psys, under each idle policy.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use wattd::attribution::{
    attribute, DramPolicy, IdleEstimate, IdlePolicy, IdleSource, IntervalInput, Measured,
    MeterInput, Policy, RunUsage, Usage,
};
use wattd_collectors::{Domain, MeterKey, Quality, SourceKind};

fn input(runs: usize, idle: IdlePolicy) -> IntervalInput {
    input_with(runs, idle, true)
}

/// `server`: package and DRAM meters per socket plus psys (5 meters); otherwise the two
/// package meters only (an AMD-like host).
fn input_with(runs: usize, idle: IdlePolicy, server: bool) -> IntervalInput {
    let meter = |domain, package, e| MeterInput {
        key: MeterKey {
            domain,
            package,
            die: None,
        },
        source: SourceKind::Powercap,
        quality: Quality::Measured,
        measured: Measured::Energy { energy_uj: e },
        idle: IdleEstimate {
            power_uw: 20_000_000,
            source: IdleSource::Window,
        },
    };
    IntervalInput {
        elapsed_us: 1_000_000,
        meters: if server {
            vec![
                meter(Domain::Package, Some(0), 150_000_000),
                meter(Domain::Package, Some(1), 140_000_000),
                meter(Domain::Dram, Some(0), 20_000_000),
                meter(Domain::Dram, Some(1), 21_000_000),
                meter(Domain::Psys, None, 400_000_000),
            ]
        } else {
            vec![
                meter(Domain::Package, Some(0), 150_000_000),
                meter(Domain::Package, Some(1), 140_000_000),
            ]
        },
        usage: Some(Usage {
            runs: (0..runs)
                .map(|i| RunUsage {
                    run_id: format!("run-{i:05}").into(),
                    cpu_us: [
                        (0, (i as u64 * 7919) % 9_000),
                        (1, (i as u64 * 104_729) % 7_000),
                    ]
                    .into_iter()
                    .collect(),
                    memory_bytes: Some(1 << 20),
                    reserved_millicpus: [(0, 5), (1, 5)].into_iter().collect(),
                })
                .collect(),
            busy_us: [(0, 48_000_000), (1, 40_000_000)].into_iter().collect(),
            package_cpus: [(0, 48), (1, 48)].into_iter().collect(),
            host_memory_bytes: Some(1 << 40),
            gpus: Default::default(),
            cpu_busy_unknown: false,
        }),
        policy: Policy {
            idle,
            dram: DramPolicy::Cpu,
            platform: wattd::attribution::PlatformPolicy::Proportional,
        },
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("attribute_10k_runs_2_packages");
    for idle in [
        IdlePolicy::Proportional,
        IdlePolicy::Reserved,
        IdlePolicy::Host,
    ] {
        let i = input(10_000, idle);
        g.bench_with_input(BenchmarkId::from_parameter(idle.as_str()), &i, |b, i| {
            b.iter(|| attribute(i))
        });
    }
    g.finish();
    let mut g = c.benchmark_group("attribute_10k_runs_2_package_meters");
    for idle in [
        IdlePolicy::Proportional,
        IdlePolicy::Reserved,
        IdlePolicy::Host,
    ] {
        let i = input_with(10_000, idle, false);
        g.bench_with_input(BenchmarkId::from_parameter(idle.as_str()), &i, |b, i| {
            b.iter(|| attribute(i))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
