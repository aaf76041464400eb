//! Issue 14's fault matrix: the real `wattd` on the simulated host streaming to the real
//! `wattd-ledger` (SQLite, and PostgreSQL where `WATTD_TEST_POSTGRES` is set) through ordinary
//! faults, each with a SIGKILL of the agent in the middle:
//!
//! (a) the smallest accepted `spool.max_bytes` turning over at least five times at 20 Hz;
//! (b) a bit flipped in a sealed, unacknowledged record in the middle of the spool;
//! (c) the ledger's database restored from a backup taken many batches earlier;
//! (d) the spool's file system (a small tmpfs) filling during a ledger outage.
//!
//! In every case the ledger ends at the agent's last sealed seq with no hole and no fork, and
//! its audit holds: the energy of the stored batches plus the energy of the ranges the node
//! declared lost equals the node's own running total, per meter, to the microjoule; and that
//! total is the one in the agent's last batch.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use prost::Message as _;
use wattd_tests::cgroups::require_cgroups;

use crate::harness::{burn_bin, runs_json, wattd, Agent};
use crate::ledger::{
    ledger_bin, postgres_available, psql, stop_agent_cleanly, totals, World, NODE,
};

/// Every batch of the agent's spool that `wattd export` can read, by seq.
fn exported(spool: &Path) -> BTreeMap<u64, wattd_proto::v1::Batch> {
    let out = wattd(&["export", "--data-dir", spool.to_str().unwrap()]);
    let mut buf = out.stdout.as_slice();
    let mut all = BTreeMap::new();
    while !buf.is_empty() {
        let signed = wattd_proto::v1::SignedBatch::decode_length_delimited(&mut buf)
            .expect("export writes length-delimited SignedBatch");
        let b = wattd_proto::v1::Batch::decode(signed.batch_bytes.as_slice()).unwrap();
        all.insert(b.seq, b);
    }
    all
}

fn meter_label(domain: &str, package: Option<u32>, die: Option<u32>) -> String {
    let mut s = domain.to_owned();
    if let Some(p) = package {
        s.push_str(&format!(":{p}"));
    }
    if let Some(d) = die {
        s.push_str(&format!(":die{d}"));
    }
    s
}

/// The agent's last sealed seq, the seq its totals count from, and its running totals per
/// meter (what the node measured).
fn agent_truth(spool: &Path) -> (u64, u64, BTreeMap<String, u64>) {
    let all = exported(spool);
    let (seq, last) = all
        .last_key_value()
        .expect("the spool holds its last batch");
    let totals = last
        .running_totals
        .iter()
        .map(|t| (meter_label(&t.domain, t.package, t.die), t.measured_uj))
        .collect();
    (*seq, last.totals_since_seq, totals)
}

fn node(w: &World) -> serde_json::Value {
    let nodes = w.ledger_json("nodes");
    nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node_id"] == NODE)
        .cloned()
        .unwrap_or(serde_json::Value::Null)
}

