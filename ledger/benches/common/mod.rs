//! The batches the ledger benches send: what an honest node seals, with real signatures.

use std::path::Path;

use prost::Message as _;
use wattd_proto::v1::{node_message, Allocation, DomainEnergy, Interval, NodeMessage, SignedBatch};
use wattd_records::batch::ChainHash;
use wattd_records::identity::NodeKey;
use wattd_records::seal::{sign_batch, BatchContent};

/// Interval `index` of boot `boot_id`: one second (intervals tile one boot, as an honest node's
/// do: what the plausibility judge sees), `runs` runs on the package and DRAM meters, each meter
/// conserved exactly.
pub fn interval(index: u64, boot_id: &str, runs: u64) -> Interval {
    Interval {
        index,
        start_monotonic_ns: index * 1_000_000_000,
        end_monotonic_ns: (index + 1) * 1_000_000_000,
        boot_id: boot_id.into(),
        policy: "proportional".into(),
        policy_version: 1,
        domains: ["package", "dram"]
            .iter()
            .map(|d| DomainEnergy {
                domain: (*d).into(),
                package: Some(0),
                source: "powercap".into(),
                quality: 1,
                measured_uj: runs * 1500 + 123,
                allocations: (0..runs)
                    .map(|r| Allocation {
                        run_id: format!("run-{r:04}"),
                        active_uj: 1000,
                        idle_uj: 500,
                        usage_us: 10_000,
                    })
                    .collect(),
                host_active_uj: 123,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// Batch `seq` of `key`'s chain (after `prev`), signed, as the message a node sends, with its
/// hash (the next batch's `prev`).
#[allow(dead_code)] // the growth bench commits through the store, not a stream
pub fn signed(
    key: &NodeKey,
    seq: u64,
    prev: ChainHash,
    intervals: Vec<Interval>,
) -> (NodeMessage, ChainHash) {
    let b = sign_batch(
        key,
        seq,
        prev,
        1,
        BatchContent {
            intervals,
            ..Default::default()
        },
    );
    let msg = NodeMessage {
        kind: Some(node_message::Kind::Batch(
            SignedBatch::decode(b.bytes.as_slice()).expect("own batch"),
        )),
    };
    (msg, b.hash)
}

/// A scratch database on the PostgreSQL server of `WATTD_TEST_POSTGRES`, dropped by
/// [`ScratchDb::drop_db`]; `None` (and a SKIPPED line) when the variable is not set.
pub struct ScratchDb {
    admin: tokio_postgres::Client,
    name: String,
    /// The store URL of the database.
    pub url: String,
}

impl ScratchDb {
    pub async fn create(prefix: &str) -> Option<ScratchDb> {
        let admin = match std::env::var("WATTD_TEST_POSTGRES") {
            Ok(a) if !a.is_empty() => a,
            _ => {
                eprintln!(
                    "SKIPPED postgres: WATTD_TEST_POSTGRES is not set; `export \
                     WATTD_TEST_POSTGRES=$(.ci/start-postgres)` to bench it"
                );
                return None;
            }
        };
        let (client, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
            .await
            .expect("connect to postgres");
        tokio::spawn(conn);
        let name = format!("{prefix}_{}", std::process::id());
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
        let url = format!("{base}/{name}");
        Some(ScratchDb {
            admin: client,
            name,
            url,
        })
    }

    /// Drops the database, retrying while a pool's connections still come back (a bench's
    /// store may be closing them as this runs); says so if it could not.
    pub async fn drop_db(self) {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        // FORCE cannot end a backend of another role: an autovacuum worker still analyzing a
        // large fill's partitions makes the drop fail until it is done, so wait for it (a minute).
        let mut last = None;
        for _ in 0..240 {
            match self.admin.batch_execute(&sql).await {
                Ok(()) => return,
                Err(e) => last = Some(e.as_db_error().map_or(e.to_string(), |d| d.to_string())),
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
        if let Some(e) = last {
            eprintln!("could not drop the scratch database {}: {e}", self.name);
        }
    }
}

/// The store's size: SQLite's logical size (pages in use, WAL content included; the -wal file
/// never shrinks between checkpoints, so file sizes would be off by up to its size), or
/// `pg_database_size`. The SQLite database is `dir/ledger.db`.
#[allow(dead_code)] // not every bench reports sizes
pub async fn store_bytes(store: &str, dir: &Path) -> u64 {
    if store.starts_with("sqlite:") {
        let c = rusqlite::Connection::open_with_flags(
            dir.join("ledger.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .expect("open the ledger read-only");
        let pages: i64 = c
            .query_row(
                "SELECT (SELECT page_count FROM pragma_page_count()) - \
                 (SELECT freelist_count FROM pragma_freelist_count())",
                [],
                |r| r.get(0),
            )
            .expect("page count");
        let size: i64 = c
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .expect("page size");
        u64::try_from(pages * size).unwrap_or(0)
    } else {
        let (client, conn) = tokio_postgres::connect(store, tokio_postgres::NoTls)
            .await
            .expect("connect to postgres");
        tokio::spawn(conn);
        let row = client
            .query_one("SELECT pg_database_size(current_database())", &[])
            .await
            .expect("size");
        u64::try_from(row.get::<_, i64>(0)).unwrap_or(0)
    }
}

/// Runs `run(label, store URL)` on a multi-threaded runtime for SQLite (`{dir}` in the URL is
/// the bench's own directory) and for a scratch PostgreSQL database (when `WATTD_TEST_POSTGRES`
/// is set; dropped afterwards), or only the one `only` names (`sqlite`, `postgres`).
#[allow(dead_code)] // the ingest bench runs both stores in one process its own way
pub fn on_each_store<F, Fut>(only: Option<&str>, prefix: &str, mut run: F)
where
    F: FnMut(&'static str, String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        if only != Some("postgres") {
            run("sqlite", "sqlite:{dir}/ledger.db".into()).await;
        }
        if only == Some("sqlite") {
            return;
        }
        if let Some(db) = ScratchDb::create(prefix).await {
            run("postgres", db.url.clone()).await;
            db.drop_db().await;
        }
    });
}
