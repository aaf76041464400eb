//! Test fixtures: a throwaway CA, enrolled nodes, a store (a SQLite file or a PostgreSQL
//! database made for the test), a real ledger on 127.0.0.1 port 0 (in process or the binary),
//! real TLS clients, and genuinely signed, chained, conserving batches.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use prost::Message as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use wattd_ledger::metrics::Metrics;
use wattd_ledger::server::{self, Limits, ServeOptions};
use wattd_ledger::store::{AnyStore, OpenMode, StoreUrl};
use wattd_proto::v1::ledger_client::LedgerClient;
use wattd_proto::v1::{
    node_message, Ack, Allocation, DomainEnergy, Heartbeat, Interval, KeyRotation, NodeMessage,
    SignedBatch, SignedHeartbeat,
};
use wattd_records::batch::{ChainHash, StoredBatch, GENESIS_HASH};
use wattd_records::identity::NodeKey;
use wattd_records::seal::{sign_batch, BatchContent};
use wattd_tests::tls::{CertFiles, TestCa};

pub type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// Instantiates each named `async fn(Backend, &str) -> TestResult` of the calling module once
/// per store: `sqlite::<name>` and `postgres::<name>`.
macro_rules! both {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> crate::common::TestResult {
                    super::$name(crate::common::Backend::Sqlite, concat!(module_path!(), "::", stringify!($name))).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> crate::common::TestResult {
                    super::$name(crate::common::Backend::Postgres, concat!(module_path!(), "::", stringify!($name))).await
                }
            )*
        }
    };
}
pub(crate) use both;

/// Which store a test body runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The PostgreSQL URL to make test databases in, or None (after printing SKIPPED) when the
/// test cannot run here. Under the strict switch (CI), a missing server is a failure.
pub fn postgres_or_skip(test: &str) -> Option<String> {
    match std::env::var("WATTD_TEST_POSTGRES") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            wattd_testkit::skip(
                test,
                "PostgreSQL: `export WATTD_TEST_POSTGRES=$(.ci/start-postgres)` to run it",
            );
            None
        }
    }
}

/// A PostgreSQL database created for one test and dropped when it ends.
#[derive(Debug)]
pub struct PgDatabase {
    admin_url: String,
    name: String,
    pub url: String,
}

