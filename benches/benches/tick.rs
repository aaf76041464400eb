//! One whole tick of the daemon's measuring loop, without its fdatasync: the run tracker's usage
//! read (real cgroups under the live cgroup2 mount, each holding a sleeping process, as live runs
//! do), the usage mapped for attribution, the meters read (one powercap zone on a synthetic tree,
//! its counter moved every tick), attribution, the interval's record, and the batch signed and
//! encoded. The runs' processes sleep (10,000 busy ones would take the machine), so after the
//! real read each run's CPU time is set to a few milliseconds: every run then gets a share and a
//! line in the record, as busy runs do. At 100, 1,000 and 10,000 live runs; the report divides by runs. A counting allocator
//! prints the allocations one tick makes.
//!
//! `cargo bench -p wattd-benches --bench tick` (root, cgroup v2; spawns up to 10,000 `sleep`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use wattd::attribution::host::HostBalance;
use wattd::attribution::idle::IdleTracker;
use wattd::attribution::{DramPolicy, IdlePolicy, PlatformPolicy, Policy};
use wattd::sampler::{Meters, Reading, Sampler, Stamp};
use wattd_benches::RunTree;
use wattd_collectors::cgroup::{RunTracker, TrackerConfig};
use wattd_collectors::estimator::EstimatorModel;
use wattd_collectors::powercap::{self, PowercapMeter};
use wattd_collectors::synth::{HostTree, ZoneSpec};
use wattd_collectors::topology::Topology;
use wattd_collectors::{HostRoot, Meter};
use wattd_records::batch::GENESIS_HASH;
use wattd_records::identity::NodeKey;
use wattd_records::seal::{sign_batch, BatchContent};

/// The system allocator, counting allocations.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc`/`realloc` above, i.e. from the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }

    /// Counted as an allocation, even when it grows or shrinks in place.
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as for `dealloc`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Everything one tick touches.
struct Loop {
    tracker: RunTracker,
    meters: Meters,
    readings: Vec<Reading>,
    sampler: Sampler,
    host: HostBalance,
    package_cpus: BTreeMap<u32, u32>,
    energy_file: PathBuf,
    energy_uj: u64,
    mono_ns: u64,
    key: NodeKey,
    _tree_dir: tempfile::TempDir,
}

impl Loop {
    fn new(cgroup_root: PathBuf) -> Result<Loop, String> {
        let mut config = TrackerConfig::new(HostRoot::live());
        config.cgroup_root = Some(cgroup_root);
        config.rescan_every = None;
        let tracker = RunTracker::new(config).map_err(|e| e.to_string())?;
        let topo = Topology::read(&HostRoot::live()).map_err(|e| e.to_string())?;
        let package_cpus: BTreeMap<u32, u32> = topo
            .cpus_by_package()
            .into_iter()
            .map(|(p, cpus)| (p, cpus.len() as u32))
            .collect();
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let t = HostTree::new(dir.path());
        t.zone(&ZoneSpec::new("intel-rapl:0", "package-0", "0"))
            .map_err(|e| e.to_string())?;
        let scan = powercap::scan(&HostRoot::new(dir.path())).map_err(|e| e.to_string())?;
        let meter = PowercapMeter::open(&scan).map_err(|e| e.to_string())?;
        let meters: Vec<Box<dyn Meter>> = vec![Box::new(meter)];
        let policy = Policy {
            idle: IdlePolicy::Proportional,
            dram: DramPolicy::Cpu,
            platform: PlatformPolicy::Proportional,
        };
        let start = Stamp {
            mono_ns: 1_000_000_000,
            unix_ns: 1_700_000_000_000_000_000,
        };
        let meters = Meters::open(meters);
        let sampler = Sampler::new(
            IdleTracker::new(600_000_000, BTreeMap::new()),
            EstimatorModel::default(),
            policy,
            0,
            start,
        );
        Ok(Loop {
            tracker,
            meters,
            readings: Vec::new(),
            sampler,
            host: HostBalance::new(package_cpus.values().sum()),
            package_cpus,
            energy_file: dir.path().join("sys/class/powercap/intel-rapl:0/energy_uj"),
            energy_uj: 0,
            mono_ns: start.mono_ns,
            key: NodeKey::from_seed("bench-node", 1, [7; 32]),
            _tree_dir: dir,
        })
    }