fn wait_until(w: &World, what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < limit,
            "{what}: not within {limit:?}\n{}",
            w.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// After the agent stopped cleanly: the ledger's chain ends at the agent's last sealed seq
/// with no hole and no fork, it holds `lost` declared ranges (each priced exactly), and its
/// audit adds up to the agent's own running totals.
fn check_conserved(w: &World, lost: usize) -> serde_json::Value {
    let (sealed, since, truth) = agent_truth(&w.spool);
    let n = node(w);
    assert_eq!(n["last_seq"].as_u64(), Some(sealed), "{n}\n{}", w.logs());
    assert_eq!(n["gaps"].as_array().map(Vec::len), Some(0), "{n}");
    assert_eq!(n["forks"].as_array().map(Vec::len), Some(0), "{n}");
    // Every fault here is an honest one: nothing implausible, every hole in the node's clock
    // declared (a gap record or a lost range).
    assert_eq!(n["implausible"].as_u64(), Some(0), "{n}\n{}", w.logs());
    assert_eq!(n["quarantined"].as_array().map(Vec::len), Some(0), "{n}");
    assert_eq!(n["undeclared_holes"].as_u64(), Some(0), "{n}\n{}", w.logs());
    let lost_ranges = n["lost"].as_array().unwrap();
    assert_eq!(lost_ranges.len(), lost, "{n}");
    for l in lost_ranges {
        assert_eq!(l["energy"], "exact", "{l}");
    }
    let out = Command::new(ledger_bin())
        .args(["audit", "--store", &w.store, "--format", "json"])
        .output()
        .unwrap();
    let audit: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        out.status.success(),
        "wattd-ledger audit: {audit}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let a = audit["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node_id"] == NODE)
        .unwrap();
    assert_eq!(a["conserved"], true, "{a}");
    assert_eq!(a["totals_since_seq"].as_u64(), Some(since), "{a}");
    let meters = a["meters"].as_object().unwrap();
    let ledger_total: BTreeMap<String, u64> = meters
        .iter()
        .map(|(m, v)| (m.clone(), v["node_total_uj"].as_u64().unwrap()))
        .filter(|(_, v)| *v != 0)
        .collect();
    let truth: BTreeMap<String, u64> = truth.into_iter().filter(|(_, v)| *v != 0).collect();
    assert_eq!(
        ledger_total, truth,
        "the ledger's node total vs the agent's"
    );
    for (m, v) in meters {
        let stored = v["stored_uj"].as_u64().unwrap();
        let lost = v["lost_uj"].as_u64().unwrap();
        assert_eq!(stored + lost, truth[m.as_str()], "{m}: {v}");
    }
    n
}

fn sigkill(agent: &mut Agent) {
    let mut child = agent.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
}

/// The log of an agent that is SIGKILLed later (the restarted one logs to `agent_log`).
fn first_log(w: &World) -> PathBuf {
    w.work.path().join("wattd-killed.log")
}

fn agent_log_has(w: &World, text: &str) -> bool {
    [w.agent_log(), first_log(w)].iter().any(|p| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .contains(text)
    })
}

/// Start `n` light runs (`run-<prefix><i>`), each burning `duty` of a CPU for `secs`.
fn runs(w: &mut World, prefix: &str, n: usize, duty: f64, secs: u64) {
    for i in 0..n {
        w.cg.spawn_in(
            &format!("run-{prefix}{i}.scope"),
            Command::new(burn_bin()).args([&duty.to_string(), &secs.to_string()]),
        )
        .unwrap();
    }
}

