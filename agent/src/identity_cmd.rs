//! `wattd identity`: prints what the ledger enrols for this node (node id, key epoch, key id,
//! Ed25519 public key) as TOML, creating the node key first if there is none.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use wattd::identity::{self, IdentityError, NodeKey};

#[derive(Debug, Args)]
pub struct IdentityArgs {
    /// The agent's configuration: its `[node] id` and `[spool] dir` are the defaults below, so the
    /// key is made for the node id `wattd run --config FILE` will use [default: the embedded
    /// defaults, as `wattd run` without --config].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The data dir holding the spool and the node key [default: the configuration's
    /// `[spool] dir`: /var/lib/wattd as root, ./wattd-data otherwise].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Node id to create the key for, if there is no key yet [default: as `wattd run`: the
    /// configuration's `[node] id`, else /etc/machine-id, else the host name].
    #[arg(long, value_name = "ID")]
    pub node_id: Option<String>,
}

pub fn run(args: &IdentityArgs) -> anyhow::Result<()> {
    let cfg = wattd::config::load(args.config.as_deref()).context("loading the configuration")?;
    let dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| cfg.spool_dir.clone());
    let key = match NodeKey::load(&dir) {
        Ok(k) => {
            if let Some(id) = args.node_id.as_ref().filter(|id| **id != k.node_id()) {
                anyhow::bail!(
                    "{}: key belongs to node {:?}, not {id:?}",
                    dir.join(identity::KEY_FILE).display(),
                    k.node_id()
                );
            }
            k
        }
        Err(IdentityError::Missing { .. }) => {
            // One rule for the node id, the daemon's: a key made here under another id would
            // be refused by `wattd run`.
            let node_id = match &args.node_id {
                Some(id) => id.clone(),
                None => wattd::daemon::node_id(&cfg),
            };
            let (k, created) = NodeKey::load_or_create(&dir, &node_id)?;
            if created {
                eprintln!(
                    "wattd: created node key {}",
                    dir.join(identity::KEY_FILE).display()
                );
            }
            k
        }
        Err(e) => return Err(e.into()),
    };
    let text = format!(
        "# wattd node identity: enrol this with the ledger (`wattd-ledger serve --enrolled DIR`).\n{}",
        key.public()
            .to_toml()
            .context("encoding the public identity")?
    );
    std::io::stdout()
        .write_all(text.as_bytes())
        .context("writing to stdout")
}
