//! The one error type of `wattd-collectors`: every way host input can be missing, unreadable or
//! malformed, each naming the path it came from.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// A value shown in an error message: escaped and cut to a bounded length, because it came from
/// the host and may be hostile (newlines, control bytes, megabytes).
#[derive(Clone, PartialEq, Eq)]
pub struct Shown(String);

impl Shown {
    const CHARS_MAX: usize = 64;

    pub fn new(raw: &str) -> Self {
        let mut s: String = raw.chars().take(Self::CHARS_MAX).collect();
        if raw.chars().count() > Self::CHARS_MAX {
            s.push('…');
        }
        Shown(s)
    }
}

impl fmt::Debug for Shown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl fmt::Display for Shown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// Everything that can go wrong while reading the host. Each variant names the path.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("{}: not found", path.display())]
    NotFound { path: PathBuf },
    #[error("{}: permission denied ({hint})", path.display())]
    PermissionDenied { path: PathBuf, hint: &'static str },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: empty", path.display())]
    Empty { path: PathBuf },
    #[error("{}: larger than {limit} bytes", path.display())]
    TooBig { path: PathBuf, limit: usize },
    #[error("{}: value {value} is not a non-negative integer", path.display())]
    NotNumeric { path: PathBuf, value: Shown },
    #[error("{}: value {value} is negative", path.display())]
    Negative { path: PathBuf, value: Shown },
    #[error("{}: value {value} does not fit in 64 bits", path.display())]
    TooLarge { path: PathBuf, value: Shown },
    #[error("{}: energy {energy_uj} uJ is above max_energy_range_uj {range_uj}", path.display())]
    AboveRange {
        path: PathBuf,
        energy_uj: u64,
        range_uj: u64,
    },
    #[error("{}: max_energy_range_uj is 0, so wraps cannot be corrected", path.display())]
    ZeroRange { path: PathBuf },
    #[error("{}: {what}", path.display())]
    Malformed { path: PathBuf, what: String },
    #[error("{}: no cgroup2 mount listed (set host.cgroup_root to name one)", path.display())]
    NoCgroup2Mount { path: PathBuf },
    #[error("{}: path is {len} bytes, over the limit of {limit}", path.display())]
    PathTooLong {
        path: PathBuf,
        len: usize,
        limit: usize,
    },
    #[error("{field} {value} rejected: {what}")]
    BadRunRef {
        field: &'static str,
        value: Shown,
        what: &'static str,
    },
    #[error("run {run_id} is not tracked")]
    UnknownRun { run_id: Shown },
    #[error("run {run_id}: {what}")]
    RunConflict { run_id: Shown, what: String },
    #[error("{} {call} on GPU {gpu}: {error}", crate::nvml::GpuVendor::of_index(*gpu).library())]
    Nvml {
        call: &'static str,
        gpu: u32,
        error: crate::nvml::NvmlError,
    },
    #[error("GPU {gpu}: the index now holds {now} (was {was}); its counter is re-baselined")]
    GpuReplaced { gpu: u32, was: Shown, now: Shown },
}

/// The hint given with a permission error on an energy counter.
pub const HINT_ENERGY_UJ: &str = "energy_uj is root-only since CVE-2020-8694: run as root or \
     grant CAP_DAC_READ_SEARCH (systemd: AmbientCapabilities=CAP_DAC_READ_SEARCH)";
/// The hint given with a permission error on an MSR device.
pub const HINT_MSR: &str = "reading /dev/cpu/N/msr needs CAP_SYS_RAWIO and the msr module \
     (modprobe msr)";
/// The hint given with a permission error on a perf event.
pub const HINT_PERF: &str = "the perf power PMU needs CAP_PERFMON (or CAP_SYS_ADMIN), or \
     kernel.perf_event_paranoid <= 0";
/// Generic hint.
pub const HINT_GENERIC: &str = "wattd lacks read access to this file";

impl HostError {
    /// Wraps an IO error, classifying the kinds a probe reports specially.
    pub fn io(path: &Path, source: io::Error, hint: &'static str) -> Self {
        match source.kind() {
            io::ErrorKind::NotFound => HostError::NotFound {
                path: path.to_owned(),
            },
            io::ErrorKind::PermissionDenied => HostError::PermissionDenied {
                path: path.to_owned(),
                hint,
            },
            _ => HostError::Io {
                path: path.to_owned(),
                source,
            },
        }
    }

    pub fn malformed(path: &Path, what: impl Into<String>) -> Self {
        HostError::Malformed {
            path: path.to_owned(),
            what: what.into(),
        }
    }

    /// True when the error says the thing is simply absent (module not loaded, no such zone).
    pub fn is_not_found(&self) -> bool {
        matches!(self, HostError::NotFound { .. })
    }

    pub fn is_permission(&self) -> bool {
        matches!(self, HostError::PermissionDenied { .. })
    }

    /// True when the file's object is gone: not found, or a kernfs file (cgroupfs, sysfs) whose
    /// node was removed while we held it open, which the kernel reports as ENODEV.
    pub fn is_gone(&self) -> bool {
        match self {
            HostError::NotFound { .. } => true,
            HostError::Io { source, .. } => source.raw_os_error() == Some(libc::ENODEV),
            _ => false,
        }
    }
}
