//! The configuration's sections, one reader each: every key of `[name]` checked against its
//! bounds, a problem recorded with its line for each bad one, the value set on the `Config`.

use super::*;

/// Every section, in the order the contract lists them.
pub(super) fn read_all(c: &mut Checker<'_>, root: &Table, cfg: &mut Config) {
    read_node(c, root, cfg);
    read_identity(c, root, cfg);
    read_sampling(c, root, cfg);
    read_host(c, root, cfg);
    read_runs(c, root, cfg);
    read_attribution(c, root, cfg);
    read_calibration(c, root, cfg);
    read_estimator(c, root, cfg);
    read_spool(c, root, cfg);
    read_ledger(c, root, cfg);
    read_log(c, root, cfg);
    read_metrics(c, root, cfg);
    read_gpu(c, root, cfg);
    read_platform(c, root, cfg);
}

/// `[node]`.
fn read_node(c: &mut Checker<'_>, root: &Table, cfg: &mut Config) {
    if let Some(t) = c.section(root, "node", &["id"]) {
        if let Some(id) = c.string(t, "node", "id") {
            if id.len() > 253
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                let span = c.get(t, "id").and_then(|(_, s)| s);
                c.problem(
                    span,
                    "node.id",
                    "must be 1 to 253 characters of A-Z a-z 0-9 - _ .",
                );
            } else {
                cfg.node_id = Some(id);
            }
        }
    }
}

/// `[identity]`.
fn read_identity(c: &mut Checker<'_>, root: &Table, cfg: &mut Config) {
    if let Some(t) = c.section(root, "identity", &["rotate_after_s"]) {
        // 0 (never), or at least 10 s, at most a year.
        if let Some(v) = c.int(t, "identity", "rotate_after_s", 0, 365 * 86_400) {
            if v != 0 && v < 10 {
                let span = c.get(t, "rotate_after_s").and_then(|(_, s)| s);
                c.problem(
                    span,
                    "identity.rotate_after_s",
                    "must be 0 (never) or at least 10 seconds",
                );
            } else {
                cfg.identity_rotate_after_s = v;
            }
        }
    }
}

/// `[sampling]`.
fn read_sampling(c: &mut Checker<'_>, root: &Table, cfg: &mut Config) {
    if let Some(t) = c.section(root, "sampling", &["interval_ms"]) {
        if let Some(v) = c.int(t, "sampling", "interval_ms", 10, 60_000) {
            cfg.reloadable.interval_ms = v;
        }
    }
}

/// `[host]`.
fn read_host(c: &mut Checker<'_>, root: &Table, cfg: &mut Config) {
    if let Some(t) = c.section(root, "host", &["root", "cgroup_root"]) {
        if let Some(v) = c.string(t, "host", "root") {
            cfg.host_root = PathBuf::from(v);
        }
        if let Some(v) = c.string(t, "host", "cgroup_root") {
            cfg.cgroup_root = Some(PathBuf::from(v));
        }
    }
}

/// `[runs]`.
fn read_runs(c: &mut Checker<'_>, root: &Table, cfg: &mut Config) {
    if let Some(t) = c.section(
        root,
        "runs",
        &[
            "patterns",
            "control_socket",
            "control_allowed_uids",
            "control_allowed_gids",
            "perf_counters",
        ],
    ) {
        if let Some((v, span)) = c.get(t, "patterns") {
            match v.as_array() {
                Some(arr) => {
                    let mut pats = Vec::new();
                    for item in arr.iter() {
                        match item.as_str() {
                            // The tracker's own grammar, so a pattern accepted here is one the
                            // daemon can run.
                            Some(p) => match wattd_collectors::cgroup::RunPattern::parse(p) {
                                Ok(_) => pats.push(p.to_owned()),
                                Err(wattd_collectors::HostError::BadRunRef { what, .. }) => {
                                    c.problem(item.span(), "runs.patterns", format!("{p:?} {what}"))
                                }
                                Err(e) => c.problem(item.span(), "runs.patterns", e.to_string()),
                            },
                            None => c.problem(
                                item.span(),
                                "runs.patterns",
                                "every entry must be a string",
                            ),
                        }
                    }
                    if arr.is_empty() {
                        c.problem(span, "runs.patterns", "must list at least one pattern");
                    }
                    cfg.reloadable.patterns = pats;
                }
                None => c.problem(span, "runs.patterns", "must be an array of strings"),
            }
        }
        if let Some(v) = c.string(t, "runs", "control_socket") {
            cfg.control_socket = PathBuf::from(v);
        }
        if let Some(v) = c.id_list(t, "runs", "control_allowed_uids") {
            cfg.control_allowed_uids = v;
        }
        if let Some(v) = c.id_list(t, "runs", "control_allowed_gids") {
            cfg.control_allowed_gids = v;
        }
        if let Some((v, span)) = c.get(t, "perf_counters") {
            match v.as_bool() {
                Some(b) => cfg.perf_counters = b,
                None => c.problem(span, "runs.perf_counters", "must be true or false"),
            }
        }
    }
}

