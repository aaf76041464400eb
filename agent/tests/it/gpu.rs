//! GPUs end to end on recorded NVML sequences (`collectors/testdata/nvml/`): the recorded NVML,
//! the collector reading `/proc/<pid>/cgroup` under a temporary host root, the pid -> run
//! mapping, the sampler and attribution, and the sealed record's conservation check. Each test
//! pins what one situation must produce, to the microjoule.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use wattd::attribution::gpu::RunCgroups;
use wattd::attribution::idle::IdleTracker;
use wattd::attribution::{
    DramPolicy, GpuBasis, IdleEstimate, IdlePolicy, IdleSource, MeterResult, Policy, RunUsage,
    UnattributedReason, Usage,
};
use wattd::sampler::{GapCause, Interval, Meters, Sampler, Stamp};
use wattd_collectors::estimator::EstimatorModel;
use wattd_collectors::nvml::recorded::{RecordedNvml, Recording, StepCursor};
use wattd_collectors::nvml::{GpuCollector, GpuOptions, NvmlApi, NvmlError};
use wattd_collectors::{Domain, HostRoot, Quality, SourceKind};

const J: u64 = 1_000_000;
const S: u64 = 1_000_000;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../collectors/testdata/nvml")
        .join(name)
}

/// The runs the tracker would report: run id -> cgroup relative to the mount.
fn runs() -> Vec<(Arc<str>, Arc<str>)> {
    vec![
        ("flowzart.slice/run-a.scope".into(), "a".into()),
        ("flowzart.slice/run-b.scope".into(), "b".into()),
    ]
}

struct Replay {
    intervals: Vec<Interval>,
    /// The usage each interval was attributed with, per GPU.
    usages: Vec<BTreeMap<u32, wattd::attribution::GpuUsage>>,
}

/// Replays a recording: opens the collector at step 0 (t = 0), then closes one 1 s interval per
/// following step, laying out /proc for each step first.
fn replay(name: &str, idle: IdlePolicy, idle_watts: Option<u64>) -> Replay {
    let dir = tempfile::tempdir().unwrap();
    let rec = Recording::load(&fixture(name)).unwrap();
    let (api, cursor) = RecordedNvml::new(rec);
    cursor.write_procs(dir.path()).unwrap();
    let opts = GpuOptions::new(HostRoot::new(dir.path()));
    let (collector, report) = GpuCollector::open(Box::new(api), &opts, 0);
    let mut collector = collector.unwrap();
    assert!(report.available, "{report:?}");
    let mut declared = BTreeMap::new();
    if let Some(w) = idle_watts {
        declared.insert(
            Domain::Gpu,
            IdleEstimate {
                power_uw: w * J,
                source: IdleSource::Config,
            },
        );
    }
    let mut sampler = Sampler::new(
        IdleTracker::new(600 * S, declared),
        EstimatorModel::default(),
        Policy {
            idle,
            dram: DramPolicy::Cpu,
            platform: wattd::attribution::PlatformPolicy::Proportional,
        },
        0,
        Stamp {
            mono_ns: 0,
            unix_ns: 0,
        },
    );
    let run_list = runs();
    let mapping = RunCgroups::new(run_list.iter().map(|(c, r)| (c, r)));
    let mut intervals = Vec::new();
    let mut usages = Vec::new();
    let mut t = 0;
    while cursor.advance() {
        cursor.write_procs(dir.path()).unwrap();
        t += S;
        let obs = collector.close(t, false);
        let gpus = wattd::gpu::usage(&obs, &mapping);
        usages.push(gpus.clone());
        let usage = Usage {
            runs: run_list
                .iter()
                .map(|(_, r)| RunUsage {
                    run_id: r.clone(),
                    ..RunUsage::default()
                })
                .collect(),
            gpus,
            ..Usage::default()
        };
        let readings = wattd::gpu::readings(&obs);
        let stamp = Stamp {
            mono_ns: t * 1_000,
            unix_ns: (t * 1_000) as i64,
        };
        intervals.push(sampler.close(stamp, Some(usage), readings));
    }
    for iv in &intervals {
        assert_conserved(iv);
    }
    Replay { intervals, usages }
}

/// A sampler at t = 0: proportional idle, DRAM by CPU, no declared idle power.
fn plain_sampler() -> Sampler {
    Sampler::new(
        IdleTracker::new(S, BTreeMap::new()),
        EstimatorModel::default(),
        Policy {
            idle: IdlePolicy::Proportional,
            dram: DramPolicy::Cpu,
            platform: wattd::attribution::PlatformPolicy::Proportional,
        },
        0,
        Stamp {
            mono_ns: 0,
            unix_ns: 0,
        },
    )
}

/// Every GPU meter of the interval conserves energy exactly, in the result and in the sealed
/// record (`wattd verify`'s own check).
fn assert_conserved(iv: &Interval) {
    for r in &iv.results {
        assert_eq!(r.sum_uj(), r.measured_uj as u128, "{r:?}");
    }
    let rec = wattd::records::interval(iv, "boot", false);
    for d in &rec.domains {
        assert_eq!(
            wattd::verify::accounted_uj(d),
            d.measured_uj as u128,
            "{d:?}"
        );
    }
}

fn gpu(iv: &Interval, index: u32) -> &MeterResult {
    iv.results
        .iter()
        .find(|r| r.key.domain == Domain::Gpu && r.key.package == Some(index))
        .unwrap()
}

fn run_uj(r: &MeterResult, run: &str) -> u64 {
    r.shares()
        .filter(|(id, _)| &***id == run)
        .map(|(_, s)| s.active_uj + s.idle_uj)
        .sum()
}

