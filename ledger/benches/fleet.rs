//! The fleet load generator: N nodes, each with its own Ed25519 key, its own client certificate
//! and its own mutual-TLS gRPC stream, sealing one batch every K seconds (K one-second intervals
//! of R runs x 2 domains: K = 1 is the agent's default at 1 Hz, `[spool] seal_every_ms = 1000`;
//! K = 10 is `seal_every_ms = 10000`) against the real `wattd-ledger serve` in a process of its own.
//! Reports batches/s and allocations/s stored, ack latency p50/p99 (from send to the Ack that
//! covers the batch), the ledger process's own CPU (utime + stime from /proc, in cores), the
//! allocations/s per core of it, and the store's growth in bytes per node-day and per
//! allocation. On a 2-core VM the generator, the ledger and PostgreSQL share the cores.
//!
//! `cargo bench -p wattd-ledger --bench fleet -- nodes=100 secs=30 runs=10 intervals=1`
//! (defaults: 100 nodes, 30 s measured after 5 s of warm-up, 10 runs, 1 interval a batch). SQLite always; PostgreSQL too with
//! `WATTD_TEST_POSTGRES` set (`export WATTD_TEST_POSTGRES=$(.ci/start-postgres)`), or only one
//! with `store=sqlite` / `store=postgres`. `retention=D` serves with `--detail-retention-days D`
//! (`retention=0`: no per-interval rows are stored).

use std::collections::VecDeque;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Mutex};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use wattd_proto::v1::ledger_client::LedgerClient;
use wattd_proto::v1::NodeMessage;
use wattd_records::batch::{ChainHash, GENESIS_HASH};
use wattd_records::identity::NodeKey;

mod common;

struct Opts {
    nodes: usize,
    secs: u64,
    warmup: u64,
    runs: u64,
    /// Intervals a batch, one a second: a node seals every `intervals` seconds.
    intervals: u64,
    store: Option<String>,
    /// `serve --detail-retention-days` (0: no per-interval rows; absent: kept).
    retention_days: Option<u64>,
}

fn opts() -> Opts {
    let mut o = Opts {
        nodes: 100,
        secs: 30,
        warmup: 5,
        runs: 10,
        intervals: 1,
        store: None,
        retention_days: None,
    };
    for a in std::env::args().skip(1) {
        let Some((k, v)) = a.split_once('=') else {
            continue; // cargo bench passes --bench
        };
        let n = || {
            v.parse::<u64>()
                .unwrap_or_else(|_| panic!("{k}={v}: not a number"))
        };
        match k {
            "nodes" => o.nodes = usize::try_from(n()).expect("nodes"),
            "secs" => o.secs = n(),
            "warmup" => o.warmup = n(),
            "runs" => o.runs = n(),
            "intervals" => o.intervals = n().max(1),
            "store" => o.store = Some(v.to_owned()),
            "retention" => o.retention_days = Some(n()),
            _ => panic!(
                "unknown option {k} (nodes=, secs=, warmup=, runs=, intervals=, store=, \
                 retention=)"
            ),
        }
    }
    o
}

/// One node's batch `seq`: `k` consecutive one-second intervals of `runs` runs each.
fn batch(key: &NodeKey, seq: u64, prev: ChainHash, runs: u64, k: u64) -> (NodeMessage, ChainHash) {
    let boot = format!("{}-boot", key.node_id());
    let intervals = ((seq - 1) * k..seq * k)
        .map(|i| common::interval(i + 1, &boot, runs))
        .collect();
    common::signed(key, seq, prev, intervals)
}

/// What the nodes measured in the window.
#[derive(Default)]
struct Tally {
    /// Send to Ack, of the batches sent in the window.
    latencies: Vec<Duration>,
    /// Batches sent in the window, and those acknowledged by the drain's end.
    sent: u64,
    acked: u64,
    /// Batches acknowledged in the window (whenever sent): what the ledger kept up with.
    acked_in_window: u64,
}

impl Tally {
    /// An Ack for every batch up to `acked_seq`, received `now`.
    fn settle(
        &mut self,
        sent: &mut VecDeque<(u64, Instant)>,
        acked_seq: u64,
        now: Instant,
        window: (Instant, Instant),
    ) {
        let inside = |t: Instant| t >= window.0 && t < window.1;
        while sent.front().is_some_and(|&(s, _)| s <= acked_seq) {
            let Some((_, t0)) = sent.pop_front() else {
                break;
            };
            if inside(t0) {
                self.latencies.push(now - t0);
                self.acked += 1;
            }
            if inside(now) {
                self.acked_in_window += 1;
            }
        }
    }
}

fn cpu_s(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("process stat");
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')').expect("stat") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().expect("utime") + f[12].parse::<f64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks / hz
}

