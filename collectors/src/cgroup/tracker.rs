//! The run tracker: which runs exist (pattern discovery over cgroupfs with inotify, plus the
//! control plane's announcements), and how much CPU each used per package in each tick.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::ffi::OsStr;
use std::io;
use std::ops::Bound;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::family::{share_residual, Claimant, ClaimantKind, Family, FinalUsage, Other};
use super::files::{read_populated, read_reserved_millicpus, Source};
use super::inotify::{Event, Inotify};
use super::mount::find_cgroup2_mount;
use super::pattern::{validate_cgroup_rel, validate_run_id, NameMatch, RunPattern};
use super::perf::CgroupTaskClock;
use crate::error::{HostError, Shown, HINT_GENERIC, HINT_PERF};
use crate::hostfs::HostRoot;
use crate::procstat::{user_hz, ProcStat, ProcStatFile};
use crate::topology::Topology;

/// Labels the control plane attaches to a run.
pub type Labels = BTreeMap<String, String>;

/// Most labels a run may carry, and their key and value lengths: the contract's one bound
/// (labels reach the records and the ledger).
pub use wattd_proto::names::{LABELS_MAX, LABEL_KEY_MAX_BYTES, LABEL_VALUE_MAX_BYTES};
/// How many finished run ids are remembered, so a repeated finish is answered "ok" and a
/// finished run's cgroup, if it lingers, is not discovered again as a new run.
const RECENTLY_FINISHED_MAX: usize = 16_384;
/// Longest absolute path we open (PATH_MAX).
const PATH_MAX_BYTES: usize = 4095;

/// The buffer a parent's directory is read into: about 300 children per `getdents64` call.
const DIR_BUF_BYTES: usize = 16 * 1024;

const PARENT_MASK: u32 = libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_DELETE_SELF
    | libc::IN_ONLYDIR;

/// A reconcile point's reads are taken again when the parent gained more than this between its
/// two reads (the residual is off by at most half of it) ...
const BRACKET_MAX_US: u64 = 1_000;
/// ... at most this many times ...
const BRACKET_RETRIES: u32 = 2;
/// ... and only for a parent with at most this many children: reading hundreds takes long enough
/// that the bracket is wide however often it is tried (those points are exact in sum only).
const BRACKET_RETRY_MAX_CHILDREN: usize = 100;
/// Slack per CPU on the physical bound of a family's balance: CPU time is accounted to a cgroup
/// at scheduler ticks and switches, a little after it was spent.
const BALANCE_SLACK_US: i128 = 100_000;
/// Counter time the runs' usage against their perf counters must have been measured over
/// before it scales counted tails (a second: `cpu.stat` lags each running task by up to a
/// scheduler tick, which must average out), and the least and most the scale may be (the
/// counters add steal and interrupt time, so they count at least what `usage_usec` does).
const PERF_SCALE_MIN_NS: u128 = 1_000_000_000;
const PERF_SCALE_MIN_PPM: u128 = 800_000;

/// How recent a cgroup must be to be billed from its birth when found (see `billing_start`):
/// longer than any rescan period, shorter than a forgotten run's lingering cgroup.
pub const BIRTH_WINDOW: std::time::Duration = std::time::Duration::from_secs(3600);

/// How far behind the real clock kernfs' coarse inode timestamps can be (a jiffy at HZ 100).
const CTIME_SLACK: std::time::Duration = std::time::Duration::from_millis(20);

/// What the tracker needs to know; see the BRIEF's configuration contract (`host.root`,
/// `host.cgroup_root`, `runs.patterns`).
#[derive(Clone, Debug)]
pub struct TrackerConfig {
    pub root: HostRoot,
    /// Host path of the cgroup2 mount (read under `root`); `None`: found in mountinfo.
    pub cgroup_root: Option<PathBuf>,
    pub patterns: Vec<String>,
    /// Open per-run perf cgroup `task-clock` counters where permitted (the cgroup root must be a
    /// real cgroup2 mount): they outlive the cgroup, so the tail of a run removed before its
    /// final read is still known: they weigh its share of its parent's residual, and count it
    /// where the parent cannot tell or is noisier.
    pub perf_counters: bool,
    /// Also split runs across packages by those counters (live hosts only: a simulated
    /// topology's packages are not the CPUs the counters are on).
    pub perf_split: bool,
    /// Most descriptors the tracker keeps open; `None`: three quarters of RLIMIT_NOFILE.
    pub fd_budget: Option<usize>,
    /// Raise the RLIMIT_NOFILE soft limit to the hard limit at start.
    pub raise_nofile: bool,
    /// Full rescan every this many ticks, in case inotify dropped events; 0: never.
    pub rescan_every_ticks: u32,
    /// Read each run's `memory.current` at every tick (what the DRAM `memory` policy weighs);
    /// off, a run's `memory_bytes` is `None` and a tick costs one read per run fewer.
    pub read_memory: bool,
}

impl TrackerConfig {
    pub fn new(root: HostRoot) -> Self {
        TrackerConfig {
            root,
            cgroup_root: None,
            patterns: vec!["flowzart.slice/run-{run_id}.scope".to_owned()],
            perf_counters: true,
            perf_split: true,
            fd_budget: None,
            raise_nofile: true,
            rescan_every_ticks: 60,
            read_memory: true,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunOrigin {
    Pattern,
    ControlPlane,
}

/// Where a run's billing starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BilledFrom {
    /// The cgroup's birth: `cpu.stat` starts at 0, so its whole usage is counted. Runs that
    /// appear after the tracker started.
    Birth,
    /// The tracker's start: runs already there when it started (an agent restart) must not
    /// have usage from before, which is a gap, billed in this interval.
    Discovery,
}

/// How a run's usage was divided among packages this tick.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SplitSource {
    PerfTaskClock,
    ProcStatShare,
}

/// One run's usage over one tick.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RunUsage {
    pub run_id: Arc<str>,
    /// Relative to the cgroup root.
    pub cgroup: Arc<str>,
    pub labels: Arc<Labels>,
    pub origin: RunOrigin,
    pub billed_from: BilledFrom,
    /// CPU time used this tick, from `cpu.stat` `usage_usec`.
    pub usage_us: u64,
    /// `usage_us` divided among packages; sums to `usage_us` exactly.
    pub usage_us_by_package: BTreeMap<u32, u64>,
    pub split: SplitSource,
    pub memory_bytes: Option<u64>,
    pub reserved_millicpus: Option<u64>,
    /// First snapshot this run appears in.
    pub started: bool,
    /// Last snapshot this run appears in: it finished or its cgroup is gone.
    pub finished: bool,
    /// Part of `usage_us` recovered from the parent's `cpu.stat` (see [`super::family`]).
    pub reconciled_us: u64,
    /// With `finished`: how the run's last stretch of usage was obtained.
    pub final_usage: Option<FinalUsage>,
    /// With `finished`: everything recovered from the parent over the run's life.
    pub reconciled_total_us: u64,
}

/// One package over one tick.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PackageUsage {
    /// Busy CPU time from `/proc/stat`, all CPUs of the package.
    pub busy_us: u64,
    /// Sum of the runs' usage on this package.
    pub runs_us: u64,
    /// The host bucket: busy time not in any run, paid from a running balance of
    /// `busy_us - runs_us` so that quantisation errors of /proc/stat cancel over time instead of
    /// biasing it; never negative. (Intervals where runs out-measured busy time are counted.)
    pub host_us: u64,
}

/// Cumulative counters since the tracker started (gauges say so).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TrackerCounters {
    /// Gauge: runs tracked after this tick.
    pub runs_tracked: u64,
    /// Gauge: descriptors held for runs.
    pub kept_fds: u64,
    pub fd_budget: u64,
    /// Runs whose files are read open-read-close because the descriptor budget was full.
    pub fd_fallback_runs: u64,
    /// Runs split by /proc/stat share because perf counters could not be had for them (or the
    /// split by perf is off).
    pub perf_fallback_runs: u64,
    /// Runs opened without perf counters (disabled, not permitted, descriptor budget full):
    /// their tails after an unread removal can only be recovered from their parent.
    pub perf_uncounted_runs: u64,
    /// Directory names shaped like a run but with an id we refuse (not UTF-8, `..`, ...).
    pub hostile_names_skipped: u64,
    /// Packages whose runs' usage exceeded measured busy time (host bucket clamped to 0).
    pub host_clamps: u64,
    /// Cgroups that vanished between being listed and being opened.
    pub vanished_at_discovery: u64,
    /// Runs whose cgroup went away without a read after they emptied: usage since their
    /// last read may be missing.
    pub vanished_before_final_read: u64,
    pub read_errors: u64,
    /// Runs without a `cgroup.events` watch (inotify limit): measured at ticks only.
    pub watch_fallbacks: u64,
    pub inotify_overflows: u64,
    pub rescans: u64,
    /// `usage_usec` went down (a cgroup recreated under the same name).
    pub usage_went_backwards: u64,
    /// Finished runs by how their last usage was obtained (see [`FinalUsage`]).
    pub final_read: u64,
    pub final_perf_counted: u64,
    pub final_reconciled: u64,
    pub final_reconciled_shared: u64,
    pub final_lost: u64,
    /// Runs created and removed before they could be opened, found from their creation event
    /// and billed from their parent (counted also in `final_reconciled*` or `final_lost`).
    pub ghost_runs: u64,
    /// Microseconds of CPU time recovered from parents and given to runs.
    pub reconciled_us: u64,
    /// Reconcile points (one parent read against its children).
    pub reconcile_points: u64,
    /// Reconcile points where the parent held processes of its own (the tails of children
    /// that went away then could not be told apart: recorded as lost).
    pub reconcile_parent_busy: u64,
    /// A cgroup appeared under the name of a run that already finished: not a run again (a run
    /// id names one run); its CPU time is the host's.
    pub run_id_reused: u64,
    /// Children of a family's parent found by the listing at a point before their creation
    /// event was read (runs among them are tracked at once and counted as discovered runs).
    pub children_listed_early: u64,
    /// Microseconds of residual beyond the physical bounds at a point (see
    /// `reconcile_family`), given to the host or forgiven; not 0 means the counters disagreed.
    pub reconcile_clamped_us: u64,
    /// Reconcile points whose reads were taken again (the parent moved too much between its
    /// two reads: this thread was preempted).
    pub reconcile_retries: u64,
}

/// A failure while reading, with the run it concerns.
#[derive(Debug)]
pub struct TickError {
    pub run_id: Option<Arc<str>>,
    pub error: HostError,
}

/// Everything one tick measured.
#[derive(Debug)]
pub struct UsageSnapshot {
    pub interval_us: u64,
    pub runs: Vec<RunUsage>,
    pub packages: BTreeMap<u32, PackageUsage>,
    /// False when /proc/stat could not be read (or this tick re-baselines after a failure):
    /// the host's busy time is unknown, so no division between runs and host is fair.
    pub busy_measured: bool,
    /// Read failures since the last tick; runs with one carry no usage this tick and catch up
    /// on the next good read.
    pub errors: Vec<TickError>,
    pub counters: TrackerCounters,
    /// Why perf is not used for the split, when it is not.
    pub perf_disabled: Option<String>,
    /// Why runs have no perf counters (so no exact tail after an unread removal), when they
    /// have none.
    pub perf_counters_disabled: Option<String>,
}

/// What `run_started` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartOutcome {
    Started,
    AlreadyTracked,
}

#[derive(Debug)]
struct Run {
    id: Arc<str>,
    cgroup_rel: Arc<str>,
    labels: Arc<Labels>,
    origin: RunOrigin,
    billed_from: BilledFrom,
    pattern: Option<usize>,
    cpu_stat: Source,
    memory: Option<Source>,
    perf: Option<CgroupTaskClock>,
    /// Package of each perf counter, in counter order.
    perf_pkgs: Vec<u32>,
    events_wd: Option<i32>,
    reserved_millicpus: Option<u64>,
    billed_us: u64,
    latest_us: u64,
    billed_tc_ns: Vec<u64>,
    latest_tc_ns: Vec<u64>,
    memory_bytes: Option<u64>,
    reported: bool,
    finished: bool,
    /// A read was taken after the run emptied or was declared finished.
    final_read: bool,
    /// `populated` from `cgroup.events`, kept current by its inotify watch; `None`: unknown.
    populated: Option<bool>,
    /// Empty, and read at a tick since it emptied: an empty cgroup uses no CPU, so ticks skip
    /// its read until an event says it changed. Only pattern runs with a watch.
    settled: bool,
    /// Tick reads since it last emptied.
    empty_tick_reads: u8,
    kept_fds: usize,
    /// The parent's family (reconciliation), when it has one.
    family: Option<Arc<str>>,
    /// `latest_us` at the family's last reconcile point.
    scan_us: u64,
    /// The inode of its directory when it was opened: a directory made again under its name
    /// is another cgroup.
    dir_ino: Option<u64>,
    /// Tracker clock (microseconds) of the last successful usage read.
    read_at_us: u64,
    /// The first read (clock, usage): with the last, the run's average rate so far.
    first_read: (u64, u64),
    /// Recovered from the parent and not yet reported.
    pending_reconciled_us: u64,
    reconciled_total_us: u64,
    final_usage: Option<FinalUsage>,
}

/// A run whose cgroup was created and removed before it could be opened: known from its
/// creation event only, billed from its parent, reported started and finished at the next tick.
#[derive(Debug)]
struct Ghost {
    id: Arc<str>,
    cgroup_rel: Arc<str>,
    usage_us: u64,
    final_usage: Option<FinalUsage>,
}

