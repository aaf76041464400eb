//! hwmon sensors on fixture trees: kepler's captured `class/hwmon` (none of which wattd can
//! bill) and a tree written by hand from the kernel's Intel GPU hwmon ABI (`intel-gpus/`, see
//! `testdata/hosts/SOURCES.md`), then the meter on a copy whose counters the test moves.

use std::path::Path;

use wattd_collectors::counter::CounterSample;
use wattd_collectors::hwmon::{self, ChannelKind, HwmonMeter, MeterOptions, GPU_INDEX_BASE};
use wattd_collectors::probe::{self, ProbeOptions};
use wattd_collectors::{
    Domain, DomainReading, HostError, HostRoot, Meter, MeterKey, Quality, SourceKind,
};

fn gpu(n: u32) -> MeterKey {
    MeterKey {
        domain: Domain::Gpu,
        package: Some(GPU_INDEX_BASE + n),
        die: None,
    }
}

/// The probe's report of the hwmon source.
fn hwmon_source(r: &probe::ProbeReport) -> &probe::SourceReport {
    r.sources
        .iter()
        .find(|s| s.source == SourceKind::Hwmon)
        .expect("the probe reports the hwmon source")
}

/// (hwmon dir, channel file name, status) of every decision.
fn statuses(root: &Path) -> Vec<(String, String, &'static str, Option<MeterKey>)> {
    hwmon::decide(&hwmon::scan(&HostRoot::new(root)))
        .into_iter()
        .map(|d| {
            let file = d.channel.file.rsplit('/').next().unwrap().to_owned();
            (d.dir, file, d.status, d.key)
        })
        .collect()
}

#[test]
fn kepler_sensors_are_listed_and_none_is_billed() {
    let root = wattd_testkit::host_fixture("kepler");
    let devices = hwmon::scan(&HostRoot::new(&root));
    // Voltage/current-only devices (ina226, max20730) have no energy or power channel.
    assert!(devices.iter().all(|d| !d.channels.is_empty()));
    assert!(!devices.iter().any(|d| d.name == "ina226"));
    let disabled = devices
        .iter()
        .find(|d| d.dir == "hwmon_energy_disabled")
        .unwrap();
    let enabled: Vec<(u32, bool, Option<&str>)> = disabled
        .channels
        .iter()
        .map(|c| (c.index, c.enabled, c.label.as_deref()))
        .collect();
    assert_eq!(
        enabled,
        vec![
            (1, true, Some("Rail_A")),
            (2, true, Some("Rail_B")),
            (3, false, Some("Rail_C"))
        ]
    );
    // amdgpu's power1_input is read, not its power1_average as well.
    let amdgpu = devices.iter().find(|d| d.name == "amdgpu").unwrap();
    assert_eq!(amdgpu.channels.len(), 1);
    assert_eq!(amdgpu.channels[0].kind, ChannelKind::Power);
    assert!(amdgpu.channels[0].file.ends_with("power1_input"));
    for (dir, file, status, key) in statuses(&root) {
        let want = if dir == "hwmon_energy_disabled" && file == "energy3_input"
            || dir == "hwmon_disabled_power" && file == "power3_input"
        {
            "unusable"
        } else {
            "not_billed"
        };
        assert_eq!((status, key), (want, None), "{dir}/{file}");
    }
    // The probe lists them under the hwmon source, chooses none, and its meters are RAPL's.
    let sel = probe::select(&ProbeOptions::new(HostRoot::new(&root)));
    let src = hwmon_source(&sel.report);
    assert!(!src.available);
    assert!(src.zones.len() >= 10, "{:?}", src.zones);
    assert!(!sel.report.chosen.iter().any(|c| c.domain == Domain::Gpu));
}

