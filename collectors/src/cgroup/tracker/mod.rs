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

use super::family::{payout, share_residual, Claimant, ClaimantKind, Family, FinalUsage, Other};
use super::files::{
    read_cpu_stat_once, read_populated, read_reserved_millicpus, CgroupFile, Source,
};
use super::inotify::{Event, Inotify};
use super::mount::find_cgroup2_mount;
use super::pattern::{validate_cgroup_rel, validate_run_id, NameMatch, RunPattern};
use super::perf::TaskClock;
use super::trace::{CgroupTrace, TraceStats};
use crate::error::{HostError, Shown, HINT_GENERIC, HINT_PERF};
use crate::hostfs::HostRoot;
use crate::procstat::{user_hz, ProcStat, ProcStatFile};
use crate::shares::{largest_remainder, PackageShares, SplitScratch, Ties};
use crate::topology::Topology;

mod events;
mod reconcile;
mod runs;
mod usage;

use runs::{cgroup_trace_plan, perf_counters_plan};
pub use usage::{split_exact, PackageSplitScratch};

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
/// The default [`TrackerConfig::perf_counters_max`]: about 95 MiB of the kernel's memory; every
/// run has its counters up to 32,768 runs on 2 CPUs, 1,024 on 64.
pub const DEFAULT_PERF_COUNTERS_MAX: usize = 65_536;

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
    /// Trace the kernel's CPU time of each run cgroup from its creation with eBPF (the cgroup
    /// root must be the running kernel's cgroup2 mount; CAP_BPF and CAP_PERFMON): the exact
    /// usage of a run removed before its final read, or before it was known.
    pub cgroup_trace: bool,
    /// Most descriptors the tracker keeps open; `None`: three quarters of RLIMIT_NOFILE.
    pub fd_budget: Option<usize>,
    /// Most perf counters open at once, across runs (one per CPU per run). Each costs the
    /// kernel about 1.5 KB of unreclaimable memory (its `perf_event`, 1,352 bytes of slab on
    /// 6.18, and its open file), which the agent's RSS does not show: 10,000 runs on a 64-CPU
    /// host would hold about a gigabyte. A run found while the counters open leave no room for
    /// its own has none, for its whole life (counted in `perf_uncounted_runs`, warned once); a
    /// dropped run's counters make room for later runs. Below one run's counters (fewer than
    /// the CPUs), no run has any, and `perf_counters_disabled` says why.
    pub perf_counters_max: usize,
    /// Raise the RLIMIT_NOFILE soft limit to the hard limit at start.
    pub raise_nofile: bool,
    /// Full rescan (every pattern's parent listed, the trace swept) at the first tick this long
    /// after the last, in case inotify dropped events; `None`: never. Time, not ticks: at 100
    /// Hz a rescan every 60 ticks was a fixed cost of every tick.
    pub rescan_every: Option<Duration>,
    /// Read each run's `memory.current` at every tick (what the DRAM `memory` policy weighs);
    /// off, a run's `memory_bytes` is `None` and a tick costs one read per run fewer.
    pub read_memory: bool,
    /// A quiet family's reconcile points (no child known, nothing to settle: see
    /// `Family::is_quiet`) are at most this far apart, not at every tick: at the last tick
    /// before the next would be later (every tick when the ticks are this far apart or more).
    /// Its reads (the parent's `cpu.stat` twice, its `cgroup.procs` and a `FIONREAD`) were
    /// four of an idle 100 Hz tick's nine system calls. The point is how the removal of an
    /// empty parent that kernfs did not report is noticed, so this is how late that can be
    /// noticed: as at a 1 s tick.
    pub quiet_point_every: Duration,
}

