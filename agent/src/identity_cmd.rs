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
    /// `[spool] dir`: $STATE_DIRECTORY under wattd's unit, /var/lib/wattd as root, ./wattd-data
    /// otherwise].
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
        .unwrap_or_else(|| cfg.spool.dir.clone());
    // One rule for the node id, the daemon's: a key made or printed here under another id would
    // be refused by `wattd run` with this configuration.
    let expected = wattd::daemon::node_id(&cfg);
    if let (Some(id), Some(file)) = (&args.node_id, &args.config) {
        // With a configuration, the daemon's id is known: a key for another would be refused.
        anyhow::ensure!(
            *id == expected,
            "--node-id {id:?} differs from {expected:?}, the node id `wattd run --config {}` uses \
             ([node] id, else /etc/machine-id, else the host name): the daemon would refuse the key",
            file.display()
        );
    }
    if let (Some(file), None) = (&args.config, &args.data_dir) {
        if cfg.spool.dir.is_relative() {
            eprintln!(
                "wattd: warning: [spool] dir is not an absolute path in {} (the key goes to {} \
                 under the current directory); the service spools in its state directory \
                 (/var/lib/wattd): set [spool] dir",
                file.display(),
                cfg.spool.dir.display()
            );
        }
    }
    let key = match NodeKey::load(&dir) {
        Ok(k) => {
            let wanted = args.node_id.as_deref().unwrap_or(&expected);
            if k.node_id() != wanted && args.config.is_none() && args.node_id.is_none() {
                // Asked only to print an existing key: it is the key's truth; the daemon's
                // configuration is not known here.
                eprintln!(
                    "wattd: note: the key's node {:?} is not {wanted:?}, what `wattd run` on the \
                     embedded defaults would use; pass --config to check against a configuration",
                    k.node_id()
                );
            } else if k.node_id() != wanted {
                anyhow::bail!(
                    "{}: key belongs to node {:?}, not {wanted:?} (the node id `wattd run` uses \
                     with this configuration: [node] id, else /etc/machine-id, else the host \
                     name): set [node] id to {:?}, or move the key away to make a new one",
                    dir.join(identity::KEY_FILE).display(),
                    k.node_id(),
                    k.node_id()
                );
            }
            k
        }
        Err(IdentityError::Missing { .. }) => {
            let node_id = args.node_id.clone().unwrap_or(expected);
            let (k, created) = NodeKey::load_or_create(&dir, &node_id)?;
            if created {
                eprintln!(
                    "wattd: created node key {} for node {node_id:?}",
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
