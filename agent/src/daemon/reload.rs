//! SIGHUP: the configuration file is read again and its reloadable keys (`Reloadable`) applied
//! without closing the interval in hand: the next tick's interval simply spans the reload.
//! Every other key takes effect at a restart.

use super::start::{reads_memory, seal_policy, ticker};
use super::{Daemon, Flow};
use crate::config::Reloadable;

impl Daemon {
    pub(super) fn on_reload(&mut self) -> Flow {
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Reloading]);
        match crate::config::load(self.cfg.file.as_deref()) {
            Ok(new) => {
                self.apply(new.reloadable);
                tracing::info!("configuration reloaded (other keys take effect at restart)");
            }
            Err(error) => tracing::error!(%error, "configuration reload refused; nothing changed"),
        }
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        Flow::Continue
    }

    /// Applies each changed key to its component. A key its component refuses keeps its old
    /// value in the daemon's `Reloadable` (so the same file sent again is tried again). The
    /// configuration's validation already checks what the components check, so a refusal
    /// here is a defence, not an expected path.
    fn apply(&mut self, mut new: Reloadable) {
        let old = &self.cfg.reloadable;
        if new.patterns != old.patterns {
            match self.tracker.set_patterns(&new.patterns) {
                Ok(()) => tracing::info!(patterns = ?new.patterns, "run patterns reloaded"),
                Err(error) => {
                    tracing::error!(%error, "new run patterns refused; keeping the old ones");
                    new.patterns = old.patterns.clone();
                }
            }
        }
        if new.interval_ms != old.interval_ms {
            match ticker(new.interval_ms) {
                Ok(t) => {
                    self.ticker = t;
                    tracing::info!(interval_ms = new.interval_ms, "sampling interval reloaded");
                }
                Err(error) => {
                    tracing::error!(error = %format!("{error:#}"), "new sampling interval refused; keeping the old one");
                    new.interval_ms = old.interval_ms;
                }
            }
        }
        let policy = new.policy;
        if policy != self.sampler.policy() {
            self.tracker.set_read_memory(reads_memory(policy.dram));
            self.sampler.set_policy(policy);
            tracing::info!(?policy, "attribution policy reloaded");
        }
        if let Some(level) = &new.log_level {
            if let Err(error) = (self.log_reload)(level) {
                tracing::error!(%error, "log level refused");
                new.log_level = old.log_level.clone();
            }
        }
        if (new.interval_ms, new.spool_seal_every_ms) != (old.interval_ms, old.spool_seal_every_ms)
        {
            match seal_policy(&new) {
                Ok(p) => {
                    self.sealer.set_policy(p);
                    tracing::info!(
                        max_intervals = p.max_intervals(),
                        seal_every_ms = new.spool_seal_every_ms,
                        "seal policy reloaded"
                    );
                }
                Err(error) => {
                    tracing::error!(%error, "new seal policy refused; keeping the old one");
                    new.spool_seal_every_ms = old.spool_seal_every_ms;
                }
            }
        }
        self.cfg.reloadable = new;
    }
}
