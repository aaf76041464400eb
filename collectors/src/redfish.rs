//! Redfish: the BMC's view of the whole node's power, parsed from its JSON. No IO here (the
//! agent's `bmc` thread fetches over HTTPS); this module decides only what a body says. Every body
//! is untrusted: links must stay under the service root, numbers must be finite, non-negative
//! and physically possible, and every error names the resource and the field.
//!
//! What is read, in order of preference, from one chassis:
//! - `EnvironmentMetrics` (`Chassis.EnvironmentMetrics`): `EnergykWh.Reading`, the BMC's own
//!   energy counter where it has one, and `PowerWatts.Reading`;
//! - `Power` (deprecated, but what most BMCs serve): `PowerControl[0].PowerConsumedWatts`.

use std::path::PathBuf;

use serde_json::Value;

use crate::error::{HostError, Shown};

/// Where every Redfish service starts.
pub const SERVICE_ROOT: &str = "/redfish/v1";
/// The chassis collection.
pub const CHASSIS: &str = "/redfish/v1/Chassis";

/// The longest resource path followed.
pub const LINK_MAX_BYTES: usize = 256;
/// The most chassis looked at.
pub const CHASSIS_MAX: usize = 64;
/// The largest energy counter accepted, in kWh (a 10 kW node for over fifty years): a larger
/// reading is garbage (a BMC reporting Wh as kWh), and above about 5.1 million kWh its
/// microjoules would not fit in 64 bits.
pub const ENERGY_KWH_MAX: f64 = 5e6;
/// Microjoules in one kilowatt-hour.
pub const UJ_PER_KWH: f64 = 3.6e12;

/// One reading of the node's wall power or energy, as the BMC stated it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WallReading {
    /// The node's power, milliwatts (`PowerWatts`, `PowerConsumedWatts`).
    pub power_mw: Option<u64>,
    /// The BMC's energy counter, microjoules since its own origin (`EnergykWh`).
    pub energy_uj: Option<u64>,
}

/// The power resources one chassis links to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChassisLinks {
    /// The chassis resource itself.
    pub chassis: String,
    pub environment_metrics: Option<String>,
    pub power: Option<String>,
}

impl WallReading {
    /// Neither power nor energy: nothing to bill from.
    pub fn is_empty(&self) -> bool {
        self.power_mw.is_none() && self.energy_uj.is_none()
    }
}

impl ChassisLinks {
    /// Whether the chassis has anything wattd can read.
    pub fn has_power(&self) -> bool {
        self.environment_metrics.is_some() || self.power.is_some()
    }
}

fn malformed(resource: &str, what: String) -> HostError {
    HostError::Malformed {
        path: PathBuf::from(resource),
        what,
    }
}

fn parse(resource: &str, body: &str) -> Result<Value, HostError> {
    serde_json::from_str(body).map_err(|e| malformed(resource, format!("not JSON: {e}")))
}

/// A link (`{"@odata.id": "/redfish/v1/..."}`) that stays under the service root: printable
/// ASCII path characters only, no `..`, bounded. The fragment (`#/PowerControl/0`) is dropped.
pub fn link(resource: &str, field: &str, v: &Value) -> Result<String, HostError> {
    let Some(id) = v.get("@odata.id").and_then(Value::as_str) else {
        return Err(malformed(
            resource,
            format!("{field}: no \"@odata.id\" string"),
        ));
    };
    let path = id.split('#').next().unwrap_or("").trim_end_matches('/');
    let ok = path.len() <= LINK_MAX_BYTES
        && path.starts_with(SERVICE_ROOT)
        && path[SERVICE_ROOT.len()..].starts_with('/')
        && !path.split('/').any(|c| c == ".." || c == ".")
        && path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/-_.~%:".contains(&b));
    if ok {
        Ok(path.to_owned())
    } else {
        Err(malformed(
            resource,
            format!(
                "{field}: link {} is not a path under {SERVICE_ROOT}",
                Shown::new(id)
            ),
        ))
    }
}

/// The members of a collection (the chassis), at most [`CHASSIS_MAX`].
pub fn members(resource: &str, body: &str) -> Result<Vec<String>, HostError> {
    let v = parse(resource, body)?;
    let Some(list) = v.get("Members").and_then(Value::as_array) else {
        return Err(malformed(resource, "Members: not an array".into()));
    };
    list.iter()
        .take(CHASSIS_MAX)
        .enumerate()
        .map(|(i, m)| link(resource, &format!("Members[{i}]"), m))
        .collect()
}

/// What a chassis links to for power.
pub fn chassis_links(resource: &str, body: &str) -> Result<ChassisLinks, HostError> {
    let v = parse(resource, body)?;
    let opt = |field: &str| -> Result<Option<String>, HostError> {
        match v.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(l) => link(resource, field, l).map(Some),
        }
    };
    Ok(ChassisLinks {
        chassis: resource.to_owned(),
        environment_metrics: opt("EnvironmentMetrics")?,
        power: opt("Power")?,
    })
}