/// (b) A bit flipped in a sealed record the ledger has not acknowledged yet, in the middle of
/// the spool, with the agent SIGKILLed and restarted over the damage: the shipper declares the
/// damaged batch lost in a signed statement, the ledger records it as a lost range priced from
/// the running totals around it, and reaches the last sealed seq within 30 s.
fn damaged_record(postgres: bool, name: &str) {
    let Some(mount) = require_cgroups(name) else {
        return;
    };
    let mut w = World::new(mount, if postgres { "b_pg" } else { "b_sqlite" }, postgres);
    let mut ledger = w.ledger("127.0.0.1:0");
    let listen = ledger.listen;
    let config = w.agent_config_with(listen, 200, 200, "");
    let mut agent = Agent::start(&config, &first_log(&w));
    runs(&mut w, "b", 2, 0.3, 14);
    wait_until(
        &w,
        "first batches acknowledged",
        Duration::from_secs(20),
        || w.agent_acked() >= 3,
    );
    ledger.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_secs(4));
    let acked = w.agent_acked();
    // The record to damage: sealed, unacknowledged, with intact batches after it.
    let segs: Vec<PathBuf> = std::fs::read_dir(&w.spool)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "wseg"))
        .collect();
    let seg = segs.iter().max().unwrap();
    let bytes = std::fs::read(seg).unwrap();
    let scan = wattd_records::segment::frame::scan_segment(bytes.clone());
    let records: Vec<(u64, std::ops::Range<usize>)> = scan
        .items
        .iter()
        .filter_map(|i| match i {
            wattd_records::segment::frame::ScanItem::Record { payload, .. } => {
                let (b, _) =
                    wattd_records::batch::StoredBatch::from_bytes(bytes[payload.clone()].to_vec())
                        .ok()?;
                Some((b.seq, payload.clone()))
            }
            _ => None,
        })
        .collect();
    let candidates: Vec<_> = records.iter().filter(|(s, _)| *s > acked + 1).collect();
    assert!(
        candidates.len() >= 4,
        "unacknowledged batches: {candidates:?}"
    );
    let (victim, range) = candidates[candidates.len() / 2].clone();
    {
        use std::os::unix::fs::FileExt as _;
        let f = std::fs::OpenOptions::new().write(true).open(seg).unwrap();
        let at = range.start + range.len() / 2;
        f.write_all_at(&[bytes[at] ^ 0x04], at as u64).unwrap();
    }
    // A SIGKILL over the damage: the restart keeps it in place (it is not the tail).
    sigkill(&mut agent);
    let mut agent = Agent::start(&config, &w.agent_log());
    std::thread::sleep(Duration::from_secs(1));
    let _ledger = w.ledger(&listen.to_string());
    let started = Instant::now();
    wait_until(
        &w,
        "the ledger reaches the sealed seq",
        Duration::from_secs(30),
        || node(&w)["last_seq"].as_u64().unwrap_or(0) > victim + 3,
    );
    let passed = started.elapsed();
    eprintln!("damaged seq {victim}: the ledger passed it {passed:?} after it came back");
    // No stall beyond the reconnect backoff (backoff_max_s = 1 here) and a heartbeat period,
    // with room for a loaded CI machine.
    assert!(
        passed < Duration::from_secs(10),
        "stalled {passed:?}\n{}",
        w.logs()
    );
    w.cg.wait_all();
    stop_agent_cleanly(&w, &mut agent);
    let n = check_conserved(&w, 1);
    let l = &n["lost"][0];
    assert_eq!(
        (
            l["first_seq"].as_u64(),
            l["last_seq"].as_u64(),
            l["reason"].as_str()
        ),
        (Some(victim), Some(victim), Some("damaged")),
        "{n}"
    );
    assert!(l["energy_uj"].as_u64().unwrap() > 0, "{l}");
    // Per run: exact once the checkpoint after the range (every 60th seq) is stored; the runs'
    // shares never exceed the meter's lost energy (the host has the rest).
    match l["runs"].as_str() {
        Some("exact") => {
            for (meter, lost) in l["energy_by_meter"].as_object().unwrap() {
                let runs: u64 = l["energy_by_run"]
                    .as_object()
                    .unwrap()
                    .values()
                    .filter_map(|m| m[meter].as_u64())
                    .sum();
                assert!(runs <= lost.as_u64().unwrap(), "{meter}: {l}");
            }
        }
        Some("pending") => {}
        // Here the agent was SIGKILLed over the damage before the first checkpoint: its restart
        // cannot read the damaged batch back, so its per-run counts start again, and the split
        // is refused, saying so (the meter's energy above is still exact).
        Some("unknown")
            if l["runs_error"]
                .as_str()
                .is_some_and(|e| e.contains("per-run counts restarted")) => {}
        other => panic!("per-run pricing {other:?}: {l}"),
    }
    assert!(agent_log_has(&w, "declaring batches lost"), "{}", w.logs());
    // The spool's own verifier names the damage too.
    let v = wattd(&["verify", "--data-dir", w.spool.to_str().unwrap()]);
    assert!(!v.status.success(), "wattd verify must report the damage");
    // Billing: per run, the ledger holds what the agent's intact records hold.
    assert_eq!(totals(&w.ledger_json("runs")), totals(&runs_json(&w.spool)));
}

#[test]
fn b_a_damaged_middle_record_is_declared_and_billing_goes_on() {
    damaged_record(
        false,
        "b_a_damaged_middle_record_is_declared_and_billing_goes_on",
    );
}

#[test]
fn b_a_damaged_middle_record_is_declared_and_billing_goes_on_postgres() {
    let name = "b_a_damaged_middle_record_is_declared_and_billing_goes_on_postgres";
    if postgres_available(name) {
        damaged_record(true, name);
    }
}

/// A backup of the ledger's database taken while it serves, with the tool an operator uses:
/// `pg_dump -Fc` for PostgreSQL, `wattd-ledger backup` (SQLite's `VACUUM INTO`, checked) for
/// SQLite. Returns the file.
fn backup(w: &World) -> PathBuf {
    let file = w.work.path().join("ledger.backup");
    let out = match &w.pg_db {
        Some(_) => Command::new("pg_dump")
            .args(["-Fc", "-f", file.to_str().unwrap(), &w.store])
            .output()
            .expect("pg_dump (Debian's postgresql-client)"),
        None => Command::new(ledger_bin())
            .args([
                "backup",
                "--store",
                &w.store,
                "--to",
                file.to_str().unwrap(),
            ])
            .output()
            .unwrap(),
    };
    assert!(
        out.status.success(),
        "backup: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if w.pg_db.is_none() {
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.contains("integrity check ok"), "{said}");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the backup is billing data: mode {mode:o}");
    }
    file
}

