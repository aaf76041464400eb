//! `wattd verify`: checks signatures, chain, sequence and conservation of the local spool or of
//! an export file; prints every break; exit 0 only if everything holds.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use wattd::identity::{self, PublicIdentity};
use wattd::verify;

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The data dir holding the spool [default: /var/lib/wattd as root, ./wattd-data
    /// otherwise].
    #[arg(long, value_name = "DIR", conflicts_with = "file")]
    pub data_dir: Option<PathBuf>,
    /// An export file (`wattd export` output) instead of the spool.
    #[arg(value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Trust this public key (`wattd identity` output) instead of the data dir's keys.
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
}

pub fn run(args: &VerifyArgs) -> anyhow::Result<()> {
    let dir = args
        .data_dir
        .clone()
        .unwrap_or_else(wattd::spool::default_data_dir);
    let keys: Vec<PublicIdentity> = match &args.key {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            vec![toml::from_str(&text)
                .with_context(|| format!("{}: not a `wattd identity` file", path.display()))?]
        }
        None => identity::known_public_keys(&dir).with_context(|| {
            format!(
                "no trusted key: pass --key FILE or a data dir with a node key ({})",
                dir.display()
            )
        })?,
    };
    let report = match &args.file {
        Some(file) => {
            let bytes =
                std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
            verify::verify_export(file, &bytes, &keys)?
        }
        None => {
            anyhow::ensure!(dir.is_dir(), "{}: no such data dir", dir.display());
            verify::verify_spool(&dir, &keys)?
        }
    };
    for b in &report.breaks {
        println!("BREAK {b}");
    }
    println!("{report}");
    anyhow::ensure!(
        report.is_ok(),
        "verification failed: {} break(s)",
        report.breaks.len()
    );
    Ok(())
}