impl TrackerConfig {
    pub fn new(root: HostRoot) -> Self {
        TrackerConfig {
            root,
            cgroup_root: None,
            patterns: vec!["flowzart.slice/run-{run_id}.scope".to_owned()],
            perf_counters: true,
            perf_split: true,
            cgroup_trace: true,
            fd_budget: None,
            perf_counters_max: DEFAULT_PERF_COUNTERS_MAX,
            raise_nofile: true,
            rescan_every: Some(Duration::from_secs(60)),
            read_memory: true,
            quiet_point_every: Duration::from_secs(1),
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
    pub usage_us_by_package: PackageShares,
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
    /// Busy CPU time from `/proc/stat`, all CPUs of the package, as measured: the interval's
    /// elapsed time less the CPUs' idle time, which `/proc/stat` counts in whole ticks, so a
    /// short interval can come out slightly negative. What the host bucket is paid from
    /// (attribution's `HostBalance`), so that the rounding cancels over time. 0 when
    /// `/proc/stat` could not be read.
    pub busy_signed_us: i128,
    /// Sum of the runs' usage on this package. (Intervals where it exceeds the busy time are
    /// counted: `TrackerCounters::host_clamps`.)
    pub runs_us: u64,
}

impl PackageUsage {
    /// The busy time, never negative.
    pub fn busy_us(&self) -> u64 {
        u64::try_from(self.busy_signed_us.max(0)).unwrap_or(u64::MAX)
    }
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
    pub final_traced: u64,
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
    /// Cgroups made under a watched parent and traced from their creation (see
    /// [`crate::cgroup::trace`]), and those that could not be (a map full, a name too long).
    pub traced_cgroups: u64,
    pub untraced_cgroups: u64,
    /// Slices of CPU time the trace did not count (see
    /// [`crate::cgroup::trace::TraceStats::missed`]): faulted reads as of this tick, program
    /// runs the kernel skipped as of the last rescan.
    pub trace_missed: u64,
    /// Runs read after they emptied whose read differed from the trace's count: 0 unless the
    /// trace is wrong on this kernel.
    pub trace_mismatches: u64,
    /// Trace entries dropped by a sweep: of cgroups gone whose removal no event or point
    /// reported (an inotify overflow, a name made again before the first was claimed).
    pub trace_swept: u64,
    /// A gauge, not a count: microseconds of CPU time held in the reconciled parents' positive
    /// balances (see `reconcile_family`), summed: parent growth that no child's read accounts
    /// for and no claim has taken. Children gone unread whose claim is still to come, the part
    /// held back at a point too wide or incomplete to pay, slices the cgroup trace did not see
    /// (see [`crate::cgroup::trace`]), processes of the parent's own that came and went between
    /// two points. It is paid to that family's next claimant, and is the host's while none
    /// comes. Timing noise keeps it near 0; what builds up is CPU time the runs were not
    /// billed.
    pub unclaimed_us: u64,
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
    /// Why the cgroup trace is not used, when it is not.
    pub cgroup_trace_disabled: Option<String>,
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
    /// Its `memory.current`, when the policy reads it (boxed: 8 bytes, not 56, in the runs of
    /// an agent that does not, as by default).
    memory: Option<Box<Source>>,
    /// Its perf counters, when it has them (24 bytes in the run, the slots one allocation).
    perf: Option<RunPerf>,
    events_wd: Option<i32>,
    reserved_millicpus: Option<u64>,
    /// `usage_usec` up to which the run's usage has been reported in a snapshot (at its
    /// discovery, its usage then, for a run already there when the tracker started).
    reported_us: u64,
    /// `usage_usec` as last read.
    latest_us: u64,
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

/// A run's perf `task-clock` counters (one per CPU) and what was read from them.
#[derive(Debug)]
struct RunPerf {
    /// One per counter, in the order of the CPUs they were opened on.
    slots: Box<[PerfSlot]>,
    /// The counters split the run across packages (each slot's package is known).
    split: bool,
    /// The slots' `latest_ns` were read right after the run's `latest_us` (see `perf_tail`).
    paired: bool,
}

#[derive(Debug)]
struct PerfSlot {
    clock: TaskClock,
    /// Package of the counter's CPU (0 when the counters do not split).
    pkg: u32,
    /// The count up to which the run's usage was reported in a snapshot.
    reported_ns: u64,
    /// The count as last read.
    latest_ns: u64,
}

impl RunPerf {
    /// `pkgs`: each counter's package, or empty when the counters do not split.
    fn new(clocks: Vec<TaskClock>, pkgs: &[u32]) -> Self {
        let slots = clocks
            .into_iter()
            .enumerate()
            .map(|(i, clock)| PerfSlot {
                clock,
                pkg: pkgs.get(i).copied().unwrap_or(0),
                reported_ns: 0,
                latest_ns: 0,
            })
            .collect();
        RunPerf {
            slots,
            split: !pkgs.is_empty(),
            paired: false,
        }
    }

    /// Reads every counter into `latest_ns`; a failed read leaves them unpaired.
    fn read(&mut self, scratch: &mut Vec<u64>) {
        self.paired = self.read_all(scratch).is_ok() && self.take(scratch);
    }

    /// Every counter's count now into `scratch` (in the slots' order), and their sum.
    fn read_all(&self, scratch: &mut Vec<u64>) -> std::io::Result<u64> {
        scratch.clear();
        let mut total = 0u64;
        for s in self.slots.iter() {
            let v = s.clock.read()?;
            total = total.saturating_add(v);
            scratch.push(v);
        }
        Ok(total)
    }

    /// The counts in `scratch` (one per counter, as read) as the latest.
    fn take(&mut self, scratch: &[u64]) -> bool {
        if scratch.len() != self.slots.len() {
            return false;
        }
        for (s, &v) in self.slots.iter_mut().zip(scratch) {
            s.latest_ns = v;
        }
        true
    }

    /// The sum of the counters as last read with the run's `cpu.stat`; `None` when unpaired.
    fn paired_total(&self) -> Option<u64> {
        self.paired.then(|| {
            self.slots
                .iter()
                .fold(0u64, |t, s| t.saturating_add(s.latest_ns))
        })
    }

    /// The run's usage was reported up to the latest counts (from 0 when they are unpaired).
    fn mark_reported(&mut self) {
        for s in &mut self.slots {
            s.reported_ns = if self.paired { s.latest_ns } else { 0 };
        }
    }
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
    /// A directory whose children matter (boxed: a few parents beside a watch per run, whose
    /// table entries are then 32 bytes, not 56).
    Parent(Box<ParentWatch>),
    RunEvents(Arc<str>),
}

impl WatchTarget {
    fn parent() -> Self {
        WatchTarget::Parent(Box::default())
    }
}

/// What a watched parent directory serves: candidate runs of these patterns, and/or the
/// children of a reconciliation family.
#[derive(Debug, Default)]
struct ParentWatch {
    patterns: Vec<usize>,
    family: Option<Arc<str>>,
}

/// Tracks runs and measures their usage. Single-threaded: the daemon calls [`Self::tick`] on
/// its timer, [`Self::poll_events`] whenever [`Self::events_fd`] is readable, and
/// `run_started`/`run_finished` for control-plane messages.
#[derive(Debug)]
pub struct RunTracker {
    root: HostRoot,
    cgroup_root: Arc<Path>,
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
    /// The tick's `/proc/stat` read, parsed into the storage of the read before it (swapped
    /// with `last_stat`): no allocation per tick.
    next_stat: ProcStat,
    /// `/proc/stat`, kept open (reopened after a failed read).
    proc_stat: Option<ProcStatFile>,
    user_hz: u64,
    /// Why no perf counters are opened for runs, when none are.
    perf_disabled: Option<String>,
    /// The cgroup trace, when it could be loaded, and why not when not.
    trace: Option<CgroupTrace>,
    trace_disabled: Option<String>,
    /// Trace entries found of no use at the last sweep (see `sweep_trace`).
    trace_suspects: HashSet<u64>,
    /// Program runs the kernel skipped, as read at the last rescan (a file read per program:
    /// not every tick).
    trace_skipped: u64,
    /// The programs' counts (cgroups traced, not traced, faulted reads) as last read: three
    /// map lookups, so read at a tick only when cgroups may have been made since (an event
    /// was handled, a rescan ran) or a second has passed, not at every tick of a 100 Hz agent.
    trace_counts: Option<TraceStats>,
    /// Tracker clock of that read; `None`: due at the next tick.
    trace_counts_at_us: Option<u64>,
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
    /// Perf counters open across runs, and the most that may be
    /// ([`TrackerConfig::perf_counters_max`]).
    perf_open: usize,
    perf_max: usize,
    /// The maximum has refused a run its counters (said once, as a warning).
    perf_max_reached: bool,
    counters: TrackerCounters,
    /// When this tracker started (CLOCK_REALTIME): an announced run whose cgroup is older was
    /// alive while no agent (or a previous one) was measuring, so it is billed from now.
    started_at: std::time::SystemTime,
    rescan_every_us: Option<u64>,
    /// Tracker clock (microseconds) of the last rescan (or the start).
    last_rescan_us: u64,
    errors: Vec<TickError>,
    events: Vec<Event>,
    /// The next tick leaves the inotify queue unread ([`RunTracker::skip_next_event_read`]).
    skip_event_read: bool,
    /// The last read of the inotify queue ended with the queue empty (`EAGAIN`), not an error:
    /// only then may a caller's word that nothing is readable skip the next one.
    events_drained: bool,
    tc_scratch: Vec<u64>,
    /// A run's counter movement per package while it is split (kept between ticks).
    split_scratch: Vec<(u32, u64)>,
    /// The buffers of that split (kept between runs and ticks).
    package_split: PackageSplitScratch,
    /// A parent's directory entries while it is listed (kept between points).
    dir_buf: Vec<u8>,
    /// A child's path while it is looked up (kept between points).
    child_key: String,
    /// Points at which a watched parent was not listed: no event was pending.
    listings_skipped: u64,
    /// [`TrackerConfig::read_memory`].
    read_memory: bool,
    /// [`TrackerConfig::quiet_point_every`], in microseconds.
    quiet_point_every_us: u64,
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
        let (mut perf_disabled, perf_cpus) =
            perf_counters_plan(config.perf_counters, &root, &cgroup_root, &topology);
        // Below one run's counters no run could have them: said as why there are none.
        if perf_disabled.is_none() && config.perf_counters_max < perf_cpus.len() {
            perf_disabled = Some(format!(
                "runs.perf_counters_max is {}, below one run's counters ({} CPUs)",
                config.perf_counters_max,
                perf_cpus.len()
            ));
        }
        let (trace, trace_disabled) = cgroup_trace_plan(config.cgroup_trace, &cgroup_root);
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
            cgroup_root: Arc::from(cgroup_root),
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
            next_stat: ProcStat::default(),
            proc_stat: Some(proc_stat),
            user_hz: user_hz(),
            perf_disabled,
            trace,
            trace_disabled,
            trace_suspects: HashSet::new(),
            trace_skipped: 0,
            trace_counts: None,
            trace_counts_at_us: None,
            perf_split_off,
            perf_cpus,
            perf_scale: (0, 0),
            fd_budget,
            kept_fds: 0,
            perf_open: 0,
            perf_max: config.perf_counters_max,
            perf_max_reached: false,
            counters: TrackerCounters::default(),
            started_at: std::time::SystemTime::now(),
            rescan_every_us: config
                .rescan_every
                .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
            last_rescan_us: 0,
            errors: Vec::new(),
            events: Vec::new(),
            skip_event_read: false,
            events_drained: false,
            tc_scratch: Vec::new(),
            split_scratch: Vec::new(),
            package_split: PackageSplitScratch::default(),
            dir_buf: Vec::new(),
            child_key: String::new(),
            listings_skipped: 0,
            read_memory: config.read_memory,
            quiet_point_every_us: u64::try_from(config.quiet_point_every.as_micros())
                .unwrap_or(u64::MAX),
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
        c.unclaimed_us = self
            .families
            .values()
            .map(|f| u64::try_from(f.balance.max(0)).unwrap_or(u64::MAX))
            .fold(0, u64::saturating_add);
        if let Some(s) = self.trace_counts {
            c.traced_cgroups = s.traced;
            c.untraced_cgroups = s.failed;
            c.trace_missed = s.missed + self.trace_skipped;
        }
        c
    }

    /// Readable when cgroups were created, removed or emptied: the daemon's event loop waits
    /// on it (e.g. tokio `AsyncFd`) and calls [`Self::poll_events`].
    pub fn events_fd(&self) -> BorrowedFd<'_> {
        self.inotify.as_fd()
    }

    /// The caller's reactor says [`Self::events_fd`] is not readable: the next tick leaves the
    /// inotify queue unread (at 100 Hz with nothing happening, one empty `read` a tick), and
    /// does the rest of what it does with events as always. Honoured only when the last read
    /// emptied the queue (after a failed one, the tick reads whatever the reactor says), and
    /// dropped by any read before that tick ([`Self::poll_events`]): to be said just before it.
    pub fn skip_next_event_read(&mut self) {
        self.skip_event_read = true;
    }

    /// [`TrackerConfig::read_memory`], changed at a reload: from the next tick, for every run
    /// (settled ones too, which ticks otherwise skip). Each run's `memory.current` is opened
    /// now (within the descriptor budget), or closed when it is no longer read.
    pub fn set_read_memory(&mut self, on: bool) {
        if on == self.read_memory {
            return;
        }
        self.read_memory = on;
        let mut failed = Vec::new();
        for run in self.runs.values_mut() {
            if !on {
                if run.memory.take().is_some_and(|m| m.is_kept()) {
                    run.kept_fds = run.kept_fds.saturating_sub(1);
                    self.kept_fds = self.kept_fds.saturating_sub(1);
                }
                continue;
            }
            run.settled = false;
            if run.finished {
                continue;
            }
            match runs::open_memory(
                &self.cgroup_root,
                &run.cgroup_rel,
                self.kept_fds < self.fd_budget,
            ) {
                Ok(m) => {
                    if m.as_ref().is_some_and(Source::is_kept) {
                        run.kept_fds += 1;
                        self.kept_fds += 1;
                    }
                    run.memory = m.map(Box::new);
                }
                // Gone: the next tick finds out and finishes it.
                Err(e) if e.is_gone() => {}
                Err(e) => failed.push((run.id.clone(), e)),
            }
        }
        for (id, e) in failed {
            self.push_error(Some(&id), e);
        }
    }

    /// Re-reads the trace's counts when due (see `trace_counts`).
    fn refresh_trace_counts(&mut self) {
        let Some(t) = &self.trace else {
            return;
        };
        let now = self.now_us();
        // 900 ms, not a second: at 1 Hz a tick a little early must not skip a refresh.
        if self
            .trace_counts_at_us
            .map_or(true, |at| now.saturating_sub(at) >= 900_000)
        {
            if let Ok(c) = t.counts() {
                self.trace_counts = Some(c);
                self.trace_counts_at_us = Some(now);
            }
        }
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }
}

/// The parent of a cgroup path relative to the cgroup root; `None` at the top level (the
/// parent is the root itself).
fn parent_rel(rel: &str) -> Option<&str> {
    rel.rsplit_once('/')
        .map(|(p, _)| p)
        .filter(|p| !p.is_empty())
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

#[cfg(test)]
mod tests {
    use super::usage::scale_tail;
    use super::*;

    /// The full rescan comes by time, whatever the tick rate: none in a hundred quick ticks
    /// when it is due in an hour, one at every tick when it is always due, and one at the first
    /// tick after its period.
    #[test]
    fn the_rescan_is_due_by_time_not_by_ticks() {
        let dir = tempfile::tempdir().unwrap();
        let h = crate::synth::HostTree::new(dir.path());
        h.cgroup2_host(2, 1).unwrap();
        h.write("sys/fs/cgroup/flowzart.slice/cpu.stat", "usage_usec 1\n")
            .unwrap();
        let tracker = |every| {
            RunTracker::new(TrackerConfig {
                rescan_every: every,
                ..TrackerConfig::new(HostRoot::new(dir.path()))
            })
            .unwrap()
        };
        let rescans = |t: &mut RunTracker, n: usize| {
            (0..n)
                .map(|_| t.tick(10_000).counters.rescans)
                .last()
                .unwrap_or(0)
        };
        assert_eq!(
            rescans(&mut tracker(Some(Duration::from_secs(3600))), 100),
            0
        );
        assert_eq!(rescans(&mut tracker(None), 100), 0);
        assert_eq!(rescans(&mut tracker(Some(Duration::ZERO)), 5), 5);
        let mut t = tracker(Some(Duration::from_millis(20)));
        let first = rescans(&mut t, 1);
        std::thread::sleep(Duration::from_millis(30));
        assert!(rescans(&mut t, 1) > first);
    }

    /// A synthetic host with `flowzart.slice` holding no process and nothing else, its usage
    /// 100 us; and that parent's path in the tree.
    fn host_with_parent(dir: &Path) -> (crate::synth::HostTree, &'static str) {
        let h = crate::synth::HostTree::new(dir);
        h.cgroup2_host(2, 1).unwrap();
        let cg = "sys/fs/cgroup/flowzart.slice";
        h.write(format!("{cg}/cpu.stat"), "usage_usec 100\n")
            .unwrap();
        h.write(format!("{cg}/cgroup.procs"), "").unwrap();
        (h, cg)
    }

    /// A tracker of `dir`'s host with no rescan, a quiet family's points `quiet_every` apart.
    fn tracker_quiet_every(dir: &Path, quiet_every: Duration) -> RunTracker {
        RunTracker::new(TrackerConfig {
            rescan_every: None,
            quiet_point_every: quiet_every,
            ..TrackerConfig::new(HostRoot::new(dir))
        })
        .unwrap()
    }

    /// A parent's children that no event announced are found by listing it at a point, from
    /// the kept directory (rewound each time) or, with no descriptor to spare, opened then.
    #[test]
    fn a_parent_is_listed_at_every_point_kept_open_or_not() {
        for budget in [None, Some(0)] {
            let dir = tempfile::tempdir().unwrap();
            let (h, cg) = host_with_parent(dir.path());
            let put = |rel: String, text: &str| h.write(rel, text).unwrap();
            // Listed at every listing, and never a child.
            put(format!("{cg}/not-a-directory"), "");
            put(format!("{cg}/run-a.scope/cpu.stat"), "usage_usec 5\n");
            put(format!("{cg}/run-a.scope/cgroup.events"), "populated 1\n");
            let mut t = RunTracker::new(TrackerConfig {
                rescan_every: None,
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

    /// A family with nothing to settle (no child, no claim) gets its points at most
    /// `quiet_point_every` apart, not at every tick (with 0: at every tick); the parent's growth
    /// meanwhile is all in the next point; a child makes its family's points come at every
    /// tick again.
    #[test]
    fn a_quiet_familys_point_comes_by_time_and_a_childs_at_every_tick() {
        let dir = tempfile::tempdir().unwrap();
        let (h, cg) = host_with_parent(dir.path());
        let put = |rel: String, text: &str| h.write(rel, text).unwrap();
        let tracker = |every| tracker_quiet_every(dir.path(), every);
        let points = |t: &mut RunTracker, n: usize| {
            for _ in 0..n {
                t.tick(10_000);
            }
            t.counters().reconcile_points
        };
        let mut t = tracker(Duration::ZERO);
        let first = points(&mut t, 1);
        assert_eq!(points(&mut t, 10), first + 10, "0: a point at every tick");

        // A second: twenty quick ticks fit in it however slow this machine is at the time.
        let mut t = tracker(Duration::from_secs(1));
        let first = points(&mut t, 1);
        let fam = "flowzart.slice";
        assert!(t.families[fam].is_quiet(), "{:?}", t.families[fam]);
        // The parent grows (a child made and gone unseen, say) while its points are not due:
        // nothing read.
        put(format!("{cg}/cpu.stat"), "usage_usec 600\n");
        assert_eq!(
            points(&mut t, 20),
            first,
            "quiet: no point before it is due"
        );
        assert_eq!(t.counters().unclaimed_us, 0);
        std::thread::sleep(Duration::from_millis(1_000));
        assert_eq!(points(&mut t, 1), first + 1, "due: one point");
        assert_eq!(t.counters().unclaimed_us, 500, "the whole stretch's growth");
        assert_eq!(points(&mut t, 5), first + 1);
        // Ticks on a grid a `quiet_point_every` apart (as the daemon's clock is): a point at
        // every one, though each point's time is read a little after its tick's.
        let mut t = tracker(Duration::from_millis(200));
        let first = points(&mut t, 1);
        let start = Instant::now();
        for k in 1..=5u32 {
            if let Some(wait) =
                (start + Duration::from_millis(200) * k).checked_duration_since(Instant::now())
            {
                std::thread::sleep(wait);
            }
            t.tick(200_000);
            assert_eq!(
                t.counters().reconcile_points,
                first + u64::from(k),
                "tick {k}"
            );
        }
        // A run appears: its family is no longer quiet, a point at every tick.
        put(format!("{cg}/run-a.scope/cpu.stat"), "usage_usec 5\n");
        put(format!("{cg}/run-a.scope/cgroup.events"), "populated 1\n");
        t.poll_events().unwrap();
        assert!(t.runs.contains_key("a"));
        assert!(!t.families[fam].is_quiet());
        let before = t.counters().reconcile_points;
        assert_eq!(points(&mut t, 10), before + 10);
    }

    /// A caller's word that the events descriptor is not readable skips one tick's read of the
    /// inotify queue, once, only after a read that emptied the queue, and not after a read since
    /// the word: a run made meanwhile is found by the next tick that reads it (no point lists the
    /// parent here: they are an hour apart).
    #[test]
    fn a_skipped_event_read_leaves_the_queue_to_the_next_tick() {
        let dir = tempfile::tempdir().unwrap();
        let (h, cg) = host_with_parent(dir.path());
        let put = |rel: String, text: &str| h.write(rel, text).unwrap();
        let mut t = tracker_quiet_every(dir.path(), Duration::from_secs(3_600));
        let runs = |t: &mut RunTracker| -> Vec<String> {
            let snap = t.tick(10_000);
            snap.runs.iter().map(|r| r.run_id.to_string()).collect()
        };
        // No read yet: the word is not taken, the tick reads.
        put(format!("{cg}/run-a.scope/cpu.stat"), "usage_usec 5\n");
        put(format!("{cg}/run-a.scope/cgroup.events"), "populated 1\n");
        t.skip_next_event_read();
        assert_eq!(
            runs(&mut t),
            ["a"],
            "read before any read emptied the queue"
        );
        // Emptied now: the next tick with the word leaves a new run's event in the queue.
        put(format!("{cg}/run-b.scope/cpu.stat"), "usage_usec 7\n");
        put(format!("{cg}/run-b.scope/cgroup.events"), "populated 1\n");
        t.skip_next_event_read();
        assert_eq!(runs(&mut t), ["a"], "the queue left unread");
        assert_eq!(runs(&mut t), ["a", "b"], "read at the next tick");
        // A read between the word and the tick drops the word: what came after that read is
        // read by the tick.
        t.skip_next_event_read();
        t.poll_events().unwrap();
        put(format!("{cg}/run-c.scope/cpu.stat"), "usage_usec 9\n");
        put(format!("{cg}/run-c.scope/cgroup.events"), "populated 1\n");
        assert_eq!(
            runs(&mut t),
            ["a", "b", "c"],
            "a word older than a read is not kept"
        );
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
    fn split_exact_by_sorting(total: u64, weights: &[(u32, u64)]) -> BTreeMap<u32, u64> {
        let sum: u128 = weights.iter().map(|&(_, w)| u128::from(w)).sum();
        if sum == 0 || weights.is_empty() {
            return split(total, weights).iter().copied().collect();
        }
        let mut out = BTreeMap::new();
        let mut given: u64 = 0;
        let mut rems: Vec<(u128, u32)> = Vec::new();
        for &(p, w) in weights {
            let num = u128::from(total) * u128::from(w);
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
            weights in proptest::collection::vec((0u32..6, 0u64..5_000), 0..9),
            wide in proptest::bool::ANY,
        ) {
            // Past 64 weights the flags take over from the bits.
            let weights: Vec<(u32, u64)> = if wide {
                (0..70u32).map(|p| (p, u64::from(p % 7) + 1)).collect()
            } else {
                weights
            };
            let got: BTreeMap<u32, u64> = split(total, &weights).iter().copied().collect();
            // Exact whatever the weights: a package named twice (never so from the tracker)
            // gets the sum of its parts, where the first version kept the last part only.
            proptest::prop_assert_eq!(got.values().map(|&v| u128::from(v)).sum::<u128>(), u128::from(total));
            if weights.iter().map(|w| w.0).collect::<BTreeSet<_>>().len() == weights.len() {
                proptest::prop_assert_eq!(&got, &split_exact_by_sorting(total, &weights));
            }
        }
    }

    fn split(total: u64, weights: &[(u32, u64)]) -> PackageShares {
        split_exact(total, weights, &mut PackageSplitScratch::default())
    }

    #[test]
    fn split_exact_conserves() {
        let w = [(0u32, 1u64), (1, 1), (2, 1)];
        let s = split(100, &w);
        assert_eq!(s.values().sum::<u64>(), 100);
        assert_eq!(s.get(0), Some(34));
        assert_eq!(s.get(1), Some(33));
        let s = split(7, &[(0, 0), (1, 0)]);
        assert_eq!(s, PackageShares::from([(0, 7)]));
        let s = split(u64::MAX, &[(0, u64::MAX), (1, 3)]);
        assert_eq!(s.values().fold(0u64, |a, b| a.wrapping_add(b)), u64::MAX);
        // Weights in any package order: the shares come out in package order.
        let s = split(10, &[(5, 1), (2, 1)]);
        assert_eq!(s, PackageShares::from([(2, 5), (5, 5)]));
        for total in [0u64, 1, 2, 999, 1_000_003] {
            let s = split(total, &[(3, 7), (5, 11), (9, 13)]);
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
