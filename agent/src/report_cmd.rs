//! `wattd report`: one self-contained HTML file (inline SVG; no script, font or style fetched
//! from anywhere) an SRE can open offline: attributed power stacked by run with the host, idle
//! and unattributed shares against the measured total over time (the outlines coincide when
//! energy is conserved), energy per run, source quality and gaps along the time axis, and the
//! conservation residual of every interval.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use wattd::spool;
use wattd_proto::v1::Interval;

use wattd::energy_table::wh_text;

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The data dir holding the spool [default: /var/lib/wattd as root, ./wattd-data
    /// otherwise].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Show this run on its own and every other run as one series.
    #[arg(long, value_name = "RUN_ID")]
    pub run: Option<String>,
    /// The HTML file to write.
    #[arg(long, value_name = "FILE.html")]
    pub out: PathBuf,
}

const PALETTE: [&str; 10] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#ff9da7", "#9c755f",
    "#bab0ac", "#86bcb6",
];
const HOST: &str = "#7f7f7f";
const IDLE: &str = "#c7c7c7";
const UNATTRIBUTED: &str = "#e15759";
const RUN_SERIES_MAX: usize = 8;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn load(dir: &std::path::Path) -> anyhow::Result<Vec<Interval>> {
    let (batches, _unreadable) = spool::decoded_batches(dir)?;
    let mut intervals: Vec<Interval> = batches.into_iter().flat_map(|b| b.intervals).collect();
    intervals.sort_by_key(|i| i.index);
    Ok(intervals)
}

/// One interval of one domain, split into the series that are stacked.
struct Column {
    start_s: f64,
    end_s: f64,
    /// Series name -> microjoules.
    parts: BTreeMap<String, u64>,
    measured_uj: u64,
    estimated: bool,
    gap: bool,
}

pub fn run(args: &ReportArgs) -> anyhow::Result<()> {
    let dir = args
        .data_dir
        .clone()
        .unwrap_or_else(spool::default_data_dir);
    anyhow::ensure!(dir.is_dir(), "{}: no such data dir", dir.display());
    let intervals = load(&dir)?;
    anyhow::ensure!(
        !intervals.is_empty(),
        "{}: no interval in the spool",
        dir.display()
    );
    let html = render(&intervals, args.run.as_deref());
    std::fs::write(&args.out, html).with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!(
        "wrote {} ({} intervals)",
        args.out.display(),
        intervals.len()
    );
    Ok(())
}

