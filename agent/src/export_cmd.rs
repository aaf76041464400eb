//! `wattd export`: writes every intact signed batch of the local spool to stdout as
//! length-delimited `SignedBatch` protobuf, byte for byte as signed, for any independent
//! verifier. Damage is reported on stderr and makes the exit status 1 after the export.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use wattd::spool::{self, SpoolItem};

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The data dir holding the spool [default: /var/lib/wattd as root, ./wattd-data
    /// otherwise].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

pub fn run(args: &ExportArgs) -> anyhow::Result<()> {
    let dir = args
        .data_dir
        .clone()
        .unwrap_or_else(spool::default_data_dir);
    anyhow::ensure!(dir.is_dir(), "{}: no such data dir", dir.display());
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut write_err = None;
    let mut damaged = 0u64;
    spool::visit_spool(&dir, |item| match item {
        SpoolItem::Record { bytes, .. } if write_err.is_none() => {
            let mut prefix = Vec::with_capacity(10);
            // Encoding a length into a Vec cannot fail.
            let _ = prost::encode_length_delimiter(bytes.len(), &mut prefix);
            if let Err(e) = out.write_all(&prefix).and_then(|()| out.write_all(bytes)) {
                write_err = Some(e);
            }
        }
        SpoolItem::Damage { location, damage } => {
            damaged += 1;
            eprintln!(
                "wattd: export: skipping damage at {location}: {}",
                damage.detail
            );
        }
        _ => {}
    })?;
    if let Some(e) = write_err {
        return Err(e).context("writing to stdout");
    }
    out.flush().context("writing to stdout")?;
    anyhow::ensure!(
        damaged == 0,
        "{damaged} damaged stretch(es) skipped; run `wattd verify` for details"
    );
    Ok(())
}
