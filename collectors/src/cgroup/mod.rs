//! Runs and their usage on cgroup v2: where the cgroup2 mount is, which cgroups are runs
//! (patterns over cgroup paths, control-plane announcements), and how much CPU each used per
//! package per tick, read through kept-open descriptors. IO only: what the usage is worth is
//! the agent's attribution's business.
//!
//! Invariant: a run's per-package usage sums exactly to its `cpu.stat` delta; a run is reported
//! with `finished` exactly once and then forgotten; nothing here panics on host input.

pub mod family;
pub mod files;
pub mod inotify;
pub mod mount;
pub mod pattern;
pub mod perf;
pub mod trace;
pub mod tracker;

pub use family::{share_residual, FinalUsage};
pub use mount::{find_cgroup2_mount, parse_mountinfo, Cgroup2Mount};
pub use pattern::{validate_cgroup_rel, validate_run_id, NameMatch, RunPattern};
pub use tracker::{
    raise_nofile_limit, split_exact, validate_labels, BilledFrom, Labels, PackageUsage, RunOrigin,
    RunTracker, RunUsage, SplitSource, StartOutcome, TickError, TrackerConfig, TrackerCounters,
    UsageSnapshot, DEFAULT_PERF_COUNTERS_MAX,
};
