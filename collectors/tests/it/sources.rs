//! Integration tests of the collectors over captured fixture trees (`collectors/testdata/hosts`) and
//! over trees generated here for hosts no fixture covers, plus every bad input the issue lists.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use wattd_collectors::counter::CounterSample;
use wattd_collectors::estimator::{EstimatorMeter, EstimatorModel};
use wattd_collectors::msr;
use wattd_collectors::powercap::{self, PowercapMeter, ZoneVerdict};
use wattd_collectors::probe::{self, ProbeOptions, ProbeReport};
use wattd_collectors::synth::{HostTree, ZoneSpec};
use wattd_collectors::topology::Topology;
use wattd_collectors::{Domain, HostError, HostRoot, Meter, MeterKey, SourceKind};

fn fixture(name: &str) -> PathBuf {
    wattd_testkit::host_fixture(name)
}

fn key(domain: Domain, package: Option<u32>, die: Option<u32>) -> MeterKey {
    MeterKey {
        domain,
        package,
        die,
    }
}

fn pkg(p: u32) -> MeterKey {
    key(Domain::Package, Some(p), None)
}

fn chosen(r: &ProbeReport) -> Vec<(MeterKey, SourceKind)> {
    r.chosen
        .iter()
        .map(|c| (key(c.domain, c.package, c.die), c.source))
        .collect()
}

fn probe_root(root: &Path) -> probe::Selection {
    probe::select(&ProbeOptions::new(HostRoot::new(root)))
}

fn tree() -> (tempfile::TempDir, HostTree) {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = HostTree::new(dir.path());
    (dir, t)
}

fn zone_verdict<'a>(scan: &'a powercap::PowercapScan, dir: &str) -> &'a ZoneVerdict {
    &scan
        .zones
        .iter()
        .find(|z| z.dir_name == dir)
        .unwrap_or_else(|| panic!("zone {dir} not in scan"))
        .verdict
}

#[test]
fn hex_zone_index_is_read_by_name() {
    let scan = powercap::scan(&HostRoot::new(fixture("prometheus-procfs"))).unwrap();
    let z = scan
        .zones
        .iter()
        .find(|z| z.dir_name == "intel-rapl:a")
        .unwrap();
    // Directory index a (hex 10) is not the package id; the name says package-10.
    assert_eq!(z.key, Some(pkg(10)));
    let core = scan
        .zones
        .iter()
        .find(|z| z.dir_name == "intel-rapl:0:0")
        .unwrap();
    assert_eq!(core.key, Some(key(Domain::Core, Some(0), None)));
    assert_eq!(core.max_energy_range_uj, Some(262_143_328_850));
    let sel = probe_root(&fixture("prometheus-procfs"));
    assert_eq!(
        chosen(&sel.report),
        vec![
            (pkg(0), SourceKind::Powercap),
            (pkg(10), SourceKind::Powercap)
        ]
    );
}

#[test]
fn mmio_duplicate_is_read_once() {
    let scan = powercap::scan(&HostRoot::new(fixture("kepler"))).unwrap();
    assert!(matches!(
        zone_verdict(&scan, "intel-rapl-mmio:0"),
        ZoneVerdict::DuplicateOf(of) if of == "intel-rapl:0"
    ));
    let meter = PowercapMeter::open(&scan).unwrap();
    let keys = meter.keys();
    assert_eq!(keys.iter().filter(|k| **k == pkg(0)).count(), 1, "{keys:?}");
    // Core is a subset of package-0: not opened for billing.
    assert!(!keys.iter().any(|k| k.domain == Domain::Core));
}

