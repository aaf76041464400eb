//! Ledger ingest over loopback mutual TLS: acknowledgement latency (p50/p99, one batch in
//! flight) and throughput (intervals/s, 16 batches in flight), for SQLite and PostgreSQL (the
//! latter only with WATTD_TEST_POSTGRES set: `export WATTD_TEST_POSTGRES=$(.ci/start-postgres)`).
//!
//! `cargo bench -p wattd-ledger --bench ingest` (add `-- quick` for a short run). Batches are
//! shaped like the spool bench's: 10 intervals x 20 runs x 2 domains, real Ed25519 signatures,
//! each committed with its 400 allocation rows in one durable transaction.

use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use wattd_ledger::server::{self, Limits, ServeOptions};
use wattd_proto::v1::ledger_client::LedgerClient;
use wattd_proto::v1::NodeMessage;
use wattd_records::batch::GENESIS_HASH;
use wattd_records::identity::NodeKey;

mod common;

const INTERVALS: u64 = 10;
const RUNS: u64 = 20;

fn batches(key: &NodeKey, n: u64) -> Vec<NodeMessage> {
    let mut prev = GENESIS_HASH;
    let mut out = Vec::new();
    for seq in 1..=n {
        let intervals = (0..INTERVALS)
            .map(|i| common::interval(seq * INTERVALS + i, "bench-boot", RUNS))
            .collect();
        let (msg, hash) = common::signed(key, seq, prev, intervals);
        prev = hash;
        out.push(msg);
    }
    out
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn run(label: &str, store: String, n_latency: u64, n_throughput: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = wattd_tests::tls::TestCa::new(dir.path(), "bench");
    let server_cert = ca.server("server");
    let enrolled = dir.path().join("enrolled");
    std::fs::create_dir(&enrolled).expect("mkdir");
    let store = store.replace("{dir}", &dir.path().display().to_string());
    let mut limits = Limits::default();
    limits.service.node_batches_per_s = None;
    let opts = ServeOptions {
        listen: "127.0.0.1:0".parse().expect("addr"),
        cert: server_cert.cert.clone(),
        key: server_cert.key.clone(),
        client_ca: ca.ca_pem.clone(),
        crl: None,
        enrolled: enrolled.clone(),
        store: store.parse().expect("store"),
        metrics_listen: None,
        metrics_web: None,
        limits,
        query: None,
        detail_retention: None,
    };
    // Two nodes: one for the latency run, one for the throughput run (each starts at seq 1).
    let keys = [
        NodeKey::from_seed("lat", 1, [1; 32]),
        NodeKey::from_seed("thr", 1, [2; 32]),
    ];
    for k in &keys {
        std::fs::write(
            enrolled.join(format!("{}.toml", k.node_id())),
            k.public().to_toml().expect("public identity"),
        )
        .expect("enrol");
    }
    let (bound, (snap, _)) = server::bind(&opts).await.expect("bind");
    let addr = bound.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(bound.run(snap, async {
        let _ = stopped.await;
    }));

    let mut results = Vec::new();
    for (key, n, window) in [(&keys[0], n_latency, 1usize), (&keys[1], n_throughput, 16)] {
        let client = ca.client(key.node_id());
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(
                std::fs::read(&ca.ca_pem).expect("ca"),
            ))
            .identity(Identity::from_pem(
                std::fs::read(&client.cert).expect("cert"),
                std::fs::read(&client.key).expect("key"),
            ))
            .domain_name("localhost");
        let channel = Endpoint::from_shared(format!("https://{addr}"))
            .expect("endpoint")
            .tls_config(tls)
            .expect("tls")
            .connect()
            .await
            .expect("connect");
        let msgs = batches(key, n);
        let (tx, rx) = mpsc::channel(64);
        let mut acks = LedgerClient::new(channel)
            .stream(ReceiverStream::new(rx))
            .await
            .expect("stream")
            .into_inner();
        let mut sent_at = std::collections::VecDeque::new();
        let mut latencies = Vec::new();
        let mut it = msgs.into_iter();
        let started = Instant::now();
        let mut last = 0;
        loop {
            while sent_at.len() < window {
                let Some(m) = it.next() else { break };
                sent_at.push_back(Instant::now());
                tx.send(m).await.expect("send");
            }
            let Some(t0) = sent_at.pop_front() else { break };
            let ack = acks.message().await.expect("ack").expect("ack");
            latencies.push(t0.elapsed());
            last = ack.acked_seq;
        }
        let elapsed = started.elapsed();
        assert_eq!(last, n, "every batch acknowledged");
        latencies.sort();
        results.push((window, n, elapsed, latencies));
    }
    for (window, n, elapsed, lat) in &results {
        let secs = elapsed.as_secs_f64();
        println!(
            "{label:<8} in-flight {window:>2}: {n:>5} batches in {secs:>6.2} s = {:>7.0} batches/s, \
             {:>8.0} intervals/s; ack latency p50 {:>7.2} ms, p99 {:>7.2} ms",
            *n as f64 / secs,
            (*n * INTERVALS) as f64 / secs,
            pct(lat, 0.50).as_secs_f64() * 1e3,
            pct(lat, 0.99).as_secs_f64() * 1e3,
        );
    }
    let _ = stop.send(());
    let _ = task.await;
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let (n_lat, n_thr) = if quick { (100, 300) } else { (500, 2000) };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        run("sqlite", "sqlite:{dir}/ledger.db".into(), n_lat, n_thr).await;
        if let Some(db) = common::ScratchDb::create("wattd_bench").await {
            run("postgres", db.url.clone(), n_lat, n_thr).await;
            db.drop_db().await;
        }
    });
}