/// Puts the backup in place of the ledger's database (the ledger is stopped): `pg_restore`
/// into the database dropped and made again, or the SQLite file replaced (its -wal and -shm
/// removed). Then `wattd-ledger audit` of the restored ledger must be clean.
fn restore(w: &World, file: &Path) {
    match &w.pg_db {
        Some((base, db)) => {
            psql(base, &format!("DROP DATABASE {db} WITH (FORCE)"));
            psql(base, &format!("CREATE DATABASE {db}"));
            let out = Command::new("pg_restore")
                .args(["--exit-on-error", "-d", &w.store, file.to_str().unwrap()])
                .output()
                .expect("pg_restore (Debian's postgresql-client)");
            assert!(
                out.status.success(),
                "pg_restore: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        None => {
            let db = PathBuf::from(w.store.trim_start_matches("sqlite:"));
            for ext in ["-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{ext}", db.display()));
            }
            std::fs::copy(file, &db).unwrap();
        }
    }
    let out = Command::new(ledger_bin())
        .args(["audit", "--store", &w.store])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "audit of the restored ledger: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// (c) The restore drill: the ledger's database backed up while it serves (`pg_dump`, or
/// `wattd-ledger backup`), restored many batches later (`pg_restore`, or the file put back),
/// `audit` clean on the restored ledger, then a SIGKILL of the ledger during the catch-up and
/// one of the agent: the node's spool retains what it sent (`retain_acked_s`), so the ledger
/// catches up completely, with no lost range, and `audit` is clean again.
fn restored_ledger(postgres: bool, name: &str) {
    let Some(mount) = require_cgroups(name) else {
        return;
    };
    let mut w = World::new(mount, if postgres { "c_pg" } else { "c_sqlite" }, postgres);
    let mut ledger = w.ledger("127.0.0.1:0");
    let listen = ledger.listen;
    let config = w.agent_config_with(listen, 50, 200, "");
    let mut agent = Agent::start(&config, &first_log(&w));
    runs(&mut w, "c", 2, 0.3, 16);
    wait_until(
        &w,
        "first batches acknowledged",
        Duration::from_secs(20),
        || w.agent_acked() >= 2,
    );
    // Online: the agent streams and the ledger stores while the backup is taken.
    let before = w.agent_acked();
    let bak = backup(&w);
    let after = w.agent_acked();
    wait_until(
        &w,
        "more batches acknowledged",
        Duration::from_secs(30),
        || w.agent_acked() >= after + 15,
    );
    ledger.signal(libc::SIGTERM);
    let ahead = node(&w)["last_seq"].as_u64().unwrap_or(0);
    restore(&w, &bak);
    let at_backup = node(&w)["last_seq"].as_u64().unwrap_or(0);
    assert!(
        (before..ahead).contains(&at_backup),
        "restored to seq {at_backup}: the backup was taken between seqs {before} and {after}, \
         the ledger was at {ahead}"
    );
    eprintln!("ledger restored from seq {ahead} to the backup's seq {at_backup}");
    let mut ledger = w.ledger(&listen.to_string());
    std::thread::sleep(Duration::from_millis(700));
    ledger.signal(libc::SIGKILL);
    sigkill(&mut agent);
    let mut agent = Agent::start(&config, &w.agent_log());
    let _ledger = w.ledger(&listen.to_string());
    w.cg.wait_all();
    let sealed_now = agent_truth(&w.spool).0;
    wait_until(
        &w,
        "the restored ledger catches up",
        Duration::from_secs(60),
        || node(&w)["last_seq"].as_u64().unwrap_or(0) >= sealed_now,
    );
    stop_agent_cleanly(&w, &mut agent);
    let n = check_conserved(&w, 0);
    assert_eq!(n["batches"], n["last_seq"], "every batch stored: {n}");
    assert!(agent_log_has(&w, "re-sending from seq"), "{}", w.logs());
    assert_eq!(totals(&w.ledger_json("runs")), totals(&runs_json(&w.spool)));
}

#[test]
fn c_a_ledger_restored_from_an_old_backup_catches_up_completely() {
    restored_ledger(
        false,
        "c_a_ledger_restored_from_an_old_backup_catches_up_completely",
    );
}

