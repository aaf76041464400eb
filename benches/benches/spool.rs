//! Spool benchmarks: seal-and-append throughput with real fdatasync (one batch per sync, and
//! group commit of 8 batches per sync), and verify throughput over a sealed spool. Batches of
//! 10 intervals x 20 runs x 2 domains, the shape of a busy host sealing every 10 s.
//!
//! Run: `cargo bench -p wattd-benches --bench spool`. The temp dir is under $TMPDIR: point it at
//! the file system the spool will live on, fdatasync cost is the whole story.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use wattd::identity::NodeKey;
use wattd::sealer::{SealPolicy, Sealer};
use wattd::spool::{Spool, SpoolConfig};
use wattd::verify::verify_spool;
use wattd_proto::v1::{Allocation, DomainEnergy, Interval, Quality};

const INTERVALS_PER_BATCH: usize = 10;
const RUNS: usize = 20;

fn domain(name: &str, runs: usize) -> DomainEnergy {
    let allocations: Vec<Allocation> = (0..runs)
        .map(|r| Allocation {
            run_id: format!("01J9ZRUN{r:04}-flowzart-workflow"),
            active_uj: 1_234_567 + r as u64,
            idle_uj: 89_012,
            usage_us: 250_000,
        })
        .collect();
    let allocated: u64 = allocations.iter().map(|a| a.active_uj + a.idle_uj).sum();
    DomainEnergy {
        domain: name.into(),
        package: Some(0),
        source: "powercap".into(),
        quality: Quality::Measured.into(),
        measured_uj: allocated + 300,
        idle_source: "config".into(),
        idle_power_uw: 20_000_000,
        allocations,
        host_active_uj: 200,
        host_idle_uj: 100,
        unattributed: vec![],
        ..Default::default()
    }
}

fn interval(index: u64) -> Interval {
    Interval {
        index,
        start_monotonic_ns: index * 1_000_000_000,
        end_monotonic_ns: (index + 1) * 1_000_000_000,
        start_unix_ns: 1_700_000_000_000_000_000,
        end_unix_ns: 1_700_000_001_000_000_000,
        policy: "proportional".into(),
        policy_version: 1,
        domains: vec![domain("package", RUNS), domain("dram", RUNS)],
        boot_id: "8d1c2f1e-8a61-4c36-9d8e-0b7f7b0f4a11".into(),
        ..Interval::default()
    }
}

fn new_sealer(dir: &std::path::Path) -> Sealer {
    let (spool, _) = match Spool::open(SpoolConfig::new(dir, "bench-node")) {
        Ok(x) => x,
        Err(e) => panic!("opening the bench spool: {e}"),
    };
    let policy = match SealPolicy::new(INTERVALS_PER_BATCH, Duration::from_secs(10)) {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    };
    Sealer::with_parts(
        dir.into(),
        NodeKey::from_seed("bench-node", 1, [7; 32]),
        spool,
        policy,
    )
}

fn seal_one(s: &mut Sealer, index: &mut u64) {
    for _ in 0..INTERVALS_PER_BATCH {
        if let Err(e) = s.push_interval(interval(*index), *index) {
            panic!("{e}");
        }
        *index += 1;
    }
    if let Err(e) = s.seal(0) {
        panic!("{e}");
    }
}

fn seal_and_append(c: &mut Criterion) {
    let mut g = c.benchmark_group("seal_append_fdatasync");
    for per_sync in [1usize, 8] {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let mut s = new_sealer(dir.path());
        let mut index = 0;
        g.throughput(Throughput::Elements(per_sync as u64));
        g.bench_function(format!("batches_{per_sync}_per_sync"), |b| {
            b.iter(|| {
                for _ in 0..per_sync {
                    seal_one(&mut s, &mut index);
                }
                if let Err(e) = s.commit() {
                    panic!("{e}");
                }
            })
        });
        // Keep the spool bounded across the measurement.
        let sealed = s.spool().sealed_seq();
        let _ = s.spool_mut().ack(sealed);
    }
    g.finish();
}

fn verify(c: &mut Criterion) {
    const BATCHES: u64 = 200;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let mut s = new_sealer(dir.path());
    let mut index = 0;
    for _ in 0..BATCHES {
        seal_one(&mut s, &mut index);
    }
    if let Err(e) = s.commit() {
        panic!("{e}");
    }
    let key = s.key().public();
    let mut g = c.benchmark_group("verify");
    g.throughput(Throughput::Elements(BATCHES));
    g.bench_function("spool_200_batches", |b| {
        b.iter_batched(
            || (),
            |()| match verify_spool(dir.path(), std::slice::from_ref(&key)) {
                Ok(r) if r.is_ok() => r,
                Ok(r) => panic!("{:?}", r.breaks),
                Err(e) => panic!("{e}"),
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, seal_and_append, verify);
criterion_main!(benches);
