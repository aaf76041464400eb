//! The BMC off the event loop: the `wattd-bmc` thread polls the node's Redfish service over HTTPS
//! every `poll` and hands each answer, stamped on CLOCK_MONOTONIC, to the platform meter through a
//! bounded channel. The tick never waits for the BMC: a slow or dead BMC costs the thread its
//! `read_timeout` per poll and the meter a recorded gap, never a late tick.
//!
//! The connection is rebuilt after every failure: the CA and the credentials file are read again
//! then, so a rotated password takes effect at the next failure (a BMC answers 401 to the old one)
//! without a restart.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wattd_collectors::redfish::{self, WallReading};
use wattd_collectors::HostError;
use wattd_web::{ClientOptions, ScrapeClient, ScrapeError, StatusCode};

use crate::platform::{BmcEvent, PENDING_MAX};
use crate::sampler::Stamp;

/// How to reach the BMC (`[platform]` in the configuration).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BmcConfig {
    /// `https://host[:port]`.
    pub url: String,
    /// The CA that signed the BMC's certificate (PEM). Required: a BMC is never trusted blind.
    pub ca_file: PathBuf,
    /// The name the BMC's certificate carries, when it is not the URL's host.
    pub server_name: Option<String>,
    /// `user:password` on one line, for basic auth; read at every (re)connect.
    pub credentials_file: Option<PathBuf>,
    /// The chassis to read (its id, the last part of its path); the first with power otherwise.
    pub chassis: Option<String>,
    pub poll: Duration,
    pub read_timeout: Duration,
    /// Readings above this are refused as garbage.
    pub max_watts: u32,
}

/// Everything that can go wrong talking to the BMC, each naming what it concerns.
#[derive(Debug, thiserror::Error)]
pub enum BmcError {
    #[error("{url:?}: {what}")]
    Url { url: String, what: String },
    #[error("{}: {what}", path.display())]
    Credentials { path: PathBuf, what: String },
    #[error("resolving {host}: {what}")]
    Resolve { host: String, what: String },
    #[error("{0}")]
    Client(#[from] ScrapeError),
    #[error("GET {path}: HTTP {status}")]
    Status { path: String, status: StatusCode },
    /// A body that is not what Redfish says it is (names the resource and field).
    #[error("{0}")]
    Body(#[from] HostError),
    #[error("{0}")]
    NoChassis(String),
    #[error("no runtime for the BMC client: {0}")]
    Runtime(std::io::Error),
}

impl BmcError {
    /// The resource is gone (404): it is looked for again.
    fn not_found(&self) -> bool {
        matches!(self, BmcError::Status { status, .. } if *status == StatusCode::NOT_FOUND)
    }

    /// During discovery, a link that answers this is not the one to read, and the others are
    /// tried: gone, forbidden to this account, not implemented. A refused login (401), a
    /// timeout or a server error is the BMC's, not the link's: discovery is tried again later.
    fn skip_link(&self) -> bool {
        matches!(self, BmcError::Status { status, .. } if matches!(status.as_u16(), 403 | 404 | 405 | 410 | 501))
    }
}

/// `https://host[:port][/]` split into host and port (443 by default). Only HTTPS: the
/// credentials and the billing data's source never cross the network in clear.
pub fn parse_url(url: &str) -> Result<(String, u16), BmcError> {
    let bad = |what: &str| BmcError::Url {
        url: url.to_owned(),
        what: what.to_owned(),
    };
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| bad("must start with https://"))?
        .trim_end_matches('/');
    if rest.is_empty()
        || rest.contains(['/', '?', '#', '@'])
        || rest.chars().any(char::is_whitespace)
    {
        return Err(bad("give https://host or https://host:port, nothing more"));
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, tail) = v6
            .split_once(']')
            .ok_or_else(|| bad("unclosed [ in the host"))?;
        (h.to_owned(), tail.strip_prefix(':'))
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), Some(p)),
            None => (rest.to_owned(), None),
        }
    };
    let port = match port {
        None => 443,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad(&format!("port {p:?} is not 1 to 65535")))?,
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    Ok((host, port))
}