#[test]
fn c_a_ledger_restored_from_an_old_backup_catches_up_completely_postgres() {
    let name = "c_a_ledger_restored_from_an_old_backup_catches_up_completely_postgres";
    if postgres_available(name) {
        restored_ledger(true, name);
    }
}

/// (a) The smallest accepted `spool.max_bytes` (1 MiB) at 20 Hz, until the spool has turned
/// over at least five times (`WATTD_FAULT_TURNOVERS`, default 5), with a SIGKILL of the agent
/// on the way: no interval is coarsened while acknowledgements flow, and the ledger reaches
/// the last sealed seq.
#[test]
fn a_the_smallest_spool_turns_over_without_coarsening() {
    smallest_spool(false, "a_the_smallest_spool_turns_over_without_coarsening");
}

#[test]
fn a_the_smallest_spool_turns_over_without_coarsening_postgres() {
    let name = "a_the_smallest_spool_turns_over_without_coarsening_postgres";
    if postgres_available(name) {
        smallest_spool(true, name);
    }
}

fn smallest_spool(postgres: bool, name: &str) {
    let Some(mount) = require_cgroups(name) else {
        return;
    };
    let turnovers: usize = std::env::var("WATTD_FAULT_TURNOVERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let mut w = World::new(mount, if postgres { "a_pg" } else { "a_sqlite" }, postgres);
    let ledger = w.ledger("127.0.0.1:0");
    let config = w.agent_config_with(ledger.listen, 400, 50, "max_bytes = 1048576\n");
    let mut agent = Agent::start(&config, &first_log(&w));
    // Many light runs: bigger batches, so the spool turns over sooner.
    runs(&mut w, "a", 48, 0.01, 600);
    // Segments are an eighth of the limit: eight distinct segments are one turnover.
    let mut seen = BTreeSet::new();
    let t = Instant::now();
    let mut killed = false;
    while seen.len() < 8 * turnovers + 1 {
        for e in std::fs::read_dir(&w.spool).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".wseg") {
                seen.insert(name);
            }
        }
        if !killed && seen.len() > 8 * turnovers / 2 {
            sigkill(&mut agent);
            agent = Agent::start(&config, &w.agent_log());
            killed = true;
        }
        assert!(
            t.elapsed() < Duration::from_secs(900),
            "only {} segments in 15 minutes\n{}",
            seen.len(),
            w.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "{} segments of 128 KiB through a 1 MiB spool in {:?}",
        seen.len(),
        t.elapsed()
    );
    // Stop the runs' load from growing the test: they end with the test's cgroups.
    stop_agent_cleanly(&w, &mut agent);
    assert!(
        !agent_log_has(&w, "spool full"),
        "an interval was coarsened while acknowledgements flowed\n{}",
        w.logs()
    );
    check_conserved(&w, 0);
    drop(ledger);
}

/// (d) The spool on a small tmpfs that fills during a ledger outage (`WATTD_LEDGER_OUTAGE_S`,
/// default 60 s): the batch that meets ENOSPC takes the reserve's room, later intervals are
/// coarsened (with a SPOOL_FULL gap), and when the ledger is back every sealed batch,
/// coarsened ones included, reaches it; SIGTERM exits 0.
#[test]
fn d_a_spool_whose_file_system_fills_during_an_outage_loses_nothing() {
    full_file_system(
        false,
        "d_a_spool_whose_file_system_fills_during_an_outage_loses_nothing",
    );
}

#[test]
fn d_a_spool_whose_file_system_fills_during_an_outage_loses_nothing_postgres() {
    let name = "d_a_spool_whose_file_system_fills_during_an_outage_loses_nothing_postgres";
    if postgres_available(name) {
        full_file_system(true, name);
    }
}