#[test]
fn two_gpus_are_divided_by_sm_samples_each_on_its_own() {
    let r = replay("two_gpus.json", IdlePolicy::Proportional, Some(50));
    assert_eq!(r.intervals.len(), 2);
    for iv in &r.intervals {
        let g0 = gpu(iv, 0);
        let g1 = gpu(iv, 1);
        assert_eq!(
            (g0.source, g0.quality),
            (SourceKind::Nvml, Quality::Measured)
        );
        assert_eq!(g0.measured_uj, 250 * J);
        assert_eq!(g1.measured_uj, 120 * J);
        // GPU 0: a at 90 %, the ssh user's process (host) at 10 %: idle 50 J, active 200 J,
        // both by usage under the proportional policy.
        assert_eq!(g0.idle_uj, 50 * J);
        assert_eq!(run_uj(g0, "a"), 225 * J);
        assert_eq!(g0.host_active_uj + g0.host_idle_uj, 25 * J);
        assert_eq!(run_uj(g0, "b"), 0);
        // GPU 1: b alone (its process sits in a child cgroup of the run's).
        assert_eq!(run_uj(g1, "b"), 120 * J);
        assert_eq!(run_uj(g1, "a"), 0);
        let meta = g0.gpu.as_ref().unwrap();
        assert_eq!(meta.basis, Some(GpuBasis::SmUtilization));
        assert_eq!(meta.mig, Some(false));
        assert_eq!(
            meta.uuid.as_deref(),
            Some("GPU-0a1b2c3d-0000-4000-8000-000000000000")
        );
    }
    // SM-busy microseconds: a at 90 % for two 0.5 s samples.
    let u0 = &r.usages[0][&0];
    assert_eq!(u0.runs[0].usage_us, 900_000);
    assert_eq!(u0.host_usage, 100_000);
    let rec = wattd::records::interval(&r.intervals[0], "boot", false);
    let d = rec.domains.iter().find(|d| d.package == Some(1)).unwrap();
    assert_eq!(
        (d.domain.as_str(), d.source.as_str(), d.usage_basis.as_str()),
        ("gpu", "nvml", "sm_utilization")
    );
    assert_eq!(d.device_uuid, "GPU-0a1b2c3d-0000-4000-8000-000000000001");
    assert!(!d.mig);
}

/// AMD SMI on a recorded sequence: the accumulator read as a counter in the unit its resolution
/// names (2^-16 J, exact), the process list's engine time per pid differenced between polls
/// (time from before the agent started not billed, a count that went back billed nothing),
/// another resolution a gap, an interval where a listed process's time did not move shared by
/// the processes listed alike.
#[test]
fn amd_gpus_are_divided_by_engine_time_from_the_process_list() {
    let r = replay("amd_engine_time.json", IdlePolicy::Proportional, Some(50));
    let [s1, s2, s3, s4, s5, s6] = &r.intervals[..] else {
        panic!("{} intervals", r.intervals.len())
    };
    let g = gpu(s1, 2000);
    assert_eq!(
        (g.source, g.quality, g.measured_uj),
        (SourceKind::AmdSmi, Quality::Measured, 250 * J)
    );
    // a +600 ms (not its 5 s from before), b 200 ms, the ssh user 200 ms: 3:1:1.
    let u = &r.usages[0][&2000];
    assert_eq!(
        u.runs
            .iter()
            .map(|x| (&*x.run_id, x.usage_us))
            .collect::<Vec<_>>(),
        vec![("a", 600_000), ("b", 200_000)]
    );
    assert_eq!(u.host_usage, 200_000);
    assert_eq!(run_uj(g, "a"), 150 * J);
    assert_eq!(run_uj(g, "b"), 50 * J);
    assert_eq!(g.host_active_uj + g.host_idle_uj, 50 * J);
    let meta = g.gpu.as_ref().unwrap();
    assert_eq!(meta.basis, Some(GpuBasis::EngineTime));
    assert_eq!(
        meta.uuid.as_deref(),
        Some("AMD-1f2e3d4c-0000-4000-8000-000000000300")
    );
    let rec = wattd::records::interval(s1, "boot", false);
    let d = rec
        .domains
        .iter()
        .find(|d| d.package == Some(2000))
        .unwrap();
    assert_eq!(
        (d.domain.as_str(), d.source.as_str(), d.usage_basis.as_str()),
        ("gpu", "amd_smi", "engine_time")
    );
    // 4242 exited; pid 777's count went back (nothing billed for it, a new baseline): a listed
    // process at zero engine time (HIP work on KFD queues shows none), so b and 777 alike.
    let g = gpu(s2, 2000);
    assert_eq!(g.measured_uj, 100 * J);
    assert_eq!(run_uj(g, "a"), 0);
    assert_eq!(run_uj(g, "b"), 50 * J);
    assert_eq!(g.host_active_uj + g.host_idle_uj, 50 * J);
    assert_eq!(
        g.gpu.as_ref().unwrap().basis,
        Some(GpuBasis::RunningProcesses)
    );
    assert_eq!(r.usages[1][&2000].host_usage, 1_000_000);
    // Another resolution: a gap naming it, then counted in the new unit (2^-15 J).
    let g = gpu(s3, 2000);
    assert!(g.gap && g.measured_uj == 0 && g.runs.is_empty(), "{g:?}");
    assert!(
        s3.gaps.iter().any(|x| x.detail.contains("unit changed")),
        "{:?}",
        s3.gaps
    );
    assert_eq!(gpu(s4, 2000).measured_uj, 150 * J);
    // (777 listed at zero again: b and the host alike.)
    assert_eq!(run_uj(gpu(s4, 2000), "b"), 75 * J);
    // Nobody's engine time moved: the three listed processes share alike.
    let g = gpu(s5, 2000);
    assert_eq!(g.measured_uj, 80 * J);
    assert_eq!(
        g.gpu.as_ref().unwrap().basis,
        Some(GpuBasis::RunningProcesses)
    );
    for run in ["a", "b"] {
        assert!(run_uj(g, run).abs_diff(80 * J / 3) <= 1, "{run}: {g:?}");
    }
    // Lost: a gap.
    assert!(gpu(s6, 2000).gap);
}