#[derive(Debug)]
enum WatchTarget {
    /// A directory whose children matter: candidate runs of these patterns, and/or the
    /// children of a reconciliation family.
    Parent {
        patterns: Vec<usize>,
        family: Option<Arc<str>>,
    },
    RunEvents(Arc<str>),
}

/// Tracks runs and measures their usage. Single-threaded: the daemon calls [`Self::tick`] on
/// its timer, [`Self::poll_events`] whenever [`Self::events_fd`] is readable, and
/// `run_started`/`run_finished` for control-plane messages.
#[derive(Debug)]
pub struct RunTracker {
    root: HostRoot,
    cgroup_root: PathBuf,
    patterns: Vec<RunPattern>,
    pattern_wds: Vec<Option<i32>>,
    watches: HashMap<i32, WatchTarget>,
    inotify: Inotify,
    /// Boxed: a B-tree's nodes hold 11 slots and are about half full after ordered inserts, so
    /// a `Run` (hundreds of bytes) inline cost twice its size in empty slots at 10,000 runs.
    runs: BTreeMap<Arc<str>, Box<Run>>,
    /// cgroup path -> run id, to refuse two runs on one cgroup or one nested in another.
    paths: BTreeMap<Arc<str>, Arc<str>>,
    recently_finished: VecDeque<Arc<str>>,
    recently_finished_set: HashSet<Arc<str>>,
    topology: Topology,
    /// The topology's CPUs by package, built once (read every tick).
    cpus_by_package: BTreeMap<u32, Vec<u32>>,
    cpus: Vec<u32>,
    last_stat: Option<ProcStat>,
    /// `/proc/stat`, kept open (reopened after a failed read).
    proc_stat: Option<ProcStatFile>,
    /// Per package: busy time not yet given to the host bucket (negative: runs out-measured
    /// /proc/stat's quantised busy time, to be made up from later intervals).
    host_balance_us: BTreeMap<u32, i128>,
    user_hz: u64,
    /// Why no perf counters are opened for runs, when none are.
    perf_disabled: Option<String>,
    /// Why the counters do not split runs across packages, when they do not.
    perf_split_off: Option<String>,
    /// The CPUs perf counters are opened on: the running kernel's online CPUs.
    perf_cpus: Vec<u32>,
    /// The runs' `cpu.stat` microseconds against their counters' nanoseconds, as running sums
    /// that decay by an eighth per tick: the counters run on the raw clock, with steal and
    /// interrupt time in, which `usage_usec` leaves out. Scales a counted tail (`scale_tail`).
    perf_scale: (u128, u128),
    fd_budget: usize,
    kept_fds: usize,
    counters: TrackerCounters,
    ticks: u64,
    /// When this tracker started (CLOCK_REALTIME): an announced run whose cgroup is older was
    /// alive while no agent (or a previous one) was measuring, so it is billed from now.
    started_at: std::time::SystemTime,
    rescan_every_ticks: u32,
    errors: Vec<TickError>,
    events: Vec<Event>,
    tc_scratch: Vec<(u32, u64)>,
    /// A run's counter movement per package while it is split (kept between ticks).
    split_scratch: Vec<(u32, u128)>,
    /// A parent's directory entries while it is listed (kept between points).
    dir_buf: Vec<u8>,
    /// A child's path while it is looked up (kept between points).
    child_key: String,
    /// Points at which a watched parent was not listed: no event was pending.
    listings_skipped: u64,
    /// [`TrackerConfig::read_memory`].
    read_memory: bool,
    /// Parents of tracked runs, by path relative to the cgroup root (see [`super::family`]).
    families: BTreeMap<Arc<str>, Family>,
    ghosts: Vec<Ghost>,
    /// The tracker's clock (monotonic) for reconcile weights.
    epoch: Instant,
}

/// Raises the RLIMIT_NOFILE soft limit to the hard limit; returns the soft limit now in force
/// (`u64::MAX` for none).
pub fn raise_nofile_limit() -> io::Result<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    let current = lim.current.unwrap_or(u64::MAX);
    if current < lim.maximum.unwrap_or(u64::MAX) {
        let want = Rlimit {
            current: lim.maximum,
            maximum: lim.maximum,
        };
        setrlimit(Resource::Nofile, want)?;
        return Ok(lim.maximum.unwrap_or(u64::MAX));
    }
    Ok(current)
}

fn nofile_soft_limit() -> u64 {
    rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX)
}

impl RunTracker {
    /// Finds the cgroup root, reads topology and `/proc/stat`, arms the watches and scans the
    /// patterns once. Runs found by that first scan are billed from now ([`BilledFrom::Discovery`]).
    pub fn new(config: TrackerConfig) -> Result<Self, HostError> {
        let soft = if config.raise_nofile {
            raise_nofile_limit().unwrap_or_else(|_| nofile_soft_limit())
        } else {
            nofile_soft_limit()
        };
        // Leave a quarter (at least 256) for the daemon's sockets, spool and perf PMU counters.
        let derived = soft.saturating_sub((soft / 4).max(256));
        let fd_budget = config
            .fd_budget
            .unwrap_or(usize::try_from(derived).unwrap_or(usize::MAX));
        let root = config.root;
        let cgroup_host_path = match &config.cgroup_root {
            Some(p) => p.clone(),
            None => find_cgroup2_mount(&root)?.mount_point,
        };
        let cgroup_root = root.join(&cgroup_host_path);
        let meta = std::fs::metadata(&cgroup_root)
            .map_err(|e| HostError::io(&cgroup_root, e, HINT_GENERIC))?;
        if !meta.is_dir() {
            return Err(HostError::malformed(
                &cgroup_root,
                "cgroup root is not a directory",
            ));
        }
        let patterns = config
            .patterns
            .iter()
            .map(|p| RunPattern::parse(p))
            .collect::<Result<Vec<_>, _>>()?;
        let topology = Topology::read(&root)?;
        let cpus = topology.cpus.iter().map(|c| c.id).collect();
        let mut proc_stat = ProcStatFile::open(&root)?;
        let last_stat = Some(proc_stat.read()?);
        let (perf_disabled, perf_cpus) =
            perf_counters_plan(config.perf_counters, &root, &cgroup_root, &topology);
        let perf_split_off = if perf_disabled.is_some() {
            perf_disabled.clone()
        } else if !config.perf_split {
            Some("split by perf disabled by configuration".to_owned())
        } else if !root.is_live() {
            Some("host root is not the live host".to_owned())
        } else {
            None
        };
        let inotify = Inotify::new().map_err(|e| HostError::Io {
            path: PathBuf::from("inotify_init1"),
            source: e,
        })?;
        let n = patterns.len();
        let mut t = RunTracker {
            root,
            cgroup_root,
            patterns,
            pattern_wds: vec![None; n],
            watches: HashMap::new(),
            inotify,
            runs: BTreeMap::new(),
            paths: BTreeMap::new(),
            recently_finished: VecDeque::new(),
            recently_finished_set: HashSet::new(),
            cpus_by_package: topology.cpus_by_package(),
            topology,
            cpus,
            last_stat,
            proc_stat: Some(proc_stat),
            host_balance_us: BTreeMap::new(),
            user_hz: user_hz(),
            perf_disabled,
            perf_split_off,
            perf_cpus,
            perf_scale: (0, 0),
            fd_budget,
            kept_fds: 0,
            counters: TrackerCounters::default(),
            ticks: 0,
            started_at: std::time::SystemTime::now(),
            rescan_every_ticks: config.rescan_every_ticks,
            errors: Vec::new(),
            events: Vec::new(),
            tc_scratch: Vec::new(),
            split_scratch: Vec::new(),
            dir_buf: Vec::new(),
            child_key: String::new(),
            listings_skipped: 0,
            read_memory: config.read_memory,
            families: BTreeMap::new(),
            ghosts: Vec::new(),
            epoch: Instant::now(),
        };
        for idx in 0..n {
            t.arm_pattern(idx);
            t.scan_pattern(idx, BilledFrom::Discovery);
        }
        Ok(t)
    }

    /// The cgroup root as read on this machine (under the host root).
    pub fn cgroup_root(&self) -> &Path {
        &self.cgroup_root
    }

    pub fn host_root(&self) -> &HostRoot {
        &self.root
    }

    pub fn is_tracked(&self, run_id: &str) -> bool {
        self.runs.contains_key(run_id)
    }

    pub fn runs_tracked(&self) -> usize {
        self.runs.len()
    }

    pub fn counters(&self) -> TrackerCounters {
        let mut c = self.counters;
        c.runs_tracked = self.runs.len() as u64;
        c.kept_fds = self.kept_fds as u64;
        c.fd_budget = self.fd_budget as u64;
        c
    }

