//! `wattd-ledger`: the reference receiver's command line (`serve`, `runs`, `nodes`). Exit codes:
//! 0 ok, 64 bad usage or configuration (every problem listed), 1 anything else.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use wattd_ledger::query;
use wattd_ledger::server::{self, Limits, QueryOptions, ServeError, ServeOptions};
use wattd_ledger::service::ServiceLimits;
use wattd_ledger::session::SessionLimits;
use wattd_ledger::store::{AnyStore, OpenMode, Store as _, StoreUrl};

const EXIT_USAGE: u8 = 64;

/// The reference ledger for wattd: receives signed, hash-chained batches over mutual TLS,
/// verifies them, stores each once, and answers per-run and per-node queries.
#[derive(Debug, Parser)]
#[command(name = "wattd-ledger", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the Ledger gRPC stream over mutual TLS until SIGTERM or SIGINT (SIGHUP re-reads
    /// the enrolment directory), and with --query-listen the Query API for readers. Prints
    /// `listening on ADDR` on stderr once it accepts.
    Serve(Box<ServeArgs>),
    /// Per-node, per-run energy by domain (uJ and Wh) over every billed allocation (quarantined
    /// ones are in `nodes`, never here), with each run's account (its account label).
    Runs(RunsArgs),
    /// Per node: status (fork, implausible, stalled, gap, quiet, ok), chain tip, key epoch,
    /// last heartbeat, announced sealed seq and lag, gaps (held above a hole, or announced by a
    /// heartbeat and never received), forks, the ranges the node declared lost with their
    /// energy, and the allocations quarantined as implausible (never billed) by reason.
    Nodes(NodesArgs),
    /// Per node: whether the stored batches' energy plus the energy of the ranges the node
    /// declared lost equals the node's own running total, per meter, to the microjoule; and
    /// whether every batch's running totals follow from its predecessor's. Exit 1 when not.
    Audit(QueryArgs),
    /// A consistent copy of a SQLite ledger, taken while it serves: written to a new file
    /// (mode 600), fsynced, and checked (SQLite's integrity check) before it is reported.
    /// Restore by stopping the ledger and putting the copy in place of the database (and
    /// removing its -wal and -shm files); then `wattd-ledger audit`, and the nodes re-send what
    /// the copy lacks. A PostgreSQL ledger is backed up with pg_dump or pg_basebackup.
    Backup(BackupArgs),
    /// The read audit: every Query API call (answered or refused), newest first: when, the
    /// reader's certificate CN, its role, the call, its filters, rows returned and outcome.
    Reads(ReadsArgs),
    /// The change feed as CloudEvents 1.0 JSON: one event (type dev.wattd.run.energy.v1) per
    /// node, run, domain and stored batch, with a deterministic id, from the saved cursor to
    /// the present; on stdout (one event per line, or --batch arrays) or POSTed to --post with
    /// retries. The cursor file is saved after each batch is written or accepted.
    Events(EventsArgs),
}

#[derive(Debug, Args)]
struct EventsArgs {
    /// Store URL, as for `runs`.
    #[arg(long, visible_alias = "db", value_name = "URL", value_parser = StoreUrlParser)]
    store: StoreUrl,
    /// The run label that names a run's account (the event's subject and data.account).
    #[arg(long, default_value = "account", value_name = "KEY")]
    account_label: String,
    /// Where the export resumes from, saved after every batch (the change feed's cursor).
    /// Without it the export starts at the beginning every time.
    #[arg(long, value_name = "FILE")]
    cursor_file: Option<PathBuf>,
    /// One application/cloudevents-batch+json array per stored batch instead of one
    /// application/cloudevents+json event per line (or per request).
    #[arg(long)]
    batch: bool,
    /// POST the events to this http:// or https:// URL (structured mode, or batch mode with
    /// --batch); retried with backoff until a 2xx; a 4xx other than 408 and 429 stops the
    /// export with the receiver's answer.
    #[arg(long, value_name = "URL")]
    post: Option<String>,
    /// CA certificate(s) (PEM) for an https --post endpoint.
    #[arg(long, value_name = "FILE", requires = "post")]
    post_ca: Option<PathBuf>,
    /// Stop retrying one POST after this many seconds (0: never).
    #[arg(long, default_value_t = 0, value_name = "S")]
    give_up_after_s: u64,
    /// Stop after this many events (0: at the present).
    #[arg(long, default_value_t = 0, value_name = "N")]
    max_events: u64,
}