#[test]
fn idle_policy_host_keeps_gpu_idle_off_the_runs() {
    let r = replay("two_gpus.json", IdlePolicy::Host, Some(50));
    let g0 = gpu(&r.intervals[0], 0);
    assert_eq!(g0.host_idle_uj, 50 * J);
    assert_eq!(run_uj(g0, "a"), 180 * J); // 90 % of the 200 J active part
    let g1 = gpu(&r.intervals[0], 1);
    assert_eq!(g1.host_idle_uj, 50 * J);
    assert_eq!(run_uj(g1, "b"), 70 * J);
}

#[test]
fn counter_reset_is_a_recorded_gap_and_the_next_interval_counts_from_the_new_baseline() {
    let r = replay("counter_reset.json", IdlePolicy::Proportional, None);
    let [a, b, c] = &r.intervals[..] else {
        panic!("{} intervals", r.intervals.len())
    };
    assert_eq!(gpu(a, 0).measured_uj, 150 * J);
    assert_eq!(run_uj(gpu(a, 0), "a"), 150 * J);
    let g = gpu(b, 0);
    assert!(g.gap && g.measured_uj == 0 && g.runs.is_empty());
    assert_eq!(b.gaps.len(), 1);
    assert_eq!(b.gaps[0].cause, GapCause::CounterReset);
    assert!(
        b.gaps[0].detail.contains("90150000"),
        "{}",
        b.gaps[0].detail
    );
    assert_eq!(gpu(c, 0).measured_uj, 151 * J);
    assert_eq!(run_uj(gpu(c, 0), "a"), 151 * J);
    assert!(c.gaps.is_empty());
}

#[test]
fn missing_samples_send_the_active_part_to_the_host_and_a_failed_call_falls_back() {
    let r = replay("missing_samples.json", IdlePolicy::Proportional, Some(20));
    let [s1, s2, s3, s4] = &r.intervals[..] else {
        panic!()
    };
    assert_eq!(run_uj(gpu(s1, 0), "a"), 200 * J);
    // No new sample: NVML says nobody used the SMs; the energy is the host's, not lost.
    let g = gpu(s2, 0);
    assert_eq!(g.measured_uj, 60 * J);
    assert_eq!(run_uj(g, "a"), 0);
    assert_eq!(g.host_active_uj + g.host_idle_uj, 60 * J);
    assert_eq!(g.gpu.as_ref().unwrap().basis, Some(GpuBasis::SmUtilization));
    // The utilisation call failed: every running compute process weighs the same.
    let g = gpu(s3, 0);
    assert_eq!(
        g.gpu.as_ref().unwrap().basis,
        Some(GpuBasis::RunningProcesses)
    );
    assert_eq!(run_uj(g, "a"), 200 * J);
    assert_eq!(run_uj(gpu(s4, 0), "a"), 200 * J);
}

#[test]
fn mig_divides_the_whole_gpu_by_instance_size_and_says_so() {
    let r = replay("mig.json", IdlePolicy::Proportional, Some(60));
    let [s1, s2] = &r.intervals[..] else { panic!() };
    let g = gpu(s1, 0);
    assert_eq!(g.measured_uj, 180 * J);
    let meta = g.gpu.as_ref().unwrap();
    assert_eq!(
        (meta.basis, meta.mig),
        (Some(GpuBasis::MigInstanceSize), Some(true))
    );
    // Instances with a process: 3g (a), 2g (b, two processes), 1g (host); the idle 1g gets
    // nothing. Weights over all 7 slices: a 3/7, b 2/7, host 1/7 of the interval.
    let u = &r.usages[0][&0];
    assert_eq!(
        u.runs
            .iter()
            .map(|x| (&*x.run_id, x.usage_us))
            .collect::<Vec<_>>(),
        vec![("a", 428_571), ("b", 285_714)]
    );
    assert_eq!(u.host_usage, 142_857);
    // 180 J split 3:2:1 (by the floored weights, largest remainder): a 90 J, b 60 J, host 30 J.
    assert_eq!(run_uj(g, "a"), 90 * J);
    assert_eq!(run_uj(g, "b"), 60 * J);
    assert_eq!(g.host_active_uj + g.host_idle_uj, 30 * J);
    // Instance sizes unreadable: each instance with processes alike (grouped by the parent's
    // gpu instance ids): a, b and the host a third each.
    let g = gpu(s2, 0);
    assert_eq!(
        g.gpu.as_ref().unwrap().basis,
        Some(GpuBasis::MigInstanceEven)
    );
    // (each instance weighs a third of the interval in whole microseconds, 333,333 us, and b's
    // third is split between its two processes, 166,666 us each: a few hundred uJ apart.)
    assert!(run_uj(g, "a").abs_diff(60 * J) < 1_000, "{g:?}");
    assert!(run_uj(g, "b").abs_diff(60 * J) < 1_000, "{g:?}");
    let rec = wattd::records::interval(s1, "boot", false);
    assert_eq!(rec.domains[0].usage_basis, "mig_instance_size");
    assert!(rec.domains[0].mig);
}

