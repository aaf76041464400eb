//! A metering client nobody here wrote the wire code for: Python `grpcio` stubs generated from
//! `proto/wattd/ledger/v1/query.proto` at test time (`grpc_tools.protoc`), run as separate
//! processes (`ledger/tests/python/metering_client.py`) against the real `wattd-ledger` binary.
//! The client follows `Changes` across its own crash (between applying a message and saving its
//! cursor) and a restart of the ledger; after dropping repeated ids its sum equals what the
//! ledger bills. An account reader is refused another account, a node certificate is refused,
//! and each read is in the audit (`wattd-ledger reads`).

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::*;
use crate::procs::{run_cli, stream_to, Proc};
use crate::query::{billed, labelled_batch, READERS};

/// `python3` with `grpc` and `grpc_tools` importable, or a loud skip.
fn python_with_grpc() -> Option<PathBuf> {
    let Some(py) = wattd_testkit::need::which("python3") else {
        wattd_testkit::skip("python metering client", "python3 on PATH");
        return None;
    };
    let ok = Command::new(&py)
        .args(["-c", "import grpc, grpc_tools"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        wattd_testkit::skip(
            "python metering client",
            "the Python packages grpcio and grpcio-tools (pip install grpcio grpcio-tools)",
        );
        return None;
    }
    Some(py)
}

struct Client<'a> {
    py: &'a Path,
    stubs: &'a Path,
    script: PathBuf,
    ca: &'a Path,
}