#[test]
fn two_socket_server_with_dram_and_psys() {
    let (_d, t) = tree();
    t.cpus(2, 4, 1).unwrap();
    t.cpuinfo("GenuineIntel", 6, 0x55, false).unwrap();
    t.proc_stat(&[(0, 0); 8]).unwrap();
    t.zone(&ZoneSpec::new("intel-rapl:0", "package-0", "1000"))
        .unwrap();
    t.zone(&ZoneSpec::new("intel-rapl:0:0", "dram", "2000"))
        .unwrap();
    t.zone(&ZoneSpec::new("intel-rapl:1", "package-1", "3000"))
        .unwrap();
    t.zone(&ZoneSpec::new("intel-rapl:1:0", "dram", "4000"))
        .unwrap();
    t.zone(&ZoneSpec::new("intel-rapl:2", "psys", "5000"))
        .unwrap();
    let sel = probe_root(t.root());
    let want = vec![
        (pkg(0), SourceKind::Powercap),
        (pkg(1), SourceKind::Powercap),
        (key(Domain::Dram, Some(0), None), SourceKind::Powercap),
        (key(Domain::Dram, Some(1), None), SourceKind::Powercap),
        (key(Domain::Psys, None, None), SourceKind::Powercap),
    ];
    let mut got = chosen(&sel.report);
    got.sort();
    assert_eq!(got, want);
    // Each meter reads its own file: nothing is summed into anything else.
    let mut meters = sel.meters;
    let mut out = Vec::new();
    meters[0].read(1_000_000, &mut out);
    t.zone(&ZoneSpec::new("intel-rapl:0", "package-0", "1100"))
        .unwrap();
    t.zone(&ZoneSpec::new("intel-rapl:0:0", "dram", "2020"))
        .unwrap();
    t.zone(&ZoneSpec::new("intel-rapl:2", "psys", "5500"))
        .unwrap();
    out.clear();
    meters[0].read(1_000_000, &mut out);
    let energy = |k: MeterKey| match out.iter().find(|r| r.key == k).map(|r| &r.sample) {
        Some(Ok(CounterSample::Energy { energy_uj, .. })) => *energy_uj,
        other => panic!("{k}: {other:?}"),
    };
    assert_eq!(energy(pkg(0)), 100);
    assert_eq!(energy(key(Domain::Dram, Some(0), None)), 20);
    assert_eq!(energy(key(Domain::Psys, None, None)), 500);
    assert_eq!(energy(pkg(1)), 0);
}

/// One package of four CPUs on two dies, RAPL reporting each die (`package-0-die-0`, `-die-1`).
fn two_die_package() -> (tempfile::TempDir, HostTree) {
    let (d, t) = tree();
    t.cpus(1, 4, 2).unwrap();
    t.zone(&ZoneSpec::new("intel-rapl:0", "package-0-die-0", "10"))
        .unwrap();
    t.zone(&ZoneSpec::new("intel-rapl:1", "package-0-die-1", "20"))
        .unwrap();
    (d, t)
}

#[test]
fn multi_die_package() {
    let (_d, t) = two_die_package();
    t.zone(&ZoneSpec::new("intel-rapl:1:0", "dram", "30"))
        .unwrap();
    let scan = powercap::scan(&HostRoot::new(t.root())).unwrap();
    let keys: BTreeSet<_> = scan.usable().filter_map(|z| z.key).collect();
    assert!(keys.contains(&key(Domain::Package, Some(0), Some(0))));
    assert!(keys.contains(&key(Domain::Package, Some(0), Some(1))));
    assert!(keys.contains(&key(Domain::Dram, Some(0), Some(1))));
    let topo = Topology::read(&HostRoot::new(t.root())).unwrap();
    assert_eq!(
        topo.cpus.iter().map(|c| c.die).collect::<Vec<_>>(),
        vec![0, 0, 1, 1]
    );
}

#[test]
fn tpmi_duplicate_prefers_msr_backed_zone() {
    let (_d, t) = tree();
    t.zone(&ZoneSpec::new("intel-rapl-tpmi:0", "package-0", "10"))
        .unwrap();
    t.zone(&ZoneSpec::new("intel-rapl:0", "package-0", "10"))
        .unwrap();
    t.zone(&ZoneSpec::new("intel-rapl-tpmi:1", "package-1", "10"))
        .unwrap();
    let scan = powercap::scan(&HostRoot::new(t.root())).unwrap();
    assert!(
        matches!(zone_verdict(&scan, "intel-rapl-tpmi:0"), ZoneVerdict::DuplicateOf(of) if of == "intel-rapl:0")
    );
    // A package only TPMI reports is still used.
    assert!(matches!(
        zone_verdict(&scan, "intel-rapl-tpmi:1"),
        ZoneVerdict::Usable
    ));
    assert_eq!(PowercapMeter::open(&scan).unwrap().len(), 2);
}

