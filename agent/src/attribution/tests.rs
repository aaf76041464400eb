//! Attribution tests: a hand-computed two-package, three-run table for each policy, and the
//! properties any input must keep (conservation, fairness, monotonicity, order independence).

use std::collections::BTreeMap;

use proptest::prelude::*;
use wattd_collectors::{Domain, MeterKey, Quality, SourceKind};

use super::*;

const J: u64 = 1_000_000;

fn key(domain: Domain, package: Option<u32>) -> MeterKey {
    MeterKey {
        domain,
        package,
        die: None,
    }
}

fn meter(domain: Domain, package: Option<u32>, energy_uj: u64, idle_w: u64) -> MeterInput {
    MeterInput {
        key: key(domain, package),
        source: SourceKind::Powercap,
        quality: Quality::Measured,
        measured: Measured::Energy { energy_uj },
        idle: IdleEstimate {
            power_uw: idle_w * J,
            source: IdleSource::Config,
        },
    }
}

fn run(id: &str, cpu: &[(u32, u64)], reserved: &[(u32, u64)], memory: Option<u64>) -> RunUsage {
    RunUsage {
        run_id: id.into(),
        cpu_us: cpu.iter().copied().collect(),
        memory_bytes: memory,
        reserved_millicpus: reserved.iter().copied().collect(),
    }
}

const GIB: u64 = 1 << 30;

/// Two packages of two CPUs, three runs, one second:
/// - a: 0.5 CPU-s on package 0; reserves 1 CPU on package 0; 1 GiB
/// - b: 0.25 CPU-s on package 0, 0.3 on package 1; reserves 0.25 CPU on each; 3 GiB
/// - c: 0.1 CPU-s on package 1; reserves nothing; memory unknown
///
/// Busy time measured: 1.0 CPU-s on package 0, 0.6 on package 1, so the host used 0.25 and 0.2.
fn scenario(idle: IdlePolicy, dram: DramPolicy) -> IntervalInput {
    IntervalInput {
        elapsed_us: 1_000_000,
        meters: vec![
            meter(Domain::Package, Some(0), 30 * J, 10),
            meter(Domain::Package, Some(1), 16 * J, 10),
            meter(Domain::Dram, Some(0), 5 * J, 2),
            meter(Domain::Psys, None, 60 * J, 25),
        ],
        usage: Some(Usage {
            runs: vec![
                run("a", &[(0, 500_000)], &[(0, 1000)], Some(GIB)),
                run(
                    "b",
                    &[(0, 250_000), (1, 300_000)],
                    &[(0, 250), (1, 250)],
                    Some(3 * GIB),
                ),
                run("c", &[(1, 100_000)], &[], None),
            ],
            busy_us: [(0, 1_000_000), (1, 600_000)].into_iter().collect(),
            package_cpus: [(0, 2), (1, 2)].into_iter().collect(),
            host_memory_bytes: Some(8 * GIB),
            gpus: BTreeMap::new(),
            cpu_busy_unknown: false,
        }),
        policy: Policy {
            idle,
            dram,
            platform: crate::attribution::PlatformPolicy::Proportional,
        },
    }
}

/// Expected: per meter, (run -> (active, idle)), host active, host idle.
type Want = (MeterKey, &'static [(&'static str, u64, u64)], u64, u64);

fn check(input: &IntervalInput, want: &[Want]) {
    let out = attribute(input);
    for (k, runs, host_active, host_idle) in want {
        let m = out
            .iter()
            .find(|m| m.key == *k)
            .unwrap_or_else(|| panic!("no result for {k}"));
        for (id, active, idle) in *runs {
            let got = m
                .shares()
                .find(|(r, _)| &***r == *id)
                .map_or((0, 0), |(_, s)| (s.active_uj, s.idle_uj));
            assert_eq!(got, (*active, *idle), "{k} run {id}");
        }
        assert_eq!(
            (m.host_active_uj, m.host_idle_uj),
            (*host_active, *host_idle),
            "{k} host"
        );
        assert_eq!(m.sum_uj(), m.measured_uj as u128, "{k} conserves");
    }
}

