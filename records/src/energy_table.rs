//! The per-run energy table that `wattd runs` prints from the spool and `wattd-ledger runs` from
//! the ledger's store: one formatter, so the two can be compared line for line (the outage tests
//! do). Energy is summed in integers and shown in microjoules and in watt-hours with 10 decimals,
//! exact and rounded half up.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

/// 1 Wh in microjoules.
pub const UJ_PER_WH: u128 = 3_600_000_000;

/// `energy_uj` in Wh with 10 decimals (0.36 uJ resolution, finer than 1 uJ), rounded half up,
/// computed in integers so the text is exact.
pub fn wh_text(energy_uj: u128) -> String {
    let whole = energy_uj / UJ_PER_WH;
    let rem = energy_uj % UJ_PER_WH;
    let scale = 10_000_000_000u128;
    let frac = (rem * scale + UJ_PER_WH / 2) / UJ_PER_WH;
    let (whole, frac) = if frac >= scale {
        (whole + 1, frac - scale)
    } else {
        (whole, frac)
    };
    format!("{whole}.{frac:010}")
}

/// A domain label as both tables write it: `package:0`, or `psys` for a platform-wide domain.
pub fn domain_label(domain: &str, package: Option<u32>) -> String {
    match package {
        Some(p) => format!("{domain}:{p}"),
        None => domain.to_owned(),
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DomainRow {
    pub domain: String,
    pub energy_uj: u128,
    pub energy_wh: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RunRow {
    /// The node that billed it (the ledger's table, which bills per node and run); absent in a
    /// node's own table.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    pub run_id: String,
    pub energy_uj: u128,
    pub energy_wh: String,
    pub domains: Vec<DomainRow>,
    /// How the run's last usage was obtained, from its summary (`read`, `traced`, `perf_counted`,
    /// `reconciled`, `reconciled_shared`, `lost`); absent while the run is live or its summary is not here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub final_usage: Option<String>,
    /// CPU microseconds of the run recovered from its parent after its cgroup was removed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reconciled_usage_us: Option<u64>,
    /// The account the run belongs to: the value of its account label (`wattd-ledger runs
    /// --account-label`), when the records carried one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
}

/// Rows from run id -> domain label -> uJ, runs and domains in order.
pub fn run_rows(totals: BTreeMap<String, BTreeMap<String, u128>>) -> Vec<RunRow> {
    totals
        .into_iter()
        .map(|(run_id, domains)| {
            let energy_uj = domains.values().sum();
            RunRow {
                node_id: None,
                run_id,
                energy_uj,
                energy_wh: wh_text(energy_uj),
                domains: domains
                    .into_iter()
                    .map(|(domain, energy_uj)| DomainRow {
                        domain,
                        energy_uj,
                        energy_wh: wh_text(energy_uj),
                    })
                    .collect(),
                final_usage: None,
                reconciled_usage_us: None,
                account: None,
            }
        })
        .collect()
}

/// A name as a table cell: printable ASCII as is, anything else escaped (`\n`, `\u{..}`), so a
/// name can never start a line of its own. (Names are validated before they are stored; this
/// is the last guard.)
pub fn cell(v: &str) -> String {
    if v.bytes().all(|b| b.is_ascii_graphic()) {
        v.to_owned()
    } else {
        v.escape_default().to_string().replace(' ', "\\x20")
    }
}

/// The table: a header, a line per run and domain, and a `total` line per run; with a NODE
/// column first when the rows name their node.
pub fn table_text(runs: &[RunRow]) -> String {
    let mut s = String::new();
    let with_node = runs.iter().any(|r| r.node_id.is_some());
    let mut line = |node: &str, run: &str, domain: &str, uj: &dyn std::fmt::Display, wh: &str| {
        if with_node {
            let _ = write!(s, "{node:<24} ");
        }
        let _ = writeln!(s, "{run:<36} {domain:<12} {uj:>20} {wh:>22}");
    };
    line("NODE", "RUN", "DOMAIN", &"ENERGY_UJ", "ENERGY_WH");
    for run in runs {
        let node = cell(run.node_id.as_deref().unwrap_or("-"));
        let id = cell(&run.run_id);
        for d in &run.domains {
            line(&node, &id, &cell(&d.domain), &d.energy_uj, &d.energy_wh);
        }
        line(&node, &id, "total", &run.energy_uj, &run.energy_wh);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wh_text_is_exact_and_rounds_half_up() {
        assert_eq!(wh_text(0), "0.0000000000");
        assert_eq!(wh_text(UJ_PER_WH), "1.0000000000");
        assert_eq!(wh_text(1), "0.0000000003");
        assert_eq!(wh_text(UJ_PER_WH / 2), "0.5000000000");
        assert_eq!(wh_text(UJ_PER_WH - 1), "0.9999999997");
        assert_eq!(wh_text(u128::from(u64::MAX)), "5124095576.0304310042");
    }

    #[test]
    fn rows_and_table() {
        let mut t: BTreeMap<String, BTreeMap<String, u128>> = BTreeMap::new();
        t.entry("b".into())
            .or_default()
            .insert("package:0".into(), UJ_PER_WH);
        t.entry("a".into()).or_default().insert("psys".into(), 7);
        t.entry("a".into()).or_default().insert("dram:1".into(), 3);
        let rows = run_rows(t);
        assert_eq!(rows[0].run_id, "a");
        assert_eq!(rows[0].energy_uj, 10);
        assert_eq!(rows[0].domains[0].domain, "dram:1");
        assert_eq!(rows[1].energy_wh, "1.0000000000");
        let text = table_text(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1 + 3 + 2);
        assert!(lines[0].starts_with("RUN"));
        assert!(
            lines[3].starts_with("a") && lines[3].contains("total") && lines[3].contains(" 10 ")
        );
        assert_eq!(domain_label("package", Some(2)), "package:2");
        // A hostile name cannot start a line of its own.
        let mut evil = run_rows(BTreeMap::from([(
            "x\nevil 1 2".to_owned(),
            BTreeMap::from([("psys".to_owned(), 1u128)]),
        )]));
        evil[0].node_id = Some("n 1".into());
        let text = table_text(&evil);
        assert_eq!(text.lines().count(), 3, "{text}");
        assert!(
            text.lines()
                .all(|l| l.starts_with("NODE") || l.starts_with("n\\x201")),
            "{text}"
        );
        assert_eq!(domain_label("psys", None), "psys");
    }
}