/// `user:password` from the first line of `path`, which must not be readable by others.
pub fn read_credentials(path: &Path) -> Result<(String, String), BmcError> {
    use std::os::unix::fs::PermissionsExt as _;
    let bad = |what: String| BmcError::Credentials {
        path: path.to_owned(),
        what,
    };
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if meta.permissions().mode() & 0o007 != 0 {
        return Err(bad(format!(
            "readable or writable by every user (mode {:o}); chmod o-rwx it",
            meta.permissions().mode() & 0o777
        )));
    }
    if meta.len() > 4096 {
        return Err(bad("larger than 4096 bytes".into()));
    }
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let line = text.lines().next().unwrap_or("").trim_end_matches('\r');
    match line.split_once(':') {
        Some((u, p)) if !u.is_empty() => Ok((u.to_owned(), p.to_owned())),
        _ => Err(bad("the first line is not user:password".into())),
    }
}

/// The resource polled, once found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resource {
    EnvironmentMetrics(String),
    Power(String),
}

impl Resource {
    pub fn path(&self) -> &str {
        match self {
            Resource::EnvironmentMetrics(p) | Resource::Power(p) => p,
        }
    }
}

/// The thread's state: a client (rebuilt after any failure: the CA and the credentials are read
/// again), and the resource found (kept across failures: a garbage answer must not make the
/// thread fall back to another resource; looked for again only when it answers 404).
#[derive(Default)]
struct Session {
    client: Option<ScrapeClient>,
    resource: Option<Resource>,
}

fn connect(cfg: &BmcConfig) -> Result<ScrapeClient, BmcError> {
    let (host, port) = parse_url(&cfg.url)?;
    let resolve = |what: String| BmcError::Resolve {
        host: host.clone(),
        what,
    };
    let addr: SocketAddr = (host.as_str(), port)
        .to_socket_addrs()
        .map_err(|e| resolve(e.to_string()))?
        .next()
        .ok_or_else(|| resolve("no address".into()))?;
    let (user, password) = match &cfg.credentials_file {
        Some(f) => {
            let (u, p) = read_credentials(f)?;
            (Some(u), Some(p))
        }
        None => (None, None),
    };
    let server_name = cfg.server_name.clone().or_else(|| {
        host.parse::<std::net::IpAddr>()
            .is_err()
            .then(|| host.clone())
    });
    // The Host header names the BMC as the URL does (a BMC's host-header check refuses an
    // address it does not know itself by).
    let name = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.clone()
    };
    let authority = if port == 443 {
        name
    } else {
        format!("{name}:{port}")
    };
    let opts = ClientOptions {
        host: Some(authority),
        ca: Some(cfg.ca_file.clone()),
        server_name,
        user,
        password,
        ..ClientOptions::default()
    };
    Ok(ScrapeClient::new(addr, &opts)?.with_timeout(cfg.read_timeout))
}

async fn get(client: &ScrapeClient, path: &str) -> Result<String, BmcError> {
    let (status, body) = client.get(path).await?;
    if !status.is_success() {
        return Err(BmcError::Status {
            path: path.to_owned(),
            status,
        });
    }
    Ok(body)
}