    /// Readable when cgroups were created, removed or emptied: the daemon's event loop waits
    /// on it (e.g. tokio `AsyncFd`) and calls [`Self::poll_events`].
    pub fn events_fd(&self) -> BorrowedFd<'_> {
        self.inotify.as_fd()
    }

    /// [`TrackerConfig::read_memory`], changed at a reload: from the next tick, for every run
    /// (settled ones too, which ticks otherwise skip).
    pub fn set_read_memory(&mut self, on: bool) {
        if on && !self.read_memory {
            for run in self.runs.values_mut() {
                run.settled = false;
            }
        }
        self.read_memory = on;
    }

    /// Waits up to `timeout` for cgroup events and handles them; true if any came.
    pub fn wait_events(&mut self, timeout: Duration) -> Result<bool, HostError> {
        let ready = self.inotify.wait(timeout).map_err(inotify_err)?;
        if ready {
            self.poll_events()?;
        }
        Ok(ready)
    }

    /// Handles every pending cgroup event without blocking: new runs are opened, emptied runs
    /// get their final read at once, removed runs are marked finished.
    pub fn poll_events(&mut self) -> Result<(), HostError> {
        let mut events = std::mem::take(&mut self.events);
        events.clear();
        let res = self.inotify.read_events(&mut events).map_err(inotify_err);
        for ev in &events {
            self.handle_event(ev);
        }
        self.events = events;
        self.reread_emptied();
        // A child went away unread: settle its tail against the parent now, while the stretch
        // is short and few others can have ended in it.
        let claimed: Vec<Arc<str>> = self
            .families
            .values()
            .filter(|f| !f.claimants.is_empty())
            .map(|f| f.rel.clone())
            .collect();
        for rel in claimed {
            self.reconcile_family(&rel, true);
        }
        res
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Re-reads runs that emptied but still exist. The read at the `populated 0` event races
    /// the last task's exit: the kernel drops it from the cgroup before it is descheduled for
    /// the last time, so up to a scheduler tick of its CPU time may not be in `cpu.stat` yet.
    /// Every later chance to read, while the cgroup is still there, closes that gap.
    fn reread_emptied(&mut self) {
        let mut gone = Vec::new();
        let now = self.now_us();
        for run in self.runs.values_mut() {
            if run.final_read && !run.finished && !run.settled {
                if let Err(e) = capture(run, &mut self.tc_scratch, now, self.read_memory) {
                    if e.is_gone() {
                        gone.push(run.id.clone());
                    }
                }
            }
        }
        for id in gone {
            self.mark_gone(&id);
        }
    }

    fn handle_event(&mut self, ev: &Event) {
        if ev.mask & libc::IN_Q_OVERFLOW != 0 {
            self.counters.inotify_overflows += 1;
            // Events were lost: no run's state can be trusted until read again.
            for run in self.runs.values_mut() {
                run.settled = false;
                run.populated = None;
            }
            // Nor which removal events are still to come, nor which children were made: the
            // listing at the next point finds every child that is there.
            for f in self.families.values_mut() {
                f.departed.clear();
                f.must_list = true;
            }
            self.rescan_all();
            return;
        }
        match self.watches.get(&ev.wd) {
            Some(WatchTarget::Parent { patterns, family }) => {
                let idxs = patterns.clone();
                let family = family.clone();
                if ev.mask & (libc::IN_DELETE_SELF | libc::IN_IGNORED) != 0 {
                    self.watches.remove(&ev.wd);
                    for i in idxs {
                        self.pattern_wds[i] = None;
                    }
                    if let Some(rel) = family {
                        if let Some(f) = self.families.get_mut(&rel) {
                            f.wd = None;
                        }
                        // The parent is gone: its children's unread tails cannot be told.
                        self.reconcile_family(&rel, true);
                    }
                    return;
                }
                let Some(name) = ev.name.as_deref() else {
                    return;
                };
                let created = ev.mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0;
                let removed = ev.mask & (libc::IN_DELETE | libc::IN_MOVED_FROM) != 0;
                for idx in idxs {
                    if created {
                        if self.consider(idx, name, BilledFrom::Birth).is_none() {
                            if let NameMatch::Run(id) = self.patterns[idx].match_name(name) {
                                // Unless the event is stale: a listing found that child, and
                                // it went away and was billed (as a ghost) first.
                                let stale = self.patterns[idx]
                                    .parent()
                                    .to_str()
                                    .and_then(|rel| self.families.get(rel))
                                    .is_some_and(|f| f.departed.contains(name));
                                if !stale && self.recently_finished_set.contains(id.as_str()) {
                                    self.counters.run_id_reused += 1;
                                    tracing::warn!(
                                        run = %Shown::new(&id),
                                        "a cgroup reappeared under a finished run's name: not \
                                         billed as that run again (its CPU time is the host's)"
                                    );
                                }
                            }
                        }
                    } else if removed {
                        if let NameMatch::Run(id) = self.patterns[idx].match_name(name) {
                            if self
                                .runs
                                .get(id.as_str())
                                .is_some_and(|r| r.pattern == Some(idx))
                            {
                                self.mark_gone(&id);
                            }
                        }
                    }
                }
                if let Some(rel) = family {
                    self.family_child_event(&rel, name, created, removed);
                }
            }
            Some(WatchTarget::RunEvents(id)) => {
                let id = id.clone();
                if ev.mask & libc::IN_IGNORED != 0 {
                    self.watches.remove(&ev.wd);
                    if let Some(r) = self.runs.get_mut(&id) {
                        r.events_wd = None;
                        r.settled = false;
                    }
                    return;
                }
                if ev.mask & libc::IN_MODIFY != 0 {
                    self.on_events_modified(&id);
                }
            }
            None => {}
        }
    }

    /// `cgroup.events` changed: if the run emptied, read its usage now, while the cgroup is
    /// certain to exist; whoever emptied it may remove it right after.
    fn on_events_modified(&mut self, id: &str) {
        let now = self.now_us();
        let Some(run) = self.runs.get_mut(id) else {
            return;
        };
        if run.finished {
            return;
        }
        let path = self
            .cgroup_root
            .join(&*run.cgroup_rel)
            .join("cgroup.events");
        run.settled = false;
        run.empty_tick_reads = 0;
        let populated = read_populated(&path);
        run.populated = populated.as_ref().ok().copied();
        match populated {
            Ok(false) => match capture(run, &mut self.tc_scratch, now, self.read_memory) {
                Ok(_) => run.final_read = true,
                Err(e) if e.is_gone() => self.mark_gone(id),
                Err(e) => self.push_error(Some(id), e),
            },
            Ok(true) => run.final_read = false,
            Err(e) if e.is_gone() => self.mark_gone(id),
            Err(e) => self.push_error(Some(id), e),
        }
    }

    fn push_error(&mut self, run_id: Option<&str>, error: HostError) {
        self.counters.read_errors += 1;
        // Bounded: a host that fails every read must not grow this without limit.
        if self.errors.len() < 1024 {
            self.errors.push(TickError {
                run_id: run_id.map(Arc::from),
                error,
            });
        }
    }

    /// The run's cgroup is gone. Its usage is complete when it was seen settle empty; else its
    /// tail since the last read is claimed from its parent at the next reconcile point, or lost
    /// (counted, logged) when it has no family.
    fn mark_gone(&mut self, id: &str) {
        let now = self.now_us();
        let Some(run) = self.runs.get_mut(id) else {
            return;
        };
        if run.finished {
            return;
        }
        if !run.final_read {
            self.counters.vanished_before_final_read += 1;
        }
        run.finished = true;
        if run.settled {
            run.final_usage = Some(FinalUsage::Read);
            self.counters.final_read += 1;
            return;
        }
        // Its perf counters outlive the cgroup (its kept cpu.stat fails with ENODEV now; one
        // opened by path could be a new cgroup of the same name): what they counted since its
        // last read weighs its claim, and is its tail if the parent cannot tell.
        let perf_us = perf_tail(run, &mut self.tc_scratch, self.perf_scale);
        if perf_us.is_none() {
            let _ = capture(run, &mut self.tc_scratch, now, self.read_memory);
        }
        let family = run.family.as_ref().and_then(|f| self.families.get_mut(f));
        match family {
            Some(f) => {
                // What it is expected to have used unobserved: the time since its last read (or
                // the last point) at its average rate so far; the family's when it has no history.
                let unobserved = now.saturating_sub(run.read_at_us.max(f.last_point_us));
                let span = run.read_at_us.saturating_sub(run.first_read.0);
                let used = run.latest_us.saturating_sub(run.first_read.1);
                let weight_us = if let Some(t) = perf_us {
                    t
                } else if span >= 10_000 {
                    let w = u128::from(unobserved) * u128::from(used) / u128::from(span);
                    super::family::weight_floor(u64::try_from(w).unwrap_or(u64::MAX), unobserved)
                } else {
                    f.unknown_weight(unobserved)
                };
                f.claimants.push(Claimant {
                    kind: ClaimantKind::Run(run.id.clone()),
                    weight_us,
                    perf_us,
                });
            }
            None if run.final_read => {
                // Read after it emptied; what the counters add is the exiting task's last slice.
                run.latest_us = run.latest_us.saturating_add(perf_us.unwrap_or(0));
                run.final_usage = Some(FinalUsage::Read);
                self.counters.final_read += 1;
            }
            None if perf_us.is_some() => {
                // The parent is the cgroup root: its counters are all there is.
                run.latest_us = run.latest_us.saturating_add(perf_us.unwrap_or(0));
                run.final_usage = Some(FinalUsage::PerfCounted);
                self.counters.final_perf_counted += 1;
            }
            None => {
                run.final_usage = Some(FinalUsage::Lost);
                self.counters.final_lost += 1;
                tracing::warn!(
                    run = %Shown::new(id),
                    cgroup = %Shown::new(&run.cgroup_rel),
                    "run cgroup removed before its final read, and its parent cannot be \
                     reconciled (the cgroup root): its CPU time since the last read is the host's"
                );
            }
        }
    }

    fn arm_pattern(&mut self, idx: usize) -> bool {
        if self.pattern_wds[idx].is_some() {
            return false;
        }
        let dir = self.cgroup_root.join(self.patterns[idx].parent());
        match self.inotify.add_watch(&dir, PARENT_MASK) {
            Ok(wd) => {
                self.pattern_wds[idx] = Some(wd);
                match self.watches.entry(wd).or_insert(WatchTarget::Parent {
                    patterns: Vec::new(),
                    family: None,
                }) {
                    WatchTarget::Parent { patterns, .. } => {
                        if !patterns.contains(&idx) {
                            patterns.push(idx);
                        }
                    }
                    // A wd is per inode; a run's cgroup.events is never a pattern's parent.
                    WatchTarget::RunEvents(_) => {}
                }
                // Before the scan that follows: children listed now are its baseline.
                if let Some(parent) = self.patterns[idx].parent().to_str() {
                    let parent = parent.to_owned();
                    self.ensure_family(&parent);
                }
                true
            }
            Err(_) => false,
        }
    }

    fn rescan_all(&mut self) {
        self.counters.rescans += 1;
        // Also the bound on trusting events: a settled run whose removal produced no event
        // (a control-plane run's parent is not watched) is read, found gone and finished here.
        for run in self.runs.values_mut() {
            run.settled = false;
        }
        for idx in 0..self.patterns.len() {
            self.arm_pattern(idx);
            self.scan_pattern(idx, BilledFrom::Birth);
        }
    }

    /// Lists a pattern's parent: adds runs not yet tracked, marks tracked ones that are no
    /// longer listed as gone.
    fn scan_pattern(&mut self, idx: usize, billed_from: BilledFrom) {
        let dir = self.cgroup_root.join(self.patterns[idx].parent());
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.mark_pattern_runs_gone(idx, &HashSet::new());
                return;
            }
            Err(e) => {
                self.push_error(None, HostError::io(&dir, e, HINT_GENERIC));
                return;
            }
        };
        let mut seen: HashSet<Arc<str>> = HashSet::new();
        for entry in rd {
            let Ok(entry) = entry else { continue };
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = entry.file_name();
            if let Some(id) = self.consider(idx, &name, billed_from) {
                seen.insert(id);
            }
        }
        self.mark_pattern_runs_gone(idx, &seen);
    }

    fn mark_pattern_runs_gone(&mut self, idx: usize, seen: &HashSet<Arc<str>>) {
        let gone: Vec<Arc<str>> = self
            .runs
            .values()
            .filter(|r| r.pattern == Some(idx) && !r.finished && !seen.contains(&r.id))
            .map(|r| r.id.clone())
            .collect();
        for id in gone {
            self.mark_gone(&id);
        }
    }

    /// A directory name under a pattern's parent: track it if it is a new run. Returns the
    /// run id when the name is a run of this pattern (tracked before or now).
    fn consider(&mut self, idx: usize, name: &OsStr, billed_from: BilledFrom) -> Option<Arc<str>> {
        let wanted = billed_from;
        let id = match self.patterns[idx].match_name(name) {
            NameMatch::Run(id) => id,
            NameMatch::NoMatch => return None,
            NameMatch::Hostile(_) => {
                self.counters.hostile_names_skipped += 1;
                return None;
            }
        };
        if let Some(r) = self.runs.get(id.as_str()) {
            return Some(r.id.clone());
        }
        if self.recently_finished_set.contains(id.as_str()) {
            return None;
        }
        // Only for a run new to the tracker: a rescan lists every tracked one again.
        let billed_from = match billed_from {
            BilledFrom::Birth => {
                let dir = self
                    .cgroup_root
                    .join(self.patterns[idx].parent())
                    .join(name);
                self.billing_start(&dir, BilledFrom::Birth)
            }
            other => other,
        };
        // match_name only accepts UTF-8 ids, and prefix/suffix come from a UTF-8 pattern.
        let dir_name = name.to_str()?;
        let rel = self.patterns[idx].cgroup_rel(dir_name);
        match self.add_run(
            &id,
            &rel,
            Arc::new(Labels::new()),
            RunOrigin::Pattern,
            billed_from,
            Some(idx),
        ) {
            Ok(()) => self.runs.get(id.as_str()).map(|r| r.id.clone()),
            Err(e) if e.is_gone() => {
                self.counters.vanished_at_discovery += 1;
                // Created and removed before it could be opened: billed from its parent.
                if wanted == BilledFrom::Birth {
                    self.add_ghost(&id, &rel);
                }
                None
            }
            Err(e) => {
                self.push_error(Some(&id), e);
                None
            }
        }
    }

    fn check_path_free(&self, id: &str, rel: &str) -> Result<(), HostError> {
        let conflict = |other: &str, how: &str| HostError::RunConflict {
            run_id: Shown::new(id),
            what: format!("cgroup {} {how} run {}", Shown::new(rel), Shown::new(other)),
        };
        if let Some(other) = self.paths.get(rel) {
            return Err(conflict(other, "is already tracked as"));
        }
        // An ancestor or descendant tracked as another run would count the same CPU twice.
        let mut cut = rel;
        while let Some((parent, _)) = cut.rsplit_once('/') {
            if let Some(other) = self.paths.get(parent) {
                return Err(conflict(other, "is nested in the cgroup of"));
            }
            cut = parent;
        }
        let prefix = format!("{rel}/");
        if let Some((p, other)) = self
            .paths
            .range::<str, _>((Bound::Included(prefix.as_str()), Bound::Unbounded))
            .next()
        {
            if p.starts_with(&prefix) {
                return Err(conflict(other, "contains the cgroup of"));
            }
        }
        Ok(())
    }

    fn add_run(
        &mut self,
        id: &str,
        rel: &str,
        labels: Arc<Labels>,
        origin: RunOrigin,
        billed_from: BilledFrom,
        pattern: Option<usize>,
    ) -> Result<(), HostError> {
        validate_run_id(id)?;
        validate_cgroup_rel(rel)?;
        self.check_path_free(id, rel)?;
        let dir = self.cgroup_root.join(rel);
        let len = dir.as_os_str().len();
        if len > PATH_MAX_BYTES {
            return Err(HostError::PathTooLong {
                path: dir,
                len,
                limit: PATH_MAX_BYTES,
            });
        }
        let meta =
            std::fs::symlink_metadata(&dir).map_err(|e| HostError::io(&dir, e, HINT_GENERIC))?;
        if !meta.is_dir() {
            return Err(HostError::malformed(&dir, "not a cgroup directory"));
        }
        // Watch before the first read: a process that exits after the read then produces an
        // event, and one that exited before it is in the read.
        let events_wd = match self
            .inotify
            .add_watch(&dir.join("cgroup.events"), libc::IN_MODIFY)
        {
            Ok(wd) => Some(wd),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Not a cgroup2 directory (or already removed): checked by cpu.stat below.
                None
            }
            Err(_) => {
                self.counters.watch_fallbacks += 1;
                None
            }
        };
        let result = self.open_run(
            id,
            rel,
            &dir,
            labels,
            origin,
            billed_from,
            pattern,
            events_wd,
        );
        if result.is_err() {
            if let Some(wd) = events_wd {
                self.inotify.rm_watch(wd);
            }
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn open_run(
        &mut self,
        id: &str,
        rel: &str,
        dir: &Path,
        labels: Arc<Labels>,
        origin: RunOrigin,
        billed_from: BilledFrom,
        pattern: Option<usize>,
        events_wd: Option<i32>,
    ) -> Result<(), HostError> {
        let mut kept = 0usize;
        let keep_cpu = self.kept_fds < self.fd_budget;
        let cpu_stat = Source::open(dir.join("cpu.stat"), keep_cpu)?;
        if cpu_stat.is_kept() {
            kept += 1;
        } else {
            self.counters.fd_fallback_runs += 1;
        }
        // The counters first, then the first read, then the counters' first read: what the run
        // used while they were opening is in both reads, so they pair (see `perf_tail`).
        let (perf, perf_pkgs) = self.open_perf(dir, kept);
        if let Some(p) = &perf {
            kept += p.fd_count();
        }
        let latest_us = cpu_stat.read_cpu_usage_us()?;
        let mem_path = dir.join("memory.current");
        let memory = match Source::open(mem_path, self.kept_fds + kept < self.fd_budget) {
            Ok(s) => Some(s),
            Err(e) if e.is_not_found() => None,
            Err(e) => return Err(e),
        };
        if memory.as_ref().is_some_and(Source::is_kept) {
            kept += 1;
        }
        let memory_bytes = match &memory {
            Some(m) if self.read_memory => Some(m.read_u64()?),
            _ => None,
        };
        let reserved_millicpus = match read_reserved_millicpus(dir) {
            Ok(r) => r,
            Err(e) if e.is_gone() => return Err(e),
            Err(e) => {
                self.push_error(Some(id), e);
                None
            }
        };
        let dir_ino = {
            use std::os::unix::fs::MetadataExt as _;
            std::fs::metadata(dir).ok().map(|m| m.ino())
        };
        let id: Arc<str> = Arc::from(id);
        let cgroup_rel: Arc<str> = Arc::from(rel);
        let mut run = Run {
            id: id.clone(),
            cgroup_rel: cgroup_rel.clone(),
            labels,
            origin,
            billed_from,
            pattern,
            cpu_stat,
            memory,
            perf,
            perf_pkgs,
            events_wd,
            reserved_millicpus,
            billed_us: match billed_from {
                BilledFrom::Birth => 0,
                BilledFrom::Discovery => latest_us,
            },
            latest_us,
            billed_tc_ns: Vec::new(),
            latest_tc_ns: Vec::new(),
            memory_bytes,
            reported: false,
            finished: false,
            final_read: false,
            populated: None,
            settled: false,
            empty_tick_reads: 0,
            kept_fds: kept,
            family: None,
            scan_us: 0,
            dir_ino,
            read_at_us: 0,
            first_read: (0, 0),
            pending_reconciled_us: 0,
            reconciled_total_us: 0,
            final_usage: None,
        };
        if let Some(p) = &mut run.perf {
            if p.read_into(&mut self.tc_scratch).is_ok() {
                run.latest_tc_ns = self.tc_scratch.iter().map(|&(_, v)| v).collect();
            } else {
                // Unpaired with `latest_us`: no tail from these counters (see `perf_tail`).
                run.latest_tc_ns.clear();
            }
            // Counters start at 0 when opened; what ran before is split by /proc/stat share.
            run.billed_tc_ns = vec![0; p.fd_count()];
        }
        if let Some(wd) = events_wd {
            self.watches.insert(wd, WatchTarget::RunEvents(id.clone()));
            // It may have emptied before the watch was set: then the read above is final.
            run.populated = read_populated(&dir.join("cgroup.events")).ok();
            if run.populated == Some(false) {
                run.final_read = true;
            }
        }
        run.read_at_us = self.now_us();
        run.first_read = (run.read_at_us, latest_us);
        self.kept_fds += kept;
        self.join_family(&mut run, billed_from);
        self.paths.insert(cgroup_rel, id.clone());
        self.runs.insert(id, Box::new(run));
        Ok(())
    }

    /// The run's perf counters, on every CPU of [`Self::perf_cpus`], and the package of each
    /// when they split the run across packages (empty when they do not).
    fn open_perf(&mut self, dir: &Path, kept_so_far: usize) -> (Option<CgroupTaskClock>, Vec<u32>) {
        if self.perf_disabled.is_some()
            || self.kept_fds + kept_so_far + self.perf_cpus.len() > self.fd_budget
        {
            self.counters.perf_fallback_runs += 1;
            self.counters.perf_uncounted_runs += 1;
            return (None, Vec::new());
        }
        match CgroupTaskClock::open(dir, &self.perf_cpus) {
            Ok(p) => {
                if self.perf_split_off.is_some() {
                    self.counters.perf_fallback_runs += 1;
                    return (Some(p), Vec::new());
                }
                let pkgs = self
                    .perf_cpus
                    .iter()
                    .map(|&c| self.topology.package_of(c).unwrap_or(0))
                    .collect();
                (Some(p), pkgs)
            }
            Err(e) => {
                self.counters.perf_fallback_runs += 1;
                self.counters.perf_uncounted_runs += 1;
                // Permission or kernel support is the same for every run: stop trying. (ENOENT
                // and ENODEV are this cgroup gone already, as runs removed at once often are.)
                if matches!(
                    e.raw_os_error(),
                    Some(
                        libc::EACCES | libc::EPERM | libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL
                    )
                ) {
                    let why = format!("perf cgroup task-clock: {e} ({HINT_PERF})");
                    tracing::warn!(
                        reason = %why,
                        "no perf counters for runs: the per-package split falls back to \
                         /proc/stat, and the tail of a run removed before its final read is \
                         recovered from its parent"
                    );
                    self.perf_split_off = Some(why.clone());
                    self.perf_disabled = Some(why);
                }
                (None, Vec::new())
            }
        }
    }

    /// Where a run found now starts being billed. From its birth only if its cgroup was created
    /// after this tracker started and recently (within [`BIRTH_WINDOW`]): a cgroup that is
    /// older was either measured by a previous agent instance (its past is in that agent's
    /// records or in the agent-down gap) or already counted in the host bucket while no run
    /// claimed it (a run whose finish was forgotten, found again by a rescan); billing its past
    /// again would count it twice. Creation time is the oldest ctime of the directory and its
    /// `cpu.stat`: the directory's own ctime moves when children are created or it is chowned
    /// for delegation, the kernel-created `cpu.stat` keeps its creation time.
    fn billing_start(&self, dir: &std::path::Path, wanted: BilledFrom) -> BilledFrom {
        fn ctime(p: &std::path::Path) -> Option<std::time::SystemTime> {
            use std::os::unix::fs::MetadataExt as _;
            let m = std::fs::metadata(p).ok()?;
            let secs = u64::try_from(m.ctime()).ok()?;
            Some(
                std::time::UNIX_EPOCH
                    + std::time::Duration::new(secs, m.ctime_nsec().clamp(0, 999_999_999) as u32),
            )
        }
        if wanted == BilledFrom::Discovery {
            return wanted;
        }
        let created = match (ctime(dir), ctime(&dir.join("cpu.stat"))) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let recent = std::time::SystemTime::now()
            .checked_sub(BIRTH_WINDOW)
            .unwrap_or(std::time::UNIX_EPOCH);
        // kernfs stamps inodes with the coarse clock, up to a jiffy behind the real one.
        let started = self
            .started_at
            .checked_sub(CTIME_SLACK)
            .unwrap_or(std::time::UNIX_EPOCH);
        match created {
            Some(t) if t >= started && t >= recent => BilledFrom::Birth,
            // Unknown creation time: the safe side is never to bill a past twice.
            _ => BilledFrom::Discovery,
        }
    }

    /// Replaces the run patterns (configuration reload). Runs found by an old pattern stay
    /// tracked until they finish, so none loses its final reading; cgroups that only the new
    /// patterns match are tracked from now on (billed from discovery: their past CPU time was in
    /// the host bucket and must not be billed twice). Invalid patterns change nothing.
    pub fn set_patterns(&mut self, patterns: &[String]) -> Result<(), HostError> {
        let parsed: Vec<RunPattern> = patterns
            .iter()
            .map(|p| RunPattern::parse(p))
            .collect::<Result<_, _>>()?;
        for wd in self.pattern_wds.iter().flatten() {
            // A watch that also serves a family stays; it only stops serving patterns.
            if let Some(WatchTarget::Parent {
                patterns,
                family: Some(_),
            }) = self.watches.get_mut(wd)
            {
                patterns.clear();
                continue;
            }
            self.watches.remove(wd);
            self.inotify.rm_watch(*wd);
        }
        let old: Vec<String> = self
            .patterns
            .iter()
            .map(|p| p.as_str().to_owned())
            .collect();
        for run in self.runs.values_mut() {
            if let Some(i) = run.pattern {
                run.pattern = old
                    .get(i)
                    .and_then(|o| parsed.iter().position(|n| n.as_str() == o));
            }
        }
        let n = parsed.len();
        self.patterns = parsed;
        self.pattern_wds = vec![None; n];
        for idx in 0..n {
            self.arm_pattern(idx);
            self.scan_pattern(idx, BilledFrom::Discovery);
        }
        Ok(())
    }

    /// The control plane announces a run. Idempotent: the same id on the same cgroup is
    /// `AlreadyTracked` (labels are adopted if the run had none, e.g. found by pattern first);
    /// the same id elsewhere, different labels, or a cgroup nested in another run's is an
    /// error. Billed from the cgroup's birth.
    pub fn run_started(
        &mut self,
        run_id: &str,
        cgroup_rel: &str,
        labels: Labels,
    ) -> Result<StartOutcome, HostError> {
        validate_run_id(run_id)?;
        validate_cgroup_rel(cgroup_rel)?;
        validate_labels(&labels)?;
        if let Some(run) = self.runs.get_mut(run_id) {
            if &*run.cgroup_rel != cgroup_rel {
                return Err(HostError::RunConflict {
                    run_id: Shown::new(run_id),
                    what: format!("already tracked at cgroup {}", Shown::new(&run.cgroup_rel)),
                });
            }
            if run.labels.is_empty() {
                run.labels = Arc::new(labels);
            } else if *run.labels != labels && !labels.is_empty() {
                return Err(HostError::RunConflict {
                    run_id: Shown::new(run_id),
                    what: "already tracked with different labels".to_owned(),
                });
            }
            return Ok(StartOutcome::AlreadyTracked);
        }
        if self.recently_finished_set.contains(run_id) {
            return Err(HostError::RunConflict {
                run_id: Shown::new(run_id),
                what: "already finished".to_owned(),
            });
        }
        // A cgroup created before this tracker started may have been billed by a previous agent
        // instance (the control plane re-announces runs after a restart); its usage before now
        // belongs to the recorded agent-down gap, never to this run twice.
        let billed_from = self.billing_start(&self.cgroup_root.join(cgroup_rel), BilledFrom::Birth);
        self.add_run(
            run_id,
            cgroup_rel,
            Arc::new(labels),
            RunOrigin::ControlPlane,
            billed_from,
            None,
        )?;
        Ok(StartOutcome::Started)
    }

    /// The control plane says a run is over: its final usage is read now, before the cgroup
    /// can be removed; the next tick reports it once more and drops it. A repeated finish is
    /// fine; an unknown run is [`HostError::UnknownRun`].
    pub fn run_finished(&mut self, run_id: &str) -> Result<(), HostError> {
        let now = self.now_us();
        if let Some(run) = self.runs.get_mut(run_id) {
            if run.finished {
                return Ok(());
            }
            match capture(run, &mut self.tc_scratch, now, self.read_memory) {
                Ok(_) => {
                    run.final_read = true;
                    run.finished = true;
                    run.final_usage = Some(FinalUsage::Read);
                    self.counters.final_read += 1;
                }
                // Already removed: its tail is claimed from the parent like any other.
                Err(e) if e.is_gone() => self.mark_gone(run_id),
                Err(e) => {
                    if !run.final_read {
                        self.counters.vanished_before_final_read += 1;
                    }
                    run.finished = true;
                    if run.final_read {
                        run.final_usage = Some(FinalUsage::Read);
                        self.counters.final_read += 1;
                    } else {
                        run.final_usage = Some(FinalUsage::Lost);
                        self.counters.final_lost += 1;
                    }
                    self.push_error(Some(run_id), e);
                }
            }
            return Ok(());
        }
        if self.recently_finished_set.contains(run_id) {
            return Ok(());
        }
        Err(HostError::UnknownRun {
            run_id: Shown::new(run_id),
        })
    }

    /// Measures one tick: every run's usage since the last tick (since birth for a new run),
    /// split per package, and each package's busy and host time. `elapsed_us` is the tick's
    /// length as the daemon's clock saw it, carried into the snapshot.
    pub fn tick(&mut self, elapsed_us: u64) -> UsageSnapshot {
        self.ticks += 1;
        if let Err(e) = self.poll_events() {
            self.push_error(None, e);
        }
        for idx in 0..self.patterns.len() {
            // A parent that appeared since (the first run's slice) is armed and listed now.
            if self.arm_pattern(idx) {
                self.scan_pattern(idx, BilledFrom::Birth);
            }
        }
        if self.rescan_every_ticks > 0 && self.ticks % u64::from(self.rescan_every_ticks) == 0 {
            self.rescan_all();
        }
        let busy_by_pkg_us = self.read_busy(elapsed_us);
        let busy_measured = busy_by_pkg_us.is_some();
        let mut runs_out = Vec::with_capacity(self.runs.len());
        let mut runs_by_pkg: BTreeMap<u32, u64> = BTreeMap::new();
        let fallback_weights = proc_stat_weights(&busy_by_pkg_us, &self.topology);
        let mut to_drop = Vec::new();
        let mut pending_errors = Vec::new();
        let mut gone = Vec::new();
        let (mut scale_us, mut scale_ns) = (0u128, 0u128);
        let now = self.now_us();
        for f in self.families.values_mut() {
            f.pre_us = f.cpu_stat.read_cpu_usage_us().ok();
            f.pre_at_us = now;
        }
        // Reads first, all of them, back to back: the reconcile points below compare them with
        // the parents' reads (before and after), and the closer together, the smaller the noise.
        for run in self.runs.values_mut() {
            let skip = run.settled && run.populated == Some(false) && run.events_wd.is_some();
            if run.finished || skip {
                continue;
            }
            match capture(run, &mut self.tc_scratch, now, self.read_memory) {
                Ok(Some((us, ns))) => {
                    scale_us += u128::from(us);
                    scale_ns += u128::from(ns);
                }
                Ok(None) => {}
                Err(e) => {
                    if e.is_gone() {
                        gone.push(run.id.clone());
                    } else {
                        pending_errors.push((run.id.clone(), e));
                    }
                    continue;
                }
            }
            // Only pattern runs settle: their parent is watched, so their removal is seen.
            // kernfs sends no event on a removed cgroup's own files, so an announced run
            // is read every tick, and ENODEV tells it is gone.
            // Two tick reads after it emptied, not one: the first may fall inside the
            // last task's exit, before its final CPU time is accounted.
            if run.populated == Some(false)
                && run.final_read
                && run.events_wd.is_some()
                && run.pattern.is_some()
            {
                run.empty_tick_reads = run.empty_tick_reads.saturating_add(1);
                run.settled = run.empty_tick_reads >= 2;
            }
        }
        // The runs' usage against their counters: the scale of a counted tail, over the recent
        // past (each tick's sums added to the running ones, which lose an eighth per tick).
        let (us, ns) = self.perf_scale;
        self.perf_scale = (us - us / 8 + scale_us, ns - ns / 8 + scale_ns);
        // Gone at this tick's read: the delta below uses the last good read, the tail is
        // claimed from the parent, and they are reported finished now.
        for id in gone {
            self.mark_gone(&id);
        }
        let rels: Vec<Arc<str>> = self.families.keys().cloned().collect();
        for rel in rels {
            self.reconcile_family(&rel, false);
        }
        let failed: HashSet<Arc<str>> = pending_errors.iter().map(|(id, _)| id.clone()).collect();
        for run in self.runs.values_mut() {
            // A failed read carries no usage this tick; the next good read catches up.
            if failed.contains(&run.id) && !run.finished {
                continue;
            }
            let read_us = if run.latest_us >= run.billed_us {
                run.latest_us - run.billed_us
            } else {
                self.counters.usage_went_backwards += 1;
                run.latest_us
            };
            run.billed_us = run.latest_us;
            let reconciled_us = std::mem::take(&mut run.pending_reconciled_us);
            run.reconciled_total_us += reconciled_us;
            let usage_us = read_us.saturating_add(reconciled_us);
            let (by_pkg, split) =
                split_run(run, usage_us, &fallback_weights, &mut self.split_scratch);
            for (pkg, us) in &by_pkg {
                *runs_by_pkg.entry(*pkg).or_default() += us;
            }
            run.billed_tc_ns.clone_from(&run.latest_tc_ns);
            runs_out.push(RunUsage {
                run_id: run.id.clone(),
                cgroup: run.cgroup_rel.clone(),
                labels: run.labels.clone(),
                origin: run.origin,
                billed_from: run.billed_from,
                usage_us,
                usage_us_by_package: by_pkg,
                split,
                memory_bytes: run.memory_bytes,
                reserved_millicpus: run.reserved_millicpus,
                started: !run.reported,
                finished: run.finished,
                reconciled_us,
                final_usage: if run.finished {
                    Some(run.final_usage.unwrap_or(FinalUsage::Lost))
                } else {
                    None
                },
                reconciled_total_us: run.reconciled_total_us,
            });
            run.reported = true;
            if run.finished {
                to_drop.push(run.id.clone());
            }
        }
        for (id, e) in pending_errors {
            self.push_error(Some(&id), e);
        }
        for g in std::mem::take(&mut self.ghosts) {
            // Its name is no longer excluded from the parent's listing: list it again.
            if let Some(f) = parent_rel(&g.cgroup_rel).and_then(|p| self.families.get_mut(p)) {
                f.must_list = true;
            }
            let by_pkg = split_exact(g.usage_us, &fallback_weights);
            for (pkg, us) in &by_pkg {
                *runs_by_pkg.entry(*pkg).or_default() += us;
            }
            runs_out.push(RunUsage {
                run_id: g.id.clone(),
                cgroup: g.cgroup_rel,
                labels: Arc::new(Labels::new()),
                origin: RunOrigin::Pattern,
                billed_from: BilledFrom::Birth,
                usage_us: g.usage_us,
                usage_us_by_package: by_pkg,
                split: SplitSource::ProcStatShare,
                memory_bytes: None,
                reserved_millicpus: None,
                started: true,
                finished: true,
                reconciled_us: g.usage_us,
                final_usage: Some(g.final_usage.unwrap_or(FinalUsage::Lost)),
                reconciled_total_us: g.usage_us,
            });
            self.remember_finished(g.id);
        }
        for id in to_drop {
            self.drop_run(&id);
        }
        self.forget_idle_families();
        let mut packages = BTreeMap::new();
        for &pkg in self.cpus_by_package.keys() {
            // Signed: tick rounding can make a short interval's idle exceed its elapsed time.
            let busy_signed = busy_by_pkg_us
                .as_ref()
                .and_then(|m| m.get(&pkg).copied())
                .unwrap_or(0);
            let busy = u64::try_from(busy_signed.max(0)).unwrap_or(u64::MAX);
            let runs_us = runs_by_pkg.get(&pkg).copied().unwrap_or(0);
            if i128::from(runs_us) > busy_signed {
                self.counters.host_clamps += 1;
            }
            // /proc/stat's idle time comes in 10 ms units, so one interval's busy time is off by
            // up to a unit per CPU either way, while the runs' times are exact. Clamping each
            // interval's host share at zero would keep every downward error and drop every
            // upward one, biasing the host up and the runs down. Instead the host is paid from a
            // running balance of busy minus runs: over time it receives exactly what the
            // counters say, and it is never negative.
            let balance = self.host_balance_us.entry(pkg).or_insert(0);
            *balance = balance.saturating_add(busy_signed - i128::from(runs_us));
            let host_us = u64::try_from((*balance).max(0)).unwrap_or(u64::MAX);
            *balance -= i128::from(host_us);
            // A balance can go only so far negative: a run can out-measure /proc/stat by a
            // quantum per CPU per interval, not more; beyond that the counters disagree and the
            // past should not be charged against the future.
            let floor = -(i128::from(self.cpus.len() as u32) * 20_000);
            *balance = (*balance).max(floor);
            packages.insert(
                pkg,
                PackageUsage {
                    busy_us: busy,
                    runs_us,
                    host_us,
                },
            );
        }
        UsageSnapshot {
            interval_us: elapsed_us,
            busy_measured,
            runs: runs_out,
            packages,
            errors: std::mem::take(&mut self.errors),
            counters: self.counters(),
            perf_disabled: self.perf_split_off.clone(),
            perf_counters_disabled: self.perf_disabled.clone(),
        }
    }

    /// Per-package busy time since the last tick, from /proc/stat.
    /// Busy time is the interval's elapsed time (the caller's monotonic measure, the same one
    /// the energy interval uses) minus each CPU's idle time.
    fn read_busy(&mut self, elapsed_us: u64) -> Option<BTreeMap<u32, i128>> {
        let read = match self.proc_stat.as_mut() {
            Some(f) => f.read(),
            None => ProcStatFile::open(&self.root).and_then(|mut f| {
                let s = f.read();
                self.proc_stat = Some(f);
                s
            }),
        };
        let now = match read {
            Ok(s) => s,
            Err(e) => {
                self.push_error(None, e);
                self.proc_stat = None;
                // The next good read is a new baseline: measuring from this stale one would
                // count two intervals' idle time against one interval's elapsed time.
                self.last_stat = None;
                return None;
            }
        };
        let prev = self.last_stat.replace(now)?;
        let now = self.last_stat.as_ref()?;
        let mut by_pkg: BTreeMap<u32, i128> = BTreeMap::new();
        for (&pkg, cpus) in &self.cpus_by_package {
            let us = crate::procstat::busy_us_signed(&prev, now, cpus, self.user_hz, elapsed_us);
            by_pkg.insert(pkg, us);
        }
        Some(by_pkg)
    }

    fn drop_run(&mut self, id: &str) {
        let Some(run) = self.runs.remove(id) else {
            return;
        };
        if let Some(wd) = run.events_wd {
            self.watches.remove(&wd);
            self.inotify.rm_watch(wd);
        }
        self.paths.remove(&*run.cgroup_rel);
        self.kept_fds = self.kept_fds.saturating_sub(run.kept_fds);
        if let Some(f) = run.family.as_ref().and_then(|f| self.families.get_mut(f)) {
            f.runs.remove(&run.id);
            // Its name is no longer a run's: the next point lists the parent again.
            f.must_list = true;
            // Finished but still there (the control plane said so first): from now on an
            // ordinary child whose CPU time is the host's, read at each point like the others,
            // from where the run's reads left it. A directory made again under the same name
            // (another inode) is a new child: all of its CPU time is its own.
            let dir = self.cgroup_root.join(&*run.cgroup_rel);
            if let (Some(name), Ok(meta)) = (dir.file_name(), std::fs::metadata(&dir)) {
                if meta.is_dir() {
                    use std::os::unix::fs::MetadataExt as _;
                    let same = run.dir_ino == Some(meta.ino());
                    // Listed already as a new child (made again): its baseline stays.
                    f.others.entry(name.to_owned()).or_insert(Other {
                        cpu_stat: dir.join("cpu.stat"),
                        scan_us: if same { run.scan_us } else { 0 },
                    });
                }
            }
        }
        self.remember_finished(run.id);
    }

    fn remember_finished(&mut self, id: Arc<str>) {
        if self.recently_finished.len() >= RECENTLY_FINISHED_MAX {
            if let Some(old) = self.recently_finished.pop_front() {
                self.recently_finished_set.remove(&old);
            }
        }
        self.recently_finished.push_back(id.clone());
        self.recently_finished_set.insert(id);
    }

    /// A run cgroup seen created but gone before it could be opened. Billed from its parent
    /// when the parent has a family; else recorded with no usage, as lost.
    fn add_ghost(&mut self, id: &str, rel: &str) {
        if self.ghosts.iter().any(|g| &*g.id == id) {
            return;
        }
        let Some(parent) = parent_rel(rel) else {
            return;
        };
        let now = self.now_us();
        let idx = self.ghosts.len();
        let mut ghost = Ghost {
            id: Arc::from(id),
            cgroup_rel: Arc::from(rel),
            usage_us: 0,
            final_usage: None,
        };
        self.counters.ghost_runs += 1;
        match self.families.get_mut(parent) {
            Some(f) => {
                // A child listed earlier as an ordinary one hands its claim over, and what it
                // used up to that listing's last read (counted then as a child's, so in no
                // residual) is its own.
                if let Some(o) = Path::new(rel).file_name().and_then(|n| f.others.remove(n)) {
                    ghost.usage_us = o.scan_us;
                }
                f.claimants.push(Claimant {
                    kind: ClaimantKind::Ghost(idx),
                    weight_us: f.unknown_weight(now.saturating_sub(f.last_point_us)),
                    perf_us: None,
                });
            }
            None => {
                ghost.final_usage = Some(FinalUsage::Lost);
                self.counters.final_lost += 1;
                tracing::warn!(
                    run = %Shown::new(id),
                    "run cgroup created and removed between two reads, under a parent that \
                     cannot be reconciled: recorded with no usage"
                );
            }
        }
        self.ghosts.push(ghost);
    }

    /// Puts a new run in its parent's family (made if needed) and sets its baseline for
    /// reconcile points.
    fn join_family(&mut self, run: &mut Run, billed_from: BilledFrom) {
        let Some(parent) = parent_rel(&run.cgroup_rel) else {
            return;
        };
        let parent = parent.to_owned();
        if !self.ensure_family(&parent) {
            return;
        }
        let Some(f) = self.families.get_mut(parent.as_str()) else {
            return;
        };
        let name = Path::new(&*run.cgroup_rel).file_name().map(OsStr::to_owned);
        run.scan_us = match name.and_then(|n| f.others.remove(&n)) {
            // Listed at the family's last point: its usage up to then is in that baseline.
            Some(o) => o.scan_us.min(run.latest_us),
            // Born since the last point: all of it is new to the parent too.
            None if billed_from == BilledFrom::Birth => 0,
            None => run.latest_us,
        };
        f.runs.insert(run.id.clone());
        run.family = Some(f.rel.clone());
    }

    /// Makes sure the parent `rel` (never the cgroup root) has a family: its `cpu.stat` kept
    /// open, a watch on its directory, and every child listed as a baseline. False when it
    /// cannot be had (then its runs' unread tails are lost, loudly).
    fn ensure_family(&mut self, rel: &str) -> bool {
        if rel.is_empty() {
            return false;
        }
        if self.families.contains_key(rel) {
            return true;
        }
        let dir = self.cgroup_root.join(rel);
        let keep = self.kept_fds < self.fd_budget;
        let Ok(cpu_stat) = Source::open(dir.join("cpu.stat"), keep) else {
            return false;
        };
        let Ok(procs) = Source::open(dir.join("cgroup.procs"), self.kept_fds + 1 < self.fd_budget)
        else {
            return false;
        };
        let listing = if self.kept_fds + 2 < self.fd_budget {
            std::fs::File::open(&dir).ok()
        } else {
            None
        };
        let kept = usize::from(cpu_stat.is_kept())
            + usize::from(procs.is_kept())
            + usize::from(listing.is_some());
        // Children first, then the parent: the same order as every point.
        let mut others = BTreeMap::new();
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                if !e.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let path = e.path().join("cpu.stat");
                let read = Source::open(path.clone(), false).and_then(|s| s.read_cpu_usage_us());
                if let Ok(v) = read {
                    others.insert(
                        e.file_name(),
                        Other {
                            cpu_stat: path,
                            scan_us: v,
                        },
                    );
                }
            }
        }
        let Ok(last_us) = cpu_stat.read_cpu_usage_us() else {
            return false;
        };
        // The same inode as a pattern's parent gives the same wd: one target serves both.
        let wd = match self.inotify.add_watch(&dir, PARENT_MASK) {
            Ok(wd) => Some(wd),
            Err(_) => {
                self.counters.watch_fallbacks += 1;
                None
            }
        };
        let rel: Arc<str> = Arc::from(rel);
        if let Some(wd) = wd {
            if let WatchTarget::Parent { family, .. } =
                self.watches.entry(wd).or_insert(WatchTarget::Parent {
                    patterns: Vec::new(),
                    family: None,
                })
            {
                *family = Some(rel.clone());
            }
        }
        self.kept_fds += kept;
        let now = self.now_us();
        self.families.insert(
            rel.clone(),
            Family {
                rel,
                cpu_stat,
                procs,
                dir: listing,
                must_list: true,
                last_us,
                last_point_us: now,
                wd,
                runs: BTreeSet::new(),
                others,
                departed: BTreeSet::new(),
                rate_ppm: None,
                claimants: Vec::new(),
                balance: 0,
                balance_since_us: now,
                kept_fds: kept,
                pre_us: None,
                pre_at_us: now,
            },
        );
        true
    }

    /// A child of a family's parent was created or removed (after the patterns had their say).
    fn family_child_event(&mut self, rel: &str, name: &OsStr, created: bool, removed: bool) {
        let child: String = format!("{rel}/{}", name.to_string_lossy());
        let run_id = self.paths.get(child.as_str()).cloned();
        if removed {
            if let Some(id) = &run_id {
                // An announced run: no pattern saw it go.
                self.mark_gone(id);
            }
        }
        // A creation event for a run already finished (found by a listing, gone and billed
        // before its event was read) or already a ghost is stale, not a new child.
        let stale_run = run_id.is_none() && self.names_finished_run(rel, name);
        let now = self.now_us();
        let exists = created && self.cgroup_root.join(&child).is_dir();
        let Some(f) = self.families.get_mut(rel) else {
            return;
        };
        if created {
            // Whatever this event is taken for, the next point lists the directory, as it did
            // at every point before listings were skipped: a name reused by a new cgroup is
            // found there as an ordinary child.
            f.must_list = true;
            if run_id.is_some() || stale_run || f.departed.contains(name) {
                return;
            }
            if exists {
                // Born since the last point (or listed already: then its baseline stays).
                f.others.entry(name.to_owned()).or_insert_with(|| Other {
                    cpu_stat: self.cgroup_root.join(&child).join("cpu.stat"),
                    scan_us: 0,
                });
            } else if !f.others.contains_key(name) {
                // Created and removed unread: what it used is in the parent, and the host's.
                f.departed.insert(name.to_owned());
                f.claimants.push(Claimant {
                    kind: ClaimantKind::Other,
                    weight_us: f.unknown_weight(now.saturating_sub(f.last_point_us)),
                    perf_us: None,
                });
            }
        } else if removed {
            if f.departed.remove(name) {
                // Already found gone at a point, and claimed then.
                return;
            }
            if f.others.remove(name).is_some() {
                f.claimants.push(Claimant {
                    kind: ClaimantKind::Other,
                    weight_us: f.unknown_weight(now.saturating_sub(f.last_point_us)),
                    perf_us: None,
                });
            }
        }
    }

    /// Whether `name` under the family `rel` is a run of one of its patterns that finished or
    /// is a ghost.
    fn names_finished_run(&self, rel: &str, name: &OsStr) -> bool {
        self.family_run_ids(rel, name).any(|id| {
            self.recently_finished_set.contains(id.as_str())
                || self.ghosts.iter().any(|g| *g.id == *id)
        })
    }

    /// The run ids `name` has under the patterns whose parent is `rel`.
    fn family_run_ids<'a>(
        &'a self,
        rel: &'a str,
        name: &'a OsStr,
    ) -> impl Iterator<Item = String> + 'a {
        self.patterns
            .iter()
            .filter(move |p| p.parent().to_str() == Some(rel))
            .filter_map(move |p| match p.match_name(name) {
                NameMatch::Run(id) => Some(id),
                _ => None,
            })
    }

    /// Lists the parent's children at a point. On a busy host the creation events lag: a
    /// child that is there but not yet known would have its CPU time taken for that of the
    /// children that went away (and counted again once known). So every child is known before
    /// the parent is read: one not known yet is read as an ordinary child (cheap: no watch, no
    /// kept descriptor), from its birth. When its creation event is read and it is a run, it
    /// becomes one from that baseline, billed from its birth; when it goes away first and is a
    /// run's, it is billed as a ghost.
    fn list_family(&mut self, rel: &str) {
        let Some(f) = self.families.get(rel) else {
            return;
        };
        // A watched parent with no event pending has made no child since the events were
        // last read and handled: nothing to find. Listed anyway: a family not listed since it
        // was set up (its watch came after its first listing), since an overflow, or since a
        // creation event (whatever it was taken for); and one whose directory is not kept
        // open (its reads go by path, so a parent removed and made again, whose watch kernfs
        // may drop without a word, is still read).
        if f.wd.is_some() && f.dir.is_some() && !f.must_list && !self.inotify.pending() {
            self.listings_skipped += 1;
            return;
        }
        // The kept directory rewound, else opened now. Gone or unreadable: the parent's own
        // read says so at this point.
        let opened;
        let fd = match &f.dir {
            Some(d) => {
                if rustix::fs::seek(d, rustix::fs::SeekFrom::Start(0)).is_err() {
                    return;
                }
                d.as_fd()
            }
            None => match std::fs::File::open(self.cgroup_root.join(rel)) {
                Ok(d) => {
                    opened = d;
                    opened.as_fd()
                }
                Err(_) => return,
            },
        };
        // Every child, every point: nothing allocated for the children already known.
        if self.dir_buf.capacity() < DIR_BUF_BYTES {
            self.dir_buf.reserve(DIR_BUF_BYTES);
        }
        let key = &mut self.child_key;
        let mut unknown: Vec<std::ffi::OsString> = Vec::new();
        let mut entries = rustix::fs::RawDir::new(fd, self.dir_buf.spare_capacity_mut());
        let mut complete = true;
        while let Some(entry) = entries.next() {
            let Ok(e) = entry else {
                // Read in part: what was listed is kept, and the next point lists again.
                complete = false;
                break;
            };
            let name = OsStr::from_bytes(e.file_name().to_bytes());
            if name == "." || name == ".." {
                continue;
            }
            let is_dir = match e.file_type() {
                rustix::fs::FileType::Directory => true,
                rustix::fs::FileType::Unknown => {
                    rustix::fs::statat(fd, e.file_name(), rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
                        .is_ok_and(|st| {
                            rustix::fs::FileType::from_raw_mode(st.st_mode)
                                == rustix::fs::FileType::Directory
                        })
                }
                _ => false,
            };
            if !is_dir || f.others.contains_key(name) || f.departed.contains(name) {
                continue;
            }
            key.clear();
            key.push_str(rel);
            key.push('/');
            key.push_str(&name.to_string_lossy());
            // A run's name: its cgroup, unless the directory is another inode (removed and made
            // again under the name before the run's removal was handled), which is a new child.
            let run_ino = self
                .paths
                .get(key.as_str())
                .map(|id| self.runs.get(id).and_then(|r| r.dir_ino));
            let remade = matches!(run_ino, Some(Some(ino)) if ino != e.ino());
            if (run_ino.is_some() && !remade) || self.ghosts.iter().any(|g| *g.cgroup_rel == **key)
            {
                continue;
            }
            unknown.push(name.to_owned());
        }
        self.counters.children_listed_early += unknown.len() as u64;
        let Some(f) = self.families.get_mut(rel) else {
            return;
        };
        f.must_list = !complete;
        for name in unknown {
            let cpu_stat = self.cgroup_root.join(rel).join(&name).join("cpu.stat");
            f.others.insert(
                name,
                Other {
                    cpu_stat,
                    scan_us: 0,
                },
            );
        }
    }

    /// A child read as an ordinary one went away: when its name is a run's that no event has
    /// announced yet, it was a run created and removed between events, billed as a ghost (its
    /// usage up to its last read, `scan_us`, plus its share of the residual).
    fn other_was_ghost(&mut self, fam: &mut Family, name: &OsStr, scan_us: u64) -> bool {
        let rel = fam.rel.clone();
        let Some(id) = self.family_run_ids(&rel, name).next() else {
            return false;
        };
        if self.runs.contains_key(id.as_str()) || self.names_finished_run(&rel, name) {
            return false;
        }
        let Some(dir_name) = name.to_str() else {
            return false;
        };
        let now = self.now_us();
        self.counters.ghost_runs += 1;
        fam.claimants.push(Claimant {
            kind: ClaimantKind::Ghost(self.ghosts.len()),
            weight_us: fam.unknown_weight(now.saturating_sub(fam.last_point_us)),
            perf_us: None,
        });
        self.ghosts.push(Ghost {
            id: Arc::from(id.as_str()),
            cgroup_rel: Arc::from(format!("{rel}/{dir_name}")),
            usage_us: scan_us,
            final_usage: None,
        });
        true
    }

    /// One reconcile point of the family `rel` (see [`super::family`]): the live children's
    /// reads (taken again when `recapture`; a tick has just taken them), then the parent's,
    /// then the residual to the children that went away unread since the last point.
    fn reconcile_family(&mut self, rel: &str, recapture: bool) {
        let now = self.now_us();
        let Some(ids) = self
            .families
            .get(rel)
            .map(|f| f.runs.iter().cloned().collect::<Vec<_>>())
        else {
            return;
        };
        self.list_family(rel);
        // The reads: the parent before the children (`pre`; taken at the tick's start when not
        // `recapture`), the live children, the parent after (`post`). The midpoint of the two
        // parent reads stands for the moment of the children's, so the residual is off by at
        // most half of what the parent gained between them (the bracket). When that is wide
        // (this thread was preempted mid-way, as on a host whose runs take every CPU), the
        // reads are taken again, a few times at most.
        let mut attempt = 0u32;
        let mut post_at_us;
        let (others_read, post_read, bracket_us) = loop {
            if recapture || attempt > 0 {
                let at = self.now_us();
                if let Some(f) = self.families.get_mut(rel) {
                    f.pre_us = f.cpu_stat.read_cpu_usage_us().ok();
                    f.pre_at_us = at;
                }
                let mut gone = Vec::new();
                for id in &ids {
                    let Some(run) = self.runs.get_mut(id) else {
                        continue;
                    };
                    let settled = run.settled && run.populated == Some(false);
                    if run.finished || settled {
                        continue;
                    }
                    match capture(run, &mut self.tc_scratch, now, self.read_memory) {
                        Ok(_) => {}
                        Err(e) if e.is_gone() => gone.push(id.clone()),
                        Err(e) => self.push_error(Some(id), e),
                    }
                }
                for id in gone {
                    self.mark_gone(&id);
                }
            }
            let Some(f) = self.families.get(rel) else {
                return;
            };
            let others: Vec<(std::ffi::OsString, Result<u64, HostError>)> = f
                .others
                .iter()
                .map(|(name, o)| {
                    let v =
                        Source::open(o.cpu_stat.clone(), false).and_then(|s| s.read_cpu_usage_us());
                    (name.clone(), v)
                })
                .collect();
            let post = f.cpu_stat.read_cpu_usage_us();
            post_at_us = self.now_us();
            let bracket = match (&post, f.pre_us) {
                (Ok(post), Some(pre)) => post.saturating_sub(pre),
                _ => 0,
            };
            let children = ids.len() + others.len();
            if bracket > BRACKET_MAX_US
                && attempt < BRACKET_RETRIES
                && children <= BRACKET_RETRY_MAX_CHILDREN
            {
                attempt += 1;
                self.counters.reconcile_retries += 1;
                continue;
            }
            break (others, post, bracket);
        };
        let Some(mut fam) = self.families.remove(rel) else {
            return;
        };
        let mut unreliable: Option<String> = None;
        let mut children: i128 = 0;
        let mut gone_others = Vec::new();
        for (name, read) in others_read {
            match read {
                Ok(v) => {
                    if let Some(o) = fam.others.get_mut(&name) {
                        children += i128::from(v.checked_sub(o.scan_us).unwrap_or(v));
                        o.scan_us = v;
                    }
                }
                Err(e) if e.is_gone() => gone_others.push(name),
                Err(e) => unreliable = Some(e.to_string()),
            }
        }
        for name in gone_others {
            let scan_us = fam.others.remove(&name).map_or(0, |o| o.scan_us);
            if !self.other_was_ghost(&mut fam, &name, scan_us) {
                fam.claimants.push(Claimant {
                    kind: ClaimantKind::Other,
                    weight_us: fam.unknown_weight(now.saturating_sub(fam.last_point_us)),
                    perf_us: None,
                });
            }
            // Claimed now; its removal event, when read, must not claim again.
            fam.departed.insert(name);
        }
        let (mut runs_delta, mut live) = (0u128, 0u128);
        for id in &fam.runs {
            if let Some(run) = self.runs.get_mut(id) {
                let d = run
                    .latest_us
                    .checked_sub(run.scan_us)
                    .unwrap_or(run.latest_us);
                children += i128::from(d);
                run.scan_us = run.latest_us;
                if !run.finished {
                    runs_delta += u128::from(d);
                    live += 1;
                }
            }
        }
        let since = u128::from(now.saturating_sub(fam.last_point_us));
        if live > 0 && since >= 10_000 {
            fam.rate_ppm = u64::try_from(runs_delta * 1_000_000 / (live * since)).ok();
        }
        let mut parent_gone = false;
        let pre = fam.pre_us.take();
        let read = post_read.map(|post| match pre {
            Some(pre) if pre <= post => pre + (post - pre) / 2,
            _ => post,
        });
        let residual = match read {
            Ok(p) if p >= fam.last_us => {
                let r = i128::from(p - fam.last_us) - children;
                fam.last_us = p;
                Some(r)
            }
            Ok(p) => {
                fam.last_us = p;
                unreliable = Some("the parent's usage went backwards (recreated)".to_owned());
                None
            }
            Err(e) => {
                parent_gone = e.is_gone();
                unreliable = Some(e.to_string());
                None
            }
        };
        let mut claimants = std::mem::take(&mut fam.claimants);
        // Checked at every point: a positive residual is timing noise to keep (it cancels
        // later) only when the parent has no processes of its own; else it is theirs.
        if unreliable.is_none() {
            match fam.procs.lists_a_number() {
                Ok(false) => {}
                Ok(true) => {
                    self.counters.reconcile_parent_busy += 1;
                    unreliable = Some(format!(
                        "{} lists processes: the parent's own CPU time cannot be told from \
                         its removed children's",
                        fam.procs.path().display()
                    ));
                }
                Err(e) => unreliable = Some(e.to_string()),
            }
        }
        self.counters.reconcile_points += 1;
        match (residual, unreliable) {
            (Some(mut r), None) => {
                // The residual is shared by the claimants' counters when every claimant has
                // them and the point is sharp. A point read too slowly (the bracket stayed wide:
                // hundreds of children, or this thread preempted) can be off by more than a
                // run's own counters, and a claimant without counters (a ghost, an ordinary
                // child) has only a guessed weight: there, each run with counters takes what
                // they counted, and the residual less that goes to the others.
                let counted_apart =
                    bracket_us > BRACKET_MAX_US || claimants.iter().any(|c| c.perf_us.is_none());
                if counted_apart {
                    claimants.retain(|c| match (&c.kind, c.perf_us) {
                        (ClaimantKind::Run(id), Some(t)) => {
                            r -= i128::from(t);
                            self.settle_counted(id, t);
                            false
                        }
                        _ => true,
                    });
                }
                // Timing noise is carried both ways, so it cancels over time instead of biasing
                // the claimants, and a positive residual waits for its claimant (a child that
                // went away before its creation event was read claims it as a ghost later, on
                // a starved host seconds later). The bounds are physical: what has built up
                // since the balance was last paid out cannot exceed what the whole machine
                // could run in that time, and noise owed back is at most a second of the whole
                // machine. Beyond either the counters disagree: the excess is the host's, and
                // counted. (A cap of one second of the machine lost 1% of a starved host's
                // runs, whose ghosts claimed late.)
                let ncpus = i128::from(self.cpus.len().max(1) as u32);
                let since = i128::from(post_at_us.saturating_sub(fam.balance_since_us));
                let (floor, cap) = (-ncpus * 1_000_000, ncpus * (since + BALANCE_SLACK_US));
                let unclamped = fam.balance + r;
                fam.balance = unclamped.clamp(floor, cap);
                let clamped = (unclamped - fam.balance).unsigned_abs();
                self.counters.reconcile_clamped_us = self
                    .counters
                    .reconcile_clamped_us
                    .saturating_add(u64::try_from(clamped).unwrap_or(u64::MAX));
                tracing::debug!(
                    parent = %Shown::new(rel),
                    children_us = %children,
                    residual_us = %r,
                    balance_us = %unclamped,
                    clamped_us = %(unclamped - fam.balance),
                    claimants = claimants.len(),
                    span_us = self.now_us().saturating_sub(now),
                    recapture,
                    "reconcile point"
                );
                if !claimants.is_empty() {
                    let pay = u64::try_from(fam.balance.max(0)).unwrap_or(u64::MAX);
                    fam.balance -= i128::from(pay);
                    let weights: Vec<u64> = claimants.iter().map(|c| c.weight_us).collect();
                    let shares = share_residual(pay, &weights);
                    let how = if claimants.len() > 1 {
                        FinalUsage::ReconciledShared
                    } else {
                        FinalUsage::Reconciled
                    };
                    for (c, share) in claimants.iter().zip(shares) {
                        self.settle_claim(&c.kind, share, how);
                    }
                }
            }
            (_, why) => {
                fam.balance = 0;
                let why = why.unwrap_or_default();
                for c in &claimants {
                    if let (ClaimantKind::Run(id), Some(t)) = (&c.kind, c.perf_us) {
                        // The parent cannot tell; the run's own counters can, nearly exactly.
                        self.settle_counted(id, t);
                        continue;
                    }
                    self.settle_claim(&c.kind, 0, FinalUsage::Lost);
                    if let ClaimantKind::Run(id) = &c.kind {
                        tracing::warn!(
                            run = %Shown::new(id),
                            parent = %Shown::new(rel),
                            reason = %why,
                            "run cgroup removed before its final read and its parent cannot be \
                             reconciled: its CPU time since the last read is the host's"
                        );
                    }
                }
            }
        }
        fam.last_point_us = now;
        if fam.balance <= 0 {
            // From this point's first parent read: what builds up from here is at most the
            // parent's growth since then (each point's midpoint lies between its two reads).
            fam.balance_since_us = if pre.is_some() { fam.pre_at_us } else { now };
        }
        if parent_gone {
            self.forget_family(fam, true);
        } else {
            self.families.insert(fam.rel.clone(), fam);
        }
    }

    /// A run's tail is what its perf counters counted (see `perf_tail`): added to its usage as
    /// read (its scan point too: the point it is settled at has already summed the children).
    fn settle_counted(&mut self, id: &str, tail_us: u64) {
        if let Some(r) = self.runs.get_mut(id) {
            r.latest_us = r.latest_us.saturating_add(tail_us);
            r.scan_us = r.scan_us.saturating_add(tail_us);
            r.final_usage = Some(FinalUsage::PerfCounted);
            self.counters.final_perf_counted += 1;
        }
    }

    fn settle_claim(&mut self, kind: &ClaimantKind, share: u64, how: FinalUsage) {
        let slot = match kind {
            ClaimantKind::Run(id) => self.runs.get_mut(id).map(|r| {
                r.pending_reconciled_us += share;
                &mut r.final_usage
            }),
            ClaimantKind::Ghost(i) => self.ghosts.get_mut(*i).map(|g| {
                g.usage_us += share;
                &mut g.final_usage
            }),
            ClaimantKind::Other => None,
        };
        let Some(slot) = slot else {
            return;
        };
        *slot = Some(how);
        match how {
            FinalUsage::Read => self.counters.final_read += 1,
            FinalUsage::PerfCounted => self.counters.final_perf_counted += 1,
            FinalUsage::Reconciled => self.counters.final_reconciled += 1,
            FinalUsage::ReconciledShared => self.counters.final_reconciled_shared += 1,
            FinalUsage::Lost => self.counters.final_lost += 1,
        }
        self.counters.reconciled_us += share;
    }

    /// Families that no longer serve anything: no run, no claim, not a pattern's parent.
    fn forget_idle_families(&mut self) {
        let idle: Vec<Arc<str>> = self
            .families
            .values()
            .filter(|f| {
                f.runs.is_empty()
                    && f.claimants.is_empty()
                    && !self
                        .patterns
                        .iter()
                        .any(|p| p.parent().to_str() == Some(&*f.rel))
            })
            .map(|f| f.rel.clone())
            .collect();
        for rel in idle {
            if let Some(f) = self.families.remove(&rel) {
                self.forget_family(f, false);
            }
        }
    }

    /// Drops a family. When its parent directory is gone, the watch goes too, and the
    /// patterns it served are armed again when the directory comes back (kernfs does not
    /// always report a watched directory's own removal).
    fn forget_family(&mut self, f: Family, parent_gone: bool) {
        self.kept_fds = self.kept_fds.saturating_sub(f.kept_fds);
        for id in &f.runs {
            if let Some(r) = self.runs.get_mut(id) {
                r.family = None;
            }
        }
        let Some(wd) = f.wd else {
            return;
        };
        let Some(WatchTarget::Parent { patterns, family }) = self.watches.get_mut(&wd) else {
            return;
        };
        *family = None;
        if parent_gone {
            for &i in patterns.iter() {
                if let Some(slot) = self.pattern_wds.get_mut(i) {
                    *slot = None;
                }
            }
            patterns.clear();
        }
        if patterns.is_empty() {
            self.watches.remove(&wd);
            self.inotify.rm_watch(wd);
        }
    }
}