fn full_file_system(postgres: bool, name: &str) {
    let Some(mount) = require_cgroups(name) else {
        return;
    };
    if !wattd_testkit::is_root() {
        wattd_testkit::skip(name, "root (to mount a small tmpfs that really fills)");
        return;
    }
    let outage_s: u64 = std::env::var("WATTD_LEDGER_OUTAGE_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let fs = tempfile::tempdir().unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=448k", "wattd-e2e"])
        .arg(fs.path())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        wattd_testkit::skip(name, "mount(8) of a tmpfs");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(fs.path().to_owned());
    let spool = fs.path().join("spool");
    let mut w = World::with_spool(
        mount,
        if postgres { "d_pg" } else { "d_sqlite" },
        postgres,
        Some(spool),
    );
    let mut ledger = w.ledger("127.0.0.1:0");
    let listen = ledger.listen;
    let config = w.agent_config_with(listen, 400, 50, "max_bytes = 2097152\n");
    let mut agent = Agent::start(&config, &first_log(&w));
    runs(&mut w, "d", 16, 0.03, outage_s + 40);
    wait_until(
        &w,
        "first batches acknowledged",
        Duration::from_secs(20),
        || w.agent_acked() >= 2,
    );
    ledger.signal(libc::SIGTERM);
    let t = Instant::now();
    let mut full_at = None;
    while t.elapsed() < Duration::from_secs(outage_s) {
        if full_at.is_none() && agent_log_has(&w, "spool full: interval merged") {
            full_at = Some(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let full_at = full_at.unwrap_or_else(|| {
        panic!(
            "the 448 KiB file system did not fill in a {outage_s} s outage\n{}",
            std::fs::read_to_string(first_log(&w)).unwrap_or_default()
        )
    });
    eprintln!("the spool's file system filled {full_at:?} into the outage");
    // A SIGKILL on the full disk (the coarsened intervals in memory go with it: their time is
    // the restart's AGENT_DOWN gap), and a restart that must come up on it.
    sigkill(&mut agent);
    let mut agent = Agent::start(&config, &w.agent_log());
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        agent.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "the agent did not come up on a full disk\n{}",
        w.logs()
    );
    let _ledger = w.ledger(&listen.to_string());
    w.cg.wait_all();
    stop_agent_cleanly(&w, &mut agent);
    check_conserved(&w, 0);
    let coarsened = exported(&w.spool)
        .values()
        .flat_map(|b| b.intervals.iter())
        .filter(|i| i.coarsened)
        .count();
    eprintln!("{coarsened} coarsened interval(s) still in the spool");
}

/// Scheduled key rotation (`[identity] rotate_after_s = 10`) through a run of
/// `WATTD_ROTATION_RUN_S` seconds (default 36) with two SIGKILLs: every rotation is announced
/// in the chain by the old key, the ledger follows each (its chain ends at a later epoch), the
/// agent's spool verifies with every key, and the audit adds up.
#[test]
fn keys_rotate_on_schedule_through_sigkills_and_the_ledger_follows() {
    let name = "keys_rotate_on_schedule_through_sigkills_and_the_ledger_follows";
    let Some(mount) = require_cgroups(name) else {
        return;
    };
    // The full run: WATTD_ROTATION_RUN_S=300 WATTD_ROTATION_EVERY_S=30.
    let env = |k: &str, d: u64| -> u64 {
        std::env::var(k)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(d)
    };
    let run_s = env("WATTD_ROTATION_RUN_S", 36);
    let every_s = env("WATTD_ROTATION_EVERY_S", 10);
    let mut w = World::new(mount, "rotate", false);
    let ledger = w.ledger("127.0.0.1:0");
    let config = w.agent_config_more(
        ledger.listen,
        200,
        200,
        "",
        &format!("[identity]\nrotate_after_s = {every_s}\n"),
    );
    runs(&mut w, "k", 2, 0.2, run_s + 5);
    // Three SIGKILLs, at a quarter, a half and three quarters of the run.
    let quarter = Duration::from_secs(run_s / 4);
    for _ in 0..3 {
        let mut agent = Agent::start(&config, &first_log(&w));
        std::thread::sleep(quarter);
        sigkill(&mut agent);
    }
    let mut agent = Agent::start(&config, &w.agent_log());
    std::thread::sleep(quarter);
    stop_agent_cleanly(&w, &mut agent);
    let n = check_conserved(&w, 0);
    let epoch = n["key_epoch"].as_u64().unwrap_or(0);
    eprintln!(
        "{run_s} s with rotate_after_s = {every_s} and 3 SIGKILLs: the ledger's chain ends at \
         key epoch {epoch}, {} batches",
        n["last_seq"]
    );
    let expected = (run_s / every_s).saturating_sub(2).max(2);
    assert!(
        epoch > expected,
        "at least {expected} rotations followed: {n}"
    );
    let v = wattd(&["verify", "--data-dir", w.spool.to_str().unwrap()]);
    assert!(
        v.status.success(),
        "wattd verify across the key epochs: {}",
        String::from_utf8_lossy(&v.stdout)
    );
    drop(ledger);
}