#[test]
fn amd_host_package_and_core_through_msr() {
    let (_d, t) = tree();
    t.cpus(1, 2, 1).unwrap();
    t.cpuinfo("AuthenticAMD", 0x19, 0x01, false).unwrap();
    t.proc_stat(&[(0, 0); 2]).unwrap();
    // Unit register: ESU 16 (2^-16 J). Package at 0xFFFF_FFF0 counts, core at 100.
    // AMD's unit, core and package registers sit at consecutive addresses, so in a regular file
    // their 8-byte windows overlap (the real device has no such problem): write the package
    // counter, then only the two low bytes of the unit register (ESU 16 lives in bits 12:8).
    for cpu in 0..2 {
        t.msr(cpu, &[(msr::AMD_PKG_ENERGY_STATUS, 0xFFFF_FFF0u64)])
            .unwrap();
        t.msr_bytes(cpu, msr::AMD_RAPL_POWER_UNIT, &[0x03, 0x10])
            .unwrap();
    }
    let sel = probe_root(t.root());
    assert_eq!(chosen(&sel.report), vec![(pkg(0), SourceKind::Msr)]);
    let msr_rep = sel
        .report
        .sources
        .iter()
        .find(|s| s.source == SourceKind::Msr)
        .unwrap();
    assert!(msr_rep
        .zones
        .iter()
        .any(|z| z.domain == Some(Domain::Core) && z.status == "informational"));
    let mut meters = sel.meters;
    let mut out = Vec::new();
    meters[0].read(1_000_000, &mut out);
    assert!(matches!(out[0].sample, Ok(CounterSample::First)));
    // Wrap: 0x10 counts to the top and 0x10000 - 0x10 more = 65536 counts = exactly 1 J.
    t.msr(0, &[(msr::AMD_PKG_ENERGY_STATUS, 0x0000_FFF0)])
        .unwrap();
    out.clear();
    meters[0].read(1_000_000, &mut out);
    assert_eq!(
        out[0].sample.as_ref().ok(),
        Some(&CounterSample::Energy {
            energy_uj: 1_000_000,
            wrapped: true
        })
    );
}

#[test]
fn intel_server_dram_uses_fixed_unit() {
    let (_d, t) = tree();
    t.cpus(1, 2, 1).unwrap();
    t.cpuinfo("GenuineIntel", 6, 0x55, false).unwrap();
    t.proc_stat(&[(0, 0); 2]).unwrap();
    // Register unit says 2^-14 J, but Skylake-X DRAM counts in 2^-16 J.
    t.msr(
        0,
        &[
            (msr::INTEL_RAPL_POWER_UNIT, 0x000A_0E03),
            (msr::INTEL_PKG_ENERGY_STATUS, 1),
            (msr::INTEL_DRAM_ENERGY_STATUS, 1),
        ],
    )
    .unwrap();
    let topo = Topology::read(&HostRoot::new(t.root())).unwrap();
    let cpu = msr::CpuId::read(&HostRoot::new(t.root())).unwrap();
    let layout = msr::layout(&cpu).unwrap();
    let (zones, _failed) = msr::scan(&HostRoot::new(t.root()), &topo, &layout).unwrap();
    let unit = |d: Domain| zones.iter().find(|z| z.key.domain == d).map(|z| z.unit);
    assert_eq!(
        unit(Domain::Package),
        Some(wattd_collectors::EnergyUnit::PowTwoJoule(14))
    );
    assert_eq!(
        unit(Domain::Dram),
        Some(wattd_collectors::EnergyUnit::PowTwoJoule(16))
    );
}