    /// One tick: usage, meters, attribution, record, signed batch (no fdatasync). Returns the
    /// signed batch's size, so nothing is optimised away.
    fn tick(&mut self) -> usize {
        self.tick_phases(&mut [0; 5])
    }

    /// [`Loop::tick`], adding the allocations of each phase to `phases`: the tracker's read,
    /// the usage mapped, the sampler (meters and attribution), the record, the signed batch.
    fn tick_phases(&mut self, phases: &mut [u64; 5]) -> usize {
        // 30 J a second on the package.
        self.energy_uj += 30_000_000;
        let _ = std::fs::write(&self.energy_file, format!("{}\n", self.energy_uj));
        self.mono_ns += 1_000_000_000;
        // The bench's own write above is not the tick's.
        let mut mark = ALLOCATIONS.load(Ordering::Relaxed);
        let mut phase = |i: usize| {
            let now = ALLOCATIONS.load(Ordering::Relaxed);
            phases[i] += now - mark;
            mark = now;
        };
        let mut snap = self.tracker.tick(1_000_000);
        phase(0);
        let mut usage = wattd::daemon::usage_from(&mut snap, &self.package_cpus, &mut self.host);
        let package = self.package_cpus.keys().next().copied().unwrap_or(0);
        let mut busy = 0u64;
        for (i, r) in usage.runs.iter_mut().enumerate() {
            let us = 1_000 + (i as u64 % 7) * 500;
            r.cpu_us.insert(package, us);
            busy += us;
        }
        usage.busy_us.insert(package, busy + 100_000);
        phase(1);
        let end = Stamp {
            mono_ns: self.mono_ns,
            unix_ns: 1_700_000_000_000_000_000 + self.mono_ns as i64,
        };
        self.meters
            .read(self.sampler.elapsed_us(end), &mut self.readings);
        let interval = self
            .sampler
            .close(end, Some(usage), self.readings.drain(..));
        phase(2);
        let record = wattd::records::interval(&interval, "boot", false);
        phase(3);
        let batch = sign_batch(
            &self.key,
            1,
            GENESIS_HASH,
            0,
            BatchContent {
                intervals: vec![record],
                ..BatchContent::default()
            },
        );
        let len = batch.bytes.len();
        drop(batch);
        phase(4);
        len
    }
}

fn whole_tick(c: &mut Criterion) {
    let mut group = c.benchmark_group("whole_tick");
    group.sample_size(20);
    for runs in [100usize, 1_000, 10_000] {
        let Some(tree) = RunTree::new("t", runs, true) else {
            eprintln!(
                "SKIPPED: whole_tick/{runs}: cannot create {runs} cgroups with a process each \
                 (needs root, cgroup v2, and that many pids)"
            );
            continue;
        };
        let mut l = match Loop::new(tree.root.clone()) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("SKIPPED: whole_tick/{runs}: {e}");
                continue;
            }
        };
        // Discovery and the first reads happen once; then a steady tick.
        for _ in 0..3 {
            l.tick();
        }
        let seen = l.tracker.tick(1_000_000).runs.len();
        assert_eq!(
            seen, runs,
            "the tracker sees {seen} of the {runs} runs: the figures would be per the wrong count"
        );
        let mut phases = [0u64; 5];
        let bytes = l.tick_phases(&mut phases);
        let allocations: u64 = phases.iter().sum();
        let per_run = |n: u64| n as f64 / runs as f64;
        eprintln!(
            "whole_tick/{runs}: {allocations} allocations in one tick ({:.1} per run: tracker {:.1}, \
             usage {:.1}, sampler {:.1}, record {:.1}, batch {:.1}), a signed batch of {bytes} bytes",
            per_run(allocations),
            per_run(phases[0]),
            per_run(phases[1]),
            per_run(phases[2]),
            per_run(phases[3]),
            per_run(phases[4]),
        );
        group.throughput(Throughput::Elements(runs as u64));
        group.bench_with_input(BenchmarkId::from_parameter(runs), &runs, |b, _| {
            b.iter(|| l.tick())
        });
        drop(l);
        drop(tree);
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(5));
    targets = whole_tick
}
criterion_main!(benches);