#[test]
fn mig_reserved_policy_gives_idle_to_instance_holders_and_unheld_slices_to_the_host() {
    let r = replay("mig.json", IdlePolicy::Reserved, Some(60));
    let g = gpu(&r.intervals[0], 0);
    // Idle 60 J by held slices: a 3, b 2, host 1 + the unheld 1g = 2, of 7.
    assert_eq!(g.idle_uj, 60 * J);
    let idle_of = |run: &str| {
        g.shares()
            .find(|(id, _)| &***id == run)
            .map_or(0, |(_, s)| s.idle_uj)
    };
    assert_eq!(idle_of("a"), 25_714_286);
    assert_eq!(idle_of("b"), 17_142_857);
    assert_eq!(g.host_idle_uj, 17_142_857);
}

#[test]
fn an_exited_pids_samples_still_count_for_its_run() {
    let r = replay("pid_exit.json", IdlePolicy::Proportional, None);
    let s2 = &r.intervals[1];
    let u = &r.usages[1][&0];
    // pid 100 (run a): one sample at 100 % covering 0.4 s (the poll's span up to its newest
    // sample), after it exited and /proc/100 was gone (its cgroup remembered from when it ran).
    // pid 200 (b): 50 % for 1 s. pid 400: 20 % over the 0.7 s up to its one sample (the
    // estimator cannot know it started later than the poll's start; in the daemon polls every
    // 200 ms bound that), never seen running and gone at sample time: unknown, the host's.
    assert_eq!(
        u.runs
            .iter()
            .map(|x| (&*x.run_id, x.usage_us))
            .collect::<Vec<_>>(),
        vec![("a", 400_000), ("b", 500_000)]
    );
    assert_eq!(u.host_usage, 140_000);
    assert_eq!(u.unknown_cgroup_pids, 1);
    let g = gpu(s2, 0);
    assert_eq!(g.measured_uj, 200 * J);
    // 200 J divided by 400,000 : 500,000 : 140,000 SM-busy us (a, b, host), exactly.
    assert_eq!(run_uj(g, "a"), 76_923_077, "{g:?}");
    assert_eq!(run_uj(g, "b"), 96_153_846, "{g:?}");
}

#[test]
fn a_pid_outside_every_run_is_the_hosts() {
    let r = replay("two_gpus.json", IdlePolicy::Proportional, Some(50));
    for u in &r.usages {
        assert!(u[&0].runs.iter().all(|x| &*x.run_id == "a"));
        assert_eq!(u[&0].host_usage, 100_000);
        assert_eq!(u[&0].unknown_cgroup_pids, 0);
    }
}

#[test]
fn a_gpu_that_disappears_is_a_gap_until_it_is_back_and_the_others_go_on() {
    let r = replay("gpu_disappears.json", IdlePolicy::Proportional, None);
    assert_eq!(r.intervals.len(), 5);
    // GPU 0 is measured throughout.
    for iv in &r.intervals {
        assert_eq!(gpu(iv, 0).measured_uj, 100 * J);
        assert_eq!(run_uj(gpu(iv, 0), "a"), 100 * J);
    }
    let g1 = |i: usize| gpu(&r.intervals[i], 1);
    // GPU 1 integrates power (counter NotSupported): estimated, 100 W over 1 s.
    assert_eq!(
        (g1(0).source, g1(0).quality, g1(0).measured_uj),
        (SourceKind::NvmlPower, Quality::Estimated, 100 * J)
    );
    // Lost: a source-failure gap naming NVML's answer.
    assert!(g1(1).gap);
    let gap = r.intervals[1]
        .gaps
        .iter()
        .find(|g| g.key == Some(g1(1).key))
        .unwrap();
    assert_eq!(gap.cause, GapCause::SourceFailure);
    assert!(gap.detail.contains("GPU lost"), "{}", gap.detail);
    // Another GPU at index 1: refused, a gap, never billed as the first one.
    assert!(g1(2).gap);
    let gap = &r.intervals[2].gaps[0];
    assert!(gap.detail.contains("GPU-cccc"), "{}", gap.detail);
    // Back: a new baseline first (a gap), then energy again.
    assert!(g1(3).gap);
    assert_eq!(g1(4).measured_uj, 105 * J);
    assert!(!g1(4).gap);
}

#[test]
fn conservation_holds_for_every_fixture_and_policy() {
    for name in [
        "two_gpus.json",
        "counter_reset.json",
        "missing_samples.json",
        "mig.json",
        "pid_exit.json",
        "gpu_disappears.json",
    ] {
        for policy in [
            IdlePolicy::Proportional,
            IdlePolicy::Reserved,
            IdlePolicy::Host,
        ] {
            for idle in [None, Some(1), Some(1_000)] {
                // replay() asserts conservation on every interval and record.
                let r = replay(name, policy, idle);
                assert!(!r.intervals.is_empty());
            }
        }
    }
}

#[test]
fn usage_none_leaves_gpu_energy_unattributed_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (api, cursor) = RecordedNvml::new(Recording::load(&fixture("two_gpus.json")).unwrap());
    cursor.write_procs(dir.path()).unwrap();
    let (c, _) = GpuCollector::open(
        Box::new(api),
        &GpuOptions::new(HostRoot::new(dir.path())),
        0,
    );
    let mut c = c.unwrap();
    cursor.advance();
    let obs = c.close(S, false);
    let mut sampler = plain_sampler();
    let readings = wattd::gpu::readings(&obs);
    let iv = sampler.close(
        Stamp {
            mono_ns: S * 1000,
            unix_ns: 0,
        },
        None,
        readings,
    );
    let g = gpu(&iv, 0);
    assert_eq!(
        g.unattributed,
        vec![(UnattributedReason::NoUsageData, 250 * J)]
    );
}

/// An NVML that blocks on every call after the probe, like a wedged driver.
#[derive(Debug)]
struct Hanging {
    inner: RecordedNvml,
    hang: Arc<std::sync::atomic::AtomicBool>,
}

