//! `[attribution]` and `[calibration]` of the configuration, validated from the raw file beside
//! the attribution that uses them. The defaults here are the only ones.

use std::collections::BTreeMap;

use wattd_collectors::Domain;

use super::{DramPolicy, IdleEstimate, IdlePolicy, IdleSource, PlatformPolicy, Policy};
use crate::schema::raw::{self, Field};
use crate::schema::Validator;

/// The keys of `[attribution]` and `[calibration]` that take effect at a restart (the three
/// policies are reloadable, and go to [`Policy`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttributionSection {
    /// `[attribution] idle_window_s`: the window of the measured idle floor.
    pub idle_window_s: u64,
    /// Declared idle power per domain, with its origin (`[attribution] idle_watts_*` is config;
    /// `[calibration]` is what `wattd calibrate` measured; config wins where both are given).
    pub idle_declared: BTreeMap<Domain, IdleEstimate>,
}

impl Default for AttributionSection {
    fn default() -> Self {
        AttributionSection {
            idle_window_s: 600,
            idle_declared: BTreeMap::new(),
        }
    }
}

impl Policy {
    /// The policies by default: idle in proportion, DRAM by CPU time, the platform in
    /// proportion.
    pub const DEFAULT: Policy = Policy {
        idle: IdlePolicy::Proportional,
        dram: DramPolicy::Cpu,
        platform: PlatformPolicy::Proportional,
    };
}

/// The most a declared idle power can be, per domain (watts).
const PACKAGE_MAX_W: f64 = 5_000.0;
const DRAM_MAX_W: f64 = 2_000.0;
const PSYS_MAX_W: f64 = 20_000.0;

impl AttributionSection {
    /// The given keys of both sections over the defaults; the policies into `policy`.
    pub fn read(
        attribution: Option<&raw::Attribution>,
        calibration: Option<&raw::Calibration>,
        v: &mut Validator<'_>,
        policy: &mut Policy,
    ) -> Self {
        let mut s = AttributionSection::default();
        if let Some(a) = attribution {
            let platform = [
                ("proportional", PlatformPolicy::Proportional),
                ("host", PlatformPolicy::Host),
            ];
            if let Some(p) = v.choice(&a.platform_policy, "attribution.platform_policy", &platform)
            {
                policy.platform = p;
            }
            let idle = [
                ("proportional", IdlePolicy::Proportional),
                ("reserved", IdlePolicy::Reserved),
                ("host", IdlePolicy::Host),
            ];
            if let Some(p) = v.choice(&a.idle_policy, "attribution.idle_policy", &idle) {
                policy.idle = p;
            }
            let dram = [("cpu", DramPolicy::Cpu), ("memory", DramPolicy::Memory)];
            if let Some(p) = v.choice(&a.dram_policy, "attribution.dram_policy", &dram) {
                policy.dram = p;
            }
            if let Some(w) = v.int(&a.idle_window_s, "attribution.idle_window_s", 1, 86_400) {
                s.idle_window_s = w;
            }
            let watts = [
                (
                    &a.idle_watts_package,
                    "package",
                    Domain::Package,
                    PACKAGE_MAX_W,
                ),
                (&a.idle_watts_dram, "dram", Domain::Dram, DRAM_MAX_W),
                (&a.idle_watts_psys, "psys", Domain::Psys, PSYS_MAX_W),
                (&a.idle_watts_gpu, "gpu", Domain::Gpu, 10_000.0),
            ];
            declared(
                v,
                "attribution",
                &watts,
                IdleSource::Config,
                &mut s.idle_declared,
            );
        }
        if let Some(c) = calibration {
            let watts = [
                (
                    &c.idle_watts_package,
                    "package",
                    Domain::Package,
                    PACKAGE_MAX_W,
                ),
                (&c.idle_watts_dram, "dram", Domain::Dram, DRAM_MAX_W),
                (&c.idle_watts_psys, "psys", Domain::Psys, PSYS_MAX_W),
            ];
            declared(
                v,
                "calibration",
                &watts,
                IdleSource::Calibration,
                &mut s.idle_declared,
            );
        }
        s
    }
}

/// `idle_watts_<suffix>`: the key, its domain and the most it can be.
type Declared<'r> = (&'r Field<f64>, &'static str, Domain, f64);

fn declared(
    v: &mut Validator<'_>,
    section: &str,
    watts: &[Declared<'_>],
    source: IdleSource,
    out: &mut BTreeMap<Domain, IdleEstimate>,
) {
    for &(field, suffix, domain, max) in watts {
        let key = format!("{section}.idle_watts_{suffix}");
        if let Some(w) = v.float(field, &key, 0.0, max) {
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