#[test]
fn intel_gpus_bill_the_card_once_and_amd_energy_never() {
    let root = wattd_testkit::host_fixture("intel-gpus");
    let got = statuses(&root);
    let want: Vec<(String, String, &'static str, Option<MeterKey>)> = [
        // xe at 0000:03:00.0 sorts first: GPU 1000; its card is billed, its package inside it.
        ("hwmon4", "energy1_input", "chosen", Some(gpu(0))),
        ("hwmon4", "energy2_input", "informational", Some(gpu(0))),
        // i915 at 0000:4d:00.0: GPU 1001, energy1 unlabelled; its tile device is inside it.
        ("hwmon5", "energy1_input", "chosen", Some(gpu(1))),
        ("hwmon6", "energy1_input", "informational", None),
        // amd_energy: the RAPL registers again.
        ("hwmon7", "energy1_input", "duplicate", None),
        ("hwmon7", "energy17_input", "duplicate", None),
    ]
    .into_iter()
    .map(|(d, f, s, k)| (d.to_owned(), f.to_owned(), s, k))
    .collect();
    assert_eq!(got, want);

    let sel = probe::select(&ProbeOptions::new(HostRoot::new(&root)));
    let gpus: Vec<(MeterKey, SourceKind, Quality)> = sel
        .report
        .chosen
        .iter()
        .filter(|c| c.domain == Domain::Gpu)
        .map(|c| {
            (
                MeterKey {
                    domain: c.domain,
                    package: c.package,
                    die: c.die,
                },
                c.source,
                c.quality,
            )
        })
        .collect();
    assert_eq!(
        gpus,
        vec![
            (gpu(0), SourceKind::Hwmon, Quality::Measured),
            (gpu(1), SourceKind::Hwmon, Quality::Measured)
        ]
    );
    // A GPU index is not a CPU package: no "no online CPU in package 1000" problem.
    assert!(
        !sel.report.problems.iter().any(|p| p.contains("1000")),
        "{:?}",
        sel.report.problems
    );
    let zone = hwmon_source(&sel.report)
        .zones
        .iter()
        .find(|z| {
            z.location
                .starts_with("sys/class/hwmon/hwmon4/energy1_input")
        })
        .unwrap();
    assert_eq!(zone.energy_uj, Some(1_234_567_890));
    assert!(
        zone.location.contains("xe card, 0000:03:00.0"),
        "{}",
        zone.location
    );
}

/// Copies the hand-written tree to a scratch root the test can write to.
fn scratch_copy() -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    let src = wattd_testkit::host_fixture("intel-gpus");
    let ok = std::process::Command::new("cp")
        .arg("-a")
        .arg(src.join("sys"))
        .arg(t.path())
        .status()
        .unwrap()
        .success();
    assert!(ok);
    t
}

/// The meter of the chosen channels under `root`, and the channels that could not be opened.
fn open_meter(root: &Path) -> (HwmonMeter, Vec<(MeterKey, HostError)>) {
    let root = HostRoot::new(root);
    let decisions = hwmon::decide(&hwmon::scan(&root));
    let (meter, failed) = HwmonMeter::open(&root, &decisions, MeterOptions::default());
    (meter.unwrap(), failed)
}

fn read(m: &mut HwmonMeter, elapsed_us: u64) -> Vec<DomainReading> {
    let mut out = Vec::new();
    m.read(elapsed_us, &mut out);
    out
}

fn sample(r: &DomainReading) -> CounterSample {
    *r.sample.as_ref().unwrap()
}