#[derive(Debug, Args)]
struct ReadsArgs {
    #[command(flatten)]
    query: QueryArgs,
    /// The latest N rows.
    #[arg(long, default_value_t = 100, value_name = "N")]
    limit: u32,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Address to listen on (port 0: any free port; the bound address is printed).
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    /// Server certificate chain (PEM).
    #[arg(long, value_name = "FILE")]
    cert: PathBuf,
    /// Server private key (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// CA certificate(s) (PEM) that node client certificates must chain to. The certificate's
    /// subject CN is the node id.
    #[arg(long, value_name = "FILE")]
    client_ca: PathBuf,
    /// Certificate revocation list(s) (PEM) for the node certificates: a revoked one fails the
    /// TLS handshake; SIGHUP re-reads the file, and an open stream whose certificate the new
    /// list revokes is ended at once (PERMISSION_DENIED, reason revoked).
    #[arg(long, value_name = "FILE")]
    crl: Option<PathBuf>,
    /// Directory of enrolled nodes: every *.toml / *.pub file holds a `wattd identity` output
    /// or a node's node.pub ([[key]] per epoch).
    #[arg(long, visible_alias = "nodes", value_name = "DIR")]
    enrolled: PathBuf,
    /// Store URL: sqlite:PATH (or sqlite://PATH; created mode 600) or
    /// postgres://USER@HOST:PORT/DB (PostgreSQL 12 or later; the password from PGPASSFILE or
    /// ~/.pgpass, never the URL).
    #[arg(long, visible_alias = "db", value_name = "URL", value_parser = StoreUrlParser)]
    store: StoreUrl,
    /// Serve Prometheus counters on GET /metrics at this address (port 0: any; printed).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// Web configuration of the metrics endpoint, in the Prometheus exporter toolkit's YAML
    /// format: tls_server_config (cert_file, key_file, client_auth_type, client_ca_file,
    /// min_version, max_version) and basic_auth_users (bcrypt hashes).
    #[arg(long, value_name = "FILE", requires = "metrics_listen")]
    metrics_web_config: Option<PathBuf>,
    /// Serve the Query API (RunTotals, Changes, RunIntervals) at this address, over mutual TLS
    /// with the same server certificate; readers present certificates of --reader-ca and are
    /// named in --readers. Node certificates cannot read.
    #[arg(long, value_name = "ADDR", requires_all = ["reader_ca", "readers"])]
    query_listen: Option<SocketAddr>,
    /// CA certificate(s) (PEM) that readers' client certificates must chain to: a CA of its
    /// own, not the nodes' (--client-ca).
    #[arg(long, value_name = "FILE", requires = "query_listen")]
    reader_ca: Option<PathBuf>,
    /// The readers file (TOML): [readers] "<certificate CN>" = "metering" | "account:<id>".
    /// Re-read when it changes.
    #[arg(long, value_name = "FILE", requires = "query_listen")]
    readers: Option<PathBuf>,
    /// The run label whose value names a run's account (for account readers and the
    /// `account` of every total and change).
    #[arg(long, default_value = "account", value_name = "KEY")]
    account_label: String,
    /// Days the read audit (every Query call: reader, call, filters, rows, outcome) is kept;
    /// at least 365 (the platform's policy keeps audit logs a year).
    #[arg(long, default_value_t = 400, value_name = "DAYS")]
    audit_retention_days: u64,
    /// Days the per-interval allocation rows of a batch are kept after the ledger received it
    /// (default: kept for ever). Pruned hourly: PostgreSQL drops day partitions, SQLite
    /// deletes. The signed batches, the hourly run totals and the quarantined rows stay, and
    /// every query answers the same: detail past the retention is decoded from the batches
    /// (slower). 0: no rows at all (every stored one pruned, none stored: the cheapest ingest;
    /// per-interval detail always decoded); a later start with another value or none stores
    /// rows again for the batches received from then on.
    #[arg(long, value_name = "DAYS")]
    detail_retention_days: Option<u64>,
    /// Once listening, write {"listen": ADDR, "metrics": ADDR|null, "query": ADDR|null} to this
    /// file (atomically).
    #[arg(long, value_name = "FILE")]
    ready_file: Option<PathBuf>,
    /// Largest message accepted, in bytes (a larger one ends the stream: RESOURCE_EXHAUSTED).
    /// The default leaves room above the largest record a node seals (16 MiB) for its wrapper.
    #[arg(long, default_value_t = 17 * 1024 * 1024, value_name = "BYTES")]
    max_message_bytes: usize,
    /// Batches one stream may hold above a missing seq.
    #[arg(long, default_value_t = 64, value_name = "N")]
    max_held_batches: usize,
    /// Bytes one stream may hold above a missing seq.
    #[arg(long, default_value_t = 64 * 1024 * 1024, value_name = "BYTES")]
    max_held_bytes: usize,
    /// Streams one node may have open on this process.
    #[arg(long, default_value_t = 2, value_name = "N")]
    max_streams_per_node: usize,
    /// Sustained messages (batches and heartbeats) per second per node (bursts as large);
    /// excess is delayed, not refused. 0: unlimited.
    #[arg(long, default_value_t = 1000, value_name = "N")]
    node_batches_per_s: u32,
    /// TLS connections open at once; more are closed at accept.
    #[arg(long, default_value_t = 1024, value_name = "N")]
    max_connections: usize,
    /// HTTP/2 streams per connection.
    #[arg(long, default_value_t = 4, value_name = "N")]
    max_streams_per_connection: u32,
    /// Seconds allowed for a TLS handshake.
    #[arg(long, default_value_t = 10, value_name = "S")]
    handshake_timeout_s: u64,
    /// TLS connections open at once from one source (an IPv4 address, or an IPv6 address cut
    /// to --source-prefix-v6 bits); more are closed at accept.
    #[arg(long, default_value_t = 64, value_name = "N")]
    max_connections_per_source: usize,
    /// Leading bits of an IPv6 source address that --max-connections-per-source counts by:
    /// 128 (each address), or 64 where every host has a /64 of its own (then one host's many
    /// addresses count as one source). Nodes sharing one /64 need 128.
    #[arg(long, default_value_t = 128, value_name = "BITS", value_parser = clap::value_parser!(u8).range(0..=128))]
    source_prefix_v6: u8,
    /// Seconds allowed after the handshake for the client's HTTP/2 preface.
    #[arg(long, default_value_t = 10, value_name = "S")]
    preface_timeout_s: u64,
    /// Seconds a connection may stay open with no stream (an HTTP/2 connection that holds a
    /// slot and never streams); then it is closed.
    #[arg(long, default_value_t = 60, value_name = "S")]
    idle_timeout_s: u64,
    /// Plausibility: how far a node's measured time (the sum of its intervals' lengths) may
    /// run ahead of this ledger's clock since its first stored batch, in seconds: the backlog a
    /// node may bring to its first connection, plus clock skew. Intervals beyond it are stored
    /// and chained but their allocations are quarantined (reason ahead_of_clock). The other
    /// limits (max_watts per domain, cpus) come from each node's enrolment file ([limits]).
    #[arg(long, default_value_t = wattd_ledger::session::DEFAULT_MAX_AHEAD_S, value_name = "S")]
    max_ahead_s: u64,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value = "plain")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Plain,
    Json,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Format {
    #[value(alias = "table")]
    Text,
    Json,
}

