//! Shared fixtures: intervals that conserve energy, sealers over temp dirs.

use std::path::Path;

use wattd::identity::NodeKey;
use wattd::sealer::{SealPolicy, Sealer};
use wattd::spool::{Spool, SpoolConfig};
use wattd_proto::v1::{
    Allocation, DomainEnergy, Interval, Quality, Unattributed, UnattributedReason,
};

pub type TestResult = Result<(), Box<dyn std::error::Error>>;

pub const NODE: &str = "node-a";

/// An interval whose single package domain conserves energy exactly.
pub fn interval(index: u64, runs: usize) -> Interval {
    let allocations: Vec<Allocation> = (0..runs)
        .map(|r| Allocation {
            run_id: format!("run-{r}"),
            active_uj: 1_000 + r as u64,
            idle_uj: 10,
            usage_us: 500,
        })
        .collect();
    let allocated: u64 = allocations.iter().map(|a| a.active_uj + a.idle_uj).sum();
    let (host_active_uj, host_idle_uj, unattributed_uj) = (5, 7, 3);
    Interval {
        index,
        start_monotonic_ns: index * 1_000_000_000,
        end_monotonic_ns: (index + 1) * 1_000_000_000,
        start_unix_ns: 1_700_000_000_000_000_000 + index as i64 * 1_000_000_000,
        end_unix_ns: 1_700_000_001_000_000_000 + index as i64 * 1_000_000_000,
        wall_clock_jump_ns: 0,
        policy: "proportional".into(),
        policy_version: 1,
        domains: vec![DomainEnergy {
            domain: "package".into(),
            package: Some(0),
            source: "powercap".into(),
            quality: Quality::Measured.into(),
            measured_uj: allocated + host_active_uj + host_idle_uj + unattributed_uj,
            idle_source: "config".into(),
            idle_power_uw: 20_000_000,
            allocations,
            host_active_uj,
            host_idle_uj,
            unattributed: vec![Unattributed {
                reason: UnattributedReason::NoUsageData.into(),
                energy_uj: unattributed_uj,
            }],
            ..Default::default()
        }],
        gaps: vec![],
        coarsened: false,
        boot_id: "boot".into(),
        ..Default::default()
    }
}

/// A spool config with small segments that frees acknowledged segments at once (no
/// retention: the tests of retention set it themselves).
pub fn config(dir: &Path, max_segment_bytes: u64) -> SpoolConfig {
    let mut cfg = SpoolConfig::new(dir, NODE).without_retention();
    cfg.max_segment_bytes = max_segment_bytes;
    cfg
}

pub fn test_key() -> NodeKey {
    NodeKey::from_seed(NODE, 1, [42; 32])
}

/// A sealer with a fixed key (so runs are reproducible) over a spool in `dir`.
pub fn sealer(
    cfg: SpoolConfig,
    max_intervals: usize,
) -> Result<Sealer, Box<dyn std::error::Error>> {
    let dir = cfg.dir.clone();
    let (spool, _) = Spool::open(cfg)?;
    let policy = SealPolicy::new(max_intervals, std::time::Duration::from_secs(10))?;
    Ok(Sealer::with_parts(dir, test_key(), spool, policy))
}

/// Seals `batches` batches of `per_batch` intervals with `runs` runs each, committing each.
pub fn fill(
    s: &mut Sealer,
    next_index: &mut u64,
    batches: usize,
    per_batch: usize,
    runs: usize,
) -> TestResult {
    for _ in 0..batches {
        for _ in 0..per_batch {
            s.push_interval(interval(*next_index, runs), *next_index)?;
            *next_index += 1;
        }
        s.seal(0)?;
        s.commit()?;
    }
    Ok(())
}