#[test]
fn the_meter_counts_exact_deltas_and_a_reset_or_garbage_is_a_gap_then_a_baseline() {
    let t = scratch_copy();
    let (mut m, failed) = open_meter(t.path());
    assert!(failed.is_empty());
    assert_eq!(m.keys(), vec![gpu(0), gpu(1)]);
    let card = t.path().join("sys/class/hwmon/hwmon4/energy1_input");
    let set = |v: &str| std::fs::write(&card, format!("{v}\n")).unwrap();
    let first = read(&mut m, 1_000_000);
    assert_eq!(sample(&first[0]), CounterSample::First);
    assert_eq!(first[0].source, SourceKind::Hwmon);
    assert_eq!(first[0].quality, Quality::Measured);
    // 150 J in one second, to the microjoule.
    set("1384567891");
    let r = read(&mut m, 1_000_000);
    assert_eq!(
        sample(&r[0]),
        CounterSample::Energy {
            energy_uj: 150_000_001,
            wrapped: false
        }
    );
    // The i915 GPU did not move: zero, not a gap.
    assert_eq!(
        sample(&r[1]),
        CounterSample::Energy {
            energy_uj: 0,
            wrapped: false
        }
    );
    // Driver reloaded: the count starts over. A reset (gap), then counting from the new value.
    set("5000000");
    assert!(matches!(
        sample(&read(&mut m, 1_000_000)[0]),
        CounterSample::Reset { .. }
    ));
    set("6000000");
    assert_eq!(
        sample(&read(&mut m, 1_000_000)[0]),
        CounterSample::Energy {
            energy_uj: 1_000_000,
            wrapped: false
        }
    );
    // Garbage: an error naming the file, then the next good reading is a new baseline.
    set("12abc");
    let bad = read(&mut m, 1_000_000);
    let err = bad[0].sample.as_ref().unwrap_err().to_string();
    assert!(err.contains("hwmon4/energy1_input"), "{err}");
    set("7000000");
    assert_eq!(sample(&read(&mut m, 1_000_000)[0]), CounterSample::First);
    // Above what a GPU can draw (2 kW x the safety factor) in a second: quarantined.
    set("107000000000");
    assert!(matches!(
        sample(&read(&mut m, 1_000_000)[0]),
        CounterSample::Quarantined { .. }
    ));
}

#[test]
fn a_gpu_with_only_a_power_reading_is_integrated_and_marked_estimated() {
    let t = scratch_copy();
    let dev = t.path().join("sys/class/hwmon/hwmon5");
    std::fs::remove_file(dev.join("energy1_input")).unwrap();
    std::fs::write(dev.join("power1_input"), "100000000\n").unwrap();
    let root = HostRoot::new(t.path());
    let decisions = hwmon::decide(&hwmon::scan(&root));
    let d = decisions
        .iter()
        .find(|d| d.dir == "hwmon5" && d.status == "chosen")
        .unwrap();
    assert_eq!(d.channel.kind, ChannelKind::Power);
    let sel = probe::select(&ProbeOptions::new(root.clone()));
    assert!(sel
        .report
        .chosen
        .iter()
        .any(|c| c.package == Some(GPU_INDEX_BASE + 1)
            && c.source == SourceKind::HwmonPower
            && c.quality == Quality::Estimated));
    let (meter, _) = HwmonMeter::open(&root, &decisions, MeterOptions::default());
    let mut m = meter.unwrap();
    let power = |r: &[DomainReading]| {
        let r = r.iter().find(|r| r.key == gpu(1)).unwrap();
        assert_eq!(
            (r.source, r.quality),
            (SourceKind::HwmonPower, Quality::Estimated)
        );
        sample(r)
    };
    assert_eq!(power(&read(&mut m, 1_000_000)), CounterSample::First);
    // 100 W to 200 W over 1 s: 150 J by trapezoid; then 200 W over 0.5 s: 100 J.
    std::fs::write(dev.join("power1_input"), "200000000\n").unwrap();
    assert_eq!(
        power(&read(&mut m, 1_000_000)),
        CounterSample::Energy {
            energy_uj: 150_000_000,
            wrapped: false
        }
    );
    assert_eq!(
        power(&read(&mut m, 500_000)),
        CounterSample::Energy {
            energy_uj: 100_000_000,
            wrapped: false
        }
    );
}

