//! The one counter-difference type every energy source uses: first reading, plain difference,
//! wrap corrected with the source's own range, reset detected, and a physical ceiling above which
//! a delta is quarantined. Exact unit conversion without drift: cumulative raw units are
//! converted to cumulative microjoules, and deltas are taken of the converted totals.

use serde::Serialize;

/// What one raw counter unit is worth.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "value")]
pub enum EnergyUnit {
    /// One unit is one microjoule (powercap `energy_uj`, the estimator).
    MicroJoule,
    /// One unit is one millijoule (NVML total energy consumption).
    MilliJoule,
    /// One unit is 2^-k joules (RAPL MSR energy status units, the perf power PMU's 2^-32 J scale).
    PowTwoJoule(u8),
    /// One unit is this many joules, a scale that is not a power of two (perf `.scale` files on
    /// unusual PMUs). Converted in f64; exact up to 2^53 uJ.
    Joule(f64),
}

impl EnergyUnit {
    /// Converts a cumulative raw count to cumulative microjoules, rounding down.
    pub fn total_uj(self, raw_total: u128) -> u128 {
        match self {
            EnergyUnit::MicroJoule => raw_total,
            EnergyUnit::MilliJoule => raw_total.saturating_mul(1_000),
            EnergyUnit::PowTwoJoule(k) => (raw_total * 1_000_000) >> k,
            EnergyUnit::Joule(scale) => (raw_total as f64 * scale * 1e6).floor() as u128,
        }
    }

    /// Recognises the perf `.scale` form: `2.3283064365386962890625e-10` is exactly 2^-32 J.
    pub fn from_joule_scale(scale: f64) -> Self {
        for k in 0u8..=63 {
            if scale == (-(k as f64)).exp2() {
                return EnergyUnit::PowTwoJoule(k);
            }
        }
        EnergyUnit::Joule(scale)
    }
}

/// What one update of a counter yielded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum CounterSample {
    /// The first reading: a baseline, no energy yet.
    First,
    /// Energy consumed since the previous reading; `wrapped` when the counter wrapped once.
    Energy { energy_uj: u64, wrapped: bool },
    /// The counter went backwards by more than a plausible wrap: reset (driver reload, CPU
    /// hot-plug, reboot of a virtual counter). The energy since the previous reading is unknown
    /// and must be recorded as a gap. The new reading is the new baseline.
    Reset { previous_raw: u64, raw: u64 },
    /// A delta larger than the domain can physically consume in the elapsed time. Not billed;
    /// recorded as quarantined with its value so nothing disappears silently.
    Quarantined { energy_uj: u64, ceiling_uj: u64 },
}

/// A raw value outside what the source can produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("raw counter value {raw} is not below the counter's modulus {modulus}")]
pub struct OutOfRange {
    pub raw: u64,
    pub modulus: u64,
}

/// Per-domain, per-zone state: the last raw reading, cumulative totals, the range and ceiling.
#[derive(Clone, Debug)]
pub struct EnergyCounter {
    /// The counter counts modulo this many units; `None` for a 64-bit counter that never wraps.
    modulus: Option<u64>,
    unit: EnergyUnit,
    /// Physical ceiling: max plausible power of the domain, microwatts, safety factor included.
    ceiling_uw: u64,
    last_raw: Option<u64>,
    raw_total: u128,
    /// The last update was a `Reset`: its raw value is a baseline nobody vouched for.
    after_reset: bool,
}

/// The smallest elapsed time used to compute a ceiling, so a zero-length interval cannot make
/// every delta suspicious.
const MIN_CEILING_ELAPSED_US: u64 = 1_000;

impl EnergyCounter {
    /// `modulus`: number of distinct raw values (powercap: `max_energy_range_uj + 1`; MSR: 2^32);
    /// `ceiling_uw`: the most the domain can draw, safety factor included.
    pub fn new(modulus: Option<u64>, unit: EnergyUnit, ceiling_uw: u64) -> Self {
        EnergyCounter {
            modulus,
            unit,
            ceiling_uw,
            last_raw: None,
            raw_total: 0,
            after_reset: false,
        }
    }

    /// What one raw count is worth.
    pub fn unit(&self) -> EnergyUnit {
        self.unit
    }

