//! The first layer: the file as written, through serde into one struct per section, nothing
//! checked but the shape. A value of the wrong type, a section that is not a table and a key
//! that is not in the contract are all kept (not an error at this layer), so that the second
//! layer ([`super::Validator`] and the sections beside their owners) can name every problem of
//! a file at once with its line, as `wattd validate` promises. Spans are not carried here: the
//! validator finds a problem's line from its key in the same text (toml's `Spanned` has none
//! for a table made implicitly, `[a.b]` without `[a]`, and would fail the whole file there).
//! A section may be written as a header or as an inline table (`node = { id = "w1" }`): TOML
//! makes them the same table.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use serde::de::value::MapAccessDeserializer;
use serde::de::{DeserializeOwned, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};

/// One key as written.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Field<T> {
    /// Not in the file: the section's default holds.
    #[default]
    Absent,
    /// In the file: `Ok` when the value has the key's type, else the value as written.
    Given(Result<T, toml::Value>),
}

impl<T> Field<T> {
    /// Whether the key is in the file (whatever its value).
    pub fn is_given(&self) -> bool {
        matches!(self, Field::Given(_))
    }
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Field<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Any TOML value is taken; its type is checked here, and a mismatch is kept for the
        // second layer to name instead of ending the whole file's reading.
        let Written(raw) = Written::deserialize(d)?;
        let value = T::deserialize(raw.clone()).map_err(|_: toml::de::Error| raw);
        Ok(Field::Given(value))
    }
}

/// Any value as written, taken without judging it: a date-time arrives from the parser as a
/// table of one private key and stays that table here (so it is no string, no number: toml's
/// own `Value` would take it as a date, or refuse the whole file for a hostile key of that
/// name); every other value as `toml::Value` has it.
struct Written(toml::Value);