impl Hanging {
    fn wait(&self) {
        while self.hang.load(std::sync::atomic::Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl NvmlApi for Hanging {
    fn device_count(&mut self) -> Result<u32, NvmlError> {
        self.wait();
        self.inner.device_count()
    }
    fn uuid(&mut self, gpu: u32) -> Result<String, NvmlError> {
        self.wait();
        self.inner.uuid(gpu)
    }
    fn name(&mut self, gpu: u32) -> Result<String, NvmlError> {
        self.inner.name(gpu)
    }
    fn power_mw(&mut self, gpu: u32) -> Result<u32, NvmlError> {
        self.inner.power_mw(gpu)
    }
    fn clock_us(&mut self) -> u64 {
        self.inner.clock_us()
    }
    fn process_utilization(
        &mut self,
        gpu: u32,
        since_us: u64,
    ) -> Result<Vec<wattd_collectors::nvml::UtilSample>, NvmlError> {
        self.wait();
        self.inner.process_utilization(gpu, since_us)
    }
    fn compute_processes(
        &mut self,
        gpu: u32,
    ) -> Result<Vec<wattd_collectors::nvml::ComputeProcess>, NvmlError> {
        self.inner.compute_processes(gpu)
    }
    fn mig_enabled(&mut self, gpu: u32) -> Result<bool, NvmlError> {
        self.inner.mig_enabled(gpu)
    }
    fn mig_instances(
        &mut self,
        gpu: u32,
    ) -> Result<Vec<wattd_collectors::nvml::MigInstance>, NvmlError> {
        self.inner.mig_instances(gpu)
    }
    fn vendor(&self) -> wattd_collectors::nvml::GpuVendor {
        self.inner.vendor()
    }
    fn energy_count(&mut self, gpu: u32) -> Result<(u64, wattd_collectors::EnergyUnit), NvmlError> {
        self.wait();
        self.inner.energy_count(gpu)
    }
    fn engine_time_ns(
        &mut self,
        gpu: u32,
    ) -> Result<Vec<wattd_collectors::nvml::EngineTime>, NvmlError> {
        self.wait();
        self.inner.engine_time_ns(gpu)
    }
}

fn hanging(name: &str) -> (Hanging, StepCursor, Arc<std::sync::atomic::AtomicBool>) {
    let (api, cursor) = RecordedNvml::new(Recording::load(&fixture(name)).unwrap());
    let hang = Arc::new(std::sync::atomic::AtomicBool::new(false));
    (
        Hanging {
            inner: api,
            hang: hang.clone(),
        },
        cursor,
        hang,
    )
}

/// The NVML thread over `api` (opened at the recording's current step, its /proc laid out in a
/// temporary root), with a `deadline` per read and no polls between closes, and a runtime to
/// await it on.
fn nvml_thread(
    api: Box<dyn NvmlApi>,
    cursor: &StepCursor,
    deadline: Duration,
) -> (
    tempfile::TempDir,
    tokio::runtime::Runtime,
    wattd::gpu::GpuSource,
) {
    let dir = tempfile::tempdir().unwrap();
    cursor.write_procs(dir.path()).unwrap();
    let (c, _) = GpuCollector::open(api, &GpuOptions::new(HostRoot::new(dir.path())), 0);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let src = wattd::gpu::GpuSource::start(vec![c.unwrap()], deadline, Duration::from_secs(3600))
        .unwrap();
    (dir, rt, src)
}

/// A blocked NVML never blocks the loop: the interval is a SOURCE_FAILURE gap of every GPU
/// after the deadline, the next ones too while it stays blocked, and once it answers again the
/// first answer re-baselines (a gap) so the blocked span's energy is not billed twice.
#[test]
fn a_blocked_nvml_call_is_a_gap_after_the_deadline_never_a_hang() {
    let (api, cursor, hang) = hanging("two_gpus.json");
    let (_dir, rt, mut src) = nvml_thread(Box::new(api), &cursor, Duration::from_millis(300));
    rt.block_on(async {
        cursor.advance();
        src.request();
        let ok = src.collect().await;
        assert_eq!(ok.readings.len(), 2);
        assert!(ok.readings.iter().all(|r| r.reading.sample.is_ok()));

        hang.store(true, std::sync::atomic::Ordering::SeqCst);
        for i in 0..3 {
            let t = std::time::Instant::now();
            src.request();
            let gap = src.collect().await;
            assert!(
                t.elapsed() < Duration::from_millis(1_000),
                "{:?}",
                t.elapsed()
            );
            if i > 0 {
                // Still stuck: not waited for again (a deadline per tick would stretch every
                // interval for as long as NVML hangs).
                assert!(
                    t.elapsed() < Duration::from_millis(150),
                    "{:?}",
                    t.elapsed()
                );
                let e = gap.readings[0]
                    .reading
                    .sample
                    .as_ref()
                    .unwrap_err()
                    .to_string();
                assert!(e.contains("has not returned"), "{e}");
            }
            assert_eq!(gap.readings.len(), 2);
            assert!(gap.observations.is_empty());
            for r in gap.readings.iter().map(|r| &r.reading) {
                let e = r.sample.as_ref().unwrap_err().to_string();
                assert!(e.contains("NVML"), "{e}");
            }
        }
        assert_eq!(src.timeouts, 3);
        hang.store(false, std::sync::atomic::Ordering::SeqCst);
        cursor.advance();
        // The stuck call returns; its late answer is dropped by the next request, which asks
        // for a new baseline.
        tokio::time::sleep(Duration::from_millis(50)).await;
        src.request();
        let again = src.collect().await;
        assert!(again
            .readings
            .iter()
            .all(|r| matches!(r.reading.sample, Ok(wattd_collectors::CounterSample::First))));
    });
}

/// NVIDIA and AMD GPUs are read on one thread: one request answers every GPU of both libraries
/// (meters 0, 1 and 2000), and AMD SMI blocking makes every GPU's interval a gap naming the
/// library of each, after one deadline.
#[test]
fn nvidia_and_amd_gpus_share_the_gpu_thread_and_its_deadline() {
    let open = |api: Box<dyn NvmlApi>, cursor: &StepCursor, dir: &std::path::Path| {
        cursor.write_procs(dir).unwrap();
        GpuCollector::open(api, &GpuOptions::new(HostRoot::new(dir)), 0)
            .0
            .unwrap()
    };
    let (nv, nv_cursor) = RecordedNvml::new(Recording::load(&fixture("two_gpus.json")).unwrap());
    let (amd, amd_cursor, hang) = hanging("amd_engine_time.json");
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let collectors = vec![
        open(Box::new(nv), &nv_cursor, d1.path()),
        open(Box::new(amd), &amd_cursor, d2.path()),
    ];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut src = wattd::gpu::GpuSource::start(
        collectors,
        Duration::from_millis(300),
        Duration::from_secs(3600),
    )
    .unwrap();
    rt.block_on(async {
        nv_cursor.advance();
        amd_cursor.advance();
        src.request();
        let ok = src.collect().await;
        let got: Vec<(Option<u32>, SourceKind)> = ok
            .readings
            .iter()
            .map(|r| (r.reading.key.package, r.reading.source))
            .collect();
        assert_eq!(
            got,
            vec![
                (Some(0), SourceKind::Nvml),
                (Some(1), SourceKind::Nvml),
                (Some(2000), SourceKind::AmdSmi)
            ]
        );
        assert!(ok.readings.iter().all(|r| r.reading.sample.is_ok()));
        hang.store(true, std::sync::atomic::Ordering::SeqCst);
        src.request();
        let gap = src.collect().await;
        assert_eq!(gap.readings.len(), 3);
        let errs: Vec<String> = gap
            .readings
            .iter()
            .map(|r| r.reading.sample.as_ref().unwrap_err().to_string())
            .collect();
        assert!(errs[0].starts_with("NVML read on GPU 0"), "{errs:?}");
        assert!(errs[2].starts_with("AMD SMI read on GPU 2000"), "{errs:?}");
        hang.store(false, std::sync::atomic::Ordering::SeqCst);
    });
}

/// Opens a collector on an inline recording (step 0), for tests of what one close gathers.
fn open_inline(json: &str) -> (GpuCollector, StepCursor, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let (api, cursor) = RecordedNvml::new(Recording::parse(json).unwrap());
    cursor.write_procs(dir.path()).unwrap();
    let (c, report) = GpuCollector::open(
        Box::new(api),
        &GpuOptions::new(HostRoot::new(dir.path())),
        0,
    );
    assert!(report.available, "{report:?}");
    (c.unwrap(), cursor, dir)
}

/// AMD SMI's engine time, poll by poll: a list failing at open does not turn the usage off (the
/// first list that answers is the baseline, billing nothing from before it); a pid listed twice
/// is summed; a pid missing from one list keeps its count (its lifetime is not billed when it
/// is back); a pid never seen before is billed at most the poll's window, whatever its count.
#[test]
fn amd_engine_time_is_baselined_summed_and_bounded() {
    let (mut c, cursor, dir) = open_inline(
        r#"{"vendor": "amd", "steps": [
          {"label": "open: the list fails", "gpus": [{"energy_count": [0, 15.2587890625], "engine_ns": {"error": "Busy"}}]},
          {"label": "baseline", "proc_cgroups": {"10": "0::/flowzart.slice/run-a.scope\n", "20": "0::/flowzart.slice/run-b.scope\n"},
           "gpus": [{"energy_count": [65536, 15.2587890625], "engine_ns": [[10, 5000000000], [20, 1000]]}]},
          {"label": "10 twice, 20 missing", "proc_cgroups": {"10": "0::/flowzart.slice/run-a.scope\n", "20": "0::/flowzart.slice/run-b.scope\n"},
           "gpus": [{"energy_count": [131072, 15.2587890625], "engine_ns": [[10, 5100000000], [10, 50000000]]}]},
          {"label": "20 back, 30 new with an hour", "proc_cgroups": {"10": "0::/flowzart.slice/run-a.scope\n", "20": "0::/flowzart.slice/run-b.scope\n", "30": "0::/flowzart.slice/run-a.scope\n"},
           "gpus": [{"energy_count": [196608, 15.2587890625], "engine_ns": [[10, 5150000000], [20, 201000], [30, 3600000000000]]}]}
        ]}"#,
    );
    let busy = |t: u64, c: &mut GpuCollector| -> BTreeMap<u32, u64> {
        cursor.advance();
        cursor.write_procs(dir.path()).unwrap();
        let obs = c.close(t, false);
        assert!(obs[0].activity.engine_time);
        obs[0].activity.sm_busy_us.clone().unwrap()
    };
    assert_eq!(
        busy(S, &mut c),
        BTreeMap::new(),
        "the baseline bills nothing"
    );
    assert_eq!(busy(2 * S, &mut c), BTreeMap::from([(10, 150_000)]));
    assert_eq!(
        busy(3 * S, &mut c),
        BTreeMap::from([(20, 200), (30, 1_000_000)])
    );
}

/// Impossible samples (pid 0, SM above 100 %, stamped far in the future) are refused and counted,
/// and a future stamp does not push the next poll's window ahead: later samples still count.
#[test]
fn impossible_utilisation_samples_are_refused_and_do_not_hide_later_ones() {
    let gpu = |samples: &str| {
        format!(
            r#"{{ "uuid": "GPU-x", "energy_mj": 1000, "mig": false, "samples": {samples},
                 "processes": [[200, null]] }}"#
        )
    };
    let procs = r#""proc_cgroups": { "200": "0::/flowzart.slice/run-b.scope\n" }"#;
    let json = format!(
        r#"{{ "about": "garbage samples", "steps": [
            {{ "label": "open", {procs}, "gpus": [{}] }},
            {{ "label": "1 s", "clock_us": 1718000001000000, {procs}, "gpus": [{}] }},
            {{ "label": "2 s", {procs}, "gpus": [{}] }} ] }}"#,
        gpu("[[200, 1718000000000000, 30]]"),
        gpu("[[0, 1718000001000000, 50], [200, 1718000000900000, 250], \
              [200, 1718009999000000, 40], [200, 1718000001000000, 30]]"),
        gpu("[[200, 1718000002000000, 30]]"),
    );
    let (mut c, cursor, dir) = open_inline(&json);
    for (t, want_busy, want_rejected) in [(1u64, 300_000u64, 3u32), (2, 300_000, 0)] {
        assert!(cursor.advance());
        cursor.write_procs(dir.path()).unwrap();
        let obs = c.close(t * 1_000_000, false);
        let a = &obs[0].activity;
        let busy = a.sm_busy_us.as_ref().unwrap();
        assert_eq!(busy.get(&200).copied(), Some(want_busy), "t={t}: {busy:?}");
        assert!(!busy.contains_key(&0), "pid 0 is never a process");
        assert_eq!(a.rejected_samples, want_rejected, "t={t}");
    }
}

