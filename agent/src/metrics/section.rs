//! `[metrics]` of the configuration, validated from the raw file beside the endpoint that uses
//! it. The defaults here are the only ones.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::schema::{raw, Validator};

/// `[metrics]`, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsSection {
    /// `listen`: the endpoint's address (loopback by default).
    pub listen: SocketAddr,
    /// `finished_run_ttl_s`: seconds a finished run's series stay exported.
    pub finished_run_ttl_s: u64,
    /// `web_config`: TLS and basic auth of the endpoint, in the Prometheus exporter toolkit's
    /// YAML format. Per-run series are served only when it authenticates every request.
    pub web_config: Option<PathBuf>,
}

impl Default for MetricsSection {
    fn default() -> Self {
        MetricsSection {
            listen: SocketAddr::from(([127, 0, 0, 1], 9447)),
            finished_run_ttl_s: 300,
            web_config: None,
        }
    }
}

impl MetricsSection {
    /// The keys of `[metrics]` that are given, over the defaults.
    pub fn read(raw: &raw::Metrics, v: &mut Validator<'_>) -> Self {
        let mut m = MetricsSection::default();
        if let Some(s) = v.string(&raw.listen, "metrics.listen") {
            match s.parse::<SocketAddr>() {
                Ok(a) => m.listen = a,
                Err(_) => v.problem("metrics.listen", format!("{s:?} is not an address:port")),
            }
        }
        // Long enough for several scrapes after the finish; at most a day, so finished runs'
        // series cannot pile up.
        if let Some(t) = v.int(
            &raw.finished_run_ttl_s,
            "metrics.finished_run_ttl_s",
            1,
            86_400,
        ) {
            m.finished_run_ttl_s = t;
        }
        // Only the path: the file (and the key it names, which only the daemon's user can
        // read) is read by the daemon when it binds the endpoint, and by `wattd validate`. A
        // bad file must not stop the measuring, nor a reload.
        if let Some(p) = v.string(&raw.web_config, "metrics.web_config") {
            m.web_config = Some(PathBuf::from(p));
        }
        m
    }
}
