//! `wattd run`: the daemon. One `Daemon`, built by [`Daemon::start`], whose loop waits for the
//! next [`Event`] of a closed set (tick, stop signal, reload signal, control-plane request, the
//! ledger's acknowledgement, cgroup events readable) and hands it to that event's handler.
//! Single-threaded, so the tracker, sampler and sealer need no locks. Each tick closes an
//! interval, attributes it, seals it into the spool and commits it (fdatasync) before the next.
//! SIGTERM closes the interval in hand, seals and flushes it.
//!
//! `start.rs` builds the daemon (spool first, then sources, runs, control socket, metrics,
//! shipper, the downtime gap); `tick.rs` is the tick; `reload.rs` the SIGHUP reload; the
//! smaller handlers are here.

use std::collections::{BTreeMap, HashSet};
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::Signal;
use tokio::sync::{mpsc, watch};
use wattd_collectors::cgroup::RunTracker;

use crate::attribution::host::HostBalance;
use crate::attribution::totals::Totals;
use crate::bmc::BmcSource;
use crate::config::Config;
use crate::control::{self, ControlRequest};
use crate::gpu::GpuSource;
use crate::metrics::Metrics;
use crate::sampler::{Meters, Reading, Sampler};
use crate::sealer::Sealer;
use crate::shipper::{ShipState, ShipperStats};
use ticker::Ticker;

mod reload;
mod start;
mod tick;
mod ticker;
mod watchdog;

pub use start::node_id;
pub use tick::usage_from;

/// Swaps the log filter (SIGHUP); returns why a filter was refused.
pub type LogReload = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Runs the daemon until SIGTERM or SIGINT; SIGHUP reloads the configuration file.
pub fn run(cfg: Config, log_reload: LogReload) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    // The loop runs as a task, not as `block_on`'s own future: a timer that wakes a task
    // queues it on the runtime's thread, while one that wakes `block_on`'s future unparks the
    // driver through its eventfd (with the timerfd clock, `ticker.rs`: 10 system calls per idle
    // tick -> 9, a write and an `epoll_wait` fewer, a timerfd read more).
    let daemon = rt.spawn(async move { Daemon::start(cfg, log_reload).await?.run().await });
    match rt.block_on(daemon) {
        Ok(done) => done,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(anyhow::anyhow!("the daemon's task: {e}")),
    }
}

/// What the daemon's loop waits for: every wake-up is one of these, and each has one handler.
#[derive(Debug)]
enum Event {
    /// The sampling period elapsed: close the interval in hand (`on_tick`).
    Tick,
    /// SIGTERM or SIGINT: close, seal and flush the interval in hand, then stop.
    Stop,
    /// SIGHUP: re-read the configuration file (`on_reload`).
    Reload,
    /// A control-plane message, to apply and answer (`on_control`).
    Control(ControlRequest),
    /// The ledger's acknowledged seq moved (`on_acked`).
    Acked(u64),
    /// The tracker's inotify descriptor is readable (`on_cgroup_events`).
    CgroupEvents,
    /// The sampling clock could not be read: the last tick is taken and the daemon stops with
    /// the error (under systemd, to be restarted).
    ClockFailed(std::io::Error),
}

/// Whether the loop goes on after a handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    Stop,
}

/// The signals the daemon answers.
struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

/// A borrowed descriptor to wait on (the tracker's inotify fd, which the tracker owns).
struct Fd(RawFd);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// The shipper's side of the loop, when a ledger is configured.
struct Shipping {
    /// The sealed seq, a heartbeat and the current key, for the shipper.
    state: watch::Sender<ShipState>,
    /// The ledger's acknowledged seq, from the shipper.
    acked: watch::Receiver<u64>,
    /// How long a stop waits for the last acknowledgements (`[ledger] drain`).
    drain: Duration,
}

/// The running daemon: what it measures with, where it keeps and sends what it measured, and
/// the little state that lives from one tick to the next.
pub struct Daemon {
    cfg: Config,
    log_reload: LogReload,
    /// The kernel's boot id, the frame of reference of the intervals' monotonic stamps.
    boot: String,
    /// CPUs per package, for the reserved-CPU spread.
    package_cpus: BTreeMap<u32, u32>,
    /// The host bucket's CPU time, paid from a running balance.
    host: HostBalance,