#[test]
fn hand_computed_proportional() {
    // package 0: 30 J, idle 10 J, active 20 J; weights a 0.5, b 0.25, host 0.25 (of 1.0 CPU-s)
    // package 1: 16 J, idle 10 J, active 6 J; weights b 0.3, c 0.1, host 0.2 (of 0.6)
    //   idle: c = 10 J x 1/6 = 1.6666667 J -> 1666666 + the spare uJ (largest remainder .67)
    // dram 0 (by CPU): 5 J, idle 2 J, active 3 J, package-0 weights
    // psys: 60 J, idle 25 J, active 35 J over all packages: a 0.5, b 0.55, c 0.1, host 0.45 (1.6)
    check(
        &scenario(IdlePolicy::Proportional, DramPolicy::Cpu),
        &[
            (
                key(Domain::Package, Some(0)),
                &[("a", 10 * J, 5 * J), ("b", 5 * J, 2_500_000), ("c", 0, 0)],
                5 * J,
                2_500_000,
            ),
            (
                key(Domain::Package, Some(1)),
                &[("a", 0, 0), ("b", 3 * J, 5 * J), ("c", J, 1_666_667)],
                2 * J,
                3_333_333,
            ),
            (
                key(Domain::Dram, Some(0)),
                &[("a", 1_500_000, J), ("b", 750_000, 500_000)],
                750_000,
                500_000,
            ),
            (
                key(Domain::Psys, None),
                &[
                    ("a", 10_937_500, 7_812_500),
                    ("b", 12_031_250, 8_593_750),
                    ("c", 2_187_500, 1_562_500),
                ],
                9_843_750,
                7_031_250,
            ),
        ],
    );
}

#[test]
fn hand_computed_reserved() {
    // Active parts as proportional. Idle by reservation on each package (capacity 2000 mCPU):
    // package 0: a 1000, b 250, host 750 -> 5 J, 1.25 J, 3.75 J
    // package 1: b 250, host 1750 -> 1.25 J, 8.75 J
    check(
        &scenario(IdlePolicy::Reserved, DramPolicy::Cpu),
        &[
            (
                key(Domain::Package, Some(0)),
                &[("a", 10 * J, 5 * J), ("b", 5 * J, 1_250_000), ("c", 0, 0)],
                5 * J,
                3_750_000,
            ),
            (
                key(Domain::Package, Some(1)),
                &[("a", 0, 0), ("b", 3 * J, 1_250_000), ("c", J, 0)],
                2 * J,
                8_750_000,
            ),
        ],
    );
}

#[test]
fn hand_computed_host_idle_and_memory_dram() {
    // Idle kept by the host; DRAM active by memory: a 1, b 3, host 8 - 4 = 4 GiB of 8.
    check(
        &scenario(IdlePolicy::Host, DramPolicy::Memory),
        &[
            (
                key(Domain::Package, Some(0)),
                &[("a", 10 * J, 0), ("b", 5 * J, 0)],
                5 * J,
                10 * J,
            ),
            (
                key(Domain::Dram, Some(0)),
                &[("a", 375_000, 0), ("b", 1_125_000, 0), ("c", 0, 0)],
                1_500_000,
                2 * J,
            ),
        ],
    );
}

#[test]
fn gaps_quarantine_and_missing_usage_are_unattributed_with_reasons() {
    let mut input = scenario(IdlePolicy::Proportional, DramPolicy::Cpu);
    input.meters[0].measured = Measured::Gap;
    input.meters[1].measured = Measured::Quarantined { energy_uj: 9 * J };
    let out = attribute(&input);
    assert!(out[0].gap && out[0].measured_uj == 0 && out[0].sum_uj() == 0);
    assert_eq!(
        out[1].unattributed,
        vec![(UnattributedReason::Quarantined, 9 * J)]
    );
    input.usage = None;
    let out = attribute(&input);
    assert_eq!(
        out[2].unattributed,
        vec![(UnattributedReason::NoUsageData, 5 * J)]
    );
    // A package with no CPU at all.
    let mut input = scenario(IdlePolicy::Proportional, DramPolicy::Cpu);
    input.meters.push(meter(Domain::Package, Some(7), 3 * J, 1));
    let out = attribute(&input);
    assert_eq!(
        out[4].unattributed,
        vec![(UnattributedReason::NoCpuInPackage, 3 * J)]
    );
}

#[test]
fn idle_above_measured_is_capped() {
    let mut input = scenario(IdlePolicy::Proportional, DramPolicy::Cpu);
    input.meters[0].idle.power_uw = 100 * J; // 100 W idle, 30 J measured
    let out = attribute(&input);
    assert_eq!((out[0].idle_uj, out[0].sum_uj()), (30 * J, 30 * J as u128));
}

