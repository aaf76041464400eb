//! The ledger's queries as its store grows: fills a store through the ledger's own commit path
//! (each batch signed by its node, verified, judged and stored with its allocation rows and
//! hourly rollups in one transaction) and, at each size step, times a run's totals (the rollup
//! lookup `RunTotals` answers from), the same run over a time range that is not whole hours
//! (read from the allocation rows), and one node's totals over its whole history. Prints the
//! store's size per allocation and the fill rate beside them (no network here: the fleet bench
//! measures ingest over TLS). Before timing, each step runs the ledger's hourly upkeep, as a
//! serving ledger has by then.
//!
//! Nodes seal a batch of 10 one-second intervals every 10 s, `runs` runs each on two domains;
//! each run lives 10 minutes (then the node's next runs start), so a run has 1,200 allocations
//! and two hourly rollup rows per domain at most.
//!
//! `cargo bench -p wattd-ledger --bench growth -- steps=1000000,4000000 nodes=100 runs=10`
//! (allocations at each step; SQLite always, PostgreSQL too with `WATTD_TEST_POSTGRES` set, or
//! one with `store=sqlite` / `store=postgres`; `rows=none` fills a store that keeps no
//! per-interval rows, as `serve --detail-retention-days 0` does). By default each batch is
//! received at its seal time (January 2026, before any day partition: on PostgreSQL every row
//! is in the default partition); `days=N` spreads the batches' receipt over N days, each with
//! its day partition made before the fill, as a ledger that has kept its rows N days has them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message as _;
use wattd_ledger::check::{verify_batch, KnownKeys};
use wattd_ledger::enrol::EnrolledKey;
use wattd_ledger::plausible::NodeLimits;
use wattd_ledger::store::{AnyStore, Commit, OpenMode, Store, StoreUrl, TotalsFilter};
use wattd_proto::v1::SignedBatch;
use wattd_records::batch::{ChainHash, GENESIS_HASH};
use wattd_records::identity::NodeKey;
use wattd_records::seal::{sign_batch, BatchContent};

mod common;

/// 2026-01-01T00:00:00Z: batches are sealed from here, 10 s apart per node.
const BASE_UNIX_NS: i64 = 1_767_225_600_000_000_000;
const INTERVALS: u64 = 10;
/// Batches per run generation (10 minutes).
const GENERATION: u64 = 60;

struct Opts {
    steps: Vec<u64>,
    nodes: usize,
    runs: u64,
    store: Option<String>,
    /// `rows=none`: the store keeps no per-interval rows (`serve --detail-retention-days 0`),
    /// so every read of per-interval detail decodes the signed batches.
    no_rows: bool,
    /// `days=N`: batches received over N days, a day partition each (0: at their seal time).
    days: u64,
}

fn opts() -> Opts {
    let mut o = Opts {
        steps: vec![1_000_000, 4_000_000],
        nodes: 100,
        runs: 10,
        store: None,
        no_rows: false,
        days: 0,
    };
    for a in std::env::args().skip(1) {
        let Some((k, v)) = a.split_once('=') else {
            continue; // cargo bench passes --bench
        };
        let n = |v: &str| {
            v.parse::<u64>()
                .unwrap_or_else(|_| panic!("{k}={v}: not a number"))
        };
        match k {
            "steps" => o.steps = v.split(',').map(n).collect(),
            "nodes" => o.nodes = usize::try_from(n(v)).expect("nodes").max(1),
            "runs" => o.runs = n(v).max(1),
            "store" => o.store = Some(v.to_owned()),
            "rows" => {
                o.no_rows = match v {
                    "none" => true,
                    "kept" => false,
                    _ => panic!("rows={v}: none or kept"),
                }
            }
            "days" => o.days = n(v),
            _ => panic!("unknown option {k} (steps=, nodes=, runs=, store=, rows=, days=)"),
        }
    }
    o.steps.sort_unstable();
    assert!(
        !(o.no_rows && o.days > 0),
        "days= spreads the rows over day partitions: rows=none keeps none"
    );
    o
}

struct Node {
    key: NodeKey,
    keys: KnownKeys,
    seq: u64,
    prev: ChainHash,
}