    // Declared before `tracker`, so dropped before it: it borrows the tracker's descriptor.
    events: AsyncFd<Fd>,
    tracker: RunTracker,
    /// The meters the loop reads at each tick (RAPL, hwmon, the estimator); NVML GPUs are read
    /// on their own thread.
    meters: Meters,
    /// The tick's readings, the loop's meters then the NVML GPUs (kept for its capacity).
    readings: Vec<Reading>,
    sampler: Sampler,
    sealer: Sealer,
    gpus: Option<GpuSource>,
    /// The BMC's thread, for the platform meter. Changing `[platform]` takes a restart.
    bmc: Option<BmcSource>,

    control: Option<mpsc::Receiver<ControlRequest>>,
    shipping: Option<Shipping>,
    ship_stats: Arc<ShipperStats>,
    metrics: Metrics,
    /// The `/metrics` text for the endpoint's thread; `None` when the endpoint is off.
    metrics_text: Option<watch::Sender<Arc<String>>>,
    /// Tells the control server, the metrics endpoint and the shipper to stop.
    shutdown: watch::Sender<bool>,
    signals: Signals,
    ticker: Ticker,

    /// Per-run totals, for the summaries of finished runs.
    totals: Totals,
    /// When each live run started (the start of its first interval), for its summary.
    started_unix: BTreeMap<String, i64>,
    /// Runs whose labels are in a record already (until they finish).
    labelled: HashSet<String>,
    /// Whether READY was sent (after the first interval).
    ready: bool,
    /// systemd's watchdog keep-alive, every quarter of its period (a second at most).
    watchdog: watchdog::Watchdog,
    /// Intervals merged into another because the spool was full, since start.
    coarsened_intervals: u64,
    last_render: Option<Instant>,
    /// When the node key was made, for `[identity] rotate_after_s`.
    key_born_unix_ns: i64,
    unattributed_warned: Option<Instant>,
    platform_warned: Option<Instant>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let spool = self.sealer.spool();
        f.debug_struct("Daemon")
            .field("config", &self.cfg.file)
            .field("reloadable", &self.cfg.reloadable)
            .field("sealed_seq", &spool.sealed_seq())
            .field("acked_seq", &spool.acked_seq())
            .field("gpus", &self.gpus.is_some())
            .field("bmc", &self.bmc.is_some())
            .field("shipping", &self.shipping.is_some())
            .field("ready", &self.ready)
            .finish_non_exhaustive()
    }
}

/// How often, at most, the `/metrics` text is rendered (once per tick below 1 Hz).
const RENDER_EVERY: Duration = Duration::from_secs(1);

/// At most one warning this often about GPU processes whose cgroup cannot be read, or about a
/// platform meter without readings.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Whether a rate-limited warning is due now; if so, its time is noted.
fn warn_due(last: &mut Option<Instant>) -> bool {
    if last.map_or(true, |t| t.elapsed() >= WARN_EVERY) {
        *last = Some(Instant::now());
        return true;
    }
    false
}

impl Daemon {
    /// Runs the loop until a stop signal; then waits (at most `[ledger] drain`) for the last
    /// acknowledgements and stops the daemon's tasks.
    pub async fn run(mut self) -> anyhow::Result<()> {
        start::release_cold_code("start");
        // Set when the clock failed: the stop is taken as a signal's, then reported.
        let mut clock_failed = None;
        loop {
            let flow = match self.next_event().await {
                Event::Tick => self.on_tick(false).await?,
                Event::Stop => self.on_tick(true).await?,
                Event::Reload => self.on_reload(),
                Event::Control(req) => self.on_control(req),
                Event::Acked(seq) => self.on_acked(seq)?,
                Event::CgroupEvents => self.on_cgroup_events(),
                Event::ClockFailed(e) => {
                    tracing::error!(error = %e, "the sampling clock failed; stopping");
                    clock_failed = Some(e);
                    self.on_tick(true).await?
                }
            };
            if flow == Flow::Stop {
                break;
            }
        }
        self.shut_down().await;
        match clock_failed {
            Some(e) => Err(anyhow::Error::new(e).context("the sampling clock (timerfd)")),
            None => Ok(()),
        }
    }