#[test]
fn a_gpu_whose_device_comes_back_under_another_number_is_found_again_and_named_by_its_address() {
    let t = scratch_copy();
    let (mut m, _) = open_meter(t.path());
    assert_eq!(m.device_id(gpu(0)).as_deref(), Some("pci:0000:03:00.0"));
    assert_eq!(m.device_id(gpu(1)).as_deref(), Some("pci:0000:4d:00.0"));
    assert_eq!(sample(&read(&mut m, 1_000_000)[0]), CounterSample::First);
    // The driver is reloaded: the old device's file reads nothing, and the same card (name,
    // PCI address, label) appears as hwmon9 with its count started over.
    let hwmon = t.path().join("sys/class/hwmon");
    // (On sysfs the kept-open file then fails with ENODEV; here it reads empty.)
    std::fs::write(hwmon.join("hwmon4/energy1_input"), "").unwrap();
    std::fs::remove_dir_all(hwmon.join("hwmon4")).unwrap();
    std::fs::create_dir(hwmon.join("hwmon9")).unwrap();
    for (f, v) in [
        ("name", "xe"),
        ("energy1_label", "card"),
        ("energy1_input", "1000"),
    ] {
        std::fs::write(hwmon.join("hwmon9").join(f), format!("{v}\n")).unwrap();
    }
    std::os::unix::fs::symlink("../../../0000:03:00.0", hwmon.join("hwmon9/device")).unwrap();
    // Found again: a new baseline (a gap for this interval), never a difference between the two
    // devices' counts; then counting from the new device.
    assert_eq!(sample(&read(&mut m, 1_000_000)[0]), CounterSample::First);
    std::fs::write(hwmon.join("hwmon9/energy1_input"), "2000\n").unwrap();
    assert_eq!(
        sample(&read(&mut m, 1_000_000)[0]),
        CounterSample::Energy {
            energy_uj: 1_000,
            wrapped: false
        }
    );
    // Gone for good: a failed read (a gap) naming the channel, never a panic or a hang.
    std::fs::write(hwmon.join("hwmon9/energy1_input"), "").unwrap();
    std::fs::remove_dir_all(hwmon.join("hwmon9")).unwrap();
    let err = read(&mut m, 1_000_000)[0]
        .sample
        .as_ref()
        .unwrap_err()
        .to_string();
    assert!(err.contains("xe 0000:03:00.0"), "{err}");
}

#[test]
fn gpus_disabled_by_configuration_are_listed_not_billed() {
    let root = wattd_testkit::host_fixture("intel-gpus");
    let mut opts = ProbeOptions::new(HostRoot::new(&root));
    opts.gpus = false;
    let sel = probe::select(&opts);
    assert!(!sel.report.chosen.iter().any(|c| c.domain == Domain::Gpu));
    assert!(sel
        .meters
        .iter()
        .all(|m| m.keys().is_empty() || m.source() != SourceKind::Hwmon));
    let src = hwmon_source(&sel.report);
    assert!(src.zones.iter().any(|z| z
        .detail
        .as_deref()
        .is_some_and(|d| d.contains("[gpu] enabled = false"))));
}