/// The parent of a cgroup path relative to the cgroup root; `None` at the top level (the
/// parent is the root itself).
fn parent_rel(rel: &str) -> Option<&str> {
    rel.rsplit_once('/')
        .map(|(p, _)| p)
        .filter(|p| !p.is_empty())
}

fn inotify_err(e: io::Error) -> HostError {
    HostError::Io {
        path: PathBuf::from("inotify"),
        source: e,
    }
}

/// Checks labels against the bounds; the control socket enforces its own (tighter) ones first.
pub fn validate_labels(labels: &Labels) -> Result<(), HostError> {
    let bad = |value: &str, what| HostError::BadRunRef {
        field: "labels",
        value: Shown::new(value),
        what,
    };
    if labels.len() > LABELS_MAX {
        return Err(bad("", "more than 32 labels"));
    }
    for (k, v) in labels {
        if let Some(what) = wattd_proto::names::label_problem(k, v) {
            return Err(bad(k, what));
        }
    }
    Ok(())
}

/// Reads a run's current usage (and perf counters and memory) into `latest_*`.
/// Returns, when usage moved and the counters were paired before and after, how far each moved
/// (usage microseconds, counter nanoseconds): the scale of a counted tail (`perf_scale`).
fn capture(
    run: &mut Run,
    scratch: &mut Vec<(u32, u64)>,
    now_us: u64,
    read_memory: bool,
) -> Result<Option<(u64, u64)>, HostError> {
    let usage = run.cpu_stat.read_cpu_usage_us()?;
    let mut moved = None;
    // The counters are read right after `cpu.stat` when it moved, so that `latest_tc_ns` pairs
    // with `latest_us` (see `perf_tail`). A failed read unpairs them.
    if usage != run.latest_us {
        let before = paired_tc_ns(run);
        if let Some(p) = &mut run.perf {
            run.latest_tc_ns.clear();
            if p.read_into(scratch).is_ok() {
                run.latest_tc_ns.extend(scratch.iter().map(|&(_, v)| v));
            }
        }
        if let (Some(p0), Some(p1)) = (before, paired_tc_ns(run)) {
            if usage > run.latest_us && p1 > p0 {
                moved = Some((usage - run.latest_us, p1 - p0));
            }
        }
    }
    run.latest_us = usage;
    run.read_at_us = now_us;
    run.memory_bytes = match &run.memory {
        Some(m) if read_memory => Some(m.read_u64()?),
        _ => None,
    };
    Ok(moved)
}