// ---- properties ----

fn arb_input() -> impl Strategy<Value = IntervalInput> {
    let run = (
        proptest::collection::btree_map(0u32..3, 0u64..2_000_000, 0..3),
        proptest::collection::btree_map(0u32..3, 0u64..4_000, 0..3),
        proptest::option::of(0u64..1 << 34),
    );
    let runs = proptest::collection::vec(run, 0..8);
    let meters = proptest::collection::vec(
        (
            0usize..3,
            proptest::option::of(0u32..3),
            0u64..1 << 40,
            0u64..400,
            0u8..10,
        ),
        1..6,
    );
    let policy = (0u8..3, any::<bool>());
    (
        runs,
        meters,
        policy,
        proptest::collection::btree_map(0u32..3, 0u64..4_000_000, 0..4),
        1u64..60_000_000,
        any::<bool>(),
    )
        .prop_map(
            |(runs, meters, (ip, dp), busy, elapsed_us, usage_known)| IntervalInput {
                elapsed_us,
                meters: meters
                    .into_iter()
                    .map(|(d, p, e, idle_w, kind)| {
                        let domain = [Domain::Package, Domain::Dram, Domain::Psys][d];
                        let package = if domain == Domain::Psys {
                            None
                        } else {
                            p.or(Some(0))
                        };
                        MeterInput {
                            key: key(domain, package),
                            source: SourceKind::Powercap,
                            quality: Quality::Measured,
                            measured: match kind {
                                0 => Measured::Gap,
                                1 => Measured::Quarantined { energy_uj: e },
                                _ => Measured::Energy { energy_uj: e },
                            },
                            idle: IdleEstimate {
                                power_uw: idle_w * J,
                                source: IdleSource::Window,
                            },
                        }
                    })
                    .collect(),
                usage: usage_known.then(|| Usage {
                    runs: runs
                        .into_iter()
                        .enumerate()
                        .map(|(i, (cpu, res, mem))| RunUsage {
                            run_id: format!("run-{i}").into(),
                            cpu_us: cpu.into_iter().collect(),
                            memory_bytes: mem,
                            reserved_millicpus: res,
                        })
                        .collect(),
                    busy_us: busy.clone(),
                    package_cpus: busy.keys().map(|&p| (p, 4)).collect(),
                    host_memory_bytes: Some(1 << 36),
                    gpus: BTreeMap::new(),
                    cpu_busy_unknown: false,
                }),
                policy: Policy {
                    idle: [
                        IdlePolicy::Proportional,
                        IdlePolicy::Reserved,
                        IdlePolicy::Host,
                    ][ip as usize],
                    dram: if dp {
                        DramPolicy::Cpu
                    } else {
                        DramPolicy::Memory
                    },
                    platform: crate::attribution::PlatformPolicy::Proportional,
                },
            },
        )
}