/// The whole page.
pub fn render(intervals: &[Interval], focus: Option<&str>) -> String {
    // Energy per run over everything, to pick the series shown on their own.
    let mut per_run: BTreeMap<String, u64> = BTreeMap::new();
    for i in intervals {
        for d in &i.domains {
            for a in &d.allocations {
                *per_run.entry(a.run_id.clone()).or_default() += a.active_uj + a.idle_uj;
            }
        }
    }
    let mut ranked: Vec<(&String, &u64)> = per_run.iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let shown: Vec<String> = match focus {
        Some(r) => vec![r.to_owned()],
        None => ranked
            .iter()
            .take(RUN_SERIES_MAX)
            .map(|(r, _)| (*r).clone())
            .collect(),
    };
    let t0 = intervals.first().map_or(0, |i| i.start_monotonic_ns);
    let secs = |ns: u64| ns.saturating_sub(t0) as f64 / 1e9;
    let domains: BTreeSet<String> = intervals
        .iter()
        .flat_map(|i| i.domains.iter().map(|d| d.domain.clone()))
        .collect();

    let mut page = String::new();
    let _ = write!(
        page,
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>wattd report</title><style>\
         body{{font-family:sans-serif;margin:24px;color:#222}} table{{border-collapse:collapse}} \
         td,th{{padding:2px 10px;text-align:right;border-bottom:1px solid #ddd}} th{{background:#f4f4f4}} \
         .l{{text-align:left}} .key span{{display:inline-block;width:12px;height:12px;margin:0 4px 0 14px}}</style></head><body>"
    );
    let _ = write!(
        page,
        "<h1>wattd report</h1><p>{} intervals, index {} to {}, {:.1} s{}</p>",
        intervals.len(),
        intervals.first().map_or(0, |i| i.index),
        intervals.last().map_or(0, |i| i.index),
        intervals.last().map_or(0.0, |i| secs(i.end_monotonic_ns)),
        focus.map_or(String::new(), |r| format!(
            ", run <b>{}</b> against every other run",
            esc(r)
        ))
    );
    let mut series: Vec<(String, &str)> = shown
        .iter()
        .enumerate()
        .map(|(k, r)| (format!("run {r}"), PALETTE[k % PALETTE.len()]))
        .collect();
    series.push(("other runs".into(), PALETTE[9]));
    series.push(("host".into(), HOST));
    series.push(("idle (host)".into(), IDLE));
    series.push(("unattributed".into(), UNATTRIBUTED));
    let _ = write!(page, "<p class=\"key\">");
    for (name, color) in &series {
        let _ = write!(
            page,
            "<span style=\"background:{color}\"></span>{}",
            esc(name)
        );
    }
    let _ = write!(page, "</p>");

    for dom in &domains {
        let cols: Vec<Column> = intervals
            .iter()
            .map(|i| {
                let mut parts: BTreeMap<String, u64> = BTreeMap::new();
                let (mut measured, mut estimated, mut gap) = (0u64, false, false);
                for d in i.domains.iter().filter(|d| &d.domain == dom) {
                    measured += d.measured_uj;
                    estimated |= d.quality == wattd_proto::v1::Quality::Estimated as i32;
                    gap |= d.gap;
                    for a in &d.allocations {
                        let key = if shown.contains(&a.run_id) {
                            format!("run {}", a.run_id)
                        } else {
                            "other runs".into()
                        };
                        *parts.entry(key).or_default() += a.active_uj + a.idle_uj;
                    }
                    *parts.entry("host".into()).or_default() += d.host_active_uj;
                    *parts.entry("idle (host)".into()).or_default() += d.host_idle_uj;
                    *parts.entry("unattributed".into()).or_default() +=
                        d.unattributed.iter().map(|u| u.energy_uj).sum::<u64>();
                }
                Column {
                    start_s: secs(i.start_monotonic_ns),
                    end_s: secs(i.end_monotonic_ns),
                    parts,
                    measured_uj: measured,
                    estimated,
                    gap,
                }
            })
            .collect();
        page += &chart(dom, &cols, &series);
    }

    if domains.contains("platform") {
        page += &wall(intervals, &secs);
    }

    // Energy per run.
    let _ = write!(
        page,
        "<h2>Energy per run</h2><table><tr><th class=\"l\">run</th><th>uJ</th><th>Wh</th></tr>"
    );
    for (r, e) in &ranked {
        let _ = write!(
            page,
            "<tr><td class=\"l\">{}</td><td>{e}</td><td>{}</td></tr>",
            esc(r),
            wh_text(u128::from(**e))
        );
    }
    let _ = write!(page, "</table>");
    let _ = write!(page, "<p>No script, font or image is loaded from anywhere: this file is the whole report.</p></body></html>");
    page
}

/// The wall as the BMC saw it against its parts: per interval, the component meters (psys, else
/// package and DRAM; plus the GPUs) and the platform meter stacked, and the totals. The
/// platform's energy arrives with the BMC's readings, so single intervals may lead or lag; the
/// totals agree.
fn wall(intervals: &[Interval], secs: &impl Fn(u64) -> f64) -> String {
    let (mut comp_total, mut plat_total, mut lost) = (0u128, 0u128, 0usize);
    let cols: Vec<Column> = intervals
        .iter()
        .map(|i| {
            let has_psys = i.domains.iter().any(|d| d.domain == "psys");
            let (mut comp, mut plat, mut estimated, mut gap) = (0u64, 0u64, false, false);
            for d in &i.domains {
                let component = match d.domain.as_str() {
                    "psys" | "gpu" => true,
                    "package" | "dram" => !has_psys,
                    _ => false,
                };
                if component {
                    comp += d.measured_uj;
                } else if d.domain == "platform" {
                    plat += d.measured_uj;
                    estimated |= d.quality == wattd_proto::v1::Quality::Estimated as i32;
                    gap |= d.gap;
                }
            }
            lost += i.gaps.iter().filter(|g| g.domain == "platform").count();
            comp_total += u128::from(comp);
            plat_total += u128::from(plat);
            Column {
                start_s: secs(i.start_monotonic_ns),
                end_s: secs(i.end_monotonic_ns),
                parts: BTreeMap::from([
                    ("components".to_owned(), comp),
                    ("platform".to_owned(), plat),
                ]),
                measured_uj: comp + plat,
                estimated,
                gap,
            }
        })
        .collect();
    let series = [
        ("components".to_owned(), PALETTE[0]),
        ("platform".to_owned(), PALETTE[1]),
    ];
    let mut out = chart("wall (BMC) = components + platform", &cols, &series);
    let share = if comp_total + plat_total > 0 {
        plat_total as f64 * 100.0 / (comp_total + plat_total) as f64
    } else {
        0.0
    };
    let _ = write!(
        out,
        "<table><tr><th class=\"l\">wall (BMC)</th><th>components</th><th>platform</th>\
         <th>platform share</th><th>platform gaps</th></tr><tr><td class=\"l\">{}</td><td>{}</td>\
         <td>{}</td><td>{share:.1}%</td><td>{lost}</td></tr></table>",
        wh_text(comp_total + plat_total),
        wh_text(comp_total),
        wh_text(plat_total),
    );
    out
}

/// One domain's stacked chart, its quality and gap strip, and its residual line.
fn chart(dom: &str, cols: &[Column], series: &[(String, &str)]) -> String {
    let (w, h, left, top) = (1000.0, 260.0, 60.0, 20.0);
    let end = cols.iter().map(|c| c.end_s).fold(0.0, f64::max).max(1e-9);
    let watts = |uj: u64, c: &Column| uj as f64 / ((c.end_s - c.start_s).max(1e-9) * 1e6);
    let max_w = cols
        .iter()
        .map(|c| watts(c.measured_uj, c))
        .fold(0.0, f64::max)
        .max(1e-9)
        * 1.1;
    let x = |s: f64| left + s / end * w;
    let y = |watt: f64| top + h - watt / max_w * h;
    let mut svg = String::new();
    let mut stacked_outline = Vec::new();
    let mut measured_outline = Vec::new();
    let mut max_residual: i128 = 0;
    for c in cols {
        let mut acc = 0u64;
        for (name, color) in series {
            let uj = c.parts.get(name).copied().unwrap_or(0);
            if uj == 0 {
                continue;
            }
            let (y0, y1) = (y(watts(acc, c)), y(watts(acc + uj, c)));
            let _ = write!(
                svg,
                "<rect x=\"{:.2}\" y=\"{:.2}\" width=\"{:.2}\" height=\"{:.2}\" fill=\"{color}\"><title>{} {:.3} W</title></rect>",
                x(c.start_s),
                y1,
                (x(c.end_s) - x(c.start_s)).max(0.5),
                (y0 - y1).max(0.0),
                esc(name),
                watts(uj, c)
            );
            acc += uj;
        }
        stacked_outline.push(acc);
        measured_outline.push(c.measured_uj);
        max_residual = max_residual.max((acc as i128 - c.measured_uj as i128).abs());
    }
    // The measured total as a step line over the stack.
    let mut path = String::new();
    for c in cols {
        let yy = y(watts(c.measured_uj, c));
        let _ = write!(
            path,
            "{}{:.2},{:.2} L{:.2},{:.2} ",
            if path.is_empty() { "M" } else { "L" },
            x(c.start_s),
            yy,
            x(c.end_s),
            yy
        );
    }
    let join = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    let mut out = format!(
        "<h2>{}: power over time</h2><svg width=\"{}\" height=\"{}\" class=\"chart\" \
         data-domain=\"{}\" data-stacked-uj=\"{}\" data-measured-uj=\"{}\">",
        esc(dom),
        w + left + 20.0,
        h + top + 110.0,
        esc(dom),
        join(&stacked_outline),
        join(&measured_outline)
    );
    out += &svg;
    let _ = write!(out, "<path d=\"{path}\" fill=\"none\" stroke=\"#000\" stroke-width=\"1.5\"><title>measured</title></path>");
    // Axes.
    let _ = write!(
        out,
        "<line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#444\"/><text x=\"4\" y=\"{}\" font-size=\"11\">{:.1} W</text><text x=\"4\" y=\"{}\" font-size=\"11\">0 W</text><text x=\"{}\" y=\"{}\" font-size=\"11\">{:.1} s</text>",
        top + h,
        left + w,
        top + h,
        top + 10.0,
        max_w,
        top + h,
        left + w - 40.0,
        top + h + 14.0,
        end
    );
    // Quality and gaps along the time axis.
    let strip_y = top + h + 24.0;
    let _ = write!(
        out,
        "<text x=\"4\" y=\"{}\" font-size=\"11\">source</text>",
        strip_y + 10.0
    );
    for c in cols {
        let color = if c.gap {
            UNATTRIBUTED
        } else if c.estimated {
            "#f28e2b"
        } else {
            "#59a14f"
        };
        let label = if c.gap {
            "gap"
        } else if c.estimated {
            "estimated"
        } else {
            "measured"
        };
        let _ = write!(
            out,
            "<rect x=\"{:.2}\" y=\"{strip_y}\" width=\"{:.2}\" height=\"12\" fill=\"{color}\"><title>{label}</title></rect>",
            x(c.start_s),
            (x(c.end_s) - x(c.start_s)).max(0.5)
        );
    }
    // Holes between intervals (agent down) show as white on the strip; the residual line.
    let res_y = strip_y + 40.0;
    let _ = write!(
        out,
        "<text x=\"4\" y=\"{}\" font-size=\"11\">residual</text><line x1=\"{left}\" y1=\"{res_y}\" x2=\"{}\" y2=\"{res_y}\" stroke=\"{}\" stroke-width=\"2\"/>\
         <text x=\"{left}\" y=\"{}\" font-size=\"11\">conservation residual per interval (attributed + host + idle + unattributed - measured): max {} uJ</text></svg>",
        res_y + 4.0,
        left + w,
        if max_residual == 0 { "#59a14f" } else { UNATTRIBUTED },
        res_y + 20.0,
        max_residual
    );
    out
}
