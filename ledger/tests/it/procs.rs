//! The real `wattd-ledger` binary: two processes on one PostgreSQL database, SIGKILL between
//! and during batches, SIGTERM, and the CLI (`runs`, `nodes`, exit codes).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use wattd_records::seal::BatchContent;

use crate::common::*;

const BIN: &str = env!("CARGO_BIN_EXE_wattd-ledger");

/// A `wattd-ledger serve` child process.
#[derive(Debug)]
pub(crate) struct Proc {
    child: Child,
    pub(crate) addr: std::net::SocketAddr,
    /// The query API's address, when started with `--query-listen`.
    pub(crate) query: Option<std::net::SocketAddr>,
}

impl Proc {
    fn spawn(f: &Fixture, tag: &str) -> Proc {
        Self::spawn_with(f, tag, &[])
    }

    /// `serve` with `extra` arguments after the usual ones.
    pub(crate) fn spawn_with(f: &Fixture, tag: &str, extra: &[std::ffi::OsString]) -> Proc {
        let ready = f.dir.path().join(format!("ready-{tag}.json"));
        let _ = std::fs::remove_file(&ready);
        let log = std::fs::File::create(f.dir.path().join(format!("ledger-{tag}.log")))
            .expect("log file");
        let child = Command::new(BIN)
            .arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .arg("--cert")
            .arg(&f.server.cert)
            .arg("--key")
            .arg(&f.server.key)
            .arg("--client-ca")
            .arg(&f.ca.ca_pem)
            .arg("--enrolled")
            .arg(&f.enrolled)
            .args(["--store", &f.store_text])
            .arg("--ready-file")
            .arg(&ready)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn wattd-ledger");
        let deadline = Instant::now() + Duration::from_secs(30);
        let (addr, query) = loop {
            if let Ok(text) = std::fs::read_to_string(&ready) {
                let v: serde_json::Value = serde_json::from_str(&text).expect("ready file JSON");
                let addr = v["listen"]
                    .as_str()
                    .expect("listen")
                    .parse()
                    .expect("address");
                let query = v["query"]
                    .as_str()
                    .map(|q| q.parse().expect("query address"));
                break (addr, query);
            }
            assert!(
                Instant::now() < deadline,
                "wattd-ledger did not get ready; log: {}",
                std::fs::read_to_string(f.dir.path().join(format!("ledger-{tag}.log")))
                    .unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        Proc { child, addr, query }
    }

    fn kill9(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("wait");
    }

    pub(crate) fn term(mut self) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            assert!(Instant::now() < deadline, "no exit within 15 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) async fn stream_to(f: &Fixture, addr: std::net::SocketAddr, node: &str) -> NodeStream {
    let ch = channel(addr, &f.ca.ca_pem, Some(&f.client_cert(node)))
        .await
        .expect("connect");
    NodeStream::open(ch).await.expect("open stream")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_one_postgres_store_each_batch_once() -> TestResult {
    let name = "procs::two_processes_on_one_postgres_store_each_batch_once";
    let Some(f) = Fixture::new(Backend::Postgres, name).await else {
        return Ok(());
    };
    let mut chain = Chain::new(key("n1", 1, 1));
    f.enrol(&chain.key);
    let a = Proc::spawn(&f, "a");
    let b = Proc::spawn(&f, "b");
    let bs: Vec<_> = (0..60).map(|_| chain.next(2)).collect();

    // Alternating reconnects with overlapping windows.
    let windows: [(std::net::SocketAddr, std::ops::Range<usize>); 4] = [
        (a.addr, 0..15),
        (b.addr, 10..30),
        (a.addr, 5..20),
        (b.addr, 28..32),
    ];
    let mut acked = 0;
    for (addr, range) in windows {
        let mut s = stream_to(&f, addr, "n1").await;
        for bt in &bs[range] {
            acked = s.send(msg(bt)).await?.acked_seq.max(acked);
        }
    }
    assert_eq!(acked, 32);
    // The same batches sent to both processes at once.
    let mut tasks = Vec::new();
    for addr in [a.addr, b.addr, a.addr, b.addr] {
        let mut s = stream_to(&f, addr, "n1").await;
        let bs = bs.clone();
        tasks.push(tokio::spawn(async move {
            let mut last = 0;
            for bt in &bs[30..] {
                last = s.send(msg(bt)).await.expect("ack").acked_seq;
            }
            last
        }));
    }
    for t in tasks {
        assert_eq!(t.await?, 60);
    }
    let pg = f.store_text.clone();
    let (client, conn) = tokio_postgres::connect(&pg, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let row = client
        .query_one(
            "SELECT COUNT(*), COUNT(DISTINCT seq), MIN(seq), MAX(seq) FROM batches WHERE node_id = 'n1'",
            &[],
        )
        .await?;
    let (n, distinct, min, max): (i64, i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!((n, distinct, min, max), (60, 60, 1, 60));
    let allocs: i64 = client
        .query_one("SELECT COUNT(*) FROM allocations", &[])
        .await?
        .get(0);
    assert_eq!(allocs, 60 * 2 * 2);
    let totals = f.query_store().await;
    let totals = wattd_ledger::store::Store::run_totals(&totals).await?;
    assert_eq!(totals[0].energy_uj, 60 * 2 * 15);
    assert_eq!(totals[1].energy_uj, 60 * 2 * 25);
    assert!(a.term().success());
    assert!(b.term().success());
    Ok(())
}

async fn sigkill_loses_nothing_acknowledged(backend: Backend, name: &str) -> TestResult {
    let Some(f) = Fixture::new(backend, name).await else {
        return Ok(());
    };
    let mut chain = Chain::new(key("n1", 1, 1));
    f.enrol(&chain.key);
    let bs: Vec<_> = (0..40).map(|_| chain.next(3)).collect();
    let mut acked = 0u64;
    let mut next = 0usize;
    // Kill points: after an ack (between batches), and with batches in flight.
    let kills: [(usize, usize); 4] = [(5, 0), (12, 1), (20, 3), (31, 2)];
    for (stop_at, in_flight) in kills {
        let p = Proc::spawn(&f, "k");
        let mut s = stream_to(&f, p.addr, "n1").await;
        // The ledger tells where to resume: a heartbeat returns the stored tip.
        let tip = s.send(chain.heartbeat(bs.len() as u64)).await?.acked_seq;
        assert!(
            tip >= acked,
            "acknowledged seq {acked} lost: the ledger restarted at {tip}"
        );
        next = usize::try_from(tip)?;
        while next < stop_at {
            let ack = s.send(msg(&bs[next])).await?;
            acked = acked.max(ack.acked_seq);
            next += 1;
        }
        for bt in bs.iter().skip(next).take(in_flight) {
            s.push(msg(bt)).await?;
        }
        p.kill9();
    }
    let p = Proc::spawn(&f, "k");
    let mut s = stream_to(&f, p.addr, "n1").await;
    let tip = s.send(chain.heartbeat(40)).await?.acked_seq;
    assert!(
        tip >= acked,
        "acknowledged seq {acked} lost: the ledger restarted at {tip}"
    );
    for bt in &bs[usize::try_from(tip)?..] {
        s.send(msg(bt)).await?;
    }
    assert!(next > 0);
    let nodes = wattd_ledger::store::Store::nodes(&f.query_store().await).await?;
    assert_eq!(
        (nodes[0].last_seq, nodes[0].batches, nodes[0].intervals),
        (40, 40, 120)
    );
    assert!(p.term().success(), "SIGTERM: clean exit");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_nothing_acknowledged_sqlite() -> TestResult {
    sigkill_loses_nothing_acknowledged(Backend::Sqlite, "procs::sigkill_sqlite").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_nothing_acknowledged_postgres() -> TestResult {
    sigkill_loses_nothing_acknowledged(Backend::Postgres, "procs::sigkill_postgres").await
}

pub(crate) fn run_cli(args: &[&str]) -> (i32, String, String) {
    run_cli_envs(args, &[])
}

/// `run_cli` with environment variables set for the child.
fn run_cli_envs(args: &[&str], envs: &[(&str, &Path)]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .envs(envs.iter().copied())
        .output()
        .expect("run wattd-ledger");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_runs_and_nodes_report_the_store() -> TestResult {
    let f = Fixture::new(Backend::Sqlite, "procs::cli")
        .await
        .expect("sqlite");
    let mut chain = Chain::new(key("n1", 1, 1));
    f.enrol(&chain.key);
    let p = Proc::spawn(&f, "cli");
    let mut s = stream_to(&f, p.addr, "n1").await;
    for _ in 0..4 {
        s.send(msg(&chain.next(2))).await?;
    }
    s.send(chain.heartbeat(6)).await?;
    drop(s);
    assert!(p.term().success());
    let (code, out, err) = run_cli(&["runs", "--store", &f.store_text, "--format", "json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(v["runs"][0]["run_id"], "run-a");
    assert_eq!(v["runs"][0]["energy_uj"], 8 * 15);
    assert_eq!(v["runs"][0]["domains"][0]["domain"], "package:0");
    assert_eq!(v["runs"][1]["energy_uj"], 8 * 25);
    assert_eq!(v["runs"][1]["energy_wh"], "0.0000000556");
    let (code, out, err) = run_cli(&["runs", "--db", &f.store_text, "--format", "table"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("run-b") && out.contains("200"), "{out}");
    let (code, out, err) = run_cli(&["nodes", "--store", &f.store_text, "--format", "json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let n = &v["nodes"][0];
    assert_eq!(
        (n["node_id"].as_str(), n["last_seq"].as_u64()),
        (Some("n1"), Some(4))
    );
    assert_eq!(n["announced_sealed_seq"], 6);
    assert_eq!(n["gaps"][0]["first_seq"], 5);
    assert_eq!(n["gaps"][0]["reason"], "announced_not_received");
    let (code, out, _) = run_cli(&["nodes", "--store", &f.store_text]);
    assert_eq!(code, 0);
    assert!(out.contains("gap   seq 5..=6"), "{out}");
    // A query on a store that does not exist: an error, and nothing created.
    let missing = f.dir.path().join("nope.db");
    let (code, _, err) = run_cli(&["runs", "--store", &format!("sqlite:{}", missing.display())]);
    assert_eq!(code, 1, "{err}");
    assert!(!missing.exists());
    Ok(())
}

fn serve_args(f: &Fixture, enrolled: &Path, cert: &Path) -> Vec<String> {
    vec![
        "serve".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--cert".into(),
        cert.display().to_string(),
        "--key".into(),
        f.server.key.display().to_string(),
        "--client-ca".into(),
        f.ca.ca_pem.display().to_string(),
        "--enrolled".into(),
        enrolled.display().to_string(),
        "--store".into(),
        f.store_text.clone(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_exits_64_naming_every_problem() -> TestResult {
    let f = Fixture::new(Backend::Sqlite, "procs::config")
        .await
        .expect("sqlite");
    std::fs::write(f.enrolled.join("bad.toml"), "node_id = 7\n")?;
    let mut ok = key("n1", 1, 1).public();
    ok.key_id = "ab".repeat(16);
    std::fs::write(f.enrolled.join("mismatch.pub"), ok.to_toml()?)?;
    let missing_cert = PathBuf::from("/nonexistent/cert.pem");
    let args = serve_args(&f, &f.enrolled, &missing_cert);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, _, err) = run_cli(&args);
    assert_eq!(code, 64, "{err}");
    for needle in [
        "bad.toml",
        "mismatch.pub",
        "/nonexistent/cert.pem",
        "key_id does not match",
    ] {
        assert!(err.contains(needle), "{needle} not in: {err}");
    }
    let (code, _, err) = run_cli(&["serve", "--listen", "nowhere"]);
    assert_eq!(code, 64, "{err}");
    let (code, _, err) = run_cli(&["runs", "--store", "mysql://x"]);
    assert_eq!(code, 64, "{err}");
    let (code, out, _) = run_cli(&["serve", "--help"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("--max-held-batches") && out.contains("listening on"),
        "{out}"
    );
    Ok(())
}

/// Raises this process's open-file limit to at least `want` (up to the hard limit); false if
/// the hard limit is lower.
fn enough_fds(want: u64) -> bool {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on this process with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return false;
        }
        if lim.rlim_cur >= want {
            return true;
        }
        if lim.rlim_max < want {
            return false;
        }
        lim.rlim_cur = want;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0
    }
}

/// Admission nobody can starve: 1,100 TCP sockets from 127.0.0.2 that never speak TLS, each
/// reopened a second after the ledger closes it, while the enrolled node streams from
/// 127.0.0.1. The attacker's address holds at most `--max-connections-per-source` slots (64;
/// the rest are closed at accept, the held ones at the handshake deadline), and the node's
/// acknowledgements keep coming within 5 s. The real binary, on SQLite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eleven_hundred_idle_sockets_do_not_starve_an_enrolled_node() -> TestResult {
    let name = "procs::eleven_hundred_idle_sockets_do_not_starve_an_enrolled_node";
    if !enough_fds(4096) {
        wattd_testkit::skip(name, "an open-file limit of 4096 (ulimit -n)");
        return Ok(());
    }
    let Some(f) = Fixture::new(Backend::Sqlite, name).await else {
        return Ok(());
    };
    let mut chain = Chain::new(key("n1", 1, 1));
    f.enrol(&chain.key);
    let p = Proc::spawn(&f, "admission");
    let addr = p.addr;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let held = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut attackers = Vec::new();
    for _ in 0..1100 {
        let stop = std::sync::Arc::clone(&stop);
        let held = std::sync::Arc::clone(&held);
        attackers.push(tokio::spawn(async move {
            use std::sync::atomic::Ordering::Relaxed;
            use tokio::io::AsyncReadExt as _;
            while !stop.load(Relaxed) {
                let sock = tokio::net::TcpSocket::new_v4().expect("socket");
                sock.bind("127.0.0.2:0".parse().expect("addr"))
                    .expect("bind 127.0.0.2");
                if let Ok(mut s) = sock.connect(addr).await {
                    held.fetch_add(1, Relaxed);
                    // Hold it, silent, until the ledger closes it (or the test ends).
                    let mut b = [0u8; 1];
                    let _ = tokio::time::timeout(Duration::from_secs(30), s.read(&mut b)).await;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }));
    }
    // Let the flood fill what it can.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut s = stream_to(&f, addr, "n1").await;
    let mut worst = Duration::ZERO;
    for i in 1..=40u64 {
        let t = Instant::now();
        let ack = s.send(msg(&chain.next(1))).await?;
        worst = worst.max(t.elapsed());
        assert_eq!(ack.acked_seq, i);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for a in attackers {
        a.abort();
    }
    let connects = held.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("{connects} attacker connections; the node's slowest ack {worst:?}");
    assert!(connects >= 1100, "the flood did not run: {connects}");
    assert!(worst < Duration::from_secs(5), "ack lag {worst:?}");
    let log = std::fs::read_to_string(f.dir.path().join("ledger-admission.log"))?;
    assert!(
        log.contains("--max-connections-per-source reached"),
        "the per-source limit never applied:\n{}",
        log.lines().take(20).collect::<Vec<_>>().join("\n")
    );
    assert!(p.term().success());
    Ok(())
}

/// The attack, with the real binary and its CLI: node B, enrolled with its own valid
/// certificate and key, adds 1 kWh to node A's run through an interval 1 ns long. `runs`
/// leaves A's run as it was and bills B nothing for it; `nodes` flags B (`implausible`, the
/// quarantined energy and reason); B keeps streaming. Then A's enrolment file is removed (no
/// signal: the directory is watched) and A's open stream ends within a second, nothing more
/// of A stored.
async fn a_forger_is_quarantined_and_a_removed_node_cut_off(
    backend: Backend,
    name: &str,
) -> TestResult {
    let Some(f) = Fixture::new(backend, name).await else {
        return Ok(());
    };
    let mut a = Chain::new(key("n1", 1, 1));
    let mut b = Chain::new(key("n2", 1, 2));
    f.enrol(&a.key);
    f.enrol(&b.key);
    let p = Proc::spawn(&f, "forger");
    let mut sa = stream_to(&f, p.addr, "n1").await;
    assert_eq!(sa.send(msg(&a.next(2))).await?.acked_seq, 1);
    let json = |what: &str| -> serde_json::Value {
        let (code, out, err) = run_cli(&[what, "--store", &f.store_text, "--format", "json"]);
        assert_eq!(code, 0, "wattd-ledger {what}: {err}");
        serde_json::from_str(&out).expect("JSON")
    };
    let runs_before = json("runs");
    let mut sb = stream_to(&f, p.addr, "n2").await;
    let mut iv = interval(0, &[("run-a", 3_600_000_000_000, 0)], 0);
    iv.end_monotonic_ns = iv.start_monotonic_ns + 1;
    let forged = b.next_with(BatchContent {
        intervals: vec![iv],
        ..Default::default()
    });
    assert_eq!(
        sb.send(msg(&forged)).await?.acked_seq,
        1,
        "stored and chained"
    );
    let mut honest = interval(1, &[("run-b2", 5, 0)], 1);
    honest.start_monotonic_ns = 1_000_000_001;
    let honest = b.next_with(BatchContent {
        intervals: vec![honest],
        ..Default::default()
    });
    assert_eq!(sb.send(msg(&honest)).await?.acked_seq, 2, "still streaming");
    let runs = json("runs");
    let a_runs = |v: &serde_json::Value| -> Vec<serde_json::Value> {
        v["runs"]
            .as_array()
            .expect("runs")
            .iter()
            .filter(|r| r["node_id"] == "n1")
            .cloned()
            .collect()
    };
    assert_eq!(a_runs(&runs), a_runs(&runs_before), "node A's runs changed");
    let b_runs: Vec<&str> = runs["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .filter(|r| r["node_id"] == "n2")
        .filter_map(|r| r["run_id"].as_str())
        .collect();
    assert_eq!(b_runs, ["run-b2"], "the forged kilowatt-hour is billed");
    let nodes = json("nodes");
    let n2 = nodes["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["node_id"] == "n2")
        .expect("n2")
        .clone();
    assert_eq!(n2["status"], "implausible", "{n2}");
    assert_eq!(n2["quarantined"][0]["reason"], "above_max_watts", "{n2}");
    assert_eq!(n2["quarantined_uj"], 3_600_000_000_000u64, "{n2}");
    // Revocation by removing the file, no signal.
    f.unenrol("n1");
    let t = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(2), sa.recv())
        .await
        .map_err(|_| "node A's stream was not ended")?
        .expect_err("revoked");
    eprintln!(
        "removed node's stream ended {:?} after its file went",
        t.elapsed()
    );
    assert!(t.elapsed() < Duration::from_secs(1) + wattd_ledger::server::WATCH_QUIET);
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let refused = match channel(p.addr, &f.ca.ca_pem, Some(&f.client_cert("n1"))).await {
        Ok(ch) => NodeStream::open(ch).await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "a removed node streamed again");
    let nodes = json("nodes");
    let n1 = nodes["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["node_id"] == "n1")
        .expect("n1")
        .clone();
    assert_eq!(n1["last_seq"], 1, "{n1}");
    assert!(p.term().success());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forger_is_quarantined_and_a_removed_node_cut_off_sqlite() -> TestResult {
    a_forger_is_quarantined_and_a_removed_node_cut_off(Backend::Sqlite, "procs::forger_sqlite")
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forger_is_quarantined_and_a_removed_node_cut_off_postgres() -> TestResult {
    a_forger_is_quarantined_and_a_removed_node_cut_off(Backend::Postgres, "procs::forger_postgres")
        .await
}

/// The PostgreSQL password never on the command line: a URL holding one is refused (exit 64,
/// the password not echoed); the real binary takes it from `PGPASSFILE` and authenticates
/// (SCRAM, the role `wattd_pw` that `.ci/start-postgres` makes); a wrong password is refused
/// by the server; a password file others can read is ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_password_comes_from_the_password_file() -> TestResult {
    let name = "procs::the_postgres_password_comes_from_the_password_file";
    let Some(f) = Fixture::new(Backend::Postgres, name).await else {
        return Ok(());
    };
    let owner: tokio_postgres::Config = f.store_text.parse()?;
    let (client, conn) = owner.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let has_role = client
        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = 'wattd_pw'", &[])
        .await?
        .is_some();
    if !has_role {
        wattd_testkit::skip(
            name,
            "the PostgreSQL role wattd_pw with a password (run .ci/start-postgres again)",
        );
        return Ok(());
    }
    // The schema, readable by wattd_pw.
    drop(f.query_store_serve().await);
    client
        .batch_execute("GRANT SELECT ON ALL TABLES IN SCHEMA public TO wattd_pw")
        .await?;
    let host = match owner.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => return Err("WATTD_TEST_POSTGRES is not a TCP host".into()),
    };
    let port = owner.get_ports().first().copied().unwrap_or(5432);
    let db = owner
        .get_dbname()
        .ok_or("no database in the URL")?
        .to_owned();
    let url = format!("postgres://wattd_pw@{host}:{port}/{db}");
    let passfile = f.dir.path().join("pgpass");
    let write = |password: &str, mode: u32| -> TestResult {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::write(&passfile, format!("{host}:{port}:*:wattd_pw:{password}\n"))?;
        std::fs::set_permissions(&passfile, std::fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    write("wattd-test-password", 0o600)?;
    let nodes = ["nodes", "--store", url.as_str(), "--format", "json"];
    let (code, out, err) = run_cli_envs(&nodes, &[("PGPASSFILE", &passfile)]);
    assert_eq!(code, 0, "with the password file: {err}");
    assert!(out.contains("\"nodes\""), "{out}");
    write("not-the-password", 0o600)?;
    let (code, _, err) = run_cli_envs(&nodes, &[("PGPASSFILE", &passfile)]);
    assert_ne!(code, 0);
    assert!(err.contains("password authentication failed"), "{err}");
    write("wattd-test-password", 0o644)?;
    let (code, _, err) = run_cli_envs(&nodes, &[("PGPASSFILE", &passfile)]);
    assert_ne!(code, 0, "a password file others can read was used");
    assert!(err.contains("chmod 600"), "{err}");
    let with_password = format!("postgres://wattd_pw:wattd-test-password@{host}:{port}/{db}");
    let (code, _, err) = run_cli(&["nodes", "--store", &with_password]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("password file"), "{err}");
    assert!(
        !err.contains("wattd-test-password"),
        "the password echoed: {err}"
    );
    Ok(())
}
