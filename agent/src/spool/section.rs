//! `[spool]` of the configuration: where batches are kept and how much of them, validated from
//! the raw file beside the spool that uses it. The defaults here are the only ones.

use std::path::PathBuf;

use crate::schema::{raw, Validator};

use super::SpoolConfig;

/// `[spool]`, validated (`seal_every_ms` is the sealer's, in [`crate::config::Reloadable`]).
#[derive(Clone, Debug, PartialEq)]
pub struct SpoolSection {
    /// `dir`: the state directory under systemd, else `./wattd-data`.
    pub dir: PathBuf,
    /// `max_bytes`.
    pub max_bytes: u64,
    /// `retain_acked_s`: how long acknowledged batches are kept for a restored ledger.
    pub retain_acked_s: u64,
    /// `retain_acked_share`: at most this share of `max_bytes` of them.
    pub retain_acked_share: f64,
}

impl Default for SpoolSection {
    fn default() -> Self {
        SpoolSection {
            dir: super::default_data_dir(),
            max_bytes: SpoolConfig::DEFAULT_MAX_BYTES,
            retain_acked_s: SpoolConfig::DEFAULT_RETAIN_ACKED_S,
            retain_acked_share: SpoolConfig::DEFAULT_RETAIN_ACKED_SHARE,
        }
    }
}

impl SpoolSection {
    /// The keys of `[spool]` that are given, over the defaults; `seal_every_ms` into `seal`.
    pub fn read(raw: &raw::Spool, v: &mut Validator<'_>, seal_every_ms: &mut u64) -> Self {
        let mut s = SpoolSection::default();
        if let Some(d) = v.string(&raw.dir, "spool.dir") {
            s.dir = PathBuf::from(d);
        }
        // At least eight of the smallest segments (1 MiB): segments are freed whole.
        let min = i64::try_from(SpoolConfig::MIN_MAX_BYTES).unwrap_or(i64::MAX);
        if let Some(b) = v.int(&raw.max_bytes, "spool.max_bytes", min, i64::MAX) {
            s.max_bytes = b;
        }
        // Up to 30 days; 0 frees acknowledged segments at once.
        if let Some(t) = v.int(&raw.retain_acked_s, "spool.retain_acked_s", 0, 30 * 86_400) {
            s.retain_acked_s = t;
        }
        if let Some(f) = v.float(
            &raw.retain_acked_share,
            "spool.retain_acked_share",
            0.0,
            0.75,
        ) {
            s.retain_acked_share = f;
        }
        // At most a minute of intervals waits unsealed (the loss window of a crash).
        if let Some(ms) = v.int(&raw.seal_every_ms, "spool.seal_every_ms", 10, 60_000) {
            *seal_every_ms = ms;
        }
        s
    }
}
