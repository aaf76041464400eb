//! `wattd`: the per-host energy-measurement agent. This file is the CLI: it parses arguments,
//! maps failures to the exit codes of the CLI contract (0 ok, 64 bad usage or config, 1 other),
//! and hands each subcommand to its module.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod export_cmd;
mod identity_cmd;
mod probe_cmd;
mod runs_cmd;
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
    /// List every energy source, its domains and zones, which one is chosen per domain, and why
    /// each other one is not used.
    Probe(probe_cmd::ProbeArgs),
    /// Print the node id and public key the ledger must enrol (creates the key if missing).
    Identity(identity_cmd::IdentityArgs),
    /// Write the spool's signed batches to stdout as length-delimited protobuf.
    Export(export_cmd::ExportArgs),
    /// Check signatures, chain, sequence and conservation; exit 0 only if all hold.
    Verify(verify_cmd::VerifyArgs),
    /// Per-run energy by domain, in uJ and Wh, from the local spool.
    Runs(runs_cmd::RunsArgs),
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
        Command::Identity(args) => identity_cmd::run(&args),
        Command::Export(args) => export_cmd::run(&args),
        Command::Verify(args) => verify_cmd::run(&args),
        Command::Runs(args) => runs_cmd::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wattd: {e:#}");
            ExitCode::from(1)
        }
    }
}