/// `[attribution]`.
fn read_attribution(c: &mut Checker<'_>, root: &Table, cfg: &mut Config) {
    if let Some(t) = c.section(
        root,
        "attribution",
        &[
            "idle_policy",
            "dram_policy",
            "idle_window_s",
            "idle_watts_package",
            "idle_watts_dram",
            "idle_watts_psys",
            "idle_watts_gpu",
            "platform_policy",
        ],
    ) {
        if let Some(v) = c.choice(
            t,
            "attribution",
            "platform_policy",
            &[
                (
                    "proportional",
                    crate::attribution::PlatformPolicy::Proportional,
                ),
                ("host", crate::attribution::PlatformPolicy::Host),
            ],
        ) {
            cfg.reloadable.platform_policy = v;
        }
        if let Some(v) = c.choice(
            t,
            "attribution",
            "idle_policy",
            &[
                ("proportional", IdlePolicy::Proportional),
                ("reserved", IdlePolicy::Reserved),
                ("host", IdlePolicy::Host),
            ],
        ) {
            cfg.reloadable.idle_policy = v;
        }
        if let Some(v) = c.choice(
            t,
            "attribution",
            "dram_policy",
            &[("cpu", DramPolicy::Cpu), ("memory", DramPolicy::Memory)],
        ) {
            cfg.reloadable.dram_policy = v;
        }
        if let Some(v) = c.int(t, "attribution", "idle_window_s", 1, 86_400) {
            cfg.idle_window_s = v;
        }
        declared(
            c,
            t,
            "attribution",
            "idle_watts_",
            IdleSource::Config,
            &mut cfg.idle_declared,
        );
    }
}

/// `[calibration]`.
fn read_calibration(c: &mut Checker<'_>, root: &Table, cfg: &mut Config) {
    if let Some(t) = c.section(
        root,
        "calibration",
        &["idle_watts_package", "idle_watts_dram", "idle_watts_psys"],
    ) {
        declared(
            c,
            t,
            "calibration",
            "idle_watts_",
            IdleSource::Calibration,
            &mut cfg.idle_declared,
        );
    }
}

/// `[estimator]`.
fn read_estimator(c: &mut Checker<'_>, root: &Table, cfg: &mut Config) {
    if let Some(t) = c.section(
        root,
        "estimator",
        &["idle_watts_per_package", "busy_watts_per_cpu"],
    ) {
        let idle = c.float(t, "estimator", "idle_watts_per_package", 0.0, 10_000.0);
        let busy = c.float(t, "estimator", "busy_watts_per_cpu", 0.0, 1_000.0);
        let d = EstimatorModel::default();
        cfg.estimator = EstimatorModel {
            idle_uw_per_package: idle.map_or(d.idle_uw_per_package, |w| (w * 1e6).round() as u64),
            busy_uw_per_cpu: busy.map_or(d.busy_uw_per_cpu, |w| (w * 1e6).round() as u64),
        };
    }
}

/// `[spool]`.
fn read_spool(c: &mut Checker<'_>, root: &Table, cfg: &mut Config) {
    if let Some(t) = c.section(
        root,
        "spool",
        &[
            "dir",
            "max_bytes",
            "retain_acked_s",
            "retain_acked_share",
            "seal_every_ms",
        ],
    ) {
        if let Some(v) = c.string(t, "spool", "dir") {
            cfg.spool_dir = PathBuf::from(v);
        }
        // At least eight of the smallest segments (1 MiB): segments are freed whole.
        let min = i64::try_from(crate::spool::SpoolConfig::MIN_MAX_BYTES).unwrap_or(i64::MAX);
        if let Some(v) = c.int(t, "spool", "max_bytes", min, i64::MAX) {
            cfg.spool_max_bytes = v;
        }
        // Up to 30 days; 0 frees acknowledged segments at once.
        if let Some(v) = c.int(t, "spool", "retain_acked_s", 0, 30 * 86_400) {
            cfg.spool_retain_acked_s = v;
        }
        if let Some(v) = c.float(t, "spool", "retain_acked_share", 0.0, 0.75) {
            cfg.spool_retain_acked_share = v;
        }
        // At most a minute of intervals waits unsealed (the loss window of a crash).
        if let Some(v) = c.int(t, "spool", "seal_every_ms", 10, 60_000) {
            cfg.reloadable.spool_seal_every_ms = v;
        }
    }
}

