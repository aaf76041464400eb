//! `wattd`: the per-host energy-measurement agent. This file is the CLI: it parses arguments,
//! maps failures to the exit codes of the CLI contract (0 ok, 64 bad usage or config, 1 other),
//! and hands each subcommand to its module.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod calibrate_cmd;
mod explain_cmd;
mod export_cmd;
mod identity_cmd;
mod probe_cmd;
mod report_cmd;
mod runs_cmd;
mod top_cmd;
mod verify_cmd;

/// Exit code for bad usage or configuration (BSD sysexits EX_USAGE).
const EXIT_USAGE: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "wattd",
    version,
    about = "Energy-measurement agent: reads RAPL and GPU energy counters, attributes watt-hours to \
             workflow runs' cgroups, and keeps signed, chained records of them.",
    after_help = "Exit codes: 0 ok, 64 bad usage or configuration, 1 any other failure."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent: measure, attribute and seal intervals into the local spool until SIGTERM.
    /// Without --config it runs on the embedded defaults (sources auto-detected, runs found by
    /// the default pattern, spool in $STATE_DIRECTORY under wattd's unit, else /var/lib/wattd as
    /// root or ./wattd-data otherwise). SIGHUP re-reads the file and applies runs.patterns,
    /// sampling.interval_ms, spool.seal_every_ms, the attribution policies and log.level; every
    /// other key takes effect at a restart.
    Run {
        /// The configuration file (TOML; see the README for every key).
        #[arg(long, value_name = "FILE")]
        config: Option<std::path::PathBuf>,
        /// Log format on stderr: plain lines (for journald) or JSON.
        #[arg(long, value_enum, default_value = "plain")]
        log_format: LogFormat,
    },
    /// List every energy source, its domains and zones, which one is chosen per domain, and why
    /// each other one is not used.
    Probe(probe_cmd::ProbeArgs),
    /// Check a configuration file and list every problem with file, line and key. Exit 0 when
    /// valid, 64 otherwise (systemd runs it as ExecStartPre=).
    Validate {
        /// The configuration file; without it the embedded defaults are checked.
        #[arg(long, value_name = "FILE")]
        config: Option<std::path::PathBuf>,
        /// Also fail (exit 64) on problems with the files the configuration names (the
        /// [ledger] certificate, key and CA). Without it they are warnings: the unit runs
        /// `validate` before every start, and a node whose certificate is missing must still
        /// measure into its spool.
        #[arg(long)]
        strict: bool,
    },
    /// Print the node id and public key the ledger must enrol (creates the key if missing).
    Identity(identity_cmd::IdentityArgs),
    /// Write the spool's signed batches to stdout as length-delimited protobuf.
    Export(export_cmd::ExportArgs),
    /// Check signatures, chain, sequence and conservation; exit 0 only if all hold.
    Verify(verify_cmd::VerifyArgs),
    /// Per-run energy by domain, in uJ and Wh, from the local spool.
    Runs(runs_cmd::RunsArgs),
    /// The audit trail of one run: every interval it appears in, with the measured energy, the
    /// policy and idle estimate, its usage and share, its allocation and the batch carrying it;
    /// totals equal `wattd runs` for that run; and how its last usage was obtained (read,
    /// reconciled through its parent, or lost), from its summary.
    Explain(explain_cmd::ExplainArgs),
    /// Measure idle power and power per busy CPU per package with burners at 0..N CPUs, fit a
    /// line, and print it with R squared and the [calibration] snippet. Needs a hardware counter
    /// and a quiet host.
    Calibrate(calibrate_cmd::CalibrateArgs),
    /// A live terminal view of a running wattd (from its metrics endpoint): per run the current
    /// watts by domain and the energy so far, host, idle and unattributed shares, each meter's
    /// source and quality. `s` changes the sort, `q` quits.
    Top(top_cmd::TopArgs),
    /// Write one self-contained HTML report (inline SVG, nothing fetched): power stacked by run,
    /// host, idle and unattributed against the measured total over time, energy per run,
    /// source quality and gaps, and each interval's conservation residual.
    Report(report_cmd::ReportArgs),
    /// Internal: a CPU burner for `calibrate` (spins until killed).
    #[command(hide = true)]
    BurnCpuForCalibration,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormat {
    Plain,
    Json,
}

/// Logs go to stderr (journald under systemd). The filter is RUST_LOG if set, else the config's
/// `[log] level`, else `info`; the returned handle swaps it on SIGHUP.
fn init_logging(format: LogFormat, level: Option<&str>) -> wattd::daemon::LogReload {
    use std::io::IsTerminal as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    let from_env = std::env::var_os("RUST_LOG").is_some();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .ok()
        .or_else(|| level.and_then(|l| tracing_subscriber::EnvFilter::try_new(l).ok()))
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Plain => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init();
    Box::new(move |level: &str| {
        if from_env {
            return Ok(()); // RUST_LOG, set by whoever started us, keeps precedence
        }
        let f = tracing_subscriber::EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        handle.reload(f).map_err(|e| e.to_string())
    })
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => 0,
                _ => EXIT_USAGE,
            };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let result = match cli.command {
        Command::Run { config, log_format } => match wattd::config::load(config.as_deref()) {
            Ok(cfg) => {
                let reload = init_logging(log_format, cfg.reloadable.log_level.as_deref());
                wattd::daemon::run(cfg, reload)
            }
            Err(e) => {
                eprintln!("wattd: {e}");
                return ExitCode::from(EXIT_USAGE);
            }
        },
        Command::Probe(args) => probe_cmd::run(&args),
        Command::Validate { config, strict } => match wattd::config::load(config.as_deref()) {
            Ok(c) => {
                let file = c
                    .file
                    .as_deref()
                    .map_or("embedded defaults".into(), |p| p.display().to_string());
                let mut tls = c
                    .ledger
                    .as_ref()
                    .map(wattd::shipper::check_tls_files)
                    .unwrap_or_default();
                if let Some(web) = &c.metrics.web_config {
                    if let Err(e) = wattd_web::WebConfig::load(web) {
                        tls.push(format!(
                            "metrics.web_config: {e} (the daemon measures without the endpoint)"
                        ));
                    }
                }
                let kind = if strict { "" } else { "warning: " };
                for p in &tls {
                    eprintln!("wattd: {kind}{file}: {p}");
                }
                if strict && !tls.is_empty() {
                    return ExitCode::from(EXIT_USAGE);
                }
                println!("{file}: ok");
                Ok(())
            }
            Err(e) => {
                eprintln!("wattd: {e}");
                return ExitCode::from(EXIT_USAGE);
            }
        },
        Command::Identity(args) => identity_cmd::run(&args),
        Command::Export(args) => export_cmd::run(&args),
        Command::Verify(args) => verify_cmd::run(&args),
        Command::Runs(args) => runs_cmd::run(&args),
        Command::Explain(args) => explain_cmd::run(&args),
        Command::Calibrate(args) => calibrate_cmd::run(&args),
        Command::Top(args) => top_cmd::run(&args),
        Command::Report(args) => report_cmd::run(&args),
        Command::BurnCpuForCalibration => calibrate_cmd::burn(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wattd: {e:#}");
            ExitCode::from(1)
        }
    }
}