impl Node {
    fn new(i: usize) -> Node {
        let mut seed = [9u8; 32];
        seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let key = NodeKey::from_seed(&format!("n{i:03}"), 1, seed);
        let mut enrolled = std::collections::BTreeMap::new();
        enrolled.insert(
            1,
            EnrolledKey {
                identity: key.public(),
                key_id: key.key_id(),
                file: "bench".into(),
            },
        );
        let keys = KnownKeys::new(key.node_id(), &enrolled);
        Node {
            key,
            keys,
            seq: 0,
            prev: GENESIS_HASH,
        }
    }

    /// The run id of run `r` of generation `g` on this node.
    fn run_id(&self, g: u64, r: u64) -> String {
        format!("{}-g{g}-run-{r:04}", self.key.node_id())
    }

    /// The next batch, signed, verified as the ledger verifies it. Returns it and its seal time.
    fn next(&mut self, runs: u64) -> (wattd_ledger::check::VerifiedBatch, i64) {
        self.seq += 1;
        let g = (self.seq - 1) / GENERATION;
        let boot = format!("{}-boot", self.key.node_id());
        let intervals = ((self.seq - 1) * INTERVALS..self.seq * INTERVALS)
            .map(|i| {
                let mut iv = common::interval(i + 1, &boot, runs);
                for d in &mut iv.domains {
                    for (r, a) in d.allocations.iter_mut().enumerate() {
                        a.run_id = self.run_id(g, r as u64);
                    }
                }
                iv
            })
            .collect();
        let sealed = BASE_UNIX_NS + i64::try_from(self.seq).expect("seq") * 10_000_000_000;
        let b = sign_batch(
            &self.key,
            self.seq,
            self.prev,
            sealed,
            BatchContent {
                intervals,
                ..Default::default()
            },
        );
        self.prev = b.hash;
        let signed = SignedBatch::decode(b.bytes.as_slice()).expect("own batch");
        let vb = verify_batch(self.key.node_id(), &self.keys, &signed).expect("own batch verifies");
        (vb, sealed)
    }
}

/// Nanoseconds in a day (the ledger's partitions are days of receipt).
const DAY_NS: u64 = 86_400_000_000_000;

/// The day partitions of `days=N` (as the ledger names them), made before the fill: the
/// ledger's own upkeep makes them only around the present day.
async fn make_day_partitions(url: &str, days: u64) {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to postgres");
    tokio::spawn(conn);
    let first = BASE_UNIX_NS.div_euclid(DAY_NS as i64);
    for day in first..first + i64::try_from(days).expect("days") {
        client
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS allocations_day_{day} PARTITION OF allocations \
                 FOR VALUES FROM ({day}) TO ({})",
                day + 1
            ))
            .await
            .expect("a day partition");
    }
}

