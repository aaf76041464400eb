//! Issue 6's outage proofs: the real `wattd run` on the simulated host streams to the real
//! `wattd-ledger serve` over mutual TLS (a CA made at test time) while the ledger is stopped for
//! a minute, SIGKILLed mid-replay, or the agent is SIGKILLed mid-stream. Afterwards every batch
//! the agent sealed is in the ledger exactly once, with no gap and no fork, and the ledger's
//! per-run totals equal the agent's own `wattd runs`, to the microjoule.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use wattd_tests::cgroups::{require_cgroups, TestCgroups};
use wattd_tests::simhost::{PowerModel, SimHost};
use wattd_tests::tls::TestCa;

use crate::harness::{burn_bin, runs_json, wattd, wattd_bin, Agent};

pub(crate) const NODE: &str = "e2e-node";

pub(crate) fn ledger_bin() -> PathBuf {
    let p = wattd_bin().with_file_name("wattd-ledger");
    assert!(
        p.exists(),
        "{} is missing: cargo test --workspace builds it",
        p.display()
    );
    p
}

/// The ledger's side of the TLS and enrolment files.
pub(crate) struct LedgerFiles {
    cert: PathBuf,
    key: PathBuf,
    client_ca: PathBuf,
    enrolled: PathBuf,
}

/// A running `wattd-ledger serve`.
pub(crate) struct LedgerProc {
    child: Option<Child>,
    pub(crate) listen: SocketAddr,
}

impl LedgerProc {
    pub(crate) fn start(work: &Path, files: &LedgerFiles, store: &str, listen: &str) -> LedgerProc {
        let ready = work.join("ledger-ready.json");
        let _ = std::fs::remove_file(&ready);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(work.join("ledger.log"))
            .unwrap();
        let child = Command::new(ledger_bin())
            .arg("serve")
            .args(["--listen", listen, "--store", store])
            .arg("--cert")
            .arg(&files.cert)
            .arg("--key")
            .arg(&files.key)
            .arg("--client-ca")
            .arg(&files.client_ca)
            .arg("--enrolled")
            .arg(&files.enrolled)
            .arg("--ready-file")
            .arg(&ready)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut p = LedgerProc {
            child: Some(child),
            listen: "127.0.0.1:0".parse().unwrap(),
        };
        let t = Instant::now();
        loop {
            if let Ok(text) = std::fs::read_to_string(&ready) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                    p.listen = v["listen"].as_str().unwrap().parse().unwrap();
                    return p;
                }
            }
            if let Some(status) = p.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "wattd-ledger exited at start ({status}): {}",
                    std::fs::read_to_string(work.join("ledger.log")).unwrap_or_default()
                );
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "wattd-ledger never became ready"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn signal(&mut self, sig: i32) {
        let mut child = self.child.take().unwrap();
        // SAFETY: a signal to our own child's pid.
        unsafe { libc::kill(child.id() as i32, sig) };
        child.wait().unwrap();
    }
}

impl Drop for LedgerProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Everything one scenario needs: the simulated host, cgroups, the CA, the enrolled node key.
pub(crate) struct World {
    pub(crate) work: tempfile::TempDir,
    pub(crate) sim: SimHost,
    pub(crate) cg: TestCgroups,
    pub(crate) mount: PathBuf,
    files: LedgerFiles,
    pub(crate) ca: TestCa,
    pub(crate) spool: PathBuf,
    pub(crate) store: String,
    /// A database to drop at the end (PostgreSQL).
    pub(crate) pg_db: Option<(String, String)>,
}