/// `[ledger]`.
fn read_ledger(c: &mut Checker<'_>, root: &Table, cfg: &mut Config) {
    if let Some(t) = c.section(
        root,
        "ledger",
        &[
            "endpoint",
            "ca",
            "cert",
            "key",
            "window",
            "heartbeat_s",
            "max_batches_per_s",
            "backoff_max_s",
            "ack_timeout_s",
            "drain_s",
        ],
    ) {
        let endpoint = c.string(t, "ledger", "endpoint");
        let ca = c.string(t, "ledger", "ca");
        let cert = c.string(t, "ledger", "cert");
        let key = c.string(t, "ledger", "key");
        let window = c.int(t, "ledger", "window", 1, 4096);
        let heartbeat_s = c.int(t, "ledger", "heartbeat_s", 1, 3600);
        let rate = c.int(t, "ledger", "max_batches_per_s", 1, 100_000);
        let backoff_max_s = c.int(t, "ledger", "backoff_max_s", 1, 3600);
        let ack_timeout_s = c.int(t, "ledger", "ack_timeout_s", 1, 3600);
        let drain_s = c.int(t, "ledger", "drain_s", 0, 60);
        if let Some(e) = &endpoint {
            if !e.starts_with("https://") {
                let span = c.get(t, "endpoint").and_then(|(_, s)| s);
                c.problem(span, "ledger.endpoint", "must be an https:// URL");
            }
        }
        match (endpoint, ca, cert, key) {
            (Some(endpoint), Some(ca), Some(cert), Some(key)) => {
                let mut l = crate::shipper::ShipperConfig::new(
                    &endpoint,
                    Path::new(&ca),
                    Path::new(&cert),
                    Path::new(&key),
                );
                if let Some(v) = window {
                    l.window = v as usize;
                }
                if let Some(v) = heartbeat_s {
                    l.heartbeat = Duration::from_secs(v);
                }
                if let Some(v) = rate.and_then(|v| std::num::NonZeroU32::new(v as u32)) {
                    l.max_batches_per_s = v;
                }
                if let Some(v) = backoff_max_s {
                    l.max_backoff = Duration::from_secs(v);
                }
                if let Some(v) = ack_timeout_s {
                    l.ack_timeout = Duration::from_secs(v);
                }
                if let Some(v) = drain_s {
                    l.drain = Duration::from_secs(v);
                }
                cfg.ledger = Some(l);
            }
            _ => {
                let span = root.get_key_value("ledger").and_then(|(k, _)| k.span());
                c.problem(span, "ledger", "needs all of endpoint, ca, cert and key");
            }
        }
    }
}

/// `[log]`.
fn read_log(c: &mut Checker<'_>, root: &Table, cfg: &mut Config) {
    if let Some(t) = c.section(root, "log", &["level"]) {
        if let Some(v) = c.string(t, "log", "level") {
            match tracing_subscriber::EnvFilter::try_new(&v) {
                Ok(_) => cfg.reloadable.log_level = Some(v),
                Err(e) => {
                    let span = c.get(t, "level").and_then(|(_, s)| s);
                    c.problem(span, "log.level", format!("{v:?} is not a log filter: {e}"));
                }
            }
        }
    }
}

/// `[metrics]`.
fn read_metrics(c: &mut Checker<'_>, root: &Table, cfg: &mut Config) {
    if let Some(t) = c.section(
        root,
        "metrics",
        &["listen", "finished_run_ttl_s", "web_config"],
    ) {
        if let Some(v) = c.string(t, "metrics", "listen") {
            match v.parse::<SocketAddr>() {
                Ok(a) => cfg.metrics_listen = a,
                Err(_) => {
                    let span = c.get(t, "listen").and_then(|(_, s)| s);
                    c.problem(
                        span,
                        "metrics.listen",
                        format!("{v:?} is not an address:port"),
                    );
                }
            }
        }
        // Long enough for several scrapes after the finish; at most a day, so finished runs'
        // series cannot pile up.
        if let Some(v) = c.int(t, "metrics", "finished_run_ttl_s", 1, 86_400) {
            cfg.metrics_finished_run_ttl_s = v;
        }
        // Only the path: the file (and the key it names, which only the daemon's user can
        // read) is read by the daemon when it binds the endpoint, and by `wattd validate`. A
        // bad file must not stop the measuring, nor a reload.
        if let Some(v) = c.string(t, "metrics", "web_config") {
            cfg.metrics_web_config = Some(PathBuf::from(v));
        }
    }
}