/// A read that blocks (a wedged GPU driver) costs gaps, never a hung tick: the tick's read gives
/// up at the deadline, the next tick does not queue behind the stuck read, the late answer is
/// thrown away when it comes, and counting resumes from a new baseline. The stuck read is held
/// by a gate the test opens (no timing race on a slow machine), the deadline is a second.
#[test]
fn a_blocked_read_is_a_gap_at_the_deadline_and_its_late_answer_is_thrown_away() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{mpsc, Arc};
    use std::time::{Duration, Instant};
    let calls = Arc::new(AtomicU64::new(0));
    let seen = calls.clone();
    let (open_gate, gate) = mpsc::channel::<()>();
    let mut m = HwmonMeter::with_reader(
        &[gpu(0)],
        move || {
            let n = seen.fetch_add(1, Ordering::SeqCst);
            if n == 1 {
                // The second read hangs until the test lets it go.
                let _ = gate.recv();
            }
            // The count goes up 1 J per call; the late answer carries 999 J, which must never
            // be billed.
            vec![Ok(if n == 1 {
                999_000_000
            } else {
                (n + 1) * 1_000_000
            })]
        },
        Duration::from_secs(1),
    )
    .unwrap();
    let message = |r: &[DomainReading]| r[0].sample.as_ref().unwrap_err().to_string();
    assert_eq!(sample(&read(&mut m, 1_000_000)[0]), CounterSample::First);
    let late = read(&mut m, 1_000_000);
    assert!(
        message(&late).contains("no answer within 1000 ms"),
        "{}",
        message(&late)
    );
    // Still stuck: refused at once (well inside a deadline), not queued behind it.
    let t = Instant::now();
    let stuck = read(&mut m, 1_000_000);
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "waited {:?}",
        t.elapsed()
    );
    assert!(
        message(&stuck).contains("still blocked"),
        "{}",
        message(&stuck)
    );
    open_gate.send(()).unwrap();
    // Unstuck: once the late 999 J answer has come it is dropped; a new baseline, then 1 J a read.
    let mut after = read(&mut m, 1_000_000);
    for _ in 0..100 {
        if after[0].sample.is_ok() {
            break;
        }
        assert!(
            message(&after).contains("still blocked"),
            "{}",
            message(&after)
        );
        std::thread::sleep(Duration::from_millis(50));
        after = read(&mut m, 1_000_000);
    }
    assert_eq!(sample(&after[0]), CounterSample::First);
    assert_eq!(
        sample(&read(&mut m, 1_000_000)[0]),
        CounterSample::Energy {
            energy_uj: 1_000_000,
            wrapped: false
        }
    );
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

/// A GPU whose hwmon device has no PCI link is never looked for under another number (another
/// card could answer to its name): after its file fails it is opened again at its own path, and
/// counting resumes from a new baseline instead of a gap for ever.
#[test]
fn a_gpu_without_a_device_link_is_reopened_at_its_own_path() {
    let t = scratch_copy();
    let dev = t.path().join("sys/class/hwmon/hwmon5");
    std::fs::remove_file(dev.join("device")).unwrap();
    let root = HostRoot::new(t.path());
    let decisions = hwmon::decide(&hwmon::scan(&root));
    let (meter, _) = HwmonMeter::open(&root, &decisions, MeterOptions::default());
    let mut m = meter.unwrap();
    // Without a PCI address it sorts first: GPU 1000 now, the xe card 1001.
    assert_eq!(m.device_id(gpu(0)).as_deref(), Some("hwmon:hwmon5"));
    assert_eq!(m.device_id(gpu(1)).as_deref(), Some("pci:0000:03:00.0"));
    let i915 = |r: &[DomainReading]| {
        let r = r.iter().find(|r| r.key == gpu(0)).unwrap();
        r.sample.as_ref().map(|s| *s).map_err(|e| e.to_string())
    };
    assert_eq!(i915(&read(&mut m, 1_000_000)), Ok(CounterSample::First));
    std::fs::write(dev.join("energy1_input"), "").unwrap();
    let err = i915(&read(&mut m, 1_000_000)).unwrap_err();
    assert!(err.contains("hwmon5/energy1_input"), "{err}");
    std::fs::write(dev.join("energy1_input"), "56000000\n").unwrap();
    assert_eq!(i915(&read(&mut m, 1_000_000)), Ok(CounterSample::First));
    std::fs::write(dev.join("energy1_input"), "57000000\n").unwrap();
    assert_eq!(
        i915(&read(&mut m, 1_000_000)),
        Ok(CounterSample::Energy {
            energy_uj: 1_000_000,
            wrapped: false
        })
    );
}

fn package(n: u32) -> MeterKey {
    MeterKey {
        domain: Domain::Package,
        package: Some(n),
        die: None,
    }
}