impl PgDatabase {
    /// A database of its own, made with `options` after `CREATE DATABASE name` (a locale,
    /// say; empty: the server's defaults).
    pub async fn create_with(
        admin_url: &str,
        options: &str,
    ) -> Result<Self, tokio_postgres::Error> {
        let mut seed = [0u8; 6];
        getrandom::getrandom(&mut seed).expect("random");
        let name = format!("wattd_test_{}", wattd_records::durable::hex(&seed));
        let (client, conn) = tokio_postgres::connect(admin_url, tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE {name} {options}"))
            .await?;
        let base = admin_url.rsplit_once('/').map_or(admin_url, |(b, _)| b);
        Ok(Self {
            admin_url: admin_url.to_owned(),
            url: format!("{base}/{name}"),
            name,
        })
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let admin = self.admin_url.clone();
        let name = self.name.clone();
        // A plain thread: Drop may run inside or outside a runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                if let Ok((client, conn)) =
                    tokio_postgres::connect(&admin, tokio_postgres::NoTls).await
                {
                    tokio::spawn(conn);
                    let _ = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}

/// Certificates, enrolment and a store for one test.
#[derive(Debug)]
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub ca: TestCa,
    pub server: CertFiles,
    pub enrolled: PathBuf,
    pub store_url: StoreUrl,
    pub store_text: String,
    _pg: Option<PgDatabase>,
}

impl Fixture {
    /// None when the backend cannot run here (PostgreSQL without WATTD_TEST_POSTGRES).
    pub async fn new(backend: Backend, test: &str) -> Option<Fixture> {
        Self::new_with(backend, test, "").await
    }

    /// [`Fixture::new`], the PostgreSQL database made with `pg_options` after its name.
    pub async fn new_with(backend: Backend, test: &str, pg_options: &str) -> Option<Fixture> {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = TestCa::new(dir.path(), "ledger");
        let server = ca.server("server");
        let enrolled = dir.path().join("enrolled");
        std::fs::create_dir(&enrolled).expect("mkdir");
        let (store_text, pg) = match backend {
            Backend::Sqlite => (
                format!("sqlite:{}", dir.path().join("ledger.db").display()),
                None,
            ),
            Backend::Postgres => {
                let admin = postgres_or_skip(test)?;
                let db = PgDatabase::create_with(&admin, pg_options)
                    .await
                    .expect("create database");
                (db.url.clone(), Some(db))
            }
        };
        Some(Fixture {
            store_url: store_text.parse().expect("store url"),
            store_text,
            dir,
            ca,
            server,
            enrolled,
            _pg: pg,
        })
    }

    /// Removes every enrolment file of `node`.
    pub fn unenrol(&self, node: &str) {
        for e in std::fs::read_dir(&self.enrolled)
            .expect("enrolled dir")
            .flatten()
        {
            if e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{node}-"))
            {
                std::fs::remove_file(e.path()).expect("unenrol");
            }
        }
    }

    /// Enrols `key` (one `wattd identity` file).
    pub fn enrol(&self, key: &NodeKey) {
        let file = self
            .enrolled
            .join(format!("{}-{}.toml", key.node_id(), key.epoch()));
        std::fs::write(file, key.public().to_toml().expect("public identity")).expect("enrol");
    }

    pub fn options(&self, limits: Limits) -> ServeOptions {
        ServeOptions {
            listen: "127.0.0.1:0".parse().expect("addr"),
            cert: self.server.cert.clone(),
            key: self.server.key.clone(),
            client_ca: self.ca.ca_pem.clone(),
            crl: None,
            enrolled: self.enrolled.clone(),
            store: self.store_url.clone(),
            metrics_listen: Some("127.0.0.1:0".parse().expect("addr")),
            metrics_web: None,
            limits,
            query: None,
            detail_retention: None,
        }
    }

    /// The readers' own CA (not the nodes') and a readers file naming `roles` (CN, role).
    pub fn readers(&self, roles: &[(&str, &str)]) -> Readers {
        let dir = self.dir.path().join("readers");
        std::fs::create_dir_all(&dir).expect("mkdir readers");
        let ca = TestCa::new(&dir, "readers");
        let file = dir.join("readers.toml");
        let mut text = String::from("[readers]\n");
        for (cn, role) in roles {
            text.push_str(&format!("{cn:?} = {role:?}\n"));
        }
        std::fs::write(&file, text).expect("readers file");
        Readers { ca, file }
    }

    /// Options with the query API on 127.0.0.1 port 0 for `readers`.
    pub fn query_options(&self, limits: Limits, readers: &Readers) -> ServeOptions {
        let mut o = self.options(limits);
        o.query = Some(wattd_ledger::server::QueryOptions {
            listen: "127.0.0.1:0".parse().expect("addr"),
            reader_ca: readers.ca.ca_pem.clone(),
            readers: readers.file.clone(),
            account_label: "account".into(),
            audit_retention: Duration::from_secs(400 * 86_400),
        });
        o
    }

    /// A ledger in this process.
    pub async fn start(&self, limits: Limits) -> Ledger {
        self.start_with(self.options(limits)).await
    }

    /// A ledger in this process, with these options.
    pub async fn start_with(&self, opts: ServeOptions) -> Ledger {
        let (bound, (snapshot_tx, _)) = server::bind(&opts).await.expect("bind the ledger");
        let addr = bound.local_addr();
        let query_addr = bound.query_addr();
        let metrics_addr = bound.metrics_addr();
        let metrics = bound.metrics();
        let reload = bound.reload_handle();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            bound
                .run(snapshot_tx, async {
                    let _ = stopped.await;
                })
                .await
        });
        Ledger {
            addr,
            query_addr,
            metrics_addr,
            metrics,
            reload,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// The store, opened for queries.
    /// The store, opened as `serve` opens it (the schema made).
    pub async fn query_store_serve(&self) -> AnyStore {
        AnyStore::open(&self.store_url, OpenMode::Serve)
            .await
            .expect("open the store to serve")
    }

    pub async fn query_store(&self) -> AnyStore {
        AnyStore::open(&self.store_url, OpenMode::Query)
            .await
            .expect("open the store for queries")
    }

    pub fn client_cert(&self, node: &str) -> CertFiles {
        self.ca.client(node)
    }
}

/// The readers' CA and readers file of a test.
#[derive(Debug)]
pub struct Readers {
    pub ca: TestCa,
    pub file: PathBuf,
}

/// A ledger running in this process.
#[derive(Debug)]
pub struct Ledger {
    pub addr: std::net::SocketAddr,
    /// The query API's address, when started with it.
    pub query_addr: Option<std::net::SocketAddr>,
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub metrics: Arc<Metrics>,
    /// What SIGHUP does: re-read the enrolment directory.
    pub reload: server::EnrolmentReload,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), server::ServeError>>>,
}

impl Ledger {
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let r = tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .expect("the ledger stops within 10 s");
            r.expect("join").expect("serve ends cleanly");
        }
    }

    pub fn rejections(&self, reason: wattd_ledger::metrics::Reason) -> u64 {
        self.metrics.rejections(reason)
    }
}