#[test]
fn powercap_wrap_over_real_files() {
    let (_d, t) = tree();
    let mut z = ZoneSpec::new("intel-rapl:0", "package-0", "999");
    z.max_energy_range_uj = "1000";
    t.zone(&z).unwrap();
    let scan = powercap::scan(&HostRoot::new(t.root())).unwrap();
    let mut m = PowercapMeter::open(&scan).unwrap();
    let mut out = Vec::new();
    m.read(1_000_000, &mut out);
    t.write("sys/class/powercap/intel-rapl:0/energy_uj", "5\n")
        .unwrap();
    out.clear();
    m.read(1_000_000, &mut out);
    // 999 -> 1000 (1) -> wraps to 0 (1) -> 5 (5): 7 uJ with modulus 1001
    assert_eq!(
        out[0].sample.as_ref().ok(),
        Some(&CounterSample::Energy {
            energy_uj: 7,
            wrapped: true
        })
    );
}

#[test]
fn estimator_energy_follows_proc_stat() {
    let (_d, t) = tree();
    t.cpus(1, 2, 1).unwrap();
    t.proc_stat(&[(100, 1000), (100, 1000)]).unwrap();
    let root = HostRoot::new(t.root());
    let topo = Topology::read(&root).unwrap();
    let mut m = EstimatorMeter::new(root, &topo, EstimatorModel::from_watts(20.0, 4.0));
    let mut out = Vec::new();
    m.read(1_000_000, &mut out);
    assert!(matches!(out[0].sample, Ok(CounterSample::First)));
    assert_eq!(out[0].quality, wattd_collectors::Quality::Estimated);
    // One CPU fully busy for 1 s (USER_HZ ticks), the other idle.
    let hz = wattd_collectors::procstat::user_hz();
    t.proc_stat(&[(100 + hz, 1000), (100, 1000 + hz)]).unwrap();
    out.clear();
    m.read(1_000_000, &mut out);
    // 20 W x 1 s + 4 W x 1 busy CPU-second = 24 J
    assert_eq!(
        out[0].sample.as_ref().ok(),
        Some(&CounterSample::Energy {
            energy_uj: 24_000_000,
            wrapped: false
        })
    );
}