/// Finds the chassis and the resource to poll: its `EnvironmentMetrics` when that has a reading
/// (or answers anything but 404: a garbage or failed answer is retried at the next poll, never a
/// reason to settle for `Power`), else its `Power`. With several chassis that have power and no
/// `[platform] chassis`, nothing is chosen: an enclosure's wall is not one node's.
async fn discover(cfg: &BmcConfig, client: &ScrapeClient) -> Result<Resource, BmcError> {
    let body = get(client, redfish::CHASSIS).await?;
    let members = redfish::members(redfish::CHASSIS, &body)?;
    let mut found = Vec::new();
    let mut tried = Vec::new();
    for m in members {
        let id = m.rsplit('/').next().unwrap_or("");
        if cfg.chassis.as_deref().is_some_and(|c| c != id) {
            continue;
        }
        // A chassis that cannot be read, or reads as garbage, is not this node's: the others
        // are tried (an enclosure's power supply must not block its nodes).
        let links = match get(client, &m).await {
            Ok(body) => match redfish::chassis_links(&m, &body) {
                Ok(l) => l,
                Err(e) => {
                    tried.push(e.to_string());
                    continue;
                }
            },
            Err(e) if e.skip_link() => {
                tried.push(e.to_string());
                continue;
            }
            Err(e) => return Err(e),
        };
        if let Some(em) = &links.environment_metrics {
            match get(client, em).await {
                Ok(body) => {
                    if !redfish::environment_metrics(em, &body, cfg.max_watts)?.is_empty() {
                        found.push(Resource::EnvironmentMetrics(em.clone()));
                        continue;
                    }
                    tried.push(format!("{em}: no PowerWatts or EnergykWh reading"));
                }
                Err(e) if e.skip_link() => tried.push(e.to_string()),
                Err(e) => return Err(e),
            }
        }
        if let Some(p) = &links.power {
            match get(client, p).await {
                Ok(body) => {
                    redfish::power(p, &body, cfg.max_watts)?;
                    found.push(Resource::Power(p.clone()));
                    continue;
                }
                Err(e) if e.skip_link() => tried.push(e.to_string()),
                Err(e) => return Err(e),
            }
        }
        if links.environment_metrics.is_none() && links.power.is_none() {
            tried.push(format!("{m}: no EnvironmentMetrics or Power link"));
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(BmcError::NoChassis(
            match (&cfg.chassis, tried.is_empty()) {
                (Some(c), true) => format!("no chassis {c:?} in {}", redfish::CHASSIS),
                _ if tried.is_empty() => format!("no chassis in {}", redfish::CHASSIS),
                _ => format!("no chassis with a power reading: {}", tried.join("; ")),
            },
        )),
        _ => Err(BmcError::NoChassis(format!(
            "several chassis have power readings ({}): set [platform] chassis to this node's",
            found
                .iter()
                .map(Resource::path)
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

async fn read(
    cfg: &BmcConfig,
    client: &ScrapeClient,
    resource: &Resource,
) -> Result<WallReading, BmcError> {
    let body = get(client, resource.path()).await?;
    let parsed = match resource {
        Resource::EnvironmentMetrics(p) => redfish::environment_metrics(p, &body, cfg.max_watts),
        Resource::Power(p) => redfish::power(p, &body, cfg.max_watts),
    }?;
    if parsed.is_empty() {
        return Err(BmcError::Body(HostError::Malformed {
            path: PathBuf::from(resource.path()),
            what: "neither PowerWatts.Reading nor EnergykWh.Reading has a value".into(),
        }));
    }
    Ok(parsed)
}

/// One poll: connect and find the resource when needed, then read. A failure drops the client;
/// a 404 drops the resource too. The reading comes with CLOCK_MONOTONIC just before and after
/// its own GET (connecting, resolving and discovery are not part of it).
async fn poll(cfg: &BmcConfig, session: &mut Session) -> Result<(WallReading, u64, u64), BmcError> {
    let client = match session.client.take() {
        Some(c) => c,
        None => connect(cfg)?,
    };
    let resource = match session.resource.take() {
        Some(r) => r,
        None => discover(cfg, &client).await?,
    };
    let before = Stamp::now().mono_ns;
    let r = read(cfg, &client, &resource).await;
    let after = Stamp::now().mono_ns;
    if !matches!(&r, Err(e) if e.not_found()) {
        session.resource = Some(resource);
    }
    if r.is_ok() {
        session.client = Some(client);
    }
    r.map(|reading| (reading, before, after))
}

/// The one-shot check of `wattd probe`: which resource would be read, and its first reading.
pub fn probe(cfg: &BmcConfig) -> Result<(Resource, WallReading), BmcError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(BmcError::Runtime)?;
    rt.block_on(async {
        let client = connect(cfg)?;
        let resource = discover(cfg, &client).await?;
        let r = read(cfg, &client, &resource).await?;
        Ok((resource, r))
    })
}

/// The running BMC thread. Dropping it stops the thread at its next wake (it is not joined: a
/// BMC that hangs holds only its own thread, for at most `read_timeout`).
#[derive(Debug)]
pub struct BmcSource {
    rx: Receiver<BmcEvent>,
    stop: Arc<AtomicBool>,
    dropped: Arc<AtomicU64>,
}

impl BmcSource {
    pub fn spawn(cfg: BmcConfig) -> std::io::Result<BmcSource> {
        let (tx, rx) = sync_channel(PENDING_MAX);
        let stop = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicU64::new(0));
        let (s, d) = (stop.clone(), dropped.clone());
        std::thread::Builder::new()
            .name("wattd-bmc".into())
            .spawn(move || run(cfg, tx, s, d))?;
        Ok(BmcSource { rx, stop, dropped })
    }

    /// Everything the thread delivered since the last call.
    pub fn drain(&self) -> Vec<BmcEvent> {
        self.rx.try_iter().collect()
    }

    /// Answers dropped because the channel was full (the loop stalled).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for BmcSource {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn run(cfg: BmcConfig, tx: SyncSender<BmcEvent>, stop: Arc<AtomicBool>, dropped: Arc<AtomicU64>) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = tx.try_send(BmcEvent::Failed {
                mono_ns: Stamp::now().mono_ns,
                detail: format!("the BMC thread has no runtime: {e}"),
            });
            return;
        }
    };
    let mut session = Session::default();
    let mut next = Instant::now();
    // Failed polls since the last good one: an outage is logged once when it starts and once
    // when it ends, never per poll.
    let mut failing: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let result = rt.block_on(poll(&cfg, &mut session));
        let event = match result {
            // The reading is stamped halfway through its exchange.
            Ok((reading, before, after)) => {
                if failing > 0 {
                    tracing::info!(url = %cfg.url, failed_polls = failing, "BMC answers again");
                    failing = 0;
                }
                BmcEvent::Reading {
                    mono_ns: before + (after - before) / 2,
                    reading,
                }
            }
            Err(detail) => {
                let detail = format!("BMC {}: {detail}", cfg.url);
                if failing == 0 {
                    tracing::warn!(error = %detail, "BMC poll failed (logged once per outage; see wattd_bmc_failures_total)");
                }
                failing += 1;
                BmcEvent::Failed {
                    mono_ns: Stamp::now().mono_ns,
                    detail,
                }
            }
        };
        match tx.try_send(event) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                dropped.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => return,
        }
        next += cfg.poll;
        let now = Instant::now();
        if next < now {
            next = now;
        }
        while !stop.load(Ordering::Relaxed) {
            let left = next.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(Duration::from_millis(100)));
        }
    }
}