/// `[gpu]`.
fn read_gpu(c: &mut Checker<'_>, root: &Table, cfg: &mut Config) {
    if let Some(t) = c.section(
        root,
        "gpu",
        &["enabled", "library", "read_timeout_ms", "max_watts"],
    ) {
        if let Some((v, span)) = c.get(t, "enabled") {
            match v.as_bool() {
                Some(b) => cfg.gpu.enabled = b,
                None => c.problem(span, "gpu.enabled", "must be true or false"),
            }
        }
        if let Some(v) = c.string(t, "gpu", "library") {
            cfg.gpu.library = Some(PathBuf::from(v));
        }
        if let Some(v) = c.int(t, "gpu", "read_timeout_ms", 10, 60_000) {
            cfg.gpu.read_timeout_ms = v;
        }
        if let Some(v) = c.int(t, "gpu", "max_watts", 1, 20_000) {
            cfg.gpu.max_watts = v;
        }
    }
}

/// `[platform]`.
fn read_platform(c: &mut Checker<'_>, root: &Table, cfg: &mut Config) {
    if let Some(t) = c.section(
        root,
        "platform",
        &[
            "source",
            "url",
            "ca_file",
            "server_name",
            "credentials_file",
            "chassis",
            "poll_ms",
            "read_timeout_ms",
            "max_gap_ms",
            "max_watts",
        ],
    ) {
        platform(c, root, t, cfg);
    }
}

/// `[platform]`: every key checked; `url` and `ca_file` are required.
fn platform(c: &mut Checker<'_>, root: &Table, t: &Table, cfg: &mut Config) {
    let section_span = root.get_key_value("platform").and_then(|(k, _)| k.span());
    // The one source today; the key exists so that IPMI can be added without a new section.
    let _ = c.choice(t, "platform", "source", &[("redfish", ())]);
    let url = c.string(t, "platform", "url");
    if let (Some(u), Some((_, span))) = (&url, c.get(t, "url")) {
        if let Err(e) = crate::bmc::parse_url(u) {
            c.problem(span, "platform.url", e.to_string());
        }
    }
    let ca_file = c.string(t, "platform", "ca_file");
    for (key, v) in [("url", &url), ("ca_file", &ca_file)] {
        if v.is_none() && t.get(key).is_none() {
            c.problem(
                section_span.clone(),
                &format!("platform.{key}"),
                "is required: the BMC's https:// address and the CA that signed its certificate",
            );
        }
    }
    let server_name = c.string(t, "platform", "server_name");
    let credentials_file = c
        .string(t, "platform", "credentials_file")
        .map(PathBuf::from);
    let chassis = c.string(t, "platform", "chassis");
    let poll_ms = c
        .int(t, "platform", "poll_ms", 100, 60_000)
        .unwrap_or(1_000);
    let read_timeout_ms = c
        .int(t, "platform", "read_timeout_ms", 10, 60_000)
        .unwrap_or(2_000);
    // Readings come a poll apart, each up to read_timeout_ms late: a shorter limit would lose a
    // span at every slow answer.
    let gap_floor = poll_ms + read_timeout_ms;
    let max_gap_ms = c
        .int(t, "platform", "max_gap_ms", 100, 3_600_000)
        .unwrap_or((poll_ms * 5).max(gap_floor + poll_ms).max(5_000));
    let max_watts = c
        .int(t, "platform", "max_watts", 1, 1_000_000)
        .unwrap_or(Domain::Platform.default_max_watts());
    if max_gap_ms < gap_floor {
        if let Some((_, span)) = c.get(t, "max_gap_ms") {
            c.problem(
                span,
                "platform.max_gap_ms",
                format!(
                    "must be at least poll_ms + read_timeout_ms ({poll_ms} + {read_timeout_ms})"
                ),
            );
        }
    }
    if let (Some(url), Some(ca)) = (url, ca_file) {
        cfg.platform = Some(PlatformConfig {
            bmc: crate::bmc::BmcConfig {
                url,
                ca_file: PathBuf::from(ca),
                server_name,
                credentials_file,
                chassis,
                poll: std::time::Duration::from_millis(poll_ms),
                read_timeout: std::time::Duration::from_millis(read_timeout_ms),
                max_watts: u32::try_from(max_watts).unwrap_or(u32::MAX),
            },
            max_gap_ms,
        });
    }
}

fn declared(
    c: &mut Checker<'_>,
    t: &Table,
    sec: &str,
    prefix: &str,
    source: IdleSource,
    out: &mut BTreeMap<Domain, IdleEstimate>,
) {
    for (suffix, domain, max) in [
        ("package", Domain::Package, 5_000.0),
        ("dram", Domain::Dram, 2_000.0),
        ("psys", Domain::Psys, 20_000.0),
        ("gpu", Domain::Gpu, 10_000.0),
    ] {
        if let Some(w) = c.float(t, sec, &format!("{prefix}{suffix}"), 0.0, max) {
            // Config wins over calibration when both are given: it is the operator's word.
            let e = IdleEstimate {
                power_uw: (w * 1e6).round() as u64,
                source,
            };
            if source == IdleSource::Config || !out.contains_key(&domain) {
                out.insert(domain, e);
            }
        }
    }
}