/// A removed run's tail by its perf counters: their count now (the final one: the cgroup is
/// gone) less the count read right after its last `cpu.stat` read, in microseconds (rounded).
/// Close, not exact, in `cpu.stat`'s terms: task-clock runs on the scheduler's raw clock (steal
/// and interrupt time in, which `usage_usec` leaves out: 0.4% more over whole runs on this VM),
/// and `cpu.stat` lags a running task by up to a scheduler tick, which this pair puts in no
/// tail. So it weighs the run's share of its parent's residual, which is exact in sum, and is
/// the amount only where the parent cannot tell. `None`: no counters, unpaired, unreadable.
fn perf_tail(run: &mut Run, scratch: &mut Vec<(u32, u64)>, scale: (u128, u128)) -> Option<u64> {
    let paired = paired_tc_ns(run)?;
    let counted_ns = run.perf.as_mut()?.read_total(scratch).ok()?;
    run.latest_tc_ns.clear();
    run.latest_tc_ns.extend(scratch.iter().map(|&(_, v)| v));
    Some(scale_tail(counted_ns.saturating_sub(paired), scale))
}

/// Counter nanoseconds to `usage_usec` microseconds, rounded: by the runs' measured ratio
/// (`us` per `ns`) once it rests on at least [`PERF_SCALE_MIN_NS`], kept within
/// [[`PERF_SCALE_MIN_PPM`], 1] per 1,000 ns; else 1 us per 1,000 ns.
fn scale_tail(tail_ns: u64, (us, ns): (u128, u128)) -> u64 {
    let tail_ns = u128::from(tail_ns);
    let ppm = if ns >= PERF_SCALE_MIN_NS {
        (us * 1_000_000_000 / ns).clamp(PERF_SCALE_MIN_PPM, 1_000_000)
    } else {
        1_000_000
    };
    u64::try_from((tail_ns * ppm / 1_000 + 500_000) / 1_000_000).unwrap_or(u64::MAX)
}