/// A number that must be a finite reading within `0..=max`: `null` or absent is `None` (the
/// BMC has no reading now), anything else an error naming the field.
fn reading(
    resource: &str,
    field: &str,
    v: Option<&Value>,
    max: f64,
) -> Result<Option<f64>, HostError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(x) if x.is_finite() && (0.0..=max).contains(&x) => Ok(Some(x)),
            _ => Err(malformed(
                resource,
                format!("{field}: {n} is not a reading between 0 and {max}"),
            )),
        },
        Some(other) => Err(malformed(
            resource,
            format!(
                "{field}: {} is not a number",
                Shown::new(&other.to_string())
            ),
        )),
    }
}

fn watts_to_mw(w: f64) -> u64 {
    // Bounded by the caller's `max_watts`, so the product fits.
    (w * 1000.0).round() as u64
}

/// `EnvironmentMetrics`: `PowerWatts.Reading` and `EnergykWh.Reading`; power above `max_watts`
/// is an error. Neither present is an empty reading ([`WallReading::is_empty`]): the resource
/// exists but has nothing to bill from (the caller tries `Power`, or counts a failed poll).
pub fn environment_metrics(
    resource: &str,
    body: &str,
    max_watts: u32,
) -> Result<WallReading, HostError> {
    let v = parse(resource, body)?;
    let power = reading(
        resource,
        "PowerWatts.Reading",
        v.get("PowerWatts").and_then(|p| p.get("Reading")),
        f64::from(max_watts),
    )?;
    let energy = reading(
        resource,
        "EnergykWh.Reading",
        v.get("EnergykWh").and_then(|p| p.get("Reading")),
        ENERGY_KWH_MAX,
    )?;
    Ok(WallReading {
        power_mw: power.map(watts_to_mw),
        energy_uj: energy.map(|kwh| (kwh * UJ_PER_KWH).round() as u64),
    })
}

/// `Power`: the first `PowerControl` entry's `PowerConsumedWatts` (the chassis' input power).
pub fn power(resource: &str, body: &str, max_watts: u32) -> Result<WallReading, HostError> {
    let v = parse(resource, body)?;
    let Some(first) = v
        .get("PowerControl")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
    else {
        return Err(malformed(resource, "PowerControl: no entry".into()));
    };
    let watts = reading(
        resource,
        "PowerControl[0].PowerConsumedWatts",
        first.get("PowerConsumedWatts"),
        f64::from(max_watts),
    )?;
    match watts {
        Some(w) => Ok(WallReading {
            power_mw: Some(watts_to_mw(w)),
            energy_uj: None,
        }),
        None => Err(malformed(
            resource,
            "PowerControl[0].PowerConsumedWatts has no value".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_stay_under_the_service_root() {
        let ok = serde_json::json!({"@odata.id": "/redfish/v1/Chassis/1U/Power#/PowerControl/0"});
        assert_eq!(link("r", "f", &ok).unwrap(), "/redfish/v1/Chassis/1U/Power");
        for bad in [
            "http://evil/redfish/v1/Chassis",
            "/redfish/v1/../../etc/passwd",
            "/redfish/v1Chassis",
            "/redfish/v1/Chassis/a b",
            "/redfish/v1/Chassis/\n",
        ] {
            let v = serde_json::json!({ "@odata.id": bad });
            let e = link("/redfish/v1/Chassis", "Members[0]", &v).unwrap_err();
            assert!(e.to_string().contains("Members[0]"), "{e}");
        }
        let long = format!("/redfish/v1/{}", "a".repeat(LINK_MAX_BYTES));
        assert!(link("r", "f", &serde_json::json!({ "@odata.id": long })).is_err());
    }

    #[test]
    fn readings_are_bounded_and_named() {
        let r = environment_metrics(
            "/em",
            r#"{"PowerWatts":{"Reading":374.5},"EnergykWh":{"Reading":1.5}}"#,
            5000,
        )
        .unwrap();
        assert_eq!(r.power_mw, Some(374_500));
        assert_eq!(r.energy_uj, Some(5_400_000_000_000));
        let r = power(
            "/p",
            r#"{"PowerControl":[{"PowerConsumedWatts":344}]}"#,
            5000,
        )
        .unwrap();
        assert_eq!(r.power_mw, Some(344_000));
        for (body, field) in [
            (r#"{"PowerWatts":{"Reading":-1}}"#, "PowerWatts.Reading"),
            (r#"{"PowerWatts":{"Reading":6000}}"#, "PowerWatts.Reading"),
            (r#"{"PowerWatts":{"Reading":"12"}}"#, "PowerWatts.Reading"),
            (r#"{"EnergykWh":{"Reading":1e300}}"#, "EnergykWh.Reading"),
            (r#"{"EnergykWh":{"Reading":5000001}}"#, "EnergykWh.Reading"),
            ("<html>", "not JSON"),
        ] {
            let e = environment_metrics("/redfish/v1/Chassis/1U/EnvironmentMetrics", body, 5000)
                .unwrap_err()
                .to_string();
            assert!(e.contains(field) && e.contains("EnvironmentMetrics"), "{e}");
        }
        let empty = environment_metrics("/em", r#"{"PowerWatts":{"Reading":null}}"#, 5000);
        assert!(empty.unwrap().is_empty());
        assert!(power("/p", r#"{"PowerControl":[]}"#, 5000).is_err());
        assert!(power(
            "/p",
            r#"{"PowerControl":[{"PowerConsumedWatts":null}]}"#,
            5000
        )
        .is_err());
    }
}