#[derive(Debug, Args)]
struct QueryArgs {
    /// Store URL: sqlite:PATH (or sqlite://PATH; created mode 600) or
    /// postgres://USER@HOST:PORT/DB (the password from PGPASSFILE or ~/.pgpass, never the
    /// URL).
    #[arg(long, visible_alias = "db", value_name = "URL", value_parser = StoreUrlParser)]
    store: StoreUrl,
    /// Output format (`table` is accepted for `text`).
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
}

#[derive(Debug, Args)]
struct BackupArgs {
    #[command(flatten)]
    query: QueryArgs,
    /// The copy: a path that must not exist yet.
    #[arg(long, value_name = "PATH")]
    to: std::path::PathBuf,
}

#[derive(Debug, Args)]
struct RunsArgs {
    #[command(flatten)]
    query: QueryArgs,
    /// The run label that names a run's account (from the control plane's run_started, carried
    /// in the signed records): shown as `account` in JSON.
    #[arg(long, default_value = "account", value_name = "KEY")]
    account_label: String,
    /// Only the runs of this account.
    #[arg(long, value_name = "ID")]
    account: Option<String>,
}

#[derive(Debug, Args)]
struct NodesArgs {
    #[command(flatten)]
    query: QueryArgs,
    /// A node from which nothing (no batch, no heartbeat) arrived for this long is `quiet`.
    #[arg(long, default_value_t = query::DEFAULT_QUIET_AFTER_S, value_name = "S")]
    quiet_after_s: u64,
}