/// p50 and p99 of `n` calls of `run_totals_where(filter)`, in milliseconds.
async fn time(n: usize, store: &AnyStore, filter: &TotalsFilter) -> (f64, f64) {
    let mut t = Vec::with_capacity(n);
    for _ in 0..n {
        let s = Instant::now();
        let rows = store
            .run_totals_where(filter.clone())
            .await
            .expect("totals")
            .len();
        t.push(s.elapsed());
        assert!(rows > 0, "the query found nothing");
    }
    t.sort();
    let at = |p: f64| t[((t.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3;
    (at(0.5), at(0.99))
}

async fn run(label: &str, url: String, o: &Opts) {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = url.replace("{dir}", &dir.path().display().to_string());
    let parsed: StoreUrl = url.parse().expect("store url");
    let store = Arc::new(
        AnyStore::open(&parsed, OpenMode::Serve)
            .await
            .expect("open"),
    );
    if o.no_rows {
        store
            .upkeep_detail(wattd_ledger::unix_now_ns(), Some(Duration::ZERO))
            .await
            .expect("rows off");
    }
    let limits = Arc::new(NodeLimits::new(&Default::default(), i64::MAX));
    let mut nodes: Vec<Node> = (0..o.nodes).map(Node::new).collect();
    let per_batch = INTERVALS * o.runs * 2;
    // `days=N`: the receipt of the largest step's batches spread evenly over N days, never
    // before a batch's seal (a node's batches are received late, not early).
    // The fill commits whole rounds of every node's next batch.
    let nodes_n = o.nodes as u64;
    let last_step = o.steps.last().copied().unwrap_or(0);
    let total_batches = last_step.div_ceil(per_batch).div_ceil(nodes_n).max(1) * nodes_n;
    let received_step_ns = i64::try_from(o.days * DAY_NS / total_batches).expect("step");
    if o.days > 0 && !url.starts_with("sqlite:") {
        make_day_partitions(&url, o.days).await;
    }
    let mut batches: i64 = 0;
    let mut stored: u64 = 0;
    let mut fill = Duration::ZERO;
    println!(
        "{label}: {} nodes x {} runs, {per_batch} allocations a batch, per-interval rows {}, \
         received {}",
        o.nodes,
        o.runs,
        if o.no_rows { "none" } else { "kept" },
        if o.days > 0 {
            format!("over {} days", o.days)
        } else {
            "at their seal time".to_owned()
        }
    );
    for &step in &o.steps {
        let t = Instant::now();
        while stored < step {
            // Round robin, as a fleet's batches arrive.
            for n in &mut nodes {
                let (vb, sealed) = n.next(o.runs);
                let received = if o.days > 0 {
                    sealed.max(BASE_UNIX_NS + batches * received_step_ns)
                } else {
                    sealed
                };
                batches += 1;
                match store.commit(Arc::new(vb), limits.clone(), received).await {
                    Ok(Commit::Stored { verdict }) if verdict == Default::default() => {}
                    other => panic!("batch not stored, or stored in quarantine: {other:?}"),
                }
                stored += per_batch;
            }
        }
        fill += t.elapsed();
        // The ledger's hourly upkeep, as a serving ledger has run it since the fill (on
        // PostgreSQL it refreshes the partitioned table's planner statistics, which autovacuum
        // never does), with the retention the store was filled under.
        let retention = o.no_rows.then_some(Duration::ZERO);
        store
            .upkeep_detail(wattd_ledger::unix_now_ns(), retention)
            .await
            .expect("upkeep");
        let bytes = common::store_bytes(&url, dir.path()).await;
        // A run of node 0's last finished generation (every one of its batches stored).
        let n0 = &nodes[0];
        let g = (n0.seq / GENERATION).saturating_sub(1);
        let run = n0.run_id(g, o.runs / 2);
        let node = n0.key.node_id().to_owned();
        let by_run = TotalsFilter {
            run_id: Some(run.clone()),
            ..Default::default()
        };
        let (r50, r99) = time(50, &store, &by_run).await;
        // Not whole hours: answered from the allocation rows joined with their batches (with
        // no rows: from the batches of the hours the run's totals name, decoded).
        let by_run_range = TotalsFilter {
            run_id: Some(run.clone()),
            from_unix_ns: Some(BASE_UNIX_NS + 1),
            ..Default::default()
        };
        let (a50, a99) = time(50, &store, &by_run_range).await;
        let by_node = TotalsFilter {
            node_id: Some(node),
            ..Default::default()
        };
        let (n50, n99) = time(20, &store, &by_node).await;
        println!(
            "{label} {stored:>11} allocations ({:.0} node-hours): {:.0} bytes per allocation; \
             filled at {:.0} allocations/s; a run's totals p50 {r50:.2} ms p99 {r99:.2} ms; \
             the run over a time range (allocation rows) p50 {a50:.2} ms p99 {a99:.2} ms; a \
             node's totals ({} runs) p50 {n50:.2} ms p99 {n99:.2} ms",
            nodes.iter().map(|n| n.seq).sum::<u64>() as f64 * 10.0 / 3600.0,
            bytes as f64 / stored as f64,
            stored as f64 / fill.as_secs_f64(),
            (n0.seq / GENERATION + 1) * o.runs,
        );
    }
}

fn main() {
    let o = opts();
    common::on_each_store(o.store.as_deref(), "wattd_growth", |label, url| {
        run(label, url, &o)
    });
}