fn total(m: &MeterResult, id: &str) -> u64 {
    m.shares()
        .filter(|(r, _)| &***r == id)
        .map(|(_, s)| s.active_uj + s.idle_uj)
        .sum()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    /// Conservation: for every meter, runs + host + unattributed == measured, exactly.
    #[test]
    fn conservation(input in arb_input()) {
        for m in attribute(&input) {
            prop_assert_eq!(m.sum_uj(), m.measured_uj as u128);
            if m.gap { prop_assert_eq!(m.measured_uj, 0); }
        }
    }

    /// Equal usage gives equal energy within 1 uJ in total; more usage never gives less; zero
    /// usage gives no active energy.
    #[test]
    fn fairness(e in 0u64..1 << 40, idle_w in 0u64..200, u in 0u64..1_000_000, more in 1u64..1_000_000,
                n_equal in 2usize..6, host in 0u64..1_000_000) {
        let mut runs: Vec<RunUsage> = (0..n_equal).map(|i| run(&format!("eq-{i}"), &[(0, u)], &[], None)).collect();
        runs.push(run("more", &[(0, u + more)], &[], None));
        runs.push(run("zero", &[], &[], None));
        let busy = u * n_equal as u64 + u + more + host;
        let input = IntervalInput {
            elapsed_us: 1_000_000,
            meters: vec![meter(Domain::Package, Some(0), e, idle_w)],
            usage: Some(Usage { runs, busy_us: [(0, busy)].into_iter().collect(), package_cpus: [(0, 4)].into_iter().collect(), host_memory_bytes: None, gpus: BTreeMap::new(), cpu_busy_unknown: false }),
            policy: Policy { idle: IdlePolicy::Proportional, dram: DramPolicy::Cpu , platform: crate::attribution::PlatformPolicy::Proportional },
        };
        let out = attribute(&input);
        let m = &out[0];
        let eq: Vec<u64> = (0..n_equal).map(|i| total(m, &format!("eq-{i}"))).collect();
        let (lo, hi) = (eq.iter().min().copied().unwrap_or(0), eq.iter().max().copied().unwrap_or(0));
        prop_assert!(hi - lo <= 1, "equal usage, totals {:?}", eq);
        prop_assert!(total(m, "more") >= hi, "more usage {} < {}", total(m, "more"), hi);
        let zero = m.shares().find(|(r, _)| &***r == "zero").map_or(0, |(_, s)| s.active_uj);
        prop_assert_eq!(zero, 0);
    }

    /// A run's result does not depend on the order runs are listed in.
    #[test]
    fn order_independence(input in arb_input(), seed in any::<u64>()) {
        let a = attribute(&input);
        let mut shuffled = input.clone();
        if let Some(u) = shuffled.usage.as_mut() {
            // a deterministic permutation from the seed
            let n = u.runs.len();
            if n > 1 {
                for i in (1..n).rev() {
                    let j = (seed.wrapping_mul(6364136223846793005).wrapping_add(i as u64) % (i as u64 + 1)) as usize;
                    u.runs.swap(i, j);
                }
            }
        }
        let b = attribute(&shuffled);
        for (ma, mb) in a.iter().zip(b.iter()) {
            // Compared by id: the shares' indexes follow the listing order.
            let by_id = |m: &MeterResult| {
                let mut v: Vec<_> = m
                    .shares()
                    .map(|(id, s)| (id.clone(), s.active_uj, s.idle_uj, s.usage))
                    .collect();
                v.sort();
                v
            };
            let (ra, rb) = (by_id(ma), by_id(mb));
            prop_assert_eq!(ra, rb);
            prop_assert_eq!((ma.host_active_uj, ma.host_idle_uj), (mb.host_active_uj, mb.host_idle_uj));
        }
    }
}

#[test]
fn exhaustive_small_apportion_invariants() {
    // Every split of 0..40 uJ over every weight vector of three buckets with weights 0..6.
    for total in 0..40u64 {
        for a in 0..6u64 {
            for b in 0..6u64 {
                for c in 0..6u64 {
                    let w = [("a", a), ("b", b), ("c", c)];
                    for ties in [Ties::SmallestKey, Ties::LargestKey] {
                        let s = apportion(total, &w, ties);
                        if a + b + c == 0 {
                            assert_eq!(s, vec![0, 0, 0]);
                            continue;
                        }
                        assert_eq!(s.iter().sum::<u64>(), total);
                        for (i, (_, wi)) in w.iter().enumerate() {
                            let exact = total as f64 * *wi as f64 / (a + b + c) as f64;
                            assert!((s[i] as f64 - exact).abs() < 1.0, "{total} {w:?} {s:?}");
                            if *wi == 0 {
                                assert_eq!(s[i], 0);
                            }
                        }
                    }
                }
            }
        }
    }
    let _ = BTreeMap::<u8, u8>::new();
}

/// Without the host's CPU busy time the CPU meters are left undivided (the runs would otherwise
/// take the host's share), but a GPU, whose usage NVML gave, is still divided among its runs.
#[test]
fn unknown_cpu_busy_time_leaves_cpu_meters_undivided_but_not_gpus() {
    let mut input = scenario(IdlePolicy::Proportional, DramPolicy::Cpu);
    input.meters.push(MeterInput {
        key: key(Domain::Gpu, Some(0)),
        source: SourceKind::Nvml,
        quality: Quality::Measured,
        measured: Measured::Energy { energy_uj: 100 * J },
        idle: IdleEstimate {
            power_uw: 0,
            source: IdleSource::Config,
        },
    });
    let usage = input.usage.as_mut().unwrap();
    usage.cpu_busy_unknown = true;
    usage.gpus.insert(
        0,
        GpuUsage {
            basis: GpuBasis::SmUtilization,
            mig: false,
            runs: vec![gpu::GpuRunUsage {
                run_id: "a".into(),
                usage_us: 300_000,
                reserved: 0,
            }],
            host_usage: 100_000,
            host_reserved: 0,
            unknown_cgroup_pids: 0,
        },
    );
    let out = attribute(&input);
    for m in &out[..4] {
        assert!(m.runs.is_empty(), "{:?}", m.key);
        assert_eq!(
            m.unattributed,
            vec![(UnattributedReason::NoUsageData, m.measured_uj)]
        );
    }
    let g = &out[4];
    assert_eq!(total(g, "a"), 75 * J);
    assert_eq!(g.host_active_uj, 25 * J);
    assert_eq!(g.sum_uj(), 100 * J as u128);
}