/// `--store`: parsed by [`StoreUrl`], with an error that does not repeat the value (clap's own
/// would, and a URL may hold a password that must not reach a log).
#[derive(Clone, Debug)]
struct StoreUrlParser;

impl clap::builder::TypedValueParser for StoreUrlParser {
    type Value = StoreUrl;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<StoreUrl, clap::Error> {
        let fail = |msg: String| {
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("--store: {msg}\n"),
            )
            .with_cmd(cmd)
        };
        value
            .to_str()
            .ok_or_else(|| fail("not UTF-8".into()))?
            .parse()
            .map_err(|e: wattd_ledger::store::StoreUrlError| fail(e.to_string()))
    }
}

fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Plain => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let usage = e.use_stderr();
            let _ = e.print();
            return if usage {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("wattd-ledger: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Queries print their answer on stdout; warnings (a password file ignored, a database
    // others can read) go to stderr. `serve` sets up its own logging from its flags.
    if !matches!(cli.command, Command::Serve(_)) {
        init_logging(LogFormat::Plain, "warn");
    }
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(a) => serve(*a).await,
            Command::Runs(a) => runs(a).await.map_err(Failure::Other),
            Command::Nodes(a) => nodes(a).await.map_err(Failure::Other),
            Command::Audit(a) => audit(a).await.map_err(Failure::Other),
            Command::Backup(a) => backup(a).await,
            Command::Reads(a) => reads(a).await.map_err(Failure::Other),
            Command::Events(a) => events(a).await.map_err(Failure::Other),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(msg)) => {
            eprintln!("wattd-ledger: {msg}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(Failure::Other(e)) => {
            eprintln!("wattd-ledger: {e:#}");
            ExitCode::FAILURE
        }
    }
}

enum Failure {
    Usage(String),
    Other(anyhow::Error),
}