impl<'de> Deserialize<'de> for Written {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Written;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any TOML value")
            }
            fn visit_bool<E>(self, b: bool) -> Result<Written, E> {
                Ok(Written(toml::Value::Boolean(b)))
            }
            fn visit_i64<E>(self, i: i64) -> Result<Written, E> {
                Ok(Written(toml::Value::Integer(i)))
            }
            fn visit_u64<E>(self, u: u64) -> Result<Written, E> {
                // TOML integers are i64; a larger one is out of every key's range anyway.
                Ok(Written(match i64::try_from(u) {
                    Ok(i) => toml::Value::Integer(i),
                    Err(_) => toml::Value::Float(u as f64),
                }))
            }
            fn visit_f64<E>(self, x: f64) -> Result<Written, E> {
                Ok(Written(toml::Value::Float(x)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Written, E> {
                Ok(Written(toml::Value::String(s.to_owned())))
            }
            fn visit_string<E>(self, s: String) -> Result<Written, E> {
                Ok(Written(toml::Value::String(s)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<Written, A::Error> {
                let mut items = Vec::new();
                while let Some(Written(v)) = s.next_element()? {
                    items.push(v);
                }
                Ok(Written(toml::Value::Array(items)))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Written, A::Error> {
                let mut t = toml::Table::new();
                while let Some((k, Written(v))) = m.next_entry::<String, Written>()? {
                    t.insert(k, v);
                }
                Ok(Written(toml::Value::Table(t)))
            }
        }
        d.deserialize_any(V)
    }
}

/// One `[section]` as written.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Section<T> {
    #[default]
    Absent,
    /// A table.
    Table(T),
    /// Something else under the section's name (`node = 5`).
    NotATable,
}

/// A section's body: its keys when it is a table (a TOML date-time arrives as a map of one
/// private key, and is not a table).
enum Body<T> {
    Table(T),
    Other,
}

impl<'de, T: Deserialize<'de> + Unknown> Deserialize<'de> for Body<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de> + Unknown> Visitor<'de> for V<T> {
            type Value = Body<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any TOML value")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Body<T>, A::Error> {
                let t = T::deserialize(MapAccessDeserializer::new(map))?;
                if t.unknown().keys().any(|k| k.starts_with("$__toml_private")) {
                    return Ok(Body::Other);
                }
                Ok(Body::Table(t))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<Body<T>, A::Error> {
                while s.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Body::Other)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Body<T>, E> {
                Ok(Body::Other)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Body<T>, E> {
                Ok(Body::Other)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Body<T>, E> {
                Ok(Body::Other)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Body<T>, E> {
                Ok(Body::Other)
            }
            fn visit_str<E>(self, _: &str) -> Result<Body<T>, E> {
                Ok(Body::Other)
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

impl<'de, T: Deserialize<'de> + Unknown> Deserialize<'de> for Section<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match Body::<T>::deserialize(d)? {
            Body::Table(keys) => Section::Table(keys),
            Body::Other => Section::NotATable,
        })
    }
}

/// Keys outside the contract, by name (their lines are looked up only to report them).
pub type UnknownKeys = BTreeMap<String, IgnoredAny>;

/// A section's keys that are not in the contract, and the contract's keys.
pub trait Unknown {
    /// The contract's keys of this section, in the order `wattd validate` lists them.
    const KEYS: &'static [&'static str];
    fn unknown(&self) -> &UnknownKeys;
}

/// A section's struct: every key a [`Field`], the rest collected by name.
macro_rules! section {
    ($(#[$doc:meta])* $name:ident { $($key:ident: $ty:ty),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Default, Deserialize)]
        #[serde(default)]
        pub struct $name {
            $(pub $key: Field<$ty>,)*
            #[serde(flatten)]
            pub unknown: UnknownKeys,
        }
        impl Unknown for $name {
            const KEYS: &'static [&'static str] = &[$(stringify!($key)),*];
            fn unknown(&self) -> &UnknownKeys {
                &self.unknown
            }
        }
    };
}

section!(
    /// `[node]`.
    Node { id: String }
);
section!(
    /// `[identity]`.
    Identity { rotate_after_s: i64 }
);
section!(
    /// `[sampling]`.
    Sampling { interval_ms: i64 }
);
section!(
    /// `[host]`.
    Host { root: String, cgroup_root: String }
);
section!(
    /// `[runs]`.
    Runs {
        patterns: Vec<toml::Value>,
        control_socket: String,
        control_allowed_uids: Vec<toml::Value>,
        control_allowed_gids: Vec<toml::Value>,
        perf_counters: bool,
        perf_counters_max: i64,
        cgroup_trace: bool,
    }
);
section!(
    /// `[attribution]`.
    Attribution {
        idle_policy: String,
        dram_policy: String,
        idle_window_s: i64,
        idle_watts_package: f64,
        idle_watts_dram: f64,
        idle_watts_psys: f64,
        idle_watts_gpu: f64,
        platform_policy: String,
    }
);
section!(
    /// `[calibration]`: what `wattd calibrate` measured.
    Calibration {
        idle_watts_package: f64,
        idle_watts_dram: f64,
        idle_watts_psys: f64,
    }
);
section!(
    /// `[estimator]`.
    Estimator { idle_watts_per_package: f64, busy_watts_per_cpu: f64 }
);
section!(
    /// `[spool]`.
    Spool {
        dir: String,
        max_bytes: i64,
        retain_acked_s: i64,
        retain_acked_share: f64,
        seal_every_ms: i64,
    }
);
section!(
    /// `[ledger]`.
    Ledger {
        endpoint: String,
        ca: String,
        cert: String,
        key: String,
        window: i64,
        heartbeat_s: i64,
        max_batches_per_s: i64,
        backoff_max_s: i64,
        ack_timeout_s: i64,
        drain_s: i64,
    }
);
section!(
    /// `[log]`.
    Log { level: String }
);
section!(
    /// `[metrics]`.
    Metrics { listen: String, finished_run_ttl_s: i64, web_config: String }
);
section!(
    /// `[gpu]`.
    Gpu { enabled: bool, library: String, amd_smi: bool, amd_smi_library: String, read_timeout_ms: i64, max_watts: i64 }
);
section!(
    /// `[platform]`.
    Platform {
        source: String,
        url: String,
        ca_file: String,
        server_name: String,
        credentials_file: String,
        chassis: String,
        poll_ms: i64,
        read_timeout_ms: i64,
        max_gap_ms: i64,
        max_watts: i64,
    }
);

section!(
    /// `[hwmon]`.
    Hwmon { power: Vec<toml::Value> }
);

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct File {
    pub gpu: Section<Gpu>,
    pub log: Section<Log>,
    pub node: Section<Node>,
    pub identity: Section<Identity>,
    pub sampling: Section<Sampling>,
    pub host: Section<Host>,
    pub runs: Section<Runs>,
    pub attribution: Section<Attribution>,
    pub calibration: Section<Calibration>,
    pub estimator: Section<Estimator>,
    pub spool: Section<Spool>,
    pub ledger: Section<Ledger>,
    pub metrics: Section<Metrics>,
    pub platform: Section<Platform>,
    pub hwmon: Section<Hwmon>,
    #[serde(flatten)]
    pub unknown: UnknownKeys,
}

/// The file's sections, in the order `wattd validate` lists them.
pub const SECTIONS: [&str; 15] = [
    "gpu",
    "log",
    "node",
    "identity",
    "sampling",
    "host",
    "runs",
    "attribution",
    "calibration",
    "estimator",
    "spool",
    "ledger",
    "metrics",
    "platform",
    "hwmon",
];

/// Reads the file's text; the error is TOML syntax, with its span.
pub fn read(text: &str) -> Result<File, toml::de::Error> {
    toml::from_str(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every key a section lists is one of its fields (a listed key that is not would be
    /// reported as unknown while the message named it as known).
    #[test]
    fn every_listed_key_is_a_field() {
        fn check<T: DeserializeOwned + Unknown>(name: &str) {
            let text: String = T::KEYS.iter().map(|k| format!("{k} = 1\n")).collect();
            let t: T = toml::from_str(&text).unwrap();
            assert!(t.unknown().is_empty(), "{name}: {:?}", t.unknown());
        }
        check::<Node>("node");
        check::<Identity>("identity");
        check::<Sampling>("sampling");
        check::<Host>("host");
        check::<Runs>("runs");
        check::<Attribution>("attribution");
        check::<Calibration>("calibration");
        check::<Estimator>("estimator");
        check::<Spool>("spool");
        check::<Ledger>("ledger");
        check::<Log>("log");
        check::<Metrics>("metrics");
        check::<Gpu>("gpu");
        check::<Platform>("platform");
        check::<Hwmon>("hwmon");
    }

    /// Values of the wrong type, a section that is not a table and unknown keys (tables made
    /// implicitly among them) are kept for the second layer to name.
    #[test]
    fn nothing_is_an_error_but_syntax() {
        let text =
            "node = 5\n[sampling]\ninterval_ms = \"fast\"\nbogus = 1\n[x]\n[runs.sub]\nx = 1\n";
        let f = read(text).unwrap();
        assert!(matches!(f.node, Section::NotATable));
        let Section::Table(keys) = &f.sampling else {
            panic!("{:?}", f.sampling)
        };
        match &keys.interval_ms {
            Field::Given(Err(v)) => assert_eq!(v.as_str(), Some("fast")),
            other => panic!("{other:?}"),
        }
        assert!(keys.unknown.contains_key("bogus"));
        assert!(f.unknown.contains_key("x"));
        let Section::Table(runs) = &f.runs else {
            panic!("{:?}", f.runs)
        };
        assert!(runs.unknown.contains_key("sub"));
        let implicit = read("[sampling.interval_ms]\nx = 1\n").unwrap();
        let Section::Table(keys) = &implicit.sampling else {
            panic!("{:?}", implicit.sampling)
        };
        assert!(matches!(keys.interval_ms, Field::Given(Err(_))));
        assert!(matches!(
            read("node = 1979-05-27\n").unwrap().node,
            Section::NotATable
        ));
        assert!(matches!(read("[node]\n").unwrap().node, Section::Table(_)));
        assert!(read("[node\n").is_err());
    }
}