/// The sum of the run's counters as last read with its `cpu.stat`; `None` when unpaired.
fn paired_tc_ns(run: &Run) -> Option<u64> {
    let p = run.perf.as_ref()?;
    (run.latest_tc_ns.len() == p.fd_count()).then(|| run.latest_tc_ns.iter().sum())
}

/// Whether runs get perf counters, and on which CPUs. The counters count on the running
/// kernel's CPUs, in the real cgroup hierarchy, so they need a cgroup root that is a cgroup2
/// mount (a simulated host's tree may link to the real one) and, off the live host, the
/// kernel's own CPU list rather than the simulated topology's.
fn perf_counters_plan(
    enabled: bool,
    root: &HostRoot,
    cgroup_root: &Path,
    topology: &Topology,
) -> (Option<String>, Vec<u32>) {
    if !enabled {
        return (Some("disabled by configuration".to_owned()), Vec::new());
    }
    match is_cgroup2(cgroup_root) {
        Ok(true) => {}
        Ok(false) => {
            return (
                Some(format!(
                    "{} is not in the running kernel's cgroup2 hierarchy",
                    Shown::new(&cgroup_root.display().to_string())
                )),
                Vec::new(),
            )
        }
        Err(e) => {
            return (
                Some(format!(
                    "{}: is it in the running kernel's cgroup2 hierarchy? {}",
                    Shown::new(&cgroup_root.display().to_string()),
                    Shown::new(&e)
                )),
                Vec::new(),
            )
        }
    }
    if root.is_live() {
        return (None, topology.cpus.iter().map(|c| c.id).collect());
    }
    match Topology::read(&HostRoot::live()) {
        Ok(t) => (None, t.cpus.iter().map(|c| c.id).collect()),
        Err(e) => (Some(format!("the running kernel's CPUs: {e}")), Vec::new()),
    }
}