/// The probe's one choice for `key` (failing unless there is exactly one).
fn chosen_for(r: &probe::ProbeReport, key: MeterKey) -> &probe::Choice {
    let c: Vec<&probe::Choice> = r
        .chosen
        .iter()
        .filter(|c| c.domain == key.domain && c.package == key.package)
        .collect();
    assert_eq!(c.len(), 1, "{key}: {:?}", r.chosen);
    c[0]
}

fn declared(driver: &str, channel: &str, key: MeterKey) -> hwmon::Declared {
    hwmon::Declared {
        driver: driver.into(),
        channel: channel.into(),
        device: None,
        key,
    }
}

/// An ARM server (hand-written NVIDIA Grace tree: four ACPI power meters, power only, labelled
/// by their `power1_oem_info`, no RAPL): nothing is billed unless declared; a declared CPU rail
/// is the package meter, integrated per tick and marked estimated, served by that one meter; a
/// declaration that matches several channels (hwmon numbers change between boots), two that
/// name the same channel, and one that matches nothing are refused and said as problems.
#[test]
fn declared_power_only_sensors_are_billed_as_their_meter_and_nothing_else_is() {
    let src = wattd_testkit::host_fixture("arm-grace");
    let root = HostRoot::new(&src);
    let devices = hwmon::scan(&root);
    let labels: Vec<Option<&str>> = devices
        .iter()
        .map(|d| d.channels[0].label.as_deref())
        .collect();
    assert_eq!(labels[2], Some("CPU Power Socket 0"));
    assert!(hwmon::decide(&devices)
        .iter()
        .all(|d| d.status == "not_billed" && d.key.is_none()));

    let decl = vec![
        declared("power_meter", "CPU Power Socket 0", package(0)),
        // By file stem: all four devices have a power1. Refused, whatever it would pick.
        declared("power_meter", "power1", package(1)),
        declared("power_meter", "CPU Power Socket 9", package(9)),
        // Two entries naming the SysIO rail: neither is used.
        declared("power_meter", "SysIO Power Socket 0", package(2)),
        declared("power_meter", "SysIO Power Socket 0", package(3)),
    ];
    let got: Vec<(String, &str, Option<MeterKey>)> = hwmon::decide_with(&devices, &decl)
        .into_iter()
        .map(|d| (d.dir, d.status, d.key))
        .collect();
    assert_eq!(
        got,
        vec![
            ("hwmon0".into(), "unusable", None),
            ("hwmon1".into(), "unusable", None),
            ("hwmon2".into(), "chosen", Some(package(0))),
            ("hwmon3".into(), "unusable", None),
        ]
    );
    let problems = hwmon::declaration_problems(&devices, &decl);
    assert_eq!(problems.len(), 4, "{problems:#?}");
    assert!(
        problems[0].starts_with("[hwmon] power entry 2 (power_meter power1) matches 4 channels")
    );
    assert!(problems[1].contains("entry 3") && problems[1].contains("matches no sensor"));
    assert!(problems[2].contains("entry 4") && problems[2].contains("same channel as entry 5"));
    assert!(problems[3].contains("entry 5") && problems[3].contains("same channel as entry 4"));

    // Through the probe: package 0 from the CPU rail (estimated), one meter serving it; the
    // refused declarations among the report's problems.
    let mut opts = ProbeOptions::new(root.clone());
    opts.hwmon_declared = vec![decl[0].clone(), decl[2].clone()];
    let sel = probe::select(&opts);
    let pkg0 = chosen_for(&sel.report, package(0));
    assert_eq!(
        (pkg0.source, pkg0.quality),
        (SourceKind::HwmonPower, Quality::Estimated)
    );
    assert_eq!(serving(&sel, package(0)), 1);
    assert!(
        sel.report
            .problems
            .iter()
            .any(|p| p.contains("CPU Power Socket 9") && p.contains("matches no sensor")),
        "{:?}",
        sel.report.problems
    );

    // The meter: 85 W then 95 W over one second is 90 J by trapezoid, exactly; no device
    // identity on a CPU meter.
    let t = tempfile::tempdir().unwrap();
    assert!(std::process::Command::new("cp")
        .arg("-a")
        .arg(src.join("sys"))
        .arg(t.path())
        .status()
        .unwrap()
        .success());
    let root = HostRoot::new(t.path());
    let decisions = hwmon::decide_with(&hwmon::scan(&root), &decl[..1]);
    let (meter, failed) = HwmonMeter::open(&root, &decisions, MeterOptions::default());
    assert!(failed.is_empty());
    let mut m = meter.unwrap();
    assert_eq!(m.keys(), vec![package(0)]);
    assert_eq!(m.device_id(package(0)), None);
    let first = read(&mut m, 1_000_000);
    assert_eq!(
        (first[0].source, first[0].quality, sample(&first[0])),
        (
            SourceKind::HwmonPower,
            Quality::Estimated,
            CounterSample::First
        )
    );
    let file = t.path().join("sys/class/hwmon/hwmon2/power1_average");
    std::fs::write(&file, "95000000\n").unwrap();
    assert_eq!(
        sample(&read(&mut m, 1_000_000)[0]),
        CounterSample::Energy {
            energy_uj: 90_000_000,
            wrapped: false
        }
    );
    // A driver reload (no device link here) that brings another sensor back as hwmon2 (the
    // SysIO rail): it is not taken for the CPU rail, a gap now and at the next tick.
    std::fs::write(
        t.path().join("sys/class/hwmon/hwmon2/power1_oem_info"),
        "SysIO Power Socket 0\n",
    )
    .unwrap();
    std::fs::write(&file, "").unwrap();
    assert!(read(&mut m, 1_000_000)[0].sample.is_err());
    std::fs::write(&file, "15000000\n").unwrap();
    let err = read(&mut m, 1_000_000)[0]
        .sample
        .as_ref()
        .unwrap_err()
        .to_string();
    assert!(err.contains("power_meter no device link"), "{err}");
}