/// Under MIG without samples, an instance whose process ended before the close still holds its
/// slices for the interval: instances are merged over the interval's polls, not taken from the
/// last one only (which would bill the survivor for the leaver's share).
#[test]
fn mig_instances_are_merged_over_the_intervals_polls() {
    let step = |label: &str, a_pids: &str, procs: &str| {
        format!(
            r#"{{ "label": "{label}",
              "proc_cgroups": {{ "100": "0::/flowzart.slice/run-a.scope\n", "200": "0::/flowzart.slice/run-b.scope\n" }},
              "gpus": [ {{ "uuid": "GPU-m", "energy_mj": 1000, "mig": true,
                "samples": {{ "error": "NotSupported" }}, "processes": {procs},
                "mig_instances": [ {{ "index": 0, "slices": 3, "sms": 42, "pids": {a_pids} }},
                                   {{ "index": 1, "slices": 2, "sms": 28, "pids": [200] }} ] }} ] }}"#
        )
    };
    let json = format!(
        r#"{{ "about": "a leaves mid-interval", "steps": [ {}, {}, {} ] }}"#,
        step("open", "[100]", "[[100, 1], [200, 5]]"),
        step("poll: a still there", "[100]", "[[100, 1], [200, 5]]"),
        step("close: a gone", "[]", "[[200, 5]]"),
    );
    let (mut c, cursor, dir) = open_inline(&json);
    assert!(cursor.advance());
    cursor.write_procs(dir.path()).unwrap();
    c.poll(500_000);
    assert!(cursor.advance());
    cursor.write_procs(dir.path()).unwrap();
    let obs = c.close(1_000_000, false);
    let inst = obs[0]
        .activity
        .mig_instances
        .as_ref()
        .unwrap()
        .as_ref()
        .unwrap();
    assert_eq!(inst.len(), 2);
    assert_eq!(inst[0].pids, vec![100], "{inst:?}");
    let run_list = runs();
    let mapping = RunCgroups::new(run_list.iter().map(|(c, r)| (c, r)));
    let usage = wattd::gpu::usage(&obs, &mapping);
    let by_run: BTreeMap<&str, u64> = usage[&0]
        .runs
        .iter()
        .map(|x| (&*x.run_id, x.usage_us))
        .collect();
    // 3 slices : 2 slices of the interval.
    assert_eq!(by_run.get("a").copied(), Some(600_000), "{by_run:?}");
    assert_eq!(by_run.get("b").copied(), Some(400_000), "{by_run:?}");
}