async fn serve(a: ServeArgs) -> Result<(), Failure> {
    init_logging(a.log_format, "info");
    let mut problems = Vec::new();
    for (v, flag) in [
        (a.max_message_bytes, "--max-message-bytes"),
        (a.max_held_batches, "--max-held-batches"),
        (a.max_held_bytes, "--max-held-bytes"),
        (a.max_streams_per_node, "--max-streams-per-node"),
        (a.max_connections, "--max-connections"),
        (a.max_connections_per_source, "--max-connections-per-source"),
    ] {
        if v == 0 {
            problems.push(format!("{flag} must be at least 1"));
        }
    }
    if a.max_streams_per_connection == 0 {
        problems.push("--max-streams-per-connection must be at least 1".into());
    }
    if a.handshake_timeout_s == 0 {
        problems.push("--handshake-timeout-s must be at least 1".into());
    }
    if a.preface_timeout_s == 0 {
        problems.push("--preface-timeout-s must be at least 1".into());
    }
    if a.idle_timeout_s == 0 {
        problems.push("--idle-timeout-s must be at least 1".into());
    }
    if a.audit_retention_days < 365 {
        problems.push(format!(
            "--audit-retention-days {}: at least 365 (audit logs are kept a year)",
            a.audit_retention_days
        ));
    }
    if let Some(p) = wattd_proto::names::label_problem(&a.account_label, "x") {
        problems.push(format!("--account-label {:?}: {p}", a.account_label));
    }
    let metrics_web = match &a.metrics_web_config {
        Some(path) => match wattd_web::WebConfig::load(path) {
            Ok(w) => Some(w),
            Err(e) => {
                problems.push(format!("--metrics-web-config {e}"));
                None
            }
        },
        None => None,
    };
    if !problems.is_empty() {
        return Err(Failure::Usage(problems.join("\n")));
    }
    let opts = ServeOptions {
        listen: a.listen,
        cert: a.cert,
        key: a.key,
        client_ca: a.client_ca,
        crl: a.crl,
        enrolled: a.enrolled,
        store: a.store,
        metrics_listen: a.metrics_listen,
        metrics_web,
        query: match (a.query_listen, a.reader_ca, a.readers) {
            (Some(listen), Some(reader_ca), Some(readers)) => Some(QueryOptions {
                listen,
                reader_ca,
                readers,
                account_label: a.account_label,
                audit_retention: Duration::from_secs(a.audit_retention_days.saturating_mul(86_400)),
            }),
            _ => None,
        },
        detail_retention: a
            .detail_retention_days
            .map(|d| Duration::from_secs(d.saturating_mul(86_400))),
        limits: Limits {
            max_message_bytes: a.max_message_bytes,
            max_connections: a.max_connections,
            handshake_timeout: Duration::from_secs(a.handshake_timeout_s),
            max_streams_per_connection: a.max_streams_per_connection,
            max_connections_per_source: a.max_connections_per_source,
            preface_timeout: Duration::from_secs(a.preface_timeout_s),
            idle_timeout: Duration::from_secs(a.idle_timeout_s),
            source_prefix_v6: a.source_prefix_v6,
            service: ServiceLimits {
                session: SessionLimits {
                    max_held_batches: a.max_held_batches,
                    max_held_bytes: a.max_held_bytes,
                    max_ahead_ns: i64::try_from(a.max_ahead_s)
                        .ok()
                        .and_then(|s| s.checked_mul(1_000_000_000))
                        .unwrap_or(i64::MAX),
                },
                streams_per_node: a.max_streams_per_node,
                node_batches_per_s: NonZeroU32::new(a.node_batches_per_s),
            },
        },
    };
    let (bound, (snapshot_tx, _snapshot_rx)) = match server::bind(&opts).await {
        Ok(b) => b,
        Err(ServeError::Config(p)) => return Err(Failure::Usage(p.join("\n"))),
        Err(e) => return Err(Failure::Other(e.into())),
    };
    let addr = bound.local_addr();
    let metrics_addr = bound.metrics_addr();
    let query_addr = bound.query_addr();
    eprintln!("listening on {addr}");
    if let Some(m) = metrics_addr {
        eprintln!("metrics on {m}");
    }
    if let Some(q) = query_addr {
        eprintln!("query API on {q}");
    }
    if let Some(path) = &a.ready_file {
        let text = serde_json::json!({
            "listen": addr.to_string(),
            "metrics": metrics_addr.map(|m| m.to_string()),
            "query": query_addr.map(|m| m.to_string()),
        })
        .to_string();
        write_ready_file(path, &text)
            .with_context(|| format!("--ready-file {}", path.display()))
            .map_err(Failure::Other)?;
    }
    let reload = bound.reload_handle();
    let shutdown = async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) else {
            tracing::error!("cannot install signal handlers; stop with SIGKILL");
            std::future::pending::<()>().await;
            return;
        };
        loop {
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM"); return; }
                _ = int.recv() => { tracing::info!("SIGINT"); return; }
                _ = hup.recv() => {
                    match reload.reload_tls() {
                        Ok(revoked) => tracing::info!(revoked_certificates = revoked, "SIGHUP: TLS certificate, key, client CA and CRL reloaded"),
                        Err(error) => tracing::error!(%error, "SIGHUP: TLS files NOT reloaded; the previous ones stay"),
                    }
                    match reload.reload() {
                        Ok((nodes, keys)) => tracing::info!(nodes, keys, "SIGHUP: enrolment reloaded"),
                        Err(error) => tracing::error!(%error, "SIGHUP: enrolment NOT reloaded; the previous one stays"),
                    }
                }
            }
        }
    };
    bound
        .run(snapshot_tx, shutdown)
        .await
        .map_err(|e| Failure::Other(e.into()))?;
    tracing::info!("stopped");
    Ok(())
}

