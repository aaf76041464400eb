//! Issue 4's proof: the real `wattd run` on the simulated host, runs of known CPU use in real
//! cgroups, attributed energy checked against the power model's truth.

use std::process::Command;
use std::time::Duration;

use wattd_tests::cgroups::{require_cgroups, TestCgroups};
use wattd_tests::simhost::{PowerModel, SimHost};

use crate::harness::{
    agent_config, assert_verifies, burn_bin, run_energy, runs_json, wattd, Agent,
};

const IDLE_W: f64 = 10.0;
const BUSY_W: f64 = 20.0;

#[test]
fn simulated_host_attribution_matches_the_model() {
    attribution("simulated_host_attribution_matches_the_model", false);
}

/// The same, with each run's cgroup removed the moment its process is reaped (as systemd
/// removes a transient scope): the runs' tails come from their parent, and the model still
/// holds to the same bounds.
#[test]
fn simulated_host_attribution_matches_the_model_with_cgroups_removed_at_once() {
    attribution(
        "simulated_host_attribution_matches_the_model_with_cgroups_removed_at_once",
        true,
    );
}

fn attribution(test: &str, removed_at_once: bool) {
    let Some(mount) = require_cgroups(test) else {
        return;
    };
    let mut cg = TestCgroups::new(&mount, "simhost").unwrap();
    // 30 J range: at 10-50 W the counter wraps every second or so.
    let mut sim = SimHost::start(
        PowerModel {
            idle_w: IDLE_W,
            busy_w_per_cpu: BUSY_W,
        },
        30_000_000,
        Duration::from_millis(10),
    )
    .unwrap();
    sim.link_cgroup_mount(&mount).unwrap();
    let work = tempfile::tempdir().unwrap();
    let (config, spool) = agent_config(
        &sim,
        &mount,
        &cg,
        work.path(),
        500,
        &format!("[attribution]\nidle_policy = \"host\"\nidle_watts_package = {IDLE_W}\n"),
    );
    let truth_before = sim.truth();
    let mut agent = Agent::start(&config, &work.path().join("wattd.log"));
    std::thread::sleep(Duration::from_millis(1500));

    // Two long runs of different intensity, and a 300 ms one.
    let burn = burn_bin();
    cg.spawn_in("run-a.scope", Command::new(&burn).args(["0.25", "3"]))
        .unwrap();
    cg.spawn_in("run-b.scope", Command::new(&burn).args(["0.75", "3"]))
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    cg.spawn_in("run-s.scope", Command::new(&burn).args(["1.0", "0.3"]))
        .unwrap();
    let usage: std::collections::BTreeMap<String, u64> = if removed_at_once {
        cg.wait_all_removing_each().unwrap().into_iter().collect()
    } else {
        cg.wait_all();
        ["run-a.scope", "run-b.scope", "run-s.scope"]
            .into_iter()
            .map(|r| (r.to_owned(), cg.usage_usec(r).unwrap()))
            .collect()
    };
    let (ua, ub, us) = (
        usage["run-a.scope"],
        usage["run-b.scope"],
        usage["run-s.scope"],
    );
    std::thread::sleep(Duration::from_millis(1500));
    let (status, took) = agent.stop();
    let truth_after = sim.truth();
    sim.stop();
    let log = std::fs::read_to_string(work.path().join("wattd.log")).unwrap_or_default();
    assert!(status.success(), "wattd exited {status:?}\n{log}");
    assert!(took < Duration::from_secs(10), "SIGTERM took {took:?}");

    // Signatures, chain, sequence and per-interval conservation.
    assert_verifies(&spool);

    // Each run's energy against the model: busy watts x the CPU time the kernel counted.
    let runs = runs_json(&spool);
    let truth_uj = |usage_us: u64| (BUSY_W * usage_us as f64) as u64;
    let mut errors = Vec::new();
    for (id, u) in [("a", ua), ("b", ub)] {
        let got = run_energy(&runs, id, "package:0");
        let want = truth_uj(u);
        let err = (got as f64 - want as f64).abs() / want as f64;
        eprintln!(
            "run {id}: usage {u} us, attributed {got} uJ, model {want} uJ, error {:.2}%",
            err * 100.0
        );
        errors.push((id, got, want, err));
    }
    let _ = measured_total(&spool);
    // `wattd explain` reproduces `wattd runs` for every run, to the microjoule, domain by domain.
    for r in runs["runs"].as_array().unwrap() {
        let id = r["run_id"].as_str().unwrap();
        let out = wattd(&[
            "explain",
            id,
            "--format",
            "json",
            "--data-dir",
            spool.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "explain {id}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ex: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(ex["energy_uj"], r["energy_uj"], "run {id}");
        for d in r["domains"].as_array().unwrap() {
            let t = ex["totals"]
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["domain"] == d["domain"])
                .unwrap();
            assert_eq!(t["energy_uj"], d["energy_uj"], "run {id} {}", d["domain"]);
        }
        assert!(ex["rows"]
            .as_array()
            .unwrap()
            .iter()
            .all(|row| row["batch_seq"].as_u64().unwrap() > 0));
        // And how its last usage was obtained, from the same summary `wattd runs` reads.
        if let Some(how) = r.get("final_usage") {
            assert_eq!(&ex["finished"]["final_usage"], how, "run {id}: {ex}");
        }
    }
    crate::report::check_report(&spool, work.path());
    let got_s = run_energy(&runs, "s", "package:0");
    eprintln!(
        "run s (300 ms): usage {us} us, attributed {got_s} uJ, model {} uJ",
        truth_uj(us)
    );
    let err_s = (got_s as f64 - truth_uj(us) as f64).abs() / truth_uj(us) as f64;
    assert!(
        err_s < 0.10,
        "300 ms run: {got_s} uJ vs {} uJ ({:.1}%)",
        truth_uj(us),
        err_s * 100.0
    );

    // The counter wrapped during the test and no energy was lost to it: what the agent measured
    // over its life matches what the model put into the counter (within the agent's start and
    // stop moments, a fraction of a second; one lost wrap would be 30 J).
    for (id, got, want, err) in errors {
        assert!(
            err < 0.02,
            "run {id}: attributed {got} uJ vs model {want} uJ ({:.2}%)\n{log}",
            err * 100.0
        );
    }
    let wraps = truth_after.wraps.values().sum::<u32>();
    assert!(wraps >= 2, "the counter wrapped only {wraps} times");
    let produced: u128 = truth_after.energy_uj.values().sum::<u128>()
        - truth_before.energy_uj.values().sum::<u128>();
    let measured = measured_total(&spool);
    eprintln!(
        "model busy {} us over the agent's life",
        truth_after.busy_us.values().sum::<u128>() - truth_before.busy_us.values().sum::<u128>()
    );
    let diff = (measured as f64 - produced as f64).abs();
    eprintln!(
        "measured {measured} uJ, model produced {produced} uJ over the agent's life, {wraps} wraps"
    );
    assert!(
        diff < 12_000_000.0,
        "measured {measured} vs produced {produced}"
    );
}

/// Sum of every interval's measured package energy, from `wattd export`.
fn measured_total(spool: &std::path::Path) -> u128 {
    use prost::Message as _;
    let out = wattd(&["export", "--data-dir", spool.to_str().unwrap()]);
    assert!(out.status.success());
    let mut buf = out.stdout.as_slice();
    let mut total = 0u128;
    while !buf.is_empty() {
        let signed = wattd_proto::v1::SignedBatch::decode_length_delimited(&mut buf).unwrap();
        let batch = wattd_proto::v1::Batch::decode(signed.batch_bytes.as_slice()).unwrap();
        for i in &batch.intervals {
            for d in &i.domains {
                if d.domain == "package" {
                    total += d.measured_uj as u128;
                    if std::env::var_os("WATTD_E2E_DEBUG").is_some() {
                        let usage: u64 = d.allocations.iter().map(|a| a.usage_us).sum();
                        let act: u64 = d.allocations.iter().map(|a| a.active_uj).sum();
                        eprintln!(
                            "interval {} elapsed {} us measured {} host_active {} host_idle {} runs usage {} runs active {} host usage {}",
                            i.index,
                            (i.end_monotonic_ns - i.start_monotonic_ns) / 1000,
                            d.measured_uj,
                            d.host_active_uj,
                            d.host_idle_uj,
                            usage,
                            act,
                            d.host_usage
                        );
                    }
                }
            }
        }
    }
    total
}