/// What the GPUs did between the probe and the daemon's first interval belongs to no interval:
/// `rebaseline` (called by the daemon right before its first interval) starts every counter over,
/// so the first interval's energy is only its own.
#[test]
fn rebaseline_at_start_bills_nothing_from_before_the_first_interval() {
    let (api, cursor) = RecordedNvml::new(Recording::load(&fixture("two_gpus.json")).unwrap());
    let (_dir, rt, mut src) = nvml_thread(Box::new(api), &cursor, Duration::from_secs(5));
    rt.block_on(async {
        // 250 J were drawn between the probe (step 0) and the start (step 1).
        cursor.advance();
        src.rebaseline().await;
        cursor.advance();
        src.request();
        let first = src.collect().await;
        // (The recording's steps are 1 s apart but this test runs in milliseconds, so the
        // delta is above the physical ceiling for the real elapsed time: quarantined. The
        // amount is what matters: 250 J, not the 500 J since the probe.)
        let energy = |i: usize| match first.readings[i].reading.sample {
            Ok(wattd_collectors::CounterSample::Energy { energy_uj, .. })
            | Ok(wattd_collectors::CounterSample::Quarantined { energy_uj, .. }) => energy_uj,
            ref other => panic!("{other:?}"),
        };
        assert_eq!(energy(0), 250 * J, "only the first interval's own energy");
    });
}