    /// Waits for the next event.
    async fn next_event(&mut self) -> Event {
        let control = &mut self.control;
        let shipping = &mut self.shipping;
        tokio::select! {
            tick = self.ticker.tick() => match tick {
                Ok(_) => Event::Tick,
                Err(e) => Event::ClockFailed(e),
            },
            _ = self.signals.term.recv() => Event::Stop,
            _ = self.signals.int.recv() => Event::Stop,
            _ = self.signals.hup.recv() => Event::Reload,
            Some(req) = async {
                match control.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => Event::Control(req),
            Some(seq) = async {
                match shipping.as_mut() {
                    Some(s) => s.acked.changed().await.ok().map(|()| *s.acked.borrow_and_update()),
                    None => std::future::pending().await,
                }
            } => Event::Acked(seq),
            guard = self.events.readable() => {
                if let Ok(mut g) = guard {
                    g.clear_ready();
                }
                Event::CgroupEvents
            }
        }
    }

    /// A control-plane message: applied to the tracker and answered.
    fn on_control(&mut self, req: ControlRequest) -> Flow {
        let result = control::apply(&mut self.tracker, &req.event);
        if let Err(e) = &result {
            tracing::info!(error = %e, event = ?req.event, "control message refused");
        }
        req.respond(result);
        Flow::Continue
    }

    /// The ledger acknowledged up to `seq`: the spool's cursor moves (and acknowledged segments
    /// past retention are deleted), or moves back for a ledger restored from a backup.
    fn on_acked(&mut self, seq: u64) -> anyhow::Result<Flow> {
        let spool = self.sealer.spool_mut();
        if seq < spool.acked_seq() {
            // The ledger holds less than before (restored from a backup): the cursor goes back as
            // far as the spool still holds, and the shipper re-sends.
            let was = spool.acked_seq();
            match spool.rewind_ack(seq) {
                Ok(to) => tracing::warn!(
                    ledger_acked = seq,
                    was,
                    now = to,
                    "acknowledged cursor moved back for a restored ledger"
                ),
                Err(e) if e.is_fatal() => {
                    return Err(anyhow::Error::new(e)
                        .context("moving the acknowledged cursor back (fatal)"));
                }
                Err(error) => tracing::warn!(%error, seq, "moving the acknowledged cursor back"),
            }
            return Ok(Flow::Continue);
        }
        match spool.ack(seq) {
            Ok(deleted) => {
                for path in deleted {
                    tracing::debug!(path = %path.display(), "acknowledged segment deleted");
                }
            }
            Err(e) if e.is_fatal() => {
                return Err(
                    anyhow::Error::new(e).context("recording the ledger's acknowledgement (fatal)")
                );
            }
            Err(error) => tracing::warn!(%error, seq, "recording the ledger's acknowledgement"),
        }
        Ok(Flow::Continue)
    }

    /// Cgroups appeared or went: the tracker reads its inotify events.
    fn on_cgroup_events(&mut self) -> Flow {
        if let Err(error) = self.tracker.poll_events() {
            tracing::warn!(%error, "cgroup events");
        }
        Flow::Continue
    }

    /// After the last tick: gives the shipper a moment to get the last batches acknowledged, so
    /// a planned stop leaves nothing for the next start to send (whatever is not acknowledged
    /// stays in the spool), then stops the tasks and lets the control server remove its socket.
    async fn shut_down(mut self) {
        if let Some(s) = self.shipping.as_mut() {
            let sealed = self.sealer.spool().sealed_seq();
            let deadline = tokio::time::Instant::now() + s.drain;
            while *s.acked.borrow_and_update() < sealed {
                tokio::select! {
                    r = s.acked.changed() => if r.is_err() { break },
                    _ = tokio::time::sleep_until(deadline) => break,
                }
            }
            let acked = *s.acked.borrow();
            if let Err(error) = self.sealer.spool_mut().ack(acked) {
                tracing::warn!(%error, acked, "recording the ledger's last acknowledgement");
            }
            if acked < sealed {
                tracing::info!(
                    acked,
                    sealed,
                    "stopping with batches not yet acknowledged; they are sent at the next start"
                );
            } else {
                tracing::info!(acked, "every sealed batch acknowledged by the ledger");
            }
        }
        let _ = self.shutdown.send(true);
        // Let the control server see the shutdown and remove its socket file.
        for _ in 0..10 {
            if !Path::new(&self.cfg.runs.control_socket).exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