/// Whether `dir` is in the running kernel's cgroup2 hierarchy: on the same device as the
/// cgroup2 mount of this process's own mountinfo (a simulated host's tree may link to it; a
/// fixture tree of plain files is elsewhere).
fn is_cgroup2(dir: &Path) -> Result<bool, String> {
    use std::os::unix::fs::MetadataExt as _;
    let live = find_cgroup2_mount(&HostRoot::live()).map_err(|e| e.to_string())?;
    let dev = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.dev())
            .map_err(|e| format!("{}: {e}", p.display()))
    };
    Ok(dev(&live.mount_point)? == dev(dir)?)
}

/// Package weights from /proc/stat busy time; with none measured (first tick, idle host), each
/// package weighs its CPU count so the split is still exact and deterministic.
fn proc_stat_weights(busy: &Option<BTreeMap<u32, i128>>, topo: &Topology) -> Vec<(u32, u128)> {
    if let Some(b) = busy {
        if b.values().any(|&v| v > 0) {
            return b.iter().map(|(&p, &v)| (p, v.max(0) as u128)).collect();
        }
    }
    topo.cpus_by_package()
        .into_iter()
        .map(|(p, cpus)| (p, cpus.len() as u128))
        .collect()
}

fn split_run(
    run: &Run,
    usage_us: u64,
    fallback: &[(u32, u128)],
    w: &mut Vec<(u32, u128)>,
) -> (BTreeMap<u32, u64>, SplitSource) {
    if run.perf.is_some()
        && !run.perf_pkgs.is_empty()
        && run.latest_tc_ns.len() == run.perf_pkgs.len()
    {
        // The counters' movement per package (in `w`, by package id), since the last tick or
        // over the run's whole life.
        let by_pkg = |w: &mut Vec<(u32, u128)>, whole_life: bool| {
            w.clear();
            for (i, &pkg) in run.perf_pkgs.iter().enumerate() {
                let since = if whole_life {
                    0
                } else {
                    run.billed_tc_ns.get(i).copied().unwrap_or(0)
                };
                let v = u128::from(run.latest_tc_ns[i].saturating_sub(since));
                match w.iter_mut().find(|e| e.0 == pkg) {
                    Some(e) => e.1 += v,
                    None => w.push((pkg, v)),
                }
            }
            w.sort_unstable_by_key(|e| e.0);
        };
        by_pkg(w, false);
        // Usage with no counter movement of its own this tick (a tail recovered from the
        // parent) is split as the run's whole life was.
        if !w.iter().any(|&(_, v)| v > 0) {
            by_pkg(w, true);
        }
        if w.iter().any(|&(_, v)| v > 0) {
            return (split_exact(usage_us, w), SplitSource::PerfTaskClock);
        }
    }
    (split_exact(usage_us, fallback), SplitSource::ProcStatShare)
}