/// A TLS channel to `addr` with `identity` (None: no client certificate).
pub async fn channel(
    addr: std::net::SocketAddr,
    ca_pem: &Path,
    identity: Option<&CertFiles>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(
            std::fs::read(ca_pem).expect("read CA"),
        ))
        .domain_name("localhost");
    if let Some(id) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(&id.cert).expect("read cert"),
            std::fs::read(&id.key).expect("read key"),
        ));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .expect("endpoint")
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// One open node stream.
#[derive(Debug)]
pub struct NodeStream {
    tx: mpsc::Sender<NodeMessage>,
    acks: tonic::Streaming<Ack>,
}

impl NodeStream {
    /// Opens the node's stream: the ledger's response headers, or the status it refused it
    /// with. Neither within 30 s fails the test (once, under a full suite on two cores, a
    /// stream's open waited for ever: this names it instead of hanging the run).
    pub async fn open(channel: Channel) -> Result<Self, tonic::Status> {
        let (tx, rx) = mpsc::channel(64);
        let mut client = LedgerClient::new(channel).max_decoding_message_size(1 << 20);
        let acks = tokio::time::timeout(
            Duration::from_secs(30),
            client.stream(ReceiverStream::new(rx)),
        )
        .await
        .expect("the ledger answers a stream's open within 30 s")?
        .into_inner();
        Ok(Self { tx, acks })
    }

    /// Sends one message and waits for its Ack (or the status that ended the stream).
    pub async fn send(&mut self, msg: NodeMessage) -> Result<Ack, tonic::Status> {
        self.tx
            .send(msg)
            .await
            .map_err(|_| tonic::Status::unavailable("request stream closed"))?;
        self.recv().await
    }

    /// Queues a message without waiting.
    pub async fn push(&mut self, msg: NodeMessage) -> Result<(), tonic::Status> {
        self.tx
            .send(msg)
            .await
            .map_err(|_| tonic::Status::unavailable("request stream closed"))
    }

    pub async fn recv(&mut self) -> Result<Ack, tonic::Status> {
        match tokio::time::timeout(Duration::from_secs(30), self.acks.message()).await {
            Err(_) => Err(tonic::Status::deadline_exceeded("no ack within 30 s")),
            Ok(Ok(Some(a))) => Ok(a),
            Ok(Ok(None)) => Err(tonic::Status::unavailable("stream ended without a status")),
            Ok(Err(s)) => Err(s),
        }
    }
}

/// Opens a stream as `node` (certificate from the fixture's CA).
pub async fn connect(f: &Fixture, l: &Ledger, node: &str) -> NodeStream {
    let ch = channel(l.addr, &f.ca.ca_pem, Some(&f.client_cert(node)))
        .await
        .expect("connect");
    NodeStream::open(ch).await.expect("open stream")
}