    /// Starts over counting in `unit` (a source whose unit changed: AMD SMI gives it with every
    /// reading): everything before is forgotten and the next reading is a baseline (`First`).
    pub fn restart_in(&mut self, unit: EnergyUnit) {
        *self = EnergyCounter::new(self.modulus, unit, self.ceiling_uw);
    }

    /// The most energy the domain can consume in `elapsed_us`.
    pub fn ceiling_uj(&self, elapsed_us: u64) -> u64 {
        let e = elapsed_us.max(MIN_CEILING_ELAPSED_US) as u128;
        u64::try_from(self.ceiling_uw as u128 * e / 1_000_000).unwrap_or(u64::MAX)
    }

    /// Forgets the last reading after a failed read: the next good reading is a new baseline
    /// (`First`), so the energy of the failed interval, which is recorded as a gap, is never
    /// also counted in the next one.
    pub fn invalidate(&mut self) {
        self.last_raw = None;
    }

    /// Feeds one raw reading taken `elapsed_us` after the previous one.
    pub fn update(&mut self, raw: u64, elapsed_us: u64) -> Result<CounterSample, OutOfRange> {
        if let Some(m) = self.modulus {
            if raw >= m {
                return Err(OutOfRange { raw, modulus: m });
            }
        }
        let Some(last) = self.last_raw.replace(raw) else {
            self.after_reset = false;
            return Ok(CounterSample::First);
        };
        let after_reset = std::mem::take(&mut self.after_reset);
        let (delta_raw, wrapped) = if raw >= last {
            (raw - last, false)
        } else {
            match self.modulus {
                Some(m) => (m - last + raw, true),
                None => {
                    self.after_reset = true;
                    return Ok(CounterSample::Reset {
                        previous_raw: last,
                        raw,
                    });
                }
            }
        };
        let before = self.unit.total_uj(self.raw_total);
        let after = self.unit.total_uj(self.raw_total + delta_raw as u128);
        let energy_uj = u64::try_from(after - before).unwrap_or(u64::MAX);
        let ceiling_uj = self.ceiling_uj(elapsed_us);
        if energy_uj > ceiling_uj {
            if wrapped || after_reset {
                // A decrease whose wrap-corrected delta is impossible: it was a reset. And an
                // impossible rise right after a reset means the low reading was the glitch (a
                // counter read as 0 once): the rise is the energy counted before it, already
                // measured, so it is another reset, never energy (not even quarantined).
                self.after_reset = true;
                return Ok(CounterSample::Reset {
                    previous_raw: last,
                    raw,
                });
            }
            self.raw_total += delta_raw as u128;
            return Ok(CounterSample::Quarantined {
                energy_uj,
                ceiling_uj,
            });
        }
        self.raw_total += delta_raw as u128;
        Ok(CounterSample::Energy { energy_uj, wrapped })
    }
}

/// Power integrated over time, where a source has no energy counter (NVML without the
/// total-energy counter, power-only hwmon sensors): trapezoids between readings, accumulated in
/// half-picojoules (uW x us is pJ; the trapezoid's halving is deferred) so nothing is rounded
/// until a whole microjoule is handed out; the remainder carries over. Always an estimate.
#[derive(Clone, Debug)]
pub struct PowerIntegrator {
    /// The last reading: monotonic microseconds and microwatts.
    pub(crate) last: Option<(u64, u64)>,
    pub(crate) acc_half_pj: u128,
    /// A close has taken the baseline: the next close yields energy.
    pub(crate) based: bool,
    ceiling_uw: u64,
}

impl PowerIntegrator {
    /// `ceiling_uw`: the most the meter can draw, safety factor included (above it a close is
    /// quarantined).
    pub fn new(ceiling_uw: u64) -> Self {
        PowerIntegrator {
            last: None,
            acc_half_pj: 0,
            based: false,
            ceiling_uw,
        }
    }

    /// Adds a reading of `uw` microwatts taken at `now_us`.
    pub fn add_uw(&mut self, now_us: u64, uw: u64) {
        if let Some((t0, p0)) = self.last {
            let dt = now_us.saturating_sub(t0) as u128;
            self.acc_half_pj += (p0 as u128 + uw as u128) * dt;
        }
        self.last = Some((now_us, uw));
    }