/// The platform meter is divided by what the component meters gave each run: packages and DRAM
/// without psys, psys alone with it (never both), the GPUs, and the host's share plus what was
/// left unattributed for the host.
#[test]
fn platform_follows_the_components() {
    let platform = |uj: u64| MeterInput {
        source: SourceKind::RedfishPower,
        quality: Quality::Estimated,
        ..meter(Domain::Platform, None, uj, 0)
    };
    let usage = Usage {
        runs: vec![
            run("a", &[(0, 600_000)], &[], None),
            run("b", &[(0, 200_000)], &[], None),
        ],
        busy_us: [(0, 1_000_000)].into_iter().collect(),
        package_cpus: [(0, 2)].into_iter().collect(),
        ..Usage::default()
    };
    let input = |meters: Vec<MeterInput>, platform_policy| IntervalInput {
        elapsed_us: 1_000_000,
        meters,
        usage: Some(usage.clone()),
        policy: Policy {
            idle: IdlePolicy::Proportional,
            dram: DramPolicy::Cpu,
            platform: platform_policy,
        },
    };
    // Package 10 J and DRAM 2 J split 0.6 / 0.2 / host 0.2: a 7.2 J, b 2.4 J, host 2.4 J of 12.
    // Platform 5 J + 1 uJ: a 3 J, b 1 J, host 1 J, and the spare microjoule to the largest
    // remainder (a, b and the host tie at .2 of a uJ: a, by id).
    let meters = vec![
        meter(Domain::Package, Some(0), 10 * J, 0),
        meter(Domain::Dram, Some(0), 2 * J, 0),
        platform(5 * J + 1),
    ];
    let pp = PlatformPolicy::Proportional;
    check(
        &input(meters.clone(), pp),
        &[(
            key(Domain::Platform, None),
            &[("a", 3 * J + 1, 0), ("b", J, 0)],
            J,
            0,
        )],
    );
    // With psys the packages and DRAM are inside it: only psys counts (weights 0.6/0.2/0.2 of
    // its 20 J), whatever the package meter says.
    let mut with_psys = meters.clone();
    with_psys[0] = meter(Domain::Package, Some(0), 99 * J, 0);
    with_psys.push(meter(Domain::Psys, None, 20 * J, 0));
    check(
        &input(with_psys, pp),
        &[(
            key(Domain::Platform, None),
            &[("a", 3 * J + 1, 0), ("b", J, 0)],
            J,
            0,
        )],
    );
    // Energy the components could not divide weighs for the host; a platform gap is a gap.
    let mut quarantined = meters.clone();
    quarantined[0].measured = Measured::Quarantined { energy_uj: 18 * J };
    check(
        &input(quarantined, pp),
        // DRAM: a 1.2, b 0.4, host 0.4; package 18 J unattributed -> host 18.4 of 20 J.
        &[(
            key(Domain::Platform, None),
            &[("a", 300_000, 0), ("b", 100_000, 0)],
            4_600_001,
            0,
        )],
    );
    let mut gap = meters.clone();
    gap[2].measured = Measured::Gap;
    let out = attribute(&input(gap, pp));
    let p = out
        .iter()
        .find(|m| m.key.domain == Domain::Platform)
        .unwrap();
    assert!(p.gap && p.measured_uj == 0 && p.runs.is_empty());
    // Under the host policy nobody is billed for the platform.
    check(
        &input(meters, PlatformPolicy::Host),
        &[(
            key(Domain::Platform, None),
            &[("a", 0, 0), ("b", 0, 0)],
            5 * J + 1,
            0,
        )],
    );
}