/// `[platform]` of the configuration: the BMC whose wall energy, less the other meters, is the
/// platform meter. The defaults here are the only ones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlatformConfig {
    pub bmc: BmcConfig,
    /// `max_gap_ms`: power readings further apart are not integrated across (a gap).
    pub max_gap_ms: u64,
}

impl PlatformConfig {
    /// `poll_ms` by default.
    pub const DEFAULT_POLL_MS: u64 = 1_000;
    /// `read_timeout_ms` by default.
    pub const DEFAULT_READ_TIMEOUT_MS: u64 = 2_000;

    /// `max_gap_ms` by default: five polls, and at least a poll past the slowest answer.
    pub fn default_max_gap_ms(poll_ms: u64, read_timeout_ms: u64) -> u64 {
        (poll_ms * 5)
            .max(poll_ms + read_timeout_ms + poll_ms)
            .max(5_000)
    }

    /// `[platform]`: every key checked; `url` and `ca_file` are required. `None` when either is
    /// missing or bad (each named).
    pub fn read(
        raw: &crate::schema::raw::Platform,
        v: &mut crate::schema::Validator<'_>,
    ) -> Option<Self> {
        // The one source today; the key exists so that IPMI can be added without a new section.
        let _ = v.choice(&raw.source, "platform.source", &[("redfish", ())]);
        let url = v.string(&raw.url, "platform.url");
        if let Some(u) = &url {
            if let Err(e) = parse_url(u) {
                v.problem("platform.url", e.to_string());
            }
        }
        let ca_file = v.string(&raw.ca_file, "platform.ca_file");
        for (key, given) in [
            ("url", raw.url.is_given()),
            ("ca_file", raw.ca_file.is_given()),
        ] {
            if !given {
                v.problem(
                    &format!("platform.{key}"),
                    "is required: the BMC's https:// address and the CA that signed its certificate",
                );
            }
        }
        let server_name = v.string(&raw.server_name, "platform.server_name");
        let credentials_file = v
            .string(&raw.credentials_file, "platform.credentials_file")
            .map(PathBuf::from);
        let chassis = v.string(&raw.chassis, "platform.chassis");
        let poll_ms = v
            .int(&raw.poll_ms, "platform.poll_ms", 100, 60_000)
            .unwrap_or(Self::DEFAULT_POLL_MS);
        let read_timeout_ms = v
            .int(&raw.read_timeout_ms, "platform.read_timeout_ms", 10, 60_000)
            .unwrap_or(Self::DEFAULT_READ_TIMEOUT_MS);
        // Readings come a poll apart, each up to read_timeout_ms late: a shorter limit would
        // lose a span at every slow answer.
        let gap_floor = poll_ms + read_timeout_ms;
        let max_gap_ms = v
            .int(&raw.max_gap_ms, "platform.max_gap_ms", 100, 3_600_000)
            .unwrap_or_else(|| Self::default_max_gap_ms(poll_ms, read_timeout_ms));
        let max_watts = v
            .int(&raw.max_watts, "platform.max_watts", 1, 1_000_000)
            .unwrap_or(wattd_collectors::Domain::Platform.default_max_watts());
        if max_gap_ms < gap_floor && raw.max_gap_ms.is_given() {
            v.problem(
                "platform.max_gap_ms",
                format!(
                    "must be at least poll_ms + read_timeout_ms ({poll_ms} + {read_timeout_ms})"
                ),
            );
        }
        Some(PlatformConfig {
            bmc: BmcConfig {
                url: url?,
                ca_file: PathBuf::from(ca_file?),
                server_name,
                credentials_file,
                chassis,
                poll: Duration::from_millis(poll_ms),
                read_timeout: Duration::from_millis(read_timeout_ms),
                max_watts: u32::try_from(max_watts).unwrap_or(u32::MAX),
            },
            max_gap_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_https_host_and_port_only() {
        assert_eq!(
            parse_url("https://bmc.example").unwrap(),
            ("bmc.example".into(), 443)
        );
        assert_eq!(
            parse_url("https://127.0.0.1:8443/").unwrap(),
            ("127.0.0.1".into(), 8443)
        );
        assert_eq!(parse_url("https://[::1]:9").unwrap(), ("::1".into(), 9));
        for bad in [
            "http://bmc",
            "https://",
            "https://u:p@bmc",
            "https://bmc/redfish/v1",
            "https://bmc:0",
            "https://bmc:99999",
            "https://bm c",
        ] {
            let e = parse_url(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn credentials_are_private_and_well_formed() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("bmc.credentials");
        std::fs::write(&f, "admin:s3cr:et\nignored\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(
            read_credentials(&f).unwrap(),
            ("admin".into(), "s3cr:et".into())
        );
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read_credentials(&f)
            .unwrap_err()
            .to_string()
            .contains("every user"));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&f, "no-colon\n").unwrap();
        assert!(read_credentials(&f)
            .unwrap_err()
            .to_string()
            .contains("user:password"));
        assert!(read_credentials(&dir.path().join("missing")).is_err());
    }
}
