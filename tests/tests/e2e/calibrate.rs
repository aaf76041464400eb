//! `wattd calibrate` on the simulated host recovers the power model it was built with.

use std::time::Duration;

use wattd_tests::cgroups::require_cgroups;
use wattd_tests::simhost::{PowerModel, SimHost};

use crate::harness::wattd;

/// A simulated host with the given model, the real cgroup mount linked in, and its config.
fn sim(mount: &std::path::Path, idle_w: f64, busy_w: f64) -> (SimHost, std::path::PathBuf) {
    let sim = SimHost::start(
        PowerModel {
            idle_w,
            busy_w_per_cpu: busy_w,
        },
        1_000_000_000_000,
        Duration::from_millis(5),
    )
    .unwrap();
    sim.link_cgroup_mount(mount).unwrap();
    let config = sim
        .config(&format!(
            "cgroup_root = {:?}\n",
            mount.display().to_string()
        ))
        .unwrap();
    (sim, config)
}

#[test]
fn calibrate_recovers_the_simulated_model_within_5_percent() {
    let Some(mount) = require_cgroups("calibrate_recovers_the_simulated_model_within_5_percent")
    else {
        return;
    };
    // The fit needs the load levels to change the host's busy time: on a machine whose CPUs are
    // all taken by something else (found by scripts/stress-suite) no calibration can be valid,
    // and `wattd calibrate` rightly fails ("the load levels did not change its busy time").
    let idle = wattd_testkit::need::idle_cpus(Duration::from_millis(500)).unwrap_or(0.0);
    if idle < 1.0 {
        wattd_testkit::skip(
            "calibrate_recovers_the_simulated_model_within_5_percent",
            format!("a CPU left idle to load (this machine has {idle:.2})"),
        );
        return;
    }
    let (idle_w, busy_w) = (12.0, 18.0);
    let (_sim, config) = sim(&mount, idle_w, busy_w);
    // Other end-to-end tests may be running: the busy-host refusal is relaxed here, the fit does
    // not need an idle host because the model follows the total busy time it measures.
    let out = wattd(&[
        "calibrate",
        "--config",
        config.to_str().unwrap(),
        "--seconds-per-step",
        "1.5",
        "--max-idle-busy",
        "2.0",
        "--format",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fits: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let f = &fits[0];
    let (got_idle, got_busy) = (
        f["idle_watts"].as_f64().unwrap(),
        f["watts_per_busy_cpu"].as_f64().unwrap(),
    );
    eprintln!("fit: idle {got_idle:.3} W (model {idle_w}), {got_busy:.3} W per busy CPU (model {busy_w}), R^2 {}", f["r_squared"]);
    assert!(
        (got_idle - idle_w).abs() / idle_w < 0.05,
        "idle {got_idle} vs {idle_w}"
    );
    assert!(
        (got_busy - busy_w).abs() / busy_w < 0.05,
        "per CPU {got_busy} vs {busy_w}"
    );
    // Its burners' cgroup is gone.
    assert!(!std::fs::read_dir(&mount).unwrap().flatten().any(|e| e
        .file_name()
        .to_string_lossy()
        .starts_with("wattd-calibrate-")));
}

#[test]
fn calibrate_refuses_a_busy_host() {
    let Some(mount) = require_cgroups("calibrate_refuses_a_busy_host") else {
        return;
    };
    let (_sim, config) = sim(&mount, 10.0, 10.0);
    // A negative allowance: any host is "too busy".
    let out = wattd(&[
        "calibrate",
        "--config",
        config.to_str().unwrap(),
        "--seconds-per-step",
        "0.3",
        "--max-idle-busy=-1",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("too busy to calibrate"), "{err}");
}