/// One bad zone among good ones: the bad one is refused with an error naming its file, the good
/// one is still used, nothing panics.
#[test]
fn bad_zone_inputs_are_named_and_isolated() {
    struct Case {
        label: &'static str,
        setup: fn(&HostTree),
        want: &'static str,
    }
    fn z(t: &HostTree, name: Option<&str>, energy: &str, range: &str) {
        t.zone(&ZoneSpec {
            dir: "intel-rapl:1",
            name,
            energy_uj: energy,
            max_energy_range_uj: range,
            max_power_uw: None,
        })
        .unwrap();
    }
    let cases = [
        Case {
            label: "empty energy",
            setup: |t| z(t, Some("package-1"), "", "1000"),
            want: "energy_uj: empty",
        },
        Case {
            label: "non-numeric",
            setup: |t| z(t, Some("package-1"), "12abc", "1000"),
            want: "not a non-negative integer",
        },
        Case {
            label: "negative",
            setup: |t| z(t, Some("package-1"), "-12", "1000"),
            want: "negative",
        },
        Case {
            label: "40 digits",
            setup: |t| {
                z(
                    t,
                    Some("package-1"),
                    "1234567890123456789012345678901234567890",
                    "1000",
                )
            },
            want: "does not fit in 64 bits",
        },
        Case {
            label: "above range",
            setup: |t| z(t, Some("package-1"), "2000", "1000"),
            want: "above max_energy_range_uj",
        },
        Case {
            label: "range zero",
            setup: |t| z(t, Some("package-1"), "0", "0"),
            want: "max_energy_range_uj is 0",
        },
        Case {
            label: "no name",
            setup: |t| z(t, None, "5", "1000"),
            want: "intel-rapl:1/name: not found",
        },
        Case {
            label: "unknown name",
            setup: |t| z(t, Some("gpu\nx"), "5", "1000"),
            want: "unknown zone name",
        },
        Case {
            label: "missing energy file",
            setup: |t| {
                z(t, Some("package-1"), "5", "1000");
                std::fs::remove_file(t.root().join("sys/class/powercap/intel-rapl:1/energy_uj"))
                    .unwrap();
            },
            want: "energy_uj: not found",
        },
        Case {
            label: "symlink loop",
            setup: |t| {
                z(t, Some("package-1"), "5", "1000");
                let p = t.root().join("sys/class/powercap/intel-rapl:1/energy_uj");
                std::fs::remove_file(&p).unwrap();
                std::os::unix::fs::symlink(&p, &p).unwrap();
            },
            want: "energy_uj",
        },
        Case {
            label: "invalid utf-8",
            setup: |t| {
                z(t, Some("package-1"), "5", "1000");
                t.write("sys/class/powercap/intel-rapl:1/name", b"package-\xff\n")
                    .unwrap();
            },
            want: "not valid UTF-8",
        },
        Case {
            label: "orphan subzone",
            setup: |t| {
                t.zone(&ZoneSpec::new("intel-rapl:1:0", "dram", "5"))
                    .unwrap();
            },
            want: "parent zone intel-rapl:1 is missing",
        },
    ];
    for c in cases {
        let (_d, t) = tree();
        t.zone(&ZoneSpec::new("intel-rapl:0", "package-0", "100"))
            .unwrap();
        (c.setup)(&t);
        let sel = probe_root(t.root());
        assert!(
            chosen(&sel.report).contains(&(pkg(0), SourceKind::Powercap)),
            "{}: good zone lost",
            c.label
        );
        let pc = sel
            .report
            .sources
            .iter()
            .find(|s| s.source == SourceKind::Powercap)
            .unwrap();
        let bad = pc
            .zones
            .iter()
            .find(|z| z.location.contains("intel-rapl:1"))
            .unwrap_or_else(|| panic!("{}: bad zone not reported: {:?}", c.label, pc.zones));
        assert_eq!(bad.status, "unusable", "{}", c.label);
        let detail = bad.detail.clone().unwrap_or_default();
        assert!(detail.contains(c.want), "{}: {detail}", c.label);
        assert!(
            detail.contains("intel-rapl:1"),
            "{}: names the zone: {detail}",
            c.label
        );
    }
}

#[test]
fn two_zones_with_one_name_are_both_refused() {
    let (_d, t) = tree();
    t.zone(&ZoneSpec::new("intel-rapl:0", "package-0", "100"))
        .unwrap();
    t.zone(&ZoneSpec::new("intel-rapl:1", "package-0", "900"))
        .unwrap();
    t.zone(&ZoneSpec::new("intel-rapl:2", "package-1", "900"))
        .unwrap();
    let scan = powercap::scan(&HostRoot::new(t.root())).unwrap();
    assert!(matches!(
        zone_verdict(&scan, "intel-rapl:0"),
        ZoneVerdict::NameConflict(_)
    ));
    assert!(matches!(
        zone_verdict(&scan, "intel-rapl:1"),
        ZoneVerdict::NameConflict(_)
    ));
    assert!(matches!(
        zone_verdict(&scan, "intel-rapl:2"),
        ZoneVerdict::Usable
    ));
}

#[test]
fn vanishing_and_garbage_files_at_read_time_are_errors_not_panics() {
    let (_d, t) = tree();
    t.zone(&ZoneSpec::new("intel-rapl:0", "package-0", "100"))
        .unwrap();
    let scan = powercap::scan(&HostRoot::new(t.root())).unwrap();
    let mut m = PowercapMeter::open(&scan).unwrap();
    let mut out = Vec::new();
    for content in [
        "garbage\n",
        "",
        "-1\n",
        "99999999999999999999999999\n",
        "262143328851\n",
    ] {
        t.write("sys/class/powercap/intel-rapl:0/energy_uj", content)
            .unwrap();
        out.clear();
        m.read(1_000_000, &mut out);
        let err = out[0]
            .sample
            .as_ref()
            .err()
            .unwrap_or_else(|| panic!("{content:?} accepted"));
        assert!(err.to_string().contains("intel-rapl:0/energy_uj"), "{err}");
    }
    // The kept descriptor survives an unlink (same inode); a zone dir that vanishes entirely
    // gives an error at the next scan, not a panic.
    std::fs::remove_dir_all(t.root().join("sys/class/powercap/intel-rapl:0")).unwrap();
    out.clear();
    m.read(1_000_000, &mut out);
    assert_eq!(out.len(), 1);
    let scan = powercap::scan(&HostRoot::new(t.root())).unwrap();
    assert!(scan.zones.is_empty());
}

