//! SIGHUP: a new run pattern takes effect without losing an interval.

use std::process::Command;
use std::time::Duration;

use prost::Message as _;
use wattd_proto::v1;
use wattd_tests::cgroups::{require_cgroups, TestCgroups};
use wattd_tests::simhost::{PowerModel, SimHost};

use crate::harness::{burn_bin, run_energy, runs_json, wattd, Agent};

#[test]
fn sighup_with_a_new_pattern_finds_new_runs_and_loses_no_interval() {
    let Some(mount) =
        require_cgroups("sighup_with_a_new_pattern_finds_new_runs_and_loses_no_interval")
    else {
        return;
    };
    let mut cg = TestCgroups::new(&mount, "reload").unwrap();
    let sim = SimHost::start(
        PowerModel {
            idle_w: 10.0,
            busy_w_per_cpu: 20.0,
        },
        50_000_000,
        Duration::from_millis(5),
    )
    .unwrap();
    sim.link_cgroup_mount(&mount).unwrap();
    let work = tempfile::tempdir().unwrap();
    let spool = work.path().join("spool");
    let rel = cg.rel().display().to_string();
    let write_config = |patterns: &[String]| {
        sim.config(&format!(
            "cgroup_root = {:?}\n[sampling]\ninterval_ms = 200\n[runs]\npatterns = {patterns:?}\ncontrol_socket = {:?}\n\
             [spool]\ndir = {:?}\n[metrics]\nlisten = \"127.0.0.1:0\"\n\
             [attribution]\nidle_policy = \"host\"\nidle_watts_package = 10.0\n",
            mount.display().to_string(),
            work.path().join("control.sock").display().to_string(),
            spool.display().to_string(),
        ))
        .unwrap()
    };
    let a = format!("{rel}/a-{{run_id}}.scope");
    let b = format!("{rel}/b-{{run_id}}.scope");
    let config = write_config(std::slice::from_ref(&a));
    let log = work.path().join("wattd.log");
    let mut agent = Agent::start(&config, &log);
    // A run only the new pattern matches, busy before and after the reload.
    cg.spawn_in("b-x.scope", Command::new(burn_bin()).args(["0.5", "2.5"]))
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    write_config(&[a, b]);
    let pid = agent.child.as_ref().unwrap().id() as i32;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    cg.wait_all();
    let used_us = cg.usage_usec("b-x.scope").unwrap();
    std::thread::sleep(Duration::from_millis(600));
    let (status, _) = agent.stop();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "{text}");
    assert!(text.contains("run patterns reloaded"), "{text}");

    let v = wattd(&["verify", "--data-dir", spool.to_str().unwrap()]);
    assert!(
        v.status.success(),
        "verify: {}",
        String::from_utf8_lossy(&v.stdout)
    );
    // Billed, but only for what it used after the reload (before, its CPU time was the host's):
    // with idle kept by the host, at most 20 W x its CPU time.
    let got = run_energy(&runs_json(&spool), "x", "package:0");
    let billing_ok = got > 0 && got < 20 * used_us;
    // No interval lost: the agent's intervals tile its whole life without a hole.
    let out = wattd(&["export", "--data-dir", spool.to_str().unwrap()]);
    let mut buf = out.stdout.as_slice();
    let mut intervals = Vec::new();
    while !buf.is_empty() {
        let signed = v1::SignedBatch::decode_length_delimited(&mut buf).unwrap();
        intervals.extend(
            v1::Batch::decode(signed.batch_bytes.as_slice())
                .unwrap()
                .intervals,
        );
    }
    intervals.sort_by_key(|i| i.index);
    for i in &intervals {
        for d in &i.domains {
            let x: Vec<_> = d
                .allocations
                .iter()
                .map(|a| (a.run_id.clone(), a.active_uj, a.idle_uj, a.usage_us))
                .collect();
            eprintln!("interval {} {}us measured {} host_active {} host_idle {} host_usage {} allocs {:?}", i.index, (i.end_monotonic_ns - i.start_monotonic_ns) / 1000, d.measured_uj, d.host_active_uj, d.host_idle_uj, d.host_usage, x);
        }
    }
    assert!(intervals.len() >= 5, "{} intervals", intervals.len());
    for w in intervals.windows(2) {
        assert_eq!(
            w[0].end_monotonic_ns, w[1].start_monotonic_ns,
            "hole after interval {}",
            w[0].index
        );
        assert_eq!(w[0].index + 1, w[1].index);
    }
    assert!(
        billing_ok,
        "billed {got} uJ for {used_us} us (at most 20 W x its CPU time)\n{text}"
    );
}
