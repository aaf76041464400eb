//! `wattd`: the per-host energy-measurement agent. This file is the CLI: it parses arguments,
//! maps failures to the exit codes of the CLI contract (0 ok, 64 bad usage or config, 1 other),
//! and hands each subcommand to its module.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod probe_cmd;

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
    /// List every energy source, its domains and zones, which one is chosen per domain, and why
    /// each other one is not used.
    Probe(probe_cmd::ProbeArgs),
    /// Check a configuration file and list every problem with file, line and key. Exit 0 when
    /// valid, 64 otherwise (systemd runs it as ExecStartPre=).
    Validate {
        /// The configuration file; without it the embedded defaults are checked.
        #[arg(long, value_name = "FILE")]
        config: Option<std::path::PathBuf>,
    },
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
        Command::Probe(args) => probe_cmd::run(&args),
        Command::Validate { config } => match wattd::config::load(config.as_deref()) {
            Ok(c) => {
                println!(
                    "{}: ok",
                    c.file
                        .as_deref()
                        .map_or("embedded defaults".into(), |p| p.display().to_string())
                );
                Ok(())
            }
            Err(e) => {
                eprintln!("wattd: {e}");
                return ExitCode::from(EXIT_USAGE);
            }
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wattd: {e:#}");
            ExitCode::from(1)
        }
    }
}
