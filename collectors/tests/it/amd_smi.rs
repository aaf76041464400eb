//! AMD SMI's foreign-function seam (`nvml::amd::RealAmdSmi`) against a shared library loaded the
//! way the agent loads libamd_smi: `collectors/testdata/amd_smi/fake_amd_smi.c`, compiled here
//! with the C compiler every Rust build already needs, for each library version whose layout
//! wattd decodes. The structures in it are declared as AMD SMI's header declares them, so their
//! sizes and offsets come from the C compiler, and a wrong layout in `amd.rs` fails here.
//! (No AMD GPU and no AMD SMI package exist on the build machines; see that file.)

use std::path::{Path, PathBuf};
use std::process::Command;

use wattd_collectors::counter::EnergyUnit;
use wattd_collectors::nvml::amd::RealAmdSmi;
use wattd_collectors::nvml::{
    probe_gpus, EngineTime, GpuOptions, GpuVendor, NvmlApi, NvmlError, PciGpu, AMD_INDEX_BASE,
};
use wattd_collectors::{HostRoot, SourceKind};

struct Fake {
    _dir: tempfile::TempDir,
    lib: PathBuf,
    state: PathBuf,
}

impl Fake {
    /// Compiles the stand-in for library version `major` (and `defines`), its state file beside.
    fn build(major: u32, defines: &[&str]) -> Fake {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let lib = dir.path().join("libamd_smi.so");
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/amd_smi/fake_amd_smi.c");
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        let out = Command::new(&cc)
            .args(["-shared", "-fPIC", "-O1", "-Wall", "-Werror"])
            .arg(format!("-DAMDSMI_MAJOR={major}"))
            .arg(format!("-DSTATE_FILE=\"{}\"", state.display()))
            .args(defines.iter().map(|d| format!("-D{d}")))
            .arg("-o")
            .arg(&lib)
            .arg(&src)
            .output()
            .unwrap_or_else(|e| panic!("cannot run the C compiler {cc:?} (set CC): {e}"));
        assert!(
            out.status.success(),
            "{cc} failed on {}: {}",
            src.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Fake {
            _dir: dir,
            lib,
            state,
        }
    }

    fn set(&self, energy: [u64; 2], procs: &[(u32, u32, u64)], noperm: bool) {
        let mut s = format!("energy 0 {}\nenergy 1 {}\n", energy[0], energy[1]);
        for (gpu, pid, ns) in procs {
            s += &format!("proc {gpu} {pid} {ns}\n");
        }
        if noperm {
            s += "noperm\n";
        }
        std::fs::write(&self.state, s).unwrap();
    }

    fn open(&self) -> RealAmdSmi {
        RealAmdSmi::open(Some(self.lib.as_os_str())).unwrap()
    }
}

/// 100 processes on GPU 0 (more than the first buffer's 64: the library answers
/// OUT_OF_RESOURCES with the count, and the call is made again), one on GPU 1.
fn many() -> Vec<(u32, u32, u64)> {
    let mut v: Vec<_> = (0..100u32)
        .map(|i| (0, 1000 + i, u64::from(i) * 1_000_003 + 7))
        .collect();
    v.push((1, 4242, u64::MAX - 1));
    v
}

#[test]
fn every_known_layout_is_read_at_the_libraries_own_offsets() {
    for major in [24, 25, 26] {
        let fake = Fake::build(major, &[]);
        fake.set([1_000_000, 5], &many(), false);
        let mut amd = fake.open();
        assert!(amd.version().starts_with(&format!("{major}.")), "{amd:?}");
        assert_eq!(amd.vendor(), GpuVendor::Amd);
        // Two GPUs; the CPU between them is not one.
        assert_eq!(amd.device_count(), Ok(2));
        assert_eq!(
            amd.uuid(1).unwrap(),
            "AMD-1f2e3d4c-0000-4000-8000-000000000301"
        );
        assert_eq!(amd.uuid(2), Err(NvmlError::InvalidArgument));
        assert_eq!(
            amd.energy_count(0),
            Ok((1_000_000, EnergyUnit::PowTwoJoule(16)))
        );
        let want: Vec<EngineTime> = many()
            .iter()
            .filter(|p| p.0 == 0)
            .map(|&(_, pid, gfx_ns)| EngineTime { pid, gfx_ns })
            .collect();
        assert_eq!(amd.engine_time_ns(0).unwrap(), want, "library {major}");
        assert_eq!(
            amd.engine_time_ns(1).unwrap(),
            vec![EngineTime {
                pid: 4242,
                gfx_ns: u64::MAX - 1
            }]
        );
        // No process: an empty list, not an error.
        fake.set([1, 1], &[], false);
        assert_eq!(amd.engine_time_ns(0).unwrap(), vec![]);
    }
}

/// Up to 24.x the list came filled with NO_PERM when a process's name was unreadable: used.
/// From 25.x NO_PERM is an error.
#[test]
fn no_perm_with_a_filled_list_is_used_only_where_the_library_did_that() {
    let fake = Fake::build(24, &[]);
    fake.set([1, 1], &[(0, 77, 500)], true);
    assert_eq!(
        fake.open().engine_time_ns(0).unwrap(),
        vec![EngineTime {
            pid: 77,
            gfx_ns: 500
        }]
    );
    let fake = Fake::build(25, &[]);
    fake.set([1, 1], &[(0, 77, 500)], true);
    let e = fake.open().engine_time_ns(0).unwrap_err().to_string();
    assert!(e.contains("no permission"), "{e}");
}

/// A library whose process list is the older pid list, or whose version names no layout this
/// wattd knows, is not read: its energy still is.
#[test]
fn an_unknown_process_list_is_refused_and_the_energy_still_read() {
    for (major, defines, why) in [
        (24, &["PID_LIST_FORM"][..], "older list of pids"),
        (27, &[][..], "layout is not known"),
    ] {
        let fake = Fake::build(major, defines);
        fake.set([65_536, 0], &[(0, 77, 500)], false);
        let mut amd = fake.open();
        let e = amd.engine_time_ns(0).unwrap_err().to_string();
        assert!(
            e.contains(why) && e.contains("recorded unattributed"),
            "{e}"
        );
        assert_eq!(
            amd.energy_count(0),
            Ok((65_536, EnergyUnit::PowTwoJoule(16)))
        );
    }
}

/// Through the collector: AMD GPUs are meters 2000 and 2001 with source `amd_smi`, their usage
/// is engine time, and an interval's energy is the accumulator's difference in its unit.
#[test]
fn the_collector_measures_amd_gpus_as_meters_of_their_own() {
    let fake = Fake::build(25, &[]);
    fake.set([1_000_000, 0], &[(0, 1, 10)], false);
    let amd = fake.open();
    let root = tempfile::tempdir().unwrap();
    let opts = GpuOptions::new(HostRoot::new(root.path()));
    let p = probe_gpus(GpuVendor::Amd, Ok(Box::new(amd)), &opts, 0);
    let r = &p.report;
    assert!(r.available, "{r:?}");
    let idx: Vec<u32> = r.devices.iter().map(|d| d.index).collect();
    assert_eq!(idx, vec![AMD_INDEX_BASE, AMD_INDEX_BASE + 1]);
    assert_eq!(r.devices[0].source, Some(SourceKind::AmdSmi));
    assert!(r.devices[0].usage.contains("engine time"), "{r:?}");
    // Three GPUs on the bus bound to amdgpu, two measured: a warning (never an error: an
    // APU's own GPU is one), the capability warning kept after it, one unmeasured.
    let mut checked = p.report.clone();
    checked.problem = Some("(the capability warning)".into());
    checked.check_present_amd(
        ["0000:05:00.0", "0000:c1:00.0", "0000:c2:00.0"]
            .iter()
            .map(|a| PciGpu {
                address: (*a).into(),
                driver: Some("amdgpu".into()),
            })
            .collect(),
    );
    let problem = checked.problem.clone().unwrap();
    assert!(
        problem.starts_with("3 AMD GPU(s) bound to the amdgpu driver")
            && problem.contains("the energy of 1 is not billed")
            && problem.ends_with("(the capability warning)"),
        "{problem}"
    );
    assert!(!checked.problem_is_error);
    assert_eq!(checked.unmeasured(), 1);
    let mut c = p.collector.unwrap();
    // 10 J on GPU 0 (65,536 counts a joule), 1 J on GPU 1; pid 1 +2 ms.
    fake.set([1_000_000 + 655_360, 65_536], &[(0, 1, 2_000_010)], false);
    let obs = c.close(1_000_000, false);
    assert_eq!(obs.len(), 2);
    assert_eq!(obs[0].gpu, AMD_INDEX_BASE);
    assert_eq!(obs[0].key.package, Some(AMD_INDEX_BASE));
    assert_eq!(obs[0].source, SourceKind::AmdSmi);
    let delta = |o: &wattd_collectors::nvml::GpuObservation| match o.sample {
        Ok(wattd_collectors::CounterSample::Energy { energy_uj, .. }) => energy_uj,
        ref other => panic!("{other:?}"),
    };
    assert_eq!(delta(&obs[0]), 10_000_000);
    assert_eq!(delta(&obs[1]), 1_000_000);
    assert!(obs[0].activity.engine_time);
    assert_eq!(
        obs[0].activity.sm_busy_us.as_ref().unwrap().get(&1),
        Some(&2_000)
    );
}

/// A library older than 23.2 (no `amdsmi_get_lib_version`: the pre-release API, other status
/// codes and argument order) is refused at open, by name; so is an unrelated library.
#[test]
fn a_library_without_the_version_call_is_refused_by_name() {
    let fake = Fake::build(24, &["NO_VERSION"]);
    let e = RealAmdSmi::open(Some(fake.lib.as_os_str()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("amdsmi_get_lib_version") && e.contains("older than 23.2"),
        "{e}"
    );
    let e = RealAmdSmi::open(Some(std::ffi::OsStr::new("libc.so.6"))).unwrap_err();
    assert!(e.to_string().contains("amdsmi_init"), "{e}");
}

/// A list that grew past the buffer while the library filled it, answered SUCCESS with the
/// whole count: asked again, every entry read.
#[test]
fn a_list_longer_than_the_buffer_is_read_again_whatever_the_status() {
    let fake = Fake::build(25, &[]);
    let procs: Vec<(u32, u32, u64)> = (0..300u32).map(|i| (0, 5000 + i, u64::from(i))).collect();
    let mut state = procs.clone();
    state.push((1, 1, 1));
    fake.set([1, 1], &state, false);
    std::fs::write(
        &fake.state,
        std::fs::read_to_string(&fake.state).unwrap() + "grow\n",
    )
    .unwrap();
    let got = fake.open().engine_time_ns(0).unwrap();
    assert_eq!(got.len(), 300);
    assert_eq!(
        got[299],
        EngineTime {
            pid: 5299,
            gfx_ns: 299
        }
    );
}