// The child is handed to the caller, which stops and waits for it (clippy sees only this body).
#[allow(clippy::zombie_processes)]
fn start_ledger(
    dir: &Path,
    ca: &wattd_tests::tls::TestCa,
    store: &str,
    retention_days: Option<u64>,
) -> (Child, String) {
    let server = ca.server("server");
    let ready = dir.join("ready.json");
    let log = std::fs::File::create(dir.join("ledger.log")).expect("log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_wattd-ledger"))
        .args(["serve", "--listen", "127.0.0.1:0", "--store", store])
        .arg("--cert")
        .arg(&server.cert)
        .arg("--key")
        .arg(&server.key)
        .arg("--client-ca")
        .arg(&ca.ca_pem)
        .arg("--enrolled")
        .arg(dir.join("enrolled"))
        .arg("--ready-file")
        .arg(&ready)
        .args(retention_days.map(|d| format!("--detail-retention-days={d}")))
        // Every node connects from 127.0.0.1 here.
        .args([
            "--max-connections",
            "100000",
            "--max-connections-per-source",
            "100000",
        ])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start wattd-ledger");
    let t = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(&ready) {
            let v: serde_json::Value = serde_json::from_str(&text).expect("ready file");
            return (child, v["listen"].as_str().expect("listen").to_owned());
        }
        if t.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the ledger did not start: {}",
                std::fs::read_to_string(dir.join("ledger.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn run(label: &str, store: String, o: &Opts) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = wattd_tests::tls::TestCa::new(dir.path(), "fleet");
    let enrolled = dir.path().join("enrolled");
    std::fs::create_dir(&enrolled).expect("mkdir");
    let store = store.replace("{dir}", &dir.path().display().to_string());
    let keys: Vec<NodeKey> = (0..o.nodes)
        .map(|i| {
            let mut seed = [7u8; 32];
            seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
            NodeKey::from_seed(&format!("node-{i:05}"), 1, seed)
        })
        .collect();
    let mut identities = Vec::new();
    for k in &keys {
        std::fs::write(
            enrolled.join(format!("{}.toml", k.node_id())),
            k.public().to_toml().expect("public identity"),
        )
        .expect("enrol");
        let c = ca.client(k.node_id());
        identities.push(Identity::from_pem(
            std::fs::read(&c.cert).expect("cert"),
            std::fs::read(&c.key).expect("key"),
        ));
    }
    let ca_pem = Certificate::from_pem(std::fs::read(&ca.ca_pem).expect("ca"));
    let (mut ledger, addr) = start_ledger(dir.path(), &ca, &store, o.retention_days);
    let bytes_empty = common::store_bytes(&store, dir.path()).await;

    // Every node connects first (handshakes are not the steady state), then all start together,
    // each at its own phase within the second.
    let tally = Arc::new(Mutex::new(Tally::default()));
    let start = Instant::now() + Duration::from_secs(2) + Duration::from_millis(o.nodes as u64);
    let window = (
        start + Duration::from_secs(o.warmup),
        start + Duration::from_secs(o.warmup + o.secs),
    );
    let mut tasks = Vec::new();
    for (i, (key, identity)) in keys.into_iter().zip(identities).enumerate() {
        let tls = ClientTlsConfig::new()
            .ca_certificate(ca_pem.clone())
            .identity(identity)
            .domain_name("localhost");
        let channel = Endpoint::from_shared(format!("https://{addr}"))
            .expect("endpoint")
            .tls_config(tls)
            .expect("tls")
            .connect()
            .await
            .unwrap_or_else(|e| panic!("node {i}: connect: {e}"));
        let (tally, runs, nodes, k) = (tally.clone(), o.runs, o.nodes, o.intervals);
        tasks.push(tokio::spawn(async move {
            let (tx, rx) = mpsc::channel(64);
            let mut acks = LedgerClient::new(channel)
                .stream(ReceiverStream::new(rx))
                .await
                .expect("stream")
                .into_inner();
            let phase = Duration::from_micros(k * 1_000_000 * i as u64 / nodes as u64);
            let mut tick = tokio::time::interval_at((start + phase).into(), Duration::from_secs(k));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let (mut seq, mut prev) = (0u64, GENESIS_HASH);
            let mut sent: VecDeque<(u64, Instant)> = VecDeque::new();
            let mut mine = Tally::default();
            loop {
                tokio::select! {
                    at = tick.tick() => {
                        if at.into_std() >= window.1 {
                            break;
                        }
                        seq += 1;
                        let now = Instant::now();
                        if now >= window.0 && now < window.1 {
                            mine.sent += 1;
                        }
                        let (m, h) = batch(&key, seq, prev, runs, k);
                        prev = h;
                        sent.push_back((seq, now));
                        if tx.send(m).await.is_err() {
                            panic!("{}: the stream closed", key.node_id());
                        }
                    }
                    ack = acks.message() => {
                        let ack = ack.expect("ack").expect("the ledger ended the stream");
                        mine.settle(&mut sent, ack.acked_seq, Instant::now(), window);
                    }
                }
            }
            // The acks still owed for batches sent in the window.
            let deadline = Instant::now() + Duration::from_secs(30);
            while !sent.is_empty() && Instant::now() < deadline {
                let Ok(Ok(Some(ack))) =
                    tokio::time::timeout(Duration::from_secs(30), acks.message()).await
                else {
                    break;
                };
                mine.settle(&mut sent, ack.acked_seq, Instant::now(), window);
            }
            let mut t = tally.lock().await;
            t.latencies.extend(mine.latencies);
            t.acked += mine.acked;
            t.sent += mine.sent;
            t.acked_in_window += mine.acked_in_window;
        }));
    }
    tokio::time::sleep_until(window.0.into()).await;
    let pid = ledger.id().to_string();
    let (cpu0, gen0) = (cpu_s(&pid), cpu_s("self"));
    let bytes0 = common::store_bytes(&store, dir.path()).await;
    tokio::time::sleep_until(window.1.into()).await;
    let (cpu1, gen1) = (cpu_s(&pid), cpu_s("self"));
    let bytes1 = common::store_bytes(&store, dir.path()).await;
    for t in tasks {
        t.await.expect("node task");
    }
    // SAFETY: our own child.
    unsafe { libc::kill(ledger.id() as i32, libc::SIGTERM) };
    let _ = ledger.wait();
    // Past the retention: every allocation row pruned as `serve --detail-retention-days 1`
    // prunes them three days on; what stays (the signed batches, the hourly run totals, their
    // indexes) per allocation stored, warm-up included.
    let kept = {
        use wattd_ledger::store::{AnyStore, OpenMode, Store as _, StoreUrl};
        let url: StoreUrl = store.parse().expect("store url");
        let s = AnyStore::open(&url, OpenMode::Serve)
            .await
            .expect("open the store");
        let batches: u64 = s
            .nodes()
            .await
            .expect("nodes")
            .iter()
            .map(|n| n.batches)
            .sum();
        let day = 86_400_000_000_000i64;
        s.upkeep_detail(
            wattd_ledger::unix_now_ns() + 3 * day,
            Some(Duration::from_secs(86_400)),
        )
        .await
        .expect("prune the rows");
        drop(s);
        let bytes = common::store_bytes(&store, dir.path()).await;
        (
            bytes.saturating_sub(bytes_empty) as f64,
            batches * o.runs * 2 * o.intervals,
        )
    };

    let t = tally.lock().await;
    let mut lat = t.latencies.clone();
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len().max(1) - 1) as f64 * p).round() as usize)
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
    };
    let secs = o.secs as f64;
    let batches_s = t.acked_in_window as f64 / secs;
    let allocs_s = batches_s * o.runs as f64 * 2.0 * o.intervals as f64;
    let cores = (cpu1 - cpu0) / secs;
    let growth = bytes1.saturating_sub(bytes0) as f64;
    let per_core = if cores > 0.0 {
        allocs_s / cores
    } else {
        f64::NAN
    };
    println!(
        "{label:<8} {:>5} nodes x {:>2} runs x {:>2} intervals a batch: {batches_s:>6.1} batches/s stored ({:.0} sent/s, \
         {:.1}% of them acked by the end), {allocs_s:>7.0} allocations/s; ack p50 {:>7.1} ms, \
         p99 {:>7.1} ms; ledger {cores:>5.2} cores = {per_core:>7.0} allocations/s per core \
         (generator {:.2} cores); store +{:.1} MiB = {:.1} MiB per node-day, {:.0} bytes per \
         allocation; past the retention {:.1} MiB per node-day, {:.0} bytes per allocation",
        o.nodes,
        o.runs,
        o.intervals,
        t.sent as f64 / secs,
        100.0 * t.acked as f64 / t.sent.max(1) as f64,
        pct(0.5),
        pct(0.99),
        (gen1 - gen0) / secs,
        growth / 1048576.0,
        growth / (o.nodes as f64 * secs) * 86400.0 / 1048576.0,
        growth / (allocs_s * secs).max(1.0),
        kept.0 / kept.1.max(1) as f64 * allocs_s / o.nodes as f64 * 86400.0 / 1048576.0,
        kept.0 / kept.1.max(1) as f64,
    );
}

fn main() {
    let o = opts();
    common::on_each_store(o.store.as_deref(), "wattd_fleet", |label, url| {
        run(label, url, &o)
    });
}