fn write_ready_file(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

async fn open_query(url: &StoreUrl) -> anyhow::Result<AnyStore> {
    AnyStore::open(url, OpenMode::Query)
        .await
        .context("opening the store")
}

async fn runs(a: RunsArgs) -> anyhow::Result<()> {
    let store = open_query(&a.query.store).await?;
    let mut report = query::runs_report(store.run_totals().await?);
    query::with_finals(&mut report, store.run_finals().await?);
    query::with_accounts(
        &mut report,
        store.run_label(&a.account_label).await?,
        a.account.as_deref(),
    );
    let out = match a.query.format {
        Format::Json => serde_json::to_string_pretty(&report)? + "\n",
        Format::Text => query::runs_text(&report),
    };
    print!("{out}");
    Ok(())
}

async fn audit(a: QueryArgs) -> anyhow::Result<()> {
    let store = open_query(&a.store).await?;
    let report = wattd_ledger::audit::audit(&store).await?;
    let out = match a.format {
        Format::Json => serde_json::to_string_pretty(&report)? + "\n",
        Format::Text => wattd_ledger::audit::audit_text(&report),
    };
    print!("{out}");
    anyhow::ensure!(
        report.ok(),
        "the energy does not add up for some node (see above)"
    );
    Ok(())
}

async fn backup(a: BackupArgs) -> Result<(), Failure> {
    let path = match &a.query.store {
        StoreUrl::Sqlite(p) => p.clone(),
        StoreUrl::Postgres(_) => {
            return Err(Failure::Usage(
                "a PostgreSQL ledger is backed up with PostgreSQL's own tools: pg_dump -Fc \
                 (a consistent logical dump, restored with pg_restore) or pg_basebackup (a \
                 physical copy with its WAL); after a restore, run wattd-ledger audit"
                    .into(),
            ))
        }
    };
    let to = a.to.clone();
    let report =
        tokio::task::spawn_blocking(move || wattd_ledger::store::sqlite::backup(&path, &to))
            .await
            .map_err(|e| Failure::Other(e.into()))?
            .map_err(|e| Failure::Other(e.into()))?;
    match a.query.format {
        Format::Json => {
            let out =
                serde_json::to_string_pretty(&report).map_err(|e| Failure::Other(e.into()))?;
            println!("{out}");
        }
        Format::Text => println!(
            "backup {}: {} bytes, {} batches of {} nodes, integrity check ok",
            report.to.display(),
            report.bytes,
            report.batches,
            report.nodes
        ),
    }
    Ok(())
}

async fn events(a: EventsArgs) -> anyhow::Result<()> {
    use wattd_ledger::events::{export, ExportOptions, Post, Sink};
    let store = open_query(&a.store).await?;
    let sink = match a.post {
        Some(url) => Sink::Post(Post {
            url,
            ca: a.post_ca,
            give_up_after: Duration::from_secs(a.give_up_after_s),
        }),
        None => Sink::Stdout,
    };
    let opts = ExportOptions {
        account_label: a.account_label,
        batch: a.batch,
        cursor_file: a.cursor_file,
        max_events: a.max_events,
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let done = export(&store, &opts, &sink, &mut out).await?;
    eprintln!(
        "exported {} events from {} batches",
        done.events, done.batches
    );
    Ok(())
}

async fn reads(r: ReadsArgs) -> anyhow::Result<()> {
    let store = open_query(&r.query.store).await?;
    let rows = store.reads(r.limit).await?;
    match r.query.format {
        Format::Json => print!("{}", serde_json::to_string_pretty(&rows)? + "\n"),
        Format::Text => {
            for row in rows {
                println!(
                    "{} {} ({}) {} {} rows={} {}",
                    row.at_unix_ns,
                    row.reader,
                    row.role,
                    row.call,
                    row.filters,
                    row.rows,
                    row.outcome
                );
            }
        }
    }
    Ok(())
}

async fn nodes(n: NodesArgs) -> anyhow::Result<()> {
    let a = n.query;
    let store = open_query(&a.store).await?;
    let mut report = query::nodes_report_at(
        store.nodes().await?,
        query::unix_now_ns(),
        n.quiet_after_s.saturating_mul(1_000_000_000),
    );
    wattd_ledger::lost::price_runs(&store, &mut report).await?;
    let out = match a.format {
        Format::Json => serde_json::to_string_pretty(&report)? + "\n",
        Format::Text => query::nodes_text(&report),
    };
    print!("{out}");
    Ok(())
}