impl Client<'_> {
    /// Runs the client; (exit code, stdout's last JSON line).
    fn run(
        &self,
        command: &str,
        addr: std::net::SocketAddr,
        who: &wattd_tests::tls::CertFiles,
        extra: &[&str],
    ) -> (i32, serde_json::Value) {
        let out = Command::new(self.py)
            .arg(&self.script)
            .arg(command)
            .arg(addr.to_string())
            .arg(self.ca)
            .arg(&who.cert)
            .arg(&who.key)
            .args(extra)
            .env("STUBS", self.stubs)
            .output()
            .expect("run the python client");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let last = stdout.lines().last().unwrap_or("null");
        let v = serde_json::from_str(last).unwrap_or(serde_json::Value::Null);
        if out.status.code() != Some(0)
            && out.status.code() != Some(3)
            && out.status.code() != Some(9)
        {
            panic!(
                "python client {command} failed ({:?}): {stdout}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        (out.status.code().unwrap_or(-1), v)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_grpc_client_follows_changes_across_crashes_and_restarts() -> TestResult {
    let name = "python::a_python_grpc_client_follows_changes_across_crashes_and_restarts";
    let Some(py) = python_with_grpc() else {
        return Ok(());
    };
    let Some(f) = Fixture::new(Backend::Sqlite, name).await else {
        return Ok(());
    };
    // The stubs, from the .proto, by grpcio-tools.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace");
    let stubs = f.dir.path().join("stubs");
    std::fs::create_dir(&stubs)?;
    let gen = Command::new(&py)
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(root.join("proto"))
        .arg(format!("--python_out={}", stubs.display()))
        .arg(format!("--grpc_python_out={}", stubs.display()))
        .arg(root.join("proto/wattd/ledger/v1/query.proto"))
        .output()?;
    assert!(
        gen.status.success(),
        "protoc: {}",
        String::from_utf8_lossy(&gen.stderr)
    );
    let client = Client {
        py: &py,
        stubs: &stubs,
        script: Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/metering_client.py"),
        ca: &f.ca.ca_pem,
    };

    let mut chain = Chain::new(key("n1", 1, 1));
    f.enrol(&chain.key);
    let readers = f.readers(READERS);
    let extra: Vec<OsString> = vec![
        "--query-listen".into(),
        "127.0.0.1:0".into(),
        "--reader-ca".into(),
        readers.ca.ca_pem.clone().into(),
        "--readers".into(),
        readers.file.clone().into(),
    ];
    let ledger = Proc::spawn_with(&f, "q1", &extra);
    let mut s = stream_to(&f, ledger.addr, "n1").await;
    for i in 0..6 {
        s.send(labelled_batch(&mut chain, i == 0, 2)).await?;
    }
    let metering = readers.ca.client("metering-pipeline");
    let acme = readers.ca.client("view-acme");
    let cursor = f.dir.path().join("cursor");
    let out = f.dir.path().join("changes.jsonl");
    let changes_args = |extra: &[&str]| -> Vec<String> {
        let mut v = vec![
            "--cursor-file".to_string(),
            cursor.display().to_string(),
            "--out".to_string(),
            out.display().to_string(),
        ];
        v.extend(extra.iter().map(|s| (*s).to_string()));
        v
    };
    let q = ledger.query.expect("query port");
    // Two messages applied and committed, the third applied and then a crash.
    let a = changes_args(&["--max-messages", "2"]);
    let (code, v) = client.run(
        "changes",
        q,
        &metering,
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert_eq!((code, v["messages"].as_u64()), (0, Some(2)), "{v}");
    let a = changes_args(&["--max-messages", "1", "--crash-before-saving-cursor"]);
    let (code, _) = client.run(
        "changes",
        q,
        &metering,
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert_eq!(code, 9, "the client crashed on purpose");

    // The ledger restarts; more batches arrive; the client resumes from its saved cursor.
    drop(s);
    assert!(ledger.term().success());
    let ledger = Proc::spawn_with(&f, "q2", &extra);
    let mut s = stream_to(&f, ledger.addr, "n1").await;
    for _ in 0..4 {
        s.send(labelled_batch(&mut chain, false, 3)).await?;
    }
    let q = ledger.query.expect("query port");
    let a = changes_args(&[]);
    let (code, v) = client.run(
        "changes",
        q,
        &metering,
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert_eq!(code, 0, "{v}");

    let mut seen = HashSet::new();
    let mut repeated = 0;
    let mut sums: BTreeMap<(String, String, String), u128> = BTreeMap::new();
    for line in std::fs::read_to_string(&out)?.lines() {
        let c: serde_json::Value = serde_json::from_str(line)?;
        let id = c["id"].as_str().expect("id").to_owned();
        if !seen.insert(id) {
            repeated += 1;
            continue;
        }
        let key = (
            c["node_id"].as_str().expect("node").to_owned(),
            c["run_id"].as_str().expect("run").to_owned(),
            c["domain"].as_str().expect("domain").to_owned(),
        );
        *sums.entry(key).or_default() += u128::from(c["energy_uj"].as_u64().expect("uJ"));
    }
    assert!(
        repeated > 0,
        "the message applied before the crash came again"
    );
    assert_eq!(
        sums,
        billed(&f).await,
        "after dropping repeated ids, nothing missing"
    );
    let (_, runs, _) = run_cli(&["runs", "--store", &f.store_text, "--format", "json"]);
    let runs: serde_json::Value = serde_json::from_str(&runs)?;
    let total_runs: u128 = runs["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .map(|r| u128::from(r["energy_uj"].as_u64().expect("energy_uj")))
        .sum();
    assert_eq!(
        sums.values().sum::<u128>(),
        total_runs,
        "equal to `wattd-ledger runs`"
    );

    // RunTotals as the metering pipeline and as an account view.
    let (code, v) = client.run("totals", q, &metering, &[]);
    assert_eq!(code, 0, "{v}");
    let got: u128 = v["totals"]
        .as_array()
        .expect("totals")
        .iter()
        .map(|t| u128::from(t["energy_uj"].as_u64().expect("uJ")))
        .sum();
    assert_eq!(got, total_runs);
    let (code, v) = client.run("totals", q, &acme, &["--account", "globex"]);
    assert_eq!(
        (code, v["error"].as_str(), v["reason"].as_str()),
        (3, Some("PERMISSION_DENIED"), Some("other_account")),
        "{v}"
    );
    let (code, v) = client.run("intervals", q, &acme, &["--run", "run-a"]);
    assert_eq!((code, v["batches"].as_u64()), (0, Some(10)), "{v}");
    // A node's certificate cannot read.
    let (code, v) = client.run("totals", q, &f.client_cert("n1"), &[]);
    assert_eq!(code, 3, "a node certificate read the ledger: {v}");
    assert_eq!(v["error"].as_str(), Some("UNAVAILABLE"), "{v}");

    // Every read is audited.
    drop(s);
    assert!(ledger.term().success());
    let (code, reads, err) = run_cli(&["reads", "--store", &f.store_text, "--format", "json"]);
    assert_eq!(code, 0, "{err}");
    let reads: serde_json::Value = serde_json::from_str(&reads)?;
    let rows = reads.as_array().expect("rows");
    let has = |reader: &str, call: &str, outcome: &str| {
        rows.iter().any(|r| {
            r["reader"] == reader
                && r["call"] == call
                && r["outcome"].as_str().is_some_and(|o| o.contains(outcome))
        })
    };
    assert!(
        has("view-acme", "RunTotals", "PermissionDenied"),
        "{reads:#}"
    );
    assert!(has("view-acme", "RunIntervals", "ok"), "{reads:#}");
    assert!(has("metering-pipeline", "Changes", "closed"), "{reads:#}");
    assert!(has("metering-pipeline", "RunTotals", "ok"), "{reads:#}");
    Ok(())
}

/// `python3` with the CloudEvents SDK importable, or a loud skip.
fn python_with_cloudevents() -> Option<PathBuf> {
    let py = wattd_testkit::need::which("python3")?;
    let ok = Command::new(&py)
        .args(["-c", "import cloudevents.core.bindings.http"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        wattd_testkit::skip(
            "CloudEvents export",
            "the Python package cloudevents 2 (pip install cloudevents)",
        );
        return None;
    }
    Some(py)
}

/// The receiver (`event_receiver.py`) as a child process, killed when dropped.
struct Receiver {
    child: std::process::Child,
    url: String,
    state: PathBuf,
}

impl Receiver {
    fn start(py: &Path, dir: &Path, tag: &str, fail_first: u32) -> Receiver {
        let port_file = dir.join(format!("receiver-{tag}.port"));
        let state = dir.join(format!("receiver-{tag}.json"));
        let child = Command::new(py)
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/event_receiver.py"))
            .arg(&port_file)
            .arg(&state)
            .args(["--fail-first", &fail_first.to_string(), "--delay-ms", "10"])
            .spawn()
            .expect("start the receiver");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let port = loop {
            if let Ok(p) = std::fs::read_to_string(&port_file) {
                break p;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the receiver did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        Receiver {
            child,
            url: format!("http://127.0.0.1:{port}/events"),
            state,
        }
    }

    fn state(&self) -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(&self.state).expect("receiver state"))
            .expect("receiver state JSON")
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// (node, run, domain) -> uJ over a receiver's unique events.
fn event_sums(state: &serde_json::Value) -> BTreeMap<(String, String, String), u128> {
    let mut sums = BTreeMap::new();
    for e in state["unique"].as_object().expect("unique").values() {
        let d = &e["data"];
        *sums
            .entry((
                d["node_id"].as_str().expect("node").to_owned(),
                d["run_id"].as_str().expect("run").to_owned(),
                d["domain"].as_str().expect("domain").to_owned(),
            ))
            .or_default() += u128::from(d["energy_uj"].as_u64().expect("uJ"));
    }
    sums
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudevents_reach_a_receiver_once_each_across_a_crash_of_the_exporter() -> TestResult {
    let name = "python::cloudevents_reach_a_receiver_once_each_across_a_crash_of_the_exporter";
    let Some(py) = python_with_cloudevents() else {
        return Ok(());
    };
    let Some(f) = Fixture::new(Backend::Sqlite, name).await else {
        return Ok(());
    };
    let mut chain = Chain::new(key("n1", 1, 1));
    f.enrol(&chain.key);
    let l = f.start(wattd_ledger::server::Limits::default()).await;
    let mut s = connect(&f, &l, "n1").await;
    for i in 0..40 {
        s.send(labelled_batch(&mut chain, i == 0, 2)).await?;
    }
    drop(s);
    l.stop().await;
    let bin = env!("CARGO_BIN_EXE_wattd-ledger");

    // On stdout: valid JSON lines, and the same ids every time.
    let export = |extra: &[&str]| {
        let out = Command::new(bin)
            .args(["events", "--store", &f.store_text])
            .args(extra)
            .output()
            .expect("events");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let first = export(&[]);
    assert_eq!(first, export(&[]), "a re-run gives identical events");
    let ids: HashSet<String> = first
        .lines()
        .map(|l| {
            let e: serde_json::Value = serde_json::from_str(l).expect("an event per line");
            assert_eq!(e["type"], "dev.wattd.run.energy.v1");
            e["id"].as_str().expect("id").to_owned()
        })
        .collect();
    assert_eq!(ids.len(), 80, "40 batches x 2 runs x 1 domain");
    let batches = export(&["--batch"]);
    assert_eq!(batches.lines().count(), 40, "one array per batch");

    // POSTed: the receiver answers 503 twice first; the exporter is SIGKILLed mid-way and
    // resumes from its cursor file.
    let receiver = Receiver::start(&py, f.dir.path(), "a", 2);
    let cursor = f.dir.path().join("events.cursor");
    let mut exporter = Command::new(bin)
        .args(["events", "--store", &f.store_text, "--post", &receiver.url])
        .arg("--cursor-file")
        .arg(&cursor)
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let got = receiver.state()["events_received"].as_u64().unwrap_or(0);
        if got >= 20 {
            break;
        }
        if let Some(status) = exporter.try_wait()? {
            panic!("the exporter ended before the crash ({status}); got {got}");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the exporter made no progress"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    exporter.kill()?;
    exporter.wait()?;
    let at_crash = receiver.state()["events_received"].as_u64().unwrap_or(0);
    assert!(
        at_crash < 80,
        "the crash came after everything was sent ({at_crash})"
    );
    let out = Command::new(bin)
        .args(["events", "--store", &f.store_text, "--post", &receiver.url])
        .arg("--cursor-file")
        .arg(&cursor)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let state = receiver.state();
    assert!(
        state["requests"].as_u64().unwrap_or(0) > 80,
        "the two 503s were retried: {}",
        state["requests"]
    );
    let unique: HashSet<String> = state["unique"]
        .as_object()
        .expect("unique")
        .values()
        .map(|e| e["id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(unique, ids, "each event exactly once after de-duplication");
    assert_eq!(event_sums(&state), billed(&f).await);
    eprintln!(
        "events: {} received, {} repeated after the crash, {} unique",
        state["events_received"],
        state["repeats"],
        unique.len()
    );

    // Batch mode to a fresh receiver: every event, validated one by one by the SDK.
    let batch_receiver = Receiver::start(&py, f.dir.path(), "b", 0);
    let out = Command::new(bin)
        .args([
            "events",
            "--store",
            &f.store_text,
            "--batch",
            "--post",
            &batch_receiver.url,
        ])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let state = batch_receiver.state();
    assert_eq!(state["requests"].as_u64(), Some(40));
    assert_eq!(event_sums(&state), billed(&f).await);
    Ok(())
}