    /// Adds a reading in milliwatts (NVML's unit).
    pub fn add_mw(&mut self, now_us: u64, mw: u32) {
        self.add_uw(now_us, u64::from(mw) * 1_000);
    }

    /// Forgets everything after a failed reading: the integration restarts at the next one,
    /// and the close after it is a baseline again.
    pub fn invalidate(&mut self) {
        self.last = None;
        self.acc_half_pj = 0;
        self.based = false;
    }

    /// Whether there is a last reading to integrate from.
    pub fn has_reading(&self) -> bool {
        self.last.is_some()
    }

    /// Hands out the whole microjoules integrated since the previous close (the first close is
    /// the baseline), quarantined above the ceiling for `elapsed_us`.
    pub fn close(&mut self, elapsed_us: u64) -> CounterSample {
        if !self.based {
            self.based = true;
            self.acc_half_pj = 0;
            return CounterSample::First;
        }
        let uj = self.acc_half_pj / 2_000_000;
        self.acc_half_pj %= 2_000_000;
        let energy_uj = u64::try_from(uj).unwrap_or(u64::MAX);
        let ceiling_uj =
            u64::try_from(self.ceiling_uw as u128 * elapsed_us.max(1_000) as u128 / 1_000_000)
                .unwrap_or(u64::MAX);
        if energy_uj > ceiling_uj {
            CounterSample::Quarantined {
                energy_uj,
                ceiling_uj,
            }
        } else {
            CounterSample::Energy {
                energy_uj,
                wrapped: false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const W: u64 = 1_000_000; // one watt in uW

    #[test]
    fn a_glitch_to_zero_and_back_is_two_resets_not_quarantined_energy() {
        // NVML-like: a 64-bit mJ counter, read as 0 once.
        let mut c = EnergyCounter::new(None, EnergyUnit::MicroJoule, 1000 * W);
        c.update(5_000_000_000, 1_000_000).unwrap();
        assert!(matches!(
            c.update(0, 1_000_000),
            Ok(CounterSample::Reset { .. })
        ));
        assert_eq!(
            c.update(5_000_300_000, 1_000_000),
            Ok(CounterSample::Reset {
                previous_raw: 0,
                raw: 5_000_300_000
            })
        );
        // Counting resumes from the real value.
        assert_eq!(
            c.update(5_000_400_000, 1_000_000),
            Ok(CounterSample::Energy {
                energy_uj: 100_000,
                wrapped: false
            })
        );
        // Without a reset before it, an impossible rise is still quarantined.
        assert!(matches!(
            c.update(9_000_000_000, 1_000_000),
            Ok(CounterSample::Quarantined { .. })
        ));
    }

    #[test]
    fn first_plain_wrap_reset_quarantine() {
        // range as in the fixtures: 262143328850 uJ max value.
        let m = 262_143_328_850 + 1;
        let mut c = EnergyCounter::new(Some(m), EnergyUnit::MicroJoule, 1000 * W);
        assert_eq!(c.update(m - 1_000, 1_000_000), Ok(CounterSample::First));
        assert_eq!(
            c.update(m - 500, 1_000_000),
            Ok(CounterSample::Energy {
                energy_uj: 500,
                wrapped: false
            })
        );
        // wraps: 500 to the top, then 700 more
        assert_eq!(
            c.update(700, 1_000_000),
            Ok(CounterSample::Energy {
                energy_uj: 1_200,
                wrapped: true
            })
        );
        // a drop from 200 J to 0.1 J within 1 s at 1 kW ceiling: not a plausible wrap -> reset
        let mut c = EnergyCounter::new(Some(m), EnergyUnit::MicroJoule, 1000 * W);
        c.update(200_000_000, 1_000_000).unwrap();
        assert_eq!(
            c.update(100_000, 1_000_000),
            Ok(CounterSample::Reset {
                previous_raw: 200_000_000,
                raw: 100_000
            })
        );
        // after a reset the new baseline counts normally
        assert_eq!(
            c.update(100_050, 1_000_000),
            Ok(CounterSample::Energy {
                energy_uj: 50,
                wrapped: false
            })
        );
        // 5 kJ in 1 s at a 1 kW ceiling: quarantined, value kept
        assert_eq!(
            c.update(100_050 + 5_000_000_000, 1_000_000),
            Ok(CounterSample::Quarantined {
                energy_uj: 5_000_000_000,
                ceiling_uj: 1_000_000_000
            })
        );
        // out of range value
        assert_eq!(c.update(m, 1), Err(OutOfRange { raw: m, modulus: m }));
    }

    #[test]
    fn sixty_four_bit_counter_decrease_is_reset() {
        let mut c = EnergyCounter::new(None, EnergyUnit::MicroJoule, 1000 * W);
        c.update(10, 1).unwrap();
        assert_eq!(
            c.update(5, 1_000),
            Ok(CounterSample::Reset {
                previous_raw: 10,
                raw: 5
            })
        );
    }

    #[test]
    fn pow2_unit_conversion_has_no_drift() {
        // 2^-14 J units (61.03515625 uJ): 1000 deltas of 1 unit must sum to floor(1000 * 61.035..)
        let mut c = EnergyCounter::new(Some(1 << 32), EnergyUnit::PowTwoJoule(14), 1000 * W);
        c.update(0, 1).unwrap();
        let mut sum = 0u64;
        for i in 1..=1000u64 {
            if let Ok(CounterSample::Energy { energy_uj, .. }) = c.update(i, 1_000) {
                sum += energy_uj;
            } else {
                panic!("unexpected sample");
            }
        }
        assert_eq!(sum, 1000 * 1_000_000 / 16384);
        assert_eq!(sum, 61_035);
    }

    #[test]
    fn perf_scale_is_recognised_as_power_of_two() {
        assert_eq!(
            // The perf .scale file's text, parsed as the probe parses it.
            EnergyUnit::from_joule_scale("2.3283064365386962890625e-10".parse().unwrap()),
            EnergyUnit::PowTwoJoule(32)
        );
        assert_eq!(
            EnergyUnit::from_joule_scale(1.0),
            EnergyUnit::PowTwoJoule(0)
        );
        assert!(matches!(
            EnergyUnit::from_joule_scale(3e-6),
            EnergyUnit::Joule(_)
        ));
    }

    proptest! {
        /// For any sequence of true increments, each below the range and the ceiling, the sum of
        /// corrected deltas equals the true total.
        #[test]
        fn corrected_deltas_sum_to_truth(
            modulus in 1_000u64..=u64::MAX / 2,
            start_frac in 0.0f64..1.0,
            steps in proptest::collection::vec(0.0f64..1.0, 1..200),
        ) {
            let start = ((modulus - 1) as f64 * start_frac) as u64;
            let ceiling_w = u64::MAX / 4_000_000_000; // large enough never to trip here
            let mut c = EnergyCounter::new(Some(modulus), EnergyUnit::MicroJoule, ceiling_w * W);
            prop_assert_eq!(c.update(start, 1_000_000), Ok(CounterSample::First));
            let mut raw = start;
            let mut truth: u128 = 0;
            let mut sum: u128 = 0;
            for f in steps {
                let inc = ((modulus - 1) as f64 * f) as u64 % modulus;
                let inc = inc.min(c.ceiling_uj(1_000_000));
                truth += inc as u128;
                raw = ((raw as u128 + inc as u128) % modulus as u128) as u64;
                match c.update(raw, 1_000_000) {
                    Ok(CounterSample::Energy { energy_uj, .. }) => sum += energy_uj as u128,
                    other => prop_assert!(false, "unexpected {:?}", other),
                }
            }
            prop_assert_eq!(sum, truth);
        }

        /// Whatever a counter does, no single update yields more than the ceiling as energy.
        #[test]
        fn nothing_above_ceiling_is_billed(
            values in proptest::collection::vec(any::<u64>(), 2..100),
            elapsed in proptest::collection::vec(0u64..10_000_000, 2..100),
            modulus in proptest::option::of(2u64..=u64::MAX),
            ceiling_w in 1u64..5_000,
        ) {
            let mut c = EnergyCounter::new(modulus, EnergyUnit::MicroJoule, ceiling_w * W);
            for (v, e) in values.iter().zip(elapsed.iter().cycle()) {
                let v = match modulus { Some(m) => v % m, None => *v };
                if let Ok(CounterSample::Energy { energy_uj, .. }) = c.update(v, *e) {
                    prop_assert!(energy_uj <= c.ceiling_uj(*e));
                }
            }
        }
    }
}