#[test]
fn missing_powercap_class_is_a_not_found_reason() {
    let (_d, t) = tree();
    t.cpus(1, 2, 1).unwrap();
    t.cpuinfo("GenuineIntel", 6, 0x8E, true).unwrap();
    t.proc_stat(&[(0, 0); 2]).unwrap();
    let e = powercap::scan(&HostRoot::new(t.root())).unwrap_err();
    assert!(matches!(e, HostError::NotFound { .. }));
    // With nothing else, the estimator is chosen and every hardware source says why not.
    let sel = probe_root(t.root());
    assert_eq!(chosen(&sel.report), vec![(pkg(0), SourceKind::Estimator)]);
    for s in &sel.report.sources {
        if s.source != SourceKind::Estimator {
            let reason = s.reason.clone().unwrap_or_default();
            assert!(!s.available && !reason.is_empty(), "{:?}", s);
            assert!(
                reason.contains("VM"),
                "virtualised host is named in {reason}"
            );
        }
    }
}

#[test]
fn dev_machine_probe_names_a_source_and_never_panics() {
    // The live host: whatever it has, every billed package gets a source (hardware or the
    // estimator) and every unused source has a reason.
    let sel = probe::select(&ProbeOptions::new(HostRoot::live()));
    assert!(!sel.report.chosen.is_empty(), "{:#?}", sel.report);
    for s in &sel.report.sources {
        assert!(s.available || s.reason.is_some(), "{:?}", s);
    }
    if sel.report.virtualized
        && !sel
            .report
            .chosen
            .iter()
            .any(|c| c.source != SourceKind::Estimator)
    {
        assert!(sel
            .report
            .chosen
            .iter()
            .all(|c| c.quality == wattd_collectors::Quality::Estimated));
    }
}

/// RAPL reporting package 0 per die (`package-0-die-0`, `-die-1`) and a hwmon channel declared
/// as package 0: RAPL's dies serve it, the declaration stands by (its key has no die, and must
/// still not be claimed beside them: that would count the package twice).
#[test]
fn a_declared_package_stands_by_beside_rapl_per_die() {
    let (_d, t) = two_die_package();
    let hw = t.root().join("sys/class/hwmon/hwmon0");
    std::fs::create_dir_all(&hw).unwrap();
    std::fs::write(hw.join("name"), "power_meter\n").unwrap();
    std::fs::write(hw.join("power1_average"), "80000000\n").unwrap();
    std::fs::write(hw.join("power1_oem_info"), "CPU Power Socket 0\n").unwrap();
    let mut opts = ProbeOptions::new(HostRoot::new(t.root()));
    opts.hwmon_declared = vec![wattd_collectors::hwmon::Declared {
        driver: "power_meter".into(),
        channel: "CPU Power Socket 0".into(),
        device: None,
        key: pkg(0),
    }];
    let sel = probe::select(&opts);
    let hwmon = sel
        .report
        .sources
        .iter()
        .find(|s| s.source == SourceKind::Hwmon)
        .unwrap();
    assert!(
        hwmon.zones.iter().any(|z| z.status == "standby"),
        "{:?}",
        hwmon.zones
    );
    assert!(
        !chosen(&sel.report)
            .iter()
            .any(|(k, s)| k.domain == Domain::Package && *s == SourceKind::HwmonPower),
        "{:?}",
        chosen(&sel.report)
    );
    assert!(sel.meters.iter().all(|m| m.source() != SourceKind::Hwmon));
}
