//! Per-run running totals across intervals and the summary emitted when a run finishes.

use std::collections::BTreeMap;

use serde::Serialize;
use wattd_collectors::{Domain, Quality};

use super::MeterResult;

/// What one run consumed so far.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RunTotal {
    pub run_id: String,
    /// Per domain: active + idle microjoules.
    pub energy_uj: BTreeMap<Domain, u64>,
    pub first_interval: u64,
    pub last_interval: u64,
    /// True when any of it came from the estimator.
    pub estimated: bool,
}

/// Running totals of every live run.
#[derive(Clone, Debug, Default)]
pub struct Totals {
    runs: BTreeMap<String, RunTotal>,
}

impl Totals {
    /// Adds one interval's results.
    pub fn add(&mut self, interval: u64, results: &[MeterResult]) {
        for m in results {
            for (id, share) in m.shares() {
                // Looked up by &str first: a run's id is copied once, when it first appears.
                if !self.runs.contains_key(&**id) {
                    self.runs.insert(
                        id.to_string(),
                        RunTotal {
                            run_id: id.to_string(),
                            first_interval: interval,
                            ..RunTotal::default()
                        },
                    );
                }
                let Some(t) = self.runs.get_mut(&**id) else {
                    continue;
                };
                *t.energy_uj.entry(m.key.domain).or_default() += share.active_uj + share.idle_uj;
                t.last_interval = interval;
                t.estimated |= m.quality == Quality::Estimated;
            }
        }
    }

    /// Removes a finished run and returns its summary (a run that never appeared in an interval
    /// gets an empty one, so its finish is still on record).
    pub fn finish(&mut self, run_id: &str, interval: u64) -> RunTotal {
        self.runs.remove(run_id).unwrap_or_else(|| RunTotal {
            run_id: run_id.to_owned(),
            first_interval: interval,
            last_interval: interval,
            ..RunTotal::default()
        })
    }
}