pub(crate) fn psql(url: &str, sql: &str) {
    let out = Command::new("psql")
        .args([url, "-v", "ON_ERROR_STOP=1", "-q", "-c", sql])
        .output()
        .expect("psql (Debian's postgresql-client) must be installed");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl World {
    pub(crate) fn new(mount: PathBuf, name: &str, postgres: bool) -> World {
        World::with_spool(mount, name, postgres, None)
    }

    /// With the spool in `spool` (default: `spool` in the work dir).
    pub(crate) fn with_spool(
        mount: PathBuf,
        name: &str,
        postgres: bool,
        spool: Option<PathBuf>,
    ) -> World {
        World::build(
            mount,
            name,
            if postgres {
                Store::SharedPostgres
            } else {
                Store::Sqlite
            },
            spool,
        )
    }

    /// With the ledger's store at `url` (a database the test made itself).
    pub(crate) fn with_store_url(mount: PathBuf, name: &str, url: String) -> World {
        World::build(mount, name, Store::Url(url), None)
    }

    fn build(mount: PathBuf, name: &str, store: Store, spool: Option<PathBuf>) -> World {
        let cg = TestCgroups::new(&mount, name).unwrap();
        let sim = SimHost::start(
            PowerModel {
                idle_w: 12.0,
                busy_w_per_cpu: 18.0,
            },
            50_000_000,
            Duration::from_millis(10),
        )
        .unwrap();
        sim.link_cgroup_mount(&mount).unwrap();
        let work = tempfile::tempdir().unwrap();
        let ca = TestCa::new(work.path(), "ledger");
        let server = ca.server("ledger-server");
        let enrolled = work.path().join("enrolled");
        std::fs::create_dir(&enrolled).unwrap();
        let spool = spool.unwrap_or_else(|| work.path().join("spool"));
        // Enrolment: the node's identity, exactly as `wattd identity` prints it.
        let id = wattd(&[
            "identity",
            "--data-dir",
            spool.to_str().unwrap(),
            "--node-id",
            NODE,
        ]);
        assert!(
            id.status.success(),
            "{}",
            String::from_utf8_lossy(&id.stderr)
        );
        std::fs::write(enrolled.join(format!("{NODE}.toml")), &id.stdout).unwrap();
        let (store, pg_db) = if let Store::Url(url) = store {
            (url, None)
        } else if matches!(store, Store::SharedPostgres) {
            let base = std::env::var("WATTD_TEST_POSTGRES").unwrap();
            let db = format!("wattd_e2e_{name}_{}", std::process::id());
            psql(&base, &format!("CREATE DATABASE {db}"));
            let url = match base.rsplit_once('/') {
                Some((server, _)) => format!("{server}/{db}"),
                None => panic!("WATTD_TEST_POSTGRES {base:?} has no /database"),
            };
            (url, Some((base, db)))
        } else {
            (
                format!("sqlite:{}", work.path().join("ledger.db").display()),
                None,
            )
        };
        World {
            files: LedgerFiles {
                cert: server.cert,
                key: server.key,
                client_ca: ca.ca_pem.clone(),
                enrolled,
            },
            work,
            sim,
            cg,
            mount,
            ca,
            spool,
            store,
            pg_db,
        }
    }

    pub(crate) fn ledger(&self, listen: &str) -> LedgerProc {
        LedgerProc::start(self.work.path(), &self.files, &self.store, listen)
    }

    /// The agent's config: 200 ms intervals, shipping to `ledger` with quick reconnects.
    pub(crate) fn agent_config(&self, ledger: SocketAddr, rate: u32) -> PathBuf {
        self.agent_config_with(ledger, rate, 200, "")
    }

    /// The agent's config with `interval_ms` and extra `[spool]` keys.
    pub(crate) fn agent_config_with(
        &self,
        ledger: SocketAddr,
        rate: u32,
        interval_ms: u64,
        spool_keys: &str,
    ) -> PathBuf {
        self.agent_config_more(ledger, rate, interval_ms, spool_keys, "")
    }

    /// As [`World::agent_config_with`], with `more` (further sections) appended.
    pub(crate) fn agent_config_more(
        &self,
        ledger: SocketAddr,
        rate: u32,
        interval_ms: u64,
        spool_keys: &str,
        more: &str,
    ) -> PathBuf {
        let client = self.ca.client(NODE);
        let extra = format!(
            "[node]\nid = {NODE:?}\n[ledger]\nendpoint = \"https://localhost:{}\"\nca = {:?}\ncert = {:?}\n\
             key = {:?}\nbackoff_max_s = 1\nheartbeat_s = 1\nack_timeout_s = 5\nmax_batches_per_s = {rate}\ndrain_s = 10\n{more}",
            ledger.port(),
            self.ca.ca_pem.display().to_string(),
            client.cert.display().to_string(),
            client.key.display().to_string(),
        );
        // Every interval its own batch unless the test says otherwise: these tests count and
        // cut batches at a known rate (sealing by time has its own kill tests).
        let spool_keys = if spool_keys.contains("seal_every_ms") {
            spool_keys.to_owned()
        } else {
            format!("seal_every_ms = {interval_ms}\n{spool_keys}")
        };
        crate::harness::agent_config_in(
            &self.sim,
            &self.mount,
            &self.cg,
            self.work.path(),
            &self.spool,
            interval_ms,
            &spool_keys,
            &extra,
        )
    }

    pub(crate) fn agent_log(&self) -> PathBuf {
        self.work.path().join("wattd.log")
    }

    pub(crate) fn logs(&self) -> String {
        format!(
            "--- wattd ---\n{}\n--- wattd-ledger ---\n{}",
            std::fs::read_to_string(self.agent_log()).unwrap_or_default(),
            std::fs::read_to_string(self.work.path().join("ledger.log")).unwrap_or_default()
        )
    }

    pub(crate) fn ledger_json(&self, what: &str) -> serde_json::Value {
        self.ledger_json_with(what, &[])
    }

    /// `wattd-ledger WHAT --format json` on this world's store, with `extra` arguments.
    pub(crate) fn ledger_json_with(&self, what: &str, extra: &[&str]) -> serde_json::Value {
        let out = Command::new(ledger_bin())
            .args([what, "--store", &self.store, "--format", "json"])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "wattd-ledger {what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The spool's acknowledged cursor (the `ack` file: `<seq> <crc>`).
    pub(crate) fn agent_acked(&self) -> u64 {
        std::fs::read_to_string(self.spool.join("ack"))
            .ok()
            .and_then(|t| t.split_whitespace().next().and_then(|s| s.parse().ok()))
            .unwrap_or(0)
    }

    /// After the agent stopped: the ledger holds every sealed batch once and its per-run totals
    /// are the agent's.
    pub(crate) fn check(&self) {
        let v = wattd(&["verify", "--data-dir", self.spool.to_str().unwrap()]);
        assert!(
            v.status.success(),
            "agent spool verify: {}",
            String::from_utf8_lossy(&v.stdout)
        );
        let nodes = self.ledger_json("nodes");
        let node = nodes["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node_id"] == NODE)
            .unwrap_or_else(|| panic!("node missing in the ledger: {nodes}\n{}", self.logs()));
        let acked = self.agent_acked();
        assert!(
            acked > 10,
            "only {acked} batches acknowledged\n{}",
            self.logs()
        );
        assert_eq!(node["last_seq"].as_u64(), Some(acked), "{node}");
        assert_eq!(
            node["batches"].as_u64(),
            Some(acked),
            "each batch stored once: {node}"
        );
        assert_eq!(node["gaps"].as_array().map(Vec::len), Some(0), "{node}");
        assert_eq!(node["forks"].as_array().map(Vec::len), Some(0), "{node}");
        assert_eq!(node["status"], "ok", "{node}");
        assert_eq!(node["undeclared_holes"].as_u64(), Some(0), "{node}");
        assert!(node["measured_s"].as_u64().is_some(), "{node}");
        let agent_runs = runs_json(&self.spool);
        let ledger_runs = self.ledger_json("runs");
        let agent = totals(&agent_runs);
        let ledger = totals(&ledger_runs);
        assert!(!agent.is_empty());
        assert_eq!(
            ledger,
            agent,
            "ledger totals vs the agent's `wattd runs`\n{}",
            self.logs()
        );
        // And how each finished run's last usage was obtained, from the same summaries.
        assert_eq!(
            crate::harness::final_usages(&ledger_runs),
            crate::harness::final_usages(&agent_runs),
            "final usage in the ledger vs `wattd runs`"
        );
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.sim.stop();
        if let Some((base, db)) = self.pg_db.take() {
            psql(&base, &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"));
        }
    }
}

/// Where a world's ledger keeps its records.
enum Store {
    Sqlite,
    /// A database of its own on `WATTD_TEST_POSTGRES`.
    SharedPostgres,
    Url(String),
}

/// (run id, domain) -> uJ, from `wattd runs` or `wattd-ledger runs` JSON.
pub(crate) fn totals(v: &serde_json::Value) -> BTreeMap<(String, String), u64> {
    let mut m = BTreeMap::new();
    for r in v["runs"].as_array().unwrap() {
        for d in r["domains"].as_array().unwrap() {
            let uj = d["energy_uj"].as_u64().unwrap();
            m.insert(
                (
                    r["run_id"].as_str().unwrap().to_owned(),
                    d["domain"].as_str().unwrap().to_owned(),
                ),
                uj,
            );
        }
    }
    m
}

pub(crate) fn stop_agent_cleanly(w: &World, agent: &mut Agent) {
    let (status, _) = agent.stop();
    assert!(status.success(), "{}", w.logs());
    assert!(
        std::fs::read_to_string(w.agent_log())
            .unwrap_or_default()
            .contains("every sealed batch acknowledged by the ledger"),
        "the agent stopped with batches unacknowledged\n{}",
        w.logs()
    );
}

pub(crate) fn postgres_available(test: &str) -> bool {
    if std::env::var_os("WATTD_TEST_POSTGRES").is_some_and(|v| !v.is_empty()) {
        return true;
    }
    // Not a skip: the test still runs on SQLite, and says which part it could not run.
    wattd_testkit::skip(
        &format!("{test} on PostgreSQL (runs on SQLite instead)"),
        "PostgreSQL: `export WATTD_TEST_POSTGRES=$(.ci/start-postgres)`",
    );
    false
}

#[test]
fn ledger_down_for_a_minute_then_every_interval_arrives_once() {
    let Some(mount) = require_cgroups("ledger_down_for_a_minute_then_every_interval_arrives_once")
    else {
        return;
    };
    let outage_s: u64 = std::env::var("WATTD_LEDGER_OUTAGE_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let mut w = World::new(mount, "outage", false);
    let mut ledger = w.ledger("127.0.0.1:0");
    let listen = ledger.listen;
    let config = w.agent_config(listen, 200);
    let mut agent = Agent::start(&config, &w.agent_log());
    w.cg.spawn_in(
        "run-long.scope",
        Command::new(burn_bin()).args(["0.4", &(outage_s + 8).to_string()]),
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    ledger.signal(libc::SIGTERM);
    w.cg.spawn_in(
        "run-dark.scope",
        Command::new(burn_bin()).args(["0.8", "4"]),
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(outage_s));
    // Same address: the agent's configuration does not change.
    let _ledger = w.ledger(&listen.to_string());
    w.cg.spawn_in(
        "run-after.scope",
        Command::new(burn_bin()).args(["0.6", "2"]),
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(5));
    w.cg.wait_all();
    stop_agent_cleanly(&w, &mut agent);
    w.check();
    let log = std::fs::read_to_string(w.agent_log()).unwrap_or_default();
    assert!(
        log.contains("ledger session ended"),
        "the outage was never seen by the shipper\n{}",
        w.logs()
    );
    let runs = totals(&runs_json(&w.spool));
    for r in ["long", "dark", "after"] {
        assert!(
            runs.keys().any(|(id, _)| id == r),
            "run {r} missing: {runs:?}"
        );
    }
}

#[test]
fn ledger_sigkilled_mid_replay_loses_nothing() {
    let Some(mount) = require_cgroups("ledger_sigkilled_mid_replay_loses_nothing") else {
        return;
    };
    let postgres = postgres_available("ledger_sigkilled_mid_replay_loses_nothing");
    let mut w = World::new(mount, "ledgerkill", postgres);
    let ledger = w.ledger("127.0.0.1:0");
    let listen = ledger.listen;
    drop(ledger); // SIGKILL before the agent ever connected: it starts with a backlog
                  // A slow replay (10 batches/s) so that the next SIGKILL lands in the middle of it.
    let config = w.agent_config(listen, 10);
    let mut agent = Agent::start(&config, &w.agent_log());
    w.cg.spawn_in("run-k.scope", Command::new(burn_bin()).args(["0.5", "12"]))
        .unwrap();
    std::thread::sleep(Duration::from_secs(5)); // about 25 batches of backlog
    for _ in 0..3 {
        let mut l = w.ledger(&listen.to_string());
        std::thread::sleep(Duration::from_millis(1200));
        l.signal(libc::SIGKILL);
        std::thread::sleep(Duration::from_millis(500));
    }
    let _ledger = w.ledger(&listen.to_string());
    w.cg.wait_all();
    std::thread::sleep(Duration::from_secs(1));
    stop_agent_cleanly(&w, &mut agent);
    w.check();
}

#[test]
fn agent_sigkilled_mid_stream_loses_nothing_and_sends_nothing_twice() {
    let Some(mount) =
        require_cgroups("agent_sigkilled_mid_stream_loses_nothing_and_sends_nothing_twice")
    else {
        return;
    };
    let mut w = World::new(mount, "agentkill", false);
    let _ledger = w.ledger("127.0.0.1:0");
    // Sealing by time, three intervals a batch: a kill also loses unsealed intervals, which the
    // next start's agent-down gap must cover (and the ledger must price nothing twice).
    let config = w.agent_config_with(_ledger.listen, 200, 200, "seal_every_ms = 600");
    w.cg.spawn_in("run-q.scope", Command::new(burn_bin()).args(["0.5", "10"]))
        .unwrap();
    for delay_ms in [700u64, 1300, 450, 1900, 900] {
        let mut agent = Agent::start(&config, &w.agent_log());
        std::thread::sleep(Duration::from_millis(delay_ms));
        let mut child = agent.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let mut agent = Agent::start(&config, &w.agent_log());
    w.cg.wait_all();
    std::thread::sleep(Duration::from_secs(1));
    stop_agent_cleanly(&w, &mut agent);
    w.check();
}

/// Short-lived client certificates renewed on disk by an outside tool: the agent starts on one
/// valid for 30 s, the test writes a renewed one after 8 s, and the agent reconnects with it
/// before the first expires (a fifth of the lifetime before), without a restart: no session
/// is ended by the ledger for an expired certificate, and every batch arrives once. Then the
/// ledger's own enforcement: a certificate that expires while its stream is open ends the
/// stream (`certificate_expired`), and a renewal written late is picked up at the next
/// reconnect, with nothing lost.
#[test]
fn a_client_certificate_renewed_on_disk_is_used_before_the_old_one_expires() {
    let Some(mount) =
        require_cgroups("a_client_certificate_renewed_on_disk_is_used_before_the_old_one_expires")
    else {
        return;
    };
    let mut w = World::new(mount, "certrenew", false);
    let ledger = w.ledger("127.0.0.1:0");
    let config = w.agent_config(ledger.listen, 200);
    // Over the files the configuration names.
    w.ca.client_expiring(NODE, 30);
    let started = Instant::now();
    let mut agent = Agent::start(&config, &w.agent_log());
    w.cg.spawn_in(
        "run-renew.scope",
        Command::new(burn_bin()).args(["0.4", "36"]),
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(8));
    w.ca.client(NODE);
    // Past the first certificate's expiry.
    std::thread::sleep(Duration::from_secs(38).saturating_sub(started.elapsed()));
    w.cg.wait_all();
    stop_agent_cleanly(&w, &mut agent);
    w.check();
    let log = std::fs::read_to_string(w.agent_log()).unwrap_or_default();
    assert!(
        log.contains("reconnecting with the client certificate on disk"),
        "the agent never renewed\n{}",
        w.logs()
    );
    let ledger_log = std::fs::read_to_string(w.work.path().join("ledger.log")).unwrap_or_default();
    assert!(
        !ledger_log.contains("certificate_expired"),
        "a session ran into the old certificate's expiry\n{}",
        w.logs()
    );

    // No renewal on disk: the ledger ends the stream when the certificate expires.
    drop(ledger);
    let _ = std::fs::remove_file(w.work.path().join("ledger.log"));
    let ledger = w.ledger("127.0.0.1:0");
    let config = w.agent_config(ledger.listen, 200);
    w.ca.client_expiring(NODE, 4);
    let mut agent = Agent::start(&config, &w.agent_log());
    let t = Instant::now();
    loop {
        let ledger_log =
            std::fs::read_to_string(w.work.path().join("ledger.log")).unwrap_or_default();
        if ledger_log.contains("certificate_expired") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "the ledger kept a stream open past its certificate's expiry\n{}",
            w.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Renewed late: the agent's next connect reads it and catches up.
    w.ca.client(NODE);
    std::thread::sleep(Duration::from_secs(4));
    stop_agent_cleanly(&w, &mut agent);
    w.check();
}

/// Labels reach the ledger: the control plane starts a run with `account = acme` on the
/// control socket; the labels travel in the signed records (the interval where the run first
/// has them, and its summary), and `wattd-ledger runs` names each run's account and filters by
/// it. A run without labels has none.
#[test]
fn a_runs_account_label_reaches_the_ledger() {
    use std::io::{BufRead as _, Write as _};
    let Some(mount) = require_cgroups("a_runs_account_label_reaches_the_ledger") else {
        return;
    };
    let mut w = World::new(mount, "labels", false);
    let ledger = w.ledger("127.0.0.1:0");
    let config = w.agent_config(ledger.listen, 200);
    let mut agent = Agent::start(&config, &w.agent_log());
    let socket = w.work.path().join("control.sock");
    let t = Instant::now();
    while !socket.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no control socket\n{}",
            w.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let rel = w.cg.rel().join("run-acct1.scope");
    std::fs::create_dir_all(w.mount.join(&rel)).unwrap();
    let mut c = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    let msg = format!(
        "{{\"type\":\"run_started\",\"run_id\":\"acct1\",\"cgroup\":{:?},\"labels\":{{\"account\":\"acme\",\"team\":\"blue\"}}}}\n",
        rel.display().to_string()
    );
    c.write_all(msg.as_bytes()).unwrap();
    let mut reply = String::new();
    std::io::BufReader::new(c.try_clone().unwrap())
        .read_line(&mut reply)
        .unwrap();
    assert!(reply.contains("\"ok\":true"), "run_started: {reply}");
    w.cg.spawn_in(
        "run-acct1.scope",
        Command::new(burn_bin()).args(["0.5", "3"]),
    )
    .unwrap();
    w.cg.spawn_in(
        "run-plain.scope",
        Command::new(burn_bin()).args(["0.5", "3"]),
    )
    .unwrap();
    w.cg.wait_all();
    std::thread::sleep(Duration::from_secs(2));
    stop_agent_cleanly(&w, &mut agent);
    w.check();
    let runs = |extra: &[&str]| w.ledger_json_with("runs", extra);
    let all = runs(&[]);
    let find = |v: &serde_json::Value, id: &str| {
        v["runs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["run_id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("run {id} missing: {v}"))
    };
    assert_eq!(find(&all, "acct1")["account"], "acme", "{all}");
    assert!(find(&all, "plain").get("account").is_none(), "{all}");
    let team = runs(&["--account-label", "team"]);
    assert_eq!(find(&team, "acct1")["account"], "blue");
    let acme = runs(&["--account", "acme"]);
    let ids: Vec<&str> = acme["runs"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["run_id"].as_str())
        .collect();
    assert_eq!(ids, ["acct1"], "{acme}");
    drop(ledger);
}