/// How many of the selection's meters serve `key` (any die of its package).
fn serving(sel: &probe::Selection, key: MeterKey) -> usize {
    sel.meters
        .iter()
        .filter(|m| {
            m.keys()
                .iter()
                .any(|k| k.domain == key.domain && k.package == key.package)
        })
        .count()
}

/// An AMD GPU's hwmon channel (measured through AMD SMI) cannot be declared: refused, said.
#[test]
fn an_amd_gpu_channel_cannot_be_declared() {
    let root = HostRoot::new(wattd_testkit::host_fixture("kepler"));
    let devices = hwmon::scan(&root);
    let decl = vec![declared("amdgpu", "power1", package(0))];
    let problems = hwmon::declaration_problems(&devices, &decl);
    assert!(
        problems.len() == 1 && problems[0].contains("cannot be declared"),
        "{problems:?}"
    );
    assert!(hwmon::decide_with(&devices, &decl)
        .iter()
        .all(|d| d.key != Some(package(0))));
}

/// On a host with RAPL (kepler's captured tree), a channel declared as package 0 stands by: the
/// package stays RAPL's, never summed with the declared sensor; with GPUs disabled by
/// configuration, a declared CPU meter is still what it was declared.
#[test]
fn a_declared_package_beside_rapl_stands_by() {
    let root = HostRoot::new(wattd_testkit::host_fixture("kepler"));
    let mut opts = ProbeOptions::new(root);
    opts.gpus = false;
    opts.hwmon_declared = vec![declared("k10temp", "Package", package(0))];
    let sel = probe::select(&opts);
    let pkg0 = chosen_for(&sel.report, package(0));
    assert_ne!(pkg0.source, SourceKind::HwmonPower);
    assert_eq!(serving(&sel, package(0)), 1);
    let zones = &hwmon_source(&sel.report).zones;
    assert!(
        zones.iter().any(|z| z.status == "standby"
            && z.location.contains("k10temp Package")
            && z.detail
                .as_deref()
                .is_some_and(|d| d.contains("is served by"))),
        "{zones:?}"
    );
}