/// Lays out one PCI function under `root` as sysfs shows it.
fn pci_function(root: &std::path::Path, addr: &str, class: &str, driver: Option<&str>) {
    let dev = root.join("sys/bus/pci/devices").join(addr);
    std::fs::create_dir_all(&dev).unwrap();
    std::fs::write(dev.join("vendor"), "0x10de\n").unwrap();
    std::fs::write(dev.join("class"), format!("{class}\n")).unwrap();
    if let Some(d) = driver {
        std::fs::create_dir_all(root.join("sys/bus/pci/drivers").join(d)).unwrap();
        std::os::unix::fs::symlink(format!("../../../bus/pci/drivers/{d}"), dev.join("driver"))
            .unwrap();
    }
}

#[test]
fn a_gpu_the_driver_holds_but_nvml_cannot_open_is_a_problem_naming_it_and_why() {
    let dir = tempfile::tempdir().unwrap();
    pci_function(dir.path(), "0000:17:00.0", "0x030200", Some("nvidia"));
    // Given to a VM: not the agent's to measure, and not a problem.
    pci_function(dir.path(), "0000:65:00.0", "0x030200", Some("vfio-pci"));
    let opts = GpuOptions::new(HostRoot::new(dir.path()));
    let (report, collector) = wattd::gpu::probe_on_thread(
        || Err(NvmlError::NoPermission),
        opts,
        Duration::from_secs(5),
    );
    assert!(collector.is_none());
    assert_eq!(report.present.len(), 2);
    assert_eq!(report.unmeasured(), 1);
    let problem = report.problem.as_deref().expect("a problem");
    assert!(problem.contains("0000:17:00.0"), "{problem}");
    assert!(!problem.contains("0000:65:00.0"), "{problem}");
    assert!(problem.contains("no permission"), "{problem}");
    assert!(problem.contains("DeviceAllow"), "{problem}");
    // NVML refused outright: the case a service's device policy causes, an error.
    assert!(report.problem_is_error);
}

#[test]
fn fewer_gpus_measured_than_the_driver_holds_is_a_problem_and_as_many_is_none() {
    let dir = tempfile::tempdir().unwrap();
    pci_function(dir.path(), "0000:17:00.0", "0x030200", Some("nvidia"));
    pci_function(dir.path(), "0000:18:00.0", "0x030200", Some("nvidia"));
    let probe = |root: &std::path::Path| {
        let rec = Recording::load(&fixture("two_gpus.json")).unwrap();
        let (api, cursor) = RecordedNvml::new(rec);
        cursor.write_procs(root).unwrap();
        wattd::gpu::probe_on_thread(
            move || Ok(Box::new(api) as Box<dyn NvmlApi>),
            GpuOptions::new(HostRoot::new(root)),
            Duration::from_secs(5),
        )
        .0
    };
    let two = probe(dir.path());
    assert_eq!(two.measured(), 2, "{two:?}");
    assert_eq!(two.problem, None);
    assert_eq!(two.unmeasured(), 0);
    pci_function(dir.path(), "0000:19:00.0", "0x030000", Some("nvidia"));
    let three = probe(dir.path());
    assert_eq!(three.unmeasured(), 1);
    let problem = three.problem.as_deref().expect("a problem");
    assert!(problem.starts_with("3 NVIDIA GPU(s)"), "{problem}");
    assert!(problem.contains("2 measured"), "{problem}");
    // NVML works and lists fewer (a container given some GPUs?): a warning, not an error, and
    // no device-policy hint that would not apply.
    assert!(!three.problem_is_error);
    assert!(!problem.contains("DeviceAllow"), "{problem}");
}

/// An Intel GPU read through hwmon (the hand-written `intel-gpus` tree) through the sampler:
/// its energy, to the microjoule, is recorded and left unattributed for want of usage, and the
/// interval names the card by its PCI address.
#[test]
fn an_intel_gpu_through_hwmon_is_recorded_unattributed_and_named_by_its_address() {
    let t = tempfile::tempdir().unwrap();
    let ok = std::process::Command::new("cp")
        .arg("-a")
        .arg(wattd_testkit::host_fixture("intel-gpus").join("sys"))
        .arg(t.path())
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let sel = wattd_collectors::probe::select(&wattd_collectors::probe::ProbeOptions::new(
        HostRoot::new(t.path()),
    ));
    // The meters take their baseline at t = 0, with the sampler.
    let mut meters = Meters::open(sel.meters);
    let mut sampler = plain_sampler();
    // 1,234,567,890 uJ at start; 37.5 J later.
    std::fs::write(
        t.path().join("sys/class/hwmon/hwmon4/energy1_input"),
        "1272067890\n",
    )
    .unwrap();
    let usage = Usage {
        runs: vec![RunUsage {
            run_id: "a".into(),
            ..RunUsage::default()
        }],
        ..Usage::default()
    };
    let end = Stamp {
        mono_ns: S * 1000,
        unix_ns: 0,
    };
    let mut readings = Vec::new();
    meters.read(sampler.elapsed_us(end), &mut readings);
    let iv = sampler.close(end, Some(usage), readings);
    assert_conserved(&iv);
    let card = gpu(&iv, 1000);
    assert_eq!(card.source, SourceKind::Hwmon);
    assert_eq!(card.measured_uj, 37_500_000);
    assert_eq!(
        card.unattributed,
        vec![(UnattributedReason::NoUsageData, 37_500_000)]
    );
    assert_eq!(
        card.gpu.as_ref().and_then(|g| g.uuid.as_deref()),
        Some("pci:0000:03:00.0")
    );
    let other = gpu(&iv, 1001);
    assert_eq!(other.measured_uj, 0);
    assert_eq!(
        other.gpu.as_ref().and_then(|g| g.uuid.as_deref()),
        Some("pci:0000:4d:00.0")
    );
}