/// Divides `total` in proportion to `weights` exactly (largest remainder, ties to the lower
/// package id), so per-package parts always sum to the run's usage.
pub fn split_exact(total: u64, weights: &[(u32, u128)]) -> BTreeMap<u32, u64> {
    let mut out = BTreeMap::new();
    let sum: u128 = weights.iter().map(|&(_, w)| w).sum();
    if sum == 0 || weights.is_empty() {
        if let Some(&(p, _)) = weights.first() {
            out.insert(p, total);
        } else {
            out.insert(0, total);
        }
        return out;
    }
    let mut given: u64 = 0;
    for &(p, w) in weights {
        let q = u64::try_from(u128::from(total) * w / sum).unwrap_or(u64::MAX);
        given += q;
        out.insert(p, q);
    }
    // What the quotients left (fewer units than weights) goes one unit each to the largest
    // remainders, ties to the lower package id then the earlier weight: in that order, each
    // pick the best weight ranked below the last one (no sort, nothing allocated: this runs
    // for every run on every tick).
    let rank = |i: usize| {
        (
            (u128::from(total) * weights[i].1) % sum,
            std::cmp::Reverse(weights[i].0),
            std::cmp::Reverse(i),
        )
    };
    let mut last = None;
    for _ in 0..total - given {
        let Some(b) = (0..weights.len())
            .filter(|&i| last.map_or(true, |l| rank(i) < l))
            .max_by_key(|&i| rank(i))
        else {
            break;
        };
        last = Some(rank(b));
        if let Some(v) = out.get_mut(&weights[b].0) {
            *v += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A parent's children that no event announced are found by listing it at a point, from
    /// the kept directory (rewound each time) or, with no descriptor to spare, opened then.
    #[test]
    fn a_parent_is_listed_at_every_point_kept_open_or_not() {
        for budget in [None, Some(0)] {
            let dir = tempfile::tempdir().unwrap();
            let h = crate::synth::HostTree::new(dir.path());
            h.cgroup2_host(2, 1).unwrap();
            let cg = "sys/fs/cgroup/flowzart.slice";
            let put = |rel: String, text: &str| h.write(rel, text).unwrap();
            put(format!("{cg}/cpu.stat"), "usage_usec 100\n");
            put(format!("{cg}/cgroup.procs"), "");
            // Listed at every listing, and never a child.
            put(format!("{cg}/not-a-directory"), "");
            put(format!("{cg}/run-a.scope/cpu.stat"), "usage_usec 5\n");
            put(format!("{cg}/run-a.scope/cgroup.events"), "populated 1\n");
            let mut t = RunTracker::new(TrackerConfig {
                rescan_every_ticks: 0,
                fd_budget: budget,
                ..TrackerConfig::new(HostRoot::new(dir.path()))
            })
            .unwrap();
            t.tick(1_000);
            let fam = "flowzart.slice";
            assert_eq!(
                t.families[fam].dir.is_some(),
                budget.is_none(),
                "{budget:?}"
            );
            // Nothing made since the events were read: no listing (a directory read by path
            // is listed at every point).
            let kept = u64::from(budget.is_none());
            let skipped = t.listings_skipped;
            t.list_family(fam);
            assert_eq!(t.listings_skipped, skipped + kept, "{budget:?}");
            // Created with no event read in between: only the listing can find them.
            put(format!("{cg}/helper.service/cpu.stat"), "usage_usec 1\n");
            t.list_family(fam);
            put(format!("{cg}/later.slice/cpu.stat"), "usage_usec 1\n");
            t.list_family(fam);
            let others: Vec<String> = t.families[fam]
                .others
                .keys()
                .map(|k| k.to_string_lossy().into_owned())
                .collect();
            assert_eq!(others, ["helper.service", "later.slice"], "{budget:?}");
            assert_eq!(t.counters.children_listed_early, 2, "{budget:?}");
            assert_eq!(t.listings_skipped, skipped + kept, "{budget:?}");
            assert!(t.runs.contains_key("a"), "{budget:?}");
            // A creation event handled before a point still has that point list the directory
            // (whatever the event was taken for), and only that one.
            put(format!("{cg}/third.slice/cpu.stat"), "usage_usec 1\n");
            t.poll_events().unwrap();
            let skipped = t.listings_skipped;
            t.list_family(fam);
            assert_eq!(t.listings_skipped, skipped, "{budget:?}");
            t.list_family(fam);
            assert_eq!(t.listings_skipped, skipped + kept, "{budget:?}");
        }
    }

    #[test]
    fn counted_tails_scale_by_the_measured_ratio_within_bounds() {
        // No measurement yet, or too little: 1 us per 1,000 ns, rounded to the nearest.
        assert_eq!(scale_tail(1_499, (0, 0)), 1);
        assert_eq!(scale_tail(1_500, (0, 0)), 2);
        assert_eq!(scale_tail(10_000_000, (9_000, 10_000_000)), 10_000);
        // 2% of steal: the tail loses 2%.
        assert_eq!(scale_tail(10_000_000, (980_000, 1_000_000_000)), 9_800);
        // Never scaled up, never below 0.8 (a lagging cpu.stat cannot take two thirds off).
        assert_eq!(scale_tail(10_000_000, (2_000_000, 1_000_000_000)), 10_000);
        assert_eq!(scale_tail(10_000_000, (330_000, 1_000_000_000)), 8_000);
        assert_eq!(scale_tail(u64::MAX, (1, 1)), u64::MAX / 1_000 + 1);
    }

    /// `split_exact` as it was first written (sorting the remainders): the reference.
    fn split_exact_by_sorting(total: u64, weights: &[(u32, u128)]) -> BTreeMap<u32, u64> {
        let sum: u128 = weights.iter().map(|&(_, w)| w).sum();
        if sum == 0 || weights.is_empty() {
            return split_exact(total, weights);
        }
        let mut out = BTreeMap::new();
        let mut given: u64 = 0;
        let mut rems: Vec<(u128, u32)> = Vec::new();
        for &(p, w) in weights {
            let num = u128::from(total) * w;
            let q = u64::try_from(num / sum).unwrap_or(u64::MAX);
            given += q;
            rems.push((num % sum, p));
            out.insert(p, q);
        }
        rems.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut left = total - given;
        for (_, p) in rems {
            if left == 0 {
                break;
            }
            if let Some(v) = out.get_mut(&p) {
                *v += 1;
            }
            left -= 1;
        }
        out
    }

    proptest::proptest! {
        #[test]
        fn split_exact_gives_what_sorting_the_remainders_gave(
            total in proptest::prop_oneof![0u64..1_000, proptest::num::u64::ANY],
            weights in proptest::collection::vec((0u32..6, 0u128..5_000), 0..9),
            wide in proptest::bool::ANY,
        ) {
            // Past 64 weights the flags take over from the bits.
            let weights: Vec<(u32, u128)> = if wide {
                (0..70u32).map(|p| (p, u128::from(p % 7) + 1)).collect()
            } else {
                weights
            };
            let got = split_exact(total, &weights);
            proptest::prop_assert_eq!(&got, &split_exact_by_sorting(total, &weights));
            if weights.iter().map(|w| w.0).collect::<BTreeSet<_>>().len() == weights.len() {
                proptest::prop_assert_eq!(got.values().map(|&v| u128::from(v)).sum::<u128>(), u128::from(total));
            }
        }
    }

    #[test]
    fn split_exact_conserves() {
        let w = [(0u32, 1u128), (1, 1), (2, 1)];
        let s = split_exact(100, &w);
        assert_eq!(s.values().sum::<u64>(), 100);
        assert_eq!(s[&0], 34);
        assert_eq!(s[&1], 33);
        let s = split_exact(7, &[(0, 0), (1, 0)]);
        assert_eq!(s, BTreeMap::from([(0, 7)]));
        let s = split_exact(u64::MAX, &[(0, u128::from(u64::MAX)), (1, 3)]);
        assert_eq!(s.values().fold(0u64, |a, b| a.wrapping_add(*b)), u64::MAX);
        for total in [0u64, 1, 2, 999, 1_000_003] {
            let s = split_exact(total, &[(3, 7), (5, 11), (9, 13)]);
            assert_eq!(s.values().sum::<u64>(), total);
        }
    }

    #[test]
    fn labels_bounds() {
        let mut l = Labels::new();
        l.insert("team".into(), "a b".into());
        validate_labels(&l).unwrap();
        l.insert("k".into(), "x\ny".into());
        assert!(validate_labels(&l).is_err());
        let many: Labels = (0..65).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(validate_labels(&many).is_err());
        let long: Labels = [("k".to_owned(), "v".repeat(1025))].into();
        assert!(validate_labels(&long).is_err());
    }
}