/// One conserving interval: each run gets (active, idle); the host gets `host`.
pub fn interval(index: u64, runs: &[(&str, u64, u64)], host_uj: u64) -> Interval {
    let allocated: u64 = runs.iter().map(|(_, a, i)| a + i).sum();
    Interval {
        index,
        start_monotonic_ns: index * 1_000_000_000,
        end_monotonic_ns: (index + 1) * 1_000_000_000,
        policy: "proportional".into(),
        policy_version: 1,
        domains: vec![DomainEnergy {
            domain: "package".into(),
            package: Some(0),
            source: "estimator".into(),
            quality: 2,
            measured_uj: allocated + host_uj,
            allocations: runs
                .iter()
                .map(|(r, a, i)| Allocation {
                    run_id: (*r).to_owned(),
                    active_uj: *a,
                    idle_uj: *i,
                    usage_us: 1000,
                })
                .collect(),
            host_active_uj: host_uj,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// A node's chain: signs batches in order, as the sealer does.
#[derive(Debug)]
pub struct Chain {
    pub key: NodeKey,
    pub seq: u64,
    pub prev: ChainHash,
    pub batches: Vec<StoredBatch>,
    next_interval: u64,
    /// The running totals as of the last batch, as the sealer keeps them.
    totals: wattd_records::totals::RunningTotals,
    /// The per-run totals for the checkpoints, as the sealer keeps them.
    run_totals: wattd_records::totals::RunTotals,
}

impl Chain {
    pub fn new(key: NodeKey) -> Self {
        Self {
            key,
            seq: 0,
            prev: GENESIS_HASH,
            batches: Vec::new(),
            next_interval: 0,
            totals: wattd_records::totals::RunningTotals::starting_at(1),
            run_totals: wattd_records::totals::RunTotals::starting_at(1),
        }
    }

    /// The next batch with `intervals` intervals of runs "run-a" (10 + 5 uJ) and "run-b"
    /// (20 + 5 uJ) and 7 uJ of host.
    pub fn next(&mut self, intervals: u64) -> StoredBatch {
        let content = BatchContent {
            intervals: (0..intervals)
                .map(|i| {
                    interval(
                        self.next_interval + i,
                        &[("run-a", 10, 5), ("run-b", 20, 5)],
                        7,
                    )
                })
                .collect(),
            ..Default::default()
        };
        self.next_interval += intervals;
        self.next_with(content)
    }

    /// Reserves the next `n` interval indices of the chain (for a batch built by hand); returns
    /// the first.
    pub fn take_indices(&mut self, n: u64) -> u64 {
        let first = self.next_interval;
        self.next_interval += n;
        first
    }

    pub fn next_with(&mut self, mut content: BatchContent) -> StoredBatch {
        let seq = self.seq + 1;
        wattd_records::totals::stamp(seq, &mut content, &self.totals, &self.run_totals).apply(
            seq,
            &content.intervals,
            &content.run_summaries,
            &mut self.totals,
            &mut self.run_totals,
        );
        self.seq += 1;
        let b = sign_batch(&self.key, self.seq, self.prev, 1_700_000_000, content);
        self.prev = b.hash;
        self.batches.push(b.clone());
        b
    }

    /// The next batch announces `next` (epoch + 1) and the chain continues with it.
    pub fn rotate(&mut self, next: NodeKey) -> StoredBatch {
        let rotation = KeyRotation {
            new_key_epoch: next.epoch(),
            new_public_key: next.public_key().to_vec(),
            new_key_id: next.key_id().to_vec(),
            effective_seq: self.seq + 2,
            rotated_unix_ns: 1_700_000_000,
        };
        let b = self.next_with(BatchContent {
            intervals: vec![interval(self.next_interval, &[("run-a", 1, 1)], 1)],
            key_rotation: Some(rotation),
            ..Default::default()
        });
        self.next_interval += 1;
        self.key = next;
        b
    }

    pub fn heartbeat(&self, last_sealed_seq: u64) -> NodeMessage {
        heartbeat(&self.key, last_sealed_seq)
    }

    /// A statement, signed by the chain's current key, that `first..=last` (already built)
    /// are lost; the chain continues from batch `last`'s hash with the current key.
    pub fn loss(&self, first: u64, last: u64) -> NodeMessage {
        let anchor = &self.batches[usize::try_from(last - 1).expect("small")];
        let loss = wattd_records::loss::Loss {
            first_seq: first,
            last_seq: last,
            last_hash: anchor.hash,
            reason: wattd_proto::v1::LossReason::Damaged,
            next_key_epoch: self.key.epoch(),
            next_key_id: self.key.key_id().to_vec(),
            detail: format!("test: {first}..={last} damaged"),
            rotations: Vec::new(),
        };
        NodeMessage {
            kind: Some(node_message::Kind::Loss(wattd_records::loss::sign_loss(
                &self.key,
                &loss,
                1_700_000_002,
            ))),
        }
    }
}

pub fn heartbeat(key: &NodeKey, last_sealed_seq: u64) -> NodeMessage {
    let bytes = Heartbeat {
        node_id: key.node_id().to_owned(),
        sent_unix_ns: 1_700_000_001,
        last_sealed_seq,
        key_epoch: key.epoch(),
    }
    .encode_to_vec();
    NodeMessage {
        kind: Some(node_message::Kind::SignedHeartbeat(SignedHeartbeat {
            signature: key.sign(&bytes).to_vec(),
            heartbeat_bytes: bytes,
            key_id: key.key_id().to_vec(),
        })),
    }
}

pub fn msg(b: &StoredBatch) -> NodeMessage {
    signed_msg(SignedBatch::decode(b.bytes.as_slice()).expect("decode own batch"))
}

pub fn signed_msg(s: SignedBatch) -> NodeMessage {
    NodeMessage {
        kind: Some(node_message::Kind::Batch(s)),
    }
}

pub fn key(node: &str, epoch: u32, seed: u8) -> NodeKey {
    NodeKey::from_seed(node, epoch, [seed; 32])
}

/// GET /metrics from the ledger's endpoint.
pub async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

/// Waits (up to 5 s) until `f()` holds.
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("not within 5 s: {what}");
}
